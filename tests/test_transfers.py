"""When a snapshot's parts stop being awaited (``TransferRegistry``): pure, no I/O."""

from __future__ import annotations

import pytest

from snapper_zone.common.metrics import Metrics
from snapper_zone.transfer import registry as transfers
from snapper_zone.transfer.registry import TransferRegistry

VM, OTHER = "74c59c61-4559-4ca2-b1ef-0ca22f2f936a", "7250abe7-581d-4b91-9ae1-5601a17f5dff"


@pytest.fixture
def reg() -> TransferRegistry:
    return TransferRegistry(Metrics())


def test_pending_until_commit_whatever_connection_sent_it(reg: TransferRegistry) -> None:
    reg.pending(VM, "s1", "cn:a")
    reg.pending(VM, "s2", "cn:a")
    reg.pending(OTHER, "s1", "cn:a")
    assert reg.in_use(VM) == {"s1", "s2"}
    reg.committed(VM, "s2")
    assert reg.in_use(VM) == {"s1"} and reg.in_use(OTHER) == {"s1"}
    reg.committed(VM, "s1")  # a commit (or delete) from any connection ends the lease
    assert reg.in_use(VM) == set() and reg.in_use(OTHER) == {"s1"}


def test_pending_expires_idle_but_not_while_the_vm_still_receives() -> None:
    now = [1000.0]
    reg = TransferRegistry(Metrics(), clock=lambda: now[0])
    reg.pending(VM, "s1", "cn:a")
    t = reg.start("receive", VM, "disk0", "s2", "s1", "cn:a")  # the push goes on
    now[0] += 2 * transfers.PENDING_TTL
    assert reg.in_use(VM) == {"s1", "s2"}
    reg.finish(t, "ok")
    now[0] += transfers.PENDING_TTL / 2
    assert reg.in_use(VM) == {"s1"}  # refreshed while the receive ran
    now[0] += transfers.PENDING_TTL
    assert reg.in_use(VM) == set()


def test_a_peers_stranded_parts_are_not_kept_by_another_senders_pushes() -> None:
    """A move's copy that failed between two parts, its sender's link still open:
    the VM's own pushes (from its CN) go on, yet those parts stop being awaited
    PEER_PENDING_TTL after the last one, so a discard or reconcile can clean up."""
    now = [1000.0]
    reg = TransferRegistry(Metrics(), clock=lambda: now[0])
    reg.pending(VM, "s1", "zone:old")
    reg.bind(VM, "s1", 7)
    reg.pending(VM, "s9", "cn:a")
    cn = reg.start("receive", VM, "root", "s10", "s9", "cn:a")
    now[0] += transfers.PEER_PENDING_TTL - 1
    assert reg.in_use(VM) == {"s1", "s9", "s10"}
    now[0] += 2
    assert reg.in_use(VM) == {"s9", "s10"}  # the CN's own parts stay awaited
    peer = reg.start("mirror-in", VM, "root", "s11", "s10", "zone:p")
    reg.pending(VM, "s11", "zone:p")
    now[0] += 10 * transfers.PEER_PENDING_TTL
    assert reg.in_use(VM) == {"s9", "s10", "s11"}  # each sender still sending
    reg.finish(cn, "ok")
    reg.finish(peer, "ok")
    now[0] += transfers.PEER_PENDING_TTL + 1
    assert reg.in_use(VM) == {"s9"}  # a client's lease is minutes long (plain OpenSSH)


def test_parts_teed_for_a_push_that_died_on_the_primary(reg: TransferRegistry) -> None:
    reg.pending(VM, "s3", "zone:p")  # teed by the primary over its long-lived link
    reg.pending(VM, "s4", "zone:p")
    reg.pending(VM, "s5", "cn:a")  # another sender's: not the primary's to end
    assert reg.pending_from(VM, "zone:p") and not reg.pending_from(OTHER, "zone:p")
    assert not reg.pending_from(VM, "zone:q")
    assert reg.abandoned(VM, "zone:p", {"s4"}) == ["s3"]
    assert reg.in_use(VM) == {"s4", "s5"}
    assert reg.abandoned(VM, "zone:p", set()) == ["s4"]
    assert reg.in_use(VM) == {"s5"}
    assert not reg.pending_from(VM, "zone:p")


def test_parts_a_peer_teed_end_with_its_connection(reg: TransferRegistry) -> None:
    reg.pending(VM, "s1", "zone:p")
    reg.bind(VM, "s1", 7)  # teed by the primary over connection 7
    reg.pending(VM, "s2", "cn:a")  # a client's push: a lease, bound to nothing
    reg.release(8)
    assert reg.in_use(VM) == {"s1", "s2"}
    reg.release(7)  # the primary's link closed: its push is over
    assert reg.in_use(VM) == {"s2"}
    reg.release(7)
    assert reg.in_use(VM) == {"s2"}
