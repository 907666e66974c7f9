"""The soak tier (issue 6): load and faults against a real local fleet, then invariants.

The pure parts (the seeded schedule, the invariant checks over recorded data)
are tested here without any I/O; the soak itself is marked ``soak`` and runs
with ``make test-soak`` (``pytest -m soak``), its length from
``SNAPPER_SOAK_SECONDS`` (default 120).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapper_zone.fleet.local import LocalFleet, LocalZone
from snapper_zone.fleet.sshd import sshd_path
from snapper_zone.fleet.zookeeper import LocalZooKeeper
from soak import invariants, report
from soak.driver import Soak, SoakConfig, run_soak
from soak.faults import (
    AGENT_KINDS,
    COORDINATOR_KINDS,
    FAULTS,
    MIN_ACTIVE,
    STATIC_KINDS,
    active_zones,
    make_schedule,
    replace_pool,
)
from soak.records import (
    AgentRun,
    DeleteRecord,
    FaultRecord,
    PartialState,
    PushRecord,
    RestoreRecord,
    RssSample,
)
from tests.conftest import ZfsTier

A, B, C = "a" * 8 + "-zone", "b" * 8 + "-zone", "c" * 8 + "-zone"
VM = "11111111-2222-3333-4444-555555555555"
G1 = {"root": 1, "disk0": 2}
G2 = {"root": 3, "disk0": 4}

# -- the schedule -------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 1 << 31), duration=st.floats(30, 3600),
       coordinator=st.booleans(), zones=st.integers(3, 5))
def test_schedule_is_a_function_of_its_seed(seed: int, duration: float, coordinator: bool,
                                            zones: int) -> None:
    kinds = COORDINATOR_KINDS if coordinator else STATIC_KINDS
    s = make_schedule(seed, duration, kinds, zones=zones)
    assert s == make_schedule(seed, duration, kinds, zones=zones)  # replayable
    assert len(s) >= 6
    assert {f.kind for f in s} == set(kinds)  # every kind, at least once
    assert all(f.kind in FAULTS for f in s)
    times = [f.at for f in s]
    assert times == sorted(times)
    assert all(0.1 * duration <= t <= 0.65 * duration for t in times)
    assert min(active_zones(s, zones)) >= min(MIN_ACTIVE, zones)


def test_different_seeds_give_different_schedules() -> None:
    assert make_schedule(1, 300, STATIC_KINDS) != make_schedule(2, 300, STATIC_KINDS)


def test_schedule_text_names_seed_and_every_fault() -> None:
    s = make_schedule(7, 120, STATIC_KINDS)
    text = report.schedule_text(7, s)
    assert "seed 7" in text and "--seed 7" in text
    assert all(f.kind in text for f in s)


# -- the invariants over recorded data ----------------------------------------------------


def _push(snap: str, zones: list[str], guids: dict[str, int], durability: str = "mirrored",
          t: float = 1.0, check: str = "ok") -> PushRecord:
    return PushRecord("cn0", VM, snap, t, True, durability, zones, guids,
                      ack_check={z: check for z in zones})


holdings_st = st.dictionaries(
    st.sampled_from([A, B, C]),
    st.dictionaries(st.sampled_from(["s1", "s2"]), st.sampled_from([G1, G2])), max_size=3)


@settings(max_examples=300, deadline=None)
@given(held=holdings_st, static=st.booleans())
def test_copies_check_agrees_with_its_definition(held: dict[str, dict[str, dict[str, int]]],
                                                 static: bool) -> None:
    acked = {(VM, "s1"): _push("s1", [A, B], G1)}
    problems = invariants.copies_problems(acked, {VM: held}, exact=True, static_pairs=static)
    holders = [z for z, snaps in held.items() if "s1" in snaps]
    good = [z for z in holders if held[z]["s1"] == G1]
    want_ok = len(good) == 2 and len(holders) == 2 and (not static or set(good) == {A, B})
    assert (not problems) == want_ok


def test_mirrored_ack_on_one_zone_fails_and_local_loss_is_excused() -> None:
    acked = {(VM, "s1"): _push("s1", [A, B], G1),
             (VM, "s2"): _push("s2", [C], G2, durability="local", t=5.0)}
    held = {VM: {A: {"s1": G1}}}
    probs = invariants.copies_problems(acked, held, exact=True, static_pairs=True,
                                       losses={C: 9.0})
    assert any("s1" in p for p in probs)
    assert not any("s2" in p for p in probs)  # local, only on C, and C was destroyed later
    probs = invariants.copies_problems(acked, held, exact=True, static_pairs=True,
                                       losses={C: 1.0})  # destroyed before the ack: no excuse
    assert any("s2" in p for p in probs)


def test_wrong_guid_is_a_problem_even_with_two_good_copies() -> None:
    acked = {(VM, "s1"): _push("s1", [A, B], G1)}
    held = {VM: {A: {"s1": G1}, B: {"s1": G1}, C: {"s1": G2}}}
    probs = invariants.copies_problems(acked, held, exact=False, static_pairs=False)
    assert probs and "guids" in probs[0]


def test_deleted_snapshots_are_not_expected_and_must_stay_gone() -> None:
    pushes = [_push("s1", [A, B], G1), _push("s2", [A, B], G2)]
    deletes = [DeleteRecord(VM, "s1", 3.0, A, ok=True)]
    assert set(invariants.stored(pushes, deletes)) == {(VM, "s2")}
    back = invariants.check_deletes(deletes, {VM: {A: {"s1": G1}}})
    assert not back.ok
    assert invariants.check_deletes(deletes, {VM: {A: {"s2": G2}}}).ok


@settings(max_examples=200, deadline=None)
@given(seen=st.lists(st.sampled_from(["ok", "unreachable", "missing or incomplete",
                                      "guid-mismatch", "moved: on 0000aaaa, 0000bbbb"]),
                     min_size=2, max_size=2),
       durability=st.sampled_from(["mirrored", "local"]))
def test_ack_check_fails_exactly_when_a_named_zone_lacked_it(seen: list[str],
                                                             durability: str) -> None:
    p = _push("s1", [A, B], G1, durability=durability)
    p.ack_check = dict(zip([A, B], seen, strict=True))
    ok = invariants.check_acks([p]).ok
    # "moved": the copy left by a move after the ack, and both placed zones hold it
    assert ok == all(s in ("ok", "unreachable") or s.startswith("moved: ") for s in seen)


def test_ack_seen_says_what_differs() -> None:
    assert invariants.ack_seen(None, G1) == "missing or incomplete"
    assert invariants.ack_seen(dict(G1), G1) == "ok"
    assert invariants.ack_seen({"root": 1}, G1) == "guid-mismatch: disk0 lacking"
    assert invariants.ack_seen({"root": 1, "disk0": 9}, G1) == "guid-mismatch: disk0 9 != 2"


def test_partial_state_and_restores_and_rss() -> None:
    clean = {VM: {A: PartialState(), B: PartialState([], [("s9", 2000)])}}
    assert invariants.check_partial(clean, settled_at=1000).ok  # newer than the settle time
    dirty = {VM: {A: PartialState(["disk0"], []), B: PartialState([], [("s1", 10)])}}
    assert len(invariants.check_partial(dirty, settled_at=1000).detail) == 2
    good = [RestoreRecord(VM, "s1", 1, A, True, True, final=True),
            RestoreRecord(VM, "s2", 1, A, False, None, "zone down")]  # during a fault: allowed
    assert invariants.check_restores(good).ok
    assert not invariants.check_restores(
        [*good, RestoreRecord(VM, "s1", 2, B, True, False, final=True)]).ok
    assert not invariants.check_restores(good[1:]).ok  # no final sample at all
    before = [RssSample("zone0", 1, 100_000)]
    assert invariants.check_rss(before, [RssSample("zone0", 2, 150_000)]).ok
    assert not invariants.check_rss(before, [RssSample("zone0", 1, 300_000)]).ok


def test_fault_check_counts_kinds_and_losses() -> None:
    recs = [FaultRecord(k, 1, 1, 2) for k in ("truncate", "fill-pool", "kill-restart")]
    assert not invariants.check_faults(recs, min_faults=3, min_kinds=4).ok
    recs.append(FaultRecord("replace-zone", 1, 1, 2, error="not back to two copies in time"))
    assert not invariants.check_faults(recs, min_faults=3, min_kinds=3).ok
    recs[-1].error = ""
    assert invariants.check_faults(recs, min_faults=4, min_kinds=4).ok


def test_parse_inventory() -> None:
    doc = {"snapshots": [
        {"name": "s1", "complete": True, "created": 5,
         "datasets": {"root": {"guid": "1"}, "disk0": {"guid": "2"}}},
        {"name": "s2", "complete": False, "created": 6, "datasets": {"root": {"guid": "3"}}}],
        "datasets": {"root": {"resume_token": None}, "disk0": {"resume_token": "1-abc"}}}
    complete, partial = invariants.parse_inventory(doc)
    assert complete == {"s1": G1}
    assert partial.incomplete == [("s2", 6)] and partial.resume_tokens == ["disk0"]


def test_evidence_shows_the_snapshot_the_vms_moves_and_which_zone_is_which(
        tmp_path: Path) -> None:
    vm, other = "b8c5034a-8ae6-485e-9d2d-0ceefb994043", "11111111-0000-4000-8000-000000000000"
    (tmp_path / "zone1").mkdir()
    (tmp_path / "zone1" / "snapperd.json").write_text(json.dumps({"uuid": "d4479ad5-x"}))

    def line(t: int, msg: str, level: int = 30, **extra: Any) -> str:
        return json.dumps({"level": level, "time": f"T{t:03d}", "msg": msg, **extra}) + "\n"

    (tmp_path / "zone1" / "snapperd.log").write_text("".join([
        line(1, "transfer end", vm=vm, snapshot="s00007"),
        line(2, "transfer end", vm=vm, snapshot="s00008"),  # another snapshot: not shown
        line(3, "dropped VM copy", vm=vm),  # the copy as a whole: shown
        line(4, "[conn=1, chan=2] Command: receive " + vm + " root s00007",
             component="asyncssh"),  # ssh's own line: not shown
        line(5, "receive failed", level=50, vm=vm),  # an error about the VM: shown
        line(6, "dropped VM copy", vm=other)]))
    doc = {"invariants": [{"ok": False, "detail": [f"{vm[:8]}@s00007 (mirrored) on d4479ad5"]}]}
    text = report.evidence(doc, tmp_path)
    assert text.splitlines()[0] == "zones: zone1=d4479ad5"
    shown = [ln.split()[0] for ln in text.splitlines()[2:]]
    assert shown == ["T001", "T003", "T005"], text
    again = [line(9, "reconcile failed", level=40, vm=vm, error="NeedsOperator"),
             line(10, "transfer end", vm=vm, snapshot="s00007"),
             line(11, "reconcile failed", level=40, vm=vm, error="NeedsOperator")]
    (tmp_path / "zone1" / "snapperd.log").write_text("".join(again))
    assert report.evidence(doc, tmp_path).splitlines()[2:] == [
        'T009 zone1: reconcile failed {"vm": "' + vm + '", "error": "NeedsOperator"} '
        "[x2, last T011]",
        'T010 zone1: transfer end {"vm": "' + vm + '", "snapshot": "s00007"}']
    many = "".join(line(i, "transfer end", vm=vm, snapshot=f"s00007 #{i}")
                   for i in range(100))
    (tmp_path / "zone1" / "snapperd.log").write_text(many)
    cut = report.evidence(doc, tmp_path, head=3, tail=4).splitlines()[2:]
    assert [ln.split()[0] for ln in cut] == ["T000", "T001", "T002", "[...",
                                             "T096", "T097", "T098", "T099"]


# -- the soak on a real fleet ---------------------------------------------------------------


# What the CI soaks inject: every static-pair fault; with a coordinator, also add,
# drain and lose a zone, and kill the coordinator.
CI_KINDS = STATIC_KINDS


def _failure(doc: dict[str, Any], config: SoakConfig) -> str:
    """The summary, and the daemons' log lines about what failed (CI keeps no files)."""
    return report.summary(doc) + "\n" + report.evidence(doc, config.workdir)


