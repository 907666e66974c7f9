#!/usr/bin/env python3
"""What asyncssh spends per byte received, by how much one socket read brings.

Every stream a zone receives crosses asyncssh: a CN's push (from OpenSSH's
``ssh``), a mirror, a move or a repair (from a zone's asyncssh client).
asyncssh appends each socket read to its input buffer and slices each packet
off the front, copying what follows, so a read that brings many packets costs
more per byte than one that brings few. asyncio reads 256 KiB at a time;
snapper's connections read 64 KiB (``stream.narrow_reads``). No ZFS here:
``--size-mib`` of bytes from memory, the receiver discarding them, so the
figures are SSH's alone.

For each read size the receiving server uses (``--reads``, KiB), interleaved
``--repeat`` times: an asyncssh client writing the bytes (a zone's carrier)
and OpenSSH's ``ssh`` reading them from a file (a CN's carrier). Printed: MB/s,
the receiver's CPU-seconds per GB (a server process of its own, from
``/proc``) and the asyncssh sender's (``getrusage``), medians, and each read
size's receiving CPU as a ratio to the first's, from the same run.

``--max-packet-kib`` sets the largest packet the receiver accepts (default
32, asyncssh's and OpenSSH's). Measured here (512 MiB, 2 CPUs): larger
packets were erratic for asyncssh senders (64 KiB: 0.80x one run, 1.88x the
next; 256 KiB: 2.0x), so snapper keeps 32 KiB.

    python bench/ssh_reads.py [--size-mib 512] [--repeat 5] [--reads 256,64]
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
from pathlib import Path
from typing import cast

import asyncssh

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import CIPHER, cpu_here, cpu_seconds, fill  # noqa: E402

from snapper_zone.transfer.stream import narrow_reads  # noqa: E402
from snapper_zone.zfs import proc  # noqa: E402

CHUNK = 256 << 10


class _Sink(asyncssh.SSHServerSession[bytes]):
    """Counts and drops what the client sends; exits 0 at its EOF."""

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self.chan = chan

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        return True

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        pass

    def eof_received(self) -> bool:
        self.chan.exit(0)
        return False


class _Source(asyncssh.SSHClientSession[bytes]):
    """The sending side's flow control: writes wait while the window is shut."""

    def __init__(self) -> None:
        self.writable = asyncio.Event()
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()


class _Server(asyncssh.SSHServer):
    def __init__(self, read: int) -> None:
        self.read = read

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        narrow_reads(conn, self.read)

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return True

    def session_requested(self) -> _Sink:
        return _Sink()


async def serve(host_key: str, read: int, max_pktsize: int, ready: str) -> None:
    """The receiving side, in a process of its own (``--serve``)."""
    server = await asyncssh.create_server(
        lambda: _Server(read), "127.0.0.1", 0, server_host_keys=[host_key],
        encryption_algs=[CIPHER], compression_algs=None, line_editor=False,
        encoding=None, max_pktsize=max_pktsize)
    _write(Path(ready), str(server.sockets[0].getsockname()[1]))
    await asyncio.Event().wait()


def _write(path: Path, text: str) -> None:
    path.write_text(text)


async def send_asyncssh(port: int, key: Path, known: Path, nbytes: int) -> tuple[float, float]:
    """(seconds, this process's CPU seconds) to send ``nbytes`` over asyncssh."""
    data = os.urandom(CHUNK)
    async with asyncssh.connect("127.0.0.1", port, client_keys=[str(key)],
                                known_hosts=str(known), encryption_algs=[CIPHER],
                                compression_algs=None) as conn:
        cpu, start = cpu_here(), time.monotonic()
        chan, opened = await conn.create_session(_Source, "sink", encoding=None)
        session = cast(_Source, opened)
        left = nbytes
        while left > 0:
            await session.writable.wait()
            n = min(CHUNK, left)
            chan.write(data[:n])
            left -= n
        chan.write_eof()
        await chan.wait_closed()
        return time.monotonic() - start, cpu_here() - cpu


