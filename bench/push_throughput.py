#!/usr/bin/env python3
"""Push throughput: snapperd's SSH endpoint against OpenSSH, on one ZFS stream.

One ``zfs send`` stream (a dataset holding ``--size-mib`` of random data, so
incompressible) is saved to a file and read once so it sits in page cache.
Then, ``--repeat`` times each, interleaved so drift hits all three alike:

  a. ``cat stream | zfs receive``                         the limit: no network
  b. ``ssh -c aes128-gcm@openssh.com ... zfs receive``    into a private sshd
     on 127.0.0.1 (what syncoid users do)
  c. ``ssh -c aes128-gcm@openssh.com ... receive VM root SNAP`` into a
     ``snapperd`` process (OpenSSH client → asyncssh server → zfs receive)

Each run receives into a fresh dataset, destroyed afterwards; the time is
from starting the sender to the receiving side's exit (for b and c, the ssh
client exits only once the remote ``zfs receive`` is done). MB/s is 10^6
bytes/s. Pools come from ``snapper_zone.fleet.pools`` (zfs-fuse file pools on
a host without kernel ZFS); everything created is destroyed, everything
started is stopped by pid.

    python bench/push_throughput.py [--size-mib 1024] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    CN_ID,
    SNAP,
    VM,
    Bench,
    CnKey,
    header,
    rate_rows,
    run_line,
    ssh_argv,
    timed,
)

from snapper_zone.zfs.zfs import SendSpec


class PushBench(Bench):
    async def setup(self) -> None:
        await super().setup()
        self.stream = self.workdir / "stream.zfs"
        with open(self.stream, "wb") as out:  # noqa: ASYNC230 - zfs send writes, not us
            child = await self.zfs.send(SendSpec(self.data.snapshot(SNAP)), stdout=out)
            await self.zfs.check(child)
        # Read once so every method starts from page cache.
        await asyncio.to_thread(self.stream.read_bytes)
        self.bytes = self.stream.stat().st_size
        await self.start_sshd([self.client_key])
        await self.start_snapperd([CnKey(CN_ID, self.client_key, (VM,))])

    # -- the three methods ----------------------------------------------------------

    async def local(self, i: int) -> float:
        target = self.dst.child(f"a{i}")
        took = await timed(await self.zfs.receive_argv(target, resumable=False),
                           stdin=self.stream)
        await self.zfs.destroy(target, recursive=True)
        return took

    async def openssh(self, i: int) -> float:
        target = self.dst.child(f"b{i}")
        remote = " ".join(await self.zfs.receive_argv(target, resumable=False))
        took = await timed(ssh_argv(self.client_key, self.sshd_known, self.sshd_port, "root",
                                    remote), stdin=self.stream)
        await self.zfs.destroy(target, recursive=True)
        return took

    async def snapperd(self, i: int) -> float:
        took = await timed(ssh_argv(self.client_key, self.zone_known, self.zone_port,
                                    "snapper", f"receive {VM} root {SNAP}"), stdin=self.stream)
        await self.zfs.destroy(self.zone_root.child(VM), recursive=True)
        return took

    async def run(self) -> dict[str, list[float]]:
        methods: dict[str, Callable[[int], Awaitable[float]]] = {
            "cat | zfs receive": self.local,
            "OpenSSH -> sshd -> zfs receive": self.openssh,
            "OpenSSH -> snapperd -> zfs receive": self.snapperd,
        }
        times: dict[str, list[float]] = {k: [] for k in methods}
        for i in range(self.repeat):
            for name, method in methods.items():
                t = await method(i)
                times[name].append(t)
                run_line(i, name, self.bytes, t)
        return times


async def amain(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="snapper-bench-"))
    bench = PushBench(workdir, args.size_mib, args.repeat)
    try:
        print(f"preparing a {args.size_mib} MiB stream in {workdir} ...", file=sys.stderr)
        await bench.setup()
        caps = await bench.zfs.capabilities()
        times = await bench.run()
    finally:
        await bench.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    rates = {k: bench.bytes / statistics.median(v) / 1e6 for k, v in times.items()}
    print("\n" + header(bench.bytes, caps.flavour, args.repeat))
    print("\n".join(rate_rows(bench.bytes, times)))
    ratio = rates["OpenSSH -> snapperd -> zfs receive"] / rates["OpenSSH -> sshd -> zfs receive"]
    print(f"  snapperd / OpenSSH ratio: {ratio:.2f}  (target >= 1.0)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--size-mib", type=int, default=1024, help="data in the stream (MiB)")
    p.add_argument("--repeat", type=int, default=3, help="runs per method; median reported")
    args = p.parse_args(argv)
    if args.size_mib < 1 or args.repeat < 1:
        p.error("--size-mib and --repeat must be positive")
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
