"""``RingPump``: a peer's stream into ``zfs receive``'s pipe, spliced while the
reader keeps up and through a ring while it does not: a queue of pipes where
there is splice (``PipeRing``), anonymous memory elsewhere (``MemoryRing``).
Real pipes, real threads (no ZFS needed; without splice every byte goes
through the memory ring, as on illumos)."""

from __future__ import annotations

import asyncio
import fcntl
import gc
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from snapper_zone.transfer import stream
from snapper_zone.transfer.stream import (
    Inbound,
    PipeGone,
    PipeRing,
    RingPump,
    StreamIdle,
    can_splice,
    pipe_inbound,
    ring_pump,
    wait_ready,
)
from snapper_zone.zfs.proc import grow_pipe, widen_pipe
from tests.helpers import wait_for
from tests.pipes import pump_pipes, read_all, write_all


def _ring_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name in ("ring-in", "ring-out")]


async def _pumped(data: bytes, size: int, stop_after: int | None = None,
                  read: Callable[[int, bytearray], Awaitable[None]] | None = None
                  ) -> tuple[RingPump, bytearray, list[int], BaseException | None]:
    """``data`` written into a pipe, pumped with a ring of ``size`` bytes, read
    from the other pipe by ``read`` (else at once: ``stop_after`` bytes, then
    its read end closed)."""
    src_r, src_w, dst_r, dst_w = pump_pipes()
    counted: list[int] = []
    got = bytearray()
    pump = ring_pump(src_r, dst_w, counted.append, size)
    writer = asyncio.ensure_future(write_all(src_w, data))
    reader = asyncio.ensure_future(
        read(dst_r, got) if read is not None else read_all(dst_r, got, stop_after))
    try:
        async with asyncio.timeout(120):
            await asyncio.wait([pump.done])
            await reader
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
    return pump, got, counted, pump.done.exception()


