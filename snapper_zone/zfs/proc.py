"""The one way Snapper runs a subprocess: argv only, never a shell.

``run`` is for short commands whose output fits in memory; ``spawn`` is for
streams (``zfs send``/``zfs receive``) whose stdin/stdout the caller wires to
a pipe, a socket or an SSH channel. Either way stderr is kept (bounded) so a
failure can say what the command said.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, TypeVar

from snapper_zone.errors import CommandNotFound, CommandTimeout

log = logging.getLogger("snapper.proc")

PIPE = asyncio.subprocess.PIPE
DEVNULL = asyncio.subprocess.DEVNULL
STDERR_LIMIT = 64 * 1024  # enough for any ZFS message; a chatty child cannot grow memory

# What may be handed to a child as stdin/stdout: a pipe to us, /dev/null, or an fd.
Wire = int | IO[bytes] | None


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _check_argv(argv: Sequence[str]) -> tuple[str, ...]:
    args = tuple(argv)
    if not args or not all(isinstance(a, str) for a in args):
        raise TypeError(f"argv must be a non-empty sequence of str, got {argv!r}")
    if any("\0" in a for a in args):
        raise ValueError("argv contains a NUL byte")
    return args


async def _collect_stderr(stream: asyncio.StreamReader) -> str:
    kept = bytearray()
    while chunk := await stream.read(65536):
        kept += chunk
        if len(kept) > STDERR_LIMIT:
            del kept[: len(kept) - STDERR_LIMIT]
    return kept.decode("utf-8", "replace")


async def run(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    timeout: float | None = 300.0,
    env: Mapping[str, str] | None = None,
) -> Completed:
    """Run a command to completion and return its output; never raises on exit status."""
    args = _check_argv(argv)
    start = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=PIPE if input is not None else DEVNULL,
            stdout=PIPE,
            stderr=PIPE,
            env=dict(env) if env is not None else None,
        )
    except FileNotFoundError as exc:
        raise CommandNotFound(f"{args[0]}: command not found") from exc
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(input)
    except (TimeoutError, asyncio.CancelledError) as exc:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if isinstance(exc, TimeoutError):
            raise CommandTimeout(f"{' '.join(args[:3])}: no answer in {timeout}s") from exc
        raise
    done = Completed(args, proc.returncode or 0, out, err.decode("utf-8", "replace"),
                     time.monotonic() - start)
    log.debug("ran %s rc=%d in %.3fs", " ".join(args), done.returncode, done.seconds)
    return done


class Spawned:
    """A running streaming child. ``wait()`` returns its Completed (stdout empty)."""

    def __init__(self, argv: tuple[str, ...], proc: asyncio.subprocess.Process) -> None:
        self.argv = argv
        self.proc = proc
        self.started = time.monotonic()
        assert proc.stderr is not None
        self._stderr = asyncio.ensure_future(_collect_stderr(proc.stderr))

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stdin(self) -> asyncio.StreamWriter:
        if self.proc.stdin is None:
            raise RuntimeError(f"{self.argv[0]} was not spawned with stdin=PIPE")
        return self.proc.stdin

    @property
    def stdout(self) -> asyncio.StreamReader:
        if self.proc.stdout is None:
            raise RuntimeError(f"{self.argv[0]} was not spawned with stdout=PIPE")
        return self.proc.stdout

    async def wait(self) -> Completed:
        rc = await self.proc.wait()
        err = await self._stderr
        done = Completed(self.argv, rc, b"", err, time.monotonic() - self.started)
        log.debug("stream %s rc=%d in %.3fs", " ".join(self.argv), rc, done.seconds)
        return done

    def kill(self) -> None:
        """SIGKILL if still running; safe to call twice."""
        if self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass

    def kill_group(self) -> None:
        """SIGKILL the process group this child leads (spawned with ``new_session``)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    async def abort(self) -> Completed:
        """Kill and reap: used when the other end of a stream failed.

        Our ends of its pipes are closed too: with zfs-fuse the stream is
        written by the daemon, not the killed ``zfs`` process, and it would
        block on a pipe nobody reads, keeping the pool busy.
        """
        self.kill()
        transport = getattr(self.proc, "_transport", None)  # asyncio keeps it private
        if transport is not None:
            for fd in (0, 1):
                pipe = transport.get_pipe_transport(fd)
                if pipe is not None:
                    pipe.close()
        return await self.wait()


