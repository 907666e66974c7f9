"""When a snapshot level is due: an interval, or a cron line — pure, UTC.

``every = "1h"`` runs at multiples of the interval since the epoch (so every
CN's hourly lands on the hour and a restart does not shift it); ``cron =
"0 3 * * *"`` is the classic five fields (minute hour day-of-month month
day-of-week, ``*``, lists, ranges and ``/step``; day-of-month and day-of-week
combine as in cron: either matches when both are restricted). Times are POSIX
seconds; everything is computed in UTC, so daylight saving never skips or
doubles a run.
"""

from __future__ import annotations

import calendar
import datetime as dt
import re
from dataclasses import dataclass
from typing import Protocol

from snapper_zone.policy.durations import parse_duration

__all__ = ["Cron", "Interval", "Schedule", "ScheduleError", "parse_schedule"]


class ScheduleError(ValueError):
    """A schedule that cannot be used, with the reason."""


class Schedule(Protocol):
    def next_after(self, t: float) -> float:
        """The first run strictly after ``t``."""
        ...

    def last_at_or_before(self, t: float) -> float:
        """The latest run at or before ``t`` (what a late agent catches up on)."""
        ...


@dataclass(frozen=True)
class Interval:
    seconds: int

    def __post_init__(self) -> None:
        if self.seconds < 60:
            raise ScheduleError("an interval must be at least 1m")

    def next_after(self, t: float) -> float:
        return float((int(t // self.seconds) + 1) * self.seconds)

    def last_at_or_before(self, t: float) -> float:
        return float(int(t // self.seconds) * self.seconds)

    def __str__(self) -> str:
        return f"every {self.seconds}s"


# (name, lowest, highest) of the five fields
_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12),
           ("day of week", 0, 7))
_NAMES = {"jan": 1, "feb": 2, "mar": 3, "apr": 4, "may": 5, "jun": 6, "jul": 7, "aug": 8,
          "sep": 9, "oct": 10, "nov": 11, "dec": 12,
          "sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_ITEM = re.compile(r"(\*|[0-9a-z]+(?:-[0-9a-z]+)?)(?:/([0-9]+))?")


def _value(text: str, name: str, lo: int, hi: int) -> int:
    v = _NAMES.get(text) if not text.isdigit() else int(text)
    if v is None or not lo <= v <= hi:
        raise ScheduleError(f"{name}: {text!r} is not in {lo}..{hi}")
    return v


def _field(text: str, name: str, lo: int, hi: int) -> frozenset[int]:
    out: set[int] = set()
    for item in text.lower().split(","):
        m = _ITEM.fullmatch(item)
        if m is None:
            raise ScheduleError(f"{name}: cannot read {item!r}")
        span, step_text = m.groups()
        step = int(step_text) if step_text else 1
        if step < 1:
            raise ScheduleError(f"{name}: a step must be at least 1")
        if span == "*":
            a, b = lo, hi
        elif "-" in span:
            x, y = span.split("-")
            a, b = _value(x, name, lo, hi), _value(y, name, lo, hi)
            if a > b:
                raise ScheduleError(f"{name}: range {span!r} runs backwards")
        else:
            a = _value(span, name, lo, hi)
            b = hi if step_text else a
        out.update(range(a, b + 1, step))
    return frozenset(out)


@dataclass(frozen=True)
class Cron:
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday (7 folded into 0)
    days_any: bool  # day-of-month was "*"
    weekdays_any: bool
    text: str

    @classmethod
    def parse(cls, text: str) -> Cron:
        parts = text.split()
        if len(parts) != 5:
            raise ScheduleError(f"a cron line has 5 fields (minute hour day month weekday), "
                                f"not {len(parts)}: {text!r}")
        sets = [_field(p, *f) for p, f in zip(parts, _FIELDS, strict=True)]
        weekdays = frozenset(d % 7 for d in sets[4])
        c = cls(sets[0], sets[1], sets[2], sets[3], weekdays,
                parts[2] == "*", parts[4] == "*", text)
        # A line that can never fire (30 February) would make the agent wait forever.
        if c.days_any or not c.weekdays_any:
            return c
        if not any(d <= _MONTH_DAYS[m] for m in c.months for d in c.days):
            raise ScheduleError(f"{text!r} never fires (no month has those days)")
        return c

    def _day_ok(self, d: dt.date) -> bool:
        dom = d.day in self.days
        dow = (d.isoweekday() % 7) in self.weekdays
        if self.days_any and self.weekdays_any:
            return True
        if self.days_any:
            return dow
        if self.weekdays_any:
            return dom
        return dom or dow  # cron's rule: both restricted means either

    def matches(self, t: float) -> bool:
        u = dt.datetime.fromtimestamp(t, dt.UTC)
        return (u.second == 0 and u.minute in self.minutes and u.hour in self.hours
                and u.month in self.months and self._day_ok(u.date()))

    def _times_on(self, d: dt.date) -> list[int]:
        base = calendar.timegm(d.timetuple())
        return [base + h * 3600 + m * 60 for h in sorted(self.hours) for m in sorted(self.minutes)]

    def next_after(self, t: float) -> float:
        d = dt.datetime.fromtimestamp(t, dt.UTC).date()
        # 8 years cover every (day, weekday, leap year) combination.
        for _ in range(8 * 366 + 1):
            if d.month in self.months and self._day_ok(d):
                for s in self._times_on(d):
                    if s > t:
                        return float(s)
            d += dt.timedelta(days=1)
        raise ScheduleError(f"{self.text!r} never fires")

    def last_at_or_before(self, t: float) -> float:
        d = dt.datetime.fromtimestamp(t, dt.UTC).date()
        for _ in range(8 * 366 + 1):
            if d.month in self.months and self._day_ok(d):
                for s in reversed(self._times_on(d)):
                    if s <= t:
                        return float(s)
            d -= dt.timedelta(days=1)
        raise ScheduleError(f"{self.text!r} never fires")

    def __str__(self) -> str:
        return f"cron {self.text!r}"


_MONTH_DAYS = {1: 31, 2: 29, 3: 31, 4: 30, 5: 31, 6: 30, 7: 31, 8: 31, 9: 30, 10: 31,
               11: 30, 12: 31}


def parse_schedule(every: str | None, cron: str | None) -> Interval | Cron:
    """Exactly one of ``every`` (a duration, at least 1m) or ``cron``."""
    if (every is None) == (cron is None):
        raise ScheduleError("give exactly one of 'every' or 'cron'")
    if every is not None:
        try:
            return Interval(parse_duration(every))
        except ValueError as e:
            raise ScheduleError(str(e)) from e
    assert cron is not None
    return Cron.parse(cron)
