"""``SplicePump``: a send's pipe into ssh's stdin pipe in the kernel, counted and
paced. Real pipes, a writer and a reader on the event loop (no ZFS needed)."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

from snapper_zone.transfer.stream import (
    ClientGone,
    Inbound,
    PipeGone,
    SplicePump,
    StreamIdle,
    can_splice,
    can_tee,
    pipe_inbound,
    splice_out,
)
from snapper_zone.zfs.proc import widen_pipe
from tests.helpers import wait_for
from tests.pipes import pump_pipes, read_all, write_all

pytestmark = pytest.mark.skipif(not can_splice(), reason="no splice(2) here (Linux only); "
                                "SendPump carries the stream instead")


async def _pumped(data: bytes, bwlimit: float | None = None,
                  stop_after: int | None = None) -> tuple[SplicePump, bytearray, list[int]]:
    src_r, src_w, dst_r, dst_w = pump_pipes()
    counted: list[int] = []
    got = bytearray()
    pump = SplicePump(src_r, dst_w, counted.append, bwlimit)
    writer = asyncio.ensure_future(write_all(src_w, data))
    reader = asyncio.ensure_future(read_all(dst_r, got, stop_after))
    try:
        await asyncio.wait_for(asyncio.shield(pump.done), 60)
    except OSError:
        pass  # the reader stopped early: the caller checks
    finally:
        if pump.done.done() and pump.done.exception() is None:
            pump.close()  # the EOF ssh would see
        await asyncio.wait_for(reader, 60)
        pump.close()
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
    return pump, got, counted


async def test_every_byte_moves_and_is_counted() -> None:
    data = os.urandom(24 << 20)
    pump, got, counted = await _pumped(data)
    assert bytes(got) == data
    assert pump.bytes == sum(counted) == len(data)
    assert pump.done.result() is None


async def test_a_reader_that_goes_away_fails_the_pump() -> None:
    data = os.urandom(16 << 20)
    pump, got, _ = await _pumped(data, stop_after=1 << 20)
    assert len(got) < len(data)
    assert isinstance(pump.done.exception(), BrokenPipeError)


async def test_a_flowing_stream_settles_only_while_its_pipes_cannot_fill() -> None:
    """Between moves the pump lets a flowing stream's pipes settle (fewer, larger
    splices) only where, at the rate it just moved, a 1 MiB pipe would fill or
    drain by a third at most in that time; never a stream that stopped, a tee, a
    paced stream or anything that is not a pipe. The smaller of its two pipes
    rules."""
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    narrow_r, narrow_w = os.pipe()  # 64 KiB, as a pipe starts
    for fd in (src_r, dst_w):
        widen_pipe(fd)
    pump = SplicePump(src_r, dst_w, lambda n: None)
    try:
        mib = 1 << 20
        assert pump._settles(256 << 10, 0.002)  # 131 MB/s: 131 KB a millisecond
        assert pump._settles(300 << 10, 0.001)  # 307 MB/s
        assert not pump._settles(mib, 0.001)  # 1 GB/s: a millisecond fills it
        # Held by its reader's 32 KiB reads, each wake-up moves only that much,
        # yet the stream flows at 327 MB/s: it settles.
        assert pump._settles(32 << 10, 0.0001)
        assert not pump._settles(0, 0.01)  # stopped: wait on the pipes' next change
        eager = SplicePump(src_r, dst_w, lambda n: None, settle=0.0)
        try:
            assert not eager._settles(256 << 10, 0.002)  # settling off
        finally:
            eager._unwatch()
        narrow = SplicePump(src_r, narrow_w, lambda n: None)
        try:
            assert not narrow._settles(256 << 10, 0.002)  # 64 KiB fill in half of that
        finally:
            narrow._unwatch()
        a, b = socket.socketpair()
        with a, b:
            other = SplicePump(a.fileno(), dst_w, lambda n: None)
            try:
                assert not other._settles(256 << 10, 0.002)  # not a pipe: size unknown
            finally:
                other._unwatch()
        paced = SplicePump(src_r, dst_w, lambda n: None, 100e6)
        try:
            assert not paced._settles(256 << 10, 0.002)
        finally:
            paced._unwatch()
    finally:
        pump.close()
        for fd in (src_w, dst_r, narrow_r, narrow_w):
            os.close(fd)


async def test_bwlimit_paces_the_stream() -> None:
    """A send that writes a little, then (while the pump waits for its rate) all
    the rest, which fits in the pipe: one move could carry it at once, past the
    rate, and the reader would have it all too soon. It must arrive no sooner
    than the rate allows."""
    first, rest = os.urandom(256 << 10), os.urandom(800 << 10)
    rate = 400 << 10  # bytes/s: the stream cannot have arrived before 2.6 s
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    for fd in (src_r, src_w, dst_w):
        widen_pipe(fd)
    counted: list[int] = []
    took_first = asyncio.Event()

    def count(n: int) -> None:
        counted.append(n)
        if sum(counted) >= len(first):
            took_first.set()

    got = bytearray()
    start = time.monotonic()
    pump = SplicePump(src_r, dst_w, count, rate)
    # The reader stops at the stream's last byte, as a zone's receive ends at the
    # stream's last record, whenever the pump's own end comes.
    reader = asyncio.ensure_future(read_all(dst_r, got, len(first) + len(rest)))
    os.write(src_w, first)
    await asyncio.wait_for(took_first.wait(), 30)  # the pump took it: now the rest
    await write_all(src_w, rest)
    await asyncio.wait_for(reader, 30)
    took = time.monotonic() - start
    await asyncio.wait([pump.done], timeout=30)
    pump.close()
    assert bytes(got) == first + rest
    assert sum(counted) == len(got)
    assert took >= len(got) / rate * 0.9, took


# -- Inbound with a detachable source (the gate's stdin) -----------------------------


async def _detachable(idle_timeout: float | None = None) -> tuple[Inbound, int, list[int]]:
    """``stream.pipe_inbound`` on a new pipe (a stream fed by an asyncio read
    transport, as ssh's stdout or the gate's stdin is), its ``detach`` noted.
    Returns it, the pipe's write end, and a list noting each detach."""
    r, w = os.pipe()
    widen_pipe(w)
    inbound, _ = await pipe_inbound(r, idle_timeout=idle_timeout)
    detached: list[int] = []
    detach = inbound._detach
    assert detach is not None

    def noted() -> int | None:
        detached.append(1)
        return detach()

    inbound._detach = noted
    return inbound, w, detached