def _seconds() -> float:
    return float(os.environ.get("SNAPPER_SOAK_SECONDS", "120"))


@pytest.mark.soak
@pytest.mark.zfs
async def test_soak_static_pairs(zfs_tier: ZfsTier, tmp_path: Path) -> None:
    seed = int(os.environ.get("SNAPPER_SOAK_SEED", "20261127"))
    config = SoakConfig(duration=_seconds(), seed=seed, cns=2, zones=3,
                        workdir=tmp_path / "soak", settle_timeout=150, fault_kinds=CI_KINDS)
    print(report.schedule_text(seed, config.make_schedule(), CI_KINDS))
    result = await run_soak(config)
    doc = report.write(result, tmp_path / "soak-report.json")
    print(report.summary(doc))
    assert doc["faults"]["injected"] >= 6 and len(doc["faults"]["by_kind"]) >= 4
    assert result.passed, _failure(doc, config)


@pytest.mark.soak
@pytest.mark.zfs
async def test_soak_static_pairs_through_the_gates(zfs_tier: ZfsTier, tmp_path: Path) -> None:
    """The same load and faults with every zone behind its own OpenSSH sshd gate:
    the CNs' pushes and restores and the zones' pipelined mirrors go through the
    gates (min_bytes 0), a truncated push over snapper's own channel."""
    if sshd_path() is None or shutil.which("ssh") is None:
        pytest.skip("needs OpenSSH's sshd and ssh (apt-get install openssh-server)")
    seed = int(os.environ.get("SNAPPER_SOAK_SEED", "20261127"))
    config = SoakConfig(duration=_seconds(), seed=seed, cns=2, zones=3, gates=True,
                        workdir=tmp_path / "soak", settle_timeout=150, fault_kinds=CI_KINDS)
    print(report.schedule_text(seed, config.make_schedule(), CI_KINDS))
    result = await run_soak(config)
    doc = report.write(result, tmp_path / "soak-report.json")
    print(report.summary(doc))
    logins = sum(log.read_text().count("Accepted publickey")
                 for log in config.workdir.glob("zone*/gate_sshd.log"))
    assert logins >= len(result.pushes), f"{logins} logins through the gates"
    assert result.passed, _failure(doc, config)


