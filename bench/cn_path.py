#!/usr/bin/env python3
"""The CN's whole path: a live ``zfs send`` to a zone, three ways, with the
receiving side's CPU per GB.

One dataset holding ``--size-mib`` of random data (incompressible) with one
snapshot on a CN pool; then, ``--repeat`` times each, interleaved so drift
hits all alike:

  a. ``zfs send | ssh -c aes128-gcm@openssh.com root@zone zfs receive``
     into a private sshd on 127.0.0.1 (what people script by hand)
  b. ``snapper push VM --name SNAP``: the real CLI, live ``zfs send``, into
     a ``snapperd`` process; its stream through OpenSSH's ``ssh`` where
     installed (``--ssh-client asyncssh``: snapper's own client)
  c. ``syncoid`` (Debian's sanoid package, if installed) over the same sshd
  d. with ``--gate``: ``snapper push`` with its stream through snapperd's
     sshd gate (a second private sshd, ``snapper-gate``; docs/data-plane.md),
     the receiving side's CPU being that sshd's and snapperd's together
  e. the agent's push: the same CLI arguments, settings and push, run in the
     bench's own (already running) process: no interpreter start or imports;
     through the gate with ``--gate``, else snapperd's own port; on a new
     connection (and ``ssh`` login) each time
  f. the same on kept links, as ``snapper agent`` pushes (``cn/links.py``):
     the connection to snapperd and the gate's logged-in ``ssh`` master
     stay from the push before, so no login is made
  g. ``snapper push`` (the real CLI, as b or d) on a CN where ``snapper
     agent`` runs: the CLI hands the push to the agent's control socket
     (``cn/control.py``; the agent is this process, its links those of f)

``--no-splice``: snapper (CN and zone) copies every stream through Python, as
on illumos, instead of moving it with splice(2).

``--incremental-mib N``: the stream timed is an incremental one, N MiB of new
data on top of the ``--size-mib`` snapshot, as a CN's scheduled push mostly
is. Before each timed run the destination gets the base, untimed (a local
``zfs send | zfs receive``, or a ``snapper push`` of the base), so every path
sends the same incremental stream; what each pays around it (logins, listing
snapshots, planning) is in its time.

After one untimed round (cold caches), each run lands in a fresh dataset,
destroyed afterwards; the time is from starting the command to its exit (the
remote receive is done by then). CPU is the receiving side's, from the
kernel's accounting (``/proc/PID/stat``: user + system of the daemon and of
its reaped children): sshd's listener (every connection's sshd and its ``zfs
receive`` are reaped into it) and snapperd (its ``zfs receive`` children);
for snapperd and its gate, the whole process tree's, live children included
(path f's kept connection has an sshd that stays).
MB/s is 10^6 bytes/s; the ratios are from the same run.

    python bench/cn_path.py [--size-mib 512] [--repeat 3] [--gate] [--incremental-mib N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
NEXT = "bench-next"  # --incremental-mib: the snapshot after SNAP, the one timed
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    CIPHER,
    CN_ID,
    REPO,
    SNAP,
    VM,
    Bench,
    CnKey,
    add_ssh_client_option,
    cpu_here,
    cpu_seconds,
    cpu_self_seconds,
    cpu_since,
    cpu_tree_seconds,
    fill,
    header,
    run_line,
    ssh_argv,
    timed,
)

from snapper_zone.cn.cli import (  # noqa: E402
    CnPusher,
    build_parser,
    failure,
    push_with_failover,
    settings,
)
from snapper_zone.cn.control import ControlServer  # noqa: E402
from snapper_zone.cn.handoff import socket_path  # noqa: E402
from snapper_zone.cn.links import ZoneLinks  # noqa: E402
from snapper_zone.common.progress import NoProgress  # noqa: E402
from snapper_zone.zfs.names import Dataset  # noqa: E402
from snapper_zone.zfs.zfs import SendSpec  # noqa: E402


class CnPathBench(Bench):
    copies = 2  # the stream's dataset and the VM received from it
    incremental = 0  # bytes of new data in the timed (incremental) stream; 0: full
    links = ZoneLinks()  # path f's and g's, kept from run to run
    control: ControlServer | None = None  # path g's agent end

    async def setup(self) -> None:
        if self.incremental:
            self.copies = 3  # and the new data, at most the same again
        await super().setup()
        # The CN's VM: the stream's source dataset under the name snapper pushes.
        self.vm = self.src.child(VM)
        await self.zfs.pipe(SendSpec(self.data.snapshot(SNAP)), self.vm)
        self.name = SNAP
        self.spec = SendSpec(self.vm.snapshot(SNAP))
        if self.incremental:
            mounted = self.pools[0].mountpoint
            assert mounted is not None
            await asyncio.to_thread(fill, mounted / VM / "next", self.incremental)
            await self.zfs.snapshot([self.vm.snapshot(NEXT)])
            self.name = NEXT
            self.spec = SendSpec(self.vm.snapshot(NEXT), base=self.vm.snapshot(SNAP))
        self.bytes = await self.send_bytes(self.spec)
        await self.start_sshd([self.client_key])
        await self.start_snapperd([CnKey(CN_ID, self.client_key, (VM,))])
        # Path g's CN: snapper agent's control socket in its state_dir.
        state = self.workdir / "agent-state"
        state.mkdir(mode=0o700)
        self.agent_config = self.workdir / "cn-agent.toml"
        self.agent_config.write_text(f'state_dir = "{state}"\n'
                                     + ('ssh_user = "root"\n' if self.gate else ""))
        args = build_parser().parse_args(self.push_argv(
            self.client_key, VM, str(self.src), config=self.agent_config))
        pusher = CnPusher(settings(args), links=self.links)
        self.control = ControlServer(socket_path(state), pusher.push_for_cli,
                                     lambda exc: failure("push", exc))
        await self.control.start()
        self.syncoid = shutil.which("syncoid")
        self.no_syncoid = "" if self.syncoid else "syncoid not installed: apt-get install sanoid"
        if self.syncoid and self.incremental and \
                (await self.zfs.capabilities()).flavour == "zfs-fuse":
            # It lists the target's snapshots with `zfs get -t snapshot`, which
            # zfs-fuse lacks, and its fallback puts the ssh command in twice.
            self.syncoid = None
            self.no_syncoid = ("syncoid cannot send an incremental into zfs-fuse: it "
                               "lists the target with `zfs get -t`, which zfs-fuse lacks")

    async def openssh(self, i: int) -> float:
        target = self.dst.child(f"b{i}")
        await self.seed(target)
        remote = " ".join(await self.zfs.receive_argv(target, resumable=False))
        send = " ".join(await self.zfs.send_argv(self.spec))
        ssh = " ".join(ssh_argv(self.client_key, self.sshd_known, self.sshd_port, "root",
                                f"'{remote}'"))
        before = cpu_seconds(self.sshd_pid)
        # A shell pipeline, as people write it: the bench's own fixed strings only.
        took = await timed(["sh", "-c", f"{send} | {ssh}"])
        self.cpu.setdefault("a", []).append(await cpu_since(self.sshd_pid, before))
        await self.zfs.destroy(target, recursive=True)
        return took

    async def seed(self, target: Dataset) -> None:
        """With ``--incremental-mib``: ``target`` gets the base first (untimed)."""
        if self.incremental:
            await self.zfs.pipe(SendSpec(self.vm.snapshot(SNAP)), target)

    async def seed_zone(self, via_gate: bool) -> None:
        """With ``--incremental-mib``: snapperd gets the base first (untimed), by
        the agent's push on the same path."""
        if self.incremental:
            await self.agent_push(SNAP, via_gate)

    async def agent_push(self, name: str, via_gate: bool,
                         links: ZoneLinks | None = None) -> None:
        args = build_parser().parse_args(
            self.push_argv(self.client_key, VM, str(self.src), via_gate=via_gate, name=name))
        await push_with_failover(settings(args), VM, name=name, base=None, metadata=None,
                                 durability=None, bwlimit=None, reporter=NoProgress(),
                                 links=links)

    async def snapper_push(self, i: int, via_gate: bool = False) -> float:
        await self.seed_zone(via_gate)
        cli = [sys.executable, "-m", "snapper_zone.cli",
               *self.push_argv(self.client_key, VM, str(self.src), via_gate, self.name)]
        zone = [self.snapperd_pid, *([self.gate_pid] if via_gate else [])]
        before = [cpu_tree_seconds(pid) for pid in zone]
        alone = cpu_self_seconds(self.snapperd_pid)
        took = await timed(cli, env={**os.environ, "PYTHONPATH": str(REPO)})
        spent = [cpu_tree_seconds(pid) - b for pid, b in zip(zone, before, strict=True)]
        self.cpu.setdefault("d" if via_gate else "b", []).append(sum(spent))
        if via_gate:  # snapperd's own share: what one process must keep up with
            self.cpu.setdefault("d-snapperd", []).append(spent[0])
            self.cpu.setdefault("d-alone", []).append(
                cpu_self_seconds(self.snapperd_pid) - alone)
        await self.zfs.destroy(self.zone_root.child(VM), recursive=True)
        return took

    async def gate_push(self, i: int) -> float:
        return await self.snapper_push(i, via_gate=True)

    async def running_push(self, i: int, links: ZoneLinks | None = None) -> float:
        """The CLI's own push (its argv, settings and ``push_with_failover``) run in
        this process, with no interpreter start or imports (through the gate
        with ``--gate``); with ``links``, on the agent's kept links."""
        key = "f" if links else "e"
        await self.seed_zone(self.gate)
        zone = [self.snapperd_pid, *([self.gate_pid] if self.gate else [])]
        before = [cpu_tree_seconds(pid) for pid in zone]
        mine = cpu_here()
        t0 = time.perf_counter()
        await self.agent_push(self.name, self.gate, links)
        took = time.perf_counter() - t0
        self.cpu.setdefault(f"{key}-cn", []).append(cpu_here() - mine)
        spent = [cpu_tree_seconds(pid) - b for pid, b in zip(zone, before, strict=True)]
        self.cpu.setdefault(key, []).append(sum(spent))
        await self.zfs.destroy(self.zone_root.child(VM), recursive=True)
        return took

    async def kept_push(self, i: int) -> float:
        return await self.running_push(i, self.links)

    async def cli_to_agent(self, i: int) -> float:
        """``snapper push`` with an agent running: the CLI hands the push over."""
        await self.seed_zone(self.gate)
        control = self.control
        assert control is not None
        served = control.served
        cli = [sys.executable, "-m", "snapper_zone.cli",
               *self.push_argv(self.client_key, VM, str(self.src), name=self.name,
                               config=self.agent_config)]
        zone = [self.snapperd_pid, *([self.gate_pid] if self.gate else [])]
        before = [cpu_tree_seconds(pid) for pid in zone]
        took = await timed(cli, env={**os.environ, "PYTHONPATH": str(REPO)})
        self.cpu.setdefault("g", []).append(
            sum(cpu_tree_seconds(pid) - b for pid, b in zip(zone, before, strict=True)))
        assert control.served == served + 1, "the CLI pushed by itself"
        await self.zfs.destroy(self.zone_root.child(VM), recursive=True)
        return took

    async def syncoid_push(self, i: int) -> float:
        assert self.syncoid is not None
        target = self.dst.child(f"c{i}")
        await self.seed(target)  # syncoid then sends from the newest snapshot both have
        argv = [self.syncoid, "--no-sync-snap", "--no-privilege-elevation", "--quiet",
                f"--sshcipher={CIPHER}", f"--sshport={self.sshd_port}",
                f"--sshkey={self.client_key}",
                f"--sshoption=UserKnownHostsFile={self.sshd_known}",
                "--sshoption=GlobalKnownHostsFile=/dev/null",
                str(self.vm), f"root@127.0.0.1:{target}"]
        before = cpu_seconds(self.sshd_pid)
        took = await timed(argv)
        self.cpu.setdefault("c", []).append(await cpu_since(self.sshd_pid, before))
        await self.zfs.destroy(target, recursive=True)
        return took

    async def run(self) -> dict[str, list[float]]:
        self.cpu: dict[str, list[float]] = {}
        methods: dict[str, Callable[[int], Awaitable[float]]] = {
            "a": self.openssh, "b": self.snapper_push}
        if self.syncoid:
            methods["c"] = self.syncoid_push
        if self.gate:
            methods["d"] = self.gate_push
        methods["e"] = self.running_push
        methods["f"] = self.kept_push
        methods["g"] = self.cli_to_agent
        times: dict[str, list[float]] = {k: [] for k in methods}
        # One untimed round first: the first stream after the data was written
        # ran ~2x slower whichever method it was (ZFS's caches are cold), and
        # the median of 3 should not depend on which one that is.
        for method in methods.values():
            await method(-1)
        self.cpu.clear()
        for i in range(self.repeat):
            for name, method in methods.items():
                t = await method(i)
                times[name].append(t)
                run_line(i, LABELS[name], self.bytes, t)
        return times


