"""Sizes in bytes: ``"4GiB"`` and friends, both ways."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int | float) -> int:
    """Bytes from ``"4GiB"``, ``"512MB"``, ``"1.5G"`` or a plain number; ValueError says what is accepted."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 4GiB or a number of bytes, got {value!r}")
    if isinstance(value, int | float):
        if not 0 <= value < 2**63:
            raise ValueError(f"a size must be between 0 and 8 EiB, got {value!r}")
        return int(value)
    match = _SIZE.match(str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"expected a size such as 4GiB, 512MB or a number of bytes, got {value!r}")
    size = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not size < 2**63:
        raise ValueError(f"size {value!r} is too large (at most 8 EiB)")
    return int(size)


def parse_share(value: str, total: int) -> int:
    """Bytes from ``"5%"`` (of ``total``) or a size (``"2GiB"``); ``""`` is 0. ValueError otherwise."""
    text = str(value).strip()
    if not text:
        return 0
    if text.endswith("%"):
        share = float(text[:-1])
        if not 0 <= share <= 100:
            raise ValueError(f"{value!r}: a share is from 0% to 100%")
        return int(total * share / 100)
    return parse_size(text)


def format_size(n: int | float | None) -> str:
    """``25769803776`` -> ``"24.0GiB"``."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}TiB"


__all__ = ["format_duration", "format_size", "parse_share", "parse_size"]


def format_duration(seconds: float) -> str:
    """``850 ms``, ``42.5s``, ``54m 12s``, ``3h 05m``, ``2d 4h``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"
