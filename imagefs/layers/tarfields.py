"""Tar header fields, pure: numbers (octal text, GNU base-256), PAX records and times, and
member names (cleaning, whether one leaves the root, showing one in a message).

`tarscan` reads headers with these; names are cleaned the same way wherever a TOC is built.
"""

from __future__ import annotations

from imagefs.errors import LayerFormatError


def clean_path(raw: bytes) -> bytes:
    """Lexically clean a member name so it can never leave the image root.

    Same result as umoci's CleanPath (runc's, also what containerd's Clean + RootPath reach):
    clean as if the path were absolute, then make it relative again. So `./a`, `/a`, `a/` and
    `../../a` all become `a`; `.` and `/` become the empty path, which is the root.
    """
    if (
        raw
        and not raw.startswith((b"/", b"."))
        and not raw.endswith(b"/")
        and b"//" not in raw
        and b"/." not in raw
    ):
        return raw  # no empty, `.` or `..` component: clean already (most names)
    parts: list[bytes] = []
    for comp in raw.split(b"/"):
        if not comp or comp == b".":
            continue
        if comp == b"..":
            if parts:
                parts.pop()
            continue
        parts.append(comp)
    return b"/".join(parts)


def leaves_root(raw: bytes) -> bool:
    """Whether a raw member name is absolute or climbs above the root with `..`.

    `clean_path` contains both; this only tells whether it had to. A lone `/` or `./` (the
    root entry some writers emit) does not count, and `a/../b` stays inside.
    """
    if raw.startswith(b"/") and raw.strip(b"/"):
        return True
    depth = 0
    for comp in raw.split(b"/"):
        if comp == b"..":
            if not depth:
                return True
            depth -= 1
        elif comp and comp != b".":
            depth += 1
    return False


def show(path: bytes) -> str:
    """Render a raw name for a message without losing the bytes that are not UTF-8."""
    return repr(path.decode("utf-8", "backslashreplace"))


def cstr(field: bytes) -> bytes:
    end = field.find(0)
    return field if end < 0 else field[:end]


def parse_number(field: bytes) -> int:
    """Parse a numeric header field: octal text, or GNU base-256 when the top bit is set."""
    if field and field[0] & 0x80:
        value = int.from_bytes(field, "big") & ~(1 << (8 * len(field) - 1))
        if field[0] & 0x40:  # two's complement negative (0xff prefix)
            value -= 1 << (8 * len(field) - 1)
        return value
    text = field.strip(b" \x00")
    # Some writers pad with NULs in the middle ("0000644\x00 "): cut at the first terminator.
    for stop in (b"\x00", b" "):
        cut = text.find(stop)
        if cut >= 0:
            text = text[:cut]
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise ValueError(f"bad octal field {text!r}") from None


def parse_decimal(value: bytes) -> int:
    if not value.isdigit():
        raise ValueError(f"bad decimal value {value!r}")
    return int(value)


def parse_pax_time(value: bytes) -> tuple[int, int]:
    """Parse a PAX time like `1700000000.123456789` or `-1.5` into (seconds, nanoseconds).

    Nanoseconds are normalised to [0, 1e9) so that negative times floor like st_mtime does.
    """
    negative = value.startswith(b"-")
    body = value[1:] if negative else value
    whole, dot, frac = body.partition(b".")
    if not whole.isdigit() or (dot and frac and not frac.isdigit()):
        raise ValueError(f"bad time value {value!r}")
    seconds = int(whole)
    nanos = int((frac[:9]).ljust(9, b"0")) if frac else 0
    if negative:
        seconds = -seconds
        if nanos:
            seconds -= 1
            nanos = 1_000_000_000 - nanos
    return seconds, nanos


def parse_pax_records(data: bytes, where: str) -> dict[bytes, bytes]:
    """Split a PAX extended header payload into records; values stay raw bytes.

    Records are length-prefixed, so values may hold newlines and '=' (a file name with a
    newline is legal). Trailing NUL padding is tolerated as some writers emit it.
    """
    records: dict[bytes, bytes] = {}
    pos = 0
    end = len(data)
    while pos < end:
        if data[pos] == 0 and not data[pos:].strip(b"\x00"):
            break
        space = data.find(b" ", pos, min(end, pos + 21))
        if space <= pos or not data[pos:space].isdigit():
            raise LayerFormatError(f"layer tar: malformed PAX record length {where}")
        length = int(data[pos:space])
        if length < space - pos + 3 or pos + length > end:
            raise LayerFormatError(f"layer tar: PAX record overruns its header {where}")
        record = data[space + 1 : pos + length]
        if not record.endswith(b"\n"):
            raise LayerFormatError(f"layer tar: PAX record not newline-terminated {where}")
        key, eq, value = record[:-1].partition(b"=")
        if not eq or not key:
            raise LayerFormatError(f"layer tar: PAX record without key {where}")
        records[key] = value
        pos += length
    return records
