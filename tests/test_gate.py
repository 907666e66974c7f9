"""The sshd gate: a real OpenSSH ``sshd`` on 127.0.0.1 in front of an in-process
snapperd, reading the ``authorized_keys`` snapperd writes, its forced command
the real ``snapper-gate``; pushes from the real CN client through OpenSSH's
``ssh``, on real ZFS. Who is let in, what a client can make of its command line, and what a
client killed mid-stream leaves behind."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapper_zone.cn.client import CnClient
from snapper_zone.common.bootstrap import StartupError
from snapper_zone.daemon.gateserver import GateServer
from snapper_zone.daemon.service import Service
from snapper_zone.daemon.sshgate import GateError, Request, authorized_line, decode_key
from snapper_zone.daemon.zone import Zone
from snapper_zone.fleet import sshd
from snapper_zone.fleet.local import free_port
from snapper_zone.fleet.pools import FilePool
from snapper_zone.transfer.remote import ZoneClient, ZoneError
from snapper_zone.transfer.stream import can_splice
from snapper_zone.wire.protocol import Receive
from snapper_zone.zfs import proc
from snapper_zone.zfs.names import Dataset
from snapper_zone.zfs.zfs import SendSpec, Zfs
from tests.helpers import ssh_zone, wait_for, write_keypair, write_random

ZONE_UUID = "5d0c6a44-2b8e-4c37-9a51-3f0e8d2b6c11"
CN_ID = "cn-gate"
VM = "0f6e5b1c-7d2a-4e8b-9c3f-a1b2c3d4e5f6"
OTHER_VM = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"


# -- the messages (pure) --------------------------------------------------------


@given(st.binary(min_size=1, max_size=600), st.text(max_size=300), st.text(max_size=300))
def test_request_round_trips(key: bytes, command: str, client: str) -> None:
    line = Request(key, command, client).to_line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1  # one line, whatever the text
    assert Request.from_line(line[:-1]) == Request(key, command, client[:200])


@pytest.mark.parametrize("line", [
    b"", b"[]", b"not json", b'{"key": "%%%", "command": "", "client": ""}',
    b'{"key": "", "command": "", "client": ""}',
    b'{"key": "AAAA", "command": 5, "client": ""}',
    b'{"key": "AAAA", "command": "ping"}', b"\xff\xfe"])
def test_malformed_requests_are_refused(line: bytes) -> None:
    with pytest.raises(GateError):
        Request.from_line(line)


_WORD = st.text(min_size=1, max_size=60).filter(lambda s: "\x00" not in s)


@given(st.lists(_WORD, min_size=1, max_size=5), st.binary(min_size=1, max_size=100))
def test_authorized_line_forces_exactly_the_gate(argv: list[str], key: bytes) -> None:
    """Whatever the gate's argv holds, the user's shell reads back exactly it and the
    key; what sshd could not read back whole is refused, not written."""
    try:
        line = authorized_line(argv, "ssh-ed25519", key)
    except GateError:
        assert any(c in w for w in argv for c in "'\"\\\n")
        return
    opts, key_type, b64 = line.rstrip("\n").rsplit(" ", 2)
    assert (key_type, decode_key(b64)) == ("ssh-ed25519", key)
    assert opts.startswith('restrict,command="') and opts.endswith('"')
    forced = opts[len('restrict,command="'):-1]
    assert '"' not in forced
    assert shlex.split(forced) == [*argv, "--key", b64]


def test_authorized_line_refuses_a_strange_key_type() -> None:
    with pytest.raises(GateError):
        authorized_line(["/g"], 'ssh-ed25519" evil', b"k")


# -- through a real sshd ------------------------------------------------------------


@dataclass
class Gate:
    zone: Zone
    server: GateServer
    port: int  # snapperd's own SSH port
    sshd_port: int
    cn_key: Path
    host_pub: Path
    cn_pool: FilePool
    vm: Dataset
    tmp: Path
    ssh: str
    ssh_log: Path

    def client(self, **kw: object) -> ZoneClient:
        return ZoneClient("127.0.0.1", self.port, self.cn_key, host_key=self.host_pub,
                          username="root", openssh=self.ssh, **kw)  # type: ignore[arg-type]

    def ports_used(self) -> list[str]:
        """The -p of every ssh the client ran."""
        runs = [line.split() for line in self.ssh_log.read_text().splitlines()]
        return [r[r.index("-p") + 1] for r in runs]


@pytest.fixture
async def gate(zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool,
               tmp_path: Path) -> AsyncIterator[Gate]:
    ssh = shutil.which("ssh")
    if sshd.sshd_path() is None or ssh is None:
        pytest.skip("needs OpenSSH's sshd and ssh (apt-get install openssh-server)")
    sock = tmp_path / "gate.sock"
    keys = tmp_path / "gate_authorized_keys"
    sshd_port = free_port()
    async with ssh_zone(zfs, zone_pool, tmp_path / "zone", uuid=ZONE_UUID, cn_id=CN_ID,
                        vms={VM: CN_ID},
                        gate={"socket": str(sock), "port": sshd_port,
                              "authorized_keys": str(keys), "min_bytes": 0}) as z:
        assert z.zone.config.gate is not None
        server = GateServer(z.zone, Service(z.zone), z.zone.config.gate)
        await server.start()
        d = tmp_path / "sshd"
        d.mkdir()
        daemon = await sshd.start_sshd(d, sshd_port, tmp_path / "zone" / "host_ed25519",
                                       [*sshd.gate_options(keys), "LogLevel VERBOSE"])
        try:
            vm = Dataset(cn_pool.name).child(VM)
            await zfs.create(vm)
            log = tmp_path / "ssh-runs.log"
            wrapper = tmp_path / "ssh"
            wrapper.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\nexec "{ssh}" "$@"\n')
            wrapper.chmod(0o755)
            log.write_text("")
            yield Gate(z.zone, server, z.port, sshd_port, z.cn_key, z.host_pub, cn_pool, vm,
                       tmp_path, str(wrapper), log)
        finally:
            daemon.stop()
            await server.close()


async def _ssh(g: Gate, key: Path, line: str) -> proc.Completed:
    """OpenSSH's ssh straight to the gate's sshd, running ``line``."""
    known = g.tmp / "known_hosts"
    known.write_text(f"[127.0.0.1]:{g.sshd_port} {g.host_pub.read_text()}")
    return await proc.run(
        ["ssh", "-F", "/dev/null", "-T", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
         "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
         "-i", str(key), "-p", str(g.sshd_port), "-l", "root", "127.0.0.1", line])


@pytest.fixture(params=["splice", "copy"])
def moved_by(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each stream moved by splice(2) (Linux), or ("copy") through Python as on
    illumos, which has no splice (``SNAPPER_NO_SPLICE``)."""
    if request.param == "copy":
        monkeypatch.setenv("SNAPPER_NO_SPLICE", "1")
    elif not can_splice():
        pytest.skip("no splice(2) here (Linux only): the copy variant runs")
    return str(request.param)


