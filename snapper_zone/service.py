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
import fcntl
import json
import logging
import os
from collections.abc import Callable
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
from snapper_zone.store import MetadataTooLarge, SnapshotNotFound
from snapper_zone.transfers import Transfer
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
_BUFFER_LIMIT = 256 << 10  # bytes held before a stream is piped (header, metadata)
_SEND_CHUNK = 256 << 10
# A bigger kernel pipe means fewer partial writes (and event-loop writer
# callbacks) while zfs receive catches up; Linux only, best effort.
_PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ: int | None = getattr(fcntl, "F_SETPIPE_SZ", None)


class StreamRefused(SnapperError):
    """The stream is not the one the command names, or not one we accept."""

    code = "StreamRefused"
    http_status = 422


class InsufficientSpace(OutOfSpace):
    """Refused up front: the announced size does not fit; nothing was written."""

    def __init__(self, message: str) -> None:
        super().__init__(("snapperd", "receive"), "", None, message)


class ClientGone(SnapperError):
    """The client disconnected before its stream ended."""

    code = "ClientDisconnected"
    http_status = 400


class SnapshotIncomplete(SnapperError):
    code = "SnapshotIncomplete"
    http_status = 409


class SnapshotInUse(SnapperError):
    code = "ResourceBusy"
    http_status = 409


class InvalidMetadata(SnapperError):
    code = "InvalidArgument"
    http_status = 422


def _refusal(cls: type[ZfsError], message: str) -> ZfsError:
    """A ZFS-typed error decided by snapperd itself, before ZFS saw a byte."""
    return cls(("snapperd", "receive"), "", None, message)


class _PipeGone(Exception):
    """zfs receive stopped reading (it failed); its exit status says why."""


