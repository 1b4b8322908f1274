"""The trace report as a person sees it: rendered by a real browser (headless Debian chromium)
from a realistic trace, and the screenshot checked to actually show something.

Why a browser and not only string checks on the HTML: the page is all inline SVG and CSS, and
a misplaced viewBox, a stray unescaped `<` or a CSS typo gives a page whose HTML "contains the
numbers" yet shows nothing. The screenshot is decoded with zlib + struct (no imaging library)
and must have content, the charts' colours and content far down the page.

chromium is installed by tools/test (tools/lib/setup.sh); a missing browser fails the test,
it does not skip it, because a silently skipped render test proves nothing.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imagefs.report import WATERFALL_LIMIT, write_report

# -- a realistic trace ------------------------------------------------------------------------

_LAYERS = [  # (digest hex seed, compressed size): a Debian base, Python, site-packages, the app
    ("a1", 29_884_113),
    ("b2", 17_342_551),
    ("c3", 43_118_902),
    ("d4", 1_904_377),
]


def synthetic_image() -> list[dict[str, Any]]:
    """What `imagefs inspect` prints for the image the synthetic trace comes from."""
    layers = [
        {
            "Digest": "sha256:" + (seed * 32),
            "MediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "Size": size,
            "DiffID": "sha256:" + (seed[::-1] * 32),
            "Cached": 0,
        }
        for seed, size in _LAYERS
    ]
    return [
        {
            "Id": "sha256:" + "9f" * 32,
            "RepoTags": ["localhost:5000/demo/webapp:1.4"],
            "Size": sum(size for _, size in _LAYERS),
            "ImageFS": {"Layers": layers},
        }
    ]


def _files(rng: random.Random) -> list[tuple[int, str, int]]:
    """(layer, path, size) of the files a Python web app touches while it starts."""
    files: list[tuple[int, str, int]] = [
        (0, "lib/x86_64-linux-gnu/libc.so.6", 1_922_136),
        (0, "lib/x86_64-linux-gnu/libm.so.6", 907_784),
        (0, "lib/x86_64-linux-gnu/libz.so.1.2.13", 121_280),
        (0, "lib/x86_64-linux-gnu/libssl.so.3", 696_912),
        (0, "lib/x86_64-linux-gnu/libcrypto.so.3", 4_709_656),
        (0, "etc/ld.so.cache", 9_850),
        (0, "etc/passwd", 922),
        (0, "etc/nsswitch.conf", 494),
        (0, "etc/ssl/certs/ca-certificates.crt", 213_777),
        (0, "usr/share/zoneinfo/Europe/Z\\xfcrich", 2_229),  # a name that is not UTF-8
        (1, "usr/local/bin/python3.11", 14_520),
        (1, "usr/local/lib/libpython3.11.so.1.0", 24_371_552),
        (3, "app/main.py", 6_411),
        (3, "app/config/settings.toml", 1_822),
        (3, "app/templates/<index>.html", 14_002),  # must be escaped in the page
    ]
    for name in (
        "encodings/__init__",
        "codecs",
        "io",
        "abc",
        "site",
        "os",
        "stat",
        "posixpath",
        "genericpath",
        "_collections_abc",
        "_sitebuiltins",
        "types",
        "functools",
        "collections/__init__",
        "keyword",
        "operator",
        "reprlib",
        "re/__init__",
        "enum",
        "json/__init__",
        "json/decoder",
        "json/scanner",
        "logging/__init__",
        "asyncio/__init__",
        "asyncio/base_events",
        "ssl",
        "socket",
        "selectors",
        "email/parser",
        "http/client",
        "urllib/parse",
        "typing",
        "dataclasses",
    ):
        files.append((1, f"usr/local/lib/python3.11/{name}.py", rng.randint(2_000, 120_000)))
    for package in (
        "fastapi",
        "starlette",
        "pydantic",
        "pydantic_core",
        "uvicorn",
        "anyio",
        "sniffio",
        "idna",
        "h11",
        "click",
        "sqlalchemy",
        "jinja2",
        "markupsafe",
    ):
        for module in (
            "__init__",
            "main",
            "types",
            "_compat",
            "utils",
            "exceptions",
            "routing",
            "models",
            "config",
        ):
            if rng.random() < 0.7:
                path = f"usr/local/lib/python3.11/site-packages/{package}/{module}.py"
                files.append((2, path, rng.randint(1_500, 90_000)))
    files.append(
        (2, "usr/local/lib/python3.11/site-packages/pydantic_core/_pydantic_core.so", 4_993_312)
    )
    files.append(
        (2, "usr/local/lib/python3.11/site-packages/sqlalchemy/cyextension/util.so", 1_204_440)
    )
    return files


def synthetic_trace(seed: int = 7) -> list[dict[str, Any]]:
    """A container start as a mount would trace it: lookups down each path, opens, 128 KiB
    reads; a file's first reads wait for the registry (chunk-rounded fetches, 15–180 ms),
    re-reads come from memory or the cache; readdirs, readlinks and xattr probes in between."""
    rng = random.Random(seed)
    events: list[dict[str, Any]] = []
    t = 3_000_000  # the first operation comes ~3 ms after the mount is up
    fetched_chunks: set[tuple[str, int]] = set()
    looked_up: set[str] = set()

    def emit(op: str, path: str) -> None:
        events.append({"t": t, "op": op, "path": path})

    def read(
        path: str, layer: int, offset: int, length: int, source: str, fetched: int = 0,
        latency: float = 0.0, at: int | None = None,
    ) -> None:  # fmt: skip
        events.append(
            {"t": t if at is None else at, "op": "read", "path": path, "layer": layer,
             "offset": offset, "length": length, "from": source, "fetched": fetched,
             "latency": round(latency, 6)}
        )  # fmt: skip

    files = _files(rng)
    order = files[:10] + files[10:12] + rng.sample(files[12:], len(files) - 12)
    for layer, path, size in order:
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if prefix not in looked_up:
                looked_up.add(prefix)
                t += rng.randint(8_000, 60_000)
                emit("lookup", prefix)
        if rng.random() < 0.15:
            t += rng.randint(20_000, 90_000)
            emit("readdir", "/".join(parts[:-1]))
        if rng.random() < 0.05:
            t += rng.randint(5_000, 20_000)
            emit("getxattr", path)
        t += rng.randint(10_000, 40_000)
        emit("open", path)
        # shared objects are mapped and read sparsely, scripts read whole
        sparse = path.endswith((".so", ".so.6", ".so.3", ".so.1.0"))
        offsets = list(range(0, size, 131_072))
        if sparse:
            offsets = sorted(rng.sample(offsets, max(1, len(offsets) // 3)))
        base = t  # a mapped library faults its pages in from several threads at once
        for offset in offsets:
            length = min(131_072, size - offset)
            chunk = (path, offset // 262_144)
            if chunk not in fetched_chunks:
                fetched_chunks.add(chunk)
                latency = rng.uniform(0.015, 0.18)
                fetched = min(262_144, size - chunk[1] * 262_144) + rng.randint(0, 8_000)
                if sparse:
                    base += rng.randint(50_000, 4_000_000)
                    end = base + int(latency * 1e9)
                    t = max(t, end)
                else:
                    t += int(latency * 1e9)
                    end = t
                read(path, layer, offset, length, "registry", fetched, latency, at=end)
            else:
                t += rng.randint(20_000, 300_000)
                source = "memory" if rng.random() < 0.8 else "cache"
                read(path, layer, offset, length, source)
    # the app serves requests: re-reads of templates and config, all local by now
    for _ in range(1_400):
        layer, path, size = rng.choice(files[12:15] + files[6:9])
        t += rng.randint(200_000, 3_000_000)
        emit("lookup", path)
        emit("open", path)
        read(path, layer, 0, min(size, 131_072), "memory" if rng.random() < 0.9 else "cache")
    emit("readlink", "usr/bin/python3")
    events.sort(key=lambda e: int(e["t"]))  # a trace is written in the order reads finish
    return events


# -- PNG decoding -----------------------------------------------------------------------------


@dataclass
class Png:
    width: int
    height: int
    channels: int
    rows: list[bytes]

    def pixel(self, x: int, y: int) -> tuple[int, int, int]:
        c = self.channels
        row = self.rows[y]
        return row[x * c], row[x * c + 1], row[x * c + 2]


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def decode_png(data: bytes) -> Png:
    """8-bit RGB/RGBA, non-interlaced PNG (what chromium writes) to rows of raw pixels."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    pos, idat, header = 8, bytearray(), b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour in (2, 6) and interlace == 0, f"unexpected PNG {header!r}"
    channels = 3 if colour == 2 else 4
    raw = zlib.decompress(bytes(idat))
    stride = width * channels
    rows: list[bytes] = []
    prior = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind = raw[start]
        line = bytearray(raw[start + 1 : start + 1 + stride])
        if kind == 1:
            for i in range(channels, stride):
                line[i] = (line[i] + line[i - channels]) & 0xFF
        elif kind == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prior, strict=True))
        elif kind == 3:
            for i in range(stride):
                left = line[i - channels] if i >= channels else 0
                line[i] = (line[i] + ((left + prior[i]) >> 1)) & 0xFF
        elif kind == 4:
            for i in range(stride):
                left = line[i - channels] if i >= channels else 0
                up_left = prior[i - channels] if i >= channels else 0
                line[i] = (line[i] + _paeth(left, prior[i], up_left)) & 0xFF
        else:
            assert kind == 0, f"bad PNG filter {kind}"
        rows.append(bytes(line))
        prior = line
    return Png(width, height, channels, rows)


