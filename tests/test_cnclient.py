"""The CN client against a real snapperd SSH endpoint (in-process) on real ZFS.

A simulated CN (a mounted pool holding ``<cnpool>/<vm>`` and ``disk0``, plus
a zvol ``disk1`` on the OpenZFS tier) pushes to a zone pool over loopback
SSH; what comes back is compared byte for byte.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from snapper_zone.cn.client import CnClient, PlanError, RestoreError
from snapper_zone.daemon.zone import Zone
from snapper_zone.fleet.pools import FilePool
from snapper_zone.transfer.remote import ZoneClient, ZoneError
from snapper_zone.wire import VmSnapshot
from snapper_zone.wire.protocol import Delete
from snapper_zone.zfs import proc
from snapper_zone.zfs.names import Dataset
from snapper_zone.zfs.zfs import Capabilities, Zfs
from soak.faults import CuttingZoneClient
from tests.conftest import require
from tests.helpers import (
    mountpoint,
    read_device,
    ssh_zone,
    wait_for,
    write_device,
    write_keypair,
    write_random,
    zvol_device,
)

pytestmark = pytest.mark.zfs

ZONE_UUID = "bd932c2b-caae-495a-abf2-fb958111c3fb"
CN_ID = "44454c4c-3800-1051-8036-b4c04f4e3232"
VM = "74c59c61-4559-4ca2-b1ef-0ca22f2f936a"
ZVOL_SIZE = 32 << 20


@dataclass
class Env:
    zfs: Zfs
    caps: Capabilities
    zone: Zone
    port: int
    cn_key: Path
    host_pub: Path
    cn_pool: FilePool
    vm: Dataset  # <cnpool>/<vm>
    tmp: Path

    def client(self) -> CuttingZoneClient:
        return CuttingZoneClient("127.0.0.1", self.port, self.cn_key, host_key=self.host_pub)

    def cn(self, zone: ZoneClient) -> CnClient:
        return CnClient(zone, dataset_root=self.cn_pool.name, zfs=self.zfs, vmadm=None)

    def write(self, name: str, size: int = 1 << 20) -> None:
        write_random(self.cn_pool, self.vm, name, size)
        write_random(self.cn_pool, self.vm.child("disk0"), name, size)


@pytest.fixture
async def env(zfs: Zfs, caps: Capabilities, cn_pool: FilePool, zone_pool: FilePool,
              tmp_path: Path) -> AsyncIterator[Env]:
    async with ssh_zone(zfs, zone_pool, tmp_path, uuid=ZONE_UUID, cn_id=CN_ID,
                        vms={VM: CN_ID}) as z:
        vm = Dataset(cn_pool.name).child(VM)
        await zfs.create(vm)
        await zfs.create(vm.child("disk0"))
        if caps.zvols:
            await zfs.create(vm.child("disk1"), volsize=ZVOL_SIZE)
        yield Env(zfs, caps, z.zone, z.port, z.cn_key, z.host_pub, cn_pool, vm, tmp_path)


def _tree_hashes(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.iterdir()) if p.is_file()}


async def _mounted(env: Env, ds: Dataset) -> Path:
    """The restored filesystem's files (OpenZFS receives with -u; mount it to read)."""
    if env.caps.receive_unmounted:
        done = await proc.run([env.zfs.zfs_bin, "mount", str(ds)])
        assert done.ok or "already mounted" in done.stderr, done.stderr
    return mountpoint(env.cn_pool, ds)


async def _zone_guids(env: Env, snap: str) -> dict[str, int]:
    s = await env.zone.store.snapshot(VM, snap)
    return {label: p.guid for label, p in s.parts.items()}


async def _cn_guids(env: Env, snap: str) -> dict[str, int]:
    out = {}
    for label, ds in (("root", env.vm), ("disk0", env.vm.child("disk0")),
                      ("disk1", env.vm.child("disk1"))):
        if await env.zfs.exists(ds):
            out[label] = next(s.guid for s in await env.zfs.snapshots(ds) if s.name == snap)
    return out


