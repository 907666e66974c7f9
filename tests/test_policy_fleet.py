"""Policies end to end on a real mirrored pair (zfs-fuse, two snapperd processes):
``snapper agent`` on a compressed clock (three "days" in seconds: each pass is
the next six-hour tick), retention on the primary, the mirror following, and
every retained point restored byte for byte."""

from __future__ import annotations

import calendar
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from replication.peers import pair_of
from snapper_zone.cn.agent import Agent, AgentState
from snapper_zone.cn.cli import CnPusher, CnSettings
from snapper_zone.cn.client import CnClient
from snapper_zone.fleet.local import LocalFleet, LocalZone
from snapper_zone.policy import load_policies, snapshot_name
from snapper_zone.transfer.remote import ZoneClient
from snapper_zone.zfs.names import Dataset
from snapper_zone.zfs.zfs import Zfs
from tests.conftest import ZfsTier
from tests.helpers import mountpoint, wait_until, write_random

pytestmark = pytest.mark.zfs

DAY0 = float(calendar.timegm((2026, 11, 1, 0, 0, 0)))
H = 3600
POLICY = """
[[policy]]
name = "compressed"
vms = ["*"]
durability = "mirrored"
retention = { grid = "1x6h(keep=all) | 4x6h | 3x1d" }

[[policy.level]]
name = "daily"
cron = "0 0 * * *"

[[policy.level]]
name = "q"
every = "6h"
"""


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def fleet(zfs_tier: ZfsTier, tmp_path: Path) -> AsyncIterator[LocalFleet]:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    f = await LocalFleet.start(tmp_path / "fleet", zones=2, cns=1, vms_per_cn=1,
                               pool_size=512 << 20, reconcile_interval_ms=500,
                               zone_settings={"retention": {"policy": str(policy),
                                                            "interval_seconds": 86_400}})
    try:
        yield f
    finally:
        await f.stop()


async def holdings(fleet: LocalFleet, zone: LocalZone, vm: str) -> list[str]:
    async with fleet.http() as http, http.get(f"{zone.http_url}/v1/vms/{vm}/snapshots") as r:
        r.raise_for_status()
        return [s["name"] for s in await r.json() if s["complete"]]


async def test_three_compressed_days(fleet: LocalFleet, zfs: Zfs, tmp_path: Path) -> None:
    cn = fleet.cns[0]
    vm = cn.vms[0]
    by_uuid = {z.uuid: z for z in fleet.zones}
    primary, mirror = (by_uuid[u] for u in pair_of(vm, list(by_uuid)))
    top = Dataset(cn.pool.name).child(vm)
    await zfs.create(top)
    await zfs.create(top.child("disk0"))
    settings = CnSettings("127.0.0.1", primary.ssh_port, cn.key_path, None,
                          primary.host_key_pub, cn.pool.name,
                          (("127.0.0.1", primary.ssh_port),))
    clock = Clock(DAY0)
    agent = Agent(load_policies(tmp_path / "policy.toml"),
                  CnPusher(settings, zfs=zfs, vmadm=None),
                  AgentState.load(tmp_path / "agent.json"), clock=clock)

    files: dict[str, str] = {}  # disk0's files and their sha256, as they grow
    at: dict[str, dict[str, str]] = {}  # snapshot -> disk0's files when it was taken
    sent: dict[str, tuple[str | None, int]] = {}
    for k in range(13):  # 00:00 of day 0 through 00:00 of day 3, every 6 hours
        clock.t = DAY0 + k * 6 * H + 7  # a few seconds late, as a real agent is
        files[f"f{k}"] = write_random(cn.pool, top.child("disk0"), f"f{k}", 512 << 10)
        [o] = await agent.tick()
        assert o.ok, o
        at[o.snapshot] = dict(files)
        sent[o.snapshot] = (o.base, o.bytes)
    names = list(sent)
    daily = [snapshot_name("daily", DAY0 + d * 24 * H) for d in range(4)]
    assert [n for n in names if n.startswith("snapper-daily-")] == daily
    # Each push after the first is sent from the one before and carries only
    # what was written since (one 512 KiB file), dailies included.
    assert [b for b, _ in sent.values()] == [None, *names[:-1]]
    assert sent[names[0]][1] > 512 << 10
    assert all(512 << 10 < n < 3 * 512 << 10 for _, n in list(sent.values())[1:]), sent
    assert await holdings(fleet, primary, vm) == names

    # Retention on the primary; the mirror follows through tombstones.
    q = [snapshot_name("q", DAY0 + h * H) for h in (54, 60, 66)]
    kept = sorted([*daily, *q], key=names.index)
    plans: list[dict[str, Any]] = []

    async def pruned() -> bool:
        async with fleet.http() as http, http.post(f"{primary.http_url}/v1/prune") as r:
            assert r.status == 200, await r.text()
            plans.append((await r.json())["vms"][0])
        return await holdings(fleet, primary, vm) == kept

    # A snapshot a reconcile happens to be sending is pinned for that pass: the
    # next pass takes it. Nothing is ever deleted that the grid keeps.
    await wait_until(pruned, 60, "the primary pruned to the grid")
    # 1x6h: the newest daily; 4x6h: the three quarters behind it and day 2's daily;
    # 3x1d: the oldest of each day before (day 1's and day 0's dailies).
    first = plans[0]
    assert first["pruner"] is True
    assert {d["name"] for d in first["delete"]} | \
        {k["name"] for k in first["keep"] if k["reason"].startswith("pinned")} == \
        {n for n in names if n not in kept}
    # Every pass deleted only what the grid lets go, and tried each of those. A
    # try can fail with the delete begun (a part busy under a reconcile's send):
    # its tombstone is written first, so the reconcile takes the rest.
    gone = {n for n in names if n not in kept}
    deleted = {n for p in plans for n in p["deleted"]}
    assert deleted <= gone
    assert deleted | {n for p in plans for n in p["failed"]} == gone, plans

    async def mirror_followed() -> bool:
        try:
            return await holdings(fleet, mirror, vm) == kept
        except aiohttp.ClientError:
            return False

    await wait_until(mirror_followed, 60, "the mirror holds what the primary kept")
    # The CN kept only what the next push is sent from: the last one.
    assert [s.snapshot.name for s in await zfs.snapshots(top)] == [daily[-1]]

    # Every retained point comes back byte for byte, from either zone.
    for i, snap in enumerate(kept):
        zone = (primary, mirror)[i % 2]
        zc = ZoneClient("127.0.0.1", zone.ssh_port, cn.key_path, host_key=zone.host_key_pub)
        target = Dataset(cn.pool.name).child(f"restore{i}")
        async with zc:
            await CnClient(zc, dataset_root=cn.pool.name, zfs=zfs, vmadm=None).restore(
                vm, snap, str(target))
        assert _hashes(mountpoint(cn.pool, target.child("disk0"))) == at[snap], snap


def _hashes(path: Path) -> dict[str, Any]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.iterdir()) if p.is_file()}
