"""The zone's command handlers: what each line of the SSH grammar does.

Transport-agnostic: a transport (the SSH session in ``sshserver``) parses
nothing itself. It hands ``Service.execute`` the authenticated principal, the
exec line and an ``Io``: an ``Inbound`` it pushes the client's bytes into, and
ways to write stdout/stderr. ``execute`` parses, authorises, runs, counts the
command in metrics and returns the exit status; on failure it has already
written ``protocol.error_line(err)`` to stderr.

The receive data path is the hot one. Bytes are pushed from the transport's
callback straight into a kernel pipe that is ``zfs receive``'s stdin (no task
switch or extra copy per packet); the transport's reading is paused while the
pipe's write buffer is above asyncio's high-water mark and resumed when it
drains, so memory stays bounded by the SSH window plus one pipe buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import replace
from typing import Any, Protocol

from replication.replicator import MirrorUnavailable
from snapper_zone import log as slog
from snapper_zone import protocol
from snapper_zone.auth import NotAuthorized, Principal, authorize, verb
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
from snapper_zone.inbound import ClientGone, Inbound, PipeGone
from snapper_zone.names import Snapshot
from snapper_zone.protocol import (
    Abort,
    Command,
    Commit,
    Delete,
    Destroy,
    Metadata,
    Ping,
    Receive,
    ResumeToken,
    Send,
    Snapshots,
)
from snapper_zone.sendstream import StreamBegin, StreamHeaderError, read_begin
from snapper_zone.store import SnapshotNotFound, VmSnapshot
from snapper_zone.transfers import SnapshotInUse, Transfer
from snapper_zone.zfs import SendSpec, SnapshotInfo
from snapper_zone.zone import Zone

__all__ = [
    "SPACE_MARGIN",
    "ClientGone",
    "Inbound",
    "InsufficientSpace",
    "InvalidMetadata",
    "Io",
    "Service",
    "SnapshotInUse",
    "SnapshotIncomplete",
    "StreamRefused",
]

# Room kept free beyond a push's announced size: receive writes metadata the
# stream does not count, and a pool run to its last block is slow to recover.
SPACE_MARGIN = 64 << 20
SPACE_MARGIN_FRACTION = 50  # plus 2% of the announced size
_SEND_CHUNK = 256 << 10


class StreamRefused(SnapperError):
    """The stream is not the one the command names, or not one we accept."""

    code = "StreamRefused"
    http_status = 422


class InsufficientSpace(OutOfSpace):
    """Refused up front: the announced size does not fit; nothing was written."""

    def __init__(self, message: str) -> None:
        super().__init__(("snapperd", "receive"), "", None, message)


class SnapshotIncomplete(SnapperError):
    code = "SnapshotIncomplete"
    http_status = 409


class InvalidMetadata(SnapperError):
    code = "InvalidArgument"
    http_status = 422


def _refusal(cls: type[ZfsError], message: str) -> ZfsError:
    """A ZFS-typed error decided by snapperd itself, before ZFS saw a byte."""
    return cls(("snapperd", "receive"), "", None, message)


class Io(Protocol):
    """What a transport gives a handler: the client's bytes and its two outputs."""

    @property
    def inbound(self) -> Inbound: ...

    def write(self, data: bytes) -> None:
        """stdout; raises ClientGone once the client is gone."""

    async def drain(self) -> None:
        """Wait until the client can take more stdout (raises ClientGone)."""

    def write_stderr(self, data: bytes) -> None: ...