@pytest.mark.openzfs
async def test_push_incrementals_delete_restore(env: Env) -> None:
    labels = {"root", "disk0"} | ({"disk1"} if env.caps.zvols else set())
    vol = zvol_device(env.vm.child("disk1"))
    at: dict[str, dict[str, str]] = {}
    disk: dict[str, bytes] = {}
    async with env.client() as zone:
        cn = env.cn(zone)
        for i, snap in enumerate(["s1", "s2", "s3"]):
            env.write(f"f{i}")
            if env.caps.zvols:
                await write_device(vol, os.urandom(1 << 20) * (i + 1))
                disk[snap] = await read_device(vol, ZVOL_SIZE)
            rep = await cn.push(VM, snap, metadata={"uuid": VM, "alias": snap})
            at[snap] = _tree_hashes(mountpoint(env.cn_pool, env.vm.child("disk0")))
            assert {d.label for d in rep.datasets} == labels
            want = "full" if snap == "s1" else "incremental"
            assert all(d.action == want for d in rep.datasets), rep
            assert rep.bytes > (1 << 20)

        held = (await cn.list(VM))[VM]
        assert [s["name"] for s in held] == ["s1", "s2", "s3"]
        assert all(s["complete"] for s in held)
        for s in held:
            zone_guids = {k: int(v["guid"]) for k, v in s["datasets"].items()}
            assert zone_guids == await _cn_guids(env, s["name"])

        # Any snapshot can go, not just the newest; the chain still works.
        await zone.run(Delete(VM, "s2"))
        env.write("f3")
        rep = await cn.push(VM, "s4")
        assert {d.action for d in rep.datasets} == {"incremental"}
        assert {d.base for d in rep.datasets} == {f"{ds}@s3" for ds in [env.vm]} | {
            f"{env.vm.child(lb)}@s3" for lb in labels - {"root"}}
        assert [s["name"] for s in (await cn.list(VM))[VM]] == ["s1", "s3", "s4"]
        assert await _zone_guids(env, "s4") == await _cn_guids(env, "s4")

        # Restore s3 into a new dataset: byte-identical to the CN's data at s3.
        target = Dataset(env.cn_pool.name).child("copy")
        meta_path = env.tmp / "meta.json"
        rr = await cn.restore(VM, "s3", str(target), metadata_path=meta_path)
        assert {d.action for d in rr.datasets} == {"full"}
        assert json.loads(meta_path.read_text()) == {"uuid": VM, "alias": "s3"}
        assert _tree_hashes(await _mounted(env, target.child("disk0"))) == at["s3"]
        if env.caps.zvols:
            assert await read_device(zvol_device(target.child("disk1")), ZVOL_SIZE) == \
                disk["s3"]
        # The same target again, to s4: incremental on the common s3. rollback,
        # because mounting disk0 made its mountpoint directory in the copy's
        # root, which ZFS counts as a change since s3.
        rr = await cn.restore(VM, "s4", str(target), rollback=True)
        assert {d.action for d in rr.datasets} == {"incremental"}
        assert {d.base for d in rr.datasets} == {"s3"}
        assert rr.metadata == {"uuid": VM, "datasets": sorted(labels, key=_order(labels))}


async def test_snapshots_carried_along_by_a_push_are_committed(env: Env) -> None:
    """A CN snapshot that never reached the zone (its push failed) travels with the
    next push and is committed too: complete, with the CN's guids, not left pending."""
    async with env.client() as zone:
        cn = env.cn(zone)
        env.write("f0", 64 << 10)
        await cn.push(VM, "s1")
        env.write("f1", 64 << 10)
        await env.zfs.snapshot([env.vm.snapshot("s2")], recursive=True)  # never pushed
        env.write("f2", 64 << 10)
        rep = await cn.push(VM, "s3")
        assert rep.carried == ["s2"]
        held = {s["name"]: s for s in (await cn.list(VM))[VM]}
        assert [(n, s["complete"]) for n, s in held.items()] == [
            ("s1", True), ("s2", True), ("s3", True)]
        for n in ("s2", "s3"):
            assert await _zone_guids(env, n) == await _cn_guids(env, n)
        assert "s2" not in env.zone.transfers.in_use(VM)


