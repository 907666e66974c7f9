"""Which snapshots a retention policy keeps, and why — a pure plan.

Two rule forms, a snapshot being kept when any rule keeps it (as zrepl's keep
rules combine):

- a grid, in zrepl's notation: ``1x1h(keep=all) | 24x1h | 14x1d | 12x1M``.
  Intervals are laid end to end going back from the newest snapshot (not from
  the wall clock: a VM whose pushes stopped keeps its history instead of
  ageing out); in each interval the ``keep`` oldest snapshots stay (default
  1), so a snapshot kept as the hour's representative stays that hour's as
  time passes; anything older than the whole grid goes.
- counts per level, in sanoid's spirit: ``{hourly = 24, daily = 14}`` keeps
  the newest N of each level.

Whatever the rules say, these are never deleted (each with its reason): a
snapshot still arriving (incomplete); the newest complete one (the base of the
next incremental); snapshots pinned by the caller (a pending push's base, a
restore or a move in progress); snapshots the policy did not make (no level in
their name: an operator's ``snapper push`` is the operator's to delete).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from snapper_zone.policy.durations import format_duration, parse_duration

__all__ = ["Grid", "Interval", "Retention", "RetentionError", "Snap", "Verdict",
           "plan_prune"]


class RetentionError(ValueError):
    """A retention rule that cannot be used, with the reason."""


@dataclass(frozen=True)
class Snap:
    """One snapshot of a VM as retention sees it."""

    name: str
    created: float  # POSIX seconds
    complete: bool = True
    level: str | None = None  # the policy level that made it; None: made by hand


@dataclass(frozen=True)
class Verdict:
    name: str
    keep: bool
    reason: str


@dataclass(frozen=True)
class Interval:
    """``count`` intervals of ``length`` seconds, keeping the ``keep`` oldest in each."""

    count: int
    length: int
    keep: int | None = 1  # None: all

    def __str__(self) -> str:
        keep = "" if self.keep == 1 else f"(keep={'all' if self.keep is None else self.keep})"
        return f"{self.count}x{format_duration(self.length)}{keep}"


_INTERVAL = re.compile(r"([1-9][0-9]{0,5})x([0-9]+[smhdwMy])(?:\(keep=(all|[1-9][0-9]{0,5})\))?")


@dataclass(frozen=True)
class Grid:
    intervals: tuple[Interval, ...]

    @classmethod
    def parse(cls, text: str) -> Grid:
        out = []
        for part in text.split("|"):
            m = _INTERVAL.fullmatch(part.strip())
            if m is None:
                raise RetentionError(
                    f"grid interval {part.strip()!r}: write COUNTxLENGTH[(keep=N|all)], "
                    "e.g. 24x1h or 1x1h(keep=all)")
            try:
                length = parse_duration(m.group(2))
            except ValueError as e:
                raise RetentionError(f"grid interval {part.strip()!r}: {e}") from e
            keep = None if m.group(3) == "all" else int(m.group(3) or 1)
            out.append(Interval(int(m.group(1)), length, keep))
        return cls(tuple(out))

    @property
    def span(self) -> int:
        return sum(i.count * i.length for i in self.intervals)

    def __str__(self) -> str:
        return " | ".join(str(i) for i in self.intervals)

    def keeps(self, snaps: Sequence[Snap]) -> dict[str, str]:
        """name -> reason, for the snapshots the grid keeps (``snaps`` complete)."""
        if not snaps:
            return {}
        now = max(s.created for s in snaps)
        buckets: dict[tuple[int, int], list[Snap]] = {}
        for s in snaps:
            age = now - s.created
            start = 0.0
            for i, iv in enumerate(self.intervals):
                end = start + iv.count * iv.length
                if age < end:
                    buckets.setdefault((i, int((age - start) // iv.length)), []).append(s)
                    break
                start = end
        kept: dict[str, str] = {}
        for (i, n), members in buckets.items():
            iv = self.intervals[i]
            members.sort(key=lambda s: (s.created, s.name))
            for s in members if iv.keep is None else members[:iv.keep]:
                kept[s.name] = f"grid: {iv} interval {n + 1} of {iv.count}"
        return kept


@dataclass(frozen=True)
class Retention:
    grid: Grid | None = None
    counts: Mapping[str, int] = field(default_factory=dict)  # level -> newest N kept

    def __post_init__(self) -> None:
        if self.grid is None and not self.counts:
            raise RetentionError("a retention needs a grid or counts per level")
        for level, n in self.counts.items():
            if n < 1:
                raise RetentionError(f"keep {level} = {n}: keep at least 1 "
                                     "(leave the level out to keep none by count)")


def plan_prune(snaps: Sequence[Snap], retention: Retention, *,
               pinned: Mapping[str, str] | None = None) -> list[Verdict]:
    """A verdict for every snapshot in ``snaps`` (same order): keep or delete, and why.

    ``pinned``: name -> why something else needs it now.
    """
    pinned = pinned or {}
    reasons: dict[str, str] = {}
    complete = [s for s in snaps if s.complete]
    ours = [s for s in complete if s.level is not None]
    if complete:
        newest = max(complete, key=lambda s: (s.created, s.name))
        reasons[newest.name] = "newest complete snapshot: the base of the next incremental"
    rule_kept: dict[str, str] = {}
    if retention.grid is not None:
        rule_kept.update(retention.grid.keeps(ours))
    for level, n in retention.counts.items():
        of_level = sorted((s for s in ours if s.level == level),
                          key=lambda s: (s.created, s.name), reverse=True)
        for s in of_level[:n]:
            rule_kept.setdefault(s.name, f"one of the {n} newest {level}")
    out = []
    for s in snaps:
        if not s.complete:
            out.append(Verdict(s.name, True, "incomplete: still arriving"))
        elif s.name in pinned:
            out.append(Verdict(s.name, True, f"pinned: {pinned[s.name]}"))
        elif s.name in reasons:
            out.append(Verdict(s.name, True, reasons[s.name]))
        elif s.level is None:
            out.append(Verdict(s.name, True, "not made by a policy (delete it by hand)"))
        elif s.name in rule_kept:
            out.append(Verdict(s.name, True, rule_kept[s.name]))
        else:
            why = []
            if retention.grid is not None:
                why.append(f"outside the grid {retention.grid}" if
                           (max(x.created for x in ours) - s.created) >= retention.grid.span
                           else f"not the oldest in its interval of the grid {retention.grid}")
            if s.level in retention.counts:
                why.append(f"beyond the {retention.counts[s.level]} newest {s.level}")
            elif retention.counts:
                why.append(f"no count kept for level {s.level}")
            out.append(Verdict(s.name, False, "; ".join(why)))
    return out
