"""Random access into compressed layer blobs through seek points (issue 13.5: one idea per
module).

- `format`: seek points, `SeekIndex` and its stored form, checks of fetched bytes;
- `priming`: restarting deflate at a point that is not byte aligned (no ``inflatePrime``
  in Python's zlib: an empty dynamic block spliced in front);
- `reading`: bytes at an uncompressed offset, one span's bytes, capped zstd;
- `building`: an index in one pass over a blob (rapidgzip for gzip, zstd frames, plain).
"""

from typing import TYPE_CHECKING

from imagefs.layers.seekindex.format import (
    DEFAULT_SPACING,
    MAX_SPAN,
    WINDOW_SIZE,
    Compression,
    ReadCompressed,
    ReadRange,
    SeekIndex,
    SeekPoint,
    check_span_bounds,
    needs_local_copy,
    verify_raw_span,
    verify_span,
)
from imagefs.layers.seekindex.priming import primed_start
from imagefs.layers.seekindex.reading import (
    file_range_reader,
    inflate_span,
    read_at,
    zstd_capped,
)

if TYPE_CHECKING:
    from imagefs.layers.seekindex.building import build_index, decompress_to_file


def __getattr__(name: str) -> object:
    """`building` (rapidgzip, a blob's one-pass scan) is imported when first asked for: a
    mount that reads stored or published indexes never builds one."""
    if name in ("build_index", "decompress_to_file"):
        from imagefs.layers.seekindex import building

        return getattr(building, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_SPACING",
    "MAX_SPAN",
    "WINDOW_SIZE",
    "Compression",
    "ReadCompressed",
    "ReadRange",
    "SeekIndex",
    "SeekPoint",
    "build_index",
    "check_span_bounds",
    "decompress_to_file",
    "file_range_reader",
    "inflate_span",
    "needs_local_copy",
    "primed_start",
    "read_at",
    "verify_raw_span",
    "verify_span",
    "zstd_capped",
]