async def test_a_push_lists_the_zone_again_only_when_something_may_be_carried(
        env: Env) -> None:
    """With nothing unfinished on the zone and one stream per part (the target),
    nothing can have arrived with the push: it does not ask the zone for its
    snapshots after sending (a listing on each side saved per push). With more
    than the target sent it does, and commits what came along."""
    async with env.client() as zone:
        cn = env.cn(zone)
        env.write("f0", 64 << 10)
        await cn.push(VM, "s1")
        asked = 0
        listing = zone.snapshots

        async def counted(vm: str) -> list[VmSnapshot]:
            nonlocal asked
            asked += 1
            return await listing(vm)

        zone.snapshots = counted  # type: ignore[method-assign]
        env.write("f1", 64 << 10)
        rep = await cn.push(VM, "s2")
        assert (asked, rep.carried) == (0, [])
        assert {d.streams for d in rep.datasets} == {1}
        env.write("f2", 64 << 10)
        await env.zfs.snapshot([env.vm.snapshot("s3")], recursive=True)  # never pushed
        env.write("f3", 64 << 10)
        rep = await cn.push(VM, "s4")
        assert asked == 1 and rep.carried == ["s3"]
        assert {d.streams for d in rep.datasets} == {2}
        held = [(s["name"], s["complete"]) for s in (await cn.list(VM))[VM]]
        assert held == [("s1", True), ("s2", True), ("s3", True), ("s4", True)]


def _cn_commands(caplog: pytest.LogCaptureFixture, pool: str) -> list[str]:
    """The zfs commands run on the CN's pool, as their verb (``send -n`` for an estimate)."""
    out = []
    for rec in caplog.records:
        words = rec.getMessage().split() if rec.name == "snapper.proc" else []
        if len(words) < 3 or words[0] not in ("ran", "stream") or \
                not words[1].endswith("zfs") or not any(w.startswith(pool) for w in words):
            continue
        out.append("send -n" if words[2] == "send" and "-n" in words else words[2])
    return out