@pytest.mark.soak
@pytest.mark.zfs
async def test_soak_with_a_coordinator(zfs_tier: ZfsTier, tmp_path: Path) -> None:
    """Seed 3 is the schedule that found the lose-zone-then-replace-zone bugs
    (pending parts that never ended, a move dropping the copy an ack named)."""
    seed = int(os.environ.get("SNAPPER_SOAK_COORDINATOR_SEED", "3"))
    config = SoakConfig(duration=_seconds(), seed=seed, cns=2, zones=3, coordinator=True,
                        workdir=tmp_path / "soak", settle_timeout=150)
    print(report.schedule_text(seed, config.make_schedule(), config.kinds()))
    result = await run_soak(config)
    doc = report.write(result, tmp_path / "soak-report.json")
    print(report.summary(doc))
    kinds = set(doc["faults"]["by_kind"])
    assert {"add-zone", "drain-zone", "lose-zone", "kill-coordinator"} <= kinds, kinds
    assert result.passed, _failure(doc, config)


@pytest.mark.soak
@pytest.mark.zfs
async def test_soak_with_three_coordinators_on_zookeeper(
        zfs_tier: ZfsTier, tmp_path: Path, zookeeper: LocalZooKeeper) -> None:
    """The same load and faults with three coordinators on one ZooKeeper chroot;
    kill-coordinator SIGKILLs whichever leads, so a follower takes over."""
    seed = int(os.environ.get("SNAPPER_SOAK_COORDINATOR_SEED", "3"))
    config = SoakConfig(duration=_seconds(), seed=seed, cns=2, zones=3, coordinator=True,
                        coordinators=3, zookeeper=zookeeper.hosts,
                        workdir=tmp_path / "soak", settle_timeout=150)
    print(report.schedule_text(seed, config.make_schedule(), config.kinds()))
    result = await run_soak(config)
    doc = report.write(result, tmp_path / "soak-report.json")
    print(report.summary(doc))
    kills = [f for f in result.faults if f.kind == "kill-coordinator"]
    assert kills and all(f.target.startswith("coordinator") for f in kills), kills
    assert result.passed, _failure(doc, config)


