"""The ZFS layer's pure parts: names, error classification, capability parsing."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapper_zone import errors
from snapper_zone.zfs.names import (
    Bookmark,
    Dataset,
    Snapshot,
    check_component,
    check_uuid,
    is_uuid,
)
from snapper_zone.zfs.zfs import SendSpec, Zfs, classify, parse_capabilities

BAD_NAMES = ["", ".", "..", "a/b", "a@b", "a#b", "a b", " a", "-F", "--help", "a;b", "a|b",
             "a&b", "$(id)", "`id`", "a\nb", "a\0b", "../etc", "a/../b", "*", "a'b", 'a"b',
             "x" * 101, "é"]
SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_components_rejected(name: str) -> None:
    with pytest.raises(errors.InvalidName):
        check_component(name)
    with pytest.raises(errors.InvalidName):
        Dataset("pool").child(name)
    with pytest.raises(errors.InvalidName):
        Snapshot(Dataset("pool/vm"), name)
    with pytest.raises(errors.InvalidName):
        Bookmark(Dataset("pool/vm"), name)


@given(st.text(max_size=120))
def test_any_text_is_safe_or_rejected(text: str) -> None:
    try:
        check_component(text)
    except errors.InvalidName:
        return
    assert SAFE.fullmatch(text) and ".." not in text and not text.startswith("-")


@given(st.lists(st.text(max_size=20), min_size=1, max_size=6))
def test_dataset_paths_stay_below_their_root(parts: list[str]) -> None:
    root = Dataset("zones/snapper")
    try:
        ds = root
        for p in parts:
            ds = ds.child(p)
    except errors.InvalidName:
        return
    assert ds.is_within(root) and ds.path.count("/") == 1 + len(parts)
    assert "@" not in ds.path and "#" not in ds.path and ".." not in ds.path


def test_is_within_is_component_wise() -> None:
    assert not Dataset("zones/snapperx").is_within(Dataset("zones/snapper"))
    assert Dataset("zones/snapper/a").is_within(Dataset("zones/snapper"))


def test_uuid_check() -> None:
    check_uuid("0b4f5a3c-1f2e-4d3c-9b8a-7f6e5d4c3b2a")
    for bad in ["0B4F5A3C-1F2E-4D3C-9B8A-7F6E5D4C3B2A", "x", "../../x", ""]:
        with pytest.raises(errors.InvalidName):
            check_uuid(bad)
        assert not is_uuid(bad)
    assert is_uuid("0b4f5a3c-1f2e-4d3c-9b8a-7f6e5d4c3b2a")


@given(st.uuids().map(str) | st.text(alphabet="0123456789abcdef-xX./", max_size=40))
def test_is_uuid_agrees_with_check_uuid(value: str) -> None:
    try:
        check_uuid(value)
    except errors.InvalidName:
        assert not is_uuid(value)
    else:
        assert is_uuid(value)


async def test_bad_input_rejected_before_any_command_runs() -> None:
    # A binary that does not exist: running anything would raise CommandNotFound.
    zfs = Zfs(zfs="/nonexistent/zfs", zpool="/nonexistent/zpool")
    snap = Snapshot(Dataset("pool/vm"), "s1")
    with pytest.raises(errors.InvalidName):
        await zfs.hold("bad tag", [snap])
    with pytest.raises(errors.InvalidName):
        await zfs.set_user_props(snap, {"mountpoint": "/etc"})
    with pytest.raises(errors.InvalidName):
        await zfs.set_user_props(snap, {"snapper:x": "a\nb"})
    with pytest.raises(errors.InvalidName):
        await zfs.pool_create("../p", ["/tmp/x"])
    with pytest.raises(errors.InvalidName):
        await zfs.create(Dataset("pool/vm"), props={"a=b,c": "x"})
    with pytest.raises(errors.InvalidName):
        SendSpec(resume_token="1-abc; rm -rf /")
    with pytest.raises(errors.InvalidName):
        SendSpec(snap, base=Snapshot(Dataset("pool/other"), "s0"))
    with pytest.raises(errors.CommandNotFound):
        await zfs.destroy(snap)  # a valid name does reach the (missing) command


CASES = [
    ("cannot open 'p/x': dataset does not exist", errors.DatasetNotFound),
    ("cannot receive new filesystem stream: invalid backup stream", errors.StreamInvalid),
    ("cannot receive new filesystem stream: invalid stream (checksum mismatch)",
     errors.StreamInvalid),
    ("cannot receive incremental stream: checksum mismatch or incomplete stream.\n"
     "Partially received snapshot is saved.\nA resuming stream can be generated on the "
     "sending system by running:\n    zfs send -t 1-abc", errors.StreamInvalid),
    ("cannot receive incremental stream: destination p/x has been modified\n"
     "since most recent snapshot", errors.DestinationModified),
    ("cannot receive incremental stream: most recent snapshot of p/x does not\n"
     "match incremental source", errors.IncrementalSourceMismatch),
    ("cannot receive new filesystem stream: destination 'p/x' exists\n"
     "must specify -F to overwrite it", errors.DatasetExists),
    ("cannot receive new filesystem stream: out of space", errors.OutOfSpace),
    ("cannot destroy 'p/x@s': dataset is busy", errors.DatasetBusy),
    ("cannot destroy 'p': pool is busy", errors.DatasetBusy),
    ("cannot destroy snapshot p/x@s1: it's being held. Run 'zfs holds -r p/x@s1' to see "
     "holders.", errors.DatasetBusy),
    ("cannot resume send: 'p/x@s2' used in the initial send no longer exists",
     errors.ResumeTokenStale),
    ("cannot receive resume stream: destination p/x contains partially-complete state "
     "from \"zfs receive -s\".", errors.PartialReceiveExists),
    ("something nobody has seen", errors.ZfsError),
]


@pytest.mark.parametrize(("stderr", "cls"), CASES)
def test_classify(stderr: str, cls: type[errors.ZfsError]) -> None:
    err = classify(["zfs", "receive", "p/x"], stderr, 1)
    assert type(err) is cls
    assert err.argv == ("zfs", "receive", "p/x") and err.stderr == stderr.strip()
    assert err.to_json()["code"] == cls.code


@given(st.text(max_size=300))
def test_classify_never_fails(stderr: str) -> None:
    assert isinstance(classify(["zfs"], stderr, 1), errors.ZfsError)


ZFS_FUSE_USAGE = """usage: zfs command args ...
    send [-RDp] [-[iI] snapshot] <snapshot>
    receive [-vnF] <filesystem|volume|snapshot>
    receive [-vnF] -d <filesystem>
    hold [-r] <tag> <snapshot> ...