@pytest.mark.openzfs
async def test_the_zfs_commands_a_push_costs_the_cn(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """One listing of the VM's datasets (bookmarks too, where ZFS has them) and one
    of the pool's top level, which also say which parts are encrypted; the
    snapshot; one listing again for every part; per part an estimate (where ZFS
    has one) and the send; a bookmark per part and the older ones dropped. No
    part lists its own snapshots or bookmarks, or is asked about encryption; the
    zone is not asked for each part's resume token (its inventory has them)."""
    caps = env.caps
    parts = 3 if caps.zvols else 2
    async with env.client() as zone:
        cn = env.cn(zone)
        asked = 0
        ask = zone.resume_token

        async def counted(vm: str, dataset: str) -> str | None:
            nonlocal asked
            asked += 1
            return await ask(vm, dataset)

        zone.resume_token = counted  # type: ignore[method-assign]
        caplog.set_level(logging.DEBUG, logger="snapper.proc")
        for name in ("s1", "s2"):
            caplog.clear()
            env.write(name, 64 << 10)
            await cn.push(VM, name)
            expected = ["get", "get", "snapshot", "get",
                        *(["send -n", "send"] if caps.send_size_estimate else ["send"]) * parts,
                        # a bookmark per part, and the part's older one dropped
                        *((["bookmark", "destroy"] if name == "s2" else ["bookmark"]) * parts
                          if caps.bookmarks else [])]
            assert _cn_commands(caplog, env.cn_pool.name) == expected
        assert asked == 0  # each part's resume token came with the zone's inventory


async def test_a_push_never_sends_back_a_snapshot_deleted_on_the_zone(env: Env) -> None:
    """The zone's newest was deleted there (tombstoned): the next push goes on
    from the one before it and skips the deleted one, and pushing the deleted
    one itself is refused with its own code, the zone unchanged."""
    async with env.client() as zone:
        cn = env.cn(zone)
        for i, name in enumerate(["s1", "s2", "s3"]):
            env.write(f"f{i}", 64 << 10)
            await cn.push(VM, name)
        await zone.run(Delete(VM, "s3"))
        env.write("f3", 64 << 10)
        rep = await cn.push(VM, "s4")
        assert all(str(d.base).endswith("@s2") for d in rep.datasets) and rep.carried == []
        held = [(s["name"], s["complete"]) for s in (await cn.list(VM))[VM]]
        assert held == [("s1", True), ("s2", True), ("s4", True)]
        assert await _zone_guids(env, "s4") == await _cn_guids(env, "s4")
        with pytest.raises(PlanError) as err:
            await cn.push(VM, "s3")
        assert err.value.code == "SnapshotDeleted"
        assert [s["name"] for s in (await cn.list(VM))[VM]] == ["s1", "s2", "s4"]


def _order(labels: set[str]) -> Any:
    # The minimal metadata lists datasets root first, then the children as ZFS listed them.
    return lambda lb: (lb != "root", lb)


async def test_rollback_restore_needs_the_flag(env: Env) -> None:
    async with env.client() as zone:
        cn = env.cn(zone)
        env.write("a")
        await cn.push(VM, "s1")
        env.write("b")
        await cn.push(VM, "s2")
        at_s2 = _tree_hashes(mountpoint(env.cn_pool, env.vm.child("disk0")))
        # The CN moves on locally and loses s2; its newest (s3) is unknown to the zone.
        for ds in (env.vm.child("disk0"), env.vm, env.vm.child("disk1")):
            if await env.zfs.exists(ds):
                await env.zfs.destroy(ds.snapshot("s2"))
        env.write("c")
        await env.zfs.snapshot([env.vm.snapshot("s3")], recursive=True)
        with pytest.raises(RestoreError, match="--rollback"):
            await cn.restore(VM, "s2")
        rr = await cn.restore(VM, "s2", rollback=True)
        assert {d.action for d in rr.datasets} == {"incremental"}
        assert _tree_hashes(await _mounted(env, env.vm.child("disk0"))) == at_s2
        assert [s.name for s in await env.zfs.snapshots(env.vm)] == ["s1", "s2"]


@pytest.mark.openzfs
async def test_interrupted_push_restarts_or_resumes(env: Env) -> None:
    async with env.client() as zone:
        cn = env.cn(zone)
        env.write("a")
        await cn.push(VM, "s1")
        s1 = await _zone_guids(env, "s1")
        env.write("b", 8 << 20)
        zone.cut_after = 3 << 20
        with pytest.raises(ZoneError, match="without an exit status"):
            await cn.push(VM, "s2")
    async with env.client() as zone:
        cn = env.cn(zone)
        rep = await cn.push(VM, "s2")  # the same command again finishes it
        actions = {d.label: d.action for d in rep.datasets}
        if env.caps.resumable_receive:
            assert actions["root"].startswith("resumed+")
        assert actions["disk0"].endswith("incremental"), actions
        assert await _zone_guids(env, "s1") == s1
        assert await _zone_guids(env, "s2") == await _cn_guids(env, "s2")
        assert all(s["complete"] for s in (await cn.list(VM))[VM])


@pytest.mark.openzfs
async def test_stale_resume_token_is_aborted(env: Env) -> None:
    require(env.caps, "resumable_receive")
    async with env.client() as zone:
        cn = env.cn(zone)
        env.write("a")
        await cn.push(VM, "s1")
        env.write("b", 8 << 20)
        zone.cut_after = 3 << 20
        with pytest.raises(ZoneError, match="without an exit status"):
            await cn.push(VM, "s2")
    # The CN drops the half-pushed snapshot: the zone's token is now stale.
    await env.zfs.destroy(env.vm.snapshot("s2"), recursive=True)
    async with env.client() as zone:
        cn = env.cn(zone)
        rep = await cn.push(VM, "s3")
        assert rep.datasets[0].action == "aborted stale partial+incremental"
        assert [s["name"] for s in (await cn.list(VM))[VM]] == ["s1", "s3"]


@pytest.mark.openzfs
@pytest.mark.openzfs
async def test_bookmark_keeps_the_chain(env: Env) -> None:
    require(env.caps, "bookmarks")
    async with env.client() as zone:
        cn = env.cn(zone)
        env.write("a")
        await cn.push(VM, "s1")
        env.write("b")
        await cn.push(VM, "s2")
        marks = [b.bookmark.name for b in await env.zfs.bookmarks(env.vm)]
        assert marks == ["snapper-s2"]  # the older one was dropped
        await env.zfs.destroy(env.vm.snapshot("s2"), recursive=True)
        env.write("c")
        rep = await cn.push(VM, "s3")
        assert rep.datasets[0].action == "incremental"
        assert rep.datasets[0].base == f"{env.vm}#snapper-s2"


async def test_conflict_is_reported_with_both_histories(env: Env) -> None:
    async with env.client() as zone:
        cn = env.cn(zone)
        env.write("a")
        await cn.push(VM, "s1")
        env.write("b")
        await cn.push(VM, "s2")
        with pytest.raises(PlanError) as ei:
            await cn.push(VM, "s3", base="s1")  # the zone's newest is s2
        assert ei.value.code == "ZoneAhead" and "zone:" in ei.value.message


async def _cli(env: Env, *args: str) -> proc.Completed:
    argv = [sys.executable, "-m", "snapper_zone.cli", "--zone", f"127.0.0.1:{env.port}",
            "--key", str(env.cn_key), "--host-key", str(env.host_pub),
            "--dataset-root", env.cn_pool.name, *args]
    return await proc.run(argv, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})