async def test_a_push_goes_through_the_zones_sshd(gate: Gate, zfs: Zfs, moved_by: str) -> None:
    """The zone names its sshd in ``features``; the CN's ssh goes there (not to
    snapperd's port), and the zone holds the CN's snapshot, guid for guid."""
    write_random(gate.cn_pool, gate.vm, "a", 4 << 20)
    async with gate.client() as zone, asyncio.timeout(120):
        doc = json.loads(await zone.run("features"))
        assert doc["stream_port"] == gate.sshd_port
        assert doc["stream_user"] == pwd.getpwuid(os.geteuid()).pw_name  # the gate's uid
        rep = await CnClient(zone, dataset_root=gate.cn_pool.name, zfs=zfs,
                             vmadm=None).push(VM, "s1")
        assert rep.bytes > (4 << 20)
        write_random(gate.cn_pool, gate.vm, "b", 1 << 20)
        rep = await CnClient(zone, dataset_root=gate.cn_pool.name, zfs=zfs,
                             vmadm=None).push(VM, "s2")
        assert {d.action for d in rep.datasets} == {"incremental"}
    assert gate.ports_used() == [str(gate.sshd_port)] * 2
    sample = gate.zone.metrics.registry.get_sample_value
    assert sample("snapper_gate_commands_total", {"result": "ok"}) == 2
    assert sample("snapper_gate_running", {}) == 0
    for snap in ("s1", "s2"):
        mine = next(s.guid for s in await zfs.snapshots(gate.vm) if s.name == snap)
        held = await gate.zone.store.snapshot(VM, snap)
        assert held.complete and held.parts["root"].guid == mine


