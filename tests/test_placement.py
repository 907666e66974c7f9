"""rebalance.placement: the pure planner (weighted HRW placement and moves), no I/O."""

from __future__ import annotations

import random
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rebalance.placement import (
    Move,
    Plan,
    VmInfo,
    ZoneInfo,
    ZoneState,
    desired_placement,
    hrw_ranking,
    hrw_score,
    plan,
)

ACTIVE, DRAINING, LOST = ZoneState.ACTIVE, ZoneState.DRAINING, ZoneState.LOST
# Copies on these count for nothing: lost, or a pending zone nobody admitted.
UNTRUSTED = (LOST, ZoneState.PENDING)
TB = 10**12


def vm_ids(n: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    return [str(uuid.UUID(int=rnd.getrandbits(128), version=4)) for _ in range(n)]


def fleet(n: int, seed: int, sizes: tuple[int, int] = (10, 100)) -> list[VmInfo]:
    rnd = random.Random(seed + 1)
    return [VmInfo(v, rnd.randint(*sizes)) for v in vm_ids(n, seed)]


def zones(n: int, capacity: int = TB, free: int = TB, first: int = 0) -> list[ZoneInfo]:
    return [ZoneInfo(f"zone-{i:02d}", ACTIVE, capacity, 0, free) for i in range(first, first + n)]


def share(p: Plan, zone: str) -> float:
    return p.projected[zone] / sum(p.projected.values())


def simulate(zs: Sequence[ZoneInfo], current: Mapping[str, Sequence[str]], p: Plan,
             vms: Sequence[VmInfo]) -> dict[str, set[str]]:
    """Apply the moves in order as copy-then-delete; check no step loses redundancy."""
    state = {z.id: z.state for z in zs}
    held = {v.uuid: {z for z in current.get(v.uuid, ()) if state.get(z, LOST) not in UNTRUSTED}
            for v in vms}
    for m in p.moves:
        copies = held[m.vm]
        assert m.source in copies, m
        assert m.to_zone not in copies, m
        assert state[m.to_zone] is ACTIVE, m
        before = len(copies)
        copies.add(m.to_zone)  # copy + verify
        if m.from_zone is not None and m.from_zone in copies:
            assert m.reason in ("drain", "rebalance"), m
            copies.discard(m.from_zone)  # delete only after the new copy is in place
        else:
            assert m.reason in ("lost", "add-copy"), m
        assert len(copies) >= min(2, before), m  # never below two copies, never fewer
    for vm, pair in p.placement.items():
        if not current.get(vm):  # a new VM: no data yet, its CN pushes to the pair
            assert not any(m.vm == vm for m in p.moves)
            continue
        assert held[vm] == set(pair), (vm, held[vm], pair)
    for vm, left in p.degraded.items():
        if not current.get(vm):
            continue
        assert held[vm] == set(left)
    return held


def check_plan(zs: Sequence[ZoneInfo], vms: Sequence[VmInfo],
               current: Mapping[str, Sequence[str]], p: Plan) -> None:
    by_id = {z.id: z for z in zs}
    sizes = {v.uuid: v.size for v in vms}
    assert set(p.placement) | set(p.degraded) == set(sizes)
    assert not set(p.placement) & set(p.degraded)
    for a, b in p.placement.values():
        assert a != b
        for z in (a, b):  # only where the data may stay: eligible, or not drainable in time
            assert by_id[z].state not in UNTRUSTED
    # free space: what lands on a zone (new VMs' pushes and move targets) fits its free bytes
    landed: Counter[str] = Counter()
    for vm, pair in p.placement.items():
        for z in pair:
            if z not in current.get(vm, ()):
                landed[z] += sizes[vm]
    for vm, left in p.degraded.items():
        for z in left:
            if z not in current.get(vm, ()):
                landed[z] += sizes[vm]
    for z, n in landed.items():
        assert n <= by_id[z].free, (z, n, by_id[z].free)
    # order: lost, add-copy, drain, rebalance
    rank = {"lost": 0, "add-copy": 1, "drain": 2, "rebalance": 3}
    ranks = [rank[m.reason] for m in p.moves]
    assert ranks == sorted(ranks)
    for m in p.moves:
        assert m.bytes == sizes[m.vm]
    assert len({(m.vm, m.to_zone) for m in p.moves}) == len(p.moves)
    simulate(zs, current, p, vms)


# ------------------------------------------------------------------ hashing --


@settings(max_examples=60, deadline=None)
@given(st.lists(st.uuids(), min_size=1, max_size=300, unique=True),
       st.lists(st.integers(1, 8), min_size=2, max_size=24))
def test_bulk_hrw_matches_the_scalar_definition(ids: list[uuid.UUID], weights: list[int]) -> None:
    zs = [ZoneInfo(f"z{i}", ACTIVE, w * TB) for i, w in enumerate(weights)]
    vms = [VmInfo(str(u), 1) for u in ids]
    desired = desired_placement(zs, vms)
    for v in vms:
        ranking = hrw_ranking(v.uuid, zs)
        assert desired[v.uuid] == (ranking[0], ranking[1])


def test_ranking_follows_the_weighted_score() -> None:
    zs = [ZoneInfo(f"z{i}", ACTIVE, (i + 1) * TB) for i in range(6)]
    for vm in vm_ids(200, 1):
        scores = {z.id: hrw_score(vm, z.id, z.capacity) for z in zs}
        assert hrw_ranking(vm, zs) == sorted(scores, key=lambda z: -scores[z])


def test_hash_is_stable_across_runs() -> None:
    # A pinned value: placement must not change between Python runs or versions.
    vm = "6e3b1a2c-0d4f-4c8e-9a1b-2c3d4e5f6a7b"
    zs = [ZoneInfo(f"zone-{i}", ACTIVE, TB) for i in range(5)]
    assert hrw_ranking(vm, zs) == hrw_ranking(vm, list(reversed(zs)))
    assert hrw_ranking(vm, zs) == PINNED_RANKING


PINNED_RANKING = ["zone-2", "zone-0", "zone-1", "zone-4", "zone-3"]


@given(st.lists(st.uuids(), min_size=1, max_size=50, unique=True), st.integers(2, 9),
       st.randoms(use_true_random=False))
def test_every_vm_gets_two_distinct_eligible_zones(ids: list[uuid.UUID], nzones: int,
                                                   rnd: random.Random) -> None:
    states = [ACTIVE, ACTIVE] + [rnd.choice(list(ZoneState)) for _ in range(nzones - 2)]
    zs = [ZoneInfo(f"z{i}", s, rnd.randint(1, 5) * TB, 0, TB) for i, s in enumerate(states)]
    vms = [VmInfo(str(u), 7) for u in ids]
    eligible = {z.id for z in zs if z.eligible}
    for pair in desired_placement(zs, vms).values():
        assert pair[0] != pair[1] and set(pair) <= eligible
    p = plan(zs, vms, {})
    assert not p.degraded and not p.moves
    for pair in p.placement.values():
        assert pair[0] != pair[1] and set(pair) <= eligible


def test_not_enough_zones() -> None:
    vms = fleet(5, 2)
    with pytest.raises(ValueError, match="not enough zones"):
        desired_placement(zones(1), vms)
    p = plan(zones(1), vms, {})
    assert any("not enough zones" in w for w in p.warnings)
    assert not p.placement and set(p.degraded) == {v.uuid for v in vms}
    assert all(left == ("zone-00",) for left in p.degraded.values())


def test_invalid_inputs_rejected() -> None:
    with pytest.raises(ValueError, match="UUID"):
        desired_placement(zones(3), [VmInfo("not-a-uuid", 1)])
    with pytest.raises(ValueError, match="UUID"):
        desired_placement(zones(3), [VmInfo(vm_ids(1, 1)[0].upper(), 1)])
    with pytest.raises(ValueError, match="twice"):
        plan(zones(3) + zones(1), fleet(2, 1), {})
    vm = fleet(1, 1)
    with pytest.raises(ValueError, match="distinct"):
        plan(zones(3), vm, {vm[0].uuid: ("zone-00", "zone-00")})
    with pytest.raises(ValueError):
        ZoneInfo("z", ACTIVE, -1)


# ------------------------------------------------------------- determinism --


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10**6), st.randoms(use_true_random=False))
def test_plan_is_deterministic_and_order_independent(seed: int, rnd: random.Random) -> None:
    zs = [*zones(5, free=10**6), ZoneInfo("zone-d", DRAINING, TB, 0, TB),
          ZoneInfo("zone-l", LOST, TB, 0, TB)]
    vms = fleet(60, seed)
    names = [z.id for z in zs]
    current = {v.uuid: tuple(rnd.sample(names, rnd.choice([0, 1, 2, 2, 2]))) for v in vms}
    p = plan(zs, vms, current)
    zs2, vms2 = list(zs), list(vms)
    rnd.shuffle(zs2)
    rnd.shuffle(vms2)
    current2 = dict(reversed(list(current.items())))
    assert plan(zs2, vms2, current2) == p
    assert plan(zs, vms, current) == p
    check_plan(zs, vms, current, p)


