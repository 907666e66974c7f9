"""The agent's kept links (``cn/links.py``) on a real CN pool and a real zone
(in-process snapperd over loopback SSH, zfs-fuse): pushes share one login,
a link the zone closed is replaced without a failed push, and a link an
error ended is not used again."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from snapper_zone.cn.cli import CnPusher, CnSettings, _push_targets
from snapper_zone.cn.links import ZoneLinks
from snapper_zone.daemon.zone import Zone
from snapper_zone.fleet.pools import FilePool
from snapper_zone.transfer.remote import ZoneClient
from snapper_zone.zfs.names import Dataset
from snapper_zone.zfs.zfs import Zfs
from tests.helpers import cn_settings, cn_vm, ssh_zone, wait_for, write_random

pytestmark = pytest.mark.zfs

ZONE_UUID = "5d0f6f2e-3a51-4c3e-9d7e-2b1f0c9a8e71"
CN_ID = "44454c4c-3800-1051-8036-b4c04f4e3232"
VM = "0e9a3c1b-7f4d-4b2a-9c8e-6d5f4a3b2c10"


@dataclass
class Env:
    zfs: Zfs
    zone: Zone
    settings: CnSettings
    cn_pool: FilePool
    vm: Dataset

    async def complete(self) -> list[str]:
        return [s.name for s in await self.zone.store.snapshots(VM) if s.complete]


async def _env(zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool, tmp: Path,
               **config: Any) -> AsyncIterator[Env]:
    async with ssh_zone(zfs, zone_pool, tmp, uuid=ZONE_UUID, cn_id=CN_ID,
                        vms={VM: CN_ID}, **config) as z:
        vm = await cn_vm(zfs, cn_pool, VM)
        settings = cn_settings(z, cn_pool)
        yield Env(zfs, z.zone, settings, cn_pool, vm)


@pytest.fixture
async def env(zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool,
              tmp_path: Path) -> AsyncIterator[Env]:
    async for e in _env(zfs, cn_pool, zone_pool, tmp_path):
        yield e


@pytest.fixture
async def idle_env(zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool,
                   tmp_path: Path) -> AsyncIterator[Env]:
    """The zone closes a connection idle for half a second."""
    async for e in _env(zfs, cn_pool, zone_pool, tmp_path,
                        limits={"connection_idle_seconds": 0.5}):
        yield e


async def _link(links: ZoneLinks, s: CnSettings) -> ZoneClient:
    [zone] = await _push_targets(s, VM)
    return await links.connected(zone)


async def test_pushes_share_one_login(env: Env) -> None:
    links = ZoneLinks()
    pusher = CnPusher(env.settings, zfs=env.zfs, vmadm=None, links=links)
    try:
        first = await pusher.push(VM, "s1", None, "local")
        link = await _link(links, env.settings)
        number = await link.connection_number()
        write_random(env.cn_pool, env.vm, "f1", 64 << 10)
        second = await pusher.push(VM, "s2", None, "local")
        assert [first.snapshot, second.snapshot] == ["s1", "s2"]
        assert (second.datasets[0].base or "").endswith("@s1")  # an incremental on the same link
        assert await env.complete() == ["s1", "s2"]
        assert [s.name for s in await pusher.zone_snapshots(VM)] == ["s1", "s2"]
        assert links.logins == 1
        # The zone numbers its connections: still the first one.
        assert await (await _link(links, env.settings)).connection_number() == number
    finally:
        await links.close()
    assert link.conn is None  # closed with the links


async def test_a_link_the_zone_closed_is_replaced(idle_env: Env,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    env = idle_env
    caplog.set_level(logging.INFO, "snapperd")
    links = ZoneLinks()
    pusher = CnPusher(env.settings, zfs=env.zfs, vmadm=None, links=links)
    try:
        await pusher.push(VM, "s1", None, "local")
        link = await _link(links, env.settings)
        conn = link.conn
        assert conn is not None
        await wait_for(conn.is_closed, 10, "the zone's close of the idle link")
        write_random(env.cn_pool, env.vm, "f1", 64 << 10)
        report = await pusher.push(VM, "s2", None, "local")
        assert (report.datasets[0].base or "").endswith("@s1")
        assert await env.complete() == ["s1", "s2"]
        assert links.logins == 2
    finally:
        await links.close()
    # Routine for the zone: said at INFO, not as a refused connection.
    closes = [r for r in caplog.records if r.getMessage() == "idle connection closed"]
    assert closes and all(r.levelno == logging.INFO for r in closes)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_link_an_error_ended_is_not_used_again(env: Env) -> None:
    links = ZoneLinks()
    pusher = CnPusher(env.settings, zfs=env.zfs, vmadm=None, links=links)
    try:
        await pusher.push(VM, "s1", None, "local")
        link = await _link(links, env.settings)
        # A push that fails on the CN's side (no such snapshot to send from).
        with pytest.raises(Exception):  # noqa: B017 - the CN's own error, whichever
            await pusher.push(VM, "s2", "no-such-base", "local")
        assert link.conn is None  # let go
        write_random(env.cn_pool, env.vm, "f1", 64 << 10)
        await pusher.push(VM, "s2", None, "local")
        assert await env.complete() == ["s1", "s2"]
        assert links.logins == 2
    finally:
        await links.close()