class Service:
    """Runs commands for one zone."""

    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self.log = zone.log

    async def execute(self, principal: Principal, line: str, io: Io) -> int:
        """Parse, authorise and run one command; return its exit status."""
        label = _verb_label(line)
        try:
            cmd = protocol.parse(line)
            label = verb(cmd)
            try:
                authorize(principal, cmd, self.zone.owner_of)
            except NotAuthorized as err:
                self.zone.metrics.auth_failures.labels("not_authorized").inc()
                self.log.warning("command refused", extra={
                    "principal": principal.label, "fingerprint": principal.fingerprint,
                    "command": line[:200], "reason": err.message})
                raise
            await self._dispatch(principal, cmd, io)
        except SnapperError as err:
            self.zone.metrics.commands.labels(label, err.code).inc()
            io.write_stderr(protocol.error_line(err).encode())
            return 1
        except Exception as exc:  # a bug: tell the client something, keep serving
            self.log.exception("command crashed", extra={"command": line[:200],
                                                         "principal": principal.label})
            bug = SnapperError(f"internal error: {type(exc).__name__}: {exc}")
            self.zone.metrics.commands.labels(label, bug.code).inc()
            io.write_stderr(protocol.error_line(bug).encode())
            return 1
        self.zone.metrics.commands.labels(label, "ok").inc()
        return 0

    async def _dispatch(self, p: Principal, cmd: Command, io: Io) -> None:
        match cmd:
            case Receive():
                await self.receive(p, cmd, io)
            case Send():
                await self.send(p, cmd, io)
            case ResumeToken(vm, ds):
                target = self.zone.store.part_dataset(vm, ds)
                try:
                    token = await self.zone.zfs.resume_token(target)
                except DatasetNotFound:
                    token = None
                io.write(f"{token or '-'}\n".encode())
            case Abort(vm, ds):
                target = self.zone.store.part_dataset(vm, ds)
                # Checked before the lock, so a ZFS without it answers at once.
                (await self.zone.zfs.capabilities()).require("resumable_receive")
                async with self.zone.vm_locks[vm]:
                    await self.zone.zfs.receive_abort(target)
            case Snapshots(vm):
                doc = await self.zone.store.document(vm)
                # What must not be touched here now (pushes between parts, transfers).
                doc = replace(doc, in_use=frozenset(self.zone.transfers.in_use(vm)))
                io.write(_json_line(doc.to_json()))
            case Commit():
                await self.commit(p, cmd, io)
            case Metadata(vm, snap):
                io.write(_json_line(await self.zone.store.metadata(vm, snap)))
            case Delete(vm, snap):
                await self.zone.delete_snapshot(vm, snap)
                self.log.info("deleted snapshot", extra={"vm": vm, "snapshot": snap,
                                                         "principal": p.label})
            case Destroy(vm, snap, ds, guid):
                if snap in self.zone.transfers.in_use(vm):
                    raise SnapshotInUse(f"VM {vm} snapshot {snap!r} is in use by a transfer")
                await self.zone.destroy(vm, snap, ds, guid)
            case Ping():
                io.write(b"pong\n")

    # -- receive --------------------------------------------------------------

    async def receive(self, p: Principal, cmd: Receive, io: Io) -> None:
        zone = self.zone
        kind = "receive" if p.role == "cn" else "mirror-in"
        if cmd.size is not None:
            await self._check_space(cmd.size)  # up front, before waiting for a slot
        async with contextlib.AsyncExitStack() as held:
            # VM lock before slot: a push waiting on its own VM holds no slot.
            # A client that gives up while queued leaves the queue at once.
            await _acquire_unless_gone(held, zone.vm_locks[cmd.vm], io.inbound)
            await _acquire_unless_gone(held, zone.receive_slots, io.inbound)
            if cmd.size is not None:
                await self._check_space(cmd.size)  # space may have gone while queued
            t = zone.transfers.start(kind, cmd.vm, cmd.dataset, cmd.snapshot, cmd.base,
                                     p.label, cmd.size)
            lg = slog.child(self.log, vm=cmd.vm, snapshot=cmd.snapshot, dataset=cmd.dataset,
                            kind=kind, peer=p.label, transfer=t.id)
            lg.info("transfer start", extra={"base": cmd.base, "expected": cmd.size})
            result = "error"
            try:
                await self._receive_stream(cmd, io, t, kind)
                zone.transfers.pending(cmd.vm, cmd.snapshot, p.connection, p.label)
                result = "ok"
            except SnapperError as err:
                result = err.code
                raise
            finally:
                zone.transfers.finish(t, result)
                level = logging.INFO if result == "ok" else logging.WARNING
                lg.log(level, "transfer end", extra={
                    "result": result, "bytes": t.bytes, "seconds": round(t.elapsed, 3),
                    "mbps": round(t.rate / 1e6, 1)})

    async def _check_space(self, size: int) -> None:
        free = await self.zone.refresh_capacity()
        # Receives already running will still write what they announced.
        promised = sum(max((t.expected or 0) - t.bytes, 0) for t in self.zone.transfers.active()
                       if t.kind in ("receive", "mirror-in"))
        margin = SPACE_MARGIN + size // SPACE_MARGIN_FRACTION
        if size + margin > free - promised:
            raise InsufficientSpace(
                f"a stream of {size} bytes does not fit: {free} bytes available, "
                f"{promised} promised to receives in progress, {margin} kept in reserve")

    async def _receive_stream(self, cmd: Receive, io: Io, t: Transfer, kind: str) -> None:
        zone = self.zone
        target = zone.store.part_dataset(cmd.vm, cmd.dataset)
        try:
            begin, header = await read_begin(io.inbound.read)
        except StreamHeaderError as exc:
            raise _refusal(StreamInvalid, f"not a usable zfs send stream: {exc}") from None
        t.base = await self._vet(cmd, begin)
        await zone.store.ensure_vm(cmd.vm)
        tee = None
        if zone.replicator is not None and kind == "receive" and not cmd.resume:
            tee = await zone.replicator.open_tee(cmd, t.base, io.inbound)
        r, w = os.pipe()
        try:
            child = await zone.zfs.receive(target, stdin=r)
        except BaseException:
            os.close(w)
            if tee is not None:
                tee.abort()
            raise
        finally:
            os.close(r)
        feeding = asyncio.ensure_future(io.inbound.pipe_to(w, header, t.add, tee))
        exited = asyncio.ensure_future(child.proc.wait())
        ok = False
        try:
            await asyncio.wait({feeding, exited}, return_when=asyncio.FIRST_COMPLETED)
            if not feeding.done():
                # zfs receive exited before stdin ended: it read DRR_END (then
                # the client's EOF is only late) or it failed. Its status decides.
                io.inbound.stop()
            try:
                await feeding
            except PipeGone:
                pass  # zfs receive's own error, below, says what was wrong
            except ClientGone:
                # zfs receive got a truncated stream and fails; wait for it so
                # a partial state (OpenZFS, -s) is settled for a later resume.
                if await exited != 0:
                    await child.wait()
                    raise
            await zone.zfs.check(child)
            ok = True
        finally:
            for task in (feeding, exited):
                if not task.done():
                    task.cancel()
            if child.proc.returncode is None:
                await child.abort()
            if tee is not None and not ok:
                tee.abort()
        await self._confirm(cmd, begin)
        if tee is not None and zone.replicator is not None:
            # Every byte the CN sent went to the mirror too; its receive ends
            # about when ours did. Waiting here means the commit finds it there.
            tee.eof()
            await zone.replicator.tee_done(cmd, tee)

    async def _vet(self, cmd: Receive, begin: StreamBegin) -> str | None:
        """Refuse a stream that is not what the command names or does not fit here.

        Returns the name of the base snapshot for an incremental.
        """
        zfs = self.zone.zfs
        target = self.zone.store.part_dataset(cmd.vm, cmd.dataset)
        if begin.is_compound:
            raise StreamRefused("compound (zfs send -R) streams are not accepted; "
                                "send each dataset on its own")
        if begin.snapname != cmd.snapshot:
            raise StreamRefused(f"the stream is of snapshot {begin.snapname!r}, "
                                f"the command names {cmd.snapshot!r}")
        if cmd.resume != begin.is_resume:
            raise StreamRefused("--resume must be given exactly for a resumed "
                                "(zfs send -t) stream")
        try:
            snaps = await zfs.snapshots(target)
            token = await zfs.resume_token(target)
        except DatasetNotFound:
            snaps, token = [], None
        if any(s.name == cmd.snapshot for s in snaps):
            raise _refusal(DatasetExists, f"{target} already has snapshot {cmd.snapshot!r}")
        if begin.is_resume:
            if token is None:
                raise _refusal(StreamInvalid, f"{target} has no partial receive to resume")
        elif token is not None:
            raise _refusal(PartialReceiveExists,
                           f"{target} holds a partial receive: resume it (resume-token) "
                           "or discard it (abort)")
        if not begin.is_incremental:
            if cmd.base is not None:
                raise _refusal(IncrementalSourceMismatch,
                               f"--from {cmd.base} was given but the stream is a full stream")
            if snaps:
                raise _refusal(DatasetExists,
                               f"{target} already has snapshots (newest {snaps[-1].name!r}); "
                               "send an incremental from it")
            return None
        if not snaps:
            raise _refusal(IncrementalSourceMismatch,
                           f"{target} holds no snapshot to apply an incremental to; "
                           "send a full stream")
        base = _by_guid(snaps, begin.fromguid)
        if cmd.base is not None:
            named = next((s for s in snaps if s.name == cmd.base), None)
            if named is None:
                raise _refusal(IncrementalSourceMismatch,
                               f"{target} has no snapshot {cmd.base!r} (--from)")
            if named.guid != begin.fromguid:
                raise _refusal(IncrementalSourceMismatch,
                               f"the stream's base (guid {begin.fromguid}) is not {cmd.base!r} "
                               f"(guid {named.guid})")
        if base is None:
            raise _refusal(IncrementalSourceMismatch,
                           f"the stream's base (guid {begin.fromguid}) is not a snapshot of "
                           f"{target}; newest here is {snaps[-1].name!r} "
                           f"(guid {snaps[-1].guid})")
        if base is not snaps[-1]:
            # Applying it would need receive -F, destroying newer snapshots.
            raise _refusal(IncrementalSourceMismatch,
                           f"the stream's base {base.name!r} is not the newest snapshot of "
                           f"{target} ({snaps[-1].name!r}); send from that one")
        return base.name

    async def _confirm(self, cmd: Receive, begin: StreamBegin) -> None:
        """The snapshot ZFS made must be the one the stream said (guid)."""
        zfs = self.zone.zfs
        target = self.zone.store.part_dataset(cmd.vm, cmd.dataset)
        got = next((s for s in await zfs.snapshots(target) if s.name == cmd.snapshot), None)
        if got is not None and got.guid == begin.toguid:
            return
        if got is not None:
            await zfs.destroy(got.snapshot)
        raise _refusal(StreamInvalid,
                       f"after receive, {target}@{cmd.snapshot} has guid "
                       f"{got.guid if got else 'none'}, the stream said {begin.toguid}; "
                       "the snapshot was destroyed")

    # -- send -------------------------------------------------------------------

    async def send(self, p: Principal, cmd: Send, io: Io) -> None:
        zone = self.zone
        store = zone.store
        snap = await store.snapshot(cmd.vm, cmd.snapshot)
        if p.role == "cn" and not snap.complete:
            raise SnapshotIncomplete(f"VM {cmd.vm} snapshot {cmd.snapshot!r} is not complete "
                                     "on this zone; it cannot be restored from here")
        if cmd.dataset not in snap.parts:
            raise SnapshotNotFound(f"VM {cmd.vm} snapshot {cmd.snapshot!r} has no dataset "
                                   f"{cmd.dataset!r}")
        ds = store.part_dataset(cmd.vm, cmd.dataset)
        base: Snapshot | None = None
        if cmd.base is not None:
            have = await store.snapshot(cmd.vm, cmd.base)
            if cmd.dataset not in have.parts:
                raise SnapshotNotFound(f"VM {cmd.vm} snapshot {cmd.base!r} has no dataset "
                                       f"{cmd.dataset!r}")
            base = Snapshot(ds, cmd.base)
        kind = "send" if p.role == "cn" else "mirror-out"
        t = zone.transfers.start(kind, cmd.vm, cmd.dataset, cmd.snapshot, cmd.base, p.label)
        lg = slog.child(self.log, vm=cmd.vm, snapshot=cmd.snapshot, dataset=cmd.dataset,
                        kind=kind, peer=p.label, transfer=t.id)
        lg.info("transfer start", extra={"base": cmd.base})
        result = "error"
        try:
            child = await zone.zfs.send(SendSpec(Snapshot(ds, cmd.snapshot), base))
            try:
                while chunk := await child.stdout.read(_SEND_CHUNK):
                    io.write(chunk)
                    t.add(len(chunk))
                    await io.drain()
                await zone.zfs.check(child)
            finally:
                if child.proc.returncode is None:
                    await child.abort()
            result = "ok"
        except SnapperError as err:
            result = err.code
            raise
        finally:
            zone.transfers.finish(t, result)
            lg.log(logging.INFO if result == "ok" else logging.WARNING, "transfer end", extra={
                "result": result, "bytes": t.bytes, "seconds": round(t.elapsed, 3)})

    # -- inventory and metadata ------------------------------------------------

    async def commit(self, p: Principal, cmd: Commit, io: Io) -> None:
        raw = await io.inbound.read_all(self.zone.config.metadata_max_bytes)
        meta: dict[str, Any] | None = None
        if raw.strip():
            try:
                doc = json.loads(raw)
            except ValueError as exc:
                raise InvalidMetadata(f"metadata is not JSON: {exc}") from None
            if not isinstance(doc, dict):
                raise InvalidMetadata("metadata must be a JSON object")
            meta = doc
        zone = self.zone
        async with zone.vm_locks[cmd.vm]:
            done = await zone.store.mark_complete(cmd.vm, cmd.snapshot, cmd.datasets,
                                                  meta, p.label)
            # In use until the answer is written: a move must not drop this copy
            # while the ack that names this zone is on its way.
            zone.transfers.pending(cmd.vm, cmd.snapshot, p.connection, p.label)
        try:
            await self._acknowledge(p, cmd, done, io)
        finally:
            zone.transfers.committed(cmd.vm, cmd.snapshot)

    async def _acknowledge(self, p: Principal, cmd: Commit, done: VmSnapshot, io: Io) -> None:
        zone = self.zone
        mode = cmd.durability or zone.config.durability
        self.log.info("snapshot complete", extra={"vm": cmd.vm, "snapshot": cmd.snapshot,
                                                  "principal": p.label, "durability": mode,
                                                  "datasets": list(cmd.datasets)})
        out = done.to_json()
        out.update(durability=mode, zones=[zone.config.uuid], mirror=None)
        rep = zone.replicator
        if p.role != "cn" or rep is None:
            # A peer's commit is itself replication; a zone without peers has one copy.
            io.write(_json_line(out))
            return
        if mode == "local":
            rep.kick(cmd.vm)
            io.write(_json_line(out))
            return
        if os.environ.get("SNAPPER_TEST_ACK_EARLY") == "1":
            # TEST HOOK, never set in production: a deliberately broken build that
            # acks "mirrored" before the mirror holds the snapshot; the soak
            # (tests/test_soak.py) must catch it.
            early = await rep.links.partner(cmd.vm)
            if early is not None:
                out.update(zones=[zone.config.uuid, early.uuid], mirror=early.uuid)
                io.write(_json_line(out))
                return
        guids = {d: part.guid for d, part in done.parts.items()}
        peer, why = await rep.confirm_mirrored(cmd.vm, cmd.snapshot, guids,
                                               zone.config.mirror_timeout_seconds)
        if why is not None:
            raise MirrorUnavailable(
                f"VM {cmd.vm} snapshot {cmd.snapshot!r} is complete on zone "
                f"{zone.config.uuid} only; mirror zone {peer}: {why}. Not acknowledged as "
                "mirrored: retry later, or push with durability 'local' to accept one copy "
                "until the mirror catches up")
        out.update(zones=[zone.config.uuid, peer], mirror=peer)
        io.write(_json_line(out))


async def _acquire_unless_gone(held: contextlib.AsyncExitStack,
                               lock: asyncio.Lock | asyncio.Semaphore,
                               inbound: Inbound) -> None:
    """Acquire ``lock`` (released when ``held`` closes) or raise ClientGone first."""
    acquiring = asyncio.ensure_future(lock.acquire())
    gone = asyncio.ensure_future(inbound.gone())
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


def _ignore(n: int) -> None:
    pass


def _by_guid(snaps: list[SnapshotInfo], guid: int) -> SnapshotInfo | None:
    return next((s for s in snaps if s.guid == guid), None)


def _json_line(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _verb_label(line: str) -> str:
    # Metric labels must stay few: an unknown verb is "invalid", not itself.
    words = line.split(maxsplit=1)
    return words[0] if words and words[0] in protocol._GRAMMAR else "invalid"

