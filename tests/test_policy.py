"""Policies, pure: schedules, retention plans, the policy file, base choice.

No I/O: every rule is checked against a brute-force reference or an invariant
over generated histories (hypothesis).
"""

from __future__ import annotations

import calendar
import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from snapper_zone.cn.cli import slowest
from snapper_zone.common.config import ConfigError
from snapper_zone.common.durations import format_duration
from snapper_zone.policy import (
    Cron,
    Grid,
    Interval,
    Retention,
    Snap,
    level_of,
    load_policies,
    parse_duration,
    parse_policies,
    plan_prune,
    snapshot_name,
    time_of,
)
from snapper_zone.policy.retention import RetentionError
from snapper_zone.policy.schedule import ScheduleError

REPO = Path(__file__).resolve().parent.parent
VM = "74c59c61-4559-4ca2-b1ef-0ca22f2f9300"
H, D = 3600, 86400
T0 = calendar.timegm((2026, 12, 1, 18, 7, 30))
times = st.integers(0, 4_000_000_000).map(float)


def utc(*args: int) -> float:
    return float(calendar.timegm((*args, 0, 0, 0, 0, 0, 0)[:6]))


# -- durations ------------------------------------------------------------------------


@given(st.integers(1, 10**6), st.sampled_from("smhdwMy"))
def test_duration_round_trip(n: int, unit: str) -> None:
    secs = parse_duration(f"{n}{unit}")
    assert parse_duration(format_duration(secs)) == secs


@pytest.mark.parametrize("bad", ["", "0h", "1", "h", "1.5h", "-1h", "1 hour", "1H", "01h"])
def test_bad_durations_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(bad)


# -- schedules ------------------------------------------------------------------------


@given(times, st.sampled_from([60, 900, H, 6 * H, D, 7 * D]))
def test_interval_runs_at_multiples(t: float, seconds: int) -> None:
    iv = Interval(seconds)
    nxt, last = iv.next_after(t), iv.last_at_or_before(t)
    assert nxt % seconds == 0 and last % seconds == 0
    assert last <= t < nxt == last + seconds