@pytest.mark.soak
@pytest.mark.zfs
async def test_soak_catches_a_zone_that_acks_before_its_mirror(
        zfs_tier: ZfsTier, tmp_path: Path) -> None:
    """The broken build: snapperd acks ``mirrored`` pushes before the mirror holds
    them (``tests/ack_early_zone.py``, run as every zone's snapperd). The soak must
    say so."""
    config = SoakConfig(duration=min(_seconds(), 40), seed=1, cns=2, zones=3,
                        workdir=tmp_path / "soak", schedule=[], min_faults=0, min_kinds=0,
                        settle_timeout=90, zone_module="tests.ack_early_zone")
    result = await run_soak(config)
    doc = report.write(result, tmp_path / "soak-report.json")
    print(report.summary(doc))
    acks = next(c for c in result.checks if c.name.startswith("every ack true"))
    assert not acks.ok, report.summary(doc)
    assert any("missing or incomplete" in d for d in acks.detail)
    assert not result.passed


@pytest.mark.soak
@pytest.mark.zfs
@pytest.mark.parametrize("coordinator", [False, True], ids=["static", "coordinator"])
async def test_soak_policy_agents(zfs_tier: ZfsTier, tmp_path: Path, coordinator: bool) -> None:
    """Issue 15: the real ``snapper agent`` on a compressed clock (a policy minute in
    five seconds) for one VM, beside the usual load; its agent SIGKILLed and its
    zone killed in the middle of the schedule, mid-push when one is seen. After:
    every tick either on both zones or excused by downtime, a push or a backoff;
    none doubled, none pushed twice. With static pairs, and with a coordinator:
    the agent asks it where its VM is placed (its last verified answer kept for
    when it does not answer), and a zone killed mid-schedule comes back to the
    pair the coordinator names."""
    seed = int(os.environ.get("SNAPPER_SOAK_AGENT_SEED", "15"))
    config = SoakConfig(duration=min(_seconds(), 60), seed=seed, cns=1, zones=3,
                        vms_per_cn=1, coordinator=coordinator, workdir=tmp_path / "soak",
                        settle_timeout=120, fault_kinds=AGENT_KINDS, min_faults=4,
                        min_kinds=2)
    print(report.schedule_text(seed, config.make_schedule(), AGENT_KINDS))
    result = await run_soak(config)
    doc = report.write(result, tmp_path / "soak-report.json")
    print(report.summary(doc))
    assert doc["agents"]["killed"] >= 1 and doc["agents"]["pushed"] >= 5, doc["agents"]
    assert result.passed, _failure(doc, config)