# ------------------------------------------------------- adding a zone ----


def test_adding_a_zone_moves_about_its_share_and_only_onto_it() -> None:
    vms = fleet(20_000, 3)
    old = zones(10)
    first = plan(old, vms, {})
    assert not first.moves
    new = old + zones(1, first=10)
    p = plan(new, vms, first.placement)
    check_plan(new, vms, first.placement, p)
    assert {m.to_zone for m in p.moves} == {"zone-10"}
    assert {m.reason for m in p.moves} == {"rebalance"}
    assert len({m.vm for m in p.moves}) == len(p.moves)  # one copy per VM at most
    # copies moved: the new zone's share 1/(N+1) of all copies (2/(N+1) of the VMs),
    # not more than (1 + tolerance) of it
    total = sum(first.projected.values())
    assert p.moved_bytes <= total / 11 * 1.05
    assert abs(share(p, "zone-10") - 1 / 11) <= 0.1 / 11
    # and they are, by far, the VMs that hashing puts on the new zone
    hrw = desired_placement(new, vms)
    agree = sum("zone-10" in hrw[m.vm] for m in p.moves)
    assert agree >= 0.9 * len(p.moves)
    # a second plan is a no-op: sticky, nothing moves just because of the hash
    assert plan(new, vms, p.placement).moves == ()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fourth_zone_ends_within_ten_percent_of_a_quarter(seed: int) -> None:
    """Issue 5's rule at realistic sizes: 3 zones, 3000 VMs of mixed sizes, add a 4th."""
    vms = fleet(3000, seed, sizes=(1, 1000))
    old = zones(3)
    first = plan(old, vms, {})
    new = old + zones(1, first=3)
    p = plan(new, vms, first.placement)
    check_plan(new, vms, first.placement, p)
    assert abs(share(p, "zone-03") - 0.25) <= 0.025
    for z in old:
        assert abs(share(p, z.id) - 0.25) <= 0.025
    total = sum(first.projected.values())
    assert p.moved_bytes <= 0.25 * total * 1.05


