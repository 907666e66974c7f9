"""Executes planned moves: copy -> verify -> switch -> delete.

A move (``store.MoveRecord``) is ``planned``, then ``running`` at a step, then
``done`` or ``failed``.  The step is persisted *before* it runs, so after a
coordinator crash the scheduler picks every ``running`` move up again:

=========  ======================================  ================================
step       what it does                            after a crash
=========  ======================================  ================================
copy       ``POST source/v1/vms/{vm}/sync``         re-run the copy (idempotent: the
           ``{"peer": to_zone}``                   zone sends only what the peer lacks)
verify     every complete snapshot of the source   copy again, then verify
           is complete on ``to_zone`` with the
           same guid for every dataset
(switch)   placement ``(a, b) -> (other, to)`` and  atomic with the step change, so it
           the step ``delete``, one transaction;    either happened or did not (the
           then ``POST {other,to}/v1/vms/{vm}/      notice is best effort: not
           placement``: learn it now                repeated)
delete     ``DELETE from_zone/v1/vms/{vm}``         delete again (absent = done)
=========  ======================================  ================================

Roll back instead of resuming when the move no longer makes sense: ``to_zone``
is gone, lost or no longer active, the source is lost or holds no copy, or
the VM's placement no longer holds ``from_zone`` (someone else moved it); or
when copy/verify failed ``max_attempts`` times.  Rolling back marks the move
``failed`` and deletes ``to_zone``'s partial copy only if the placement does
not name ``to_zone`` for that VM and both placed zones answer with a copy: the
placement is untouched, so the VM keeps the two copies it had.  While a placed
zone is down the partial copy may be one of the two live copies; it is kept
(stale-copy reconciliation removes it once both placed copies answer).

Safety: nothing is deleted before the new copy is verified and the placement
switched; the delete step re-checks that the placement no longer names
``from_zone``; a lost ``from_zone`` (a repair) is never contacted.  Every
delete (the old copy, a rolled-back partial copy) needs both zones of the
placement to answer with a copy, neither of them suspect or lost (health
checks): a placed zone that is down does not count, so a delete never leaves
a VM with fewer than two copies on zones that answer.  Otherwise the copy is
kept (an extra copy is harmless).  So a VM never drops below the copies it had.

Concurrency: at most ``per_zone`` moves use a zone (as source or target) at
once, and one move per VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rebalance.metrics import CoordinatorMetrics
from rebalance.placement import ZoneState
from rebalance.store import (
    MoveRecord,
    MoveState,
    MoveStep,
    NotLeader,
    PlacementConflict,
    Store,
    ZoneRecord,
)
from rebalance.zoneclient import SnapshotView, ZoneApi
from snapper_zone.common.log import child
from snapper_zone.common.tasks import cancel_and_wait
from snapper_zone.errors import SnapperError

__all__ = ["Mover", "MoverSettings", "verify_copy"]

log = logging.getLogger("snapper.coordinator.mover")


def verify_copy(source: Sequence[SnapshotView], target: Sequence[SnapshotView]) -> list[str]:
    """What ``target`` lacks of ``source``'s complete snapshots (empty: verified).

    Compared by guid, dataset by dataset; names only pair them up.  The
    source's incomplete snapshots are pushes in flight, not yet owed.
    """
    have = {s.name: s for s in target}
    problems = []
    for s in source:
        if not s.complete:
            continue
        t = have.get(s.name)
        if t is None:
            problems.append(f"{s.name}: missing")
        elif not t.complete:
            problems.append(f"{s.name}: incomplete")
        elif dict(t.guids) != dict(s.guids):
            problems.append(f"{s.name}: guids differ")
    return problems


# Sync states after which verify decides: "blocked" and "behind" mean pushes in
# flight kept the pair from being exactly equal, not that the copy failed;
# verify asks only for what the source holds complete.
_COPIED = frozenset({"in_sync", "blocked", "behind"})


class _Retry(Exception):
    """A transient failure: try the move again later."""


class _Rollback(Exception):
    """The move no longer makes sense: give it up, keep the old placement."""


@dataclass(frozen=True)
class MoverSettings:
    per_zone: int = 2
    max_attempts: int = 5
    retry_delay: float = 10.0
    progress_interval: float = 5.0
    bandwidth: float = 0.0  # bytes/s of move traffic per zone; 0: unlimited

    @property
    def per_move_bwlimit(self) -> float | None:
        # At most per_zone moves use a zone at once, so each gets its share.
        return self.bandwidth / self.per_zone if self.bandwidth > 0 else None


class Mover:
    def __init__(self, store: Store, api: ZoneApi, settings: MoverSettings | None = None,
                 metrics: CoordinatorMetrics | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.api = api
        self.settings = settings or MoverSettings()
        self.metrics = metrics or CoordinatorMetrics()
        self.clock = clock
        self._wake = asyncio.Event()
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._busy: Counter[str] = Counter()
        self._vms: set[str] = set()
        self._not_before: dict[int, float] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self.peak_busy: Counter[str] = Counter()  # most moves seen at once per zone

    # -- scheduling --

    def kick(self) -> None:
        """Look for moves to start (after a plan, a finished move, a retry delay)."""
        self._wake.set()

    async def run(self) -> None:
        """The scheduler loop; cancel it to stop (moves in flight are cancelled too)."""
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                try:
                    await self.schedule()
                except Exception:
                    log.exception("move scheduling failed; retrying")
                    asyncio.get_running_loop().call_later(self.settings.retry_delay, self.kick)
        finally:
            for t in list(self._tasks.values()):
                t.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def schedule(self) -> list[int]:
        """Start what the limits allow; the ids of the moves started."""
        started = []
        now = time.monotonic()
        moves = await self.store.moves([MoveState.RUNNING, MoveState.PLANNED])
        # Resumed moves first, then the plan's order (ids follow it).
        moves.sort(key=lambda m: (m.state is not MoveState.RUNNING, m.id))
        limit = self.settings.per_zone
        for m in moves:
            if m.id in self._tasks or m.vm in self._vms:
                continue
            if self._not_before.get(m.id, 0.0) > now:
                continue
            zones = {m.source, m.to_zone}
            if any(self._busy[z] >= limit for z in zones):
                continue
            for z in zones:
                self._busy[z] += 1
                self.peak_busy[z] = max(self.peak_busy[z], self._busy[z])
            self._vms.add(m.vm)
            self._idle.clear()
            task = asyncio.create_task(self._guarded(m, zones), name=f"move-{m.id}")
            self._tasks[m.id] = task
            started.append(m.id)
        return started

    async def _guarded(self, m: MoveRecord, zones: set[str]) -> None:
        try:
            await self.execute(m)
        except asyncio.CancelledError:
            raise
        except NotLeader as e:
            # Fenced: this term is over and the step wrote nothing; the new
            # leader resumes the move from its persisted step.
            log.warning("move left to the new leader", extra={"move": m.id, "err_msg": str(e)})
            self._later(m.id)  # not again at once: this term is ending
        except Exception:
            log.exception("move failed unexpectedly; will retry", extra={"move": m.id})
            self._later(m.id)
        finally:
            for z in zones:
                self._busy[z] -= 1
            self._vms.discard(m.vm)
            del self._tasks[m.id]
            if not self._tasks:
                self._idle.set()
            self.kick()

    def _later(self, move_id: int) -> None:
        delay = self.settings.retry_delay
        self._not_before[move_id] = time.monotonic() + delay
        with contextlib.suppress(RuntimeError):  # no loop: nothing to wake
            asyncio.get_running_loop().call_later(delay, self.kick)

    async def wait_idle(self) -> None:
        """Until no move task is running (tests, shutdown)."""
        await self._idle.wait()

    # -- one move --

    async def execute(self, m: MoveRecord) -> MoveRecord:
        """Run ``m`` from its persisted step until it is done, failed, or must wait."""
        mlog = child(log, move=m.id, vm=m.vm, to_zone=m.to_zone, from_zone=m.from_zone)
        now = self.clock
        if m.state is MoveState.PLANNED:
            m = await self.store.update_move(m.id, now(), state=MoveState.RUNNING,
                                             step=MoveStep.COPY, attempt=True)
            mlog.info("move started", extra={"reason": m.reason, "bytes": m.bytes})
        elif m.state is MoveState.RUNNING:
            m = await self.store.update_move(m.id, now(), attempt=True)
            mlog.info("move resumed", extra={"step": str(m.step), "attempt": m.attempts})
        else:
            return m
        try:
            if m.step is not MoveStep.DELETE:
                m = await self._copy_verify_switch(m)
            return await self._delete_old(m)
        except _Retry as e:
            if m.step is not MoveStep.DELETE and m.attempts >= self.settings.max_attempts:
                return await self._roll_back(m, f"gave up after {m.attempts} attempts: {e}")
            mlog.warning("move step failed; will retry", extra={"err_msg": str(e)})
            m = await self.store.update_move(m.id, now(), error=str(e))
            self._later(m.id)
            return m
        except _Rollback as e:
            return await self._roll_back(m, str(e))

    async def _zones(self) -> dict[str, ZoneRecord]:
        return {z.uuid: z for z in await self.store.zones()}

    async def _check(self, m: MoveRecord) -> tuple[tuple[str, str], ZoneRecord, ZoneRecord]:
        """The placement now and the two zones, or why the move must roll back."""
        zones = await self._zones()
        to, src = zones.get(m.to_zone), zones.get(m.source)
        if to is None or to.state is not ZoneState.ACTIVE:
            raise _Rollback(f"target zone {m.to_zone} is "
                            f"{'gone' if to is None else to.state}")
        if src is None or src.state is ZoneState.LOST:
            raise _Rollback(f"source zone {m.source} is {'gone' if src is None else 'lost'}")
        pair = await self.store.placement(m.vm)
        if pair is None:
            raise _Rollback("the VM has no placement any more")
        if m.to_zone in pair:
            raise _Rollback(f"the placement {pair} already names the target")
        if m.from_zone is not None and m.from_zone not in pair:
            raise _Rollback(f"the placement {pair} no longer names {m.from_zone}")
        return pair, src, to

    async def _copy_verify_switch(self, m: MoveRecord) -> MoveRecord:
        pair, src, to = await self._check(m)
        if m.step is not MoveStep.COPY:
            m = await self.store.update_move(m.id, self.clock(), step=MoveStep.COPY)
        await self._copy(m, src)
        m = await self.store.update_move(m.id, self.clock(), step=MoveStep.VERIFY,
                                         progress=m.bytes)
        await self._verify(m, src, to)
        pair, src, to = await self._check(m)  # nothing changed under us while copying
        other = next((z for z in pair if z != m.from_zone), pair[0]) \
            if m.from_zone is not None else m.source
        try:
            m = await self.store.switch_placement(m.id, m.vm, pair, (other, m.to_zone),
                                                  self.clock())
        except PlacementConflict as e:
            raise _Rollback(str(e)) from e
        log.info("placement switched", extra={"move": m.id, "vm": m.vm,
                                              "placement": [other, m.to_zone]})
        await self._tell_switched(m, (other, m.to_zone))
        return m

    async def _tell_switched(self, m: MoveRecord, pair: tuple[str, str]) -> None:
        """Have both zones of the new pair learn it now, not when their cached
        answer expires: until then the staying zone mirrors to the old copy, and
        through a coordinator outage that starts meanwhile it would go on doing
        so. Best effort: a zone that does not answer learns at its next lookup,
        and the delete step sends on what reached the old copy."""
        zones = await self._zones()
        for z in pair:
            rec = zones.get(z)
            if rec is None:
                continue
            try:
                await self.api.relearn_placement(rec.http_url, m.vm)
            except SnapperError as e:
                log.info("zone did not re-learn the placement; it will at its next lookup",
                         extra={"move": m.id, "vm": m.vm, "zone": z, "error": e.message})

    async def _copy(self, m: MoveRecord, src: ZoneRecord) -> None:
        poll = asyncio.create_task(self._track_progress(m, src))
        try:
            res = await self.api.sync(src.http_url, m.vm, m.to_zone,
                                      self.settings.per_move_bwlimit)
        except SnapperError as e:
            raise _Retry(f"copy: {e}") from e
        finally:
            await cancel_and_wait(poll)
        if res.state not in _COPIED:
            raise _Retry(f"copy: {res.state}" + (f": {res.error}" if res.error else ""))

    async def _track_progress(self, m: MoveRecord, src: ZoneRecord) -> None:
        # Best effort: the zone's transfers in flight; the copy itself is the truth.
        best = m.progress
        while True:
            await asyncio.sleep(self.settings.progress_interval)
            with contextlib.suppress(SnapperError, ValueError, KeyError, TypeError):
                sent = await self.api.sending(src.http_url, m.vm, m.to_zone)
                if sent > best:
                    best = min(sent, m.bytes)
                    await self.store.update_move(m.id, self.clock(), progress=best)

    async def _verify(self, m: MoveRecord, src: ZoneRecord, to: ZoneRecord) -> None:
        try:
            have = await self.api.snapshots(src.http_url, m.vm)
            got = await self.api.snapshots(to.http_url, m.vm)
        except SnapperError as e:
            raise _Retry(f"verify: {e}") from e
        if have is None:
            raise _Rollback(f"source zone {m.source} holds no copy of the VM")
        problems = verify_copy(have, got or [])
        if got is None:
            problems = ["no copy at all"]
        if problems:
            raise _Retry("verify: target " + "; ".join(problems[:5]))

    async def _delete_old(self, m: MoveRecord) -> MoveRecord:
        zones = await self._zones()
        old = zones.get(m.from_zone) if m.from_zone is not None else None
        if old is not None and old.state is not ZoneState.LOST:
            pair = await self.store.placement(m.vm)
            if pair is not None and m.from_zone in pair:
                # Someone placed it back there: its copy counts again; keep it.
                return await self._finish(m, MoveState.DONE,
                                          f"old copy on {m.from_zone} kept: placed there again")
            to = zones.get(m.to_zone)
            if to is None or to.state is ZoneState.LOST:
                raise _Retry(f"delete: the new copy's zone {m.to_zone} is gone")
            down = self._placed_down(pair, zones)
            if down is not None or pair is None:
                # The old copy is one of the two live ones until that zone is back;
                # waiting would keep the VM busy, out of the loss repair's reach.
                return await self._finish(m, MoveState.DONE,
                                          f"old copy on {m.from_zone} kept: {down}")
            held: list[SnapshotView] = []
            for z in sorted(pair, key=lambda z: z == m.to_zone):  # the new copy last
                try:
                    got = await self.api.snapshots(zones[z].http_url, m.vm)
                except SnapperError:
                    got = None
                if got is None:
                    # Until both answer with a copy, the old copy may be the second one.
                    why = f"delete: the {'new' if z == m.to_zone else 'placed'} copy " \
                        f"on {z} does not answer"
                    if z != m.to_zone and m.attempts >= self.settings.max_attempts:
                        return await self._finish(m, MoveState.DONE,
                                                  f"old copy on {m.from_zone} kept: {why}")
                    raise _Retry(why)
                held = got
            try:
                held = await self._caught_up(m, old, to, held)
                # The zone re-checks under its VM lock: a push that reached the old
                # copy after we looked (its primary had not yet seen the switch)
                # keeps it until the new copy holds that snapshot too.
                await self.api.delete_vm(old.http_url, m.vm, elsewhere=held)
            except SnapperError as e:
                if m.attempts >= self.settings.max_attempts:
                    # An extra copy is harmless; reconciling stale copies removes it.
                    return await self._finish(m, MoveState.DONE,
                                              f"old copy on {m.from_zone} not deleted: {e}")
                raise _Retry(f"delete: {e}") from e
        return await self._finish(m, MoveState.DONE, None)

    async def _caught_up(self, m: MoveRecord, old: ZoneRecord, to: ZoneRecord,
                         held: list[SnapshotView]) -> list[SnapshotView]:
        """The new copy's snapshots (``held``), once it holds every complete one the
        old copy has.

        Until the VM's primary learns the new placement it may go on mirroring
        pushes to the old copy; those are sent on from the old copy first.
        """
        mine = await self.api.snapshots(old.http_url, m.vm) or []
        if verify_copy(mine, held):
            res = await self.api.sync(old.http_url, m.vm, m.to_zone,
                                      self.settings.per_move_bwlimit)
            if res.state not in _COPIED:
                raise _Retry(f"delete: catching up the new copy: {res.state}")
            held = await self.api.snapshots(to.http_url, m.vm) or []
        return held

    @staticmethod
    def _placed_down(pair: tuple[str, str] | None,
                     zones: dict[str, ZoneRecord]) -> str | None:
        """Why a copy on a zone outside ``pair`` may be one of the VM's two live
        copies, as the zone records tell (None: both placed zones look up)."""
        if pair is None:
            return "the VM has no placement"
        for z in pair:
            rec = zones.get(z)
            if rec is None:
                return f"placed zone {z} is gone"
            if rec.state is ZoneState.LOST or rec.suspect_since is not None:
                return f"placed zone {z} is {rec.health}"
        return None

    async def _placed_silent(self, vm: str, pair: tuple[str, str] | None,
                             zones: dict[str, ZoneRecord]) -> str | None:
        """Why not both placed zones answer with a copy of ``vm`` (None: they do)."""
        if pair is None:
            return "the VM has no placement"
        for z in pair:
            try:
                held = await self.api.snapshots(zones[z].http_url, vm)
            except SnapperError as e:
                return f"placed zone {z} does not answer: {e}"
            if held is None:
                return f"placed zone {z} holds no copy"
        return None

    async def _finish(self, m: MoveRecord, state: MoveState, error: str | None) -> MoveRecord:
        m = await self.store.update_move(m.id, self.clock(), state=state, error=error,
                                         clear_error=error is None)
        self._not_before.pop(m.id, None)
        result = "done" if state is MoveState.DONE else "failed"
        self.metrics.moves.labels(m.reason, result).inc()
        if state is MoveState.DONE:
            self.metrics.bytes_moved.inc(m.bytes)
        log.info(f"move {result}", extra={"move": m.id, "vm": m.vm, "error": error})
        return m

    async def _roll_back(self, m: MoveRecord, why: str) -> MoveRecord:
        zones = await self._zones()
        to = zones.get(m.to_zone)
        pair = await self.store.placement(m.vm)
        if to is not None and to.state is not ZoneState.LOST and (
                pair is None or m.to_zone not in pair):
            # Left for stale-copy reconciliation when kept; the placement never named it.
            keep = self._placed_down(pair, zones) or await self._placed_silent(m.vm, pair,
                                                                                zones)
            if keep is not None:
                why += f" (partial copy on {m.to_zone} kept: {keep})"
            else:
                assert pair is not None  # _placed_silent says both placed zones answered
                try:
                    # The placed copy's listing: the zone drops the partial copy
                    # only if it holds nothing beyond it (never the last copy).
                    held = await self.api.snapshots(zones[pair[0]].http_url, m.vm) or []
                    await self.api.delete_vm(to.http_url, m.vm, elsewhere=held)
                except SnapperError as e:
                    why += f" (partial copy on {m.to_zone} not removed: {e})"
        log.warning("move rolled back", extra={"move": m.id, "vm": m.vm, "why": why})
        return await self._finish(m, MoveState.FAILED, why)
