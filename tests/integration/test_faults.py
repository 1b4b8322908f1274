"""Faults on the wire that tests/integration/test_transport.py does not cover: pushes through
server errors and resets, redirect loops, wrong Content-Length both ways, stalls before the
answer and in the middle of a body, and the overall `--registry-timeout` (see docs/faults.md).
"""

from __future__ import annotations

import errno
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagefs import api
from imagefs.errors import IntegrityError, RegistryError, RegistryUnreachable
from imagefs.oci.digest import Digest
from imagefs.registry import client as client_module
from imagefs.registry import connection
from imagefs.registry.transport import RetryPolicy, TransportOptions
from imagefs.testing.images import SampleImage, skopeo_inspect
from imagefs.testing.mounts import imagefs, mounted
from imagefs.testing.proxy import FaultProxy, Rule
from imagefs.testing.registry import LocalRegistry
from tests.integration.lazy_content import BIG, SMALL, Published

FAST = TransportOptions(retry=RetryPolicy(attempts=4, base_delay=0.01, max_delay=2.0))


@pytest.fixture
def proxy(registry: LocalRegistry) -> Iterator[FaultProxy]:
    with FaultProxy(registry.url) as p:
        yield p


def via(proxy: FaultProxy, image: SampleImage) -> str:
    return f"{proxy.host}/{image.pushed.repo_tag}"


def biggest_layer(image: SampleImage) -> str:
    return str(max(image.layout.layers(), key=lambda layer: int(layer["size"]))["digest"])


# -- pushes -----------------------------------------------------------------------------------


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunked uploads (POST, PATCH..., PUT) for the sample's 100 KiB layers, too."""
    monkeypatch.setattr(client_module, "MONOLITHIC_UPLOAD_MAX", 16 << 10)
    monkeypatch.setattr(client_module, "UPLOAD_CHUNK", 16 << 10)


async def test_push_survives_500_503_and_resets_mid_upload(
    tmp_path: Path,
    sample_image: SampleImage,
    fresh_registry: LocalRegistry,
    small_chunks: None,
) -> None:
    with FaultProxy(fresh_registry.url) as target:
        target.add(Rule("PATCH", r"/blobs/uploads/", "status", times=1, status=500))
        target.add(Rule("PATCH", r"/blobs/uploads/", "reset", times=1))
        target.add(Rule("PUT", r"/blobs/uploads/", "status", times=1, status=503))
        target.add(Rule("PUT", r"/manifests/", "status", times=1, status=503))
        ref = f"{target.host}/faults/push:v1"
        async with api.Session(root=tmp_path / "root", options=FAST) as s:
            await api.pull(s, sample_image.ref, full=True)
            await api.tag(s, sample_image.ref, ref)
            await api.push(s, ref)
        faults = [r for r in target.recorded if r.status in (0, 500, 503)]
        assert len(faults) == 4, faults  # each fault really happened, and was survived
        patches = [r for r in target.recorded if r.method == "PATCH"]
        assert len(patches) > 2  # really chunked
    assert skopeo_inspect(fresh_registry, "faults/push:v1")["Digest"] == sample_image.digest


async def test_push_against_a_failing_registry_is_one_clear_error(
    tmp_path: Path,
    sample_image: SampleImage,
    fresh_registry: LocalRegistry,
    small_chunks: None,
) -> None:
    with FaultProxy(fresh_registry.url) as target:
        target.add(Rule("PUT", r"/blobs/uploads/", "status", status=500))
        ref = f"{target.host}/faults/push-fails:v1"
        async with api.Session(root=tmp_path / "root", options=FAST) as s:
            await api.pull(s, sample_image.ref, full=True)
            await api.tag(s, sample_image.ref, ref)
            with pytest.raises(RegistryError) as info:
                await api.push(s, ref)
        text = str(info.value)
        assert target.host in text and "HTTP 500" in text and "finish upload" in text
        assert "\n" not in text
        # bounded: a blob's upload was tried `attempts` times, then the push stopped (the
        # other uploads running beside it were cancelled)
        puts = [r for r in target.recorded if r.method == "PUT" and "/blobs/" in r.path]
        per_blob = Counter(r.path.split("digest=")[1] for r in puts)
        assert max(per_blob.values()) == FAST.retry.attempts, per_blob
        assert not any("/manifests/" in r.path and r.method == "PUT" for r in target.recorded)


# -- redirect loops ---------------------------------------------------------------------------


