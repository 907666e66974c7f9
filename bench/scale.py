#!/usr/bin/env python3
"""Many CNs at once: N simulated CNs push a live ``zfs send`` into one zone.

Each CN is its own key (registered with the zone as a CN of its own) and its
own VM on the source pool: a dataset received from one of ``--size-mib``
random bytes, so every CN's snapshot is its own (its own guid). For each N
in ``--cns`` (default 1, 4, 16, 32), ``--repeat`` times, the two paths in the
same run, one after the other:

  a. ``zfs send | ssh -c aes128-gcm@openssh.com root@zone zfs receive``,
     N at once into one private sshd on 127.0.0.1
  b. ``snapper push VM --name SNAP`` (its stream through OpenSSH where
     installed, or ``--ssh-client``), N at once into one ``snapperd``
     (``max_concurrent_receives`` = the largest N, so none is queued). Each
     CN is a worker process that has imported snapper and waits for the
     start: the real CLI, timed without Python's start-up; with ``--gate``
     snapperd has a ``[gate]`` and the streams go through a second private
     sshd, its front door (``snapper-gate``, docs/data-plane.md), the
     receiving side's CPU then being that sshd's and snapperd's together;
     with ``--agent`` each CN pushes as ``snapper agent`` does: one process
     per CN for all of an N's runs, its links to the zone kept from push to
     push (logged in by an untimed first push)

Printed per N: aggregate MB/s (N streams' bytes over the wall time from the
start to the last push's end; medians of the runs) and the ratio snapper /
OpenSSH (from the same run, median of the ratios); p50 and p99 of the
pushes' own times (all runs pooled); the receiving side's CPU-seconds per GB
(the daemon and its reaped children, from ``/proc/PID/stat``); snapperd's
resident memory growth per concurrent stream (``VmRSS`` sampled every 20 ms
during the run, peak minus before, over N); failures (a failed push is
counted and its error shown, the run goes on). MB/s is 10^6 bytes/s.

On one machine the CNs' own work (``zfs send``, the client's encryption)
shares the CPUs with the zone's: the ratio compares the two paths under the
same handicap, it is not what a zone with N separate CNs would see.

    python bench/scale.py [--size-mib 2] [--repeat 3] [--cns 1,4,16,32] [--gate]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
ME = str(Path(__file__).resolve())

from common import (  # noqa: E402
    REPO,
    SNAP,
    Bench,
    CnKey,
    RssPeak,
    add_ssh_client_option,
    cpu_by_process,
    cpu_seconds,
    cpu_since,
    cpu_split,
    cpu_with_children,
    header,
    keygen,
    percentile,
    ssh_argv,
)

from snapper_zone.zfs import proc  # noqa: E402
from snapper_zone.zfs.zfs import SendSpec  # noqa: E402

# Each CN's worker: it says READY once snapper is imported, starts on GO.
READY = b"ready\n"
GO = b"go\n"


@dataclass
class Round:
    """One run of one path with N CNs."""

    seconds: float  # from the start to the last push's end
    pushes: list[float]  # each push's own seconds (the ones that succeeded)
    failures: list[str]
    cpu: float  # the receiving side's CPU-seconds
    rss_growth: int = 0  # snapperd's peak VmRSS minus before (bytes)
    cn_cpu: float | None = None  # the workers' CPU-seconds from the start (not imports)


@dataclass
class Figures:
    rounds: dict[str, list[Round]] = field(default_factory=lambda: {"a": [], "b": []})
    # The whole machine's CPU-seconds per path, by process, all runs summed.
    split: dict[str, dict[str, float]] = field(default_factory=lambda: {"a": {}, "b": {}})


LABELS = {"a": "zfs send | ssh -> sshd -> zfs receive",
          "b": "snapper push -> snapperd -> zfs receive"}


class ScaleBench(Bench):
    def __init__(self, workdir: Path, size_mib: int, repeat: int, cns: list[int]) -> None:
        super().__init__(workdir, size_mib, repeat)
        self.ns = cns
        self.copies = max(cns) + 1
        self.dst_copies = max(cns)
        self.snapperd_config = {"max_concurrent_receives": max(cns)}
        self.round_timeout = 300.0
        self.agent = False  # --agent: each CN pushes as snapper agent does, on kept links
        self.kept: list[proc.Spawned] = []

    async def setup(self) -> None:
        await super().setup()
        self.cns: list[CnKey] = []
        for i in range(max(self.ns)):
            vm = str(uuid.UUID(int=uuid.uuid5(uuid.NAMESPACE_OID, f"bench-cn{i}").int))
            key = keygen(self.workdir / f"cn{i}_ed25519")
            ds = self.src.child(vm)
            await self.zfs.pipe(SendSpec(self.data.snapshot(SNAP)), ds, resumable=False)
            self.cns.append(CnKey(f"cn{i}", key, (vm,)))
        self.bytes = await self.send_bytes(SendSpec(self.src.child(self.cns[0].vms[0])
                                                    .snapshot(SNAP)))
        await self.start_sshd([c.key for c in self.cns])
        await self.start_snapperd(self.cns)

    # -- the two paths --------------------------------------------------------------

    async def openssh(self, n: int, i: int) -> Round:
        async def one(c: CnKey, k: int) -> float:
            target = self.dst.child(f"b{k}")
            remote = " ".join(await self.zfs.receive_argv(target, resumable=False))
            send = " ".join(await self.zfs.send_argv(
                SendSpec(self.src.child(c.vms[0]).snapshot(SNAP))))
            ssh = " ".join(ssh_argv(c.key, self.sshd_known, self.sshd_port, "root",
                                    f"'{remote}'"))
            start = time.monotonic()
            # A shell pipeline, as people write it: the bench's own fixed strings only.
            child = await proc.spawn(["sh", "-c", f"{send} | {ssh}"], new_session=True)
            try:
                done = await child.wait()
            except BaseException:  # the round timed out: end the whole pipeline
                child.kill_group()
                raise
            if not done.ok:
                raise RuntimeError(done.stderr.strip()[-400:])
            return time.monotonic() - start

        before = cpu_seconds(self.sshd_pid)
        start = time.monotonic()
        got = await self._bounded([one(c, k) for k, c in enumerate(self.cns[:n])])
        took = time.monotonic() - start
        cpu = await cpu_since(self.sshd_pid, before)
        for k in range(n):
            with contextlib.suppress(Exception):  # a failed receive may have left nothing
                await self.zfs.destroy(self.dst.child(f"b{k}"), recursive=True)
        return _round(took, got, cpu)

    async def spawn_workers(self, n: int) -> list[proc.Spawned]:
        """The first ``n`` CNs' workers, each ready: snapper imported (and with
        ``--agent`` its command line read, its links not yet logged in)."""
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        mode = "--agent-worker" if self.agent else "--worker"
        workers = [await proc.spawn([sys.executable, ME, mode,
                                     *self.push_argv(c.key, c.vms[0], str(self.src))],
                                    stdin=proc.PIPE, stdout=proc.PIPE, env=env,
                                    new_session=True)
                   for c in self.cns[:n]]
        try:
            for w in workers:  # every CN ready before any starts
                async with asyncio.timeout(120):
                    if await w.stdout.readline() != READY:
                        raise RuntimeError(f"a worker did not start: {(await w.wait()).stderr}")
        except BaseException:
            await end_workers(workers)
            raise
        return workers

    async def snapper(self, n: int, i: int) -> Round:
        # --agent: the workers of this N, kept from run to run with their links.
        kept = self.kept
        workers = kept or await self.spawn_workers(n)
        try:
            async def one(w: proc.Spawned) -> float:
                line = await w.stdout.readline()
                res = json.loads(line) if line.strip() else {}
                if not kept or not line:
                    done = await w.wait()
                    if not done.ok:
                        raise RuntimeError(done.stderr.strip()[-400:] or f"exit {done.returncode}")
                if res.get("rc") != 0:
                    raise RuntimeError(res.get("error") or "no result from the worker")
                cn_cpu.append(float(res["cpu"]))
                return float(res["seconds"])

            cn_cpu: list[float] = []
            zone = [self.snapperd_pid, *([self.gate_pid] if self.gate else [])]
            before = [cpu_seconds(pid) for pid in zone]
            async with RssPeak(self.snapperd_pid) as rss:
                start = time.monotonic()
                for w in workers:
                    w.stdin.write(GO)
                got = await self._bounded([one(w) for w in workers])
                took = time.monotonic() - start
            cpu = sum([await cpu_since(pid, b) for pid, b in zip(zone, before, strict=True)])
        finally:
            if not kept:  # a worker's zfs send and ssh too, if it is still running
                await end_workers(workers)
        for c in self.cns[:n]:
            with contextlib.suppress(Exception):
                await self.zfs.destroy(self.zone_root.child(c.vms[0]), recursive=True)
        r = _round(took, got, cpu)
        r.rss_growth = rss.growth
        r.cn_cpu = sum(cn_cpu)
        return r

    async def _bounded(self, pushes: list[Coroutine[Any, Any, float]]) -> list[
            float | BaseException]:
        """Every push's seconds or error; those still running after ``round_timeout``
        are cancelled (their processes killed) and count as failures."""
        tasks = [asyncio.ensure_future(p) for p in pushes]
        await asyncio.wait(tasks, timeout=self.round_timeout)
        out: list[float | BaseException] = []
        for t in tasks:
            if not t.done():
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t
                out.append(TimeoutError(f"still running after {self.round_timeout:g} s"))
            else:
                out.append(t.exception() or t.result())
        return out

    async def run(self) -> dict[int, Figures]:
        out: dict[int, Figures] = {}
        for n in self.ns:
            fig = out[n] = Figures()
            if self.agent:
                self.kept = await self.spawn_workers(n)
                # Untimed: each CN's agent logs in with its first push.
                if warm := (await self.snapper(n, -1)).failures:
                    raise RuntimeError(f"the agents' first push failed: {warm[0]}")
            try:
                await self.rounds(n, fig)
            finally:
                await end_workers(self.kept)
                self.kept = []
        return out

    async def rounds(self, n: int, fig: Figures) -> None:
        """``--repeat`` runs of both paths with ``n`` CNs, into ``fig``."""
        for i in range(self.repeat):
            names = {os.getpid(): "bench", self.snapperd_pid: "snapperd", self.sshd_pid: "sshd",
                     **({self.gate_pid: "gate sshd"} if self.gate else {}),
                     **{w.pid: "CN" for w in self.kept}}
            for name, method in (("a", self.openssh), ("b", self.snapper)):
                before = cpu_by_process(names)
                r = await method(n, i)
                split = cpu_split(before, cpu_by_process(names))
                # The CNs: the bench's children (their pipelines, or the workers,
                # whose imports before the start are not the push's), or the
                # agents kept running with what they reaped.
                cn = split.pop("bench's children", 0.0) + split.pop("CN", 0.0) + \
                    split.pop("CN's children", 0.0)
                if r.cn_cpu is not None and not self.kept:
                    split["CN start-up"], cn = cn - r.cn_cpu, r.cn_cpu
                split["CN"] = cn
                for proc_name, cpu_s in split.items():
                    fig.split[name][proc_name] = fig.split[name].get(proc_name, 0.0) + cpu_s
                fig.rounds[name].append(r)
                rate = n * self.bytes / r.seconds / 1e6
                print(f"  N={n:<3} run {i + 1}: {LABELS[name]:<40} {rate:8.1f} MB/s"
                      f"{f'  {len(r.failures)} FAILED' if r.failures else ''}",
                      file=sys.stderr, flush=True)
                for f in r.failures[:3]:
                    print(f"      {f}", file=sys.stderr)


async def end_workers(workers: list[proc.Spawned]) -> None:
    """End each worker and what it started (its zfs send and ssh, if still running)."""
    for w in workers:
        w.kill_group()
        await w.wait()


def _round(took: float, got: list[float | BaseException], cpu: float) -> Round:
    pushes = [g for g in got if isinstance(g, float)]
    failures = [f"{type(g).__name__}: {g}" for g in got if isinstance(g, BaseException)]
    return Round(took, pushes, failures, cpu)


def report(bench: ScaleBench, figures: dict[int, Figures], flavour: str) -> None:
    gb = bench.bytes / 1e9
    print("\n" + header(bench.bytes, flavour, bench.repeat, "stream per CN"))
    print(f"  {'N':>3} {'path':<40} {'MB/s':>8} {'p50 s':>7} {'p99 s':>7} "
          f"{'CPU s/GB':>9} {'RSS/stream':>11} {'fail':>5}")
    for n, fig in figures.items():
        rates = {}
        for k, rounds in fig.rounds.items():
            rates[k] = statistics.median(n * bench.bytes / r.seconds / 1e6 for r in rounds)
            pushes = [p for r in rounds for p in r.pushes]
            p50 = f"{percentile(pushes, 0.5):7.2f}" if pushes else "      -"
            p99 = f"{percentile(pushes, 0.99):7.2f}" if pushes else "      -"
            cpu = statistics.median(r.cpu for r in rounds) / (n * gb)
            rss = (f"{statistics.median(r.rss_growth for r in rounds) / n / (1 << 20):7.2f} MiB"
                   if k == "b" else f"{'-':>11}")
            fails = sum(len(r.failures) for r in rounds)
            print(f"  {n:>3} {LABELS[k]:<40} {rates[k]:8.1f} {p50} {p99} {cpu:9.2f} {rss} "
                  f"{fails:>5}")
        ratio = statistics.median(a.seconds / b.seconds
                                  for a, b in zip(fig.rounds["a"], fig.rounds["b"], strict=True))
        print(f"  {n:>3} snapper / OpenSSH (aggregate MB/s, same run): {ratio:.2f}x")
    # Where a push's CPU goes on this one machine: the CN's side (the shell
    # pipeline, or the worker from its start, each with its zfs and ssh), the
    # zone's (the daemon and what it reaped), and ZFS's own daemon where it has
    # one (zfs-fuse), which every zfs command of either side costs.
    print("  CPU-s per push by process, all runs (children that came and went under "
          "their parent; CN: the CN's side from the start, zfs and ssh included; "
          "CN start-up: the workers' imports, before it):")
    for n, fig in figures.items():
        count = n * bench.repeat
        for k, split in fig.split.items():
            shown = sorted(((v / count, name) for name, v in split.items()
                            if v / count >= 0.0005 and name != "CN start-up"), reverse=True)
            total = sum(v for name, v in split.items() if name != "CN start-up") / count
            print(f"  {n:>3} {LABELS[k]:<40} {total:6.3f}: " +
                  ", ".join(f"{name} {v:.3f}" for v, name in shown[:7]))


async def amain(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="snapper-bench-"))
    bench = ScaleBench(workdir, args.size_mib, args.repeat, args.cns)
    try:
        print(f"preparing {max(args.cns)} CNs of {args.size_mib} MiB in {workdir} ...",
              file=sys.stderr)
        bench.ssh_client = args.ssh_client
        bench.gate = args.gate
        bench.agent = args.agent
        if args.agent:
            LABELS["b"] = LABELS["b"].replace("snapper push", "snapper agent")
        if args.gate:
            LABELS["b"] = "snapper push -> sshd gate -> snapperd"
        bench.round_timeout = args.timeout
        await bench.setup()
        caps = await bench.zfs.capabilities()
        figures = await bench.run()
    finally:
        await bench.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    report(bench, figures, caps.flavour)
    return 0



def worker(argv: list[str]) -> int:
    """One CN: import snapper, say so, wait for the start, run ``snapper ARGV``."""
    from snapper_zone import cli

    out = sys.stdout.buffer
    out.write(READY)
    out.flush()
    if sys.stdin.buffer.readline() != GO:
        return 2
    start, cpu = time.monotonic(), cpu_with_children()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # our stdout is the result line
            rc = cli.main(argv)
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    out.write(json.dumps({"rc": rc, "seconds": time.monotonic() - start,
                          "cpu": cpu_with_children() - cpu}).encode() + b"\n")
    out.flush()
    return rc


def agent_worker(argv: list[str]) -> int:
    """One CN as ``snapper agent`` pushes: ``snapper ARGV``'s push on links kept
    from push to push (``cn/links.py``), one push per start, until stdin ends."""
    from snapper_zone.cn.cli import build_parser, push_with_failover, settings
    from snapper_zone.cn.links import ZoneLinks
    from snapper_zone.common.progress import NoProgress

    args = build_parser().parse_args(argv)
    s = settings(args)
    out = sys.stdout.buffer

    async def pushes() -> None:
        links = ZoneLinks()
        out.write(READY)
        out.flush()
        try:
            while await asyncio.to_thread(sys.stdin.buffer.readline) == GO:
                start, cpu = time.monotonic(), cpu_with_children()
                error = None
                try:
                    await push_with_failover(s, args.vm, name=args.name, base=None,
                                             metadata=None, durability=None, bwlimit=None,
                                             reporter=NoProgress(), links=links)
                except Exception as exc:  # reported as this push's failure; the next goes on
                    error = f"{type(exc).__name__}: {exc}"
                out.write(json.dumps({"rc": 0 if error is None else 1, "error": error,
                                      "seconds": time.monotonic() - start,
                                      "cpu": cpu_with_children() - cpu}).encode() + b"\n")
                out.flush()
        finally:
            await links.close()

    asyncio.run(pushes())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(argv[1:])
    if argv[:1] == ["--agent-worker"]:
        return agent_worker(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--size-mib", type=int, default=2,
                   help="data per CN (MiB; default 2: on zfs-fuse, 8 or more concurrent "
                   "streams much larger than the pipes and SSH windows hang the daemon)")
    p.add_argument("--repeat", type=int, default=3, help="runs per N and path; median reported")
    p.add_argument("--cns", default="1,4,16,32",
                   help="how many CNs push at once, comma-separated (default 1,4,16,32)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a run of N pushes may take; pushes still running then are "
                   "killed and count as failures (default 300)")
    p.add_argument("--agent", action="store_true",
                   help="each CN pushes as snapper agent does: one process per CN for "
                   "all of an N's runs, its links to the zone kept from push to push "
                   "(logged in by an untimed first push), no interpreter start")
    p.add_argument("--gate", action="store_true",
                   help="snapper's path through snapperd's sshd gate instead of its own "
                   "SSH server")
    add_ssh_client_option(p)
    args = p.parse_args(argv)
    try:
        args.cns = sorted({int(x) for x in args.cns.split(",")})
    except ValueError:
        p.error("--cns takes integers separated by commas")
    if args.size_mib < 1 or args.repeat < 1 or min(args.cns) < 1:
        p.error("--size-mib, --repeat and every N must be positive")
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
