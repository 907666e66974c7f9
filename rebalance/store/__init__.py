"""The coordinator's durable state: zones, placement, moves (see ``base``).

``store`` in the coordinator's config names the backend: a file path
(SQLite, the default) or ``zk://host:port[,host:port...]/chroot``
(ZooKeeper). ``open_store`` opens either.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rebalance.store.base import (
    Candidate,
    CnNotFound,
    CnRecord,
    Election,
    Fence,
    GrantRecord,
    HostKeyMismatch,
    KeyInUse,
    MoveRecord,
    MoveState,
    MoveStep,
    NotLeader,
    PlacementConflict,
    PolicyNotFound,
    PolicyRecord,
    Registry,
    SoloElection,
    Store,
    StoreUnavailable,
    ZoneNotEmpty,
    ZoneNotFound,
    ZoneRecord,
    ZoneRegistration,
    key_identity,
)
from rebalance.store.sqlite import SqliteStore
from rebalance.store.zookeeper import ZkStore

__all__ = [
    "Candidate",
    "CnNotFound",
    "CnRecord",
    "Election",
    "Fence",
    "GrantRecord",
    "HostKeyMismatch",
    "KeyInUse",
    "MoveRecord",
    "MoveState",
    "MoveStep",
    "NotLeader",
    "PlacementConflict",
    "PolicyNotFound",
    "PolicyRecord",
    "Registry",
    "SoloElection",
    "SqliteStore",
    "Store",
    "StoreUnavailable",
    "ZkStore",
    "ZkTarget",
    "ZoneNotEmpty",
    "ZoneNotFound",
    "ZoneRecord",
    "ZoneRegistration",
    "key_identity",
    "open_store",
    "parse_zk_url",
]

DEFAULT_CHROOT = "/snapper"


@dataclass(frozen=True, slots=True)
class ZkTarget:
    """A ZooKeeper ensemble and the chroot the store lives under."""

    hosts: tuple[tuple[str, int], ...]
    chroot: str = DEFAULT_CHROOT

    @property
    def connect_string(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.hosts)

    def __str__(self) -> str:
        return f"zk://{self.connect_string}{self.chroot}"


def parse_zk_url(text: str) -> ZkTarget:
    """``zk://host:port[,host:port...][/chroot]``; ValueError saying what is wrong."""
    if not text.startswith("zk://"):
        raise ValueError("must start with zk://")
    rest = text.removeprefix("zk://")
    hosts_part, slash, chroot = rest.partition("/")
    chroot = "/" + chroot.rstrip("/") if slash and chroot.strip("/") else DEFAULT_CHROOT
    if any(not seg or seg in (".", "..") for seg in chroot.split("/")[1:]):
        raise ValueError(f"chroot {chroot!r}: empty, . or .. path segment")
    hosts = []
    for item in hosts_part.split(","):
        host, colon, port = item.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{item!r}: must be host:port (port 1-65535)")
        hosts.append((host, int(port)))
    return ZkTarget(tuple(hosts), chroot)


async def open_store(where: Path | ZkTarget, *, timeout: float = 10.0,
                     session_timeout: float = 6.0) -> Store:
    """The store ``where`` names, ready to use. ``timeout``: how long ZooKeeper may
    take to connect and to answer one call before StoreUnavailable;
    ``session_timeout``: how long after its last word a coordinator's session
    (and with it its leadership) ends, i.e. the failover time."""
    if isinstance(where, ZkTarget):
        return await ZkStore.open(where.connect_string, where.chroot, timeout=timeout,
                                  session_timeout=session_timeout)
    where.parent.mkdir(parents=True, exist_ok=True)
    return SqliteStore(where)