async def test_redirect_loop_on_one_host_is_a_clear_error(
    tmp_path: Path, sample_image: SampleImage, proxy: FaultProxy
) -> None:
    proxy.add(Rule("GET", r"/manifests/", "redirect_loop"))
    async with api.Session(root=tmp_path / "root", options=FAST) as s:
        with pytest.raises(RegistryError) as info:
            await api.pull(s, via(proxy, sample_image))
        assert not s.store.records()
    assert "too many redirects" in str(info.value) and proxy.host in str(info.value)
    hops = [r for r in proxy.recorded if "/manifests/" in r.path]
    assert len(hops) == connection.MAX_REDIRECTS + 1  # followed a few times, not retried


async def test_redirect_loop_between_two_hosts_is_a_clear_error(
    tmp_path: Path, sample_image: SampleImage, registry: LocalRegistry
) -> None:
    with FaultProxy(registry.url) as a, FaultProxy(registry.url) as b:
        layer = biggest_layer(sample_image)
        a.add(Rule("GET", layer, "redirect_loop", redirect_to=b.url))
        b.add(Rule("GET", layer, "redirect_loop", redirect_to=a.url))
        async with api.Session(root=tmp_path / "root", options=FAST) as s:
            with pytest.raises(RegistryError) as info:
                await api.pull(s, f"{a.host}/{sample_image.pushed.repo_tag}", full=True)
            assert not s.store.blobs.has(Digest.parse(layer))
        assert "too many redirects" in str(info.value)
        assert a.recorded and b.recorded
        # the other host never saw our credentials (there are none here) nor looped forever
        assert len([r for r in b.recorded if layer in r.path]) <= connection.MAX_REDIRECTS


# -- wrong Content-Length ---------------------------------------------------------------------


@pytest.mark.parametrize("delta", [+100, -1000], ids=["too-long", "too-short"])
async def test_wrong_content_length_on_a_blob_resumes_to_the_right_bytes(
    tmp_path: Path, sample_image: SampleImage, proxy: FaultProxy, delta: int
) -> None:
    layer = biggest_layer(sample_image)
    proxy.add(Rule("GET", layer, "bad_length", times=1, length_delta=delta))
    async with api.Session(root=tmp_path / "root", options=FAST) as s:
        await api.pull(s, via(proxy, sample_image), full=True)
        stored = s.store.blobs.path(Digest.parse(layer)).read_bytes()
    assert stored == sample_image.layout.blob(layer)
    gets = [r for r in proxy.recorded if layer in r.path]
    if delta > 0:  # every byte came, then the connection closed early: nothing to resume
        assert len(gets) == 1
    else:  # the body stopped 1000 bytes short: resumed from there
        size = len(stored)
        assert len(gets) == 2 and gets[1].headers.get("Range") == f"bytes={size - 1000}-"


async def test_short_content_length_on_a_manifest_stores_nothing(
    tmp_path: Path, sample_image: SampleImage, proxy: FaultProxy
) -> None:
    proxy.add(Rule("GET", r"/manifests/v1", "bad_length", length_delta=-10))
    async with api.Session(root=tmp_path / "root", options=FAST) as s:
        with pytest.raises(IntegrityError, match="nothing was stored"):
            await api.pull(s, via(proxy, sample_image))
        assert not s.store.records()


# -- stalls and the overall timeout -----------------------------------------------------------


async def test_stalled_registry_fails_within_the_registry_timeout(
    tmp_path: Path, sample_image: SampleImage, proxy: FaultProxy
) -> None:
    rule = proxy.add(Rule("GET", r"/manifests/", "stall", stall_seconds=30))
    options = TransportOptions(retry=FAST.retry, timeout=1.5)
    async with api.Session(root=tmp_path / "root", options=options) as s:
        with pytest.raises(RegistryUnreachable, match=r"no answer within 1\.5s"):
            await api.pull(s, via(proxy, sample_image))
    # the deadline ended the one stalled request (the stall is 30 s): no retry behind it.
    # How long the deadline takes is tested on trio's virtual clock (test_client_bounds.py).
    assert rule.hits == 1, rule.hits


async def test_stall_in_the_middle_of_a_blob_is_resumed(
    tmp_path: Path, sample_image: SampleImage, proxy: FaultProxy
) -> None:
    layer = biggest_layer(sample_image)
    proxy.add(Rule("GET", layer, "stall_body", times=1, truncate_to=40_000, stall_seconds=30))
    options = TransportOptions(retry=FAST.retry, timeout=1.5)
    async with api.Session(root=tmp_path / "root", options=options) as s:
        await api.pull(s, via(proxy, sample_image), full=True)
        stored = s.store.blobs.path(Digest.parse(layer)).read_bytes()
    assert stored == sample_image.layout.blob(layer)
    gets = [r for r in proxy.recorded if layer in r.path]
    assert len(gets) == 2 and gets[1].headers.get("Range") == "bytes=40000-"


