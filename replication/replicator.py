"""Keep every VM on this zone in step with its peer: rounds of reconcile, a loop.

A *round* lists both zones (``snapshots VM``), asks ``reconcile`` what to do
and runs it (``Executor``); rounds repeat until the plan is empty, so a
snapshot that arrives meanwhile is picked up too. A round that cannot reach
the peer is retried with backoff (tenacity) and then left to the next pass
of the loop, which visits every VM each ``reconcile_interval_ms`` and at once
after a push or a delete (``kick``). Both zones of a pair run the loop; every
step is vetted by the receiving zone and checked by guid, so rounds started
from both ends at once cost a retry, never a snapshot.

Per VM the last outcome is kept for ``GET /v1/replication`` and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from replication.executor import Executor, NeedsOperator
from replication.inventory import from_document, snapshot_guids
from replication.peers import Peer, PeerLinks, unreachable
from replication.pipeline import Pipeliner
from replication.reconcile import (
    Conflict,
    Defer,
    InSync,
    ZoneInventory,
    expired,
    fills,
    holds_complete,
    lag,
    reconcile,
    still_awaited,
    tombstones_to_adopt,
)
from replication.schedule import ReconcileQueue
from snapper_zone.common.tasks import cancel_and_wait
from snapper_zone.errors import DatasetNotFound, SnapperError
from snapper_zone.wire import Inventory

if TYPE_CHECKING:
    from replication.zone import LocalZone

__all__ = ["MAX_ROUNDS", "MirrorUnavailable", "Replicator", "VmState"]

MAX_ROUNDS = 4


# Error codes that mean "the VM changed under the plan", not "something is wrong".
_RACES = frozenset({"ResourceExists", "IncrementalSourceMismatch", "PartialReceiveExists",
                    "ResourceBusy", "DestinationModified", "ResourceNotFound",
                    "PartComplete", "PartDeleted"})


def _histories(inv: ZoneInventory) -> dict[str, list[str]]:
    """dataset -> ["name:guid(hex)[?]"] oldest first; "?" marks an incomplete part."""
    return {ds: [f"{s.name}:{s.guid:x}{'' if s.complete else '?'}" for s in inv.snaps(ds)]
            for ds in sorted(inv.datasets)}


def _code(exc: SnapperError) -> str:
    return str(getattr(exc, "code", ""))


class MirrorUnavailable(SnapperError):
    """A ``mirrored`` push could not be confirmed on the peer zone."""

    code = "MirrorUnavailable"
    http_status = 503


@dataclass
class VmState:
    vm: str
    peer: str | None
    state: str = "unknown"  # in_sync | behind | failing | blocked | no_peer | unknown
    behind_snapshots: int = 0
    behind_bytes: int = 0
    last_sync: float | None = None  # unix time of the last finished round set
    last_error: str | None = None
    last_failure: float | None = None  # unix time
    notices: list[str] = field(default_factory=list)
    rounds: int = 0
    # The peer's listing from the round that found the pair in step (this sync only).
    peer_view: ZoneInventory | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "peer": self.peer, "state": self.state,
                "behind": {"snapshots": self.behind_snapshots, "bytes": self.behind_bytes},
                "last_sync": self.last_sync, "last_error": self.last_error,
                "notices": self.notices}


class Replicator:
    def __init__(self, zone: LocalZone, links: PeerLinks) -> None:
        self.zone = zone
        self.links = links
        self.log = zone.log
        self.states: dict[str, VmState] = {}
        self._vm_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # VMs reconciled at once by the loop (a CN's push has priority over them).
        self.queue = ReconcileQueue(zone.config.reconcile_concurrency)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lag: dict[str, tuple[int, int]] = {}
        self.pipeliner = Pipeliner(zone, links, self.failing_since, self.kick)

    @property
    def me(self) -> str:
        return self.zone.config.uuid

    # -- one VM --------------------------------------------------------------------

    async def sync_vm(self, vm: str, peer_uuid: str | None = None,
                      bwlimit: float | None = None) -> VmState:
        """Reconcile ``vm`` with its peer (or ``peer_uuid``) until in step or failing.

        ``bwlimit`` (bytes/s) paces the streams this zone sends (a coordinator's
        move keeps room for the zones' other traffic).
        """
        if peer_uuid is not None and peer_uuid not in {p.uuid for p in self.links.peers}:
            await self.links.refresh()  # a zone the coordinator added since we last asked
        peer = self.links.get(peer_uuid) if peer_uuid else await self.links.partner_or_why(vm)
        st = self.states.setdefault(vm, VmState(vm, None if isinstance(peer, str) else peer.uuid))
        if isinstance(peer, str):
            st.state, st.last_error = "no_peer", peer
            return st
        st.peer = peer.uuid
        async with self._vm_locks[vm]:
            st.peer_view = None
            try:
                async for attempt in AsyncRetrying(
                        retry=retry_if_exception(unreachable), stop=stop_after_attempt(3),
                        wait=wait_exponential(multiplier=0.2, max=5), reraise=True):
                    with attempt:
                        await self._rounds(vm, peer, st, peer_uuid is not None, bwlimit)
            except SnapperError as exc:
                self._failed(st, exc)
                if unreachable(exc):
                    await self.links.forget(peer.uuid)
            except (OSError, TimeoutError) as exc:
                self._failed(st, exc)
                await self.links.forget(peer.uuid)
        return st

    async def _not_placed(self, vm: str, local: Inventory, remote: Inventory,
                          peer: str) -> bool:
        """Whether a round would create a copy on a zone the VM is not placed on."""
        coordinator = self.links.coordinator
        if coordinator is None:
            return False  # static pairs: both zones hold the VM by definition
        empty = [z for z, doc in ((self.me, local), (peer, remote)) if not doc.snapshots]
        if not empty:
            return False
        pair = await coordinator.placement(vm, fresh=True)
        return pair is not None and any(z not in pair for z in empty)

    async def _placed_here(self, vm: str) -> bool:
        """Whether the coordinator places ``vm`` on this zone (asked afresh: a
        move may have just switched it); True without a coordinator's answer."""
        coordinator = self.links.coordinator
        if coordinator is None:
            return True
        pair = await coordinator.placement(vm, fresh=True)
        return pair is None or self.me in pair

    def failing_since(self, vm: str) -> float | None:
        """When ``vm``'s replication last failed, if it is failing now."""
        st = self.states.get(vm)
        return st.last_failure if st is not None and st.state == "failing" else None

    def _failed(self, st: VmState, exc: BaseException) -> None:
        st.state = "failing"
        st.last_failure = time.time()
        st.last_error = f"{getattr(exc, 'code', type(exc).__name__)}: {exc}"
        self.zone.metrics.reconcile_runs.labels("failed").inc()
        self.log.warning("reconcile failed", extra={"vm": st.vm, "peer": st.peer,
                                                    "error": st.last_error})

    async def _rounds(self, vm: str, peer: Peer, st: VmState, explicit: bool,
                      bwlimit: float | None = None) -> None:
        client = await self.links.client(peer.uuid)
        store = self.zone.store
        for _ in range(MAX_ROUNDS):
            local = await store.document(vm)
            a, stones_a = from_document(self.me, local)
            remote = await client.inventory(vm)
            b, stones_b = from_document(peer.uuid, remote)
            if not explicit and await self._not_placed(vm, local, remote, peer.uuid):
                # One side holds nothing of this VM and the coordinator does not
                # place it there (a move just took it away): never recreate it.
                st.state, st.last_error = "not_placed", None
                return
            stones = [*stones_a, *stones_b]
            await self._adopt_tombstones(
                vm, tombstones_to_adopt(stones_a, stones_b, bool(local.snapshots)))
            theirs = set(remote.in_use)
            # Parts the peer teed to us for a push that then died there are
            # debris (``reconcile.still_awaited``).
            source = f"zone:{peer.uuid}"
            placed: bool | None = None  # asked of the coordinator at most once a round
            if self.zone.transfers.pending_from(vm, source):
                placed = await self._placed_here(vm)
            busy = still_awaited(theirs, {x.name for x in remote.snapshots if x.complete},
                                 placed)
            dropped = self.zone.transfers.abandoned(vm, source, busy)
            if dropped:
                self.log.info("parts of a push that ended on the peer are debris now",
                              extra={"vm": vm, "peer": peer.uuid, "snapshots": dropped})
            in_use = self.zone.transfers.in_use(vm) | theirs
            actions = reconcile(a, b, stones, in_use)
            notices = [x for x in actions if isinstance(x, Conflict | Defer)]
            steps = [x for x in actions if not isinstance(x, Conflict | Defer | InSync)]
            if not explicit and any(fills(x, self.me) for x in steps):
                if placed is None:
                    placed = await self._placed_here(vm)
                if not placed:
                    # A move's target (the move's source fills it; both at once
                    # only race) or a copy about to be dropped: send, never take.
                    steps = [x for x in steps if not fills(x, self.me)]
                    if not steps:
                        st.state, st.last_error = "not_placed", None
                        return
            st.rounds += 1
            if not steps:
                gone = expired(a, b, stones_a, time.time())
                if gone:
                    await store.forget_tombstones(vm, sorted(gone))
                self._settled(st, a, b, notices)
                return
            ex = Executor(self.zone, vm, peer.uuid, client, bwlimit=bwlimit)
            try:
                for step in steps:
                    await ex.run(step)
            except NeedsOperator:
                # What an operator needs to decide: both histories, by name and guid.
                self.log.warning("histories diverged", extra={
                    "vm": vm, "peer": peer.uuid, "here": _histories(a), "there": _histories(b),
                    "tombstones": sorted(f"{t.guid:x}" for t in stones),
                    "in_use": sorted(in_use)})
                raise
            except SnapperError as exc:
                if _code(exc) not in _RACES:
                    raise
                # The other zone (its own round, or a CN push) changed the VM
                # since we listed it: list again and plan from what is there.
                self.log.info("reconcile step raced; planning again", extra={
                    "vm": vm, "peer": peer.uuid, "error": str(exc)})
            self.zone.metrics.reconcile_runs.labels("acted").inc()
        st.state = "behind"
        st.last_error = f"not in step after {MAX_ROUNDS} rounds (new snapshots keep coming?)"

    async def _adopt_tombstones(self, vm: str, theirs: dict[int, int]) -> None:
        """Keep the peer's tombstones ``theirs`` here too (``reconcile.tombstones_to_adopt``)."""
        if theirs:
            with contextlib.suppress(DatasetNotFound):  # dropped meanwhile
                if await self.zone.store.merge_tombstones(vm, theirs):
                    self.log.info("adopted the peer's tombstones", extra={
                        "vm": vm, "tombstones": sorted(f"{g:x}" for g in theirs)})

    def _settled(self, st: VmState, a: ZoneInventory, b: ZoneInventory,
                 notices: list[Conflict | Defer]) -> None:
        behind, size = lag(a, b)
        st.behind_snapshots, st.behind_bytes = behind, size
        st.notices = [f"{type(n).__name__}: {n.dataset}: "
                      f"{n.detail if isinstance(n, Conflict) else n.reason}" for n in notices]
        st.peer_view = b
        st.state = "blocked" if notices else "in_sync"
        if notices:
            self.log.info("reconcile waits", extra={"vm": st.vm, "peer": st.peer,
                                                    "notices": st.notices})
        st.last_error = None
        st.last_sync = time.time()
        self.zone.metrics.reconcile_runs.labels(st.state).inc()
        self._publish_lag(st)

    def _publish_lag(self, st: VmState) -> None:
        if st.peer is None:
            return
        self._lag[st.vm] = (st.behind_snapshots, st.behind_bytes)
        per_peer: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for vm, (n, size) in self._lag.items():
            p = self.states[vm].peer
            if p is not None:
                per_peer[p][0] += n
                per_peer[p][1] += size
        for p, (n, size) in per_peer.items():
            self.zone.metrics.lag_snapshots.labels(p).set(n)
            self.zone.metrics.lag_bytes.labels(p).set(size)

    async def confirm_mirrored(self, vm: str, name: str, parts: Mapping[str, int],
                               timeout: float) -> tuple[str | None, str | None]:
        """Make the peer hold VM snapshot ``name`` with ``parts``' guids, complete.

        Returns (peer uuid, None) when it does (``reconcile.holds_complete`` on the
        peer's listing), (peer uuid or None, why not) otherwise.
        """
        peer = await self.links.partner_or_why(vm, fresh=True)
        if isinstance(peer, str):
            return None, peer
        try:
            async with asyncio.timeout(timeout):
                st = await self.sync_vm(vm, peer.uuid)
        except TimeoutError:
            return peer.uuid, f"no answer within {timeout:.0f} s"
        b = st.peer_view  # the last round listed the peer: no need to ask again
        if b is None:
            try:
                client = await self.links.client(peer.uuid)
                b, _ = from_document(peer.uuid, await client.inventory(vm))
            except (SnapperError, OSError) as exc:
                return peer.uuid, st.last_error or str(exc)
        if holds_complete(b, name, parts):
            return peer.uuid, None
        return peer.uuid, st.last_error or "the peer does not hold the snapshot complete"

    # -- the loop --------------------------------------------------------------------

    async def follow_delete(self, vm: str, name: str, timeout: float) -> bool:
        """Carry a delete's tombstone to the peer now; True if the peer no longer
        holds ``name`` within ``timeout``.

        A tombstone lives on the zone that took the delete: were that zone lost
        before the peer followed, the deleted snapshot would come back from the
        peer. The sync goes on in the background after ``timeout``.
        """
        task = asyncio.ensure_future(self.sync_vm(vm))
        try:
            async with asyncio.timeout(timeout):
                st = await asyncio.shield(task)
        except TimeoutError:
            return False
        return st.peer_view is not None and not snapshot_guids(st.peer_view, name,
                                                                complete_only=False)

    def kick(self, vm: str) -> None:
        """Reconcile ``vm`` soon (after a push or a delete), ahead of what is left of
        the loop's round, without waiting for it."""
        self.queue.kick(vm)
        self._wake.set()

    def start(self) -> None:
        """Run the loop (registration with a coordinator is ``registration.Registrar``'s)."""
        if self._task is None and (self.links.peers or self.links.coordinator):
            self._task = asyncio.create_task(self._loop(), name="replicator")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        await self.links.close()

    async def _loop(self) -> None:
        interval = self.zone.config.reconcile_interval_ms / 1000
        next_full = time.monotonic()
        queue = self.queue

        async def one(vm: str) -> None:
            try:
                await self.sync_vm(vm)
            except Exception:  # a bug must not stop replication of every other VM
                self.log.exception("reconcile crashed", extra={"vm": vm})
            finally:
                queue.done(vm)
                self._queue_metrics()
                self._wake.set()

        # Cancelling the loop (stop) cancels the reconciles it runs.
        async with asyncio.TaskGroup() as running:
            while True:
                now = time.monotonic()
                # A new round once the last one has started every VM: a round longer
                # than the interval (a repair) runs on rather than piling up.
                if now >= next_full and not queue.round_left:
                    await self.links.refresh()
                    try:
                        queue.add_round(sorted(await self.zone.store.vms()))
                    except SnapperError as exc:
                        self.log.warning("cannot list VMs: %s", exc)
                    # Jitter keeps the two zones of a pair from starting rounds in lockstep.
                    next_full = now + interval * random.uniform(0.8, 1.2)
                self._wake.clear()
                while (vm := queue.take()) is not None:
                    running.create_task(one(vm), name=f"reconcile {vm}")
                self._queue_metrics()
                # A kick or a reconcile's end wakes the loop; a round's time, too,
                # once no VM of the last one waits.
                wait = None if queue.round_left else max(next_full - time.monotonic(), 0.01)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()

    def _queue_metrics(self) -> None:
        counts = self.queue.counts()
        m = self.zone.metrics
        m.reconcile_running.set(counts.running)
        m.reconcile_waiting.labels("kicked").set(counts.kicked)
        m.reconcile_waiting.labels("round").set(counts.round)

    def report(self) -> dict[str, Any]:
        return {"zone": self.me,
                "peers": [{"uuid": p.uuid, "ssh": f"{p.ssh_host}:{p.ssh_port}",
                           "http_url": p.http_url} for p in self.links.peers],
                "queue": self.queue.counts().to_json(),
                "vms": [s.to_json() for _, s in sorted(self.states.items())]}

