"""Every VM brand's datasets, and the send options (issue 15).

Pure: a VM's datasets discovered from a ``zfs list`` answer as SmartOS lays
them out (``cn.datasets``), where each goes back on restore, and the send
options two ZFSes agree on (``zfs.choose_send_options``).

On a real fleet (two snapperd zones mirroring, one CN): a VM's children push,
mirror and restore where they were (every tier); a KVM VM's sibling zvols
too, an encrypted VM goes raw all the way and its key opens the restore, and
a compressed send moves fewer bytes (the OpenZFS tier).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import string
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replication.peers import pair_of
from snapper_zone.cn.client import CnClient
from snapper_zone.cn.datasets import ROOT_LABEL, LayoutError, discover, place
from snapper_zone.errors import EncryptionUnsupported
from snapper_zone.fleet.local import LocalCN, LocalFleet, LocalZone
from snapper_zone.transfer.remote import ZoneClient
from snapper_zone.zfs import proc
from snapper_zone.zfs.names import Dataset
from snapper_zone.zfs.zfs import (
    STREAM_FEATURES,
    Capabilities,
    SendOptions,
    SendSpec,
    Zfs,
    choose_send_options,
    parse_capabilities,
)
from tests.conftest import ZfsTier, require
from tests.helpers import (
    mountpoint,
    read_device,
    send_bytes,
    wait_until,
    write_device,
    zvol_device,
)

# -- discovery: pure ----------------------------------------------------------------

VM = "74c59c61-4559-4ca2-b1ef-0ca22f2f936a"
OTHER_VM = "0b4f5a3c-1f2e-4d3c-9b8a-7f6e5d4c3b2a"
child_names = st.from_regex(r"[a-z][a-z0-9_.-]{0,12}", fullmatch=True).filter(
    lambda s: ".." not in s and s != ROOT_LABEL and not s.startswith(ROOT_LABEL + "-"))
disk_numbers = st.integers(0, 999)  # -disk5000 is a filesystem below


@st.composite
def layouts(draw: st.DrawFn) -> tuple[Dataset, dict[str, Dataset], list[tuple[str, str]],
                                      list[Dataset]]:
    """A CN's ``zfs list`` around one VM: (top, the parts expected, the rows, skipped)."""
    root = Dataset(draw(st.sampled_from(["zones", "pool/zones"])))
    top = root.child(VM)
    want = {ROOT_LABEL: top}
    rows = [(str(root), "filesystem"), (str(top), draw(st.sampled_from(["filesystem"])))]
    skipped = []
    for name in draw(st.lists(child_names, max_size=4, unique=True)):
        kind = draw(st.sampled_from(["filesystem", "volume"]))
        want[name] = top.child(name)
        rows.append((str(top.child(name)), kind))
        rows.append((f"{top.child(name)}@s1", "snapshot"))
        if kind == "filesystem" and draw(st.booleans()):
            deeper = top.child(name).child("inner")
            rows.append((str(deeper), "filesystem"))
            skipped.append(deeper)
    for n in draw(st.lists(disk_numbers, max_size=3, unique=True)):
        sib = Dataset(f"{top}-disk{n}")
        want[f"root-disk{n}"] = sib
        rows += [(str(sib), "volume"), (f"{sib}@s1", "snapshot"), (f"{sib}#b", "bookmark")]
    # Not the VM's: another VM and its disk, a filesystem named like a disk,
    # a disk of a VM whose uuid starts the same, snapshots of the VM.
    rows += [(str(root.child(OTHER_VM)), "filesystem"),
             (f"{root.child(OTHER_VM)}-disk0", "volume"),
             (f"{top}-disk77x", "volume"), (f"{top}-cores", "filesystem"),
             (f"{top}@s1", "snapshot")]
    if draw(st.booleans()):
        rows.append((f"{top}-disk5000", "filesystem"))
    return top, want, draw(st.permutations(rows)), skipped


@given(layouts())
def test_discovery_finds_exactly_the_vms_parts(
        case: tuple[Dataset, dict[str, Dataset], list[tuple[str, str]], list[Dataset]]) -> None:
    top, want, rows, skipped = case
    got = discover(top, rows)
    assert got.parts == want
    assert next(iter(got.parts)) == ROOT_LABEL
    assert sorted(got.skipped) == sorted(skipped)
    # root, the children by name, the disks by number (the order they are sent in)
    assert list(got.parts) == [ROOT_LABEL, *sorted(lb for lb in want
                                                   if not lb.startswith(ROOT_LABEL)),
                               *sorted((lb for lb in want if lb.startswith("root-")),
                                       key=lambda lb: int(lb[len("root-disk"):]))]
    assert got.siblings == [ds for label, ds in got.parts.items() if label.startswith("root-")]
    for label, ds in got.parts.items():
        # Labels are one dataset component on the zone, and place() inverts them.
        assert Dataset("z").child(label)
        assert place(top, label) == ds


