"""``snapper export`` then ``snapper import`` on real ZFS: a VM snapshot leaves a zone
as one file and comes back on another CN byte for byte, guids and metadata included;
a damaged, cut-short or unplaceable file is refused with nothing changed."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from snapper_zone.cn.archive import (
    ExportFailed,
    ImportRefused,
    export_snapshot,
    import_snapshot,
    verify,
)
from snapper_zone.fleet.pools import FilePool
from snapper_zone.wire.archive import PREAMBLE_SIZE, ArchiveCorrupt, ArchiveTruncated
from snapper_zone.zfs import proc
from snapper_zone.zfs.names import Dataset
from tests import test_cnclient
from tests.conftest import PoolFactory
from tests.helpers import mountpoint, read_device, ssh_zone, write_device, zvol_device
from tests.test_cnclient import VM, ZVOL_SIZE, Env, _tree_hashes

pytestmark = pytest.mark.zfs
env = test_cnclient.env  # the fixture: a zone over SSH and a CN with VM, on real ZFS


async def _files(env: Env, pool: FilePool, ds: Dataset) -> dict[str, str]:
    """The files of a received filesystem (OpenZFS receives with -u: mount it first)."""
    if env.caps.receive_unmounted:
        done = await proc.run([env.zfs.zfs_bin, "mount", str(ds)])
        assert done.ok or "already mounted" in done.stderr, done.stderr
    return _tree_hashes(mountpoint(pool, ds))


async def _guids(env: Env, top: Dataset, snap: str) -> dict[str, int]:
    out = {}
    for label, ds in (("root", top), ("disk0", top.child("disk0")),
                      ("disk1", top.child("disk1"))):
        if await env.zfs.exists(ds):
            out[label] = next(s.guid for s in await env.zfs.snapshots(ds) if s.name == snap)
    return out


async def _pushed(env: Env, tmp: Path) -> tuple[Path, dict[str, dict[str, str]], bytes]:
    """Two snapshots pushed (full, incremental); s2 exported to a file."""
    vol = zvol_device(env.vm.child("disk1"))
    disk = b""
    async with env.client() as zone:
        cn = env.cn(zone)
        env.write("a", 2 << 20)
        await cn.push(VM, "s1", metadata={"uuid": VM, "alias": "one"})
        env.write("b", 3 << 20)
        if env.caps.zvols:
            await write_device(vol, os.urandom(2 << 20))
            disk = await read_device(vol, ZVOL_SIZE)
        await cn.push(VM, "s2", metadata={"uuid": VM, "alias": "two"})
        at = {"root": _tree_hashes(mountpoint(env.cn_pool, env.vm)),
              "disk0": _tree_hashes(mountpoint(env.cn_pool, env.vm.child("disk0")))}
        out = tmp / "nfs" / f"{VM}@s2.snapper"
        out.parent.mkdir()
        report = await export_snapshot(zone, VM, "s2", out)
    assert out.stat().st_size == PREAMBLE_SIZE + 4096 + report.bytes
    assert not list(out.parent.glob(".*.part"))
    return out, at, disk


@pytest.mark.openzfs
async def test_export_then_import_onto_another_cn(env: Env, make_pool: PoolFactory) -> None:
    async with asyncio.timeout(240):
        out, at, disk = await _pushed(env, env.tmp)
        header, _ = await verify(out)
        labels = ["root", "disk0"] + (["disk1"] if env.caps.zvols else [])
        assert [p.label for p in header.parts] == labels
        assert (header.vm, header.snapshot) == (VM, "s2")
        assert header.metadata == {"uuid": VM, "alias": "two"}
        zone_snap = await env.zone.store.snapshot(VM, "s2")
        assert {p.label: p.guid for p in header.parts} == \
            {lb: p.guid for lb, p in zone_snap.parts.items()}

        other = await make_pool("cn2")  # another CN: its own pool
        report = await import_snapshot(out, env.zfs, dataset_root=other.name)
        top = Dataset(other.name).child(VM)
        assert report.target == str(top) and report.header.metadata == header.metadata
        # The very snapshots: the guids the CN made, the files byte for byte.
        assert await _guids(env, top, "s2") == await _guids(env, env.vm, "s2")
        assert await _files(env, other, top) == at["root"]
        assert await _files(env, other, top.child("disk0")) == at["disk0"]
        if env.caps.zvols:
            assert await read_device(zvol_device(top.child("disk1")), ZVOL_SIZE) == disk

        # Once there, it is not received again over itself.
        with pytest.raises(ImportRefused, match="exists"):
            await import_snapshot(out, env.zfs, dataset_root=other.name)
        assert [s.name for s in await env.zfs.snapshots(top)] == ["s2"]


async def test_a_damaged_or_short_file_changes_nothing(env: Env) -> None:
    async with asyncio.timeout(240):
        out, _, _ = await _pushed(env, env.tmp)
        good = out.read_bytes()
        region = 4096
        first = PREAMBLE_SIZE + region  # the root stream's first byte
        target = Dataset(env.cn_pool.name).child("copy")

        cases: list[tuple[str, bytes, type[ArchiveCorrupt]]] = [
            ("stream", good[:first + 5000] + bytes([good[first + 5000] ^ 1])
             + good[first + 5001:], ArchiveCorrupt),
            ("last byte", good[:-1] + bytes([good[-1] ^ 0x80]), ArchiveCorrupt),
            ("header", good[:100] + bytes([good[100] ^ 1]) + good[101:], ArchiveCorrupt),
            ("cut in a stream", good[: len(good) // 2], ArchiveTruncated),
            ("cut in the header", good[:1000], ArchiveTruncated),
            ("empty", b"", ArchiveTruncated),
            ("one byte more", good + b"\0", ArchiveCorrupt),
        ]
        for name, data, error in cases:
            bad = env.tmp / "bad.snapper"
            bad.write_bytes(data)
            with pytest.raises(error) as ei:
                await import_snapshot(bad, env.zfs, target=target)
            assert ei.value.code in ("ArchiveCorrupt", "ArchiveTruncated"), name
            assert type(ei.value) is error, (name, ei.value)
            assert not await env.zfs.exists(target), name

        # Where a whole VM cannot go: refused before any receive.
        with pytest.raises(ImportRefused, match="exists"):
            await import_snapshot(out, env.zfs, dataset_root=env.cn_pool.name)  # the VM's own
        with pytest.raises(ImportRefused, match="parent"):
            await import_snapshot(out, env.zfs, target=target.child("deeper"))
        assert not await env.zfs.exists(target)
        with pytest.raises(ImportRefused):
            await import_snapshot(env.tmp / "absent", env.zfs, target=target)


async def test_export_refuses_and_leaves_nothing(env: Env) -> None:
    async with asyncio.timeout(120), env.client() as zone:
        env.write("a")
        await env.cn(zone).push(VM, "s1")
        taken = env.tmp / "taken"
        taken.write_text("mine")
        with pytest.raises(ExportFailed, match="exists"):
            await export_snapshot(zone, VM, "s1", taken)
        assert taken.read_text() == "mine"
        with pytest.raises(ExportFailed, match="no snapshot 'nope'"):
            await export_snapshot(zone, VM, "nope", env.tmp / "x")
        with pytest.raises(ExportFailed, match="No such file"):
            await export_snapshot(zone, VM, "s1", env.tmp / "no-dir" / "x")
        # Another export's (or a dead one's) partial file is not ours to remove.
        (env.tmp / ".y.part").write_text("theirs")
        with pytest.raises(ExportFailed, match="another export"):
            await export_snapshot(zone, VM, "s1", env.tmp / "y")
        assert (env.tmp / ".y.part").read_text() == "theirs"
        (env.tmp / ".y.part").unlink()
        assert sorted(p.name for p in env.tmp.iterdir() if p.name.endswith(".part")) == []


async def _cli(env: Env, *args: str, zone: bool = True) -> proc.Completed:
    reach = ["--zone", f"127.0.0.1:{env.port}", "--key", str(env.cn_key), "--host-key",
             str(env.host_pub)] if zone else []
    argv = [sys.executable, "-m", "snapper_zone.cli", *reach,
            "--dataset-root", env.cn_pool.name, *args]
    return await proc.run(argv, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent),
                               "SNAPPER_CN_CONFIG": ""})


async def test_cli_export_check_import(env: Env) -> None:
    async with env.client() as zone:
        env.write("a")
        await env.cn(zone).push(VM, "c1", metadata={"uuid": VM, "alias": "cli"})
    out = env.tmp / "c1.snapper"
    done = await _cli(env, "export", VM, "c1", str(out), "--progress", "none")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().startswith(f"exported {VM}@c1 to {out}")

    # import needs no zone: no --zone, no key.
    done = await _cli(env, "import", str(out), "--check", "--json", zone=False)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert (doc["vm"], doc["snapshot"]) == (VM, "c1")
    assert [d["label"] for d in doc["datasets"]] == ["root", "disk0"] + (
        ["disk1"] if env.caps.zvols else [])

    target = Dataset(env.cn_pool.name).child("clicopy")
    done = await _cli(env, "import", str(out), "--target", str(target), "--progress", "none",
                      zone=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"uuid": VM, "alias": "cli"}
    assert await _guids(env, target, "c1") == await _guids(env, env.vm, "c1")

    short = env.tmp / "short.snapper"
    short.write_bytes(out.read_bytes()[:-10])
    done = await _cli(env, "import", str(short), "--target", str(target) + "2", zone=False)
    ours = [ln for ln in done.stderr.splitlines() if ln.startswith("snapper:")]
    assert done.returncode == 1 and len(ours) == 1, done.stderr
    assert "ArchiveTruncated" in ours[0]
    done = await _cli(env, "export", VM, "c1", str(out))
    assert done.returncode == 1 and "ExportFailed" in done.stderr
    # Usage errors are refused before the file is read: exit 2.
    for bad in (["--durability", "local"], ["--onto-zone", "--target", "x/y"]):
        done = await _cli(env, "import", str(env.tmp / "absent"), *bad)
        assert done.returncode == 2, (bad, done.stderr)


async def test_a_file_changed_after_its_check_is_undone(env: Env,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The file changes between the check and the receive (another writer on the NFS
    mount): the second stream's damage is found while it is received, and the first
    dataset, already received, is destroyed with it."""
    from snapper_zone.cn import archive
    from snapper_zone.errors import SnapperError

    async with asyncio.timeout(240):
        out, _, _ = await _pushed(env, env.tmp)
        header, region = await verify(out)
        (_, at), = [(p, at) for p, at in header.spans(region) if p.label == "disk0"]
        checked = archive.verify

        async def check_then_damage(path: Path, **kw: object) -> object:
            got = await checked(path)
            with open(path, "r+b") as f:  # noqa: ASYNC230 (the test's own writer)
                f.seek(at + header.parts[1].bytes // 2)
                byte = f.read(1)
                f.seek(-1, 1)
                f.write(bytes([byte[0] ^ 0xFF]))
            return got

        monkeypatch.setattr(archive, "verify", check_then_damage)
        target = Dataset(env.cn_pool.name).child("copy")
        with pytest.raises(SnapperError) as ei:
            await import_snapshot(out, env.zfs, target=target)
        # ZFS's own stream checksum, or ours once the stream is in: either way undone.
        assert ei.value.code in ("ArchiveCorrupt", "InvalidStream", "ZfsError"), ei.value
        assert not await env.zfs.exists(target)


async def test_import_onto_a_new_zone_then_restore(env: Env, make_pool: PoolFactory) -> None:
    """The site's only zone is gone: a new zone takes the VM from the file (as the
    CN's push would bring it), and a restore from that zone is the VM at s2."""
    from snapper_zone.cn.archive import import_to_zone
    from snapper_zone.transfer.remote import ZoneClient, ZoneError
    from tests.test_cnclient import CN_ID

    async with asyncio.timeout(240):
        out, at, _ = await _pushed(env, env.tmp)
        pool = await make_pool("zone2", mounted=False)
        async with ssh_zone(env.zfs, pool, env.tmp / "zone2", cn_key=env.cn_key,
                            uuid="0f0c1a52-0b8e-4c61-9d7e-6f1f3ad0e0a2", cn_id=CN_ID,
                            vms={VM: CN_ID}) as z2:
            client = ZoneClient("127.0.0.1", z2.port, env.cn_key, host_key=z2.host_pub)
            async with client as zone:
                report = await import_to_zone(out, zone)
                assert report.datasets == [z2.zone.config.uuid]  # committed; durability local
                (held,) = await zone.snapshots(VM)
                assert held.name == "s2" and held.complete
                assert held.guids == await _guids(env, env.vm, "s2")
                assert await zone.metadata(VM, "s2") == {"uuid": VM, "alias": "two"}
                # Not twice; and a damaged file never reaches the zone.
                with pytest.raises(ImportRefused, match="already holds"):
                    await import_to_zone(out, zone)
                bad = env.tmp / "bad.snapper"
                bad.write_bytes(out.read_bytes()[:-1])
                with pytest.raises(ArchiveTruncated):
                    await import_to_zone(bad, zone)

                target = Dataset(env.cn_pool.name).child("back")
                await env.cn(zone).restore(VM, "s2", str(target))
                assert await _files(env, env.cn_pool, target) == at["root"]
                assert await _files(env, env.cn_pool, target.child("disk0")) == at["disk0"]

                # A zone that holds other snapshots of the VM refuses the full streams,
                # and the parts it took end with the session: nothing half kept.
                await zone.run("delete " + VM + " s2")
                env.write("c")
                await env.cn(zone).push(VM, "s3")
                before = await zone.inventory(VM)
                with pytest.raises(ZoneError):
                    await import_to_zone(out, zone)
                assert await zone.inventory(VM) == before