class _Collect:
    """A tee's sink (the mirror's channel) that keeps what it is given."""

    pipe: int | None = None

    def __init__(self) -> None:
        self.data = bytearray()
        self.ended: str | None = None
        self.counted = 0  # what the kernel said it teed

    def write(self, data: bytes) -> None:
        self.data += data

    def eof(self) -> None:
        self.ended = "eof"

    def abort(self) -> None:
        self.ended = "abort"

    def let_go(self, why: str) -> None:
        self.ended = f"let go: {why}"

    def teed(self, n: int) -> None:
        self.counted += n


class _PipeTee(_Collect):
    """A tee's sink that is a pipe (the mirror's ssh's stdin), read by a task;
    ``read_only`` bytes, then its read end closed (a mirror that died)."""

    def __init__(self, read_only: int | None = None, reading: bool = True) -> None:
        super().__init__()
        r, self.pipe = os.pipe()
        self._r = r
        self.reader = asyncio.ensure_future(self._read(read_only)) if reading else None

    async def _read(self, read_only: int | None) -> None:
        await read_all(self._r, self.data, stop_after=read_only)

    def write(self, data: bytes) -> None:
        raise AssertionError("a kernel tee's sink is never written from Python")

    def _close(self, how: str) -> None:
        if self.ended is None:
            self.ended = how
            assert self.pipe is not None
            os.close(self.pipe)

    def eof(self) -> None:
        self._close("eof")

    def abort(self) -> None:
        self._close("abort")

    def let_go(self, why: str) -> None:
        self._close(f"let go: {why}")


