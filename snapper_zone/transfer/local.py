"""The one way a stream becomes a snapshot here: the only caller of ``zfs receive``.

Every stream that lands on a ZFS this project runs on comes through
``receive_stream``: a CN's push into a zone, a primary's pipelined mirror, a
zone pulling a snapshot from its peer (catch-up, moves), a CN restoring from
a zone. Each gets the same checks, in this order:

1. the stream's header (DRR_BEGIN) is read and parsed before ``zfs receive``
   starts; ``vet_stream`` (pure) refuses a compound (``-R``) or property
   (``-p``) stream, a clone, redacted or raw one, a stream of another snapshot
   than the one asked for, one of another guid than expected, a full stream onto a dataset that has
   snapshots, an incremental whose base is not the target's newest
   snapshot, and a resume that does not match the partial state;
2. the bytes are piped into ``zfs receive`` (``stream.Inbound.pipe_to``);
3. the snapshot ZFS made must carry the guid the header announced
   (``confirm_guid``), or it is destroyed and the receive fails.

On a zone, ``ZoneReceiver`` adds what a zone owes its other clients: the VM
lock, a receive slot, the space check against the announced size, the
transfer record (for ``/v1/transfers`` and "in use"), and the VM container.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from snapper_zone.common import log as slog
from snapper_zone.errors import (
    DatasetExists,
    DatasetNotFound,
    IncrementalSourceMismatch,
    OutOfSpace,
    PartialReceiveExists,
    SnapperError,
    StreamInvalid,
    ZfsError,
)
from snapper_zone.transfer.registry import Transfer, TransferRegistry
from snapper_zone.transfer.store import VmSnapshot as StoredSnapshot
from snapper_zone.transfer.store import ZoneStore
from snapper_zone.transfer.stream import ClientGone, Inbound, PipeGone, Sink
from snapper_zone.wire import Inventory, VmSnapshot
from snapper_zone.zfs.names import Dataset
from snapper_zone.zfs.sendstream import Feature, StreamBegin, StreamHeaderError, read_begin
from snapper_zone.zfs.zfs import SnapshotInfo, Zfs

__all__ = [
    "SPACE_MARGIN",
    "Expect",
    "InsufficientSpace",
    "LocalEndpoint",
    "ReceiveRequest",
    "Received",
    "StreamRefused",
    "ZoneReceiver",
    "confirm_guid",
    "receive_stream",
    "vet_stream",
]

# Room kept free beyond a push's announced size: receive writes metadata the
# stream does not count, and a pool run to its last block is slow to recover.
SPACE_MARGIN = 64 << 20
SPACE_MARGIN_FRACTION = 50  # plus 2% of the announced size


class StreamRefused(SnapperError):
    """The stream is not the one the command names, or not one we accept."""

    code = "StreamRefused"
    http_status = 422


class InsufficientSpace(OutOfSpace):
    """Refused up front: the announced size does not fit; nothing was written."""

    def __init__(self, message: str) -> None:
        super().__init__(("snapperd", "receive"), "", None, message)


def _refusal(cls: type[ZfsError], message: str) -> ZfsError:
    """A ZFS-typed error decided here, before ZFS saw a byte."""
    return cls(("snapperd", "receive"), "", None, message)


@dataclass(frozen=True)
class Expect:
    """What the receiver asked for: the stream must be exactly this."""

    snapshot: str  # the snapshot name the stream must carry
    base: str | None = None  # --from: the incremental's base, by name
    resume: bool = False  # a resumed (zfs send -t) stream
    toguid: int | None = None  # the guid the receiver knows it must get (a pull)


def vet_stream(begin: StreamBegin, expect: Expect, target: str,
               snaps: Sequence[SnapshotInfo], token: str | None) -> SnapshotInfo | None:
    """Refuse a stream that is not what ``expect`` names or does not fit ``target``.

    ``snaps`` are the target's snapshots, oldest first; ``token`` its resume
    token. Pure. Returns the base snapshot for an incremental, None for a
    full stream; raises ``StreamRefused`` or a ZFS-typed refusal.
    """
    if begin.is_compound:
        # -R and -p both make a compound stream: child datasets and received
        # properties (mountpoint, sharenfs, refreservation) are never taken.
        raise StreamRefused("compound (zfs send -R or -p) streams are not accepted; "
                            "send each dataset on its own, without properties")
    if begin.is_clone or begin.is_redacted:
        raise StreamRefused("clone and redacted streams are not accepted")
    if Feature.RAW in begin.features:
        # Raw (zfs send -w) streams of encrypted datasets are not handled on
        # purpose yet: the zone would hold ciphertext it cannot verify or restore.
        raise StreamRefused("raw (zfs send -w) streams are not accepted yet")
    if begin.snapname != expect.snapshot:
        raise StreamRefused(f"the stream is of snapshot {begin.snapname!r}, "
                            f"the command names {expect.snapshot!r}")
    if expect.toguid is not None and begin.toguid != expect.toguid:
        raise StreamRefused(f"the stream is of guid {begin.toguid}, expected "
                            f"{expect.toguid} for {expect.snapshot!r}")
    if expect.resume != begin.is_resume:
        raise StreamRefused("--resume must be given exactly for a resumed "
                            "(zfs send -t) stream")
    if any(s.name == expect.snapshot for s in snaps):
        raise _refusal(DatasetExists, f"{target} already has snapshot {expect.snapshot!r}")
    if begin.is_resume:
        if token is None:
            raise _refusal(StreamInvalid, f"{target} has no partial receive to resume")
    elif token is not None:
        raise _refusal(PartialReceiveExists,
                       f"{target} holds a partial receive: resume it (resume-token) "
                       "or discard it (abort)")
    if not begin.is_incremental:
        if expect.base is not None:
            raise _refusal(IncrementalSourceMismatch,
                           f"--from {expect.base} was given but the stream is a full stream")
        if snaps:
            raise _refusal(DatasetExists,
                           f"{target} already has snapshots (newest {snaps[-1].name!r}); "
                           "send an incremental from it")
        return None
    if not snaps:
        raise _refusal(IncrementalSourceMismatch,
                       f"{target} holds no snapshot to apply an incremental to; "
                       "send a full stream")
    base = next((s for s in snaps if s.guid == begin.fromguid), None)
    if expect.base is not None:
        named = next((s for s in snaps if s.name == expect.base), None)
        if named is None:
            raise _refusal(IncrementalSourceMismatch,
                           f"{target} has no snapshot {expect.base!r} (--from)")
        if named.guid != begin.fromguid:
            raise _refusal(IncrementalSourceMismatch,
                           f"the stream's base (guid {begin.fromguid}) is not "
                           f"{expect.base!r} (guid {named.guid})")
    if base is None:
        raise _refusal(IncrementalSourceMismatch,
                       f"the stream's base (guid {begin.fromguid}) is not a snapshot of "
                       f"{target}; newest here is {snaps[-1].name!r} (guid {snaps[-1].guid})")
    if base is not snaps[-1]:
        # Applying it would need receive -F, destroying newer snapshots.
        raise _refusal(IncrementalSourceMismatch,
                       f"the stream's base {base.name!r} is not the newest snapshot of "
                       f"{target} ({snaps[-1].name!r}); send from that one")
    return base


async def confirm_guid(zfs: Zfs, target: Dataset, name: str, guid: int) -> None:
    """``target@name`` must be guid ``guid``; a wrong one is destroyed, then refused."""
    got = next((s for s in await zfs.snapshots(target) if s.name == name), None)
    if got is not None and got.guid == guid:
        return
    if got is not None:
        await zfs.destroy(got.snapshot)
    raise _refusal(StreamInvalid,
                   f"after receive, {target}@{name} has guid {got.guid if got else 'none'}, "
                   f"the stream said {guid}; the snapshot was destroyed")


@dataclass(frozen=True)
class Received:
    begin: StreamBegin
    base: str | None  # the incremental's base snapshot name


OpenTee = Callable[[str | None], Awaitable[Sink | None]]


async def receive_stream(zfs: Zfs, target: Dataset, source: Inbound, expect: Expect, *,
                         on_bytes: Callable[[int], None],
                         on_vetted: OpenTee | None = None,
                         resumable: bool = True, force: bool = False) -> Received:
    """Vet ``source``'s stream, receive it into ``target``, confirm the guid.

    ``on_vetted(base)`` runs once the stream passed vetting, before ``zfs
    receive`` starts (a zone creates the VM's container there); it may give a
    second consumer (the mirror) that gets every byte, ended with the stream
    (EOF) or cut (abort) on failure.
    ``force`` (``receive -F``) is only for a CN restoring onto its own
    rolled-back dataset. Nothing reaches ``zfs receive`` before vetting.
    """
    try:
        begin, header = await read_begin(source.read)
    except StreamHeaderError as exc:
        raise _refusal(StreamInvalid, f"not a usable zfs send stream: {exc}") from None
    try:
        snaps = await zfs.snapshots(target)
        token = await zfs.resume_token(target)
    except DatasetNotFound:
        snaps, token = [], None
    base = vet_stream(begin, expect, str(target), snaps, token)
    base_name = base.name if base is not None else None
    tee = await on_vetted(base_name) if on_vetted is not None else None
    r, w = os.pipe()
    try:
        child = await zfs.receive(target, stdin=r, resumable=resumable, force=force)
    except BaseException:
        os.close(w)
        if tee is not None:
            tee.abort()
        raise
    finally:
        os.close(r)
    feeding = asyncio.ensure_future(source.pipe_to(w, header, on_bytes, tee))
    exited = asyncio.ensure_future(child.proc.wait())
    ok = False
    try:
        await asyncio.wait({feeding, exited}, return_when=asyncio.FIRST_COMPLETED)
        if not feeding.done():
            # zfs receive exited before stdin ended: it read DRR_END (then the
            # sender's EOF is only late) or it failed. Its status decides.
            source.stop()
        try:
            await feeding
        except PipeGone:
            pass  # zfs receive's own error, below, says what was wrong
        except ClientGone:
            # zfs receive got a truncated stream and fails; wait for it so a
            # partial state (OpenZFS, -s) is settled for a later resume.
            if await exited != 0:
                await child.wait()
                raise
        await zfs.check(child)
        ok = True
    finally:
        for task in (feeding, exited):
            if not task.done():
                task.cancel()
        if child.proc.returncode is None:
            await child.abort()
        if tee is not None and not ok:
            tee.abort()
    await confirm_guid(zfs, target, expect.snapshot, begin.toguid)
    if tee is not None:
        tee.eof()
    return Received(begin, base_name)


@dataclass
class LocalEndpoint:
    """This zone as an ``endpoint.Endpoint``: its pool, under the VM lock."""

    zfs: Zfs
    store: ZoneStore
    transfers: TransferRegistry
    vm_locks: defaultdict[str, asyncio.Lock]
    source: str = ""  # who a commit here comes from ("zone:<uuid>", "cn:<id>")

    async def inventory(self, vm: str) -> Inventory:
        doc = await self.store.document(vm)
        # What must not be touched here now (pushes between parts, transfers).
        return replace(doc, in_use=frozenset(self.transfers.in_use(vm)))

    async def snapshots(self, vm: str) -> Sequence[VmSnapshot]:
        return await self.store.snapshots(vm)

    async def resume_token(self, vm: str, dataset: str) -> str | None:
        try:
            return await self.zfs.resume_token(self.store.part_dataset(vm, dataset))
        except DatasetNotFound:
            return None

    async def abort(self, vm: str, dataset: str) -> None:
        target = self.store.part_dataset(vm, dataset)
        # Checked before the lock, so a ZFS without it answers at once.
        (await self.zfs.capabilities()).require("resumable_receive")
        async with self.vm_locks[vm]:
            await self.zfs.receive_abort(target)

    async def metadata(self, vm: str, snap: str) -> dict[str, Any] | None:
        return await self.store.metadata(vm, snap)

    async def commit(self, vm: str, snap: str, datasets: Sequence[str],
                     metadata: Mapping[str, Any] | None) -> StoredSnapshot:
        async with self.vm_locks[vm]:
            done = await self.store.mark_complete(vm, snap, datasets, metadata, self.source)
        self.transfers.committed(vm, snap)  # its parts were pending until now
        return done

    async def destroy(self, vm: str, snap: str, dataset: str | None,
                      guid: int | None) -> None:
        async with self.vm_locks[vm]:
            if dataset is None:
                await self.store.destroy_marker(vm, snap)
            else:
                assert guid is not None
                await self.store.destroy_part(vm, dataset, snap, guid)


@dataclass(frozen=True)
class ReceiveRequest:
    kind: str  # "receive" (a CN's push) or "mirror-in" (from a peer zone)
    vm: str
    dataset: str
    expect: Expect
    peer: str  # who sends: "cn:<id>", "zone:<uuid>"
    size: int | None = None  # announced stream size, for the space check
    lease: bool = True  # a commit is to come (a client's push); not for a pull
    # For parts a peer zone tees here: they end with its connection, as its push does.
    connection: int | None = None


@dataclass
class ZoneReceiver:
    """A zone's receive: locks, slots, space and bookkeeping around ``receive_stream``."""

    zfs: Zfs
    store: ZoneStore
    transfers: TransferRegistry
    receive_slots: asyncio.Semaphore
    vm_locks: defaultdict[str, asyncio.Lock]
    log: logging.Logger
    free_bytes: Callable[[], Awaitable[int]]  # the pool's free space, asked afresh

    async def receive(self, req: ReceiveRequest, source: Inbound, *,
                      open_tee: OpenTee | None = None) -> tuple[Received, Transfer]:
        """Receive one dataset snapshot of ``req.vm`` from ``source``."""
        if req.size is not None:
            await self._check_space(req.size)  # up front, before waiting for a slot
        async with contextlib.AsyncExitStack() as held:
            # VM lock before slot: a push waiting on its own VM holds no slot.
            # A client that gives up while queued leaves the queue at once.
            await _acquire_unless_gone(held, self.vm_locks[req.vm], source)
            await _acquire_unless_gone(held, self.receive_slots, source)
            if req.size is not None:
                await self._check_space(req.size)  # space may have gone while queued
            exp = req.expect
            t = self.transfers.start(req.kind, req.vm, req.dataset, exp.snapshot, exp.base,
                                     req.peer, req.size)
            lg = slog.child(self.log, vm=req.vm, snapshot=exp.snapshot, dataset=req.dataset,
                            kind=req.kind, peer=req.peer, transfer=t.id)
            with self.transfers.running(t, lg):
                async def vetted(base: str | None) -> Sink | None:
                    t.base = base
                    await self.store.ensure_vm(req.vm)  # only for a stream that passed
                    return await open_tee(base) if open_tee is not None else None

                got = await receive_stream(self.zfs, self.store.part_dataset(req.vm, req.dataset),
                                           source, exp, on_bytes=t.add, on_vetted=vetted)
                if req.lease:  # confirmed by guid: awaited by a commit until the lease ends
                    self.transfers.pending(req.vm, exp.snapshot, source=req.peer)
                    if req.connection is not None:
                        self.transfers.bind(req.vm, exp.snapshot, req.connection)
        return got, t

    async def _check_space(self, size: int) -> None:
        free = await self.free_bytes()
        # Receives already running will still write what they announced.
        promised = sum(max((t.expected or 0) - t.bytes, 0) for t in self.transfers.active()
                       if t.kind in ("receive", "mirror-in"))
        margin = SPACE_MARGIN + size // SPACE_MARGIN_FRACTION
        if size + margin > free - promised:
            raise InsufficientSpace(
                f"a stream of {size} bytes does not fit: {free} bytes available, "
                f"{promised} promised to receives in progress, {margin} kept in reserve")


async def _acquire_unless_gone(held: contextlib.AsyncExitStack,
                               lock: asyncio.Lock | asyncio.Semaphore,
                               source: Inbound) -> None:
    """Acquire ``lock`` (released when ``held`` closes) or raise ClientGone first."""
    acquiring = asyncio.ensure_future(lock.acquire())
    gone = asyncio.ensure_future(source.gone())
    try:
        await asyncio.wait({acquiring, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not acquiring.done():
            acquiring.cancel()
    if acquiring.done() and not acquiring.cancelled():
        held.callback(lock.release)
        return
    raise ClientGone("the client disconnected while its push was queued")
