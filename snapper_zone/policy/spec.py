"""The policy file: which VMs, how often, kept how long.

One TOML file (``etc/policy.example.toml`` documents every field)::

    [[policy]]
    name = "default"
    vms = ["*"]                       # VM uuids, or "*"; also cns = [...], tags = ["k=v"]
    durability = "mirrored"
    bwlimit = "50M"                   # bytes/s for this policy's pushes (optional)
    retention = { grid = "1x1h(keep=all) | 24x1h | 14x1d", keep = { monthly = 12 } }

    [[policy.level]]                  # coarsest first
    name = "monthly"
    cron = "0 3 1 * *"

    [[policy.level]]
    name = "hourly"
    every = "1h"

Every snapshot is sent from the newest one the zone holds: on the zones' live
pool a stream can only be received on top of the newest snapshot, and each
snapshot there is whole by itself, so levels differ in schedule and
retention, not in base (``base = "newest"`` is accepted, nothing else).

A VM gets the most specific policy that names it: by VM uuid, else by tag,
else by CN, else ``"*"`` (ties: the first in the file). When several of its
levels are due at once, one snapshot is taken, of the first listed (the
coarsest): it serves as the finer levels' run too. An agent that was down
catches up with one snapshot, not one per missed run.

Snapshots the agent takes are named ``snapper-<level>-<UTC time>``
(``snapper-hourly-20261201T180000Z``): the level and the scheduled time are
read back from the name, so retention needs no state of its own.
"""

from __future__ import annotations

import calendar
import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from snapper_zone.common.config import ConfigError, FieldParser, read_document
from snapper_zone.errors import SnapperError
from snapper_zone.policy.retention import Grid, Retention, RetentionError
from snapper_zone.policy.schedule import Cron, Interval, ScheduleError, parse_schedule

__all__ = ["InvalidPolicy", "Level", "Policy", "PolicySet", "check_policy_document",
           "check_policy_name", "level_of", "load_policies", "parse_policies",
           "snapshot_name", "time_of"]

DURABILITIES = ("mirrored", "local")
_LEVEL_RE = re.compile(r"[a-z][a-z0-9]{0,15}")
_NAME_RE = re.compile(r"snapper-([a-z][a-z0-9]{0,15})-([0-9]{8}T[0-9]{6}Z)")
_UUID_RE = re.compile(r"[0-9a-f]{8}-(?:[0-9a-f]{4}-){3}[0-9a-f]{12}")
# A policy document's name in the coordinator's registry (a path component there).
_POLICY_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


class InvalidPolicy(SnapperError):
    """A policy document (or its name) the registry refuses; ``field`` names the
    part at fault (``policy[0].level[1].every``), "" for the whole."""

    code = "InvalidPolicy"
    http_status = 422

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


def check_policy_name(name: object) -> str:
    """A registry policy's name: 1-64 of a-z 0-9 . _ -, starting with a letter or digit."""
    if not isinstance(name, str) or not _POLICY_NAME_RE.fullmatch(name):
        raise InvalidPolicy(f"policy name {str(name)[:80]!r}: 1-64 of a-z 0-9 . _ -, "
                            "starting with a letter or digit", "name")
    return name


def check_policy_document(doc: object, name: str) -> PolicySet:
    """The registry's copy checked as the file is (``parse_policies``): an
    ``InvalidPolicy`` naming the field."""
    try:
        return parse_policies(doc, f"policy {name}")
    except ConfigError as e:
        raise InvalidPolicy(str(e), e.field) from e


