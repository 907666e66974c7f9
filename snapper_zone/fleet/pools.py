"""Real ZFS on one machine: zfs-fuse when there is no kernel ZFS, file-backed pools.

Used by the test fixtures and by ``snapper demo``. Each simulated snapper zone
and compute node gets a pool of its own, backed by a sparse file.

Tier selection (env ``SNAPPER_ZFS``): ``native`` uses the kernel's ZFS
(OpenZFS, illumos); ``fuse`` starts Debian's zfs-fuse daemon (one per
machine: if one is already answering, it is shared and left running);
unset picks ``native`` when ``/dev/zfs`` exists or on SunOS, else ``fuse``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from snapper_zone.errors import DatasetBusy, SnapperError
from snapper_zone.zfs import proc
from snapper_zone.zfs.zfs import Zfs

_counter = itertools.count()


class ZfsUnavailable(SnapperError):
    code = "ZfsUnavailable"


def tier() -> str:
    want = os.environ.get("SNAPPER_ZFS", "")
    if want in ("native", "fuse"):
        return want
    if want:
        raise ZfsUnavailable(f"SNAPPER_ZFS={want!r}: expected 'native' or 'fuse'")
    return "native" if platform.system() == "SunOS" or os.path.exists("/dev/zfs") else "fuse"


def _answers() -> bool:
    done = asyncio.run(proc.run(["zpool", "list", "-H"], timeout=30))
    return done.ok


class ZfsFuse:
    """The zfs-fuse daemon, started in the foreground and stopped by its pid."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.daemon: proc.Daemon | None = None

    def start(self, timeout: float = 30.0) -> None:
        if shutil.which("zfs-fuse") is None:
            raise ZfsUnavailable("zfs-fuse is not installed (apt-get install zfs-fuse)")
        if _answers():
            return  # someone else's daemon: share it, never stop it
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.daemon = proc.Daemon(
            ["zfs-fuse", "--no-daemon", "--no-kstat-mount",
             "--pidfile", str(self.workdir / "zfs-fuse.pid")],
            str(self.workdir / "zfs-fuse.log"))
        deadline = time.monotonic() + timeout
        while not _answers():
            if not self.daemon.alive():
                raise ZfsUnavailable("zfs-fuse exited: " + Path(self.daemon.log_path).read_text())
            if time.monotonic() > deadline:
                self.daemon.stop()
                raise ZfsUnavailable(f"zfs-fuse did not answer within {timeout}s")
            time.sleep(0.05)  # polling a condition with a deadline

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None


@dataclass
class FilePool:
    """A pool on a sparse file; ``mountpoint`` is None for unmounted pools."""

    name: str
    backing: Path
    mountpoint: Path | None

    async def destroy(self, zfs: Zfs) -> None:
        deadline = time.monotonic() + 30
        while self.name in await zfs.pools():
            try:
                await zfs.pool_destroy(self.name)
            except DatasetBusy:
                # zfs-fuse may still be settling a mount it just made
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        _remove(self.backing)


def _sparse_file(path: Path, size: int) -> Path:
    # Tiny and synchronous: no data is written, only the length is set.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


async def create_pool(zfs: Zfs, workdir: Path, hint: str, *, size: int = 512 << 20,
                      mounted: bool = True) -> FilePool:
    """A fresh pool named ``<hint><pid>x<n>`` (unique per process) on a sparse file.

    Unmounted pools (snapper zones) use ``mountpoint=none`` so zfs-fuse, which
    has no ``receive -u``, never mounts what it receives: a mounted copy can
    be touched, and the next incremental fails as "destination modified".
    """
    name = f"{hint}{os.getpid()}x{next(_counter)}"
    backing = _sparse_file(workdir / f"{name}.img", size)
    mnt = workdir / "mnt" / name if mounted else None
    await zfs.pool_create(name, [str(backing)],
                          mountpoint=str(mnt) if mnt else "none",
                          props={"atime": "off", "compression": "off"})
    return FilePool(name, backing, mnt)