def test_fourth_zone_with_twelve_equal_vms() -> None:
    """The done-when fixture's size: 12 VMs (3 snapshots each, about equal) on 3 zones.

    With 12 VMs, pure hashing would give the new zone anything from 2 to 10 of
    the 24 copies; the balance pass fills it to exactly its share, 6 copies.
    With very unequal sizes at this scale the share is best effort: the zone is
    filled toward 1/4 without ever passing (1 + tolerance) of it (next test).
    """
    vms = [VmInfo(v, 3 * 2**20) for v in vm_ids(12, 7)]
    old = zones(3)
    first = plan(old, vms, {})
    assert sorted(first.projected.values()) == [8 * 3 * 2**20] * 3
    new = old + zones(1, first=3)
    p = plan(new, vms, first.placement)
    check_plan(new, vms, first.placement, p)
    assert len(p.moves) == 6
    assert share(p, "zone-03") == 0.25


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 100), min_size=12, max_size=12), st.integers(0, 10**6))
def test_small_fleets_never_overshoot_the_new_zones_share(sizes: list[int], seed: int) -> None:
    vms = [VmInfo(v, s) for v, s in zip(vm_ids(12, seed), sizes, strict=True)]
    old = zones(3)
    first = plan(old, vms, {})
    new = old + zones(1, first=3)
    p = plan(new, vms, first.placement)
    check_plan(new, vms, first.placement, p)
    assert share(p, "zone-03") <= 0.25 * 1.05 + 1e-9
    assert p.moves  # it got something


# ----------------------------------------------------- removing a zone ----


