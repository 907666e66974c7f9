"""The endpoint over SSH: one connection to a snapper zone, its commands and streams.

``ZoneClient`` speaks the SSH grammar (``wire.protocol``) to a zone: small
commands (``run``), a push (``push_stream``: a local ``zfs send`` through
``stream.SendPump``, over this connection or, with ``openssh``, through
OpenSSH's ``ssh``: see ``push_stream``), and a pull (``pull``: the zone's ``send`` as a
``stream.Inbound`` that ``local.receive_stream`` takes, vetted like any
receive). A CN, a zone mirroring to its peer, and the tests all use it.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, TypeGuard, TypeVar

import asyncssh
from asyncssh.channel import SSHChannel

from snapper_zone.common.progress import NoProgress, Reporter
from snapper_zone.errors import (
    SnapperError,
)
from snapper_zone.transfer.sshmux import Lease, Masters
from snapper_zone.transfer.stream import (
    Channel,
    ClientGone,
    Inbound,
    PipeFlow,
    SendPump,
    SplicePump,
    can_splice,
    narrow_reads,
    pipe_inbound,
)
from snapper_zone.wire import Inventory, VmSnapshot
from snapper_zone.wire.protocol import (
    Abort,
    Command,
    Commit,
    Destroy,
    Features,
    Metadata,
    Receive,
    ResumeToken,
    Send,
    Snapshots,
    Whoami,
    format_command,
    parse_error_line,
)
from snapper_zone.zfs import proc
from snapper_zone.zfs.names import Dataset
from snapper_zone.zfs.zfs import SendSpec, Zfs, classify, parse_features

T = TypeVar("T")

log = logging.getLogger("snapper.cn")


STDERR_LIMIT = 64 * 1024
_USER = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")  # a login name ssh -l is given
# OpenSSH-compatible fast path (see shared/notes/ssh-throughput.md): AES-GCM
# first, no compression (VM disk streams barely compress; it costs CPU).
AES_GCM = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
ENCRYPTION_ALGS = (*AES_GCM, "chacha20-poly1305@openssh.com", "aes128-ctr", "aes256-ctr")
# Left out of ssh's key exchanges: OpenSSH 9.2's first choice, sntrup761x25519,
# costs ~64 ms of a ~290 ms login here (both ends compute it), a tenth of a
# 64 MiB push. Without it ssh takes the next in its own list: ML-KEM hybrid
# where it has one (OpenSSH >= 9.9: post-quantum and cheap), else curve25519,
# what an OpenSSH client gets from snapperd's own port anyway (asyncssh has no
# sntrup761). Both spellings; an alias this ssh does not know is ignored.
SLOW_KEX = ("sntrup761x25519-sha512@openssh.com", "sntrup761x25519-sha512")


# -- errors -------------------------------------------------------------------


class ZoneError(SnapperError):
    """A zone command failed; ``code`` and ``message`` are the zone's own."""

    def __init__(self, code: str, message: str, command: str = "",
                 exit_status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.command = command
        self.exit_status = exit_status

    def __str__(self) -> str:
        return f"zone {self.command.split(' ')[0] or 'command'}: {self.message}"


class ZoneUnreachable(SnapperError):
    """Could not connect or authenticate (network, host key, client key)."""

    code = "ZoneUnreachable"
    http_status = 503


def pinned_host_key(key: str | Path | asyncssh.SSHKey) -> Callable[
        [str, str, int | None], tuple[list[asyncssh.SSHKey], list[asyncssh.SSHKey],
                                      list[asyncssh.SSHKey]]]:
    """known_hosts for asyncssh that trusts exactly one host key, whatever the address.

    ``key`` is an ``SSHKey``, an OpenSSH public key line, or a ``.pub`` file.
    """
    if isinstance(key, asyncssh.SSHKey):
        pub = key
    else:
        text = str(key)
        if not text.startswith(("ssh-", "ecdsa-")):
            text = Path(text).read_text().strip()
        pub = asyncssh.import_public_key(text)

    def match(host: str, addr: str, port: int | None) -> tuple[
            list[asyncssh.SSHKey], list[asyncssh.SSHKey], list[asyncssh.SSHKey]]:
        return [pub], [], []

    return match


@dataclass(frozen=True)
class StreamResult:
    bytes: int
    seconds: float


class ExecSession(asyncssh.SSHClientSession[bytes]):
    """One exec channel; collects stderr/stdout (bounded) and the exit status.

    Data handling is delegated: ``on_data`` receives stdout bytes (restore),
    ``on_pause``/``on_resume`` follow the channel's write window (push).
    """

    def __init__(self) -> None:
        self.chan: asyncssh.SSHClientChannel[bytes] | None = None
        self.stderr = bytearray()
        self.stdout = bytearray()
        self.exit_status: int | None = None
        self.eof = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.on_data: Callable[[bytes], None] | None = None
        self.on_eof: Callable[[], None] | None = None
        self.on_pause: Callable[[], None] | None = None
        self.on_resume: Callable[[], None] | None = None

    def connection_made(self, chan: SSHChannel[bytes]) -> None:
        assert isinstance(chan, asyncssh.SSHClientChannel)
        self.chan = chan

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            _bounded_append(self.stderr, data)
        elif self.on_data is not None:
            self.on_data(data)
        else:
            _bounded_append(self.stdout, data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.on_eof is not None:
            self.on_eof()
        return False

    def pause_writing(self) -> None:
        if self.on_pause is not None:
            self.on_pause()

    def resume_writing(self) -> None:
        if self.on_resume is not None:
            self.on_resume()

    def exit_status_received(self, status: int) -> None:
        self.exit_status = status

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            if exc is None:
                self.closed.set_result(None)
            else:
                self.closed.set_exception(exc)

    def error(self, command: str) -> ZoneError:
        status = self.exit_status
        if status is None:
            return ZoneError("ConnectionLost", "the zone closed the channel without an "
                             "exit status", command)
        code, message = parse_error_line(self.stderr.decode("utf-8", "replace"))
        return ZoneError(code, message or f"exit status {status}", command, status)


def _is_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _bounded_append(buf: bytearray, data: bytes) -> None:
    buf += data
    if len(buf) > STDERR_LIMIT:
        del buf[: len(buf) - STDERR_LIMIT]


class _SshFailed(ZoneUnreachable):
    """OpenSSH's ssh exited 255: it could not connect, authenticate or trust the zone."""


def _keys_for(known_hosts: Path, host: str, port: int) -> str:
    """The lines of ``known_hosts`` for ``host``:``port``, re-keyed to the alias
    ``snapper-zone`` (hashed names and patterns are asyncssh's to match)."""
    try:
        trusted = asyncssh.read_known_hosts(str(known_hosts))
    except (OSError, ValueError):
        return ""
    keys, _, _, _, _, _, _ = trusted.match(host, "", port)
    return "".join("snapper-zone " + k.export_public_key().decode().strip() + "\n"
                   for k in keys)


async def _send_to_pipe(zfs: Zfs, spec: SendSpec, undo: Callable[[], Awaitable[None]]
                        ) -> tuple[proc.Spawned, int]:
    """``zfs send`` into a new widened pipe: the child and the pipe's read end. On a
    failure to start nothing is left running (``undo`` ends the carrier)."""
    try:
        return await proc.child_on_pipe(lambda w: zfs.send(spec, stdout=w), child_writes=True)
    except BaseException:
        await undo()
        raise


async def _pumped_send(zfs: Zfs, spec: SendSpec, pump: SendPump,
                       undo: Callable[[], Awaitable[None]]
                       ) -> tuple[proc.Spawned, SendPump, asyncio.ReadTransport]:
    """``zfs send`` into a pipe that ``pump`` reads, for either carrier of a pushed
    stream; on a failure to start, nothing is left running."""
    sender, r = await _send_to_pipe(zfs, spec, undo)
    try:
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: pump, os.fdopen(r, "rb", buffering=0))
    except BaseException:
        os.close(r)
        await sender.abort()
        await undo()
        raise
    return sender, pump, transport


_SEND_GRACE = 10.0  # seconds a send may take to exit once its reader is gone


class _Closable(Protocol):
    def close(self) -> None: ...


async def _drive_push(sender: proc.Spawned, pump: SendPump | SplicePump, transport: _Closable,
                      carrier: asyncio.Future[T], eof: Callable[[], None],
                      teardown: Callable[[], Awaitable[None]]
                      ) -> tuple[proc.Completed, T, bool]:
    """Run a pushed stream to its end on either carrier: (the send's result, the
    carrier's, whether the zone hung up first).

    Either the stream ends (``eof`` passes that on), or the carrier ends first:
    the zone refused the stream, the link failed, or the zone's receive ended
    at the stream's last record before the pump saw the pipe's end. Then the
    pump stops reading (a send still writing gets EPIPE; one that wrote all
    its stream exits as it would) and a send still there after a grace is
    killed. Cancelled (CN killed, Ctrl-C) or failed: no child is left behind."""
    hung_up = False
    try:
        waits: list[asyncio.Future[Any]] = [pump.done, carrier]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if pump.done.done() and pump.done.exception() is None:
            eof()
            sent = await sender.wait()
        else:
            hung_up = True
            transport.close()
            exiting = asyncio.ensure_future(sender.wait())
            await asyncio.wait([exiting], timeout=_SEND_GRACE)
            if not exiting.done():
                sender.kill()
            sent = await exiting
        ended = await carrier
    except BaseException:
        transport.close()
        await sender.abort()
        await teardown()
        raise
    return sent, ended, hung_up


def _push_result(err: ZoneError | None, sent: proc.Completed, hung_up: bool,
                 pump: SendPump | SplicePump, started: float) -> StreamResult:
    """A pushed stream's outcome, raising the most telling error: when the zone saw
    a truncated stream because our send failed, the send's own error says why."""
    if err is not None:
        if not sent.ok and not hung_up:
            raise classify(sent.argv, sent.stderr, sent.returncode) from err
        raise err
    if not sent.ok:
        raise classify(sent.argv, sent.stderr, sent.returncode)
    return StreamResult(pump.bytes, time.monotonic() - started)


class SshChild:
    """A zone command run by a child ``ssh`` (OpenSSH), one end of it a pipe of ours.

    ``pipe``: the write end of its stdin (closing it is the stream's EOF), or
    with ``reads`` the read end of its stdout (the stream it brings);
    ``exited``: its exit, as ``proc.Completed``. The known_hosts file naming
    the zone's host key lives until ``cleanup``.
    """

    def __init__(self, child: proc.Spawned, pipe: int,
                 tmp: tempfile.TemporaryDirectory[str]) -> None:
        self.child = child
        self.pipe = pipe
        self.exited: asyncio.Future[proc.Completed] = asyncio.ensure_future(child.wait())
        self._tmp = tmp
        self.lease: Lease | None = None  # the logged-in master it runs on, if any

    @classmethod
    async def start(cls, argv: Callable[[Path], list[str]], known: str, *,
                    reads: bool = False) -> SshChild:
        """``argv(known_hosts)`` started with ``known`` written to that file."""
        tmp = tempfile.TemporaryDirectory(prefix="snapper-ssh-")
        try:
            known_hosts = Path(tmp.name) / "known_hosts"
            await asyncio.to_thread(known_hosts.write_text, known)
            if reads:
                child, fd = await proc.child_on_pipe(
                    lambda w: proc.spawn(argv(known_hosts), stdout=w), child_writes=True)
            else:
                child, fd = await proc.child_on_pipe(
                    lambda r: proc.spawn(argv(known_hosts), stdin=r), child_writes=False)
        except BaseException:
            tmp.cleanup()
            raise
        return cls(child, fd, tmp)

    def kill(self) -> None:
        """End it now: the zone sees the stream cut, never a clean end."""
        if not self.exited.done():
            self.child.kill()

    def cleanup(self) -> None:
        if not self.exited.done():
            self.exited.cancel()
        self._tmp.cleanup()
        if self.lease is not None:
            self.lease.release()


def _carrier_failed(done: proc.Completed, endpoint: str, what: str, *,
                    gate: bool) -> _SshFailed | None:
    """Whether a child ssh, not the zone, failed the command: ssh's own failure
    (exit 255: connect, auth, host key) or, through a gate, its snapperd end
    not answering (GateUnavailable, said before a byte is read). The stream may
    then go another way."""
    if done.returncode == 255:
        return _SshFailed(f"{endpoint}: {what} (ssh): {done.stderr.strip()[-1000:]}")
    code, message = parse_error_line(done.stderr)
    if gate and code == "GateUnavailable":
        return _SshFailed(f"{endpoint}: {what} (gate): {message}")
    return None


def _zone_error(done: proc.Completed, line: str) -> ZoneError:
    """The zone's error for a command a child ssh ran, from its JSON stderr line."""
    code, message = parse_error_line(done.stderr)
    return ZoneError(code, message or f"exit status {done.returncode}", line, done.returncode)


_SSH_EXIT_WAIT = 10.0  # seconds for an ssh whose stream ended to say how it went


async def _exit_soon(sc: SshChild, timeout: float) -> proc.Completed | None:
    """``sc``'s exit if it comes within ``timeout`` seconds, else None (killed)."""
    try:
        async with asyncio.timeout(timeout):
            return await asyncio.shield(sc.exited)
    except TimeoutError:
        sc.kill()
        return None


class ZoneClient:
    """One SSH connection to a snapper zone. Use ``async with ZoneClient(...)``.

    ``openssh``: the path of OpenSSH's ``ssh``, to carry pushed streams
    (``push_stream``) when the client key is a file; None: every byte goes
    over this connection (asyncssh). ``keep_logins``: how many logged-in
    ``ssh`` masters to keep per port for those streams (``sshmux``), so that
    each does not log in again; 0: each ``ssh`` logs in by itself.
    ``on_login(how)``: told of each login an ``ssh`` makes, a master's
    ("master") or a stream's own ("alone").
    """

    def __init__(self, host: str, port: int, client_key: str | Path | asyncssh.SSHKey, *,
                 known_hosts: str | Path | None = None,
                 host_key: str | Path | asyncssh.SSHKey | None = None,
                 username: str = "snapper", connect_timeout: float = 30.0,
                 openssh: str | None = None, use_gate: bool = True,
                 openssh_gate_only: bool = False, keep_logins: int = 0,
                 on_login: Callable[[str], None] | None = None) -> None:
        if known_hosts is not None and host_key is not None:
            raise ValueError("give a known_hosts file or a pinned host key, not both")
        self.openssh = openssh if not isinstance(client_key, asyncssh.SSHKey) else None
        self.host = host
        self.port = port
        self.client_key = client_key
        self.known_hosts = known_hosts
        self.host_key = host_key
        self.username = username
        self.connect_timeout = connect_timeout
        self.conn: asyncssh.SSHClientConnection | None = None
        self._features: frozenset[str] | None = None
        # Where the zone's sshd takes pushed streams (the gate), per ``features``,
        # for streams of at least stream_port_min_bytes; ``use_gate``: whether to.
        self.use_gate = use_gate
        # ssh carries streams through a gate only; else they stay on this connection
        # (a zone's links to its peers: bench/zone_copy.py).
        self.openssh_gate_only = openssh_gate_only
        self.stream_port: int | None = None
        self.stream_port_min_bytes = 0
        self.stream_user: str | None = None  # whom the gate's sshd logs us in as
        self._whoami: tuple[object, int | None] | None = None  # (connection, its number)
        self.keep_logins = keep_logins
        self.on_login = on_login
        self._masters: dict[int, Masters] = {}  # per port

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    async def connect(self) -> Self:
        known: Any
        if self.host_key is not None:
            known = pinned_host_key(self.host_key)
        elif self.known_hosts is not None:
            known = str(self.known_hosts)
        else:
            known = ()  # asyncssh's default: ~/.ssh/known_hosts
        key = self.client_key
        keys: Any = [key if isinstance(key, asyncssh.SSHKey) else str(key)]
        try:
            self.conn = await asyncssh.connect(
                self.host, self.port, username=self.username, client_keys=keys,
                known_hosts=known, agent_path=None, config=None,
                encryption_algs=list(ENCRYPTION_ALGS), compression_algs=None,
                connect_timeout=self.connect_timeout)
            narrow_reads(self.conn)  # what the zone sends (a restore, a pull) arrives here
        except asyncssh.HostKeyNotVerifiable as exc:
            raise ZoneUnreachable(f"{self.endpoint}: host key not trusted: {exc.reason}") \
                from exc
        except asyncssh.PermissionDenied as exc:
            raise ZoneUnreachable(f"{self.endpoint}: our key was refused: {exc.reason}") \
                from exc
        except asyncssh.DisconnectError as exc:
            # A zone at a limit says which in the disconnect reason (a JSON error line).
            code, message = parse_error_line(exc.reason)
            if code == "RemoteError":
                raise ZoneUnreachable(f"{self.endpoint}: cannot connect: {exc}") from exc
            raise ZoneError(code, message, "connect") from exc
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            raise ZoneUnreachable(f"{self.endpoint}: cannot connect: {exc}") from exc
        return self

    async def close(self) -> None:
        masters, self._masters = self._masters, {}
        for m in masters.values():
            await m.close()
        if self.conn is not None:
            self.conn.close()
            await self.conn.wait_closed()
            self.conn = None

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def _conn(self) -> asyncssh.SSHClientConnection:
        if self.conn is None:
            raise RuntimeError("ZoneClient is not connected")
        return self.conn

    async def _open(self, line: str) -> tuple[asyncssh.SSHClientChannel[bytes], ExecSession]:
        try:
            chan, session = await self._conn().create_session(ExecSession, line, encoding=None)
        except asyncssh.ChannelOpenError as exc:
            code, message = parse_error_line(exc.reason)  # a zone at its channel limit
            if code == "RemoteError":
                raise ZoneUnreachable(f"{self.endpoint}: {line.split()[0]}: {exc}") from exc
            raise ZoneError(code, message, line) from exc
        except (OSError, asyncssh.Error) as exc:
            raise ZoneUnreachable(f"{self.endpoint}: {line.split()[0]}: {exc}") from exc
        assert isinstance(session, ExecSession)
        return chan, session

    async def open_channel(self, cmd: Command) -> tuple[asyncssh.SSHClientChannel[bytes],
                                                        ExecSession]:
        """An exec channel for ``cmd`` whose bytes the caller moves itself (a tee)."""
        return await self._open(format_command(cmd))

    async def run(self, cmd: Command | str, stdin_bytes: bytes | None = None) -> bytes:
        """Run a small command; its stdout, or a ZoneError from its JSON stderr."""
        line = cmd if isinstance(cmd, str) else format_command(cmd)
        chan, session = await self._open(line)
        if stdin_bytes:
            chan.write(stdin_bytes)
        chan.write_eof()
        try:
            await session.closed
        except (OSError, asyncssh.Error) as exc:
            raise ZoneUnreachable(f"{self.endpoint}: {line.split()[0]}: {exc}") from exc
        if session.exit_status != 0:
            raise session.error(line)
        return bytes(session.stdout)

    def stream_channel(self, chan: asyncssh.SSHClientChannel[bytes]) -> Channel:
        """Where a pushed stream's bytes are written: the channel itself.

        A subclass may wrap it; the soak and the tests cut streams here
        (``soak.faults.CuttingZoneClient``), as a crash would.
        """
        return chan

    async def push_stream(self, cmd: Receive, spec: SendSpec, zfs: Zfs,
                          progress: Reporter | None = None, *,
                          bwlimit: float | None = None) -> StreamResult:
        """``zfs send SPEC`` → the zone's ``receive``; raises the most telling error.

        ``bwlimit`` (bytes/s) paces the stream, so a CN's pushes leave room
        for its VMs' own traffic. The send child writes into a kernel pipe
        that ``stream.SendPump`` reads; a full SSH window stops the reading,
        so ``zfs send`` blocks and memory stays bounded.

        With ``openssh`` set, the stream goes through a child ``ssh`` (its own
        connection, same key, same host key) instead: OpenSSH's client
        encrypts at about twice the rate of asyncssh's in Python
        (bench/cn_path.py). The pump still reads ``zfs send`` (counting,
        pacing), writing into ``ssh``'s stdin pipe. Its parts are bound to this
        connection (``--bind``, from ``whoami``): they end with it, as with
        ``--session``, and the zone keeps it from idling while the stream runs;
        the commit comes over it. An
        ``ssh`` that cannot connect (exit 255) while this connection works
        leaves this stream and the next ones to asyncssh.

        A zone with an sshd gate names its port in ``features``: a stream
        estimated at its ``stream_port_min_bytes`` or more (or of unknown
        size) goes there, decrypted by the zone's sshd rather than snapperd
        (docs/data-plane.md); a gate that refuses us leaves the rest of this
        connection's streams to snapperd's own port.
        """
        if self.openssh is not None:
            await self.features()  # learns the gate's port, if the zone has one
        # Gate-only and no gate: no ssh, so no known_hosts text either.
        if self.openssh is not None and (not self.openssh_gate_only or self.stream_port) \
                and (known := await self._known_hosts_text()):
            if (gate := self.gate_port(cmd.size)) is not None:
                try:
                    return await self._push_openssh(known, cmd, spec, zfs,
                                                    progress or NoProgress(), bwlimit, gate)
                except _SshFailed as exc:
                    self.gate_refused(exc.message)
            try:
                if not self.openssh_gate_only:
                    return await self._push_openssh(known, cmd, spec, zfs,
                                                    progress or NoProgress(), bwlimit,
                                                    self.port)
            except _SshFailed as exc:
                # Our own connection to the zone works, so it is this ssh that
                # does not (an old client, options or cipher it lacks): the rest
                # of this connection's streams go over asyncssh, this one first.
                log.warning("%s: ssh could not carry the stream (%s); using asyncssh",
                            self.endpoint, exc.message)
                self.openssh = None
        progress = progress or NoProgress()
        line = format_command(cmd)
        chan, session = await self._open(line)

        async def undo() -> None:
            chan.close()

        sender, pump, transport = await _pumped_send(
            zfs, spec, SendPump(self.stream_channel(chan), progress.advance, bwlimit), undo)
        started = time.monotonic()
        session.on_pause = lambda: pump.hold("window")
        session.on_resume = lambda: pump.release("window")

        async def teardown() -> None:
            chan.close()

        try:
            sent, _, hung_up = await _drive_push(sender, pump, transport, session.closed,
                                                 chan.write_eof, teardown)
        except (OSError, asyncssh.Error) as exc:
            raise ZoneUnreachable(f"{self.endpoint}: receive: {exc}") from exc
        return _push_result(session.error(line) if session.exit_status != 0 else None,
                            sent, hung_up, pump, started)

    def openssh_argv(self, ssh: str, line: str, known_hosts: Path,
                     port: int | None = None, *, mux: Path | None = None,
                     master: bool = False) -> list[str]:
        """``ssh`` running ``line`` on the zone (at ``port``, else snapperd's): this
        client's key and host key only (no user config or agent), AES-GCM, no
        compression, no sntrup761 key exchange (``SLOW_KEX``). ``mux``: the
        control socket of a logged-in master to run on (``sshmux``), or with
        ``master`` to be that master (no command); else no multiplexing."""
        key = self.client_key
        assert not isinstance(key, asyncssh.SSHKey)
        gate = port is not None and port == self.stream_port
        user = self.stream_user or self.username if gate else self.username
        if mux is None:
            control = ["-o", "ControlPath=none"]
        else:
            # ssh expands % in the path; ours has none, but never let it.
            control = ["-o", f"ControlPath={str(mux).replace('%', '%%')}",
                       "-o", "ControlMaster=yes" if master else "ControlMaster=no"]
            if master:
                control += ["-o", "ControlPersist=no", "-N"]
        return [ssh, "-F", "/dev/null", "-T", "-x", "-a",
                "-c", ",".join(AES_GCM), "-o", f"KexAlgorithms=-{','.join(SLOW_KEX)}",
                "-o", "Compression=no", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-o", "IdentityAgent=none", *control,
                "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "HostKeyAlias=snapper-zone",
                "-o", f"ConnectTimeout={max(1, round(self.connect_timeout))}",
                "-o", "ServerAliveInterval=30", "-o", "ServerAliveCountMax=4",
                "-i", str(key), "-p", str(port or self.port), "-l", user, "--",
                self.host, *([] if master else [line])]

    async def _ssh_child(self, line: str, port: int, known: str, *,
                         reads: bool = False) -> SshChild:
        """``line`` run by a child ``ssh`` at ``port`` (``SshChild.start``), on a
        logged-in master when this client keeps them and one is free."""
        ssh = self.openssh
        assert ssh is not None
        lease: Lease | None = None
        if self.keep_logins > 0:
            masters = self._masters.get(port)
            if masters is None or masters.known != known:  # the zone's key changed
                if masters is not None:
                    await masters.close()
                masters = self._masters[port] = Masters(
                    lambda path, kh: self.openssh_argv(ssh, "", kh, port, mux=path,
                                                       master=True),
                    known, size=self.keep_logins,
                    ready_timeout=self.connect_timeout + 5.0, on_start=self._master_started)
            lease = await masters.lease()
        if lease is None and self.on_login is not None:
            self.on_login("alone")
        mux = None if lease is None else lease.path
        try:
            sc = await SshChild.start(
                lambda kh: self.openssh_argv(ssh, line, kh, port, mux=mux), known, reads=reads)
        except BaseException:
            if lease is not None:
                lease.release()
            raise
        sc.lease = lease
        return sc

    def _master_started(self) -> None:
        if self.on_login is not None:
            self.on_login("master")

    async def _known_hosts_text(self) -> str:
        """A known_hosts for ``ssh`` naming exactly the zone's trusted host keys,
        under the alias it is told to check; "" when there is none to name (a
        certificate authority: then the stream goes over asyncssh)."""
        key = self.host_key
        if key is None:
            # A known_hosts file (or the default) lists the zone under its address.
            source = Path(self.known_hosts) if self.known_hosts is not None else \
                Path.home() / ".ssh" / "known_hosts"
            return await asyncio.to_thread(_keys_for, source, self.host, self.port)
        if isinstance(key, asyncssh.SSHKey):
            text = key.export_public_key().decode()
        else:
            text = str(key)
            if not text.startswith(("ssh-", "ecdsa-")):
                text = await asyncio.to_thread(Path(text).read_text)
        return "snapper-zone " + " ".join(text.strip().split()[:2]) + "\n"

    async def _bound_line(self, cmd: Receive) -> str:
        # The parts end with this (asyncssh) connection, which commits them and
        # which the zone keeps from idling meanwhile: no lease left by a stream
        # that died.
        return format_command(dataclasses.replace(cmd, session=False,
                                                  bind=await self.connection_number()))

    def gate_port(self, size: int | None) -> int | None:
        """The zone's gate, if a stream of ``size`` bytes (None: unknown) goes there
        (``features`` asked)."""
        if self.openssh is None or (size is not None and size < self.stream_port_min_bytes):
            return None
        return self.stream_port

    def gate_refused(self, why: str) -> None:
        """The zone's sshd does not take us (not set up for the gate, or down): its
        own SSH server carries this connection's streams from now on."""
        log.warning("%s: the zone's sshd (port %s) could not carry the stream (%s); "
                    "using snapperd's own port", self.endpoint, self.stream_port, why)
        self.stream_port = None

    async def ssh_receive(self, cmd: Receive) -> SshChild | None:
        """``cmd`` run on the zone's gate by a child ``ssh``, its stdin for the caller
        to fill (a pipelined mirror's tee); None when this client has no ``ssh``, the
        zone no gate, the stream is under the gate's size, or there is no host key
        to name (the caller then uses this connection)."""
        if self.openssh is None:
            return None
        await self.features()
        port = self.gate_port(cmd.size)
        if port is None or not (known := await self._known_hosts_text()):
            return None
        return await self._ssh_child(await self._bound_line(cmd), port, known)

    async def _push_openssh(self, known: str, cmd: Receive, spec: SendSpec,
                            zfs: Zfs, progress: Reporter,
                            bwlimit: float | None, port: int) -> StreamResult:
        """``push_stream`` through a child ``ssh``: zfs send -> pump -> ssh's stdin."""
        line = await self._bound_line(cmd)
        loop = asyncio.get_running_loop()
        sc = await self._ssh_child(line, port, known)
        try:
            child, w = sc.child, sc.pipe
            pump: SendPump | SplicePump
            transport: _Closable
            out: _Closable  # ssh's stdin: closing it is the stream's EOF

            if can_splice():
                async def end_ssh() -> None:
                    os.close(w)
                    await child.abort()

                # zfs send's pipe into ssh's in the kernel (Linux): no copy in Python.
                sender, r = await _send_to_pipe(zfs, spec, end_ssh)
                pump = SplicePump(r, w, progress.advance, bwlimit)
                transport = out = pump
            else:
                flow = PipeFlow()
                try:
                    to_pipe, _ = await loop.connect_write_pipe(
                        lambda: flow, os.fdopen(w, "wb", buffering=0))
                except BaseException:
                    os.close(w)
                    await child.abort()
                    raise
                out = to_pipe

                async def undo() -> None:
                    to_pipe.close()
                    await child.abort()

                flow.pump = SendPump(to_pipe, progress.advance, bwlimit)
                sender, pump, transport = await _pumped_send(zfs, spec, flow.pump, undo)
            started = time.monotonic()
            exited = sc.exited

            async def teardown() -> None:
                out.close()
                exited.cancel()
                await child.abort()

            # EOF: closing ssh's stdin (the pump's end of it) ends the zone's receive.
            sent, done, hung_up = await _drive_push(sender, pump, transport, exited,
                                                    out.close, teardown)
        finally:
            sc.cleanup()
        # Not this zone's refusal of the stream: its own port gets it.
        if (failed := _carrier_failed(done, self.endpoint, "receive",
                                      gate=port != self.port)) is not None:
            raise failed
        return _push_result(None if done.ok else _zone_error(done, line), sent, hung_up,
                            pump, started)

    async def push_chunks(self, cmd: Receive, chunks: AsyncIterator[bytes],
                          progress: Reporter | None = None) -> StreamResult:
        """A stream that is already bytes (an export file) → the zone's ``receive``.

        ``push_stream``'s rules without a ``zfs send``: the next chunk is
        taken only while the SSH window is open, and a zone that ends the
        channel first (it refused the stream) stops the sending; its error is
        raised.
        """
        progress = progress or NoProgress()
        line = format_command(cmd)
        chan, session = await self._open(line)
        writable = asyncio.Event()
        writable.set()
        session.on_pause = writable.clear
        session.on_resume = writable.set
        started = time.monotonic()
        sent = 0
        try:
            async for chunk in chunks:
                if not writable.is_set():
                    opened: asyncio.Future[Any] = asyncio.ensure_future(writable.wait())
                    try:
                        await asyncio.wait([opened, session.closed],
                                           return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        opened.cancel()
                if session.closed.done():
                    break  # the zone hung up: its exit status says why
                chan.write(chunk)
                sent += len(chunk)
                progress.advance(len(chunk))
            else:
                chan.write_eof()
            try:
                await session.closed
            except (OSError, asyncssh.Error) as exc:
                raise ZoneUnreachable(f"{self.endpoint}: receive: {exc}") from exc
        except BaseException:
            chan.close()
            raise
        if session.exit_status != 0:
            raise session.error(line)
        return StreamResult(sent, time.monotonic() - started)

    async def pull(self, cmd: Send, into: Callable[[Inbound], Awaitable[T]], *,
                   size: int | None = None) -> T:
        """Run the zone's ``send`` and hand its stream to ``into`` (a vetted receive).

        When the stream is cut the zone's own error is raised if it gave one;
        after ``into`` the zone must agree it sent a whole stream (exit 0).
        ``size``: the stream's expected bytes, when known; one at least the
        zone's gate's ``min_bytes`` comes through its gate with OpenSSH's
        ``ssh`` (decrypted by ssh, not in Python), this connection otherwise,
        or when the gate does not take us.
        """
        if size is not None and self.openssh is not None:
            await self.features()
            port = self.gate_port(size)
            if port is not None and (known := await self._known_hosts_text()):
                try:
                    return await self._pull_ssh(cmd, into, port, known)
                except _SshFailed as exc:
                    self.gate_refused(exc.message)
        source, session = await self._open_send(cmd)
        try:
            got = await into(source)
        except ClientGone as exc:
            # The zone's send ended early: its own error says why.
            with contextlib.suppress(OSError, asyncssh.Error):
                await session.closed
            if session.exit_status not in (0, None):
                raise session.error(format_command(cmd)) from exc
            raise ZoneUnreachable(f"{self.endpoint}: send: {exc.message}") from exc
        except BaseException:
            if session.chan is not None:
                session.chan.close()
            raise
        await self._finish_send(cmd, session)
        return got

    async def _pull_ssh(self, cmd: Send, into: Callable[[Inbound], Awaitable[T]], port: int,
                        known: str) -> T:
        """``pull`` through the zone's gate: ssh's stdout is the stream, spliced into
        ``zfs receive`` in the kernel where it can be (Linux)."""
        line = format_command(cmd)
        sc = await self._ssh_child(line, port, known, reads=True)
        transport: asyncio.ReadTransport | None = None
        try:
            source, transport = await pipe_inbound(sc.pipe)
            try:
                got = await into(source)
            except BaseException as exc:
                done = await _exit_soon(sc, _SSH_EXIT_WAIT)
                if done is not None and not source.fed and (failed := _carrier_failed(
                        done, self.endpoint, "send", gate=True)) is not None:
                    raise failed from exc  # before any byte: the channel may carry it
                if done is not None and done.returncode not in (0, None) and \
                        isinstance(exc, (SnapperError, OSError)):
                    # The zone's own reason for a cut stream, when it gave one.
                    raise _zone_error(done, line) from exc
                raise
            done = await _exit_soon(sc, _SSH_EXIT_WAIT)
            if done is None:
                raise ZoneUnreachable(f"{self.endpoint}: send: ssh did not exit after the "
                                      "stream")
            if not done.ok:  # the zone must agree it sent a whole stream
                raise _zone_error(done, line)
            return got
        finally:
            if transport is not None:
                transport.close()
            sc.kill()
            sc.cleanup()

    async def _open_send(self, cmd: Send) -> tuple[Inbound, ExecSession]:
        """Start the zone's ``send``; its stream as an ``Inbound`` to receive from.

        The channel's data feeds the Inbound; when the receive's pipe is full
        the channel stops reading, the SSH window closes and the zone's
        ``zfs send`` blocks. A channel closed before EOF is a cut stream.
        """
        line = format_command(cmd)
        chan, session = await self._open(line)
        source = Inbound(chan.pause_reading, chan.resume_reading)
        endpoint = self.endpoint

        def closed(fut: asyncio.Future[None]) -> None:
            # The zone may close without EOF: its exit status says whether the
            # stream ended or was cut.
            why = fut.exception() if not fut.cancelled() else None
            if why is None and session.exit_status == 0:
                source.feed_eof()
            else:
                source.feed_error(ClientGone(f"{endpoint}: send ended before its stream "
                                             f"did: {why or session.error(line)}"))

        session.on_data = source.feed
        session.on_eof = source.feed_eof
        if session.stdout:  # whatever arrived with the exec reply
            source.feed(bytes(session.stdout))
            session.stdout.clear()
        if session.eof:
            source.feed_eof()
        session.closed.add_done_callback(closed)
        chan.write_eof()
        return source, session

    async def _finish_send(self, cmd: Send, session: ExecSession) -> None:
        """After a pull: the zone must agree it sent a whole stream (exit 0)."""
        chan = session.chan
        if not session.closed.done() and chan is not None:
            chan.close()  # our receive is done; stop a send still running
        try:
            await session.closed
        except (OSError, asyncssh.Error) as exc:
            raise ZoneUnreachable(f"{self.endpoint}: send: {exc}") from exc
        if session.exit_status != 0:
            raise session.error(format_command(cmd))

    async def pull_stream(self, cmd: Send, target: Dataset, zfs: Zfs,
                          progress: Reporter | None = None, *, toguid: int | None = None,
                          force: bool = False, size: int | None = None) -> StreamResult:
        """The zone's ``send`` → ``zfs receive TARGET`` here, vetted like any receive.

        ``toguid``, when known, is the guid the stream must carry; ``size``, when
        known, its bytes (a large one comes through the zone's gate: ``pull``).
        """
        # The receive path (and its slots, quotas, metrics) is imported by the
        # commands that receive here: a CN's push starts without it.
        from snapper_zone.transfer.local import Expect, receive_stream

        progress = progress or NoProgress()
        started = time.monotonic()
        moved = 0

        def count(n: int) -> None:
            nonlocal moved
            moved += n
            progress.advance(n)

        await self.pull(cmd, lambda source: receive_stream(
            zfs, target, source, Expect(cmd.snapshot, cmd.base, toguid=toguid),
            on_bytes=count, resumable=False, force=force), size=size)
        return StreamResult(moved, time.monotonic() - started)

    # -- the small commands -----------------------------------------------------

    async def _newer_answer(self, cmd: Features | Whoami) -> object:
        """A newer command's JSON answer; {} from a zone that predates it (BadCommand)."""
        try:
            return json.loads(await self.run(cmd) or b"{}")
        except ZoneError as exc:
            if exc.code != "BadCommand":
                raise
            return {}
        except ValueError as exc:
            raise ZoneError("BadAnswer", f"{format_command(cmd)}: not JSON: {exc}") from None

    async def features(self) -> frozenset[str]:
        """The stream options the zone sends and receives (asked once per connection).

        A zone that predates ``features`` answers BadCommand: it takes plain
        streams only, so nothing encrypted is sent to it.
        """
        if self._features is None:
            doc = await self._newer_answer(Features())
            words = doc.get("features") if isinstance(doc, dict) else None
            self._features = parse_features(w for w in words or () if isinstance(w, str))
            if isinstance(doc, dict) and self.use_gate:
                port, least = doc.get("stream_port"), doc.get("stream_port_min_bytes", 0)
                if _is_int(port) and 0 < port < 65536 and _is_int(least) and least >= 0:
                    self.stream_port, self.stream_port_min_bytes = port, least
                    user = doc.get("stream_user")
                    if isinstance(user, str) and _USER.fullmatch(user):
                        self.stream_user = user
        return self._features

    async def connection_number(self) -> int | None:
        """This connection's number on the zone (``whoami``), for ``receive --bind``;
        None from a zone that predates it (a stream's parts then hold a lease)."""
        conn = self._conn()
        if self._whoami is None or self._whoami[0] is not conn:
            doc = await self._newer_answer(Whoami())
            n = doc.get("connection") if isinstance(doc, dict) else None
            self._whoami = (conn, n if _is_int(n) else None)
        return self._whoami[1]

    async def inventory(self, vm: str) -> Inventory:
        """The zone's whole ``snapshots VM`` answer (snapshots, datasets, tombstones,
        in use); ``wire.InvalidDocument`` when it is not one."""
        try:
            raw = json.loads(await self.run(Snapshots(vm)) or b"{}")
        except ValueError as exc:
            raise ZoneError("BadAnswer", f"snapshots: not JSON: {exc}") from None
        return Inventory.from_json(raw, vm=vm)  # a list: an older zone's snapshots alone

    async def snapshots(self, vm: str) -> list[VmSnapshot]:
        """The zone's VM snapshots, oldest first."""
        return list((await self.inventory(vm)).snapshots)

    async def resume_token(self, vm: str, dataset: str) -> str | None:
        text = (await self.run(ResumeToken(vm, dataset))).decode().strip()
        return None if text in ("", "-") else text

    async def abort(self, vm: str, dataset: str) -> None:
        await self.run(Abort(vm, dataset))

    async def commit(self, vm: str, snap: str, datasets: Sequence[str],
                     metadata: Mapping[str, Any] | None,
                     durability: str | None = None) -> dict[str, Any]:
        """Mark the VM snapshot complete; the zone's answer (which zones hold it)."""
        body = json.dumps(metadata).encode() if metadata is not None else b""
        out = await self.run(Commit(vm, snap, tuple(datasets), durability), body)
        try:
            doc = json.loads(out) if out.strip() else {}
        except ValueError:
            doc = {}
        return doc if isinstance(doc, dict) else {}

    async def destroy(self, vm: str, snap: str, dataset: str | None,
                      guid: int | None) -> None:
        await self.run(Destroy(vm, snap, dataset, guid))

    async def metadata(self, vm: str, snap: str) -> dict[str, Any] | None:
        out = (await self.run(Metadata(vm, snap))).strip()
        if not out or out == b"null":
            return None
        obj = json.loads(out)
        return obj if isinstance(obj, dict) else None

