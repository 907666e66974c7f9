"""The mover's state machine against an in-memory fake of the zones' HTTP API.

Every call the mover makes to the fake first checks the invariant: no VM has
fewer live, complete copies than it started with (two, or one for a repair).
A "crash" is an exception the mover does not catch, raised at a chosen call;
a new Mover on the same store must then finish or roll back the move.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rebalance.mover import Mover, MoverSettings, verify_copy
from rebalance.placement import Move, ZoneState
from rebalance.store import MoveState, MoveStep, SqliteStore, ZoneRegistration
from rebalance.zoneclient import SnapshotView, SyncResult, ZoneRequestFailed, ZoneUnreachable
from tests.helpers import wait_for

A, B, C, D = (f"00000000-0000-4000-8000-00000000000{i}" for i in (1, 2, 3, 4))
VM = "74c59c61-4559-4ca2-b1ef-0ca22f2f936a"
SNAPS = [SnapshotView(f"s{i}", True, {"root": 100 + i, "disk0": 200 + i})
         for i in range(3)]


class Crash(BaseException):
    """Stands for the coordinator dying: nothing in the mover catches it."""


def url(zone: str) -> str:
    return f"http://{zone}"


class FakeZones:
    """``ZoneApi`` in memory: url -> vm -> snapshots."""

    def __init__(self) -> None:
        self.held: dict[str, dict[str, list[SnapshotView]]] = {}
        self.down: set[str] = set()
        self.crash_at: str | None = None
        self.sync_results: list[str] = []  # states to answer before copying for real
        self.corrupt_next_copy = False
        self.calls: list[tuple[str, str]] = []
        self.floor: dict[str, int] = {}  # vm -> fewest live complete copies allowed
        self.lost: set[str] = set()  # urls of zones whose copies do not count
        self.gate: asyncio.Event | None = None
        self.syncing = 0
        self.peak_syncing = 0
        self.bwlimits: list[float | None] = []
        self.relearned: list[tuple[str, str]] = []  # (url, vm) told of a switch

    def put(self, zone: str, vm: str, snaps: list[SnapshotView]) -> None:
        self.held.setdefault(url(zone), {})[vm] = list(snaps)

    def copies(self, vm: str) -> int:
        return sum(1 for u, vms in self.held.items() if u not in self.lost and vm in vms
                   and not verify_copy(SNAPS, vms[vm]))

    def _enter(self, what: str, u: str) -> None:
        self.calls.append((what, u))
        for vm, floor in self.floor.items():
            assert self.copies(vm) >= floor, f"{vm} below {floor} copies before {what} {u}"
        if self.crash_at == what:
            self.crash_at = None
            raise Crash(what)
        if u in self.down:
            raise ZoneUnreachable(f"{u} is down")

    async def ping(self, u: str, timeout: float) -> None:
        self._enter("ping", u)

    async def list_vms(self, u: str) -> list:  # type: ignore[type-arg]
        raise NotImplementedError

    async def snapshots(self, u: str, vm: str) -> list[SnapshotView] | None:
        self._enter("snapshots", u)
        got = self.held.get(u, {}).get(vm)
        return None if got is None else list(got)

    async def sync(self, u: str, vm: str, peer: str,
                   bwlimit: float | None = None) -> SyncResult:
        self._enter("sync", u)
        self.bwlimits.append(bwlimit)
        self.syncing += 1
        self.peak_syncing = max(self.peak_syncing, self.syncing)
        try:
            if self.gate is not None:
                await self.gate.wait()
        finally:
            self.syncing -= 1
        if self.sync_results:
            return SyncResult(vm, peer, self.sync_results.pop(0), "test says so")
        snaps = list(self.held[u][vm])
        if self.corrupt_next_copy:
            self.corrupt_next_copy = False
            snaps[-1] = replace(snaps[-1], guids={"root": 1, "disk0": 2})
        self.held.setdefault(url(peer), {})[vm] = snaps
        return SyncResult(vm, peer, "in_sync")

    async def delete_vm(self, u: str, vm: str,
                        elsewhere: Sequence[SnapshotView] | None = None) -> bool:
        self._enter("delete_vm", u)
        if elsewhere is not None and verify_copy(self.held.get(u, {}).get(vm, []),
                                                 list(elsewhere)):
            raise ZoneRequestFailed(u, 409, "CopyNotRedundant", "holds more")
        return self.held.get(u, {}).pop(vm, None) is not None

    async def capacity(self, u: str) -> tuple[int, int]:
        return 0, 1 << 40

    async def tombstones(self, u: str, vm: str) -> set[int]:
        return set()

    async def sending(self, u: str, vm: str, peer: str) -> int:
        return 0

    async def relearn_placement(self, u: str, vm: str) -> None:
        self._enter("relearn_placement", u)
        self.relearned.append((u, vm))


def reg(zone: str) -> ZoneRegistration:
    return ZoneRegistration(uuid=zone, name="z" + zone[-1], ssh_host="127.0.0.1", ssh_port=22,
                            http_url=url(zone), host_key="ssh-ed25519 X", capacity=100)


async def setup(tmp_path: Path, move: Move, placed: tuple[str, str] = (A, B),
                lost: str | None = None) -> tuple[SqliteStore, FakeZones, int]:
    store = SqliteStore(tmp_path / "c.db")
    for z in (A, B, C, D):
        await store.upsert_zone(reg(z), 0.0)
        await store.set_zone_state(z, ZoneState.ACTIVE)  # admitted
    fake = FakeZones()
    for z in placed:
        fake.put(z, VM, SNAPS)
    if lost is not None:
        await store.set_zone_state(lost, ZoneState.LOST)
        fake.lost.add(url(lost))
        fake.down.add(url(lost))
    fake.floor[VM] = fake.copies(VM)
    await store.place(VM, placed, 300)
    [m] = await store.add_moves([move], 1.0)
    return store, fake, m.id


def mover(store: SqliteStore, fake: FakeZones, **kw: float) -> Mover:
    s = MoverSettings(retry_delay=0.0, progress_interval=60.0, **kw)  # type: ignore[arg-type]
    return Mover(store, fake, s)


async def crash(store: SqliteStore, fake: FakeZones, move_id: int, at: str) -> None:
    """Run the move until the coordinator "dies" at the call ``at``."""
    fake.crash_at = at
    m = await store.move(move_id)
    assert m is not None
    with pytest.raises(Crash):
        await mover(store, fake).execute(m)


async def run_to_end(mv: Mover, move_id: int) -> MoveState:
    for _ in range(20):
        m = await mv.store.move(move_id)
        assert m is not None
        if not m.active:
            return m.state
        await mv.execute(m)
    raise AssertionError("move did not end")


async def test_rebalance_move_copies_verifies_switches_deletes(tmp_path: Path) -> None:
    store, fake, mid = await setup(tmp_path, Move(VM, B, C, B, 300, "rebalance"))
    assert await run_to_end(mover(store, fake), mid) is MoveState.DONE
    assert await store.placement(VM) == (A, C)
    assert VM in fake.held[url(C)] and VM not in fake.held[url(B)]
    m = await store.move(mid)
    assert m is not None and (m.progress, m.step, m.error) == (300, MoveStep.DELETE, None)
    # the order of the steps: copy, verify both sides, switch and tell the new pair,
    # check that both placed copies answer (the new one last), compare the new copy
    # with the old one, delete
    assert fake.calls == [("sync", url(B)), ("snapshots", url(B)), ("snapshots", url(C)),
                          ("relearn_placement", url(A)), ("relearn_placement", url(C)),
                          ("snapshots", url(A)), ("snapshots", url(C)),
                          ("snapshots", url(B)), ("delete_vm", url(B))]
    assert fake.relearned == [(url(A), VM), (url(C), VM)]


async def test_a_zone_that_cannot_relearn_the_placement_does_not_hold_the_move(
        tmp_path: Path) -> None:
    """Telling the new pair is best effort: the staying zone down at that moment
    learns at its next lookup, and the move goes on to its delete."""
    store, fake, mid = await setup(tmp_path, Move(VM, B, C, B, 300, "rebalance"))
    real = fake.relearn_placement

    async def staying_zone_away(u: str, vm: str) -> None:
        if u == url(A):
            raise ZoneUnreachable(f"{u} is down")
        await real(u, vm)

    fake.relearn_placement = staying_zone_away  # type: ignore[method-assign]
    assert await run_to_end(mover(store, fake), mid) is MoveState.DONE
    assert await store.placement(VM) == (A, C)
    assert fake.relearned == [(url(C), VM)]
    assert VM not in fake.held[url(B)]


async def test_a_push_mirrored_to_the_old_copy_after_the_switch_is_kept(
        tmp_path: Path) -> None:
    """The primary learns the new placement late and mirrors one more push to the
    zone being moved away from: the mover copies it on before deleting that copy."""
    store, fake, mid = await setup(tmp_path, Move(VM, B, C, B, 300, "rebalance"))
    late = SnapshotView("s3", True, {"root": 103, "disk0": 203})
    listed = fake.snapshots

    async def snapshots(u: str, vm: str) -> list[SnapshotView] | None:
        m = await store.move(mid)
        assert m is not None
        if m.step is MoveStep.DELETE and late not in fake.held[url(B)][VM]:
            for z in (A, B):
                fake.held[url(z)][VM].append(late)
        return await listed(u, vm)

    fake.snapshots = snapshots  # type: ignore[method-assign]
    assert await run_to_end(mover(store, fake), mid) is MoveState.DONE
    assert late in fake.held[url(C)][VM] and VM not in fake.held[url(B)]
    assert [u for c, u in fake.calls if c == "sync"] == [url(B), url(B)]


async def test_the_old_copy_is_not_deleted_while_it_holds_more(tmp_path: Path) -> None:
    """Each time the mover deletes, a new push has just reached the old copy: the
    zone refuses, the move retries and ends keeping the extra copy, never fewer."""
    store, fake, mid = await setup(tmp_path, Move(VM, B, C, B, 300, "rebalance"))
    drop = fake.delete_vm
    late: list[SnapshotView] = []

    async def delete_vm(u: str, vm: str,
                        elsewhere: Sequence[SnapshotView] | None = None) -> bool:
        s = SnapshotView(f"s{3 + len(late)}", True, {"root": 103 + len(late),
                                                     "disk0": 203 + len(late)})
        late.append(s)
        for z in (A, B):  # after the mover's last look: only the zone's check sees it
            fake.held[url(z)][VM].append(s)
        return await drop(u, vm, elsewhere)

    fake.delete_vm = delete_vm  # type: ignore[method-assign]
    assert await run_to_end(mover(store, fake, max_attempts=3), mid) is MoveState.DONE
    m = await store.move(mid)
    assert m is not None and m.error is not None and "not deleted" in m.error
    assert len(late) >= 2 and all(s in fake.held[url(B)][VM] for s in late)


async def test_moving_the_primary_makes_the_survivor_primary(tmp_path: Path) -> None:
    store, fake, mid = await setup(tmp_path, Move(VM, A, C, A, 300, "drain"))
    await store.set_zone_state(A, ZoneState.DRAINING)
    assert await run_to_end(mover(store, fake), mid) is MoveState.DONE
    assert await store.placement(VM) == (B, C)


async def test_repair_of_a_lost_copy_never_contacts_the_lost_zone(tmp_path: Path) -> None:
    store, fake, mid = await setup(tmp_path, Move(VM, B, C, A, 300, "lost"), lost=B)
    assert await run_to_end(mover(store, fake), mid) is MoveState.DONE
    assert await store.placement(VM) == (A, C)
    assert all(u != url(B) for _, u in fake.calls)
    assert fake.copies(VM) == 2


@pytest.mark.parametrize("crash_at", ["sync", "snapshots", "delete_vm"])
async def test_crash_at_any_step_then_resume_completes(tmp_path: Path, crash_at: str) -> None:
    store, fake, mid = await setup(tmp_path, Move(VM, B, C, B, 300, "rebalance"))
    await crash(store, fake, mid, crash_at)
    m = await store.move(mid)
    assert m is not None and m.state is MoveState.RUNNING
    # A new coordinator process: the scheduler picks the running move up.
    mv = mover(store, fake)
    assert await mv.schedule() == [mid]
    await mv.wait_idle()
    m = await store.move(mid)
    assert m is not None and m.state is MoveState.DONE, m
    assert await store.placement(VM) == (A, C)
    assert VM not in fake.held[url(B)] and fake.copies(VM) == 2


async def test_crash_after_switch_resumes_at_delete_without_copying_again(tmp_path: Path) -> None:
    store, fake, mid = await setup(tmp_path, Move(VM, B, C, B, 300, "rebalance"))
    await crash(store, fake, mid, "delete_vm")
    m = await store.move(mid)
    assert m is not None and m.step is MoveStep.DELETE and await store.placement(VM) == (A, C)
    fake.calls.clear()
    assert await run_to_end(mover(store, fake), mid) is MoveState.DONE
    assert "sync" not in [c for c, _ in fake.calls]


async def test_copy_failing_rolls_back_and_removes_the_partial_copy(tmp_path: Path) -> None:
    store, fake, mid = await setup(tmp_path, Move(VM, B, C, B, 300, "rebalance"))
    fake.put(C, VM, SNAPS[:1])  # what a cut-off copy left behind
    fake.sync_results = ["failing", "blocked", "no_peer"]
    assert await run_to_end(mover(store, fake, max_attempts=3), mid) is MoveState.FAILED
    m = await store.move(mid)
    assert m is not None and m.error is not None and "gave up after 3" in m.error
    assert await store.placement(VM) == (A, B)
    assert VM not in fake.held[url(C)] and fake.copies(VM) == 2


async def test_behind_then_in_sync_is_retried(tmp_path: Path) -> None:
    store, fake, mid = await setup(tmp_path, Move(VM, B, C, B, 300, "rebalance"))
    fake.sync_results = ["behind"]
    assert await run_to_end(mover(store, fake), mid) is MoveState.DONE
    m = await store.move(mid)
    assert m is not None and m.attempts == 2


async def test_a_bad_copy_is_not_switched_to_but_copied_again(tmp_path: Path) -> None:
    store, fake, mid = await setup(tmp_path, Move(VM, B, C, B, 300, "rebalance"))
    fake.corrupt_next_copy = True
    mv = mover(store, fake)
    m = await store.move(mid)
    assert m is not None
    m = await mv.execute(m)
    assert m.state is MoveState.RUNNING and m.error is not None and "guids differ" in m.error
    assert await store.placement(VM) == (A, B) and VM in fake.held[url(B)]
    assert await run_to_end(mv, mid) is MoveState.DONE
    assert await store.placement(VM) == (A, C)


async def test_target_lost_before_switch_rolls_back(tmp_path: Path) -> None:
    store, fake, mid = await setup(tmp_path, Move(VM, B, C, B, 300, "rebalance"))
    await crash(store, fake, mid, "snapshots")
    await store.set_zone_state(C, ZoneState.LOST)
    assert await run_to_end(mover(store, fake), mid) is MoveState.FAILED
    assert await store.placement(VM) == (A, B) and VM in fake.held[url(B)]
    assert all(u != url(C) for _, u in fake.calls[-3:])  # a lost zone is not contacted


async def test_placement_changed_under_the_move_rolls_back(tmp_path: Path) -> None:
    store, fake, mid = await setup(tmp_path, Move(VM, B, C, B, 300, "rebalance"))
    other = await store.add_moves([Move(VM, B, D, B, 300, "rebalance")], 1.0)
    assert await run_to_end(mover(store, fake), other[0].id) is MoveState.DONE
    assert await run_to_end(mover(store, fake), mid) is MoveState.FAILED
    assert await store.placement(VM) == (A, D) and fake.copies(VM) == 2
    assert VM not in fake.held.get(url(C), {})


async def test_delete_waits_while_the_new_copy_does_not_answer(tmp_path: Path) -> None:
    store, fake, mid = await setup(tmp_path, Move(VM, B, C, B, 300, "rebalance"))
    await crash(store, fake, mid, "delete_vm")
    fake.down.add(url(C))
    m = await store.move(mid)
    assert m is not None
    m = await mover(store, fake, max_attempts=1).execute(m)
    assert m.state is MoveState.RUNNING and VM in fake.held[url(B)]
    fake.down.clear()
    assert await run_to_end(mover(store, fake), mid) is MoveState.DONE


async def _dies(store: SqliteStore, fake: FakeZones, zone: str, noticed: bool) -> None:
    """``zone`` stops answering; its copy no longer counts.  ``noticed``: the health
    checks have seen it (suspect), else it is dead but not yet suspected."""
    fake.down.add(url(zone))
    fake.lost.add(url(zone))
    if noticed:
        await store.set_zone_health(zone, last_seen=1.0, suspect_since=2.0)


@pytest.mark.parametrize("noticed", [True, False])
async def test_a_rolled_back_copy_is_kept_while_a_placed_zone_is_down(
        tmp_path: Path, noticed: bool) -> None:
    """The source dies after its copy reached the target: the move gives up, but the
    target's copy is now one of the VM's two live copies (the placed survivor's the
    other), so rolling back must not delete it."""
    store, fake, mid = await setup(tmp_path, Move(VM, B, C, B, 300, "rebalance"))
    copy = fake.sync

    async def sync(u: str, vm: str, peer: str, bwlimit: float | None = None) -> SyncResult:
        res = await copy(u, vm, peer, bwlimit)
        await _dies(store, fake, B, noticed)
        return res

    fake.sync = sync  # type: ignore[method-assign]
    assert await run_to_end(mover(store, fake, max_attempts=3), mid) is MoveState.FAILED
    m = await store.move(mid)
    assert m is not None and m.error is not None and f"partial copy on {C} kept" in m.error
    assert await store.placement(VM) == (A, B)
    assert VM in fake.held[url(C)] and fake.copies(VM) == 2
    assert ("delete_vm", url(C)) not in fake.calls


@pytest.mark.parametrize("noticed", [True, False])
async def test_the_old_copy_is_kept_while_the_placed_survivor_is_down(
        tmp_path: Path, noticed: bool) -> None:
    """After the switch (A, B) -> (A, C), A dies: the old copy on B and the new one on
    C are the two live copies, so the old one is not deleted."""
    store, fake, mid = await setup(tmp_path, Move(VM, B, C, B, 300, "rebalance"))
    await crash(store, fake, mid, "delete_vm")
    assert await store.placement(VM) == (A, C)
    await _dies(store, fake, A, noticed)
    fake.calls.clear()
    assert await run_to_end(mover(store, fake, max_attempts=3), mid) is MoveState.DONE
    m = await store.move(mid)
    assert m is not None and m.error is not None and f"old copy on {B} kept" in m.error
    assert VM in fake.held[url(B)] and VM in fake.held[url(C)] and fake.copies(VM) == 2
    assert ("delete_vm", url(B)) not in fake.calls


async def test_per_zone_concurrency_limit(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    for z in (A, B, C, D):
        await store.upsert_zone(reg(z), 0.0)
        await store.set_zone_state(z, ZoneState.ACTIVE)  # admitted
    fake = FakeZones()
    fake.gate = asyncio.Event()
    vms = [f"74c59c61-4559-4ca2-b1ef-0ca22f2f93{i:02x}" for i in range(6)]
    for vm in vms:
        fake.put(A, vm, SNAPS)
        fake.put(B, vm, SNAPS)
        await store.place(vm, (A, B), 1)
    await store.add_moves([Move(vm, B, C, B, 1, "rebalance") for vm in vms], 1.0)
    mv = mover(store, fake, per_zone=2)
    runner = asyncio.create_task(mv.run())
    mv.kick()
    await wait_for(lambda: fake.syncing == 2, 10, "two copies in flight")
    assert len(await mv.schedule()) == 0  # the limit holds
    fake.gate.set()
    await wait_for(lambda: all(vm not in fake.held[url(B)] for vm in vms), 10, "all moved")
    await mv.wait_idle()
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    assert fake.peak_syncing == 2 and mv.peak_busy[C] == 2
    assert {m.state for m in await store.moves()} == {MoveState.DONE}
    assert set((await store.placements()).values()) == {(A, C)}


snap_st = st.builds(lambda n, g, c: SnapshotView(f"s{n}", c, {"root": g}),
                    st.integers(0, 5), st.integers(1, 3), st.booleans())


@given(st.lists(snap_st, max_size=6, unique_by=lambda s: s.name), st.data())
def test_verify_copy_by_guid(source: list[SnapshotView], data: st.DataObject) -> None:
    assert verify_copy(source, source) == []
    complete = [s for s in source if s.complete]
    # incomplete source snapshots are not owed
    assert verify_copy(source, complete) == []
    if complete:
        victim = data.draw(st.sampled_from(complete))
        dropped = [s for s in source if s is not victim]
        assert verify_copy(source, dropped) == [f"{victim.name}: missing"]
        changed = [replace(s, guids={"root": 999}) if s is victim else s for s in source]
        assert verify_copy(source, changed) == [f"{victim.name}: guids differ"]
        half = [replace(s, complete=False) if s is victim else s for s in source]
        assert verify_copy(source, half) == [f"{victim.name}: incomplete"]


async def test_moves_are_paced_to_the_zone_bandwidth_share(tmp_path: Path) -> None:
    """moves.bandwidth is per zone: each of the per_zone moves a zone runs at once
    asks its source for that share."""
    store, fake, mid = await setup(tmp_path, Move(VM, B, C, B, 300, "rebalance"))
    s = MoverSettings(retry_delay=0.0, progress_interval=60.0, per_zone=4,
                      bandwidth=100e6)
    assert await run_to_end(Mover(store, fake, s), mid) is MoveState.DONE
    assert fake.bwlimits == [25e6]
    (tmp_path / "unlimited").mkdir()
    store2, fake2, mid2 = await setup(tmp_path / "unlimited",
                                      Move(VM, B, C, B, 300, "rebalance"))
    assert await run_to_end(mover(store2, fake2), mid2) is MoveState.DONE
    assert fake2.bwlimits == [None]
