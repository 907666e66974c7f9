"""The one receive path (``snapper_zone.transfer``): what every stream into ZFS passes.

- A peer zone answering ``send`` with a stream that is not the one asked for
  (``-R``, ``-p``, another snapshot, another guid) is refused before ``zfs
  receive`` runs, and nothing is left on the zone.
- The plain-OpenSSH operator workflow: ``receive`` in one ``ssh``, ``commit``
  in another, minutes later; the pending parts are a lease, not a connection
  (unless the client asks for ``--session``, as snapper's own client does).
- ``vet_stream`` is pure: every refusal is checked without I/O.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import pytest
from hypothesis import given
from hypothesis import strategies as st

from replication.executor import Executor
from replication.reconcile import SendFull, SnapRef
from snapper_zone.errors import (
    DatasetExists,
    IncrementalSourceMismatch,
    PartialReceiveExists,
    SnapperError,
)
from snapper_zone.fleet.pools import FilePool
from snapper_zone.transfer.local import Expect, StreamRefused, vet_stream
from snapper_zone.transfer.registry import PENDING_TTL
from snapper_zone.transfer.remote import ZoneClient
from snapper_zone.zfs import proc
from snapper_zone.zfs.names import Dataset
from snapper_zone.zfs.sendstream import Feature, HeaderType, StreamBegin
from snapper_zone.zfs.zfs import STREAM_FEATURES, SendSpec, SnapshotInfo, Zfs
from tests.helpers import send_bytes
from tests.test_sshserver import (
    PEER_UUID,
    VM_A,
    MakeHarness,
    ReceiveSpy,
    cn_vm,
    guids,
    make_harness,
    zone_root,
)

__all__ = ["make_harness"]  # the fixture, imported for pytest

# -- vet_stream: pure ------------------------------------------------------------------


def _begin(snap: str, toguid: int, fromguid: int = 0, *, compound: bool = False,
           featureflags: int = 0) -> StreamBegin:
    return StreamBegin(toguid=toguid, fromguid=fromguid, toname=f"pool/ds@{snap}",
                       creation_time=0, objset_type=2, flags=0, featureflags=featureflags,
                       hdrtype=HeaderType.COMPOUNDSTREAM if compound
                       else HeaderType.SUBSTREAM, byteswapped=False, payload_len=0)


def _snaps(*pairs: tuple[str, int]) -> list[SnapshotInfo]:
    ds = Dataset("zone/vm/disk0")
    return [SnapshotInfo(ds.snapshot(n), g, i + 1, 0, 0, 0, 0) for i, (n, g) in enumerate(pairs)]


names = st.sampled_from(["s1", "s2", "s3", "s4"])
guid_values = st.integers(min_value=1, max_value=2**64 - 1)


@given(names, guid_values, st.lists(st.tuples(names, guid_values), max_size=4, unique_by=lambda
                                      t: t[0]), st.booleans())
def test_compound_streams_are_always_refused(snap: str, guid: int,
                                             have: list[tuple[str, int]],
                                             incremental: bool) -> None:
    begin = _begin(snap, guid, have[-1][1] if incremental and have else 0, compound=True)
    with pytest.raises(StreamRefused, match="compound"):
        vet_stream(begin, Expect(snap), "t", _snaps(*have), None)


@given(names, names, guid_values)
def test_a_stream_of_another_snapshot_is_refused(named: str, carried: str, guid: int) -> None:
    begin = _begin(carried, guid)
    if named == carried:
        assert vet_stream(begin, Expect(named), "t", [], None) is None
    else:
        with pytest.raises(StreamRefused, match="the command names"):
            vet_stream(begin, Expect(named), "t", [], None)


@given(guid_values, guid_values)
def test_a_stream_of_another_guid_is_refused(carried: int, expected: int) -> None:
    begin = _begin("s1", carried)
    if carried == expected:
        assert vet_stream(begin, Expect("s1", toguid=expected), "t", [], None) is None
    else:
        with pytest.raises(StreamRefused, match="guid"):
            vet_stream(begin, Expect("s1", toguid=expected), "t", [], None)


@given(guid_values)
def test_redacted_streams_are_refused(guid: int) -> None:
    with pytest.raises(StreamRefused, match="redacted"):
        vet_stream(_begin("s1", guid, featureflags=int(Feature.REDACTED)), Expect("s1"), "t",
                   [], None, frozenset(STREAM_FEATURES))
    assert vet_stream(_begin("s1", guid), Expect("s1"), "t", [], None) is None


@given(st.sampled_from([(Feature.RAW, "raw"), (Feature.COMPRESSED, "compressed")]),
       st.sets(st.sampled_from(STREAM_FEATURES)), guid_values)
def test_raw_and_compressed_streams_only_where_zfs_takes_them(
        flag: tuple[Feature, str], features: set[str], guid: int) -> None:
    """A raw (encrypted) or compressed stream is received exactly where this host's
    ZFS has that feature; elsewhere it is refused before ZFS sees a byte."""
    bit, name = flag
    begin = _begin("s1", guid, featureflags=int(bit | Feature.LARGE_BLOCKS))
    if name in features:
        assert vet_stream(begin, Expect("s1"), "t", [], None, frozenset(features)) is None
    else:
        with pytest.raises(StreamRefused, match=name):
            vet_stream(begin, Expect("s1"), "t", [], None, frozenset(features))


def test_incremental_rules() -> None:
    have = _snaps(("s1", 11), ("s2", 22))
    assert vet_stream(_begin("s3", 33, 22), Expect("s3"), "t", have, None) == have[1]
    assert vet_stream(_begin("s3", 33, 22), Expect("s3", "s2"), "t", have, None) == have[1]
    refusals: list[tuple[StreamBegin, Expect, type[SnapperError]]] = [
        (_begin("s3", 33, 11), Expect("s3"), IncrementalSourceMismatch),  # base not newest
        (_begin("s3", 33, 99), Expect("s3"), IncrementalSourceMismatch),  # base unknown
        (_begin("s3", 33, 22), Expect("s3", "s1"), IncrementalSourceMismatch),  # --from lies
        (_begin("s3", 33), Expect("s3"), DatasetExists),  # full onto snapshots
        (_begin("s2", 22, 11), Expect("s2"), DatasetExists),  # already here
    ]
    for begin, expect, err in refusals:
        with pytest.raises(err):
            vet_stream(begin, expect, "t", have, None)
    with pytest.raises(PartialReceiveExists):
        vet_stream(_begin("s3", 33, 22), Expect("s3"), "t", have, "1-abc-def")


# -- a peer that answers send with the wrong stream ---------------------------------------


class _EvilPeer:
    """An SSH server on 127.0.0.1 that answers every command with fixed bytes."""

    def __init__(self, answer: bytes, host_key: asyncssh.SSHKey) -> None:
        self.answer = answer
        self.host_key = host_key
        self.acceptor: asyncssh.SSHAcceptor | None = None

    async def _handle(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        process.stdout.write(self.answer)
        process.exit(0)

    async def start(self) -> int:
        class Open(asyncssh.SSHServer):
            def begin_auth(self, username: str) -> bool:
                return False  # no authentication: it is the client under test here

        self.acceptor = await asyncssh.create_server(
            Open, "127.0.0.1", 0, server_host_keys=[self.host_key],
            process_factory=self._handle, encoding=None)
        port: int = self.acceptor.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        if self.acceptor is not None:
            self.acceptor.close()
            await self.acceptor.wait_closed()


@pytest.fixture
async def host_key() -> AsyncIterator[asyncssh.SSHKey]:
    yield asyncssh.generate_private_key("ssh-ed25519")


async def _raw_send(zfs: Zfs, *args: str) -> bytes:
    done = await proc.run(["zfs", "send", *args], timeout=60)
    if not done.ok:
        pytest.skip(f"this tier's zfs send lacks {args[0]}: {done.stderr.strip()[:120]}")
    return done.stdout


@pytest.mark.zfs
async def test_a_peer_answering_send_with_the_wrong_stream_is_refused(
        zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool, make_harness: MakeHarness,
        host_key: asyncssh.SSHKey, monkeypatch: pytest.MonkeyPatch) -> None:
    h = await make_harness(await zone_root(zfs, zone_pool), {"cn-a": [VM_A]})
    spy = ReceiveSpy(monkeypatch, h.zone.zfs)
    src, _ = await cn_vm(zfs, cn_pool, "vm", 2, size=64 << 10)
    other, _ = await cn_vm(zfs, cn_pool, "other", 2, size=64 << 10)  # same names, other guids
    await zfs.create(src.child("child"))
    await zfs.snapshot([src.snapshot("s3")], recursive=True)
    want = SnapRef("s2", (await guids(zfs, src))["s2"])
    streams = {
        "-R": await _raw_send(zfs, "-R", str(src.snapshot("s3"))),
        "-p": await _raw_send(zfs, "-p", str(src.snapshot("s2"))),
        "wrong snapshot": await send_bytes(zfs, SendSpec(src.snapshot("s1"))),
        "wrong guid": await send_bytes(zfs, SendSpec(other.snapshot("s2"))),
    }
    before = [str(d.dataset) for d in await zfs.datasets(Dataset(zone_pool.name))]
    for what, data in streams.items():
        peer = _EvilPeer(data, host_key)
        port = await peer.start()
        try:
            async with ZoneClient("127.0.0.1", port, h.keys["peer"],
                                  host_key=host_key.convert_to_public()) as client:
                ex = Executor(h.zone, VM_A, PEER_UUID, client)
                target = want if what != "-R" else SnapRef("s3", (await guids(zfs, src))["s3"])
                with pytest.raises(SnapperError) as info:
                    await ex.run(SendFull("disk0", PEER_UUID, h.zone.config.uuid, target))
                assert info.value.code == "StreamRefused", (what, info.value)
        finally:
            await peer.stop()
    assert spy.calls == []  # zfs receive never ran
    assert [str(d.dataset) for d in await zfs.datasets(Dataset(zone_pool.name))] == before
    assert h.zone.transfers.active() == []


# -- plain OpenSSH: receive in one ssh, commit in another ---------------------------------


def _ssh(key: Path, port: int, line: str) -> list[str]:
    return ["ssh", "-T", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes",
            "-o", "LogLevel=ERROR", "-o", "ControlMaster=no", "-o", "ControlPath=none",
            "-i", str(key), "-p", str(port), "snapper@127.0.0.1", line]


@pytest.mark.zfs
async def test_openssh_receive_then_commit_from_another_connection_minutes_later(
        zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool,
        make_harness: MakeHarness) -> None:
    if shutil.which("ssh") is None:
        pytest.skip("needs OpenSSH's ssh client")
    h = await make_harness(await zone_root(zfs, zone_pool), {"cn-a": [VM_A]})
    now = [1000.0]
    h.zone.transfers.clock = lambda: now[0]  # the lease's clock, advanced below
    src, _ = await cn_vm(zfs, cn_pool, "vm", 2, size=256 << 10)
    key = h.keys["cn-a"]

    async def ssh(line: str, data: bytes = b"") -> proc.Completed:
        done = await proc.run(_ssh(key, h.port, line), input=data, timeout=60)
        return done

    for snap, base in (("s1", None), ("s2", "s1")):
        stream = await send_bytes(zfs, SendSpec(src.snapshot(snap),
                                                src.snapshot(base) if base else None))
        line = f"receive {VM_A} disk0 {snap}" + (f" --from {base}" if base else "")
        done = await ssh(line, stream)  # one ssh: it exits, its connection closes
        assert done.ok, done.stderr
        said = json.loads(done.stdout)["pending"]
        assert (said["snapshot"], said["dataset"], said["lease_seconds"]) == \
            (snap, "disk0", int(PENDING_TTL))
        assert int(said["guid"]) == (await guids(zfs, src))[snap]
        now[0] += PENDING_TTL * 0.8  # minutes later, inside the lease
        assert snap in h.zone.transfers.in_use(VM_A)  # not debris: still awaited
        done = await ssh(f"commit {VM_A} {snap} disk0", b'{"by": "hand"}')
        assert done.ok, done.stderr
        assert json.loads(done.stdout)["complete"] is True, done.stdout
        assert snap not in h.zone.transfers.in_use(VM_A)
    part = h.root.child(VM_A).child("disk0")
    assert await guids(zfs, part) == await guids(zfs, src)
    # A lease ends by itself when no commit comes.
    stream = await send_bytes(zfs, SendSpec(src.snapshot("s2"), src.snapshot("s1")))
    await zfs.snapshot([src.snapshot("s3")])
    stream = await send_bytes(zfs, SendSpec(src.snapshot("s3"), src.snapshot("s2")))
    assert (await ssh(f"receive {VM_A} disk0 s3 --from s2", stream)).ok
    assert "s3" in h.zone.transfers.in_use(VM_A)
    now[0] += PENDING_TTL + 1
    assert "s3" not in h.zone.transfers.in_use(VM_A)
    # With --session (snapper's own client) the parts end with the connection:
    # a push that died before its commit leaves nothing awaited, at once.
    await zfs.snapshot([src.snapshot("s4")])
    stream = await send_bytes(zfs, SendSpec(src.snapshot("s4"), src.snapshot("s3")))
    done = await ssh(f"receive {VM_A} disk0 s4 --from s3 --session", stream)
    assert done.ok, done.stderr
    assert json.loads(done.stdout)["pending"]["lease_seconds"] is None
    assert "s4" not in h.zone.transfers.in_use(VM_A)


@pytest.mark.zfs
@pytest.mark.openzfs
async def test_openssh_resume_token_and_abort_from_separate_connections(
        zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool, make_harness: MakeHarness) -> None:
    if shutil.which("ssh") is None:
        pytest.skip("needs OpenSSH's ssh client")
    caps = await zfs.capabilities()
    if not caps.resumable_receive:
        pytest.skip(f"needs resumable_receive: this tier's ZFS ({caps.flavour}) lacks it")
    h = await make_harness(await zone_root(zfs, zone_pool), {"cn-a": [VM_A]})
    src, _ = await cn_vm(zfs, cn_pool, "vm", 2, size=4 << 20)
    key = h.keys["cn-a"]

    async def ssh(line: str, data: bytes = b"") -> proc.Completed:
        return await proc.run(_ssh(key, h.port, line), input=data, timeout=120)

    assert (await ssh(f"receive {VM_A} disk0 s1",
                      await send_bytes(zfs, SendSpec(src.snapshot("s1"))))).ok
    full = await send_bytes(zfs, SendSpec(src.snapshot("s2"), src.snapshot("s1")))
    cut = await ssh(f"receive {VM_A} disk0 s2 --from s1", full[: len(full) // 2])
    assert not cut.ok, cut.stderr  # a truncated stream: the partial state stays
    token = (await ssh(f"resume-token {VM_A} disk0")).stdout.decode().strip()
    assert token not in ("", "-")
    assert (await ssh(f"abort {VM_A} disk0")).ok
    assert (await ssh(f"resume-token {VM_A} disk0")).stdout.strip() == b"-"
    assert list(await guids(zfs, h.root.child(VM_A).child("disk0"))) == ["s1"]
    assert "s2" not in h.zone.transfers.in_use(VM_A)
