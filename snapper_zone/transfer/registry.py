"""Transfers in flight: bytes, rate and ETA for ``GET /v1/transfers``.

Also the answer to "is this snapshot in use?": a snapshot that is the base
or the subject of a running transfer must not be deleted under it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from snapper_zone.common.metrics import Metrics
from snapper_zone.errors import SnapperError


class SnapshotInUse(SnapperError):
    """A delete of a snapshot a running transfer reads or builds on."""

    code = "ResourceBusy"
    http_status = 409


_ids = itertools.count(1)
# A client sends a VM snapshot's datasets one stream after the other, then
# commits, on the same connection or on another one (plain OpenSSH: one
# ``ssh`` per command). Until then its parts are pending (in use, not
# debris): a lease that ends at the commit, at a delete of the snapshot, or
# PENDING_TTL after its last part with no transfer of the VM from that sender
# running.
PENDING_TTL = 600.0
# Parts a peer zone sent (a tee, a copy for a move or a repair) are followed by
# its commit within seconds. Its link stays open for its other VMs, so the
# link's end does not say that a round which failed between two parts will
# never commit: after this long idle they are not awaited any more (reconcile
# completes them from a complete copy, or drops them as debris).
PEER_PENDING_TTL = 60.0


@dataclass
class Transfer:
    kind: str  # "receive" (CN push), "send" (restore), "mirror-in", "mirror-out"
    vm: str
    dataset: str
    snapshot: str
    base: str | None
    peer: str  # who is on the other end, e.g. "cn:<id>", "zone:<uuid>"
    expected: int | None = None  # bytes, when the sender said (send -n -P)
    id: int = field(default_factory=lambda: next(_ids))
    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    bytes: int = 0

    def add(self, n: int) -> None:
        self.bytes += n

    @property
    def elapsed(self) -> float:
        return max(time.monotonic() - self.started, 1e-6)

    @property
    def rate(self) -> float:
        return self.bytes / self.elapsed

    @property
    def eta(self) -> float | None:
        if not self.expected or self.rate <= 0:
            return None
        return max(self.expected - self.bytes, 0) / self.rate

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "vm": self.vm, "dataset": self.dataset,
                "snapshot": self.snapshot, "base": self.base, "peer": self.peer,
                "bytes": self.bytes, "expected": self.expected,
                "rate": round(self.rate), "eta": None if self.eta is None else round(self.eta, 1),
                "started": self.started_wall}


class TransferRegistry:
    def __init__(self, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.clock = clock
        self._active: dict[int, Transfer] = {}
        # (vm, snapshot) -> (when its last part arrived, who sent it), until it
        # is committed: a push between two datasets is in use, not debris.
        self._pending: dict[tuple[str, str], tuple[float, str]] = {}
        # (vm, snapshot) -> the connection it ends with: parts a peer teed here.
        self._bound: dict[tuple[str, str], int] = {}
        # open connections -> (who, how to keep one from idling): for --bind
        self._open: dict[int, tuple[str, Callable[[bool], None]]] = {}

    def start(self, kind: str, vm: str, dataset: str, snapshot: str, base: str | None,
              peer: str, expected: int | None = None) -> Transfer:
        t = Transfer(kind, vm, dataset, snapshot, base, peer, expected)
        self._active[t.id] = t
        self.metrics.active.labels(kind).inc()
        return t

    def finish(self, t: Transfer, result: str) -> None:
        """``result``: "ok" or an error code. Idempotent."""
        if self._active.pop(t.id, None) is None:
            return
        self.metrics.active.labels(t.kind).dec()
        self.metrics.transfers.labels(t.kind, result).inc()
        self.metrics.transfer_seconds.labels(t.kind).observe(t.elapsed)
        counter = self.metrics.bytes_sent if t.kind in ("send", "mirror-out") \
            else self.metrics.bytes_received
        counter.labels(t.kind).inc(t.bytes)

    @contextlib.contextmanager
    def running(self, t: Transfer, log: logging.Logger | logging.LoggerAdapter[logging.Logger],
                on_end: Callable[[str], None] | None = None) -> Iterator[Transfer]:
        """Record ``t`` (from ``start``) until the block ends; log its start and end.

        ``on_end(result)`` is told the result ("ok" or an error code)."""
        log.info("transfer start", extra={"base": t.base, "expected": t.expected})
        result = "error"
        try:
            yield t
            result = "ok"
        except SnapperError as err:
            result = err.code
            raise
        finally:
            self.finish(t, result)
            if on_end is not None:
                on_end(result)
            log.log(logging.INFO if result == "ok" else logging.WARNING, "transfer end", extra={
                "result": result, "bytes": t.bytes, "seconds": round(t.elapsed, 3),
                "mbps": round(t.rate / 1e6, 1)})

    def active(self) -> list[Transfer]:
        return sorted(self._active.values(), key=lambda t: t.id)

    def pending(self, vm: str, snapshot: str, source: str = "") -> None:
        """A part of ``snapshot`` arrived from ``source`` (a principal's label);
        its commit is to come: the lease starts (again) now."""
        self._pending[(vm, snapshot)] = (self.clock(), source)

    def bind(self, vm: str, snapshot: str, connection: int) -> None:
        """The pending ``snapshot`` ends with ``connection`` (see ``release``)."""
        self._bound[(vm, snapshot)] = connection

    def opened(self, connection: int, who: str, busy: Callable[[bool], None]) -> None:
        """``connection`` is ``who``'s; ``busy(True/False)`` holds it from idling."""
        self._open[connection] = (who, busy)

    def owner(self, connection: int) -> str | None:
        """Whose open connection this is (None: closed, or never opened)."""
        got = self._open.get(connection)
        return None if got is None else got[0]

    @contextlib.contextmanager
    def holding_open(self, connection: int) -> Iterator[None]:
        """``connection`` is not idle while the block runs (a stream bound to it
        runs on another connection; the commit will come on this one)."""
        got = self._open.get(connection)
        if got is not None:
            got[1](True)
        try:
            yield
        finally:
            now = self._open.get(connection)
            if got is not None and now is got:
                got[1](False)

    def release(self, connection: int) -> None:
        """``connection`` closed: what was bound to it is not awaited any more.

        Parts a peer zone teed here belong to its push, which ends with its
        link; a client's own push keeps its lease (commit from any connection).
        """
        self._open.pop(connection, None)
        for key, conn in list(self._bound.items()):
            if conn == connection:
                del self._bound[key]
                self._pending.pop(key, None)

    def committed(self, vm: str, snapshot: str) -> None:
        """The lease ends: committed, or the snapshot was deleted."""
        self._pending.pop((vm, snapshot), None)
        self._bound.pop((vm, snapshot), None)

    def pending_from(self, vm: str, source: str) -> bool:
        """Whether ``source`` sent parts of ``vm`` here whose commit is awaited."""
        return any(v == vm and src == source for (v, _s), (_, src) in self._pending.items())

    def abandoned(self, vm: str, source: str, busy: set[str]) -> list[str]:
        """Drop ``vm``'s snapshots pending from ``source`` that ``source`` itself no
        longer has in use or complete (``busy``): their push died there, so no
        commit will come. A mirror learns it from its primary's listing, since
        the primary's link to it stays open. The names dropped."""
        gone = [s for (v, s), (_, src) in self._pending.items()
                if v == vm and src == source and s not in busy]
        for s in gone:
            del self._pending[(vm, s)]
            self._bound.pop((vm, s), None)
        return gone

    def in_use(self, vm: str) -> set[str]:
        """Snapshot names of ``vm`` that a running transfer reads or builds on,
        and snapshots of pushes still between their parts."""
        now = self.clock()
        running = [t for t in self._active.values() if t.vm == vm]
        senders = {t.peer for t in running}
        for key, (when, src) in list(self._pending.items()):
            if key[0] == vm and src in senders:
                # Its sender is still sending (a later dataset, a later snapshot of
                # its chain): its earlier parts are still awaited. Another
                # sender's pushes of the VM say nothing about these.
                self._pending[key] = (now, src)
            elif now - when > (PEER_PENDING_TTL if src.startswith("zone:") else PENDING_TTL):
                del self._pending[key]
                self._bound.pop(key, None)
        names: set[str] = {s for (v, s) in self._pending if v == vm}
        for t in running:
            names.add(t.snapshot)
            if t.base:
                names.add(t.base)
        return names
