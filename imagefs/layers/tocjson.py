"""A CRFS TOC's JSON, parsed one entry at a time.

`json.loads` of a 48k-entry TOC (~16 MB) builds ~45 MB of dicts before the first of them
is turned into a compact `TOCEntry`: the daemon's peak memory. Here the top-level object is
walked member by member with the C scanner (`JSONDecoder.raw_decode`), and the elements of
one array member (``entries``) are converted as each is scanned, so at most one entry's
dict is alive at a time. Same answers as `json.loads` for every valid document (duplicate
keys: the last wins); anything else is a `LayerFormatError`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, TypeVar

from imagefs.errors import LayerFormatError

T = TypeVar("T")

_DECODER = json.JSONDecoder()
_WS = re.compile(r"[ \t\n\r]*")


def load_streaming(
    raw: bytes, what: str, key: str, convert: Callable[[Any], T]
) -> tuple[dict[str, Any], list[T] | None]:
    """The top-level JSON object in `raw`: its members other than `key`, and `convert` of
    each element of the array `key` (None when absent)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LayerFormatError(f"{what}: TOC is not valid JSON: {e}") from None
    try:
        return _walk(text, what, key, convert)
    except ValueError as e:  # json.JSONDecodeError, or a member of the wrong kind
        raise LayerFormatError(f"{what}: TOC is not valid JSON: {e}") from None
    except RecursionError:  # arrays or objects nested past the C scanner's depth
        raise LayerFormatError(f"{what}: TOC is not valid JSON: nested too deeply") from None


def _walk(
    text: str, what: str, key: str, convert: Callable[[Any], T]
) -> tuple[dict[str, Any], list[T] | None]:
    scan = _DECODER.raw_decode
    pos = _skip(text, 0)
    if not text.startswith("{", pos):
        raise LayerFormatError(f"{what}: TOC is not a JSON object")
    members: dict[str, Any] = {}
    items: list[T] | None = None
    pos = _skip(text, pos + 1)
    if text.startswith("}", pos):
        return members, _end(text, pos + 1, items)
    while True:
        name, pos = scan(text, pos)
        if not isinstance(name, str):
            raise ValueError(f"object key expected at {pos}")
        pos = _skip(text, pos)
        if not text.startswith(":", pos):
            raise ValueError(f"':' expected at {pos}")
        pos = _skip(text, pos + 1)
        if name == key and text.startswith("[", pos):
            items, pos = _array(text, pos + 1, convert)
            members.pop(name, None)
        else:
            members[name], pos = scan(text, pos)
            if name == key:
                items = None  # a later non-array value wins, as in json.loads
        pos = _skip(text, pos)
        if text.startswith(",", pos):
            pos = _skip(text, pos + 1)
            continue
        if text.startswith("}", pos):
            return members, _end(text, pos + 1, items)
        raise ValueError(f"',' or '}}' expected at {pos}")


def _array(text: str, pos: int, convert: Callable[[Any], T]) -> tuple[list[T], int]:
    scan = _DECODER.raw_decode
    out: list[T] = []
    pos = _skip(text, pos)
    if text.startswith("]", pos):
        return out, pos + 1
    while True:
        value, pos = scan(text, pos)
        out.append(convert(value))
        del value  # one entry's dict at a time
        pos = _skip(text, pos)
        if text.startswith(",", pos):
            pos = _skip(text, pos + 1)
            continue
        if text.startswith("]", pos):
            return out, pos + 1
        raise ValueError(f"',' or ']' expected at {pos}")


def _end(text: str, pos: int, items: list[T] | None) -> list[T] | None:
    if _skip(text, pos) != len(text):
        raise ValueError(f"extra data at {pos}")
    return items


def _skip(text: str, pos: int) -> int:
    m = _WS.match(text, pos)
    assert m is not None  # `*`: always matches
    return m.end()
