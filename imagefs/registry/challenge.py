"""Registry authentication, the pure part: challenges, scopes and token responses.

The HTTP client feeds in header values and response bodies and gets back values; nothing here
touches a socket or a clock (the current time is passed in), so every odd header a registry
has been seen to send can be pinned down in a unit test.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from imagefs.errors import RegistryError, Unauthorized

# Tokens shorter-lived than this are treated as living this long (distribution token spec).
MIN_TOKEN_LIFETIME = 60.0

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# Unquoted parameter values should be tokens, but some registries send bare URLs; reading up
# to the next comma or space accepts those without changing the result for real tokens.
_BARE_VALUE = re.compile(r"[^,\s]*")
_OWS = " \t"


@dataclass(frozen=True)
class Challenge:
    """One challenge of a `WWW-Authenticate` header, e.g. `Bearer realm="...",service="..."`."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    token68: str | None = None

    def __post_init__(self) -> None:
        # A caller's dict must not change under a challenge we may be caching tokens by.
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")

    @property
    def service(self) -> str | None:
        return self.params.get("service")


@dataclass(frozen=True)
class Token:
    """A bearer token and when (on the caller's clock) to stop using it."""

    value: str = field(repr=False)
    expires_at: float
    refresh_token: str | None = field(default=None, repr=False)
    issued_at: str | None = None


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a `WWW-Authenticate` value (RFC 7235) into its challenges, in order.

    Scheme and parameter names are case-insensitive, so both come back lowercased. When a
    parameter repeats within a challenge, the first value wins.
    """
    return _ChallengeParser(header).parse()


class _ChallengeParser:
    def __init__(self, header: str) -> None:
        self.s = header
        self.i = 0

    def fail(self, problem: str) -> RegistryError:
        return RegistryError(f"malformed WWW-Authenticate header {self.s!r}: {problem}")

    def skip(self, chars: str) -> None:
        while self.i < len(self.s) and self.s[self.i] in chars:
            self.i += 1

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def token(self) -> str | None:
        m = _TOKEN.match(self.s, self.i)
        if m is None:
            return None
        self.i = m.end()
        return m.group()

    def parse(self) -> list[Challenge]:
        challenges: list[Challenge] = []
        scheme: str | None = None
        params: dict[str, str] = {}
        token68: str | None = None

        def finish() -> None:
            if scheme is not None:
                challenges.append(Challenge(scheme, params, token68))

        while True:
            self.skip(_OWS + ",")
            if self.i >= len(self.s):
                break
            start = self.i
            name = self.token()
            if name is None:
                raise self.fail(f"unexpected {self.peek()!r} at offset {self.i}")
            after_name = self.i
            self.skip(_OWS)
            if self.peek() == "=" and scheme is not None and token68 is None:
                self.i += 1
                self.skip(_OWS)
                value = self.value()
                params.setdefault(name.lower(), value)
                continue
            if self.peek() == "=":
                raise self.fail(f"parameter {name!r} outside a challenge")
            # A token not followed by "=" starts the next challenge.
            finish()
            scheme, params, token68 = name.lower(), {}, None
            if after_name == start or self.i == after_name:
                continue  # no space after the scheme: no token68 can follow
            token68 = self.try_token68()
        finish()
        return challenges

    def value(self) -> str:
        if self.peek() == '"':
            return self.quoted()
        m = _BARE_VALUE.match(self.s, self.i)
        assert m is not None  # the pattern matches the empty string
        self.i = m.end()
        return m.group()

    def quoted(self) -> str:
        self.i += 1  # opening quote
        out: list[str] = []
        while self.i < len(self.s):
            c = self.s[self.i]
            if c == "\\" and self.i + 1 < len(self.s):
                out.append(self.s[self.i + 1])
                self.i += 2
            elif c == '"':
                self.i += 1
                return "".join(out)
            else:
                out.append(c)
                self.i += 1
        raise self.fail("unterminated quoted string")

    def try_token68(self) -> str | None:
        """`Negotiate abc==` style credentials; only when nothing but a comma or end follows."""
        m = _TOKEN68.match(self.s, self.i)
        if m is None:
            return None
        rest = self.s[m.end() :].lstrip(_OWS)
        if rest and not rest.startswith(","):
            return None
        self.i = m.end()
        return m.group()


def scope_for(repository: str, actions: Sequence[str]) -> str:
    """The token scope for `actions` on `repository`: `repository:library/alpine:pull,push`."""
    if not actions:
        raise ValueError("scope_for needs at least one action")
    return f"repository:{repository}:{','.join(dict.fromkeys(actions))}"


def token_request_params(challenge: Challenge, scopes: Sequence[str]) -> list[tuple[str, str]]:
    """Query parameters for the token request answering `challenge`.

    The challenge's own scope (space-separated when several) is merged with ours, and
    actions on the same resource are combined, so one token covers both what the registry
    asked for and what we are about to do.
    """
    params: list[tuple[str, str]] = []
    if challenge.service is not None:
        params.append(("service", challenge.service))
    wanted = list(scopes)
    wanted.extend((challenge.params.get("scope") or "").split())
    params.extend(("scope", scope) for scope in _merge_scopes(wanted))
    return params


def _merge_scopes(scopes: Sequence[str]) -> list[str]:
    merged: dict[str, list[str]] = {}
    for scope in scopes:
        resource, sep, actions = scope.rpartition(":")
        if not sep or not resource:
            merged.setdefault(scope, [])  # not type:name:actions; pass it on untouched
            continue
        bucket = merged.setdefault(resource, [])
        bucket.extend(a for a in actions.split(",") if a and a not in bucket)
    return [f"{r}:{','.join(a)}" if a else r for r, a in merged.items()]


def parse_token_response(body: bytes, now: float) -> Token:
    """Parse a token server's JSON answer; `now` is the caller's clock, in seconds.

    Expiry is counted from `now`, not from the server's `issued_at`: with a skewed server
    clock, `issued_at + expires_in` can lie in our past and we would refetch forever.
    """
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as err:
        raise Unauthorized(f"token server sent a response that is not JSON ({err})") from None
    if not isinstance(obj, dict):
        raise Unauthorized("token server response is not a JSON object")
    value = obj.get("token") or obj.get("access_token")
    if not isinstance(value, str) or not value:
        raise Unauthorized("token server response has no token or access_token")
    expires_in = obj.get("expires_in", MIN_TOKEN_LIFETIME)
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float):
        raise Unauthorized(f"token server response has a non-numeric expires_in {expires_in!r}")
    # json.loads takes NaN and Infinity, and integers no float holds: a token that never
    # expires (or whose expiry no comparison can decide) is refused like a non-number
    try:
        finite = math.isfinite(float(expires_in))
    except OverflowError:
        finite = False
    if not finite:
        raise Unauthorized(
            f"token server response has a non-finite expires_in {repr(expires_in)[:24]}"
        )
    refresh_token = obj.get("refresh_token")
    issued_at = obj.get("issued_at")
    return Token(
        value=value,
        expires_at=now + max(float(expires_in), MIN_TOKEN_LIFETIME),
        refresh_token=refresh_token if isinstance(refresh_token, str) else None,
        issued_at=issued_at if isinstance(issued_at, str) else None,
    )
