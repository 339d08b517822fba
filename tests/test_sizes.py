"""One size convention for every option: binary suffixes, whether the size is a part on a USB stick or host memory."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sealbox.runtime.sizes import GiB, MiB, SizeError, format_size, parse_size

SEALBOX = [sys.executable, "-c", "from sealbox.cli import main; main()"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4G", 4 * GiB), ("4GB", 4 * GiB), ("4GiB", 4 * GiB), ("512M", 512 * MiB), ("512 MiB", 512 * MiB),
     ("64K", 65536), ("2kib", 2048), ("1.5G", 3 * GiB // 2), ("4096", 4096), ("4096B", 4096)],
)  # fmt: skip
def test_every_suffix_is_binary(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["0", "0.1B", "-1G", "4X", "lots", "24 gigs", ""])
def test_a_size_that_does_not_parse_or_is_not_positive_names_the_text(text: str) -> None:
    with pytest.raises(SizeError, match=repr(text).replace("(", r"\(").replace(".", r"\.")):
        parse_size(text)


def test_sizes_print_in_binary_units() -> None:
    assert format_size(3 * GiB) == "3.0 GiB"
    assert format_size(512) == "512 B"
    assert format_size(1536) == "1.5 KiB"


@pytest.mark.parametrize("command", [["bundle", "create", "--help"], ["plan", "--help"]])
def test_each_size_option_says_its_units_in_help(command: list[str]) -> None:
    result = subprocess.run([*SEALBOX, *command], capture_output=True, text=True, timeout=60,
                            env={"COLUMNS": "400", "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "4G = 4GiB" in result.stdout