def test_draining_a_zone_moves_only_its_copies_and_empties_it() -> None:
    vms = fleet(10_000, 4)
    zs = zones(8)
    first = plan(zs, vms, {})
    on_it = {vm for vm, pair in first.placement.items() if "zone-03" in pair}
    drained = [z if z.id != "zone-03" else ZoneInfo(z.id, DRAINING, z.capacity, 0, z.free)
               for z in zs]
    p = plan(drained, vms, first.placement)
    check_plan(drained, vms, first.placement, p)
    assert p.projected["zone-03"] == 0
    assert {m.vm for m in p.moves} == on_it
    assert all(m.reason == "drain" and m.from_zone == "zone-03" == m.source for m in p.moves)
    for vm, pair in p.placement.items():
        if vm not in on_it:
            assert pair == first.placement[vm]
    # where they go is where hashing without zone-03 puts them
    hrw = desired_placement(drained, vms)
    assert all(m.to_zone in hrw[m.vm] for m in p.moves)


def test_losing_a_zone_repairs_from_the_survivor_first() -> None:
    vms = fleet(10_000, 5)
    zs = zones(8)
    first = plan(zs, vms, {})
    on_it = {vm for vm, pair in first.placement.items() if "zone-05" in pair}
    lost = [z if z.id != "zone-05" else ZoneInfo(z.id, LOST, z.capacity, 0, z.free) for z in zs]
    p = plan(lost, vms, first.placement)
    check_plan(lost, vms, first.placement, p)
    assert {m.vm for m in p.moves if m.reason == "lost"} == on_it
    assert all(m.reason == "lost" for m in p.moves)
    for m in p.moves:
        (survivor,) = set(first.placement[m.vm]) - {"zone-05"}
        assert m.from_zone == "zone-05" and m.source == survivor
        assert p.placement[m.vm] == (survivor, m.to_zone)  # the survivor becomes primary
    assert p.projected["zone-05"] == 0
    # a zone missing from the registry altogether counts as lost
    gone = [z for z in zs if z.id != "zone-05"]
    assert plan(gone, vms, first.placement).moves == p.moves


def test_lost_repairs_come_before_other_moves() -> None:
    vms = fleet(400, 6)
    zs = zones(5)
    first = plan(zs, vms, {})
    changed = [ZoneInfo("zone-00", LOST, TB), ZoneInfo("zone-01", DRAINING, TB, 0, TB)]
    changed += zs[2:] + zones(1, first=5)
    current: dict[str, Sequence[str]] = dict(first.placement)
    one_copy = vm_ids(1, 99)[0]
    current[one_copy] = ("zone-02",)
    vms2 = [*vms, VmInfo(one_copy, 5)]
    p = plan(changed, vms2, current)
    check_plan(changed, vms2, current, p)
    reasons = [m.reason for m in p.moves]
    assert set(reasons) == {"lost", "add-copy", "drain", "rebalance"}
    assert reasons == sorted(reasons, key=["lost", "add-copy", "drain", "rebalance"].index)
    assert Move(one_copy, None, p.placement[one_copy][1], "zone-02", 5, "add-copy") in p.moves


def test_vm_with_both_copies_lost_is_reported() -> None:
    vms = fleet(1, 8)
    zs = [ZoneInfo("a", LOST, TB), ZoneInfo("b", LOST, TB), *zones(3)]
    p = plan(zs, vms, {vms[0].uuid: ("a", "b")})
    assert p.degraded == {vms[0].uuid: ()} and not p.moves
    assert any("no surviving copy" in w for w in p.warnings)


# ------------------------------------------------------ weight and space ----


def test_capacity_weighting_hashing_alone() -> None:
    """Pure HRW over 10k VMs: a zone of twice the weight gets about twice the copies."""
    zs = [ZoneInfo(f"z{i}", ACTIVE, (2 if i % 2 else 1) * TB) for i in range(10)]
    counts = Counter(z for pair in desired_placement(zs, fleet(10_000, 9)).values() for z in pair)
    light = sum(counts[f"z{i}"] for i in range(0, 10, 2)) / 5
    heavy = sum(counts[f"z{i}"] for i in range(1, 10, 2)) / 5
    assert 1.8 <= heavy / light <= 2.2


