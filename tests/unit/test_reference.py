import pytest

from imagefs.errors import InvalidReference
from imagefs.oci.digest import Digest
from imagefs.oci.reference import Reference

HEX = "ff" * 32
DIGEST = f"sha256:{HEX}"


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag"),
    [
        # distribution/reference's normalisation table
        ("docker/docker", "docker.io", "docker/docker", "latest"),
        ("library/debian", "docker.io", "library/debian", "latest"),
        ("debian", "docker.io", "library/debian", "latest"),
        ("docker.io/docker/docker", "docker.io", "docker/docker", "latest"),
        ("docker.io/library/debian", "docker.io", "library/debian", "latest"),
        ("docker.io/debian", "docker.io", "library/debian", "latest"),
        ("index.docker.io/docker/docker", "docker.io", "docker/docker", "latest"),
        ("index.docker.io/library/debian", "docker.io", "library/debian", "latest"),
        ("index.docker.io/debian", "docker.io", "library/debian", "latest"),
        ("127.0.0.1:5000/docker/docker", "127.0.0.1:5000", "docker/docker", "latest"),
        ("127.0.0.1:5000/library/debian", "127.0.0.1:5000", "library/debian", "latest"),
        ("127.0.0.1:5000/debian", "127.0.0.1:5000", "debian", "latest"),
        ("192.168.0.1", "docker.io", "library/192.168.0.1", "latest"),
        ("192.168.0.1:80", "docker.io", "library/192.168.0.1", "80"),
        ("foo/foo_bar.com:8080", "docker.io", "foo/foo_bar.com", "8080"),
        ("alpine:3.19", "docker.io", "library/alpine", "3.19"),
        ("lowercase:Uppercase", "docker.io", "library/lowercase", "Uppercase"),
        # only index.docker.io is an alias of docker.io; registry-1 is just a host
        ("registry-1.docker.io/alpine", "registry-1.docker.io", "alpine", "latest"),
        ("localhost/foo", "localhost", "foo", "latest"),
        ("localhost:5000/a/b:tag", "localhost:5000", "a/b", "tag"),
        ("test:5000/repo", "test:5000", "repo", "latest"),
        ("test.com/repo:tag", "test.com", "repo", "tag"),
        (
            "sub-dom1.foo.com/bar/baz/quux:some-long-tag",
            "sub-dom1.foo.com",
            "bar/baz/quux",
            "some-long-tag",
        ),
        (
            "b.gcr.io/test.example.com/my-app:test.example.com",
            "b.gcr.io",
            "test.example.com/my-app",
            "test.example.com",
        ),
        ("xn--n3h.com/myimage:xn--n3h.com", "xn--n3h.com", "myimage", "xn--n3h.com"),
        # an uppercase first component is a host, as in docker
        ("Foo/bar", "Foo", "bar", "latest"),
        ("[2001:db8::1]:5000/repo", "[2001:db8::1]:5000", "repo", "latest"),
        ("[::1]:5000/repo:tag", "[::1]:5000", "repo", "tag"),
        ("[2001:db8:1:2:3:4:5:6]/repo:tag", "[2001:db8:1:2:3:4:5:6]", "repo", "tag"),
        ("a__b/c--d/e.f:t", "docker.io", "a__b/c--d/e.f", "t"),
        (
            "docker.io/" + "1a3f5e7d9c1b3a5f" * 4,
            "docker.io",
            "library/" + "1a3f5e7d9c1b3a5f" * 4,
            "latest",
        ),
    ],
)
def test_docker_normalisation(text: str, registry: str, repository: str, tag: str) -> None:
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry,
        repository,
        tag,
        None,
    )


def test_digest_only_gets_no_default_tag() -> None:
    ref = Reference.parse(f"test:5000/repo@{DIGEST}")
    assert ref.tag is None
    assert ref.digest == Digest.parse(DIGEST)
    assert str(ref) == f"test:5000/repo@{DIGEST}"


def test_tag_and_digest_are_both_kept() -> None:
    ref = Reference.parse(f"alpine:3.19@{DIGEST}")
    assert (ref.tag, ref.digest) == ("3.19", Digest.parse(DIGEST))
    assert str(ref) == f"docker.io/library/alpine:3.19@{DIGEST}"
    assert ref.api_reference == DIGEST


def test_sha512_digest() -> None:
    hex_ = "f" * 128
    ref = Reference.parse(f"xn--7o8h.com/myimage:xn--7o8h.com@sha512:{hex_}")
    assert ref.digest == Digest("sha512", hex_)


