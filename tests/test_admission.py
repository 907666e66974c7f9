"""Zone admission, pinned host keys and scoped peers (issue 13), against real parts.

- the coordinator (its HTTP API, stand-in zones as real aiohttp servers): a zone
  that registers is pending, gets no placement, no move, no health check and no
  place in the trust list; a known uuid re-registered with another key is
  refused and changes nothing; an operator's rekey is the only way to rotate;
- the store: a version 1 store's zones are admitted once migrated;
- a zone's trust list (``PeerLinks.refresh``) learns admitted zones only;
- a zone's SSH server (real asyncssh, real ZFS): a peer zone whose key it
  trusts may not act on a VM whose placement does not hold both zones.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st

from rebalance.coordinator import vm_scope
from rebalance.placement import Move, ZoneState
from rebalance.store import MoveRecord, MoveState, SqliteStore
from replication.coordinator_client import CoordinatorClient
from replication.peers import PeerLinks, pair_of
from replication.replicator import Replicator
from snapper_zone.common.config import ZoneConfig, parse_config
from snapper_zone.common.httpsig import Signer, signing_session
from snapper_zone.fleet.pools import FilePool
from snapper_zone.wire import ZoneRegistration
from snapper_zone.zfs.zfs import Zfs
from tests.test_coordinator_api import (
    COORD,
    GIB,
    HOST_KEY,
    HOST_KEYS,
    VMS,
    ZONES,
    Env,
    Fleet,
    fleet_of,
    push_all,
    snap,
)
from tests.test_sshserver import (
    PEER2_UUID,
    PEER_UUID,
    ZONE_UUID,
    MakeHarness,
    cn_vm,
    err_code,
    guids,
    make_harness,  # noqa: F401  (a fixture, used by name)
    push,
    run,
    zone_root,
)

FAKE = ZONES[3]  # the attacker's zone: registers, is never admitted


def _key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


def _pub(key: asyncssh.SSHKey) -> str:
    return key.export_public_key().decode().strip()


def _client(url: str, zone: str, coordinator_key: str | None = None) -> CoordinatorClient:
    """A zone's coordinator client: it signs with the zone's host key."""
    return CoordinatorClient(url, Signer(HOST_KEYS.get(zone) or _key()), coordinator_key)


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    f = Fleet()
    yield f
    for z in f.zones.values():
        await z.stop()
    assert f.violations == []


@pytest.fixture
async def env(tmp_path: Path, fleet: Fleet) -> AsyncIterator[Env]:
    e = await Env(tmp_path, fleet).start()
    yield e
    await e.close()


# -- the coordinator ------------------------------------------------------------------


async def test_a_fake_zone_registering_is_pending_and_gets_nothing(env: Env) -> None:
    await fleet_of(env, 3)
    fake = await env.fleet.add(FAKE)
    # It claims to hold a VM (a listing that echoes a real one) and is huge.
    fake.vms[VMS[0]] = [snap(VMS[0], i, "cn:cn1") for i in range(3)]
    z = await env.register(FAKE, capacity=1000 * GIB, admit=False)
    assert (z["state"], z["admitted"]) == ("pending", False)
    await push_all(env, VMS)
    for vm in VMS:
        assert FAKE not in await env.placement(vm)
    env.coordinator.start()  # mover and health checks
    # Draining a zone needs new copies: the huge empty pending zone takes none.
    await env.call("PUT", f"/v1/zones/{ZONES[0]}/state", {"state": "draining"})
    run = await env.call("POST", "/v1/rebalance?dry_run=false")
    assert run["moves"] and all(m["to_zone"] != FAKE for m in run["moves"])
    assert {m["state"] for m in await env.moves_finished()} == {"done"}
    await env.coordinator.health.check_all()
    # Never contacted: no inventory read, no health check, no move, no delete.
    assert fake.requests == [] and fake.ssh_connects == 0
    trusted = (await env.call("GET", "/v1/zones?admitted=true"))["zones"]
    assert sorted(t["uuid"] for t in trusted) == ZONES[:3]
    assert all(t["admitted"] for t in trusted)
    listed = {z["uuid"]: z for z in (await env.call("GET", "/v1/zones"))["zones"]}
    assert (listed[FAKE]["state"], listed[FAKE]["health"]) == ("pending", "unknown")
    assert (await env.call("GET", "/v1/status"))["zones"] == {"active": 2, "draining": 1,
                                                              "pending": 1}
    # Its key signs as a pending zone: it may see its own record, nothing of the fleet.
    async with signing_session(Signer(HOST_KEYS[FAKE])) as http:
        for path in ("/v1/zones", "/v1/zones?admitted=true", f"/v1/placement/{VMS[1]}",
                     f"/v1/zones/{ZONES[0]}"):
            err = await env.call("GET", path, None, 403, http)
            assert err["code"] == "NotAuthorized", path
        assert (await env.call("GET", f"/v1/zones/{FAKE}", None, 200, http))["state"] == \
            "pending"
    # Only activation admits: draining or losing a pending zone is refused, unchanged.
    for state in ("draining", "lost"):
        err = await env.call("PUT", f"/v1/zones/{FAKE}/state", {"state": state}, 422)
        assert err["code"] == "InvalidArgument" and "pending" in err["message"]
    assert (await env.call("GET", f"/v1/zones/{FAKE}"))["state"] == "pending"
    # Removing it never asks it what it holds.
    await env.call("DELETE", f"/v1/zones/{FAKE}", status=204)
    assert fake.requests == []


async def test_an_admitted_zone_takes_copies(env: Env) -> None:
    """The same zone, once an operator activates it, is new capacity like any other."""
    await fleet_of(env, 3)
    await push_all(env, VMS)
    await env.fleet.add(ZONES[3])
    await env.register(ZONES[3], admit=False)
    plan = await env.call("POST", "/v1/rebalance?dry_run=true")
    assert not any(m["to_zone"] == ZONES[3] for m in plan["moves"])
    z = await env.call("PUT", f"/v1/zones/{ZONES[3]}/state", {"state": "active"})
    assert (z["state"], z["admitted"]) == ("active", True)
    plan = await env.call("POST", "/v1/rebalance?dry_run=true")
    assert any(m["to_zone"] == ZONES[3] for m in plan["moves"])


async def test_re_registering_a_uuid_with_another_key_is_refused(env: Env) -> None:
    await fleet_of(env, 3)
    await env.fleet.add(FAKE)  # the attacker's endpoint
    await env.register(FAKE, admit=False)  # and a pending zone
    for victim in (ZONES[0], FAKE):  # admitted or pending: pinned at first registration
        before = await env.call("GET", f"/v1/zones/{victim}")
        evil = _key()  # the attacker holds it, so it signs and registers it
        body = ZoneRegistration(uuid=victim, name="evil", ssh_host="127.0.0.2", ssh_port=1,
                                http_url=env.fleet.zones[FAKE].url(), host_key=_pub(evil),
                                capacity=1).to_json()
        async with signing_session(Signer(evil)) as http:
            err = await env.call("POST", "/v1/zones", body, 409, http)
        assert err == {"code": "HostKeyMismatch", "message": err["message"]}
        assert "snapper zone rekey" in err["message"]
        # Nor may an operator replace it by registering (only rekey does).
        await env.call("POST", "/v1/zones", body, 409)
        assert await env.call("GET", f"/v1/zones/{victim}") == before  # endpoint included
    # The same key (another comment) may move the zone and change its capacity.
    body = ZoneRegistration(uuid=ZONES[0], name="z1", ssh_host="127.0.0.1", ssh_port=2200,
                            http_url=env.fleet.zones[ZONES[0]].url(),
                            host_key=HOST_KEY + " root@zone1", capacity=7 * GIB).to_json()
    async with signing_session(Signer(HOST_KEYS[ZONES[0]])) as http:
        z = await env.call("POST", "/v1/zones", body, 200, http)
    assert (z["ssh_port"], z["capacity"], z["host_key"], z["state"]) == (
        2200, 7 * GIB, HOST_KEY, "active")


async def test_rekey_is_the_operators_and_the_only_way(env: Env) -> None:
    await fleet_of(env, 3)
    zone = ZONES[1]
    before = await env.call("GET", f"/v1/zones/{zone}")
    for body in ({"host_key": "ssh-ed25519 garbage"}, {"key": HOST_KEY}, {"host_key": 1},
                 {"host_key": HOST_KEY + "\n" + HOST_KEY}, [HOST_KEY]):
        err = await env.call("PUT", f"/v1/zones/{zone}/host-key", body, 422)
        assert err["code"] == "InvalidArgument"
    assert await env.call("GET", f"/v1/zones/{zone}") == before
    assert (await env.call("PUT", f"/v1/zones/{ZONES[4]}/host-key", {"host_key": HOST_KEY},
                           404))["code"] == "ResourceNotFound"
    # Only an operator rotates: the zone itself may not, even signed by its own key.
    new = _key()
    async with signing_session(Signer(HOST_KEYS[zone])) as http:
        err = await env.call("PUT", f"/v1/zones/{zone}/host-key", {"host_key": _pub(new)},
                             403, http)
    assert err["code"] == "NotAuthorized"
    z = await env.call("PUT", f"/v1/zones/{zone}/host-key", {"host_key": _pub(new)})
    assert (z["host_key"], z["state"]) == (_pub(new), "active")
    # The old key is the stranger now; the new one registers.
    await env.register(zone, status=409)
    z = await env.register(zone, capacity=5 * GIB, status=200, key=new)
    assert z["capacity"] == 5 * GIB
    trusted = {t["uuid"]: t for t in (await env.call("GET", "/v1/zones?admitted=true"))["zones"]}
    assert trusted[zone]["host_key"] == _pub(new)


async def test_placement_scope_names_the_zones_of_moves_in_flight(env: Env) -> None:
    await fleet_of(env, 4)
    # Asked with create=false (a zone checking a peer), a VM is not placed by asking.
    err = await env.call("GET", f"/v1/placement/{VMS[0]}?create=false", status=404)
    assert err["code"] == "ResourceNotFound"
    assert VMS[0] not in await env.store.placements()
    pair = await env.placement(VMS[0])
    doc = await env.call("GET", f"/v1/placement/{VMS[0]}?create=false")
    assert doc["zones"] == pair
    other = next(z for z in ZONES[:4] if z not in pair)
    doc = await env.call("GET", f"/v1/placement/{VMS[0]}")
    assert doc["scope"] == sorted(pair)
    [m] = await env.store.add_moves([Move(VMS[0], pair[1], other, pair[0], 1, "rebalance")],
                                    0.0)
    doc = await env.call("GET", f"/v1/placement/{VMS[0]}")
    assert doc["zones"] == pair and doc["scope"] == sorted({*pair, other})
    await env.store.update_move(m.id, 1.0, state=MoveState.FAILED)
    assert (await env.call("GET", f"/v1/placement/{VMS[0]}"))["scope"] == sorted(pair)


_IDS = ["a", "b", "c", "d", "e"]


def _move(i: int, from_zone: str | None, to: str, source: str, state: MoveState) -> MoveRecord:
    return MoveRecord(i, VMS[0], from_zone, to, source, 1, "rebalance", state, None, 0, None,
                      0, 0.0, 0.0, None, None)


moves_st = st.lists(st.builds(_move, st.integers(1, 99), st.none() | st.sampled_from(_IDS),
                              st.sampled_from(_IDS), st.sampled_from(_IDS),
                              st.sampled_from(list(MoveState))), max_size=4)


@given(pair=st.lists(st.sampled_from(_IDS), min_size=2, max_size=2, unique=True),
       moves=moves_st)
def test_a_vms_scope_is_its_pair_and_its_moves_in_flight(pair: list[str],
                                                         moves: list[MoveRecord]) -> None:
    scope = vm_scope(pair, moves)
    active = {z for m in moves if m.active for z in (m.from_zone, m.source, m.to_zone)
              if z is not None}
    assert set(scope) == set(pair) | active and scope == sorted(scope)
    # Moves done or failed widen nothing.
    assert vm_scope(pair, [m for m in moves if not m.active]) == sorted(pair)
    assert vm_scope(None, []) == []


_V1_ZONES = """
CREATE TABLE zones (
    uuid TEXT PRIMARY KEY, name TEXT NOT NULL, ssh_host TEXT NOT NULL,
    ssh_port INTEGER NOT NULL, http_url TEXT NOT NULL, host_key TEXT NOT NULL,
    capacity INTEGER NOT NULL CHECK (capacity >= 0),
    state TEXT NOT NULL CHECK (state IN ('active', 'draining', 'lost')),
    registered REAL NOT NULL, suspect_since REAL, last_seen REAL, used INTEGER, free INTEGER);
