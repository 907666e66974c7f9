"""snapperd's SSH endpoint: the transport for every ZFS stream, never a shell.

Public-key authentication only, against the keys in the zone's config (any
user name; the key is the identity). A session accepts one exec request, the
line of the command grammar (``protocol``); shells, ptys, subsystems and every
kind of forwarding are refused.

The data path is asyncssh's fast one (see the throughput notes): a low-level
``SSHServerSession`` returned from ``SSHServer.session_requested`` whose
``data_received`` callback hands each packet to the handler's ``Inbound``
(which writes it into ``zfs receive``'s stdin); AES-GCM only, because OpenSSH
clients otherwise pick chacha20, about half as fast here; no compression
(asyncssh's default turns it on); default window and packet size.

Limits (``[limits]`` in the config, ``daemon.limits``): connections in all
(refused once over, before authentication) and per client (after it), channels
per connection, a login timeout, keepalives, and idle connections (none of
their channels running a command) closed after ``connection_idle_seconds``.
A refused connection is disconnected with the JSON error line as the SSH
disconnect reason; a refused channel gets it as the channel-open failure's.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Mapping

import asyncssh

from snapper_zone.daemon.auth import Principal
from snapper_zone.daemon.limits import (
    ConnectionIdle,
    PerPrincipal,
    TooManyChannels,
    TooManyConnections,
)
from snapper_zone.daemon.service import Service
from snapper_zone.daemon.zone import Zone
from snapper_zone.errors import SnapperError
from snapper_zone.transfer.remote import AES_GCM
from snapper_zone.transfer.stream import ClientGone, Inbound, narrow_reads
from snapper_zone.wire import protocol

__all__ = ["ENCRYPTION_ALGS", "start_ssh_server"]

ENCRYPTION_ALGS = list(AES_GCM)


async def start_ssh_server(zone: Zone, service: Service | None = None) -> asyncssh.SSHAcceptor:
    """Listen on ``zone.config.ssh`` (port 0: ask ``get_port()``); return the acceptor."""
    svc = service or Service(zone)
    cfg = zone.config.ssh
    lim = zone.config.limits
    table = _Connections(lim.max_connections, PerPrincipal(lim.max_connections_per_principal))
    # Loaded here so a bad key file fails start-up with a clear error; the
    # daemon's wiring creates it when absent.
    host_key = asyncssh.read_private_key(str(cfg.host_key))
    return await asyncssh.create_server(
        lambda: _Server(zone, svc, table), cfg.host, cfg.port,
        server_host_keys=[host_key],
        encryption_algs=ENCRYPTION_ALGS,
        compression_algs=None,
        password_auth=False,
        kbdint_auth=False,
        allow_pty=False,
        agent_forwarding=False,
        x11_forwarding=False,
        allow_scp=False,
        # No PTY, so no line editing: without it asyncssh wraps every session
        # in an editor layer each packet passes through.
        line_editor=False,
        encoding=None,
        server_version="snapperd",
        # A CN that vanished (power loss) leaves no FIN; notice within ~2 min
        # so its VM lock and receive slot are given back.
        keepalive_interval=lim.keepalive_interval_seconds,
        keepalive_count_max=lim.keepalive_count_max,
        login_timeout=lim.login_timeout_seconds,
    )


# Numbers every client connection, the gate's commands too (receive --bind names one).
connection_numbers = itertools.count(1)


class _Connections:
    """Every open connection of one server: how many in all, and per client."""

    def __init__(self, cap: int, per_principal: PerPrincipal) -> None:
        self.cap = cap
        self.open = 0
        self.per_principal = per_principal


class _Server(asyncssh.SSHServer):
    """One client connection: who it is, its sessions, and whether it is idle."""

    def __init__(self, zone: Zone, service: Service, table: _Connections) -> None:
        self._zone = zone
        self._service = service
        self._table = table
        self._principal: Principal | None = None
        self._counted: str | None = None  # the label counted in table.per_principal
        self._peer = "?"
        self._id = next(connection_numbers)
        self._conn: asyncssh.SSHServerConnection | None = None
        self._sessions: set[_Session] = set()
        self._busy = 0  # sessions running a command
        self._idle_timer: asyncio.TimerHandle | None = None
        self._closed = False

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        narrow_reads(conn)  # every stream a client pushes is read from this socket
        addr = conn.get_extra_info("peername")
        self._peer = f"{addr[0]}:{addr[1]}" if addr else "?"
        self._table.open += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._table.open -= 1
        if self._counted is not None:
            self._table.per_principal.give_back(self._counted)
            self._counted = None
        self._stop_idle()
        # Parts a peer zone teed here end with its link (its push is over); a
        # client's own parts keep their lease for a commit from any connection.
        self._zone.transfers.release(self._id)

    def _refuse(self, err: SnapperError, code: int, what: str = "connection refused",
                level: int = logging.WARNING) -> None:
        """Close this connection, telling the client why in the disconnect reason."""
        self._zone.log.log(level, what, extra={
            "remote": self._peer, "reason": err.message,
            "principal": self._principal.label if self._principal else None})
        if self._conn is not None and not self._closed:
            self._conn.disconnect(code, protocol.error_line(err).strip())

    def begin_auth(self, username: str) -> bool:
        if self._table.open > self._table.cap:
            self._refuse(TooManyConnections(
                f"this zone has {self._table.cap} SSH connections open, the most it "
                "takes; retry later"), asyncssh.DISC_TOO_MANY_CONNECTIONS)
        return True  # always authenticate; the user name itself means nothing

    def auth_completed(self) -> None:
        p = self._principal
        assert p is not None
        if not self._table.per_principal.take(p.label):
            self._refuse(self._too_many(p), asyncssh.DISC_TOO_MANY_CONNECTIONS)
            return
        self._counted = p.label
        # Its number lets the same client bind a stream on another connection to
        # this one (receive --bind), which that stream then keeps from idling.
        self._zone.transfers.opened(self._id, p.label, self._held)
        self._start_idle()

    def _held(self, on: bool) -> None:
        if on:
            self.command_started()
        else:
            self.command_ended()

    # -- idle connections -----------------------------------------------------

    def _start_idle(self) -> None:
        if self._closed or self._busy or self._idle_timer is not None:
            return
        after = self._zone.config.limits.connection_idle_seconds
        self._idle_timer = asyncio.get_running_loop().call_later(after, self._idle, after)

    def _stop_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle(self, after: float) -> None:
        self._idle_timer = None
        if self._busy:
            return
        # Routine (a CN agent's kept link between its pushes): not a refusal.
        self._refuse(ConnectionIdle(f"this connection ran no command for {after:g} s; "
                                    "closed"), asyncssh.DISC_BY_APPLICATION,
                     "idle connection closed", logging.INFO)

    def command_started(self) -> None:
        self._busy += 1
        self._stop_idle()

    def command_ended(self) -> None:
        self._busy -= 1
        if not self._busy:
            self._start_idle()

    def session_closed(self, session: _Session) -> None:
        self._sessions.discard(session)

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        trusted = self._zone.key_for(key.public_data)
        if trusted is None:
            self._zone.metrics.auth_failures.labels("unknown_key").inc()
            self._zone.log.warning("refused unknown key", extra={
                "fingerprint": key.get_fingerprint(), "username": username[:64],
                "remote": self._peer})
            return False
        # asyncssh checks the signature after this; the last key validated is
        # the one the client authenticates with.
        self._principal = Principal.from_key(trusted, self._id)
        # Refused here, before authentication completes, the client's connect
        # fails with the reason; auth_completed counts (and checks again).
        if self._table.per_principal[self._principal.label] >= self._table.per_principal.cap:
            self._refuse(self._too_many(self._principal), asyncssh.DISC_TOO_MANY_CONNECTIONS)
            return False
        return True

    def _too_many(self, p: Principal) -> TooManyConnections:
        cap = self._table.per_principal.cap
        return TooManyConnections(f"{p.label} already has {cap} SSH connections open to this "
                                  "zone, the most one client may; reuse one, or close one")

    def session_requested(self) -> _Session | bool:
        if self._principal is None or self._counted is None:
            return False
        cap = self._zone.config.limits.max_channels_per_connection
        if len(self._sessions) >= cap:
            err = TooManyChannels(f"this connection has {cap} channels open, the most one "
                                  "may; wait for one to close, or open another connection")
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_RESOURCE_SHORTAGE,
                                            protocol.error_line(err).strip())
        session = _Session(self._zone, self._service, self._principal, self)
        self._sessions.add(session)
        return session


class _Session(asyncssh.SSHServerSession[bytes]):
    """One exec request; also the ``Io`` the command handler reads and writes."""

    def __init__(self, zone: Zone, service: Service, principal: Principal,
                 server: _Server) -> None:
        self._zone = zone
        self._service = service
        self._principal = principal
        self._server = server
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._command: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._gone = False
        # A client that stops sending mid-stream gives its VM lock and receive
        # slot back after stream_idle_seconds, with a StreamIdle error.
        self.inbound: Inbound = Inbound(self._pause_reading, self._resume_reading,
                                        idle_timeout=zone.config.stream_idle_seconds)

    # -- asyncssh callbacks ---------------------------------------------------

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self._chan = chan

    def pty_requested(self, term_type: str, term_size: tuple[int, int, int, int],
                      term_modes: Mapping[int, int]) -> bool:
        return False

    def shell_requested(self) -> bool:
        return False

    def subsystem_requested(self, subsystem: str) -> bool:
        return False

    def exec_requested(self, command: str) -> bool:
        # Accepted whatever it says: a bad line gets a JSON error and status 1,
        # which tells an operator more than a refused channel request.
        self._command = command
        return True

    def session_started(self) -> None:
        if self._command is not None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if datatype is None:  # extended data (stderr) from a client means nothing
            self.inbound.feed(data)

    def eof_received(self) -> bool:
        self.inbound.feed_eof()
        return True  # half-close: we still write output and the exit status

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone = True
        self._server.session_closed(self)
        self.inbound.feed_error(ClientGone("the client disconnected before the end of "
                                           "its stream"))
        self._writable.set()

    # -- the handler's Io ---------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._gone or self._chan is None:
            raise ClientGone("the client disconnected")
        try:
            self._chan.write(data)
        except BrokenPipeError:
            # The client closed its end (it stopped reading: its receive failed).
            raise ClientGone("the client closed the channel") from None

    async def drain(self) -> None:
        await self._writable.wait()
        if self._gone:
            raise ClientGone("the client disconnected")

    def write_stderr(self, data: bytes) -> None:
        if not self._gone and self._chan is not None:
            self._chan.write_stderr(data)

    def stdout_pipe(self) -> int | None:
        return None  # an SSH channel: its bytes are encrypted here, in Python

    def _pause_reading(self) -> None:
        if self._chan is not None and not self._gone:
            self._chan.pause_reading()

    def _resume_reading(self) -> None:
        if self._chan is not None and not self._gone:
            self._chan.resume_reading()

    async def _run(self) -> None:
        assert self._command is not None
        self._server.command_started()
        try:
            status = await self._service.execute(self._principal, self._command, self)
        finally:
            self._server.command_ended()
        if not self._gone and self._chan is not None:
            self._chan.exit(status)
