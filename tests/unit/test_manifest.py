import json
import re
from types import MappingProxyType
from typing import Any

import pytest

from imagefs.errors import ImageFSError, NotFound, UnsupportedMediaType
from imagefs.oci import mediatypes as mt
from imagefs.oci.digest import Digest
from imagefs.oci.manifest import (
    MAX_MANIFEST_SIZE,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    parse_manifest,
)
from imagefs.oci.platform import Platform


def _d(name: str) -> str:
    return str(Digest.of(name.encode()))


# A Docker Hub manifest list, laid out as Hub serves it (three-space indent).
DOCKER_LIST = f"""{{
   "manifests": [
      {{
         "digest": "{_d("amd64")}",
         "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
         "platform": {{
            "architecture": "amd64",
            "os": "linux"
         }},
         "size": 528
      }},
      {{
         "digest": "{_d("armv6")}",
         "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
         "platform": {{
            "architecture": "arm",
            "os": "linux",
            "variant": "v6"
         }},
         "size": 528
      }},
      {{
         "digest": "{_d("armv7")}",
         "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
         "platform": {{
            "architecture": "arm",
            "os": "linux",
            "variant": "v7"
         }},
         "size": 528
      }},
      {{
         "digest": "{_d("arm64")}",
         "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
         "platform": {{
            "architecture": "arm64",
            "os": "linux",
            "variant": "v8"
         }},
         "size": 528
      }}
   ],
   "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
   "schemaVersion": 2
}}""".encode()

# A buildkit-built OCI index: image entries plus attestation manifests (unknown/unknown).
OCI_INDEX_WITH_ATTESTATIONS = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": _d("oci-amd64"),
                "size": 1022,
                "platform": {"architecture": "amd64", "os": "linux"},
            },
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": _d("oci-arm64"),
                "size": 1022,
                "platform": {"architecture": "arm64", "os": "linux"},
            },
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": _d("att-amd64"),
                "size": 566,
                "annotations": {
                    "vnd.docker.reference.digest": _d("oci-amd64"),
                    "vnd.docker.reference.type": "attestation-manifest",
                },
                "platform": {"architecture": "unknown", "os": "unknown"},
            },
        ],
    },
    separators=(",", ":"),
).encode()

DOCKER_MANIFEST = f"""{{
   "schemaVersion": 2,
   "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
   "config": {{
      "mediaType": "application/vnd.docker.container.image.v1+json",
      "size": 1472,
      "digest": "{_d("config")}"
   }},
   "layers": [
      {{
         "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
         "size": 3408729,
         "digest": "{_d("layer0")}"
      }}
   ]
}}""".encode()

OCI_MANIFEST: dict[str, Any] = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        "digest": _d("config"),
        "size": 581,
    },
    "layers": [
        {
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": _d("layer0"),
            "size": 29124044,
            "annotations": {
                "containerd.io/snapshot/stargz/toc.digest": _d("toc"),
                "io.containers.estargz.uncompressed-size": "80123392",
            },
        },
        {
            "mediaType": "application/vnd.oci.image.layer.v1.tar+zstd",
            "digest": _d("layer1"),
            "size": 1024,
        },
    ],
    "annotations": {"org.opencontainers.image.created": "2024-01-02T03:04:05Z"},
}

SCHEMA1_SIGNED = b"""{
   "schemaVersion": 1,
   "name": "library/hello-world",
   "tag": "latest",
   "architecture": "amd64",
   "fsLayers": [
      {"blobSum": "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4"}
   ],
   "history": [{"v1Compatibility": "{}"}],
   "signatures": []
}"""


def _raw(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, indent=3).encode()


# -- manifests ---------------------------------------------------------------------------------


def test_docker_manifest() -> None:
    m = parse_manifest(DOCKER_MANIFEST, "application/vnd.docker.distribution.manifest.v2+json")
    assert isinstance(m, Manifest)
    assert m.media_type == mt.DOCKER_MANIFEST
    assert m.raw == DOCKER_MANIFEST
    assert m.digest == Digest.of(DOCKER_MANIFEST)
    assert m.config == Descriptor(mt.DOCKER_CONFIG, Digest.parse(_d("config")), 1472)
    assert [(layer.media_type, layer.size) for layer in m.layers] == [
        (mt.DOCKER_LAYER_GZIP, 3408729)
    ]
    assert m.subject is None and m.artifact_type is None and dict(m.annotations) == {}


