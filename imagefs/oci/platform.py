"""Platforms (os/architecture/variant) and how to match them, following containerd.

The same machine goes by several names (`aarch64`, `arm64`, `arm64/v8`); comparing raw strings
would make `imagefs pull` pick nothing, or the wrong image, from a multi-arch index.
"""

from __future__ import annotations

import platform as _stdlib_platform
from dataclasses import dataclass

from imagefs.errors import UsageError

# uname -m -> (GOARCH, variant). The variant is what the kernel name implies; Platform.host()
# keeps it explicit so that `str(Platform.host())` says what docker would say.
_MACHINES: dict[str, tuple[str, str | None]] = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv8l": ("arm", "v8"),
    "armv7l": ("arm", "v7"),
    "armv7": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "armv5tel": ("arm", "v5"),
    "armv5tejl": ("arm", "v5"),
    "i386": ("386", None),
    "i486": ("386", None),
    "i586": ("386", None),
    "i686": ("386", None),
    "ppc64le": ("ppc64le", None),
    "ppc64": ("ppc64", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
    "mips64": ("mips64", None),
    "mips64el": ("mips64le", None),
    "loongarch64": ("loong64", None),
}

# Variants that can run code built for an older variant of the same architecture, best first.
_OLDER_VARIANTS: dict[str, tuple[str, ...]] = {
    "arm": ("v8", "v7", "v6", "v5"),
    "amd64": ("v4", "v3", "v2", ""),
}


@dataclass(frozen=True)
class Platform:
    """An image platform as written in an index or config: `linux/arm64/v8`."""

    os: str
    architecture: str
    variant: str | None = None
    os_version: str | None = None

    @classmethod
    def parse(cls, s: str) -> Platform:
        """Parse `os/arch[/variant]`, as given to `--platform`."""
        parts = s.split("/")
        if not 2 <= len(parts) <= 3 or not all(parts):
            raise UsageError(f'invalid platform "{s}": want os/architecture[/variant]')
        variant = parts[2].lower() if len(parts) == 3 else None
        return cls(parts[0].lower(), parts[1].lower(), variant)

    @classmethod
    def host(cls, machine: str | None = None, system: str | None = None) -> Platform:
        """The platform of this machine (or of the given `uname -m` / `uname -s` values)."""
        machine = (machine if machine is not None else _stdlib_platform.machine()).lower()
        system = (system if system is not None else _stdlib_platform.system()).lower()
        architecture, variant = _MACHINES.get(machine, (machine, None))
        return cls(system, architecture, variant)

    def normalized(self) -> Platform:
        """containerd's normal form: aliases resolved, default variants made canonical."""
        os = self.os.lower()
        if os == "macos":
            os = "darwin"
        architecture, variant = _normalize_arch(self.architecture, self.variant)
        return Platform(os, architecture, variant, self.os_version)

    def matches(self, other: Platform) -> bool:
        """Exact match after normalisation (os.version is not compared)."""
        return self.match_rank(other) == 0

    def match_rank(self, candidate: Platform) -> int | None:
        """How well `candidate` runs here: 0 exact, n > 0 an n-step older variant, None no.

        An arm/v7 machine runs arm/v6 code and an amd64/v3 one runs amd64/v2 code; preferring
        the lowest rank picks the exact variant when an index has it.
        """
        want, have = self.normalized(), candidate.normalized()
        if (want.os, want.architecture) != (have.os, have.architecture):
            return None
        if want.variant == have.variant:
            return 0
        order = _OLDER_VARIANTS.get(want.architecture, ())
        want_variant, have_variant = want.variant or "", have.variant or ""
        if want_variant in order and have_variant in order:
            steps = order.index(have_variant) - order.index(want_variant)
            if steps > 0:
                return steps
        return None

    def __str__(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return f"{base}/{self.variant}" if self.variant else base


def _normalize_arch(architecture: str, variant: str | None) -> tuple[str, str | None]:
    arch, var = architecture.lower(), (variant or "").lower()
    if arch in ("i386", "i686"):
        arch, var = "386", ""
    elif arch in ("x86_64", "x86-64", "amd64"):
        arch = "amd64"
        if var == "v1":
            var = ""
    elif arch in ("aarch64", "arm64"):
        arch = "arm64"
        if var in ("8", "v8", "v8.0"):
            var = ""
        elif var in ("9", "9.0", "v9.0"):
            var = "v9"
    elif arch == "armhf":
        arch, var = "arm", "v7"
    elif arch == "armel":
        arch, var = "arm", "v6"
    elif arch == "arm":
        if var in ("", "7"):
            var = "v7"
        elif var in ("5", "6", "8"):
            var = "v" + var
    return arch, var or None
