"""Periodic health checks of every registered zone.

A check passes when ``GET {http_url}/ping`` answers 2xx within the timeout
*and* a TCP connection to the SSH endpoint opens (the port the CNs push to).

Rules:

* a zone that fails a check becomes *suspect* (``suspect_since`` = the time of
  the first failure in a row); one passing check makes it healthy again;
* a zone suspect for ``lost_after`` seconds is declared ``lost``, and the
  ``on_lost`` callback runs (the coordinator then plans the repairs: each VM
  that had a copy there gets a new second zone, filled from the survivor);
* a lost zone stays lost even if it answers again: only an operator sets it
  ``active`` (``PUT /v1/zones/{uuid}/state``).  While lost, nothing is placed
  on it and the mover never reads from or deletes on it.  Its copies are
  stale: once it is active again, a copy of a VM whose placement no longer
  names it is discarded by the coordinator's stale-copy pass only when every
  complete snapshot on it is also on the VM's placed copies (by guid); one
  holding a snapshot nobody else has is kept and reported, never overwritten
  (see ``replication/DESIGN.md`` (c) on divergent tails).

Lost zones are still checked so that ``GET /v1/zones`` shows whether one
came back.  The used/free figures come from ``GET /v1/capacity`` when it
answers; a failure there does not make a zone unhealthy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from rebalance.metrics import CoordinatorMetrics
from rebalance.placement import ZoneState
from rebalance.store import Store, ZoneRecord
from rebalance.zoneclient import ZoneApi, tcp_reachable
from snapper_zone.errors import SnapperError

__all__ = ["HealthChecker", "HealthSettings"]

log = logging.getLogger("snapper.coordinator.health")

OnLost = Callable[[ZoneRecord], Awaitable[None]]
TcpCheck = Callable[[str, int, float], Awaitable[bool]]


@dataclass(frozen=True)
class HealthSettings:
    interval: float = 10.0
    timeout: float = 5.0
    lost_after: float = 300.0


class HealthChecker:
    def __init__(self, store: Store, api: ZoneApi, settings: HealthSettings,
                 on_lost: OnLost | None = None, metrics: CoordinatorMetrics | None = None,
                 clock: Callable[[], float] = time.time,
                 tcp_check: TcpCheck = tcp_reachable) -> None:
        self.store = store
        self.api = api
        self.settings = settings
        self.on_lost = on_lost
        self.metrics = metrics or CoordinatorMetrics()
        self.clock = clock
        self.tcp_check = tcp_check
        self.rounds = 0  # finished rounds, for whoever waits on one

    async def probe(self, z: ZoneRecord) -> str | None:
        """None when the zone is healthy, else why not."""
        t = self.settings.timeout
        try:
            await self.api.ping(z.http_url, t)
        except SnapperError as e:
            return f"http: {e.message}"
        if not await self.tcp_check(z.ssh_host, z.ssh_port, t):
            return f"ssh: cannot connect to {z.ssh_host}:{z.ssh_port}"
        return None

    async def check(self, z: ZoneRecord) -> ZoneRecord:
        problem = await self.probe(z)
        now = self.clock()
        self.metrics.health_checks.labels("ok" if problem is None else "failed").inc()
        if problem is None:
            used = free = None
            try:
                used, free = await self.api.capacity(z.http_url)
            except (SnapperError, ValueError, KeyError, TypeError):
                pass  # the figures stay as last seen
            if z.suspect_since is not None:
                log.info("zone healthy again", extra={"zone": z.uuid, "zone_name": z.name,
                                                      "state": str(z.state)})
            return await self.store.set_zone_health(z.uuid, last_seen=now, suspect_since=None,
                                                    used=used, free=free)
        if z.suspect_since is None:
            log.warning("zone suspect", extra={"zone": z.uuid, "zone_name": z.name,
                                               "problem": problem})
            return await self.store.set_zone_health(z.uuid, last_seen=z.last_seen,
                                                    suspect_since=now)
        if z.state is not ZoneState.LOST and now - z.suspect_since >= self.settings.lost_after:
            log.error("zone declared lost", extra={
                "zone": z.uuid, "zone_name": z.name, "problem": problem,
                "suspect_for": round(now - z.suspect_since, 1)})
            z = await self.store.set_zone_state(z.uuid, ZoneState.LOST)
            self.metrics.zones_lost.inc()
            if self.on_lost is not None:
                await self.on_lost(z)
        return z

    async def check_all(self) -> list[ZoneRecord]:
        # A pending zone is not ours yet: never contacted, so never declared lost.
        zones = [z for z in await self.store.zones() if z.admitted]
        results = await asyncio.gather(*(self.check(z) for z in zones), return_exceptions=True)
        out = []
        for z, r in zip(zones, results, strict=True):
            if isinstance(r, BaseException):
                if not isinstance(r, Exception):
                    raise r
                # e.g. deleted between the listing and the update: next round
                log.warning("health check not recorded", exc_info=r, extra={"zone": z.uuid})
            else:
                out.append(r)
        self.rounds += 1
        return out

    async def run(self) -> None:
        while True:
            try:
                await self.check_all()
            except Exception:
                log.exception("health round failed")
            await asyncio.sleep(self.settings.interval)  # the period between rounds
