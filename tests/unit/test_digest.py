import hashlib

import pytest

from imagefs.errors import IntegrityError, InvalidReference
from imagefs.oci.digest import Digest

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_parse_sha256_round_trips() -> None:
    d = Digest.parse(f"sha256:{EMPTY_SHA256}")
    assert d == Digest("sha256", EMPTY_SHA256)
    assert str(d) == f"sha256:{EMPTY_SHA256}"


def test_parse_sha512() -> None:
    hex_ = hashlib.sha512(b"").hexdigest()
    d = Digest.parse(f"sha512:{hex_}")
    assert (d.algorithm, d.hex) == ("sha512", hex_)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("sha256:abc", "want 64 lowercase hex characters"),
        (f"sha256:{EMPTY_SHA256.upper()}", "want 64 lowercase hex characters"),
        (f"sha256:{EMPTY_SHA256}00", "want 64 lowercase hex characters"),
        (f"sha256:{'g' * 64}", "want 64 lowercase hex characters"),
        (f"sha512:{EMPTY_SHA256}", "want 128 lowercase hex characters"),
        (f"md5:{EMPTY_SHA256}", 'unsupported algorithm "md5"'),
        (f"SHA256:{EMPTY_SHA256}", 'unsupported algorithm "SHA256"'),
        (EMPTY_SHA256, "want algorithm:hex"),
        ("", "want algorithm:hex"),
    ],
)
def test_parse_rejects_with_a_message_naming_the_digest(text: str, problem: str) -> None:
    with pytest.raises(InvalidReference) as info:
        Digest.parse(text)
    assert str(info.value).startswith(f'invalid digest "{text}": ')
    assert problem in str(info.value)


def test_brief_example_message() -> None:
    with pytest.raises(InvalidReference, match=r'^invalid digest "sha256:abc": want 64 lowercase'):
        Digest.parse("sha256:abc")


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(InvalidReference):
        Digest("sha256", "abc")


def test_of_is_sha256_of_the_bytes() -> None:
    assert Digest.of(b"") == Digest("sha256", EMPTY_SHA256)
    assert Digest.of(b"hello").hex == hashlib.sha256(b"hello").hexdigest()


def test_of_sha512() -> None:
    assert Digest.of(b"x", "sha512").hex == hashlib.sha512(b"x").hexdigest()


def test_short_is_first_twelve_hex() -> None:
    assert Digest.of(b"").short == "e3b0c44298fc"


def test_new_hasher_matches_algorithm_and_starts_fresh() -> None:
    d = Digest.of(b"abc", "sha512")
    h = d.new_hasher()
    assert h.name == "sha512"
    h.update(b"abc")
    assert h.hexdigest() == d.hex


def test_verify_accepts_matching_data_and_size() -> None:
    Digest.of(b"hello").verify(b"hello")
    Digest.of(b"hello").verify(b"hello", size=5)


def test_verify_names_expected_and_actual_digest() -> None:
    expected = Digest.of(b"hello")
    actual = Digest.of(b"jello")
    with pytest.raises(IntegrityError) as info:
        expected.verify(b"jello")
    message = str(info.value)
    assert f"expected {expected}" in message
    assert f"got {actual}" in message


def test_verify_names_size_mismatch() -> None:
    d = Digest.of(b"hello")
    with pytest.raises(IntegrityError, match=r"expected 4 bytes, got 5 bytes") as info:
        d.verify(b"hello", size=4)
    assert str(d) in str(info.value)


def test_digests_are_hashable_values() -> None:
    assert len({Digest.of(b"a"), Digest.of(b"a"), Digest.of(b"b")}) == 2
