"""snapperd's end of the sshd gate (``snapper_zone/daemon/sshgate.py``): keys and a socket.

The zone's ``sshd`` authenticates a client and decrypts its stream; each
connection is its own process, so streams are decrypted on every core
(``docs/data-plane.md``). snapperd keeps sshd's ``authorized_keys`` file
(``gate.authorized_keys``) equal to the keys it trusts (its config, the
registry's CNs, learned peers; rewritten within ``KEYS_EVERY`` seconds of a
change), each line forcing ``snapper-gate``. The gate hands over the
client's command line, its key, and the channel's three descriptors
(``SCM_RIGHTS``) on a unix socket; snapperd runs the command exactly as for
its own SSH server (``Service.execute``: the key looked up again, the same
grammar, authorisation, slots, budgets, vetted stream) on those descriptors
and sends the exit status back. A key revoked a moment before its login is
refused here, whatever the file still said.

Who may connect: the socket is created mode 0600, owned by ``gate.uid`` (the
user sshd runs the gate as), and on Linux the peer's uid is checked
(``SO_PEERCRED``) as well. That user must be able to do nothing else: every
key sshd takes for it is forced to ``snapper-gate`` (``restrict``).

Limits are the SSH server's: a command counts as one connection of its client
(``max_connections_per_principal``; ``max_connections`` in all), a request
must arrive within ``login_timeout_seconds``, a stream that stops is cut
after ``stream_idle_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
from pathlib import Path

from snapper_zone.common.bootstrap import StartupError, write_atomically
from snapper_zone.common.config import GateConfig
from snapper_zone.daemon.auth import Principal
from snapper_zone.daemon.limits import PerPrincipal, TooManyConnections
from snapper_zone.daemon.service import Service
from snapper_zone.daemon.sshgate import MAX_LINE, GateError, Request, authorized_line, forced_argv
from snapper_zone.daemon.sshserver import connection_numbers
from snapper_zone.daemon.zone import Zone
from snapper_zone.errors import SnapperError
from snapper_zone.transfer.stream import ClientGone, Inbound, can_splice, wait_ready
from snapper_zone.wire import protocol

__all__ = ["KEYS_EVERY", "GateServer"]

KEYS_EVERY = 2.0  # seconds between looks at the trusted keys, for sshd's file


class GateRefused(SnapperError):
    """A gate's request is not one snapperd takes (malformed, unknown key)."""

    code = "NotAuthorized"
    http_status = 403