# -- what the soak found ------------------------------------------------------------------


@pytest.fixture
async def pair(zfs_tier: ZfsTier, tmp_path: Path) -> AsyncIterator[tuple[Soak, str]]:
    """Two static zones, one CN with one VM, and the soak's workload to drive them."""
    fleet = await LocalFleet.start(tmp_path / "fleet", zones=2, cns=1, vms_per_cn=1,
                                   pool_size=512 << 20, reconcile_interval_ms=500)
    try:
        async with fleet.http() as http:
            soak = Soak(SoakConfig(workdir=tmp_path), fleet, http, print)
            await soak.workload.make_vms()
            yield soak, fleet.cns[0].vms[0]
    finally:
        await fleet.stop()


async def _push_next(soak: Soak, vm: str, rng: random.Random) -> PushRecord:
    w, cn = soak.workload, soak.fleet.cns[0]
    w.mutate(cn, vm, rng)
    rec = await w.push(cn, vm, w.next_name(vm))
    assert rec.acked, rec
    return rec


def _kill(*zones: LocalZone) -> None:
    for z in zones:
        assert z.daemon is not None
        z.daemon.kill()
        z.daemon = None


async def _two_copies(soak: Soak) -> None:
    done = await soak.wait_two_copies(soak.acked_keys(), 60)
    assert done is not None, await soak.copies_problems(soak.acked_keys(), exact=True)


