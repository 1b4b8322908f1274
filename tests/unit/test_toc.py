"""Layer TOC: per-layer rules (duplicates, whiteouts, implicit parents, hard links), the
compact representation's memory cost, and the checksummed on-disk form."""

from __future__ import annotations

import gc
import io
import tarfile
import tracemalloc
from typing import Any

import pytest

from imagefs.errors import LayerFormatError
from imagefs.layers.toc import EntryType, Toc, TocBuilder, toc_from_tar

R, D, L, S = EntryType.REG, EntryType.DIR, EntryType.HARDLINK, EntryType.SYMLINK


def build(
    *specs: tuple[bytes, EntryType] | tuple[bytes, EntryType, dict[str, Any]],
    estargz: bool = False,
) -> Toc:
    builder = TocBuilder(estargz=estargz)
    for path, etype, *rest in specs:
        kw: dict[str, Any] = rest[0] if rest else {}
        builder.add(path, etype, **kw)
    return builder.build()


def names(toc: Toc, path: bytes) -> list[bytes]:
    return [name for name, _ in toc.children(path)]


def test_lookup_children_and_attrs() -> None:
    toc = build(
        (b"./", D, {"mode": 0o700}),
        (b"a", D, {"uid": 5, "gid": 6, "mtime": 10, "mtime_ns": 7}),
        (b"a/b", R, {"size": 3, "offset": 1536, "mode": 0o100755}),
        (b"a/b-x", S, {"linkname": b"b"}),
        (b"a/b.d/c", R),
        (b"dev/null", EntryType.CHAR, {"devmajor": 1, "devminor": 3}),
        (b"a/x", R, {"xattrs": {b"user.k": b"\x00v"}}),
    )
    root = toc.find(b"")
    assert root is not None and toc.attrs(root).mode == 0o700
    assert names(toc, b"") == [b"a", b"dev"]
    assert names(toc, b"a") == [b"b", b"b-x", b"b.d", b"x"]
    a = toc.find(b"a")
    assert a is not None
    attrs = toc.attrs(a)
    assert (attrs.type, attrs.uid, attrs.gid, attrs.mtime, attrs.mtime_ns) == (D, 5, 6, 10, 7)
    b = toc.find(b"a/b")
    assert b is not None
    assert (toc.size(b), toc.offset(b), toc.attrs(b).mode) == (3, 1536, 0o755)
    sym = toc.find(b"a/b-x")
    assert sym is not None and toc.attrs(sym).linkname == b"b"
    null = toc.find(b"dev/null")
    assert null is not None and toc.device(null) == (1, 3)
    x = toc.find(b"a/x")
    assert x is not None and toc.xattrs(x) == {b"user.k": b"\x00v"}
    assert toc.find(b"a/missing") is None and toc.find(b"a/b/c") is None


def test_duplicates_last_wins() -> None:
    toc = build((b"f", R, {"size": 1}), (b"d", D), (b"f", R, {"size": 2}), (b"./f", R, {"size": 3}))
    f = toc.find(b"f")
    assert f is not None and toc.size(f) == 3
    assert names(toc, b"") == [b"d", b"f"]
    assert len(toc) == 4 and toc.visible_count == 2


def test_implicit_parents_are_synthesized() -> None:
    toc = build((b"usr/lib/x/file", R, {"mtime": 99, "uid": 7}), (b"usr", D, {"mode": 0o711}))
    lib = toc.find(b"usr/lib")
    assert lib is not None and toc.is_implicit(lib) and toc.is_dir(lib)
    attrs = toc.attrs(lib)
    assert (attrs.mode, attrs.uid, attrs.gid, attrs.mtime, attrs.implicit) == (0o755, 0, 0, 0, True)
    usr = toc.find(b"usr")
    assert usr is not None and not toc.is_implicit(usr) and toc.attrs(usr).mode == 0o711
    assert names(toc, b"usr/lib") == [b"x"]
    assert toc.find(b"") is None  # the root is never synthesized; the overlay owns it


def test_whiteouts_and_opaque_markers() -> None:
    builder = TocBuilder()
    for path in (b"a/.wh.gone", b"a/.wh..wh..opq", b".wh.top", b"b/.wh..wh.plnk", b"c/.wh."):
        assert builder.add(path, R) is None
    builder.add(b"a/kept", R)
    toc = builder.build()
    assert toc.is_whited_out(b"a/gone") and toc.is_whited_out(b"top")
    assert not toc.is_whited_out(b"a/kept")
    assert toc.is_opaque(b"a") and not toc.is_opaque(b"b")
    assert names(toc, b"") == [b"a"]  # markers create no parents and are not entries
    assert names(toc, b"a") == [b"kept"]
    assert len(builder.warnings) == 1 and "'c/.wh.'" in builder.warnings[0]
    assert list(toc.whiteouts()) == [b"a/gone", b"top"] and list(toc.opaque_dirs()) == [b"a"]