class GateServer:
    """Listens on ``gate.socket``; one task per gate connection."""

    def __init__(self, zone: Zone, service: Service, gate: GateConfig) -> None:
        self.zone = zone
        self.service = service
        self.gate = gate
        self.log = zone.log
        self.path = Path(gate.socket)
        self.uid = gate.uid if gate.uid is not None else os.geteuid()
        lim = zone.config.limits
        self.per_principal = PerPrincipal(lim.max_connections_per_principal)
        self.running = 0
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._keeping: asyncio.Task[None] | None = None
        self._keys_text: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen, and write sshd's keys file; StartupError naming what is wrong."""
        try:
            # Refused now, not key by key every few seconds: a path sshd cannot quote.
            authorized_line(forced_argv(str(self.path)), "ssh-ed25519", b"k")
            self.path.parent.mkdir(parents=True, exist_ok=True)  # /var/run is a tmpfs
            if self.path.is_socket():
                self.path.unlink()  # a stale socket of an earlier run
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o177)  # 0600 from the start: nobody else connects in between
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old)
            if self.uid != os.geteuid():
                os.chown(self.path, self.uid, -1)
            sock.listen(128)
            sock.setblocking(False)
            self._sock = sock
            await self.write_keys()  # before the first login
        except (OSError, GateError) as exc:
            raise StartupError(f"gate: {exc}") from exc
        self._accepting = asyncio.create_task(self._accept(sock), name="gate-accept")
        self._keeping = asyncio.create_task(self._keep_keys(), name="gate-keys")

    def keys_text(self) -> tuple[str, list[str]]:
        """sshd's ``authorized_keys`` for the keys trusted now, each forced to the gate;
        and the fingerprints of keys left out (a key type sshd could not be given)."""
        argv = forced_argv(str(self.path))
        lines: dict[bytes, str] = {}
        skipped: list[str] = []
        for k in self.zone.trusted_keys():
            try:
                lines.setdefault(k.key_data,
                                 authorized_line(argv, k.public_key.split()[0], k.key_data))
            except GateError:
                skipped.append(k.fingerprint)
        head = "# Written by snapperd from the keys it trusts ([gate]); do not edit.\n"
        return head + "".join(lines.values()), skipped

    async def write_keys(self) -> None:
        """Rewrite sshd's file when the trusted keys changed (atomically: sshd reads it
        at each login)."""
        text, skipped = self.keys_text()
        if text == self._keys_text:
            return
        path = self.gate.authorized_keys
        await asyncio.to_thread(write_atomically, path, text.encode(), 0o644)
        self._keys_text = text
        self.log.info("gate keys written", extra={
            "path": str(path), "keys": text.count("\n") - 1, "left_out": skipped})

    async def _keep_keys(self) -> None:
        while True:
            await asyncio.sleep(KEYS_EVERY)
            try:
                await self.write_keys()
            except OSError as exc:  # a full or read-only disk: logins use the old file
                self.log.error("gate keys not written", extra={"reason": str(exc)})

    async def close(self) -> None:
        """Stop accepting; commands in flight go on (the daemon's grace period)."""
        for task in (self._accepting, self._keeping):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
            with contextlib.suppress(OSError):
                self.path.unlink()

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(sock)
            task = asyncio.create_task(self._serve(conn), name="gate")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            conn.setblocking(False)
            if not self._peer_allowed(conn):
                return
            try:
                async with asyncio.timeout(self.zone.config.limits.login_timeout_seconds):
                    line, fds = await _receive_request(conn)
                request = Request.from_line(line)
            except (GateError, TimeoutError, OSError) as exc:
                self.log.warning("gate request refused", extra={"reason": str(exc)})
                return
            if len(fds) != 3:
                self.log.warning("gate run without its three descriptors",
                                 extra={"descriptors": len(fds)})
                return
            stdin, stdout, stderr = fds
            fds = []  # the session owns them now
            io = _FdIo(self.zone, stdin, stdout, stderr)
            try:
                await io.start()
            except (OSError, ValueError) as exc:
                io.write_stderr(protocol.error_line(GateRefused(
                    f"snapperd cannot use the gate's descriptors: {exc}")).encode())
                await io.close()
                await _answer(conn, {"status": 1})
                return
            status = await self._run(conn, request, io)
            await _answer(conn, {"status": status})
        except OSError:
            pass  # the gate went away: sshd's connection is gone, nothing to tell
        finally:
            for fd in fds:
                os.close(fd)
            conn.close()

    def _peer_allowed(self, conn: socket.socket) -> bool:
        if not hasattr(socket, "SO_PEERCRED"):
            return True  # illumos: the socket's owner and mode are the check
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _ = struct.unpack("3i", creds)
        if uid in (self.uid, 0):
            return True
        self.log.warning("gate connection from another user refused",
                         extra={"uid": uid, "pid": pid})
        return False

    async def _run(self, conn: socket.socket, request: Request, io: _FdIo) -> int:
        try:
            trusted = self.zone.key_for(request.key)
            if trusted is None:
                self.zone.metrics.auth_failures.labels("unknown_key").inc()
                raise GateRefused("the key is not trusted by this zone (any more)")
            principal = Principal.from_key(trusted, next(connection_numbers))
            lim = self.zone.config.limits
            if self.running >= lim.max_connections:
                raise TooManyConnections(f"this zone runs {lim.max_connections} gate "
                                         "commands, the most it takes; retry later")
            if not self.per_principal.take(principal.label):
                raise TooManyConnections(
                    f"{principal.label} already has {self.per_principal.cap} connections "
                    "open to this zone's gate, the most one client may")
        except SnapperError as err:
            self.zone.metrics.gate_commands.labels("refused").inc()
            io.write_stderr(protocol.error_line(err).encode())
            await io.close()
            return 1
        self.running += 1
        self.zone.metrics.gate_running.inc()
        self.zone.transfers.opened(principal.connection, principal.label, lambda _: None)
        watch = asyncio.create_task(_watch_gate(conn, io))
        try:
            status = await self.service.execute(principal, request.command, io)
        finally:
            watch.cancel()
            self.running -= 1
            self.zone.metrics.gate_running.dec()
            self.per_principal.give_back(principal.label)
            self.zone.transfers.release(principal.connection)
            await io.close()
        self.zone.metrics.gate_commands.labels("ok" if status == 0 else "failed").inc()
        return status


async def _receive_request(conn: socket.socket) -> tuple[bytes, list[int]]:
    """The request line and the descriptors sent with it."""
    buf = bytearray()
    fds: list[int] = []
    try:
        while b"\n" not in buf:
            await wait_ready(conn.fileno(), write=False)
            try:
                data, got, _, _ = socket.recv_fds(conn, MAX_LINE, 3)
            except BlockingIOError:
                continue
            for fd in got:  # not for the children snapperd starts (zfs receive, ssh)
                os.set_inheritable(fd, False)
            fds += got
            if not data:
                raise GateError("the gate closed before its request ended")
            buf += data
            if len(buf) > MAX_LINE:
                raise GateError("request too long")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return bytes(buf[: buf.index(b"\n")]), fds