"""


async def test_a_version_1_stores_zones_are_admitted(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    db = sqlite3.connect(path)
    db.executescript(_V1_ZONES)
    for i, state in enumerate(("active", "draining", "lost")):
        db.execute("INSERT INTO zones VALUES (?, ?, '127.0.0.1', 22, 'http://h:1', ?, 100, ?, "
                   "1.0, NULL, NULL, NULL, NULL)", (ZONES[i], f"z{i}", HOST_KEY, state))
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    s = SqliteStore(path)
    zones = await s.zones()
    assert [(z.uuid, z.state, z.admitted) for z in zones] == [
        (ZONES[0], ZoneState.ACTIVE, True), (ZONES[1], ZoneState.DRAINING, True),
        (ZONES[2], ZoneState.LOST, True)]
    z, created = await s.upsert_zone(ZoneRegistration(ZONES[3], "z3", "127.0.0.1", 22,
                                                      "http://h:1", HOST_KEY, 1), 2.0)
    assert created and z.state is ZoneState.PENDING  # the new table allows it
    await s.close()
    # Straight to the newest schema (4: policies, a table of its own).
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 4
    s = SqliteStore(path)  # and opens again as version 4
    assert len(await s.zones()) == 4
    await s.close()


# -- a zone's trust list ----------------------------------------------------------------


Handler = Callable[[web.Request], Awaitable[web.Response]]


def _zone_config(tmp_path: Path, uuid: str, url: str, peers: list[str] | None = None,
                 keys: list[dict[str, str]] | None = None) -> ZoneConfig:
    return parse_config({
        "uuid": uuid, "name": "zone", "root": "pool/snapper",
        "ssh": {"port": 0, "host_key": str(tmp_path / "host_key")}, "http": {"port": 0},
        "keys": keys or [], "coordinator_url": url,
        "peers": [{"uuid": p, "ssh_host": "127.0.0.1", "ssh_port": 1,
                   "http_url": "http://127.0.0.1:1"} for p in peers or []],
    }, str(tmp_path / "snapperd.toml"))


async def test_no_zone_trusts_a_pending_zones_key(env: Env, tmp_path: Path) -> None:
    await fleet_of(env, 3)
    await env.fleet.add(FAKE)
    fake_key = _key()
    await env.register(FAKE, admit=False, key=fake_key)
    url = str(env.server.make_url("/"))
    links = PeerLinks(_zone_config(tmp_path, ZONES[0], url), logging.getLogger("test"),
                      _client(url, ZONES[0], _pub(COORD.key)))
    try:
        await links.refresh()
        assert sorted(p.uuid for p in links.peers) == ZONES[1:3]
        assert {k.zone for k in links.learned_keys.values()} == set(ZONES[1:3])
        fake = fake_key.public_data
        assert fake not in links.learned_keys
        await env.call("PUT", f"/v1/zones/{FAKE}/state", {"state": "active"})  # admitted
        await links.refresh()
        assert links.learned_keys[fake].zone == FAKE
    finally:
        await links.close()


@contextlib.asynccontextmanager
async def _links_to_a_fake_coordinator(tmp_path: Path, zones: Handler,
                                       placement: Handler | None = None
                                       ) -> AsyncIterator[PeerLinks]:
    """Zone ZONES[0]'s links to a coordinator that is these handlers alone."""
    app = web.Application()
    app.router.add_get("/v1/zones", zones)
    if placement is not None:
        app.router.add_get("/v1/placement/{vm}", placement)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("/"))
    links = PeerLinks(_zone_config(tmp_path, ZONES[0], url), logging.getLogger("test"),
                      _client(url, ZONES[0]))
    try:
        yield links
    finally:
        await links.close()
        await server.close()


