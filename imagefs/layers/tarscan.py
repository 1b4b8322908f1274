"""Incremental tar scanner: uncompressed tar bytes in, table-of-contents entries out.

The scanner is a push parser in the style of h11: the caller feeds whatever bytes it has
(`feed`), collects the entries completed so far, and finally calls `close`. It never keeps
file contents: payloads are skipped by counting, and only a header (512 bytes) or an
extension payload (PAX records, GNU long names; capped at `MAX_EXTENSION_SIZE`) is ever
buffered. Each entry records where its payload starts in the uncompressed stream so a
random-access reader can serve file data later without rescanning.

Compatibility targets are Go's archive/tar (what containerd and umoci read layers with) and
the OCI layer rules:

- header-only types (links, devices, directories, fifos) never carry a payload, whatever the
  size field says, exactly as Go and Python's tarfile treat them;
- a zero block followed by anything but a second zero block is an error (Go: ErrHeader), but an
  archive that simply stops at a header boundary is accepted (Go returns io.EOF there);
- malformed PAX records and invalid sizes are fatal, because the position of every following
  header depends on them; problems that only spoil one entry (an unparsable uid, a GNU sparse
  file, an unknown type) skip that entry and leave a warning.

Global PAX headers ('g') are applied to later entries as POSIX says (Go ignores them); their
`path`, `linkpath` and `size` records are ignored because they cannot sensibly apply to every
entry.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from imagefs.errors import LayerFormatError
from imagefs.layers.tarfields import clean_path as clean_path  # re-exported: TOC builders
from imagefs.layers.tarfields import (
    cstr,
    leaves_root,
    parse_decimal,
    parse_number,
    parse_pax_records,
    parse_pax_time,
)
from imagefs.layers.tarfields import show as show

BLOCK = 512

#: Biggest PAX / GNU long-name payload we agree to buffer; real ones are a few hundred bytes,
#: so anything near this is hostile or broken and would otherwise cost unbounded memory.
MAX_EXTENSION_SIZE = 1 << 20

#: Go's archive/tar parses sizes as int64; larger sizes are refused the same way.
MAX_SIZE = (1 << 63) - 1

_ZERO_BLOCK = bytes(BLOCK)
_HIGH_BYTES = bytes(range(128))  # translate(None, delete=...) keeps only bytes >= 0x80

# Parser states; plain ints keep the per-chunk dispatch cheap.
_HEADER = 0
_SKIP = 1
_EXTENSION = 2
_SPARSE_MAP = 3
_DONE = 4


class EntryType(enum.IntEnum):
    """What an entry is. The values are the tar typeflag digits for easy reading of dumps."""

    REG = 0
    HARDLINK = 1
    SYMLINK = 2
    CHAR = 3
    BLOCK = 4
    DIR = 5
    FIFO = 6


_TYPEFLAGS: dict[int, EntryType] = {
    ord("0"): EntryType.REG,
    0: EntryType.REG,
    ord("7"): EntryType.REG,  # contiguous file: a regular file everywhere that matters
    ord("1"): EntryType.HARDLINK,
    ord("2"): EntryType.SYMLINK,
    ord("3"): EntryType.CHAR,
    ord("4"): EntryType.BLOCK,
    ord("5"): EntryType.DIR,
    ord("6"): EntryType.FIFO,
    ord("D"): EntryType.DIR,  # GNU dumpdir: a directory whose payload lists names; skipped
}

# Typeflags whose size field is ignored: Go's archive/tar and Python's tarfile both read no
# payload after them, so a writer that fills in a size there must not derail us.
_HEADER_ONLY = frozenset(b"123456")


@dataclass(frozen=True, slots=True)
class TarEntry:
    """One member of a layer tar, as the TOC needs it.

    `path` is cleaned (see `clean_path`); `linkname` is cleaned for hard links (it names a path
    in the image) and kept verbatim for symlinks (the target is interpreted at run time).
    `offset` is where the payload begins in the uncompressed tar stream and `size` how long it
    is (0 for everything but regular files). `mode` holds only the permission bits.
    """

    path: bytes
    type: EntryType
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    mtime_ns: int
    linkname: bytes
    devmajor: int
    devminor: int
    offset: int
    header_offset: int
    uname: bytes
    gname: bytes
    xattrs: tuple[tuple[bytes, bytes], ...]


class _EntryProblem(Exception):
    """An entry-local defect: the entry is skipped and the message becomes a warning."""


# Global records that would be nonsense on every entry: POSIX allows them, nobody means them.
_NOT_GLOBAL = frozenset((b"path", b"linkpath", b"size"))


class TarScanner:
    """Push parser turning uncompressed tar bytes into `TarEntry` values.

    `feed(data)` returns the entries completed by that data; `close()` checks the stream did
    not stop in the middle of something. `warnings` collects one line per skipped entry.
    `end_offset` is set once the end-of-archive marker has been read.
    """

    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.end_offset: int | None = None
        self._state = _HEADER
        self._pos = 0  # stream offset of the next byte to consume
        self._buf = bytearray()  # a partial header, or an extension payload
        self._skip = 0
        self._ext_size = 0
        self._ext_pad = 0
        self._ext_kind = 0
        self._ext_header_offset = 0
        self._zero_blocks = 0
        self._pax: dict[bytes, bytes] = {}
        self._global: dict[bytes, bytes] = {}
        self._long_name: bytes | None = None
        self._long_link: bytes | None = None
        self._sparse_skip = 0  # data to skip once the old-GNU sparse map blocks are read
        self._what = "the archive"  # what is being read, for truncation messages
        self._closed = False

    @property
    def offset(self) -> int:
        """How many bytes of the stream have been consumed."""
        return self._pos

    @property
    def done(self) -> bool:
        """True once the end-of-archive marker (two zero blocks) has been seen."""
        return self._state == _DONE

    def feed(self, data: bytes | bytearray | memoryview) -> list[TarEntry]:
        if self._closed:
            raise RuntimeError("TarScanner.feed() after close()")
        out: list[TarEntry] = []
        view = memoryview(data).cast("B")
        n = len(view)
        p = 0
        while p < n:
            state = self._state
            if state == _SKIP:
                take = min(self._skip, n - p)
                p += take
                self._pos += take
                self._skip -= take
                if not self._skip:
                    self._state = _HEADER
            elif state == _HEADER:
                have = len(self._buf)
                if not have and n - p >= BLOCK:
                    block = bytes(view[p : p + BLOCK])
                    p += BLOCK
                    self._pos += BLOCK
                    self._header(block, out)
                else:
                    take = min(BLOCK - have, n - p)
                    self._buf += view[p : p + take]
                    p += take
                    self._pos += take
                    if len(self._buf) == BLOCK:
                        block = bytes(self._buf)
                        self._buf.clear()
                        self._header(block, out)
            elif state == _EXTENSION:
                take = min(self._ext_size - len(self._buf), n - p)
                self._buf += view[p : p + take]
                p += take
                self._pos += take
                if len(self._buf) == self._ext_size:
                    payload = bytes(self._buf)
                    self._buf.clear()
                    self._extension(payload)
                    self._skip_then_header(self._ext_pad)
            elif state == _SPARSE_MAP:
                take = min(BLOCK - len(self._buf), n - p)
                self._buf += view[p : p + take]
                p += take
                self._pos += take
                if len(self._buf) == BLOCK:
                    more = self._buf[504] != 0
                    self._buf.clear()
                    if not more:
                        self._skip_then_header(self._sparse_skip)
            else:  # _DONE: the rest is record padding; count it and ignore it
                self._pos += n - p
                p = n
        return out

    def close(self) -> list[TarEntry]:
        """Declare the end of the stream; raise `LayerFormatError` if it was cut short."""
        if self._closed:
            return []
        self._closed = True
        if self._state == _DONE:
            return []
        if self._state == _HEADER and not self._buf:
            if self._pax or self._long_name is not None or self._long_link is not None:
                raise LayerFormatError(
                    f"layer tar truncated: extended header at offset "
                    f"{self._ext_header_offset} has no entry after it"
                )
            self.end_offset = self._pos
            return []
        if self._state == _HEADER:
            self._what = f"the header at offset {self._pos - len(self._buf)}"
        missing = {
            _HEADER: BLOCK - len(self._buf),
            _SKIP: self._skip,
            _EXTENSION: self._ext_size - len(self._buf) + self._ext_pad,
            _SPARSE_MAP: BLOCK - len(self._buf),
        }[self._state]
        raise LayerFormatError(
            f"layer tar truncated at offset {self._pos}: {self._what} needs {missing} more bytes"
        )

    def _skip_then_header(self, count: int) -> None:
        self._skip = count
        self._state = _SKIP if count else _HEADER

    def _header(self, block: bytes, out: list[TarEntry]) -> None:
        header_offset = self._pos - BLOCK
        if block == _ZERO_BLOCK:
            self._zero_blocks += 1
            if self._zero_blocks == 2:
                self._state = _DONE
                self.end_offset = self._pos
            self._what = f"the end-of-archive marker at offset {header_offset}"
            return
        if self._zero_blocks:
            raise LayerFormatError(
                f"layer tar: a lone zero block before the header at offset {header_offset}"
            )
        self._check_sum(block, header_offset)
        typeflag = block[156]
        try:
            size = parse_number(block[124:136])
        except ValueError:
            raise LayerFormatError(
                f"layer tar: unreadable size field in the header at offset {header_offset}"
            ) from None
        if typeflag in (ord("x"), ord("g"), ord("L"), ord("K")):
            if size < 0 or size > MAX_EXTENSION_SIZE:
                raise LayerFormatError(
                    f"layer tar: extended header of {size} bytes at offset {header_offset} "
                    f"(limit {MAX_EXTENSION_SIZE})"
                )
            self._ext_kind = typeflag
            self._ext_size = size
            self._ext_pad = -size % BLOCK
            self._ext_header_offset = header_offset
            self._what = f"the extended header at offset {header_offset}"
            if size:
                self._state = _EXTENSION
            else:
                self._extension(b"")
                self._skip_then_header(self._ext_pad)
            return
        self._entry(block, typeflag, size, header_offset, out)

    def _check_sum(self, block: bytes, header_offset: int) -> None:
        try:
            stored = parse_number(block[148:156])
        except ValueError:
            stored = -1
        # The checksum field counts as eight spaces (8 * 0x20 = 256).
        unsigned = sum(block) - sum(block[148:156]) + 256
        if stored == unsigned:
            return
        # Some historic writers summed signed chars; accept those too, as Go does.
        high = len(block[:148].translate(None, _HIGH_BYTES)) + len(
            block[156:].translate(None, _HIGH_BYTES)
        )
        if stored == unsigned - 256 * high:
            return
        raise LayerFormatError(
            f"layer tar: header checksum mismatch at offset {header_offset} (not a tar, or corrupt)"
        )

    def _extension(self, payload: bytes) -> None:
        where = f"at offset {self._ext_header_offset}"
        kind = self._ext_kind
        if kind == ord("x"):
            self._pax.update(parse_pax_records(payload, where))
        elif kind == ord("g"):
            for key, value in parse_pax_records(payload, where).items():
                if key in _NOT_GLOBAL:
                    continue
                if value:
                    self._global[key] = value
                else:
                    self._global.pop(key, None)  # an empty value deletes (POSIX)
        elif kind == ord("L"):
            self._long_name = cstr(payload)
        else:
            self._long_link = cstr(payload)

    def _entry(
        self, block: bytes, typeflag: int, size: int, header_offset: int, out: list[TarEntry]
    ) -> None:
        pax = {**self._global, **self._pax} if self._global else self._pax
        long_name, long_link = self._long_name, self._long_link
        self._pax = {}
        self._long_name = self._long_link = None

        # Size first: everything after this entry depends on it, so a bad one is fatal.
        pax_size = pax.get(b"size")
        if pax_size:
            try:
                size = parse_decimal(pax_size)
            except ValueError:
                raise LayerFormatError(
                    f"layer tar: bad PAX size {pax_size[:40]!r} for the entry at offset "
                    f"{header_offset}"
                ) from None
        if size < 0 or size > MAX_SIZE:
            raise LayerFormatError(
                f"layer tar: impossible size {size} for the entry at offset {header_offset}"
            )

        magic = block[257:263]
        ustar = magic == b"ustar\x00"
        gnu = block[257:265] == b"ustar  \x00"
        name = cstr(block[0:100])
        if ustar:
            # POSIX splits long names into prefix + name; star keeps a shorter prefix.
            prefix = cstr(block[345:476] if block[508:512] == b"tar\x00" else block[345:500])
            if prefix:
                name = prefix + b"/" + name
        if long_name is not None:
            name = long_name
        if pax.get(b"path"):
            name = pax[b"path"]
        linkname = cstr(block[157:257])
        if long_link is not None:
            linkname = long_link
        if pax.get(b"linkpath"):
            linkname = pax[b"linkpath"]

        etype = _TYPEFLAGS.get(typeflag)
        payload_offset = self._pos
        data_size = 0 if typeflag in _HEADER_ONLY else size
        self._what = f"entry {show(name)} (header at offset {header_offset})"

        if typeflag == ord("S"):
            # Old GNU sparse: extra map blocks may follow the header before the data.
            self.warnings.append(
                f"{show(name)} at offset {header_offset}: GNU sparse file not supported; skipped"
            )
            self._sparse_skip = size + (-size % BLOCK)
            if block[482]:
                self._state = _SPARSE_MAP
            else:
                self._skip_then_header(self._sparse_skip)
            return
        self._skip_then_header(data_size + (-data_size % BLOCK))

        try:
            entry = self._make_entry(
                block, etype, typeflag, name, linkname, data_size, pax, payload_offset, gnu or ustar
            )
        except _EntryProblem as problem:
            self.warnings.append(f"{show(name)} at offset {header_offset}: {problem}; skipped")
            return
        out.append(entry)
        # Contained, not refused (umoci and containerd clean such names the same way), but a
        # layer that aims outside the root deserves a line in the log, as GNU tar gives one.
        if leaves_root(name):
            self.warnings.append(
                f"{show(name)} at offset {header_offset}: name reaches outside the root; "
                f"kept as {show(entry.path)}"
            )
        if entry.type is EntryType.HARDLINK and leaves_root(linkname):
            self.warnings.append(
                f"{show(name)} at offset {header_offset}: hard link target {show(linkname)} "
                f"reaches outside the root; kept as {show(entry.linkname)}"
            )

    def _make_entry(
        self,
        block: bytes,
        etype: EntryType | None,
        typeflag: int,
        raw_name: bytes,
        linkname: bytes,
        size: int,
        pax: dict[bytes, bytes],
        payload_offset: int,
        has_ustar_fields: bool,
    ) -> TarEntry:
        if etype is None:
            raise _EntryProblem(f"unsupported entry type {chr(typeflag)!r}")
        if any(key.startswith(b"GNU.sparse.") for key in pax):
            raise _EntryProblem("GNU sparse file (PAX) not supported")
        if etype is EntryType.REG and typeflag == 0 and raw_name.endswith(b"/"):
            etype = EntryType.DIR  # pre-POSIX writers marked directories by a trailing slash
        if b"\x00" in raw_name or (etype is EntryType.HARDLINK and b"\x00" in linkname):
            raise _EntryProblem("NUL byte in name")
        path = clean_path(raw_name)
        if etype is EntryType.HARDLINK:
            linkname = clean_path(linkname)
            if not linkname:
                raise _EntryProblem("hard link to the root directory")
        elif etype is not EntryType.SYMLINK:
            linkname = b""
        elif not linkname or b"\x00" in linkname:
            raise _EntryProblem("symlink with an empty or NUL-containing target")

        try:
            mode = parse_number(block[100:108]) & 0o7777
            uid = parse_number(block[108:116])
            gid = parse_number(block[116:124])
            mtime = parse_number(block[136:148])
            if has_ustar_fields and etype in (EntryType.CHAR, EntryType.BLOCK):
                devmajor = parse_number(block[329:337])
                devminor = parse_number(block[337:345])
            else:
                devmajor = devminor = 0
        except ValueError as exc:
            raise _EntryProblem(str(exc)) from None
        mtime_ns = 0
        uname = cstr(block[265:297]) if has_ustar_fields else b""
        gname = cstr(block[297:329]) if has_ustar_fields else b""

        xattrs: dict[bytes, bytes] = {}
        for key, value in pax.items():
            try:
                if key.startswith(b"SCHILY.xattr."):
                    xname = key[len(b"SCHILY.xattr.") :]
                    if xname:
                        xattrs[xname] = value
                elif not value:
                    continue  # an empty record means "use the header field"
                elif key == b"uid":
                    uid = parse_decimal(value)
                elif key == b"gid":
                    gid = parse_decimal(value)
                elif key == b"mtime":
                    mtime, mtime_ns = parse_pax_time(value)
                elif key == b"uname":
                    uname = value
                elif key == b"gname":
                    gname = value
                elif key == b"SCHILY.devmajor":
                    devmajor = parse_decimal(value)
                elif key == b"SCHILY.devminor":
                    devminor = parse_decimal(value)
            except ValueError as exc:
                raise _EntryProblem(f"PAX {key.decode('ascii', 'replace')}: {exc}") from None
        if uid < 0 or gid < 0:
            raise _EntryProblem(f"negative owner {uid}:{gid}")

        return TarEntry(
            path=path,
            type=etype,
            mode=mode,
            uid=uid,
            gid=gid,
            size=size if etype is EntryType.REG else 0,
            mtime=mtime,
            mtime_ns=mtime_ns,
            linkname=linkname,
            devmajor=devmajor,
            devminor=devminor,
            offset=payload_offset,
            header_offset=payload_offset - BLOCK,
            uname=uname,
            gname=gname,
            xattrs=tuple(sorted(xattrs.items())),
        )


def scan_tar(chunks: bytes | Iterable[bytes]) -> tuple[list[TarEntry], list[str]]:
    """Scan a whole tar held in memory (or given as chunks); for tests and small tools."""
    scanner = TarScanner()
    entries: list[TarEntry] = []
    if isinstance(chunks, bytes | bytearray | memoryview):
        chunks = [bytes(chunks)]
    for chunk in chunks:
        entries.extend(scanner.feed(chunk))
    entries.extend(scanner.close())
    return entries, scanner.warnings
