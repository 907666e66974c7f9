"""Logged-in ssh masters kept for a link's streams (``transfer.sshmux``), against a
real OpenSSH ``sshd`` on 127.0.0.1 and real ``ssh`` clients: one login for many
streams, a master per concurrent stream, and every master ended when it should
be (idle, dead, closed), with a stream still carried when no master can be."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapper_zone.fleet import sshd
from snapper_zone.fleet.local import free_port
from snapper_zone.transfer.remote import ZoneClient
from snapper_zone.transfer.sshmux import Lease, Masters, sweep_stale
from snapper_zone.zfs import proc
from tests.helpers import wait_for, write_keypair


@dataclass
class Sshd:
    port: int
    log: Path
    client: ZoneClient  # only its ssh command lines: never connected
    known: str  # known_hosts text naming sshd's host key
    ssh: str
    tmp: Path

    def logins(self) -> int:
        return self.log.read_text().count("Accepted publickey")

    def masters(self, size: int = 2, idle: float = 300.0, port: int | None = None) -> Masters:
        at = port or self.port
        return Masters(lambda path, kh: self.client.openssh_argv(self.ssh, "", kh, at,
                                                                 mux=path, master=True),
                       self.known, size=size, idle=idle, ready_timeout=15.0)

    async def run(self, line: str, lease: Lease | None, stdin: bytes = b"") -> bytes:
        kh = self.tmp / "known_hosts"
        kh.write_text(self.known)
        argv = self.client.openssh_argv(self.ssh, line, kh, self.port,
                                        mux=None if lease is None else lease.path)
        done = await proc.run(argv, input=stdin) if stdin else await proc.run(argv)
        assert done.ok, done.stderr
        return done.stdout


@pytest.fixture
async def plain_sshd(tmp_path: Path) -> AsyncIterator[Sshd]:
    ssh = shutil.which("ssh")
    if sshd.sshd_path() is None or ssh is None:
        pytest.skip("needs OpenSSH's sshd and ssh (apt-get install openssh-server)")
    key = write_keypair(tmp_path / "client_ed25519")
    host = write_keypair(tmp_path / "host_ed25519")
    keys = tmp_path / "authorized_keys"
    keys.write_text(key.with_suffix(".pub").read_text())
    port = free_port()
    d = tmp_path / "sshd"
    d.mkdir()
    daemon = await sshd.start_sshd(d, port, host, [
        f"AuthorizedKeysFile {keys}", "PermitRootLogin prohibit-password", "LogLevel VERBOSE"])
    try:
        client = ZoneClient("127.0.0.1", port, key, username="root", connect_timeout=10.0)
        known = "snapper-zone " + " ".join(host.with_suffix(".pub").read_text().split()[:2])
        yield Sshd(port, d / "sshd.log", client, known + "\n", ssh, tmp_path)
    finally:
        daemon.stop()


def _pids(m: Masters) -> list[int]:
    return [x.child.pid for x in m._masters if x.child is not None]


async def test_streams_in_a_row_share_one_login(plain_sshd: Sshd) -> None:
    """Three streams, one after another: one master, one login, each stream's
    bytes back whole through it."""
    m = plain_sshd.masters()
    try:
        for i in range(3):
            lease = await m.lease()
            assert lease is not None
            data = os.urandom(200_000) + bytes([i])
            assert await plain_sshd.run("cat", lease, data) == data
            lease.release()
        assert m.started == 1 and m.alive == 1
        assert plain_sshd.logins() == 1
    finally:
        await m.close()


async def test_concurrent_streams_take_masters_of_their_own(plain_sshd: Sshd) -> None:
    """Two streams at once lease two masters (two processes, two cores); a third
    over the size is leased nothing and logs in alone."""
    m = plain_sshd.masters(size=2)
    try:
        a, b = await m.lease(), await m.lease()
        assert a is not None and b is not None and a.path != b.path
        assert await m.lease() is None
        got = await asyncio.gather(plain_sshd.run("echo a", a), plain_sshd.run("echo b", b),
                                   plain_sshd.run("echo c", None))
        assert list(got) == [b"a\n", b"b\n", b"c\n"]
        assert plain_sshd.logins() == 3
        a.release()
        a.release()  # twice is once
        again = await m.lease()
        assert again is not None and again.path == a.path  # the idle one, not a third
        again.release()
        b.release()
        assert m.started == 2
    finally:
        await m.close()


async def test_a_dead_master_is_replaced_and_its_stream_logs_in_alone(
        plain_sshd: Sshd) -> None:
    """A master killed while leased: the stream's ssh finds its socket refusing and
    logs in by itself; the dead master is dropped, and the next lease starts one."""
    m = plain_sshd.masters(size=1)
    try:
        lease = await m.lease()
        assert lease is not None
        [pid] = _pids(m)
        os.kill(pid, 9)
        await wait_for(lambda: m.alive == 0, 10, "the master's exit")
        assert await plain_sshd.run("echo alone", lease) == b"alone\n"
        lease.release()
        nxt = await m.lease()
        assert nxt is not None and nxt.path != lease.path
        assert await plain_sshd.run("echo again", nxt) == b"again\n"
        nxt.release()
        assert m.started == 2
    finally:
        await m.close()


async def test_idle_masters_end_and_close_ends_the_rest(plain_sshd: Sshd) -> None:
    """A master unused for ``idle`` seconds ends by itself; ``close`` ends a busy
    one and removes the sockets' directory."""
    m = plain_sshd.masters(idle=0.3)
    lease = await m.lease()
    assert lease is not None
    [pid] = _pids(m)
    lease.release()
    await wait_for(lambda: not proc.alive(pid), 10, "the idle master's end")
    assert m.alive == 0
    lease = await m.lease()
    assert lease is not None
    [pid] = _pids(m)
    where = lease.path.parent
    await m.close()
    assert not proc.alive(pid)
    assert not where.exists()
    lease.release()  # after close: nothing to give back to
    assert await m.lease() is None  # closed: streams log in alone


