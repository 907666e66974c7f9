"""What a snapper zone holds, read from and written to ZFS itself.

Layout under the delegated root (nothing outside it is ever named):

    <root>/<vm_uuid>              container filesystem, one per VM
    <root>/<vm_uuid>/<dataset>    one per VM dataset (zone root, disk0, ...)
    <root>/<vm_uuid>@<snap>       exists only once every part of the VM
                                  snapshot is in: the "complete" marker, and
                                  the holder of the VM's metadata

ZFS is the truth: there is no index to lose. A VM snapshot whose dataset
snapshots exist but whose container snapshot does not is incomplete (a push
in progress or one that died); it is listed as such and never restored.

Metadata (the ``vmadm get`` JSON) is compressed and split over ``snapper:m.N``
user properties of the container snapshot (ZFS caps a value at 8 KiB).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import re
import time
import zlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from snapper_zone import wire
from snapper_zone.errors import (
    DatasetExists,
    DatasetNotFound,
    MetadataTooLarge,
    PartComplete,
    PartDeleted,
    SnapperError,
)
from snapper_zone.zfs.names import (
    UUID_PATTERN,
    Dataset,
    Snapshot,
    check_component,
    check_uuid,
    is_uuid,
)
from snapper_zone.zfs.zfs import SAFE_CONTAINER_PROPS, SnapshotInfo, Zfs

P_COMPLETE = "snapper:complete"
P_PARTS = "snapper:parts"
P_CREATED = "snapper:created"
P_SOURCE = "snapper:source"  # who pushed it: "cn:<id>" or "zone:<uuid>"
P_META_COUNT = "snapper:m.count"
# On the VM container dataset: "guidhex:unixtime,..." of parts deleted on
# purpose, so the peer zone deletes them too instead of sending them back.
P_TOMBSTONES = "snapper:tombstones"
_MAX_TOMBSTONES = 250  # 8 KiB property value / ~30 bytes each
_CHUNK = 8000
_MAX_CHUNKS = 64
_CONTAINER_PROPS = [P_COMPLETE, P_PARTS, P_CREATED, P_SOURCE]


log = logging.getLogger("snapper.store")

_ASIDE = "dropped-"  # + "<vm>-<hex ns>": a dropped copy renamed out of the VM's name
_ASIDE_NAME = re.compile(_ASIDE + UUID_PATTERN + r"-[0-9a-f]{1,16}")
_SETTLE_TRIES = 3  # a dataset's newest snapshot destroyed under a settle: look again


class SnapshotNotFound(SnapperError):
    code = "ResourceNotFound"
    http_status = 404


@dataclass(frozen=True)
class Part(wire.Part):
    """One VM dataset's snapshot on this zone, with its holds."""

    userrefs: int = 0

    def to_wire(self) -> wire.Part:
        return wire.Part(self.dataset, self.guid, self.createtxg, self.used, self.referenced)


class VmSnapshot(wire.VmSnapshot):
    """A VM snapshot as the store lists it (its parts are the store's ``Part``)."""

    def to_wire(self) -> wire.VmSnapshot:
        return wire.VmSnapshot(self.vm, self.name, self.complete, self.created,
                               {k: v.to_wire() if isinstance(v, Part) else v
                                for k, v in self.parts.items()}, self.source)


def encode_metadata(meta: Mapping[str, Any], limit: int) -> dict[str, str]:
    raw = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    if len(raw) > limit:
        raise MetadataTooLarge(f"metadata is {len(raw)} bytes; the limit is {limit}")
    text = base64.b64encode(zlib.compress(raw, 9)).decode()
    chunks = [text[i : i + _CHUNK] for i in range(0, len(text), _CHUNK)] or [""]
    if len(chunks) > _MAX_CHUNKS:
        raise MetadataTooLarge("metadata does not compress enough to store")
    props = {f"snapper:m.{i}": c for i, c in enumerate(chunks)}
    props[P_META_COUNT] = str(len(chunks))
    return props


def decode_metadata(props: Mapping[str, str]) -> dict[str, Any] | None:
    count = props.get(P_META_COUNT)
    if count is None:
        return None
    text = "".join(props.get(f"snapper:m.{i}", "") for i in range(int(count)))
    obj = json.loads(zlib.decompress(base64.b64decode(text)))
    return obj if isinstance(obj, dict) else None