@given(layouts(), st.sampled_from(["pool/copy", "other/restored/vm"]))
def test_restore_elsewhere_keeps_children_below_and_disks_beside(
        case: tuple[Dataset, dict[str, Dataset], list[tuple[str, str]], list[Dataset]],
        target: str) -> None:
    _top, want, _rows, _skipped = case
    new = Dataset(target)
    for label in want:
        where = place(new, label)
        if label == ROOT_LABEL:
            assert where == new
        elif label.startswith("root-"):
            assert where.parent == new.parent and where.path == new.path + label[4:]
        else:
            assert where.parent == new


@pytest.mark.parametrize("child", ["root", "root-disk0", "root-x"])
def test_a_child_that_would_take_another_parts_label_is_refused(child: str) -> None:
    top = Dataset("zones").child(VM)
    with pytest.raises(LayoutError) as err:
        discover(top, [(str(top), "filesystem"), (str(top.child(child)), "volume")])
    assert err.value.code == "DatasetLayout" and child in err.value.message


def test_a_missing_vm_is_a_typed_error() -> None:
    with pytest.raises(LayoutError, match="no such VM"):
        discover(Dataset("zones").child(VM), [("zones", "filesystem")])
    with pytest.raises(LayoutError):
        place(Dataset("zones").child(VM), "root-cores")


# -- send options: pure -------------------------------------------------------------

features = st.frozensets(st.sampled_from(STREAM_FEATURES))


@given(features, features, st.booleans())
def test_send_options_are_what_both_sides_have(sender: frozenset[str],
                                               receiver: frozenset[str],
                                               encrypted: bool) -> None:
    if encrypted and not ("raw" in sender and "raw" in receiver):
        with pytest.raises(EncryptionUnsupported) as err:
            choose_send_options(sender, receiver, encrypted=True, what="zones/x")
        assert err.value.code == "EncryptionUnsupported" and err.value.http_status == 422
        side = "sending" if "raw" not in sender else "receiving"
        assert side in err.value.message and "zones/x" in err.value.message
        return
    opts = choose_send_options(sender, receiver, encrypted=encrypted)
    if encrypted:
        # Ciphertext as it is on disk, never decrypted on the way.
        assert opts == SendOptions(raw=True) and opts.flags() == ["-w"]
        return
    assert not opts.raw
    assert opts.features() == (sender & receiver) - {"raw"}
    assert set(opts.flags()) == {{"compressed": "-c", "large_blocks": "-L",
                                  "embedded": "-e"}[f] for f in opts.features()}


# OpenZFS 2.3's own usage lines for what decides the options.
OPENZFS_23 = """usage: zfs command args ...
    version [-j]
    send [-DLPbcehnpsVvw] [-i|-I snapshot]
         [-R [-X dataset[,dataset]...]]     <snapshot>
    send [-DnVvPLecw] [-i snapshot|bookmark] <filesystem|volume|snapshot>
    send [-PVenv] -t <receive_resume_token>
    receive [-vMnsFhu] [-o <property>=<value>] ... [-x <property>] ...
        <filesystem|volume|snapshot>
    receive -A <filesystem|volume>
    load-key [-rn] [-L <keylocation>] <-a | filesystem|volume>
    bookmark <snapshot|bookmark> <newbookmark>
"""
ZFS_FUSE = """usage: zfs command args ...
    send [-RDp] [-[iI] snapshot] <snapshot>
    receive [-vnF] <filesystem|volume|snapshot>
"""


def test_stream_features_from_usage() -> None:
    modern = parse_capabilities(OPENZFS_23, "Linux", has_dev_zfs=True)
    assert modern.stream_features() == frozenset(STREAM_FEATURES)
    assert parse_capabilities(ZFS_FUSE, "Linux", has_dev_zfs=False).stream_features() == \
        frozenset()
    # Raw needs both send -w and the keys to be a thing (load-key).
    no_keys = parse_capabilities(OPENZFS_23.replace("load-key", "unload"), "Linux", True)
    assert "raw" not in no_keys.stream_features()


