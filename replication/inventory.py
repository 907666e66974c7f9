"""A zone's answer to ``snapshots VM`` as reconcile's input: pure, no I/O.

Local and remote inventories take the same path: the zone's own listing is
the same JSON document its peers get over SSH (``Service.inventory``), so
both sides of a reconcile are read alike.
"""

from __future__ import annotations

from replication.reconcile import Snap, Tombstone, ZoneInventory
from snapper_zone.wire import Inventory

__all__ = ["from_document", "snapshot_guids"]


def from_document(zone: str, doc: Inventory) -> tuple[ZoneInventory, list[Tombstone]]:
    """(inventory, tombstones) of one VM on ``zone`` from its ``snapshots`` document.

    A part counts as complete when the VM snapshot it belongs to has its
    complete marker on that zone; diverged siblings are not listed by the
    store, so they are left out here too. ``doc`` was checked when it was
    read (``Inventory.from_json``), so nothing here can be malformed.
    """
    datasets: dict[str, list[Snap]] = {name: [] for name in doc.datasets}
    for s in doc.snapshots:
        for ds, part in s.parts.items():
            datasets.setdefault(ds, []).append(Snap(
                s.name, part.guid, part.createtxg, s.complete, s.created, part.used))
    stones = [Tombstone(g, t) for g, t in doc.tombstones.items()]
    return ZoneInventory(zone, datasets), stones


def snapshot_guids(inv: ZoneInventory, name: str, complete_only: bool = True) -> dict[str, int]:
    """dataset -> guid of VM snapshot ``name``'s parts on ``inv``'s zone."""
    return {ds: s.guid for ds, ss in inv.datasets.items() for s in ss
            if s.name == name and (s.complete or not complete_only)}
