"""snapperd's SSH endpoint end to end: real asyncssh and OpenSSH clients on loopback.

Tests marked ``zfs`` move real streams into a real pool (zfs-fuse here,
OpenZFS in the VM tier); the others stop before ZFS is ever asked anything.
"""

from __future__ import annotations

import array
import asyncio
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import termios
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from replication.inventory import from_document
from replication.reconcile import Delete, Reason, ZoneInventory, reconcile
from snapper_zone.common.config import ZoneConfig, parse_config
from snapper_zone.daemon.sshserver import ENCRYPTION_ALGS, start_ssh_server
from snapper_zone.daemon.zone import Zone
from snapper_zone.errors import PartComplete
from snapper_zone.fleet.pools import FilePool
from snapper_zone.transfer import local as transfer_local
from snapper_zone.transfer.registry import SnapshotInUse, Transfer
from snapper_zone.transfer.stream import ClientGone, Inbound
from snapper_zone.wire import protocol
from snapper_zone.wire.protocol import Commit, Receive, Send
from snapper_zone.zfs import proc
from snapper_zone.zfs.names import Dataset, Snapshot
from snapper_zone.zfs.sendstream import StreamBegin
from snapper_zone.zfs.zfs import Capabilities, SendSpec, Zfs
from tests.conftest import require
from tests.helpers import mountpoint, receive_bytes, send_bytes, wait_for, write_random

ZONE_UUID = "bd932c2b-caae-495a-abf2-fb958111c3fb"
PEER_UUID = "02f6d6c3-c496-439f-8cad-5ad138936fa4"
PEER2_UUID = "5d0e0b8e-3c1a-4f4e-9a57-2a8e6f0c9d11"  # a second peer zone (``peers=2``)
VM_A = "74c59c61-4559-4ca2-b1ef-0ca22f2f936a"
VM_B = "7250abe7-581d-4b91-9ae1-5601a17f5dff"


# -- harness ----------------------------------------------------------------------


@dataclass
class Harness:
    zone: Zone
    port: int
    keys: dict[str, Path]  # who -> private key file (OpenSSH format, mode 600)
    conns: list[asyncssh.SSHClientConnection] = field(default_factory=list)

    @property
    def root(self) -> Dataset:
        return Dataset(self.zone.config.root)

    async def connect(self, who: str) -> asyncssh.SSHClientConnection:
        conn = await asyncssh.connect(
            "127.0.0.1", self.port, username="snapper", known_hosts=None,
            client_keys=[str(self.keys[who])], agent_path=None, config=[],
            encryption_algs=ENCRYPTION_ALGS, compression_algs=None)
        self.conns.append(conn)
        return conn

    def metric(self, name: str, **labels: str) -> float:
        value = self.zone.metrics.registry.get_sample_value(name, labels)
        return value or 0.0


def _keyfile(path: Path, comment: str) -> str:
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
    key.write_private_key(str(path))
    path.chmod(0o600)
    return key.export_public_key("openssh").decode().strip()


MakeHarness = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def make_harness(tmp_path: Path) -> AsyncIterator[MakeHarness]:
    acceptors: list[asyncssh.SSHAcceptor] = []
    harnesses: list[Harness] = []

    async def make(root: str, cns: dict[str, list[str]], *, max_concurrent_receives: int = 4,
                   zfs: Zfs | None = None, stream_idle_seconds: int = 60,
                   settings: dict[str, Any] | None = None, peers: int = 1) -> Harness:
        keydir = tmp_path / f"keys{len(harnesses)}"
        keydir.mkdir()
        keys: dict[str, Path] = {}
        entries: list[dict[str, Any]] = []
        for cn in cns:
            keys[cn] = keydir / cn
            entries.append({"role": "cn", "cn_id": cn,
                            "public_key": _keyfile(keys[cn], f"cn {cn}")})
        # The peer zones, configured as static peers: a peer acts only on the
        # VMs the static pair gives both zones (with one peer: every VM).
        peer_ids = [PEER_UUID, PEER2_UUID][:peers]
        for i, zone_id in enumerate(peer_ids):
            who = "peer" if i == 0 else f"peer{i + 1}"
            keys[who] = keydir / who
            entries.append({"role": "peer", "zone": zone_id,
                            "public_key": _keyfile(keys[who], who)})
        keys["operator"] = keydir / "operator"
        entries.append({"role": "operator",
                        "public_key": _keyfile(keys["operator"], "alice@ops")})
        keys["stranger"] = keydir / "stranger"
        _keyfile(keys["stranger"], "not in the config")
        _keyfile(keydir / "host_key", "host")
        config: ZoneConfig = parse_config({
            "uuid": ZONE_UUID, "name": "zone0", "root": root,
            "ssh": {"port": 0, "host_key": str(keydir / "host_key")},
            "http": {"port": 0},
            "max_concurrent_receives": max_concurrent_receives,
            "stream_idle_seconds": stream_idle_seconds,
            "keys": entries,
            "vms": {vm: cn for cn, vms in cns.items() for vm in vms},
            "peers": [{"uuid": z, "ssh_host": "127.0.0.1", "ssh_port": 1,
                       "http_url": "http://127.0.0.1:1"} for z in peer_ids],
            **(settings or {}),
        }, str(tmp_path / "snapperd.toml"))
        zone = Zone.from_config(config, zfs=zfs, log=logging.getLogger("snapperd.test"))
        acceptor = await start_ssh_server(zone)
        acceptors.append(acceptor)
        # Not get_port(): the VM tier's asyncssh (Debian's 2.10) lacks it.
        port: int = acceptor.sockets[0].getsockname()[1]
        h = Harness(zone, port, keys)
        harnesses.append(h)
        return h

    yield make
    for h in harnesses:
        for conn in h.conns:
            conn.close()
    for acceptor in acceptors:
        acceptor.close()
        await acceptor.wait_closed()