@pytest.mark.zfs
@pytest.mark.openzfs
async def test_send_argv_carries_the_options(zfs: Zfs, caps: Capabilities) -> None:
    snap = Dataset("p/vm").snapshot("s1")
    assert "-w" not in await zfs.send_argv(SendSpec(snap))
    for feature, flag, opts in (("encryption", "-w", SendOptions(raw=True)),
                                ("compressed_send", "-c", SendOptions(compressed=True))):
        if getattr(caps, feature):
            assert flag in await zfs.send_argv(SendSpec(snap, options=opts))
        else:
            # Never silently dropped: a send this ZFS cannot write is refused.
            with pytest.raises(Exception, match=feature):
                await zfs.send_argv(SendSpec(snap, options=opts))


# -- on a real fleet ----------------------------------------------------------------

KEY_TEXT = "correct horse battery staple\n"
ZONE_START = 240.0  # seconds a snapperd may take to be ready


class Vm:
    """One VM on the fleet's CN, its two zones, and a CN client per zone."""

    def __init__(self, fleet: LocalFleet, zfs: Zfs) -> None:
        self.fleet = fleet
        self.zfs = zfs
        self.cn: LocalCN = fleet.cns[0]
        self.vm = self.cn.vms[0]
        by_uuid = {z.uuid: z for z in fleet.zones}
        first, second = pair_of(self.vm, list(by_uuid))
        self.primary: LocalZone = by_uuid[first]
        self.mirror: LocalZone = by_uuid[second]
        self.top = Dataset(self.cn.pool.name).child(self.vm)

    def client(self, zone: LocalZone) -> tuple[ZoneClient, CnClient]:
        zc = ZoneClient("127.0.0.1", zone.ssh_port, self.cn.key_path,
                        host_key=zone.host_key_pub)
        return zc, CnClient(zc, dataset_root=self.cn.pool.name, zfs=self.zfs, vmadm=None)

    async def push(self, zone: LocalZone, name: str, durability: str | None = None) -> Any:
        zc, cn = self.client(zone)
        async with zc:
            return await cn.push(self.vm, name, metadata={"uuid": self.vm},
                                 durability=durability)

    async def restore(self, zone: LocalZone, name: str, target: Dataset) -> Any:
        zc, cn = self.client(zone)
        async with zc:
            return await cn.restore(self.vm, name, str(target))

    def write(self, ds: Dataset, name: str, data: bytes) -> str:
        (mountpoint(self.cn.pool, ds) / name).write_bytes(data)
        return hashlib.sha256(data).hexdigest()

    async def zone_parts(self, zone: LocalZone) -> dict[str, dict[str, str]]:
        """label -> encryption, keystatus and type of the zone's copy of each part."""
        out = {}
        container = Dataset(zone.root).child(self.vm)
        for info in await self.zfs.datasets(container, depth=1):
            if info.dataset != container:
                out[info.dataset.basename] = await self.zfs.props(
                    info.dataset, ["type", *(["encryption", "keystatus"]
                                             if (await self.zfs.capabilities()).encryption
                                             else [])])
        return out

    async def holdings(self, zone: LocalZone) -> dict[str, dict[str, int]]:
        async with self.fleet.http() as http, \
                http.get(f"{zone.http_url}/v1/vms/{self.vm}/snapshots") as r:
            if r.status == 404:
                return {}
            r.raise_for_status()
            snaps = await r.json()
        return {s["name"]: {d: int(p["guid"]) for d, p in s["datasets"].items()}
                for s in snaps if s["complete"]}

    async def cn_guids(self, name: str, parts: dict[str, Dataset]) -> dict[str, int]:
        return {label: next(s.guid for s in await self.zfs.snapshots(ds) if s.name == name)
                for label, ds in parts.items()}

    async def mounted(self, ds: Dataset) -> Path:
        """A restored filesystem's files (OpenZFS receives with -u: mount it to read)."""
        if (await self.zfs.capabilities()).receive_unmounted:
            done = await proc.run([self.zfs.zfs_bin, "mount", str(ds)])
            assert done.ok or "already mounted" in done.stderr, done.stderr
        return mountpoint(self.cn.pool, ds)


@pytest.fixture
async def fleet_vm(zfs_tier: ZfsTier, zfs: Zfs, tmp_path: Path) -> AsyncIterator[Vm]:
    fleet = await LocalFleet.start(tmp_path / "fleet", zones=0, cns=1, vms_per_cn=1,
                                   pool_size=512 << 20, reconcile_interval_ms=500)
    try:
        # Both added before either starts (each trusts the other's key); a slow
        # start is the OpenZFS tier's TCG guest, not a hang.
        zones = [await fleet.add_zone(512 << 20) for _ in range(2)]
        await asyncio.gather(*(fleet.start_zone(z, ZONE_START, admit=False) for z in zones))
        yield Vm(fleet, zfs)
    finally:
        await fleet.stop()


