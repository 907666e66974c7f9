#!/usr/bin/env python3
"""A repair: a zone that lost its peer gives every VM its second copy again,
by ``reconcile_concurrency``, beside local ``zfs send | zfs receive`` of the
same snapshots.

A local fleet on one machine (real snapperd processes, file-backed pools): a
zone holds ``--vms`` VMs, each pushed by the CN with ``--size-mib`` of
random data in its disk0 while the zone's peer was gone (``durability
local``). Each run starts the peer empty, as a zone that replaces a lost one
is, then the holding zone: its replication loop's first round finds every VM
missing on the peer and copies it there, VM by VM, ``reconcile_concurrency``
at once. Timed from the holding zone being ready to every VM ``in_sync``
(``GET /v1/replication``: both copies guid-checked), so it is the whole of a
repair: both zones' listings, every part's stream through the peer's vetted
receive, the commit, the check.

The baseline is the same snapshots, every part of every VM, piped locally
(``zfs send | zfs receive`` between the same pools, no SSH, no checks): one at
a time, as a script would, and two at once. The ratio the issue asks for
(a move's or repair's copy rate, >= 0.8 of the local pipe) is printed against
the faster of the two.

Runs are interleaved by concurrency, so drift hits all alike; medians of
``--repeat``. Everything started is stopped, every pool destroyed.

    python bench/repair.py [--vms 8] [--size-mib 32] [--repeat 3] [--slots 1,2,4] [--gate]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import fill, stream_bytes  # noqa: E402

from snapper_zone.cn.client import CnClient  # noqa: E402
from snapper_zone.common.config import GateConfig  # noqa: E402
from snapper_zone.errors import DatasetNotFound  # noqa: E402
from snapper_zone.fleet import pools  # noqa: E402
from snapper_zone.fleet.local import LocalCN, LocalFleet, LocalZone  # noqa: E402
from snapper_zone.transfer.remote import ZoneClient  # noqa: E402
from snapper_zone.zfs.names import Dataset  # noqa: E402
from snapper_zone.zfs.zfs import SendSpec  # noqa: E402

SNAP = "bench"


async def push_local(fleet: LocalFleet, cn: LocalCN, zone: LocalZone, vm: str) -> None:
    zc = ZoneClient("127.0.0.1", zone.ssh_port, cn.key_path, host_key=zone.host_key_pub)
    client = CnClient(zc, dataset_root=cn.pool.name, zfs=fleet.zfs, vmadm=None)
    async with zc:
        await client.push(vm, SNAP, metadata={"uuid": vm}, durability="local")


async def all_in_sync(fleet: LocalFleet, zone: LocalZone, vms: set[str]) -> bool:
    async with fleet.http() as http, http.get(f"{zone.http_url}/v1/replication") as r:
        if r.status != 200:
            return False
        rows = (await r.json())["vms"]
    return {v["vm"] for v in rows if v["state"] == "in_sync"} >= vms


async def repair_seconds(fleet: LocalFleet, held: LocalZone, peer: LocalZone,
                         vms: set[str], slots: int, timeout: float) -> float:
    """One repair: the peer started empty, then the holding zone; seconds from
    the holding zone's start until every VM is in sync."""
    fleet.stop_zone(held)
    fleet.stop_zone(peer)
    try:  # the copies of the last run; none before the peer's first start
        held_before = await fleet.zfs.datasets(Dataset(peer.root), depth=1)
    except DatasetNotFound:
        held_before = []
    for vm in held_before:
        if vm.dataset != Dataset(peer.root):
            await fleet.zfs.destroy(vm.dataset, recursive=True)
    fleet.zone_settings["reconcile_concurrency"] = slots
    await fleet.start_zone(peer)
    await fleet.start_zone(held)
    t0 = time.monotonic()
    while not await all_in_sync(fleet, held, vms):
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"the repair with {slots} slots did not finish in {timeout:.0f} s")
        await asyncio.sleep(0.05)  # polling the zone's own report: its answer is the end
    return time.monotonic() - t0


async def local_seconds(fleet: LocalFleet, parts: list[Dataset], scratch: Dataset,
                        at_once: int) -> float:
    """Every part's snapshot piped locally into ``scratch``, ``at_once`` pipes at a time."""
    todo = list(enumerate(parts))

    async def worker() -> None:
        while todo:
            i, part = todo.pop(0)
            await fleet.zfs.pipe(SendSpec(part.snapshot(SNAP)), scratch.child(f"p{i}"),
                                 resumable=False)

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(at_once)))
    took = time.monotonic() - t0
    for i in range(len(parts)):
        await fleet.zfs.destroy(scratch.child(f"p{i}"), recursive=True)
    return took


