"""Health checks against real HTTP and TCP listeners on 127.0.0.1.

Each "zone" is an aiohttp server (``/ping``, ``/v1/capacity``) and a bare
TCP listener standing for its SSH port; the tests stop and start them and
wait for the checker to notice, with a timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncssh
import pytest
from aiohttp import web

from rebalance.health import HealthChecker, HealthSettings
from rebalance.placement import ZoneState
from rebalance.store import SqliteStore, ZoneRecord, ZoneRegistration
from rebalance.zoneclient import HttpZoneApi
from snapper_zone.common.httpsig import Signer
from tests.helpers import wait_for

ZONE = "00000000-0000-4000-8000-000000000001"


class ZoneStandIn:
    def __init__(self) -> None:
        self.healthy = True
        self.runner: web.AppRunner | None = None
        self.ssh: asyncio.Server | None = None
        self.http_port = 0
        self.ssh_port = 0

    async def start(self) -> None:
        async def ping(_: web.Request) -> web.Response:
            if not self.healthy:
                return web.json_response({"code": "InternalError", "message": "sick"},
                                         status=503)
            return web.json_response({"ping": "pong"})

        async def capacity(_: web.Request) -> web.Response:
            return web.json_response({"used": 7, "available": 993})

        app = web.Application()
        app.router.add_get("/ping", ping)
        app.router.add_get("/v1/capacity", capacity)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.http_port, reuse_address=True)
        await site.start()
        self.http_port = int(self.runner.addresses[0][1])
        await self.start_ssh()

    async def start_ssh(self) -> None:
        async def accept(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.close()

        self.ssh = await asyncio.start_server(accept, "127.0.0.1", self.ssh_port,
                                             reuse_address=True)
        self.ssh_port = int(self.ssh.sockets[0].getsockname()[1])

    async def stop_ssh(self) -> None:
        if self.ssh is not None:
            self.ssh.close()
            await self.ssh.wait_closed()
            self.ssh = None

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        await self.stop_ssh()


@pytest.fixture
async def zone() -> AsyncIterator[ZoneStandIn]:
    z = ZoneStandIn()
    await z.start()
    yield z
    await z.stop()


class Env:
    def __init__(self, tmp_path: Path, zone: ZoneStandIn, lost_after: float) -> None:
        self.store = SqliteStore(tmp_path / "c.db")
        self.api = HttpZoneApi(Signer(asyncssh.generate_private_key("ssh-ed25519")),
                               request_timeout=2.0)
        self.lost: list[str] = []
        self.zone = zone
        self.checker = HealthChecker(self.store, self.api,
                                     HealthSettings(interval=0.02, timeout=1.0,
                                                    lost_after=lost_after),
                                     on_lost=self._on_lost)
        self.task: asyncio.Task[None] | None = None
        self.record: ZoneRecord | None = None

    async def _on_lost(self, z: ZoneRecord) -> None:
        self.lost.append(z.uuid)

    async def __aenter__(self) -> Env:
        await self.store.upsert_zone(ZoneRegistration(
            ZONE, "z1", "127.0.0.1", self.zone.ssh_port, f"http://127.0.0.1:{self.zone.http_port}",
            "ssh-ed25519 X", 100), 0.0)
        await self.store.set_zone_state(ZONE, ZoneState.ACTIVE)  # admitted
        self.task = asyncio.create_task(self._watch())
        return self

    async def _watch(self) -> None:
        # The checker's own loop, keeping the newest record for the test to read.
        while True:
            [self.record] = await self.checker.check_all()
            await asyncio.sleep(self.checker.settings.interval)

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.api.close()
        await self.store.close()

    async def until(self, what: str, cond: Callable[[ZoneRecord], bool]) -> None:
        await wait_for(lambda: self.record is not None and cond(self.record), 10.0, what)


async def test_healthy_zone_is_seen_with_its_capacity(tmp_path: Path, zone: ZoneStandIn) -> None:
    async with Env(tmp_path, zone, lost_after=60) as env:
        await env.until("seen", lambda r: r.last_seen is not None)
        assert env.record is not None
        assert (env.record.health, env.record.used, env.record.free) == ("healthy", 7, 993)


async def test_failed_ping_makes_suspect_and_recovery_clears_it(tmp_path: Path,
                                                                zone: ZoneStandIn) -> None:
    async with Env(tmp_path, zone, lost_after=60) as env:
        await env.until("seen", lambda r: r.health == "healthy")
        zone.healthy = False
        await env.until("suspect", lambda r: r.health == "suspect")
        zone.healthy = True
        await env.until("healthy again", lambda r: r.health == "healthy")
        assert env.record is not None and env.record.state is ZoneState.ACTIVE
        assert env.lost == []


async def test_ssh_port_closed_is_suspect(tmp_path: Path, zone: ZoneStandIn) -> None:
    async with Env(tmp_path, zone, lost_after=60) as env:
        await env.until("seen", lambda r: r.health == "healthy")
        await zone.stop_ssh()
        await env.until("suspect", lambda r: r.health == "suspect")
        await zone.start_ssh()
        await env.until("healthy again", lambda r: r.health == "healthy")


async def test_dead_zone_is_declared_lost_and_stays_lost(tmp_path: Path,
                                                         zone: ZoneStandIn) -> None:
    async with Env(tmp_path, zone, lost_after=0.3) as env:
        await env.until("seen", lambda r: r.health == "healthy")
        await zone.stop()
        await env.until("lost", lambda r: r.state is ZoneState.LOST)
        assert env.lost == [ZONE]
        assert env.record is not None and env.record.health == "down"
        await zone.start()  # it comes back on the same ports
        await env.until("answers again", lambda r: r.health == "healthy")
        assert env.record.state is ZoneState.LOST  # only an operator reactivates it
        assert env.lost == [ZONE]