async def test_a_restore_comes_through_the_zones_sshd(gate: Gate, zfs: Zfs,
                                                      moved_by: str) -> None:
    """A full restore of a known size is pulled through the gate (ssh's stdout
    spliced into zfs receive, or copied): the restored dataset is the pushed snapshot,
    guid for guid and byte for byte."""
    write_random(gate.cn_pool, gate.vm, "a", 4 << 20)
    async with gate.client() as zone, asyncio.timeout(120):
        cn = CnClient(zone, dataset_root=gate.cn_pool.name, zfs=zfs, vmadm=None)
        await cn.push(VM, "r1")
        target = Dataset(gate.cn_pool.name).child("restored")
        rep = await cn.restore(VM, "r1", target=str(target))
        assert rep.datasets[0].bytes > (4 << 20)
    assert gate.ports_used() == [str(gate.sshd_port)] * 2  # the push's ssh, the restore's
    src = next(s for s in await zfs.snapshots(gate.vm) if s.name == "r1")
    got = next(s for s in await zfs.snapshots(target) if s.name == "r1")
    assert got.guid == src.guid
    assert gate.cn_pool.mountpoint is not None
    assert (gate.cn_pool.mountpoint / "restored" / "a").read_bytes() == \
        (gate.cn_pool.mountpoint / VM / "a").read_bytes()


async def test_a_restore_whose_gate_is_gone_comes_over_snapperds_port(gate: Gate,
                                                                     zfs: Zfs) -> None:
    """The gate's snapperd end does not answer: the gate says so before a byte,
    and the restore is pulled over the client's own connection instead, whole."""
    write_random(gate.cn_pool, gate.vm, "a", 2 << 20)
    async with gate.client() as zone, asyncio.timeout(120):
        cn = CnClient(zone, dataset_root=gate.cn_pool.name, zfs=zfs, vmadm=None)
        await cn.push(VM, "r2")
        await gate.server.close()
        target = Dataset(gate.cn_pool.name).child("restored2")
        await cn.restore(VM, "r2", target=str(target))
        assert zone.stream_port is None  # not tried again on this connection
    src = next(s for s in await zfs.snapshots(gate.vm) if s.name == "r2")
    got = next(s for s in await zfs.snapshots(target) if s.name == "r2")
    assert got.guid == src.guid


async def test_unknown_and_revoked_keys_are_refused(gate: Gate) -> None:
    """A stranger is refused at login. A revoked key is refused by snapperd at
    once (the key is looked up again per command), and by sshd once snapperd
    has rewritten the file, within seconds."""
    stranger = write_keypair(gate.tmp / "stranger_ed25519")
    done = await _ssh(gate, stranger, "ping")
    assert done.returncode == 255 and "Permission denied" in done.stderr
    done = await _ssh(gate, gate.cn_key, "ping")
    assert done.ok and done.stdout == b"pong\n"
    keys = gate.zone.config.gate.authorized_keys  # type: ignore[union-attr]
    pub = gate.cn_key.with_suffix(".pub").read_text().split()[1]
    assert pub in keys.read_text()
    gate.zone.config = replace(gate.zone.config, keys=())  # revoked (a reload)
    done = await _ssh(gate, gate.cn_key, "ping")
    assert done.returncode in (1, 255), done  # by snapperd, or sshd if the file is new
    if done.returncode == 1:
        assert json.loads(done.stderr)["code"] == "NotAuthorized"
    await wait_for(lambda: pub not in keys.read_text(), 30, "the key gone from sshd's file")
    done = await _ssh(gate, gate.cn_key, "ping")
    assert done.returncode == 255 and "Permission denied" in done.stderr


async def test_a_command_through_the_gate_is_checked_as_any(gate: Gate) -> None:
    """Another CN's VM is refused; shell syntax is a bad command, run by nobody."""
    done = await _ssh(gate, gate.cn_key, f"snapshots {OTHER_VM}")
    assert done.returncode == 1 and json.loads(done.stderr)["code"] == "NotAuthorized"
    marker = gate.tmp / "pwned"
    done = await _ssh(gate, gate.cn_key, f"ping; touch {marker}")
    assert done.returncode == 1 and json.loads(done.stderr)["code"] == "BadCommand"
    done = await _ssh(gate, gate.cn_key, f"snapshots $(touch {marker})")
    assert done.returncode == 1
    assert not marker.exists()
    done = await _ssh(gate, gate.cn_key, f"snapshots {VM}")
    assert done.ok and json.loads(done.stdout)["snapshots"] == []


