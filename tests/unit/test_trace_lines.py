"""Trace lines written directly (reads, name operations) are exactly what `json.dumps` of the
record writes, for any path bytes (quotes, backslashes, control bytes, non-ASCII, bytes that
are not UTF-8) and any timing; and they read back as the documented record."""

from __future__ import annotations

import json
import random
from pathlib import Path

from imagefs.lazy import telemetry

PATHS = [
    b"etc/os-release",
    b"",
    b'a "quoted" name',
    b"back\\slash",
    b"tab\there\nnewline\x00nul\x1f",
    "caf\u00e9/\u6f22\u5b57/\U0001f600".encode(),
    b"not utf-8: \xff\xfe\xc3",
    b"\x7f\x80 del and a lone continuation byte",
]


def _lines(trace: Path) -> list[str]:
    return trace.read_text().splitlines()


def _dumps(record: dict[str, object]) -> str:
    return json.dumps(record, separators=(",", ":"))


def test_read_and_name_lines_are_what_json_dumps_writes(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    tele = telemetry.Telemetry([10, 20], trace_path=trace)
    rnd = random.Random(7)
    expected: list[dict[str, object]] = []
    for k, path in enumerate(PATHS * 3):
        info = telemetry.ReadInfo(
            source=rnd.choice(["memory", "cache", "registry"]),
            fetched=rnd.choice([0, 1, 123456789]),
            latency=rnd.choice([0.0, 1e-7, 0.0123456789, 3.5]),
            wait=rnd.choice([0.0, 2.5e-6, 0.25, 12.000001]),
        )
        tele.read(k, path, k % 2, k * 4096, 512 + k, info, stream_offset=k << 20)
        tele.event("open", path)
        expected.append(
            {
                "op": "read",
                "path": telemetry.escape(path),
                "layer": k % 2,
                "offset": k * 4096,
                "length": 512 + k,
                "stream_offset": k << 20,
                "from": info.source,
                "fetched": info.fetched,
                "latency": round(info.latency, 6),
                "wait": round(info.wait, 6),
            }
        )
        expected.append({"op": "open", "path": telemetry.escape(path)})
    tele.close()
    lines = _lines(trace)
    assert len(lines) == len(expected)
    for line, want in zip(lines, expected, strict=True):
        got = json.loads(line)
        assert isinstance(got["t"], int) and got["t"] >= 0
        assert line == _dumps({"t": got["t"], **want})  # byte for byte, key order too
    # and the bytes come back from a path
    first = json.loads(lines[2 * PATHS.index(b"not utf-8: \xff\xfe\xc3")])
    assert first["path"].encode("utf-8", "surrogateescape") == b"not utf-8: \\xff\\xfe\\xc3"


def test_other_records_still_go_through_json_dumps(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    tele = telemetry.Telemetry([10], trace_path=trace)
    tele.event("getxattr", b"x", name="user.\u00e9")
    tele.close()
    (line,) = _lines(trace)
    got = json.loads(line)
    assert line == _dumps({"t": got["t"], "op": "getxattr", "path": "x", "name": "user.\u00e9"})
