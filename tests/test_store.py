"""ZoneStore on real ZFS: completeness, metadata, deletion of any snapshot."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapper_zone.errors import DatasetNotFound, MetadataTooLarge, PartDeleted
from snapper_zone.fleet.pools import FilePool
from snapper_zone.transfer.store import (
    P_COMPLETE,
    P_PARTS,
    SnapshotNotFound,
    ZoneStore,
    decode_metadata,
    encode_metadata,
    set_aside,
)
from snapper_zone.zfs.names import Bookmark, Dataset, Snapshot
from snapper_zone.zfs.zfs import SAFE_CONTAINER_PROPS, SendSpec, Zfs
from tests.helpers import write_random

VM = str(uuid.UUID(int=7))


@given(st.dictionaries(st.text(max_size=20), st.text(max_size=200), max_size=30))
def test_metadata_codec_round_trip(meta: dict[str, str]) -> None:
    props = encode_metadata(meta, 1 << 20)
    assert all(len(v) <= 8000 for v in props.values())
    assert decode_metadata(props) == meta


def test_metadata_limit() -> None:
    with pytest.raises(MetadataTooLarge):
        encode_metadata({"x": "y" * 1000}, 100)


@given(st.uuids(), st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_only_the_names_a_drop_gives_are_swept(vm: uuid.UUID, ns: int) -> None:
    assert set_aside(f"dropped-{vm}-{ns:x}")
    for other in (str(vm), f"dropped-{vm}", f"dropped-{vm}-{ns:x}-x", f"dropped-{vm}-",
                  f"Dropped-{vm}-{ns:x}", "dropped-data", f"my-dropped-{vm}-{ns:x}"):
        assert not set_aside(other), other


async def _new_store(zfs: Zfs, zone_pool: FilePool) -> ZoneStore:
    store = ZoneStore(zfs, Dataset(zone_pool.name).child("snapper"))
    await zfs.create(store.root)
    return store


async def _pushed(zfs: Zfs, cn_pool: FilePool, store: ZoneStore, snaps: int) -> Dataset:
    src = Dataset(cn_pool.name).child("vm")
    await zfs.create(src)
    await store.ensure_vm(VM)
    for i in range(1, snaps + 1):
        write_random(cn_pool, src, f"f{i}", 64 << 10)
        await zfs.snapshot([src.snapshot(f"s{i}")])
        base = src.snapshot(f"s{i - 1}") if i > 1 else None
        await zfs.pipe(SendSpec(src.snapshot(f"s{i}"), base=base), store.part_dataset(VM, "root"))
    return src


@pytest.mark.zfs
@pytest.mark.openzfs
async def test_complete_metadata_and_delete(zfs: Zfs, cn_pool: FilePool,
                                            zone_pool: FilePool) -> None:
    store = await _new_store(zfs, zone_pool)
    src = await _pushed(zfs, cn_pool, store, 3)
    snaps = await store.snapshots(VM)
    assert [(s.name, s.complete) for s in snaps] == [("s1", False), ("s2", False),
                                                     ("s3", False)]
    with pytest.raises(SnapshotNotFound, match="disk0"):
        await store.mark_complete(VM, "s2", ["root", "disk0"], None, "cn:x")
    meta = {"uuid": VM, "alias": "web", "big": "x" * 50_000}
    done = await store.mark_complete(VM, "s2", ["root"], meta, "cn:x")
    assert done.complete and done.source == "cn:x"
    # What it answers (without listing again) is what a listing says now.
    assert done == await store.snapshot(VM, "s2")
    assert await store.mark_complete(VM, "s2", ["root"], meta, "cn:y") == \
        await store.snapshot(VM, "s2")  # committed again: the marker's properties reset
    assert await store.metadata(VM, "s2") == meta
    with pytest.raises(SnapshotNotFound):
        await store.metadata(VM, "s3")  # incomplete: no marker, so no metadata
    cn_guids = {s.name: s.guid for s in await zfs.snapshots(src)}
    assert {s.name: s.parts["root"].guid for s in await store.snapshots(VM)} == cn_guids
    assert await store.vms() == [VM]
    await store.delete(VM, "s2")  # an intermediate, complete snapshot
    assert [s.name for s in await store.snapshots(VM)] == ["s1", "s3"]
    with pytest.raises(SnapshotNotFound):
        await store.metadata(VM, "s2")


class _ReconcileGetsThereFirst(Zfs):
    """Real ZFS, where someone else destroys each snapshot just before this
    store does, as a reconcile round following the delete's own tombstones
    did (CI, the demo: a DELETE answered 404 for a part it had just listed)."""

    def __init__(self) -> None:
        super().__init__()
        self.raced: list[str] = []

    async def destroy(self, target: Dataset | Snapshot | Bookmark, *,
                      recursive: bool = False) -> None:
        if isinstance(target, Snapshot):
            await super().destroy(target, recursive=recursive)
            self.raced.append(str(target))
        await super().destroy(target, recursive=recursive)


@pytest.mark.zfs
async def test_a_delete_whose_parts_a_reconcile_destroyed_meanwhile_succeeds(
        zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool) -> None:
    store = await _new_store(zfs, zone_pool)
    await _pushed(zfs, cn_pool, store, 3)
    await store.mark_complete(VM, "s2", ["root"], None, "cn:x")
    guid = (await store.snapshot(VM, "s2")).parts["root"].guid
    racing = _ReconcileGetsThereFirst()
    raced = ZoneStore(racing, store.root)
    await raced.delete(VM, "s2")
    assert len(racing.raced) == 2  # the marker and the part: both gone under it
    assert [s.name for s in await store.snapshots(VM)] == ["s1", "s3"]
    assert guid in await store.tombstones(VM)
    await raced.delete(VM, "s3")  # the newest: the head settles back to s1
    assert [s.name for s in await store.snapshots(VM)] == ["s1"]
    # The reconcile's own destroy, finding it gone already, is done too.
    await raced.destroy_part(VM, "root", "s1", (await store.snapshot(VM, "s1")).parts["root"].guid)
    assert await store.snapshots(VM) == []
    with pytest.raises(SnapshotNotFound):
        await raced.delete(VM, "s2")  # a snapshot never there is still an error


@pytest.mark.zfs
async def test_a_commit_planned_before_a_delete_is_refused_after_it(
        zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool) -> None:
    """A reconcile's MarkComplete from a listing that straddled a delete (it saw
    the parts but neither the marker nor the tombstones) arrives after the
    delete tombstoned the parts and destroyed the marker: no marker is written
    (the soak's seed 3 found one left over, naming parts the delete destroyed)."""
    store = await _new_store(zfs, zone_pool)
    await _pushed(zfs, cn_pool, store, 3)
    await store.mark_complete(VM, "s2", ["root"], None, "cn:x")
    guid = (await store.snapshot(VM, "s2")).parts["root"].guid
    await store.add_tombstones(VM, [guid])  # the delete's first two steps
    await store.destroy_marker(VM, "s2")
    with pytest.raises(PartDeleted, match="root"):
        await store.mark_complete(VM, "s2", ["root"], None, "zone:peer")
    s2 = await store.snapshot(VM, "s2")
    assert not s2.complete and not await zfs.exists(Snapshot(store.vm_dataset(VM), "s2"))
    # An untouched snapshot still commits.
    assert (await store.mark_complete(VM, "s3", ["root"], None, "cn:x")).complete


class _CommitLandsMidDelete(Zfs):
    """Real ZFS, where a commit that read the tombstones just before the delete
    wrote them puts its marker back while the delete destroys the parts."""

    def __init__(self, marker: Snapshot) -> None:
        super().__init__()
        self.marker = marker
        self.landed = False

    async def destroy(self, target: Dataset | Snapshot | Bookmark, *,
                      recursive: bool = False) -> None:
        if isinstance(target, Snapshot) and target.dataset != self.marker.dataset \
                and not self.landed:
            self.landed = True
            await super().snapshot([self.marker], props={P_COMPLETE: "yes", P_PARTS: "root"})
        await super().destroy(target, recursive=recursive)


@pytest.mark.zfs
async def test_a_marker_a_commit_puts_back_mid_delete_is_destroyed_too(
        zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool) -> None:
    store = await _new_store(zfs, zone_pool)
    await _pushed(zfs, cn_pool, store, 3)
    await store.mark_complete(VM, "s2", ["root"], None, "cn:x")
    racing = _CommitLandsMidDelete(Snapshot(store.vm_dataset(VM), "s2"))
    await ZoneStore(racing, store.root).delete(VM, "s2")
    assert racing.landed
    # Nothing of s2 is left: a marker without its parts would be, for good.
    assert [s.name for s in await store.snapshots(VM)] == ["s1", "s3"]


class _NewestGoesFirst(Zfs):
    """Real ZFS, where the snapshot a settle rolls back to is destroyed just
    before, once: a reconcile round deleting a tombstoned newest meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.raced: list[str] = []

    async def rollback(self, snap: Snapshot, *, destroy_later: bool = False) -> None:
        if not self.raced:
            self.raced.append(str(snap))
            await super().destroy(snap)
        await super().rollback(snap, destroy_later=destroy_later)


@pytest.mark.zfs
async def test_a_settle_whose_newest_snapshot_goes_meanwhile_rolls_back_to_the_next(
        zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool) -> None:
    store = await _new_store(zfs, zone_pool)
    await _pushed(zfs, cn_pool, store, 3)
    racing = _NewestGoesFirst()
    await ZoneStore(racing, store.root).delete(VM, "s2")
    assert racing.raced == [f"{store.part_dataset(VM, 'root')}@s3"]
    assert [s.name for s in await store.snapshots(VM)] == ["s1"]
    # The head is s1's again: an incremental from s1 lands without -F.
    src = Dataset(cn_pool.name).child("vm")
    await zfs.pipe(SendSpec(src.snapshot("s3"), base=src.snapshot("s1")),
                   store.part_dataset(VM, "root"))
    assert [s.name for s in await store.snapshots(VM)] == ["s1", "s3"]


@pytest.mark.zfs
async def test_ensure_vm_says_whether_it_created_the_container(zfs: Zfs,
                                                               zone_pool: FilePool) -> None:
    """Created once, safe (never mounted, nothing runnable); a second call only says so."""
    store = await _new_store(zfs, zone_pool)
    assert await store.ensure_vm(VM) is True
    assert await store.ensure_vm(VM) is False
    props = await zfs.props(store.vm_dataset(VM), list(SAFE_CONTAINER_PROPS))
    assert props == SAFE_CONTAINER_PROPS
    # A root that is not there is not taken for "already there".
    gone = ZoneStore(zfs, Dataset(zone_pool.name).child("missing"))
    with pytest.raises(DatasetNotFound):
        await gone.ensure_vm(VM)


@pytest.mark.zfs
async def test_concurrent_tombstone_changes_keep_each_other(zfs: Zfs,
                                                            zone_pool: FilePool) -> None:
    """A delete tombstoning a snapshot while reconcile forgets expired tombstones:
    both land (a lost tombstone made a deleted snapshot come back in the soak)."""
    store = await _new_store(zfs, zone_pool)
    await store.ensure_vm(VM)
    await store.add_tombstones(VM, [1, 2, 3], now=100)
    await asyncio.gather(store.forget_tombstones(VM, [1, 2]),
                         store.add_tombstones(VM, [10], now=200),
                         store.add_tombstones(VM, [11], now=201),
                         store.forget_tombstones(VM, [3]))
    assert await store.tombstones(VM) == {10: 200, 11: 201}
    # Adopting a peer's: new ones keep the peer's time, known ones their own.
    assert await store.merge_tombstones(VM, {10: 50, 12: 300})
    assert not await store.merge_tombstones(VM, {11: 1})
    assert await store.tombstones(VM) == {10: 200, 11: 201, 12: 300}


@pytest.mark.zfs
async def test_a_listing_never_sees_a_copy_half_dropped(zfs: Zfs, cn_pool: FilePool,
                                                        zone_pool: FilePool) -> None:
    """`zfs destroy -r` goes child by child; a reconcile round listing the VM
    meanwhile planned from a copy with datasets and snapshots missing (soak)."""
    store = await _new_store(zfs, zone_pool)
    src = await _pushed(zfs, cn_pool, store, 3)
    before, _ = await asyncio.gather(store.document(VM), store.drop_vm(VM))
    assert [s.name for s in before.snapshots] == ["s1", "s2", "s3"]
    assert set(before.datasets) == {"root"}
    # The other way round: the listing waits for the whole destroy.
    await store.ensure_vm(VM)
    await zfs.pipe(SendSpec(src.snapshot("s1")), store.part_dataset(VM, "root"))
    _, after = await asyncio.gather(store.drop_vm(VM), store.document(VM))
    assert after.snapshots == () and after.datasets == {}


@pytest.mark.zfs
async def test_a_marker_that_outlived_its_parts_is_not_complete(zfs: Zfs, cn_pool: FilePool,
                                                                zone_pool: FilePool) -> None:
    """A `zfs destroy -r` of a copy cut short leaves markers whose parts are gone
    (it goes child by child): those snapshots list as incomplete, never as
    complete with nothing in them, and a commit once the parts are back marks
    them whole again (soak: an ack's zone listed one complete with no parts)."""
    store = await _new_store(zfs, zone_pool)
    src = await _pushed(zfs, cn_pool, store, 3)
    await store.mark_complete(VM, "s2", ["root"], {"alias": "web"}, "cn:x")
    assert [s.name for s in await store.snapshots(VM) if s.complete] == ["s2"]
    await zfs.destroy(store.part_dataset(VM, "root"), recursive=True)  # the cut drop
    [s2] = await store.snapshots(VM)
    assert (s2.name, s2.complete, dict(s2.parts)) == ("s2", False, {})
    doc = await store.document(VM)
    assert [(s.name, s.complete) for s in doc.snapshots] == [("s2", False)]
    # The part comes back (a peer's copy, a re-push): committed again, whole again.
    for i in (1, 2):
        base = src.snapshot(f"s{i - 1}") if i > 1 else None
        await zfs.pipe(SendSpec(src.snapshot(f"s{i}"), base=base), store.part_dataset(VM, "root"))
    done = await store.mark_complete(VM, "s2", ["root"], None, "zone:y")
    assert done.complete and done == await store.snapshot(VM, "s2")
    assert await store.metadata(VM, "s2") == {"alias": "web"}  # the marker kept its metadata


@pytest.mark.zfs
@pytest.mark.openzfs
async def test_a_drop_that_cannot_destroy_everything_leaves_no_half_copy(
        zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool) -> None:
    """`zfs destroy -r` stops at the first busy snapshot (soak: an orphaned send
    held one): its older snapshots went, its newer stayed, and reconcile took the
    remains for a diverged history. The drop sets the copy aside in one rename
    first; what cannot be destroyed yet waits, under no VM's name, for a sweep."""
    store = await _new_store(zfs, zone_pool)
    await _pushed(zfs, cn_pool, store, 3)
    await store.mark_complete(VM, "s3", ["root"], None, "cn:x")
    busy = store.part_dataset(VM, "root").snapshot("s2")
    await zfs.hold("test", [busy])  # destroy refuses it as it would a busy one
    await store.drop_vm(VM)
    assert await store.snapshots(VM) == [] and await store.vms() == []
    doc = await store.document(VM)
    assert doc.snapshots == () and doc.datasets == {}
    [aside] = [i.dataset for i in await zfs.datasets(store.root, depth=1)
               if i.dataset != store.root]
    assert aside.basename.startswith(f"dropped-{VM}-")
    assert await store.sweep_aside() == [aside]  # still held: kept for the next sweep
    await zfs.release("test", [aside.child("root").snapshot("s2")])
    assert await store.sweep_aside() == []
    assert [i.dataset for i in await zfs.datasets(store.root, depth=1)] == [store.root]
    await store.drop_vm(VM)  # a copy already gone is dropped
