"""Content digests: the root of every integrity check in imagefs.

Only sha256 and sha512 are accepted. The OCI spec registers exactly these two, and refusing
anything else up front means a registry or manifest can never steer us onto a weak hash.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from imagefs.errors import IntegrityError, InvalidReference

if TYPE_CHECKING:
    from hashlib import _Hash

# Lowercase only: the spec allows nothing else, and one spelling per digest keeps digests
# usable as dictionary keys and file names without normalising.
_HEX_LENGTHS: dict[str, int] = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True, slots=True)
class Digest:
    """An `algorithm:hex` content digest, validated on construction."""

    algorithm: str
    hex: str

    def __post_init__(self) -> None:
        problem = _problem(self.algorithm, self.hex)
        if problem is not None:
            raise InvalidReference(f'invalid digest "{self.algorithm}:{self.hex}": {problem}')

    @classmethod
    def parse(cls, s: str) -> Digest:
        """Parse `sha256:<64 hex>` or `sha512:<128 hex>`; anything else is `InvalidReference`."""
        algorithm, sep, hex_ = s.partition(":")
        if not sep:
            raise InvalidReference(f'invalid digest "{s}": want algorithm:hex, e.g. sha256:...')
        return cls(algorithm, hex_)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        """The digest of `data` (sha256 unless told otherwise)."""
        if algorithm not in _HEX_LENGTHS:
            raise InvalidReference(f'unsupported digest algorithm "{algorithm}"')
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @property
    def short(self) -> str:
        """The first 12 hex characters, as docker shows image IDs."""
        return self.hex[:12]

    def new_hasher(self) -> _Hash:
        """A fresh hashlib object for this digest's algorithm, for streaming verification."""
        return hashlib.new(self.algorithm)

    def verify(self, data: bytes, size: int | None = None) -> None:
        """Raise `IntegrityError` unless `data` has this digest (and `size`, when given)."""
        if size is not None and len(data) != size:
            raise IntegrityError(
                f"size mismatch for {self}: expected {size} bytes, got {len(data)} bytes"
            )
        actual = hashlib.new(self.algorithm, data).hexdigest()
        if actual != self.hex:
            raise IntegrityError(
                f"digest mismatch: expected {self}, got {self.algorithm}:{actual} "
                f"({len(data)} bytes)"
            )


def _problem(algorithm: str, hex_: str) -> str | None:
    want = _HEX_LENGTHS.get(algorithm)
    if want is None:
        return f'unsupported algorithm "{algorithm}" (want sha256 or sha512)'
    if len(hex_) != want or _HEX.fullmatch(hex_) is None:
        return f"want {want} lowercase hex characters"
    return None
