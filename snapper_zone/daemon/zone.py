"""One snapper zone's shared state: what the SSH and HTTP endpoints both use."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import asyncssh

from replication.identity import IdentityFollower
from replication.peers import static_scope
from snapper_zone.common.config import TrustedKey, ZoneConfig, reloaded
from snapper_zone.common.httpsig import Identity
from snapper_zone.common.metrics import Metrics
from snapper_zone.daemon.auth import Principal, peer_in_scope
from snapper_zone.daemon.limits import PerPrincipal
from snapper_zone.errors import NotPlacedHere, SnapperError
from snapper_zone.transfer.local import LocalEndpoint, Quotas, ReceiveSlots, ZoneReceiver
from snapper_zone.transfer.registry import SnapshotInUse, TransferRegistry
from snapper_zone.transfer.store import VmSnapshot, ZoneStore
from snapper_zone.zfs.names import Dataset
from snapper_zone.zfs.zfs import Zfs

if TYPE_CHECKING:
    from replication.replicator import Replicator
    from snapper_zone.daemon.prune import Pruner


class CopyNotRedundant(SnapperError):
    """A drop of this zone's copy of a VM that holds a snapshot the new copy lacks."""

    code = "CopyNotRedundant"
    http_status = 409


@dataclass
class Zone:
    config: ZoneConfig
    zfs: Zfs
    store: ZoneStore
    metrics: Metrics
    transfers: TransferRegistry
    log: logging.Logger
    # Bounded concurrency: receives beyond the limit wait their turn, and no
    # client holds more than its share (mirror-in has slots of its own).
    receive_slots: ReceiveSlots
    # Concurrent ``send`` streams per client (principal label).
    sends: PerPrincipal
    # Two pushes of the same VM never interleave.
    vm_locks: defaultdict[str, asyncio.Lock] = field(
        default_factory=lambda: defaultdict(asyncio.Lock))
    # Set by the daemon when the zone has peers (replication/).
    replicator: Replicator | None = None
    # Set by the daemon with a coordinator: its identity registry (CN keys, VM
    # owners, restore grants), followed live.
    identity: IdentityFollower | None = None
    # Set by the daemon when the config names a retention policy (daemon/prune).
    pruner: Pruner | None = None

    @property
    def receiver(self) -> ZoneReceiver:
        """Every stream into this zone's pool goes through it (transfer.local)."""
        lim = self.config.limits
        return ZoneReceiver(self.zfs, self.store, self.transfers, self.receive_slots,
                            self.vm_locks, self.log, self.refresh_capacity,
                            Quotas(lim.vm_quota_bytes, lim.cn_quota_bytes, self.owner_of),
                            lim.copy_buffer_bytes)

    @classmethod
    def from_config(cls, config: ZoneConfig, zfs: Zfs | None = None,
                    log: logging.Logger | None = None) -> Zone:
        zfs = zfs or Zfs()
        metrics = Metrics()
        return cls(
            config=config, zfs=zfs,
            store=ZoneStore(zfs, Dataset(config.root), config.metadata_max_bytes),
            metrics=metrics, transfers=TransferRegistry(metrics),
            log=log or logging.getLogger("snapperd"),
            receive_slots=ReceiveSlots(config.max_concurrent_receives,
                                       config.receives_per_principal, config.mirror_receives),
            sends=PerPrincipal(config.limits.max_sends_per_principal))

    def key_for(self, key_data: bytes) -> TrustedKey | None:
        """A client key the config trusts, a CN's of the coordinator's registry, or a
        peer zone's the coordinator registered."""
        found = self.config.key_for(key_data)
        if found is None and self.identity is not None:
            found = self.identity.keys.get(key_data)
        if found is None and self.replicator is not None:
            found = self.replicator.links.learned_keys.get(key_data)
        return found

    def trusted_keys(self) -> list[TrustedKey]:
        """Every client key trusted now: the config's, the registry's CNs', learned peers'."""
        keys: list[TrustedKey] = list(self.config.keys)
        if self.identity is not None:
            keys += self.identity.keys.values()
        if self.replicator is not None:
            keys += self.replicator.links.learned_keys.values()
        return keys

    def current(self, principal: Principal) -> Principal | None:
        """Who ``principal``'s key is now (checked per command): None once it is no
        longer trusted (removed from the registry, or the config after a reload)."""
        if not principal.key_data:
            return principal  # not from a key (an in-process caller)
        key = self.key_for(principal.key_data)
        return None if key is None else Principal.from_key(key, principal.connection)

    def granted(self, vm: str, cn: str) -> bool:
        """Whether an operator's grant in the registry lets CN ``cn`` restore ``vm``."""
        return self.identity is not None and self.identity.granted(vm, cn)

    def reload(self, new: ZoneConfig) -> list[str]:
        """SIGHUP: the live fields of ``new`` in force at once (``config.LIVE_FIELDS``);
        the names of the changes that need a restart, which are not applied."""
        self.config, fixed = reloaded(self.config, new)
        self.sends.cap = self.config.limits.max_sends_per_principal
        if self.replicator is not None:
            self.replicator.links.reconfigure(self.config)
        return fixed

    async def peer_scope(self, vm: str, peer: str) -> frozenset[str] | None:
        """The zones whose peers may act on ``vm`` here (``auth.authorize``'s scope);
        None when it cannot be known (no coordinator answer ever).

        With a coordinator: the VM's placement and the zones of its moves in
        flight, from the placement cache (``CoordinatorClient.lookup``), asked
        afresh when the cache has nothing or does not name ``peer`` (a move
        may have started since). Without one: the static pair.
        """
        me = self.config.uuid
        coordinator = self.replicator.links.coordinator if self.replicator else None
        if coordinator is None:
            return static_scope(me, vm, [p.uuid for p in self.config.peers])
        hit = coordinator.cached(vm)
        if hit is not None and peer_in_scope(me, peer, hit.scope):
            return hit.scope
        # Not placed by being asked about: a peer cannot make VMs up.
        got = await coordinator.lookup(vm, fresh=True, create=False)
        return None if got is None else got.scope

    async def check_placed(self, vm: str) -> None:
        """Refuse (``NotPlacedHere``) a CN's push of ``vm`` when this zone's own view
        of the placement (asked afresh, else the last verified one) names other
        zones and no copy is here.

        A copy here is kept taking pushes: a move's old copy until it is dropped
        (the mover sends what it got on), a move's new copy before this zone
        saw the switch. No view at all, or a VM not placed yet: accepted (a
        CN's signed placement named us, or the CN has no coordinator).
        """
        me = self.config.uuid
        coordinator = self.replicator.links.coordinator if self.replicator else None
        if coordinator is None:
            return
        # Not placed by asking (create=False): a VM the coordinator has not
        # placed yet (a CN without coordinator_url) is no reason to refuse.
        got = await coordinator.lookup(vm, create=False)
        if got is None or not got.zones or me in got.zones:
            return
        got = await coordinator.lookup(vm, fresh=True, create=False)  # a switch since?
        if got is None or not got.zones or me in got.zones:
            return
        if await self.zfs.exists(self.store.vm_dataset(vm)):
            return
        raise NotPlacedHere(f"VM {vm} is placed on {', '.join(got.zones)}, not on this zone "
                            f"({me}): a move took it away; ask the coordinator again")

    async def http_identity(self, fingerprint: str) -> Identity | None:
        """Who signed an HTTP request with the key of this fingerprint: a config
        key (operator, cn, peer -> role "zone"), the coordinator (``coordinator_key``),
        or a peer zone the coordinator registered; None for a stranger."""
        for k in self.trusted_keys():
            if k.fingerprint == fingerprint:
                return Identity("zone" if k.role == "peer" else k.role, k.name, k.ssh_key())
        if self.config.coordinator_key is not None:
            key = asyncssh.import_public_key(self.config.coordinator_key)
            if key.get_fingerprint() == fingerprint:
                return Identity("coordinator", "coordinator", key)
        return None

    async def delete_snapshot(self, vm: str, name: str) -> None:
        """Delete a VM snapshot (SSH ``delete``, HTTP ``DELETE``); the peer follows.

        Refused while a transfer uses it. One starting during the destroy is
        still safe: ZFS itself refuses to destroy what a send or receive needs.
        """
        if name in self.transfers.in_use(vm):
            raise SnapshotInUse(f"VM {vm} snapshot {name!r} is in use by a transfer; "
                                "retry when it has finished")
        await self.store.delete(vm, name)
        self.transfers.committed(vm, name)  # an explicit abort ends a pending lease
        if self.replicator is not None:
            # Answer once the peer has the tombstone too (or after the mirror
            # timeout): a delete held by one zone alone is undone if that zone is lost.
            if not await self.replicator.follow_delete(
                    vm, name, self.config.mirror_timeout_seconds):
                self.log.info("delete not yet followed by the peer; it will be",
                              extra={"vm": vm, "snapshot": name})

    def endpoint(self, source: str = "") -> LocalEndpoint:
        """This zone as an ``Endpoint``; ``source`` is who its commits come from."""
        return LocalEndpoint(self.zfs, self.store, self.transfers, self.vm_locks, source)

    async def drop_copy(self, vm: str,
                        elsewhere: Mapping[str, Mapping[str, int]] | None = None) -> None:
        """Remove this zone's whole copy of ``vm`` (a move placed it elsewhere).

        ``elsewhere`` is what the new copy holds complete (snapshot name ->
        dataset -> guid). A complete snapshot here that it lacks arrived after
        the caller looked, e.g. a push acknowledged as mirrored with this zone
        as the mirror while the move switched: this copy may be its second
        one, so the drop is refused until the new copy has it. Checked under
        the VM lock, so nothing lands between the check and the destroy.
        """
        self._refuse_in_use(vm)
        async with self.vm_locks[vm]:
            self._refuse_in_use(vm)
            if elsewhere is not None:
                # A marker here that is not whole (parts missing from a listing)
                # counts too: the new copy must hold that snapshot, with every
                # part this copy still has.
                snaps, marked = await self.store.marked(vm)
                extra = [s.name for s in snaps if (s.complete or s.name in marked)
                         and not _holds(elsewhere.get(s.name), s)]
                if extra:
                    raise CopyNotRedundant(
                        f"VM {vm}: this copy holds {len(extra)} snapshot(s) the new copy "
                        f"lacks ({', '.join(extra[:5])}); copy them first")
            await self.store.drop_vm(vm)
        self.log.info("dropped VM copy", extra={"vm": vm})
        # The coordinator drops a copy after switching the placement away: learn
        # the new pair now, so a CN that pushes here from a stale placement
        # (the coordinator down by then) is told so (``check_placed``).
        await self.relearn_placement(vm)

    async def relearn_placement(self, vm: str) -> tuple[str, ...] | None:
        """Ask the coordinator for ``vm``'s placement now, past the cache's TTL (a
        move switched it): the pair this zone mirrors to, and checks CNs'
        pushes against, is the new one from here on, and is the one kept for
        an outage, its zones known as peers. None: no coordinator here, or none
        answers."""
        links = self.replicator.links if self.replicator else None
        if links is None or links.coordinator is None:
            return None
        got = await links.coordinator.lookup(vm, fresh=True, create=False)
        if got is None:
            return None
        known = {p.uuid for p in links.peers}
        if any(z != self.config.uuid and z not in known for z in got.zones):
            # A zone added for the move, since this one last asked for the fleet's
            # zones: learn its address and key now, while the coordinator answers,
            # so a push through an outage that starts next can still be mirrored.
            await links.refresh()
        return got.zones

    def _refuse_in_use(self, vm: str) -> None:
        if self.transfers.in_use(vm):
            raise SnapshotInUse(f"VM {vm} has transfers in flight; retry when they end")

    def owner_of(self, vm: str) -> str | None:
        """The CN a VM belongs to: the coordinator's registry where it names the VM,
        else the config's static ``[vms]``."""
        owner = self.identity.owner_of(vm) if self.identity is not None else None
        return owner if owner is not None else self.config.vms.get(vm)

    async def refresh_capacity(self) -> int:
        root = await self.zfs.dataset(self.store.root)
        self.metrics.pool_free.set(root.available)
        self.metrics.pool_used.set(root.used)
        return root.available

    async def refresh_freshness(self) -> None:
        """Each VM's newest complete snapshot's age, for the scrape (``common/metrics``)."""
        self.metrics.set_freshness(await self.store.newest_complete(), time.time())


def _holds(there: Mapping[str, int] | None, here: VmSnapshot) -> bool:
    """Whether a copy holding ``there`` (dataset -> guid) of a complete snapshot
    has all of ``here``: exactly its parts when ``here`` is whole, else (a marker
    outliving parts) at least those parts that are left."""
    if there is None:
        return False
    mine = {d: p.guid for d, p in here.parts.items()}
    if here.complete:
        return dict(there) == mine
    return all(there.get(d) == g for d, g in mine.items())