async def test_a_gate_from_another_user_is_refused(gate: Gate) -> None:
    """Only the gate's user (and root) may talk to snapperd's socket: the socket's
    mode keeps others out, and past it (mode opened here) its peer's uid does.
    The gate's own request, from root: descriptors and a line, status back."""
    d = Path(tempfile.mkdtemp(prefix="gate-", dir="/tmp"))  # a directory others may enter
    try:
        os.chmod(d, 0o755)
        assert gate.zone.config.gate is not None
        server = GateServer(gate.zone, gate.server.service,
                            replace(gate.zone.config.gate, socket=d / "gate.sock",
                                    authorized_keys=d / "keys"))
        await server.start()
        key = base64.b64decode(gate.cn_key.with_suffix(".pub").read_text().split()[1])
        line = Request(key, "ping").to_line().decode()
        script = ("import os, socket, sys\nos.setuid(65534)\n"
                  "s = socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\n"
                  "try:\n    s.sendall(sys.argv[2].encode())\n"
                  "    print(repr(s.recv(100)))\n"
                  "except (BrokenPipeError, ConnectionResetError):\n    print(repr(b''))\n")
        argv = [sys.executable, "-c", script, str(server.path), line]
        done = await proc.run(argv)
        assert not done.ok and "PermissionError" in done.stderr, done.stderr
        os.chmod(server.path, 0o666)
        done = await proc.run(argv)
        assert done.ok and done.stdout.strip() == b"b''", done.stderr  # closed, no answer
        assert await _ask(server.path, Request(key, "ping")) == (0, b"pong\n", b"")
        status, out, err = await _ask(server.path, Request(b"\x00\x00\x00\x07ssh-rsa", "ping"))
        assert status == 1 and out == b"" and json.loads(err)["code"] == "NotAuthorized"
        await server.close()
        assert not server.path.exists()
    finally:
        shutil.rmtree(d)


async def _ask(path: Path, request: Request) -> tuple[int, bytes, bytes]:
    """What snapper-gate does, in-process: the request with three pipes; the status
    and what came out of the two output pipes."""
    def ask() -> tuple[int, bytes, bytes]:
        pipes = [os.pipe() for _ in range(3)]
        ends = [pipes[0][0], pipes[1][1], pipes[2][1]]
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(str(path))
            socket.send_fds(s, [request.to_line()], ends)
            for fd in (*ends, pipes[0][1]):  # ours closed: stdin at EOF, outputs end
                os.close(fd)
            answer = s.makefile("rb").readline()
        outs = []
        for r, _ in pipes[1:]:
            with os.fdopen(r, "rb") as f:
                outs.append(f.read())
        return json.loads(answer)["status"], outs[0], outs[1]
    return await asyncio.to_thread(ask)


async def test_a_client_killed_mid_stream_loses_only_its_own_push(gate: Gate,
                                                                  zfs: Zfs) -> None:
    """Two paced pushes through the gate; one client's ssh is killed mid-stream.
    Its receive ends (nothing of it committed, its slot and lease given back,
    its gate process gone); the other finishes whole."""
    other = Dataset(gate.cn_pool.name).child("b")
    await zfs.create(other)
    write_random(gate.cn_pool, gate.vm, "a", 6 << 20)
    write_random(gate.cn_pool, other, "a", 6 << 20)
    for ds in (gate.vm, other):  # one at a time: zfs-fuse snapshots one per command
        await zfs.snapshot([ds.snapshot("k1")])
    async with gate.client() as a, gate.client() as b, asyncio.timeout(120):
        await a.features()
        await b.features()
        pa = asyncio.create_task(a.push_stream(Receive(VM, "root", "k1"),
                                               SendSpec(gate.vm.snapshot("k1")), zfs,
                                               bwlimit=2 << 20))
        pb = asyncio.create_task(b.push_stream(Receive(VM, "disk9", "k1"),
                                               SendSpec(other.snapshot("k1")), zfs,
                                               bwlimit=2 << 20))
        await wait_for(lambda: gate.server.running == 2, 30, "both streams in the gate")
        victim = await _ssh_child_of(pa)
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(ZoneError):
            await pa
        res = await pb
        assert res.bytes > (6 << 20)
        await wait_for(lambda: gate.server.running == 0, 30, "the cut command ended")
    store = gate.zone.store
    assert await zfs.exists(store.part_dataset(VM, "disk9").snapshot("k1"))
    assert not await zfs.exists(store.part_dataset(VM, "root").snapshot("k1"))
    assert gate.server.per_principal.total() == 0


async def _ssh_child_of(task: asyncio.Task[object]) -> int:
    """The pid of the ``ssh`` the push in ``task`` started: the newest ssh child of ours
    whose -p is the gate's (found through /proc, as a fault injector would)."""
    me = os.getpid()
    found: list[int] = []

    def scan() -> bool:
        found.clear()
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == me and cmd and cmd[0].endswith(b"sh") and b"receive" in b" ".join(cmd) \
                    and f"{VM} root".encode() in b" ".join(cmd):
                found.append(int(pid))
        return bool(found)

    await wait_for(scan, 30, "the push's ssh running")
    return found[0]