async def run(conn: asyncssh.SSHClientConnection, line: str,
              data: bytes = b"") -> tuple[int, bytes, str]:
    """Run one command with ``data`` on stdin: (exit status, stdout, stderr)."""
    process = await conn.create_process(line, encoding=None)
    try:
        process.stdin.write(data)
        process.stdin.write_eof()
    except (BrokenPipeError, ConnectionError):
        pass  # the zone answered (refused) before reading all of it
    out, err = await asyncio.gather(process.stdout.read(), process.stderr.read())
    done = await process.wait()
    assert done.exit_status is not None
    return done.exit_status, out, err.decode()


def err_code(stderr: str) -> str:
    return protocol.parse_error_line(stderr)[0]


async def cn_vm(zfs: Zfs, pool: FilePool, name: str, snaps: int,
                size: int = 1 << 20) -> tuple[Dataset, dict[str, str]]:
    """A CN dataset with snapshots s1..sN, each after a new file fN; and the files' sha256."""
    ds = Dataset(pool.name).child(name)
    await zfs.create(ds)
    digests = {}
    for i in range(1, snaps + 1):
        digests[f"f{i}"] = write_random(pool, ds, f"f{i}", size)
        await zfs.snapshot([ds.snapshot(f"s{i}")])
    return ds, digests


async def guids(zfs: Zfs, ds: Dataset) -> dict[str, int]:
    return {s.name: s.guid for s in await zfs.snapshots(ds)}


async def push(conn: asyncssh.SSHClientConnection, zfs: Zfs, src: Dataset, vm: str,
               snap: str, base: str | None = None, *, named: str | None = None,
               from_arg: str | None = None, size: int | None = None,
               mangle: Callable[[bytes], bytes] | None = None) -> tuple[int, bytes, str]:
    """Send src@snap (incremental from base) and feed it to ``receive`` over SSH."""
    spec = SendSpec(src.snapshot(snap), base=src.snapshot(base) if base else None)
    data = await send_bytes(zfs, spec)
    if mangle is not None:
        data = mangle(data)
    line = protocol.format_command(Receive(vm, "disk0", named or snap, from_arg, size))
    return await run(conn, line, data)


class ReceiveSpy:
    """Counts the zfs receive children the zone starts."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, zfs: Zfs) -> None:
        self.calls: list[Dataset] = []
        real = zfs.receive

        async def spy(target: Dataset, **kw: Any) -> proc.Spawned:
            self.calls.append(target)
            return await real(target, **kw)

        monkeypatch.setattr(zfs, "receive", spy)


async def zone_root(zfs: Zfs, pool: FilePool) -> str:
    root = Dataset(pool.name).child("data")
    await zfs.create(root)
    return root.path


# -- tests without ZFS: refused before anything runs ------------------------------


async def test_ping_and_unknown_key(make_harness: MakeHarness,
                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="snapperd.test")
    h = await make_harness("nopool/data", {"cn-a": [VM_A]})
    conn = await h.connect("cn-a")
    assert await run(conn, "ping") == (0, b"pong\n", "")
    with pytest.raises(asyncssh.PermissionDenied):
        await h.connect("stranger")
    await wait_for(lambda: h.metric("snapper_auth_failures_total", reason="unknown_key") >= 1)
    stranger = asyncssh.read_private_key(str(h.keys["stranger"])).get_fingerprint()
    assert any(vars(r).get("fingerprint") == stranger for r in caplog.records
               if r.getMessage() == "refused unknown key")
    assert h.metric("snapper_commands_total", verb="ping", result="ok") == 1


async def test_authorisation_refused_and_counted(make_harness: MakeHarness) -> None:
    h = await make_harness("nopool/data", {"cn-a": [VM_A], "cn-b": [VM_B]})
    cn_b = await h.connect("cn-b")
    status, _, err = await run(cn_b, f"receive {VM_A} disk0 s1", b"x" * 1000)
    assert status == 1 and err_code(err) == "NotAuthorized"
    assert "another CN" in protocol.parse_error_line(err)[1]
    status, _, err = await run(cn_b, f"send {VM_A} disk0 s1")
    assert (status, err_code(err)) == (1, "NotAuthorized")
    op = await h.connect("operator")
    status, _, err = await run(op, f"receive {VM_A} disk0 s1")
    assert (status, err_code(err)) == (1, "NotAuthorized")
    assert h.metric("snapper_auth_failures_total", reason="not_authorized") == 3
    assert h.metric("snapper_commands_total", verb="receive", result="NotAuthorized") == 2
    assert h.metric("snapper_commands_total", verb="send", result="NotAuthorized") == 1


@pytest.mark.parametrize("line", [
    "receive ../x disk0 s1",
    f"receive {VM_A} a/b s1",
    f"receive {VM_A} $(id) s1",
    f"receive {VM_A} disk0 ..",
    f"receive {VM_A} -rf s1",
    f"send {VM_A} disk0 s1 --from ../../etc",
    "sh -c id",
    f"receive {VM_A} disk0 s1; id",
])
async def test_path_tricks_refused_and_counted(make_harness: MakeHarness, line: str) -> None:
    h = await make_harness("nopool/data", {"cn-a": [VM_A]})
    conn = await h.connect("cn-a")
    status, out, err = await run(conn, line, b"payload")
    assert status == 1 and out == b""
    assert err_code(err) in ("InvalidArgument", "BadCommand")
    verb = line.split()[0] if line.split()[0] in ("receive", "send") else "invalid"
    assert h.metric("snapper_commands_total", verb=verb, result=err_code(err)) == 1


async def test_no_shell_no_subsystem_no_forwarding(make_harness: MakeHarness) -> None:
    h = await make_harness("nopool/data", {"cn-a": [VM_A]})
    conn = await h.connect("cn-a")
    with pytest.raises(asyncssh.ChannelOpenError):
        await conn.create_process()  # a shell
    with pytest.raises(asyncssh.Error):
        await conn.start_sftp_client()
    with pytest.raises(asyncssh.ChannelOpenError):
        await conn.open_connection("127.0.0.1", h.port)
    with pytest.raises(asyncssh.ChannelListenError):
        await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", h.port)
    assert await run(conn, "ping") == (0, b"pong\n", "")


# -- the receive data path, without SSH or ZFS ------------------------------------


class _Flow:
    """A fake transport's reading state, as Inbound drives it."""

    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0
        self.resumed = asyncio.Event()

    def pause(self) -> None:
        self.paused = True
        self.pauses += 1
        self.resumed.clear()

    def resume(self) -> None:
        self.paused = False
        self.resumed.set()


