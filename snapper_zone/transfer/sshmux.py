"""Logged-in OpenSSH connections kept for the streams that follow (``ControlMaster``).

A zone copies to a peer one stream per dataset (a move, a repair, a catch-up),
each through the peer's gate with a child ``ssh``. An ``ssh`` that logs in by
itself pays the key exchange, the authentication and two Nagle stalls: ~0.19 s
here, a sixteenth of a 1 GiB copy and all of a small one. ``Masters`` keeps up
to ``size`` logged-in ``ssh -N`` masters for one link; a stream leases an idle
one and its ``ssh`` runs as a client of it (``ControlMaster=no``): its session
opens in ~7 ms.

One stream per master at a time: a master is one process (one core) here and
its ``sshd`` one on the peer, so concurrent streams take masters of their own and
spread over cores as separate logins would. A stream that finds every master
busy, or whose master cannot start, is leased nothing and logs in by itself;
so does an ``ssh`` whose master died under it (its socket refuses).

Masters are our children, not ``ControlPersist``'s detached daemons: ended by
``close``, after ``idle`` seconds unused, and on Linux with the process that
started them (``setpriv --pdeathsig``; on illumos SMF's contract ends them).
Their control sockets live in a 0700 directory of ours, as a connected socket
runs commands on the peer with our key; it is named with our pid, so the one
a killed process leaves is swept by the next that starts masters. The peer
still checks every command: its snapperd looks the key up per stream, so a key
revoked while a master is logged in is refused at the next stream.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from snapper_zone.errors import CommandNotFound
from snapper_zone.zfs import proc

__all__ = ["Lease", "Masters"]

log = logging.getLogger("snapper.cn")

# A unix socket's path is at most 104 (BSD, illumos) or 108 bytes; ssh needs room.
_MAX_SOCKET_PATH = 100
_READY_POLL = 0.005  # seconds between looks for a starting master's socket
_PREFIX = "snapper-mux-"  # + "<pid>-<random>"
_RETRY_AFTER = 60.0  # seconds before trying a master again after one failed to start


def sweep_stale(where: str | None = None) -> list[Path]:
    """Remove socket directories (ours: this uid's) whose process is gone; the removed."""
    out = []
    for d in Path(where or tempfile.gettempdir()).glob(f"{_PREFIX}*-*"):
        pid = d.name[len(_PREFIX):].split("-", 1)[0]
        try:
            if not pid.isdigit() or d.stat().st_uid != os.getuid() or proc.alive(int(pid)):
                continue
        except OSError:
            continue
        shutil.rmtree(d, ignore_errors=True)
        out.append(d)
    return out


def _die_with_us() -> list[str]:
    """The prefix that ends a child when this process dies, where there is one."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


class _Master:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.child: proc.Spawned | None = None
        self.exited: asyncio.Future[proc.Completed] | None = None
        self.busy = True  # leased from the start, by the stream that starts it
        self.last_used = time.monotonic()

    @property
    def alive(self) -> bool:
        return self.exited is not None and not self.exited.done()

    async def end(self) -> None:
        if self.child is not None and self.exited is not None:
            self.child.kill()
            await asyncio.shield(self.exited)


class Lease:
    """A master held by one stream: ``path`` for its ``ssh``; ``release`` when it ends."""

    def __init__(self, masters: Masters, master: _Master) -> None:
        self._masters = masters
        self._master: _Master | None = master
        self.path = master.path

    def release(self) -> None:
        """Give the master back (idempotent); a dead one is dropped."""
        master, self._master = self._master, None
        if master is not None:
            self._masters.give_back(master)


class Masters:
    """Up to ``size`` logged-in ``ssh`` masters to one zone's port.

    ``argv(control_path, known_hosts)``: the master's ``ssh`` command line;
    ``known``: the known_hosts text naming the zone's host key, written where
    the masters can read it while they live (a rekey checks the key again).
    """

    def __init__(self, argv: Callable[[Path, Path], list[str]], known: str, *,
                 size: int = 4, idle: float = 300.0, ready_timeout: float = 30.0,
                 on_start: Callable[[], None] | None = None) -> None:
        self.argv = argv
        self.on_start = on_start  # told of each master started (a login)
        self.known = known
        self.size = size
        self.idle = idle
        self.ready_timeout = ready_timeout
        self.started = 0  # masters started (logins made), for tests and logs
        self._masters: list[_Master] = []
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._retry_at = 0.0
        self._reaper: asyncio.TimerHandle | None = None
        self._ending: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def alive(self) -> int:
        return sum(1 for m in self._masters if m.alive)

    async def lease(self) -> Lease | None:
        """An idle master for one stream, started if need be; None: log in alone."""
        if self._closed:
            return None
        self._masters = [m for m in self._masters if m.alive or m.busy]
        for m in self._masters:
            if not m.busy and m.alive:
                m.busy = True
                return Lease(self, m)
        if len(self._masters) >= self.size or time.monotonic() < self._retry_at:
            return None
        started = await self._start()
        return None if started is None else Lease(self, started)

    def give_back(self, m: _Master) -> None:
        m.busy = False
        m.last_used = time.monotonic()
        if not m.alive:
            self._drop(m)
        elif self._reaper is None and not self._closed:
            self._reaper = asyncio.get_running_loop().call_later(self.idle, self._reap)

    async def close(self) -> None:
        """End every master and remove their sockets."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        masters, self._masters = self._masters, []
        await asyncio.gather(*(m.end() for m in masters), *self._ending)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def _where(self) -> Path:
        if self._dir is None:
            sweep_stale()
            # mode 0700; the pid in the name lets the next process sweep it if we
            # die without cleaning up (kill -9: the masters die, the directory stays).
            self._dir = tempfile.TemporaryDirectory(prefix=f"{_PREFIX}{os.getpid()}-")
            (Path(self._dir.name) / "known_hosts").write_text(self.known)
        return Path(self._dir.name)

    async def _start(self) -> _Master | None:
        where = self._where()
        path = where / f"m{self.started}"
        self.started += 1
        if len(str(path)) > _MAX_SOCKET_PATH:
            self._retry_at = float("inf")  # the directory stays where it is
            log.warning("ssh control socket path too long (%s): streams log in alone", path)
            return None
        m = _Master(path)
        self._masters.append(m)
        if self.on_start is not None:
            self.on_start()
        why = "did not log in"
        try:
            m.child = await proc.spawn([*_die_with_us(), *self.argv(path, where / "known_hosts")])
            m.exited = asyncio.ensure_future(m.child.wait())
            deadline = time.monotonic() + self.ready_timeout
            # The socket appears once the master has logged in.
            while not path.exists():
                if m.exited.done():
                    why = m.exited.result().stderr.strip()[-500:] or why
                    break
                if time.monotonic() > deadline:
                    why = f"not logged in after {self.ready_timeout:.0f} s"
                    break
                await asyncio.sleep(_READY_POLL)  # the condition, polled with a deadline
            else:
                return m
        except (OSError, CommandNotFound) as exc:
            why = str(exc)
        except BaseException:
            self._drop(m)
            raise
        log.warning("ssh master for %s failed (%s): streams log in alone for %.0f s",
                    path.name, why, _RETRY_AFTER)
        self._retry_at = time.monotonic() + _RETRY_AFTER
        self._drop(m)
        return None

    def _drop(self, m: _Master) -> None:
        if m in self._masters:
            self._masters.remove(m)
        if m.alive:
            task = asyncio.ensure_future(m.end())
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)
        m.path.unlink(missing_ok=True)

    def _reap(self) -> None:
        """End masters unused for ``idle`` seconds; look again for the rest."""
        self._reaper = None
        now = time.monotonic()
        for m in list(self._masters):
            if not m.busy and now - m.last_used >= self.idle:
                self._drop(m)
        waiting = [m.last_used for m in self._masters if not m.busy]
        if waiting and not self._closed:
            due = min(waiting) + self.idle - now
            self._reaper = asyncio.get_running_loop().call_later(max(due, 0.0), self._reap)
