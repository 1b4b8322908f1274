"""Numbers as a person reads them: bytes in binary units, durations in the unit one would say."""

from __future__ import annotations

BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def _sig3(x: float) -> str:
    """Three significant digits without trailing zeros: 1.5, 12.3, 123."""
    if x >= 100:
        return f"{x:.0f}"
    text = f"{x:.1f}" if x >= 10 else f"{x:.2f}"
    return text.rstrip("0").rstrip(".")


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB': binary units, as `imagefs images` and du -h count."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in BYTE_UNITS[1:]:
        n /= 1024
        if n < 1024 or unit == BYTE_UNITS[-1]:
            return f"{_sig3(n)} {unit}"
    raise AssertionError("unreachable")


def human_duration(ns: float) -> str:
    """ns -> '84.2 ms', '1.5 s', '2 min 5 s': the unit a person would say."""
    if ns < 1_000:
        return f"{int(ns)} ns"
    if ns < 1_000_000:
        return f"{_sig3(ns / 1e3)} µs"
    if ns < 1_000_000_000:
        return f"{_sig3(ns / 1e6)} ms"
    if ns < 60e9:
        return f"{_sig3(ns / 1e9)} s"
    minutes, seconds = divmod(round(ns / 1e9), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def pct(part: int, whole: int | None) -> str:
    if not whole:
        return "–"
    value = 100 * part / whole
    if 0 < value < 0.1:
        return "<0.1%"
    return f"{value:.1f}%"


def shorten(path: str, limit: int) -> str:
    """Keep the end of a long path: the file name says more than the top directories."""
    return path if len(path) <= limit else "…" + path[-(limit - 1) :]
