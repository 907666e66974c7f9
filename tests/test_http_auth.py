"""Who may call what: snapperd's and the coordinator's route tables, through
real aiohttp servers on 127.0.0.1 (no ZFS: every refusal happens before a handler).

Each refusal is a typed JSON error and changes nothing: 401 ``Unauthorized``
(unsigned, unknown or removed key, bad signature, stale date, replayed nonce,
tampered body), 403 ``NotAuthorized`` (a role the route does not name), 415
``UnsupportedMediaType`` (a body that is not JSON).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from rebalance.coordinator import ROUTES as COORDINATOR_ROUTES
from rebalance.coordinator import Coordinator, CoordinatorConfig
from rebalance.coordinator import make_app as coordinator_app
from rebalance.store import SqliteStore
from rebalance.zoneclient import HttpZoneApi
from replication.coordinator_client import CoordinatorClient, CoordinatorUnavailable
from snapper_zone.cn.cli import load_cn_config
from snapper_zone.cn.client import placement
from snapper_zone.common.config import ConfigError, parse_config, parse_keys
from snapper_zone.common.httpguard import Route
from snapper_zone.common.httpsig import (
    Signer,
    signing_session,
)
from snapper_zone.daemon.httpapi import ROUTES as ZONE_ROUTES
from snapper_zone.daemon.httpapi import make_app as zone_app
from snapper_zone.daemon.zone import Zone
from snapper_zone.transfer.remote import ZoneError
from snapper_zone.wire import ZoneRegistration

ZONE = "bd932c2b-caae-495a-abf2-fb958111c3fb"
PEER = "00000000-0000-4000-8000-000000000002"
VM = "74c59c61-4559-4ca2-b1ef-0ca22f2f936a"


def _key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


def _pub(key: asyncssh.SSHKey) -> str:
    return str(key.export_public_key().decode().strip())


OPERATOR, CN, PEER_KEY, COORD, STRANGER = _key(), _key(), _key(), _key(), _key()
ZONE_HOST = _key()


def _path(route: Route) -> str:
    """A concrete path for a route: valid values for each parameter."""
    return (route.path.replace("{uuid}", VM).replace("{name}", "s1")
            .replace("{vm}", VM))


@dataclass
class Servers:
    zone: TestServer
    coordinator: TestServer
    coord: Coordinator

    def zurl(self, path: str) -> str:
        return str(self.zone.make_url(path))

    def curl(self, path: str) -> str:
        return str(self.coordinator.make_url(path))


@pytest.fixture
async def servers(tmp_path: Path) -> AsyncIterator[Servers]:
    config = parse_config({
        "uuid": ZONE, "name": "z0", "root": "nopool/snapper",
        "ssh": {"port": 0, "host_key": str(tmp_path / "host_key")}, "http": {"port": 0},
        "keys": [{"role": "operator", "public_key": _pub(OPERATOR)},
                 {"role": "cn", "cn_id": "cn0", "public_key": _pub(CN)},
                 {"role": "peer", "zone": PEER, "public_key": _pub(PEER_KEY)}],
        "vms": {VM: "cn0"}, "coordinator_key": _pub(COORD),
    }, str(tmp_path / "snapperd.toml"))
    zone = TestServer(zone_app(Zone.from_config(config)), host="127.0.0.1")
    store = SqliteStore(tmp_path / "c.db")
    api = HttpZoneApi(Signer(COORD))
    keys = parse_keys([{"role": "operator", "public_key": _pub(OPERATOR)},
                       {"role": "cn", "cn_id": "cn0", "public_key": _pub(CN)}], "c.toml")
    coord = Coordinator(store, api, CoordinatorConfig(store=tmp_path / "c.db", keys=keys,
                                                      auto_rebalance=False))
    coordinator = TestServer(coordinator_app(coord, Signer(COORD)), host="127.0.0.1")
    await zone.start_server()
    await coordinator.start_server()
    yield Servers(zone, coordinator, coord)
    await zone.close()
    await coordinator.close()
    await api.close()
    await store.close()


async def _call(http: aiohttp.ClientSession, method: str, url: str, body: Any = None,
                **kw: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with http.request(method, url, json=body, **kw) as r:
        doc = await r.json(content_type=None) if r.content_type == "application/json" \
            else await r.text()
        return r.status, doc, r


def _registration(uuid: str, key: asyncssh.SSHKey) -> dict[str, Any]:
    return ZoneRegistration(uuid=uuid, name="z1", ssh_host="127.0.0.1", ssh_port=2222,
                            http_url="http://127.0.0.1:1", host_key=_pub(key),
                            capacity=1 << 30).to_json()


# -- the tables -------------------------------------------------------------------------


@pytest.mark.parametrize("routes, make", [(ZONE_ROUTES, "zone"),
                                          (COORDINATOR_ROUTES, "coordinator")])
async def test_every_route_names_its_roles(servers: Servers, routes: Sequence[Route],
                                           make: str) -> None:
    app = (servers.zone if make == "zone" else servers.coordinator).app
    served = {(r.method, r.resource.canonical) for r in app.router.routes()
              if r.resource is not None and r.method != "HEAD"}
    assert served == {(r.method, r.path) for r in routes}
    roles = {"operator", "cn", "zone", "coordinator", "pending-zone"}
    for r in routes:
        assert r.roles <= roles, r
        # Only health and metrics are open; nothing else answers a stranger.
        assert (not r.roles) == (r.path in ("/ping", "/metrics")), r


@pytest.mark.parametrize("which", ["zone", "coordinator"])
async def test_every_closed_route_refuses_the_unsigned(servers: Servers, which: str) -> None:
    routes = ZONE_ROUTES if which == "zone" else COORDINATOR_ROUTES
    url = servers.zurl if which == "zone" else servers.curl
    async with aiohttp.ClientSession() as anon:
        for r in routes:
            status, doc, resp = await _call(anon, r.method, url(_path(r)),
                                            {} if r.method in ("POST", "PUT") else None)
            if not r.roles:
                assert status == 200, (r, doc)
                continue
            assert (status, doc["code"]) == (401, "Unauthorized"), (r, doc)
            assert resp.headers["WWW-Authenticate"].startswith("Signature ")
        # An unknown route tells a stranger nothing either.
        assert (await _call(anon, "GET", url("/v1/nothing")))[0] == 401
    assert await servers.coord.store.zones() == []


async def test_ping_says_nothing_but_liveness(servers: Servers) -> None:
    async with aiohttp.ClientSession() as anon:
        _, zone, _ = await _call(anon, "GET", servers.zurl("/ping"))
        _, coord, _ = await _call(anon, "GET", servers.curl("/ping"))
    # The coordinator's role (leader or follower) is for load balancers: where
    # to send an operator's rebalance; nothing about the fleet.
    assert set(zone) == {"ping", "zone", "version"} and set(coord) == {"ping", "version", "role"}


# -- roles -----------------------------------------------------------------------------


async def test_wrong_role_is_403(servers: Servers) -> None:
    async with signing_session(Signer(CN)) as cn, signing_session(Signer(PEER_KEY)) as peer, \
            signing_session(Signer(COORD)) as coord, signing_session(Signer(OPERATOR)) as ops:
        for http, method, url, body in (
                (cn, "POST", servers.zurl(f"/v1/vms/{VM}/sync"), {}),
                (cn, "DELETE", servers.zurl(f"/v1/vms/{VM}"), {"elsewhere": {}}),
                (cn, "GET", servers.zurl("/v1/transfers"), None),
                (peer, "DELETE", servers.zurl(f"/v1/vms/{VM}/snapshots/s1"), None),
                (peer, "POST", servers.zurl(f"/v1/vms/{VM}/sync"), {}),
                # Only the coordinator (or an operator) says a placement changed.
                (cn, "POST", servers.zurl(f"/v1/vms/{VM}/placement"), None),
                (peer, "POST", servers.zurl(f"/v1/vms/{VM}/placement"), None),
                (coord, "DELETE", servers.zurl(f"/v1/vms/{VM}/snapshots/s1"), None),
                # Retention deletes snapshots: the operator's alone, not even the owner's.
                (cn, "POST", servers.zurl(f"/v1/vms/{VM}/prune"), {}),
                (cn, "POST", servers.zurl("/v1/prune"), {}),
                (peer, "POST", servers.zurl(f"/v1/vms/{VM}/prune"), {}),
                (peer, "POST", servers.zurl("/v1/prune"), {}),
                (coord, "POST", servers.zurl("/v1/prune"), {}),
                (cn, "GET", servers.curl("/v1/zones"), None),
                (cn, "PUT", servers.curl(f"/v1/zones/{PEER}/state"), {"state": "lost"}),
                (cn, "POST", servers.curl("/v1/rebalance"), None),
                (cn, "GET", servers.curl("/v1/status"), None)):
            status, doc, _ = await _call(http, method, url, body)
            assert (status, doc["code"]) == (403, "NotAuthorized"), (method, url, doc)
        # And the roles a route names get through (to the handler's own answer).
        for http, url in ((ops, servers.zurl("/v1/transfers")),
                          (coord, servers.zurl("/v1/transfers")),
                          (peer, servers.zurl("/v1/replication")),
                          (ops, servers.curl("/v1/status"))):
            status, doc, _ = await _call(http, "GET", url)
            assert status == 200, (url, doc)
        status, doc, _ = await _call(cn, "GET", servers.curl(f"/v1/placement/{VM}"))
        assert (status, doc["code"]) == (503, "NotEnoughZones")


async def test_text_plain_post_is_415(servers: Servers) -> None:
    async with signing_session(Signer(OPERATOR)) as ops:
        for url in (servers.zurl(f"/v1/vms/{VM}/sync"), servers.curl("/v1/zones")):
            async with ops.post(url, data='{"peer": null}',
                                headers={"Content-Type": "text/plain"}) as r:
                assert (r.status, (await r.json())["code"]) == (415, "UnsupportedMediaType")


# -- bad signatures -----------------------------------------------------------------------


async def test_replayed_skewed_tampered_and_unknown_are_401(servers: Servers) -> None:
    url = servers.zurl("/v1/transfers")
    host = url.split("/")[2]
    signer = Signer(OPERATOR)
    async with aiohttp.ClientSession() as raw:
        headers = {**signer.request_headers("GET", "/v1/transfers", host, b""), "Host": host}
        assert (await _call(raw, "GET", url, headers=headers))[0] == 200
        status, doc, _ = await _call(raw, "GET", url, headers=headers)
        assert (status, doc["code"]) == (401, "Unauthorized") and "replayed" in doc["message"]

        # A body other than the one signed (a sync's peer swapped in flight).
        sync = servers.zurl(f"/v1/vms/{VM}/sync")
        path = f"/v1/vms/{VM}/sync"
        headers = {**signer.request_headers("POST", path, host, b'{"bwlimit": 1}'),
                   "Host": host, "Content-Type": "application/json"}
        status, doc, _ = await _call(raw, "POST", sync, data=b'{"bwlimit": 9}',
                                     headers=headers)
        assert status == 401 and "digest" in doc["message"]
        # Signed for one path, sent to another.
        headers = {**signer.request_headers("GET", "/v1/replication", host, b""), "Host": host}
        status, doc, _ = await _call(raw, "GET", url, headers=headers)
        assert status == 401 and "bad signature" in doc["message"]
    for skew in (-400.0, 400.0):
        def skewed(skew: float = skew) -> float:
            return time.time() + skew
        async with signing_session(Signer(OPERATOR, clock=skewed)) as late:
            status, doc, _ = await _call(late, "GET", url)
            assert status == 401 and "300s" in doc["message"]
    async with signing_session(Signer(STRANGER)) as stranger:
        status, doc, _ = await _call(stranger, "GET", url)
        assert status == 401 and "unknown key" in doc["message"]


# -- the coordinator: registration, revocation, signed answers ------------------------------


async def test_a_zone_registers_only_the_key_it_holds(servers: Servers) -> None:
    url = servers.curl("/v1/zones")
    async with signing_session(Signer(STRANGER)) as stranger:
        # Someone else's host key in the body: the signer is nobody the coordinator knows.
        status, doc, _ = await _call(stranger, "POST", url, _registration(PEER, ZONE_HOST))
        assert (status, doc["code"]) == (401, "Unauthorized")
    async with signing_session(Signer(ZONE_HOST)) as zone:
        status, doc, _ = await _call(zone, "POST", url, _registration(PEER, ZONE_HOST))
        assert status == 201, doc
        # The same key cannot register (or hijack) another zone's uuid.
        status, doc, _ = await _call(zone, "POST", url, _registration(ZONE, ZONE_HOST))
        assert (status, doc["code"]) == (403, "NotAuthorized")
        # Pending, it reads nothing of the fleet; admitted, the zone list, and
        # nothing an operator does.
        assert (await _call(zone, "GET", url))[0] == 403
        await servers.coord.set_state(PEER, {"state": "active"})  # the operator admits it
        assert (await _call(zone, "GET", url))[0] == 200
        status, doc, _ = await _call(zone, "PUT", servers.curl(f"/v1/zones/{PEER}/state"),
                                     {"state": "lost"})
        assert status == 403
    assert [z.uuid for z in await servers.coord.store.zones()] == [PEER]
    assert [z.state.value for z in await servers.coord.store.zones()] == ["active"]


async def test_a_removed_zone_key_is_refused(servers: Servers) -> None:
    async with signing_session(Signer(ZONE_HOST)) as zone, \
            signing_session(Signer(OPERATOR)) as ops:
        assert (await _call(zone, "POST", servers.curl("/v1/zones"),
                            _registration(PEER, ZONE_HOST)))[0] == 201
        assert (await _call(ops, "PUT", servers.curl(f"/v1/zones/{PEER}/state"),
                            {"state": "active"}))[0] == 200  # admitted
        assert (await _call(zone, "GET", servers.curl("/v1/zones")))[0] == 200
        assert (await _call(ops, "DELETE", servers.curl(f"/v1/zones/{PEER}")))[0] == 204
        status, doc, _ = await _call(zone, "GET", servers.curl("/v1/zones"))
        assert (status, doc["code"]) == (401, "Unauthorized")


async def test_the_zone_trusts_only_answers_signed_by_its_coordinator(servers: Servers
                                                                      ) -> None:
    url = servers.curl("/")
    good = CoordinatorClient(url, Signer(ZONE_HOST), _pub(COORD))
    forged = CoordinatorClient(url, Signer(ZONE_HOST), _pub(STRANGER))
    try:
        await good.register(ZoneRegistration.from_json(_registration(PEER, ZONE_HOST)))
        await servers.coord.set_state(PEER, {"state": "active"})  # admitted
        assert [z.uuid for z in await good.zones()] == [PEER]
        assert await good.knows(PEER)
        with pytest.raises(CoordinatorUnavailable, match="untrusted"):
            await forged.zones()
    finally:
        await good.close()
        await forged.close()


async def test_an_unsigned_coordinator_is_not_trusted(tmp_path: Path) -> None:
    """Anyone answering at the coordinator's address, with a zone list of their own."""
    async def zones(_: web.Request) -> web.Response:
        return web.json_response({"zones": [{
            "uuid": PEER, "ssh_host": "10.0.0.66", "ssh_port": 22,
            "http_url": "http://10.0.0.66", "host_key": _pub(STRANGER)}]})

    app = web.Application()
    app.router.add_get("/v1/zones", zones)
    fake = TestServer(app, host="127.0.0.1")
    await fake.start_server()
    client = CoordinatorClient(str(fake.make_url("/")), Signer(ZONE_HOST), _pub(COORD))
    try:
        with pytest.raises(CoordinatorUnavailable, match="not signed"):
            await client.zones()
    finally:
        await client.close()
        await fake.close()


