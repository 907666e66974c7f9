"""A zone's data plane under a client that tries to starve or fill it (issue 13).

Caps on connections, channels and sends; receive slots shared fairly; quotas
per VM and per CN; ``--size`` enforced; a stream's properties never applied.
Real asyncssh on loopback, real zfs-fuse (OpenZFS in the VM tier); the slot
arithmetic is pure and checked with hypothesis.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replication.peers import pair_of
from replication.registration import zone_record
from snapper_zone.cn.client import CnClient
from snapper_zone.common.config import ConfigError, parse_config
from snapper_zone.common.httpsig import Signer, signing_session
from snapper_zone.daemon.sshserver import ENCRYPTION_ALGS
from snapper_zone.fleet.local import LocalFleet, LocalZone
from snapper_zone.fleet.pools import FilePool
from snapper_zone.transfer import local as transfer_local
from snapper_zone.transfer.local import ReceiveSlots
from snapper_zone.transfer.remote import ZoneClient
from snapper_zone.wire import protocol
from snapper_zone.zfs import proc
from snapper_zone.zfs.names import Dataset
from snapper_zone.zfs.zfs import (
    PROTECTED_PROPS,
    SAFE_CONTAINER_PROPS,
    SendSpec,
    Zfs,
    parse_capabilities,
    protected_props,
)
from tests.conftest import ZfsTier
from tests.helpers import send_bytes, wait_for, wait_until, write_random
from tests.test_sshserver import (
    VM_A,
    VM_B,
    Harness,
    MakeHarness,
    cn_vm,
    err_code,
    guids,
    make_harness,
    push,
    run,
    zone_root,
)
from tests.test_zfs_pure import OPENZFS_USAGE, ZFS_FUSE_USAGE

__all__ = ["make_harness"]  # the fixture, imported for pytest

VM_C = "0c3cdb2c-4c3b-4f05-9d55-2f1e1f5f8f01"
VM_D = "a1b5f2a6-9f55-4c8e-8a3e-3b0d6d1c7e02"
VM_E = "5d0e7c43-8f1a-4b6e-9c2d-7a8b9c0d1e03"  # mapped to no CN: only a peer sends it


def reason_code(exc: asyncssh.Error) -> str:
    return protocol.parse_error_line(exc.reason)[0]


# -- pure: the slot arithmetic ------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.data())
def test_receive_slots_bounded_fair_and_never_stuck(total: int, data: st.DataObject) -> None:
    """Whatever clients ask in whatever order: no more than ``total`` CN slots, no
    client over its share, mirror-in never behind a CN, and every waiter that
    could run does."""
    per = data.draw(st.integers(1, total))
    mirror_total = data.draw(st.integers(1, 3))
    who = st.sampled_from(["cn:a", "cn:b", "cn:c", "zone:p"])
    asks = data.draw(st.lists(who, min_size=1, max_size=16))

    async def scenario() -> None:
        slots = ReceiveSlots(total, per, mirror_total)
        held: list[tuple[bool, str]] = []
        tasks = []
        for w in asks:
            mirror = w.startswith("zone:")
            t = asyncio.ensure_future(slots.acquire(mirror, w))
            tasks.append((mirror, w, t))
        def settled() -> bool:
            # Every acquire has taken its slot or waits in line, not yet granted.
            running = sum(not t.done() for _m, _w, t in tasks)
            return running == sum(not f.done() for _m, _w, f in slots._waiters)

        await wait_for(settled, 10, "every acquire at its slot or in line", poll=0)
        while True:
            for mirror, w, t in list(tasks):
                if t.done():
                    tasks.remove((mirror, w, t))
                    held.append((mirror, w))
            cn = [w for m, w in held if not m]
            assert len(cn) <= total
            assert all(cn.count(w) <= per for w in set(cn))
            assert sum(m for m, _ in held) <= mirror_total
            # Nobody waits who could take a slot now.
            for mirror, w, _t in tasks:
                assert not slots._fits(mirror, w)
            if not held:
                assert not tasks
                return
            i = data.draw(st.integers(0, len(held) - 1))
            mirror, w = held.pop(i)
            slots.release(mirror, w)
            await wait_for(settled, 10, "the released slot taken by whoever fits", poll=0)

    asyncio.run(scenario())


def test_receive_exclude_is_a_capability() -> None:
    assert parse_capabilities(OPENZFS_USAGE, "Linux", has_dev_zfs=True).receive_exclude
    assert not parse_capabilities(ZFS_FUSE_USAGE, "Linux", has_dev_zfs=False).receive_exclude
    # OpenZFS fails a zvol's receive given -x of a filesystem-only property.
    assert protected_props(volume=True) == ("refreservation",)
    assert set(protected_props(volume=False)) == set(PROTECTED_PROPS)


async def test_receive_argv_excludes_where_zfs_can(zfs: Zfs) -> None:
    argv = await zfs.receive_argv(Dataset("p/r/vm/disk0"), exclude=PROTECTED_PROPS)
    if (await zfs.capabilities()).receive_exclude:
        assert [argv[i + 1] for i, a in enumerate(argv) if a == "-x"] == list(PROTECTED_PROPS)
    else:
        assert "-x" not in argv  # overridden after the receive instead


# -- pure: config -------------------------------------------------------------------


def _config(tmp_path: Path, **extra: object) -> dict[str, object]:
    return {"uuid": "bd932c2b-caae-495a-abf2-fb958111c3fb", "name": "z", "root": "p/r",
            "ssh": {"port": 0, "host_key": str(tmp_path / "k")}, "http": {"port": 0},
            "keys": [], **extra}


def test_advertise_address_never_a_wildcard(tmp_path: Path) -> None:
    coord = {"coordinator_url": "http://coord:8480"}
    for host in ("0.0.0.0", "::"):
        with pytest.raises(ConfigError, match=r"ssh\.advertise_host.*every interface"):
            parse_config(_config(tmp_path, ssh={"port": 0, "host_key": "k",
                                                "advertise_host": host}))
        # Binding every interface is fine; registering it is not.
        with pytest.raises(ConfigError, match=r"http\.advertise_host"):
            parse_config(_config(tmp_path, http={"port": 0, "host": host}, **coord))
    cfg = parse_config(_config(
        tmp_path, ssh={"port": 0, "host_key": "k", "host": "0.0.0.0",
                       "advertise_host": "10.1.2.3"},
        http={"port": 0, "host": "::", "advertise_host": "fd00::5"}, **coord))
    assert cfg.ssh.advertised == "10.1.2.3"
    assert cfg.http.advertised_url(8080) == "http://[fd00::5]:8080"
    # Without a coordinator nothing is registered: a wildcard bind needs no advertise.
    assert parse_config(_config(tmp_path, ssh={"port": 0, "host_key": "k",
                                               "host": "0.0.0.0"})).ssh.advertised == "0.0.0.0"


def test_limits_config(tmp_path: Path) -> None:
    cfg = parse_config(_config(tmp_path, max_concurrent_receives=5))
    assert cfg.receives_per_principal == 3 and cfg.mirror_receives == 5
    assert cfg.limits.vm_quota_bytes == 0 and cfg.limits.max_sends_per_principal == 4
    cfg = parse_config(_config(tmp_path, limits={"max_receives_per_principal": 1,
                                                 "cn_quota_bytes": 1 << 30,
                                                 "connection_idle_seconds": 2.5}))
    assert cfg.receives_per_principal == 1 and cfg.limits.cn_quota_bytes == 1 << 30
    assert cfg.limits.connection_idle_seconds == 2.5
    with pytest.raises(ConfigError, match=r"limits\.max_receives_per_principal.*range"):
        parse_config(_config(tmp_path, limits={"max_receives_per_principal": 9}))
    with pytest.raises(ConfigError, match=r"limits\.max_conections.*did you mean"):
        parse_config(_config(tmp_path, limits={"max_conections": 9}))
    with pytest.raises(ConfigError, match=r"limits\.vm_quota_bytes"):
        parse_config(_config(tmp_path, limits={"vm_quota_bytes": -1}))


# -- caps on the SSH endpoint (no ZFS needed) ---------------------------------------


async def test_connection_caps_refused_with_a_typed_reason(make_harness: MakeHarness) -> None:
    h = await make_harness("nopool/data", {"cn-a": [VM_A], "cn-b": [VM_B]}, settings={
        "limits": {"max_connections": 4, "max_connections_per_principal": 2}})
    a1, a2 = await h.connect("cn-a"), await h.connect("cn-a")
    with pytest.raises(asyncssh.DisconnectError) as refused:
        await h.connect("cn-a")
    assert reason_code(refused.value) == "TooManyConnections", refused.value
    assert "cn:cn-a already has 2" in refused.value.reason
    # Nothing else disturbed: the held ones work, another client gets in.
    assert await run(a1, "ping") == (0, b"pong\n", "")
    b1 = await h.connect("cn-b")
    assert await run(b1, "ping") == (0, b"pong\n", "")
    await h.connect("operator")  # the 4th connection in all
    with pytest.raises(asyncssh.DisconnectError) as full:
        await h.connect("cn-b")
    assert reason_code(full.value) == "TooManyConnections"
    assert "4 SSH connections open" in full.value.reason
    # One closed, one more may come.
    a2.close()
    await a2.wait_closed()
    await wait_for(lambda: _open(h) == 3)
    assert await run(await h.connect("cn-b"), "ping") == (0, b"pong\n", "")


def _open(h: Harness) -> int:
    # The count the server keeps; it drops once the server saw the close.
    return sum(1 for c in h.conns if not c.is_closed())


async def test_channel_cap_refused_others_untouched(make_harness: MakeHarness) -> None:
    h = await make_harness("nopool/data", {"cn-a": [VM_A]}, settings={
        "limits": {"max_channels_per_connection": 2}})
    conn = await h.connect("cn-a")
    # Two commits waiting for their metadata hold both channels.
    held = [await conn.create_process(f"commit {VM_A} s{i} disk0", encoding=None)
            for i in range(2)]
    with pytest.raises(asyncssh.ChannelOpenError) as refused:
        await conn.create_process("ping")
    assert reason_code(refused.value) == "TooManyChannels"
    other = await h.connect("cn-a")
    assert await run(other, "ping") == (0, b"pong\n", "")
    for p in held:
        p.stdin.write_eof()  # no such snapshot: refused, the channel closes
        assert (await p.wait()).exit_status == 1
    assert await run(conn, "ping") == (0, b"pong\n", "")


async def test_idle_connections_closed_busy_ones_kept(make_harness: MakeHarness) -> None:
    h = await make_harness("nopool/data", {"cn-a": [VM_A]}, stream_idle_seconds=60,
                           settings={"limits": {"connection_idle_seconds": 1}})
    busy = await h.connect("cn-a")
    # A command running (a commit waiting for its metadata) is not idleness.
    waiting = await busy.create_process(f"commit {VM_A} s1 disk0", encoding=None)
    idle = await h.connect("cn-a")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.wait_for(idle.wait_closed(), 10)
    assert 0.9 <= loop.time() - t0 < 5
    assert not busy.is_closed()
    # Once its command ends, the busy one is idle too, and closed in turn.
    waiting.stdin.write_eof()
    assert (await waiting.wait()).exit_status == 1
    await asyncio.wait_for(busy.wait_closed(), 10)


# -- with ZFS ----------------------------------------------------------------------


@pytest.mark.zfs
async def test_concurrent_sends_capped_per_client(
        zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool, make_harness: MakeHarness) -> None:
    h = await make_harness(await zone_root(zfs, zone_pool), {"cn-a": [VM_A], "cn-b": [VM_B]},
                           settings={"limits": {"max_sends_per_principal": 1}})
    src, _ = await cn_vm(zfs, cn_pool, "vm", 1, size=8 << 20)
    a = await h.connect("cn-a")
    assert (await push(a, zfs, src, VM_A, "s1"))[0] == 0
    assert (await run(a, f"commit {VM_A} s1 disk0"))[0] == 0
    # A restore the client does not read: its send stays running (flow control).
    first = await a.create_process(f"send {VM_A} disk0 s1", encoding=None)
    await wait_for(lambda: h.zone.sends["cn:cn-a"] == 1)
    status, _, err = await run(a, f"send {VM_A} disk0 s1")
    assert (status, err_code(err)) == (1, "TooManySends")
    assert h.metric("snapper_commands_total", verb="send", result="TooManySends") == 1
    data = await first.stdout.read()
    assert (await first.wait()).exit_status == 0 and len(data) > 8 << 20
    await wait_for(lambda: h.zone.sends["cn:cn-a"] == 0)
    status, out, _ = await run(a, f"send {VM_A} disk0 s1")
    assert status == 0 and out == data


@pytest.mark.zfs
async def test_a_send_nobody_reads_is_cut_and_frees_its_slot(
        zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool, make_harness: MakeHarness) -> None:
    """The other direction of the idle rule: a client that reads nothing of its
    ``send`` (its window stays shut) loses it after ``stream_idle_seconds``."""
    h = await make_harness(await zone_root(zfs, zone_pool), {"cn-a": [VM_A]},
                           stream_idle_seconds=1,
                           settings={"limits": {"max_sends_per_principal": 1}})
    src, _ = await cn_vm(zfs, cn_pool, "vm", 1, size=8 << 20)
    a = await h.connect("cn-a")
    assert (await push(a, zfs, src, VM_A, "s1"))[0] == 0
    assert (await run(a, f"commit {VM_A} s1 disk0"))[0] == 0
    stalled = await a.create_process(f"send {VM_A} disk0 s1", encoding=None)
    await wait_for(lambda: h.zone.sends["cn:cn-a"] == 1)
    await wait_for(lambda: h.zone.sends["cn:cn-a"] == 0, timeout=15,
                   what="the stalled send cut off")
    assert h.zone.transfers.active() == []
    assert h.metric("snapper_commands_total", verb="send", result="StreamIdle") == 1
    stalled.close()
    # The slot is free again: a client that reads gets the whole stream.
    status, out, _ = await run(a, f"send {VM_A} disk0 s1")
    assert status == 0 and len(out) > 8 << 20


@pytest.mark.zfs
async def test_receive_slots_shared_and_mirror_in_always_gets_through(
        zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool, make_harness: MakeHarness) -> None:
    """One CN's idle pushes take at most its share; another CN's push and a peer's
    mirror-in go through while they sit there."""
    h = await make_harness(await zone_root(zfs, zone_pool),
                           {"cn-a": [VM_A, VM_C, VM_D], "cn-b": [VM_B]},
                           max_concurrent_receives=3, stream_idle_seconds=60,
                           settings={"limits": {"max_receives_per_principal": 2}})
    a = await h.connect("cn-a")
    idle = [await a.create_process(f"receive {vm} disk0 s1", encoding=None)
            for vm in (VM_A, VM_C, VM_D)]
    slots = h.zone.receive_slots
    await wait_for(lambda: slots.held("cn:cn-a") == 2 and len(slots._waiters) == 1)
    src, _ = await cn_vm(zfs, cn_pool, "vm", 1, size=256 << 10)
    b = await h.connect("cn-b")
    assert (await asyncio.wait_for(push(b, zfs, src, VM_B, "s1"), 10))[0] == 0
    # Now every CN slot is taken (cn-a 2, cn-b 1 held open below): a peer still gets in.
    held_b = await b.create_process(f"receive {VM_B} disk1 s1", encoding=None)
    await wait_for(lambda: slots.held("cn:cn-b") == 1)
    peer = await h.connect("peer")
    src2, _ = await cn_vm(zfs, cn_pool, "vm2", 1, size=256 << 10)
    status, _, err = await asyncio.wait_for(push(peer, zfs, src2, VM_E, "s1"), 10)
    assert status == 0, err
    for p in [*idle, held_b]:
        p.stdin.write_eof()
    for p in idle:
        await p.wait()
    await held_b.wait()


@pytest.mark.zfs
async def test_vm_quota_refused_up_front_with_usage_and_nothing_left(
        zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool, make_harness: MakeHarness) -> None:
    h = await make_harness(await zone_root(zfs, zone_pool), {"cn-a": [VM_A]},
                           settings={"limits": {"vm_quota_bytes": 3 << 20}})
    src, _ = await cn_vm(zfs, cn_pool, "vm", 2, size=2 << 20)
    a = await h.connect("cn-a")
    assert (await push(a, zfs, src, VM_A, "s1"))[0] == 0
    before = await guids(zfs, h.root.child(VM_A).child("disk0"))
    spec = SendSpec(src.snapshot("s2"), base=src.snapshot("s1"))
    size = len(await send_bytes(zfs, spec))
    status, _, err = await push(a, zfs, src, VM_A, "s2", "s1", size=size)
    assert (status, err_code(err)) == (1, "QuotaExceeded")
    msg = protocol.parse_error_line(err)[1]
    used = (await zfs.datasets(h.root.child(VM_A), depth=0))[0].used
    assert f"VM {VM_A} uses {used} of its quota of {3 << 20} bytes" in msg
    assert await guids(zfs, h.root.child(VM_A).child("disk0")) == before
    assert not [t for t in h.zone.transfers.active()]


@pytest.mark.zfs
async def test_cn_quota_cut_while_streaming_nothing_left(
        zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool, make_harness: MakeHarness) -> None:
    """No --size: the CN's quota bounds the stream as it arrives; over it, the
    stream is cut and nothing of it stays (no dataset, no container, no token)."""
    h = await make_harness(await zone_root(zfs, zone_pool), {"cn-a": [VM_A, VM_B]},
                           settings={"limits": {"cn_quota_bytes": 3 << 20}})
    small, _ = await cn_vm(zfs, cn_pool, "small", 1, size=1 << 20)
    big, _ = await cn_vm(zfs, cn_pool, "big", 1, size=4 << 20)
    a = await h.connect("cn-a")
    assert (await push(a, zfs, small, VM_A, "s1"))[0] == 0
    status, _, err = await push(a, zfs, big, VM_B, "s1")
    assert (status, err_code(err)) == (1, "QuotaExceeded")
    msg = protocol.parse_error_line(err)[1]
    assert "CN cn-a uses" in msg and f"of its quota of {3 << 20} bytes" in msg
    assert "cut, nothing kept" in msg
    # The cut reaches the CN as it happens; the zone's clean-up ends the transfer.
    await wait_for(lambda: not h.zone.transfers.active(), 30, "the cut transfer's end")
    assert not await zfs.exists(h.root.child(VM_B))
    # The quota is the CN's: its other VM, within it, is untouched and usable.
    assert list(await guids(zfs, h.root.child(VM_A).child("disk0"))) == ["s1"]


@pytest.mark.zfs
async def test_oversized_stream_cut_nothing_kept(
        zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool, make_harness: MakeHarness,
        monkeypatch: pytest.MonkeyPatch) -> None:
    h = await make_harness(await zone_root(zfs, zone_pool), {"cn-a": [VM_A]})
    # The margin is 16 MiB in production; a small one keeps the stream small here.
    monkeypatch.setattr(transfer_local, "SIZE_MARGIN", 64 << 10)
    src, _ = await cn_vm(zfs, cn_pool, "vm", 2, size=1 << 20)
    a = await h.connect("cn-a")
    assert (await push(a, zfs, src, VM_A, "s1", size=2 << 20))[0] == 0
    status, _, err = await push(a, zfs, src, VM_A, "s2", "s1", size=4096)
    assert (status, err_code(err)) == (1, "StreamTooLarge")
    assert "--size 4096" in protocol.parse_error_line(err)[1]
    ds = h.root.child(VM_A).child("disk0")
    assert list(await guids(zfs, ds)) == ["s1"]
    assert await zfs.resume_token(ds) is None
    assert h.metric("snapper_commands_total", verb="receive", result="StreamTooLarge") == 1
    # The next push, honest, goes through.
    assert (await push(a, zfs, src, VM_A, "s2", "s1", size=2 << 20))[0] == 0


@pytest.mark.zfs
async def test_received_properties_never_applied(
        zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool, make_harness: MakeHarness,
        tmp_path: Path) -> None:
    """A stream carrying mountpoint/setuid (``zfs send -p``) is refused by the zone;
    and the ZFS layer's protected receive never lets them take effect (``-x``
    where ZFS has it; overridden after the receive where it does not)."""
    h = await make_harness(await zone_root(zfs, zone_pool), {"cn-a": [VM_A]})
    evil = tmp_path / "evil"
    src = Dataset(cn_pool.name).child("evil")
    await zfs.create(src, props={"mountpoint": str(evil), "setuid": "on", "exec": "on"})
    await zfs.snapshot([src.snapshot("s1")])
    # Not mounted here, so the receive below would mount the copy there.
    assert (await proc.run(["zfs", "unmount", str(src)], timeout=60)).ok
    sent = await proc.run(["zfs", "send", "-p", str(src.snapshot("s1"))], timeout=60)
    assert sent.ok, sent.stderr
    conn = await h.connect("cn-a")
    status, _, err = await run(conn, f"receive {VM_A} disk0 s1", sent.stdout)
    assert (status, err_code(err)) == (1, "StreamRefused")
    assert not await zfs.exists(h.root.child(VM_A))

    # The layer below, as the zone calls it, with the -p stream let through.
    container = h.root.child("c")
    await zfs.create(container, props=SAFE_CONTAINER_PROPS)
    target = container.child("disk0")
    r, w = proc.os_pipe()
    try:
        child = await zfs.receive(target, stdin=r, exclude=protected_props(volume=False))
    finally:
        os.close(r)
    await asyncio.to_thread(_write_all, w, sent.stdout)
    await zfs.check(child)
    # As receive_stream does after every receive: undone, and listed in the same read.
    arrived = await zfs.received(target)
    sent_guid = (await zfs.snapshots(src))[0].guid
    assert [(s.snapshot, s.guid) for s in arrived] == [(target.snapshot("s1"), sent_guid)]
    got = await zfs.props(target, ["mountpoint", "setuid", "exec", "mounted"])
    assert got == {"mountpoint": "none", "setuid": "off", "exec": "off", "mounted": "no"}
    assert not evil.exists() or not any(evil.iterdir())


def _write_all(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


@pytest.mark.zfs
async def test_vm_containers_are_never_mountable(
        zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool, make_harness: MakeHarness) -> None:
    h = await make_harness(await zone_root(zfs, zone_pool), {"cn-a": [VM_A]})
    src, _ = await cn_vm(zfs, cn_pool, "vm", 1, size=64 << 10)
    assert (await push(await h.connect("cn-a"), zfs, src, VM_A, "s1"))[0] == 0
    got = await zfs.props(h.root.child(VM_A), list(SAFE_CONTAINER_PROPS))
    assert got == SAFE_CONTAINER_PROPS
    part = await zfs.props(h.root.child(VM_A).child("disk0"),
                           ["mountpoint", "setuid", "exec", "devices", "mounted"])
    assert part == {"mountpoint": "none", "setuid": "off", "exec": "off", "devices": "off",
                    "mounted": "no"}
    assert json.dumps(part)  # (plain strings, as ZFS printed them)


# -- the acceptance test of issue 13 ------------------------------------------------

IDLE = 6  # stream_idle_seconds and connection_idle_seconds in the fleet below


async def _transfers(zone: LocalZone, operator_key: Path) -> list[dict[str, Any]]:
    async with signing_session(Signer.load(operator_key)) as http, \
            http.get(f"{zone.http_url}/v1/transfers") as r:
        r.raise_for_status()
        out: list[dict[str, Any]] = await r.json()
        return out


async def _connect(zone: LocalZone, key: Path) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect("127.0.0.1", zone.ssh_port, username="snapper",
                                  known_hosts=None, client_keys=[str(key)], agent_path=None,
                                  config=[], encryption_algs=ENCRYPTION_ALGS,
                                  compression_algs=None)


@pytest.mark.zfs
async def test_idle_receives_and_connections_starve_nobody(
        zfs_tier: ZfsTier, zfs: Zfs, tmp_path: Path) -> None:
    """With 4 idle receives and 50 idle connections from one CN held against each of
    a VM's two zones, another CN's local push and its mirrored push (a commit that
    waits for the mirror-in on the attacked peer) each finish within 5 s; the idle
    receives are cut with StreamIdle and the idle connections closed, each within
    the configured timeout."""
    fleet = await LocalFleet.start(
        tmp_path / "fleet", zones=2, cns=2, vms_per_cn=4, pool_size=512 << 20,
        reconcile_interval_ms=500, zone_settings={
            "stream_idle_seconds": IDLE,
            "limits": {"connection_idle_seconds": IDLE,
                       "max_connections_per_principal": 64}})
    try:
        attacker, victim = fleet.cns
        for vm in victim.vms[:2]:
            top = Dataset(victim.pool.name).child(vm)
            await zfs.create(top)
            await zfs.create(top.child("disk0"))
            write_random(victim.pool, top.child("disk0"), "data", 256 << 10)

        loop = asyncio.get_running_loop()
        idle_receives: list[tuple[float, asyncssh.SSHClientProcess[bytes]]] = []
        idle_conns: list[tuple[float, float, asyncssh.SSHClientConnection]] = []
        for zone in fleet.zones:
            conn = await _connect(zone, attacker.key_path)
            for vm in attacker.vms:
                # `sleep 200 | ssh zone receive VM disk0 s1`
                proc_ = await conn.create_process(f"receive {vm} disk0 s1", encoding=None)
                idle_receives.append((loop.time(), proc_))
            t0 = loop.time()
            conns = await asyncio.gather(*(_connect(zone, attacker.key_path)
                                           for _ in range(50)))
            idle_conns += [(t0, loop.time(), c) for c in conns]
        # When each one closes, seen as it happens (not when we look).
        conns_closed = [asyncio.ensure_future(_closed_at(c)) for _, _, c in idle_conns]
        for zone in fleet.zones:
            # The attacker holds its share of the slots (2 of 4); the rest wait.
            await wait_until(functools.partial(_count_receives, zone, fleet.operator_key,
                                               attacker.id, 2),
                             timeout=10, what=f"{zone.name}: the idle receives holding slots")

        by_uuid = {z.uuid: z for z in fleet.zones}

        async def push(vm: str, name: str, durability: str) -> Any:
            primary = by_uuid[pair_of(vm, list(by_uuid))[0]]
            zc = ZoneClient("127.0.0.1", primary.ssh_port, victim.key_path,
                            host_key=primary.host_key_pub)
            async with zc:
                cn = CnClient(zc, dataset_root=victim.pool.name, zfs=zfs, vmadm=None)
                return await asyncio.wait_for(
                    cn.push(vm, name, metadata={"uuid": vm}, durability=durability), 5)

        local, mirrored = await asyncio.gather(push(victim.vms[0], "s1", "local"),
                                               push(victim.vms[1], "s1", "mirrored"))
        assert local.durability == "local"
        assert mirrored.durability == "mirrored" and len(mirrored.zones) == 2

        # The idle ones go, each within its timeout (a receive that queued for a
        # slot is idle only once it holds one: at most two timeouts).
        async def cut(started: float, p: asyncssh.SSHClientProcess[bytes]) -> float:
            # (The process keeps its exit; the time is when its channel closed.)
            done = await asyncio.wait_for(p.wait(), 2 * IDLE + 10)
            assert done.exit_status == 1
            assert isinstance(done.stderr, bytes)
            assert err_code(done.stderr.decode()) == "StreamIdle", done.stderr
            return loop.time() - started

        took = sorted(await asyncio.gather(*(cut(t, p) for t, p in idle_receives)))
        assert all(IDLE - 0.5 <= t <= IDLE + 4 for t in took[:4]), took  # held slots
        assert all(t <= 2 * IDLE + 6 for t in took), took

        ends = await asyncio.wait_for(asyncio.gather(*conns_closed), IDLE + 10)
        # Each idle from its login, between the first connect and the last.
        spans = [(end - before, end - after)
                 for end, (before, after, _c) in zip(ends, idle_conns, strict=True)]
        assert all(most >= IDLE and least <= IDLE + 4 for most, least in spans), spans
    finally:
        await fleet.stop()


async def _closed_at(conn: asyncssh.SSHClientConnection) -> float:
    await conn.wait_closed()
    return asyncio.get_running_loop().time()


async def _count_receives(zone: LocalZone, operator_key: Path, cn: str, n: int) -> bool:
    mine = [t for t in await _transfers(zone, operator_key) if t.get("peer") == f"cn:{cn}"]
    return len(mine) == n


def test_registration_advertises_never_the_bind_address(tmp_path: Path) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(str(tmp_path / "k"))
    cfg = parse_config(_config(
        tmp_path, coordinator_url="http://coord:8480",
        ssh={"port": 0, "host_key": str(tmp_path / "k"), "host": "0.0.0.0",
             "advertise_host": "10.1.2.3"},
        http={"port": 0, "host": "0.0.0.0", "advertise_host": "10.1.2.4"}))
    rec = zone_record(cfg, 2222, 8080, 1 << 30)
    assert (rec.ssh_host, rec.ssh_port, rec.http_url) == ("10.1.2.3", 2222,
                                                          "http://10.1.2.4:8080")
    assert rec.host_key == key.export_public_key().decode().strip()
