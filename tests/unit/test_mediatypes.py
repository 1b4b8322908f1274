import pytest

from imagefs.errors import UnsupportedMediaType
from imagefs.oci import mediatypes as mt


@pytest.mark.parametrize(
    ("media_type", "compression"),
    [
        ("application/vnd.oci.image.layer.v1.tar", "none"),
        ("application/vnd.oci.image.layer.v1.tar+gzip", "gzip"),
        ("application/vnd.oci.image.layer.v1.tar+zstd", "zstd"),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar", "none"),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", "gzip"),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+zstd", "zstd"),
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", "gzip"),
        ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", "gzip"),
        ("application/vnd.docker.image.rootfs.diff.tar", "none"),
        ("application/vnd.docker.image.rootfs.diff.tar.zstd", "zstd"),
    ],
)
def test_layer_compression(media_type: str, compression: str) -> None:
    assert mt.layer_compression(media_type) == compression


@pytest.mark.parametrize(
    "media_type",
    [mt.OCI_CONFIG, mt.DOCKER_MANIFEST, mt.OCI_EMPTY, "application/octet-stream", ""],
)
def test_layer_compression_refuses_non_layers_naming_the_type(media_type: str) -> None:
    with pytest.raises(UnsupportedMediaType) as info:
        mt.layer_compression(media_type)
    assert str(info.value) == f'unsupported layer media type "{media_type}"'


def test_is_foreign() -> None:
    assert mt.is_foreign(mt.DOCKER_FOREIGN_LAYER_GZIP)
    assert mt.is_foreign(mt.OCI_LAYER_NONDISTRIBUTABLE_GZIP)
    assert not mt.is_foreign(mt.DOCKER_LAYER_GZIP)
    assert not mt.is_foreign(mt.OCI_LAYER_ZSTD)


def test_manifest_accept_lists_the_four_supported_types_and_no_schema1() -> None:
    listed = [t.strip() for t in mt.MANIFEST_ACCEPT.split(",")]
    assert sorted(listed) == sorted(
        [
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
        ]
    )


def test_spelled_constants() -> None:
    assert mt.DOCKER_SCHEMA1_MANIFEST == "application/vnd.docker.distribution.manifest.v1+json"
    assert (
        mt.DOCKER_SCHEMA1_SIGNED_MANIFEST
        == "application/vnd.docker.distribution.manifest.v1+prettyjws"
    )
    assert mt.OCI_EMPTY == "application/vnd.oci.empty.v1+json"
    assert mt.DOCKER_CONFIG == "application/vnd.docker.container.image.v1+json"