async def _drain_pipe(r: int, into: bytearray) -> None:
    """Read a non-blocking pipe to EOF through the event loop."""
    loop = asyncio.get_running_loop()
    os.set_blocking(r, False)
    eof = loop.create_future()

    def readable() -> None:
        try:
            chunk = os.read(r, 1 << 20)
        except BlockingIOError:
            return
        if chunk:
            into.extend(chunk)
        elif not eof.done():
            eof.set_result(None)

    loop.add_reader(r, readable)
    try:
        await eof
    finally:
        loop.remove_reader(r)


def _pipe_holds(r: int) -> int:
    """Bytes waiting in pipe ``r`` (FIONREAD)."""
    buf = array.array("i", [0])
    fcntl.ioctl(r, termios.FIONREAD, buf)
    return buf[0]


async def test_inbound_backpressure_bounds_memory() -> None:
    flow = _Flow()
    inbound = Inbound(flow.pause, flow.resume)
    r, w = os.pipe()
    written: list[int] = []
    data = os.urandom(16 << 20)
    chunk = 32 << 10
    try:
        # The header arrives before the pipe exists: buffered.
        inbound.feed(data[:chunk])
        header = await inbound.read(100)
        # Bytes fed before pipe_to starts are buffered and then moved: no wait needed.
        feeding = asyncio.ensure_future(inbound.pipe_to(w, header, written.append))
        # Nobody reads the pipe (zfs receive is stuck): the source must be
        # paused long before the stream is buffered in memory. After each
        # packet the writer has written what the pipe takes: all of it, or
        # until the pipe is full.
        sent = chunk
        while not flow.paused:
            inbound.feed(data[sent:sent + chunk])
            sent += chunk
            await wait_for(lambda: flow.paused or sum(written) == sent  # noqa: B023
                           or _pipe_holds(r) >= fcntl.fcntl(w, fcntl.F_GETPIPE_SZ), 10,
                           "the writer's flush", poll=0)
            assert sent < 4 << 20, "never paused"
        got = bytearray()
        reader = asyncio.ensure_future(_drain_pipe(r, got))
        while sent < len(data):
            if flow.paused:  # the writer and the reader run meanwhile
                await asyncio.wait_for(flow.resumed.wait(), 30)
            inbound.feed(data[sent:sent + chunk])
            sent += chunk
        inbound.feed_eof()
        await asyncio.wait_for(feeding, 30)
        await asyncio.wait_for(reader, 30)
    finally:
        os.close(r)
    assert bytes(got) == header + data[100:]
    assert sum(written) == len(data)
    assert flow.pauses >= 1 and not flow.paused


async def test_inbound_client_gone_truncates_the_pipe() -> None:
    flow = _Flow()
    inbound = Inbound(flow.pause, flow.resume)
    r, w = os.pipe()
    try:
        feeding = asyncio.ensure_future(inbound.pipe_to(w, b"head", lambda n: None))
        inbound.feed(b"body")
        got = bytearray()
        reader = asyncio.ensure_future(_drain_pipe(r, got))
        inbound.feed_error(ClientGone("gone"))
        with pytest.raises(ClientGone):
            await asyncio.wait_for(feeding, 30)
        await asyncio.wait_for(reader, 30)  # the reader sees EOF: a truncated stream
    finally:
        os.close(r)
    assert bytes(got) in (b"", b"head", b"headbody")
    inbound.feed(b"late")  # dropped, not buffered
    assert not flow.paused


# -- tests on real ZFS --------------------------------------------------------------


