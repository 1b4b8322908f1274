"""`ls` and `cat` without a mount (imagefs.browse), against a real registry.

The reference for `ls` is GNU ls itself, run with the options our output mimics
(`-1b`, `-n` for long, `-R`, `-A`) in a UTF-8 locale with C collation and C times: on a
`umoci unpack` of the same image (the independent extraction; directory link counts are the
one known difference, see `normalized`) and on an imagefs mount of it (where every column
must match exactly). Laziness is counted in the registry's access log.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from imagefs import api
from imagefs.browse import SymlinkLoop, cat, format_mode, ls, open_image, quote_name
from imagefs.errors import NotAFile, NotFound, UsageError
from imagefs.testing.images import (
    LayoutImage,
    PushedImage,
    SampleImage,
    build_umoci_image,
    push,
    umoci_unpack,
)
from imagefs.testing.mounts import mounted
from imagefs.testing.registry import InfraError, LocalRegistry
from tests.integration.lazy_content import BIG, FILES, SMALL, Published, layer_fetches


@pytest.fixture(autouse=True)
def _isolated_docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))


def session(root: Path) -> api.Session:
    return api.Session(root=root)


# --------------------------------------------------------------------------------------------
# an image of the things ls must print carefully

ODD_NAMES = (
    b"plain.txt",
    b"with space",
    b"new\nline",
    b"tab\there",
    b"esc\x1b[0m",
    b"del\x7f",
    b"back\\slash",
    b"non-utf8-\xff\xfe-\xe9t\xe9",
    "ünïcödé-☃".encode(),
    b"-leading-dash",
    b".hidden",
)
T_OLD = 1_000_000_000  # Sep 2001: printed with the year
T_FUTURE = int(time.time()) + 10 * 365 * 86400  # also printed with the year


def _write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _odd_tree(rootfs: Path) -> None:
    for name in ODD_NAMES:
        _write(Path(os.fsdecode(bytes(rootfs) + b"/names/" + name)), b"name: " + name + b"\n")
    _write(rootfs / "usr/lib/libx.so", b"\x7fELF not really\n", 0o755)
    _write(rootfs / "usr/share/doc/README", b"docs\n")
    _write(rootfs / "etc/os-release", b"ID=odd\n")
    (rootfs / "usr/lib/parent").symlink_to("..")
    links = rootfs / "links"
    links.mkdir()
    (links / "lib").symlink_to("../usr/lib")
    (links / "abs").symlink_to("/usr/lib/libx.so")
    (links / "dangling").symlink_to("nowhere/at/all")
    (links / "loop1").symlink_to("loop2")
    (links / "loop2").symlink_to("loop1")
    (links / "up").symlink_to("../../../../etc")  # climbs past the root: stays at the root
    (links / "file-as-dir").symlink_to("../etc/os-release/")
    os.symlink(b"odd\ntarget", bytes(links) + b"/odd-target")
    modes = rootfs / "modes"
    for mode in (0o4755, 0o2644, 0o1755, 0o7000, 0o0000, 0o6777):
        _write(modes / f"f-{mode:04o}", b"mode\n", mode)
    for mode in (0o1777, 0o0700):
        (modes / f"d-{mode:04o}").mkdir()
        (modes / f"d-{mode:04o}").chmod(mode)
    dev = rootfs / "dev"
    dev.mkdir()
    for node, mode, rdev in (
        ("null", 0o666 | stat.S_IFCHR, os.makedev(1, 3)),
        ("sda1", 0o660 | stat.S_IFBLK, os.makedev(8, 1)),
        ("big-numbers", 0o600 | stat.S_IFCHR, os.makedev(254, 300_000)),
        ("fifo", 0o644 | stat.S_IFIFO, 0),
    ):
        os.mknod(dev / node, mode, rdev)
        os.chmod(dev / node, stat.S_IMODE(mode))
    os.chown(_write(rootfs / "owners/big", b"big owner\n"), 1_000_000, 65534)
    hl = _write(rootfs / "hard/a", b"two names\n")
    os.link(hl, rootfs / "hard/b")
    _write(rootfs / "times/big-file.bin", bytes(70_000))
    old = _write(rootfs / "times/old.txt", b"old\n")
    os.utime(old, (T_OLD, T_OLD))
    future = _write(rootfs / "times/future.txt", b"future\n")
    os.utime(future, (T_FUTURE, T_FUTURE))
    (rootfs / "empty").mkdir()
    _write(rootfs / ".hidden-dir/inside.txt", b"hidden\n")


class OddImage:
    def __init__(self, pushed: PushedImage, layout: LayoutImage, rootfs: Path) -> None:
        self.pushed = pushed
        self.layout = layout
        self.rootfs = rootfs

    @property
    def ref(self) -> str:
        return self.pushed.ref


@pytest.fixture(scope="module")
def odd_image(registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory) -> OddImage:
    work = tmp_path_factory.mktemp("odd")
    try:
        layout = build_umoci_image(work / "layout", [_odd_tree], tag="odd")
        pushed = push(layout, registry, "browse/odd:v1")
        rootfs = umoci_unpack(layout, work / "bundle")
    except InfraError as e:
        pytest.fail(f"test infrastructure: {e}", pytrace=False)
    # tar rounds times to the nearest second: let "just made" be in the past for GNU ls too
    time.sleep(1)
    return OddImage(pushed, layout, rootfs)


@pytest.fixture(scope="module")
def sample_rootfs(sample_image: SampleImage, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return umoci_unpack(sample_image.layout, tmp_path_factory.mktemp("sample-ref") / "bundle")


# --------------------------------------------------------------------------------------------
# GNU ls as the reference


def gnu_ls(cwd: Path, *args: str) -> list[str]:
    """GNU ls with a clean environment: no TIME_STYLE, QUOTING_STYLE, BLOCK_SIZE, colours."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "LC_COLLATE": "C",
        "LC_TIME": "C",
    }
    if "TZ" in os.environ:
        env["TZ"] = os.environ["TZ"]
    out = subprocess.run(
        ["ls", "-1b", *args], cwd=cwd, env=env, capture_output=True, check=True, timeout=60
    ).stdout
    return out.decode("utf-8").splitlines()