def test_oci_manifest_keeps_annotations_read_only() -> None:
    m = parse_manifest(_raw(OCI_MANIFEST), mt.OCI_MANIFEST)
    assert isinstance(m, Manifest)
    assert m.annotations["org.opencontainers.image.created"] == "2024-01-02T03:04:05Z"
    layer = m.layers[0]
    assert layer.annotations["containerd.io/snapshot/stargz/toc.digest"] == _d("toc")
    with pytest.raises(TypeError):
        layer.annotations["x"] = "y"  # type: ignore[index]
    assert m.layers[1].media_type == mt.OCI_LAYER_ZSTD


def test_digest_is_over_the_raw_bytes_not_a_reserialisation() -> None:
    compact = json.dumps(OCI_MANIFEST, separators=(",", ":")).encode()
    spaced = _raw(OCI_MANIFEST)
    a, b = parse_manifest(compact, None), parse_manifest(spaced, None)
    assert isinstance(a, Manifest) and isinstance(b, Manifest)
    assert a.layers == b.layers
    assert a.digest == Digest.of(compact) != b.digest == Digest.of(spaced)


def test_content_type_parameters_and_case_are_ignored() -> None:
    m = parse_manifest(
        DOCKER_MANIFEST, "Application/vnd.docker.distribution.manifest.v2+json; charset=utf-8"
    )
    assert m.media_type == mt.DOCKER_MANIFEST


def test_oci_manifest_without_media_type_uses_content_type() -> None:
    obj = {k: v for k, v in OCI_MANIFEST.items() if k != "mediaType"}
    m = parse_manifest(_raw(obj), mt.OCI_MANIFEST)
    assert isinstance(m, Manifest) and m.media_type == mt.OCI_MANIFEST


def test_oci_manifest_without_media_type_is_inferred_from_shape() -> None:
    obj = {k: v for k, v in OCI_MANIFEST.items() if k != "mediaType"}
    for content_type in (None, "application/json", "application/octet-stream"):
        m = parse_manifest(_raw(obj), content_type)
        assert isinstance(m, Manifest) and m.media_type == mt.OCI_MANIFEST


def test_oci_index_without_media_type_is_inferred_from_shape() -> None:
    obj = json.loads(OCI_INDEX_WITH_ATTESTATIONS)
    del obj["mediaType"]
    i = parse_manifest(_raw(obj), "text/plain")
    assert isinstance(i, Index) and i.media_type == mt.OCI_INDEX


def test_media_type_field_wins_over_an_unhelpful_content_type() -> None:
    m = parse_manifest(DOCKER_MANIFEST, "application/json")
    assert m.media_type == mt.DOCKER_MANIFEST


def test_content_type_contradicting_the_field_is_refused() -> None:
    with pytest.raises(
        ImageFSError, match=r"^invalid manifest: Content-Type is .* but the mediaType"
    ):
        parse_manifest(DOCKER_MANIFEST, mt.OCI_MANIFEST)


def test_subject_and_artifact_type() -> None:
    obj = dict(OCI_MANIFEST)
    obj["artifactType"] = "application/vnd.imagefs.layer-index.v1+json"
    obj["config"] = {"mediaType": mt.OCI_EMPTY, "digest": str(Digest.of(b"{}")), "size": 2}
    obj["subject"] = {"mediaType": mt.OCI_MANIFEST, "digest": _d("subject"), "size": 123}
    m = parse_manifest(_raw(obj), None)
    assert isinstance(m, Manifest)
    assert m.artifact_type == "application/vnd.imagefs.layer-index.v1+json"
    assert m.subject == Descriptor(mt.OCI_MANIFEST, Digest.parse(_d("subject")), 123)
    assert m.config.media_type == mt.OCI_EMPTY


@pytest.mark.parametrize(
    "content_type",
    [mt.DOCKER_SCHEMA1_SIGNED_MANIFEST, mt.DOCKER_SCHEMA1_MANIFEST, None, "application/json"],
)
def test_schema1_is_refused_with_advice(content_type: str | None) -> None:
    with pytest.raises(UnsupportedMediaType) as info:
        parse_manifest(SCHEMA1_SIGNED, content_type)
    assert str(info.value) == (
        "Docker schema 1 manifests are not supported (deprecated since 2019); "
        "re-push the image with a current tool"
    )


