"""The coordinator's HTTP API through real aiohttp servers on 127.0.0.1.

The zones are in-memory stand-ins speaking snapperd's HTTP contract (inventory,
snapshots, sync to a peer, delete), each on its own port, so the coordinator's
HTTP zone client, planner and mover run end to end without ZFS.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import pty
import signal
import subprocess
import sys
import uuid as uuidlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st

from rebalance.cli import COORDINATOR_ENV, parse_size, render_view, status_text
from rebalance.coordinator import (
    Coordinator,
    CoordinatorConfig,
    load_config,
    make_app,
    order_holders,
    parse_config,
    shown_seconds,
)
from rebalance.placement import ZoneState
from rebalance.store import SqliteStore, Store, ZkStore, ZoneRecord
from rebalance.zoneclient import HttpZoneApi, SnapshotView, ZoneRequestFailed, ZoneUnreachable
from snapper_zone.cli import main as cli_main
from snapper_zone.common.config import ConfigError, parse_keys
from snapper_zone.common.httpsig import Signer, signing_session
from snapper_zone.common.version import version
from snapper_zone.fleet.zookeeper import LocalZooKeeper
from snapper_zone.wire import ZoneRegistration
from snapper_zone.zfs import proc
from tests.helpers import Cable, wait_for, wait_until

REPO = Path(__file__).resolve().parent.parent
ZONES = [f"00000000-0000-4000-8000-00000000000{i}" for i in range(1, 6)]
# Each zone its own host key: it signs its registration with it.
HOST_KEYS = {z: asyncssh.generate_private_key("ssh-ed25519") for z in ZONES}
OPERATOR = asyncssh.generate_private_key("ssh-ed25519", comment="ops@test")
COORD = Signer(asyncssh.generate_private_key("ssh-ed25519"))
KEYS = parse_keys([{"role": "operator",
                    "public_key": OPERATOR.export_public_key().decode().strip()}], "c.toml")


def host_pub(zone: str) -> str:
    return str(HOST_KEYS[zone].export_public_key().decode().strip())


HOST_KEY = host_pub(ZONES[0])
VMS = [f"74c59c61-4559-4ca2-b1ef-0ca22f2f93{i:02x}" for i in range(12)]
GIB = 1 << 30


def sguid(vm: str, i: int) -> str:
    return str(int(vm[-4:], 16) * 100 + i)  # decimal, as zones write guids


def snap(vm: str, i: int, source: str) -> dict[str, Any]:
    return {"vm": vm, "name": f"s{i}", "complete": True, "created": 1000 + i, "size": 10,
            "source": source,
            "datasets": {"root": {"dataset": "root", "guid": sguid(vm, i), "createtxg": i,
                                  "used": 10, "referenced": 10}}}


class StandIn:
    """One zone's HTTP API, in memory: vm -> snapshot JSON list."""

    def __init__(self, fleet: Fleet, uuid: str) -> None:
        self.fleet = fleet
        self.uuid = uuid
        self.vms: dict[str, list[dict[str, Any]]] = {}
        self.tombs: dict[str, set[int]] = {}  # vm -> part guids deleted here
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.syncs = 0
        self.ssh: asyncio.Server | None = None
        self.ssh_port = 0
        self.requests: list[str] = []  # "GET /path" of every request it was sent
        self.ssh_connects = 0
        self.inflight: list[dict[str, Any]] = []  # what GET /v1/transfers answers
        self.unanswered: set[str] = set()  # VMs whose snapshots it answers with a 503

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        @web.middleware
        async def seen(request: web.Request, handler: Any) -> web.StreamResponse:
            self.requests.append(f"{request.method} {request.path}")
            return await handler(request)  # type: ignore[no-any-return]

        app = web.Application(middlewares=[seen])
        r = app.router
        r.add_get("/ping", self.ping)
        r.add_get("/v1/vms", self.list_vms)
        r.add_get("/v1/vms/{vm}/snapshots", self.snapshots)
        r.add_get("/v1/vms/{vm}/tombstones", self.tombstones)
        r.add_post("/v1/vms/{vm}/sync", self.sync)
        r.add_delete("/v1/vms/{vm}", self.delete)
        r.add_get("/v1/capacity", self.capacity)
        r.add_get("/v1/transfers", self.transfers)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = int(self.runner.addresses[0][1])

        async def accept(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.ssh_connects += 1
            w.close()  # stands for the SSH port: the health check only connects

        self.ssh = await asyncio.start_server(accept, "127.0.0.1", 0)
        self.ssh_port = int(self.ssh.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.ssh is not None:
            self.ssh.close()
            await self.ssh.wait_closed()
            self.ssh = None

    async def ping(self, _: web.Request) -> web.Response:
        return web.json_response({"ping": "pong"})

    async def capacity(self, _: web.Request) -> web.Response:
        return web.json_response({"used": 0, "available": 1 << 50})

    async def transfers(self, _: web.Request) -> web.Response:
        return web.json_response(self.inflight)

    def _missing(self, vm: str) -> web.Response:
        return web.json_response({"code": "ResourceNotFound", "message": f"no {vm}"}, status=404)

    async def list_vms(self, _: web.Request) -> web.Response:
        return web.json_response([{"uuid": vm, "cn": None, "snapshots": len(s), "complete": len(s),
                                   "bytes": GIB,
                                   "newest": max((x["created"] for x in s), default=None)}
                                  for vm, s in sorted(self.vms.items())])

    async def snapshots(self, request: web.Request) -> web.Response:
        vm = request.match_info["vm"]
        if vm in self.unanswered:
            return web.json_response({"code": "Busy", "message": "try again"}, status=503)
        return web.json_response(self.vms[vm]) if vm in self.vms else self._missing(vm)

    async def tombstones(self, request: web.Request) -> web.Response:
        vm = request.match_info["vm"]
        if vm not in self.vms:
            return self._missing(vm)
        return web.json_response({f"{g:x}": 1000 for g in self.tombs.get(vm, ())})

    async def sync(self, request: web.Request) -> web.Response:
        vm = request.match_info["vm"]
        peer = (await request.json())["peer"]
        if vm not in self.vms:
            return self._missing(vm)
        self.syncs += 1
        self.fleet.zones[peer].vms[vm] = [{**s, "source": f"zone:{self.uuid}"}
                                          for s in self.vms[vm]]
        return web.json_response({"vm": vm, "peer": peer, "state": "in_sync"})

    async def delete(self, request: web.Request) -> web.Response:
        vm = request.match_info["vm"]
        if vm not in self.vms:
            return self._missing(vm)
        others = self.fleet.holders(vm) - {self.uuid}
        if len(others) < 2:  # sampled at every delete: no VM ever drops below two copies
            self.fleet.violations.append(f"delete of {vm} on {self.uuid} leaves {others}")
        del self.vms[vm]
        return web.Response(status=204)


class Fleet:
    def __init__(self) -> None:
        self.zones: dict[str, StandIn] = {}
        self.violations: list[str] = []

    async def add(self, uuid: str) -> StandIn:
        z = self.zones[uuid] = StandIn(self, uuid)
        await z.start()
        return z

    def holders(self, vm: str) -> set[str]:
        return {u for u, z in self.zones.items() if vm in z.vms and z.runner is not None}

    def push(self, vm: str, pair: list[str]) -> None:
        """A CN pushes three snapshots to the primary, which mirrors them."""
        self.zones[pair[0]].vms[vm] = [snap(vm, i, "cn:cn1") for i in range(3)]
        self.zones[pair[1]].vms[vm] = [snap(vm, i, f"zone:{pair[0]}") for i in range(3)]


class Env:
    def __init__(self, tmp_path: Path, fleet: Fleet, store: Store | None = None) -> None:
        self.tmp_path = tmp_path
        self.fleet = fleet
        self.config = CoordinatorConfig(store=tmp_path / "c.db", keys=KEYS, health_interval=3600,
                                        auto_rebalance=False, retry_delay=0.05)
        self.store: Store = store or SqliteStore(tmp_path / "c.db")
        self.api = HttpZoneApi(COORD, request_timeout=5)
        self.coordinator = Coordinator(self.store, self.api, self.config)
        self.server = TestServer(make_app(self.coordinator, COORD), host="127.0.0.1")
        self.http = signing_session(Signer(OPERATOR))  # the operator's

    async def start(self) -> Env:
        await self.server.start_server()
        return self

    async def close(self) -> None:
        await self.coordinator.stop()
        await self.http.close()
        await self.server.close()
        await self.api.close()
        await self.store.close()

    async def call(self, method: str, path: str, body: object = None,
                   status: int = 200, http: aiohttp.ClientSession | None = None) -> Any:
        async with (http or self.http).request(method, str(self.server.make_url(path)),
                                               json=body) as r:
            text = await r.text()
            assert r.status == status, f"{method} {path}: {r.status} {text}"
            return json.loads(text) if text else None

    async def register(self, uuid: str, capacity: int = 100 * GIB, status: int = 201,
                       admit: bool = True, key: asyncssh.SSHKey | None = None) -> Any:
        """Register as snapperd does (the wire document, signed with the host key it
        registers: ``key``, else the zone's own); then, new, admit it as the operator
        does (``admit``), unless it is asked to stay pending."""
        z = self.fleet.zones[uuid]
        key = key or HOST_KEYS[uuid]
        reg = ZoneRegistration(uuid=uuid, name=f"z{uuid[-1]}", ssh_host="127.0.0.1",
                               ssh_port=z.ssh_port, http_url=z.url(),
                               host_key=key.export_public_key().decode().strip(),
                               capacity=capacity)
        # As the zone itself: signed with the host key it registers.
        async with signing_session(Signer(key)) as http:
            got = await self.call("POST", "/v1/zones", reg.to_json(), status, http)
        if status == 201:
            assert got["state"] == "pending" and got["admitted"] is False
            if admit:
                got = await self.call("PUT", f"/v1/zones/{uuid}/state", {"state": "active"})
        return got

    async def moves_finished(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until ``GET /v1/moves`` shows no move planned or running."""
        moves: list[dict[str, Any]] = []

        async def finished() -> bool:
            nonlocal moves
            moves = (await self.call("GET", "/v1/moves"))["moves"]
            return all(m["state"] in ("done", "failed") for m in moves)

        await wait_until(finished, timeout, "every move done or failed", poll=0.02)
        return moves

    async def placement(self, vm: str) -> list[str]:
        got: list[str] = (await self.call("GET", f"/v1/placement/{vm}"))["zones"]
        return got


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    f = Fleet()
    yield f
    for z in f.zones.values():
        await z.stop()
    assert f.violations == []


@pytest.fixture
async def env(request: pytest.FixtureRequest, tmp_path: Path,
              fleet: Fleet) -> AsyncIterator[Env]:
    """A coordinator on SQLite; ``parametrize("env", ["zookeeper"], indirect=True)``
    puts it on a chroot of the session's private ZooKeeper."""
    store: Store | None = None
    if getattr(request, "param", "sqlite") == "zookeeper":
        zk = request.getfixturevalue("zookeeper")
        store = await ZkStore.open(zk.hosts, f"/t-{uuidlib.uuid4().hex}")
    e = await Env(tmp_path, fleet, store).start()
    yield e
    await e.close()


async def fleet_of(env: Env, n: int) -> None:
    for z in ZONES[:n]:
        await env.fleet.add(z)
        await env.register(z)


async def push_all(env: Env, vms: list[str]) -> None:
    for vm in vms:
        env.fleet.push(vm, await env.placement(vm))


async def placements(env: Env) -> dict[str, list[str]]:
    return {vm: await env.placement(vm) for vm in VMS}


def assert_two_copies(env: Env, placement: dict[str, list[str]]) -> None:
    for vm, pair in placement.items():
        assert env.fleet.holders(vm) == set(pair), vm
        a, b = (env.fleet.zones[z].vms[vm] for z in pair)
        assert [(s["name"], s["datasets"]) for s in a] == [(s["name"], s["datasets"]) for s in b]


# -- registry -------------------------------------------------------------------------


async def test_ping_and_register_is_idempotent(env: Env) -> None:
    assert await env.call("GET", "/ping") == {"ping": "pong", "version": version(),
                                              "role": "leader"}  # SQLite: always
    await env.fleet.add(ZONES[0])
    first = await env.register(ZONES[0])
    again = await env.register(ZONES[0], capacity=50 * GIB, status=200)
    assert again["capacity"] == 50 * GIB and again["state"] == first["state"] == "active"
    zones = (await env.call("GET", "/v1/zones"))["zones"]
    assert [z["uuid"] for z in zones] == [ZONES[0]]
    assert set(zones[0]) >= {"uuid", "name", "ssh_host", "ssh_port", "http_url", "host_key",
                             "capacity", "used", "free", "state", "health", "vms"}
    assert zones[0]["health"] == "unknown" and zones[0]["vms"] == 0
    assert await env.call("GET", f"/v1/zones/{ZONES[0]}") == zones[0]


@pytest.mark.parametrize("change, word", [
    ({"uuid": "not-a-uuid"}, "uuid"), ({"host_key": "ssh-ed25519 garbage"}, "host_key"),
    ({"ssh_port": 0}, "ssh_port"), ({"capacity": -1}, "capacity"),
    ({"http_url": "ftp://x"}, "http_url"), ({"extra": 1}, "unknown fields"),
])
async def test_register_refuses_bad_bodies(env: Env, change: dict[str, Any], word: str) -> None:
    body = {"uuid": ZONES[0], "name": "z", "ssh_host": "h", "ssh_port": 22,
            "http_url": "http://h:1", "host_key": HOST_KEY, "capacity": 1, **change}
    err = await env.call("POST", "/v1/zones", body, 422)
    assert err["code"] == "InvalidArgument" and word in err["message"]


async def test_bodies_must_be_bounded_application_json(env: Env) -> None:
    """A text/plain POST (what a browser sends cross-site unasked) and JSON nested
    past any real document are refused with the JSON error shape; nothing changes."""
    url = str(env.server.make_url("/v1/zones"))
    body = json.dumps({"uuid": ZONES[0]})
    async with env.http.post(url, data=body, headers={"Content-Type": "text/plain"}) as r:
        doc = await r.json(content_type=None)
        assert (r.status, doc["code"]) == (415, "UnsupportedMediaType"), doc
        assert "application/json" in doc["message"]
    deep = "[" * 5000 + "]" * 5000
    async with env.http.post(url, data=deep,
                             headers={"Content-Type": "application/json"}) as r:
        doc = await r.json(content_type=None)
        assert (r.status, doc["code"]) == (422, "InvalidArgument"), doc
        assert "nests deeper" in doc["message"]
    assert (await env.call("GET", "/v1/zones"))["zones"] == []


async def test_errors_are_json(env: Env) -> None:
    assert (await env.call("GET", "/v1/nothing", status=404))["code"] == "ResourceNotFound"
    assert (await env.call("GET", f"/v1/zones/{ZONES[0]}", status=404))["code"] == \
        "ResourceNotFound"
    assert (await env.call("DELETE", "/v1/moves", status=405))["code"] == "MethodNotAllowed"
    assert (await env.call("GET", "/v1/placement/BAD", status=422))["code"] == "InvalidArgument"
    await fleet_of(env, 1)
    err = await env.call("PUT", f"/v1/zones/{ZONES[0]}/state", {"state": "gone"}, 422)
    assert err["code"] == "InvalidArgument"
    assert (await env.call("GET", f"/v1/placement/{VMS[0]}", status=503))["code"] == \
        "NotEnoughZones"


@pytest.mark.parametrize("env", ["sqlite", "zookeeper"], indirect=True)
async def test_placement_is_stable_and_decided_once(env: Env) -> None:
    await fleet_of(env, 3)
    answers = await asyncio.gather(*(env.call("GET", f"/v1/placement/{VMS[0]}")
                                     for _ in range(8)))
    first = answers[0]
    assert all(a == first for a in answers)
    assert first["vm"] == VMS[0] and len(set(first["zones"])) == 2
    assert [e["uuid"] for e in first["endpoints"]] == first["zones"]
    assert set(first["endpoints"][0]) == {"uuid", "ssh_host", "ssh_port", "http_url", "host_key"}
    assert first["endpoints"][0]["host_key"] == host_pub(first["zones"][0])
    zones = {z["uuid"]: z for z in (await env.call("GET", "/v1/zones"))["zones"]}
    assert [zones[z]["vms"] for z in first["zones"]] == [1, 1]


@pytest.mark.parametrize("env", ["sqlite", "zookeeper"], indirect=True)
async def test_delete_zone_refused_while_it_holds_copies(env: Env) -> None:
    await fleet_of(env, 3)
    pair = await env.placement(VMS[0])
    err = await env.call("DELETE", f"/v1/zones/{pair[0]}", status=409)
    assert err["code"] == "ZoneNotEmpty"
    [empty] = set(ZONES[:3]) - set(pair)
    env.fleet.zones[empty].vms["11111111-1111-4111-8111-111111111111"] = []  # unknown copy
    assert (await env.call("DELETE", f"/v1/zones/{empty}", status=409))["code"] == "ZoneNotEmpty"
    env.fleet.zones[empty].vms.clear()
    await env.call("DELETE", f"/v1/zones/{empty}", status=204)
    await env.call("GET", f"/v1/zones/{empty}", status=404)


# -- moves ----------------------------------------------------------------------------


@pytest.mark.parametrize("env", ["sqlite", "zookeeper"], indirect=True)
async def test_adding_a_zone_moves_its_fair_share(env: Env) -> None:
    await fleet_of(env, 3)
    await push_all(env, VMS)
    before = await placements(env)
    await env.fleet.add(ZONES[3])
    await env.register(ZONES[3])
    dry = await env.call("POST", "/v1/rebalance?dry_run=true")
    assert dry["dry_run"] and len(dry["moves"]) == 6
    assert all(m["to_zone"] == ZONES[3] and m["reason"] == "rebalance" for m in dry["moves"])
    assert (await env.call("GET", "/v1/moves"))["moves"] == []  # a dry run changes nothing
    assert await placements(env) == before
    env.coordinator.start()
    run = await env.call("POST", "/v1/rebalance?dry_run=false")
    assert not run["dry_run"] and len(run["moves"]) == 6 and all("id" in m for m in run["moves"])
    moves = await env.moves_finished()
    assert [m["state"] for m in moves] == ["done"] * 6
    after = await placements(env)
    assert_two_copies(env, after)
    assert sum(ZONES[3] in pair for pair in after.values()) == 6  # 1/4 of 24 copies
    again = await env.call("POST", "/v1/rebalance?dry_run=true")
    assert again["moves"] == []
    status = await env.call("GET", "/v1/status")
    assert (status["vms"], status["copies"], status["under_replicated"]) == (12, 24, 0)
    assert status["moves"]["done"] == 6 and status["in_flight"] == []


@pytest.mark.parametrize("env", ["sqlite", "zookeeper"], indirect=True)
async def test_drain_then_remove(env: Env) -> None:
    await fleet_of(env, 4)
    await push_all(env, VMS)
    victim = ZONES[0]
    held = sum(victim in pair for pair in (await placements(env)).values())
    assert held > 0
    zone = await env.call("PUT", f"/v1/zones/{victim}/state", {"state": "draining"})
    assert zone["state"] == "draining"
    await env.call("DELETE", f"/v1/zones/{victim}", status=409)
    env.coordinator.start()
    run = await env.call("POST", "/v1/rebalance")
    assert sum(m["reason"] == "drain" for m in run["moves"]) == held
    await env.moves_finished()
    after = await placements(env)
    assert all(victim not in pair for pair in after.values())
    assert_two_copies(env, after)
    assert env.fleet.zones[victim].vms == {}
    await env.call("DELETE", f"/v1/zones/{victim}", status=204)


@pytest.mark.parametrize("env", ["sqlite", "zookeeper"], indirect=True)
async def test_lost_zone_is_repaired_from_the_survivors(env: Env) -> None:
    await fleet_of(env, 4)
    await push_all(env, VMS)
    victim = ZONES[1]
    hit = [vm for vm, pair in (await placements(env)).items() if victim in pair]
    assert hit
    await env.fleet.zones[victim].stop()  # dead for good
    await env.call("PUT", f"/v1/zones/{victim}/state", {"state": "lost"})
    status = await env.call("GET", "/v1/status")
    assert status["under_replicated"] == len(hit)
    for vm in hit:  # pushes go to the survivor meanwhile
        got = await env.call("GET", f"/v1/placement/{vm}")
        assert got["zones"][1] == victim and got["zones"][0] != victim
    env.coordinator.start()
    run = await env.call("POST", "/v1/rebalance")
    assert sorted(m["vm"] for m in run["moves"] if m["reason"] == "lost") == sorted(hit)
    await env.moves_finished()
    after = await placements(env)
    assert all(victim not in pair for pair in after.values())
    assert_two_copies(env, after)
    assert (await env.call("GET", "/v1/status"))["under_replicated"] == 0
    # It comes back (same data, a new port) with one snapshot nobody else has.
    back = env.fleet.zones[victim]
    await back.start()
    await env.register(victim, status=200)
    assert (await env.call("GET", f"/v1/zones/{victim}"))["state"] == "lost"
    back.vms[hit[0]].append(snap(hit[0], 9, "cn:cn1"))  # acked in local mode, then it died
    # One it holds that was deleted where the VM is now placed: not a reason to keep it.
    assert len(hit) >= 2
    back.vms[hit[1]].append(snap(hit[1], 8, "cn:cn1"))
    env.fleet.zones[after[hit[1]][0]].tombs[hit[1]] = {int(sguid(hit[1], 8))}
    await env.call("PUT", f"/v1/zones/{victim}/state", {"state": "active"})
    dry = await env.call("POST", "/v1/rebalance?dry_run=true")
    assert {c["action"] for c in dry["stale_copies"]} >= {"would discard"}
    assert set(back.vms) == set(hit)
    run = await env.call("POST", "/v1/rebalance")
    verdicts = {c["vm"]: c["action"] for c in run["stale_copies"] if c["zone"] == victim}
    assert set(verdicts) == set(hit)
    assert verdicts.pop(hit[0]).startswith("kept: holds 1 snapshots not on both placed copies: s9")
    assert set(verdicts.values()) == {"discarded"}
    assert set(back.vms) == {hit[0]}  # the divergent copy is kept for the operator


async def test_store_lost_placement_rebuilt_from_inventories(env: Env, tmp_path: Path) -> None:
    await fleet_of(env, 4)
    await push_all(env, VMS)
    before = await placements(env)
    plan_before = (await env.call("POST", "/v1/rebalance?dry_run=true"))["moves"]
    # A new coordinator with an empty store; the zones register again.
    (tmp_path / "new").mkdir()
    fresh = await Env(tmp_path / "new", env.fleet).start()
    try:
        for z in ZONES[:4]:
            await fresh.register(z)
        # Asked one by one (a CN's first push after the loss) ...
        assert await fresh.placement(VMS[0]) == before[VMS[0]]
        # ... or all at once by a rebalance, which adopts every VM the zones hold.
        run = await fresh.call("POST", "/v1/rebalance?dry_run=false")
        assert [(m["vm"], m["from_zone"], m["to_zone"]) for m in run["moves"]] == \
            [(m["vm"], m["from_zone"], m["to_zone"]) for m in plan_before]  # same state, same plan
        assert await placements(fresh) == before
    finally:
        await fresh.close()


async def test_moves_and_metrics_shapes(env: Env) -> None:
    await fleet_of(env, 2)
    await push_all(env, VMS[:4])
    await env.fleet.add(ZONES[2])
    await env.register(ZONES[2])
    await env.call("POST", "/v1/rebalance")
    [m, *_] = (await env.call("GET", "/v1/moves?state=planned"))["moves"]
    assert set(m) >= {"id", "vm", "from_zone", "to_zone", "source", "bytes", "reason", "state",
                      "progress", "error", "eta"}
    assert (await env.call("GET", "/v1/moves?state=bogus", status=422))["code"] == \
        "InvalidArgument"
    async with env.http.get(str(env.server.make_url("/metrics"))) as r:
        text = await r.text()
    assert "snapper_coordinator_vms 4.0" in text
    assert 'snapper_coordinator_moves_active{state="planned"}' in text


# -- config and daemon ----------------------------------------------------------------


def test_example_config_parses() -> None:
    c = load_config(REPO / "etc" / "coordinator.example.toml")
    assert c.host == "127.0.0.1" and c.port > 0
    assert isinstance(c.store, Path) and c.store.is_absolute()
    assert c.lost_after > c.health_interval and c.per_zone >= 1


@pytest.mark.parametrize("data, field", [
    ({"listen": {"port": 70000}}, "listen.port"),
    ({"health": {"interval": "1"}}, "health.interval"),
    ({"moves": {"per_zone": 0}}, "moves.per_zone"), ({"bogus": 1}, "bogus"),
    ({"health": {"lost": 1}}, "health.lost"), ({"rebalance": {"auto": 1}}, "rebalance.auto"),
    ({"key": ""}, "key"), ({"keys": [{"role": "peer", "zone": ZONES[0],
                                      "public_key": HOST_KEY}]}, "keys[0].role"),
    ({"keys": [{"role": "operator"}]}, "keys[0].public_key"),
])
def test_bad_config_names_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(data, "c.toml")
    assert e.value.field == field


@pytest.mark.parametrize("backend", ["sqlite", "zookeeper"])
async def test_daemon_ready_file_and_clean_stop(tmp_path: Path, backend: str,
                                                request: pytest.FixtureRequest) -> None:
    conf = tmp_path / "c.toml"
    store = '"state/c.db"'
    if backend == "zookeeper":
        chroot = f"/t-{uuidlib.uuid4().hex}"
        store = f'"zk://{request.getfixturevalue("zookeeper").hosts}{chroot}"'
    conf.write_text(f'store = {store}\nkey = "state/key"\n[listen]\nport = 0\n')
    ready = tmp_path / "ready.json"
    daemon = proc.Daemon([sys.executable, "-m", "rebalance.coordinator", "--config", str(conf),
                          "--ready-file", str(ready)], str(tmp_path / "log"),
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    try:
        def up() -> bool:
            assert daemon.alive(), (tmp_path / "log").read_text()
            return ready.exists()

        await wait_for(up, 30, "the coordinator's ready file", poll=0.05)
        info = json.loads(ready.read_text())
        assert info["pid"] == daemon.pid
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{info['http_port']}/ping") as r:
            got = await r.json()
            # On ZooKeeper it may still be campaigning: a follower until elected.
            assert got.pop("role") in ("leader", "follower")
            assert got == {"ping": "pong", "version": version()}
    finally:
        status = daemon.stop(timeout=20)
    assert status == 0
    if backend == "zookeeper":
        started = [json.loads(x) for x in (tmp_path / "log").read_text().splitlines()]
        assert [x["store"] for x in started if "store" in x] == [store.strip('"')]
    else:
        assert (tmp_path / "state" / "c.db").exists()
    assert (tmp_path / "state" / "key.pub").exists()  # generated at first start
    records = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines()]
    assert all(r["name"] == "snapper-coordinator" for r in records)
    # The first line names the build, before the key is generated.
    assert (records[0]["msg"], records[0]["version"]) == ("snapper-coordinator starting",
                                                          version())


# -- the operator CLI (snapper zones|zone|rebalance|status) ----------------------------


async def snapper(env: Env, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """``snapper ARGV`` in a thread (it runs its own event loop) against this coordinator."""
    url = str(env.server.make_url("/"))
    key = env.tmp_path / "operator_key"
    if not key.exists():
        OPERATOR.write_private_key(str(key))
    status = await asyncio.to_thread(cli_main, [*argv, "--coordinator", url, "--key", str(key)])
    out = capsys.readouterr()
    return status, out.out + out.err


async def test_cli_zone_lifecycle(env: Env, capsys: pytest.CaptureFixture[str],
                                  tmp_path: Path) -> None:
    for z in ZONES[:3]:
        await env.fleet.add(z)
    pub = tmp_path / "host.pub"
    pub.write_text(HOST_KEY + "\n")
    for z in ZONES[:3]:
        rc, out = await snapper(env, capsys, "zone", "add", z, "--name", f"z{z[-1]}",
                                "--ssh-host", "127.0.0.1", "--ssh-port", "2222", "--http-url",
                                env.fleet.zones[z].url(), "--host-key", str(pub),
                                "--capacity", "100G")
        assert rc == 0 and "registered: pending" in out, out
    rc, out = await snapper(env, capsys, "zones")
    assert rc == 0 and out.count("pending") == 3 and "active" not in out, out
    for z in ZONES[:3]:  # the operator admits each
        rc, out = await snapper(env, capsys, "zone", "activate", z)
        assert rc == 0 and "is now active (admitted" in out, out
    rc, out = await snapper(env, capsys, "zones")
    assert rc == 0 and "100.0 GiB" in out and out.count("active") == 3, out
    # A rotation is the operator's: the old key registers no more, the new one does.
    new = tmp_path / "new.pub"
    new.write_text(asyncssh.generate_private_key("ssh-ed25519").export_public_key()
                   .decode())
    rc, out = await snapper(env, capsys, "zone", "rekey", ZONES[2], "--host-key", str(new))
    assert rc == 0 and "host key replaced; it is active" in out, out
    rc, out = await snapper(env, capsys, "zone", "add", ZONES[2], "--name", "z3",
                            "--ssh-host", "127.0.0.1", "--http-url",
                            env.fleet.zones[ZONES[2]].url(), "--host-key", str(pub),
                            "--capacity", "100G")
    assert rc == 1 and "HostKeyMismatch" in out, out
    z = await env.call("GET", f"/v1/zones/{ZONES[2]}")
    assert z["host_key"] == new.read_text().strip() and z["ssh_port"] == 2222
    await push_all(env, VMS[:4])
    rc, out = await snapper(env, capsys, "rebalance", "--dry-run")
    assert rc == 0 and out.startswith("would move "), out
    assert (await env.call("GET", "/v1/moves"))["moves"] == []
    rc, out = await snapper(env, capsys, "zone", "drain", ZONES[0])
    assert rc == 0 and "is now draining" in out, out
    rc, out = await snapper(env, capsys, "rebalance", "--dry-run")
    assert rc == 0 and "drain" in out, out
    rc, out = await snapper(env, capsys, "zone", "remove", ZONES[0])
    assert rc == 1 and "ZoneNotEmpty" in out, out
    rc, out = await snapper(env, capsys, "status")
    assert rc == 0 and "VMs:              4 (8 live copies)" in out, out
    assert "under-replicated: 0" in out
    rc, out = await snapper(env, capsys, "zone", "lost", ZONES[1])
    rc, out = await snapper(env, capsys, "status", "--json")
    assert rc == 0 and json.loads(out)["under_replicated"] > 0


def test_cli_without_a_coordinator_is_a_usage_error(capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(COORDINATOR_ENV, raising=False)
    assert cli_main(["zones"]) == 2
    assert "--coordinator" in capsys.readouterr().err


def test_status_text_draws_progress() -> None:
    text = status_text({"zones": {"active": 3}, "vms": 2, "copies": 3, "under_replicated": 1,
                        "moves": {"planned": 1, "running": 1, "done": 0, "failed": 0},
                        "in_flight": [
                            {"vm": VMS[0], "reason": "lost", "to_zone": ZONES[0],
                             "state": "running", "bytes": 100, "progress": 50,
                             "started": 1.0, "step": "copy", "error": "behind"},
                            {"vm": VMS[1], "reason": "rebalance", "to_zone": ZONES[1],
                             "state": "planned", "bytes": 100, "progress": 0, "started": None}]})
    assert "under-replicated: 1" in text and "50%" in text and "[#" in text
    assert "last error: behind" in text and "planned (100 B)" in text


@given(st.integers(0, 10**6), st.sampled_from(["", "K", "M", "G", "T", "P", "KiB", "g", "GB"]))
def test_parse_size(n: int, suffix: str) -> None:
    power = " KMGTP".index((suffix[:1] or " ").upper())
    assert parse_size(f"{n}{suffix}") == n * 1024**power


async def test_http_zone_client_against_snapperd_shapes(fleet: Fleet) -> None:
    """HttpZoneApi reads snapperd's answers: 404 as absent, last_error, unreachable."""
    z = await fleet.add(ZONES[0])
    await fleet.add(ZONES[1])
    fleet.push(VMS[0], [ZONES[0], ZONES[1]])
    api = HttpZoneApi(COORD, request_timeout=5)
    try:
        assert await api.snapshots(z.url(), VMS[1]) is None
        [s0, *_] = await api.snapshots(z.url(), VMS[0]) or []
        assert s0.complete and s0.guids == {"root": int(sguid(VMS[0], 0))} and s0.source == "cn:cn1"
        assert [v.uuid for v in await api.list_vms(z.url())] == [VMS[0]]
        assert (await api.sync(z.url(), VMS[0], ZONES[1])).state == "in_sync"
        with pytest.raises(ZoneRequestFailed) as e:
            await api.sync(z.url(), VMS[1], ZONES[1])
        assert e.value.status == 404 and e.value.zone_code == "ResourceNotFound"
        assert await api.delete_vm(z.url(), VMS[0], elsewhere=[]) is True
        assert await api.delete_vm(z.url(), VMS[0], elsewhere=[]) is False
        fleet.violations.clear()  # this test deletes a copy by hand, on purpose
        await z.stop()
        with pytest.raises(ZoneUnreachable):
            await api.ping(z.url(), 2)
    finally:
        await api.close()


async def test_sync_answer_with_last_error_is_read() -> None:
    async def sync(_: web.Request) -> web.Response:
        return web.json_response({"vm": VMS[0], "peer": ZONES[1], "state": "blocked",
                                  "last_error": "divergent tail", "behind": {}})

    app = web.Application()
    app.router.add_post("/v1/vms/{vm}/sync", sync)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    api = HttpZoneApi(COORD)
    try:
        res = await api.sync(str(server.make_url("/")), VMS[0], ZONES[1])
        assert (res.state, res.error) == ("blocked", "divergent tail")
    finally:
        await api.close()
        await server.close()


async def test_a_rebuilt_store_waits_for_a_vms_second_copy(tmp_path: Path,
                                                           fleet: Fleet) -> None:
    """The store was lost: the first zone back must not get the VMs it holds
    placed by hash; placement answers 503 Rebuilding until the other copy's zone
    is back, then follows the data (primary: the zone the CN pushed to)."""
    for z in ZONES[:4]:
        await fleet.add(z)
    vm, pair = VMS[0], [ZONES[2], ZONES[1]]
    fleet.push(vm, pair)
    env = Env(tmp_path, fleet)  # an empty store
    await env.coordinator.prepare()  # as the daemon does before it serves
    await env.start()
    try:
        # Zones come back one by one; the first holder is registered but not admitted
        # yet (never asked): found on no zone is not proof, no hashed pair.
        await env.register(ZONES[2], admit=False)
        await env.register(ZONES[0])
        await env.register(ZONES[3])
        body = await env.call("GET", f"/v1/placement/{vm}", status=503)
        assert body["code"] == "Rebuilding"
        assert "1 not admitted yet" in body["message"]
        status = await env.call("GET", "/v1/status")  # the operator sees why
        assert status["rebuild_grace_left"] > 0
        assert "rebuilding:" in status_text(status)
        await env.call("PUT", f"/v1/zones/{ZONES[2]}/state", {"state": "active"})
        body = await env.call("GET", f"/v1/placement/{vm}", status=503)
        assert body["code"] == "Rebuilding"
        assert "one registered zone" in body["message"]
        await env.register(ZONES[1])
        assert await env.placement(vm) == pair
        # Every zone answered "no copy": a new VM, placed by hash during the grace too.
        assert env.coordinator.grace_left() > 0, "after the grace: proves nothing"
        assert len(await env.placement(VMS[1])) == 2
    finally:
        await env.close()


def test_the_grace_shown_is_zero_only_when_over() -> None:
    """A test (or an operator's script) waits for 0 and then places: with a few ms
    left the grace still refuses, so 0 is shown only once it is over."""
    assert shown_seconds(0.0) == 0
    assert shown_seconds(0.04) == 0.1
    assert shown_seconds(7.91) == 8.0


async def test_a_rebuilt_store_adopts_no_vm_a_holder_did_not_answer_for(
        tmp_path: Path, fleet: Fleet) -> None:
    """Both holders are back, but one does not answer for the VM: adopting it from
    the other alone would fill the pair by hash and pass over the silent copy."""
    for z in ZONES[:3]:
        await fleet.add(z)
    vm, pair = VMS[0], [ZONES[2], ZONES[1]]
    fleet.push(vm, pair)
    fleet.zones[ZONES[1]].unanswered.add(vm)
    env = Env(tmp_path, fleet)  # an empty store
    await env.coordinator.prepare()
    await env.start()
    try:
        for z in ZONES[:3]:
            await env.register(z)
        assert env.coordinator.grace_left() > 0, "after the grace: proves nothing"
        zones = await env.coordinator.store.zones()
        inv = await env.coordinator.inventories(zones)
        assert await env.coordinator.adopt_inventory(zones, inv) == 0
        assert await env.coordinator.store.placement(vm) is None
        body = await env.call("GET", f"/v1/placement/{vm}", status=503)
        assert body["code"] == "Rebuilding"
        fleet.zones[ZONES[1]].unanswered.clear()  # it answers again: the data decides
        assert await env.coordinator.adopt_inventory(zones, inv) == 1
        assert await env.placement(vm) == pair
    finally:
        await env.close()


def _auto_env(tmp_path: Path, fleet: Fleet, grace: float) -> Env:
    """An empty store, automatic rebalancing, no periodic pass to lean on."""
    env = Env(tmp_path, fleet)
    env.config = CoordinatorConfig(store=tmp_path / "c.db", keys=KEYS, health_interval=3600,
                                   auto_rebalance=True, settle=0.05, rebalance_interval=3600,
                                   rebuild_grace=grace, retry_delay=0.05)
    env.coordinator = Coordinator(env.store, env.api, env.config)
    env.server = TestServer(make_app(env.coordinator, COORD), host="127.0.0.1")
    return env


async def test_a_zone_added_during_the_rebuild_grace_gets_its_share(tmp_path: Path,
                                                                   fleet: Fleet) -> None:
    """A first start is a start on an empty store: a 4th zone added within
    rebuild_grace is new capacity. The passes during the grace make repairs
    only; the change is kept for the first pass after it, which fills the zone
    (it used to be dropped: the zone stayed empty until the next change)."""
    env = _auto_env(tmp_path, fleet, grace=2.0)
    await env.coordinator.prepare()
    await env.start()
    env.coordinator.start()
    try:
        await fleet_of(env, 3)
        await push_all(env, VMS)
        await fleet.add(ZONES[3])
        await env.register(ZONES[3])
        assert env.coordinator.grace_left() > 0, "registered after the grace: proves nothing"
        after: dict[str, list[str]] = {}

        async def filled() -> bool:
            nonlocal after
            moves = (await env.call("GET", "/v1/moves"))["moves"]
            if not moves or any(m["state"] not in ("done", "failed") for m in moves):
                return False
            after = await placements(env)
            return True

        await wait_until(filled, 30, "moves onto the zone added during the grace done",
                         poll=0.05)
        moves = await env.moves_finished()
        assert [m["state"] for m in moves] == ["done"] * 6
        assert all(m["to_zone"] == ZONES[3] and m["reason"] == "rebalance" for m in moves)
        assert sum(ZONES[3] in pair for pair in after.values()) == 6  # 1/4 of 24 copies
        assert_two_copies(env, after)
    finally:
        await env.close()


async def test_zones_re_registering_after_a_lost_store_move_nothing(tmp_path: Path,
                                                                    fleet: Fleet) -> None:
    """The other side of the rule: zones coming back with their data into an
    empty store are not a capacity change, even when the data is unbalanced;
    the pass after the grace makes no move."""
    for z in ZONES[:3]:
        await fleet.add(z)
    for i, vm in enumerate(VMS):  # ZONES[2] holds 2 of 24 copies: far below its share
        fleet.push(vm, [ZONES[0], ZONES[1]] if i >= 2 else [ZONES[1], ZONES[2]])
    env = _auto_env(tmp_path, fleet, grace=3.0)  # registering 3 zones fits, under load too
    await env.coordinator.prepare()
    await env.start()
    env.coordinator.start()
    try:
        for z in ZONES[:3]:
            await env.register(z)
        assert env.coordinator.grace_left() > 0

        async def past_the_grace() -> bool:  # and the deferred pass done
            return env.coordinator.grace_left() == 0 and not env.coordinator.deferred \
                and env.coordinator.auto_passes >= 2

        await wait_until(past_the_grace, 30, "the first pass after the grace", poll=0.02)
        assert (await env.call("GET", "/v1/moves"))["moves"] == []
        assert (await env.call("POST", "/v1/rebalance?dry_run=true"))["moves"], \
            "the data was balanced: the test proves nothing"
    finally:
        await env.close()


async def test_a_dead_zone_is_lost_and_repaired_by_itself(tmp_path: Path, fleet: Fleet) -> None:
    """Health checks declare it lost; the automatic rebalance restores two copies."""
    env = Env(tmp_path, fleet)
    env.config = CoordinatorConfig(store=tmp_path / "c.db", keys=KEYS, health_interval=0.05,
                                   health_timeout=1, lost_after=0.3, auto_rebalance=True,
                                   settle=0.05, retry_delay=0.05)
    env.coordinator = Coordinator(env.store, env.api, env.config)
    env.server = TestServer(make_app(env.coordinator, COORD), host="127.0.0.1")
    await env.start()
    try:
        await fleet_of(env, 4)
        await push_all(env, VMS)
        env.coordinator.start()
        victim = ZONES[2]
        hit = [vm for vm, pair in (await placements(env)).items() if victim in pair]
        await fleet.zones[victim].stop()
        after: dict[str, list[str]] = {}
        zone: dict[str, Any] = {}

        async def repaired() -> bool:  # the zone lost, every VM on two live zones again
            nonlocal after, zone
            after = await placements(env)
            zone = await env.call("GET", f"/v1/zones/{victim}")
            return zone["state"] == "lost" and all(victim not in p for p in after.values())

        await wait_until(repaired, 30, "the lost zone repaired", poll=0.05)
        moves = await env.moves_finished()
        # Each VM the dead zone held was moved off it: by the loss repair, or by
        # a balancing pass the coordinator's start began before the zone died.  A
        # balancing move of such a VM caught by the death keeps the copy it would
        # have deleted (with the dead zone it is one of the two live copies) and
        # the placement then follows the data: no move off the dead zone for it.
        off = [m for m in moves if m["from_zone"] == victim and m["state"] == "done"]
        assert {m["vm"] for m in off} <= set(hit)
        for vm in set(hit) - {m["vm"] for m in off}:
            assert any(m["vm"] == vm and "kept" in (m["error"] or "") for m in moves), vm
        assert {m["reason"] for m in off} <= {"lost", "rebalance"}
        assert all(m["from_zone"] == victim for m in moves if m["reason"] == "lost")
        assert_two_copies(env, after)
        assert zone["health"] == "down"
    finally:
        await env.close()


def _record(uuid: str, state: str = "active") -> ZoneRecord:
    return ZoneRecord(uuid=uuid, name="z", ssh_host="h", ssh_port=22, http_url="http://h",
                      host_key="k", capacity=100, state=ZoneState(state), registered=0.0)


@given(st.sampled_from(VMS), st.lists(st.sampled_from(ZONES), min_size=1, max_size=4,
                                      unique=True),
       st.data())
def test_order_holders_puts_the_pushed_copy_first(vm: str, holders: list[str],
                                                  data: st.DataObject) -> None:
    primary = data.draw(st.sampled_from(holders))
    lost = data.draw(st.sets(st.sampled_from(ZONES)))
    zones = [_record(z, "lost" if z in lost else "active") for z in ZONES]
    views = {z: [SnapshotView("s1", True, {"root": 1},
                              "cn:cn1" if z == primary else f"zone:{primary}", 1)]
             for z in holders}
    order = order_holders(vm, views, zones)
    assert sorted(order) == sorted(holders)
    live = [z for z in order if z not in lost]
    assert order[:len(live)] == live  # zones that cannot take copies go last
    if primary not in lost:
        assert order[0] == primary


async def test_a_store_out_of_reach_is_503_not_a_hang(tmp_path: Path, fleet: Fleet,
                                                       zookeeper: LocalZooKeeper) -> None:
    """The coordinator on ZooKeeper through a cable the test cuts: a placement
    asked meanwhile is 503 StoreUnavailable within the store's timeout."""
    cable = Cable(zookeeper.port)
    await cable.mend()
    store = await ZkStore.open(f"127.0.0.1:{cable.port}", f"/t-{uuidlib.uuid4().hex}",
                               timeout=1.0, session_timeout=2.0)
    env = await Env(tmp_path, fleet, store).start()
    try:
        await fleet_of(env, 3)
        pair = await env.placement(VMS[0])
        await cable.cut()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        err = await env.call("GET", f"/v1/placement/{VMS[0]}", status=503)
        assert err["code"] == "StoreUnavailable" and loop.time() - t0 < 5
        await cable.mend()  # kazoo reconnects by itself; the answer is the same
        await wait_until(lambda: _answers(env, VMS[0]), 20, "the store back")
        assert await env.placement(VMS[0]) == pair
    finally:
        await env.close()
        await cable.cut()


async def _answers(env: Env, vm: str) -> bool:
    async with env.http.get(str(env.server.make_url(f"/v1/placement/{vm}"))) as r:
        return r.status == 200


# -- operator commands: arguments, coordinator_url, pages, the live view ----------------


class Listener:
    """A TCP port that counts who connects: proof that nothing reached the network."""

    def __init__(self) -> None:
        self.connects = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        async def accept(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connects += 1
            w.close()

        self.server = await asyncio.start_server(accept, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


_ADD = ["zone", "add", ZONES[0], "--name", "z1", "--ssh-host", "127.0.0.1", "--http-url",
        "http://127.0.0.1:1", "--host-key", HOST_KEY, "--capacity", "1T"]


def _with(argv: list[str], flag: str, value: str) -> list[str]:
    return [*argv[:argv.index(flag) + 1], value, *argv[argv.index(flag) + 2:]]


@pytest.mark.parametrize("argv, says", [
    (["zone", "drain", "not-a-uuid"], "uuid"),
    (["zone", "remove", "00000000-0000-4000-8000"], "uuid"),
    (_with(_ADD, "--capacity", "5X"), "not a size"),
    (_with(_ADD, "--capacity", "1G5"), "not a size"),
    ([*_ADD, "--ssh-port", "0"], "not a port"),
    (_with(_ADD, "--http-url", "ftp://x"), "http(s) URL"),
    (["moves", "--limit", "0"], "count"),
    (["moves", "--marker", "5"], "--marker needs --limit"),
    (["moves", "--state", "gone"], "invalid choice"),
    (["status", "--watch", "--interval", "0"], "seconds"),
    (["status", "--count", "2"], "--count needs --watch"),
    (["zones", "--bogus"], "unrecognized"),
])
async def test_cli_bad_arguments_exit_2_before_any_request(
        argv: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "operator_key"
    OPERATOR.write_private_key(str(key))
    monkeypatch.delenv(COORDINATOR_ENV, raising=False)
    listener = Listener()
    async with listener as url:
        rc = await asyncio.to_thread(cli_main, [*argv, "--coordinator", url, "--key", str(key)])
    err = capsys.readouterr().err
    assert rc == 2 and says in err, err
    assert "usage:" in err or err.startswith("snapper: ")
    assert listener.connects == 0


async def test_cli_coordinator_url_flag_env_then_config(
        env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """--coordinator > $SNAPPER_COORDINATOR > coordinator_url of snapper's config file."""
    await fleet_of(env, 1)
    live = str(env.server.make_url("/"))
    key = tmp_path / "operator_key"
    OPERATOR.write_private_key(str(key))
    conf = tmp_path / "snapper.toml"
    monkeypatch.delenv(COORDINATOR_ENV, raising=False)
    monkeypatch.delenv("SNAPPER_CN_CONFIG", raising=False)

    def run(*argv: str) -> tuple[int, str]:
        rc = cli_main(["--config", str(conf), *argv, "--key", str(key)])
        out = capsys.readouterr()
        return rc, out.out + out.err

    async with Listener() as dead:  # answers nothing useful: closes every connection
        conf.write_text(f'coordinator_url = "{live}"\n')
        rc, out = await asyncio.to_thread(run, "zones")
        assert rc == 0 and "z1" in out, out
        monkeypatch.setenv(COORDINATOR_ENV, dead)  # env beats the config
        rc, out = await asyncio.to_thread(run, "zones")
        assert rc == 1 and "CoordinatorUnreachable" in out, out
        rc, out = await asyncio.to_thread(run, "zones", "--coordinator", live)  # flag beats env
        assert rc == 0 and "z1" in out, out
        monkeypatch.setenv(COORDINATOR_ENV, "not a url")
        rc, out = await asyncio.to_thread(run, "zones")
        assert rc == 2 and f"${COORDINATOR_ENV}" in out, out
    monkeypatch.delenv(COORDINATOR_ENV)
    conf.write_text(f'coordinator_ulr = "{live}"\n')  # the one loader: a typo is named
    rc, out = await asyncio.to_thread(run, "zones")
    assert rc == 2 and "did you mean 'coordinator_url'" in out and str(conf) in out, out


async def test_list_routes_are_paged(env: Env) -> None:
    await fleet_of(env, 4)
    page = await env.call("GET", "/v1/zones?limit=3")
    assert [z["uuid"] for z in page["zones"]] == ZONES[:3] and page["next"] == ZONES[2]
    page = await env.call("GET", f"/v1/zones?limit=3&marker={page['next']}")
    assert [z["uuid"] for z in page["zones"]] == ZONES[3:4] and page["next"] is None
    await env.call("GET", "/v1/zones?limit=0", status=422)
    await env.call("GET", "/v1/zones?marker=nope", status=422)
    await push_all(env, VMS)
    await env.call("PUT", f"/v1/zones/{ZONES[0]}/state", {"state": "draining"})
    env.coordinator.start()
    await env.call("POST", "/v1/rebalance")
    moves = await env.moves_finished()
    assert len(moves) >= 3 and (await env.call("GET", "/v1/moves"))["next"] is None
    seen, marker = [], None
    while True:
        page = await env.call("GET", "/v1/moves?limit=2" + (f"&marker={marker}" if marker
                                                             else ""))
        assert len(page["moves"]) <= 2
        seen += [m["id"] for m in page["moves"]]
        if (marker := page["next"]) is None:
            break
    assert seen == [m["id"] for m in moves] == sorted(seen)
    for bad in ("limit=1001", "limit=x", "marker=-1"):
        assert (await env.call("GET", f"/v1/moves?{bad}", status=422))["code"] == \
            "InvalidArgument"


async def test_finished_moves_are_pruned(env: Env) -> None:
    await fleet_of(env, 3)
    await push_all(env, VMS[:6])
    await env.call("PUT", f"/v1/zones/{ZONES[0]}/state", {"state": "draining"})
    env.coordinator.start()
    await env.call("POST", "/v1/rebalance")
    moves = await env.moves_finished()
    c = env.coordinator
    assert await c.prune() == 0  # all of them younger than keep_days
    c.config = dataclasses.replace(c.config, keep_days=0.0, keep_finished=1)
    assert await c.prune() == len(moves) - 1
    assert [m["id"] for m in (await env.call("GET", "/v1/moves"))["moves"]] == \
        [moves[-1]["id"]]
    status = await env.call("GET", "/v1/status")
    assert sum(status["moves"].values()) == 1


async def test_cli_moves_transfers_and_the_live_view(env: Env, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    await fleet_of(env, 3)
    await push_all(env, VMS[:8])
    env.fleet.zones[ZONES[1]].inflight = [{
        "id": 1, "kind": "receive", "vm": VMS[0], "dataset": "root", "snapshot": "s9",
        "base": "s0", "peer": "cn:cn1", "bytes": 3 << 20, "expected": 6 << 20,
        "rate": 1 << 20, "eta": 3.0, "started": 1000.0}]
    await env.call("PUT", f"/v1/zones/{ZONES[0]}/state", {"state": "draining"})
    env.coordinator.start()
    await env.call("POST", "/v1/rebalance")
    moves = await env.moves_finished()
    assert len(moves) >= 2
    rc, out = await snapper(env, capsys, "moves", "--json")
    assert rc == 0 and [m["id"] for m in json.loads(out)] == [m["id"] for m in moves]
    rc, out = await snapper(env, capsys, "moves", "--limit", "1", "--state", "done")
    assert rc == 0 and out.splitlines()[0].split()[:3] == ["ID", "VM", "REASON"], out
    assert f"more: snapper moves --limit 1 --marker {moves[0]['id']}" in out, out
    rc, out = await snapper(env, capsys, "transfers")
    assert rc == 0 and "receive" in out and "3.0 MiB/6.0 MiB" in out and "0:03" in out, out
    rc, out = await snapper(env, capsys, "transfers", "--json")
    [t] = json.loads(out)
    assert (t["zone"], t["vm"], t["rate"]) == (ZONES[1], VMS[0], 1 << 20)
    rc, out = await snapper(env, capsys, "status", "--watch", "--count", "1", "--json")
    view = json.loads(out)
    assert rc == 0 and view["status"]["vms"] == 8 and len(view["zones"]) == 3
    assert [v["vm"] for v in view["stalest"]] == sorted(VMS[:8])[:5] and \
        all(v["newest"] == 1002 and len(v["zones"]) == 2 for v in view["stalest"])
    rc, out = await snapper(env, capsys, "status", "--watch", "--count", "2",
                            "--interval", "0.1")
    assert rc == 0 and out.count("snapper status  ") == 2, out
    assert "transfers in flight: 1" in out and "stalest VMs" in out and "[#" in out, out
    assert "\x1b[" not in out  # not a terminal: frames one after another


async def test_status_watch_redraws_in_place_and_quits_on_ctrl_c(env: Env,
                                                                 tmp_path: Path) -> None:
    """On a terminal (a pty): cursor home and clear each frame; Ctrl-C (SIGINT) ends it
    with status 0 and the cursor shown again."""
    await fleet_of(env, 2)
    key = tmp_path / "operator_key"
    OPERATOR.write_private_key(str(key))
    master, slave = pty.openpty()
    os.set_blocking(master, False)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "snapper_zone.cli", "status", "--watch", "--interval", "0.2",
        "--coordinator", str(env.server.make_url("/")), "--key", str(key),
        stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "COLUMNS": "100"})
    os.close(slave)
    seen = b""

    def frames() -> int:
        nonlocal seen
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(master, 65536):
                seen += chunk
        return seen.count(b"\x1b[H")

    try:
        await wait_for(lambda: frames() >= 2, 30, "two frames of the live view", poll=0.05)
        child.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            rc = await child.wait()
            err = await child.stderr.read() if child.stderr else b""
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    with contextlib.suppress(OSError):
        frames()
    os.close(master)
    assert rc == 0, err.decode()
    assert seen.startswith(b"\x1b[?25l") and seen.rstrip().endswith(b"\x1b[?25h")
    assert b"snapper status  " in seen and b"z1" in seen and b"\x1b[J" in seen


@given(st.integers(40, 200))
def test_render_view_draws_every_part_within_the_width(width: int) -> None:
    view = {"time": 1e9, "zones": [{"name": "z1", "state": "active", "health": "healthy",
                                    "used": GIB, "free": 5 * GIB, "vms": 2}],
            "status": {"zones": {"active": 1}, "vms": 2, "copies": 2, "under_replicated": 2,
                       "moves": {"planned": 0, "running": 1, "done": 0, "failed": 0},
                       "in_flight": [{"vm": VMS[0], "reason": "lost", "to_zone": ZONES[0],
                                      "state": "running", "bytes": 100, "progress": 50,
                                      "started": 1.0, "step": "copy"}]},
            "transfers": [{"zone_name": "z1", "kind": "receive", "vm": VMS[0],
                           "dataset": "root", "snapshot": "s9", "bytes": 3 << 20,
                           "expected": 6 << 20, "rate": 1 << 20}],
            "stalest": [{"vm": VMS[1], "newest": None, "age": None, "zones": ["z1"]},
                        {"vm": VMS[0], "newest": 1e9 - 90000, "age": 90000.0,
                         "zones": ["z1", "z2"]}],
            "unreachable": [{"zone": ZONES[1], "name": "z2", "error": "ZoneUnreachable: x"}]}
    lines = render_view(view, width, 2.0).split("\n")
    assert all(len(line) <= width for line in lines)
    text = "\n".join(lines)
    for part in ("under-replicated: 2", "moves:            1 running", "transfers in flight: 1",
                 "z2", "never"):
        assert part in text, text
    assert sum(VMS[0][:8] in line for line in lines) >= 2  # its move, its transfer, its row
