"""Issue 14 on real ZFS: who may act on a VM follows the coordinator's registry
live, and a zone's static config follows a SIGHUP, with no zone restarted.

Real snapperd processes on zfs-fuse pools, a real coordinator, CNs speaking
real SSH (asyncssh), the operator's changes made with the ``snapper`` CLI.
Each CN keeps one SSH connection open throughout: a change must reach the very
next command on it, not only new connections.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from snapper_zone.cn.client import CnClient, placement
from snapper_zone.fleet.local import LocalCN, LocalFleet, LocalZone
from snapper_zone.transfer.remote import ZoneClient, ZoneError, ZoneUnreachable
from snapper_zone.wire.protocol import Delete
from snapper_zone.zfs.names import Dataset
from snapper_zone.zfs.zfs import Zfs
from tests.conftest import ZfsTier
from tests.helpers import wait_until, write_random

pytestmark = pytest.mark.zfs

FOLLOW = 5.0  # seconds within which every zone must follow a registry change


async def can_list(zc: ZoneClient, vm: str) -> bool:
    """Whether this CN's next command on ``vm`` is allowed (a refusal is typed)."""
    try:
        await zc.snapshots(vm)
        return True
    except ZoneError as e:
        if e.code == "NotAuthorized":
            return False
        raise


async def on_all(clients: list[ZoneClient], vm: str, allowed: bool) -> bool:
    return all([await can_list(zc, vm) == allowed for zc in clients])


async def timed(cond: Callable[[], Awaitable[bool]], what: str,
                timeout: float = FOLLOW) -> float:
    """Seconds until ``cond`` holds (failing past ``timeout``)."""
    t0 = time.monotonic()
    await wait_until(cond, timeout, what, poll=0.05)
    return time.monotonic() - t0


class Cns:
    """Each CN's open SSH connection to each zone."""

    def __init__(self, fleet: LocalFleet) -> None:
        self.fleet = fleet
        self.open: dict[tuple[str, str], ZoneClient] = {}

    async def connect(self, cn: LocalCN, zones: list[LocalZone]) -> list[ZoneClient]:
        out = []
        for z in zones:
            zc = ZoneClient("127.0.0.1", z.ssh_port, cn.key_path, host_key=z.host_key_pub)

            async def connected(zc: ZoneClient = zc) -> bool:
                # A key just added to the registry is known once the zone has polled it.
                try:
                    await zc.connect()
                    return True
                except ZoneUnreachable:
                    return False
            await wait_until(connected, FOLLOW, f"{cn.id} let into {z.name}", poll=0.1)
            self.open[(cn.id, z.uuid)] = zc
            out.append(zc)
        return out

    async def close(self) -> None:
        for zc in self.open.values():
            await zc.close()


@pytest.fixture
async def cns(zfs_tier: ZfsTier, tmp_path: Path) -> AsyncIterator[Cns]:
    lf = await LocalFleet.start(tmp_path / "fleet", zones=2, cns=0, pool_size=256 << 20,
                                coordinator=True, reconcile_interval_ms=5000)
    c = Cns(lf)
    try:
        yield c
    finally:
        await c.close()
        await lf.stop()