LABELS = {"a": "zfs send | ssh -> sshd -> zfs receive",
          "b": "snapper push -> snapperd -> zfs receive",
          "c": "syncoid -> sshd -> zfs receive",
          "d": "snapper push -> sshd gate -> snapperd",
          "e": "the agent's push (running process) ->",
          "f": "the agent's push, kept link ->",
          "g": "snapper push, agent running ->"}


async def amain(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="snapper-bench-"))
    bench = CnPathBench(workdir, args.size_mib, args.repeat)
    bench.incremental = args.incremental_mib << 20
    try:
        print(f"preparing {args.size_mib} MiB of data in {workdir} ...", file=sys.stderr)
        bench.ssh_client = args.ssh_client
        bench.gate = args.gate
        await bench.setup()
        caps = await bench.zfs.capabilities()
        times = await bench.run()
    finally:
        if bench.control is not None:
            await bench.control.close()
        await bench.links.close()
        await bench.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    gb = bench.bytes / 1e9
    via = "d" if bench.gate else "b"  # the CLI push on the agent's path
    rates = {k: bench.bytes / statistics.median(v) / 1e6 for k, v in times.items()}
    cpu = {k: statistics.median(v) / gb for k, v in bench.cpu.items()}
    print("\n" + header(bench.bytes, caps.flavour, args.repeat)
          + ("; streams copied through Python (--no-splice)" if args.no_splice else "")
          + (f"; incremental: {args.incremental_mib} MiB new on a {args.size_mib} MiB "
             "base" if args.incremental_mib else ""))
    print(f"  {'path':<44} {'MB/s':>8} {'recv CPU s/GB':>14}")
    for k, rate in rates.items():
        label = LABELS[k] + (" gate" if k in "efg" and bench.gate else
                             " snapperd" if k in "efg" else "")
        print(f"  {label:<44} {rate:8.1f} {cpu[k]:14.2f}")
        if k == "d":
            print(f"  {'  of which snapperd (one process)':<44} {'':8} {cpu['d-snapperd']:14.2f}")
            print(f"  {'    its Python alone (no zfs receive)':<44} {'':8} {cpu['d-alone']:14.2f}")
        if k in "ef":
            print(f"  {'  the CN: snapper in its process, CPU s/GB':<44} {'':8} "
                  f"{cpu[k + '-cn']:14.2f}")
    if "c" not in rates:
        print(f"  ({bench.no_syncoid})")
    print(f"  snapper push / OpenSSH pipe: {rates['b'] / rates['a']:.2f}x MB/s "
          "(target >= 1.0)")
    if "c" in rates:
        print(f"  snapper push / syncoid: {rates['b'] / rates['c']:.2f}x MB/s (target >= 2)")
    print(f"  snapperd CPU per GB / sshd + zfs receive: {cpu['b'] / cpu['a']:.2f}x "
          "(target <= 1.2)")
    if "d" in rates:
        print(f"  through the gate: {rates['d'] / rates['a']:.2f}x the OpenSSH pipe's MB/s, "
              f"{rates['d'] / rates['b']:.2f}x snapperd's own port's; CPU per GB "
              f"{cpu['d'] / cpu['a']:.2f}x sshd + zfs receive's, snapperd's own "
              f"{cpu['d-snapperd'] / cpu['a']:.2f}x")
        # 10 GbE: 1.25 GB/s; what snapperd's one process would need of a core.
        print(f"  snapperd's own process at 10 GbE through the gate: "
              f"{cpu['d-alone'] * 1.25:.2f} of a core")
    print(f"  the agent's push (no interpreter start) / OpenSSH pipe: "
          f"{rates['e'] / rates['a']:.2f}x MB/s; / snapper push: {rates['e'] / rates[via]:.2f}x")
    print(f"  the agent's push on its kept links / OpenSSH pipe: "
          f"{rates['f'] / rates['a']:.2f}x MB/s; / a new link: {rates['f'] / rates['e']:.2f}x"
          + (f"; / syncoid: {rates['f'] / rates['c']:.2f}x" if "c" in rates else "")
          + f"; logins on the kept links: {bench.links.logins}")
    print(f"  snapper push with the agent running / OpenSSH pipe: "
          f"{rates['g'] / rates['a']:.2f}x MB/s (target >= 1.0)"
          + (f"; / syncoid: {rates['g'] / rates['c']:.2f}x (target >= 2)" if "c" in rates
             else "") + f"; / without an agent: {rates['g'] / rates[via]:.2f}x")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--size-mib", type=int, default=512, help="data in the dataset (MiB)")
    p.add_argument("--repeat", type=int, default=3, help="runs per method; median reported")
    p.add_argument("--gate", action="store_true",
                   help="also push through snapperd's sshd gate (path d)")
    p.add_argument("--no-splice", action="store_true",
                   help="copy every stream through Python as on illumos, which has no "
                        "splice(2) (SNAPPER_NO_SPLICE, for snapper and its snapperd)")
    p.add_argument("--incremental-mib", type=int, default=0,
                   help="time an incremental stream of this much new data on top of "
                        "--size-mib (a scheduled push), each path given the base first")
    add_ssh_client_option(p)
    args = p.parse_args(argv)
    if args.no_splice:
        os.environ["SNAPPER_NO_SPLICE"] = "1"  # the CLI, snapperd and this process
    if args.size_mib < 1 or args.repeat < 1 or args.incremental_mib < 0:
        p.error("--size-mib and --repeat must be positive, --incremental-mib not negative")
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