async def test_cli_push_list_restore(env: Env) -> None:
    env.write("a")
    meta = env.tmp / "vm.json"
    meta.write_text(json.dumps({"uuid": VM, "alias": "cli"}))
    done = await _cli(env, "push", VM, "--name", "c1", "--metadata", str(meta))
    assert done.returncode == 0, done.stderr
    assert f"pushed {VM}@c1" in done.stdout.decode()
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert {e["event"] for e in events} >= {"start", "done"}

    done = await _cli(env, "list", VM)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    assert lines[0].split()[:3] == ["VM", "SNAPSHOT", "COMPLETE"]
    assert lines[1].split()[:3] == [VM, "c1", "yes"]

    done = await _cli(env, "list", "--json")  # without a VM: this CN's VMs
    assert json.loads(done.stdout)[VM][0]["name"] == "c1"

    target = Dataset(env.cn_pool.name).child("clicopy")
    done = await _cli(env, "restore", VM, "c1", "--target", str(target))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"uuid": VM, "alias": "cli"}

    done = await _cli(env, "restore", VM, "nope")
    # One line of ours (Python may add its own warnings, e.g. cryptography's).
    ours = [ln for ln in done.stderr.splitlines() if ln.startswith("snapper:")]
    assert done.returncode == 1 and len(ours) == 1, done.stderr
    assert "no snapshot 'nope'" in ours[0]
    done = await _cli(env, "push", "not-a-uuid")  # refused before any zfs or SSH
    assert done.returncode == 2 and "invalid VM uuid" in done.stderr, done.stderr
    done = await _cli(env, "push")
    assert done.returncode == 2