async def spawn(
    argv: Sequence[str],
    *,
    stdin: Wire = DEVNULL,
    stdout: Wire = DEVNULL,
    env: Mapping[str, str] | None = None,
    new_session: bool = False,
) -> Spawned:
    """Start a streaming child. ``stdin``/``stdout`` are PIPE, DEVNULL or an fd/file.

    ``new_session``: the child leads a process group of its own, so
    ``Spawned.kill_group`` ends it with whatever it started (a shell pipeline).
    """
    args = _check_argv(argv)
    try:
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=stdin, stdout=stdout, stderr=PIPE,
            env=dict(env) if env is not None else None, start_new_session=new_session,
        )
    except FileNotFoundError as exc:
        raise CommandNotFound(f"{args[0]}: command not found") from exc
    return Spawned(args, proc)


def os_pipe() -> tuple[int, int]:
    """A kernel pipe for child-to-child streams: bytes never enter Python."""
    r, w = os.pipe()
    return r, w


# A bigger kernel pipe means fewer partial writes (and event-loop writer
# callbacks) while the reader catches up; Linux only, best effort.
_PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ: int | None = getattr(fcntl, "F_SETPIPE_SZ", None)


def widen_pipe(fd: int) -> None:
    """Give a pipe a 1 MiB kernel buffer: fewer, larger reads and writes (and event-loop
    wake-ups) on either end. Linux only, best effort."""
    if _F_SETPIPE_SZ is not None:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)


def grow_pipe(fd: int, size: int) -> int:
    """Give a pipe ``size`` bytes of kernel buffer if this process may, else as
    much as an unprivileged one may (pipe-max-size); its capacity after. Linux
    only: elsewhere (and on failure) what the pipe had, 0 where unknown."""
    if _F_SETPIPE_SZ is None:
        return 0
    for want in (size, _PIPE_SIZE):
        with contextlib.suppress(OSError):  # EPERM: past pipe-max-size or the user's quota
            return int(fcntl.fcntl(fd, _F_SETPIPE_SZ, want))
    with contextlib.suppress(OSError):
        return int(fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ))
    return 0


def alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (someone else's counts: it is alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


C = TypeVar("C")


async def child_on_pipe(start: Callable[[int], Awaitable[C]], *,
                        child_writes: bool) -> tuple[C, int]:
    """A child started on one end of a new, widened pipe, and the other end (ours).

    ``start(fd)`` starts the child with ``fd`` as its stdout (``child_writes``)
    or stdin. The child's end is closed here once the child has it; if the
    child does not start, ours is closed too and the error raised.
    """
    r, w = os.pipe()
    theirs, ours = (w, r) if child_writes else (r, w)
    widen_pipe(ours)
    try:
        child = await start(theirs)
    except BaseException:
        os.close(ours)
        raise
    finally:
        os.close(theirs)
    return child, ours


class Daemon:
    """A long-lived background process we started and will stop, by pid.

    Synchronous on purpose: it is supervised from fixtures, the demo and
    CLI code that may have no event loop running.
    """

    def __init__(self, argv: Sequence[str], log_path: str,
                 env: Mapping[str, str] | None = None) -> None:
        import subprocess

        self.argv = _check_argv(argv)
        self.log_path = log_path
        with open(log_path, "ab") as logf:
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit status."""
        import signal
        import subprocess

        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait()

    def kill(self) -> int:
        """SIGKILL: a crash, for fault tests. Its whole process group goes with it,
        as a crashed service's processes do under its SMF contract (or cgroup):
        a `zfs send` left running would hold its snapshot busy for no one."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)  # its own session: see __init__
            except ProcessLookupError:
                pass
        return self.popen.wait()