def test_unknown_manifest_media_type() -> None:
    obj = dict(OCI_MANIFEST, mediaType="application/vnd.oci.artifact.manifest.v1+json")
    with pytest.raises(
        UnsupportedMediaType, match=re.escape("application/vnd.oci.artifact.manifest.v1+json")
    ):
        parse_manifest(_raw(obj), None)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"", "not valid JSON"),
        (b"{not json", "not valid JSON"),
        (b"[]", "manifest must be a JSON object, got list"),
        (b'{"schemaVersion": 2}', "neither an index nor a manifest"),
        (b'{"schemaVersion": 3, "config": {}, "layers": []}', "schemaVersion is 3, want 2"),
        (b'{"config": {}, "layers": []}', "schemaVersion is None, want 2"),
        (
            b'{"schemaVersion": 2, "schemaVersion": 2, "manifests": []}',
            'duplicate key "schemaVersion"',
        ),
        (b'{"schemaVersion": 2, "mediaType": 7, "manifests": []}', "mediaType must be a string"),
        # not JSON (RFC 8259), though json.loads takes them
        (b'{"schemaVersion": 2, "manifests": [], "x": NaN}', "NaN is not a JSON number"),
        (b'{"schemaVersion": 2, "manifests": [], "x": -Infinity}', "-Infinity is not a JSON"),
        (b'{"schemaVersion": 2, "manifests": [], "x": 1e400}', "number 1e400 is out of range"),
        (
            b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json"}',
            "needs a manifests list",
        ),
        (
            b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",'
            b' "layers": []}',
            "has no config",
        ),
    ],
)
def test_malformed_documents(raw: bytes, problem: str) -> None:
    with pytest.raises(ImageFSError) as info:
        parse_manifest(raw, None)
    assert str(info.value).startswith("invalid manifest: ")
    assert problem in str(info.value)


def _with_layer(**changes: Any) -> bytes:
    layer = dict(OCI_MANIFEST["layers"][1], **changes)
    return _raw(dict(OCI_MANIFEST, layers=[layer]))


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (_with_layer(size=-1), "has size -1, want an int from 0 to 2^63-1"),
        (_with_layer(size=1 << 63), "has size 9223372036854775808, want an int from 0"),
        (_with_layer(size=10**400), "has size 10000000000000000000..., want an int"),
        (_with_layer(size="12"), "has size '12'"),
        (_with_layer(size=1.5), "has size 1.5"),
        (_with_layer(size=True), "has size True"),
        (_with_layer(digest="sha256:abc"), 'invalid digest "sha256:abc"'),
        (_with_layer(digest=None), "missing digest"),
        (_with_layer(mediaType=None), "missing mediaType"),
        (_with_layer(urls="http://x"), "urls must be a list of strings"),
        (_with_layer(annotations={"a": 1}), "annotations must map strings to strings"),
        (_with_layer(platform={"os": "linux"}), "missing architecture"),
    ],
)
def test_bad_descriptors(raw: bytes, problem: str) -> None:
    with pytest.raises(ImageFSError) as info:
        parse_manifest(raw, None)
    assert str(info.value).startswith("invalid manifest: ")
    assert problem in str(info.value)


def test_size_limit() -> None:
    padding = b" " * (MAX_MANIFEST_SIZE - len(DOCKER_MANIFEST))
    assert parse_manifest(DOCKER_MANIFEST + padding, None).media_type == mt.DOCKER_MANIFEST
    with pytest.raises(ImageFSError, match=r"^invalid manifest: 4194305 bytes is larger than"):
        parse_manifest(DOCKER_MANIFEST + padding + b" ", None)


# -- descriptors -------------------------------------------------------------------------------


def test_descriptor_json_round_trip() -> None:
    obj = {
        "mediaType": mt.DOCKER_FOREIGN_LAYER_GZIP,
        "digest": _d("foreign"),
        "size": 1234,
        "urls": ["https://mcr.microsoft.com/v2/windows/blobs/x"],
        "annotations": {"a": "b"},
        "platform": {"architecture": "amd64", "os": "windows", "os.version": "10.0.17763.1"},
        "artifactType": "application/example",
    }
    d = Descriptor.from_json(obj)
    assert d.platform == Platform("windows", "amd64", None, "10.0.17763.1")
    assert d.urls == ("https://mcr.microsoft.com/v2/windows/blobs/x",)
    assert d.to_json() == obj


