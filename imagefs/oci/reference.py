"""Image references, normalised exactly as docker does (distribution/reference).

Users type the familiar short forms (`alpine`, `user/app:1.2`); every other part of imagefs
sees only the canonical form (`docker.io/library/alpine:latest`). Following docker's rules to
the letter matters: a reference that means one image to `docker pull` must not mean another
image to us.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from imagefs.errors import InvalidReference
from imagefs.oci.digest import Digest

DEFAULT_REGISTRY = "docker.io"
# Docker Hub's canonical name is `docker.io`, but the API lives on another host.
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
_LEGACY_DEFAULT_REGISTRY = "index.docker.io"
_OFFICIAL_PREFIX = "library/"
NAME_TOTAL_LENGTH_MAX = 255

_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*")
# Go's \w is ASCII-only; Python's is not, hence the explicit class.
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::(?P<port>.*))?"
)
_PORT = re.compile(r"[0-9]+")
# Docker refuses a bare image ID where a name is expected, so `docker pull <id>` cannot be
# mistaken for pulling `library/<id>`.
_IMAGE_ID = re.compile(r"[a-f0-9]{64}")


@dataclass(frozen=True)
class Reference:
    """A canonical image reference: `registry/repository[:tag][@digest]`."""

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    def __post_init__(self) -> None:
        _check(self.registry, self.repository, self.tag, original=str(self))

    @classmethod
    def parse(cls, s: str, *, default_tag: str | None = "latest") -> Reference:
        """Parse a reference as `docker pull` would (ParseNormalizedNamed + TagNameOnly).

        `default_tag` is added only when neither a tag nor a digest was given.
        """
        if not s:
            raise InvalidReference('invalid reference "": repository name must not be empty')
        if _IMAGE_ID.fullmatch(s):
            raise InvalidReference(
                f'invalid reference "{s}": a 64-character hex string is an image ID, '
                "not a repository name"
            )
        registry, remainder = _split_registry(s)

        name_and_tag, at, digest_text = remainder.partition("@")
        repository, colon, tag_text = name_and_tag.partition(":")
        if repository.lower() != repository:
            raise InvalidReference(f'invalid reference "{s}": repository name must be lowercase')

        digest: Digest | None = None
        if at:
            try:
                digest = Digest.parse(digest_text)
            except InvalidReference as err:
                raise InvalidReference(f'invalid reference "{s}": {err}') from None
        tag: str | None = tag_text if colon else None
        if colon and not tag_text:
            raise InvalidReference(f'invalid reference "{s}": empty tag')
        _check(registry, repository, tag, original=s)
        if tag is None and digest is None:
            tag = default_tag
        return cls(registry, repository, tag, digest)

    @property
    def name(self) -> str:
        """`registry/repository`, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def familiar_name(self) -> str:
        """The name as docker prints it: `alpine`, `user/app`, `quay.io/x/y`."""
        if self.registry != DEFAULT_REGISTRY:
            return self.name
        if self.repository.startswith(_OFFICIAL_PREFIX):
            rest = self.repository.removeprefix(_OFFICIAL_PREFIX)
            # `library/a/b` is not an official image; docker keeps the prefix there.
            if "/" not in rest:
                return rest
        return self.repository

    @property
    def familiar(self) -> str:
        """Docker's short form with tag and digest: `alpine:latest`."""
        return self.familiar_name + self._suffix()

    @property
    def api_reference(self) -> str:
        """What goes in `/v2/<repository>/manifests/<reference>`: the digest wins over a tag."""
        if self.digest is not None:
            return str(self.digest)
        if self.tag is not None:
            return self.tag
        raise InvalidReference(f'reference "{self}" has neither a tag nor a digest')

    @property
    def endpoint_host(self) -> str:
        """The host (and port) that serves the registry API for this reference."""
        if self.registry == DEFAULT_REGISTRY:
            return DOCKER_HUB_ENDPOINT
        return self.registry

    def with_tag(self, tag: str) -> Reference:
        """The same reference with `tag`; a digest, if any, is kept (as docker's WithTag)."""
        return dataclasses.replace(self, tag=tag)

    def with_digest(self, digest: Digest) -> Reference:
        """The same reference pinned to `digest`; the tag, if any, is kept for display."""
        return dataclasses.replace(self, digest=digest)

    def without_digest(self) -> Reference:
        return dataclasses.replace(self, digest=None)

    def __str__(self) -> str:
        return self.name + self._suffix()

    def _suffix(self) -> str:
        suffix = f":{self.tag}" if self.tag is not None else ""
        if self.digest is not None:
            suffix += f"@{self.digest}"
        return suffix


def _split_registry(s: str) -> tuple[str, str]:
    """Docker's splitDockerDomain: decide whether the first path component is a host."""
    first, slash, rest = s.partition("/")
    is_host = bool(slash) and (
        "." in first or ":" in first or first == "localhost" or first.lower() != first
    )
    if is_host:
        registry, remainder = first, rest
    else:
        registry, remainder = DEFAULT_REGISTRY, s
    if registry == _LEGACY_DEFAULT_REGISTRY:
        registry = DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY and "/" not in remainder:
        remainder = _OFFICIAL_PREFIX + remainder
    return registry, remainder


def _check(registry: str, repository: str, tag: str | None, *, original: str) -> None:
    def bad(problem: str) -> InvalidReference:
        return InvalidReference(f'invalid reference "{original}": {problem}')

    host = _HOST.fullmatch(registry)
    if host is None:
        raise bad(f'invalid registry host "{registry}"')
    port = host.group("port")
    if port is not None and _PORT.fullmatch(port) is None:
        raise bad(f'registry port "{port}" must be numeric')
    for component in repository.split("/"):
        if _PATH_COMPONENT.fullmatch(component) is None:
            if component.lower() != component:
                raise bad("repository name must be lowercase")
            raise bad(
                f'invalid repository path component "{component}" (want lowercase letters '
                "and digits, separated by '.', '_', '__' or '-')"
            )
    if tag is not None and _TAG.fullmatch(tag) is None:
        raise bad(f'invalid tag "{tag}" (want [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})')
    name_length = len(registry) + 1 + len(repository)
    if name_length > NAME_TOTAL_LENGTH_MAX:
        raise bad(
            f"repository name is {name_length} characters long, "
            f"more than the maximum of {NAME_TOTAL_LENGTH_MAX}"
        )
