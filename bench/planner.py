"""Planner benchmark: 100k VMs x 20 zones, then a 21st zone is added.

    python3 bench/planner.py [--vms 100000] [--zones 20] [--runs 5]

Prints the median of ``--runs`` timings (wall clock, and CPU time of this
process, which other work on a shared machine disturbs less) for planning from scratch and for
planning after adding a zone, with the fraction of data that moves, next to
two baselines measured in the same run:

* hash floor: the bulk hashing of every (VM, zone) pair the planner starts
  from (``_Hrw`` before any ranking): what any HRW placement must pay;
* naive modulo: an unweighted ``hash % N`` placement (primary, then mirror
  among the rest), its time and how much of the data it moves on an add.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rebalance.placement import (
    Plan,
    VmInfo,
    ZoneInfo,
    ZoneState,
    _Hrw,
    plan,
)
from snapper_zone.common.hashing import uuid_bytes

T = TypeVar("T")
GiB = 2**30


def timed(fn: Callable[[], T], runs: int) -> tuple[tuple[float, float], T]:
    """Median wall-clock and CPU seconds of ``runs`` calls, and the last result."""
    wall, cpu = [], []
    result: T | None = None
    for _ in range(runs):
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    assert result is not None
    return (statistics.median(wall), statistics.median(cpu)), result


def naive_modulo(vms: list[VmInfo], zone_ids: list[str]) -> dict[str, tuple[str, str]]:
    raw = uuid_bytes([v.uuid for v in vms])
    n = len(zone_ids)
    out = {}
    for i, v in enumerate(vms):
        h = int.from_bytes(raw[16 * i : 16 * i + 8], "little")
        a = h % n
        b = (h // n) % (n - 1)
        out[v.uuid] = (zone_ids[a], zone_ids[b if b < a else b + 1])
    return out


def moved_fraction(before: dict[str, tuple[str, str]], after: dict[str, tuple[str, str]],
                   sizes: dict[str, int]) -> float:
    moved = sum(sizes[vm] * len(set(after[vm]) - set(pair)) for vm, pair in before.items())
    return moved / (2 * sum(sizes.values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=100_000)
    ap.add_argument("--zones", type=int, default=20)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    rnd = random.Random(148)
    vms = [VmInfo(str(uuid.UUID(int=rnd.getrandbits(128), version=4)), rnd.randint(1, 100) * GiB)
           for _ in range(args.vms)]
    sizes = {v.uuid: v.size for v in vms}
    total = sum(sizes.values())
    # mixed capacities (8, 12, 16 TiB), each with room for what it gets
    caps = [(8, 12, 16)[i % 3] * 2**40 for i in range(args.zones + 1)]
    room = 4 * total // args.zones
    zones = [ZoneInfo(f"zone-{i:02d}", ZoneState.ACTIVE, caps[i], 0, room)
             for i in range(args.zones)]
    added = [*zones, ZoneInfo(f"zone-{args.zones:02d}", ZoneState.ACTIVE, caps[-1], 0, room)]
    ids = sorted(sizes)

    print(f"planner benchmark: {args.vms} VMs x {args.zones} zones (+1), median of {args.runs}; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")

    t_floor, _ = timed(lambda: _Hrw(zones, ids), args.runs)
    t_scratch, scratch = timed(lambda: plan(zones, vms, {}), args.runs)
    t_add, after = timed(lambda: plan(added, vms, scratch.placement), args.runs)
    zone_ids = [z.id for z in zones]
    t_naive, naive = timed(lambda: naive_modulo(vms, zone_ids), args.runs)
    naive_after = naive_modulo(vms, [*zone_ids, added[-1].id])

    moved = after.moved_bytes / (2 * total)
    new_share = after.projected[added[-1].id] / sum(after.projected.values())
    fair = caps[-1] / sum(caps)
    print_row("hash floor (bulk hash of every pair)", t_floor, None)
    print_row("plan from scratch", t_scratch, None, t_floor)
    print_row("plan after adding a zone", t_add, moved, t_floor)
    print_row("naive modulo placement", t_naive, moved_fraction(naive, naive_after, sizes),
              t_floor)
    print(f"after the add: {len(after.moves)} moves ({len(after.moves) / args.vms:.2%} of VMs), "
          f"new zone holds {new_share:.2%} of the data, fair share {fair:.2%} "
          f"({(new_share - fair) / fair:+.1%}); warnings: {len(after.warnings)}")
    check(scratch, after)


def print_row(what: str, seconds: tuple[float, float], moved: float | None,
              floor: tuple[float, float] | None = None) -> None:
    wall, cpu = seconds
    line = f"  {what:<38} {wall * 1000:6.0f} ms wall {cpu * 1000:6.0f} ms cpu"
    if floor:
        line += f"  ({cpu / floor[1]:.1f}x the hash floor's cpu)"
    if moved is not None:
        line += f"  moved {moved:.2%} of the data"
    print(line)


def check(scratch: Plan, after: Plan) -> None:
    assert not scratch.moves and not scratch.degraded
    assert all(a != b for a, b in after.placement.values())


if __name__ == "__main__":
    main()
