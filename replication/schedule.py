"""Which VM the replicator's loop reconciles next: pure, no I/O.

A zone that lost its peer re-copies every VM to the new one in a *round*,
which can take hours. A VM kicked meanwhile (a delete to pass on, a push whose
mirror failed) must not wait for the whole round: the loop used to reconcile
the kicked VMs only after every VM of the round was done, so a delete could
sit unmirrored for as long as a repair took. Here kicked VMs go before the
round's, each VM has one reconcile at a time (a kick while it runs reconciles
it once more afterwards: what it saw may predate the kick), and at most
``slots`` run at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["QueueCounts", "ReconcileQueue"]


@dataclass(frozen=True)
class QueueCounts:
    """The queue at a glance (``GET /v1/replication``, metrics)."""

    running: int
    kicked: int  # waiting, ahead of the round
    round: int  # waiting: what is left of the round

    def to_json(self) -> dict[str, int]:
        return {"running": self.running, "kicked": self.kicked, "round": self.round}


class ReconcileQueue:
    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, not {slots}")
        self.slots = slots
        # dicts as ordered sets: first in, first out.
        self._kicked: dict[str, None] = {}
        self._round: dict[str, None] = {}
        self._running: set[str] = set()

    def kick(self, vm: str) -> None:
        """Reconcile ``vm`` ahead of the round (it leaves the round: one reconcile
        covers both)."""
        self._round.pop(vm, None)
        self._kicked[vm] = None

    def add_round(self, vms: Iterable[str]) -> None:
        """Queue a round of ``vms`` behind what waits; a VM already waiting keeps
        its place, and one running now is reconciled again after it."""
        for vm in vms:
            if vm not in self._kicked:
                self._round.setdefault(vm, None)

    def take(self) -> str | None:
        """The next VM to reconcile (now running), or None: every slot is busy, or
        every VM that waits is running already."""
        if len(self._running) >= self.slots:
            return None
        for waiting in (self._kicked, self._round):
            for vm in waiting:
                if vm not in self._running:
                    del waiting[vm]
                    self._running.add(vm)
                    return vm
        return None

    def done(self, vm: str) -> None:
        """``vm``'s reconcile ended (however it ended)."""
        self._running.remove(vm)

    @property
    def round_left(self) -> bool:
        """Whether any VM of the current round still waits (the next round is
        not queued until none does, so rounds do not pile up)."""
        return bool(self._round)

    def counts(self) -> QueueCounts:
        return QueueCounts(len(self._running), len(self._kicked), len(self._round))
