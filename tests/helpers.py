"""Small helpers for tests that move real data through real ZFS."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
from prometheus_client.parser import text_string_to_metric_families

from snapper_zone.cn.options import CnSettings
from snapper_zone.common.config import parse_config
from snapper_zone.daemon.sshserver import start_ssh_server
from snapper_zone.daemon.zone import Zone
from snapper_zone.fleet.local import free_port
from snapper_zone.fleet.pools import FilePool
from snapper_zone.zfs import proc
from snapper_zone.zfs.names import Dataset
from snapper_zone.zfs.zfs import SendSpec, Zfs


def mountpoint(pool: FilePool, ds: Dataset) -> Path:
    assert pool.mountpoint is not None, "pool is not mounted"
    return pool.mountpoint / ds.relative_to(Dataset(pool.name))


def write_random(pool: FilePool, ds: Dataset, name: str, size: int) -> str:
    """Write ``size`` random bytes into a file of a mounted dataset; return its sha256."""
    data = os.urandom(size)
    path = mountpoint(pool, ds) / name
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


async def send_bytes(zfs: Zfs, spec: SendSpec) -> bytes:
    child = await zfs.send(spec)
    data = await child.stdout.read()
    await zfs.check(child)
    return data


async def receive_bytes(zfs: Zfs, target: Dataset, data: bytes, *,
                        resumable: bool = True, force: bool = False) -> proc.Completed:
    """Feed ``data`` to ``zfs receive``; raises the typed error if it fails."""
    child = await zfs.receive(target, resumable=resumable, force=force)
    try:
        child.stdin.write(data)
        await child.stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass  # receive gave up early; its stderr says why
    finally:
        child.stdin.close()
    return await zfs.check(child)


def zvol_device(vol: Dataset) -> Path:
    return Path("/dev/zvol") / vol.path


async def wait_for(cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition",
                   poll: float = 0.01) -> None:
    """Poll a condition something else reaches on its own, failing after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(poll)


async def wait_until(cond: Callable[[], Awaitable[bool]], timeout: float = 60.0,
                     what: str = "condition", poll: float = 0.2) -> None:
    """``wait_for`` for a condition that must be asked for (a zone's inventory)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await cond():
        if loop.time() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(poll)


async def _wait_for(path: Path, timeout: float = 30.0) -> None:
    # udev creates a zvol's device node asynchronously after `zfs create -V`.
    await wait_for(path.exists, timeout, f"{path} to appear", poll=0.05)


async def write_device(path: Path, data: bytes) -> None:
    await _wait_for(path)

    def write() -> None:
        with open(path, "r+b") as f:
            f.write(data)

    await asyncio.to_thread(write)


async def read_device(path: Path, size: int) -> bytes:
    await _wait_for(path)

    def read() -> bytes:
        with open(path, "rb") as f:
            return f.read(size)

    return await asyncio.to_thread(read)


async def scrape(http_url: str, name: str, **labels: str) -> float:
    """The sum of a daemon's ``/metrics`` samples named ``name`` with ``labels``."""
    async with aiohttp.ClientSession() as http, http.get(f"{http_url}/metrics") as r:
        r.raise_for_status()
        text = await r.text()
    return sum(float(s.value) for fam in text_string_to_metric_families(text)
               for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


class Cable:
    """A TCP relay on 127.0.0.1 to ``target`` (say a ZooKeeper) that a test can cut
    (every connection aborted, new ones refused) and mend (on the same port)."""

    def __init__(self, target: int) -> None:
        self.target, self.port = target, free_port()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def mend(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port,
                                                 reuse_address=True)

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        await self.server.wait_closed()

    async def _relay(self, r1: asyncio.StreamReader, w1: asyncio.StreamWriter) -> None:
        try:
            r2, w2 = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            w1.transport.abort()
            return
        self.writers.update((w1, w2))

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.transport.abort()
        await asyncio.gather(pump(r1, w2), pump(r2, w1))
        self.writers.difference_update((w1, w2))


def write_keypair(path: Path) -> Path:
    """A new ed25519 key at ``path`` (0600) and its ``.pub`` beside it."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(str(path))
    os.chmod(path, 0o600)
    path.with_suffix(".pub").write_bytes(key.export_public_key())
    return path


@dataclass
class SshZone:
    """An in-process zone's SSH side and the CN key it knows."""

    zone: Zone
    port: int
    cn_key: Path
    host_pub: Path


async def cn_vm(zfs: Zfs, cn_pool: FilePool, vm: str) -> Dataset:
    """VM ``vm``'s dataset on a CN's pool, with 256 KiB of data in it."""
    ds = Dataset(cn_pool.name).child(vm)
    await zfs.create(ds)
    write_random(cn_pool, ds, "f0", 256 << 10)
    return ds


def cn_settings(z: SshZone, cn_pool: FilePool, **more: Any) -> CnSettings:
    """A CN's settings that push to zone ``z`` alone, its host key pinned."""
    return CnSettings("127.0.0.1", z.port, z.cn_key, None, z.host_pub, cn_pool.name,
                      (("127.0.0.1", z.port),), **more)


@contextlib.asynccontextmanager
async def ssh_zone(zfs: Zfs, zone_pool: FilePool, tmp: Path, *, uuid: str, cn_id: str,
                   vms: dict[str, str], cn_key: Path | None = None,
                   **config: Any) -> AsyncIterator[SshZone]:
    """A zone on ``zone_pool/snapper`` serving SSH on 127.0.0.1 (no HTTP, no
    peer: durability local unless ``config`` says otherwise), with one CN key
    (``cn_key``, else a new one); its keys and config file in ``tmp``."""
    os.makedirs(tmp, exist_ok=True)
    host_key = write_keypair(tmp / "host_ed25519")
    cn_key = cn_key or write_keypair(tmp / "cn_ed25519")
    root = Dataset(zone_pool.name).child("snapper")
    await zfs.create(root)
    doc: dict[str, Any] = {
        "uuid": uuid, "name": "snapper0", "root": str(root),
        "ssh": {"port": 0, "host_key": str(host_key)}, "http": {"port": 0},
        "keys": [{"role": "cn", "cn_id": cn_id,
                  "public_key": cn_key.with_suffix(".pub").read_text()}],
        "vms": vms, "durability": "local", **config}
    zone = Zone.from_config(parse_config(doc, str(tmp / "snapperd.toml")), zfs)
    acceptor = await start_ssh_server(zone)
    try:
        # .sockets, not get_port(): Debian bookworm's asyncssh 2.13 lacks the latter.
        yield SshZone(zone, acceptor.sockets[0].getsockname()[1], cn_key,
                      host_key.with_suffix(".pub"))
    finally:
        acceptor.close()
        await acceptor.wait_closed()
        # Finalise finished subprocess transports while their loop still runs;
        # collected after it closes, they raise "Event loop is closed".
        gc.collect()
