"""The coordinator's store contract, on both backends (SQLite and ZooKeeper):
atomic mutations, refusals, survival of a reopen, racing writers.

``backend`` opens stores of one kind on one place: a SQLite file, or a chroot
of the session's private ZooKeeper (``conftest.zookeeper``; skipped with the
reason where java or the jars are missing).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kazoo.client import KazooClient

from rebalance.coordinator import parse_config
from rebalance.placement import Move, ZoneState
from rebalance.store import (
    MoveState,
    MoveStep,
    PlacementConflict,
    PolicyNotFound,
    SqliteStore,
    Store,
    StoreUnavailable,
    ZkStore,
    ZkTarget,
    ZoneNotEmpty,
    ZoneNotFound,
    ZoneRegistration,
    open_store,
    parse_zk_url,
)
from rebalance.store.zookeeper import vm_bucket
from snapper_zone.common.config import ConfigError
from snapper_zone.fleet.local import free_port
from snapper_zone.fleet.zookeeper import LocalZooKeeper
from tests.helpers import Cable, wait_until

A, B, C = (f"00000000-0000-4000-8000-00000000000{i}" for i in (1, 2, 3))
VM = "74c59c61-4559-4ca2-b1ef-0ca22f2f936a"


def reg(zone: str, capacity: int = 100, port: int = 2222) -> ZoneRegistration:
    return ZoneRegistration(uuid=zone, name=f"z{zone[-1]}", ssh_host="127.0.0.1",
                            ssh_port=port, http_url="http://127.0.0.1:1", host_key="ssh-ed25519 X",
                            capacity=capacity)


class Backend:
    """Opens stores of one kind, all on the same place (so a reopen sees the state)."""

    def __init__(self, kind: str, tmp_path: Path, zk: LocalZooKeeper | None) -> None:
        self.kind, self.zk = kind, zk
        self.where: Path | ZkTarget = tmp_path / "c.db"
        if zk is not None:
            self.where = parse_zk_url(f"zk://{zk.hosts}/t-{uuid.uuid4().hex}")
        self.opened: list[Store] = []

    async def open(self) -> Store:
        s = await open_store(self.where, timeout=10.0)
        self.opened.append(s)
        return s


@pytest.fixture(params=["sqlite", "zookeeper"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    zk = request.getfixturevalue("zookeeper") if request.param == "zookeeper" else None
    b = Backend(request.param, tmp_path, zk)
    yield b
    for s in b.opened:
        with contextlib.suppress(Exception):  # a test may have closed it already
            await s.close()


async def test_register_is_idempotent_and_keeps_state(backend: Backend) -> None:
    s = await backend.open()
    z, created = await s.upsert_zone(reg(A), now=1.0)
    assert created and z.state is ZoneState.PENDING and z.health == "unknown"
    assert not z.admitted and not z.readable
    await s.set_zone_state(A, ZoneState.DRAINING)
    z, created = await s.upsert_zone(reg(A, capacity=200, port=2223), now=2.0)
    assert not created
    assert (z.capacity, z.ssh_port, z.state, z.registered) == (200, 2223, ZoneState.DRAINING, 1.0)
    assert [x.uuid for x in await s.zones()] == [A]
    await s.close()


async def test_state_survives_reopen(backend: Backend) -> None:
    s = await backend.open()
    await s.upsert_zone(reg(A), 1.0)
    await s.upsert_zone(reg(B), 1.0)
    await s.place(VM, (A, B), size=42)
    [m] = await s.add_moves([Move(VM, B, C, B, 42, "rebalance")], now=3.0)
    await s.update_move(m.id, 4.0, state=MoveState.RUNNING, step=MoveStep.COPY)
    await s.close()
    s2 = await backend.open()
    assert await s2.placements() == {VM: (A, B)}
    assert await s2.vm_sizes() == {VM: 42}
    [m2] = await s2.moves([MoveState.RUNNING])
    assert (m2.step, m2.started, m2.vm) == (MoveStep.COPY, 4.0, VM)
    [m3] = await s2.add_moves([Move(VM, A, C, A, 1, "rebalance")], now=5.0)
    assert m3.id > m2.id  # ids are never reused


async def test_sqlite_file_is_wal(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "c.db")
    await s.close()
    mode = sqlite3.connect(tmp_path / "c.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


async def test_place_first_answer_wins(backend: Backend) -> None:
    s = await backend.open()
    answers = await asyncio.gather(s.place(VM, (A, B)), s.place(VM, (C, A)))
    assert answers[0] == answers[1]
    with pytest.raises(ValueError):
        await s.place("11111111-1111-4111-8111-111111111111", (A, A))


async def test_delete_zone_refused_while_it_holds_a_copy_or_a_move(backend: Backend) -> None:
    s = await backend.open()
    for z in (A, B, C):
        await s.upsert_zone(reg(z), 1.0)
    await s.place(VM, (A, B))
    with pytest.raises(ZoneNotEmpty):
        await s.delete_zone(A)
    [m] = await s.add_moves([Move(VM, B, C, B, 1, "drain")], 2.0)
    with pytest.raises(ZoneNotEmpty):
        await s.delete_zone(C)  # an active move is filling it
    await s.switch_placement(m.id, VM, (A, B), (A, C), 3.0)
    with pytest.raises(ZoneNotEmpty):
        await s.delete_zone(B)  # the move has not deleted B's copy yet
    await s.update_move(m.id, 4.0, state=MoveState.DONE)
    await s.delete_zone(B)
    assert [z.uuid for z in await s.zones()] == [A, C]
    with pytest.raises(ZoneNotFound):
        await s.delete_zone(B)
    with pytest.raises(ZoneNotFound):
        await s.set_zone_state(B, ZoneState.LOST)


async def test_switch_is_atomic_with_the_step_and_checks_expected(backend: Backend) -> None:
    s = await backend.open()
    await s.place(VM, (A, B))
    [m] = await s.add_moves([Move(VM, B, C, B, 1, "rebalance")], 1.0)
    with pytest.raises(PlacementConflict):
        await s.switch_placement(m.id, VM, (B, A), (A, C), 2.0)
    assert (await s.move(m.id)).step is None  # type: ignore[union-attr]
    assert await s.placement(VM) == (A, B)
    m2 = await s.switch_placement(m.id, VM, (A, B), (A, C), 2.0)
    assert m2.step is MoveStep.DELETE and await s.placement(VM) == (A, C)


async def test_move_lifecycle_fields(backend: Backend) -> None:
    s = await backend.open()
    [m] = await s.add_moves([Move(VM, None, C, A, 1000, "add-copy")], 1.0)
    assert m.state is MoveState.PLANNED and m.active and m.to_json()["eta"] is None
    m = await s.update_move(m.id, 2.0, state=MoveState.RUNNING, step=MoveStep.COPY, attempt=True)
    m = await s.update_move(m.id, 4.0, progress=500, error="behind")
    assert m.eta(4.0) == pytest.approx(2.0)
    m = await s.update_move(m.id, 5.0, clear_error=True, state=MoveState.DONE)
    assert (m.error, m.finished, m.attempts, m.started) == (None, 5.0, 1, 2.0)
    assert not m.active
    assert await s.moves([MoveState.PLANNED]) == []
    assert await s.move(999) is None


zones_st = st.sampled_from([A, B, C])
vms_st = st.builds(lambda i: str(uuid.UUID(int=i, version=4)), st.integers(0, 5))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # a fresh place each

@given(ops=st.lists(st.tuples(vms_st, zones_st, zones_st, st.booleans()), max_size=30))
@pytest.mark.parametrize("kind", ["sqlite", "zookeeper"])
def test_placement_matches_a_dict_model(kind: str, request: pytest.FixtureRequest,
                                        tmp_path: Path,
                                        ops: list[tuple[str, str, str, bool]]) -> None:
    """place() and switch_placement() behave like a dict: first placement wins,
    a switch applies only over the expected pair, and a pair is never one zone."""
    zk = request.getfixturevalue("zookeeper") if kind == "zookeeper" else None

    async def run() -> None:
        s = await open_store(Backend(kind, tmp_path / uuid.uuid4().hex, zk).where)
        model: dict[str, tuple[str, str]] = {}
        [m] = await s.add_moves([Move(VM, None, A, B, 0, "add-copy")], 0.0)
        for vm, z1, z2, switch in ops:
            if z1 == z2:
                with pytest.raises(ValueError):
                    await s.place(vm, (z1, z2))
                continue
            if switch and vm in model:
                expected = model[vm]
                await s.switch_placement(m.id, vm, expected, (z1, z2), 1.0)
                model[vm] = (z1, z2)
            else:
                got = await s.place(vm, (z1, z2))
                assert got == model.setdefault(vm, (z1, z2))
        assert await s.placements() == dict(sorted(model.items()))
        await s.close()

    asyncio.run(run())


# -- two coordinators on one store ------------------------------------------------------


async def test_racing_reassigns_one_wins(backend: Backend) -> None:
    """Two store clients (two coordinators) change the same placements at once:
    for each VM exactly one wins, the other gets PlacementConflict, nothing half."""
    s1, s2 = await backend.open(), await backend.open()
    vms = [str(uuid.UUID(int=i, version=4)) for i in range(20)]
    for vm in vms:
        await s1.place(vm, (A, B))
    got = await asyncio.gather(*(x for vm in vms for x in (
        s1.reassign(vm, (A, B), (A, C)), s2.reassign(vm, (A, B), (C, B)))),
        return_exceptions=True)
    placed = await s2.placements()
    for i, vm in enumerate(vms):
        one, two = got[2 * i], got[2 * i + 1]
        assert [one, two].count(None) == 1, (one, two)
        loser = two if one is None else one
        assert isinstance(loser, PlacementConflict) and loser.http_status == 409
        assert placed[vm] == ((A, C) if one is None else (C, B))


async def test_racing_switches_one_wins_and_the_loser_keeps_its_step(backend: Backend) -> None:
    s1, s2 = await backend.open(), await backend.open()
    for z in (A, B, C):
        await s1.upsert_zone(reg(z), 1.0)
    await s1.place(VM, (A, B))
    m1, m2 = await s1.add_moves([Move(VM, B, C, B, 1, "rebalance"),
                                 Move(VM, A, C, A, 1, "rebalance")], 2.0)
    await s1.update_move(m1.id, 2.5, state=MoveState.RUNNING, step=MoveStep.VERIFY)
    await s1.update_move(m2.id, 2.5, state=MoveState.RUNNING, step=MoveStep.VERIFY)
    one, two = await asyncio.gather(s1.switch_placement(m1.id, VM, (A, B), (A, C), 3.0),
                                    s2.switch_placement(m2.id, VM, (A, B), (B, C), 3.0),
                                    return_exceptions=True)
    assert sum(isinstance(x, PlacementConflict) for x in (one, two)) == 1, (one, two)
    won, lost = (m1, m2) if isinstance(two, PlacementConflict) else (m2, m1)
    assert (await s2.move(won.id)).step is MoveStep.DELETE  # type: ignore[union-attr]
    assert (await s2.move(lost.id)).step is MoveStep.VERIFY  # type: ignore[union-attr]
    assert await s1.placement(VM) == ((A, C) if won is m1 else (B, C))
    # The zone the winner dropped stays held while its move is active, and is
    # let go once the move is done: the refusal follows the same transaction.
    dropped = B if won is m1 else A
    with pytest.raises(ZoneNotEmpty):
        await s2.delete_zone(dropped)
    await s1.update_move(lost.id, 4.0, state=MoveState.FAILED)
    await s1.update_move(won.id, 4.0, state=MoveState.DONE)
    await s2.delete_zone(dropped)


async def test_move_ids_unique_across_clients(backend: Backend) -> None:
    s1, s2 = await backend.open(), await backend.open()
    batches = await asyncio.gather(*(s.add_moves([Move(VM, A, B, A, 1, "rebalance")] * 3, 1.0)
                                     for s in (s1, s2, s1, s2)))
    ids = [m.id for b in batches for m in b]
    assert len(set(ids)) == 12
    assert [m.id for m in await s1.moves()] == sorted(ids)
    assert len(await s2.moves([MoveState.PLANNED])) == 12


# -- ZooKeeper out of reach ---------------------------------------------------------------


async def test_a_lost_connection_and_session_are_typed_not_a_hang(
        zookeeper: LocalZooKeeper) -> None:
    cable = Cable(zookeeper.port)
    await cable.mend()
    s = await ZkStore.open(f"127.0.0.1:{cable.port}", f"/t-{uuid.uuid4().hex}",
                           timeout=1.0, session_timeout=2.0)
    # A direct client sees the session expire on the ensemble: the ephemeral
    # node the store's session owns goes with it.
    marker = f"/session-{uuid.uuid4().hex}"
    watcher = KazooClient(hosts=f"127.0.0.1:{zookeeper.port}")
    await asyncio.to_thread(watcher.start, 10)
    try:
        await s.place(VM, (A, B))
        await asyncio.to_thread(s._zk.create, marker, ephemeral=True)
        await cable.cut()
        loop = asyncio.get_running_loop()
        for call in (s.placement(VM), s.reassign(VM, (A, B), (A, C)), s.zones()):
            t0 = loop.time()
            with pytest.raises(StoreUnavailable) as e:
                await call
            assert loop.time() - t0 < 3.0  # the store's timeout, not a hang
            assert (e.value.http_status, e.value.to_json()["code"]) == (503, "StoreUnavailable")
        # Past the session timeout the ensemble has expired the session; once it
        # answers again kazoo learns it, opens a new one, and the store works on.
        # The ensemble expires the session by its clock, with no event the cut-off
        # client could see: wait until the ensemble has dropped it, then mend.
        async def expired() -> bool:
            return await asyncio.to_thread(watcher.exists, marker) is None

        await wait_until(expired, 20, "the ensemble expired the cut-off session")
        await cable.mend()
        deadline = loop.time() + 20
        while True:
            try:
                got = await s.placement(VM)
                break
            except StoreUnavailable:
                assert loop.time() < deadline, "the store did not come back"
        assert got == (A, B)  # the failed reassign changed nothing
        assert s.sessions_lost == 1
    finally:
        await s.close()
        await asyncio.to_thread(watcher.stop)
        await asyncio.to_thread(watcher.close)
        if cable.server is not None:
            cable.server.close()


async def test_no_ensemble_at_open_is_unavailable() -> None:
    with pytest.raises(StoreUnavailable):
        await ZkStore.open(f"127.0.0.1:{free_port()}", timeout=1.0)


# -- the config's store field --------------------------------------------------------------


def test_store_url_parses_and_refuses() -> None:
    t = parse_zk_url("zk://10.0.0.1:2181,10.0.0.2:2181/snapper/east")
    assert (t.hosts, t.chroot) == ((("10.0.0.1", 2181), ("10.0.0.2", 2181)), "/snapper/east")
    assert str(t) == "zk://10.0.0.1:2181,10.0.0.2:2181/snapper/east"
    assert parse_zk_url("zk://h:1").chroot == "/snapper"
    for bad in ("zk://h/x", "zk://:1/x", "zk://h:0", "zk://h:1//x", "zk://h:1/a/../b", "h:1"):
        with pytest.raises(ValueError):
            parse_zk_url(bad)


@given(st.lists(st.tuples(st.from_regex(r"[a-z0-9.-]{1,20}", fullmatch=True),
                          st.integers(1, 65535)), min_size=1, max_size=5),
       st.lists(st.from_regex(r"[a-z0-9_-]{1,10}", fullmatch=True), min_size=1, max_size=3))
def test_store_url_round_trips(hosts: list[tuple[str, int]], parts: list[str]) -> None:
    t = ZkTarget(tuple(hosts), "/" + "/".join(parts))
    assert parse_zk_url(str(t)) == t


def test_config_store_is_a_path_or_a_zookeeper(tmp_path: Path) -> None:
    assert parse_config({"store": "c.db"}, base=tmp_path).store == tmp_path / "c.db"
    zk = parse_config({"store": "zk://127.0.0.1:2181/snapper"}).store
    assert zk == ZkTarget((("127.0.0.1", 2181),), "/snapper")
    with pytest.raises(ConfigError, match="store"):
        parse_config({"store": "zk://nowhere/snapper"})


KINDS = ("place", "reassign", "move", "finish", "delete", "register")


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # a fresh place each
@given(ops=st.lists(st.tuples(st.sampled_from(KINDS), vms_st, zones_st, zones_st,
                              st.booleans()), max_size=25))
@pytest.mark.parametrize("kind", ["sqlite", "zookeeper"])
def test_zone_removal_matches_a_model(kind: str, request: pytest.FixtureRequest,
                                      tmp_path: Path,
                                      ops: list[tuple[str, str, str, str, bool]]) -> None:
    """A zone is removed exactly when no placement and no active move names it,
    whatever placements, reassigns and moves came before (on ZooKeeper: the
    refs bookkeeping every transaction carries)."""
    zk = request.getfixturevalue("zookeeper") if kind == "zookeeper" else None

    async def run() -> None:
        s = await open_store(Backend(kind, tmp_path / uuid.uuid4().hex, zk).where)
        placed: dict[str, tuple[str, str]] = {}
        active: list[tuple[int, set[str]]] = []
        zones: set[str] = set()
        for op, vm, z1, z2, flag in ops:
            if op == "register":
                await s.upsert_zone(reg(z1), 1.0)
                zones.add(z1)
            elif op == "place" and z1 != z2:
                assert await s.place(vm, (z1, z2)) == placed.setdefault(vm, (z1, z2))
            elif op == "reassign" and z1 != z2:
                expected = placed.get(vm, (A, B))
                if not flag:
                    expected = (expected[1], expected[0])  # the wrong order: not it
                if placed.get(vm) == expected:
                    await s.reassign(vm, expected, (z1, z2))
                    placed[vm] = (z1, z2)
                else:
                    with pytest.raises(PlacementConflict):
                        await s.reassign(vm, expected, (z1, z2))
            elif op == "move":
                move = Move(vm, z1 if flag else None, z2, z1, 1, "rebalance")
                [m] = await s.add_moves([move], 1.0)
                active.append((m.id, {z1, z2}))
            elif op == "finish" and active:
                move_id, _ = active.pop(0 if flag else -1)
                await s.update_move(move_id, 2.0, state=MoveState.DONE if flag
                                    else MoveState.FAILED)
            elif op == "delete":
                named = any(z1 in p for p in placed.values()) or any(
                    z1 in zs for _, zs in active)
                if z1 not in zones:
                    with pytest.raises(ZoneNotFound):
                        await s.delete_zone(z1)
                elif named:
                    with pytest.raises(ZoneNotEmpty):
                        await s.delete_zone(z1)
                else:
                    await s.delete_zone(z1)
                    zones.discard(z1)
        assert await s.placements() == dict(sorted(placed.items()))
        assert {z.uuid for z in await s.zones()} == zones
        assert [m.id for m in await s.moves([MoveState.PLANNED])] == sorted(
            i for i, _ in active)
        await s.close()

    asyncio.run(run())


async def test_many_writers_on_one_bucket_all_land(backend: Backend) -> None:
    """VMs sharing a ZooKeeper bucket, placed and reassigned at once by two
    clients: every write lands once (a bucket race is retried, not a conflict)."""
    vms: list[str] = []
    while len(vms) < 12:
        vm = str(uuid.uuid4())
        if vm_bucket(vm) == "000":
            vms.append(vm)
    s1, s2 = await backend.open(), await backend.open()
    await asyncio.gather(*(s.place(vm, (A, B), size=i)
                           for i, vm in enumerate(vms) for s in (s1, s2)))
    await asyncio.gather(*((s1 if i % 2 else s2).reassign(vm, (A, B), (B, C))
                           for i, vm in enumerate(vms)))
    assert await s1.placements() == {vm: (B, C) for vm in sorted(vms)}
    assert await s2.vm_sizes() == {vm: i for i, vm in enumerate(vms)}


async def test_large_writes_are_whole(backend: Backend) -> None:
    """More sizes and moves than one ZooKeeper request holds: all recorded."""
    s = await backend.open()
    vms = [str(uuid.UUID(int=i, version=4)) for i in range(300)]
    await asyncio.gather(*(s.place(vm, (A, B)) for vm in vms))
    await s.set_sizes({vm: 1000 + i for i, vm in enumerate(vms)} | {VM: 5})  # VM: unplaced
    assert await s.vm_sizes() == {vm: 1000 + i for i, vm in enumerate(vms)}
    added = await s.add_moves([Move(vm, B, C, B, 1, "rebalance") for vm in vms] * 2, 1.0)
    ids = [m.id for m in added]
    assert len(set(ids)) == 600 and ids == sorted(ids)
    assert [m.id for m in await s.moves([MoveState.PLANNED])] == ids
    await s.upsert_zone(reg(C), 1.0)
    with pytest.raises(ZoneNotEmpty, match="0 VM copies and is part of 600 active moves"):
        await s.delete_zone(C)


# -- history: pages, counts, pruning ----------------------------------------------------


async def test_move_pages_counts_and_pruning(backend: Backend) -> None:
    """Pages by id with a marker, counts by state, and pruning of finished moves
    (older than the cut-off and beyond the newest ``keep``), the active never."""
    s = await backend.open()
    ms = await s.add_moves([Move(VM, None, C, A, i, "add-copy") for i in range(7)], 1.0)
    ids = [m.id for m in ms]
    # 0, 1, 2 done at t=10, 11, 12; 3 failed at 13; 4 running; 5, 6 planned.
    for i, m in enumerate(ms[:4]):
        await s.update_move(m.id, 5.0, state=MoveState.RUNNING)
        await s.update_move(m.id, 10.0 + i, state=MoveState.DONE if i < 3 else MoveState.FAILED)
    await s.update_move(ids[4], 20.0, state=MoveState.RUNNING)
    assert await s.move_counts() == {MoveState.PLANNED: 2, MoveState.RUNNING: 1,
                                     MoveState.DONE: 3, MoveState.FAILED: 1}
    assert [m.id for m in await s.moves(limit=3)] == ids[:3]
    assert [m.id for m in await s.moves(after=ids[2], limit=3)] == ids[3:6]
    assert [m.id for m in await s.moves(after=ids[5], limit=3)] == ids[6:]
    assert [m.id for m in await s.moves([MoveState.DONE], after=ids[0])] == ids[1:3]
    assert [m.id for m in await s.moves([MoveState.FAILED])] == [ids[3]]
    assert [m.id for m in await s.moves([MoveState.PLANNED], limit=1)] == [ids[5]]
    # Finished before t=12.5 are 0, 1, 2; the newest 2 finished (2 and 3) are kept.
    assert await s.prune_moves(12.5, keep=2) == 2
    assert [m.id for m in await s.moves()] == ids[2:]
    assert await s.prune_moves(100.0, keep=0) == 2  # the active ones stay
    assert [m.id for m in await s.moves()] == ids[4:]
    assert await s.move_counts() == {MoveState.PLANNED: 2, MoveState.RUNNING: 1,
                                     MoveState.DONE: 0, MoveState.FAILED: 0}
    [m] = await s.add_moves([Move(VM, None, C, A, 1, "add-copy")], 2.0)
    assert m.id > ids[-1]  # ids are never reused, pruned or not
    await s.close()


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(finish=st.lists(st.sampled_from([None, "done", "failed"]), max_size=12),
       limit=st.integers(1, 5), state=st.sampled_from([None, "done", "planned"]))
@pytest.mark.parametrize("kind", ["sqlite", "zookeeper"])
def test_pages_make_the_whole_list(kind: str, request: pytest.FixtureRequest, tmp_path: Path,
                                   finish: list[str | None], limit: int,
                                   state: str | None) -> None:
    """Following the marker page by page lists each move once, in id order."""
    zk = request.getfixturevalue("zookeeper") if kind == "zookeeper" else None

    async def run() -> None:
        s = await open_store(Backend(kind, tmp_path / uuid.uuid4().hex, zk).where)
        ms = await s.add_moves([Move(VM, None, C, A, 1, "add-copy") for _ in finish], 1.0)
        for m, f in zip(ms, finish, strict=True):
            if f is not None:
                await s.update_move(m.id, 2.0, state=MoveState(f))
        states = None if state is None else [MoveState(state)]
        pages: list[int] = []
        after = None
        while page := await s.moves(states, after=after, limit=limit):
            assert len(page) <= limit
            pages += [m.id for m in page]
            after = page[-1].id
        assert pages == [m.id for m in await s.moves(states)]
        assert len(pages) == sum(1 for f in finish if (f or "planned") == (state or f or
                                                                            "planned"))
        await s.close()

    asyncio.run(run())


async def test_a_zookeeper_store_without_the_failed_index_gets_it_at_open(
        zookeeper: LocalZooKeeper) -> None:
    """A store laid out before ``failed/`` existed: the index is built once at open."""
    where = parse_zk_url(f"zk://{zookeeper.hosts}/t-{uuid.uuid4().hex}")
    s = await open_store(where)
    ms = await s.add_moves([Move(VM, None, C, A, 1, "add-copy") for _ in range(3)], 1.0)
    await s.update_move(ms[0].id, 2.0, state=MoveState.FAILED)
    await s.update_move(ms[1].id, 2.0, state=MoveState.DONE)
    await s.close()
    old = KazooClient(hosts=zookeeper.hosts)
    await asyncio.to_thread(old.start, 10)
    try:
        await asyncio.to_thread(old.delete, f"{where.chroot}/failed", recursive=True)
    finally:
        await asyncio.to_thread(old.stop)
        await asyncio.to_thread(old.close)
    s = await open_store(where)
    try:
        assert await s.move_counts() == {MoveState.PLANNED: 1, MoveState.RUNNING: 0,
                                         MoveState.DONE: 1, MoveState.FAILED: 1}
        assert [m.id for m in await s.moves([MoveState.FAILED])] == [ms[0].id]
    finally:
        await s.close()


async def test_policies_are_kept_versioned_and_removed(backend: Backend) -> None:
    s = await backend.open()
    assert await s.policies() == [] and await s.policy("p") is None
    doc = {"policy": [{"name": "a", "vms": ["*"], "retention": {"grid": "24x1h"},
                       "level": [{"name": "hourly", "every": "1h"}]}]}
    first = await s.put_policy("p", doc, "operator op", 10.0)
    assert (first.version, first.updated, first.updated_by) == (1, 10.0, "operator op")
    second = await s.put_policy("p", {**doc, "x": 1}, "operator op", 11.0)
    assert second.version == 2
    await s.put_policy("another", doc, "operator op", 12.0)
    again = await backend.open()  # a reopen (another coordinator) sees it all
    assert [(r.name, r.version) for r in await again.policies()] == [("another", 1), ("p", 2)]
    got = await again.policy("p")
    assert got is not None and got.document == {**doc, "x": 1} and got.updated == 11.0
    await again.delete_policy("p")
    assert await s.policy("p") is None
    with pytest.raises(PolicyNotFound):
        await s.delete_policy("p")
    assert [r.name for r in await s.policies()] == ["another"]


async def test_racing_policy_writers_all_land_with_distinct_versions(backend: Backend) -> None:
    one, two = await backend.open(), await backend.open()

    async def writes(s: Store, who: str) -> list[int]:
        return [(await s.put_policy("p", {"n": i}, who, float(i))).version for i in range(8)]

    a, b = await asyncio.gather(writes(one, "a"), writes(two, "b"))
    assert sorted(a + b) == list(range(1, 17))
    got = await one.policy("p")
    assert got is not None and got.version == 16
