"""`Toc.check`: a TOC that came from elsewhere (a published index; its checksum is the
sender's) is refused with a LayerFormatError unless every record holds what the accessors
rely on. A seeded mutation run: whatever the mutation, using the TOC through the overlay
raises nothing but ImageFSError."""

from __future__ import annotations

import random
from array import array
from typing import Any

import pytest

from imagefs.errors import ImageFSError, LayerFormatError
from imagefs.layers.toc import EntryType, Toc, TocBuilder, ondisk
from imagefs.layers.toc.packed import X_LINKREF, varint, write_record
from imagefs.overlay import ROOT_INODE, Overlay

E = EntryType


def _sample() -> Toc:
    b = TocBuilder()
    b.add(b"etc", E.DIR)
    b.add(b"etc/a", E.REG, size=10, offset=0)
    b.add(b"etc/l", E.SYMLINK, linkname=b"a")
    b.add(b"etc/h", E.HARDLINK, linkname=b"etc/a")
    b.add(b"dev/c", E.CHAR, devmajor=1, devminor=3)
    b.add(b"x", E.REG, size=5, offset=10, xattrs=[(b"user.k", b"v")])
    b.add(b"d/.wh.gone", E.REG)
    b.add(b"o/.wh..wh..opq", E.REG)
    b.add(b"o/f", E.REG, size=1, offset=15)
    return b.build()


def _walk(toc: Toc) -> None:
    """What a mount does with a TOC: list, stat, read links and xattrs of everything."""
    ov = Overlay(1)
    ov.set_layer(0, toc)
    stack, seen = [ROOT_INODE], 0
    while stack and seen < 200:
        ino = stack.pop()
        seen += 1
        mode = ov.getattr(ino).mode & 0o170000
        if mode == 0o040000:
            stack += [child for _, child in ov.listing(ino)]
        elif mode == 0o120000:
            ov.readlink(ino)
        ov.listxattr(ino)


def _with(toc: Toc, **changes: Any) -> Toc:
    return Toc.from_bytes(ondisk.encode(toc._parts()._replace(**changes)))


def test_a_toc_built_here_passes() -> None:
    toc = _sample()
    toc.check()
    _walk(toc)


def _extras_of(toc: Toc, i: int, record: bytes) -> dict[str, Any]:
    """Parts changes that give entry i exactly `record` as its extras."""
    parts = toc._parts()
    offs = parts.extra_offs
    before, after = parts.extras[: offs[i]], parts.extras[offs[i + 1] :]
    delta = len(record) - (offs[i + 1] - offs[i])
    new_offs = array("I", [o if k <= i else o + delta for k, o in enumerate(offs)])
    return {"extras": before + record + after, "extra_offs": new_offs}


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        ("type", "unknown entry type"),
        ("paths back", "paths go back"),
        ("record kind", "has a record of kind 9"),
        ("record length", "record runs past it"),
        ("varint", "runs out"),
        ("link to a link", "links to no file"),
        ("link past the end", "links to no file"),
    ],
)
def test_damage_the_accessors_would_trip_on_is_refused(damage: str, problem: str) -> None:
    toc = _sample()
    parts = toc._parts()
    link = next(i for i in range(len(toc)) if toc.entry_type(i) is E.HARDLINK)
    changes: dict[str, Any]
    if damage == "type":
        types = array("B", parts.types)
        types[0] = 99
        changes = {"types": types}
    elif damage == "paths back":
        offs = array("I", parts.path_offs)
        offs[1], offs[2] = offs[2], offs[1]
        changes = {"path_offs": offs}
    else:
        payload = bytearray()
        if damage == "record kind":
            record = bytearray()
            write_record(9, b"", record)
        elif damage == "record length":
            record = bytearray([X_LINKREF, 50, 1])
        elif damage == "varint":
            record = bytearray([X_LINKREF, 1, 0x80])
        else:
            varint(link if damage == "link to a link" else 10_000, payload)
            record = bytearray()
            write_record(X_LINKREF, bytes(payload), record)
        changes = _extras_of(toc, link, bytes(record))
    with pytest.raises(LayerFormatError, match=problem):
        _with(toc, **changes).check()


def test_no_mutation_gets_past_check_and_then_trips_the_overlay() -> None:
    base = _sample()._parts()
    rnd = random.Random(20261201)
    maxima = {"B": 255, "H": 65535, "I": 2**32 - 1, "Q": 2**64 - 1, "q": 2**63 - 1}
    for _ in range(1500):
        parts = base
        for _ in range(rnd.randint(1, 3)):
            field = rnd.choice(parts._fields)
            value = getattr(parts, field)
            if isinstance(value, array):
                value = array(value.typecode, value)
                top = maxima[value.typecode]
                if value and rnd.random() < 0.8:
                    k = rnd.randrange(len(value))
                    value[k] = rnd.choice([0, 1, top, rnd.randint(0, top), min(value[k] + 1, top)])
                elif value and rnd.random() < 0.5:
                    del value[rnd.randrange(len(value))]
                else:
                    value.append(rnd.randint(0, 50))
            elif isinstance(value, bytes) and value:
                raw = bytearray(value)
                raw[rnd.randrange(len(raw))] = rnd.randrange(256)
                value = bytes(raw)
            else:
                continue
            parts = parts._replace(**{field: value})
        try:
            toc = Toc.from_bytes(ondisk.encode(parts))
            toc.check()
            _walk(toc)
        except ImageFSError:
            pass  # refused, or one entry's answer an error: never anything else