async def main(n_vms: int, size_mib: int, repeat: int, slot_counts: list[int],
               gate: bool) -> int:
    size = size_mib << 20
    pool = 2 * n_vms * size + (512 << 20)
    with tempfile.TemporaryDirectory(prefix="snapper-bench-") as tmp:
        # No rounds but the first of each start; no tee (the peer is gone at push).
        fleet = await LocalFleet.start(Path(tmp), zones=0, cns=1, vms_per_cn=0,
                                       pool_size=pool, reconcile_interval_ms=3_600_000,
                                       pipelined=False,
                                       gate_min_bytes=GateConfig.min_bytes if gate else None)
        scratch: pools.FilePool | None = None
        try:
            held = await fleet.add_zone(pool, group="pair")
            peer = await fleet.add_zone(pool, group="pair")  # the lost zone's replacement
            cn = fleet.cns[0]
            cn.vms = [str(uuid.uuid4()) for _ in range(n_vms)]
            await fleet.start_zone(held)  # its peer is down: each push is one copy
            for vm in cn.vms:
                top = Dataset(cn.pool.name).child(vm)
                await fleet.zfs.create(top)
                await fleet.zfs.create(top.child("disk0"))
                assert cn.pool.mountpoint is not None
                fill(cn.pool.mountpoint / vm / "disk0" / "data", size)
                await push_local(fleet, cn, held, vm)
            parts = [info.dataset for vm in cn.vms
                     for info in await fleet.zfs.datasets(Dataset(held.root).child(vm))
                     if info.dataset != Dataset(held.root).child(vm)]
            nbytes = sum([await stream_bytes(fleet.zfs, SendSpec(p.snapshot(SNAP)))
                          for p in parts])
            scratch = await pools.create_pool(fleet.zfs, Path(tmp), "scratch",
                                              size=pool, mounted=False)
            here = Dataset(scratch.name)
            timeout = max(300.0, nbytes / 5e6)  # far beyond any rate seen here
            times: dict[str, list[float]] = {}
            kinds = [f"slots {n}" for n in slot_counts] + ["local 1", "local 2"]
            await local_seconds(fleet, parts, here, 1)  # untimed: the page cache warm
            for i in range(repeat):
                shift = i % len(kinds)
                for k in kinds[shift:] + kinds[:shift]:
                    what, n = k.split()
                    if what == "slots":
                        took = await repair_seconds(fleet, held, peer, set(cn.vms),
                                                    int(n), timeout)
                    else:
                        took = await local_seconds(fleet, parts, here, int(n))
                    times.setdefault(k, []).append(took)
                    print(f"  run {i + 1}: {k:<8} {took:7.2f} s {nbytes / took / 1e6:7.1f} MB/s",
                          file=sys.stderr, flush=True)
            print(f"repair: {n_vms} VMs, {len(parts)} parts, {nbytes} bytes of streams "
                  f"({nbytes / 1e6:.0f} MB), ZFS: {(await fleet.zfs.capabilities()).flavour}, "
                  f"{'through gates' if gate else 'snapperd ports'}, median of {repeat}, "
                  f"{os.cpu_count()} CPUs")
            med = {k: statistics.median(v) for k, v in times.items()}
            labels = {"local 1": "zfs send | zfs receive, one at a time",
                      "local 2": "zfs send | zfs receive, two at once"}
            for k, v in med.items():
                label = labels.get(k, f"repair, reconcile_concurrency = {k.split()[1]}")
                runs = ", ".join(f"{nbytes / t / 1e6:.0f}" for t in times[k])
                print(f"  {label:<44} {v:7.2f} s {nbytes / v / 1e6:8.1f} MB/s  (runs: {runs})")
            best_local = min(med["local 1"], med["local 2"])
            first = f"slots {slot_counts[0]}"
            for slots in slot_counts:
                k = f"slots {slots}"
                print(f"  ratio repair ({slots} at once) / the faster local pipe (rate): "
                      f"{best_local / med[k]:.2f}  (target >= 0.8); / {slot_counts[0]} at once: "
                      f"{med[first] / med[k]:.2f}")
        finally:
            if scratch is not None:
                await scratch.destroy(fleet.zfs)
            await fleet.stop()
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vms", type=int, default=8)
    ap.add_argument("--size-mib", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--slots", default="1,2,4",
                    help="reconcile_concurrency values, comma-separated (default 1,2,4)")
    ap.add_argument("--gate", action="store_true",
                    help="both zones run an sshd gate; large copies go through it")
    a = ap.parse_args()
    sys.exit(asyncio.run(main(a.vms, a.size_mib, a.repeat,
                              [int(s) for s in a.slots.split(",")], a.gate)))
