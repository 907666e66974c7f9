"""Many CNs at once: 32 pushes into one real snapperd process, concurrently.

Each CN has its own key (a CN of its own in the zone's config) and its own VM
on a zfs-fuse pool; each pushes through the real CN client (asyncssh) over
its own connection. A barrier in front of every stream starts the 32 streams
together, after each push's planning, so all 32 are in flight at once (the
zone takes 32 receives at a time). Then: no failure, every snapshot on the
zone by guid, and snapperd's peak resident memory (``VmHWM``, reset just
before, read from /proc) grew by less than 8 MiB per concurrent stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from snapper_zone.cn.client import CnClient
from snapper_zone.common.progress import Reporter
from snapper_zone.fleet.pools import FilePool
from snapper_zone.transfer.remote import StreamResult, ZoneClient
from snapper_zone.wire.protocol import Receive
from snapper_zone.zfs import proc
from snapper_zone.zfs.names import Dataset
from snapper_zone.zfs.zfs import SendSpec, Zfs
from tests.helpers import write_random
from tests.test_daemon import env, snapperd, wait_ready

CNS = 32
STREAM = 2 << 20  # random bytes per VM: each stream outlasts the others' start
PER_STREAM_LIMIT = 8 << 20
ZONE_UUID = "6c2f0b8e-1d3a-4e5f-9a7b-8c9d0e1f2a3b"
BOUND = 300.0  # the whole test, setup included


class GatedZoneClient(ZoneClient):
    """A CN's connection whose stream starts only when every CN's does."""

    def __init__(self, *args: Any, gate: asyncio.Barrier, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.gate = gate

    async def push_stream(self, cmd: Receive, spec: SendSpec, zfs: Zfs,
                          progress: Reporter | None = None, *,
                          bwlimit: float | None = None) -> StreamResult:
        await self.gate.wait()
        return await super().push_stream(cmd, spec, zfs, progress, bwlimit=bwlimit)


def _status(pid: int, field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/PID/status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for pid {pid}")


def _reset_peak(pid: int) -> bool:
    """Reset the process's ``VmHWM`` to its current RSS (Linux >= 4.0)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@pytest.fixture
def daemons() -> Iterator[list[proc.Daemon]]:
    started: list[proc.Daemon] = []
    yield started
    for d in started:
        d.stop(timeout=10)


@pytest.mark.zfs
@pytest.mark.timeout(BOUND)
async def test_32_concurrent_pushes_bounded_memory(zfs: Zfs, make_pool: Any, tmp_path: Path,
                                                   daemons: list[proc.Daemon]) -> None:
    async with asyncio.timeout(BOUND - 30):
        cn_pool: FilePool = await make_pool("cn", size=(CNS + 4) * STREAM + (256 << 20))
        zone_pool: FilePool = await make_pool("zone", size=(CNS + 4) * STREAM + (256 << 20),
                                              mounted=False)
        keys = [asyncssh.generate_private_key("ssh-ed25519") for _ in range(CNS)]
        vms = [str(uuid.uuid4()) for _ in range(CNS + 1)]  # the last one warms up
        cn_ids = [f"cn{i}" for i in range(CNS)]
        root = Dataset(cn_pool.name)
        for vm in vms:
            await zfs.create(root.child(vm))
            write_random(cn_pool, root.child(vm), "disk", STREAM)

        host_key = asyncssh.generate_private_key("ssh-ed25519")
        host_key.write_private_key(str(tmp_path / "host_key"))
        (tmp_path / "host_key").chmod(0o600)
        conf = tmp_path / "snapperd.json"
        conf.write_text(json.dumps({
            "uuid": ZONE_UUID, "name": "scale", "root": f"{zone_pool.name}/snapper",
            "ssh": {"port": 0, "host_key": str(tmp_path / "host_key")}, "http": {"port": 0},
            "durability": "local", "max_concurrent_receives": CNS,
            "keys": [{"role": "cn", "cn_id": c, "public_key": k.export_public_key().decode()}
                     for c, k in zip(cn_ids, keys, strict=True)],
            "vms": {vm: cn_ids[i % CNS] for i, vm in enumerate(vms)},
        }))
        ready = tmp_path / "ready.json"
        daemon = proc.Daemon(snapperd("--config", str(conf), "--ready-file", str(ready),
                                      "--create-root", "--log-level", "warn"),
                             str(tmp_path / "snapperd.log"), env=env())
        daemons.append(daemon)
        port = int((await wait_ready(daemon, ready))["ssh_port"])
        pinned = host_key.export_public_key().decode().strip()

        gate = asyncio.Barrier(CNS)
        clients = [GatedZoneClient("127.0.0.1", port, k, host_key=pinned, gate=gate)
                   for k in keys]
        async with contextlib.AsyncExitStack() as stack:
            for c in clients:
                await stack.enter_async_context(c)

            # One push first, so what any first push loads (modules, caches) is
            # in the baseline and not counted against the 32.
            warm = GatedZoneClient("127.0.0.1", port, keys[0], host_key=pinned,
                                   gate=asyncio.Barrier(1))
            async with warm:
                await CnClient(warm, dataset_root=cn_pool.name, zfs=zfs,
                               vmadm=None).push(vms[CNS], "warm")
            exact = _reset_peak(daemon.pid)
            before = _status(daemon.pid, "VmRSS")

            got = await asyncio.gather(
                *(CnClient(c, dataset_root=cn_pool.name, zfs=zfs, vmadm=None).push(vm, "s1")
                  for c, vm in zip(clients, vms[:CNS], strict=True)),
                return_exceptions=True)
            peak = _status(daemon.pid, "VmHWM")

        failures = [g for g in got if isinstance(g, BaseException)]
        assert not failures, failures[:3]
        growth = (peak - before) / CNS
        assert growth < PER_STREAM_LIMIT, (
            f"snapperd grew {growth / (1 << 20):.2f} MiB per concurrent stream "
            f"({before >> 20} -> {peak >> 20} MiB, peak {'reset' if exact else 'since start'})")

        # Every snapshot on the zone, by guid, and complete.
        zone_root = Dataset(zone_pool.name).child("snapper")
        for vm in vms[:CNS]:
            mine = (await zfs.snapshots(root.child(vm)))[-1]
            theirs = {s.name: s for s in await zfs.snapshots(zone_root.child(vm).child("root"))}
            assert mine.name == "s1" and theirs["s1"].guid == mine.guid, vm
            assert await zfs.exists(zone_root.child(vm).snapshot("s1")), f"{vm} not complete"