class ZoneStore:
    """The delegated root of one zone, seen as VMs and VM snapshots."""

    def __init__(self, zfs: Zfs, root: Dataset, metadata_max_bytes: int = 256 * 1024) -> None:
        self.zfs = zfs
        self.root = root
        self.metadata_max_bytes = metadata_max_bytes
        # The tombstone list is one property, read, changed and written back: a
        # delete adding one while reconcile forgets others must not lose either.
        self._tombstone_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # A listing and a whole-VM drop exclude each other: a plan made from a copy
        # caught half way through any multi-step change is nonsense.
        self._views: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._warned: set[tuple[str, str]] = set()  # markers seen without their parts
        self._sweeping = asyncio.Lock()

    def vm_dataset(self, vm: str) -> Dataset:
        return self.root.child(check_uuid(vm, "VM uuid"))

    def part_dataset(self, vm: str, dataset: str) -> Dataset:
        return self.vm_dataset(vm).child(check_component(dataset, "VM dataset"))

    async def ensure_vm(self, vm: str) -> bool:
        """The VM's container, created unless it is there: whether it was created."""
        ds = self.vm_dataset(vm)
        try:  # one command either way: asking first would be a second
            # Never mounted, nothing in it runnable, whatever the root says.
            await self.zfs.create(ds, props=SAFE_CONTAINER_PROPS)
        except DatasetExists:
            return False
        return True

    async def vms(self) -> list[str]:
        out = []
        for info in await self.zfs.datasets(self.root, depth=1):
            if info.dataset.parent == self.root and is_uuid(info.dataset.basename):
                out.append(info.dataset.basename)
        return sorted(out)

    async def snapshots(self, vm: str) -> list[VmSnapshot]:
        """Every VM snapshot on this zone, complete or not, oldest first."""
        async with self._views[vm]:
            return await self._snapshots(vm)

    async def marked(self, vm: str) -> tuple[list[VmSnapshot], set[str]]:
        """``snapshots``, and the names whose marker is there, whole or not."""
        async with self._views[vm]:
            return await self._read(vm)

    async def _snapshots(self, vm: str) -> list[VmSnapshot]:
        return (await self._read(vm))[0]

    async def _read(self, vm: str) -> tuple[list[VmSnapshot], set[str]]:
        """The VM's snapshots, and the names that have a marker (whole or not)."""
        container = self.vm_dataset(vm)
        try:
            infos = await self.zfs.snapshots(container, user_props=_CONTAINER_PROPS,
                                             recursive=True)
        except DatasetNotFound:
            return [], set()
        return self._vm_snapshots(vm, infos)

    def _vm_snapshots(self, vm: str, infos: Sequence[SnapshotInfo]
                      ) -> tuple[list[VmSnapshot], set[str]]:
        """``_read``'s answer from the listing of the VM's container, recursive."""
        container = self.vm_dataset(vm)
        marks: dict[str, SnapshotInfo] = {}
        parts: dict[str, dict[str, Part]] = {}
        order: dict[str, int] = {}
        for s in infos:
            name = s.snapshot.name
            order[name] = min(order.get(name, s.createtxg), s.createtxg)
            if s.snapshot.dataset == container:
                marks[name] = s
                continue
            if s.snapshot.dataset.parent != container:
                continue
            ds = s.snapshot.dataset.basename
            parts.setdefault(name, {})[ds] = Part(ds, s.guid, s.createtxg, s.used,
                                                  s.referenced, s.userrefs)
        out = []
        for name in sorted(order, key=lambda n: order[n]):
            mark = marks.get(name)
            complete = mark is not None and marked_whole(mark.user_props,
                                                          parts.get(name, {}))
            if mark is not None and not complete and (vm, name) not in self._warned \
                    and mark.user_props.get(P_COMPLETE) == "yes":
                # Evidence for whoever reads the logs (once): which listing lacked what.
                self._warned.add((vm, name))
                log.warning("snapshot marker without its parts", extra={
                    "vm": vm, "snapshot": name, "parts": sorted(parts.get(name, {})),
                    "named": mark.user_props.get(P_PARTS, "")})
            created = int(mark.user_props.get(P_CREATED, mark.creation)) if mark else 0
            if not created:
                created = min((_part_creations(infos, container, name)), default=0)
            out.append(VmSnapshot(vm, name, complete, created, parts.get(name, {}),
                                  mark.user_props.get(P_SOURCE) if mark else None))
        return out, set(marks)

    async def document(self, vm: str) -> wire.Inventory:
        """``snapshots VM``'s answer: every VM snapshot, each dataset's resume token,
        and the tombstones (``in_use`` is the service's to add). Peers read it to
        reconcile, so its shape is the protocol's (``snapper_zone.wire``).
        """
        container = self.vm_dataset(vm)
        async with self._views[vm]:
            try:  # datasets, snapshots and tombstones in one listing: this runs
                # for every push, and for every VM in every reconcile round
                infos, listed, _ = await self.zfs.tree(
                    container, user_props=[*_CONTAINER_PROPS, P_TOMBSTONES], inherited=False)
            except DatasetNotFound:
                infos, listed = [], []
            snaps = self._vm_snapshots(vm, listed)[0]
        stones = next((parse_tombstones(i.user_props.get(P_TOMBSTONES, "")) for i in infos
                       if i.dataset == container), {})
        datasets = {info.dataset.basename: info.resume_token for info in infos
                    if info.dataset.parent == container}
        return wire.Inventory(vm, tuple(s.to_wire() for s in snaps), datasets, stones)

    async def snapshot(self, vm: str, name: str) -> VmSnapshot:
        for s in await self.snapshots(vm):
            if s.name == name:
                return s
        raise SnapshotNotFound(f"VM {vm} has no snapshot {name!r} on this zone")

    async def mark_complete(self, vm: str, name: str, datasets: Sequence[str],
                            metadata: Mapping[str, Any] | None, source: str) -> VmSnapshot:
        """Record a VM snapshot as whole: every listed part must be present.

        The container snapshot is taken last, atomically, so a crash before it
        leaves an incomplete VM snapshot and never a complete-looking partial one.
        """
        props = encode_metadata(metadata, self.metadata_max_bytes) if metadata else {}
        listed, marked = await self.marked(vm)
        current = {s.name: s for s in listed}
        have = current.get(name)
        missing = [d for d in datasets if have is None or d not in have.parts]
        if missing:
            raise SnapshotNotFound(f"VM {vm} snapshot {name!r} lacks datasets: "
                                   f"{', '.join(missing)}")
        props.update({P_COMPLETE: "yes", P_PARTS: ",".join(sorted(datasets)),
                      P_CREATED: str(int(time.time())), P_SOURCE: source})
        if have is None:  # no dataset was listed to show it missing
            raise SnapshotNotFound(f"VM {vm} has no snapshot {name!r} on this zone")
        # Read last, just before the marker: a delete tombstones the parts before
        # it destroys anything (``delete``), so a commit it overtakes stops here.
        stones = await self.tombstones(vm)
        dead = sorted(d for d in datasets if have.parts[d].guid in stones)
        if dead:
            raise PartDeleted(f"VM {vm} snapshot {name!r} was deleted here (parts "
                              f"{', '.join(dead)} are tombstoned); not committed")
        snap = Snapshot(self.vm_dataset(vm), name)
        if name in marked:
            # A marker that is there but not whole (a part went and came back)
            # is written again: a snapshot cannot be taken twice.
            await self.zfs.set_user_props(snap, props)
        else:
            await self.zfs.snapshot([snap], props=props)
        # What a listing would now say, without listing every snapshot of the
        # VM again: the parts are as read above, the marker holds ``props``.
        return dataclasses.replace(have, complete=True, created=int(props[P_CREATED]),
                                   source=source)

    async def metadata(self, vm: str, name: str) -> dict[str, Any] | None:
        snap = Snapshot(self.vm_dataset(vm), check_component(name, "snapshot name"))
        try:
            count = await self.zfs.get_user_props(snap, [P_META_COUNT])
        except DatasetNotFound:
            raise SnapshotNotFound(f"VM {vm} has no complete snapshot {name!r}") from None
        if P_META_COUNT not in count:
            return None
        n = int(count[P_META_COUNT])
        props = await self.zfs.get_user_props(snap, [P_META_COUNT,
                                                     *(f"snapper:m.{i}" for i in range(n))])
        return decode_metadata(props)

    async def delete(self, vm: str, name: str) -> None:
        """Destroy a VM snapshot: the marker first (no longer complete), then its parts.

        Each part's guid is tombstoned first, so reconcile deletes it on the
        peer zone rather than sending it back (replication/DESIGN.md (d)).
        """
        snap = await self.snapshot(vm, name)
        container = self.vm_dataset(vm)
        await self.add_tombstones(vm, [p.guid for p in snap.parts.values()])
        # From here a reconcile round may follow the tombstones and destroy the
        # same snapshots (under the VM lock, which a delete does not take: it
        # would wait behind the VM's running push). What it destroyed is done.
        if snap.complete or await self.zfs.exists(Snapshot(container, name)):
            await self._destroy_if_there(Snapshot(container, name))
        for part in snap.parts:
            await self._destroy_if_there(Snapshot(container.child(part), name))
            await self._settle(container.child(part))
        # A commit that read the tombstones just before they were written may have
        # put a marker back meanwhile; with its parts gone it would be left over
        # for good (reconcile plans by part), so it goes too.
        await self._destroy_if_there(Snapshot(container, name))

    async def _destroy_if_there(self, target: Dataset | Snapshot, *,
                                recursive: bool = False) -> None:
        """Destroy ``target``; one already gone counts as destroyed."""
        try:
            await self.zfs.destroy(target, recursive=recursive)
        except DatasetNotFound:
            pass

    async def destroy_marker(self, vm: str, name: str) -> None:
        """Destroy only the VM-level marker of ``name`` (it is no longer complete)."""
        snap = Snapshot(self.vm_dataset(vm), check_component(name, "snapshot name"))
        await self._destroy_if_there(snap)

    async def destroy_part(self, vm: str, dataset: str, name: str, guid: int) -> None:
        """Destroy ``<vm>/<dataset>@name`` if it still is the snapshot ``guid`` and
        no complete VM snapshot here includes it (``PartComplete``)."""
        ds = self.part_dataset(vm, dataset)
        try:
            snaps = await self.zfs.snapshots(ds)
        except DatasetNotFound:
            return
        have = next((s for s in snaps if s.name == name), None)
        if have is None:
            return
        if have.guid != guid:
            raise SnapshotNotFound(f"{ds}@{name} is guid {have.guid}, not {guid}; "
                                   "not destroyed")
        # A whole marker goes before its parts (a tombstone's plan destroys it
        # first); one here now means the caller listed this zone mid-commit. The
        # VM is listed only where a marker is, so a followed delete costs no listing.
        mine = None
        if await self.zfs.exists(Snapshot(self.vm_dataset(vm), name)):
            mine = next((s for s in await self.snapshots(vm) if s.name == name), None)
        part = mine.parts.get(dataset) if mine is not None else None
        if mine is not None and mine.complete and part is not None and part.guid == guid:
            raise PartComplete(f"{ds}@{name} (guid {guid}) is part of VM {vm}'s complete "
                               f"snapshot {name!r} here; not destroyed")
        await self._destroy_if_there(have.snapshot)
        await self._settle(ds)

    async def _settle(self, ds: Dataset) -> None:
        """After a destroy: make the dataset's head its newest snapshot again.

        Destroying the newest snapshot leaves its data in the head, so the next
        incremental (from the snapshot now newest) would need ``receive -F``.
        Nothing but receive ever writes a zone's dataset, so rolling back to
        the newest snapshot discards no one's data; a dataset left with no
        snapshot at all holds nothing acknowledged and is destroyed, so a full
        stream can create it again. A reconcile round may destroy the newest
        meanwhile (a tombstoned one): then the newest is looked up again.
        """
        for attempt in range(_SETTLE_TRIES):
            try:
                left = await self.zfs.snapshots(ds)
            except DatasetNotFound:
                return  # gone with its last snapshot
            try:
                if left:
                    await self.zfs.rollback(left[-1].snapshot)
                elif not await self.zfs.resume_token(ds):
                    await self._destroy_if_there(ds, recursive=True)
                return
            except DatasetNotFound:
                if attempt == _SETTLE_TRIES - 1:
                    raise

    async def drop_vm(self, vm: str) -> None:
        """Destroy this zone's whole copy of a VM (a move's last step).

        The copy is first renamed aside in one step, then destroyed. `zfs destroy
        -r` goes snapshot by snapshot and stops at the first one that is busy
        (a send still reading it, a hold), leaving a copy with its older
        snapshots gone and its newer ones there, which no peer can fill in
        again. A rename either happens or, busy, changes nothing (ResourceBusy:
        try again); what is set aside and not yet destroyed is no VM's copy any
        more and goes at the next sweep.
        """
        ds = self.vm_dataset(vm)
        async with self._views[vm]:  # nobody lists it half renamed
            if not await self.zfs.exists(ds):
                return
            await self.zfs.rename(ds, self.root.child(f"{_ASIDE}{vm}-{time.time_ns():x}"))
        await self.sweep_aside()

    async def sweep_aside(self) -> list[Dataset]:
        """Destroy the copies drops set aside; those still busy stay for the next
        sweep (a drop, a daemon start). Returns what is left."""
        async with self._sweeping:
            left = []
            for info in await self.zfs.datasets(self.root, depth=1):
                ds = info.dataset
                if ds.parent != self.root or not set_aside(ds.basename):
                    continue
                try:
                    await self._destroy_if_there(ds, recursive=True)
                except SnapperError as e:
                    log.warning("dropped VM copy not yet destroyed", extra={
                        "dataset": str(ds), "err_msg": str(e)})
                    left.append(ds)
            return left

    async def tombstones(self, vm: str) -> dict[int, int]:
        """guid -> unix time deleted, for the VM's parts deleted on purpose (here,
        or on the peer and adopted by reconcile)."""
        try:
            props = await self.zfs.get_user_props(self.vm_dataset(vm), [P_TOMBSTONES])
        except DatasetNotFound:
            return {}
        return parse_tombstones(props.get(P_TOMBSTONES, ""))

    async def add_tombstones(self, vm: str, guids: Sequence[int],
                             now: int | None = None) -> None:
        if not guids:
            return
        stamp = int(time.time()) if now is None else now
        await self.merge_tombstones(vm, dict.fromkeys(guids, stamp))

    async def merge_tombstones(self, vm: str, stones: Mapping[int, int]) -> bool:
        """Add tombstones (guid -> time deleted) this zone lacks; an existing one
        keeps its time. True if any was added."""
        async with self._tombstone_locks[vm]:
            have = await self.tombstones(vm)
            new = {g: t for g, t in stones.items() if g not in have}
            if new:
                await self._write_tombstones(vm, {**have, **new})
            return bool(new)

    async def forget_tombstones(self, vm: str, guids: Sequence[int]) -> None:
        async with self._tombstone_locks[vm]:
            have = await self.tombstones(vm)
            if any(g in have for g in guids):
                await self._write_tombstones(vm, {g: t for g, t in have.items()
                                                  if g not in guids})

    async def _write_tombstones(self, vm: str, stones: Mapping[int, int]) -> None:
        # Oldest first out when over the cap: by then both zones have long acted on them.
        keep = sorted(stones.items(), key=lambda kv: kv[1])[-_MAX_TOMBSTONES:]
        await self.zfs.set_user_props(self.vm_dataset(vm), {P_TOMBSTONES: format_tombstones(
            dict(keep)) or "-"})

    async def newest_complete(self) -> dict[str, int | None]:
        """Each VM here -> the creation time of its newest complete snapshot (None: none).

        Two ``zfs`` calls for the whole zone however many VMs it holds (a scrape
        reads it), not one per VM as ``snapshots`` would.
        """
        vms = {i.dataset.basename for i in await self.zfs.datasets(self.root, depth=1)
               if i.dataset.parent == self.root and is_uuid(i.dataset.basename)}
        out: dict[str, int | None] = dict.fromkeys(vms)
        # depth 2: the VM containers' own snapshots (the markers), not their parts'.
        for s in await self.zfs.snapshots(self.root, user_props=[P_COMPLETE, P_CREATED],
                                          recursive=True, depth=2):
            vm = s.snapshot.dataset.basename
            if s.snapshot.dataset.parent != self.root or vm not in out:
                continue
            if s.user_props.get(P_COMPLETE) != "yes":
                continue
            created = int(s.user_props.get(P_CREATED, s.creation))
            if (have := out[vm]) is None or created > have:
                out[vm] = created
        return out


