"""A zone's answer to ``snapshots VM`` as reconcile's input: pure, no I/O.

Local and remote inventories take the same path: the zone's own listing is
the same JSON document its peers get over SSH (``Service.inventory``), so
both sides of a reconcile are read alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from replication.reconcile import Snap, Tombstone, ZoneInventory

__all__ = ["BadInventory", "from_document", "snapshot_guids"]


class BadInventory(ValueError):
    """A ``snapshots`` answer that is not the shape every zone writes."""


def from_document(zone: str, doc: Mapping[str, Any]) -> tuple[ZoneInventory, list[Tombstone]]:
    """(inventory, tombstones) of one VM on ``zone`` from its ``snapshots`` document.

    A part counts as complete when the VM snapshot it belongs to has its
    complete marker on that zone; diverged siblings are not listed by the
    store, so they are left out here too.
    """
    snaps = doc.get("snapshots")
    if not isinstance(snaps, list):
        raise BadInventory(f"{zone}: 'snapshots' is not a list")
    datasets: dict[str, list[Snap]] = {name: [] for name in doc.get("datasets") or {}}
    for s in snaps:
        try:
            name = str(s["name"])
            complete = bool(s.get("complete"))
            created = int(s.get("created") or 0)
            for ds, part in (s.get("datasets") or {}).items():
                datasets.setdefault(str(ds), []).append(Snap(
                    name, int(part["guid"]), int(part["createtxg"]), complete, created,
                    int(part.get("used") or 0)))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BadInventory(f"{zone}: malformed snapshot entry: {exc!r}") from None
    stones = []
    for guid, when in (doc.get("tombstones") or {}).items():
        try:
            stones.append(Tombstone(int(guid, 16), int(when)))
        except (TypeError, ValueError):
            raise BadInventory(f"{zone}: malformed tombstone {guid!r}") from None
    return ZoneInventory(zone, datasets), stones


def snapshot_guids(inv: ZoneInventory, name: str, complete_only: bool = True) -> dict[str, int]:
    """dataset -> guid of VM snapshot ``name``'s parts on ``inv``'s zone."""
    return {ds: s.guid for ds, ss in inv.datasets.items() for s in ss
            if s.name == name and (s.complete or not complete_only)}