async def _header_then_rest(data: bytes, tee: _Collect | None = None
                            ) -> tuple[bytes, list[int], list[int]]:
    """A handler's receive from a detachable source: a header read through the
    buffer and handed back as ``first``, then ``pipe_to``. What the pipe got,
    what was counted, and the detaches."""
    inbound, w, detached = await _detachable()
    dst_r, dst_w = os.pipe()
    writer = asyncio.ensure_future(write_all(w, data))
    head = await inbound.read(1000)
    got = bytearray()
    reader = asyncio.ensure_future(read_all(dst_r, got))
    counted: list[int] = []
    async with asyncio.timeout(60):
        await inbound.pipe_to(dst_w, head, counted.append, tee)
        await reader
        await writer
    return bytes(got), counted, detached


async def test_a_detached_source_is_spliced_after_the_header_in_order() -> None:
    """The rest goes by splice: every byte arrives, in order, each counted once."""
    data = os.urandom(12 << 20)
    got, counted, detached = await _header_then_rest(data)
    assert detached == [1]
    assert got == data
    assert sum(counted) == len(data)


async def test_a_spliced_source_that_goes_quiet_is_cut_as_idle() -> None:
    inbound, w, detached = await _detachable(idle_timeout=0.5)
    os.write(w, os.urandom(64 << 10))  # then nothing, the pipe left open
    dst_r, dst_w = os.pipe()
    got = bytearray()
    reader = asyncio.ensure_future(read_all(dst_r, got))
    start = time.monotonic()
    with pytest.raises(StreamIdle):
        async with asyncio.timeout(30):
            await inbound.pipe_to(dst_w, b"", lambda n: None)
    assert detached == [1] and time.monotonic() - start < 10
    await asyncio.wait_for(reader, 10)  # the destination was closed: its reader saw EOF
    assert len(got) == 64 << 10
    os.close(w)


async def test_a_receiver_that_exits_mid_splice_is_pipe_gone() -> None:
    inbound, w, _ = await _detachable()
    writer = asyncio.ensure_future(write_all(w, os.urandom(16 << 20)))
    dst_r, dst_w = os.pipe()
    got = bytearray()
    reader = asyncio.ensure_future(read_all(dst_r, got, stop_after=1 << 20))
    with pytest.raises(PipeGone):
        async with asyncio.timeout(30):
            await inbound.pipe_to(dst_w, b"", lambda n: None)
    await reader
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    os.close(w)  # the writer was stopped mid-stream, its end still open


async def test_a_teed_stream_is_not_spliced_and_both_sinks_get_it_all() -> None:
    """The mirror needs the bytes in user space: with a tee the detachable source
    is read as before (never detached), and the pipe and the tee both get every
    byte, in order, and the end."""
    data = os.urandom(6 << 20)
    tee = _Collect()
    got, _, detached = await _header_then_rest(data, tee)
    assert detached == []
    assert got == data and bytes(tee.data) == data and tee.ended == "eof"


@pytest.mark.skipif(not can_tee(), reason="no tee(2) here (Linux only): a pipe sink is "
                    "written from Python instead")
async def test_a_detached_stream_is_teed_in_the_kernel_into_both_pipes() -> None:
    """A tee that is a pipe (the mirror's ssh): the source is detached and every
    byte goes to both pipes by tee(2) and splice(2), in order, counted once, and
    the tee hears the end."""
    data = os.urandom(12 << 20)
    tee = _PipeTee()
    got, counted, detached = await _header_then_rest(data, tee)
    assert tee.reader is not None
    await asyncio.wait_for(tee.reader, 30)
    assert detached == [1]
    assert got == data and bytes(tee.data) == data and tee.ended == "eof"
    assert sum(counted) == len(data)
    assert tee.counted == len(data)


