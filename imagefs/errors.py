"""The one error tree of imagefs.

Everything that can go wrong for a reason the user should hear about raises a subclass of
`ImageFSError`. The CLI turns it into one line on stderr and `exit_code`; the FUSE adapter
turns it into an errno. Nothing else catches these, and nothing swallows them.
"""

from __future__ import annotations

import contextlib
import errno as _errno
from collections.abc import Iterator


class ImageFSError(Exception):
    """Root of all expected failures. `str(err)` is the one line shown to the user."""

    exit_code = 1
    errno = _errno.EIO


class UsageError(ImageFSError):
    """The command line or an argument is malformed (docker exits 125; we use 2 like argparse)."""

    exit_code = 2
    errno = _errno.EINVAL


class InvalidReference(UsageError):
    """An image reference or digest that does not parse; the message names the bad part."""


class NotFound(ImageFSError):
    """An image, tag, blob or mount that does not exist."""

    errno = _errno.ENOENT


class NotAFile(ImageFSError):
    """A path that names a directory or a special file where a regular file is wanted
    (`imagefs cat REF DIR` exits 1, as GNU cat does)."""

    errno = _errno.EISDIR


class ImageInUse(ImageFSError):
    """An image is mounted and the operation would pull the floor from under the mount."""

    errno = _errno.EBUSY


class IntegrityError(ImageFSError):
    """Bytes did not match the digest or size they were promised under. Nothing was kept."""


class UnsupportedMediaType(ImageFSError):
    """A manifest or layer type imagefs does not handle (schema 1, foreign layers, ...)."""

    errno = _errno.EOPNOTSUPP


class StoreError(ImageFSError):
    """The local store is unusable: corrupt metadata, disk full, permissions."""


class RegistryError(ImageFSError):
    """A registry answered with an error, or could not be reached.

    The message names the host, the HTTP status, and the registry's own error code and
    message when it sent one (distribution spec error body).
    """

    def __init__(
        self,
        message: str,
        *,
        host: str = "",
        status: int | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.host = host
        self.status = status
        self.code = code


class RegistryUnreachable(RegistryError):
    """Connection refused, DNS failure, TLS failure, or retries exhausted."""

    errno = _errno.EHOSTUNREACH


class Unauthorized(RegistryError):
    """401/403 after trying the credentials we have."""

    errno = _errno.EACCES


class ManifestUnknown(RegistryError, NotFound):
    """The registry does not know this tag or digest."""

    errno = _errno.ENOENT


class LayerFormatError(ImageFSError):
    """A layer's tar or compression stream is malformed (truncated, lies about sizes, ...)."""


class BuildError(ImageFSError):
    """`imagefs build` cannot go on: a Dockerfile error (naming its line), a RUN that failed,
    a missing COPY source, a runtime or overlay that refused."""


def first_error(exc: BaseException) -> BaseException:
    """The first leaf of a (nested) exception group; `exc` itself if it is not a group."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


@contextlib.contextmanager
def unwrap_groups() -> Iterator[None]:
    """Let a nursery's failure surface as the ImageFSError that caused it.

    Trio wraps errors from nursery children in ExceptionGroups; callers of the library API
    want the `ImageFSError` itself (the first one: the others are usually its consequences).
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaf = first_error(group)
        if isinstance(leaf, ImageFSError):
            raise leaf from group
        raise