async def test_a_zone_link_uses_ssh_only_through_a_gate(gate: Gate, zfs: Zfs) -> None:
    """A zone's link to its peer (``openssh_gate_only``) sends a copy through the
    peer's gate when it has one, and over the link itself (asyncssh) when not."""
    write_random(gate.cn_pool, gate.vm, "a", 2 << 20)
    await zfs.snapshot([gate.vm.snapshot("z1")])
    async with gate.client(openssh_gate_only=True) as zone, asyncio.timeout(120):
        res = await zone.push_stream(Receive(VM, "root", "z1"),
                                     SendSpec(gate.vm.snapshot("z1")), zfs)
        assert res.bytes > (2 << 20)
        assert gate.ports_used() == [str(gate.sshd_port)]
        await zone.commit(VM, "z1", ["root"], None)
        write_random(gate.cn_pool, gate.vm, "b", 1 << 20)
        await zfs.snapshot([gate.vm.snapshot("z2")])
        zone.stream_port = None  # as from a peer without a gate
        res = await zone.push_stream(Receive(VM, "root", "z2", "z1"),
                                     SendSpec(gate.vm.snapshot("z2"), gate.vm.snapshot("z1")),
                                     zfs)
        assert res.bytes > (1 << 20)
        assert gate.ports_used() == [str(gate.sshd_port)]  # no ssh this time


async def test_a_zone_link_logs_in_once_for_its_copies(gate: Gate, zfs: Zfs) -> None:
    """A link that keeps logins (``keep_logins``, as a zone's peer links do) runs
    three copies through the gate on one logged-in master: one sshd login, each
    copy whole; closing the link ends the master."""
    logins: list[str] = []
    async with gate.client(openssh_gate_only=True, keep_logins=2,
                           on_login=logins.append) as zone, asyncio.timeout(120):
        base: str | None = None
        for snap in ("k1", "k2", "k3"):
            write_random(gate.cn_pool, gate.vm, snap, 1 << 20)
            await zfs.snapshot([gate.vm.snapshot(snap)])
            res = await zone.push_stream(
                Receive(VM, "root", snap, base),
                SendSpec(gate.vm.snapshot(snap), None if base is None else
                         gate.vm.snapshot(base)), zfs)
            assert res.bytes > (1 << 20)
            await zone.commit(VM, snap, ["root"], None)
            base = snap
        masters = zone._masters[gate.sshd_port]
        assert masters.started == 1
        [master] = masters._masters
        assert master.child is not None
        pid = master.child.pid
    assert (gate.tmp / "sshd" / "sshd.log").read_text().count("Accepted publickey") == 1
    assert logins == ["master"]
    assert len(gate.ports_used()) == 4  # the master, then a client per copy
    assert not proc.alive(pid)  # ended and reaped with the link
    for snap in ("k1", "k2", "k3"):
        mine = next(s.guid for s in await zfs.snapshots(gate.vm) if s.name == snap)
        held = await gate.zone.store.snapshot(VM, snap)
        assert held.complete and held.parts["root"].guid == mine


async def test_a_gate_whose_snapperd_end_is_gone_leaves_the_push_to_snapperds_port(
        gate: Gate, zfs: Zfs) -> None:
    """sshd lets the CN in but nothing listens on the gate's socket: the gate says
    GateUnavailable before reading a byte, and the push goes to snapperd's own
    port (through ssh), whole."""
    await gate.server.close()
    write_random(gate.cn_pool, gate.vm, "a", 2 << 20)
    async with gate.client() as zone, asyncio.timeout(120):
        rep = await CnClient(zone, dataset_root=gate.cn_pool.name, zfs=zfs,
                             vmadm=None).push(VM, "g1")
        assert rep.bytes > (2 << 20)
        assert zone.stream_port is None  # not tried again on this connection
    assert gate.ports_used() == [str(gate.sshd_port), str(gate.port)]
    held = await gate.zone.store.snapshot(VM, "g1")
    assert held.complete


async def test_a_gate_that_cannot_listen_stops_the_start_with_the_reason(gate: Gate) -> None:
    """A regular file where the socket goes (not a stale socket: never removed), or a
    path sshd could not be given in a forced command: StartupError naming it."""
    assert gate.zone.config.gate is not None
    taken = gate.tmp / "not-a-socket"
    taken.write_text("mine\n")
    for path, why in ((taken, "in use"), (gate.tmp / 'it"s', "quoted")):
        server = GateServer(gate.zone, gate.server.service,
                            replace(gate.zone.config.gate, socket=path))
        with pytest.raises(StartupError, match=why):
            await server.start()
        await server.close()
    assert taken.read_text() == "mine\n"