def test_descriptor_to_json_omits_empty_fields() -> None:
    d = Descriptor(mt.OCI_CONFIG, Digest.of(b"{}"), 2)
    assert d.to_json() == {"mediaType": mt.OCI_CONFIG, "digest": str(Digest.of(b"{}")), "size": 2}


def test_descriptor_copies_a_caller_dict() -> None:
    annotations = {"k": "v"}
    d = Descriptor(mt.OCI_CONFIG, Digest.of(b""), 0, annotations=annotations)
    annotations["k"] = "changed"
    assert d.annotations["k"] == "v"
    assert isinstance(d.annotations, MappingProxyType)
    assert hash(d) == hash(Descriptor(mt.OCI_CONFIG, Digest.of(b""), 0))


def test_descriptor_from_json_rejects_non_objects() -> None:
    with pytest.raises(ImageFSError, match=r"^invalid manifest: descriptor must be a JSON object"):
        Descriptor.from_json(["not", "an", "object"])


# -- indexes -----------------------------------------------------------------------------------


def test_docker_manifest_list() -> None:
    i = parse_manifest(DOCKER_LIST, mt.DOCKER_MANIFEST_LIST)
    assert isinstance(i, Index)
    assert i.media_type == mt.DOCKER_MANIFEST_LIST
    assert i.digest == Digest.of(DOCKER_LIST)
    assert [str(d.platform) for d in i.manifests] == [
        "linux/amd64",
        "linux/arm/v6",
        "linux/arm/v7",
        "linux/arm64/v8",
    ]


@pytest.mark.parametrize(
    ("wanted", "entry"),
    [
        ("linux/amd64", "amd64"),
        ("linux/arm64", "arm64"),  # v8 is arm64's default variant
        ("linux/arm64/v8", "arm64"),
        ("linux/arm/v7", "armv7"),
        ("linux/arm", "armv7"),
        ("linux/arm/v6", "armv6"),
        ("linux/arm/v8", "armv7"),  # no arm/v8 entry: nearest older variant
    ],
)
def test_select_from_manifest_list(wanted: str, entry: str) -> None:
    i = parse_manifest(DOCKER_LIST, None)
    assert isinstance(i, Index)
    assert i.select(Platform.parse(wanted)).digest == Digest.parse(_d(entry))


def test_select_prefers_exact_variant_regardless_of_order() -> None:
    obj = json.loads(DOCKER_LIST)
    obj["manifests"].reverse()  # v7 now comes before v6
    i = parse_manifest(_raw(obj), None)
    assert isinstance(i, Index)
    assert i.select(Platform.parse("linux/arm/v6")).digest == Digest.parse(_d("armv6"))
    assert i.select(Platform.parse("linux/arm/v7")).digest == Digest.parse(_d("armv7"))


def test_select_skips_attestations_and_platformless_entries() -> None:
    obj = json.loads(OCI_INDEX_WITH_ATTESTATIONS)
    obj["manifests"].insert(
        0, {"mediaType": mt.OCI_MANIFEST, "digest": _d("no-platform"), "size": 1}
    )
    # an attestation that claims a real platform must still not be chosen
    obj["manifests"].insert(
        0,
        {
            "mediaType": mt.OCI_MANIFEST,
            "digest": _d("att-claims-amd64"),
            "size": 1,
            "annotations": {"vnd.docker.reference.type": "attestation-manifest"},
            "platform": {"architecture": "amd64", "os": "linux"},
        },
    )
    i = parse_manifest(_raw(obj), mt.OCI_INDEX)
    assert isinstance(i, Index)
    assert i.select(Platform.parse("linux/amd64")).digest == Digest.parse(_d("oci-amd64"))
    assert i.select(Platform.parse("linux/arm64/v8")).digest == Digest.parse(_d("oci-arm64"))


def test_select_names_wanted_and_available_platforms() -> None:
    i = parse_manifest(OCI_INDEX_WITH_ATTESTATIONS, None)
    assert isinstance(i, Index)
    with pytest.raises(NotFound) as info:
        i.select(Platform.parse("linux/riscv64"))
    message = str(info.value)
    assert "linux/riscv64" in message
    assert "available: linux/amd64, linux/arm64" in message
    assert "unknown" not in message
    assert str(i.digest) in message