def _files(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.iterdir()) if p.is_file()}


ZVOL_SIZE = 16 << 20


@pytest.mark.zfs
@pytest.mark.openzfs
async def test_every_part_of_a_vm_pushes_mirrors_and_restores_where_it_was(
        fleet_vm: Vm, caps: Capabilities) -> None:
    """zones/<vm>, its children and (where ZFS has zvols) a KVM sibling disk
    zones/<vm>-disk0: one atomic snapshot, each part on both zones with the CN's
    guids, restored under a new name with the disk beside it again. A dataset
    below a child is named as not included; a filesystem named like a disk is
    no disk."""
    v = fleet_vm
    await v.zfs.create(v.top)
    await v.zfs.create(v.top.child("data"))
    await v.zfs.create(v.top.child("data").child("inner"))
    await v.zfs.create(Dataset(f"{v.top}-cores"))
    parts = {"root": v.top, "data": v.top.child("data")}
    if caps.zvols:
        parts["root-disk0"] = Dataset(f"{v.top}-disk0")
        await v.zfs.create(parts["root-disk0"], volsize=ZVOL_SIZE)
    disk: dict[str, bytes] = {}
    files: dict[str, dict[str, str]] = {}
    for i, snap in enumerate(["s1", "s2"]):
        v.write(v.top.child("data"), f"f{i}", os.urandom(256 << 10))
        if caps.zvols:
            dev = zvol_device(parts["root-disk0"])
            await write_device(dev, os.urandom(1 << 20) * (i + 1))
            disk[snap] = await read_device(dev, ZVOL_SIZE)
        rep = await v.push(v.primary, snap)
        files[snap] = _files(mountpoint(v.cn.pool, v.top.child("data")))
        assert {d.label for d in rep.datasets} == set(parts)
        assert rep.not_included == [str(v.top.child("data").child("inner"))]
        assert sorted(rep.zones) == sorted([v.primary.uuid, v.mirror.uuid])
        # One snapshot of every part, taken at once (the same createtxg).
        txgs = {next(s.createtxg for s in await v.zfs.snapshots(ds) if s.name == snap)
                for ds in parts.values()}
        assert len(txgs) == 1
        want = await v.cn_guids(snap, parts)
        assert (await v.holdings(v.primary))[snap] == want
        assert (await v.holdings(v.mirror))[snap] == want
    if caps.zvols:
        assert (await v.zone_parts(v.mirror))["root-disk0"]["type"] == "volume"
    # What each side chose by: the zone's answer to `features` is its ZFS's.
    zc, _cn = v.client(v.mirror)
    async with zc:
        assert await zc.features() == caps.stream_features()
    target = Dataset(v.cn.pool.name).child("copy")
    rr = await v.restore(v.mirror, "s1", target)
    assert {d.dataset for d in rr.datasets} == {str(place(target, lb)) for lb in parts}
    assert _files(await v.mounted(target.child("data"))) == files["s1"]
    if caps.zvols:
        assert await read_device(zvol_device(Dataset(f"{target}-disk0")), ZVOL_SIZE) == \
            disk["s1"]


async def _open_with_key(zfs: Zfs, datasets: list[Dataset], key: Path) -> None:
    """``zfs load-key`` each restored encryption root with the VM's key file."""
    for ds in datasets:
        props = await zfs.props(ds, ["encryptionroot", "keystatus"])
        if props["keystatus"] == "unavailable":
            await zfs.load_key(Dataset(props["encryptionroot"]), f"file://{key}")


