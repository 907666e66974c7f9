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
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping

import asyncssh

from snapper_zone.daemon.auth import Principal
from snapper_zone.daemon.service import Service
from snapper_zone.daemon.zone import Zone
from snapper_zone.transfer.stream import ClientGone, Inbound

__all__ = ["ENCRYPTION_ALGS", "start_ssh_server"]

ENCRYPTION_ALGS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"]


async def start_ssh_server(zone: Zone, service: Service | None = None) -> asyncssh.SSHAcceptor:
    """Listen on ``zone.config.ssh`` (port 0: ask ``get_port()``); return the acceptor."""
    svc = service or Service(zone)
    cfg = zone.config.ssh
    # Loaded here so a bad key file fails start-up with a clear error; the
    # daemon's wiring creates it when absent.
    host_key = asyncssh.read_private_key(str(cfg.host_key))
    return await asyncssh.create_server(
        lambda: _Server(zone, svc), cfg.host, cfg.port,
        server_host_keys=[host_key],
        encryption_algs=ENCRYPTION_ALGS,
        compression_algs=None,
        password_auth=False,
        kbdint_auth=False,
        allow_pty=False,
        agent_forwarding=False,
        x11_forwarding=False,
        allow_scp=False,
        encoding=None,
        server_version="snapperd",
        # A CN that vanished (power loss) leaves no FIN; notice within ~2 min
        # so its VM lock and receive slot are given back.
        keepalive_interval=30,
        keepalive_count_max=4,
        login_timeout=30,
    )


_connections = itertools.count(1)


class _Server(asyncssh.SSHServer):
    """One client connection: who it is, and its sessions."""

    def __init__(self, zone: Zone, service: Service) -> None:
        self._zone = zone
        self._service = service
        self._principal: Principal | None = None
        self._peer = "?"
        self._id = next(_connections)

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        addr = conn.get_extra_info("peername")
        self._peer = f"{addr[0]}:{addr[1]}" if addr else "?"

    def connection_lost(self, exc: Exception | None) -> None:
        # Parts a peer zone teed here end with its link (its push is over); a
        # client's own parts keep their lease for a commit from any connection.
        self._zone.transfers.release(self._id)

    def begin_auth(self, username: str) -> bool:
        return True  # always authenticate; the user name itself means nothing

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
        return True

    def session_requested(self) -> _Session | bool:
        if self._principal is None:
            return False
        return _Session(self._zone, self._service, self._principal)


class _Session(asyncssh.SSHServerSession[bytes]):
    """One exec request; also the ``Io`` the command handler reads and writes."""

    def __init__(self, zone: Zone, service: Service, principal: Principal) -> None:
        self._zone = zone
        self._service = service
        self._principal = principal
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

    def _pause_reading(self) -> None:
        if self._chan is not None and not self._gone:
            self._chan.pause_reading()

    def _resume_reading(self) -> None:
        if self._chan is not None and not self._gone:
            self._chan.resume_reading()

    async def _run(self) -> None:
        assert self._command is not None
        status = await self._service.execute(self._principal, self._command, self)
        if not self._gone and self._chan is not None:
            self._chan.exit(status)