def set_aside(name: str) -> bool:
    """Whether a dataset under the root is a dropped VM copy awaiting its destroy
    (exactly the name a drop gives: nothing else there is ever swept)."""
    return _ASIDE_NAME.fullmatch(name) is not None


def marked_whole(marker: Mapping[str, str], parts: Mapping[str, object]) -> bool:
    """Whether a VM snapshot's marker (its user properties) and the parts listed
    beside it make it complete: the marker says so and every part it names is there.

    A marker outliving a part is not whole: `zfs destroy -r` of a VM copy goes
    part by part, so one cut short (a killed daemon, a failed destroy) leaves
    markers of snapshots whose data is gone. Markers from before the part list
    was kept need at least one part.
    """
    if marker.get(P_COMPLETE) != "yes":
        return False
    named = [d for d in marker.get(P_PARTS, "").split(",") if d]
    return all(d in parts for d in named) if named else bool(parts)


def parse_tombstones(text: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for item in text.split(","):
        guid, _, when = item.partition(":")
        try:
            out[int(guid, 16)] = int(when or 0)
        except ValueError:
            continue  # "-" (none) or a damaged entry: ignored, never fatal
    return out


def format_tombstones(stones: Mapping[int, int]) -> str:
    return ",".join(f"{g:x}:{t}" for g, t in sorted(stones.items()))


def _part_creations(infos: Sequence[SnapshotInfo], container: Dataset, name: str) -> list[int]:
    return [s.creation for s in infos if s.snapshot.name == name
            and s.snapshot.dataset.parent == container]