async def test_registry_reassign_grant_and_revoke_reach_the_next_command(
        cns: Cns, zfs: Zfs) -> None:
    f = cns.fleet
    assert f.coordinator is not None
    pids = {z.uuid: z.daemon.pid for z in f.zones if z.daemon is not None}
    # Three CNs the zones' configs know nothing of: the registry only.
    old, new, third = [await f.add_cn(1, 256 << 20, static=False) for _ in range(3)]
    vm = old.vms[0]
    for cn in (old, new, third):
        await f.snapper("cn", "add", cn.id, "--key", f"{cn.key_path}.pub")
    await f.snapper("vm", "assign", vm, old.id)
    top = Dataset(old.pool.name).child(vm)
    await zfs.create(top)
    await zfs.create(top.child("disk0"))
    write_random(old.pool, top.child("disk0"), "s1", 256 << 10)

    # The old owner pushes (mirrored to the VM's second zone) once zones know it.
    ends = await placement(f.coordinator.url, vm, old.key_path, f.coordinator.public_key)
    zones = [next(z for z in f.zones if z.uuid == e["uuid"]) for e in ends]
    [old_c, _], [new_c, _], [third_c, _] = [await cns.connect(cn, zones[:1] + zones[1:])
                                             for cn in (old, new, third)]
    by_cn = {cn.id: [cns.open[(cn.id, z.uuid)] for z in zones] for cn in (old, new, third)}
    await timed(lambda: can_list(old_c, vm), "the old owner known to the zones")
    rep = await CnClient(old_c, dataset_root=old.pool.name, zfs=zfs, vmadm=None).push(
        vm, "s1", metadata={"uuid": vm})
    assert sorted(rep.zones) == sorted(z.uuid for z in zones)
    assert await on_all(by_cn[new.id] + by_cn[third.id], vm, False)

    # Reassigned (a VM migrated): refused to the old CN, accepted from the new
    # one, on both of its zones, over the connections already open.
    await f.snapper("vm", "assign", vm, new.id)
    took = await timed(lambda: _both(on_all(by_cn[old.id], vm, False),
                                     on_all(by_cn[new.id], vm, True)),
                       "the old CN refused and the new one accepted")
    print(f"reassign followed in {took:.2f} s")
    with pytest.raises(ZoneError) as refused:
        await CnClient(old_c, dataset_root=old.pool.name, zfs=zfs, vmadm=None).push(
            vm, "s2", metadata={"uuid": vm})
    assert refused.value.code == "NotAuthorized"
    assert (await new_c.metadata(vm, "s1")) == {"uuid": vm}

    # A third CN restores the VM under an operator's grant, which then expires.
    assert not await can_list(third_c, vm)
    await f.snapper("grant", "restore", vm, "--to-cn", third.id, "--for", "8s")
    granted_at = time.time()
    await timed(lambda: on_all(by_cn[third.id], vm, True), "the grant followed")
    target = Dataset(third.pool.name).child("restored")
    got = await CnClient(third_c, dataset_root=third.pool.name, zfs=zfs, vmadm=None).restore(
        vm, "s1", str(target))
    assert got.metadata == {"uuid": vm}
    want = {s.name: s.guid for s in await zfs.snapshots(top.child("disk0"))}
    have = {s.name: s.guid for s in await zfs.snapshots(target.child("disk0"))}
    assert have["s1"] == want["s1"]
    # Writing stays the owner's: a grant is for reading.
    with pytest.raises(ZoneError) as refused:
        await third_c.run(Delete(vm, "s1"))
    assert refused.value.code == "NotAuthorized"
    await timed(lambda: on_all(by_cn[third.id], vm, False), "the grant expired", 20.0)
    assert time.time() >= granted_at + 8 - 1.0  # not before its time (clock slack)

    # The new owner's key revoked: refused on its next command, same connection.
    await f.snapper("cn", "remove", new.id, "--key", f"{new.key_path}.pub")
    took = await timed(lambda: on_all(by_cn[new.id], vm, False), "the revoked key refused")
    print(f"revocation followed in {took:.2f} s")
    # No zone restarted for any of it.
    assert {z.uuid: z.daemon.pid for z in f.zones if z.daemon is not None} == pids


async def _both(a: Awaitable[bool], b: Awaitable[bool]) -> bool:
    first, second = await a, await b  # both asked: neither left unawaited
    return first and second


async def test_sighup_reloads_the_static_map(zfs_tier: ZfsTier, tmp_path: Path) -> None:
    """No coordinator: ``[vms]`` and ``[[keys]]`` in the zone's config, changed and
    reloaded by SIGHUP (SMF ``refresh``), reach the next command."""
    f = await LocalFleet.start(tmp_path / "fleet", zones=1, cns=2, vms_per_cn=1,
                               pool_size=256 << 20, mirrored=False)
    c = Cns(f)
    try:
        zone = f.zones[0]
        assert zone.daemon is not None
        pid = zone.daemon.pid
        a, b = f.cns
        vm = a.vms[0]
        [a_c], [b_c] = await c.connect(a, [zone]), await c.connect(b, [zone])
        assert await can_list(a_c, vm) and not await can_list(b_c, vm)
        # The VM moves to CN b in the static map.
        a.vms, b.vms = [], [vm, *b.vms]
        f.reload_zone(zone)
        await timed(lambda: _both(can_list(b_c, vm), _not(can_list(a_c, vm))),
                    "the reloaded map in force")
        # CN a's key leaves the config: refused even on its own (unmapped now) VM.
        a.static = False
        f.reload_zone(zone)
        await timed(lambda: _not(can_list(a_c, b.vms[1])), "a's key refused")
        assert zone.daemon.pid == pid
        log = (zone.config_path.with_name("snapperd.log")).read_text()
        assert '"config reloaded"' in log
    finally:
        await c.close()
        await f.stop()


async def _not(a: Awaitable[bool]) -> bool:
    return not await a