async def test_a_zone_ignores_zones_not_marked_admitted(tmp_path: Path) -> None:
    """Whatever the listing holds, a zone it does not say is admitted is no peer."""
    keys = {z: _pub(_key()) for z in ZONES[:4]}

    async def zones(_: web.Request) -> web.Response:
        row = {"name": "z", "ssh_host": "127.0.0.1", "ssh_port": 22,
               "http_url": "http://127.0.0.1:1", "capacity": 1}
        return web.json_response({"zones": [
            {**row, "uuid": ZONES[0], "host_key": keys[ZONES[0]], "state": "active",
             "admitted": True},
            {**row, "uuid": ZONES[1], "host_key": keys[ZONES[1]], "state": "active",
             "admitted": True},
            {**row, "uuid": ZONES[2], "host_key": keys[ZONES[2]], "state": "active"},
            {**row, "uuid": ZONES[3], "host_key": keys[ZONES[3]], "state": "pending",
             "admitted": True},
        ]})

    async with _links_to_a_fake_coordinator(tmp_path, zones) as links:
        await links.refresh()
        assert [p.uuid for p in links.peers] == [ZONES[1]]
        assert {k.zone for k in links.learned_keys.values()} == {ZONES[1]}


async def test_a_zone_without_a_partner_says_why(tmp_path: Path) -> None:
    """``partner_or_why`` tells apart what leaves a VM without a mirror: no
    placement from the coordinator, and a placement naming a zone the fleet's
    list does not (before, both read "the coordinator gave no placement")."""
    row = {"name": "z", "ssh_host": "127.0.0.1", "ssh_port": 22,
           "http_url": "http://127.0.0.1:1", "capacity": 1, "state": "active",
           "admitted": True}
    unplaced, placed, with_unknown = (f"74c59c61-4559-4ca2-b1ef-0ca22f2f000{i}" for i in range(3))
    pairs = {placed: [ZONES[0], ZONES[1]], with_unknown: [ZONES[0], ZONES[2]]}

    async def zones(_: web.Request) -> web.Response:
        return web.json_response({"zones": [
            {**row, "uuid": z, "host_key": _pub(_key())} for z in ZONES[:2]]})

    async def placement(request: web.Request) -> web.Response:
        pair = pairs.get(request.match_info["vm"])
        if pair is None:
            return web.json_response({"code": "ResourceNotFound", "message": "no"}, status=404)
        return web.json_response({"zones": pair, "scope": pair})

    alone = PeerLinks(_zone_config(tmp_path, ZONES[0], "http://127.0.0.1:1"),
                      logging.getLogger("test"))
    async with _links_to_a_fake_coordinator(tmp_path, zones, placement) as links:
        found = await links.partner_or_why(placed)
        assert not isinstance(found, str) and found.uuid == ZONES[1]
        assert await links.partner_or_why(unplaced) == (
            "the coordinator gave no placement for this VM (down or rebuilding)")
        why = await links.partner_or_why(with_unknown)
        assert isinstance(why, str) and f"with zone {ZONES[2]}, which" in why
        assert await links.partner(with_unknown) is None
        assert await alone.partner_or_why(placed) == "no peer zone is configured"
    await alone.close()


