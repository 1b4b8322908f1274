"""Compact table of contents of one layer: packed arrays in memory, one checksummed blob on disk.

A big layer has tens of thousands of entries and a mount keeps every layer's TOC in memory,
so nothing here holds one Python object per entry. Each field lives in an `array` (one machine
word or less per entry), names live in one `bytes` blob addressed by an offset array, and the
rarely used variable fields (link targets, xattrs, device numbers) share a second blob of small
tagged records. Lookups binary-search an array of entry indices sorted by path: every name
below a directory is then one contiguous run, so `children` and implicit parents come cheap.

The package, one idea a module: `packed` (the array and record encoding both sides share),
`builder` (`TocBuilder` and `toc_from_tar`: the layer semantics below), `table` (`Toc`:
lookups, listings, entry attributes), `ondisk` (the checksummed file format).

Layer semantics decided here (the overlay above only combines layers):

- The same path twice: the last entry wins. Earlier versions stay in the arrays because a
  hard link written in between may still refer to them (as it does on an extracted disk).
- An entry below a path that a later entry of the same layer turns into a non-directory is
  gone (extraction would have removed it); one below a path that was a non-directory at the
  time is refused with a warning (umoci fails there).
- Parents that only appear as prefixes become implicit directories, flagged as such: umoci
  creates them with MkdirAll(0777) under the usual 022 umask, i.e. 0755 owned by the unpacking
  user (root), and leaves an existing lower directory's metadata alone. So the TOC reports them
  as 0755 root:root mtime 0 and the overlay prefers a lower explicit directory's attributes.
- `.wh.NAME` and `.wh..wh..opq` are not entries; they are kept as sorted path sets and only ever
  affect lower layers (umoci keeps paths this layer wrote). A `.wh.NAME` that comes after this
  layer wrote NAME or something below it is recorded as opacity of NAME: that is what umoci's
  extraction makes of it (the lower children go, the directory itself stays). Other
  `.wh..wh.*` names (aufs bookkeeping) are ignored, a bare `.wh.` is a warning. eStargz's own
  files at the root are hidden.
- Hard links are resolved inside the layer at build time to the newest earlier version of the
  target path; a link whose target is not in the layer refers to the layers below and is left
  for the overlay to resolve.
"""

from typing import TYPE_CHECKING

from imagefs.layers.tarscan import EntryType
from imagefs.layers.toc.packed import DEFAULT_DIR_MODE
from imagefs.layers.toc.table import EntryAttrs, Toc

if TYPE_CHECKING:
    from imagefs.layers.toc.builder import HIDDEN_AT_ROOT, TocBuilder, toc_from_tar


def __getattr__(name: str) -> object:
    """`builder` is imported when first asked for: a mount that reads stored or published
    indexes never builds a TOC, and its daemon starts sooner without it."""
    if name in ("HIDDEN_AT_ROOT", "TocBuilder", "toc_from_tar"):
        from imagefs.layers.toc import builder

        return getattr(builder, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_DIR_MODE",
    "HIDDEN_AT_ROOT",
    "EntryAttrs",
    "EntryType",
    "Toc",
    "TocBuilder",
    "toc_from_tar",
]
