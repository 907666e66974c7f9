"""Retention on a real zone (zfs-fuse) through its HTTP API: what a policy lets go,
what it never touches, and who prunes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
import pytest
from aiohttp.test_utils import TestServer

from snapper_zone.common.config import ConfigError, parse_config
from snapper_zone.common.httpsig import Signer, signing_session
from snapper_zone.daemon.httpapi import make_app
from snapper_zone.daemon.prune import Pruner
from snapper_zone.daemon.zone import Zone
from snapper_zone.fleet.pools import FilePool
from snapper_zone.policy import parse_policies, snapshot_name
from snapper_zone.zfs.names import Dataset
from snapper_zone.zfs.zfs import SendSpec, Zfs
from tests.helpers import wait_for, write_random

pytestmark = pytest.mark.zfs

ZONE_UUID = "bd932c2b-caae-495a-abf2-fb958111c3fb"
VM = "74c59c61-4559-4ca2-b1ef-0ca22f2f936a"
OPERATOR = asyncssh.generate_private_key("ssh-ed25519", comment="ops@test")
CN0 = asyncssh.generate_private_key("ssh-ed25519")
# Scheduled a day from now: later than the hand-made snapshot's real creation
# time (retention counts policy snapshots from the time in their names).
_DAY = (int(time.time()) // 86400 + 1) * 86400
HOURLY = [snapshot_name("hourly", _DAY + i * 3600) for i in range(1, 6)]
DAILY = snapshot_name("daily", _DAY)
# In push order: a daily, a hand-made one, then five hourlies.
NAMES = [DAILY, "before-upgrade", *HOURLY]
POLICY = parse_policies({"policy": [{
    "name": "p", "vms": ["*"], "retention": {"keep": {"hourly": 2, "daily": 1}},
    "level": [{"name": "daily", "cron": "0 0 * * *"}, {"name": "hourly", "every": "1h"}]}]})


def _pub(key: asyncssh.SSHKey) -> str:
    return str(key.export_public_key().decode().strip())


@dataclass
class Env:
    zone: Zone
    server: TestServer
    http: aiohttp.ClientSession

    async def call(self, method: str, path: str, *, http: aiohttp.ClientSession | None = None
                   ) -> tuple[int, Any]:
        async with (http or self.http).request(method, str(self.server.make_url(path))) as r:
            return r.status, await r.json()

    async def names(self) -> list[str]:
        return [s.name for s in await self.zone.store.snapshots(VM)]


async def _zone(zfs: Zfs, zone_pool: FilePool, tmp_path: Path, retention: bool) -> Zone:
    config = parse_config({
        "uuid": ZONE_UUID, "name": "snapper0", "root": f"{zone_pool.name}/snapper",
        "ssh": {"port": 0, "host_key": str(tmp_path / "host_key")}, "http": {"port": 0},
        "keys": [{"role": "operator", "public_key": _pub(OPERATOR)},
                 {"role": "cn", "cn_id": "cn0", "public_key": _pub(CN0)}],
        "vms": {VM: "cn0"},
    }, str(tmp_path / "snapperd.toml"))
    await zfs.create(Dataset(config.root))
    zone = Zone.from_config(config, zfs)
    if retention:
        zone.pruner = Pruner(zone, POLICY, interval=3600)
    await zone.store.ensure_vm(VM)
    return zone


async def _push_all(zfs: Zfs, zone: Zone, cn_pool: FilePool, source: str) -> None:
    cn = Dataset(cn_pool.name).child(VM)
    await zfs.create(cn)
    base = None
    for i, name in enumerate(NAMES):
        write_random(cn_pool, cn, f"f{i}", 64 << 10)
        await zfs.snapshot([cn.snapshot(name)])
        spec = SendSpec(cn.snapshot(name), base=cn.snapshot(base) if base else None)
        await zfs.pipe(spec, zone.store.part_dataset(VM, "root"))
        await zone.store.mark_complete(VM, name, ["root"], {"uuid": VM}, source)
        base = name


@pytest.fixture
async def env(zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool,
              tmp_path: Path) -> AsyncIterator[Env]:
    zone = await _zone(zfs, zone_pool, tmp_path, retention=True)
    await _push_all(zfs, zone, cn_pool, "cn:cn0")
    server = TestServer(make_app(zone), host="127.0.0.1")
    await server.start_server()
    async with signing_session(Signer(OPERATOR)) as http:
        yield Env(zone, server, http)
    await server.close()


async def test_dry_run_says_what_would_go_and_why(env: Env) -> None:
    status, plan = await env.call("POST", f"/v1/vms/{VM}/prune?dry_run=true")
    assert status == 200, plan
    assert plan["dry_run"] is True and plan["policy"] == "p" and plan["pruner"] is True
    gone = {d["name"]: d["reason"] for d in plan["delete"]}
    assert set(gone) == set(HOURLY[:3])
    assert all("beyond the 2 newest hourly" in r for r in gone.values())
    kept = {k["name"]: k["reason"] for k in plan["keep"]}
    assert "newest complete" in kept[HOURLY[-1]]
    assert "one of the 1 newest daily" in kept[DAILY]
    assert "not made by a policy" in kept["before-upgrade"]
    assert plan["deleted"] == [] and await env.names() == NAMES  # nothing changed


async def test_prune_deletes_what_the_plan_lets_go_but_not_what_is_in_use(env: Env) -> None:
    t = env.zone.transfers.start("send", VM, "root", HOURLY[1], base=HOURLY[0], peer="cn:x",
                                 expected=1 << 20)  # a restore reading hourly 2 from hourly 1
    try:
        status, plan = await env.call("POST", f"/v1/vms/{VM}/prune")
    finally:
        env.zone.transfers.finish(t, "ok")
    assert status == 200, plan
    assert plan["deleted"] == [HOURLY[2]]
    kept = {k["name"]: k["reason"] for k in plan["keep"]}
    assert kept[HOURLY[0]] == kept[HOURLY[1]] == "pinned: a transfer uses it now"
    assert await env.names() == [DAILY, "before-upgrade", HOURLY[0], HOURLY[1], *HOURLY[3:]]
    stones = await env.zone.store.tombstones(VM)
    assert len(stones) == 1  # the mirror learns of it as of any delete
    # Once the restore is over the next pass lets the rest go; again changes nothing.
    assert (await env.call("POST", "/v1/prune"))[1]["vms"][0]["deleted"] == HOURLY[:2]
    assert (await env.call("POST", "/v1/prune"))[1]["vms"][0]["deleted"] == []
    assert await env.names() == [DAILY, "before-upgrade", *HOURLY[3:]]


async def test_the_loop_prunes_when_kicked(env: Env) -> None:
    assert env.zone.pruner is not None
    task = asyncio.create_task(env.zone.pruner.run())
    try:
        await wait_for(lambda: env.zone.pruner is not None and env.zone.pruner.passes >= 1,
                       30, "a first retention pass")
        assert await env.names() == [DAILY, "before-upgrade", *HOURLY[3:]]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_only_the_zone_pushed_to_prunes(zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool,
                                              tmp_path: Path) -> None:
    """The mirror (its snapshots came from a zone) plans but leaves deleting to the
    primary, whose deletes reach it as tombstones; an operator may force it."""
    zone = await _zone(zfs, zone_pool, tmp_path, retention=True)
    await _push_all(zfs, zone, cn_pool, f"zone:{ZONE_UUID[:-1]}0")
    assert zone.pruner is not None
    plan = await zone.pruner.prune(VM, dry_run=False)
    assert plan.pruner is False and plan.deleted == () and len(await zone.store.snapshots(VM)) == 7
    forced = await zone.pruner.prune(VM, dry_run=False, force=True)
    assert forced.deleted == tuple(HOURLY[:3])


async def test_prune_is_for_operators_and_needs_a_policy(
        zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool, tmp_path: Path, env: Env) -> None:
    async with signing_session(Signer(CN0)) as cn:
        status, body = await env.call("POST", f"/v1/vms/{VM}/prune", http=cn)
    assert (status, body["code"]) == (403, "NotAuthorized")
    status, body = await env.call("POST", f"/v1/vms/{VM}/prune?dry_run=maybe")
    assert (status, body["code"]) == (422, "InvalidArgument")
    env.zone.pruner = None
    status, body = await env.call("POST", "/v1/prune?dry_run=true")
    assert (status, body["code"]) == (409, "NoRetentionPolicy")
    assert await env.names() == NAMES


@pytest.mark.parametrize("retention, field", [
    ({}, "retention.policy"), ({"policy": "p.toml", "interval_seconds": 1},
                               "retention.interval_seconds"),
    ({"policy": "p.toml", "every": 5}, "retention.every"),
    ({"policy_from_coordinator": "fleet"}, "retention.policy_from_coordinator"),
    ({"policy_from_coordinator": 7}, "retention.policy_from_coordinator"),
    ({"policy": "p.toml", "policy_from_coordinator": "fleet"}, "retention.policy"),
])
def test_retention_config_names_the_field(retention: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"uuid": ZONE_UUID, "name": "z", "root": "tank/snapper",
                      "ssh": {"port": 0, "host_key": "/k"}, "http": {"port": 0},
                      "keys": [], "retention": retention}, "/etc/snapperd.toml")
    assert e.value.field == field


def test_retention_config_resolves_the_policy_beside_the_config() -> None:
    c = parse_config({"uuid": ZONE_UUID, "name": "z", "root": "tank/snapper",
                      "ssh": {"port": 0, "host_key": "/k"}, "http": {"port": 0}, "keys": [],
                      "retention": {"policy": "policy.toml"}}, "/etc/snapper/snapperd.toml")
    assert c.retention is not None
    assert c.retention.policy == Path("/etc/snapper/policy.toml")
    assert c.retention.interval_seconds == 600
    c = parse_config({"uuid": ZONE_UUID, "name": "z", "root": "tank/snapper",
                      "ssh": {"port": 0, "host_key": "/k", "advertise_host": "10.0.0.5"},
                      "http": {"port": 0, "advertise_host": "10.0.0.5"}, "keys": [],
                      "coordinator_url": "http://coord:8080",
                      "retention": {"policy_from_coordinator": "fleet"}}, "/etc/snapperd.toml")
    assert c.retention is not None and c.retention.policy is None
    assert c.retention.policy_from_coordinator == "fleet"