# -- scoped peers over real SSH -------------------------------------------------------------


def _vm_paired_with(zones: list[str], want: set[str]) -> str:
    """A VM uuid the static pair over ``zones`` puts on ``want``."""
    for vm in (f"74c59c61-4559-4ca2-b1ef-0ca22f2f{i:04x}" for i in range(1000)):
        if set(pair_of(vm, zones)) == want:
            return vm
    raise AssertionError(f"no VM paired on {want}")


async def _refused_and_unchanged(h: Any, zfs: Zfs, who: str, vm: str) -> None:
    """``who``'s every command on ``vm`` is refused NotAuthorized; s1 is unchanged."""
    ds = h.root.child(vm).child("disk0")
    before = await guids(zfs, ds)
    rogue = await h.connect(who)
    for line in (f"send {vm} disk0 s1", f"destroy {vm} s1",
                 f"destroy {vm} s1 --dataset disk0 --guid {before['s1']}",
                 f"delete {vm} s1", f"snapshots {vm}", f"metadata {vm} s1",
                 f"abort {vm} disk0", f"resume-token {vm} disk0"):
        status, out, err = await run(rogue, line)
        assert (status, err_code(err), out) == (1, "NotAuthorized", b""), line
    assert await guids(zfs, ds) == before
    assert h.metric("snapper_auth_failures_total", reason="not_authorized") >= 8