def test_capacity_weighting_plan_is_within_tolerance() -> None:
    """The plan's balance pass corrects what top-2 hashing leaves (few heavy zones)."""
    zs = [ZoneInfo("a", ACTIVE, TB, 0, TB), ZoneInfo("b", ACTIVE, TB, 0, TB),
          ZoneInfo("c", ACTIVE, 2 * TB, 0, TB), ZoneInfo("d", ACTIVE, 4 * TB, 0, TB)]
    vms = fleet(10_000, 10)
    p = plan(zs, vms, {})
    # shares by weight would be 1/8, 1/8, 2/8, 4/8; a zone holds at most one copy of
    # each VM, so d is capped at 1/2 and a, b, c share the rest by weight
    for z, fair in {"a": 1 / 8, "b": 1 / 8, "c": 2 / 8, "d": 4 / 8}.items():
        assert abs(share(p, z) - fair) <= 0.05 * fair + 1e-3, (z, share(p, z))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 3000), min_size=3, max_size=6), st.integers(0, 10**6))
def test_free_space_is_never_exceeded(frees: list[int], seed: int) -> None:
    zs = [ZoneInfo(f"z{i}", ACTIVE, TB, 0, f) for i, f in enumerate(frees)]
    vms = fleet(40, seed)
    p = plan(zs, vms, {})
    check_plan(zs, vms, {}, p)  # includes the free-space check
    if p.degraded:
        assert any("no room" in w for w in p.warnings)
    # and when moving: lose a zone, add one with little room
    if len(p.placement) >= 2:
        zs2 = [ZoneInfo("z0", LOST, TB), *zs[1:], ZoneInfo("new", ACTIVE, TB, 0, 150)]
        q = plan(zs2, vms, p.placement)
        check_plan(zs2, vms, p.placement, q)


def test_full_zone_is_skipped_with_a_warning() -> None:
    vms = fleet(50, 11, sizes=(10, 10))
    zs = [ZoneInfo("full", ACTIVE, 100 * TB, 0, 0), *zones(3)]
    p = plan(zs, vms, {})
    assert p.projected["full"] == 0
    assert any(w.startswith("zone full would exceed its free space") for w in p.warnings)
    assert not p.degraded


def test_drain_without_room_keeps_the_copy_and_warns() -> None:
    vms = fleet(4, 12, sizes=(10, 10))
    zs = [ZoneInfo("a", ACTIVE, TB, 0, 0), ZoneInfo("b", ACTIVE, TB, 0, 0),
          ZoneInfo("d", DRAINING, TB, 0, 0)]
    current = {v.uuid: ("a", "d") for v in vms}
    p = plan(zs, vms, current)
    assert not p.moves
    assert all(pair == ("a", "d") for pair in p.placement.values())
    assert p.projected["d"] == 40
    assert sum("to move it off d" in w for w in p.warnings) == 4


# --------------------------------------------------------- general property --


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[ZoneInfo], list[VmInfo], dict[str, tuple[str, ...]]]:
    nz = draw(st.integers(1, 7))
    zs = [ZoneInfo(f"z{i}", draw(st.sampled_from(list(ZoneState))), draw(st.integers(0, 5)) * TB,
                   0, draw(st.integers(0, 2000))) for i in range(nz)]
    ids = draw(st.lists(st.uuids(), max_size=40, unique=True))
    vms = [VmInfo(str(u), draw(st.integers(0, 200))) for u in ids]
    names = [z.id for z in zs] + ["gone"]
    current: dict[str, tuple[str, ...]] = {}
    for v in vms:
        k = draw(st.integers(0, 2))
        current[v.uuid] = tuple(draw(st.lists(st.sampled_from(names), min_size=k, max_size=k,
                                              unique=True)))
    return zs, vms, current


@settings(max_examples=300, deadline=None)
@given(scenarios(), st.sampled_from([0.0, 0.05, 0.2, 1.0]))
def test_any_plan_keeps_every_invariant(
        scenario: tuple[list[ZoneInfo], list[VmInfo], dict[str, tuple[str, ...]]],
        tolerance: float) -> None:
    zs, vms, current = scenario
    p = plan(zs, vms, current, tolerance=tolerance)
    check_plan(zs, vms, current, p)
    eligible = {z.id for z in zs if z.eligible}
    for m in p.moves:
        assert m.to_zone in eligible
    for vm, pair in p.placement.items():
        for z in pair:  # a kept copy off an eligible zone only when it could not move
            if z not in eligible:
                assert any(vm in w for w in p.warnings)
