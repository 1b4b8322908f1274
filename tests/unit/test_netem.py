import pytest

from imagefs.registry.netem import parse_rate


@pytest.mark.parametrize(
    "text,expected",
    [
        ("100mbit", 12.5e6),
        ("8bit", 1.0),
        ("12.5MB/s", 12.5e6),
        ("1gbit", 125e6),
        ("500kbit", 62.5e3),
        ("1000", 125.0),
    ],
)
def test_rates(text: str, expected: float) -> None:
    assert parse_rate(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["fast", "-1mbit", "0mbit", ""])
def test_bad_rates(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rate(text)