def test_whiteout_of_a_path_this_layer_also_writes() -> None:
    early = build((b".wh.x", R), (b"x/f", R))
    assert early.is_whited_out(b"x") and not early.is_opaque(b"x")
    # Written first, whited out after: umoci keeps the path and drops only lower children.
    late = build((b"x", R), (b"y/f", R), (b".wh.x", R), (b".wh.y", R))
    assert late.find(b"x") is not None and late.is_opaque(b"x") and late.is_opaque(b"y")
    assert not late.is_whited_out(b"x") and not late.is_whited_out(b"y")


ESTARGZ_FILES = (
    (b"stargz.index.json", R),
    (b".prefetch.landmark", R),
    (b".no.prefetch.landmark", R),
    (b"sub/stargz.index.json", R),
)


def test_estargz_files_hidden_at_root_only() -> None:
    toc = build(*ESTARGZ_FILES, estargz=True)
    assert names(toc, b"") == [b"sub"]
    assert names(toc, b"sub") == [b"stargz.index.json"]


def test_estargz_names_are_ordinary_files_in_other_layers() -> None:
    toc = build(*ESTARGZ_FILES)
    assert names(toc, b"") == [
        b".no.prefetch.landmark",
        b".prefetch.landmark",
        b"stargz.index.json",
        b"sub",
    ]


def test_hardlinks_resolve_in_layer_to_the_earlier_version() -> None:
    builder = TocBuilder()
    old = builder.add(b"f", R, size=1)
    assert old == 0
    link = builder.add(b"link", L, linkname=b"f")
    new = builder.add(b"f", R, size=2)
    chain = builder.add(b"link2", L, linkname=b"./link")
    lower = builder.add(b"low", L, linkname=b"/lib/x")
    chain_lower = builder.add(b"low2", L, linkname=b"low")
    assert builder.add(b"d", D) is not None
    assert builder.add(b"dirlink", L, linkname=b"d") is None
    assert builder.add(b"self", L, linkname=b"self") is None
    toc = builder.build()
    assert link is not None and new is not None and chain is not None
    assert toc.hardlink_target(link) == old  # the version before the replacement
    assert toc.hardlink_target(chain) == old
    assert lower is not None and toc.hardlink_target(lower) == b"lib/x"
    assert chain_lower is not None and toc.hardlink_target(chain_lower) == b"lib/x"
    assert toc.find(b"f") == new
    assert sorted(toc.hardlinks()) == sorted([link, chain, lower, chain_lower])
    assert len(builder.warnings) == 2


def test_entries_under_a_replaced_or_nondir_parent() -> None:
    builder = TocBuilder()
    builder.add(b"p", D)
    builder.add(b"p/child", R)  # removed when p becomes a file below
    builder.add(b"p", R)
    builder.add(b"q", R)
    builder.add(b"q/child", R)  # umoci refuses: q is a file at this point
    builder.add(b"r", R)
    builder.add(b"r", D)
    builder.add(b"r/child", R)  # fine: r was turned back into a directory first
    toc = builder.build()
    assert names(toc, b"p") == [] and names(toc, b"q") == []
    assert names(toc, b"r") == [b"child"]
    p = toc.find(b"p")
    assert p is not None and not toc.is_dir(p)
    assert len(builder.warnings) == 1 and "'q/child'" in builder.warnings[0]


def test_root_must_be_a_directory() -> None:
    builder = TocBuilder()
    assert builder.add(b"./", R) is None
    assert builder.warnings


def test_out_of_range_owner_is_clamped() -> None:
    builder = TocBuilder()
    i = builder.add(b"big", R, uid=2**40, gid=12)
    toc = builder.build()
    assert i is not None and (toc.attrs(i).uid, toc.attrs(i).gid) == (65534, 12)
    assert builder.warnings


def test_toc_from_tar() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in ((b"a/one", b"1"), (b"a/.wh.x", b""), (b"a/one", b"22")):
            info = tarfile.TarInfo(name.decode())
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    toc, warnings = toc_from_tar(raw)
    assert warnings == []
    one = toc.find(b"a/one")
    assert one is not None and raw[toc.offset(one) : toc.offset(one) + toc.size(one)] == b"22"
    assert toc.is_whited_out(b"a/x")
    chunks = [raw[i : i + 7] for i in range(0, len(raw), 7)]
    assert toc_from_tar(chunks)[0].to_bytes() == toc.to_bytes()


# ---------------------------------------------------------------------- persistence


def sample() -> Toc:
    return build(
        (b"./", D, {"mode": 0o755, "mtime": -5}),
        (b"etc/passwd", R, {"size": 10, "offset": 2048, "mtime": 1, "mtime_ns": 999_999_999}),
        (b"etc/.wh.shadow", R),
        (b"usr/.wh..wh..opq", R),
        (b"usr/bin/ping", R, {"xattrs": {b"security.capability": b"\x01\x00\xff"}}),
        (b"usr/bin/link", L, {"linkname": b"usr/bin/ping"}),
        (b"usr/bin/sym", S, {"linkname": b"ping"}),
        (b"caf\xe9\n", EntryType.BLOCK, {"devmajor": 259, "devminor": 70000}),
        (b"lower", L, {"linkname": b"from/below"}),
    )