def headers_from_dot(lines: list[str]) -> list[str]:
    """`ls -R .` names directories `.:` and `./etc:`; ours, run on "/", `/:` and `/etc:`."""
    out = []
    for line in lines:
        if line == ".:":
            line = "/:"
        elif line.startswith("./") and line.endswith(":"):
            line = line[1:]
        out.append(line)
    return out


def normalized(lines: list[str]) -> list[list[str]]:
    """Columns without alignment, and directories' link count as the mount reports it (1,
    like btrfs; an extraction on ext4 has 2 + subdirectories)."""
    out = []
    for line in lines:
        cols = line.split()
        if len(cols) > 2 and cols[0][:1] == "d" and len(cols[0]) == 10:
            cols[1] = "1"
        out.append(cols)
    return out


async def browse_ls(
    root: Path,
    ref: str,
    path: str | bytes = "/",
    *,
    long: bool = False,
    recursive: bool = False,
    almost_all: bool = False,
) -> list[str]:
    async with session(root) as s:
        return await ls(
            s,
            ref,
            path,
            long=long,
            recursive=recursive,
            almost_all=almost_all,
        )


async def browse_cat(
    root: Path, ref: str, *paths: str | bytes, trust_published_index: bool = False
) -> bytes:
    out = io.BytesIO()
    async with session(root) as s:
        await cat(s, ref, list(paths), out, trust_published_index=trust_published_index)
    return out.getvalue()


# --------------------------------------------------------------------------------------------
# ls