def test_select_on_an_index_of_nothing() -> None:
    i = parse_manifest(b'{"schemaVersion": 2, "manifests": []}', None)
    assert isinstance(i, Index)
    with pytest.raises(NotFound, match="available: none"):
        i.select(Platform.parse("linux/amd64"))


# -- image configs -----------------------------------------------------------------------------

CONFIG = f"""{{"architecture":"arm64","config":{{"Env":["PATH=/usr/local/sbin:/usr/local/bin:\
/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["/bin/sh"],"WorkingDir":"/","Labels":{{"a":"b"}},\
"ExposedPorts":{{"80/tcp":{{}}}}}},"created":"2024-01-26T23:44:51.5Z","history":[{{"created":\
"2024-01-26T23:44:51.4Z","created_by":"/bin/sh -c #(nop) ADD file:d0764a717d1e in / "}},\
{{"created":"2024-01-26T23:44:51.5Z","created_by":"/bin/sh -c #(nop)  CMD [\\"/bin/sh\\"]",\
"empty_layer":true}}],"os":"linux","rootfs":{{"type":"layers","diff_ids":["{_d("diff0")}"]}},\
"variant":"v8"}}""".encode()


def test_image_config() -> None:
    c = ImageConfig.parse(CONFIG)
    assert (c.architecture, c.os, c.variant) == ("arm64", "linux", "v8")
    assert c.platform == Platform("linux", "arm64", "v8")
    assert c.created == "2024-01-26T23:44:51.5Z"
    assert c.author is None
    assert c.config["Cmd"] == ("/bin/sh",)
    assert c.config["Labels"] == {"a": "b"}
    assert c.diff_ids == (Digest.parse(_d("diff0")),)
    assert len(c.history) == 2 and c.history[1]["empty_layer"] is True
    assert c.raw == CONFIG
    assert c.digest == Digest.of(CONFIG)


def test_image_config_is_deeply_read_only() -> None:
    c = ImageConfig.parse(CONFIG)
    with pytest.raises(TypeError):
        c.config["Labels"]["a"] = "c"
    with pytest.raises(AttributeError):
        c.config["Env"].append("X=1")


def test_image_config_minimal_without_config_or_history() -> None:
    c = ImageConfig.parse(
        b'{"architecture":"amd64","os":"linux","config":null,'
        b'"rootfs":{"type":"layers","diff_ids":[]}}'
    )
    assert dict(c.config) == {} and c.history == () and c.diff_ids == ()


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        (
            {"rootfs": {"type": "snapshot", "diff_ids": []}},
            "rootfs.type is 'snapshot', want 'layers'",
        ),
        ({"rootfs": None}, "rootfs must be a JSON object"),
        ({"rootfs": {"type": "layers"}}, "rootfs.diff_ids must be a list"),
        ({"rootfs": {"type": "layers", "diff_ids": ["sha256:12"]}}, 'invalid digest "sha256:12"'),
        ({"rootfs": {"type": "layers", "diff_ids": [1]}}, "non-string entry 1"),
        ({"os": None}, "missing os"),
        ({"architecture": 64}, "architecture must be a string"),
        ({"config": []}, "config must be an object"),
        ({"history": [1]}, "history must be a list of objects"),
    ],
)
def test_bad_image_configs(changes: dict[str, Any], problem: str) -> None:
    obj = dict(json.loads(CONFIG), **changes)
    with pytest.raises(ImageFSError) as info:
        ImageConfig.parse(json.dumps(obj).encode())
    assert str(info.value).startswith("invalid image config: ")
    assert problem in str(info.value)


def test_image_config_not_json() -> None:
    with pytest.raises(ImageFSError, match=r"^invalid image config: not valid JSON"):
        ImageConfig.parse(b"\x00")


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"1e400", b"-1.5e999"])
def test_image_config_with_a_number_json_cannot_hold_is_refused(number: bytes) -> None:
    raw = (
        b'{"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers",'
        b' "diff_ids": []}, "config": {"StopTimeout": ' + number + b"}}"
    )
    with pytest.raises(ImageFSError, match=r"^invalid image config: .*(not a JSON number|out of)"):
        ImageConfig.parse(raw)