@pytest.mark.skipif(not can_tee(), reason="no tee(2) here (Linux only)")
async def test_a_tee_whose_reader_dies_is_let_go_and_the_receive_goes_on() -> None:
    data = os.urandom(12 << 20)
    tee = _PipeTee(read_only=1 << 20)
    got, counted, _ = await _header_then_rest(data, tee)
    assert got == data and sum(counted) == len(data)
    assert tee.ended is not None and tee.ended.startswith("let go: the mirror's pipe broke")
    assert 1 << 20 <= len(tee.data) < len(data)


@pytest.mark.skipif(not can_tee(), reason="no tee(2) here (Linux only)")
async def test_a_tee_that_stays_full_is_let_go_after_its_stall_time() -> None:
    """Nobody reads the tee's pipe: after ``tee_stall`` the pump goes on into the
    destination alone, and says why once."""
    data = os.urandom(8 << 20)
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    tee_r, tee_w = os.pipe()
    lost: list[str] = []
    got = bytearray()
    reader = asyncio.ensure_future(read_all(dst_r, got))
    writer = asyncio.ensure_future(write_all(src_w, data))
    pump = SplicePump(src_r, dst_w, lambda n: None, tee=tee_w, tee_lost=lost.append,
                      tee_stall=0.3)
    async with asyncio.timeout(30):
        await pump.done
        pump.close()
        await reader
        await writer
    assert got == data
    assert lost == ["the mirror took no data for 0.3 s"]
    os.close(tee_r)
    os.close(tee_w)


@pytest.mark.skipif(not can_tee(), reason="no tee(2) here (Linux only)")
async def test_a_client_gone_mid_tee_cuts_both() -> None:
    """The client goes away mid-stream: the receive ends with its error and the
    tee is aborted (the mirror must see a cut stream, never a short clean one)."""
    inbound, w, _ = await _detachable()
    os.write(w, os.urandom(256 << 10))  # part of a stream, then the client vanishes
    dst_r, dst_w = os.pipe()
    got = bytearray()
    reader = asyncio.ensure_future(read_all(dst_r, got))
    tee = _PipeTee()
    piping = asyncio.ensure_future(inbound.pipe_to(dst_w, b"", lambda n: None, tee))
    await wait_for(lambda: len(got) >= 256 << 10, 30, "the first bytes through")
    inbound.feed_error(ClientGone("the client disconnected"))
    with pytest.raises(ClientGone):
        await asyncio.wait_for(piping, 30)
    assert tee.ended == "abort"
    await asyncio.wait_for(reader, 30)
    os.close(w)


# -- a send's pipe out to the client's (a restore through the gate) ------------------


async def test_splice_out_moves_the_whole_stream_counted() -> None:
    data = os.urandom(6 << 20)
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    got = bytearray()
    counted: list[int] = []
    reader = asyncio.ensure_future(read_all(dst_r, got))
    writer = asyncio.ensure_future(write_all(src_w, data))
    async with asyncio.timeout(30):
        await splice_out(src_r, dst_w, counted.append, stall_timeout=10)
        await writer
        await reader  # the destination was closed: its reader saw EOF
    assert got == data and sum(counted) == len(data)


async def test_splice_out_cuts_a_client_that_reads_nothing() -> None:
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    writer = asyncio.ensure_future(write_all(src_w, os.urandom(8 << 20)))
    start = time.monotonic()
    with pytest.raises(StreamIdle):
        async with asyncio.timeout(30):
            await splice_out(src_r, dst_w, lambda n: None, stall_timeout=0.3)
    assert time.monotonic() - start < 10
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    os.close(src_w)
    os.close(dst_r)


async def test_splice_out_says_client_gone_when_its_end_closes() -> None:
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    got = bytearray()
    reader = asyncio.ensure_future(read_all(dst_r, got, stop_after=1 << 20))
    writer = asyncio.ensure_future(write_all(src_w, os.urandom(16 << 20)))
    with pytest.raises(ClientGone):
        async with asyncio.timeout(30):
            await splice_out(src_r, dst_w, lambda n: None, stall_timeout=10)
    await reader
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    os.close(src_w)
