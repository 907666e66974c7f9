"""The seeded fault schedule and the faults themselves.

``make_schedule`` is pure: the same (seed, duration, kinds, zones) always
gives the same schedule, which is what is printed for a replay. Each fault
is a small class whose ``inject()`` does the damage, undoes what is meant to
be undone (a restart, a released pool), and measures the time back to two
copies after a loss. Faults run one after another, never overlapping: two
zones down at once is a double fault, outside what Snapper promises.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import asyncssh

from snapper_zone.fleet import pools as localpool
from snapper_zone.fleet.local import LocalFleet, LocalZone
from snapper_zone.transfer.remote import ZoneClient
from snapper_zone.transfer.stream import Channel
from snapper_zone.zfs.names import Dataset
from soak.records import FaultRecord

if TYPE_CHECKING:
    from soak.driver import Soak

# Without a coordinator: zone pairs are static, so the fleet's zone set stays.
STATIC_KINDS: tuple[str, ...] = (
    "kill-restart", "kill-mid-transfer", "replace-zone", "truncate", "fill-pool")
# With one: zones come and go, and the coordinator itself can die.
COORDINATOR_KINDS: tuple[str, ...] = (
    *STATIC_KINDS, "add-zone", "drain-zone", "lose-zone", "kill-coordinator")
# Either mode, with policy agents running (``SoakConfig.agents``; ``soak/agents.py``).
AGENT_KINDS: tuple[str, ...] = ("kill-agent", "kill-zone-mid-schedule")
_SHRINKS = ("drain-zone", "lose-zone")
MIN_ACTIVE = 3  # fewer, and a drain or loss leaves no room for a second copy elsewhere
FILLER = "soak-filler"  # outside the zone's delegated root: someone else's data


@dataclass(frozen=True)
class PlannedFault:
    at: float  # seconds after the workload starts
    kind: str
    pick: int  # which zone or CN: taken modulo the candidates when injected
    hold: float  # seconds the fault lasts (down time, fill time)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def make_schedule(seed: int, duration: float, kinds: Sequence[str], *, zones: int = 3,
                  count: int | None = None) -> list[PlannedFault]:
    """At least 6 faults, every kind at least once when there are enough slots,
    spread over 10-65 % of ``duration`` (the rest is for the last faults' recoveries);
    drains and losses never leave fewer than ``MIN_ACTIVE`` zones."""
    rng = random.Random(seed)
    n = count if count is not None else max(6, len(kinds), int(duration // 20))
    order = list(kinds)
    rng.shuffle(order)
    chosen = order[:n] + [rng.choice(kinds) for _ in range(n - len(order))]
    chosen = _keep_zones(chosen, zones)
    start, end = 0.10 * duration, 0.65 * duration
    slot = (end - start) / len(chosen)
    out = []
    for i, kind in enumerate(chosen):
        # Rounded, then kept inside the span (156.1 < 0.1 * 1561.0 in floats).
        at = min(max(round(start + i * slot + rng.uniform(0, 0.5 * slot), 2), start), end)
        out.append(PlannedFault(at, kind, rng.randrange(1 << 16),
                                round(rng.uniform(1.0, 4.0), 2)))
    return out


def _keep_zones(kinds: list[str], zones: int) -> list[str]:
    """Move an add-zone forward (or add one) wherever a drain or loss would take the
    fleet below ``MIN_ACTIVE`` zones; every kind chosen stays."""
    out = list(kinds)
    active = zones
    i = 0
    while i < len(out):
        if out[i] in _SHRINKS and active - 1 < MIN_ACTIVE:
            later = next((j for j in range(i + 1, len(out)) if out[j] == "add-zone"), None)
            out.insert(i, out.pop(later) if later is not None else "add-zone")
        active += 1 if out[i] == "add-zone" else -1 if out[i] in _SHRINKS else 0
        i += 1
    return out


def active_zones(schedule: Sequence[PlannedFault], zones: int) -> list[int]:
    """How many zones are active after each fault (for tests and the report)."""
    out, n = [], zones
    for f in schedule:
        n += 1 if f.kind == "add-zone" else -1 if f.kind in _SHRINKS else 0
        out.append(n)
    return out


async def replace_pool(fleet: LocalFleet, zone: LocalZone, size: int) -> None:
    """Destroy a (stopped) zone's pool and give it a new, empty one: a replaced disk."""
    await zone.pool.destroy(fleet.zfs)
    zone.pool = await localpool.create_pool(fleet.zfs, fleet.workdir / "pools", "zone",
                                            size=size, mounted=False)
    zone.root = f"{zone.pool.name}/snapper"


# -- the faults ------------------------------------------------------------------------


class Fault:
    name: ClassVar[str] = ""
    loss: ClassVar[bool] = False  # makes a zone unavailable: measure the way back

    def __init__(self, planned: PlannedFault, soak: Soak) -> None:
        self.planned = planned
        self.soak = soak
        self.record = FaultRecord(self.name, planned.at, 0.0, 0.0, loss=self.loss)

    async def inject(self) -> FaultRecord:
        self.record.started = self.soak.now()
        try:
            await self._inject()
        except Exception as exc:  # a fault that cannot be injected is a result too
            self.record.error = f"{type(exc).__name__}: {exc}"
        self.record.ended = self.soak.now()
        return self.record

    async def _inject(self) -> None:
        raise NotImplementedError

    def pick_zone(self, zones: Sequence[LocalZone]) -> LocalZone:
        if not zones:
            raise RuntimeError("no zone to pick")
        z = sorted(zones, key=lambda z: z.name)[self.planned.pick % len(zones)]
        self.record.target = z.name
        return z

    async def back_to_two(self, since: float, acked: list[tuple[str, str]]) -> None:
        """Record the seconds from ``since`` until ``acked`` are on two zones again."""
        done = await self.soak.wait_two_copies(acked, self.soak.settle_timeout)
        if done is None:
            self.record.error = self.record.error or "not back to two copies in time"
        else:
            self.record.back_to_two_s = round(done - since, 2)

    async def outage(self, zone: LocalZone, *, destroy: bool = False) -> None:
        """kill -9 ``zone`` (``destroy``: and replace its pool by an empty one), keep
        it down for the planned hold, start it again, measure the way back."""
        acked = self.soak.acked_keys()
        assert zone.daemon is not None
        t0 = time.monotonic()
        zone.daemon.kill()
        zone.daemon = None
        fleet = self.soak.fleet
        if destroy:
            self.soak.lost_zone(zone)
            await replace_pool(fleet, zone, self.soak.pool_size)
            self.record.detail = f"new pool {zone.pool.name}"
        await asyncio.sleep(self.planned.hold)  # the outage the workload lives through
        await fleet.start_zone(zone)
        await self.back_to_two(t0, acked)


class KillRestart(Fault):
    """kill -9 a zone daemon, leave it down a moment, start it again."""

    name = "kill-restart"
    loss = True

    async def _inject(self) -> None:
        await self.outage(self.pick_zone(self.soak.running_zones()))


class KillMidTransfer(Fault):
    """kill -9 a zone while it is receiving a stream (from a CN or its peer), so
    the receive is cut on the zone's side; start it again."""

    name = "kill-mid-transfer"
    loss = True

    async def _inject(self) -> None:
        zone, what = await self.soak.zone_receiving(timeout=60.0, pick=self.planned.pick)
        self.record.target, self.record.detail = zone.name, what
        await self.outage(zone)


class ReplaceZone(Fault):
    """kill -9 a zone and destroy its pool for good; a fresh zone with the same
    identity and an empty pool takes its place and is filled from the peers."""

    name = "replace-zone"
    loss = True

    async def _inject(self) -> None:
        zone = self.pick_zone(self.soak.running_zones())
        # Local acks on the victim alone are lost with it by definition: let the
        # peers catch up first, so what is lost is only what the loss itself costs.
        await self.soak.wait_two_copies(self.soak.acked_keys(), self.soak.settle_timeout)
        await self.outage(zone, destroy=True)


class Truncate(Fault):
    """A CN's next push stream is cut after a few KiB, as a dropped connection."""

    name = "truncate"

    async def _inject(self) -> None:
        cns = self.soak.fleet.cns
        cn = cns[self.planned.pick % len(cns)]
        self.record.target = cn.id
        cut = 4096 + (self.planned.pick * 37) % (64 << 10)
        self.record.detail = f"cut after {cut} bytes"
        rec = await self.soak.workload.cut_next_push(cn.id, cut, timeout=60.0)
        first = rec.attempts[0] if rec.attempts else "no error: the cut came after the end"
        self.record.detail += (f": {rec.vm[:8]}@{rec.snapshot} {first[:100]!r}, then "
                               + (f"acked on {len(rec.zones)} zone(s)" if rec.acked
                                  else f"failed: {rec.error[:80]!r}"))


class FillPool(Fault):
    """Fill a zone's pool (a reservation outside its delegated root) to just above
    the receive safety margin, hold it, release it."""

    name = "fill-pool"

    async def _inject(self) -> None:
        from snapper_zone.transfer.local import SPACE_MARGIN

        zone = self.pick_zone(self.soak.running_zones())
        zfs = self.soak.fleet.zfs
        filler = Dataset(zone.pool.name).child(FILLER)
        free = await zfs.available(Dataset(zone.pool.name))
        leave = SPACE_MARGIN + (256 << 10) + (self.planned.pick % 6) * (256 << 10)
        reserve = max(free - leave, 0)
        await zfs.create(filler, props={"reservation": str(reserve), "mountpoint": "none"})
        self.record.detail = f"reserved {reserve >> 20} MiB, left {leave >> 20} MiB free"
        try:
            await asyncio.sleep(2 * self.planned.hold)  # the full pool the workload meets
        finally:
            await zfs.destroy(filler)
        await self.back_to_two(time.monotonic(), self.soak.acked_keys())


class AddZone(Fault):
    name = "add-zone"

    async def _inject(self) -> None:
        fleet = self.soak.fleet
        zone = await fleet.add_zone(self.soak.pool_size)
        self.record.target = zone.name
        await fleet.start_zone(zone)
        await self.soak.wait_registered(zone)
        await self.back_to_two(time.monotonic(), self.soak.acked_keys())


class DrainZone(Fault):
    """Drain a zone; once it holds nothing, remove it and stop it."""

    name = "drain-zone"

    async def _inject(self) -> None:
        zone = self.pick_zone(self.soak.running_zones())
        t0 = time.monotonic()
        await self.soak.set_zone_state(zone, "draining")
        await self.soak.wait_empty(zone, min(self.soak.settle_timeout, 90.0))
        self.record.detail = f"drained in {time.monotonic() - t0:.1f}s"
        await self.soak.remove_zone(zone)


class LoseZone(Fault):
    """kill -9 a zone and destroy its pool; the coordinator finds it lost and
    restores two copies with no operator."""

    name = "lose-zone"
    loss = True

    async def _inject(self) -> None:
        zone = self.pick_zone(self.soak.running_zones())
        await self.soak.wait_two_copies(self.soak.acked_keys(), self.soak.settle_timeout)
        acked = self.soak.acked_keys()
        assert zone.daemon is not None
        t0 = time.monotonic()
        zone.daemon.kill()
        zone.daemon = None
        self.soak.lost_zone(zone, gone=True)
        await zone.pool.destroy(self.soak.fleet.zfs)
        await self.back_to_two(t0, acked)


class KillCoordinator(Fault):
    name = "kill-coordinator"

    async def _inject(self) -> None:
        fleet = self.soak.fleet
        # Several on one ZooKeeper store: the leader, so a follower must take over.
        c = await self.soak.leader()
        self.record.target = c.id
        fleet.stop_coordinator(kill=True, c=c)
        await asyncio.sleep(self.planned.hold)
        await fleet.start_coordinator(c)


class KillAgent(Fault):
    """SIGKILL a CN's ``snapper agent`` (mid-push when it gets to see one within a
    few ticks), leave it down for the hold, start it again on the same state file."""

    name = "kill-agent"

    async def _inject(self) -> None:
        a = self.soak.agents.pick(self.planned.pick)
        self.record.target = f"agent of {a.cn.id}"
        try:
            _, what = await self.soak.zone_receiving(
                timeout=4 * a.clock.every / a.clock.speed, pick=self.planned.pick, vm=a.vm)
            self.record.detail = f"mid-push: {what}"
        except TimeoutError:
            self.record.detail = "between pushes (none seen in flight)"
        a.kill()
        await asyncio.sleep(self.planned.hold)  # the agent's downtime: ticks fall due
        a.start()


class KillZoneMidSchedule(Fault):
    """kill -9 the zone an agent is pushing to (mid-push when one is seen, else the
    VM's primary), keep it down for the hold, start it again: the agent's pushes
    fail, back off and catch up."""

    name = "kill-zone-mid-schedule"
    loss = True

    async def _inject(self) -> None:
        a = self.soak.agents.pick(self.planned.pick)
        try:
            zone, what = await self.soak.zone_receiving(
                timeout=4 * a.clock.every / a.clock.speed, pick=self.planned.pick, vm=a.vm)
        except TimeoutError:
            targets = await self.soak.targets(a.vm)
            if not targets or targets[0].daemon is None:
                raise RuntimeError(f"no running zone holds {a.vm[:8]}") from None
            zone, what = targets[0], "between pushes (none seen in flight)"
        self.record.target, self.record.detail = zone.name, f"agent of {a.cn.id}: {what}"
        await self.outage(zone)


FAULTS: dict[str, type[Fault]] = {f.name: f for f in (
    KillRestart, KillMidTransfer, ReplaceZone, Truncate, FillPool, AddZone, DrainZone, LoseZone,
    KillCoordinator, KillAgent, KillZoneMidSchedule)}


# -- a stream cut as a crash would cut it ------------------------------------------


class _Cutting:
    """Writes through to ``chan`` until ``limit`` bytes, then drops the connection."""

    def __init__(self, chan: asyncssh.SSHClientChannel[bytes], limit: int,
                 conn: asyncssh.SSHClientConnection) -> None:
        self.chan, self.left, self.conn = chan, limit, conn

    def write(self, data: bytes) -> None:
        if self.left <= 0:
            raise ConnectionResetError("stream cut (fault injected)")
        if len(data) >= self.left:
            self.chan.write(data[: self.left])
            self.left = 0
            self.conn.abort()  # no EOF: the zone sees a truncated stream
            raise ConnectionResetError("stream cut (fault injected)")
        self.left -= len(data)
        self.chan.write(data)


class CuttingZoneClient(ZoneClient):
    """A ZoneClient whose next pushed stream is cut after ``cut_after`` bytes."""

    cut_after: int | None = None

    def stream_channel(self, chan: asyncssh.SSHClientChannel[bytes]) -> Channel:
        limit, self.cut_after = self.cut_after, None
        if limit is None or self.conn is None:
            return chan
        return _Cutting(chan, limit, self.conn)
