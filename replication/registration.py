"""Keep this zone registered with the coordinator (``POST /v1/zones``).

A coordinator restarted on an empty store (lost, rebuilt) learns the fleet
back from these registrations: the zone checks every ``_CHECK_EVERY`` seconds
that the coordinator still knows it, and registers again at once when a
refresh of its peer links found it forgotten (``PeerLinks.forgotten``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncssh

from replication.coordinator_client import CoordinatorClient
from replication.peers import PeerLinks
from snapper_zone.common.config import ZoneConfig
from snapper_zone.common.tasks import cancel_and_wait
from snapper_zone.errors import SnapperError
from snapper_zone.wire import ZoneRegistration

__all__ = ["Registrar", "zone_record"]


def zone_record(config: ZoneConfig, ssh_port: int, http_port: int,
                capacity: int) -> ZoneRegistration:
    """What this zone registers: where others reach it (the advertised addresses,
    never the bind address: ``0.0.0.0`` would have the coordinator health-check
    itself), the bound ports, its host key and capacity."""
    host_key = asyncssh.read_private_key(str(config.ssh.host_key))
    return ZoneRegistration(uuid=config.uuid, name=config.name,
                            ssh_host=config.ssh.advertised, ssh_port=ssh_port,
                            http_url=config.http.advertised_url(http_port),
                            host_key=host_key.export_public_key().decode().strip(),
                            capacity=capacity)

_CHECK_EVERY = 3.0  # seconds between "does the coordinator still know us?" checks


class Registrar:
    """Registers ``record`` (this zone) with ``coordinator`` and keeps it registered."""

    def __init__(self, coordinator: CoordinatorClient, links: PeerLinks,
                 record: ZoneRegistration, log: logging.Logger) -> None:
        self.coordinator = coordinator
        self.links = links
        self.record = record
        self.log = log
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="register")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def _run(self) -> None:
        """Tell the coordinator we exist; check often that it still knows us."""
        coordinator = self.coordinator
        delay = 1.0
        registered = False
        while True:
            try:
                if not registered or not await coordinator.knows(self.record.uuid):
                    await coordinator.register(self.record)
                    await self.links.refresh()
                    registered = True
                delay = _CHECK_EVERY
            except SnapperError as exc:
                self.log.info("cannot register with the coordinator yet: %s", exc)
                registered = False
                delay = min(delay * 2, 30.0)
            forgotten = self.links.forgotten
            forgotten.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await forgotten.wait()
            if forgotten.is_set():
                registered = False