"""
OPENZFS_USAGE = """usage: zfs command args ...
    version [-j]
    send [-DLPbcehnpsVvw] [-i|-I snapshot]
         [-R [-X dataset[,dataset]...]]     <snapshot>
    send [-DnVvPLecw] -t <receive_resume_token>
    receive [-vMnsFhu] [-o <property>=<value>] ... [-x <property>] ...
        <filesystem|volume|snapshot>
    receive -A <filesystem|volume>
    bookmark <snapshot|bookmark> <newbookmark>
"""


def test_capabilities_from_usage() -> None:
    fuse = parse_capabilities(ZFS_FUSE_USAGE, "Linux", has_dev_zfs=False)
    assert fuse.flavour == "zfs-fuse"
    assert not (fuse.resumable_receive or fuse.bookmarks or fuse.zvols
                or fuse.send_size_estimate or fuse.receive_unmounted)
    modern = parse_capabilities(OPENZFS_USAGE, "Linux", has_dev_zfs=True)
    assert modern.flavour == "openzfs"
    assert (modern.resumable_receive and modern.bookmarks and modern.zvols
            and modern.send_size_estimate and modern.receive_unmounted)
    assert parse_capabilities(OPENZFS_USAGE, "SunOS", has_dev_zfs=True).flavour == "illumos"
    with pytest.raises(errors.UnsupportedFeature, match="resumable_receive"):
        fuse.require("resumable_receive")
