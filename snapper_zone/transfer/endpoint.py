"""The Endpoint: one zone's VM snapshots, wherever that zone is.

Replication talks to both zones of a VM the same way: "this zone" is
``local.LocalEndpoint`` (the pool, under the VM lock) and a peer is
``remote.ZoneClient`` (the same commands over SSH). Streams go between them
with ``ZoneClient.push_stream`` (this zone's ``zfs send`` into the peer's
vetted receive) and ``ZoneClient.pull`` + ``local.ZoneReceiver`` (the
peer's ``send`` into this zone's vetted receive).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from snapper_zone.wire import Inventory, VmSnapshot

__all__ = ["Endpoint"]


class Endpoint(Protocol):
    async def inventory(self, vm: str) -> Inventory:
        """Snapshots, datasets' resume tokens, tombstones and what is in use."""

    async def snapshots(self, vm: str) -> Sequence[VmSnapshot]:
        """The VM's snapshots, oldest first."""

    async def resume_token(self, vm: str, dataset: str) -> str | None:
        """The partial receive's token, or None."""

    async def abort(self, vm: str, dataset: str) -> None:
        """Discard a partial receive."""

    async def metadata(self, vm: str, snap: str) -> dict[str, Any] | None: ...

    async def commit(self, vm: str, snap: str, datasets: Sequence[str],
                     metadata: Mapping[str, Any] | None) -> object:
        """Mark the VM snapshot complete with these parts."""

    async def destroy(self, vm: str, snap: str, dataset: str | None,
                      guid: int | None) -> None:
        """One part if it is still ``guid``, or (no dataset) only the marker."""
