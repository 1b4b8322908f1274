"""A CRFS TOC's JSON parsed an entry at a time (`tocjson`): the same answers as `json.loads`
for valid documents, a one-line `LayerFormatError` for the rest, and a big TOC parsed within
a memory bound (its entries' dicts are never all alive together)."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from typing import Any

import pytest

from imagefs.errors import LayerFormatError
from imagefs.layers import estargz, zstdchunked
from imagefs.layers.tocjson import load_streaming

MB = 1 << 20


@pytest.mark.parametrize(
    "text",
    [
        '{"version": 1, "entries": [{"a": 1}, {"b": [2, {"c": 3}]}], "x": "y"}',
        '  {"entries":[]}  \n',
        "{}",
        '{"entries": [1], "entries": [{"z": 0}]}',  # the last wins, as in json.loads
        '{"entries": [1], "entries": 5}',
        '{"entries": 5, "entries": [3]}',
        '{"x": {"entries": [1]}, "y": "\\u00e9\\"}"}',
    ],
)
def test_same_answers_as_json_loads(text: str) -> None:
    members, items = load_streaming(text.encode(), "t", "entries", lambda v: ("got", v))
    expected: dict[str, Any] = json.loads(text)
    if isinstance(expected.get("entries"), list):
        assert items == [("got", v) for v in expected.pop("entries")]
    else:
        assert items is None
    assert members == expected


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"[]",
        b'{"entries": [1, 2}',
        b'{"entries": [1 2]}',
        b'{"a": 1} x',
        b'{"a" 1}',
        b'{"a": 1,}',
        b"{1: 2}",
        b'{"entries": [1]',
        b'{"\xff": 1}',
        # nested past the C scanner's depth: a RecursionError inside, not out
        b'{"entries": [{"x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}]}",
        b'{"meta": ' + b'{"a": ' * 20_000 + b"1" + b"}" * 20_001,
    ],
)
def test_anything_else_is_a_layer_format_error(text: bytes) -> None:
    with pytest.raises(LayerFormatError, match=r"^t: TOC is not"):
        load_streaming(text, "t", "entries", lambda v: v)


def test_estargz_and_zstd_tocs_parse_as_before() -> None:
    entries = [
        {"name": "d", "type": "dir", "mode": 493},
        {
            "name": "d/f",
            "type": "reg",
            "size": 3,
            "offset": 10,
            "chunkDigest": "sha256:" + "0" * 64,
        },
        {"name": "d/f", "type": "chunk", "offset": 40, "chunkOffset": 2, "chunkSize": 1},
        {"name": "x", "type": "reg", "xattrs": {"user.a": "YWI="}},
    ]
    raw = json.dumps({"version": 1, "entries": entries, "tarSplitDigest": "sha256:ab"}).encode()
    for toc in (estargz.parse_toc(raw), zstdchunked.parse_toc_json(raw)):
        assert [e.name for e in toc.entries] == ["d", "d/f", "d/f", "x"]
        assert toc.entries[2].chunk_offset == 2 and toc.entries[3].xattrs == {"user.a": b"ab"}
        assert toc.version == 1 and toc.tar_split_digest == "sha256:ab" and toc.raw == raw
    with pytest.raises(LayerFormatError, match="entries is not a list"):
        estargz.parse_toc(b'{"entries": {}}')
    with pytest.raises(LayerFormatError, match="not a JSON object"):
        estargz.parse_toc(b'{"entries": [1]}')


def test_a_big_toc_parses_within_a_memory_bound() -> None:
    """48k entries (~15 MB of JSON): the parse holds the text, the compact entries and one
    entry's dict at a time."""
    entries = []
    for k in range(48_000):
        h = "sha256:" + hashlib.sha256(str(k).encode()).hexdigest()
        entries.append(
            {
                "name": f"usr/share/doc/pkg{k % 2000}/file-{k}.txt",
                "type": "reg",
                "modtime": "2024-01-01T00:00:00Z",
                "mode": 420,
                "size": 100 + k,
                "digest": h,
                "offset": 1000 * k,
                "chunkDigest": h,
            }
        )
    raw = json.dumps({"version": 1, "entries": entries}).encode()
    del entries
    tracemalloc.start()
    try:
        toc = estargz.parse_toc(raw)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(toc.entries) == 48_000
    # text (len(raw)) + what is kept + slack; json.loads alone peaks ~3x len(raw) higher
    # json.loads + a TOCEntry per dict peaked at 3.5x the JSON's size, this parse at 2.8x
    assert peak < 3 * len(raw), (peak / MB, kept / MB, len(raw) / MB)
