"""Several coordinators on one store: the election and the fencing of a leader's writes.

On the session's private ZooKeeper (``conftest.zookeeper``): candidates are
ephemeral sequential znodes, the lowest leads, and a fenced view's every
transaction checks the leader's own znode first, so a write of a term that is
over fails whole (``NotLeader``) and changes nothing. On SQLite one process is
always the leader and a fenced view is the store itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from kazoo.client import KazooClient

from rebalance.cli import status_text
from rebalance.coordinator import Coordinator, CoordinatorConfig, make_app, parse_config
from rebalance.placement import Move, ZoneState
from rebalance.store import (
    Candidate,
    Fence,
    MoveState,
    MoveStep,
    NotLeader,
    SoloElection,
    SqliteStore,
    Store,
    ZkStore,
    ZoneRegistration,
)
from rebalance.store.zookeeper import ZkElection, _seq
from rebalance.zoneclient import HttpZoneApi
from snapper_zone.cli import main as cli_main
from snapper_zone.common.config import ConfigError, parse_keys
from snapper_zone.common.httpsig import Signer
from snapper_zone.fleet.zookeeper import LocalZooKeeper
from tests.helpers import Cable, wait_until

A, B, C = (f"00000000-0000-4000-8000-00000000000{i}" for i in (1, 2, 3))
VM = "74c59c61-4559-4ca2-b1ef-0ca22f2f936a"
VM2 = "84c59c61-4559-4ca2-b1ef-0ca22f2f936a"


def reg(zone: str, capacity: int = 100) -> ZoneRegistration:
    return ZoneRegistration(uuid=zone, name=f"z{zone[-1]}", ssh_host="127.0.0.1",
                            ssh_port=2222, http_url="http://127.0.0.1:1",
                            host_key="ssh-ed25519 X", capacity=capacity)


def me(i: int) -> Candidate:
    return Candidate(f"c{i}", f"http://127.0.0.1:{9000 + i}")


@pytest.fixture
async def chroot(zookeeper: LocalZooKeeper) -> AsyncIterator[Callable[..., Awaitable[ZkStore]]]:
    """Opens stores (each its own session: a coordinator) on one fresh chroot."""
    where = f"/t-{uuid.uuid4().hex}"
    opened: list[ZkStore] = []

    async def open_one(hosts: str | None = None, **kw: Any) -> ZkStore:
        s = await ZkStore.open(hosts or zookeeper.hosts, where, timeout=5.0, **kw)
        opened.append(s)
        return s

    yield open_one
    for s in opened:
        with contextlib.suppress(Exception):  # a test may have closed it already
            await s.close()


async def _fill(s: Store) -> int:
    """Zones, a placement, sizes and a move at step verify: something to change."""
    for z in (A, B, C):
        await s.upsert_zone(reg(z), 1.0)
        await s.set_zone_state(z, ZoneState.ACTIVE)
    await s.place(VM, (A, B), size=10)
    [m] = await s.add_moves([Move(VM, B, C, B, 10, "rebalance")], 2.0)
    await s.update_move(m.id, 3.0, state=MoveState.RUNNING, step=MoveStep.VERIFY)
    return m.id


async def _snapshot(s: Store) -> tuple[Any, ...]:
    return (await s.zones(), await s.placements(), await s.vm_sizes(), await s.moves())


def _mutations(s: Store, move_id: int) -> list[tuple[str, Callable[[], Awaitable[object]]]]:
    """Every kind of store write, each one that would change something."""
    return [
        ("register a new zone", lambda: s.upsert_zone(reg("00000000-0000-4000-8000-000000000009"),
                                                      5.0)),
        ("update a zone", lambda: s.upsert_zone(reg(A, capacity=7), 5.0)),
        ("rekey", lambda: s.set_host_key(A, "ssh-ed25519 Y")),
        ("zone state", lambda: s.set_zone_state(C, ZoneState.LOST)),
        ("health verdict", lambda: s.set_zone_health(C, last_seen=None, suspect_since=5.0)),
        ("remove a zone", lambda: s.delete_zone(C)),  # named by the move: refused anyway
        ("place", lambda: s.place(VM2, (A, C))),
        ("sizes", lambda: s.set_sizes({VM: 99})),
        ("reassign", lambda: s.reassign(VM, (A, B), (A, C))),
        ("plan moves", lambda: s.add_moves([Move(VM, A, C, A, 1, "rebalance")], 5.0)),
        ("move step", lambda: s.update_move(move_id, 5.0, step=MoveStep.COPY, progress=5)),
        ("finish a move", lambda: s.update_move(move_id, 5.0, state=MoveState.FAILED)),
        ("switch placement", lambda: s.switch_placement(move_id, VM, (A, B), (A, C), 5.0)),
    ]


async def test_a_fenced_write_of_an_ended_term_fails_whole(
        chroot: Callable[..., Awaitable[ZkStore]]) -> None:
    """The leader resigns (its znode goes, its client lives on): every write of
    its old term is NotLeader and changes nothing; a new term's view writes."""
    s = await chroot()
    move_id = await _fill(s)
    e = s.election(me(1))
    fence = await asyncio.wait_for(e.campaign(), 10)
    view = s.fenced(fence)
    await view.set_zone_health(A, last_seen=4.0, suspect_since=None)  # the term writes
    await e.resign()
    before = await _snapshot(s)
    for what, write in _mutations(view, move_id):
        with pytest.raises(NotLeader) as err:
            await write()
        assert (err.value.http_status, err.value.code) == (503, "NotLeader"), what
        assert await _snapshot(s) == before, f"{what}: a stale term changed the store"
    # The unfenced store (a follower's HTTP writes) is not affected ...
    await s.set_zone_health(A, last_seen=6.0, suspect_since=None)
    # ... and a new term writes through its own fence.
    fence2 = await asyncio.wait_for(e.campaign(), 10)
    assert fence2.path != fence.path
    await s.fenced(fence2).reassign(VM, (A, B), (B, A))
    assert await s.placement(VM) == (B, A)


