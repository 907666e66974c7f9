#!/usr/bin/env python3
"""A move's or a repair's copy: one zone's ``zfs send`` into another zone, by
carrier, beside a local ``zfs send | zfs receive`` of the same snapshot.

A zone copies a VM to a peer (a move's copy step, a repair after a loss, a
catch-up) with ``Executor._push``: ``ZoneClient.push_stream`` over its link to
the peer, the peer's one vetted receive path at the other end. Here the bench
process is that sending zone: the peer's ``snapperd`` trusts its key as a
peer zone's, and the bench pushes with the same client the zone uses, over
the zone's carrier and over the other one ``ZoneClient`` has:

  asyncssh  the peer link itself (asyncssh in Python): what zones use
  openssh   OpenSSH's ``ssh`` with the zone's key, on the link's logged-in
            masters as a zone's link keeps them (``keep_logins``): every copy
            after a link's first
  cold      the same on a new link: the copy's ``ssh`` logs in first
  local     ``zfs send | zfs receive`` between the same two pools, no SSH
  ssh-only  ``zfs send | ssh host 'cat > /dev/null'`` into a private sshd: the
            same stream through OpenSSH with nothing received
  send-only ``zfs send > /dev/null``
  ssh-pipe  ``zfs send | ssh host 'zfs receive'``: what people script by hand
  mbuffer   the same with ``mbuffer -m 64M`` before ``zfs receive`` (when
            installed): a deep buffer on the receiving side

and the whole machine's CPU per GB for each (``/proc/stat``, zfs-fuse's daemon
included). A copy over SSH does the local pipe's work plus SSH's (ssh-only's
less send-only's); on a machine whose every CPU it keeps busy, it can go no
faster than its CPUs over that sum, which the bench prints as the ceiling.

With each carrier, the sending side's CPU per GB (this process, its ``ssh``
and its ``zfs send``, from ``getrusage``; a kept link's masters are not yet
reaped, so there it is this process and ``zfs send``), and each process's
for every path (``common.cpu_split``). Measured here (1 GiB, zfs-fuse, 2
CPUs, median of 5, docs/data-plane.md): the copy through the gate on a kept
link 0.77x the local pipe, 1.18x OpenSSH's own, 0.94x that with mbuffer; a
deep buffer before ``zfs receive`` is what lifts an SSH pipe (its stalls
while a transaction group syncs hold the sender up across ssh's small
buffers).

After one untimed round (cold caches), each run lands in a fresh VM (or
dataset), destroyed after it so every run writes into the same free space,
interleaved so drift hits all alike; ``--repeat`` runs, medians printed with
each run's rate, and the ratios to the local pipe from the same run (the
issue's target: >= 0.8).

With ``--gate`` the receiving snapperd has a ``[gate]`` and the ``openssh``
carrier goes through it (the peer's sshd decrypts, its pipe spliced into
``zfs receive``), as a zone's copies would with ``ssh`` on its links.

    python bench/zone_copy.py [--size-mib 256] [--repeat 3] [--gate]
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
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    SNAP,
    Bench,
    cpu_by_process,
    cpu_split,
    cpu_with_children,
    header,
    keygen,
    machine_cpu,
    rate_rows,
    run_line,
    ssh_argv,
    timed,
)

from snapper_zone.common.config import Limits  # noqa: E402
from snapper_zone.transfer.remote import ZoneClient  # noqa: E402
from snapper_zone.wire.protocol import Receive  # noqa: E402
from snapper_zone.zfs.zfs import SendSpec  # noqa: E402

PEER_UUID = "0b7e5a3c-2d1f-4e6a-9b8c-7d6e5f4a3b2c"



class ZoneCopyBench(Bench):
    def __init__(self, workdir: Path, size_mib: int, repeat: int) -> None:
        super().__init__(workdir, size_mib, repeat)
        self.dst_copies = 2  # each copy is destroyed after its run
        self.vms = [str(uuid.uuid4()) for _ in range(4 * (repeat + 1))]  # 4 copy paths
        self.cpu: dict[str, list[float]] = {}
        self.machine: dict[str, list[float]] = {}  # the whole machine's, per run
        self.ring = True  # the receiving zone has its default copy buffer
        self.links: dict[bool, ZoneClient] = {}  # kept as PeerLinks keeps a zone's

    def busy(self, path: str, since: float) -> None:
        self.machine.setdefault(path, []).append(machine_cpu() - since)

    async def setup(self) -> None:
        await super().setup()
        self.bytes = await self.send_bytes(SendSpec(self.data.snapshot(SNAP)))
        self.peer_key = keygen(self.workdir / "peer_ed25519")
        # The sending zone as the receiving zone's config names it: its peer key,
        # and a peer entry, so that both zones are every VM's static pair. Its
        # endpoint listens nowhere: the receiving zone's own catch-up toward it
        # fails quietly, on a slow timer.
        # The VMs' owner, a CN that never connects: every VM the config maps
        # needs one.
        cn_key = keygen(self.workdir / "cn_ed25519")
        self.snapperd_config = {
            "keys": [{"role": "peer", "zone": PEER_UUID,
                      "public_key": self.peer_key.with_suffix(".pub").read_text().strip()},
                     {"role": "cn", "cn_id": "bench-cn",
                      "public_key": cn_key.with_suffix(".pub").read_text().strip()}],
            "peers": [{"uuid": PEER_UUID, "ssh_host": "127.0.0.1", "ssh_port": 9,
                       "http_url": "http://127.0.0.1:9"}],
            "vms": {vm: "bench-cn" for vm in self.vms},
            "reconcile_interval_ms": 3_600_000,
        }
        await self.start_snapperd([])
        await self.start_sshd([self.peer_key])
        self.ssh = shutil.which("ssh")

    async def copy(self, openssh: bool, path: str) -> float:
        """Seconds for one copy; the sending side's CPU (this process, its ssh and
        zfs send) is added to ``self.cpu[path]``."""
        ring = path != "no-ring"
        if self.gate and ring != self.ring:  # the receiving zone's copy buffer, or none
            await self.reconfigure(**{"limits.copy_buffer_bytes":
                                      Limits().copy_buffer_bytes if ring else 0})
            self.ring = ring
        vm = self.vms.pop()
        cold = path == "cold"
        client = None if cold else self.links.get(openssh)
        if client is None:
            # Through the gate (--gate), its sshd runs the copy as root on this box.
            client = ZoneClient("127.0.0.1", self.zone_port, self.peer_key,
                                known_hosts=self.zone_known,
                                openssh=self.ssh if openssh else None,
                                username="root" if self.gate else "snapper",
                                keep_logins=0 if cold else 4)
            await client.connect()
            if not cold:
                self.links[openssh] = client
        cpu = cpu_with_children()
        try:
            start, busy = time.monotonic(), machine_cpu()
            await client.push_stream(Receive(vm, "disk0", SNAP, None, None),
                                     SendSpec(self.data.snapshot(SNAP)), self.zfs)
            await client.commit(vm, SNAP, ["disk0"], None)
            took = time.monotonic() - start
            self.busy(path, busy)
        finally:
            if cold:
                await client.close()
        self.cpu.setdefault(path, []).append(cpu_with_children() - cpu)
        # Each run into the same free space, not a pool filling up run by run.
        await self.zfs.destroy(self.zone_root.child(vm), recursive=True)
        return took

    async def ssh_only(self) -> float:
        send = " ".join(await self.zfs.send_argv(SendSpec(self.data.snapshot(SNAP))))
        ssh = " ".join(ssh_argv(self.peer_key, self.sshd_known, self.sshd_port, "root",
                                "'cat > /dev/null'"))
        busy = machine_cpu()
        took = await timed(["sh", "-c", f"{send} | {ssh}"])  # the bench's own strings
        self.busy("ssh-only", busy)
        return took

    async def ssh_pipe(self, i: int, buffered: bool) -> float:
        target = self.dst.child(f"ssh{i}")
        send = " ".join(await self.zfs.send_argv(SendSpec(self.data.snapshot(SNAP))))
        receive = " ".join(await self.zfs.receive_argv(target, resumable=False))
        if buffered:
            receive = f"mbuffer -q -m 64M | {receive}"
        ssh = " ".join(ssh_argv(self.peer_key, self.sshd_known, self.sshd_port, "root",
                                f"'{receive}'"))
        busy = machine_cpu()
        took = await timed(["sh", "-c", f"{send} | {ssh}"])  # the bench's own strings
        self.busy("mbuffer" if buffered else "ssh-pipe", busy)
        await self.zfs.destroy(target, recursive=True)
        return took

    async def send_only(self) -> float:
        send = " ".join(await self.zfs.send_argv(SendSpec(self.data.snapshot(SNAP))))
        busy = machine_cpu()
        took = await timed(["sh", "-c", f"{send} > /dev/null"])  # the bench's own strings
        self.busy("send-only", busy)
        return took

    async def local(self, i: int) -> float:
        start, busy = time.monotonic(), machine_cpu()
        target = self.dst.child(f"pipe{i}")
        await self.zfs.pipe(SendSpec(self.data.snapshot(SNAP)), target, resumable=False)
        took = time.monotonic() - start
        self.busy("local", busy)
        await self.zfs.destroy(target, recursive=True)
        return took


async def main(size_mib: int, repeat: int, gate: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="snapper-bench-") as tmp:
        b = ZoneCopyBench(Path(tmp), size_mib, repeat)
        b.gate = gate
        b.snapperd_log_level = "info"  # reconfigure waits for "config reloaded"
        try:
            await b.setup()
            if b.ssh is None:
                raise SystemExit("no ssh command on PATH: apt-get install -y openssh-client")
            flavour = (await b.zfs.capabilities()).flavour
            times: dict[str, list[float]] = {"asyncssh": [], "openssh": [], "cold": [],
                                             "local": [], "ssh-only": [], "send-only": [],
                                             "ssh-pipe": []}
            if shutil.which("mbuffer"):
                times["mbuffer"] = []
            if gate:
                times["no-ring"] = []

            async def run(k: str, i: int) -> float:
                if k == "local":
                    return await b.local(i)
                if k == "ssh-only":
                    return await b.ssh_only()
                if k == "send-only":
                    return await b.send_only()
                if k in ("ssh-pipe", "mbuffer"):
                    return await b.ssh_pipe(i, k == "mbuffer")
                return await b.copy(k != "asyncssh", k)

            # One untimed round first: the first stream after the data was
            # written runs slower whichever path it takes (cold caches).
            for k in times:
                await run(k, -1)
            b.cpu.clear()
            b.machine.clear()
            names = {os.getpid(): "bench", b.snapperd_pid: "snapperd"}
            split: dict[str, dict[str, float]] = {k: {} for k in times}
            for i in range(repeat):
                order = list(times)[i % len(times):] + list(times)[: i % len(times)]
                for k in order:
                    before = cpu_by_process(names)
                    secs = await run(k, i)
                    for name, cpu_s in cpu_split(before, cpu_by_process(names)).items():
                        split[k][name] = split[k].get(name, 0.0) + cpu_s
                    times[k].append(secs)
                    run_line(i, k, b.bytes, secs)
            med = {k: statistics.median(v) for k, v in times.items()}
            print(header(b.bytes, flavour, repeat, "zone -> zone copy"))
            gb = b.bytes / 1e9
            machine = {k: statistics.median(v) / gb for k, v in b.machine.items()}
            cpu = {k: f"machine {machine[k]:5.2f}" + (
                   f", sender {statistics.median(b.cpu[k]) / gb:5.2f}" if k in b.cpu else "")
                   + " CPU-s/GB" for k in times}
            print("\n".join(rate_rows(b.bytes, times, {
                "openssh": "zone -> ssh -> peer's sshd gate" if gate
                else "zone -> ssh -> peer's vetted receive",
                "no-ring": "the same, copy_buffer_bytes = 0 (no ring)",
                "cold": "the same on a new link: its ssh logs in first",
                "asyncssh": "zone -> asyncssh -> peer's vetted receive",
                "local": "zfs send | zfs receive (local)",
                "ssh-only": "zfs send | ssh 'cat > /dev/null'",
                "send-only": "zfs send > /dev/null",
                "ssh-pipe": "zfs send | ssh 'zfs receive'",
                "mbuffer": "zfs send | ssh 'mbuffer -m 64M | zfs receive'"}, cpu)))
            for k in ("asyncssh", "openssh", "cold"):
                print(f"  ratio {k} / local pipe (rate): {med['local'] / med[k]:.2f}"
                      + ("  (target >= 0.8)" if k == "asyncssh" or gate else "")
                      + f"; / ssh alone: {med['ssh-only'] / med[k]:.2f}")
            print(f"  ssh alone / local pipe (rate): {med['local'] / med['ssh-only']:.2f}")
            # A copy over SSH does the local pipe's work and SSH's: with every CPU
            # busy, this machine carries at most its CPUs over their sum.
            cpus = os.cpu_count() or 1
            ssh_cost = machine["ssh-only"] - machine["send-only"]
            ceiling = min(cpus / (machine["local"] + ssh_cost) * 1e3,
                          b.bytes / med["local"] / 1e6)  # MB/s
            print(f"  a copy over SSH, CPU per GB: the local pipe's {machine['local']:.2f} + "
                  f"SSH's {ssh_cost:.2f}; {cpus} CPUs carry at most {ceiling:.0f} MB/s of it, "
                  f"{ceiling / (b.bytes / med['local'] / 1e6):.2f}x the local pipe")
            for k in ("asyncssh", "openssh"):
                print(f"  {k} / that ceiling: {b.bytes / med[k] / 1e6 / ceiling:.2f}; "
                      f"/ OpenSSH's pipe: {med['ssh-pipe'] / med[k]:.2f}")
            # Per process (the kernel's accounting, each run's copy and its clean-up).
            print("  CPU-s/GB by process, all runs (children that came and went under "
                  "their parent):")
            for k in ("openssh", "cold", "no-ring", "mbuffer", "ssh-pipe", "local"):
                if k in split:
                    top = sorted(split[k].items(), key=lambda kv: -kv[1])
                    print(f"    {k}: " + ", ".join(f"{n} {v / gb / repeat:.2f}"
                                                  for n, v in top if v / gb / repeat >= 0.03))
            if "no-ring" in med:
                print(f"  the gate with its copy buffer / without: "
                      f"{med['no-ring'] / med['openssh']:.2f}")
            if "mbuffer" in med:
                print(f"  OpenSSH's pipe with mbuffer / without: "
                      f"{med['ssh-pipe'] / med['mbuffer']:.2f}; / the local pipe: "
                      f"{med['local'] / med['mbuffer']:.2f}")
        finally:
            for link in b.links.values():
                await link.close()
            await b.cleanup()
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--gate", action="store_true",
                    help="the receiving snapperd has a [gate]; the ssh carrier goes through it")
    a = ap.parse_args()
    raise SystemExit(asyncio.run(main(a.size_mib, a.repeat, a.gate)))
