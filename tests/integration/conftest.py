"""Fixtures shared by the integration tests: the lazy-loading content tree (see
`lazy_content.py`) published three ways. Module-scoped: each test module pushes its own copy
(same repository names, same bytes), as when each module imported the fixtures.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from imagefs.layers import estargz
from imagefs.testing.images import (
    LayoutImage,
    build_umoci_image,
    push,
)
from imagefs.testing.mounts import imagefs
from imagefs.testing.registry import LocalRegistry
from tests.integration.lazy_content import FILES, Published, push_estargz, write_files


def _layers_of(layout: LayoutImage) -> list[dict[str, Any]]:
    return layout.layers()


@pytest.fixture(scope="module")
def gzip_image(registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory) -> Published:
    work = tmp_path_factory.mktemp("gz")
    image = build_umoci_image(work / "layout", [write_files], tag="gz")
    pushed = push(image, registry, "lazy/gzip:v1")
    # publish the imagefs layer index next to it, as `imagefs index --push` does for users
    imagefs(work / "indexer", "index", "--push", pushed.ref)
    layers = _layers_of(image)
    return Published(
        pushed.ref,
        [str(x["digest"]) for x in layers],
        int(layers[-1]["size"]),
        flags=("--trust-published-index",),
    )


@pytest.fixture(scope="module")
def zstd_chunked_image(
    registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory
) -> Published:
    work = tmp_path_factory.mktemp("zc")
    image = build_umoci_image(work / "layout", [write_files], tag="zc")
    pushed = push(image, registry, "lazy/zstd-chunked:v1", compression="zstd:chunked")
    out = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{pushed.ref}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    layers = json.loads(out)["layers"]
    return Published(pushed.ref, [x["digest"] for x in layers], int(layers[-1]["size"]))


@pytest.fixture(scope="module")
def estargz_image(registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory) -> Published:
    dirs = sorted({str(Path(n).parent) for n in FILES} | {"usr", "usr/share"})
    specs = [estargz.FileSpec(name=d + "/", type="dir", mode=0o755) for d in dirs]
    specs += [estargz.FileSpec(name=n, data=d) for n, d in sorted(FILES.items())]
    work = tmp_path_factory.mktemp("esgz")
    pushed, image = push_estargz(registry, work, "lazy/estargz:v1", specs, chunk_size=1 << 20)
    layers = _layers_of(image)
    return Published(pushed.ref, [str(x["digest"]) for x in layers], int(layers[-1]["size"]))


@pytest.fixture(params=["gzip+index", "zstd:chunked", "estargz"])
def published(request: pytest.FixtureRequest) -> Published:
    name = {
        "gzip+index": "gzip_image",
        "zstd:chunked": "zstd_chunked_image",
        "estargz": "estargz_image",
    }[request.param]
    pub: Published = request.getfixturevalue(name)
    return pub
