"""The daemon's C heap: big buffers (TOC JSON, fetched ranges, pieces) in mappings of their
own, handed back to the system when freed.

glibc serves an allocation of 128 KiB or more by `mmap` and unmaps it on `free` — until the
first such block is freed: then it raises that threshold to the block's size (up to 32 MiB),
and later big buffers come from the heap, where freed ones stay resident. A mount's first
index loads (a 16 MB eStargz TOC as bytes and as text, the chunk table growing) raise it at
once, and from then on every 1 MiB fetched range and piece payload lands in the heap.
Measured on the 48k-entry bench image, cold eStargz read-all: daemon VmHWM 155-159 MB with
the moving threshold, 114 MB with it fixed at 128 KiB (docs/bench.md). The cost: a
`mmap`/`munmap` pair and fresh zeroed pages per big buffer (~0.1 ms per MiB). That cost is
why the threshold is 256 KiB, not glibc's initial 128 KiB: a FUSE read answers at most
128 KiB, and its buffer (128 KiB plus a `bytes` header) by mmap cost ~105 µs of CPU per
read instead of ~12 µs from the heap (measured: 20,000 preads of 128 KiB), a warm read-all's
whole budget. Buffers of fetched ranges and pieces (1 MiB and more) are above it either way.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("imagefs.lazy")

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h); setting it also stops its moving
BIG = 256 << 10  # above a FUSE read's buffer (see the docstring)

_done = False


def keep_big_buffers_unmapped() -> bool:
    """Fix glibc's mmap threshold at `BIG` for this process (once; False elsewhere)."""
    global _done
    if _done:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc: nothing to do
        return False
    _done = bool(mallopt(M_MMAP_THRESHOLD, BIG))
    if not _done:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused")
    return _done