async def _answer(conn: socket.socket, doc: dict[str, object]) -> None:
    await asyncio.get_running_loop().sock_sendall(conn, json.dumps(doc).encode() + b"\n")


async def _watch_gate(conn: socket.socket, io: _FdIo) -> None:
    """The gate process ends only after our answer: its socket closing first means
    it was killed (sshd's connection is gone), so the stream is cut, not ended."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError):
        while await loop.sock_recv(conn, 1):
            pass  # a gate says nothing more after its request
    io.gone(ClientGone("the gate's connection ended before the command did"))


class _Reading(asyncio.Protocol):
    """The channel's stdin (a pipe or socket from sshd) into the handler's Inbound."""

    def __init__(self, io: _FdIo) -> None:
        self.io = io

    def data_received(self, data: bytes) -> None:
        self.io.inbound.feed(data)

    def eof_received(self) -> bool:
        self.io.inbound.feed_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.io.gone(ClientGone(f"the gate's stdin failed: {exc}"))


class _Writing(asyncio.Protocol):
    """Flow control of the channel's stdout."""

    def __init__(self) -> None:
        self.writable = asyncio.Event()
        self.writable.set()
        self.closed = asyncio.get_running_loop().create_future()
        self.lost = False

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc is not None
        self.writable.set()
        if not self.closed.done():
            self.closed.set_result(None)


class _FdIo:
    """The handler's ``Io`` (``service.Io``) on the descriptors a gate passed."""

    def __init__(self, zone: Zone, stdin: int, stdout: int, stderr: int) -> None:
        self._fds = [stdin, stdout]  # until their transports own them
        self._stderr = stderr
        self._idle = zone.config.stream_idle_seconds
        os.set_blocking(stderr, False)
        self._reader: asyncio.ReadTransport | None = None
        self._writer: asyncio.WriteTransport | None = None
        self._out = _Writing()
        self._gone = False
        self._closed = False
        self._detached = False
        self.inbound = Inbound(self._pause, self._resume, idle_timeout=self._idle,
                               detach=self._detach)

    async def start(self) -> None:
        """Transports on stdin and stdout (a pipe or a socket each, as sshd made them)."""
        loop = asyncio.get_running_loop()
        stdin, stdout = self._fds
        self._reader, _ = await loop.connect_read_pipe(
            lambda: _Reading(self), os.fdopen(stdin, "rb", buffering=0, closefd=True))
        self._fds[0] = -1
        self._writer, _ = await loop.connect_write_pipe(
            lambda: self._out, os.fdopen(stdout, "wb", buffering=0, closefd=True))
        self._fds[1] = -1

    def gone(self, err: SnapperError) -> None:
        self._gone = True
        self.inbound.feed_error(err)
        self._out.writable.set()

    def _pause(self) -> None:
        if self._reader is not None and not self._reader.is_closing() and not self._detached:
            self._reader.pause_reading()

    def _resume(self) -> None:
        if self._reader is not None and not self._reader.is_closing() and not self._detached:
            self._reader.resume_reading()

    def _detach(self) -> int | None:
        """Stop reading stdin here for good; a descriptor of it for ``splice``. A
        read transport holds nothing back: every byte it read was fed already."""
        if self._reader is None or self._reader.is_closing():
            return None
        self._reader.pause_reading()
        self._detached = True
        return os.dup(self._reader.get_extra_info("pipe").fileno())

    def write(self, data: bytes) -> None:
        if self._gone or self._out.lost or self._writer is None or self._writer.is_closing():
            raise ClientGone("the client disconnected")
        self._writer.write(data)

    async def drain(self) -> None:
        await self._out.writable.wait()
        if self._gone or self._out.lost:
            raise ClientGone("the client disconnected")

    def stdout_pipe(self) -> int | None:
        """A duplicate of sshd's stdout pipe for ``splice``, when nothing written
        through the transport is still held (its buffer is empty)."""
        w = self._writer
        if w is None or w.is_closing() or w.get_write_buffer_size() or self._gone \
                or self._out.lost or not can_splice():
            return None
        return os.dup(w.get_extra_info("pipe").fileno())

    def write_stderr(self, data: bytes) -> None:
        # Error lines only, far below a pipe's buffer: never worth a transport.
        if self._stderr >= 0:
            with contextlib.suppress(OSError):
                os.write(self._stderr, data)

    async def close(self) -> None:
        """Flush stdout, then close every descriptor: sshd sees the output end."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._reader is not None:
                self._reader.close()
            if self._writer is not None:
                self._writer.close()  # after what is buffered is written
                try:
                    async with asyncio.timeout(self._idle):  # a client not reading
                        await self._out.closed
                except TimeoutError:
                    self._writer.abort()
        finally:
            for fd in (*self._fds, self._stderr):
                if fd >= 0:
                    os.close(fd)
            self._fds = [-1, -1]
            self._stderr = -1
