"""Byte counts for messages: `human(3 * 2**30)` is "3.0 GB"."""

from __future__ import annotations


def human(n: float) -> str:
    """`n` bytes in the largest unit that keeps it at or above 1 (binary units, one decimal)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"