def test_registry_timeout_flag_bounds_a_cli_pull(
    tmp_path: Path, sample_image: SampleImage, proxy: FaultProxy
) -> None:
    rule = proxy.add(Rule("GET", r"/manifests/", "stall", stall_seconds=30))
    proc = imagefs(
        tmp_path / "root", "--registry-timeout", "2", "pull", via(proxy, sample_image), check=False
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no answer within 2s" in lines[0], proc.stderr
    assert rule.hits == 1, rule.hits  # the deadline ended the stalled request, no retry
    bad = imagefs(tmp_path / "root", "--registry-timeout", "soon", "images", check=False)
    assert bad.returncode == 2 and "not a number of seconds" in bad.stderr


# -- a mount through an outage ----------------------------------------------------------------


@pytest.mark.fuse
@pytest.mark.parametrize("fault", ["stall", "stall_body"])
def test_uncached_read_gives_eio_within_the_registry_timeout_then_recovers(
    tmp_path: Path, estargz_image: Published, proxy: FaultProxy, fault: str
) -> None:
    ref = estargz_image.ref.replace(estargz_image.ref.split("/")[0], proxy.host, 1)
    root = tmp_path / "root"
    with mounted(root, ref, tmp_path / "mnt", extra=["--registry-timeout", "2"]) as mnt:
        assert (mnt / "etc" / "motd").read_bytes() == SMALL["etc/motd"]  # TOC + first piece
        rule = proxy.add(
            Rule("GET", r"/blobs/", fault, stall_seconds=60, truncate_to=1000, times=1000)
        )
        with pytest.raises(OSError) as info:
            (mnt / "data" / "big3.bin").read_bytes()
        assert info.value.errno == errno.EIO
        # the deadline ended the read, not a retry budget of stalls (how long the deadline
        # takes is tested on trio's virtual clock, test_client_bounds.py)
        assert rule.hits < RetryPolicy().attempts, rule.hits
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        assert (mnt / "etc" / "motd").read_bytes() == SMALL["etc/motd"]  # cached: still served
        assert os.path.ismount(mnt)
        rule.times = 0  # the registry recovers: the same mount reads the file now
        assert (mnt / "data" / "big3.bin").read_bytes() == BIG["data/big3.bin"]
    log = next((root / "logs").glob("mount-*.log")).read_text()
    assert "no answer within 2s" in log or "broke off" in log, log[-2000:]


# -- the proxy as a tool ----------------------------------------------------------------------


def test_faultproxy_tool_injects_its_rules(registry: LocalRegistry) -> None:
    import subprocess
    import urllib.error
    import urllib.request

    from imagefs.testing.registry import free_port

    port = free_port()
    tool = Path(__file__).resolve().parents[2] / "tools" / "faultproxy"
    rule = "GET /v2/ status status=503 times=1 retry_after=7"
    proc = subprocess.Popen(
        [str(tool), "--upstream", registry.url, "--port", str(port), "--rule", rule],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert "fault proxy on" in proc.stdout.readline()
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=10)
        assert info.value.code == 503 and info.value.headers["Retry-After"] == "7"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=10) as resp:
            assert resp.status == 200  # times=1: the second request is forwarded
    finally:
        proc.terminate()
        proc.wait(10)
    bad = subprocess.run(
        [str(tool), "--upstream", registry.url, "--rule", "GET /v2/ explode"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "unknown fault 'explode'" in bad.stderr


def test_rule_parsing() -> None:
    rule = Rule.parse("PUT /blobs/uploads/ stall_body truncate_to=10 stall_seconds=1.5 times=2")
    assert (rule.method, rule.path, rule.fault) == ("PUT", "/blobs/uploads/", "stall_body")
    assert (rule.truncate_to, rule.stall_seconds, rule.times) == (10, 1.5, 2)
    assert Rule.parse("* /x redirect_loop redirect_to=http://127.0.0.1:1").method == "*"
    for bad in ("GET /x", "GET /x flip flip_at=abc", "GET /x flip hits=3", "GET /x flip nope=1"):
        with pytest.raises(ValueError):
            Rule.parse(bad)
