"""Byte sizes as operators type them, one convention everywhere: every suffix is binary.

`4G`, `4GB` and `4GiB` all mean 4 × 2³⁰ bytes, whether the option is `bundle create --max-part-size` or
`plan --memory`: memory and FAT32's limit are counted in powers of two, and one rule is easier to remember than two.
"""

from __future__ import annotations

import re

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(?:i?B)?|B)?\s*", re.IGNORECASE)
_UNITS = {None: 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}

HELP = "binary units: 4G = 4GiB = 4 × 2³⁰ bytes; K, M, G, T; a plain number is bytes"
"""What a `--help` line says about every size option."""


class SizeError(ValueError):
    """A size that does not parse, or is not positive."""


def parse_size(text: str) -> int:
    """`24GiB`, `512M`, `1.5G`, `64K`, `4096` → bytes (binary suffixes).

    Raises:
        SizeError: not a size, or not at least one byte.
    """
    match = _SIZE.fullmatch(text)
    if not match:
        raise SizeError(f"{text!r} is not a size like 24GiB, 512M, 64K or a number of bytes ({HELP})")
    number, unit = match.groups()
    value = int(float(number) * _UNITS[unit.upper() if unit else None])
    if value < 1:
        raise SizeError(f"{text!r} is not a positive size")
    return value


def format_size(value: float) -> str:
    """`1.5 GiB`, `512 B`: binary units, one decimal."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