def test_default_tag_can_be_changed_or_disabled() -> None:
    assert Reference.parse("alpine", default_tag="edge").tag == "edge"
    assert Reference.parse("alpine", default_tag=None).tag is None
    assert Reference.parse("alpine:3", default_tag=None).tag == "3"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "must not be empty"),
        ("https://github.com/docker/docker", 'registry port "" must be numeric'),
        ("docker/Docker", "repository name must be lowercase"),
        ("Uppercase:tag", "repository name must be lowercase"),
        ("test:5000/Uppercase/lowercase:tag", "repository name must be lowercase"),
        ("docker.io/docker/Docker", "repository name must be lowercase"),
        ("-docker", 'invalid repository path component "-docker"'),
        ("-docker/docker", 'invalid repository path component "-docker"'),
        ("docker///docker", 'invalid repository path component ""'),
        ("docker.io/docker///docker", 'invalid repository path component ""'),
        ("aa/asdf$$^/aa", 'invalid repository path component "asdf$$^"'),
        ("a-/b", 'invalid repository path component "a-"'),
        ("x/a..b", 'invalid repository path component "a..b"'),
        ("a..b/c", 'invalid registry host "a..b"'),
        ("1a3f5e7d9c1b3a5f" * 4, "image ID"),
        (":justtag", 'invalid repository path component ""'),
        (f"@{DIGEST}", 'invalid repository path component ""'),
        ("repo@sha256:ffffff", 'invalid digest "sha256:ffffff"'),
        (f"validname@invaliddigest:{HEX}", 'unsupported algorithm "invaliddigest"'),
        ("alpine:", "empty tag"),
        ("alpine:-tag", 'invalid tag "-tag"'),
        ("alpine:" + "a" * 129, "invalid tag"),
        # a ":" before the first "/" makes that component a host, as in docker
        ("alpine:a/b", 'registry port "a" must be numeric'),
        (":5000/repo", 'invalid registry host ":5000"'),
        ("host:port/repo", 'registry port "port" must be numeric'),
        ("2001:db8::1/repo", 'registry port "db8::1" must be numeric'),
        ("[2001:db8::1]", 'invalid repository path component "[2001'),
        ("[fe80::1%eth0]:5000/repo", 'invalid registry host "[fe80::1%eth0]:5000"'),
        ("-bad.example.com/repo", 'invalid registry host "-bad.example.com"'),
    ],
)
def test_invalid_forms_name_the_bad_part(text: str, problem: str) -> None:
    with pytest.raises(InvalidReference) as info:
        Reference.parse(text)
    message = str(info.value)
    assert message.startswith(f'invalid reference "{text}": ')
    assert problem in message


def test_uppercase_message_matches_the_documented_wording() -> None:
    with pytest.raises(InvalidReference) as info:
        Reference.parse("Foo/Bar")
    assert str(info.value) == 'invalid reference "Foo/Bar": repository name must be lowercase'


def test_tag_length_limit_is_128() -> None:
    assert Reference.parse("alpine:" + "a" * 128).tag == "a" * 128


def test_total_name_length_limit_includes_the_registry() -> None:
    # "docker.io/" (10) + "a/" * 122 + "a" (245) = 255: just fits
    ok = "a/" * 122 + "a"
    assert len(Reference.parse(ok).name) == 255
    with pytest.raises(
        InvalidReference, match=r"256 characters long, more than the maximum of 255"
    ):
        Reference.parse("a" + ok)


def test_name_and_canonical_string() -> None:
    ref = Reference.parse("alpine")
    assert ref.name == "docker.io/library/alpine"
    assert str(ref) == "docker.io/library/alpine:latest"
    assert str(Reference.parse("alpine", default_tag=None)) == "docker.io/library/alpine"


@pytest.mark.parametrize(
    ("text", "familiar"),
    [
        ("alpine", "alpine:latest"),
        ("docker.io/library/alpine:3.19", "alpine:3.19"),
        ("index.docker.io/user/app:1", "user/app:1"),
        ("docker.io/library/foo/bar", "library/foo/bar:latest"),
        ("localhost:5000/a/b:tag", "localhost:5000/a/b:tag"),
        ("quay.io/library/x", "quay.io/library/x:latest"),
        (f"alpine@{DIGEST}", f"alpine@{DIGEST}"),
    ],
)
def test_familiar_is_dockers_short_form(text: str, familiar: str) -> None:
    assert Reference.parse(text).familiar == familiar


def test_familiar_name_has_no_tag() -> None:
    assert Reference.parse("alpine:3").familiar_name == "alpine"


def test_parse_of_canonical_and_familiar_round_trips() -> None:
    for text in ["alpine", f"user/app:1@{DIGEST}", "localhost:5000/a/b:tag", "[::1]:5000/r"]:
        ref = Reference.parse(text)
        assert Reference.parse(str(ref)) == ref
        assert Reference.parse(ref.familiar) == ref


def test_api_reference_is_tag_or_digest() -> None:
    assert Reference.parse("alpine:3.19").api_reference == "3.19"
    assert Reference.parse(f"alpine@{DIGEST}").api_reference == DIGEST


def test_api_reference_without_tag_or_digest_raises() -> None:
    ref = Reference.parse("alpine", default_tag=None)
    with pytest.raises(InvalidReference, match="neither a tag nor a digest"):
        _ = ref.api_reference


def test_endpoint_host() -> None:
    assert Reference.parse("alpine").endpoint_host == "registry-1.docker.io"
    assert Reference.parse("localhost:5000/x").endpoint_host == "localhost:5000"
    assert Reference.parse("ghcr.io/o/r").endpoint_host == "ghcr.io"


def test_with_tag_with_digest_without_digest() -> None:
    d = Digest.parse(DIGEST)
    ref = Reference.parse("alpine:3")
    assert ref.with_tag("edge").tag == "edge"
    pinned = ref.with_digest(d)
    assert (pinned.tag, pinned.digest) == ("3", d)
    assert pinned.with_tag("4").digest == d  # like docker's WithTag
    assert pinned.without_digest() == ref
    assert ref.with_digest(d).without_digest().with_tag("x").api_reference == "x"


def test_with_tag_validates() -> None:
    with pytest.raises(InvalidReference, match='invalid tag "bad tag"'):
        Reference.parse("alpine").with_tag("bad tag")


def test_direct_construction_is_validated() -> None:
    with pytest.raises(InvalidReference, match="repository name must be lowercase"):
        Reference("docker.io", "Library/alpine", "latest", None)


def test_references_are_hashable_values() -> None:
    assert Reference.parse("alpine") == Reference.parse("docker.io/library/alpine:latest")
    assert len({Reference.parse("alpine"), Reference.parse("index.docker.io/alpine")}) == 1
