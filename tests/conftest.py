"""Fixtures giving tests real ZFS: zfs-fuse on the host, OpenZFS in the VM tier.

A test that needs a capability this tier lacks calls ``require(caps, name)``
and is skipped with that capability's name; it never passes silently.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapper_zone.fleet import pools as localpool
from snapper_zone.fleet.pools import FilePool
from snapper_zone.fleet.zookeeper import LocalZooKeeper
from snapper_zone.fleet.zookeeper import missing as zookeeper_missing
from snapper_zone.zfs.zfs import Capabilities, Zfs


@dataclass(frozen=True)
class ZfsTier:
    kind: str  # "fuse" or "native"
    workdir: Path


@pytest.fixture(scope="session")
def zfs_tier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZfsTier]:
    kind = localpool.tier()
    workdir = tmp_path_factory.mktemp("zfs")
    daemon = localpool.ZfsFuse(workdir) if kind == "fuse" else None
    if daemon is not None:
        daemon.start()
    try:
        yield ZfsTier(kind, workdir)
    finally:
        if daemon is not None:
            daemon.stop()


@pytest.fixture(scope="session")
def zookeeper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalZooKeeper]:
    """A private standalone ZooKeeper on 127.0.0.1 for the whole session (each test
    uses its own chroot); skipped, with the reason, where it cannot run."""
    why = zookeeper_missing()
    if why is not None:
        pytest.skip(f"needs ZooKeeper: {why}")
    zk = LocalZooKeeper(tmp_path_factory.mktemp("zookeeper"))
    zk.start()
    try:
        yield zk
    finally:
        zk.stop()


@pytest.fixture
def zfs(zfs_tier: ZfsTier) -> Zfs:
    return Zfs()


@pytest.fixture
async def caps(zfs: Zfs) -> Capabilities:
    return await zfs.capabilities()


PoolFactory = Callable[..., Awaitable[FilePool]]


@pytest.fixture
async def make_pool(zfs_tier: ZfsTier, zfs: Zfs) -> AsyncIterator[PoolFactory]:
    made: list[FilePool] = []

    async def make(hint: str = "t", *, size: int = 512 << 20, mounted: bool = True) -> FilePool:
        pool = await localpool.create_pool(zfs, zfs_tier.workdir, hint, size=size,
                                           mounted=mounted)
        made.append(pool)
        return pool

    yield make
    for pool in reversed(made):
        await pool.destroy(zfs)


@pytest.fixture
async def cn_pool(make_pool: PoolFactory) -> FilePool:
    """A simulated compute node's pool, mounted so tests can write VM data."""
    return await make_pool("cn")


@pytest.fixture
async def zone_pool(make_pool: PoolFactory) -> FilePool:
    """A simulated snapper zone's pool, never mounted."""
    return await make_pool("zone", mounted=False)


def require(caps: Capabilities, feature: str) -> None:
    if not getattr(caps, feature):
        pytest.skip(f"needs {feature}: this tier's ZFS ({caps.flavour}) lacks it")