@pytest.mark.zfs
async def test_push_incrementals_commit_list_restore(
        zfs: Zfs, caps: Capabilities, cn_pool: FilePool, zone_pool: FilePool,
        make_harness: MakeHarness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="snapperd.test")
    h = await make_harness(await zone_root(zfs, zone_pool), {"cn-a": [VM_A]})
    src, digests = await cn_vm(zfs, cn_pool, "vm", 3)
    conn = await h.connect("cn-a")
    assert (await push(conn, zfs, src, VM_A, "s1"))[0] == 0
    assert (await push(conn, zfs, src, VM_A, "s2", "s1", from_arg="s1"))[0] == 0
    # Without --from the zone finds the base by the stream's fromguid.
    status, _, err = await push(conn, zfs, src, VM_A, "s3", "s2")
    assert status == 0, err
    part = h.root.child(VM_A).child("disk0")
    assert await guids(zfs, part) == await guids(zfs, src)

    meta = {"uuid": VM_A, "alias": "web0", "brand": "joyent"}
    for snap in ("s1", "s2", "s3"):
        status, out, err = await run(
            conn, protocol.format_command(Commit(VM_A, snap, ("disk0",))),
            json.dumps(meta).encode())
        assert status == 0, err
        assert json.loads(out)["complete"] is True
    status, out, _ = await run(conn, f"snapshots {VM_A}")
    listing = json.loads(out)
    assert [s["name"] for s in listing["snapshots"]] == ["s1", "s2", "s3"]
    assert all(s["complete"] and s["source"] == "cn:cn-a" for s in listing["snapshots"])
    cn_guids = await guids(zfs, src)
    assert {s["name"]: int(s["datasets"]["disk0"]["guid"]) for s in listing["snapshots"]} \
        == cn_guids
    assert listing["datasets"] == {"disk0": {"resume_token": None}}
    assert json.loads((await run(conn, f"metadata {VM_A} s2"))[1]) == meta

    # Restore s2 into a new dataset on the CN, then s3 incrementally on top.
    status, stream, err = await run(conn, protocol.format_command(Send(VM_A, "disk0", "s2")))
    assert status == 0, err
    back = Dataset(cn_pool.name).child("restored")
    await receive_bytes(zfs, back, stream, resumable=False)
    status, stream, err = await run(
        conn, protocol.format_command(Send(VM_A, "disk0", "s3", "s2")))
    assert status == 0, err
    await receive_bytes(zfs, back, stream, resumable=False)
    assert await guids(zfs, back) == {"s2": cn_guids["s2"], "s3": cn_guids["s3"]}
    if caps.receive_unmounted:  # the ZFS layer received it with -u
        done = await proc.run(["zfs", "mount", str(back)])
        assert done.ok, done.stderr
    files = mountpoint(cn_pool, back)
    assert {f: hashlib.sha256((files / f).read_bytes()).hexdigest() for f in digests} == digests

    assert h.metric("snapper_transfers_total", kind="receive", result="ok") == 3
    assert h.metric("snapper_transfers_total", kind="send", result="ok") == 2
    assert h.metric("snapper_received_bytes_total", kind="receive") > 3 << 20
    ends = [r for r in caplog.records if r.getMessage() == "transfer end"]
    assert len(ends) == 5
    fields = [vars(r) for r in ends]  # the log's extra fields land on the record
    assert all(f["vm"] == VM_A and f["bytes"] > 0 and f["seconds"] >= 0 and f["snapshot"]
               for f in fields)


@pytest.mark.zfs
async def test_openssh_client_push(zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool,
                                   make_harness: MakeHarness) -> None:
    if shutil.which("ssh") is None:
        pytest.skip("needs OpenSSH's ssh client")
    h = await make_harness(await zone_root(zfs, zone_pool), {"cn-a": [VM_A]})
    src, _ = await cn_vm(zfs, cn_pool, "vm", 2)

    async def ssh_push(spec: SendSpec, line: str) -> proc.Completed:
        """``zfs send | ssh zone receive``; the sender's status is checked on success."""
        r, w = proc.os_pipe()
        try:
            sender = await zfs.send(spec, stdout=w)
        finally:
            os.close(w)
        try:
            client = await proc.spawn(
                ["ssh", "-T", "-c", "aes128-gcm@openssh.com", "-o", "BatchMode=yes",
                 "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                 "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR",
                 "-i", str(h.keys["cn-a"]), "-p", str(h.port), "snapper@127.0.0.1", line],
                stdin=r)
        finally:
            os.close(r)
        done, sent = await asyncio.gather(client.wait(), sender.wait())
        # On a refusal the zone stops reading, so the sender may see EPIPE.
        assert sent.ok or not done.ok, sent.stderr
        return done

    done = await ssh_push(SendSpec(src.snapshot("s1")), f"receive {VM_A} disk0 s1")
    assert done.ok, done.stderr
    done = await ssh_push(SendSpec(src.snapshot("s2"), base=src.snapshot("s1")),
                          f"receive {VM_A} disk0 s2 --from s1")
    assert done.ok, done.stderr
    assert await guids(zfs, h.root.child(VM_A).child("disk0")) == await guids(zfs, src)
    # A refusal reaches an OpenSSH user as status 1 and one JSON line.
    done = await ssh_push(SendSpec(src.snapshot("s2"), base=src.snapshot("s1")),
                          f"receive {VM_A} disk0 s2 --from s1")
    assert done.returncode == 1 and err_code(done.stderr) == "ResourceExists"


