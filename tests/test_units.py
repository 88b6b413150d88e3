"""Human sizes (`--memory-limit 512MiB`): parsed to bytes, formatted back."""

from __future__ import annotations

import pytest

from edgecluster.units import format_bytes, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("1000000", 1_000_000),
        ("512MiB", 512 << 20),
        ("512mib", 512 << 20),
        ("2GiB", 2 << 30),
        ("1.5G", 1_500_000_000),
        ("1.5GB", 1_500_000_000),
        ("1.5GiB", 3 << 29),
        ("64k", 64_000),
        ("64KiB", 64 << 10),
        ("3 MB", 3_000_000),
        ("  7b  ", 7),
        ("1TiB", 1 << 40),
        ("2t", 2_000_000_000_000),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", "MiB", "-1GiB", "1.5.2G", "12 parsecs", "1e9", "GiB1", "1 2", "0x10"]
)
def test_unreadable_sizes_say_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError, match=r"cannot read size .*512MiB, 2GiB"):
        parse_size(text)


@pytest.mark.parametrize(
    ("num_bytes", "expected"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (512 << 20, "512.0 MiB"),
        (3 << 29, "1.5 GiB"),
        (5 << 40, "5.0 TiB"),
        (5 << 50, "5120.0 TiB"),
    ],
)
def test_format_bytes(num_bytes: int, expected: str) -> None:
    assert format_bytes(num_bytes) == expected


def test_formatted_sizes_parse_back_close_to_the_original() -> None:
    for num_bytes in (1 << 10, 3 << 20, 7 << 30):
        text = format_bytes(num_bytes).replace(" ", "")
        assert parse_size(text) == num_bytes