async def test_a_master_that_cannot_log_in_leaves_streams_to_log_in_alone(
        plain_sshd: Sshd) -> None:
    """Nothing listens where the master goes: the lease is None at once (its
    ssh's own error logged), and no master is tried again for a while."""
    m = plain_sshd.masters(port=free_port())
    try:
        assert await m.lease() is None
        assert m.alive == 0 and m.started == 1
        assert await m.lease() is None
        assert m.started == 1  # not retried within the minute
    finally:
        await m.close()


_HOLDER = """
import asyncio, sys
from pathlib import Path
from snapper_zone.transfer.remote import ZoneClient
from snapper_zone.transfer.sshmux import Masters

async def main(port, key, known, ssh):
    zc = ZoneClient("127.0.0.1", port, Path(key), username="root", connect_timeout=10.0)
    m = Masters(lambda p, kh: zc.openssh_argv(ssh, "", kh, port, mux=p, master=True), known)
    lease = await m.lease()
    print(m._masters[0].child.pid if lease else "none", flush=True)
    await asyncio.Event().wait()

asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("setpriv") is None,
                    reason="ends masters with their owner through setpriv --pdeathsig "
                           "(Linux, util-linux); on illumos SMF's contract does")
async def test_masters_end_with_the_process_that_started_them(plain_sshd: Sshd) -> None:
    """A snapperd killed outright (no close) leaves no logged-in master behind."""
    key = plain_sshd.tmp / "client_ed25519"
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLDER, str(plain_sshd.port), str(key), plain_sshd.known,
        plain_sshd.ssh, stdout=asyncio.subprocess.PIPE)
    try:
        assert holder.stdout is not None
        async with asyncio.timeout(30):
            line = (await holder.stdout.readline()).decode().strip()
        assert line.isdigit(), line
        master = int(line)
        assert proc.alive(master)
    finally:
        holder.kill()
        await holder.wait()
    await wait_for(lambda: not proc.alive(master), 10, "the orphaned master's end")
    _swept_but_not_mine(holder.pid)


def _swept_but_not_mine(dead: int) -> None:
    """A dead process's socket directory outlived it; the next process to start
    masters sweeps it, and leaves a live process's alone."""
    left = list(Path(tempfile.gettempdir()).glob(f"snapper-mux-{dead}-*"))
    assert len(left) == 1 and (left[0] / "known_hosts").exists(), left
    mine = Path(tempfile.mkdtemp(prefix=f"snapper-mux-{os.getpid()}-"))
    try:
        assert left[0] in sweep_stale()
        assert not left[0].exists() and mine.exists()
    finally:
        mine.rmdir()