def snapshot_name(level: str, t: float) -> str:
    """The name the agent gives a ``level`` snapshot taken at ``t`` (UTC, to the second)."""
    stamp = dt.datetime.fromtimestamp(int(t), dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"snapper-{level}-{stamp}"


def level_of(name: str) -> str | None:
    """The level a policy snapshot's name carries; None for any other name."""
    m = _NAME_RE.fullmatch(name)
    return m.group(1) if m else None


def time_of(name: str) -> float | None:
    """The scheduled time a policy snapshot's name carries (retention counts from
    it, not from when the push happened to run); None for any other name."""
    m = _NAME_RE.fullmatch(name)
    if m is None:
        return None
    try:
        stamp = dt.datetime.strptime(m.group(2), "%Y%m%dT%H%M%SZ")
    except ValueError:  # 20261399T...: the shape of a stamp, not a time
        return None
    return float(calendar.timegm(stamp.timetuple()))


@dataclass(frozen=True)
class Level:
    name: str
    schedule: Interval | Cron


@dataclass(frozen=True)
class Policy:
    name: str
    vms: frozenset[str]  # uuids, or {"*"}
    cns: frozenset[str]
    tags: frozenset[tuple[str, str]]
    levels: tuple[Level, ...]
    retention: Retention
    durability: str = "mirrored"
    bwlimit: float | None = None  # bytes/s for its pushes; None: as fast as allowed

    def level(self, name: str) -> Level:
        return next(lv for lv in self.levels if lv.name == name)

    def due(self, last: Mapping[str, float], now: float) -> tuple[Level, ...]:
        """The levels due now, given when each last ran; () when nothing is.

        A level is due when its latest scheduled time at or before ``now`` is
        after its last run. The agent takes one snapshot, of the first (the
        coarsest), and records ``now`` as the run of every level returned."""
        return tuple(lv for lv in self.levels
                     if lv.schedule.last_at_or_before(now) > last.get(lv.name, float("-inf")))

    def next_run(self, now: float) -> float:
        """When something is due next after ``now`` (the agent sleeps until then)."""
        return min(lv.schedule.next_after(now) for lv in self.levels)

    def specificity(self, vm: str, cn: str | None, tags: Mapping[str, str]) -> int:
        """How specifically this policy names the VM (0: not at all)."""
        if vm in self.vms:
            return 4
        if any(tags.get(k) == v for k, v in self.tags):
            return 3
        if cn is not None and cn in self.cns:
            return 2
        return 1 if "*" in self.vms else 0


@dataclass(frozen=True)
class PolicySet:
    policies: tuple[Policy, ...]

    def for_vm(self, vm: str, cn: str | None = None,
               tags: Mapping[str, str] | None = None) -> Policy | None:
        """The VM's policy: the most specific match, the first in the file on a tie."""
        best: tuple[int, Policy] | None = None
        for p in self.policies:
            s = p.specificity(vm, cn, tags or {})
            if s and (best is None or s > best[0]):
                best = (s, p)
        return best[1] if best else None


def load_policies(path: str | Path) -> PolicySet:
    """A policy file (TOML, or JSON by its suffix) with the one config loader."""
    return parse_policies(read_document(path), str(path))


def parse_policies(data: object, source: str = "<policy>") -> PolicySet:
    """Every field checked; a ConfigError names the file and the field (an unknown
    one suggests the field meant): ``common/config.FieldParser``'s checks."""
    return _Reader(source).policy_set(data)


class _Reader(FieldParser):
    def strings(self, fld: str, value: object) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
            raise self.err(fld, "must be a list of non-empty strings")
        return cast(list[str], value)

    def policy_set(self, data: object) -> PolicySet:
        top = self.table("", data, ("policy",))
        raw = top.get("policy", [])
        if not isinstance(raw, list) or not raw:
            raise self.err("policy", "give at least one [[policy]]")
        policies = tuple(self.policy(f"policy[{i}]", p) for i, p in enumerate(raw))
        names = [p.name for p in policies]
        for i, n in enumerate(names):
            if n in names[:i]:
                raise self.err(f"policy[{i}].name", f"{n!r} is used twice")
        return PolicySet(policies)

    def policy(self, fld: str, value: object) -> Policy:
        t = self.table(fld, value, ("name", "vms", "cns", "tags", "level", "retention",
                                    "durability", "bwlimit"))
        if "name" not in t:
            raise self.err(f"{fld}.name", "missing required field")
        name = self.string(f"{fld}.name", t["name"])
        vms = self.strings(f"{fld}.vms", t.get("vms", []))
        for v in vms:
            if v != "*" and not _UUID_RE.fullmatch(v):
                raise self.err(f"{fld}.vms", f"{v!r} is neither a VM uuid (lower case) nor '*'")
        cns = self.strings(f"{fld}.cns", t.get("cns", []))
        tags = []
        for tag in self.strings(f"{fld}.tags", t.get("tags", [])):
            k, eq, v = tag.partition("=")
            if not eq or not k:
                raise self.err(f"{fld}.tags", f"{tag!r}: write key=value")
            tags.append((k, v))
        if not (vms or cns or tags):
            raise self.err(fld, "names no VM: give vms (or '*'), cns or tags")
        durability = t.get("durability", "mirrored")
        if durability not in DURABILITIES:
            raise self.err(f"{fld}.durability", f"one of {', '.join(DURABILITIES)}")
        raw_levels = t.get("level", [])
        if not isinstance(raw_levels, list) or not raw_levels:
            raise self.err(f"{fld}.level", "give at least one [[policy.level]]")
        levels = tuple(self.level(f"{fld}.level[{i}]", lv) for i, lv in enumerate(raw_levels))
        known = [lv.name for lv in levels]
        for i, lv in enumerate(levels):
            if lv.name in known[:i]:
                raise self.err(f"{fld}.level[{i}].name", f"{lv.name!r} is used twice")
        if "retention" not in t:
            raise self.err(f"{fld}.retention", "missing required field")
        retention = self.keep(f"{fld}.retention", t["retention"], known)
        bwlimit = float(self.size(f"{fld}.bwlimit", t["bwlimit"], lo=1)) \
            if "bwlimit" in t else None
        return Policy(name, frozenset(vms), frozenset(cns), frozenset(tags), levels, retention,
                      str(durability), bwlimit)

    def level(self, fld: str, value: object) -> Level:
        t = self.table(fld, value, ("name", "every", "cron", "base"))
        if "name" not in t:
            raise self.err(f"{fld}.name", "missing required field")
        name = self.string(f"{fld}.name", t["name"])
        if not _LEVEL_RE.fullmatch(name):
            raise self.err(f"{fld}.name", "lower-case letters and digits, 1-16, "
                           "starting with a letter (it goes into snapshot names)")
        every, cron = t.get("every"), t.get("cron")
        if every is not None:
            every = self.string(f"{fld}.every", every)
        if cron is not None:
            cron = self.string(f"{fld}.cron", cron)
        try:
            schedule = parse_schedule(every, cron)
        except ScheduleError as e:
            raise self.err(f"{fld}.{'cron' if cron is not None else 'every'}", str(e)) from e
        if t.get("base", "newest") != "newest":
            # RFD 148's "daily from the monthly" fits stream files in an object
            # store. On a live pool a stream is received on top of the dataset's
            # newest snapshot; one from an older snapshot needs `zfs receive -F`,
            # which destroys every newer snapshot on the zone.
            raise self.err(f"{fld}.base", "only 'newest': the zones keep a live pool, "
                           "where a snapshot can only be received on top of the newest "
                           "one (from an older one, zfs receive would have to destroy "
                           "the newer ones); each snapshot there is whole by itself, so "
                           "levels differ in schedule and retention, not in base")
        return Level(name, schedule)

    def keep(self, fld: str, value: object, levels: Sequence[str]) -> Retention:
        t = self.table(fld, value, ("grid", "keep"))
        grid = None
        if "grid" in t:
            try:
                grid = Grid.parse(self.string(f"{fld}.grid", t["grid"]))
            except RetentionError as e:
                raise self.err(f"{fld}.grid", str(e)) from e
        counts: dict[str, int] = {}
        keep = self.table(f"{fld}.keep", t.get("keep", {}), levels)
        for level, n in keep.items():
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise self.err(f"{fld}.keep.{level}", "a count of at least 1")
            counts[level] = n
        try:
            return Retention(grid, counts)
        except RetentionError as e:
            raise self.err(fld, str(e)) from e