def _fds() -> int:
    # Earlier tests' loops and pipes left to the collector would otherwise close
    # between the two counts (run after tests/test_splice.py, they did).
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(params=["pipes", "memory"])
def ring_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each ring: the pipes' with small pipes (so a stream wraps through many),
    the memory one as illumos has it."""
    if request.param == "memory":
        monkeypatch.setenv("SNAPPER_NO_SPLICE", "1")
    elif not can_splice():
        pytest.skip("no splice(2) here (Linux only): the memory ring carries every byte")
    else:
        monkeypatch.setattr(stream, "_RING_PIPE_BYTES", 64 << 10)
    return str(request.param)


@pytest.mark.parametrize("size", [256 << 10, 64 << 20], ids=["wraps-often", "holds-it-all"])
async def test_every_byte_moves_in_order_and_is_counted(size: int, ring_kind: str) -> None:
    data = os.urandom(24 << 20)
    fds = _fds()
    pump, got, counted, err = await _pumped(data, size)
    assert isinstance(pump, PipeRing) == (ring_kind == "pipes")
    assert err is None
    assert bytes(got) == data  # ring wrap-arounds keep the order
    assert pump.bytes == sum(counted) == len(data)
    await wait_for(lambda: not _ring_threads(), timeout=10)
    assert _fds() == fds  # the ring's pipes and both ends closed


async def _bursty_read(fd: int, out: bytearray) -> None:
    """Read as ``zfs receive`` does: in bursts, with pauses (a transaction group
    syncing) during which the pipe fills up."""
    os.set_blocking(fd, False)
    while True:
        burst = 0
        while burst < 3 << 20:
            try:
                chunk = os.read(fd, 256 << 10)
            except BlockingIOError:
                await wait_ready(fd, write=False)
                continue
            if not chunk:
                os.close(fd)
                return
            out += chunk
            burst += len(chunk)
        await asyncio.sleep(0.02)  # the reader's own pause, not a synchronisation


async def test_a_bursty_reader_gets_every_byte_in_order_through_splice_and_ring(
        ring_kind: str) -> None:
    """The stream goes back and forth between splicing (the ring empty) and the
    ring (the reader paused): bytes in the ring always go before newer ones."""
    splice = ring_kind == "pipes"
    data = os.urandom(48 << 20)
    pump, got, counted, err = await _pumped(data, 8 << 20, read=_bursty_read)
    assert err is None
    assert bytes(got) == data
    assert pump.bytes == sum(counted) == len(data)
    if splice:
        assert 0 < pump.ringed < len(data)  # both ways were taken
    else:
        assert pump.ringed == len(data)
    await wait_for(lambda: not _ring_threads(), timeout=10)


async def test_a_reader_that_goes_away_fails_the_pump_and_ends_both_threads(
        ring_kind: str) -> None:
    data = os.urandom(32 << 20)
    _, got, _, err = await _pumped(data, 4 << 20, stop_after=1 << 20)
    assert len(got) < len(data)
    assert isinstance(err, BrokenPipeError)  # EPIPE from write(2): zfs receive exited
    await wait_for(lambda: not _ring_threads(), timeout=10)


async def test_close_while_the_source_is_quiet_ends_at_once_and_cuts_the_stream(
        ring_kind: str) -> None:
    """The reading thread waits in poll(2): ``close`` wakes it through the stop
    pipe; the destination is closed (its reader sees EOF), the source too (its
    writer gets EPIPE), and ``done`` says the stream was cut."""
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    pump = ring_pump(src_r, dst_w, lambda n: None, 1 << 20)
    os.write(src_w, b"x" * 1000)  # then nothing
    got = bytearray()
    reader = asyncio.ensure_future(read_all(dst_r, got))
    await wait_for(lambda: len(got) == 1000, timeout=10)
    start = time.monotonic()
    pump.close()
    async with asyncio.timeout(10):
        await asyncio.wait([pump.done])
        await reader  # EOF: the writing thread closed dst
    assert time.monotonic() - start < 5
    assert isinstance(pump.done.exception(), BrokenPipeError)
    with pytest.raises(BrokenPipeError):
        os.write(src_w, b"y")  # the reading thread closed src
    os.close(src_w)
    pump.close()  # again: nothing more happens
    await wait_for(lambda: not _ring_threads(), timeout=10)


async def test_the_reader_lets_its_pipe_fill_a_third_at_the_rate_it_just_saw(
        ring_kind: str) -> None:
    """After a move the reading thread sleeps as long as the source takes to
    fill a third of its pipe at that move's rate (sshd's 32 KiB writes: a few
    moves per pipe, not one per write), at most 5 ms; never after nothing moved,
    nor on a pipe whose size it cannot know."""
    if not hasattr(fcntl, "F_GETPIPE_SZ"):
        pytest.skip("F_GETPIPE_SZ is Linux's: elsewhere the reader never settles")
    src_r, src_w, dst_r, dst_w = pump_pipes()
    pump = ring_pump(src_r, dst_w, lambda n: None, 1 << 20)
    try:
        third = (1 << 20) / 3
        assert pump._pause_after(32 << 10, 1e-4) == pytest.approx(third / 327.68e6)  # ~1.07 ms
        assert pump._pause_after(1 << 20, 1e-3) == pytest.approx(1e-3 / 3)  # 1 GB/s: shorter
        assert pump._pause_after(4 << 10, 0.1) == stream._RING_SETTLE_MAX  # a trickle: capped
        assert pump._pause_after(0, 0.01) == 0.0
        pump._src_room = 0  # as for a socket, or where pipes have no size to ask
        assert pump._pause_after(32 << 10, 1e-4) == 0.0
    finally:
        pump.close()
        os.close(src_w)
        os.close(dst_r)
        async with asyncio.timeout(10):
            await asyncio.wait([pump.done])


async def test_a_full_ring_holds_the_client_and_says_so(ring_kind: str) -> None:
    """A receive that stops reading fills the ring: the client is held by us (not
    idle), and the bytes the ring took were counted."""
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    counted: list[int] = []
    pump = ring_pump(src_r, dst_w, counted.append, 256 << 10)
    writer = asyncio.ensure_future(write_all(src_w, os.urandom(8 << 20)))
    await wait_for(lambda: pump.held_by_sink, timeout=10)
    await wait_for(lambda: sum(counted) >= 256 << 10, timeout=10)
    pump.close()
    os.close(dst_r)  # the writing thread, blocked in write(2), gets EPIPE
    async with asyncio.timeout(10):
        await asyncio.wait([pump.done])
    assert pump.done.exception() is not None
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    await wait_for(lambda: not _ring_threads(), timeout=10)


# -- through Inbound.pipe_to, as a zone's mirror-in through the gate -----------------


async def _detachable(idle_timeout: float | None = None) -> tuple[Inbound, int]:
    r, w = os.pipe()
    widen_pipe(w)
    inbound, _ = await pipe_inbound(r, idle_timeout=idle_timeout)
    return inbound, w


async def test_pipe_to_with_a_ring_sends_the_header_then_the_rest_in_order() -> None:
    data = os.urandom(12 << 20)
    inbound, w = await _detachable()
    dst_r, dst_w = os.pipe()
    writer = asyncio.ensure_future(write_all(w, data))
    head = await inbound.read(1000)
    got = bytearray()
    reader = asyncio.ensure_future(read_all(dst_r, got))
    counted: list[int] = []
    async with asyncio.timeout(60):
        await inbound.pipe_to(dst_w, head, counted.append, ring=1 << 20)
        await reader
        await writer
    assert bytes(got) == data
    assert sum(counted) == len(data)
    await wait_for(lambda: not _ring_threads(), timeout=10)


async def test_a_ringed_source_that_goes_quiet_is_cut_as_idle() -> None:
    inbound, w = await _detachable(idle_timeout=0.5)
    os.write(w, os.urandom(64 << 10))  # then nothing, the pipe left open
    dst_r, dst_w = os.pipe()
    got = bytearray()
    reader = asyncio.ensure_future(read_all(dst_r, got))
    with pytest.raises(StreamIdle):
        async with asyncio.timeout(30):
            await inbound.pipe_to(dst_w, b"", lambda n: None, ring=1 << 20)
    await asyncio.wait_for(reader, 10)  # the destination was closed: EOF
    assert len(got) == 64 << 10
    os.close(w)
    await wait_for(lambda: not _ring_threads(), timeout=10)


async def test_a_receiver_that_exits_mid_ring_is_pipe_gone() -> None:
    inbound, w = await _detachable()
    writer = asyncio.ensure_future(write_all(w, os.urandom(16 << 20)))
    dst_r, dst_w = os.pipe()
    got = bytearray()
    reader = asyncio.ensure_future(read_all(dst_r, got, stop_after=1 << 20))
    with pytest.raises(PipeGone):
        async with asyncio.timeout(30):
            await inbound.pipe_to(dst_w, b"", lambda n: None, ring=1 << 20)
    await reader
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    os.close(w)
    await wait_for(lambda: not _ring_threads(), timeout=10)


def test_a_grown_pipe_holds_what_grow_pipe_says() -> None:
    """``grow_pipe`` returns the pipe's capacity: the size asked where the process
    may (CAP_SYS_RESOURCE), else pipe-max-size; the ring's depth is counted from it."""
    if not hasattr(fcntl, "F_GETPIPE_SZ"):
        pytest.skip("no F_SETPIPE_SZ here (Linux only): pipes keep their size")
    r, w = os.pipe()
    try:
        got = grow_pipe(w, 4 << 20)
        assert got == fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
        limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
        assert got in (4 << 20, min(limit, 4 << 20))
    finally:
        os.close(r)
        os.close(w)