async def test_a_step_started_under_an_expired_session_cannot_commit(
        zookeeper: LocalZooKeeper, chroot: Callable[..., Awaitable[ZkStore]]) -> None:
    """The real case: the leader is cut off from ZooKeeper past its session
    timeout; a follower takes over; when the old leader's client is back (with a
    new session) its in-flight switch fails, and the new leader's commits."""
    cable = Cable(zookeeper.port)
    await cable.mend()
    old = await chroot(f"127.0.0.1:{cable.port}", session_timeout=2.0)
    new = await chroot(session_timeout=2.0)
    move_id = await _fill(new)
    e_old, e_new = old.election(me(1)), new.election(me(2))
    fence = await asyncio.wait_for(e_old.campaign(), 10)
    await e_new.join()
    stale = old.fenced(fence)
    watcher = KazooClient(hosts=zookeeper.hosts)
    await asyncio.to_thread(watcher.start, 10)
    try:
        loop = asyncio.get_running_loop()
        ended_at: list[float] = []
        term = asyncio.create_task(e_old.deposed(fence))
        term.add_done_callback(lambda _: ended_at.append(loop.time()))
        await cable.cut()
        t0 = loop.time()
        fence2 = await asyncio.wait_for(e_new.campaign(), 15)  # the follower takes over
        took = loop.time() - t0
        assert took < 2.0 + 3.0, f"failover took {took:.1f} s with a 2 s session"
        # The cut-off leader stopped its term (its connection suspended) before
        # the ensemble expired its session, so before the follower led.
        assert term.done() and ended_at[0] <= t0 + took
        assert await asyncio.to_thread(watcher.exists, fence.path) is None
        await cable.mend()

        async def back() -> bool:
            with contextlib.suppress(Exception):
                await old.zones()
                return True
            return False

        await wait_until(back, 20, "the old leader's client reconnected")
        before = await _snapshot(new)
        with pytest.raises(NotLeader):
            await stale.switch_placement(move_id, VM, (A, B), (A, C), 9.0)
        assert await _snapshot(new) == before
        got = await new.fenced(fence2).switch_placement(move_id, VM, (A, B), (A, C), 9.0)
        assert got.step is MoveStep.DELETE and await new.placement(VM) == (A, C)
        assert (await e_new.candidates())[0].id == "c2"  # who leads, as all see it
    finally:
        await asyncio.to_thread(watcher.stop)
        await asyncio.to_thread(watcher.close)
        if cable.server is not None:
            cable.server.close()


