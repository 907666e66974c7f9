#!/usr/bin/env python3
"""The copy buffer before ``zfs receive``: its two rings side by side, and none.

A peer zone's stream through the gate reaches snapperd as ``sshd``'s pipe and
goes on into ``zfs receive``'s, through a ring (``limits.copy_buffer_bytes``)
that takes the stream while ``zfs receive`` stalls on a transaction group:

  memory  ``stream.MemoryRing``: 64 MiB of anonymous memory, read into and
          written out of (two copies per byte; spliced past while empty on
          Linux). What illumos runs, and what Linux ran before ``PipeRing``
  pipes   ``stream.PipeRing``: a queue of pipes, bytes moved by splice(2)
          (page references, no copy); Linux
  eager   the pipe ring with its reading thread moving on every write the
          source makes (``settle=0``), where ``pipes`` lets ``sshd``'s pipe
          fill a third between moves
  none    ``stream.SplicePump`` straight into ``zfs receive``'s pipe

The source is a child writing a file from the page cache in 32 KiB writes,
each as it falls due (as ``sshd`` writes what it decrypts), at ``--rate``
MB/s; the sink a child reading 256 KiB at a time and pausing 100 ms after
every 32 MiB (a transaction group's sync), both the same for every kind.
Printed: MB/s and the pump's CPU-seconds per GB (this process,
``getrusage``; its threads included), median of ``--repeat``, each kind's
runs interleaved, and the ratios to ``memory`` from the same run.

    python bench/ring.py [--size-mib 512] [--repeat 5] [--rate 300]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import between_children, cpu_here, fill, interleaved, reap

from snapper_zone.transfer.stream import MemoryRing, PipeRing, SplicePump, can_splice

RING = 64 << 20

# The children: the bench's own code, no input of anyone's.
SOURCE = """
import os, sys, time
rate, chunk = float(sys.argv[2]) * 1e6, 32 << 10
with open(sys.argv[1], "rb") as f:
    start, sent = time.monotonic(), 0
    while block := f.read(chunk):
        ahead = sent / rate - (time.monotonic() - start)
        if ahead > 0:  # a write per 32 KiB as it goes: no bursts
            time.sleep(ahead)
        view = memoryview(block)
        while view:
            view = view[os.write(1, view):]
        sent += len(block)
"""
SINK = """
import os, time
seen = 0
while block := os.read(0, 256 << 10):
    seen += len(block)
    if seen >= 32 << 20:
        seen = 0
        time.sleep(0.1)
"""


async def one(kind: str, path: Path, rate: float) -> tuple[float, float, int]:
    """(seconds, this process's CPU seconds, bytes counted) for one pass."""
    start, cpu = time.monotonic(), cpu_here()
    src_r, dst_w, children = await between_children(
        [sys.executable, "-c", SOURCE, str(path), str(rate)], [sys.executable, "-c", SINK])
    counted = 0

    def count(n: int) -> None:
        nonlocal counted
        counted += n

    pump: MemoryRing | PipeRing | SplicePump
    if kind == "memory":
        pump = MemoryRing(src_r, dst_w, count, RING)
    elif kind in ("pipes", "eager"):
        pump = PipeRing(src_r, dst_w, count, RING, settle=0.0) if kind == "eager" else \
            PipeRing(src_r, dst_w, count, RING)
    else:
        pump = SplicePump(src_r, dst_w, count)
    await pump.done
    pump.close()
    await reap(children)
    return time.monotonic() - start, cpu_here() - cpu, counted


async def main(size_mib: int, repeat: int, rate: float) -> int:
    if not can_splice():
        raise SystemExit("no splice(2) here: only the memory ring runs (illumos)")
    kinds = ["memory", "pipes", "eager", "none"]
    with tempfile.TemporaryDirectory(prefix="snapper-bench-") as tmp:
        path = Path(tmp) / "data"
        size = await asyncio.to_thread(fill, path, size_mib << 20)
        await one("none", path, rate)  # warm the page cache
        secs, cpus = await interleaved(kinds, repeat, size,
                                       lambda k: one(k, path, rate))
    gb = size / 1e9
    med = {k: statistics.median(secs[k]) for k in kinds}
    cpu = {k: statistics.median(cpus[k]) / gb for k in kinds}
    print(f"copy buffer: {size} bytes, source {rate:.0f} MB/s, median of {repeat}, "
          f"{os.cpu_count()} CPUs")
    print(f"  {'ring':<8} {'MB/s':>8} {'CPU-s/GB':>9} {'rate / memory':>14} "
          f"{'CPU / memory':>13}")
    for k in kinds:
        print(f"  {k:<8} {size / med[k] / 1e6:8.1f} {cpu[k]:9.3f} "
              f"{med['memory'] / med[k]:14.2f} {cpu[k] / cpu['memory']:13.2f}")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rate", type=float, default=300.0,
                    help="the source's rate, MB/s (sshd's decrypting)")
    a = ap.parse_args()
    raise SystemExit(asyncio.run(main(a.size_mib, a.repeat, a.rate)))