@pytest.mark.zfs
async def test_truncated_and_corrupted_streams(zfs: Zfs, caps: Capabilities,
                                               cn_pool: FilePool, zone_pool: FilePool,
                                               make_harness: MakeHarness) -> None:
    h = await make_harness(await zone_root(zfs, zone_pool), {"cn-a": [VM_A]})
    src, _ = await cn_vm(zfs, cn_pool, "vm", 2)
    conn = await h.connect("cn-a")
    assert (await push(conn, zfs, src, VM_A, "s1"))[0] == 0
    part = h.root.child(VM_A).child("disk0")
    before = await guids(zfs, part)

    def truncate(b: bytes) -> bytes:
        return b[: len(b) // 2]

    def corrupt(b: bytes) -> bytes:
        out = bytearray(b)
        out[len(out) // 2] ^= 0xFF
        return bytes(out)

    def short_header(b: bytes) -> bytes:
        return b[:100]

    for mangle in (truncate, corrupt, short_header):
        status, _, err = await push(conn, zfs, src, VM_A, "s2", "s1", mangle=mangle)
        assert status == 1 and err_code(err) == "InvalidStream", (mangle.__name__, err)
        assert await guids(zfs, part) == before
        # OpenZFS (-s) keeps the partial state for a resume; start over instead.
        token = (await run(conn, f"resume-token {VM_A} disk0"))[1].decode().strip()
        if token != "-":
            assert caps.resumable_receive and mangle is not short_header
            assert (await run(conn, f"abort {VM_A} disk0"))[0] == 0
    assert h.metric("snapper_transfers_total", kind="receive", result="InvalidStream") == 3
    # The dataset is still usable: the whole increment goes in afterwards.
    assert (await push(conn, zfs, src, VM_A, "s2", "s1"))[0] == 0
    assert await guids(zfs, part) == await guids(zfs, src)


@pytest.mark.zfs
async def test_refused_before_zfs_sees_a_byte(zfs: Zfs, cn_pool: FilePool,
                                              zone_pool: FilePool, make_harness: MakeHarness,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    h = await make_harness(await zone_root(zfs, zone_pool), {"cn-a": [VM_A]})
    spy = ReceiveSpy(monkeypatch, h.zone.zfs)
    src, _ = await cn_vm(zfs, cn_pool, "vm", 3, size=64 << 10)
    conn = await h.connect("cn-a")
    assert (await push(conn, zfs, src, VM_A, "s1"))[0] == 0
    part = h.root.child(VM_A).child("disk0")
    before = await guids(zfs, part)
    cases = [
        # base s2 is not on the zone (found by fromguid)
        (dict(snap="s3", base="s2"), "IncrementalSourceMismatch"),
        # --from names a snapshot the zone lacks
        (dict(snap="s3", base="s2", from_arg="s2"), "IncrementalSourceMismatch"),
        # --from names a snapshot the stream is not from
        (dict(snap="s3", base="s2", from_arg="s1"), "IncrementalSourceMismatch"),
        # the stream is of s2, the command says s9
        (dict(snap="s2", base="s1", named="s9"), "StreamRefused"),
        # a full stream onto a dataset with snapshots
        (dict(snap="s2"), "ResourceExists"),
        # the same snapshot again
        (dict(snap="s1"), "ResourceExists"),
    ]
    for kw, code in cases:
        status, _, err = await push(conn, zfs, src, VM_A, **kw)  # type: ignore[arg-type]
        assert status == 1 and err_code(err) == code, (kw, err)
    # Not a send stream at all.
    status, _, err = await run(conn, f"receive {VM_A} disk0 s2", b"\x01" * 4096)
    assert (status, err_code(err)) == (1, "InvalidStream")
    assert spy.calls == [part]  # only the first, good push reached zfs receive
    assert await guids(zfs, part) == before


@pytest.mark.zfs
async def test_size_over_available_refused_up_front(
        zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool, make_harness: MakeHarness,
        monkeypatch: pytest.MonkeyPatch) -> None:
    h = await make_harness(await zone_root(zfs, zone_pool), {"cn-a": [VM_A]})
    spy = ReceiveSpy(monkeypatch, h.zone.zfs)
    src, _ = await cn_vm(zfs, cn_pool, "vm", 1, size=64 << 10)
    conn = await h.connect("cn-a")
    free = await zfs.available(h.root)
    status, _, err = await push(conn, zfs, src, VM_A, "s1", size=free)
    assert status == 1 and err_code(err) == "InsufficientSpace"
    assert "does not fit" in protocol.parse_error_line(err)[1]
    assert spy.calls == [] and not await zfs.exists(h.root.child(VM_A))
    assert h.metric("snapper_pool_free_bytes") == free
    # An honest estimate goes through.
    status, _, err = await push(conn, zfs, src, VM_A, "s1", size=1 << 20)
    assert status == 0, err


@pytest.mark.zfs
async def test_client_killed_mid_push_then_restart_cleanly(
        zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool, make_harness: MakeHarness) -> None:
    h = await make_harness(await zone_root(zfs, zone_pool), {"cn-a": [VM_A]})
    src, _ = await cn_vm(zfs, cn_pool, "vm", 2, size=4 << 20)
    conn = await h.connect("cn-a")
    assert (await push(conn, zfs, src, VM_A, "s1"))[0] == 0
    part = h.root.child(VM_A).child("disk0")
    before = await guids(zfs, part)
    stream = await send_bytes(zfs, SendSpec(src.snapshot("s2"), base=src.snapshot("s1")))

    doomed = await h.connect("cn-a")
    process = await doomed.create_process(f"receive {VM_A} disk0 s2", encoding=None)
    half = len(stream) // 2
    process.stdin.write(stream[:half])
    await wait_for(lambda: any(t.bytes >= half for t in h.zone.transfers.active()))
    # Delete is refused while the base is in use.
    status, _, err = await run(conn, f"delete {VM_A} s1")
    assert (status, err_code(err)) == (1, "ResourceBusy")
    doomed.abort()  # the CN dies: no EOF, the TCP connection just goes
    await wait_for(lambda: h.metric("snapper_transfers_total", kind="receive",
                                    result="ClientDisconnected") == 1)
    assert h.zone.transfers.active() == []
    assert await guids(zfs, part) == before
    # zfs-fuse keeps nothing; OpenZFS (-s) keeps a token the next push may resume.
    token = (await run(conn, f"resume-token {VM_A} disk0"))[1].decode().strip()
    if token != "-":
        assert (await run(conn, f"abort {VM_A} disk0"))[0] == 0
    status, _, err = await push(conn, zfs, src, VM_A, "s2", "s1")
    assert status == 0, err
    assert await guids(zfs, part) == await guids(zfs, src)


@pytest.mark.zfs
@pytest.mark.openzfs
async def test_resume_after_interrupt(zfs: Zfs, caps: Capabilities, cn_pool: FilePool,
                                      zone_pool: FilePool, make_harness: MakeHarness) -> None:
    require(caps, "resumable_receive")
    h = await make_harness(await zone_root(zfs, zone_pool), {"cn-a": [VM_A]})
    src, _ = await cn_vm(zfs, cn_pool, "vm", 2, size=4 << 20)
    conn = await h.connect("cn-a")
    assert (await push(conn, zfs, src, VM_A, "s1"))[0] == 0
    stream = await send_bytes(zfs, SendSpec(src.snapshot("s2"), base=src.snapshot("s1")))
    status, _, err = await run(conn, f"receive {VM_A} disk0 s2", stream[: len(stream) * 2 // 3])
    assert (status, err_code(err)) == (1, "InvalidStream")
    token = (await run(conn, f"resume-token {VM_A} disk0"))[1].decode().strip()
    assert token != "-"
    listing = json.loads((await run(conn, f"snapshots {VM_A}"))[1])
    assert listing["datasets"]["disk0"]["resume_token"] == token
    # A fresh (non-resume) stream is refused while the partial state exists.
    status, _, err = await push(conn, zfs, src, VM_A, "s2", "s1")
    assert (status, err_code(err)) == (1, "PartialReceiveExists")
    rest = await send_bytes(zfs, SendSpec(resume_token=token))
    status, _, err = await run(conn, f"receive {VM_A} disk0 s2 --resume", rest)
    assert status == 0, err
    assert await guids(zfs, h.root.child(VM_A).child("disk0")) == await guids(zfs, src)


@pytest.mark.zfs
async def test_abort_and_tokens_on_this_tier(zfs: Zfs, caps: Capabilities,
                                             zone_pool: FilePool,
                                             make_harness: MakeHarness) -> None:
    h = await make_harness(await zone_root(zfs, zone_pool), {"cn-a": [VM_A]})
    conn = await h.connect("cn-a")
    assert await run(conn, f"resume-token {VM_A} disk0") == (0, b"-\n", "")
    status, _, err = await run(conn, f"abort {VM_A} disk0")
    if not caps.resumable_receive:
        assert (status, err_code(err)) == (1, "NotImplemented")
    else:
        assert (status, err_code(err)) == (1, "ResourceNotFound")
    assert json.loads((await run(conn, f"snapshots {VM_A}"))[1]) == {
        "vm": VM_A, "snapshots": [], "datasets": {}, "tombstones": [], "in_use": []}


@pytest.mark.zfs
async def test_commit_and_send_rules(zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool,
                                     make_harness: MakeHarness) -> None:
    h = await make_harness(await zone_root(zfs, zone_pool), {"cn-a": [VM_A]})
    src, _ = await cn_vm(zfs, cn_pool, "vm", 1, size=64 << 10)
    conn = await h.connect("cn-a")
    assert (await push(conn, zfs, src, VM_A, "s1"))[0] == 0
    # Not complete yet: a CN may not restore it, a peer may copy it.
    status, _, err = await run(conn, f"send {VM_A} disk0 s1")
    assert (status, err_code(err)) == (1, "SnapshotIncomplete")
    peer = await h.connect("peer")
    status, stream, err = await run(peer, f"send {VM_A} disk0 s1")
    assert status == 0 and len(stream) > 64 << 10, err
    status, _, err = await run(conn, f"commit {VM_A} s1 disk0,disk1")
    assert (status, err_code(err)) == (1, "ResourceNotFound")
    big = json.dumps({"x": "y" * h.zone.config.metadata_max_bytes}).encode()
    status, _, err = await run(conn, f"commit {VM_A} s1 disk0", big)
    assert (status, err_code(err)) == (1, "MetadataTooLarge")
    status, _, err = await run(conn, f"commit {VM_A} s1 disk0", b"[1, 2]")
    assert (status, err_code(err)) == (1, "InvalidArgument")
    # Nested past any real document (json.loads would recurse out): refused, not a crash.
    for deep in (b"[" * 5000 + b"]" * 5000, b'{"a":' * 100 + b"1" + b"}" * 100):
        status, _, err = await run(conn, f"commit {VM_A} s1 disk0", deep)
        assert (status, err_code(err)) == (1, "InvalidArgument"), err
        assert "nests deeper" in protocol.parse_error_line(err)[1]
    assert (await run(conn, f"commit {VM_A} s1 disk0"))[0] == 0
    assert (await run(conn, f"metadata {VM_A} s1"))[1] == b"null\n"
    op = await h.connect("operator")
    assert json.loads((await run(op, f"snapshots {VM_A}"))[1])["snapshots"][0]["complete"]
    assert (await run(op, f"delete {VM_A} s1"))[0] == 0
    assert json.loads((await run(op, f"snapshots {VM_A}"))[1])["snapshots"] == []


@pytest.mark.zfs
async def test_sixteen_concurrent_pushes_queue_and_land(
        zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool, make_harness: MakeHarness,
        monkeypatch: pytest.MonkeyPatch) -> None:
    vms = [str(uuid.UUID(int=0x1000 + i, version=4)) for i in range(16)]
    cns = {f"cn-{i:02d}": [vm] for i, vm in enumerate(vms)}
    h = await make_harness(await zone_root(zfs, zone_pool), cns, max_concurrent_receives=4)
    peak = 0
    real_start = h.zone.transfers.start

    def start(*args: Any, **kw: Any) -> Transfer:
        nonlocal peak
        t = real_start(*args, **kw)
        peak = max(peak, len(h.zone.transfers.active()))
        return t

    monkeypatch.setattr(h.zone.transfers, "start", start)
    sources = [(await cn_vm(zfs, cn_pool, f"vm{i}", 1, size=512 << 10))[0]
               for i in range(16)]

    async def one(i: int) -> tuple[int, bytes, str]:
        conn = await h.connect(f"cn-{i:02d}")
        return await push(conn, zfs, sources[i], vms[i], "s1")

    results = await asyncio.gather(*(one(i) for i in range(16)))
    assert [r[0] for r in results] == [0] * 16, [r[2] for r in results if r[0]]
    assert 2 <= peak <= 4
    for i, vm in enumerate(vms):
        got = await guids(zfs, h.root.child(vm).child("disk0"))
        assert got == await guids(zfs, sources[i])
    assert h.metric("snapper_transfers_total", kind="receive", result="ok") == 16


@pytest.mark.zfs
async def test_peer_mirror_in_is_its_own_kind(zfs: Zfs, cn_pool: FilePool,
                                              zone_pool: FilePool,
                                              make_harness: MakeHarness) -> None:
    h = await make_harness(await zone_root(zfs, zone_pool), {"cn-a": [VM_A]})
    src, _ = await cn_vm(zfs, cn_pool, "vm", 1, size=64 << 10)
    peer = await h.connect("peer")
    assert (await push(peer, zfs, src, VM_A, "s1"))[0] == 0
    assert h.metric("snapper_transfers_total", kind="mirror-in", result="ok") == 1
    status, out, _ = await run(peer, f"commit {VM_A} s1 disk0")
    assert status == 0 and json.loads(out)["source"] == f"zone:{PEER_UUID}"
    assert await guids(zfs, h.root.child(VM_A).child("disk0")) == await guids(zfs, src)
    assert Snapshot(h.root.child(VM_A), "s1")  # container marker named inside the root


@pytest.mark.zfs
async def test_a_debris_destroy_planned_before_the_commit_is_refused_after_it(
        zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool, make_harness: MakeHarness) -> None:
    """The soak's race, step by step. A zone is listed while a third zone commits
    a pipelined push on it: the part is there, its marker not yet, and the lease
    that names it in use has ended by the time in_use is read. The plan calls
    the part debris; the commit lands; then the destroy arrives. The zone checks
    again under the VM lock and refuses, so the acknowledged copy stays."""
    h = await make_harness(await zone_root(zfs, zone_pool), {"cn-a": [VM_A]})
    src, _ = await cn_vm(zfs, cn_pool, "vm", 1, size=64 << 10)
    peer = await h.connect("peer")
    assert (await push(peer, zfs, src, VM_A, "s1"))[0] == 0
    listed, _ = from_document(ZONE_UUID, await h.zone.store.document(VM_A))
    stale = reconcile(listed, ZoneInventory(PEER_UUID, {}))
    debris = [a for a in stale if isinstance(a, Delete)]
    assert [(a.dataset, a.reason) for a in debris] == [("disk0", Reason.DEBRIS)]
    destroy = f"destroy {VM_A} s1 --dataset disk0 --guid {debris[0].guid}"
    here = h.zone.endpoint()
    # Before the commit the part is in use, for a peer's destroy and the zone's own.
    status, _, err = await run(peer, destroy)
    assert (status, err_code(err)) == (1, "ResourceBusy")
    with pytest.raises(SnapshotInUse):
        await here.destroy(VM_A, "s1", "disk0", debris[0].guid)
    assert (await run(peer, f"commit {VM_A} s1 disk0"))[0] == 0
    status, _, err = await run(peer, destroy)
    assert (status, err_code(err)) == (1, "PartComplete")
    with pytest.raises(PartComplete):
        await here.destroy(VM_A, "s1", "disk0", debris[0].guid)
    assert [(s.name, s.complete) for s in await h.zone.store.snapshots(VM_A)] == [("s1", True)]
    assert await guids(zfs, h.root.child(VM_A).child("disk0")) == await guids(zfs, src)


@pytest.mark.zfs
async def test_client_leaving_the_queue_frees_its_place(
        zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool, make_harness: MakeHarness) -> None:
    h = await make_harness(await zone_root(zfs, zone_pool), {"cn-a": [VM_A], "cn-b": [VM_B]},
                           max_concurrent_receives=1)
    src, _ = await cn_vm(zfs, cn_pool, "vm", 1, size=1 << 20)
    stream = await send_bytes(zfs, SendSpec(src.snapshot("s1")))
    first = await (await h.connect("cn-a")).create_process(
        f"receive {VM_A} disk0 s1", encoding=None)
    first.stdin.write(stream[: len(stream) // 2])
    await wait_for(lambda: any(t.vm == VM_A for t in h.zone.transfers.active()))
    waiting = await h.connect("cn-b")
    await waiting.create_process(f"receive {VM_B} disk0 s1", encoding=None)
    slots = h.zone.receive_slots
    await wait_for(lambda: len(getattr(slots, "_waiters", None) or ()) == 1)
    waiting.abort()
    await wait_for(lambda: h.metric("snapper_commands_total", verb="receive",
                                    result="ClientDisconnected") == 1)
    assert len(getattr(slots, "_waiters", None) or ()) == 0
    first.stdin.write(stream[len(stream) // 2:])
    first.stdin.write_eof()
    done = await first.wait()
    assert done.exit_status == 0
    assert h.metric("snapper_transfers_total", kind="receive", result="ok") == 1


@pytest.mark.zfs
async def test_guid_not_the_streams_is_destroyed(
        zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool, make_harness: MakeHarness,
        monkeypatch: pytest.MonkeyPatch) -> None:
    h = await make_harness(await zone_root(zfs, zone_pool), {"cn-a": [VM_A]})
    src, _ = await cn_vm(zfs, cn_pool, "vm", 2, size=64 << 10)
    conn = await h.connect("cn-a")
    assert (await push(conn, zfs, src, VM_A, "s1"))[0] == 0
    from snapper_zone.zfs.sendstream import read_begin as real

    async def lying_header(read: Callable[[int], Awaitable[bytes]]) -> tuple[StreamBegin, bytes]:
        # What ZFS made must match what the header promised; make them differ.
        begin, raw = await real(read)
        return dataclasses.replace(begin, toguid=begin.toguid ^ 1), raw

    monkeypatch.setattr(transfer_local, "read_begin", lying_header)
    status, _, err = await push(conn, zfs, src, VM_A, "s2", "s1")
    assert (status, err_code(err)) == (1, "InvalidStream")
    assert "destroyed" in protocol.parse_error_line(err)[1]
    assert list(await guids(zfs, h.root.child(VM_A).child("disk0"))) == ["s1"]


@pytest.mark.zfs
async def test_an_idle_receive_is_cut_off_and_frees_its_vm_and_slot(
        zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool, make_harness: MakeHarness) -> None:
    """``sleep 200 | ssh zone receive ...`` no longer holds the VM lock and a receive
    slot for as long as it likes: after stream_idle_seconds it fails with StreamIdle,
    nothing of it is kept, and the VM's next push goes through."""
    h = await make_harness(await zone_root(zfs, zone_pool), {"cn-a": [VM_A]},
                           max_concurrent_receives=1, stream_idle_seconds=1)
    src, _ = await cn_vm(zfs, cn_pool, "vm", 1, size=64 << 10)
    stream = await send_bytes(zfs, SendSpec(src.snapshot("s1")))
    conn = await h.connect("cn-a")
    idle = await conn.create_process(f"receive {VM_A} disk0 s1", encoding=None)
    idle.stdin.write(stream[:1000])  # the header, then nothing: the client stalls
    loop = asyncio.get_running_loop()
    started = loop.time()
    done = await asyncio.wait_for(idle.wait(), 30)
    waited = loop.time() - started
    assert isinstance(done.stderr, bytes)
    err = done.stderr.decode()
    assert (done.exit_status, err_code(err)) == (1, "StreamIdle"), err
    assert 0.9 <= waited < 10, waited
    assert h.metric("snapper_transfers_total", kind="receive", result="StreamIdle") == 1
    assert h.zone.transfers.active() == [] and not h.zone.vm_locks[VM_A].locked()
    part = h.root.child(VM_A).child("disk0")
    assert not await zfs.exists(part) or "s1" not in await guids(zfs, part)
    # The only receive slot and the VM lock are free: the real push lands.
    status, _, err = await run(conn, f"receive {VM_A} disk0 s1", stream)
    assert status == 0, err
    assert await guids(zfs, h.root.child(VM_A).child("disk0")) == await guids(zfs, src)