@pytest.mark.zfs
async def test_a_peer_outside_the_static_pair_is_refused(
        zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool,
        make_harness: MakeHarness) -> None:  # noqa: F811
    fleet = [ZONE_UUID, PEER_UUID, PEER2_UUID]
    vm = _vm_paired_with(fleet, {ZONE_UUID, PEER_UUID})
    h = await make_harness(await zone_root(zfs, zone_pool), {"cn-a": [vm]}, peers=2)
    src, _ = await cn_vm(zfs, cn_pool, "vm", 1, size=64 << 10)
    cn = await h.connect("cn-a")
    assert (await push(cn, zfs, src, vm, "s1"))[0] == 0
    assert (await run(cn, f"commit {vm} s1 disk0 --durability local"))[0] == 0
    await _refused_and_unchanged(h, zfs, "peer2", vm)
    # Its pair's peer may: the same commands go through.
    peer = await h.connect("peer")
    status, stream, err = await run(peer, f"send {vm} disk0 s1")
    assert status == 0 and len(stream) > 64 << 10, err
    assert (await run(peer, f"snapshots {vm}"))[0] == 0


@pytest.mark.zfs
async def test_a_peer_is_scoped_by_the_coordinators_placement_and_moves(
        zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool,
        make_harness: MakeHarness, tmp_path: Path) -> None:  # noqa: F811
    vm = VMS[0]
    h = await make_harness(await zone_root(zfs, zone_pool), {"cn-a": [vm]}, peers=2)
    src, _ = await cn_vm(zfs, cn_pool, "vm", 1, size=64 << 10)
    cn = await h.connect("cn-a")
    assert (await push(cn, zfs, src, vm, "s1"))[0] == 0
    assert (await run(cn, f"commit {vm} s1 disk0 --durability local"))[0] == 0
    # A coordinator placing the VM on this zone and peer 2; peer (1) is outside.
    scope = [ZONE_UUID, PEER2_UUID]
    asked: list[str] = []

    async def placement(request: web.Request) -> web.Response:
        asked.append(request.match_info["vm"])
        return web.json_response({"vm": vm, "zones": [ZONE_UUID, PEER2_UUID],
                                  "endpoints": [], "scope": scope})

    app = web.Application()
    app.router.add_get("/v1/placement/{vm}", placement)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("/"))
    config = _zone_config(tmp_path, ZONE_UUID, url)
    h.zone.replicator = Replicator(h.zone, PeerLinks(config, logging.getLogger("test"),
                                                     _client(url, ZONE_UUID)))
    try:
        await _refused_and_unchanged(h, zfs, "peer", vm)
        ok = await h.connect("peer2")
        assert (await run(ok, f"snapshots {vm}"))[0] == 0
        n = len(asked)
        assert (await run(ok, f"send {vm} disk0 s1"))[0] == 0
        assert len(asked) == n  # in scope: answered from the placement cache
        # A move onto peer (1) starts: its first command misses the cached scope,
        # which is asked afresh, and it may copy now.
        scope = [ZONE_UUID, PEER_UUID, PEER2_UUID]
        moving = await h.connect("peer")
        status, stream, err = await run(moving, f"send {vm} disk0 s1")
        assert status == 0 and len(stream) > 64 << 10, err
        assert len(asked) == n + 1
    finally:
        await h.zone.replicator.links.close()
        h.zone.replicator = None
        await server.close()
    # No coordinator and no placement ever learnt: nothing is allowed on a guess.
    down = _client("http://127.0.0.1:1", ZONE_UUID)
    h.zone.replicator = Replicator(h.zone, PeerLinks(config, logging.getLogger("test"), down))
    try:
        status, _, err = await run(await h.connect("peer2"), f"send {vm} disk0 s1")
        assert (status, err_code(err)) == (1, "NotAuthorized")
        assert "unknown placement" in err
    finally:
        await h.zone.replicator.links.close()
        h.zone.replicator = None
