"""The agent's control socket: where ``snapper push`` hands its push to a running
``snapper agent``. Why and the protocol: ``cn/handoff.py`` (the CLI's end).
One push per connection, run by the agent's pusher under the VM's lock; a
CLI that goes away cancels its push."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from snapper_zone.cn.handoff import MAX_LINE, ControlError, PushRequest, wire_line
from snapper_zone.common.progress import Reporter
from snapper_zone.common.tasks import cancel_and_wait

__all__ = ["ControlServer"]

log = logging.getLogger("snapper.agent")

_ADVANCE_EVERY = 0.1  # seconds: progress lines at most ten a second
_REQUEST_SECONDS = 10.0  # a client that connects says what it wants at once


class _Forward:
    """A Reporter whose events go to the CLI, ``advance`` summed between lines."""

    def __init__(self, send: Callable[[dict[str, Any]], None]) -> None:
        self._send = send
        self._pending = 0
        self._last = 0.0

    def start(self, label: str, total: int | None, **fields: Any) -> None:
        self._flush()
        self._send({"start": {"label": label, "total": total, "fields": fields}})

    def advance(self, nbytes: int) -> None:
        self._pending += nbytes
        now = asyncio.get_running_loop().time()
        if now - self._last >= _ADVANCE_EVERY:
            self._flush()
            self._last = now

    def done(self, ok: bool = True, error: str | None = None) -> None:
        self._flush()
        self._send({"done": {"ok": ok, "error": error}})

    def _flush(self) -> None:
        if self._pending:
            self._send({"advance": self._pending})
            self._pending = 0


# The agent's push: the request, a reporter and where notes go -> the result document.
PushFn = Callable[[PushRequest, Reporter, Callable[[str], None]], Awaitable[dict[str, Any]]]
# What the CLI would print for a failed push, and its exit status (None: a bug).
FailureFn = Callable[[BaseException], tuple[str, int] | None]


class ControlServer:
    """The agent's end: one push per connection, run by ``push``."""

    def __init__(self, path: Path, push: PushFn, failure: FailureFn, *,
                 uid: int | None = None, request_seconds: float = _REQUEST_SECONDS) -> None:
        self.path = path
        self._request_seconds = request_seconds
        self._push = push
        self._failure = failure
        self._uid = os.geteuid() if uid is None else uid  # who may ask: the agent's user
        self._server: asyncio.AbstractServer | None = None
        self.served = 0  # pushes taken

    async def start(self) -> None:
        """Listen; a socket left by an agent that died is replaced, a live one's is not."""
        if self.path.exists():
            if await _answers(self.path):
                raise ControlError(f"{self.path}: another agent is running")
            self.path.unlink()
        old = os.umask(0o177)  # 0600: the agent's user alone
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path),
                                                           limit=MAX_LINE)
        finally:
            os.umask(old)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def _allowed(self, writer: asyncio.StreamWriter) -> bool:
        sock = writer.get_extra_info("socket")
        peercred = getattr(socket, "SO_PEERCRED", None)
        if sock is None or peercred is None:
            return True  # the socket's mode is the only check here (illumos)
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, peercred,
                                                              struct.calcsize("3i")))
        return bool(uid == self._uid)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def send(doc: dict[str, Any]) -> None:
            if not writer.is_closing():
                writer.write(wire_line(doc))

        try:
            if not self._allowed(writer):
                send({"error": {"text": "snapper: push: the agent takes pushes from its own "
                                "user only", "status": 2}})
                return
            try:
                async with asyncio.timeout(self._request_seconds):
                    line = await reader.readline()
                req = PushRequest.from_json(json.loads(line))
            except (ValueError, ControlError, TimeoutError) as exc:
                why = exc if str(exc) else f"none within {self._request_seconds:g} s"
                send({"error": {"text": f"snapper: push: the agent cannot read the request: "
                                f"{why}", "status": 2}})
                return
            self.served += 1
            work = asyncio.ensure_future(
                self._push(req, _Forward(send), lambda text: send({"say": text})))
            gone = asyncio.ensure_future(reader.read(1))  # EOF: the CLI went away
            try:
                await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:  # the agent stopping ends the pushes it runs for a CLI
                if not work.done():
                    if gone.done():
                        log.warning("push of VM %s: its snapper push went away; stopping it",
                                    req.vm)
                    await cancel_and_wait(work)
                await cancel_and_wait(gone)
            if work.cancelled():
                return
            try:
                send({"result": work.result()})
            except Exception as exc:
                said = self._failure(exc)
                if said is None:
                    log.exception("push of VM %s failed", req.vm)
                    said = (f"snapper: push: internal error in the agent: {exc!r}", 1)
                send({"error": {"text": said[0], "status": said[1]}})
        finally:
            with contextlib.suppress(OSError, ConnectionError):
                await writer.drain()
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()


async def _answers(path: Path) -> bool:
    try:
        _r, w = await asyncio.open_unix_connection(str(path))
    except OSError:
        return False
    w.close()
    with contextlib.suppress(OSError):
        await w.wait_closed()
    return True