async def test_unknown_host_key_is_refused(env: Env) -> None:
    other = write_keypair(env.tmp / "other_ed25519")
    client = ZoneClient("127.0.0.1", env.port, env.cn_key,
                        host_key=other.with_suffix(".pub"))
    from snapper_zone.transfer.remote import ZoneUnreachable
    with pytest.raises(ZoneUnreachable, match="host key"):
        await client.connect()


async def test_zone_refusal_mid_stream_does_not_hang(env: Env) -> None:
    """The zone refuses after reading the header while we still have MiBs to send."""
    from snapper_zone.transfer.remote import ZoneError
    from snapper_zone.wire.protocol import Receive
    from snapper_zone.zfs.zfs import SendSpec

    env.write("a", 8 << 20)
    await env.zfs.snapshot([env.vm.snapshot("s1")])
    async with env.client() as zone, asyncio.timeout(60):
        with pytest.raises(ZoneError) as ei:
            await zone.push_stream(Receive(VM, "root", "other-name"),
                                   SendSpec(env.vm.snapshot("s1")), env.zfs)
        assert ei.value.code == "StreamRefused"
        assert await zone.run("ping") == b"pong\n"  # the connection still works


async def test_failed_local_receive_does_not_hang(env: Env) -> None:
    """Our zfs receive dies early (target modified) while the zone still sends."""
    from snapper_zone.errors import ZfsError

    async with env.client() as zone, asyncio.timeout(120):
        cn = env.cn(zone)
        env.write("a")
        await cn.push(VM, "s1")
        env.write("b", 8 << 20)
        await cn.push(VM, "s2")
        target = Dataset(env.cn_pool.name).child("copy")
        await cn.restore(VM, "s1", str(target))
        await _mounted(env, target)
        write_random(env.cn_pool, target, "local-change", 4096)
        with pytest.raises(ZfsError):
            await cn.restore(VM, "s2", str(target))
        assert await zone.run("ping") == b"pong\n"


# -- the stream through OpenSSH's ssh (the CLI's default where ssh is installed) --------


