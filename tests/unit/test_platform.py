import pytest

from imagefs.errors import UsageError
from imagefs.oci.platform import Platform


def test_parse_and_str() -> None:
    p = Platform.parse("linux/arm64/v8")
    assert p == Platform("linux", "arm64", "v8")
    assert str(p) == "linux/arm64/v8"
    assert str(Platform.parse("linux/amd64")) == "linux/amd64"


def test_parse_lowercases_like_containerd() -> None:
    assert Platform.parse("Linux/AMD64") == Platform("linux", "amd64")


@pytest.mark.parametrize("text", ["linux", "", "linux/", "/amd64", "linux/arm/v7/extra", "a//b"])
def test_parse_rejects_bad_forms_naming_them(text: str) -> None:
    with pytest.raises(UsageError) as info:
        Platform.parse(text)
    assert f'invalid platform "{text}"' in str(info.value)
    assert "os/architecture[/variant]" in str(info.value)


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        ("x86_64", "linux/amd64"),
        ("aarch64", "linux/arm64/v8"),
        ("arm64", "linux/arm64/v8"),
        ("armv7l", "linux/arm/v7"),
        ("armv6l", "linux/arm/v6"),
        ("i686", "linux/386"),
        ("ppc64le", "linux/ppc64le"),
        ("s390x", "linux/s390x"),
        ("riscv64", "linux/riscv64"),
        ("sparc64", "linux/sparc64"),  # unknown machines pass through
    ],
)
def test_host_maps_uname_machine(machine: str, expected: str) -> None:
    assert str(Platform.host(machine=machine, system="Linux")) == expected


def test_host_without_arguments_describes_this_machine() -> None:
    p = Platform.host()
    assert p.os and p.architecture
    assert p.os == p.os.lower()


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("linux/arm64", "linux/arm64/v8"),
        ("linux/aarch64", "linux/arm64"),
        ("linux/arm64/8", "linux/arm64/v8"),
        ("linux/arm", "linux/arm/v7"),
        ("linux/armhf", "linux/arm/v7"),
        ("linux/armel", "linux/arm/v6"),
        ("linux/amd64/v1", "linux/amd64"),
        ("linux/x86_64", "linux/amd64"),
        ("linux/i386", "linux/386"),
        ("macos/arm64", "darwin/arm64"),
    ],
)
def test_aliases_match_both_ways(a: str, b: str) -> None:
    pa, pb = Platform.parse(a), Platform.parse(b)
    assert pa.matches(pb)
    assert pb.matches(pa)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("linux/arm64", "linux/amd64"),
        ("linux/arm/v7", "linux/arm/v6"),
        ("linux/arm64", "linux/arm/v8"),
        ("linux/amd64", "windows/amd64"),
        ("linux/amd64", "linux/amd64/v2"),
        ("linux/arm64/v8", "linux/arm64/v9"),
    ],
)
def test_different_platforms_do_not_match(a: str, b: str) -> None:
    assert not Platform.parse(a).matches(Platform.parse(b))


def test_matches_ignores_os_version() -> None:
    win = Platform("windows", "amd64", os_version="10.0.20348.2227")
    assert win.matches(Platform("windows", "amd64"))


def test_normalized_forms() -> None:
    assert Platform.parse("linux/aarch64/v8").normalized() == Platform("linux", "arm64")
    assert Platform.parse("linux/arm").normalized() == Platform("linux", "arm", "v7")
    assert Platform.parse("linux/amd64/v1").normalized() == Platform("linux", "amd64")


def test_match_rank_prefers_exact_then_nearest_older_variant() -> None:
    v7 = Platform.parse("linux/arm/v7")
    assert v7.match_rank(Platform.parse("linux/arm/v7")) == 0
    assert v7.match_rank(Platform.parse("linux/arm/v6")) == 1
    assert v7.match_rank(Platform.parse("linux/arm/v5")) == 2
    assert v7.match_rank(Platform.parse("linux/arm/v8")) is None  # newer: may not run
    v3 = Platform.parse("linux/amd64/v3")
    assert v3.match_rank(Platform.parse("linux/amd64/v2")) == 1
    assert v3.match_rank(Platform.parse("linux/amd64")) == 2
    assert Platform.parse("linux/amd64").match_rank(Platform.parse("linux/amd64/v3")) is None
    assert v7.match_rank(Platform.parse("linux/arm64")) is None
