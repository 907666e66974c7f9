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

``Pipeliner`` decides whether a push gets a tee and ends it (the command
handler calls it around its receive); ``MirrorTee`` is one tee.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncssh

from snapper_zone.errors import SnapperError
from snapper_zone.transfer.remote import ExecSession, SshChild, ZoneClient
from snapper_zone.transfer.stream import Inbound, PipeWriter
from snapper_zone.wire.protocol import Receive, parse_error_line

if TYPE_CHECKING:
    from replication.peers import PeerLinks
    from replication.zone import LocalZone

__all__ = ["STALL_SECONDS", "MirrorTee", "Pipeliner", "SshMirrorTee", "TeeResult"]

STALL_SECONDS = 15.0
_VOTE = "mirror"
_TEE_CONNECT = 3.0  # seconds a push waits for the mirror to take a pipelined copy
_TEE_FINISH = 120.0  # ... and for the mirror's receive to end after its own
_TEE_BACKOFF = 30.0  # no pipelining to a peer that failed this recently


@dataclass(frozen=True)
class TeeResult:
    ok: bool
    bytes: int
    error: str | None = None


class _Tee:
    """What both tees share: letting go (once, with the first reason), and the
    stall rule: held full for ``STALL_SECONDS``, the mirror is let go."""

    pipe: int | None = None

    def __init__(self, inbound: Inbound, peer: str, log: logging.Logger) -> None:
        self.inbound = inbound
        self.peer = peer
        self.log = log
        self.bytes = 0
        self.active = True
        self.why: str | None = None
        self._ended = False
        self._stall: asyncio.TimerHandle | None = None

    def abort(self) -> None:
        """The CN's stream was cut: cut the mirror's too (never end it cleanly)."""
        self.let_go("the client's stream was cut")

    def let_go(self, why: str) -> None:
        """Stop forwarding; the primary's copy goes on alone."""
        if not self.active:
            return
        self.active = False
        self.why = self.why or why
        self._paused(False)
        self._cut()
        self.log.info("pipelined mirror let go", extra={"peer": self.peer, "reason": why,
                                                        "bytes": self.bytes})

    def _cut(self) -> None:
        """End the mirror's stream so that it sees it cut, not ended."""
        raise NotImplementedError

    def _paused(self, on: bool) -> None:
        if on and not self.active:
            return
        self.inbound.vote(_VOTE, on)
        if on and self._stall is None:
            loop = asyncio.get_running_loop()
            self._stall = loop.call_later(STALL_SECONDS, self.let_go,
                                          f"the mirror took no data for {STALL_SECONDS:.0f} s")
        elif not on and self._stall is not None:
            self._stall.cancel()
            self._stall = None


class MirrorTee(_Tee):
    """One pipelined copy of one dataset stream to the mirror zone (an ``inbound.Sink``),
    written from Python over the link's channel."""

    def __init__(self, chan: asyncssh.SSHClientChannel[bytes], session: ExecSession,
                 inbound: Inbound, peer: str, log: logging.Logger) -> None:
        super().__init__(inbound, peer, log)
        self.chan = chan
        self.session = session
        session.on_pause = lambda: self._paused(True)
        session.on_resume = lambda: self._paused(False)
        session.closed.add_done_callback(self._closed)

    @classmethod
    async def open(cls, client: ZoneClient, cmd: Receive, inbound: Inbound, peer: str,
                   log: logging.Logger) -> MirrorTee:
        chan, session = await client.open_channel(cmd)
        return cls(chan, session, inbound, peer, log)

    # -- Sink ---------------------------------------------------------------------

    def teed(self, n: int) -> None:
        raise AssertionError("a channel tee is never filled by the kernel")

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

    # -- control ------------------------------------------------------------------

    def _cut(self) -> None:
        if not self.session.closed.done():
            self.chan.close()  # without EOF: the mirror sees a truncated stream

    async def result(self, timeout: float) -> TeeResult:
        """Wait for the mirror's exit status (after the primary's receive is done)."""
        if self.active and not self._ended:
            self.let_go("the primary's receive ended before the client's stream")
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self.session.closed)
        except (TimeoutError, OSError, asyncssh.Error) as exc:
            if isinstance(exc, TimeoutError):
                self.chan.close()
            return TeeResult(False, self.bytes, self.why or f"no exit status: {exc!r}")
        if self.session.exit_status == 0 and self.why is None:
            return TeeResult(True, self.bytes)
        err = self.session.error("receive")
        return TeeResult(False, self.bytes, self.why or f"{err.code}: {err.message}")

    def _closed(self, fut: asyncio.Future[None]) -> None:
        if not fut.cancelled():
            fut.exception()  # retrieved here; result() reports it
        if self.active and not self._ended:
            # The mirror ended the channel before our EOF: it refused or failed.
            self.why = self.why or "the mirror closed the channel early"
            self.active = False
            self._paused(False)


