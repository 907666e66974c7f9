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
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncssh

from snapper_zone.fleet import pools as localpool
from snapper_zone.fleet.local import free_port
from snapper_zone.fleet.pools import FilePool
from snapper_zone.zfs import proc
from snapper_zone.zfs.names import Dataset
from snapper_zone.zfs.zfs import SendSpec, Zfs

VM = "5b6c1d0e-6f0a-4c5e-9d1e-0b3f7a2c9e41"
CN_ID = "bench-cn"
ZONE_UUID = "9f1e2d3c-4b5a-4968-8776-655443322110"
SNAP = "bench"
CIPHER = "aes128-gcm@openssh.com"


async def wait_port(port: int, daemon: proc.Daemon, timeout: float = 30.0) -> None:
    """Poll until something accepts on the port (or the daemon died)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            await w.wait_closed()
            return
        except OSError:
            if not daemon.alive():
                raise RuntimeError(f"{daemon.argv[0]} exited: {_tail(daemon)}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on port {port} after {timeout}s") from None
            await asyncio.sleep(0.05)  # polling a condition with a deadline


async def wait_file(path: Path, daemon: proc.Daemon, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(path.exists):
        if not daemon.alive():
            raise RuntimeError(f"snapperd exited: {_tail(daemon)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout}s")
        await asyncio.sleep(0.05)  # polling a condition with a deadline


def _tail(daemon: proc.Daemon) -> str:
    return Path(daemon.log_path).read_text()[-2000:]


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                   check=True)
    return path


def ssh_argv(key: Path, known_hosts: Path, port: int, user: str, command: str) -> list[str]:
    return ["ssh", "-c", CIPHER, "-o", "Compression=no", "-o", "BatchMode=yes",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes",
            "-i", str(key), "-p", str(port), f"{user}@127.0.0.1", command]


async def timed_pipe(stream: Path, argv: list[str]) -> float:
    """Run ``argv`` with the stream file on stdin; seconds until it exits OK."""
    start = time.monotonic()
    with open(stream, "rb") as f:  # noqa: ASYNC230 - opening is instant; the child reads
        child = await proc.spawn(argv, stdin=f)
        done = await child.wait()
    took = time.monotonic() - start
    if not done.ok:
        raise RuntimeError(f"{' '.join(argv[:3])}... failed: {done.stderr.strip()[-500:]}")
    return took


class Bench:
    copies = 1  # of the data the source pool must hold at once

    def __init__(self, workdir: Path, size_mib: int, repeat: int) -> None:
        self.workdir = workdir
        self.size = size_mib << 20
        self.repeat = repeat
        self.zfs = Zfs()
        self.fuse: localpool.ZfsFuse | None = None
        self.pools: list[FilePool] = []
        self.daemons: list[proc.Daemon] = []
        self.stream = workdir / "stream.zfs"

    async def setup(self) -> None:
        if localpool.tier() == "fuse":
            self.fuse = localpool.ZfsFuse(self.workdir / "fuse")
            await asyncio.to_thread(self.fuse.start)  # shares a running daemon
        pool_size = self.size * self.copies + self.size // 4 + (256 << 20)
        src = await localpool.create_pool(self.zfs, self.workdir, "bsrc", size=pool_size)
        self.pools.append(src)
        dst = await localpool.create_pool(self.zfs, self.workdir, "bdst", size=pool_size,
                                          mounted=False)
        self.pools.append(dst)
        self.dst = Dataset(dst.name)
        data = Dataset(src.name).child("data")
        await self.zfs.create(data)
        assert src.mountpoint is not None
        await asyncio.to_thread(self._fill, src.mountpoint / "data" / "random")
        await self.zfs.snapshot([data.snapshot(SNAP)])
        with open(self.stream, "wb") as out:  # noqa: ASYNC230 - zfs send writes, not us
            child = await self.zfs.send(SendSpec(data.snapshot(SNAP)), stdout=out)
            await self.zfs.check(child)
        # Read once so every method starts from page cache.
        await asyncio.to_thread(self.stream.read_bytes)
        self.bytes = self.stream.stat().st_size
        await self.start_sshd()
        await self.start_snapperd()

    def _fill(self, path: Path) -> None:
        chunk = 4 << 20
        with open(path, "wb") as f:
            for _ in range(self.size // chunk):
                f.write(os.urandom(chunk))
            f.write(os.urandom(self.size % chunk))

    async def start_sshd(self) -> None:
        sshd = shutil.which("sshd") or shutil.which("sshd", path="/usr/sbin")
        if sshd is None:
            raise RuntimeError("sshd not found: apt-get install -y openssh-server")
        d = self.workdir / "sshd"
        d.mkdir()
        host = keygen(d / "host_ed25519")
        self.client_key = keygen(self.workdir / "client_ed25519")
        (d / "authorized_keys").write_text(self.client_key.with_suffix(".pub").read_text())
        self.sshd_port = free_port()
        cfg = d / "sshd_config"
        cfg.write_text("\n".join([
            f"Port {self.sshd_port}", "ListenAddress 127.0.0.1", f"HostKey {host}",
            f"AuthorizedKeysFile {d / 'authorized_keys'}", f"PidFile {d / 'sshd.pid'}",
            "StrictModes no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "UsePAM no", "PermitRootLogin prohibit-password", "Compression no",
            f"Ciphers {CIPHER},aes256-gcm@openssh.com", ""]))
        # sshd refuses to start without its privilege separation directory.
        await asyncio.to_thread(os.makedirs, "/run/sshd", exist_ok=True)
        daemon = proc.Daemon([sshd, "-D", "-e", "-f", str(cfg)], str(d / "sshd.log"))
        self.daemons.append(daemon)
        await wait_port(self.sshd_port, daemon)
        self.sshd_known = d / "known_hosts"
        self.sshd_known.write_text(f"[127.0.0.1]:{self.sshd_port} "
                                   f"{host.with_suffix('.pub').read_text()}")

    async def start_snapperd(self) -> None:
        d = self.workdir / "snapperd"
        d.mkdir()
        key = asyncssh.generate_private_key("ssh-ed25519")
        key.write_private_key(str(d / "host_ed25519"))
        os.chmod(d / "host_ed25519", 0o600)
        self.zone_root = self.dst.child("snapper")
        cfg = {
            "uuid": ZONE_UUID, "name": "bench", "root": str(self.zone_root),
            "ssh": {"port": 0, "host_key": str(d / "host_ed25519")}, "http": {"port": 0},
            "durability": "local",
            "keys": [{"role": "cn", "cn_id": CN_ID,
                      "public_key": self.client_key.with_suffix(".pub").read_text().strip()}],
            "vms": {VM: CN_ID},
        }
        (d / "snapperd.json").write_text(json.dumps(cfg))
        ready = d / "ready.json"
        daemon = proc.Daemon([sys.executable, "-m", "snapper_zone.daemon.main", "--config",
                              str(d / "snapperd.json"), "--ready-file", str(ready),
                              "--create-root", "--log-level", "warn"], str(d / "snapperd.log"),
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
        self.daemons.append(daemon)
        await wait_file(ready, daemon)
        self.zone_port = int(json.loads(ready.read_text())["ssh_port"])
        self.zone_known = d / "known_hosts"
        self.zone_known.write_text(f"[127.0.0.1]:{self.zone_port} "
                                   + key.export_public_key().decode())

    # -- the three methods ----------------------------------------------------------

    async def local(self, i: int) -> float:
        target = self.dst.child(f"a{i}")
        took = await timed_pipe(self.stream, await self.zfs.receive_argv(target,
                                                                         resumable=False))
        await self.zfs.destroy(target, recursive=True)
        return took

    async def openssh(self, i: int) -> float:
        target = self.dst.child(f"b{i}")
        remote = " ".join(await self.zfs.receive_argv(target, resumable=False))
        took = await timed_pipe(self.stream, ssh_argv(self.client_key, self.sshd_known,
                                                      self.sshd_port, "root", remote))
        await self.zfs.destroy(target, recursive=True)
        return took

    async def snapperd(self, i: int) -> float:
        took = await timed_pipe(self.stream, ssh_argv(self.client_key, self.zone_known,
                                                      self.zone_port, "snapper",
                                                      f"receive {VM} root {SNAP}"))
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
                print(f"  run {i + 1}: {name:<36} {self.bytes / t / 1e6:8.1f} MB/s",
                      file=sys.stderr, flush=True)
        return times

    async def cleanup(self) -> None:
        for daemon in reversed(self.daemons):
            daemon.stop()
        for pool in reversed(self.pools):
            try:
                await pool.destroy(self.zfs)
            except Exception as exc:  # keep cleaning the rest; say what was left
                print(f"could not destroy pool {pool.name}: {exc}", file=sys.stderr)
        if self.fuse is not None:
            self.fuse.stop()  # a no-op when the daemon was someone else's


async def amain(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="snapper-bench-"))
    bench = Bench(workdir, args.size_mib, args.repeat)
    try:
        print(f"preparing a {args.size_mib} MiB stream in {workdir} ...", file=sys.stderr)
        await bench.setup()
        caps = await bench.zfs.capabilities()
        times = await bench.run()
    finally:
        await bench.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    rates = {k: bench.bytes / statistics.median(v) / 1e6 for k, v in times.items()}
    print(f"\nstream: {bench.bytes} bytes ({bench.bytes / 1e6:.0f} MB), ZFS: {caps.flavour}, "
          f"cipher {CIPHER}, median of {args.repeat}, {os.cpu_count()} CPUs")
    for name, rate in rates.items():
        spread = ", ".join(f"{bench.bytes / t / 1e6:.0f}" for t in times[name])
        print(f"  {name:<36} {rate:8.1f} MB/s   (runs: {spread})")
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
