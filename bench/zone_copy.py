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
  openssh   OpenSSH's ``ssh`` with the zone's key (the CN's carrier)
  local     ``zfs send | zfs receive`` between the same two pools, no SSH

With each carrier, the sending side's CPU per GB (this process, its ``ssh``
and its ``zfs send``, from ``getrusage``). Measured here (256 MiB, zfs-fuse,
2 CPUs): both carriers within 5% of each other in rate and in the sender's
CPU, both ~0.6x the local pipe: the receiving zone (and zfs-fuse) is the
limit, not the carrier, so zones keep their one link.

Each run lands in a fresh VM (or dataset), interleaved so drift hits all
alike; ``--repeat`` runs, medians printed with each run's rate, and the
ratios to the local pipe from the same run (the issue's target: >= 0.8).

With ``--gate`` the receiving snapperd has a ``[gate]`` and the ``openssh``
carrier goes through it (the peer's sshd decrypts, its pipe spliced into
``zfs receive``), as a zone's copies would with ``ssh`` on its links.

    python bench/zone_copy.py [--size-mib 256] [--repeat 3] [--gate]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import SNAP, Bench, header, keygen, rate_rows, run_line  # noqa: E402

from snapper_zone.transfer.remote import ZoneClient  # noqa: E402
from snapper_zone.wire.protocol import Receive  # noqa: E402
from snapper_zone.zfs.zfs import SendSpec  # noqa: E402

PEER_UUID = "0b7e5a3c-2d1f-4e6a-9b8c-7d6e5f4a3b2c"


def _cpu() -> float:
    """User + system seconds of this process and its reaped children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), \
        resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class ZoneCopyBench(Bench):
    def __init__(self, workdir: Path, size_mib: int, repeat: int) -> None:
        super().__init__(workdir, size_mib, repeat)
        self.dst_copies = 3 * repeat
        self.vms = [str(uuid.uuid4()) for _ in range(2 * repeat)]
        self.cpu: dict[str, list[float]] = {}

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
        self.ssh = shutil.which("ssh")

    async def copy(self, openssh: bool) -> float:
        """Seconds for one copy; the sending side's CPU (this process, its ssh and
        zfs send) is added to ``self.cpu``."""
        vm = self.vms.pop()
        cpu = _cpu()
        # Through the gate (--gate), its sshd runs the copy as root on this box.
        client = ZoneClient("127.0.0.1", self.zone_port, self.peer_key,
                            known_hosts=self.zone_known,
                            openssh=self.ssh if openssh else None,
                            username="root" if self.gate else "snapper")
        async with client:
            start = time.monotonic()
            await client.push_stream(Receive(vm, "disk0", SNAP, None, None),
                                     SendSpec(self.data.snapshot(SNAP)), self.zfs)
            await client.commit(vm, SNAP, ["disk0"], None)
            took = time.monotonic() - start
        self.cpu.setdefault("openssh" if openssh else "asyncssh", []).append(_cpu() - cpu)
        return took

    async def local(self, i: int) -> float:
        start = time.monotonic()
        await self.zfs.pipe(SendSpec(self.data.snapshot(SNAP)), self.dst.child(f"pipe{i}"),
                            resumable=False)
        return time.monotonic() - start


async def main(size_mib: int, repeat: int, gate: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="snapper-bench-") as tmp:
        b = ZoneCopyBench(Path(tmp), size_mib, repeat)
        b.gate = gate
        try:
            await b.setup()
            if b.ssh is None:
                raise SystemExit("no ssh command on PATH: apt-get install -y openssh-client")
            flavour = (await b.zfs.capabilities()).flavour
            times: dict[str, list[float]] = {"asyncssh": [], "openssh": [], "local": []}
            for i in range(repeat):
                order = list(times)[i % 3:] + list(times)[: i % 3]
                for k in order:
                    secs = await (b.local(i) if k == "local" else b.copy(k == "openssh"))
                    times[k].append(secs)
                    run_line(i, k, b.bytes, secs)
            med = {k: statistics.median(v) for k, v in times.items()}
            print(header(b.bytes, flavour, repeat, "zone -> zone copy"))
            gb = b.bytes / 1e9
            cpu = {k: f"sender {statistics.median(v) / gb:5.2f} CPU-s/GB"
                   for k, v in b.cpu.items()}
            print("\n".join(rate_rows(b.bytes, times, {
                "openssh": "zone -> ssh -> peer's sshd gate" if gate
                else "zone -> ssh -> peer's vetted receive",
                "asyncssh": "zone -> asyncssh -> peer's vetted receive",
                "local": "zfs send | zfs receive (local)"}, cpu)))
            for k in ("asyncssh", "openssh"):
                print(f"  ratio {k} / local pipe (rate): {med['local'] / med[k]:.2f}"
                      + ("  (target >= 0.8)" if k == "asyncssh" or gate else ""))
        finally:
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
