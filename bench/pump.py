#!/usr/bin/env python3
"""What the CN spends moving a pushed stream from ``zfs send`` into ``ssh``.

On a CN the stream's bytes pass through snapper between the send's pipe and
``ssh``'s stdin (to count them for progress and pace them for ``--bwlimit``).
That costs CPU the CN's VMs would otherwise have. Two ways, the same bytes:

  python  ``stream.SendPump``: each chunk read into Python and written out
  splice  ``stream.SplicePump``: splice(2) moves the pages pipe to pipe in the
          kernel, Python only counts (Linux; what a push uses there)

The source is ``cat`` of a file of random bytes in the page cache, the sink
``cat > /dev/null``, both pipes widened to 1 MiB as a push's are. Printed:
MB/s and this process's CPU-seconds per GB (``getrusage``: the pump only; the
two ``cat`` children are the same in both rows), median of ``--repeat``, and
the ratio. Measured here (1 GiB, 2 CPUs, two runs): python 0.30-0.33, splice
0.19-0.20 CPU-s/GB (1.5-1.7x), both over 2 GB/s, far above what ``ssh``
encrypts.

    python bench/pump.py [--size-mib 1024] [--repeat 5]
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


async def one(kind: str, path: Path) -> tuple[float, float, int]:
    """(seconds, this process's CPU seconds, bytes counted) for one pass."""
    loop = asyncio.get_running_loop()
    start, cpu = time.monotonic(), cpu_here()
    src_r, dst_w, children = await between_children(["cat", str(path)],
                                                    ["sh", "-c", "cat > /dev/null"])
    counted = 0

    def count(n: int) -> None:
        nonlocal counted
        counted += n

    if kind == "splice":
        pump = SplicePump(src_r, dst_w, count)
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


async def main(size_mib: int, repeat: int) -> int:
    kinds = ["python"] + (["splice"] if can_splice() else [])
    with tempfile.TemporaryDirectory(prefix="snapper-bench-") as tmp:
        path = Path(tmp) / "data"
        size = await asyncio.to_thread(fill, path, size_mib << 20)
        await one("python", path)  # warm the page cache
        secs, cpus = await interleaved(kinds, repeat, size,
                                       lambda k: one(k, path))
    gb = size / 1e9
    print(f"pump: {size} bytes, median of {repeat}, {os.cpu_count()} CPUs")
    print(f"  {'pump':<8} {'MB/s':>8} {'pump CPU-s/GB':>14}")
    for k in kinds:
        print(f"  {k:<8} {size / statistics.median(secs[k]) / 1e6:8.1f} "
              f"{statistics.median(cpus[k]) / gb:14.3f}")
    if "splice" in kinds:
        ratio = statistics.median(cpus["python"]) / max(statistics.median(cpus["splice"]), 1e-6)
        print(f"  python / splice, pump CPU per GB: {ratio:.1f}x")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    raise SystemExit(asyncio.run(main(a.size_mib, a.repeat)))
