"""The replication loop's queue (``replication.schedule``), pure: any sequence of
kicks, rounds, starts and ends keeps its promises. A kicked VM goes before every
VM of the round, in the order kicked; no VM runs twice at once; no more than
``slots`` run; and nothing asked for is lost: every VM kicked or queued is
started after it was asked for, even one that was running then."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from replication.schedule import QueueCounts, ReconcileQueue

VMS = [f"vm{i}" for i in range(6)]
vms = st.sampled_from(VMS)


class QueueMachine(RuleBasedStateMachine):
    @initialize(slots=st.integers(1, 4))
    def start(self, slots: int) -> None:
        self.q = ReconcileQueue(slots)
        self.slots = slots
        self.running: set[str] = set()
        self.kicked: list[str] = []  # kicked, not started since: in the order kicked
        self.owed: set[str] = set()  # asked for (kick or round), not started since

    @rule(vm=vms)
    def kick(self, vm: str) -> None:
        self.q.kick(vm)
        if vm not in self.kicked:  # one already waiting keeps its place
            self.kicked.append(vm)
        self.owed.add(vm)

    @rule(round_=st.lists(vms, unique=True))
    def add_round(self, round_: list[str]) -> None:
        self.q.add_round(round_)
        self.owed |= set(round_)

    @rule()
    def take(self) -> None:
        vm = self.q.take()
        startable_kicked = [v for v in self.kicked if v not in self.running]
        if vm is None:
            # Nothing startable: every slot busy, or all that waits is running.
            assert len(self.running) == self.slots or not (self.owed - self.running)
            return
        assert vm not in self.running, "a VM reconciled twice at once"
        assert len(self.running) < self.slots
        assert vm in self.owed, "started a VM nobody asked for"
        if startable_kicked:
            assert vm == startable_kicked[0], "the round went before a kicked VM"
        self.running.add(vm)
        self.owed.discard(vm)
        if vm in self.kicked:
            self.kicked.remove(vm)

    @precondition(lambda self: bool(self.running))
    @rule(data=st.data())
    def done(self, data: st.DataObject) -> None:
        vm = data.draw(st.sampled_from(sorted(self.running)))
        self.q.done(vm)
        self.running.remove(vm)

    @invariant()
    def counts(self) -> None:
        c = self.q.counts()
        assert c.running == len(self.running) <= self.slots
        # Each VM waits once, whichever way it was asked for.
        assert c.kicked + c.round == len(self.owed)
        assert c.kicked == len(self.kicked)
        assert self.q.round_left == (c.round > 0)

    def teardown(self) -> None:
        # Nothing lost: run the queue dry, and every VM asked for has started.
        for _ in range(4 * len(VMS)):
            while (vm := self.q.take()) is not None:
                self.running.add(vm)
                self.owed.discard(vm)
            for vm in sorted(self.running):
                self.q.done(vm)
            self.running.clear()
        assert not self.owed, f"never started: {sorted(self.owed)}"
        assert self.q.counts() == QueueCounts(0, 0, 0)


QueueMachine.TestCase.settings = settings(max_examples=400, stateful_step_count=40,
                                          deadline=None)
test_queue_keeps_its_promises = QueueMachine.TestCase


def test_a_kick_while_running_reconciles_once_more_after() -> None:
    """A push lands while its VM's reconcile runs: what that reconcile saw may
    predate the push, so the VM runs again, but only once it has ended."""
    q = ReconcileQueue(2)
    q.add_round(["a"])
    assert q.take() == "a"
    q.kick("a")
    assert q.take() is None  # not beside itself
    q.done("a")
    assert q.take() == "a"


def test_a_round_does_not_pile_up_behind_a_long_one() -> None:
    q = ReconcileQueue(1)
    q.add_round(["a", "b", "c"])
    assert q.take() == "a"
    assert q.round_left
    q.add_round(["a", "b", "c"])  # a second round while the first runs
    assert q.counts() == QueueCounts(running=1, kicked=0, round=3)  # a again, b, c once
    q.kick("c")
    q.done("a")
    assert [q.take(), q.counts().to_json()] == ["c", {"running": 1, "kicked": 0, "round": 2}]


def test_slots_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ReconcileQueue(0)
