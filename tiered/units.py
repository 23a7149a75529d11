"""Sizes, rates and durations as tiered prints them: in decimal units (a megabyte is 10**6
bytes, as the config's ``*_mb_per_s`` settings count), one format everywhere (the status
table, the logs, ``tiered advise``)."""

from __future__ import annotations


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def human_rate(bytes_per_second: float) -> str:
    """A rate that keeps its digits for small steps (``640 KB/s``, not ``0 MB/s``)."""
    for unit, size in (("GB/s", 1e9), ("MB/s", 1e6), ("KB/s", 1e3)):
        if bytes_per_second >= size:
            value = bytes_per_second / size
            return f"{value:.0f} {unit}" if value >= 10 else f"{value:.1f} {unit}"
    return f"{bytes_per_second:.0f} B/s"


def human_duration(seconds: float | None) -> str:
    """``45s``, ``12m``, ``6.0h``, ``7.0d``: short enough for a table column."""
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"