@pytest.mark.zfs
async def test_failover_push_carries_the_snapshot_the_zone_lacks(
        pair: tuple[Soak, str]) -> None:
    """The design's trap, found by the soak (kill-restart, seed 5): s2 is acked
    ``local`` on A alone; A dies before B has it; the CN pushes s3 to B. The push
    must carry s2 then s3 (DESIGN.md (b)); a plain ``-i s1 s3`` left B with s1 s3
    and A with s1 s2: no common tail, reconcile stopped with NeedsOperator."""
    soak, vm = pair
    rng = random.Random(0)
    await _push_next(soak, vm, rng)
    a, b = await soak.targets(vm)
    _kill(b)
    assert (await _push_next(soak, vm, rng)).zones == [a.uuid]  # s2, local on A
    _kill(a)
    await soak.fleet.start_zone(b)
    assert (await _push_next(soak, vm, rng)).zones == [b.uuid]  # s3, local on B
    await soak.fleet.start_zone(a)
    await _two_copies(soak)


@pytest.mark.zfs
async def test_replaced_zone_taking_a_full_push_converges(pair: tuple[Soak, str]) -> None:
    """The soak's replace-zone fault, made deterministic: A (the VM's primary) loses
    its pool and comes back empty while B is down; the CN pushes s4 to A (``local``,
    full: A has nothing). The full push must carry s1..s4, not s4 alone, else A
    holds s4 and B s1-s3 with no common base and reconcile needs an operator."""
    soak, vm = pair
    rng = random.Random(0)
    for _ in range(3):
        assert (await _push_next(soak, vm, rng)).durability == "mirrored"
    a, b = await soak.targets(vm)
    _kill(b, a)
    await replace_pool(soak.fleet, a, 512 << 20)
    await soak.fleet.start_zone(a)
    assert (await _push_next(soak, vm, rng)).zones == [a.uuid]
    await soak.fleet.start_zone(b)
    await _two_copies(soak)


# -- the policy agents' invariant (pure) ---------------------------------------------------

CLOCK = invariants.AgentClock(origin=0.0, speed=1.0, every=60.0)
ZA, ZB = A, B


def _name(t: float) -> str:
    from snapper_zone.policy import snapshot_name
    return snapshot_name("slow" if t % 120 == 0 else "fast", t)


def _held(times: list[float], guid: int = 7) -> dict[str, dict[str, dict[str, int]]]:
    snaps = {_name(t): {"root": guid + int(t)} for t in times}
    return {ZA: dict(snaps), ZB: dict(snaps)}


def _ok(t: float, start: float, end: float) -> dict[str, object]:
    return {"vm": VM, "snapshot": _name(t), "ok": True, "started": start, "ended": end}


def test_agents_every_tick_passes_and_a_missed_one_fails() -> None:
    ticks = [600.0 + 60 * i for i in range(6)]
    run = AgentRun("cn0", VM, 590.0, 960.0, outcomes=[_ok(t, t + 1, t + 3) for t in ticks])
    assert invariants.check_agents([run], {VM: _held(ticks)}, CLOCK).ok
    # The agent idle through the tick at 720 and never took it: missed.
    run2 = AgentRun("cn0", VM, 590.0, 960.0,
                    outcomes=[_ok(t, t + 1, t + 3) for t in ticks if t != 720])
    got = invariants.check_agents([run2], {VM: _held([t for t in ticks if t != 720])}, CLOCK)
    assert not got.ok and any("720 missed" in d for d in got.detail), got.detail


