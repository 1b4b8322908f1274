"""The local store: blobs only ever visible whole and verified, index.json, leases, gc."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from imagefs.errors import IntegrityError, StoreError
from imagefs.oci.digest import Digest
from imagefs.oci.manifest import Descriptor
from imagefs.oci.reference import Reference
from imagefs.store import ImageRecord, Store

DATA = os.urandom(300_000)
DIGEST = Digest.of(DATA)


def test_layout_files_make_an_oci_layout(tmp_path: Path) -> None:
    Store(tmp_path)
    assert json.loads((tmp_path / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["schemaVersion"] == 2 and index["manifests"] == []


def test_put_checks_the_digest_before_anything_is_visible(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(IntegrityError):
        store.blobs.put(b"not what was promised", DIGEST)
    assert not store.blobs.has(DIGEST)
    assert store.blobs.put(DATA, DIGEST) == DIGEST
    assert store.blobs.read(DIGEST) == DATA


def test_ingest_commits_only_a_whole_correct_blob(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with store.blobs.ingest(DIGEST, len(DATA)) as ing:
        assert ing is not None
        ing.write(DATA[:1000])
        with pytest.raises(IntegrityError, match="got 1000 bytes"):
            ing.commit()
        assert not store.blobs.has(DIGEST)
        ing.write(DATA[1000:])
        ing.commit()
    assert store.blobs.path(DIGEST).read_bytes() == DATA
    assert not list((tmp_path / "ingest").glob("*.partial"))


def test_ingest_with_wrong_content_is_discarded(tmp_path: Path) -> None:
    store = Store(tmp_path)
    bad = bytearray(DATA)
    bad[5000] ^= 0xFF
    with store.blobs.ingest(DIGEST, len(DATA)) as ing:
        assert ing is not None
        ing.write(bytes(bad))
        with pytest.raises(IntegrityError, match="content has digest"):
            ing.commit()
        assert ing.offset == 0  # bad bytes thrown away, not kept for a resume
    assert not store.blobs.has(DIGEST)


def test_ingest_refuses_more_bytes_than_declared(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with store.blobs.ingest(DIGEST, 10) as ing:
        assert ing is not None
        with pytest.raises(IntegrityError, match="more data than"):
            ing.write(DATA[:11])


def test_interrupted_ingest_resumes_from_its_partial(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with store.blobs.ingest(DIGEST, len(DATA)) as ing:
        assert ing is not None
        ing.write(DATA[:123_456])  # then the process "dies": no commit
    with store.blobs.ingest(DIGEST, len(DATA)) as ing:
        assert ing is not None
        assert ing.offset == 123_456
        ing.write(DATA[123_456:])
        ing.commit()
    assert store.blobs.read(DIGEST) == DATA


def test_killed_writer_leaves_no_visible_blob(tmp_path: Path) -> None:
    """A real SIGKILL in the middle of an ingest: the blob is absent, the partial resumable."""
    code = f"""
import os, sys
from pathlib import Path
from imagefs.oci.digest import Digest
from imagefs.store import Store
data = bytes.fromhex(sys.stdin.read().strip())
store = Store(Path({str(tmp_path)!r}))
with store.blobs.ingest(Digest.of(data), len(data)) as ing:
    ing.write(data[:100_000])
    ing._file.flush()
    os.kill(os.getpid(), 9)
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], input=DATA.hex(), text=True, capture_output=True
    )
    assert proc.returncode == -9
    store = Store(tmp_path)
    assert not store.blobs.has(DIGEST)
    with store.blobs.ingest(DIGEST, len(DATA)) as ing:
        assert ing is not None and ing.offset == 100_000


def _ingest_in_child(root: str, data: bytes, barrier: Any, results: Any) -> None:
    store = Store(Path(root))
    barrier.wait()
    with store.blobs.ingest(Digest.of(data), len(data)) as ing:
        if ing is None:
            results.put(0)
            return
        ing.write(data)
        ing.commit()
        results.put(1)


def test_concurrent_ingests_of_one_blob_write_it_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_ingest_in_child, args=(str(tmp_path), DATA, barrier, results))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert sorted(results.get(timeout=5) for _ in procs) == [0, 0, 0, 1]
    assert Store(tmp_path).blobs.read(DIGEST) == DATA


def _record(name: str | None, digest: Digest) -> ImageRecord:
    return ImageRecord(
        manifest=Descriptor(
            media_type="application/vnd.oci.image.manifest.v1+json", digest=digest, size=123
        ),
        name=Reference.parse(name) if name else None,
        repo_digest=Reference.parse(f"localhost:5000/a/b@{digest}"),
        source=Reference.parse("localhost:5000/a/b", default_tag=None),
        index_digest=None,
        created="2026-01-01T00:00:00Z",
    )


def test_records_round_trip_with_oci_ref_name(tmp_path: Path) -> None:
    store = Store(tmp_path)
    rec = _record("localhost:5000/a/b:v1", DIGEST)
    store.refs.save([rec, _record(None, DIGEST)])
    loaded = store.records()
    assert loaded[0] == rec and loaded[1].name is None
    raw = json.loads((tmp_path / "index.json").read_text())
    ann = raw["manifests"][0]["annotations"]
    assert ann["org.opencontainers.image.ref.name"] == "localhost:5000/a/b:v1"
    assert ann["dev.imagefs.repo-digest"] == f"localhost:5000/a/b@{DIGEST}"


def test_corrupt_index_json_is_a_one_line_store_error(tmp_path: Path) -> None:
    Store(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"index\.json is corrupt"):
        Store(tmp_path).records()


def test_record_source_is_a_parsed_repository(tmp_path: Path) -> None:
    """`dev.imagefs.source` is parsed once, at load, into a tagless Reference; a damaged one
    makes index.json corrupt in one line instead of failing later at each use."""
    store = Store(tmp_path)
    store.refs.save([_record("localhost:5000/a/b:v1", DIGEST)])
    [loaded] = store.records()
    assert loaded.source is not None
    assert (loaded.source.name, loaded.source.tag) == ("localhost:5000/a/b", None)
    raw = json.loads((tmp_path / "index.json").read_text())
    assert raw["manifests"][0]["annotations"]["dev.imagefs.source"] == "localhost:5000/a/b"
    raw["manifests"][0]["annotations"]["dev.imagefs.source"] = "Not A/Repository"
    (tmp_path / "index.json").write_text(json.dumps(raw))
    with pytest.raises(StoreError, match=r"index\.json is corrupt"):
        store.records()


def test_gc_keeps_leased_blobs_and_drops_dead_leases(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.blobs.put(DATA)
    other = store.blobs.put(b"other")
    with store.lease() as lease:
        lease.add(DIGEST)
        freed = store.collect_garbage()
        assert [d for d, _ in freed] == [other]
        assert store.blobs.has(DIGEST)
    # A lease file whose owner is gone (nobody holds its lock) protects nothing.
    (tmp_path / "leases" / "99999-0").write_text(f"{DIGEST}\n")
    freed = store.collect_garbage()
    assert [d for d, _ in freed] == [DIGEST]
    assert not (tmp_path / "leases" / "99999-0").exists()