class SshMirrorTee(_Tee):
    """One pipelined copy carried by OpenSSH's ``ssh`` into the mirror's gate.

    The mirror's ``sshd`` decrypts it and this zone's ``ssh`` encrypts it, so
    no byte of the copy passes asyncssh's packet path in Python. Its stdin is
    a pipe: where the CN's stream is itself a pipe (a push through this
    zone's gate, on Linux) ``Inbound`` tees it there in the kernel and calls
    only ``eof``/``abort``/``let_go``/``teed``; otherwise ``write`` fills it
    (``PipeWriter``), holding the CN back while it is full, as a channel's
    window does.
    """

    def __init__(self, ssh: SshChild, client: ZoneClient, inbound: Inbound, peer: str,
                 log: logging.Logger) -> None:
        super().__init__(inbound, peer, log)
        self.ssh = ssh
        self.client = client
        self.pipe = ssh.pipe
        self._writer: PipeWriter | None = None
        self._written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._written.add_done_callback(self._writer_done)
        # Its known_hosts goes when it exits, whether or not anyone asks for the
        # result (a receive refused after the tee opened only aborts it).
        ssh.exited.add_done_callback(lambda _: ssh.cleanup())

    # -- Sink ---------------------------------------------------------------------

    def teed(self, n: int) -> None:
        self.bytes += n

    def write(self, data: bytes) -> None:
        if not self.active or self.pipe is None:
            return
        if self._writer is None:
            self._writer = PipeWriter(self.pipe, self._paused, self.teed, self._written)
        self._writer.write(data)

    def eof(self) -> None:
        if self.active and not self._ended:
            self._ended = True
            if self._writer is not None:
                self._writer.close()  # after what is queued: ssh's EOF
            else:
                self._close_pipe()

    def _cut(self) -> None:
        if not self.ssh.exited.done():
            self.ssh.kill()  # before the pipe closes: a cut stream, not a short one
        if self._writer is not None:
            self._writer.abort()
        else:
            self._close_pipe()

    async def result(self, timeout: float) -> TeeResult:
        """Wait for the mirror's ssh to exit (after the primary's receive is done)."""
        if self.active and not self._ended:
            self.let_go("the primary's receive ended before the client's stream")
        try:
            async with asyncio.timeout(timeout):
                done = await asyncio.shield(self.ssh.exited)
        except TimeoutError:
            self.ssh.kill()
            return TeeResult(False, self.bytes, self.why or "the mirror's ssh did not end")
        finally:
            if self.pipe is not None and self._writer is None:
                self._close_pipe()
        if done.ok and self.why is None:
            return TeeResult(True, self.bytes)
        if done.returncode == 255:  # ssh's own failure (login, host key): the link's
            self.client.gate_refused(done.stderr.strip()[-1000:])  # channel next time
        code, message = parse_error_line(done.stderr)
        return TeeResult(False, self.bytes, self.why or f"{code}: {message}")

    def _writer_done(self, fut: asyncio.Future[None]) -> None:
        self.pipe = None  # the writer closed it
        if not fut.cancelled() and fut.exception() is not None:
            self.let_go(f"the mirror's ssh stopped reading: {fut.exception()}")

    def _close_pipe(self) -> None:
        if self.pipe is not None:
            os.close(self.pipe)
            self.pipe = None


class Pipeliner:
    """Opens and ends the pipelined copies of this zone's CN pushes.

    ``failing_since(vm)``: when the VM's replication last failed, if it is
    failing now (the replicator's state), else None. ``kick(vm)``: reconcile
    the VM soon (a tee that did not finish leaves the mirror to the rounds).
    """

    def __init__(self, zone: LocalZone, links: PeerLinks,
                 failing_since: Callable[[str], float | None],
                 kick: Callable[[str], None]) -> None:
        self.zone = zone
        self.links = links
        self.log = zone.log
        self.failing_since = failing_since
        self.kick = kick

    async def open(self, cmd: Receive, base: str | None,
                   inbound: Inbound) -> MirrorTee | SshMirrorTee | None:
        """Start the mirror's receive of a CN stream as it arrives, or None.

        None when pipelining is off, the VM has no peer, or the peer does not
        answer at once: the push then goes on alone and the mirror is sent the
        snapshot afterwards.
        """
        if not self.zone.config.pipelined_mirroring:
            return None
        peer = await self.links.partner(cmd.vm, fresh=True)
        if peer is None:
            return None
        failed = self.failing_since(cmd.vm)
        if failed is not None and time.time() - failed < _TEE_BACKOFF:
            return None  # the peer failed a moment ago: do not slow this push down
        mirror_cmd = Receive(cmd.vm, cmd.dataset, cmd.snapshot, base, cmd.size)
        try:
            async with asyncio.timeout(_TEE_CONNECT):
                client = await self.links.client(peer.uuid)
            async with asyncio.timeout(_TEE_CONNECT):
                # A large stream into a peer with a gate: OpenSSH's ssh carries the
                # copy (docs/data-plane.md); else the link's own channel.
                if (ssh := await client.ssh_receive(mirror_cmd)) is not None:
                    return SshMirrorTee(ssh, client, inbound, peer.uuid, self.log)
                return await MirrorTee.open(client, mirror_cmd, inbound, peer.uuid, self.log)
        except (SnapperError, OSError, TimeoutError, asyncssh.Error) as exc:
            self.log.info("no pipelined mirror", extra={"vm": cmd.vm, "peer": peer.uuid,
                                                        "reason": str(exc)})
            self.zone.metrics.mirror_transfers.labels(peer.uuid, "pipelined",
                                                      "unreachable").inc()
            await self.links.forget(peer.uuid)
            return None

    async def finish(self, cmd: Receive, tee: MirrorTee | SshMirrorTee) -> None:
        """Wait for the mirror's receive to end (after this zone's); count and log it."""
        res = await tee.result(_TEE_FINISH)
        result = "ok" if res.ok else "let-go"
        self.zone.metrics.mirror_transfers.labels(tee.peer, "pipelined", result).inc()
        # Teed while arriving, so never a transfer of the registry's: counted here.
        self.zone.metrics.bytes_sent.labels("mirror-pipelined").inc(res.bytes)
        self.log.info("pipelined mirror end", extra={
            "vm": cmd.vm, "dataset": cmd.dataset, "snapshot": cmd.snapshot, "peer": tee.peer,
            "result": result, "bytes": res.bytes, "error": res.error})
        if not res.ok:
            self.kick(cmd.vm)
