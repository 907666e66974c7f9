"""Real pipes for the pump tests: a writer and a reader on the event loop."""

from __future__ import annotations

import os

from snapper_zone.transfer.stream import wait_ready
from snapper_zone.zfs.proc import widen_pipe


def pump_pipes() -> tuple[int, int, int, int]:
    """A pump's two pipes, (src read, src write, dst read, dst write), its own
    ends widened as snapperd widens them."""
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    for fd in (src_r, dst_w):
        widen_pipe(fd)
    return src_r, src_w, dst_r, dst_w


async def write_all(fd: int, data: bytes) -> None:
    """Feed ``data`` into a non-blocking pipe as fast as it drains, then close it."""
    os.set_blocking(fd, False)
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view[:1 << 20])
            view = view[n:]
        except BlockingIOError:
            await wait_ready(fd, write=True)
    os.close(fd)


async def read_all(fd: int, out: bytearray, stop_after: int | None = None) -> None:
    """Read into ``out`` until EOF (or ``stop_after`` bytes), then close ``fd``."""
    os.set_blocking(fd, False)
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            await wait_ready(fd, write=False)
            continue
        if not chunk:
            break
        out += chunk
        if stop_after is not None and len(out) >= stop_after:
            break
    os.close(fd)
