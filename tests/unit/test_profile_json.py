"""A prefetch profile is untrusted when it comes from a registry (`profile push` / mount
`--prefetch REF`): anything but a well-formed one is a one-line UsageError."""

from __future__ import annotations

import json

import pytest

from imagefs.errors import UsageError
from imagefs.profiles import VERSION, FileReads, Profile


def _doc(**files: object) -> bytes:
    entry = {"path": "etc/motd", "layer": 0, "ranges": [[0, 10]], **files}
    return json.dumps(
        {"version": VERSION, "image": "i", "layers": ["l"], "files": [entry]}
    ).encode()


def test_a_profile_round_trips() -> None:
    profile = Profile("i", ("l",), (FileReads("etc/motd", 0, ((0, 10),)),))
    assert Profile.from_json(profile.to_json()) == profile
    assert Profile.from_json(_doc()) == profile


@pytest.mark.parametrize(
    "bad",
    [
        _doc(layer="x"),
        _doc(ranges=[[0]]),
        _doc(ranges=5),
        # json.loads takes NaN and Infinity: int() of them must not escape as a crash
        _doc().replace(b'"layer": 0', b'"layer": Infinity'),
        _doc().replace(b'"layer": 0', b'"layer": NaN'),
        _doc().replace(b"[[0, 10]]", b"[[-Infinity, 10]]"),
        b"[]",
        b"not json",
        b"[" * 20_000 + b"]" * 20_000,
    ],
)
def test_a_bad_profile_is_a_usage_error(bad: bytes) -> None:
    with pytest.raises(UsageError, match="is not an imagefs prefetch profile"):
        Profile.from_json(bad, "the profile")