def test_agents_a_long_push_or_a_backoff_or_a_kill_excuses_a_tick() -> None:
    # Pushing 660 took until 790: the runs at 720 and 780 caught up with one (780).
    busy = AgentRun("cn0", VM, 590.0, 960.0, outcomes=[
        _ok(600, 601, 603), _ok(660, 661, 790), _ok(780, 790, 792), _ok(840, 841, 843),
        _ok(900, 901, 903)])
    held = [600.0, 660, 780, 840, 900]
    assert invariants.check_agents([busy], {VM: _held(held)}, CLOCK).ok
    # Failed at 661, backing off until 800: the retry pushes 660, the catch-up 780.
    failed = {"vm": VM, "snapshot": _name(660), "ok": False, "started": 661, "ended": 662,
              "retry_at": 800}
    back = AgentRun("cn0", VM, 590.0, 960.0, outcomes=[
        _ok(600, 601, 603), failed, _ok(660, 800, 802), _ok(780, 802, 804),
        _ok(840, 841, 843), _ok(900, 901, 903)])
    assert invariants.check_agents([back], {VM: _held(held)}, CLOCK).ok
    # Killed mid-push of 660 (its snapshot committed by the next life's first push),
    # restarted at 770: the catch-up is 720; 780 on.
    first = AgentRun("cn0", VM, 590.0, 665.0, killed=True, outcomes=[_ok(600, 601, 603)])
    second = AgentRun("cn0", VM, 770.0, 960.0, outcomes=[
        _ok(720, 772, 774), _ok(780, 781, 783), _ok(840, 841, 843), _ok(900, 901, 903)])
    held = [600.0, 660, 720, 780, 840, 900]
    assert invariants.check_agents([first, second], {VM: _held(held)}, CLOCK).ok


def test_agents_doubles_repeats_and_single_copies_fail() -> None:
    ticks = [600.0, 660, 720]
    outcomes = [_ok(t, t + 1, t + 3) for t in ticks]
    run = AgentRun("cn0", VM, 590.0, 780.0, outcomes=outcomes)
    held = _held(ticks)
    from snapper_zone.policy import snapshot_name
    doubled = snapshot_name("fast", 600)  # a fast one beside the slow one at 600
    for z in held.values():
        z[doubled] = {"root": 1}
    got = invariants.check_agents([run], {VM: held}, CLOCK)
    assert not got.ok and any("doubled" in d for d in got.detail), got.detail
    again = AgentRun("cn0", VM, 590.0, 780.0, outcomes=[*outcomes, _ok(720, 740, 742)])
    got = invariants.check_agents([again], {VM: _held(ticks)}, CLOCK)
    assert any("pushed 2 times" in d for d in got.detail), got.detail
    one = _held(ticks)
    del one[ZB][_name(660)]
    got = invariants.check_agents([run], {VM: one}, CLOCK)
    assert any("not two copies" in d for d in got.detail), got.detail
    assert invariants.agent_copies_problems([VM], {VM: one})


@settings(max_examples=300, deadline=None)
@given(windows=st.lists(st.tuples(st.integers(0, 100), st.integers(0, 30)), max_size=6),
       lo=st.integers(0, 100), width=st.integers(1, 50))
def test_idle_stretch_agrees_with_counting(windows: list[tuple[int, int]], lo: int,
                                           width: int) -> None:
    ws = [(float(a), float(a + d)) for a, d in windows]
    free = [x for x in range(lo, lo + width) if not any(a <= x < b for a, b in ws)]
    longest, run = 0, 0
    for x in range(lo, lo + width):
        run = run + 1 if x in free else 0
        longest = max(longest, run)
    assert invariants._covered(ws, float(lo), float(lo + width)) == longest
