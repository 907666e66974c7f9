"""Two real snapperd zones mirroring each other (issue 4), on real ZFS.

Each test runs a fleet of two zones (snapperd processes with their own
file-backed pools, peers of each other) and one compute node; the zones are
stopped with SIGKILL where the test says "killed".
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from replication.peers import pair_of
from snapper_zone.cn.client import CnClient
from snapper_zone.fleet.local import LocalCN, LocalFleet, LocalZone
from snapper_zone.transfer.remote import ZoneClient, ZoneError
from snapper_zone.wire.protocol import Receive
from snapper_zone.zfs.names import Dataset
from snapper_zone.zfs.zfs import Capabilities, Zfs
from tests.conftest import ZfsTier
from tests.helpers import scrape, wait_until, write_random

pytestmark = pytest.mark.zfs


class Pair:
    def __init__(self, fleet: LocalFleet, zfs: Zfs) -> None:
        self.fleet = fleet
        self.zfs = zfs
        self.cn: LocalCN = fleet.cns[0]
        self.vm = self.cn.vms[0]
        by_uuid = {z.uuid: z for z in fleet.zones}
        first, second = pair_of(self.vm, list(by_uuid))
        self.primary: LocalZone = by_uuid[first]
        self.mirror: LocalZone = by_uuid[second]

    @property
    def top(self) -> Dataset:
        return Dataset(self.cn.pool.name).child(self.vm)

    async def make_vm(self) -> None:
        await self.zfs.create(self.top)
        await self.zfs.create(self.top.child("disk0"))
        self.write("first", 1 << 20)

    def write(self, name: str, size: int) -> None:
        write_random(self.cn.pool, self.top.child("disk0"), name, size)

    def client(self, zone: LocalZone) -> tuple[ZoneClient, CnClient]:
        zc = ZoneClient("127.0.0.1", zone.ssh_port, self.cn.key_path,
                        host_key=zone.host_key_pub)
        return zc, CnClient(zc, dataset_root=self.cn.pool.name, zfs=self.zfs, vmadm=None)

    async def push(self, zone: LocalZone, name: str, durability: str | None = None) -> Any:
        zc, cn = self.client(zone)
        async with zc:
            return await cn.push(self.vm, name, metadata={"uuid": self.vm, "alias": name},
                                 durability=durability)

    async def cn_guids(self, name: str) -> dict[str, int]:
        out = {}
        for label, ds in (("root", self.top), ("disk0", self.top.child("disk0"))):
            out[label] = next(s.guid for s in await self.zfs.snapshots(ds) if s.name == name)
        return out

    async def holdings(self, zone: LocalZone) -> dict[str, dict[str, int]]:
        """Complete VM snapshots on ``zone``: name -> dataset -> guid (HTTP API)."""
        async with self.fleet.http() as http, \
                http.get(f"{zone.http_url}/v1/vms/{self.vm}/snapshots") as r:
            if r.status == 404:
                return {}
            r.raise_for_status()
            snaps = await r.json()
        return {s["name"]: {d: int(p["guid"]) for d, p in s["datasets"].items()}
                for s in snaps if s["complete"]}

    async def converged(self) -> bool:
        try:
            a, b = await self.holdings(self.primary), await self.holdings(self.mirror)
        except aiohttp.ClientError:
            return False
        return bool(a) and a == b

    async def metric(self, zone: LocalZone, name: str, **labels: str) -> float:
        return await scrape(zone.http_url, name, **labels)

    async def transfers(self, zone: LocalZone) -> list[dict[str, Any]]:
        async with self.fleet.http() as http, \
                http.get(f"{zone.http_url}/v1/transfers") as r:
            r.raise_for_status()
            out: list[dict[str, Any]] = await r.json()
            return out

    def kill(self, zone: LocalZone) -> None:
        assert zone.daemon is not None
        zone.daemon.kill()
        zone.daemon = None


@pytest.fixture
async def pair(zfs_tier: ZfsTier, zfs: Zfs, tmp_path: Path) -> AsyncIterator[Pair]:
    fleet = await LocalFleet.start(tmp_path / "fleet", zones=2, cns=1, vms_per_cn=1,
                                   pool_size=512 << 20, reconcile_interval_ms=500)
    try:
        p = Pair(fleet, zfs)
        await p.make_vm()
        yield p
    finally:
        await fleet.stop()


async def test_mirrored_push_returns_with_both_copies_guid_equal(pair: Pair) -> None:
    for i, name in enumerate(["s1", "s2", "s3"]):
        if i:
            pair.write(f"more{i}", 256 << 10)
        rep = await pair.push(pair.primary, name)
        assert rep.durability == "mirrored"
        assert sorted(rep.zones) == sorted([pair.primary.uuid, pair.mirror.uuid])
        want = await pair.cn_guids(name)
        # Right at the ack, with no waiting: both zones hold it, guids as on the CN.
        assert (await pair.holdings(pair.primary))[name] == want
        assert (await pair.holdings(pair.mirror))[name] == want
    async with pair.fleet.http() as http, \
            http.get(f"{pair.primary.http_url}/v1/replication") as r:
        doc = await r.json()
    row = next(v for v in doc["vms"] if v["vm"] == pair.vm)
    assert row["peer"] == pair.mirror.uuid and row["state"] == "in_sync"
    # Both datasets of all three pushes went to the mirror while they arrived.
    assert await pair.metric(pair.primary, "snapper_mirror_transfers_total",
                             direction="pipelined", peer=pair.mirror.uuid, result="ok") == 6


async def test_mirror_down_local_mode_catches_up_and_deletes_follow(pair: Pair) -> None:
    await pair.push(pair.primary, "s1")
    pair.write("two", 256 << 10)
    await pair.push(pair.primary, "s2")
    pair.kill(pair.mirror)
    # mirrored: refused clearly, naming the zone that does hold it
    pair.write("three", 256 << 10)
    with pytest.raises(ZoneError) as err:
        await pair.push(pair.primary, "s3")
    assert err.value.code == "MirrorUnavailable"
    assert pair.primary.uuid in str(err.value) and pair.mirror.uuid in str(err.value)
    # local: acked by the primary alone, and says so
    pair.write("four", 256 << 10)
    rep = await pair.push(pair.primary, "s4", durability="local")
    assert rep.durability == "local" and rep.zones == [pair.primary.uuid]
    # delete while the mirror is away: it must not come back from the mirror
    async with pair.fleet.http() as http, \
            http.delete(f"{pair.primary.http_url}/v1/vms/{pair.vm}/snapshots/s2") as r:
        assert r.status == 204
    await pair.fleet.start_zone(pair.mirror)
    await wait_until(pair.converged, 90, "the mirror caught up")
    held = await pair.holdings(pair.mirror)
    assert sorted(held) == ["s1", "s3", "s4"]
    for name in held:
        assert held[name] == await pair.cn_guids(name)


async def test_failover_push_to_mirror_flows_back(pair: Pair) -> None:
    await pair.push(pair.primary, "s1")
    pair.kill(pair.primary)
    pair.write("two", 256 << 10)
    rep = await pair.push(pair.mirror, "s2", durability="local")
    assert rep.zones == [pair.mirror.uuid]
    await pair.fleet.start_zone(pair.primary)
    await wait_until(pair.converged, 90, "the pair converged after the failover")
    assert sorted(await pair.holdings(pair.primary)) == ["s1", "s2"]
    # The CN goes back to its primary with a plain incremental, mirrored again.
    pair.write("three", 256 << 10)
    rep = await pair.push(pair.primary, "s3")
    assert sorted(rep.zones) == sorted([pair.primary.uuid, pair.mirror.uuid])
    assert (await pair.holdings(pair.mirror))["s3"] == await pair.cn_guids("s3")


async def test_primary_killed_mid_mirror_resumes_or_restarts(pair: Pair,
                                                             caps: Capabilities) -> None:
    await pair.push(pair.primary, "s1")
    pair.kill(pair.mirror)
    pair.write("big", 96 << 20)
    await pair.push(pair.primary, "s2", durability="local")  # acked with one copy
    await pair.fleet.start_zone(pair.mirror)

    async def mirroring() -> bool:
        try:
            return any(t["kind"] == "mirror-out" and t["bytes"] > 0
                       for t in await pair.transfers(pair.primary))
        except aiohttp.ClientError:
            return False

    await wait_until(mirroring, 60, "the catch-up transfer started", poll=0.02)
    pair.kill(pair.primary)
    await pair.fleet.start_zone(pair.primary)
    await wait_until(pair.converged, 120, "the pair converged after the crash")
    for zone in (pair.primary, pair.mirror):
        held = await pair.holdings(zone)
        assert held["s2"] == await pair.cn_guids("s2")  # the acked snapshot, both zones
    log = (pair.primary.config_path.parent / "snapperd.log").read_text()
    if caps.resumable_receive:
        assert "resuming an interrupted mirror transfer" in log


async def test_sync_with_bwlimit_is_paced(zfs_tier: ZfsTier, zfs: Zfs, tmp_path: Path) -> None:
    """A coordinator's move asks the source zone for a paced sync: the streams it
    sends keep to ``bwlimit`` (a lower bound on the time, so noise cannot fake it),
    and the copy is complete and guid-equal."""
    # A loop that never runs by itself: only the sync below copies.
    fleet = await LocalFleet.start(tmp_path / "fleet", zones=2, cns=1, vms_per_cn=1,
                                   pool_size=512 << 20, reconcile_interval_ms=3_600_000)
    try:
        p = Pair(fleet, zfs)
        await p.make_vm()
        p.kill(p.mirror)
        p.write("more", 2 << 20)
        await p.push(p.primary, "s1", durability="local")

        async def gave_up() -> bool:  # the push's own catch-up, retried, has failed
            async with fleet.http() as http, \
                    http.get(f"{p.primary.http_url}/v1/replication") as r:
                rows = (await r.json())["vms"]
            return any(v["vm"] == p.vm and v["state"] == "failing" for v in rows)

        await wait_until(gave_up, 60, "the primary's catch-up gave up on the dead mirror")
        await fleet.start_zone(p.mirror)
        assert await p.holdings(p.mirror) == {}
        url = f"{p.primary.http_url}/v1/vms/{p.vm}/sync"
        async with fleet.http() as http:
            async with http.post(url, json={"peer": p.mirror.uuid, "bwlimit": -1}) as r:
                assert (r.status, (await r.json())["code"]) == (422, "InvalidArgument")
            rate = 1 << 20  # the VM holds ~3 MiB: at least ~2 s at 1 MiB/s
            t0 = asyncio.get_running_loop().time()
            async with http.post(url, json={"peer": p.mirror.uuid, "bwlimit": rate}) as r:
                assert r.status == 200 and (await r.json())["state"] == "in_sync"
            took = asyncio.get_running_loop().time() - t0
        sent = await p.metric(p.primary, "snapper_sent_bytes_total", kind="mirror-out")
        assert sent > 3 << 20 and took >= 0.9 * sent / rate, (sent, took)
        assert (await p.holdings(p.mirror))["s1"] == await p.cn_guids("s1")
    finally:
        await fleet.stop()


async def test_a_delete_answers_once_the_mirror_followed(pair: Pair) -> None:
    """The tombstone lives on the zone that took the delete: the answer waits for the
    mirror to drop the snapshot too, so losing that zone cannot undo the delete."""
    for i, name in enumerate(["s1", "s2", "s3"]):
        if i:
            pair.write(f"more{i}", 64 << 10)
        await pair.push(pair.primary, name)
    async with pair.fleet.http() as http, \
            http.delete(f"{pair.primary.http_url}/v1/vms/{pair.vm}/snapshots/s2") as r:
        assert r.status == 204
    # Right at the answer, with no waiting: gone from both zones.
    assert sorted(await pair.holdings(pair.mirror)) == ["s1", "s3"]
    assert sorted(await pair.holdings(pair.primary)) == ["s1", "s3"]
    # The mirror keeps the tombstone too, with the time of the delete: were the
    # primary lost, a third copy could not bring s2 back to the mirror.

    async def stones(zone: LocalZone) -> list[dict[str, Any]]:
        async with pair.fleet.http() as http, \
                http.get(f"{zone.http_url}/v1/vms/{pair.vm}/tombstones") as r:
            r.raise_for_status()
            out: list[dict[str, Any]] = await r.json()
            return out

    deleted = await stones(pair.primary)
    assert len(deleted) == 2  # s2's root and disk0 parts

    async def adopted() -> bool:
        return await stones(pair.mirror) == deleted
    await wait_until(adopted, 30, "the mirror adopted the primary's tombstones")


async def test_a_kicked_vm_is_mirrored_while_another_vm_is_held_up(
        zfs_tier: ZfsTier, zfs: Zfs, tmp_path: Path) -> None:
    """The loop's reconciles are independent: one VM whose copy is held up (here
    by a client's receive that holds the VM's lock on the peer) holds one slot,
    not the loop. A push of another VM is mirrored meanwhile; before, the loop
    waited for every VM it had started before it started the next ones."""
    # No rounds of their own and no tee: only the kicks of local pushes copy.
    fleet = await LocalFleet.start(tmp_path / "fleet", zones=2, cns=1, vms_per_cn=2,
                                   pool_size=512 << 20, reconcile_interval_ms=3_600_000,
                                   pipelined=False)
    try:
        here, there = fleet.zones
        held, other = Pair(fleet, zfs), Pair(fleet, zfs)
        other.vm = fleet.cns[0].vms[1]
        for p in (held, other):
            await p.make_vm()
            await p.push(here, "s1")  # mirrored: on both zones

        async def queue(zone: LocalZone) -> dict[str, int]:
            async with fleet.http() as http, \
                    http.get(f"{zone.http_url}/v1/replication") as r:
                r.raise_for_status()
                out: dict[str, int] = (await r.json())["queue"]
                return out

        async def receiving(vm: str) -> bool:
            return any(t["vm"] == vm for t in await held.transfers(there))

        stall = ZoneClient("127.0.0.1", there.ssh_port, held.cn.key_path,
                           host_key=there.host_key_pub)
        async with stall:
            # A receive that sends nothing: it holds the VM's lock on `there`.
            chan, _ = await stall.open_channel(Receive(held.vm, "disk0", "stall", None, None))
            try:
                await wait_until(lambda: receiving(held.vm), 30, "the stalled receive began")
                held.write("more", 256 << 10)
                await held.push(here, "s2", durability="local")  # kicked; its copy waits

                async def copy_waits() -> bool:
                    return (await queue(here))["running"] == 1
                await wait_until(copy_waits, 30, "the held VM's reconcile is running")
                other.write("more", 256 << 10)
                await other.push(here, "s2", durability="local")

                async def other_mirrored() -> bool:
                    return "s2" in await other.holdings(there)
                await wait_until(other_mirrored, 30, "the other VM was mirrored")

                # The other VM's reconcile may still be confirming its copy when
                # the snapshot shows on the peer; it then ends and frees its slot.
                async def only_held_runs() -> bool:
                    return await queue(here) == {"running": 1, "kicked": 0, "round": 0}
                await wait_until(only_held_runs, 30, "only the held VM's reconcile runs")
                assert "s2" not in await held.holdings(there)
            finally:
                chan.close()

        async def held_mirrored() -> bool:
            return "s2" in await held.holdings(there)
        await wait_until(held_mirrored, 90, "the held VM was mirrored once its lock was free")
    finally:
        await fleet.stop()