async def test_a_cn_pins_only_host_keys_a_signed_placement_names(servers: Servers,
                                                                 tmp_path: Path) -> None:
    key = tmp_path / "cn_key"
    CN.write_private_key(str(key))
    async with signing_session(Signer(OPERATOR)) as ops:
        for uuid, host in ((PEER, ZONE_HOST), (ZONE, PEER_KEY)):
            assert (await _call(ops, "POST", servers.curl("/v1/zones"),
                                _registration(uuid, host)))[0] == 201
            assert (await _call(ops, "PUT", servers.curl(f"/v1/zones/{uuid}/state"),
                                {"state": "active"}))[0] == 200  # admitted
    url = servers.curl("/")
    placed = await placement(url, VM, key, _pub(COORD))
    assert {e["host_key"] for e in placed} == {_pub(ZONE_HOST), _pub(PEER_KEY)}
    with pytest.raises(ZoneError) as e:
        await placement(url, VM, key, _pub(STRANGER))
    assert e.value.code == "UntrustedResponse"


def test_the_cn_config_takes_a_coordinator_key(tmp_path: Path) -> None:
    conf = tmp_path / "cn.toml"
    conf.write_text(f'coordinator_url = "http://c:8480"\nkey = "k"\n'
                    f'coordinator_key = "{_pub(COORD)}"\n')
    assert load_cn_config(conf)["coordinator_key"] == _pub(COORD)
    conf.write_text('coordinator_key = "ssh-ed25519 AAAA"\n')
    with pytest.raises(ConfigError, match="coordinator_key"):
        load_cn_config(conf)
