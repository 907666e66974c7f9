"""Placement reads and writes per second: ZooKeeper beside SQLite, one run.

    python3 bench/store.py [--vms 2000] [--concurrency 16] [--runs 3] [--zk HOST:PORT,...]

Each run gives both backends a fresh place (a SQLite file in a temporary
directory, WAL and synchronous=FULL as the coordinator opens it; a new chroot
of ZooKeeper) and times, through the ``Store`` interface the coordinator uses:

- ``place``: ``--vms`` new placements (one transaction each: placement,
  size and the zones' refs on ZooKeeper), ``--concurrency`` in flight, as CNs
  asking for new VMs at once;
- ``reassign``: every VM's placement switched with its version check;
- ``placement``: every VM's placement read one by one (a CN's or zone's ask);
- ``placements``: the whole map read at once (every rebalance), VMs/s.

Without ``--zk`` a private standalone ZooKeeper (Debian's ``zookeeper``
package) is started on 127.0.0.1 and stopped by its pid. Prints the median
of ``--runs`` per operation and the ratio ZooKeeper/SQLite.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rebalance.store import SqliteStore, Store, ZkStore
from snapper_zone.fleet.zookeeper import LocalZooKeeper, missing

ZONES = ("00000000-0000-4000-8000-00000000000a", "00000000-0000-4000-8000-00000000000b",
         "00000000-0000-4000-8000-00000000000c")
OPS = ("place", "reassign", "placement", "placements")


async def _bounded(n: int, calls: Sequence[Callable[[], Awaitable[object]]]) -> None:
    """Run ``calls`` with at most ``n`` in flight."""
    it = iter(calls)

    async def worker() -> None:
        for call in it:
            await call()
    await asyncio.gather(*(worker() for _ in range(n)))


async def _run(store: Store, vms: list[str], conc: int) -> dict[str, float]:
    """Operations per second of each kind on an empty store."""
    a, b, c = ZONES
    rates = {}
    t = time.perf_counter()
    await _bounded(conc, [partial(store.place, vm, (a, b), 1) for vm in vms])
    rates["place"] = len(vms) / (time.perf_counter() - t)
    t = time.perf_counter()
    await _bounded(conc, [partial(store.reassign, vm, (a, b), (a, c)) for vm in vms])
    rates["reassign"] = len(vms) / (time.perf_counter() - t)
    t = time.perf_counter()
    await _bounded(conc, [partial(store.placement, vm) for vm in vms])
    rates["placement"] = len(vms) / (time.perf_counter() - t)
    t = time.perf_counter()
    got = await store.placements()
    rates["placements"] = len(got) / (time.perf_counter() - t)
    assert got == {vm: (a, c) for vm in vms}
    return rates


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--zk", metavar="HOSTS", help="an ensemble to use instead of a private one")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="snapper-bench-") as tmp:
        zk = None
        hosts = args.zk
        if hosts is None:
            why = missing()
            if why is not None:
                sys.exit(f"bench/store.py: {why}")
            zk = LocalZooKeeper(Path(tmp) / "zookeeper", tick_ms=2000)
            zk.start()
            hosts = zk.hosts
        results: dict[str, list[dict[str, float]]] = {"sqlite": [], "zookeeper": []}
        try:
            for i in range(args.runs):  # interleaved, so drift hits both alike
                vms = [str(uuid.uuid4()) for _ in range(args.vms)]
                sq = SqliteStore(Path(tmp) / f"run{i}.db")
                results["sqlite"].append(await _run(sq, vms, args.concurrency))
                await sq.close()
                zs = await ZkStore.open(hosts, f"/snapper-bench-{uuid.uuid4().hex}")
                results["zookeeper"].append(await _run(zs, vms, args.concurrency))
                await zs.close()
        finally:
            if zk is not None:
                zk.stop()
    print(f"Store: {args.vms} VMs, {args.concurrency} calls in flight, median of {args.runs} "
          f"(ZooKeeper: {'private standalone' if zk else hosts}):")
    print(f"  {'operation':11s} {'SQLite/s':>10s} {'ZooKeeper/s':>12s} {'ZK/SQLite':>10s}")
    for op in OPS:
        sq_rate = statistics.median(r[op] for r in results["sqlite"])
        zk_rate = statistics.median(r[op] for r in results["zookeeper"])
        print(f"  {op:11s} {sq_rate:10.0f} {zk_rate:12.0f} {zk_rate / sq_rate:9.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