def _brute_next(c: Cron, t: float, limit: int) -> float | None:
    m = (int(t) // 60 + 1) * 60
    for _ in range(limit):
        if c.matches(m):
            return float(m)
        m += 60
    return None


minutes_field = st.one_of(st.just("*"), st.integers(0, 59).map(str),
                          st.integers(1, 30).map(lambda s: f"*/{s}"),
                          st.lists(st.integers(0, 59), min_size=1, max_size=4, unique=True)
                          .map(lambda xs: ",".join(map(str, xs))))
hours_field = st.one_of(st.just("*"), st.integers(0, 23).map(str),
                        st.tuples(st.integers(0, 23), st.integers(0, 23))
                        .map(lambda p: f"{min(p)}-{max(p)}"),
                        st.integers(1, 12).map(lambda s: f"*/{s}"))


@settings(max_examples=150)
@given(minutes_field, hours_field, times)
@example("0", "3", utc(2026, 12, 1, 3, 0))  # exactly on a run: the next is tomorrow's
def test_daily_cron_matches_a_minute_by_minute_search(mins: str, hours: str, t: float) -> None:
    c = Cron.parse(f"{mins} {hours} * * *")
    want = _brute_next(c, t, 24 * 60 + 1)  # fires every day: found within a day
    assert want is not None
    assert c.next_after(t) == want
    last = c.last_at_or_before(t)
    assert last <= t and c.matches(last) and c.next_after(last) > last
    assert c.next_after(last) >= c.next_after(t) or c.next_after(last) > t


@settings(max_examples=100)
@given(st.lists(st.integers(1, 31), min_size=1, max_size=3, unique=True),
       st.lists(st.integers(0, 6), min_size=1, max_size=2, unique=True),
       st.booleans(), st.booleans(), times)
def test_day_rules_follow_cron(days: list[int], weekdays: list[int], any_day: bool,
                               any_weekday: bool, t: float) -> None:
    dom = "*" if any_day else ",".join(map(str, days))
    dow = "*" if any_weekday else ",".join(map(str, weekdays))
    c = Cron.parse(f"30 2 {dom} * {dow}")
    nxt = c.next_after(t)
    assert nxt > t and c.matches(nxt)
    # No run was skipped: every day in between fails the day rule (cron's either-or).
    d = dt.datetime.fromtimestamp(t, dt.UTC).date()
    end = dt.datetime.fromtimestamp(nxt, dt.UTC).date()
    while d < end:
        run = calendar.timegm(d.timetuple()) + 2 * H + 30 * 60
        if run > t:
            dom_ok = any_day or d.day in days
            dow_ok = any_weekday or (d.isoweekday() % 7) in weekdays
            fires = (dom_ok and dow_ok) if (any_day or any_weekday) else (dom_ok or dow_ok)
            assert not fires, d
        d += dt.timedelta(days=1)


def test_cron_examples() -> None:
    monthly = Cron.parse("0 3 1 * *")
    assert monthly.next_after(utc(2026, 12, 1, 3, 0)) == utc(2027, 1, 1, 3, 0)
    assert monthly.last_at_or_before(utc(2026, 12, 15, 0, 0)) == utc(2026, 12, 1, 3, 0)
    assert Cron.parse("0 0 29 2 *").next_after(utc(2026, 3, 1, 0, 0)) == utc(2028, 2, 29, 0, 0)
    weekdays = Cron.parse("0 9 * * mon-fri")
    assert weekdays.next_after(utc(2026, 12, 4, 10, 0)) == utc(2026, 12, 7, 9, 0)  # Fri -> Mon
    assert Cron.parse("0 0 * * 7").weekdays == Cron.parse("0 0 * * sun").weekdays == {0}


@pytest.mark.parametrize("line, word", [
    ("0 3 * *", "5 fields"), ("60 * * * *", "minute"), ("* 24 * * *", "hour"),
    ("* * 0 * *", "day of month"), ("* * * 13 *", "month"), ("* * * * 8", "day of week"),
    ("5-1 * * * *", "backwards"), ("*/0 * * * *", "step"), ("0 0 30 2 *", "never fires"),
    ("x * * * *", "minute"), ("1,,2 * * * *", "minute"),
])
def test_bad_cron_lines_say_why(line: str, word: str) -> None:
    with pytest.raises(ScheduleError, match=word):
        Cron.parse(line)


def test_interval_under_a_minute_is_refused() -> None:
    with pytest.raises(ScheduleError, match="at least 1m"):
        Interval(30)


# -- retention ------------------------------------------------------------------------


@pytest.mark.parametrize("text, norm", [
    ("1x1h(keep=all) | 24x1h | 14x1d | 12x1M", "1x1h(keep=all) | 24x1h | 14x1d | 12x1M"),
    ("24x60m|7x24h", "24x1h | 7x1d"), ("4x1w(keep=2)", "4x1w(keep=2)"),
])
def test_grid_parses_and_prints(text: str, norm: str) -> None:
    assert str(Grid.parse(text)) == norm
    assert Grid.parse(norm) == Grid.parse(text)


@pytest.mark.parametrize("bad", ["", "24", "0x1h", "24x", "24x1h(keep=0)", "24x1h | ", "ax1h",
                                 "24x1q", "24x1h(keep=some)"])
def test_bad_grids_say_how_to_write_one(bad: str) -> None:
    with pytest.raises(RetentionError, match=r"COUNTxLENGTH|not a duration"):
        Grid.parse(bad)


def hourly(n: int, start: float = T0) -> list[Snap]:
    return [Snap(snapshot_name("hourly", start + i * H), start + i * H, level="hourly")
            for i in range(n)]


def test_grid_example_keeps_one_per_interval() -> None:
    snaps = hourly(72)  # three days of hourlies
    plan = plan_prune(snaps, Retention(Grid.parse("1x1h(keep=all) | 24x1h | 1x1d")))
    kept = [v.name for v in plan if v.keep]
    # the newest, 24 hourly intervals behind it, and one for the day before those
    assert len(kept) == 1 + 24 + 1
    assert kept[-1] == snaps[-1].name
    gone = [v for v in plan if not v.keep]
    assert all("grid" in v.reason for v in gone)
    assert any("outside the grid" in v.reason for v in gone)


def test_counts_keep_the_newest_of_each_level() -> None:
    daily = [Snap(snapshot_name("daily", T0 - i * D), T0 - i * D, level="daily") for i in range(10)]
    snaps = hourly(30) + daily
    plan = {v.name: v for v in plan_prune(snaps, Retention(counts={"hourly": 5, "daily": 3}))}
    assert sum(v.keep for n, v in plan.items() if level_of(n) == "daily") == 3
    assert sum(v.keep for n, v in plan.items() if level_of(n) == "hourly") == 5
    assert "beyond the 3 newest daily" in plan[daily[-1].name].reason


snap_lists = st.lists(
    st.tuples(st.integers(0, 90 * D), st.sampled_from(["hourly", "daily", None]), st.booleans()),
    max_size=40, unique_by=lambda x: x[0],
).map(lambda xs: [Snap(snapshot_name(lv, T0 + t) if lv else f"manual-{t}", T0 + t,
                       complete=c or i % 7 != 0, level=lv)
                  for i, (t, lv, c) in enumerate(xs)])
retentions = st.one_of(
    st.sampled_from(["1x1h(keep=all) | 24x1h | 14x1d", "2x1d(keep=3)", "1x1w", "6x4h | 4x1w"])
    .map(lambda g: Retention(Grid.parse(g))),
    st.fixed_dictionaries({"hourly": st.integers(1, 5), "daily": st.integers(1, 3)})
    .map(lambda c: Retention(counts=c)))


@settings(max_examples=300)
@given(snap_lists, retentions, st.data())
def test_prune_never_deletes_what_is_needed(snaps: list[Snap], ret: Retention,
                                            data: st.DataObject) -> None:
    pinned = {s.name: "a restore" for s in data.draw(st.lists(st.sampled_from(snaps)))
              } if snaps else {}
    plan = plan_prune(snaps, ret, pinned=pinned)
    assert [v.name for v in plan] == [s.name for s in snaps]
    keep = {v.name for v in plan if v.keep}
    complete = [s for s in snaps if s.complete]
    for s in snaps:
        if not s.complete or s.level is None or s.name in pinned:
            assert s.name in keep, s
    if complete:
        assert max(complete, key=lambda s: (s.created, s.name)).name in keep
    assert all(v.reason for v in plan)
    # Pruning again what was kept deletes nothing more: the plan is stable.
    again = plan_prune([s for s in snaps if s.name in keep], ret, pinned=pinned)
    assert all(v.keep for v in again)
    # More pins never delete more.
    fewer = plan_prune(snaps, ret)
    assert keep >= {v.name for v in fewer if v.keep}


def test_the_grids_anchor_stays_so_a_second_pass_agrees() -> None:
    """Found by hypothesis: with a hand-made snapshot newer than the policy's, the
    policy's newest is not "the newest complete"; were it let go (not the oldest
    of its interval), the next pass would lay the grid out anew and delete more."""
    snaps = [Snap(snapshot_name("hourly", T0 + 2), T0 + 2, level="hourly"),
             Snap(snapshot_name("hourly", T0), T0, level="hourly"),
             Snap(snapshot_name("hourly", T0 + 14400), T0 + 14400, level="hourly"),
             Snap("manual-14401", T0 + 14401)]
    ret = Retention(Grid.parse("6x4h | 4x1w"))
    plan = plan_prune(snaps, ret)
    kept = [s for s, v in zip(snaps, plan, strict=True) if v.keep]
    assert "grid counts back from it" in plan[2].reason
    assert all(v.keep for v in plan_prune(kept, ret))


# -- the policy file and the base -----------------------------------------------------


def test_example_policy_file_parses() -> None:
    ps = load_policies(REPO / "etc" / "policy.example.toml")
    default = ps.for_vm(VM)
    assert default is not None and default.name == "default"
    assert [lv.name for lv in default.levels] == ["monthly", "daily", "hourly"]
    crit = ps.for_vm(VM, tags={"backup": "critical"})
    assert crit is not None and crit.name == "critical"


def policy_doc(**over: Any) -> dict[str, Any]:
    p: dict[str, Any] = {"name": "p", "vms": ["*"], "retention": {"grid": "24x1h"},
                         "level": [{"name": "daily", "cron": "0 3 * * *"},
                                   {"name": "hourly", "every": "1h", "base": "newest"}]}
    p.update(over)
    return {"policy": [p]}


@pytest.mark.parametrize("over, field, word", [
    ({"vms": ["nope"]}, "policy[0].vms", "uuid"),
    ({"vms": []}, "policy[0]", "names no VM"),
    ({"durability": "triple"}, "policy[0].durability", "one of"),
    ({"bwlimit": "fast"}, "policy[0].bwlimit", ""),
    ({"bwlimit": 0}, "policy[0].bwlimit", ""),
    ({"retention": {}}, "policy[0].retention", "grid or counts"),
    ({"retention": {"grid": "24"}}, "policy[0].retention.grid", "COUNTxLENGTH"),
    ({"retention": {"keep": {"weekly": 2}}}, "policy[0].retention.keep.weekly", "unknown"),
    ({"retention": {"keep": {"daily": 0}}}, "policy[0].retention.keep.daily", "at least 1"),
    ({"level": []}, "policy[0].level", "at least one"),
    ({"level": [{"name": "Daily", "every": "1d"}]}, "policy[0].level[0].name", "lower-case"),
    ({"level": [{"name": "d", "every": "1d", "cron": "0 0 * * *"}]}, "policy[0].level[0].cron",
     "exactly one"),
    ({"level": [{"name": "d", "every": "1 day"}]}, "policy[0].level[0].every", "duration"),
    ({"level": [{"name": "d", "every": "1d", "base": ["weekly"]}]}, "policy[0].level[0].base",
     "only 'newest'"),
    ({"level": [{"name": "d", "every": "1d", "base": "full"}]}, "policy[0].level[0].base",
     "live pool"),
    ({"level": [{"name": "d", "every": "1d", "bsae": "full"}]}, "policy[0].level[0].bsae",
     "did you mean 'base'"),
    ({"retnetion": {}}, "policy[0].retnetion", "did you mean 'retention'"),
])
def test_bad_policies_name_the_field(over: dict[str, Any], field: str, word: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_policies(policy_doc(**over), "p.toml")
    assert e.value.field == field and word in e.value.message


def test_a_policy_paces_its_pushes() -> None:
    assert parse_policies(policy_doc(bwlimit="50M"), "p.toml").policies[0].bwlimit == 50 << 20
    assert parse_policies(policy_doc(bwlimit=1000), "p.toml").policies[0].bwlimit == 1000
    assert parse_policies(policy_doc(), "p.toml").policies[0].bwlimit is None
    # The CN's own cap and the policy's: the lower holds.
    assert slowest(None, None) is None and slowest(10.0, None) == 10.0
    assert slowest(None, 5.0) == 5.0 and slowest(10.0, 5.0) == 5.0


def test_most_specific_policy_wins() -> None:
    level = [{"name": "h", "every": "1h"}]
    doc = {"policy": [
        {"name": "all", "vms": ["*"], "retention": {"grid": "1x1d"}, "level": level},
        {"name": "cn", "cns": ["cn7"], "retention": {"grid": "1x1d"}, "level": level},
        {"name": "tag", "tags": ["tier=gold"], "retention": {"grid": "1x1d"}, "level": level},
        {"name": "vm", "vms": [VM], "retention": {"grid": "1x1d"}, "level": level}]}
    ps = parse_policies(doc)
    other = "74c59c61-4559-4ca2-b1ef-0ca22f2f9301"
    assert ps.for_vm(VM, "cn7", {"tier": "gold"}).name == "vm"  # type: ignore[union-attr]
    assert ps.for_vm(other, "cn7", {"tier": "gold"}).name == "tag"  # type: ignore[union-attr]
    assert ps.for_vm(other, "cn7").name == "cn"  # type: ignore[union-attr]
    assert ps.for_vm(other, "cn1").name == "all"  # type: ignore[union-attr]
    only_tags = parse_policies({"policy": [doc["policy"][2]]})
    assert only_tags.for_vm(other) is None


def test_due_levels_and_catch_up() -> None:
    p = parse_policies(policy_doc()).policies[0]
    at3 = utc(2026, 12, 2, 3, 0)
    assert [lv.name for lv in p.due({}, at3)] == ["daily", "hourly"]  # first run: all
    ran = {"daily": at3, "hourly": at3}
    assert p.due(ran, at3 + 59 * 60) == ()
    assert [lv.name for lv in p.due(ran, at3 + H)] == ["hourly"]
    # Down for two days: one catch-up of each, not 48 hourlies.
    late = at3 + 2 * D + 30 * 60
    assert [lv.name for lv in p.due(ran, late)] == ["daily", "hourly"]
    assert p.next_run(at3) == at3 + H


@given(st.sampled_from(["hourly", "daily", "m1"]), times)
def test_snapshot_names_carry_their_level(level: str, t: float) -> None:
    name = snapshot_name(level, t)
    assert level_of(name) == level and len(name) < 64
    assert time_of(name) == float(int(t))
    assert level_of(name.replace("snapper-", "snap-")) is None