@pytest.mark.zfs
@pytest.mark.openzfs
async def test_an_encrypted_vm_goes_raw_all_the_way_and_its_key_opens_the_restore(
        fleet_vm: Vm, caps: Capabilities, tmp_path: Path) -> None:
    """Pushed raw (the zones hold ciphertext: keystatus unavailable on both),
    mirrored raw (pipelined, and by the mirror's catch-up from its peer),
    restored raw from the mirror: the CN's key opens it, byte for byte."""
    require(caps, "encryption")
    v = fleet_vm
    key = tmp_path / "vm.key"
    key.write_text(KEY_TEXT)
    await v.zfs.create(v.top, props={"encryption": "on", "keyformat": "passphrase",
                                     "keylocation": f"file://{key}"})
    await v.zfs.create(v.top.child("disk0"))  # inherits the VM's key
    parts = {"root": v.top, "disk0": v.top.child("disk0")}
    v.write(v.top.child("disk0"), "a", os.urandom(512 << 10))
    rep = await v.push(v.primary, "s1")
    assert {d.label: d.options for d in rep.datasets} == {"root": ["raw"], "disk0": ["raw"]}
    # The mirror is away: s2 goes to the primary alone, then the mirror's
    # catch-up brings it zone to zone, raw too.
    v.fleet.stop_zone(v.mirror)
    v.write(v.top.child("disk0"), "b", os.urandom(512 << 10))
    at_s2 = _files(mountpoint(v.cn.pool, v.top.child("disk0")))
    await v.push(v.primary, "s2", durability="local")
    await v.fleet.start_zone(v.mirror, ZONE_START)

    async def caught_up() -> bool:
        return "s2" in await v.holdings(v.mirror)

    await wait_until(caught_up, 120, "the mirror caught up with s2")
    for zone in (v.primary, v.mirror):
        assert (await v.holdings(zone))["s2"] == await v.cn_guids("s2", parts)
        for label, props in (await v.zone_parts(zone)).items():
            assert props["encryption"] != "off", (zone.name, label)
            assert props["keystatus"] == "unavailable", (zone.name, label)
    target = Dataset(v.cn.pool.name).child("copy")
    rr = await v.restore(v.mirror, "s2", target)
    assert {d.label: d.options for d in rr.datasets} == {"root": ["raw"], "disk0": ["raw"]}
    restored = [target, target.child("disk0")]
    for ds in restored:
        assert (await v.zfs.props(ds, ["keystatus"]))["keystatus"] == "unavailable"
    await _open_with_key(v.zfs, restored, key)
    assert _files(await v.mounted(target.child("disk0"))) == at_s2


class _PlainZone(ZoneClient):
    """A zone whose ZFS takes plain streams only (zfs-fuse, or a snapperd that
    predates ``features``): what it answers, nothing else changed."""

    async def features(self) -> frozenset[str]:
        return frozenset()


@pytest.mark.zfs
@pytest.mark.openzfs
async def test_an_encrypted_vm_is_refused_by_a_zone_without_encryption_before_anything(
        fleet_vm: Vm, caps: Capabilities, tmp_path: Path) -> None:
    require(caps, "encryption")
    v = fleet_vm
    key = tmp_path / "vm.key"
    key.write_text(KEY_TEXT)
    await v.zfs.create(v.top, props={"encryption": "on", "keyformat": "passphrase",
                                     "keylocation": f"file://{key}"})
    zc = _PlainZone("127.0.0.1", v.primary.ssh_port, v.cn.key_path,
                    host_key=v.primary.host_key_pub)
    async with zc:
        cn = CnClient(zc, dataset_root=v.cn.pool.name, zfs=v.zfs, vmadm=None)
        with pytest.raises(EncryptionUnsupported) as err:
            await cn.push(v.vm, "s1")
    assert "receiving" in err.value.message and str(v.top) in err.value.message
    # Nothing happened: no snapshot on the CN, nothing on the zone.
    assert await v.zfs.snapshots(v.top) == []
    assert await v.holdings(v.primary) == {}


@pytest.mark.zfs
@pytest.mark.openzfs
async def test_a_compressed_send_moves_fewer_bytes(fleet_vm: Vm, caps: Capabilities,
                                                   zfs: Zfs) -> None:
    """-c (with -L -e) where both ZFSes have it: the push moves the compressed
    blocks, a fraction of the plain stream, and restores byte for byte."""
    require(caps, "compressed_send")
    v = fleet_vm
    await v.zfs.create(v.top, props={"compression": "lz4", "recordsize": "1M"})
    text = "".join(string.ascii_letters[i % 52] * 64 for i in range(4096)).encode()
    digest = v.write(v.top, "log", text * 64)  # 16 MiB, compresses ~100x with lz4
    rep = await v.push(v.primary, "s1")
    (root,) = rep.datasets
    assert root.options == ["compressed", "embedded", "large_blocks"]
    # The same snapshot as a plain stream and with every option (bench/send_options.py).
    snap = v.top.snapshot("s1")
    plain = len(await send_bytes(zfs, SendSpec(snap)))
    compressed = len(await send_bytes(zfs, SendSpec(snap, options=SendOptions(
        compressed=True, large_blocks=True, embedded=True))))
    print(f"\nsend of 16 MiB of lz4-compressible data: plain {plain} bytes, "
          f"-c -L -e {compressed} bytes, pushed {root.bytes} bytes")
    assert root.bytes <= compressed + (64 << 10)
    assert root.bytes * 4 < plain
    target = Dataset(v.cn.pool.name).child("copy")
    await v.restore(v.mirror, "s1", target)
    got = (await v.mounted(target) / "log").read_bytes()
    assert hashlib.sha256(got).hexdigest() == digest