def _logging_ssh(env: Env) -> tuple[str, Path]:
    """OpenSSH's ssh behind a wrapper that notes each run, so a test can tell the
    stream went through it."""
    ssh = shutil.which("ssh")
    if ssh is None:
        pytest.skip("needs OpenSSH's ssh client")
    log = env.tmp / "ssh-runs.log"
    wrapper = env.tmp / "ssh"
    wrapper.write_text(f'#!/bin/sh\necho run >> "{log}"\nexec "{ssh}" "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper), log


async def test_push_through_openssh(env: Env) -> None:
    """Full then incremental through ``ssh``, by pinned host key and by known_hosts:
    the zone holds the CN's guids; the parts were bound to the asyncssh
    connection (--bind), so the commit over it finds them."""
    ssh, log = _logging_ssh(env)
    known = env.tmp / "known_hosts"
    known.write_text(f"[127.0.0.1]:{env.port} {env.host_pub.read_text()}")
    clients = [ZoneClient("127.0.0.1", env.port, env.cn_key, host_key=env.host_pub,
                          openssh=ssh),
               ZoneClient("127.0.0.1", env.port, env.cn_key, known_hosts=known, openssh=ssh)]
    for i, client in enumerate(clients):
        async with client as zone, asyncio.timeout(120):
            env.write(f"f{i}", 4 << 20)
            rep = await env.cn(zone).push(VM, f"s{i}")
            assert {d.action for d in rep.datasets} == {"incremental" if i else "full"}
            assert rep.bytes > (4 << 20)
            assert await _zone_guids(env, f"s{i}") == await _cn_guids(env, f"s{i}")
    runs = log.read_text().split()
    assert len(runs) == 2 * len(await _cn_guids(env, "s0")), runs  # one per dataset


async def test_openssh_refusal_and_fallback(env: Env) -> None:
    """Through ``ssh`` too: the zone's refusal mid-stream is its typed error, no hang.
    An ``ssh`` that cannot carry the stream (here: told another host key) while our
    own connection works leaves it to asyncssh, for this stream and the next."""
    from snapper_zone.wire.protocol import Receive
    from snapper_zone.zfs.zfs import SendSpec

    ssh, log = _logging_ssh(env)
    env.write("a", 8 << 20)
    await env.zfs.snapshot([env.vm.snapshot("s1")])
    async with ZoneClient("127.0.0.1", env.port, env.cn_key, host_key=env.host_pub,
                          openssh=ssh) as zone, asyncio.timeout(60):
        with pytest.raises(ZoneError) as ei:
            await zone.push_stream(Receive(VM, "root", "other-name"),
                                   SendSpec(env.vm.snapshot("s1")), env.zfs)
        assert ei.value.code == "StreamRefused"
        assert await zone.run("ping") == b"pong\n"
    assert len(log.read_text().split()) == 1
    other = write_keypair(env.tmp / "other_ed25519")
    async with ZoneClient("127.0.0.1", env.port, env.cn_key, host_key=env.host_pub,
                          openssh=ssh) as zone, asyncio.timeout(60):
        # Our connection trusts the zone; the stream's ssh is told another key.
        zone.host_key = other.with_suffix(".pub")
        res = await zone.push_stream(Receive(VM, "root", "s1"),
                                     SendSpec(env.vm.snapshot("s1")), env.zfs)
        assert res.bytes > (8 << 20) and zone.openssh is None
    assert len(log.read_text().split()) == 2  # ssh tried (and refused the zone) once
    assert await env.zfs.exists(env.zone.store.part_dataset(VM, "root").snapshot("s1"))


async def test_openssh_stream_parts_end_with_the_connection_they_are_bound_to(
        env: Env) -> None:
    """A stream through ``ssh`` binds its parts to the client's own connection:
    while it runs that connection is not idle (here: 1 s idle limit, a 3 s
    stream); when the client dies before its commit, the parts end with it
    (not a 10-minute lease). Binding to a connection not one's own is refused."""
    from snapper_zone.wire.protocol import Receive, Whoami
    from snapper_zone.zfs.zfs import SendSpec

    ssh, _log = _logging_ssh(env)
    cfg = env.zone.config
    env.zone.config = dataclasses.replace(cfg, limits=dataclasses.replace(
        cfg.limits, connection_idle_seconds=1.0))
    env.write("a", 1 << 20)
    await env.zfs.snapshot([env.vm.snapshot("s1")])
    part = env.zone.store.part_dataset(VM, "root").snapshot("s1")
    async with asyncio.timeout(60):
        async with ZoneClient("127.0.0.1", env.port, env.cn_key, host_key=env.host_pub,
                              openssh=ssh) as zone:
            me = json.loads(await zone.run(Whoami()))
            assert me == {"connection": await zone.connection_number(), "principal": "cn:" + CN_ID}
            res = await zone.push_stream(Receive(VM, "root", "s1"),
                                         SendSpec(env.vm.snapshot("s1")), env.zfs,
                                         bwlimit=400 << 10)
            assert res.seconds > 2.0  # longer than the idle limit: not idled meanwhile
            assert await env.zfs.exists(part)
            assert "s1" in env.zone.transfers.in_use(VM)  # pending its commit
            assert await zone.run("ping") == b"pong\n"  # still open
        # The client is gone without a commit: nothing of s1 is awaited any more.
        await wait_for(lambda: "s1" not in env.zone.transfers.in_use(VM), 10,
                       "the bound parts released with their connection")
        # Someone else's connection, or none: refused before a byte is read.
        async with ZoneClient("127.0.0.1", env.port, env.cn_key,
                              host_key=env.host_pub) as zone:
            with pytest.raises(ZoneError) as ei:
                await zone.run(f"receive {VM} root s2 --bind 999999")
            assert ei.value.code == "NotAuthorized"
