#!/usr/bin/env python3
"""What the CN spends moving a pushed stream from ``zfs send`` into ``ssh``.

On a CN the stream's bytes pass through snapper between the send's pipe and
``ssh``'s stdin (to count them for progress and pace them for ``--bwlimit``).
That costs CPU the CN's VMs would otherwise have. The ways, the same bytes:

  python  ``stream.SendPump``: each chunk read into Python and written out
  splice  ``stream.SplicePump``: splice(2) moves the pages pipe to pipe in the
          kernel, Python only counts (Linux; what a push uses there)
  eager   the same pump waking on every change of its pipes (``settle=0``),
          where ``splice`` lets a flowing stream's pipes settle 1 ms between
          moves

The source is ``cat`` of a file of random bytes in the page cache, the sink
``cat > /dev/null``, both pipes widened to 1 MiB as a push's are. With
``--sink-rate`` the sink reads 32 KiB at a time at that many MB/s instead, as
``ssh`` takes a stream it encrypts: the stream is held by its reader, as a
push or a zone's copy is. Printed: MB/s and this process's CPU-seconds per GB
(``getrusage``: the pump only; the children are the same in every row),
median of ``--repeat``, runs interleaved, and the ratios to ``splice``.

Measured here (2 CPUs): unpaced (1 GiB), python 0.30-0.41, splice and
eager 0.19 CPU-s/GB, all over 1.7 GB/s; with ``--sink-rate 300`` (512 MiB,
two runs) python 1.46, splice 0.19-0.22, eager 1.47-1.50: a pump that wakes
for every read of its reader costs 7x one that lets the pipe drain a while.

    python bench/pump.py [--size-mib 1024] [--repeat 5] [--sink-rate 300]
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

from snapper_zone.transfer.stream import (
    PipeFlow,
    SendPump,
    SplicePump,
    can_splice,
)

# The paced sink: the bench's own code, no input of anyone's.
SINK = """
import os, sys, time
rate, chunk = float(sys.argv[1]) * 1e6, 32 << 10
start, seen = time.monotonic(), 0
while block := os.read(0, chunk):
    seen += len(block)
    ahead = seen / rate - (time.monotonic() - start)
    if ahead > 0:  # a read per 32 KiB as it goes, as ssh's are: no bursts
        time.sleep(ahead)
"""


async def one(kind: str, path: Path, sink_rate: float) -> tuple[float, float, int]:
    """(seconds, this process's CPU seconds, bytes counted) for one pass."""
    loop = asyncio.get_running_loop()
    start, cpu = time.monotonic(), cpu_here()
    sink = [sys.executable, "-c", SINK, str(sink_rate)] if sink_rate else \
        ["sh", "-c", "cat > /dev/null"]
    src_r, dst_w, children = await between_children(["cat", str(path)], sink)
    counted = 0

    def count(n: int) -> None:
        nonlocal counted
        counted += n

    if kind in ("splice", "eager"):
        pump = SplicePump(src_r, dst_w, count, settle=0.0) if kind == "eager" else \
            SplicePump(src_r, dst_w, count)
        await pump.done
        pump.close()
    else:
        flow = PipeFlow()
        out, _ = await loop.connect_write_pipe(lambda: flow, os.fdopen(dst_w, "wb", buffering=0))
        flow.pump = send = SendPump(out, count)
        transport, _ = await loop.connect_read_pipe(lambda: send,
                                                    os.fdopen(src_r, "rb", buffering=0))
        await send.done
        out.close()
        transport.close()
    await reap(children)
    return time.monotonic() - start, cpu_here() - cpu, counted


async def main(size_mib: int, repeat: int, sink_rate: float) -> int:
    kinds = ["python"] + (["splice", "eager"] if can_splice() else [])
    with tempfile.TemporaryDirectory(prefix="snapper-bench-") as tmp:
        path = Path(tmp) / "data"
        size = await asyncio.to_thread(fill, path, size_mib << 20)
        await one("python", path, 0)  # warm the page cache
        secs, cpus = await interleaved(kinds, repeat, size,
                                       lambda k: one(k, path, sink_rate))
    gb = size / 1e9
    med = {k: statistics.median(secs[k]) for k in kinds}
    cpu = {k: statistics.median(cpus[k]) / gb for k in kinds}
    base = "splice" if "splice" in kinds else "python"
    sink = f"sink {sink_rate:.0f} MB/s in 32 KiB reads" if sink_rate else "sink unpaced"
    print(f"pump: {size} bytes, {sink}, median of {repeat}, {os.cpu_count()} CPUs")
    print(f"  {'pump':<8} {'MB/s':>8} {'pump CPU-s/GB':>14} {f'CPU / {base}':>14}")
    for k in kinds:
        print(f"  {k:<8} {size / med[k] / 1e6:8.1f} {cpu[k]:14.3f} "
              f"{cpu[k] / max(cpu[base], 1e-6):14.2f}")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--sink-rate", type=float, default=0.0,
                    help="MB/s the sink reads at, 32 KiB at a time (0: as fast as cat)")
    a = ap.parse_args()
    raise SystemExit(asyncio.run(main(a.size_mib, a.repeat, a.sink_rate)))
