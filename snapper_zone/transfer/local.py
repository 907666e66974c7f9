"""The one way a stream becomes a snapshot here: the only caller of ``zfs receive``.

Every stream that lands on a ZFS this project runs on comes through
``receive_stream``: a CN's push into a zone, a primary's pipelined mirror, a
zone pulling a snapshot from its peer (catch-up, moves), a CN restoring from
a zone. Each gets the same checks, in this order:

1. the stream's header (DRR_BEGIN) is read and parsed before ``zfs receive``
   starts; ``vet_stream`` (pure) refuses a compound (``-R``) or property
   (``-p``) stream, a clone or redacted one, a raw or compressed one this
   host's ZFS cannot take, a stream of another snapshot
   than the one asked for, one of another guid than expected, a full stream onto a dataset that has
   snapshots, an incremental whose base is not the target's newest
   snapshot, and a resume that does not match the partial state;
2. the bytes are piped into ``zfs receive`` (``stream.Inbound.pipe_to``);
3. the snapshot ZFS made must carry the guid the header announced
   (``confirm_guid``), or it is destroyed and the receive fails.

On a zone, ``ZoneReceiver`` adds what a zone owes its other clients: the VM
lock, a receive slot shared fairly (``ReceiveSlots``), the space and quota
checks against the announced size, the byte budget enforced while the stream
arrives (``--size`` plus a margin, the quotas, the free space: a stream over
it is cut and nothing of it is kept), the transfer record (for
``/v1/transfers`` and "in use"), and the VM container.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from snapper_zone.common import log as slog
from snapper_zone.errors import (
    DatasetBusy,
    DatasetExists,
    DatasetNotFound,
    IncrementalSourceMismatch,
    OutOfSpace,
    PartialReceiveExists,
    SnapperError,
    StreamInvalid,
    ZfsError,
)
from snapper_zone.transfer.registry import SnapshotInUse, Transfer, TransferRegistry
from snapper_zone.transfer.store import VmSnapshot as StoredSnapshot
from snapper_zone.transfer.store import ZoneStore
from snapper_zone.transfer.stream import ClientGone, Inbound, PipeGone, Sink
from snapper_zone.wire import Inventory, VmSnapshot
from snapper_zone.zfs.names import Dataset
from snapper_zone.zfs.sendstream import Feature, StreamBegin, StreamHeaderError, read_begin
from snapper_zone.zfs.zfs import SnapshotInfo, Zfs, protected_props

__all__ = [
    "SIZE_MARGIN",
    "SPACE_MARGIN",
    "Expect",
    "InsufficientSpace",
    "LocalEndpoint",
    "QuotaExceeded",
    "Quotas",
    "ReceiveRequest",
    "ReceiveSlots",
    "Received",
    "StreamRefused",
    "StreamTooLarge",
    "ZoneReceiver",
    "confirm_guid",
    "receive_stream",
    "vet_stream",
]

# Room kept free beyond a push's announced size: receive writes metadata the
# stream does not count, and a pool run to its last block is slow to recover.
SPACE_MARGIN = 64 << 20
SPACE_MARGIN_FRACTION = 50  # plus 2% of the announced size
# A stream may exceed its announced --size (``zfs send -n -P``'s estimate) by
# this much before it is cut: the estimate leaves out per-record headers,
# which small blocks make a few percent of the stream.
SIZE_MARGIN = 16 << 20
SIZE_MARGIN_FRACTION = 10  # plus 10% of the announced size


def size_limit(size: int) -> int:
    """The most bytes a stream announced as ``size`` may bring."""
    return size + SIZE_MARGIN + size // SIZE_MARGIN_FRACTION


class StreamRefused(SnapperError):
    """The stream is not the one the command names, or not one we accept."""

    code = "StreamRefused"
    http_status = 422


class InsufficientSpace(OutOfSpace):
    """Refused up front: the announced size does not fit; nothing was written."""

    def __init__(self, message: str) -> None:
        super().__init__(("snapperd", "receive"), "", None, message)


class QuotaExceeded(SnapperError):
    """The VM's or the CN's quota on this zone has no room for the stream; nothing kept."""

    code = "QuotaExceeded"
    http_status = 507


class StreamTooLarge(SnapperError):
    """The stream brought more than its announced --size plus the margin; nothing kept."""

    code = "StreamTooLarge"
    http_status = 413


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
               snaps: Sequence[SnapshotInfo], token: str | None,
               features: frozenset[str] = frozenset()) -> SnapshotInfo | None:
    """Refuse a stream that is not what ``expect`` names or does not fit ``target``.

    ``snaps`` are the target's snapshots, oldest first; ``token`` its resume
    token; ``features`` the stream options this host receives
    (``Capabilities.stream_features``: a raw stream of an encrypted dataset is
    kept as ciphertext where ZFS has encryption, refused elsewhere). Pure.
    Returns the base snapshot for an incremental, None for a full stream;
    raises ``StreamRefused`` or a ZFS-typed refusal.
    """
    if begin.is_compound:
        # -R and -p both make a compound stream: child datasets and received
        # properties (mountpoint, sharenfs, refreservation) are never taken.
        raise StreamRefused("compound (zfs send -R or -p) streams are not accepted; "
                            "send each dataset on its own, without properties")
    if begin.is_clone or begin.is_redacted:
        raise StreamRefused("clone and redacted streams are not accepted")
    for flag, name, how in ((Feature.RAW, "raw", "raw (zfs send -w)"),
                            (Feature.COMPRESSED, "compressed", "compressed (zfs send -c)")):
        if flag in begin.features and name not in features:
            # The sender should have asked (``features``); say it before ZFS
            # fails on it with a less telling message.
            raise StreamRefused(f"{how} streams cannot be received by this host's ZFS")
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


async def confirm_guid(zfs: Zfs, target: Dataset, name: str, guid: int,
                       arrived: Sequence[SnapshotInfo]) -> None:
    """``target@name`` (among ``arrived``, its snapshots as listed after the
    receive) must be guid ``guid``; a wrong one is destroyed, then refused."""
    got = next((s for s in arrived if s.name == name), None)
    if got is not None and got.guid == guid:
        return
    if got is not None:
        await zfs.destroy(got.snapshot)
    raise _refusal(StreamInvalid,
                   f"after receive, {target}@{name} has guid {got.guid if got else 'none'}, "
                   f"the stream said {guid}; the snapshot was destroyed")


# How long a cut stream's clean-up waits for ZFS to let go of its dataset.
_DISCARD_BUSY_SECONDS = 10.0

@dataclass(frozen=True)
class Received:
    begin: StreamBegin
    base: str | None  # the incremental's base snapshot name


OpenTee = Callable[[str | None], Awaitable[Sink | None]]


@dataclass(frozen=True)
class Quotas:
    """Per VM and per CN, in bytes of ZFS ``used`` under the root; 0: none."""

    vm: int = 0
    cn: int = 0
    owner_of: Callable[[str], str | None] = lambda vm: None


class ReceiveSlots:
    """``total`` receive slots for clients' pushes, at most ``per_principal`` of them
    held by any one client; mirror-in from peer zones has ``mirror_total`` of its own.

    So four idle pushes of one CN cannot take every slot, and no CN's pushes can
    keep a peer's mirror stream (or a catch-up pull) waiting. Waiters are served
    in arrival order among those that may take a slot now.
    """

    def __init__(self, total: int, per_principal: int, mirror_total: int) -> None:
        self.total = total
        self.per_principal = per_principal
        self.mirror_total = mirror_total
        self._used = 0
        self._mirror_used = 0
        self._held: Counter[str] = Counter()
        self._waiters: deque[tuple[bool, str, asyncio.Future[None]]] = deque()

    def held(self, who: str) -> int:
        return self._held[who]

    def _fits(self, mirror: bool, who: str) -> bool:
        if mirror:
            return self._mirror_used < self.mirror_total
        return self._used < self.total and self._held[who] < self.per_principal

    def _take(self, mirror: bool, who: str) -> None:
        if mirror:
            self._mirror_used += 1
        else:
            self._used += 1
            self._held[who] += 1

    async def acquire(self, mirror: bool, who: str) -> None:
        if self._fits(mirror, who):
            self._take(mirror, who)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (mirror, who, fut)
        self._waiters.append(entry)
        try:
            await fut
        except BaseException:
            if entry in self._waiters:
                self._waiters.remove(entry)
            elif fut.done() and not fut.cancelled():
                self.release(mirror, who)  # granted as we were cancelled: give it back
            raise

    def release(self, mirror: bool, who: str) -> None:
        if mirror:
            self._mirror_used -= 1
        else:
            self._used -= 1
            self._held[who] -= 1
            if not self._held[who]:
                del self._held[who]
        for entry in list(self._waiters):
            w_mirror, w_who, fut = entry
            if fut.done():
                self._waiters.remove(entry)
            elif self._fits(w_mirror, w_who):
                self._waiters.remove(entry)
                self._take(w_mirror, w_who)
                fut.set_result(None)


def _quota_cut(who: str, used: int, quota: int) -> Callable[[int], SnapperError]:
    def error(n: int) -> SnapperError:
        return QuotaExceeded(f"{who} uses {used} of its quota of {quota} bytes on this zone; "
                             f"the stream brought over {n} bytes, more than the "
                             f"{quota - used} left; cut, nothing kept")
    return error


# A free-space reading this young is used again rather than asked afresh: a
# receive that got its lock and slot at once checks space twice within
# milliseconds, and each read is a ``zfs`` command. ZFS's own figure lags by
# up to a transaction group (seconds) anyway.
_SPACE_FRESH_SECONDS = 1.0


@dataclass(frozen=True)
class _FreeSpace:
    bytes: int
    at: float = field(default_factory=time.monotonic)

    def fresh(self) -> bool:
        return time.monotonic() - self.at < _SPACE_FRESH_SECONDS


class _Budget:
    """The bytes a stream may still bring, each bound with the error that cuts it."""

    def __init__(self, source: Inbound) -> None:
        self.source = source
        self.bytes = 0
        self._limits: list[tuple[int, Callable[[int], SnapperError]]] = []
        self.cut: SnapperError | None = None

    def limit(self, at: int, error: Callable[[int], SnapperError]) -> None:
        self._limits.append((max(at, 0), error))

    def add(self, n: int) -> None:
        self.bytes += n
        if self.cut is not None:
            return
        for at, error in self._limits:
            if self.bytes > at:
                self.cut = error(self.bytes)
                self.source.cut(self.cut)
                return


async def receive_stream(zfs: Zfs, target: Dataset, source: Inbound, expect: Expect, *,
                         on_bytes: Callable[[int], None],
                         on_vetted: OpenTee | None = None,
                         resumable: bool = True, force: bool = False,
                         protect: bool = False, ring: int = 0) -> Received:
    """Vet ``source``'s stream, receive it into ``target``, confirm the guid.

    ``on_vetted(base)`` runs once the stream passed vetting, before ``zfs
    receive`` starts (a zone creates the VM's container there); it may give a
    second consumer (the mirror) that gets every byte, ended with the stream
    (EOF) or cut (abort) on failure.
    ``force`` (``receive -F``) is only for a CN restoring onto its own
    rolled-back dataset. Nothing reaches ``zfs receive`` before vetting.
    ``protect`` (a zone's receive): no property the stream carries
    (``zfs.PROTECTED_PROPS``) takes effect. ``ring``: bytes of memory to
    buffer the stream in before ``zfs receive`` (``Inbound.pipe_to``).
    """
    try:
        begin, header = await read_begin(source.read)
    except StreamHeaderError as exc:
        raise _refusal(StreamInvalid, f"not a usable zfs send stream: {exc}") from None
    try:  # its snapshots and its resume token in one listing
        infos, listed, _ = await zfs.tree(target, depth=1)
    except DatasetNotFound:
        infos, listed = [], []
    snaps = [s for s in listed if s.snapshot.dataset == target]
    token = next((i.resume_token for i in infos if i.dataset == target), None)
    base = vet_stream(begin, expect, str(target), snaps, token,
                      (await zfs.capabilities()).stream_features())
    guarded = protected_props(begin.is_zvol) if protect else ()
    base_name = base.name if base is not None else None
    tee = await on_vetted(base_name) if on_vetted is not None else None
    r, w = os.pipe()
    try:
        child = await zfs.receive(target, stdin=r, resumable=resumable, force=force,
                                  exclude=guarded)
    except BaseException:
        os.close(w)
        if tee is not None:
            tee.abort()
        raise
    finally:
        os.close(r)
    feeding = asyncio.ensure_future(source.pipe_to(w, header, on_bytes, tee, ring=ring))
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
        try:
            await zfs.check(child)
        except SnapperError:
            if guarded:  # even a failed receive may have set (and mounted) them
                with contextlib.suppress(SnapperError):
                    await zfs.override_received(target, guarded)
            raise
        # The stream's properties undone (zfs-fuse), its snapshots listed to confirm.
        arrived = await zfs.received(target, guarded)
        ok = True
    finally:
        for task in (feeding, exited):
            if not task.done():
                task.cancel()
        if child.proc.returncode is None:
            await child.abort()
        if tee is not None and not ok:
            tee.abort()
    await confirm_guid(zfs, target, expect.snapshot, begin.toguid, arrived)
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
            # Checked under the lock a commit takes: a part stays in use until its
            # commit has marked it, so no destroy lands between the two.
            if snap in self.transfers.in_use(vm):
                raise SnapshotInUse(f"VM {vm} snapshot {snap!r} is in use by a transfer")
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
    """A zone's receive: locks, slots, space, quotas and bookkeeping around ``receive_stream``."""

    zfs: Zfs
    store: ZoneStore
    transfers: TransferRegistry
    receive_slots: ReceiveSlots
    vm_locks: defaultdict[str, asyncio.Lock]
    log: logging.Logger
    free_bytes: Callable[[], Awaitable[int]]  # the pool's free space, asked afresh
    quotas: Quotas = Quotas()
    copy_buffer: int = 0  # bytes of ring before zfs receive for a mirror-in (RingPump)

    async def receive(self, req: ReceiveRequest, source: Inbound, *,
                      open_tee: OpenTee | None = None) -> tuple[Received, Transfer]:
        """Receive one dataset snapshot of ``req.vm`` from ``source``."""
        # Up front, before waiting for a slot, and again once it has one
        # (usage may have grown while queued; space is read again only if
        # this first reading is no longer fresh).
        space = await self._budget(req, None)
        mirror = req.kind == "mirror-in"
        async with contextlib.AsyncExitStack() as held:
            # VM lock before slot: a push waiting on its own VM holds no slot.
            # A client that gives up while queued leaves the queue at once.
            lock = self.vm_locks[req.vm]
            await _acquire_unless_gone(held, lock.acquire, lock.release, source)
            slots = self.receive_slots
            await _acquire_unless_gone(held, lambda: slots.acquire(mirror, req.peer),
                                       lambda: slots.release(mirror, req.peer), source)
            budget = _Budget(source)
            await self._budget(req, budget, space)
            exp = req.expect
            t = self.transfers.start(req.kind, req.vm, req.dataset, exp.snapshot, exp.base,
                                     req.peer, req.size)
            lg = slog.child(self.log, vm=req.vm, snapshot=exp.snapshot, dataset=req.dataset,
                            kind=req.kind, peer=req.peer, transfer=t.id)
            created: list[bool] = []

            def counted(n: int) -> None:
                t.add(n)
                budget.add(n)

            with self.transfers.running(t, lg):
                async def vetted(base: str | None) -> Sink | None:
                    t.base = base
                    # Only for a stream that passed. An incremental's base is
                    # a snapshot in the VM's container: it is there.
                    created.append(base is None and await self.store.ensure_vm(req.vm))
                    return await open_tee(base) if open_tee is not None else None

                target = self.store.part_dataset(req.vm, req.dataset)
                try:
                    got = await receive_stream(self.zfs, target, source, exp,
                                               on_bytes=counted, on_vetted=vetted,
                                               protect=True,
                                               ring=self.copy_buffer if mirror else 0)
                except SnapperError:
                    if budget.cut is not None:
                        # Cut for its size: unlike a client gone, nothing is kept
                        # to resume (it would only be cut again).
                        await self._discard(req.vm, target, bool(created and created[0]))
                        raise budget.cut from None
                    raise
                if req.lease:  # confirmed by guid: awaited by a commit until the lease ends
                    self.transfers.pending(req.vm, exp.snapshot, source=req.peer)
                    if req.connection is not None:
                        self.transfers.bind(req.vm, exp.snapshot, req.connection)
        return got, t

    async def _budget(self, req: ReceiveRequest, budget: _Budget | None,
                      space: _FreeSpace | None = None) -> _FreeSpace:
        """Refuse what cannot fit now; with ``budget``, set the limits the stream is cut at.

        Without ``--size`` only an exhausted quota or pool refuses up front;
        the stream is then bounded while it arrives. ``space``: the pool's free
        space as read earlier, used again if it is still fresh. Returns the
        reading it went by.
        """
        size = req.size
        if size is not None and budget is not None:
            budget.limit(size_limit(size), lambda n: StreamTooLarge(
                f"the stream brought over {n} bytes; it announced --size {size} (at most "
                f"{size_limit(size)} accepted, margin included); cut, nothing kept"))
        # Space: receives already running will still write what they announced.
        if space is None or not space.fresh():
            space = _FreeSpace(await self.free_bytes())
        free = space.bytes
        promised = sum(max((t.expected or 0) - t.bytes, 0) for t in self.transfers.active()
                       if t.kind in ("receive", "mirror-in"))
        want = size or 0
        margin = SPACE_MARGIN + want // SPACE_MARGIN_FRACTION
        room = free - promised - margin
        if want > room or room <= 0:
            what = f"a stream of {size} bytes" if size is not None else "a stream"
            raise InsufficientSpace(
                f"{what} does not fit: {free} bytes available, "
                f"{promised} promised to receives in progress, {margin} kept in reserve")
        if budget is not None:
            budget.limit(room, lambda n: InsufficientSpace(
                f"the stream brought over {n} bytes; only {room} were free beyond the "
                "reserve; cut, nothing kept"))
        if req.kind != "receive":
            return space  # a peer's mirror of a push its zone already held to the quotas
        q = self.quotas
        cn = q.owner_of(req.vm)
        if not q.vm and not (q.cn and cn is not None):
            return space
        usage = await self._usage()
        # The client's other pushes in progress count at what they brought so
        # far (their bytes may not show in ``used`` yet).
        running = sum(t.bytes for t in self.transfers.active()
                      if t.kind == "receive" and t.peer == req.peer
                      and (budget is None or t.vm != req.vm or t.dataset != req.dataset))
        checks: list[tuple[str, int, int]] = []
        if q.vm:
            checks.append((f"VM {req.vm}", usage.get(req.vm, 0), q.vm))
        if q.cn and cn is not None:
            cn_used = sum(u for vm, u in usage.items() if q.owner_of(vm) == cn) + running
            checks.append((f"CN {cn}", cn_used, q.cn))
        for who, used, quota in checks:
            left = quota - used
            if want > left or left <= 0:
                raise QuotaExceeded(
                    f"{who} uses {used} of its quota of {quota} bytes on this zone; "
                    + (f"a stream of {size} bytes does not fit" if size is not None
                       else "no room is left") + "; nothing was received")
            if budget is not None:
                budget.limit(left, _quota_cut(who, used, quota))
        return space

    async def _usage(self) -> dict[str, int]:
        """Each VM's ZFS ``used`` under the root (its datasets and snapshots)."""
        try:
            infos = await self.zfs.datasets(self.store.root, depth=1)
        except DatasetNotFound:
            return {}
        return {i.dataset.basename: i.used for i in infos if i.dataset.parent == self.store.root}

    async def _discard(self, vm: str, target: Dataset, container_created: bool) -> None:
        """Leave nothing of a stream that was cut: its partial state, a dataset it
        created, the VM container it created.

        Each step is retried while ZFS calls the dataset busy: the receive that
        was cut may hold it a moment after its process has gone (zfs-fuse's
        daemon finishes the ioctl by itself)."""
        async def abort() -> None:
            if await self.zfs.resume_token(target):
                await self.zfs.receive_abort(target)

        async def created() -> None:
            if await self.zfs.exists(target) and not await self.zfs.snapshots(target):
                await self.zfs.destroy(target, recursive=True)

        async def container() -> None:
            ds = self.store.vm_dataset(vm)
            if len(await self.zfs.datasets(ds)) <= 1 and not await self.zfs.snapshots(ds):
                await self.zfs.destroy(ds, recursive=True)

        for step in (abort, created, *([container] if container_created else [])):
            try:
                async for attempt in AsyncRetrying(
                        retry=retry_if_exception_type(DatasetBusy), reraise=True,
                        stop=stop_after_delay(_DISCARD_BUSY_SECONDS),
                        wait=wait_exponential(multiplier=0.05, max=1.0)):
                    with attempt:
                        await step()
            except SnapperError as e:  # the stream's own error is what the sender hears
                self.log.warning("a cut stream's clean-up left something", extra={
                    "vm": vm, "dataset": str(target), "step": step.__name__,
                    "err_msg": str(e)})


async def _acquire_unless_gone(held: contextlib.AsyncExitStack,
                               acquire: Callable[[], Awaitable[object]],
                               release: Callable[[], None], source: Inbound) -> None:
    """``acquire()`` (``release`` runs when ``held`` closes) or raise ClientGone first."""
    acquiring = asyncio.ensure_future(acquire())
    gone = asyncio.ensure_future(source.gone())
    try:
        await asyncio.wait({acquiring, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not acquiring.done():
            acquiring.cancel()
    if acquiring.done() and not acquiring.cancelled():
        held.callback(release)
        return
    raise ClientGone("the client disconnected while its push was queued")