async def send_openssh(port: int, key: Path, known: Path, source: Path) -> float:
    argv = ["ssh", "-F", "/dev/null", "-T", "-c", CIPHER, "-o", "Compression=no",
            "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={known}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes",
            "-i", str(key), "-p", str(port), "bench@127.0.0.1", "sink"]
    start = time.monotonic()
    with open(source, "rb") as f:  # noqa: ASYNC230 - opening is instant; ssh reads
        child = await proc.spawn(argv, stdin=f)
        done = await child.wait()
    if not done.ok:
        raise RuntimeError(f"ssh failed: {done.stderr.strip()[-500:]}")
    return time.monotonic() - start


async def amain(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="snapper-bench-"))
    nbytes = args.size_mib << 20
    sizes = [int(s) << 10 for s in args.reads.split(",")]
    packet = args.max_packet_kib << 10
    host = asyncssh.generate_private_key("ssh-ed25519")
    host.write_private_key(str(work / "host"))
    client = asyncssh.generate_private_key("ssh-ed25519")
    client.write_private_key(str(work / "client"))
    os.chmod(work / "client", 0o600)
    source = work / "bytes"
    fill(source, args.size_mib << 20)
    servers: dict[int, tuple[proc.Spawned, int]] = {}
    rows: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    try:
        for size in sizes:
            ready = work / f"ready-{size}"
            child = await proc.spawn([sys.executable, __file__, "--serve", str(work / "host"),
                                      str(size), str(packet), str(ready)])
            deadline = time.monotonic() + 30
            while not ready.exists() or not ready.read_text():
                if time.monotonic() > deadline:
                    raise RuntimeError("the bench's server did not start")
                await asyncio.sleep(0.05)  # another process's start-up, bounded
            port = int(ready.read_text())
            (work / f"known-{size}").write_text(
                f"[127.0.0.1]:{port} " + host.export_public_key().decode())
            servers[size] = (child, port)
        for i in range(args.repeat):
            for size in sizes:
                child, port = servers[size]
                known = work / f"known-{size}"
                before = cpu_seconds(child.pid)
                took, sender = await send_asyncssh(port, work / "client", known, nbytes)
                recv = cpu_seconds(child.pid) - before
                rows.setdefault(("asyncssh", size), []).append((took, recv, sender))
                print(f"  run {i + 1}: asyncssh, {size >> 10:>3} KiB reads  "
                      f"{nbytes / took / 1e6:7.1f} MB/s", file=sys.stderr)
                if shutil.which("ssh"):
                    before = cpu_seconds(child.pid)
                    took = await send_openssh(port, work / "client", known, source)
                    recv = cpu_seconds(child.pid) - before
                    rows.setdefault(("ssh", size), []).append((took, recv, float("nan")))
    finally:
        for child, _ in servers.values():
            await child.abort()
        shutil.rmtree(work, ignore_errors=True)
    gb = nbytes / 1e9
    print(f"\n{nbytes} bytes from memory, cipher {CIPHER}, packets <= {args.max_packet_kib} "
          f"KiB, median of {args.repeat}, {os.cpu_count()} CPUs; receiver discards")
    first = sizes[0]
    print(f"  {'sender':<9} {'reads':>8} {'MB/s':>8} {'recv CPU s/GB':>14} "
          f"{'send CPU s/GB':>14} {f'recv CPU vs {first >> 10} KiB':>20}")
    for (carrier, size), runs in rows.items():
        took = statistics.median(r[0] for r in runs)
        recv = statistics.median(r[1] for r in runs) / gb
        send = statistics.median(r[2] for r in runs) / gb
        base_runs = rows.get((carrier, first))
        base = statistics.median(r[1] for r in base_runs) / gb if base_runs else float("nan")
        print(f"  {carrier:<9} {size >> 10:>4} KiB {nbytes / took / 1e6:8.1f} {recv:14.2f} "
              f"{send:14.2f} {recv / base:19.2f}x")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        asyncio.run(serve(argv[1], int(argv[2]), int(argv[3]), argv[4]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--size-mib", type=int, default=512, help="bytes per run (MiB)")
    p.add_argument("--repeat", type=int, default=5, help="runs per size; median reported")
    p.add_argument("--reads", default="256,64",
                   help="socket read sizes of the receiver, KiB (256: asyncio's own)")
    p.add_argument("--max-packet-kib", type=int, default=32,
                   help="the largest packet the receiver accepts, KiB")
    args = p.parse_args(argv)
    if args.size_mib < 1 or args.repeat < 1:
        p.error("--size-mib and --repeat must be positive")
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