async def test_ls_root_and_subdirectories_match_gnu_ls_on_the_extraction(
    tmp_path: Path, sample_image: SampleImage, sample_rootfs: Path
) -> None:
    root = tmp_path / "root"
    assert await browse_ls(root, sample_image.ref) == gnu_ls(sample_rootfs, ".")
    assert await browse_ls(root, sample_image.ref) == ["etc", "opt", "usr", "var"]
    for path in ("etc", "/opt/app", "usr/bin", "var/empty"):
        assert await browse_ls(root, sample_image.ref, path) == gnu_ls(
            sample_rootfs, path.lstrip("/")
        ), path
    recursive = await browse_ls(root, sample_image.ref, recursive=True)
    assert recursive == headers_from_dot(gnu_ls(sample_rootfs, "-R", "."))
    assert (
        "/opt/app:" in recursive and "old.txt" not in recursive and "removed.txt" not in recursive
    )


@pytest.mark.parametrize("flags", [("-n",), ("-nR",), ("-nRA",), ("-RA",)])
async def test_ls_matches_gnu_ls_on_the_extraction(
    tmp_path: Path, odd_image: OddImage, flags: tuple[str, ...]
) -> None:
    opts = "".join(flags).replace("-", "")
    lines = await browse_ls(
        tmp_path / "root",
        odd_image.ref,
        long="n" in opts,
        recursive="R" in opts,
        almost_all="A" in opts,
    )
    reference = headers_from_dot(gnu_ls(odd_image.rootfs, *flags, "."))
    assert normalized(lines) == normalized(reference)


@pytest.mark.fuse
async def test_ls_matches_gnu_ls_on_a_mount_column_for_column(
    tmp_path: Path, odd_image: OddImage, sample_image: SampleImage
) -> None:
    root = tmp_path / "root"
    for ref in (odd_image.ref, sample_image.ref):
        with mounted(root, ref, tmp_path / "mnt") as mnt:
            for flags in (("-nR",), ("-nRA",), ("-RA",)):
                opts = "".join(flags)
                want = headers_from_dot(gnu_ls(mnt, *flags, "."))
                got = await browse_ls(
                    root, ref, long="n" in opts, recursive=True, almost_all="A" in opts
                )
                assert got == want, (ref, flags)
            if ref != odd_image.ref:
                continue
            # one PATH in all its forms: files, symlinks (to directories, dangling, through
            # symlinks), directories, with and without a trailing slash, with and without -l
            for path in (
                "links/lib",
                "links/lib/",
                "usr/lib/parent/lib",
                "usr/lib/parent/lib/libx.so",
                "links/dangling",
                "links/abs",
                "links/odd-target",
                "etc/os-release",
                "dev",
                "names",
                "/modes/",
                "links/lib/../share",
            ):
                for long in (False, True):
                    want = gnu_ls(mnt, *(["-n"] if long else []), path.lstrip("/"))
                    got = await browse_ls(root, ref, path.lstrip("/"), long=long)
                    assert got == want, (path, long)


async def test_ls_long_shows_modes_devices_links_owners_and_old_times(
    tmp_path: Path, odd_image: OddImage
) -> None:
    root = tmp_path / "root"
    dev = await browse_ls(root, odd_image.ref, "/dev", long=True)
    assert dev[0] == "total 0"
    by_name = {line.rsplit(" ", 1)[1]: line for line in dev[1:]}
    assert by_name["big-numbers"].startswith("crw------- 1 0 0 254, 300000 ")
    assert by_name["null"].startswith("crw-rw-rw- 1 0 0   1,      3 ")
    assert by_name["sda1"].startswith("brw-rw---- 1 0 0   8,      1 ")
    assert by_name["fifo"].startswith("prw-r--r-- 1 0 0           0 ")
    modes = await browse_ls(root, odd_image.ref, "modes", long=True)
    assert [line.split()[0] for line in modes[1:]] == [
        "drwx------",
        "drwxrwxrwt",
        "----------",
        "-rwxr-xr-t",
        "-rw-r-Sr--",
        "-rwsr-xr-x",
        "-rwsrwsrwx",
        "---S--S--T",
    ]
    [owner] = await browse_ls(root, odd_image.ref, "owners/big", long=True)
    assert owner.split()[1:5] == ["1", "1000000", "65534", "10"]
    assert owner.endswith(" owners/big")
    times = await browse_ls(root, odd_image.ref, "times", long=True)
    old = time.localtime(T_OLD)
    assert any(line.endswith(f" Sep {old.tm_mday:2d}  {old.tm_year} old.txt") for line in times)
    future = time.localtime(T_FUTURE)
    assert any(f"  {future.tm_year} future.txt" in line for line in times)
    hard = await browse_ls(root, odd_image.ref, "hard", long=True)
    assert [line.split()[1] for line in hard[1:]] == ["2", "2"]
    [link] = await browse_ls(root, odd_image.ref, "links/odd-target", long=True)
    assert link.startswith("lrwxrwxrwx 1 0 0 10 ") and link.endswith(
        " links/odd-target -> odd\\ntarget"
    )
    assert await browse_ls(root, odd_image.ref, "empty", long=True) == ["total 0"]
    assert await browse_ls(root, odd_image.ref, "empty") == []


