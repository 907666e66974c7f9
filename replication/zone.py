"""What replication needs of the zone it runs in: a protocol, so it imports no daemon.

``snapper_zone.daemon.zone.Zone`` satisfies it; the daemon hands itself to
``Replicator`` (imports point down: daemon -> replication -> transfer).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import Protocol

from snapper_zone.common.config import ZoneConfig
from snapper_zone.common.metrics import Metrics
from snapper_zone.transfer.local import ZoneReceiver
from snapper_zone.transfer.registry import TransferRegistry
from snapper_zone.transfer.store import ZoneStore
from snapper_zone.zfs.zfs import Zfs

__all__ = ["LocalZone"]


class LocalZone(Protocol):
    """This zone: its config, pool, layout, transfers and locks."""

    config: ZoneConfig
    zfs: Zfs
    store: ZoneStore
    metrics: Metrics
    transfers: TransferRegistry
    log: logging.Logger
    vm_locks: defaultdict[str, asyncio.Lock]

    @property
    def receiver(self) -> ZoneReceiver: ...
