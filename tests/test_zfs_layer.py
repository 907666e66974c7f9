"""The ZFS layer against real ZFS (zfs-fuse here, OpenZFS 2.3 in the VM tier)."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from snapper_zone import errors
from snapper_zone.fleet.pools import FilePool
from snapper_zone.zfs.names import Dataset, Snapshot
from snapper_zone.zfs.zfs import Capabilities, DatasetInfo, SendSpec, SnapshotInfo, Zfs
from tests.conftest import PoolFactory, require
from tests.helpers import (
    read_device,
    receive_bytes,
    send_bytes,
    write_device,
    write_random,
    zvol_device,
)

pytestmark = [pytest.mark.zfs, pytest.mark.openzfs]


async def _vm(zfs: Zfs, cn_pool: FilePool, snaps: int, size: int = 1 << 20) -> Dataset:
    """A dataset with ``snaps`` snapshots s1..sN, each after new random data."""
    ds = Dataset(cn_pool.name).child("vm")
    await zfs.create(ds)
    for i in range(1, snaps + 1):
        write_random(cn_pool, ds, f"f{i}", size)
        await zfs.snapshot([ds.snapshot(f"s{i}")])
    return ds


async def _guids(zfs: Zfs, ds: Dataset) -> dict[str, int]:
    return {s.name: s.guid for s in await zfs.snapshots(ds)}


async def test_capabilities_detected_once(zfs: Zfs, caps: Capabilities) -> None:
    assert caps.flavour in ("zfs-fuse", "openzfs", "illumos")
    assert await Zfs().capabilities() is caps
    if caps.flavour == "zfs-fuse":
        assert not caps.resumable_receive and not caps.zvols and not caps.bookmarks
    else:
        assert caps.resumable_receive and caps.bookmarks and caps.send_size_estimate


async def test_full_and_incremental_guids_equal(zfs: Zfs, cn_pool: FilePool,
                                                zone_pool: FilePool) -> None:
    src = await _vm(zfs, cn_pool, 2)
    dst = Dataset(zone_pool.name).child("copy")
    await zfs.pipe(SendSpec(src.snapshot("s1")), dst)
    await zfs.pipe(SendSpec(src.snapshot("s2"), base=src.snapshot("s1")), dst)
    src_guids = await _guids(zfs, src)
    assert await _guids(zfs, dst) == src_guids
    assert len(set(src_guids.values())) == 2
    snaps = await zfs.snapshots(dst)
    assert [s.name for s in snaps] == ["s1", "s2"]
    assert snaps[0].createtxg < snaps[1].createtxg and snaps[1].referenced > 2 << 20


async def test_intermediates_with_capital_i(zfs: Zfs, cn_pool: FilePool,
                                            zone_pool: FilePool) -> None:
    src = await _vm(zfs, cn_pool, 4, size=256 << 10)
    dst = Dataset(zone_pool.name).child("copy")
    await zfs.pipe(SendSpec(src.snapshot("s1")), dst)
    await zfs.pipe(SendSpec(src.snapshot("s4"), base=src.snapshot("s1"),
                            intermediates=True), dst)
    assert await _guids(zfs, dst) == await _guids(zfs, src)


async def test_truncated_stream_is_typed_and_keeps_earlier_snapshots(
        zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool) -> None:
    src = await _vm(zfs, cn_pool, 3)
    dst = Dataset(zone_pool.name).child("copy")
    await zfs.pipe(SendSpec(src.snapshot("s1")), dst)
    before = await _guids(zfs, dst)
    stream = await send_bytes(zfs, SendSpec(src.snapshot("s2"), base=src.snapshot("s1")))
    with pytest.raises(errors.StreamInvalid) as info:
        await receive_bytes(zfs, dst, stream[: len(stream) // 2], resumable=False)
    assert info.value.argv[:2] == ("zfs", "receive") and info.value.stderr
    assert await _guids(zfs, dst) == before
    # the dataset is still usable: the whole increment goes in afterwards
    await receive_bytes(zfs, dst, stream, resumable=False)
    assert (await _guids(zfs, dst))["s2"] == (await _guids(zfs, src))["s2"]


async def test_corrupted_byte_is_typed_and_target_unchanged(
        zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool) -> None:
    src = await _vm(zfs, cn_pool, 2)
    dst = Dataset(zone_pool.name).child("copy")
    await zfs.pipe(SendSpec(src.snapshot("s1")), dst)
    before = await zfs.snapshots(dst)
    stream = bytearray(await send_bytes(zfs, SendSpec(src.snapshot("s2"),
                                                      base=src.snapshot("s1"))))
    stream[len(stream) // 2] ^= 0xFF
    with pytest.raises(errors.StreamInvalid):
        await receive_bytes(zfs, dst, bytes(stream), resumable=False)
    after = await zfs.snapshots(dst)
    assert [(s.name, s.guid) for s in after] == [(s.name, s.guid) for s in before]


async def test_corrupted_full_stream_creates_nothing(zfs: Zfs, cn_pool: FilePool,
                                                     zone_pool: FilePool) -> None:
    src = await _vm(zfs, cn_pool, 1)
    stream = bytearray(await send_bytes(zfs, SendSpec(src.snapshot("s1"))))
    stream[len(stream) // 2] ^= 0x55
    dst = Dataset(zone_pool.name).child("copy")
    with pytest.raises(errors.StreamInvalid):
        await receive_bytes(zfs, dst, bytes(stream), resumable=False)
    assert not await zfs.exists(dst)


async def test_wrong_base_is_incremental_mismatch(zfs: Zfs, cn_pool: FilePool,
                                                  zone_pool: FilePool) -> None:
    src = await _vm(zfs, cn_pool, 3, size=64 << 10)
    dst = Dataset(zone_pool.name).child("copy")
    await zfs.pipe(SendSpec(src.snapshot("s1")), dst)
    with pytest.raises(errors.IncrementalSourceMismatch):
        await zfs.pipe(SendSpec(src.snapshot("s3"), base=src.snapshot("s2")), dst)
    with pytest.raises(errors.DatasetExists):
        await zfs.pipe(SendSpec(src.snapshot("s1")), dst)


async def test_resumable_receive_interrupted_and_resumed(
        zfs: Zfs, caps: Capabilities, cn_pool: FilePool, zone_pool: FilePool) -> None:
    require(caps, "resumable_receive")
    src = await _vm(zfs, cn_pool, 2, size=4 << 20)
    dst = Dataset(zone_pool.name).child("copy")
    await zfs.pipe(SendSpec(src.snapshot("s1")), dst)
    stream = await send_bytes(zfs, SendSpec(src.snapshot("s2"), base=src.snapshot("s1")))
    with pytest.raises(errors.StreamInvalid):
        await receive_bytes(zfs, dst, stream[: len(stream) * 2 // 3])
    token = await zfs.resume_token(dst)
    assert token is not None
    info = await zfs.resume_token_info(token)
    assert int(info["toguid"], 0) == (await _guids(zfs, src))["s2"]
    with pytest.raises(errors.PartialReceiveExists):
        await zfs.pipe(SendSpec(src.snapshot("s2"), base=src.snapshot("s1")), dst)
    await zfs.pipe(SendSpec(resume_token=token), dst)
    assert await zfs.resume_token(dst) is None
    assert await _guids(zfs, dst) == await _guids(zfs, src)


async def test_stale_token_detected_and_aborted(
        zfs: Zfs, caps: Capabilities, cn_pool: FilePool, zone_pool: FilePool) -> None:
    require(caps, "resumable_receive")
    src = await _vm(zfs, cn_pool, 2, size=4 << 20)
    dst = Dataset(zone_pool.name).child("copy")
    await zfs.pipe(SendSpec(src.snapshot("s1")), dst)
    stream = await send_bytes(zfs, SendSpec(src.snapshot("s2"), base=src.snapshot("s1")))
    with pytest.raises(errors.StreamInvalid):
        await receive_bytes(zfs, dst, stream[: len(stream) // 2])
    token = await zfs.resume_token(dst)
    assert token is not None
    await zfs.destroy(src.snapshot("s2"))  # the snapshot the token names is gone
    with pytest.raises(errors.ResumeTokenStale):
        await zfs.pipe(SendSpec(resume_token=token), dst)
    await zfs.receive_abort(dst)
    assert await zfs.resume_token(dst) is None
    assert list(await _guids(zfs, dst)) == ["s1"]


async def test_bookmark_as_incremental_source(
        zfs: Zfs, caps: Capabilities, cn_pool: FilePool, zone_pool: FilePool) -> None:
    require(caps, "bookmarks")
    src = await _vm(zfs, cn_pool, 1)
    dst = Dataset(zone_pool.name).child("copy")
    await zfs.pipe(SendSpec(src.snapshot("s1")), dst)
    bm = await zfs.bookmark(src.snapshot("s1"), "pushed")
    await zfs.destroy(src.snapshot("s1"))
    write_random(cn_pool, src, "more", 1 << 20)
    await zfs.snapshot([src.snapshot("s2")])
    await zfs.pipe(SendSpec(src.snapshot("s2"), base=bm), dst)
    [info] = await zfs.bookmarks(src)
    assert info.bookmark == bm
    assert (await _guids(zfs, dst))["s2"] == (await _guids(zfs, src))["s2"]
    assert (await _guids(zfs, dst))["s1"] == info.guid


async def test_tree_reads_bookmarks_where_zfs_has_them(
        zfs: Zfs, caps: Capabilities, cn_pool: FilePool) -> None:
    """``tree(bookmarks=True)``: each dataset's bookmarks as ``bookmarks`` lists
    them, a bookmark at its snapshot's txg (a push relies on it); None where ZFS
    has no bookmarks, and the rest of the listing as without them."""
    src = await _vm(zfs, cn_pool, 2, size=4096)
    part = src.child("disk0")
    await zfs.create(part)
    await zfs.snapshot([src.snapshot("s3")], recursive=True)
    plain = await zfs.tree(src, depth=2)
    marked = await zfs.tree(src, depth=2, bookmarks=True)
    assert (marked.datasets, marked.snapshots) == (plain.datasets, plain.snapshots)
    assert plain.bookmarks is None
    if not caps.bookmarks:
        assert marked.bookmarks is None
        return
    await zfs.bookmark(src.snapshot("s1"), "a")
    await zfs.bookmark(src.snapshot("s3"), "b")
    await zfs.bookmark(part.snapshot("s3"), "c")
    got = (await zfs.tree(src, depth=2, bookmarks=True)).bookmarks
    assert got == [*await zfs.bookmarks(src), *await zfs.bookmarks(part)]
    txg = {str(s.snapshot): s.createtxg for s in marked.snapshots}
    assert [(str(b.bookmark), b.createtxg) for b in got] == [
        (f"{src}#a", txg[f"{src}@s1"]), (f"{src}#b", txg[f"{src}@s3"]),
        (f"{part}#c", txg[f"{part}@s3"])]


async def test_hold_prevents_destroy(zfs: Zfs, caps: Capabilities, cn_pool: FilePool) -> None:
    src = await _vm(zfs, cn_pool, 1, size=4096)
    snap = src.snapshot("s1")
    await zfs.hold("snapper-base", [snap])
    assert (await zfs.snapshots(src))[0].userrefs == 1
    if caps.holds_list:
        assert await zfs.holds(snap) == {"snapper-base"}
    with pytest.raises(errors.DatasetBusy):
        await zfs.destroy(snap)
    await zfs.release("snapper-base", [snap])
    await zfs.destroy(snap)
    assert await zfs.snapshots(src) == []


async def test_zvol_round_trip(zfs: Zfs, caps: Capabilities, cn_pool: FilePool,
                               zone_pool: FilePool) -> None:
    require(caps, "zvols")
    vol = Dataset(cn_pool.name).child("disk0")
    await zfs.create(vol, volsize=8 << 20)
    data = bytes(range(256)) * 4096
    await write_device(zvol_device(vol), data)
    await zfs.snapshot([vol.snapshot("s1")])
    dst = Dataset(zone_pool.name).child("disk0")
    await zfs.pipe(SendSpec(vol.snapshot("s1")), dst)
    assert (await zfs.dataset(dst)).type == "volume"
    assert await _guids(zfs, dst) == await _guids(zfs, vol)
    back = Dataset(cn_pool.name).child("restored")
    await zfs.pipe(SendSpec(dst.snapshot("s1")), back)
    got = await read_device(zvol_device(back), len(data))
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


async def test_send_size_estimate(zfs: Zfs, caps: Capabilities, cn_pool: FilePool) -> None:
    require(caps, "send_size_estimate")
    src = await _vm(zfs, cn_pool, 1, size=2 << 20)
    est = await zfs.send_size(SendSpec(src.snapshot("s1")))
    actual = len(await send_bytes(zfs, SendSpec(src.snapshot("s1"))))
    assert 0.5 * actual <= est <= 1.5 * actual


async def test_user_props_and_listing(zfs: Zfs, cn_pool: FilePool) -> None:
    src = await _vm(zfs, cn_pool, 2, size=4096)
    await zfs.set_user_props(src.snapshot("s1"), {"snapper:complete": "yes"})
    await zfs.set_user_props(src, {"snapper:vm": "abc"})
    snaps = await zfs.snapshots(src, user_props=["snapper:complete"])
    assert [dict(s.user_props) for s in snaps] == [{"snapper:complete": "yes"}, {}]
    [info] = await zfs.datasets(src, user_props=["snapper:vm"])
    assert info.user_props == {"snapper:vm": "abc"} and info.type == "filesystem"
    assert info.available > 0
    root = await zfs.datasets(Dataset(cn_pool.name))
    assert [d.dataset for d in root] == [Dataset(cn_pool.name), src]
    with pytest.raises(errors.InvalidName):
        await zfs.set_user_props(src, {"com.sun:foo": "x"})


async def test_tree_is_datasets_and_snapshots_in_one(zfs: Zfs, cn_pool: FilePool) -> None:
    """``tree`` answers what ``datasets`` and a recursive ``snapshots`` would, user
    properties included on both; a missing root is typed as theirs is."""
    src = await _vm(zfs, cn_pool, 2, size=4096)
    part = src.child("disk0")
    await zfs.create(part)
    await zfs.snapshot([src.snapshot("s3")], recursive=True)
    await zfs.set_user_props(src.snapshot("s3"), {"snapper:complete": "yes"})
    await zfs.set_user_props(part, {"snapper:complete": "no"})
    props = ["snapper:complete"]
    datasets, snaps, _ = await zfs.tree(src, user_props=props)
    assert datasets == await zfs.datasets(src, user_props=props)
    assert snaps == await zfs.snapshots(src, user_props=props, recursive=True)
    assert [d.dataset for d in datasets] == [src, part]
    assert [str(s.snapshot) for s in snaps] == [f"{src}@s1", f"{src}@s2", f"{src}@s3",
                                                f"{part}@s3"]
    assert snaps[2].user_props["snapper:complete"] == "yes"
    # One level down (a receive's target): its own snapshots, none of a child's.
    near, own, _ = await zfs.tree(src, depth=1)
    assert near == await zfs.datasets(src, depth=1)
    assert own == await zfs.snapshots(src) and own[-1].name == "s3"
    with pytest.raises(errors.DatasetNotFound):
        await zfs.tree(Dataset(cn_pool.name).child("ghost"))


async def test_tree_without_inherited_reads_a_user_property_where_it_is_set(
        zfs: Zfs, cn_pool: FilePool) -> None:
    """``inherited=False``: a property set on the root is on the root's row only,
    not on every dataset and snapshot below it (a VM's tombstones); one set on a
    snapshot stays on it; the rest of the listing is unchanged."""
    src = await _vm(zfs, cn_pool, 2, size=4096)
    part = src.child("disk0")
    await zfs.create(part)
    await zfs.snapshot([src.snapshot("s3")], recursive=True)
    await zfs.set_user_props(src, {"snapper:tombstones": "1:2"})
    await zfs.set_user_props(src.snapshot("s3"), {"snapper:complete": "yes"})
    props = ["snapper:tombstones", "snapper:complete"]
    everywhere = await zfs.tree(src, user_props=props)
    rows: list[DatasetInfo | SnapshotInfo] = [*everywhere.datasets, *everywhere.snapshots]
    assert all(i.user_props.get("snapper:tombstones") == "1:2" for i in rows)
    datasets, snaps, _ = await zfs.tree(src, user_props=props, inherited=False)
    assert {str(d.dataset): d.user_props for d in datasets} == {
        str(src): {"snapper:tombstones": "1:2"}, str(part): {}}
    assert {s.snapshot.name: s.user_props for s in snaps if s.snapshot.dataset == src} == {
        "s1": {}, "s2": {}, "s3": {"snapper:complete": "yes"}}
    without: list[DatasetInfo | SnapshotInfo] = [*datasets, *snaps]
    assert [dataclasses.replace(i, user_props={}) for i in rows] == [
        dataclasses.replace(i, user_props={}) for i in without]


async def test_missing_dataset_is_typed(zfs: Zfs, cn_pool: FilePool) -> None:
    ghost = Dataset(cn_pool.name).child("ghost")
    with pytest.raises(errors.DatasetNotFound) as info:
        await zfs.destroy(ghost)
    assert "ghost" in info.value.stderr
    assert not await zfs.exists(ghost)
    with pytest.raises(errors.DatasetNotFound):
        await zfs.dataset(ghost)


async def test_full_pool_is_out_of_space(zfs: Zfs, cn_pool: FilePool,
                                         make_pool: PoolFactory) -> None:
    src = await _vm(zfs, cn_pool, 1, size=160 << 20)
    tiny = await make_pool("tiny", size=128 << 20, mounted=False)
    dst = Dataset(tiny.name).child("copy")
    with pytest.raises(errors.OutOfSpace):
        await zfs.pipe(SendSpec(src.snapshot("s1")), dst, resumable=False)
    assert await zfs.snapshots(Dataset(tiny.name), recursive=True) == []


async def test_rollback_and_recursive_snapshot(zfs: Zfs, cn_pool: FilePool) -> None:
    vm = Dataset(cn_pool.name).child("vm")
    await zfs.create(vm)
    await zfs.create(vm.child("data"))
    digest = write_random(cn_pool, vm.child("data"), "x", 4096)
    await zfs.snapshot([vm.snapshot("a")], recursive=True)
    assert {str(s.snapshot) for s in await zfs.snapshots(vm, recursive=True)} == {
        f"{vm}@a", f"{vm}/data@a"}
    write_random(cn_pool, vm.child("data"), "x", 4096)
    await zfs.rollback(Snapshot(vm.child("data"), "a"))
    from tests.helpers import mountpoint
    got = hashlib.sha256((mountpoint(cn_pool, vm.child("data")) / "x").read_bytes()).hexdigest()
    assert got == digest
