"""Sizes as people type them (512M, 4G, 1.5GiB, 10%) and the budget rule."""

from __future__ import annotations

import re

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")

# With no VMKV_BUDGET, the first instance on a device sets the budget to this share of
# the memory that is free at that moment, leaving room for activations and other users.
DEFAULT_FREE_SHARE = 0.9


def parse_size(text: str, total: int | None = None) -> int:
    """Bytes from "512M", "4G", "1.5GiB", "4096" or, when ``total`` is given, "10%"."""
    if match := _PERCENT.match(text):
        if total is None:
            raise ValueError(f"{text!r} is a percentage, but there is no total to take it of")
        value = float(match.group(1))
        if not 0 < value <= 100:
            raise ValueError(f"{text!r}: a percentage must be in (0, 100]")
        return int(total * value / 100)
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size (examples: 512M, 4G, 1.5GiB, 10%)")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise ValueError(f"{text!r}: a size must be positive")
    return value


def named_size(name: str, text: str, total: int | None = None) -> int:
    """:func:`parse_size` of the setting ``name`` (VMKV_MIN, ...): its errors name it."""
    try:
        return parse_size(text, total)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def format_size(value: int) -> str:
    for unit, scale in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value}B"


def budget_bytes(setting: str | None, total_bytes: int, free_bytes: int) -> int:
    """The device budget: VMKV_BUDGET as a size or a percentage of the device's total
    memory, or, when unset, DEFAULT_FREE_SHARE of the memory free right now."""
    if setting:
        return named_size("VMKV_BUDGET", setting, total_bytes)
    return int(free_bytes * DEFAULT_FREE_SHARE)
