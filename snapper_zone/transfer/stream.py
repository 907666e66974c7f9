"""Byte pumps, flow control, pacing and the tee's sink: each written once.

Into ``zfs receive``: ``Inbound`` is a stream as a transport delivers it
(the zone's SSH server for a push, an SSH client channel for a pull). Out of
``zfs send``: ``SendPump`` (a send's pipe to an SSH channel, paced by
``--bwlimit``) and ``copy_out`` (a send's stdout to a handler's output).

``Inbound`` buffers what a handler reads itself (a stream header, metadata)
and, once the handler calls ``pipe_to``, pushes every packet straight into
``zfs receive``'s stdin pipe (``PipeWriter``: batched ``writev``, no copy)
and, when pipelined mirroring is on, to the mirror zone's channel as well
(``Tee``). Reading from the client pauses while any sink is over its
high-water mark ("votes": the pipe, the header buffer, the mirror), so memory
stays bounded by the SSH window plus one pipe buffer plus the mirror's window.
A peer zone's stream through the gate may also fill a ring of its own before
``zfs receive`` (``RingPump``, ``limits.copy_buffer_bytes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import logging
import mmap
import os
import select
import stat
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from snapper_zone.errors import MetadataTooLarge, SnapperError
from snapper_zone.zfs.proc import grow_pipe, widen_pipe

log = logging.getLogger("snapper.stream")

__all__ = [
    "TEE_STALL_SECONDS",
    "ClientGone",
    "Inbound",
    "MemoryRing",
    "PipeFlow",
    "PipeGone",
    "PipeRing",
    "PipeWriter",
    "RingPump",
    "SendPump",
    "Sink",
    "SplicePump",
    "StreamIdle",
    "can_splice",
    "can_tee",
    "copy_out",
    "pipe_inbound",
    "ring_pump",
    "splice_out",
    "wait_ready",
]

_BUFFER_LIMIT = 256 << 10  # bytes held before a stream is piped (header, metadata)


# asyncssh appends each socket read to its input buffer and slices every
# packet off the front, copying what follows it: the more packets one read
# brings, the more bytes are copied. asyncio reads 256 KiB at a time; with
# 64 KiB the receiving side's CPU per GB was 0.87-0.99x from an asyncssh
# sender, 0.94-1.09x from OpenSSH's ssh (bench/ssh_reads.py, two runs).
SOCKET_READ = 64 << 10


def narrow_reads(conn: object, size: int = SOCKET_READ) -> None:
    """Have an asyncssh connection's socket read ``size`` bytes at a time.

    The read size is ``max_size`` of asyncio's socket transport, an attribute
    rather than an API (CPython 3.8 to 3.13 have it; tests/test_socket_reads.py
    checks it is there): where it is missing, nothing changes.
    """
    transport = getattr(conn, "_transport", None)
    if transport is not None and isinstance(getattr(transport, "max_size", None), int):
        transport.max_size = size


class ClientGone(SnapperError):
    """The client disconnected before its stream ended."""

    code = "ClientDisconnected"
    http_status = 400


class Sink(Protocol):
    """A second consumer of a piped stream (the mirror zone's receive).

    ``pipe``: a pipe the kernel may fill instead of ``write`` (an ``ssh``
    child's stdin), or None. When ``Inbound`` tees a detached stream into it
    (``tee(2)``), ``write`` is never called: only ``eof``, ``abort`` or
    ``let_go`` (the pipe broke, or stayed full too long), after which it is
    not touched again.
    """

    pipe: int | None

    def write(self, data: bytes) -> None: ...

    def eof(self) -> None: ...

    def abort(self) -> None: ...

    def let_go(self, why: str) -> None: ...

    def teed(self, n: int) -> None:
        """``n`` more bytes went into ``pipe`` (not through ``write``)."""


class StreamIdle(ClientGone):
    """The client sent nothing for too long while its stream was being read."""

    code = "StreamIdle"
    http_status = 408


class PipeGone(Exception):
    """zfs receive stopped reading (it failed); its exit status says why."""


class PipeWriter:
    """Writes the client's packets into a non-blocking pipe: zfs receive's stdin,
    or a pipelined mirror's ``ssh``'s.

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
            written = n
            self._size -= n
            i = 0
            while n and len(self._chunks[i]) <= n:
                n -= len(self._chunks[i])
                i += 1
            del self._chunks[:i]
            if n:
                self._chunks[0] = memoryview(self._chunks[0])[n:]
            # Told after the queue is settled: a budget it crosses aborts this
            # writer from inside the call (a quota cut), which clears the queue.
            self._counted(written)
            if self._closed:
                return
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
                self._done.set_exception(PipeGone(str(exc)))
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
                 resume_reading: Callable[[], None], *, idle_timeout: float | None = None,
                 on_idle: Callable[[], None] | None = None,
                 detach: Callable[[], int | None] | None = None) -> None:
        self._pause_reading = pause_reading
        self._resume_reading = resume_reading
        # A transport whose stream is itself a descriptor (sshd's pipe, through
        # the gate) can hand it over: pipe_to then splices it into zfs receive
        # in the kernel. ``detach()`` stops the transport's reading for good
        # and returns a descriptor of the stream's (ours to close), or None.
        self._detach = detach
        self._pump: SplicePump | RingPump | None = None
        # The idle watchdog runs only while a handler waits for bytes and the
        # client is not paused by us: a client queued for a slot, or held back
        # by a full pipe, is not idle.
        self._idle_timeout = idle_timeout
        self._on_idle = on_idle
        self._watching_idle = False
        self._last = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._buf = bytearray()
        self._eof = False
        self._error: SnapperError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._votes: set[str] = set()  # who wants the client paused
        self._writer: PipeWriter | None = None
        self._tee: Sink | None = None
        self._discard = False
        self._gone = asyncio.Event()
        self.fed = 0  # bytes the transport delivered (spliced ones not counted)

    # -- called by the transport ------------------------------------------

    def feed(self, data: bytes) -> None:
        self.fed += len(data)
        if self._watching_idle:
            self._last = asyncio.get_running_loop().time()
        writer = self._writer
        if writer is not None:
            writer.write(data)
            if self._tee is not None:
                self._tee.write(data)
            return
        if self._discard:
            return  # the receiver is done; the client hears it from our exit status
        self._buf += data
        if len(self._buf) >= _BUFFER_LIMIT:
            self._vote("buffer", True)
        self._wake()

    def feed_eof(self) -> None:
        if self._eof:
            return
        self._eof = True
        if self._writer is not None:
            self._writer.close()
        if self._tee is not None:
            self._tee.eof()
        self._wake()

    def feed_error(self, err: SnapperError) -> None:
        """The client went away. A stream in progress is cut off, not completed."""
        self._gone.set()
        if self._eof or self._error is not None:
            return
        self._error = err
        if self._writer is not None:
            self._writer.abort()
        if self._tee is not None:
            self._tee.abort()  # the mirror must see a cut stream too, not a short one
        if self._pump is not None:
            self._pump.close()
        self._wake()

    def cut(self, err: SnapperError) -> None:
        """The receiver ends the stream with ``err`` (over its budget): the pipe and
        the tee are cut as if the client had gone, though it is still there."""
        if self._error is not None:
            return
        self._error = err
        if self._writer is not None:
            self._writer.abort()
        if self._tee is not None:
            self._tee.abort()
        if self._pump is not None:
            self._pump.close()
        self._discard = True
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
            self._watch_idle(True)
            try:
                await self._waiter
            finally:
                self._watch_idle(False)
        chunk = bytes(self._buf[:n])
        del self._buf[:n]
        if len(self._buf) < _BUFFER_LIMIT // 2:
            self._vote("buffer", False)
        return chunk

    async def read_all(self, limit: int) -> bytes:
        """Everything until EOF; raises MetadataTooLarge beyond ``limit`` bytes."""
        out = bytearray()
        while chunk := await self.read(_BUFFER_LIMIT):
            out += chunk
            if len(out) > limit:
                raise MetadataTooLarge(f"input is over the limit of {limit} bytes")
        return bytes(out)

    def vote(self, who: str, paused: bool) -> None:
        """A sink other than the pipe (the mirror) asks for the client to pause or not."""
        self._vote(who, paused)

    async def pipe_to(self, fd: int, first: bytes, on_bytes: Callable[[int], None],
                      tee: Sink | None = None, *, ring: int = 0) -> None:
        """Write ``first``, anything buffered, then the rest of stdin into pipe ``fd``.

        With ``tee``, every byte goes to it as well, in order, and its end
        (EOF or abort) follows the client's. Takes ownership of ``fd``.
        ``ring`` (bytes; no tee): a stream that can be detached goes through a
        ``RingPump`` with a ring that deep, on every OS (spliced past the ring
        while it is empty, where there is splice).
        ``on_bytes(n)`` is told of every byte the
        kernel took. Returns once stdin ended and every byte was written (or
        ``stop`` was called); raises ClientGone if the client disconnected
        first, PipeGone if the reader closed the pipe.
        """
        widen_pipe(fd)
        ring = ring if tee is None else 0
        if self._detach is not None and (ring or can_splice()) and \
                (tee is None or (tee.pipe is not None and can_tee())) and \
                not (self._eof or self._error is not None or self._discard):
            src = self._detach()
            if src is not None:
                if tee is not None and not _is_fifo(src):
                    # tee(2) takes pipes only; sshd gives one on Linux.
                    tee.let_go("the client's stream is not a pipe here")
                    tee = None
                await self._splice(src, fd, first, on_bytes, tee, ring)
                return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        writer = PipeWriter(fd, lambda p: self._vote("pipe", p), on_bytes, done)
        head = first + bytes(self._buf)
        self._buf.clear()
        writer.write(head)
        if tee is not None:
            tee.write(head)
        if self._error is not None or self._discard:
            writer.abort()
            if tee is not None:
                tee.abort()
        elif self._eof:
            writer.close()
            if tee is not None:
                tee.eof()
        else:
            self._writer = writer
            self._tee = tee
        # From here the sinks' flow control decides; the buffer's pause is
        # over. Resuming delivers queued packets at once, so only after the
        # writer is in place.
        self._vote("buffer", False)
        self._watch_idle(True)
        try:
            await done
        except BaseException:
            writer.abort()  # cancelled: never leave the pipe open behind us
            raise
        finally:
            self._watch_idle(False)
            self._writer = None
            self._tee = None
            self._discard = True
            if self._votes:  # let a client still sending finish, unblocked
                self._votes.clear()
                self._resume_reading()
        if self._error is not None:
            raise self._error

    async def _splice(self, src: int, fd: int, first: bytes,
                      on_bytes: Callable[[int], None], tee: Sink | None,
                      ring: int) -> None:
        """``pipe_to`` for a detached source: the head, then the rest in the kernel,
        teed into ``tee.pipe`` too when there is a tee; through a ring if ``ring``."""
        head = first + bytes(self._buf)
        self._buf.clear()
        self._votes.clear()  # the transport reads no more: nothing to pause or resume
        loop = asyncio.get_running_loop()

        def moved(n: int) -> None:
            self._last = loop.time()  # bytes came: the idle watchdog's clock
            on_bytes(n)

        try:
            await _write_all(fd, head)
            if tee is not None and tee.pipe is not None:
                try:
                    async with asyncio.timeout(TEE_STALL_SECONDS):
                        await _write_all(tee.pipe, head)
                    tee.teed(len(head))
                except (PipeGone, TimeoutError) as exc:
                    tee.let_go(f"the mirror took not even the stream's head: {exc!r}")
                    tee = None
        except BaseException:
            os.close(src)
            os.close(fd)
            if tee is not None:
                tee.abort()
            raise
        moved(len(head))
        widen_pipe(src)  # the transport's pipe (sshd's): it writes more per wake-up
        lost: list[str] = []

        def tee_lost(why: str) -> None:
            lost.append(why)
            if tee is not None:
                tee.let_go(why)

        pump: SplicePump | RingPump
        if ring:
            pump = ring_pump(src, fd, moved, ring)
        else:
            pump = SplicePump(src, fd, moved, tee=tee.pipe if tee else None,
                              tee_lost=tee_lost, teed=tee.teed if tee else None)
        self._pump = pump
        self._watch_idle(True)
        whole = False
        try:
            await pump.done
            whole = True
            if isinstance(pump, RingPump):
                log.debug("copy buffer: %d bytes, %d through the ring; %d reads, %d splices, "
                          "%d writes", pump.bytes, pump.ringed, *pump.calls)
        except OSError as exc:
            if self._error is None and not self._discard:  # zfs receive exited
                raise PipeGone(str(exc)) from None
        finally:
            self._watch_idle(False)
            self._pump = None
            self._discard = True
            pump.close()  # the destination's close is zfs receive's EOF
            if tee is not None and not lost:
                if whole and self._error is None:
                    tee.eof()  # every byte is in its pipe too
                elif self._error is not None:
                    tee.abort()  # the client's stream was cut: the mirror's is too
                # else zfs receive failed: the tee's owner lets it go (result())
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
        if self._pump is not None:
            self._pump.close()

    # -- flow control -------------------------------------------------------

    def _vote(self, who: str, paused: bool) -> None:
        before = bool(self._votes)
        if paused:
            self._votes.add(who)
        else:
            self._votes.discard(who)
        after = bool(self._votes)
        if after != before:
            if after:
                self._pause_reading()
            else:
                self._last = asyncio.get_running_loop().time()  # our pause is not idleness
                self._resume_reading()

    def _watch_idle(self, on: bool) -> None:
        if self._idle_timeout is None:
            return
        self._watching_idle = on
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if on:
            loop = asyncio.get_running_loop()
            self._last = loop.time()
            self._idle_timer = loop.call_later(self._idle_timeout, self._check_idle)

    def _check_idle(self) -> None:
        self._idle_timer = None
        if not self._watching_idle or self._idle_timeout is None:
            return
        loop = asyncio.get_running_loop()
        quiet = loop.time() - self._last
        held = self._pump is not None and self._pump.held_by_sink
        if self._votes or held or quiet < self._idle_timeout:
            # Paused by us, or bytes came: look again when it could expire.
            wait = self._idle_timeout - (0 if self._votes or held else quiet)
            self._idle_timer = loop.call_later(max(wait, 0.01), self._check_idle)
            return
        self._watching_idle = False
        self.feed_error(StreamIdle(f"the client sent nothing for {self._idle_timeout:g} s; "
                                   "its stream was cut off"))
        if self._on_idle is not None:
            self._on_idle()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self._waiter = None




async def pipe_inbound(fd: int, *, idle_timeout: float | None = None
                       ) -> tuple[Inbound, asyncio.ReadTransport]:
    """A pipe's bytes (a child's stdout: ``ssh`` bringing a zone's stream) as an
    ``Inbound``, and the read transport feeding it (the caller closes it). Takes
    ``fd``. ``detach`` hands a duplicate of the pipe to ``pipe_to``'s splice: a
    read transport holds nothing back, every byte it read was fed already."""
    loop = asyncio.get_running_loop()
    held: list[asyncio.ReadTransport] = []
    detached = False

    def pause() -> None:
        if held and not detached:
            held[0].pause_reading()

    def resume() -> None:
        if held and not detached and not held[0].is_closing():
            held[0].resume_reading()

    def detach() -> int | None:
        nonlocal detached
        if not held or held[0].is_closing():
            return None
        held[0].pause_reading()
        detached = True
        return os.dup(held[0].get_extra_info("pipe").fileno())

    inbound = Inbound(pause, resume, idle_timeout=idle_timeout, detach=detach)

    class Feed(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            inbound.feed(data)

        def eof_received(self) -> bool:
            inbound.feed_eof()
            return False

        def connection_lost(self, exc: Exception | None) -> None:
            if exc is not None:
                inbound.feed_error(ClientGone(f"the stream's pipe failed: {exc}"))

    transport, _ = await loop.connect_read_pipe(Feed, os.fdopen(fd, "rb", buffering=0))
    held.append(transport)
    return inbound, transport


async def wait_ready(fd: int, *, write: bool) -> None:
    """Return once non-blocking ``fd`` can be written (``write``) or read."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        await ready
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


async def _write_all(fd: int, data: bytes) -> None:
    """Every byte of ``data`` into non-blocking pipe ``fd``, waiting while it is full."""
    os.set_blocking(fd, False)
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            await wait_ready(fd, write=True)
        except OSError as exc:  # EPIPE: zfs receive exited
            raise PipeGone(str(exc)) from None


# -- out of zfs send ----------------------------------------------------------------

_COPY_CHUNK = 256 << 10


async def copy_out(reader: asyncio.StreamReader, write: Callable[[bytes], None],
                   drain: Callable[[], Awaitable[None]],
                   on_bytes: Callable[[int], None], *,
                   stall_timeout: float | None = None) -> None:
    """Copy ``reader`` (a send's stdout) to ``write`` until EOF, waiting on ``drain``.

    ``stall_timeout``: a client that reads nothing (its window stays shut) for
    that long is cut off with StreamIdle, as a receive that sends nothing is,
    so a stalled reader holds a ``zfs send`` and a send slot no longer.
    """
    while chunk := await reader.read(_COPY_CHUNK):
        write(chunk)
        on_bytes(len(chunk))
        try:
            async with asyncio.timeout(stall_timeout):
                await drain()
        except TimeoutError:
            raise StreamIdle(f"the client read nothing for {stall_timeout:g} s; its "
                             "stream was cut off") from None


async def splice_out(src: int, dst: int, on_bytes: Callable[[int], None], *,
                     stall_timeout: float | None = None) -> None:
    """A send's pipe ``src`` into the client's pipe ``dst`` (sshd's, through the
    gate) in the kernel, until EOF; takes both descriptors. As ``copy_out``: a
    client that takes nothing for ``stall_timeout`` seconds while bytes wait is
    cut off with StreamIdle; one that is gone is ClientGone."""
    pump = SplicePump(src, dst, on_bytes)
    try:
        while True:
            moved = pump.bytes
            done, _ = await asyncio.wait([pump.done], timeout=stall_timeout)
            if done:
                try:
                    pump.done.result()
                except OSError as exc:  # EPIPE: the client's end is closed
                    raise ClientGone(f"the client stopped reading: {exc}") from None
                return
            if pump.bytes == moved and pump.held_by_sink:
                raise StreamIdle(f"the client read nothing for {stall_timeout:g} s; its "
                                 "stream was cut off")
    finally:
        pump.close()


class Channel(Protocol):
    """The part of an SSH channel a pump writes to."""

    def write(self, data: bytes) -> None: ...


class PipeFlow(asyncio.BaseProtocol):
    """The write side of a pipe a ``SendPump`` writes into (``ssh``'s stdin): a full
    pipe holds the pump, as a full SSH window does."""

    pump: SendPump | None = None

    def pause_writing(self) -> None:
        if self.pump is not None:
            self.pump.hold("window")

    def resume_writing(self) -> None:
        if self.pump is not None:
            self.pump.release("window")


class Pace:
    """``bwlimit`` bytes/s for a whole stream: a token bucket whose window is the
    stream, shared by both pumps so they pace alike."""

    SLACK = 0.005  # ahead by less than this (timer granularity): go on

    def __init__(self, bwlimit: float) -> None:
        self.bwlimit = bwlimit
        self.started = time.monotonic()

    def wait(self, moved: int) -> float:
        """Seconds to wait before moving more, having moved ``moved`` bytes; 0: on time."""
        ahead = moved / self.bwlimit - (time.monotonic() - self.started)
        return ahead if ahead > self.SLACK else 0.0


class SendPump(asyncio.Protocol):
    """Reads ``zfs send``'s stdout pipe and writes each chunk to a channel.

    Reading the pipe pauses while anyone holds it: "window" (the channel's
    SSH window is full) or "pace" (ahead of ``bwlimit`` bytes/s), so ``zfs
    send`` blocks and memory stays bounded whatever the stream's size.
    ``done`` resolves at the pipe's EOF, or with the channel's write error.
    """

    def __init__(self, chan: Channel, on_bytes: Callable[[int], None],
                 bwlimit: float | None = None) -> None:
        self.chan = chan
        self.on_bytes = on_bytes
        self.transport: asyncio.ReadTransport | None = None
        self.bytes = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._holds: set[str] = set()
        self._pace = Pace(bwlimit) if bwlimit else None

    def hold(self, why: str) -> None:
        if not self._holds and self.transport is not None:
            self.transport.pause_reading()
        self._holds.add(why)

    def release(self, why: str) -> None:
        if why in self._holds:
            self._holds.discard(why)
            if not self._holds and self.transport is not None \
                    and not self.transport.is_closing():
                self.transport.resume_reading()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.ReadTransport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.chan.write(data)
        except Exception as exc:  # OSError, asyncssh.Error: the other end hung up
            self._fail(exc)
            return
        self.bytes += len(data)
        self.on_bytes(len(data))
        if self._pace is not None and (wait := self._pace.wait(self.bytes)):
            # Ahead of schedule: stop reading zfs send's pipe until on time.
            self.hold("pace")
            asyncio.get_running_loop().call_later(wait, self.release, "pace")

    def _fail(self, exc: BaseException) -> None:
        # The receiver hung up (refused the stream); its exit status says why.
        if not self.done.done():
            self.done.set_exception(exc)
        assert self.transport is not None
        self.transport.close()

    def eof_received(self) -> bool:
        if not self.done.done():
            self.done.set_result(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if exc is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc)


# -- pipe to pipe in the kernel ------------------------------------------------------

_SPLICE_CHUNK = 1 << 20
_SPLICE_MOVES = 16  # moves per event-loop turn: others' callbacks run in between
# Paced, a move carries at most this much of a second's allowance (and at least
# 16 KiB): a whole pipe in one move would burst far past --bwlimit.
_PACED_SLICE = 0.05
# A flowing stream that finds its pipe empty (or full) lets it settle this long
# before the next move instead of waking for each write the other end makes
# (sshd writes ~32 KiB at a time): fewer, larger splices, each of which wakes
# sshd and zfs receive (py-spy: half of snapperd's own CPU per GB through the
# gate). Only while, at the rate just seen, the pipe would fill (or drain) by a
# third at most meanwhile: asyncio's timer may take twice as long, and the
# other end must never wait (1 MiB pipes: up to ~350 MB/s).
# A turn that moved anything counts as flowing: a stream held by its reader
# (ssh reads ~32 KiB at a time) moves only that much per wake-up, yet flows at
# the reader's full rate; waking for each read cost a sending zone twice the
# CPU per GB (bench/pump.py --sink-rate). A stream that stops moves nothing on
# its next turn and then waits on its pipes' next change, as before.
# SNAPPER_SPLICE_SETTLE (seconds; 0: off) sets it, for benches comparing the two.
_SETTLE = float(os.environ.get("SNAPPER_SPLICE_SETTLE", "0.001"))
_F_GETPIPE_SZ: int | None = getattr(fcntl, "F_GETPIPE_SZ", None)


def _pipe_size(fd: int) -> int:
    """A pipe's capacity in bytes; 0 for anything else (or unknown)."""
    if _F_GETPIPE_SZ is None:
        return 0
    try:
        return int(fcntl.fcntl(fd, _F_GETPIPE_SZ))
    except OSError:
        return 0


def can_splice() -> bool:
    """Whether ``SplicePump`` works here (Linux's splice(2), Python 3.10+).

    ``SNAPPER_NO_SPLICE`` set (non-empty) says no: every stream is then copied
    through Python as on illumos, which has no splice, so the tests and benches
    run production's own path on Linux too."""
    return hasattr(os, "splice") and not os.environ.get("SNAPPER_NO_SPLICE")


def _libc_tee() -> Callable[[int, int, int, int], int] | None:
    """Linux's tee(2) (Python's ``os`` has splice but not tee), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).tee
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint)
    fn.restype = ctypes.c_ssize_t
    return fn


_TEE = _libc_tee()
_SPLICE_F_NONBLOCK = 2  # <fcntl.h>, as os.SPLICE_F_NONBLOCK


def can_tee() -> bool:
    """Whether ``SplicePump`` can also duplicate a stream into a second pipe."""
    return can_splice() and _TEE is not None


def _tee(src: int, dst: int, n: int) -> int:
    """Duplicate up to ``n`` bytes of pipe ``src`` into pipe ``dst`` (not consumed)."""
    assert _TEE is not None
    got = _TEE(src, dst, n, _SPLICE_F_NONBLOCK)
    if got < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))  # EAGAIN: BlockingIOError
    return got


def _is_fifo(fd: int) -> bool:
    return stat.S_ISFIFO(os.fstat(fd).st_mode)


# A tee whose pipe stays full this long is let go (the mirror is too slow to
# pipeline; catch-up sends it the snapshot afterwards), as replication's is.
TEE_STALL_SECONDS = 15.0


class SplicePump:
    """A send's pipe into another pipe (``ssh``'s stdin) inside the kernel.

    splice(2) moves the pages from one pipe to the other, so the stream never
    passes through Python, yet every move is counted (progress) and paced
    (``bwlimit``) as ``SendPump`` does, for 1.5-1.7x less of the CN's CPU per
    GB than copying through Python (bench/pump.py: 0.19 vs 0.30 CPU-s/GB). Both
    file descriptors are the pump's (non-blocking from now on; ``close``
    closes them: closing ``dst`` is the reader's EOF). ``done`` resolves at
    ``src``'s EOF, or with the write side's error (the reader exited).

    ``tee``: a second pipe (the mirror's ``ssh``), not the pump's to close,
    that gets every byte too (``teed(n)`` counts them): tee(2) duplicates what
    ``src`` holds into it, then splice(2) moves exactly that much into
    ``dst``, so both see the same bytes in order and the slower one holds the
    source. If ``tee`` breaks or
    stays full for ``tee_stall`` seconds the pump stops using it, calls
    ``tee_lost(why)`` and goes on into ``dst`` alone.

    ``settle``: how long a flowing stream's pipes fill (or drain) between moves
    instead of a wake-up per change the other ends make (``_settles``); 0
    wakes on every change (a bench's baseline).
    """

    def __init__(self, src: int, dst: int, on_bytes: Callable[[int], None],
                 bwlimit: float | None = None, *, tee: int | None = None,
                 tee_lost: Callable[[str], None] | None = None,
                 teed: Callable[[int], None] | None = None,
                 tee_stall: float = TEE_STALL_SECONDS, settle: float = _SETTLE) -> None:
        self.src, self.dst = src, dst
        self._settle = settle  # seconds a flowing stream's pipes settle; 0: never
        os.set_blocking(src, False)
        os.set_blocking(dst, False)
        self.on_bytes = on_bytes
        self.bytes = 0
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self._pace = Pace(bwlimit) if bwlimit else None
        self._chunk = _SPLICE_CHUNK if not bwlimit else \
            max(16 << 10, min(_SPLICE_CHUNK, int(bwlimit * _PACED_SLICE)))
        self.tee = tee
        if tee is not None:
            os.set_blocking(tee, False)
        self._tee_lost = tee_lost
        self._teed = teed
        self._tee_stall = tee_stall
        self._stall: asyncio.TimerHandle | None = None
        self._owed = 0  # bytes already teed, not yet moved into dst
        self._watching: int | None = None  # the fd a reader/writer callback is on
        self._closed = False
        self._room = min(_pipe_size(src), _pipe_size(dst))  # the smaller pipe rules
        self._turn_at = self.loop.time()  # when the last move began
        self._later: asyncio.Handle | None = self.loop.call_soon(self._move)

    @property
    def held_by_sink(self) -> bool:
        """Waiting for a destination to take bytes (not for the source to send)."""
        return self._watching is not None and self._watching != self.src

    def _unwatch(self) -> None:
        if self._watching == self.src:
            self.loop.remove_reader(self.src)
        elif self._watching is not None:
            self.loop.remove_writer(self._watching)
        self._watching = None
        if self._later is not None:
            self._later.cancel()
            self._later = None

    def _move(self) -> None:
        self._unwatch()
        now = self.loop.time()
        span, self._turn_at = now - self._turn_at, now
        moved = 0
        for _ in range(_SPLICE_MOVES):
            if self._pace is not None and (wait := self._pace.wait(self.bytes)):
                self._later = self.loop.call_later(wait, self._move)
                return
            if self.tee is not None and not self._owed:
                try:
                    self._owed = _tee(self.src, self.tee, self._chunk)
                except BlockingIOError:
                    self._wait()
                    return
                except OSError as exc:  # EPIPE: the mirror's ssh is gone
                    self._drop_tee(f"the mirror's pipe broke: {exc}")
                    continue
                self._stalled(False)
                if self._owed == 0:
                    self._finish(None)
                    return
                if self._teed is not None:
                    self._teed(self._owed)
            try:
                n = os.splice(self.src, self.dst, self._owed or self._chunk,
                              flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                self._wait(moved, span)
                return
            except OSError as exc:  # EPIPE: the reader (ssh, zfs receive) is gone
                self._finish(exc)
                return
            if n == 0:
                self._finish(None)
                return
            self._owed = max(0, self._owed - n)
            self.bytes += n
            moved += n
            self.on_bytes(n)
        self._later = self.loop.call_soon(self._move)

    def _settles(self, moved: int, span: float) -> bool:
        """Whether to let the pipes settle (``settle`` seconds) rather than wake on
        their next change: the stream flows (this turn moved bytes), and at its
        rate neither pipe fills or drains by more than a third meanwhile."""
        if self.tee is not None or self._pace is not None or moved <= 0 \
                or self._settle <= 0:
            return False
        rate = moved / max(span, 1e-4)
        return rate * self._settle <= self._room / 3

    def _wait(self, moved: int = 0, span: float = 0.0) -> None:
        # Nothing moved: the source is empty, or a destination is full. Bytes
        # owed to dst are in the source already, so then dst is the full one.
        if not self._owed and self._settles(moved, span):
            self._later = self.loop.call_later(self._settle, self._move)
            return
        if self._owed:
            self._watch_writer(self.dst)
        elif select.select([self.src], [], [], 0)[0]:
            if self.tee is not None:
                self._stalled(True)
                self._watch_writer(self.tee)
            else:
                self._watch_writer(self.dst)
        else:
            self._watching = self.src
            self.loop.add_reader(self.src, self._move)

    def _watch_writer(self, fd: int) -> None:
        self._watching = fd
        self.loop.add_writer(fd, self._move)

    def _stalled(self, on: bool) -> None:
        if on and self._stall is None:
            self._stall = self.loop.call_later(
                self._tee_stall, self._drop_tee,
                f"the mirror took no data for {self._tee_stall:g} s")
        elif not on and self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _drop_tee(self, why: str) -> None:
        """Go on without the tee; its owner hears why (and closes it)."""
        if self.tee is None:
            return
        self._stalled(False)
        if self._watching == self.tee:
            self._unwatch()
            self._later = self.loop.call_soon(self._move)
        self.tee = None
        if self._tee_lost is not None:
            self._tee_lost(why)

    def _finish(self, exc: BaseException | None) -> None:
        self._unwatch()
        self._stalled(False)
        if not self.done.done():
            if exc is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc)

    def close(self) -> None:
        """Stop moving and close both ends (idempotent); ``done`` ends if it had not.
        A tee's pipe is left to its owner."""
        if self._closed:
            return
        self._closed = True
        if not self.done.done():
            self._finish(BrokenPipeError("the pump was closed before the stream ended"))
        if not self.done.cancelled():
            self.done.exception()  # the closer knows: no "never retrieved" warning
        self._unwatch()
        self._stalled(False)
        self.tee = None
        os.close(self.src)
        os.close(self.dst)


# -- a deep buffer before zfs receive -----------------------------------------------

_RING_CHUNK = 1 << 20  # at most this much per read or write: a pipe's worth
# How often the loop hears of bytes come (progress, budgets, the idle watchdog):
# after this many, or this long after it last did, whichever comes first.
_RING_TELL_BYTES = 4 << 20
_RING_TELL_SECONDS = 0.25
# After a move the reading thread lets ``src`` fill for as long as, at the rate
# of that move, it takes to fill a third of its pipe (at most this long), as
# ``SplicePump._settles`` does: sshd writes ~32 KiB at a time, and a move per
# write costs the thread's wake-up, the lock and the GIL each time (a third of
# the ring's CPU per GB, docs/data-plane.md). A thread sleeps finer than the
# loop's 1 ms timers, so this holds at any rate; a pipe of unknown size is
# never waited on.
_RING_SETTLE_MAX = 0.005


class RingPump:
    """A stream from pipe ``src`` into pipe ``dst`` with a deep buffer (the ring)
    for when ``dst``'s reader falls behind, each end on a thread. Made by
    ``ring_pump``: ``PipeRing`` where there is splice, else ``MemoryRing``.

    ``zfs receive`` takes its stdin in bursts: it stops reading while a
    transaction group syncs. A pipe holds at most 1 MiB (more needs
    CAP_SYS_RESOURCE), so meanwhile the sender stops too, and the link idles.
    The ring (``size`` bytes, taken only as far as the stream fills it) lets
    the sender go on: a zone's copy through the gate ran 1.07-1.12x as fast with
    it (docs/data-plane.md). For zone copies only, which are few at once: it
    holds up to ``size`` per stream.

    While the ring is empty and ``dst`` has room, the reading thread splices
    ``src`` into ``dst`` in the kernel (Linux), as ``SplicePump``. When ``dst``
    is full it puts bytes into the ring instead, and the writing thread drains
    the ring into ``dst``; once the ring is empty again, the splicing resumes.
    Bytes in the ring always go before newer ones.

    The threads work outside the GIL. The reading one waits in poll(2) on
    ``src`` and a stop pipe, so ``close`` ends it at once. The writing one
    blocks in its write (a whole chunk per call: non-blocking writes into a
    full pipe come a page at a time) and is ended by ``zfs receive`` taking
    the bytes or exiting (EPIPE); ``local.receive_stream`` ends the child
    whenever it leaves. The last thread out closes every descriptor, so none
    is closed under a thread using it (``dst``'s close is the reader's EOF).
    ``on_bytes(n)`` (in the loop, in batches) counts what came from ``src``;
    ``done`` resolves once both threads are gone: every byte written and
    ``dst`` closed, or with the first error (EPIPE: the reader exited;
    BrokenPipeError: ``close`` came first).

    ``settle``: at most how long the reading thread lets ``src`` fill between
    moves (``_pause_after``); 0 moves each write the source makes (a bench's
    baseline).

    A subclass keeps the ring: ``_full``, ``_take`` (from ``src`` into the
    ring, counted by ``_came``), ``_give`` (from the ring into ``dst``,
    counted by ``_went``) and ``_release``.
    """

    def __init__(self, src: int, dst: int, on_bytes: Callable[[int], None],
                 size: int, *, settle: float = _RING_SETTLE_MAX) -> None:
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.bytes = 0  # come from src, as the loop has been told
        self.ringed = 0  # of them, went through the ring (the rest was spliced)
        self.calls = [0, 0, 0]  # moves into the ring, splices past it, moves out of it
        self.on_bytes = on_bytes
        self.src, self.dst = src, dst
        self._splice = can_splice()
        self._size = size
        self._cv = threading.Condition()
        # Guarded by _cv: bytes put into the ring and taken out of it
        # (monotonic), src at EOF, the first error, a stop asked, bytes come
        # the loop has not heard of.
        self._head = self._tail = 0
        self._eof = False
        self._error: BaseException | None = None
        self._stop = False
        self._signalled = False  # the stop pipe has its byte
        self._unheard = 0
        self._left = 2  # threads still running: the last one out closes everything
        self._stop_r, self._stop_w = os.pipe()
        os.set_blocking(src, False)
        os.set_blocking(dst, True)
        self._src_room = _pipe_size(src)  # how far src may fill while the reader waits
        self._settle_max = settle if _SETTLE > 0 else 0.0

    def _start(self) -> None:
        """Start both threads: the subclass's ``__init__`` ends with this."""
        self._threads = [
            threading.Thread(target=self._run, args=(self._fill,), daemon=True,
                             name="ring-in"),
            threading.Thread(target=self._run, args=(self._drain,), daemon=True,
                             name="ring-out"),
        ]
        for t in self._threads:
            t.start()

    @property
    def held_by_sink(self) -> bool:
        """The ring is full: the client waits for ``zfs receive``, it is not idle."""
        return self._full()

    def close(self) -> None:
        """Stop both threads (idempotent); ``done`` ends if it had not. The last
        thread out closes the descriptors: ``dst`` then reads a cut stream."""
        with self._cv:
            if self._stop:
                return
            if self._error is None and not (self._eof and self._head == self._tail):
                self._error = BrokenPipeError("the pump was closed before the stream ended")
            self._stopping()

    # -- the ring, kept by a subclass (under _cv where said) ------------------------

    def _full(self) -> bool:
        """Under ``_cv``: the ring has no room; the reader waits for the writer."""
        raise NotImplementedError

    def _take(self) -> int | None:
        """Move what ``src`` holds into the ring (the reading thread) and count it
        in ``_head``: bytes moved (0: EOF), or None when there was no room after
        all. Raises BlockingIOError when ``src`` is empty."""
        raise NotImplementedError

    def _give(self) -> int:
        """Move the ring's oldest bytes into ``dst`` (the writing thread; blocking)
        and count them in ``_tail``: bytes moved. Called while the ring holds some."""
        raise NotImplementedError

    def _release(self) -> None:
        """Free the ring (the last thread out, both gone)."""
        raise NotImplementedError

    def _came(self, n: int) -> None:
        """Under ``_cv``: ``n`` bytes went into the ring."""
        self._head += n
        self.ringed += n
        self._cv.notify_all()

    def _went(self, n: int) -> None:
        """Under ``_cv``: ``n`` bytes left the ring for ``dst``."""
        self._tail += n
        self._cv.notify_all()

    # -- on the threads ---------------------------------------------------------

    def _run(self, body: Callable[[], None]) -> None:
        try:
            body()
        except BaseException as exc:  # every error ends the stream
            with self._cv:
                if self._error is None:
                    self._error = exc
                self._stopping()
        finally:
            with self._cv:
                self._left -= 1
                last = self._left == 0
                if last:  # under the lock: _stopping never writes to a closed pipe
                    for fd in (self.src, self.dst, self._stop_r, self._stop_w):
                        os.close(fd)
            if last:
                self._release()
                with contextlib.suppress(RuntimeError):  # the loop is closed already
                    self.loop.call_soon_threadsafe(self._finish)

    def _stopping(self) -> None:
        """Under ``_cv``: tell both threads to leave, once (a byte wakes a poll)."""
        if self._stop and self._signalled:
            return
        self._stop = True
        self._cv.notify_all()
        if not self._signalled and self._left:
            self._signalled = True
            os.write(self._stop_w, b"x")

    def _readable(self) -> bool:
        """Wait until ``src`` can be read; False if the pump is stopping instead."""
        poll = select.poll()
        poll.register(self.src, select.POLLIN)
        poll.register(self._stop_r, select.POLLIN)
        poll.poll()
        with self._cv:
            return not self._stop

    def _src_ready(self) -> bool:
        """``src`` has bytes (or EOF) now: a move that would block is held by
        the other end."""
        return bool(select.select([self.src], [], [], 0)[0])

    def _spliced(self) -> int | None:
        """Splice what ``src`` holds into ``dst``: bytes moved (0: EOF), or None
        when ``dst`` is full (or there is no splice here): the ring takes them.
        Raises BlockingIOError when ``src`` is empty."""
        if not self._splice:
            return None
        try:
            return os.splice(self.src, self.dst, _RING_CHUNK,
                             flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
        except BlockingIOError:
            if self._src_ready():
                return None  # src has bytes: dst is the full one
            raise

    def _pause_after(self, got: int, span: float) -> float:
        """Seconds to let ``src`` fill after a move of ``got`` bytes that came
        ``span`` seconds after the one before began: a third of its pipe at that
        rate, at most ``settle`` (0: never); 0 where its size is unknown. (Not
        the writing thread: after a stall ``zfs receive`` drains its pipe at
        once, and a wait then would idle it.)"""
        if got <= 0 or not self._src_room:
            return 0.0
        return min(self._settle_max, self._src_room / 3 * span / got)

    def _fill(self) -> None:
        told, untold = time.monotonic(), 0
        began = told  # when the last move began: its rate is what settling goes by
        while True:
            with self._cv:
                full = self._full()
            if full and untold:  # about to wait: the loop hears of what came first
                told, untold = self._tell()
            with self._cv:
                if self._full():
                    while self._full() and not self._stop:
                        self._cv.wait()
                    began = time.monotonic()  # held, not flowing: no rate to go by
                if self._stop:
                    return
                empty = self._head == self._tail  # so the writer has nothing to write
            try:
                got = self._spliced() if empty else None
                if got is None:
                    got = self._take()
                    if got is None:
                        continue
                    self.calls[0] += 1
                else:
                    self.calls[1] += 1
            except BlockingIOError:
                if untold:  # as above: the source is quiet
                    told, untold = self._tell()
                if not self._readable():
                    return
                began = time.monotonic()  # the stream resumes: no rate to go by yet
                continue
            if got == 0:
                with self._cv:
                    self._eof = True
                    self._cv.notify_all()
                return
            with self._cv:
                self._unheard += got
            # The loop hears of bytes in batches, not of each read (sshd writes
            # ~40 KiB at a time): each wake-up takes the GIL from these threads.
            untold += got
            now = time.monotonic()
            if untold >= _RING_TELL_BYTES or now - told >= _RING_TELL_SECONDS:
                told, untold = self._tell()
            span, began = now - began, now
            if pause := self._pause_after(got, span):
                time.sleep(pause)  # let src gather a larger move: see _RING_SETTLE_MAX

    def _tell(self) -> tuple[float, int]:
        """Have the loop hear of the bytes come (``_heard``); the reader's new
        (told, untold)."""
        self.loop.call_soon_threadsafe(self._heard)
        return time.monotonic(), 0

    def _drain(self) -> None:
        while True:
            with self._cv:
                while self._head == self._tail and not self._eof and not self._stop:
                    self._cv.wait()
                if self._stop or self._head == self._tail:  # stopped, or EOF and all out
                    return
            self._give()
            self.calls[2] += 1

    # -- in the loop ------------------------------------------------------------

    def _heard(self) -> None:
        with self._cv:
            n, self._unheard = self._unheard, 0
        if n:
            self.bytes += n
            self.on_bytes(n)

    def _finish(self) -> None:
        self._heard()
        if self.done.done():
            return
        if self._error is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(self._error)
            self.done.exception()  # whoever closed it knows: no "never retrieved"


class MemoryRing(RingPump):
    """The ring as anonymous memory, ``size`` bytes: read into by readv(2),
    written out of by write(2). Where there is no splice (illumos)."""

    def __init__(self, src: int, dst: int, on_bytes: Callable[[int], None],
                 size: int, *, settle: float = _RING_SETTLE_MAX) -> None:
        super().__init__(src, dst, on_bytes, size, settle=settle)
        self._ring = mmap.mmap(-1, size)
        self._view = memoryview(self._ring)
        self._start()

    def _full(self) -> bool:
        return self._head - self._tail >= self._size

    def _take(self) -> int | None:
        with self._cv:
            at = self._head % self._size
            n = min(self._size - (self._head - self._tail), self._size - at, _RING_CHUNK)
        got = os.readv(self.src, [self._view[at:at + n]])
        with self._cv:
            self._came(got)
        return got

    def _give(self) -> int:
        with self._cv:
            at = self._tail % self._size
            n = min(self._head - self._tail, self._size - at, _RING_CHUNK)
        put = os.write(self.dst, self._view[at:at + n])  # blocking: see RingPump
        with self._cv:
            self._went(put)
        return put

    def _release(self) -> None:
        with contextlib.suppress(BufferError):  # a slice not yet collected
            self._view.release()
            self._ring.close()


# A PipeRing's pipes: this big each where allowed (CAP_SYS_RESOURCE), else the
# system's pipe-max-size (1 MiB by default); at most this many of them.
_RING_PIPE_BYTES = 16 << 20
_RING_PIPES = 64


class PipeRing(RingPump):
    """The ring as a queue of pipes (Linux): bytes are spliced from ``src`` into
    the newest and from the oldest into ``dst``, so the kernel moves page
    references and never copies them through user memory. Against
    ``MemoryRing``'s two copies: measured in docs/data-plane.md.

    About ``size`` bytes of pipes: fewer, larger ones where the process may
    grow a pipe past pipe-max-size; at most ``_RING_PIPES`` (two descriptors
    each). A user over the kernel's pipe quota gets smaller pipes: the ring is
    shallower, never wrong. Its pipes stay blocking: an O_NONBLOCK end would
    make every splice through it non-blocking, and the writing thread blocks.
    """

    def __init__(self, src: int, dst: int, on_bytes: Callable[[int], None],
                 size: int, *, settle: float = _RING_SETTLE_MAX) -> None:
        super().__init__(src, dst, on_bytes, size, settle=settle)
        self._pipes: list[tuple[int, int]] = []
        depth = 0
        try:
            while depth < size and len(self._pipes) < _RING_PIPES:
                r, w = os.pipe()
                self._pipes.append((r, w))
                depth += grow_pipe(w, min(size - depth, _RING_PIPE_BYTES))
        except OSError:
            if not self._pipes:  # out of descriptors: no ring at all
                self._release()
                for fd in (self._stop_r, self._stop_w):
                    os.close(fd)
                raise
        self.depth = depth
        # Guarded by _cv: bytes in each pipe; the pipe being filled and the one
        # being drained (monotonic; index mod len), the newest found full with
        # no pipe free after it.
        self._held = [0] * len(self._pipes)
        self._in = self._out = 0
        self._stuck = False
        self._start()

    def _full(self) -> bool:
        return self._stuck

    def _take(self) -> int | None:
        with self._cv:
            at = self._in
        try:
            got = os.splice(self.src, self._pipes[at % len(self._pipes)][1], _RING_CHUNK,
                            flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
        except BlockingIOError:
            if not self._src_ready():
                raise  # src is empty
            with self._cv:  # the newest pipe is full: on to the next, if free
                if at + 1 - self._out < len(self._pipes):
                    self._in = at + 1
                else:
                    self._stuck = True
            return None
        with self._cv:
            self._held[at % len(self._pipes)] += got
            self._came(got)
        return got

    def _give(self) -> int:
        with self._cv:
            while not self._held[self._out % len(self._pipes)]:
                self._out += 1  # drained; a newer pipe holds the rest
            at = self._out % len(self._pipes)
            # Only bytes counted in: the reading thread may be filling this pipe.
            n = min(self._held[at], _RING_CHUNK)
        put = os.splice(self._pipes[at][0], self.dst, n, flags=os.SPLICE_F_MOVE)
        with self._cv:
            self._held[at] -= put
            self._stuck = False
            self._went(put)
        return put

    def _release(self) -> None:
        for r, w in self._pipes:
            os.close(r)
            os.close(w)
        self._pipes.clear()


def ring_pump(src: int, dst: int, on_bytes: Callable[[int], None], size: int) -> RingPump:
    """A ``RingPump`` of about ``size`` bytes: pipes where there is splice."""
    if can_splice():
        return PipeRing(src, dst, on_bytes, size)
    return MemoryRing(src, dst, on_bytes, size)