async def test_names_are_escaped_like_ls_b(tmp_path: Path, odd_image: OddImage) -> None:
    names = await browse_ls(tmp_path / "root", odd_image.ref, "names", almost_all=True)
    assert names == [
        "-leading-dash",
        ".hidden",
        "back\\\\slash",
        "del\\177",
        "esc\\033[0m",
        "new\\nline",
        "non-utf8-\\377\\376-\\351t\\351",
        "plain.txt",
        "tab\\there",
        "with\\ space",
        "ünïcödé-☃",
    ]
    assert quote_name(b"\x07\x08\x0b\x0c\r") == "\\a\\b\\v\\f\\r"
    assert quote_name("a\u2028b\u00e9".encode()) == "a\\342\\200\\250bé"


def test_format_mode() -> None:
    assert format_mode(stat.S_IFDIR | 0o755) == "drwxr-xr-x"
    assert format_mode(stat.S_IFLNK | 0o777) == "lrwxrwxrwx"
    assert format_mode(stat.S_IFSOCK | 0o7777) == "srwsrwsrwt"
    assert format_mode(stat.S_IFREG | 0o7000) == "---S--S--T"


async def test_ls_errors_name_the_path(tmp_path: Path, odd_image: OddImage) -> None:
    root = tmp_path / "root"
    with pytest.raises(NotFound, match=r"^no/such/path: no such file or directory in "):
        await browse_ls(root, odd_image.ref, "no/such/path")
    with pytest.raises(NotFound, match=r"^etc/os-release/x: not a directory"):
        await browse_ls(root, odd_image.ref, "etc/os-release/x")
    with pytest.raises(SymlinkLoop, match="too many levels of symbolic links"):
        await browse_ls(root, odd_image.ref, "links/loop1/x")
    # without -l a dangling symlink shows itself, as with GNU ls
    assert await browse_ls(root, odd_image.ref, "links/dangling") == ["links/dangling"]


# --------------------------------------------------------------------------------------------
# the Browser API


