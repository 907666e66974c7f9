"""Durations as policies write them: ``90s``, ``10m``, ``1h``, ``1d``, ``1w``, ``1M``, ``1y``.

``M`` is 30 days and ``y`` 365 days: retention buckets are fixed lengths (as
zrepl's grid); calendar months belong in a cron schedule (``0 3 1 * *``).
"""

from __future__ import annotations

import re

__all__ = ["UNITS", "format_duration", "parse_duration"]

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "M": 30 * 86400,
         "y": 365 * 86400}
_RE = re.compile(r"([1-9][0-9]{0,8})([smhdwMy])")


def parse_duration(text: str) -> int:
    """Seconds in ``text``; ValueError naming the grammar otherwise."""
    m = _RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a duration (a positive number and one of "
                         f"{' '.join(UNITS)}: 90s, 10m, 1h, 1d, 1w, 1M = 30d, 1y = 365d)")
    return int(m.group(1)) * UNITS[m.group(2)]


def format_duration(seconds: int) -> str:
    """In the largest exact unit: parsing the result gives ``seconds`` back."""
    for unit, size in sorted(UNITS.items(), key=lambda u: -u[1]):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