# -- the browser ------------------------------------------------------------------------------


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(
        "chromium is not installed: run tools/test, which installs the Debian packages "
        "in tools/lib/setup.sh (apt-get install chromium)",
        pytrace=False,
    )


def screenshot(page: Path, png: Path, profile: Path, size: tuple[int, int] = (1280, 2000)) -> None:
    """A headless chromium screenshot of a local file, with a throwaway profile and nothing
    that talks to the network (the page must not need it)."""
    profile.mkdir(parents=True, exist_ok=True)
    cmd = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--user-data-dir={profile}",
        f"--screenshot={png}",
        f"--window-size={size[0]},{size[1]}",
        page.resolve().as_uri(),
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("chromium took more than 120 s to screenshot the report", pytrace=False)
    if not png.exists():
        pytest.fail(
            f"chromium wrote no screenshot (exit {done.returncode}):\n{done.stderr[-3000:]}",
            pytrace=False,
        )


def _near(p: tuple[int, int, int], colour: tuple[int, int, int], tolerance: int = 40) -> bool:
    return sum(abs(a - b) for a, b in zip(p, colour, strict=True)) <= tolerance


def test_report_of_a_realistic_trace_renders_in_a_browser(tmp_path: Path) -> None:
    events = synthetic_trace()
    assert len(events) > 3_000
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in events))
    page = tmp_path / "report.html"
    summary = write_report(trace, page, synthetic_image())

    reads = [e for e in events if e["op"] == "read"]
    assert summary.events == len(events) and summary.reads == len(reads)
    assert summary.bytes_fetched == sum(e["fetched"] for e in reads)
    assert len(summary.fetches) > WATERFALL_LIMIT  # so the cap and its note are exercised
    text = page.read_text(encoding="utf-8")
    assert "<script" not in text and "http://" not in text.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )
    assert "https://" not in text
    assert "app/templates/&lt;index&gt;.html" in text
    assert f"Showing the first {WATERFALL_LIMIT} of" in text

    png = tmp_path / "report.png"
    screenshot(page, png, tmp_path / "profile")
    image = decode_png(png.read_bytes())
    see = f" (screenshot: {png})"
    assert (image.width, image.height) == (1280, 2000)

    pixels = [image.pixel(x, y) for y in range(0, image.height, 2) for x in range(0, 1280, 2)]
    background = image.pixel(3, 3)  # the page's own background, outside every card
    differing = sum(1 for p in pixels if p != background) / len(pixels)
    assert differing > 0.3, (
        f"only {differing:.1%} of the screenshot differs from the background" + see
    )
    ink = sum(1 for p in pixels if sum(p) < 3 * 110) / len(pixels)
    assert ink > 0.005, f"hardly any text: {ink:.2%} dark pixels" + see

    def rows_with(colour: tuple[int, int, int]) -> list[int]:
        """The (even) rows of the screenshot that show `colour` in at least 3 places."""
        return [
            y
            for y in range(0, image.height, 2)
            if sum(1 for x in range(0, image.width, 2) if _near(image.pixel(x, y), colour)) >= 3
        ]

    def bands(rows: list[int]) -> int:
        """How many separate vertical stretches those rows make (a gap of 30 px splits)."""
        return sum(1 for a, b in zip([-100, *rows], rows, strict=False) if b - a > 30)

    # the charts' colours: fetched orange (the headline bar, the sources bar, the timeline's
    # curve and area, the layer bars), read indigo, memory green, the waterfall's layer 0 blue
    orange, indigo = (0xEA, 0x58, 0x0C), (0x4F, 0x46, 0xE5)
    green, layer0 = (0x16, 0xA3, 0x4A), (0x4E, 0x79, 0xA7)
    orange_rows = rows_with(orange)
    assert len(orange_rows) > 30, "hardly any fetched-orange in the screenshot" + see
    assert bands(orange_rows) >= 3, f"fetched-orange in only {bands(orange_rows)} places" + see
    assert len(rows_with(indigo)) > 20, "no read-indigo bars or curve in the screenshot" + see
    assert rows_with(green), "no memory-green read marks in the screenshot" + see
    assert len(rows_with(layer0)) > 20, "no waterfall bars in the screenshot" + see
    # content all the way down: the lower half has coloured chart pixels too
    saturated_low = sum(
        1
        for y in range(1000, 2000, 2)
        for x in range(0, 1280, 2)
        if max(p := image.pixel(x, y)) - min(p) > 80
    )
    assert saturated_low > 1_000, "the lower half of the page shows no chart" + see
    colours = Counter(pixels)
    assert len(colours) > 200, "a page of a few flat colours: no text or anti-aliased charts" + see