async def test_three_candidates_lead_in_turn(chroot: Callable[..., Awaitable[ZkStore]]) -> None:
    """The first to stand leads; the others wait in order; when the leader's
    session ends the next one leads at once (a clean close), and its term's
    deposed() returns when it resigns."""
    stores = [await chroot() for _ in range(3)]
    elections = [s.election(me(i)) for i, s in enumerate(stores)]
    for e in elections:
        await e.join()
    assert [c.id for c in await elections[2].candidates()] == ["c0", "c1", "c2"]
    f0 = await asyncio.wait_for(elections[0].campaign(), 10)
    waiting = [asyncio.create_task(e.campaign()) for e in elections[1:]]
    try:
        # Given time to stand, neither may win while c0 leads.
        done, _ = await asyncio.wait(waiting, timeout=0.5)
        assert not done
        gone = asyncio.create_task(elections[0].deposed(f0))
        await stores[0].close()  # its session ends: its znode goes with it
        f1 = await asyncio.wait_for(waiting[0], 10)
        assert not waiting[1].done()
        assert [c.id for c in await elections[2].candidates()] == ["c1", "c2"]
        await asyncio.wait_for(gone, 10)
        ended = asyncio.create_task(elections[1].deposed(f1))
        await elections[1].resign()
        await asyncio.wait_for(ended, 10)
        f2 = await asyncio.wait_for(waiting[1], 10)
        assert len({f0.path, f1.path, f2.path}) == 3  # a term per znode, never reused
        assert [c.id for c in await elections[2].candidates()] == ["c2"]
    finally:
        for t in waiting:
            t.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)


async def test_a_store_from_before_the_election_gets_its_directory(
        zookeeper: LocalZooKeeper) -> None:
    """A chroot laid out before election/ existed: standing creates it."""
    where = f"/t-{uuid.uuid4().hex}"
    s = await ZkStore.open(zookeeper.hosts, where, timeout=5.0)
    try:
        await asyncio.to_thread(s._zk.delete, f"{where}/election")
        e = s.election(me(0))
        fence = await asyncio.wait_for(e.campaign(), 10)
        assert fence.path.startswith(f"{where}/election/n-")
        assert isinstance(e, ZkElection) and not e.solo
    finally:
        await s.close()


async def test_sqlite_is_always_its_own_leader(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "c.db")
    try:
        assert s.fenced(Fence("/x", 3)) is s
        e = s.election(me(0))
        assert isinstance(e, SoloElection) and e.solo
        assert await asyncio.wait_for(e.campaign(), 1) == SoloElection.FENCE
        assert await e.candidates() == [me(0)]
        ended = asyncio.create_task(e.deposed(SoloElection.FENCE))
        done, _ = await asyncio.wait([ended], timeout=0.2)  # a solo term never ends alone
        assert not done
        await e.resign()
        await asyncio.wait_for(ended, 1)
    finally:
        await s.close()


# -- pure parts ---------------------------------------------------------------------------


@given(st.lists(st.tuples(st.uuids(), st.integers(0, 10**9)), unique_by=lambda t: t[1]))
def test_candidates_order_by_sequence_not_name(nodes: list[tuple[uuid.UUID, int]]) -> None:
    """ZooKeeper's sequence decides, whatever the guid before it."""
    names = [f"n-{g.hex}-{n:010d}" for g, n in nodes]
    assert [_seq(x) for x in sorted(names, key=_seq)] == sorted(n for _, n in nodes)


def test_election_config() -> None:
    c = parse_config({"election": {"id": "headnode-1", "url": "http://10.0.0.5:8480",
                                   "session_timeout": 4}})
    assert (c.coordinator_id, c.advertise_url, c.session_timeout) == (
        "headnode-1", "http://10.0.0.5:8480", 4.0)
    d = parse_config({})
    assert (d.coordinator_id, d.advertise_url, d.session_timeout) == ("", "", 6.0)
    for bad in ({"url": "10.0.0.5:8480"}, {"id": "a b"}, {"id": "a/b"},
                {"session_timeout": 0.5}, {"session_timeout": "6"}, {"leader": True}):
        with pytest.raises(ConfigError, match="election"):
            parse_config({"election": bad})


# -- coordinators on one store ------------------------------------------------------------