class _PipeWriter:
    """Writes the client's packets into zfs receive's stdin, a non-blocking pipe.

    Packets are queued as they arrive and written with one ``writev`` per
    event-loop turn (asyncssh hands over all packets of a socket read in one
    turn), so a batch of ~8 packets costs one system call and one wake-up of
    the reader instead of eight, and no bytes are copied in Python. Above
    ``HIGH`` queued bytes the source is paused; below ``LOW`` it resumes.
    """

    HIGH = 512 << 10
    LOW = 128 << 10
    IOV = 64  # chunks per writev, well under any IOV_MAX

    def __init__(self, fd: int, pause: Callable[[bool], None],
                 counted: Callable[[int], None], done: asyncio.Future[None]) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        self._pause = pause
        self._counted = counted
        self._done = done
        self._chunks: list[bytes | memoryview] = []
        self._size = 0
        self._closing = False
        self._closed = False
        self._scheduled = False  # a _flush is queued with call_soon
        self._watching = False  # a _flush is registered for "pipe writable"
        self._paused = False

    def write(self, data: bytes) -> None:
        if self._closing:
            return
        self._chunks.append(data)
        self._size += len(data)
        if not (self._scheduled or self._watching):
            self._scheduled = True
            self._loop.call_soon(self._flush)
        if self._size > self.HIGH and not self._paused:
            self._paused = True
            self._pause(True)

    def close(self) -> None:
        """End of stream: write what is queued, then close (zfs receive sees EOF)."""
        if self._closing:
            return
        self._closing = True
        if not self._chunks:
            self._finish(None)

    def abort(self) -> None:
        """Close now, dropping what is queued: zfs receive sees a truncated stream."""
        self._closing = True
        self._chunks.clear()
        self._size = 0
        self._finish(None)

    def _flush(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        try:
            n = os.writev(self._fd, self._chunks[: self.IOV])
        except BlockingIOError:
            n = 0
        except OSError as exc:  # EPIPE: zfs receive exited
            self._finish(exc)
            return
        if n:
            self._counted(n)
            self._size -= n
            i = 0
            while n and len(self._chunks[i]) <= n:
                n -= len(self._chunks[i])
                i += 1
            del self._chunks[:i]
            if n:
                self._chunks[0] = memoryview(self._chunks[0])[n:]
        if self._chunks:
            if not self._watching:
                self._watching = True
                self._loop.add_writer(self._fd, self._flush)
        else:
            if self._watching:
                self._watching = False
                self._loop.remove_writer(self._fd)
            if self._closing:
                self._finish(None)
                return
        if self._paused and self._size <= self.LOW:
            self._paused = False
            self._pause(False)

    def _finish(self, exc: OSError | None) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watching:
            self._loop.remove_writer(self._fd)
            self._watching = False
        os.close(self._fd)
        if self._paused:
            self._paused = False
            self._pause(False)
        if not self._done.done():
            if exc is not None:
                self._done.set_exception(_PipeGone(str(exc)))
            else:
                self._done.set_result(None)


class Inbound:
    """The bytes a client sends on a command's stdin, pushed by the transport.

    Buffered until ``pipe_to``: ``read(n)`` serves the stream header and small
    inputs from a bounded buffer (reading from the transport pauses when it
    is full). During ``pipe_to(fd)`` every chunk ``feed`` gets goes straight
    to the pipe writer; afterwards further bytes are dropped.
    """

    def __init__(self, pause_reading: Callable[[], None],
                 resume_reading: Callable[[], None]) -> None:
        self._pause_reading = pause_reading
        self._resume_reading = resume_reading
        self._buf = bytearray()
        self._eof = False
        self._error: SnapperError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._writer: _PipeWriter | None = None
        self._discard = False
        self._gone = asyncio.Event()

    # -- called by the transport ------------------------------------------

    def feed(self, data: bytes) -> None:
        writer = self._writer
        if writer is not None:
            writer.write(data)
            return
        if self._discard:
            return  # the receiver is done; the client hears it from our exit status
        self._buf += data
        if len(self._buf) >= _BUFFER_LIMIT:
            self._set_paused(True)
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        if self._writer is not None:
            self._writer.close()
        self._wake()

    def feed_error(self, err: SnapperError) -> None:
        """The client went away. A stream in progress is cut off, not completed."""
        self._gone.set()
        if self._eof or self._error is not None:
            return
        self._error = err
        if self._writer is not None:
            self._writer.abort()
        self._wake()

    # -- called by the handler ---------------------------------------------

    async def read(self, n: int) -> bytes:
        """At most ``n`` bytes; ``b""`` at EOF; raises if the client went away."""
        while not self._buf:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        chunk = bytes(self._buf[:n])
        del self._buf[:n]
        if len(self._buf) < _BUFFER_LIMIT // 2:
            self._set_paused(False)
        return chunk

    async def read_all(self, limit: int) -> bytes:
        """Everything until EOF; raises MetadataTooLarge beyond ``limit`` bytes."""
        out = bytearray()
        while chunk := await self.read(_BUFFER_LIMIT):
            out += chunk
            if len(out) > limit:
                raise MetadataTooLarge(f"input is over the limit of {limit} bytes")
        return bytes(out)

    async def pipe_to(self, fd: int, first: bytes, on_bytes: Callable[[int], None]) -> None:
        """Write ``first``, anything buffered, then the rest of stdin into pipe ``fd``.

        Takes ownership of ``fd``. ``on_bytes(n)`` is told of every byte the
        kernel took. Returns once stdin ended and every byte was written (or
        ``stop`` was called); raises ClientGone if the client disconnected
        first, _PipeGone if the reader closed the pipe.
        """
        if _F_SETPIPE_SZ is not None:
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        writer = _PipeWriter(fd, self._set_paused, on_bytes, done)
        writer.write(first)
        if self._buf:
            writer.write(bytes(self._buf))
            self._buf.clear()
        if self._error is not None or self._discard:
            writer.abort()
        elif self._eof:
            writer.close()
        else:
            self._writer = writer
        # From here the writer's flow control decides; the buffer's pause is
        # over. Resuming delivers queued packets at once, so only after the
        # writer is in place.
        self._set_paused(False)
        try:
            await done
        except BaseException:
            writer.abort()  # cancelled: never leave the pipe open behind us
            raise
        finally:
            self._writer = None
            self._discard = True
            self._set_paused(False)  # let a client still sending finish, unblocked
        if self._error is not None:
            raise self._error

    async def gone(self) -> None:
        """Return once the client has disconnected."""
        await self._gone.wait()

    def stop(self) -> None:
        """The reader is done (zfs receive exited): cut the pipe, drop further bytes."""
        self._discard = True
        if self._writer is not None:
            self._writer.abort()

    # -- flow control -------------------------------------------------------

    def _set_paused(self, paused: bool) -> None:
        if paused != self._paused:
            self._paused = paused
            if paused:
                self._pause_reading()
            else:
                self._resume_reading()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self._waiter = None


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
                doc["in_use"] = sorted(self.zone.transfers.in_use(vm))
                io.write(_json_line(doc))
            case Commit():
                await self.commit(p, cmd, io)
            case Metadata(vm, snap):
                io.write(_json_line(await self.zone.store.metadata(vm, snap)))
            case Delete(vm, snap):
                if snap in self.zone.transfers.in_use(vm):
                    raise SnapshotInUse(f"VM {vm} snapshot {snap!r} is in use by a transfer; "
                                        "try again when it ends")
                await self.zone.store.delete(vm, snap)
                self.log.info("deleted snapshot", extra={"vm": vm, "snapshot": snap,
                                                         "principal": p.label})
                if self.zone.replicator is not None:
                    self.zone.replicator.kick(vm)  # the peer deletes it too
            case Destroy(vm, snap, ds, guid):
                if snap in self.zone.transfers.in_use(vm):
                    raise SnapshotInUse(f"VM {vm} snapshot {snap!r} is in use by a transfer")
                async with self.zone.vm_locks[vm]:
                    if ds is None:
                        await self.zone.store.destroy_marker(vm, snap)
                    else:
                        assert guid is not None
                        await self.zone.store.destroy_part(vm, ds, snap, guid)
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
                await self._receive_stream(cmd, io, t)
                zone.transfers.pending(cmd.vm, cmd.snapshot)
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

    async def _receive_stream(self, cmd: Receive, io: Io, t: Transfer) -> None:
        zone = self.zone
        target = zone.store.part_dataset(cmd.vm, cmd.dataset)
        try:
            begin, header = await read_begin(io.inbound.read)
        except StreamHeaderError as exc:
            raise _refusal(StreamInvalid, f"not a usable zfs send stream: {exc}") from None
        t.base = await self._vet(cmd, begin)
        await zone.store.ensure_vm(cmd.vm)
        r, w = os.pipe()
        try:
            child = await zone.zfs.receive(target, stdin=r)
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        feeding = asyncio.ensure_future(io.inbound.pipe_to(w, header, t.add))
        exited = asyncio.ensure_future(child.proc.wait())
        try:
            await asyncio.wait({feeding, exited}, return_when=asyncio.FIRST_COMPLETED)
            if not feeding.done():
                # zfs receive exited before stdin ended: it read DRR_END (then
                # the client's EOF is only late) or it failed. Its status decides.
                io.inbound.stop()
            try:
                await feeding
            except _PipeGone:
                pass  # zfs receive's own error, below, says what was wrong
            except ClientGone:
                # zfs receive got a truncated stream and fails; wait for it so
                # a partial state (OpenZFS, -s) is settled for a later resume.
                if await exited != 0:
                    await child.wait()
                    raise
            await zone.zfs.check(child)
        finally:
            for task in (feeding, exited):
                if not task.done():
                    task.cancel()
            if child.proc.returncode is None:
                await child.abort()
        await self._confirm(cmd, begin)

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
        zone.transfers.committed(cmd.vm, cmd.snapshot)
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
        guids = {d: part.guid for d, part in done.parts.items()}
        try:
            peer, why = await asyncio.wait_for(
                rep.confirm_mirrored(cmd.vm, cmd.snapshot, guids),
                zone.config.mirror_timeout_seconds)
        except TimeoutError:
            peer = rep.links.partner_of(cmd.vm).uuid  # type: ignore[union-attr]
            why = f"no answer within {zone.config.mirror_timeout_seconds} s"
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