async def test_paths_resolve_like_the_kernel_in_a_chroot(
    tmp_path: Path, odd_image: OddImage
) -> None:
    async with session(tmp_path / "root") as s, await open_image(s, odd_image.ref) as b:
        libx = await b.lookup_path("/usr/lib/libx.so")
        assert libx is not None
        for path in (
            "usr/lib/libx.so",
            "/./usr//lib/./libx.so",
            "/../../usr/lib/libx.so",  # .. of the root is the root
            "usr/lib/parent/lib/libx.so",  # a symlink to .. in the middle
            "links/lib/libx.so",  # a relative symlink to a directory
            b"links/lib/../lib/libx.so",
        ):
            assert await b.lookup_path(path) == libx, path
        # the final component is followed only when asked (stat vs lstat)
        abs_link = await b.lookup_path("links/abs")
        assert abs_link is not None and abs_link != libx
        assert await b.lookup_path("links/abs", follow=True) == libx
        assert await b.readlink(abs_link) == b"/usr/lib/libx.so"
        # `..` after a symlink is the parent of where it led: links/lib/.. is /usr
        assert await b.lookup_path("links/lib/../share/doc/README") is not None
        assert await b.lookup_path("links/share") is None
        # a symlink climbing past the root stays inside the image
        assert await b.lookup_path("links/up/os-release") == await b.lookup_path("etc/os-release")
        # a trailing slash needs a directory
        assert await b.lookup_path("etc/os-release/") is None
        assert await b.lookup_path("links/file-as-dir", follow=True) is None
        assert await b.lookup_path("links/lib/") == await b.lookup_path("usr/lib")
        assert await b.lookup_path("links/dangling", follow=True) is None
        assert await b.lookup_path("no/such") is None
        with pytest.raises(SymlinkLoop):
            await b.lookup_path("links/loop1", follow=True)
        assert await b.lookup_path("links/loop1") is not None
        with pytest.raises(SymlinkLoop):
            await b.lookup_path("links/loop2/anything")
        # the root
        assert await b.lookup_path("/") == await b.lookup_path("") == await b.lookup_path("..")
        # stat, listdir, read on the inodes
        attrs = await b.stat(libx)
        assert stat.S_ISREG(attrs.mode) and attrs.size == 16 and attrs.mode & 0o777 == 0o755
        usr_lib = await b.lookup_path("usr/lib")
        assert usr_lib is not None
        assert [n for n, _ in await b.listdir(usr_lib)] == [b"libx.so", b"parent"]
        assert await b.read(libx, 0, 100) == b"\x7fELF not really\n"
        assert await b.read(libx, 5, 3) == b"not"
        assert await b.read(libx, 16, 10) == b""


async def test_walk_is_depth_first_sorted_and_complete(tmp_path: Path, odd_image: OddImage) -> None:
    expected = {b"/"}
    for dirpath, dirs, files in os.walk(bytes(odd_image.rootfs)):
        rel = dirpath[len(bytes(odd_image.rootfs)) :]
        for name in dirs + files:
            expected.add(rel + b"/" + name)
    async with session(tmp_path / "root") as s, await open_image(s, odd_image.ref) as b:
        walked = [(p, a) async for p, a in b.walk("/")]
        sub = [p async for p, _ in b.walk(b"usr/")]
    paths = [p for p, _ in walked]
    assert set(paths) == expected
    assert paths == sorted(paths, key=lambda p: p.rstrip(b"/").split(b"/"))
    kinds = {p: a.mode for p, a in walked}
    assert stat.S_ISLNK(kinds[b"/links/lib"]) and stat.S_ISCHR(kinds[b"/dev/null"])
    assert sub == [
        b"usr/",
        b"usr/lib",
        b"usr/lib/libx.so",
        b"usr/lib/parent",
        b"usr/share",
        b"usr/share/doc",
        b"usr/share/doc/README",
    ]


# --------------------------------------------------------------------------------------------
# cat


async def test_cat_files_symlinks_and_several_paths(
    tmp_path: Path, sample_image: SampleImage
) -> None:
    root = tmp_path / "root"
    for path, data in sample_image.files.items():
        assert await browse_cat(root, sample_image.ref, path) == data, path
        assert await browse_cat(root, sample_image.ref, "/" + path) == data, path
    hello = sample_image.files["etc/hello.txt"]
    assert await browse_cat(root, sample_image.ref, "usr/bin/hello") == hello  # a symlink
    big = sample_image.files["usr/share/sample/big.bin"]
    assert await browse_cat(
        root, sample_image.ref, "etc/hello.txt", "usr/share/sample/big.bin", "usr/bin/hello"
    ) == (hello + big + hello)