async def test_followers_answer_the_leader_plans(chroot: Callable[..., Awaitable[ZkStore]],
                                                tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Two coordinators in one process, each its own session, each serving HTTP:
    the first leads; the follower serves status and dry runs, refuses a real
    rebalance naming the leader (``snapper rebalance`` sent to it asks the
    leader instead), and an operator's zone change sent to it makes the leader
    plan (it watches the zone set). When the leader stops, the follower leads."""
    signer = Signer(asyncssh.generate_private_key("ssh-ed25519"))
    operator = asyncssh.generate_private_key("ssh-ed25519")
    key = tmp_path / "operator_key"
    operator.write_private_key(str(key))
    api = HttpZoneApi(signer, request_timeout=1)
    config = CoordinatorConfig(
        store=tmp_path / "unused", health_interval=0.05, health_timeout=0.2,
        lost_after=3600, settle=0.05, rebalance_interval=3600, rebuild_grace=0,
        keys=parse_keys([{"role": "operator", "public_key": operator.export_public_key()
                          .decode().strip()}], "c.toml"))
    coords: list[Coordinator] = []
    runners: list[web.AppRunner] = []
    for i in range(2):
        c = Coordinator(await chroot(), api, dataclasses.replace(config, coordinator_id=f"c{i}"))
        runner = web.AppRunner(make_app(c, signer))
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        c.set_port(int(runner.addresses[0][1]))
        await c.join()
        c.start()
        coords.append(c)
    lead, follow = coords
    try:
        await wait_until(lambda: _role_is(lead, "leader"), 10, "c0 leading", poll=0.02)
        s = await follow.status()
        assert s["coordinator"] == {**follow.me.to_json(), "role": "follower"}
        assert s["leader"] == {"id": "c0", "url": lead.me.url}
        assert [c["id"] for c in s["candidates"]] == ["c0", "c1"]
        assert s["vms"] == 0 and "under_replicated" in s
        assert (await follow.rebalance(dry_run=True))["moves"] == []
        with pytest.raises(NotLeader, match=re.escape(f"c0 at {lead.me.url}")):
            await follow.rebalance(dry_run=False)
        argv = ["rebalance", "--coordinator", follow.me.url, "--key", str(key)]
        assert await asyncio.to_thread(cli_main, argv) == 0
        assert f"asking the leader, c0 at {lead.me.url}" in capsys.readouterr().err
        # A zone admitted through the follower: the leader sees the set change.
        await follow.store.upsert_zone(reg(A), 1.0)
        passes = lead.auto_passes
        await follow.set_state(A, {"state": "active"})
        await wait_until(lambda: _passes_over(lead, passes), 10, "the leader planning again",
                         poll=0.02)
        assert follow.auto_passes == 0 and follow.terms == 0  # a follower never plans
        await lead.stop()  # resigns: the follower takes over at once
        await wait_until(lambda: _role_is(follow, "leader"), 10, "c1 leading", poll=0.02)
        assert (await follow.status())["candidates"] == [follow.me.to_json()]
    finally:
        for c in coords:
            await c.stop()
        for r in runners:
            await r.cleanup()
        await api.close()


async def _role_is(c: Coordinator, role: str) -> bool:
    return c.role == role


async def _passes_over(c: Coordinator, n: int) -> bool:
    return c.auto_passes > n


async def test_a_solo_coordinator_leads_without_election(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    signer = Signer(asyncssh.generate_private_key("ssh-ed25519"))
    api = HttpZoneApi(signer, request_timeout=1)
    c = Coordinator(store, api, CoordinatorConfig(store=tmp_path / "c.db", port=8481,
                                                  auto_rebalance=False))
    try:
        assert c.role == "leader"  # before start: SQLite has one process
        s = await c.status()
        assert s["coordinator"]["role"] == "leader" and s["leader"] == {
            "id": c.me.id, "url": "http://127.0.0.1:8481"}
        assert c.me.id.endswith(":8481")  # hostname:port by default
        c.set_port(9999)
        assert c.me.url == "http://127.0.0.1:9999" and c.election.me == c.me
        await c.rebalance(dry_run=False)
    finally:
        await c.stop()
        await api.close()
        await store.close()


def test_status_text_says_who_leads() -> None:
    base = {"zones": {"active": 3}, "vms": 0, "copies": 0, "under_replicated": 0,
            "moves": {"planned": 0, "running": 0, "done": 0, "failed": 0}, "in_flight": []}
    text = status_text({**base, "coordinator": {"id": "c1", "url": "u1", "role": "follower"},
                        "leader": {"id": "c0", "url": "http://h0:8480"},
                        "candidates": [{"id": "c0", "url": "u0"}, {"id": "c1", "url": "u1"}]})
    assert "leader:           c0 (http://h0:8480)" in text
    assert "this coordinator: c1 (follower), 2 standing" in text
    none = status_text({**base, "coordinator": {"id": "c1", "url": "u1", "role": "follower"},
                        "leader": None, "candidates": []})
    assert "leader:           none elected" in none
    assert "leader" not in status_text(base)  # an older coordinator's answer
