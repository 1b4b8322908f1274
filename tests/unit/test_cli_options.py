"""The CLI's shape (issue 13.4): global options declared once and passed on whole to the
daemon a detached mount starts; the command line module stays light to import; the config
file merged with flags."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from imagefs.cli import build_parser
from imagefs.cli.mount import daemon_arguments
from imagefs.cli.options import GLOBALS, subcommand_parsers
from imagefs.errors import UsageError
from imagefs.settings import cache_size, transport_options


def _example(opt: object) -> list[str]:
    """A command line that sets this global option to something other than its default."""
    flag, extra = opt.flag, opt.extra  # type: ignore[attr-defined]
    if extra.get("action") == "store_true":
        return [flag]
    if extra.get("action") == "append":
        return [flag, "a.example:5000", flag, "b.example"]
    if extra.get("type") is Path:
        return [flag, "/some/dir"]
    if "type" in extra:  # a number
        return [flag, "2.5"]
    return [flag, "100mbit"]


GLOBAL_NAMES = [g.flag for g in GLOBALS]


@pytest.mark.parametrize("flag", GLOBAL_NAMES)
@pytest.mark.parametrize("where", ["before", "after"])
def test_every_global_option_reaches_the_mount_daemon(flag: str, where: str) -> None:
    """A global option given to `imagefs mount` (before or after the command name) reaches
    the daemon (the launcher forked, running the foreground mount) with the same value."""
    opt = next(g for g in GLOBALS if g.flag == flag)
    words = _example(opt)
    tail = ["mount", "alpine", "/mnt/x"]
    argv = words + tail if where == "before" else [*tail[:1], *words, *tail[1:]]
    a = build_parser().parse_args(argv)
    root = Path("/r").absolute() if flag != "--root" else Path("/some/dir")
    daemon = daemon_arguments(a, root, Path("/mnt/x"), 7)
    assert daemon.foreground and daemon.ready_fd == 7 and daemon.reference == "alpine"
    assert getattr(daemon, opt.dest) == getattr(a, opt.dest) != opt.default
    for other in GLOBALS:  # and nothing else was set on the way
        if other.dest not in (opt.dest, "root"):
            assert getattr(daemon, other.dest) == other.default


def test_every_command_takes_exactly_the_global_options() -> None:
    found = subcommand_parsers(build_parser())
    assert len(found) == 24
    for prog, parser in found.items():
        groups = [g for g in parser._action_groups if g.title == "global options"]
        assert len(groups) == 1, prog
        flags = [a.option_strings[0] for a in groups[0]._group_actions]
        assert flags == GLOBAL_NAMES, prog


def test_importing_the_cli_loads_no_heavy_module() -> None:
    """`imagefs mount` starts its daemon from this import: no trio, httpx, rich, template
    engine or registry client until a command needs them."""
    code = "import json, sys; import imagefs.cli; print(json.dumps(sorted(m for m in sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    loaded = set(json.loads(out))
    heavy = {"trio", "httpx", "rich", "imagefs.gotemplate", "imagefs.api", "imagefs.registry"}
    assert not heavy & loaded


def test_a_detached_mount_s_launcher_never_imports_trio_or_httpx(tmp_path: Path) -> None:
    """The launcher of `imagefs mount` only checks and starts the daemon (which imports
    what it needs): every import it skips is start-up time saved (here it stops at the
    missing mountpoint, after running the detached path)."""
    code = (
        "import json, sys; from imagefs.cli import main\n"
        f"rc = main(['--root', {str(tmp_path / 'root')!r}, 'mount', 'example.com/a:b', "
        f"{str(tmp_path / 'missing')!r}])\n"
        "print(json.dumps([rc, sorted(m for m in sys.modules)]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rc, modules = json.loads(out.stdout)
    assert rc != 0 and "does not exist" in out.stderr, out.stderr
    assert not {"trio", "httpx", "pyfuse3"} & set(modules)


def test_flags_go_before_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "insecure-registries": ["file.example"],
                "registry-mirrors": ["https://hub-mirror.example"],
                "mirrors": {"quay.io": ["https://quay-mirror.example"]},
                "cache-size": "512MiB",
            }
        )
    )
    opts = transport_options(
        tmp_path,
        insecure_registries=["flag.example:5000"],
        mirror_flags=["https://flag-mirror.example", "quay.io=https://q2.example"],
        timeout=3.0,
    )
    assert opts.insecure_registries == {"file.example", "flag.example:5000"}
    assert opts.mirrors == {
        "docker.io": ["https://flag-mirror.example", "https://hub-mirror.example"],
        "quay.io": ["https://q2.example", "https://quay-mirror.example"],
    }
    assert opts.timeout == 3.0 and opts.link is None and opts.config_dir == tmp_path
    assert cache_size(None, tmp_path) == 512 << 20
    assert cache_size("1GiB", tmp_path) == 1 << 30


def test_network_emulation_and_bad_values(tmp_path: Path) -> None:
    opts = transport_options(tmp_path, net_latency_ms=20, net_bandwidth="8mbit")
    assert opts.link is not None and opts.link.latency == 0.02
    assert opts.link.bandwidth == 1_000_000
    with pytest.raises(UsageError):
        transport_options(tmp_path, net_bandwidth="fast")
    with pytest.raises(UsageError):
        cache_size("lots", tmp_path)
    (tmp_path / "config.json").write_text('{"cache-size": "huge"}')
    with pytest.raises(UsageError):
        cache_size(None, tmp_path)


def test_a_build_mounts_its_bases_with_the_command_line_s_global_options(tmp_path: Path) -> None:
    """Was: the base images' mount daemons got only --root, --config, --insecure-registry
    and the emulated network, rebuilt from the session; a mirror or --registry-timeout given
    to `imagefs build` did not reach them."""
    from imagefs import api
    from imagefs.build.bases import BaseImages
    from imagefs.cli.build import build_options

    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    argv = ["--registry-mirror", "http://mirror.example", "build", str(tmp_path)]
    a = build_parser().parse_args([*argv, "--registry-timeout", "7", "--debug"])
    opts = build_options(a, tmp_path / "root")
    session = api.Session(tmp_path / "root")
    bases = BaseImages(session, tmp_path, pull=False, global_argv=opts.global_argv)
    mount_argv = [*bases._global_argv(), "mount", "-f", "alpine", "/mnt/x"]
    daemon = build_parser().parse_args(mount_argv)
    assert daemon.root == tmp_path / "root"
    assert daemon.registry_mirror == ["http://mirror.example"]
    assert daemon.registry_timeout == 7 and daemon.debug


@pytest.mark.parametrize("trust", [False, True])
def test_build_trust_published_index_reaches_the_base_mounts(tmp_path: Path, trust: bool) -> None:
    """`build --trust-published-index`: the base images' lazy mounts use a published index
    as `mount --trust-published-index` does; without it they do not."""
    from imagefs import api
    from imagefs.build.bases import BaseImages
    from imagefs.cli.build import build_options

    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    argv = ["build", *(["--trust-published-index"] if trust else []), str(tmp_path)]
    opts = build_options(build_parser().parse_args(argv), tmp_path / "root")
    bases = BaseImages(
        api.Session(tmp_path / "root"),
        tmp_path,
        pull=False,
        global_argv=opts.global_argv,
        trust_published_index=opts.trust_published_index,
    )
    daemon = build_parser().parse_args(bases.mount_argv("alpine", Path("/mnt/x")))
    assert daemon.trust_published_index is trust