async def test_cat_errors_name_the_path_and_write_nothing(
    tmp_path: Path, odd_image: OddImage, sample_image: SampleImage
) -> None:
    root = tmp_path / "root"
    cases: list[tuple[str, type[Exception], str]] = [
        ("etc/removed.txt", NotFound, r"^etc/removed\.txt: no such file or directory in "),
        ("opt/app/old.txt", NotFound, r"^opt/app/old\.txt: no such file"),
        ("etc", NotAFile, r"^etc: Is a directory$"),
        ("etc/hello.txt/", NotFound, r"^etc/hello\.txt/: not a directory"),
    ]
    for path, kind, message in cases:
        out = io.BytesIO()
        async with session(root) as s:
            with pytest.raises(kind, match=message):
                await cat(s, sample_image.ref, ["etc/hello.txt", path], out)
        assert out.getvalue() == b"", path
    odd_cases: list[tuple[str | bytes, type[Exception], str]] = [
        ("links/dangling", NotFound, r"^links/dangling: dangling symbolic link in "),
        ("links/loop1", SymlinkLoop, r"^links/loop1: too many levels of symbolic links"),
        ("dev/null", NotAFile, r"^dev/null: not a regular file$"),
        ("links/lib", NotAFile, r"^links/lib: Is a directory$"),
        (b"names/new\nline/x", NotFound, r"^names/new\\nline/x: not a directory"),
    ]
    for odd_path, kind, message in odd_cases:
        with pytest.raises(kind, match=message):
            await browse_cat(root, odd_image.ref, odd_path)
    assert await browse_cat(root, odd_image.ref, "links/abs") == b"\x7fELF not really\n"
    assert await browse_cat(root, odd_image.ref, b"names/new\nline") == b"name: new\nline\n"
    async with session(root) as s:
        with pytest.raises(UsageError):
            await cat(s, odd_image.ref, [], io.BytesIO())


async def test_cat_reads_every_lazy_format_exactly(
    tmp_path: Path, published: Published, registry: LocalRegistry
) -> None:
    root = tmp_path / "root"
    trust = published.trusts_published_index
    for name, data in FILES.items():
        assert await browse_cat(root, published.ref, name, trust_published_index=trust) == data
    assert await browse_ls(root, published.ref, "data") == sorted(n.split("/")[1] for n in BIG)


async def test_cat_of_one_small_estargz_file_fetches_only_its_pieces(
    tmp_path: Path, estargz_image: Published, registry: LocalRegistry
) -> None:
    root = tmp_path / "root"
    registry.mark()
    assert await browse_cat(root, estargz_image.ref, "etc/motd") == SMALL["etc/motd"]
    fetched = layer_fetches(registry, estargz_image)
    assert fetched and all(status == 206 for status, _ in fetched), fetched
    total = sum(n for _, n in fetched)
    # the footer, the TOC and the file's chunk (with a few neighbours): well under 1 MiB
    # of a 12 MiB layer
    assert total < 1 << 20 and total < estargz_image.layer_size // 12, (
        total,
        estargz_image.layer_size,
    )
    # listing needs the TOC only, which is now in the index store: no fetch at all
    registry.mark()
    lines = await browse_ls(root, estargz_image.ref, long=True, recursive=True)
    assert any(line.endswith(" motd") for line in lines)
    assert layer_fetches(registry, estargz_image) == []
    # and the same file again comes from the chunk cache
    assert await browse_cat(root, estargz_image.ref, "etc/motd") == SMALL["etc/motd"]
    assert layer_fetches(registry, estargz_image) == []


async def test_a_big_file_streams_through_read_ahead(
    tmp_path: Path, estargz_image: Published, registry: LocalRegistry
) -> None:
    registry.mark()
    name = "data/big1.bin"
    assert await browse_cat(tmp_path / "root", estargz_image.ref, name) == BIG[name]
    fetched = layer_fetches(registry, estargz_image)
    assert all(status == 206 for status, _ in fetched), fetched
    # the file's 3 MiB (three 1 MiB chunks) and the TOC: read-ahead stops at the file's end
    assert sum(n for _, n in fetched) < len(BIG[name]) + (256 << 10), fetched
    assert len(fetched) <= 4, fetched


@pytest.mark.fuse
async def test_browse_and_mount_share_the_store_and_the_chunk_cache(
    tmp_path: Path, estargz_image: Published, registry: LocalRegistry
) -> None:
    root = tmp_path / "root"
    assert await browse_cat(root, estargz_image.ref, "etc/hostname") == SMALL["etc/hostname"]
    registry.mark()
    with mounted(root, estargz_image.ref, tmp_path / "mnt") as mnt:
        assert (mnt / "etc" / "hostname").read_bytes() == SMALL["etc/hostname"]
        assert layer_fetches(registry, estargz_image) == []
