"""Pipelined mirroring: a CN's stream goes on to the mirror zone while it arrives.

The primary opens the mirror's ``receive`` (the same command the CN sent
it, as role ``peer``) before the first byte reaches its own ``zfs receive``,
and every packet goes to both: two ``zfs receive``s run at once, so the
second copy costs about no extra time. The mirror vets the stream exactly
as for a CN; if it refuses (it is not at the same base, a partial receive is
in the way), fails, or stalls, the tee lets go and the primary's own copy
goes on alone: the catch-up rounds send the mirror what it lacks afterwards.

Flow control: the mirror's channel pauses the CN (a vote in ``Inbound``)
while its window is full, so memory stays bounded; if it stays paused for
``STALL_SECONDS`` the mirror is too slow to pipeline and is let go.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import asyncssh

from snapper_zone.transfer.remote import ExecSession, ZoneClient
from snapper_zone.transfer.stream import Inbound
from snapper_zone.wire.protocol import Receive

__all__ = ["STALL_SECONDS", "MirrorTee", "TeeResult"]

STALL_SECONDS = 15.0
_VOTE = "mirror"


@dataclass(frozen=True)
class TeeResult:
    ok: bool
    bytes: int
    error: str | None = None


class MirrorTee:
    """One pipelined copy of one dataset stream to the mirror zone (an ``inbound.Sink``)."""

    def __init__(self, chan: asyncssh.SSHClientChannel[bytes], session: ExecSession,
                 inbound: Inbound, peer: str, log: logging.Logger) -> None:
        self.chan = chan
        self.session = session
        self.inbound = inbound
        self.peer = peer
        self.log = log
        self.bytes = 0
        self.active = True
        self.why: str | None = None
        self._ended = False
        self._stall: asyncio.TimerHandle | None = None
        session.on_pause = lambda: self._paused(True)
        session.on_resume = lambda: self._paused(False)
        session.closed.add_done_callback(self._closed)

    @classmethod
    async def open(cls, client: ZoneClient, cmd: Receive, inbound: Inbound, peer: str,
                   log: logging.Logger) -> MirrorTee:
        chan, session = await client.open_channel(cmd)
        return cls(chan, session, inbound, peer, log)

    # -- Sink ---------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.active:
            return
        try:
            self.chan.write(data)
        except (BrokenPipeError, OSError, asyncssh.Error) as exc:
            self.let_go(f"channel closed: {exc}")
            return
        self.bytes += len(data)

    def eof(self) -> None:
        if self.active and not self._ended:
            self._ended = True
            try:
                self.chan.write_eof()
            except (BrokenPipeError, OSError, asyncssh.Error) as exc:
                self.let_go(f"channel closed: {exc}")

    def abort(self) -> None:
        """The CN's stream was cut: cut the mirror's too (never end it cleanly)."""
        self.let_go("the client's stream was cut")

    # -- control ------------------------------------------------------------------

    def let_go(self, why: str) -> None:
        """Stop forwarding; the primary's copy goes on alone."""
        if not self.active:
            return
        self.active = False
        self.why = self.why or why
        self._cancel_stall()
        self.inbound.vote(_VOTE, False)
        if not self.session.closed.done():
            self.chan.close()  # without EOF: the mirror sees a truncated stream
        self.log.info("pipelined mirror let go", extra={"peer": self.peer, "reason": why,
                                                        "bytes": self.bytes})

    async def result(self, timeout: float) -> TeeResult:
        """Wait for the mirror's exit status (after the primary's receive is done)."""
        if self.active and not self._ended:
            self.let_go("the primary's receive ended before the client's stream")
        try:
            await asyncio.wait_for(asyncio.shield(self.session.closed), timeout)
        except (TimeoutError, OSError, asyncssh.Error) as exc:
            if isinstance(exc, TimeoutError):
                self.chan.close()
            return TeeResult(False, self.bytes, self.why or f"no exit status: {exc!r}")
        if self.session.exit_status == 0 and self.why is None:
            return TeeResult(True, self.bytes)
        err = self.session.error("receive")
        return TeeResult(False, self.bytes, self.why or f"{err.code}: {err.message}")

    def _paused(self, on: bool) -> None:
        if not self.active:
            return
        self.inbound.vote(_VOTE, on)
        if on and self._stall is None:
            loop = asyncio.get_running_loop()
            self._stall = loop.call_later(STALL_SECONDS, self.let_go,
                                          f"the mirror took no data for {STALL_SECONDS:.0f} s")
        elif not on:
            self._cancel_stall()

    def _cancel_stall(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _closed(self, fut: asyncio.Future[None]) -> None:
        if not fut.cancelled():
            fut.exception()  # retrieved here; result() reports it
        if self.active and not self._ended:
            # The mirror ended the channel before our EOF: it refused or failed.
            self.why = self.why or "the mirror closed the channel early"
            self.active = False
            self._cancel_stall()
            self.inbound.vote(_VOTE, False)