def snapshot(toc: Toc) -> list[object]:
    out: list[object] = [len(toc), list(toc.visible()), list(toc.whiteouts())]
    out.append(list(toc.opaque_dirs()))
    for i in range(len(toc)):
        out.append((toc.path(i), toc.attrs(i), toc.xattrs(i), toc.hardlink_target(i)))
    return out


def test_round_trip() -> None:
    toc = sample()
    data = toc.to_bytes()
    again = Toc.from_bytes(data)
    assert snapshot(again) == snapshot(toc)
    assert again.to_bytes() == data
    assert again.find(b"caf\xe9\n") == toc.find(b"caf\xe9\n")
    assert again.is_opaque(b"usr") and again.is_whited_out(b"etc/shadow")
    assert Toc.from_bytes(memoryview(data)).to_bytes() == data
    empty = TocBuilder().build()
    assert Toc.from_bytes(empty.to_bytes()).visible_count == 0


def test_torn_or_corrupt_bytes_are_detected() -> None:
    data = sample().to_bytes()
    for bad in (data[:-1], data[:40], data[:10], data + b"x"):
        with pytest.raises(LayerFormatError):
            Toc.from_bytes(bad)
    for pos in (0, 9, 30, len(data) // 2, len(data) - 1):
        flipped = bytearray(data)
        flipped[pos] ^= 0x40
        with pytest.raises(LayerFormatError):
            Toc.from_bytes(bytes(flipped))


# ---------------------------------------------------------------------- memory

# 50,000 entries with paths of about 40 bytes measure ~95 bytes each (51 bytes of fixed-width
# fields and indexes, the path itself, array slack). The bound leaves room for allocator noise
# but would catch a regression to a Python object per entry (several hundred bytes each).
ENTRIES = 50_000
BYTES_PER_ENTRY_BOUND = 120


def test_memory_of_a_large_toc() -> None:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        builder = TocBuilder()
        for i in range(ENTRIES):
            builder.add(
                b"usr/share/dir%04d/sub%d/file%06d.txt" % (i // 100, i % 7, i),
                R,
                size=i,
                mtime=1_700_000_000,
                offset=i * 1024,
                uid=1000,
            )
        toc = builder.build()
        del builder
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert toc.visible_count > ENTRIES
    assert used < ENTRIES * BYTES_PER_ENTRY_BOUND, f"{used / ENTRIES:.1f} bytes per entry"


def test_find_answers_every_visible_path_and_nothing_else() -> None:
    """`find` bisects with a key, then (used a few times) over its sorted path list: every
    visible entry (superseded versions are not) is found at its own index; whiteout
    markers and absent paths are None, both before and after the list is built."""
    specs: list[tuple[bytes, EntryType] | tuple[bytes, EntryType, dict[str, Any]]] = []
    for d in range(40):
        specs.append((b"d%d" % d, D))
        specs += [(b"d%d/f%d" % (d, f), R, {"size": f}) for f in range(50)]
    specs.append((b"d3/f7", R, {"size": 999}))  # a newer version: the older one is hidden
    specs.append((b"d4/.wh.f8", R))
    toc = build(*specs)
    absents = (b"d40", b"d1/f50", b"d1/f", b"d1/", b"/d1", b"x" * 300, b"d4/.wh.f8")
    for absent in absents:  # before the list: the key bisection
        assert toc.find(absent) is None
    assert toc.find(b"d3/f7") is not None and toc.size(toc.find(b"d3/f7") or 0) == 999
    for i in toc.visible():  # the first lookups bisect with a key, later ones over the list
        assert toc.find(toc.path(i)) == i
    assert toc._sorted is not None  # the list was built on the way
    newer = toc.find(b"d3/f7")
    assert newer is not None and toc.size(newer) == 999
    for absent in absents:
        assert toc.find(absent) is None


def test_strings_answer_membership_from_a_set_or_past_its_limit_by_bisection() -> None:
    """`Strings` (a layer's whiteouts, opaque directories) answers `in` from a set built on
    first use; past `_SET_MAX` members (a crafted TOC) it builds none and bisects."""
    from imagefs.layers.toc import packed

    few = packed.Strings.build([b"a/x", b"b", b"a/y"])
    assert b"a/y" in few and b"a" not in few and b"" not in few
    assert few._members is not None
    many = packed.Strings.build(b"d/%06d" % k for k in range(packed._SET_MAX + 10))
    assert b"d/000000" in many and b"d/%06d" % (packed._SET_MAX + 9) in many
    assert b"d/" not in many and b"d/0000000" not in many and b"e" not in many
    assert many._members is None
    assert b"x" not in packed.Strings.build([])
