"""Tests for snapper_zone.zfs.sendstream: the DRR_BEGIN parser.

Records are built here with struct, independently of the parser, in both byte
orders; one test checks the parser against real streams from zfs-fuse.
"""

from __future__ import annotations

import asyncio
import struct
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapper_zone.fleet.pools import FilePool
from snapper_zone.zfs import proc
from snapper_zone.zfs.names import Dataset
from snapper_zone.zfs.sendstream import (
    BEGIN_RECORD_SIZE,
    DMU_BACKUP_MAGIC,
    Feature,
    Reason,
    StreamBegin,
    StreamHeaderError,
    parse_begin,
    read_begin,
)
from snapper_zone.zfs.zfs import SendSpec, Zfs
from tests.helpers import receive_bytes, send_bytes, write_random

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
ORDERS = st.sampled_from(["<", ">"])

# Name parts: no NUL (terminator) and no '@' (separator); no lone surrogates,
# which cannot be encoded to UTF-8 at all.  Any Unicode up to 31 characters
# (at most 124 bytes each, so the name always fits in 255 bytes without
# filtering), or ASCII up to 127 so long names near the limit are covered.
_unicode_part = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00@"),
    min_size=1,
    max_size=31,
)
_ascii_part = st.text(
    st.characters(min_codepoint=1, max_codepoint=127, exclude_characters="@"),
    min_size=1,
    max_size=127,
)
_name_part = _unicode_part | _ascii_part
TONAMES = st.builds(lambda d, s: f"{d}@{s}", _name_part, _name_part)


def make_record(
    order: str = "<",
    *,
    rtype: int = 0,
    payload_len: int = 0,
    magic: int = DMU_BACKUP_MAGIC,
    hdrtype: int = 1,
    featureflags: int = 0,
    creation_time: int = 1_700_000_000,
    objset_type: int = 2,
    flags: int = 0,
    toguid: int = 0x1122334455667788,
    fromguid: int = 0,
    toname: bytes | str = "zones/abc@snap1",
) -> bytes:
    """A dmu_replay_record_t holding a drr_begin, as a sender would write it."""
    raw = toname.encode() if isinstance(toname, str) else toname
    versioninfo = hdrtype | (featureflags << 2)
    return struct.pack(
        order + "IIQQQIIQQ256s",
        rtype,
        payload_len,
        magic,
        versioninfo,
        creation_time,
        objset_type,
        flags,
        toguid,
        fromguid,
        raw,  # struct pads with NULs up to 256
    )


def host_order(order: str) -> bool:
    """Whether a record packed in `order` is byte-swapped for this host."""
    return (order == "<") != (sys.byteorder == "little")


def reason_of(buf: bytes) -> Reason:
    with pytest.raises(StreamHeaderError) as ei:
        parse_begin(buf)
    assert isinstance(ei.value, ValueError)
    return ei.value.reason


# --- parse_begin -----------------------------------------------------------


def test_record_size_matches_struct() -> None:
    assert BEGIN_RECORD_SIZE == 312
    assert len(make_record()) == BEGIN_RECORD_SIZE


@given(
    order=ORDERS,
    toguid=U64,
    fromguid=U64,
    toname=TONAMES,
    flags=U32,
    featureflags=st.integers(0, 2**30 - 1),
    hdrtype=st.sampled_from([1, 2]),
    creation_time=U64,
    objset_type=U32,
    payload_len=U32,
)
def test_round_trip(
    order: str,
    toguid: int,
    fromguid: int,
    toname: str,
    flags: int,
    featureflags: int,
    hdrtype: int,
    creation_time: int,
    objset_type: int,
    payload_len: int,
) -> None:
    rec = make_record(
        order,
        toguid=toguid,
        fromguid=fromguid,
        toname=toname,
        flags=flags,
        featureflags=featureflags,
        hdrtype=hdrtype,
        creation_time=creation_time,
        objset_type=objset_type,
        payload_len=payload_len,
    )
    b = parse_begin(rec)
    assert b == StreamBegin(
        toguid=toguid,
        fromguid=fromguid,
        toname=toname,
        creation_time=creation_time,
        objset_type=objset_type,
        flags=flags,
        featureflags=featureflags,
        hdrtype=hdrtype,
        byteswapped=host_order(order),
        payload_len=payload_len,
    )
    assert b.snapname == toname.split("@")[1]
    assert b.dataset == toname.split("@")[0]
    assert b.is_incremental == (fromguid != 0)
    assert b.is_compound == (hdrtype == 2)
    assert b.is_resume == bool(featureflags & Feature.RESUMING)
    assert b.byteorder == ("little" if order == "<" else "big")
    assert b.header_len == BEGIN_RECORD_SIZE + payload_len
    # Whatever follows the record (payload, other records) is not looked at.
    assert parse_begin(rec + b"\xff" * 100) == b
    assert parse_begin(bytearray(rec)) == b
    assert parse_begin(memoryview(rec)) == b


def test_upper_versioninfo_bits_are_not_featureflags() -> None:
    rec = bytearray(make_record("<", hdrtype=1, featureflags=0))
    rec[8 + 8 : 8 + 16] = struct.pack("<Q", 1 | (0xDEAD << 32))  # reserved bits
    b = parse_begin(bytes(rec))
    assert b.hdrtype == 1
    assert b.featureflags == 0


def test_properties() -> None:
    full = parse_begin(make_record(toname="zones/abc/disk0@2024-01-01T00:00Z", objset_type=3))
    assert full.snapname == "2024-01-01T00:00Z"
    assert full.is_zvol and not full.is_filesystem
    assert not full.is_incremental and not full.is_compound and not full.is_resume
    assert not full.has_payload
    inc = parse_begin(make_record(fromguid=7, flags=1, objset_type=2))
    assert inc.is_incremental and inc.is_clone and inc.is_filesystem
    resumed = parse_begin(
        make_record(featureflags=int(Feature.RESUMING | Feature.LZ4), payload_len=96)
    )
    assert resumed.is_resume and resumed.has_payload
    assert Feature.RESUMING in resumed.features and Feature.LZ4 in resumed.features
    redacted = parse_begin(make_record(featureflags=int(Feature.REDACTED)))
    assert redacted.is_redacted
    # Feature bits this code has no name for survive.
    assert parse_begin(make_record(featureflags=1 << 29)).features == 1 << 29


def test_filesystem_send_head_name_parses() -> None:
    # OpenZFS names a send of a (read-only) filesystem "fs@--head--".
    assert parse_begin(make_record(toname="p/fs@--head--")).snapname == "--head--"


@pytest.mark.parametrize("order", ["<", ">"])
def test_every_truncation_raises(order: str) -> None:
    rec = make_record(order)
    for n in range(BEGIN_RECORD_SIZE):
        assert reason_of(rec[:n]) is Reason.SHORT, n
    parse_begin(rec)  # and the full record does not


@given(order=ORDERS, pos=st.integers(0, 7), xor=st.integers(1, 255))
def test_corrupt_magic_raises(order: str, pos: int, xor: int) -> None:
    rec = bytearray(make_record(order))
    rec[8 + pos] ^= xor
    assert reason_of(bytes(rec)) is Reason.MAGIC


@pytest.mark.parametrize("magic", [0, 0x2F5BACBAD, 0xBACBAC2F5, 2**64 - 1])
def test_wrong_magic_raises(magic: int) -> None:
    assert reason_of(make_record(magic=magic)) is Reason.MAGIC


@given(order=ORDERS, rtype=st.integers(1, 2**32 - 1))
def test_wrong_record_type_raises(order: str, rtype: int) -> None:
    assert reason_of(make_record(order, rtype=rtype)) is Reason.RECORD_TYPE


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("rtype", range(1, 11))  # DRR_OBJECT .. DRR_REDACT
def test_other_drr_types_raise(order: str, rtype: int) -> None:
    assert reason_of(make_record(order, rtype=rtype)) is Reason.RECORD_TYPE


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("hdrtype", [0, 3])
def test_unknown_hdrtype_raises(order: str, hdrtype: int) -> None:
    assert reason_of(make_record(order, hdrtype=hdrtype)) is Reason.HDRTYPE


@pytest.mark.parametrize(
    "raw",
    [
        b"a" * 256,  # no NUL terminator
        b"zones/abc@snap" + b"x" * 242,  # exactly full, still no NUL
        b"zones/\xff\xfe@snap",  # not UTF-8
        b"zones/abc@sn\xc3",  # truncated UTF-8 sequence
        b"zones/abc",  # no '@'
        b"",  # empty
        b"@snap",  # no dataset
        b"zones/abc@",  # no snapshot
        b"zones/abc@a@b",  # two '@'
    ],
)
def test_bad_toname_raises(raw: bytes) -> None:
    assert reason_of(make_record(toname=raw)) is Reason.TONAME


def test_toname_of_255_bytes_is_fine() -> None:
    name = "p/" + "d" * 240 + "@" + "s" * 12
    assert len(name) == 255
    assert parse_begin(make_record(toname=name)).toname == name


def test_toname_garbage_after_nul_is_ignored() -> None:
    assert parse_begin(make_record(toname=b"p/a@s\0\xff\xfe junk")).toname == "p/a@s"


def test_big_endian_fields_are_swapped() -> None:
    # Spell out one big-endian (SPARC) record byte by byte, without struct.
    name = b"zones/abc@snap1"
    rec = (
        bytes(4)  # DRR_BEGIN
        + (24).to_bytes(4, "big")  # payload length
        + DMU_BACKUP_MAGIC.to_bytes(8, "big")
        + (1 | (int(Feature.EMBED_DATA) << 2)).to_bytes(8, "big")
        + (1_600_000_000).to_bytes(8, "big")
        + (2).to_bytes(4, "big")
        + (4).to_bytes(4, "big")
        + (0xDEADBEEF01).to_bytes(8, "big")
        + (0xC0FFEE).to_bytes(8, "big")
        + name.ljust(256, b"\0")
    )
    b = parse_begin(rec)
    assert (b.toguid, b.fromguid, b.payload_len) == (0xDEADBEEF01, 0xC0FFEE, 24)
    assert (b.creation_time, b.objset_type, b.flags) == (1_600_000_000, 2, 4)
    assert b.features == Feature.EMBED_DATA and b.hdrtype == 1
    assert b.byteorder == "big"
    assert b.byteswapped == (sys.byteorder == "little")


# --- read_begin ------------------------------------------------------------


class ChunkedReader:
    """An async reader over bytes that returns short reads of given sizes."""

    def __init__(self, data: bytes, chunks: list[int] | None = None) -> None:
        self.data = data
        self.pos = 0
        self.chunks = list(chunks or [])
        self.calls = 0

    async def read(self, n: int) -> bytes:
        self.calls += 1
        size = n
        if self.chunks:
            size = max(1, min(n, self.chunks.pop(0)))
        out = self.data[self.pos : self.pos + size]
        self.pos += len(out)
        return out


@given(
    order=ORDERS,
    payload_len=st.integers(0, 2000),
    tail=st.binary(max_size=64),
    chunks=st.lists(st.integers(1, 400), max_size=40),
)
def test_read_begin_reads_exactly_the_header(
    order: str, payload_len: int, tail: bytes, chunks: list[int]
) -> None:
    payload = bytes(i % 251 for i in range(payload_len))
    header = make_record(order, payload_len=payload_len, hdrtype=2) + payload
    reader = ChunkedReader(header + tail, chunks)
    begin, raw = asyncio.run(read_begin(reader.read))
    assert raw == header
    assert reader.pos == len(header)  # nothing of the stream after it consumed
    assert begin == parse_begin(header)
    assert begin.header_len == len(raw)


@pytest.mark.parametrize("payload_len", [0, 40])
def test_read_begin_eof_anywhere_in_header_raises(payload_len: int) -> None:
    header = make_record(payload_len=payload_len) + b"p" * payload_len
    for n in range(len(header)):
        reader = ChunkedReader(header[:n], [7])
        with pytest.raises(StreamHeaderError) as ei:
            asyncio.run(read_begin(reader.read))
        assert ei.value.reason is Reason.EOF, n


async def test_read_begin_refuses_bad_record_before_payload() -> None:
    reader = ChunkedReader(make_record(magic=0, payload_len=10) + b"x" * 10)
    with pytest.raises(StreamHeaderError) as ei:
        await read_begin(reader.read)
    assert ei.value.reason is Reason.MAGIC
    assert reader.pos == BEGIN_RECORD_SIZE


async def test_read_begin_caps_the_payload() -> None:
    reader = ChunkedReader(make_record(payload_len=2**32 - 1))
    with pytest.raises(StreamHeaderError) as ei:
        await read_begin(reader.read)
    assert ei.value.reason is Reason.PAYLOAD_TOO_LARGE
    assert reader.pos == BEGIN_RECORD_SIZE

    data = make_record(payload_len=101) + bytes(101)
    with pytest.raises(StreamHeaderError) as ei:
        await read_begin(ChunkedReader(data).read, max_payload=100)
    assert ei.value.reason is Reason.PAYLOAD_TOO_LARGE
    begin, raw = await read_begin(ChunkedReader(data).read, max_payload=101)
    assert raw == data and begin.payload_len == 101


async def test_read_begin_rejects_reader_returning_too_much() -> None:
    data = make_record() + b"next record"

    async def greedy(n: int) -> bytes:
        return data

    with pytest.raises(ValueError, match="returned"):
        await read_begin(greedy)


async def test_read_begin_with_asyncio_streamreader() -> None:
    data = make_record(payload_len=5) + b"nvlst" + b"REST"
    sr = asyncio.StreamReader()
    sr.feed_data(data)
    sr.feed_eof()
    begin, raw = await read_begin(sr.read)
    assert raw == data[:-4] and begin.payload_len == 5
    assert await sr.read() == b"REST"


# --- against real ZFS (the shared fixtures: zfs-fuse, or OpenZFS in the VM) ---


async def _read_begin_from_send(zfs: Zfs, spec: SendSpec) -> tuple[StreamBegin, bytes, bytes]:
    """Run `zfs send`, read its header with read_begin, then the rest."""
    child = await zfs.send(spec)
    begin, raw = await read_begin(child.stdout.read)
    rest = await child.stdout.read()
    await zfs.check(child)
    return begin, raw, rest


@pytest.mark.zfs
@pytest.mark.openzfs
async def test_real_zfs_streams(zfs: Zfs, cn_pool: FilePool) -> None:
    ds = Dataset(cn_pool.name).child("vm")
    await zfs.create(ds)
    write_random(cn_pool, ds, "first", 6000)
    await zfs.snapshot([ds.snapshot("s1")])
    write_random(cn_pool, ds, "second", 7000)
    await zfs.snapshot([ds.snapshot("s2")])
    g1, g2 = (s.guid for s in await zfs.snapshots(ds))
    assert g1 != g2
    s1, s2 = ds.snapshot("s1"), ds.snapshot("s2")

    full = parse_begin(await send_bytes(zfs, SendSpec(s1)))
    assert (full.toguid, full.fromguid, full.toname) == (g1, 0, str(s1))
    assert full.snapname == "s1" and not full.is_incremental
    assert full.is_filesystem and full.hdrtype == 1 and not full.is_compound
    assert not full.byteswapped and full.payload_len == 0

    inc = parse_begin(await send_bytes(zfs, SendSpec(s2, base=s1)))
    assert (inc.toguid, inc.fromguid, inc.toname) == (g2, g1, str(s2))
    assert inc.is_incremental and inc.snapname == "s2"

    # A -R package (which Snapper refuses): a compound header with the XDR
    # nvlist of the whole tree. The ZFS layer never builds -R, so run it here.
    done = await proc.run(["zfs", "send", "-R", str(s2)])
    assert done.ok, done.stderr
    rep = parse_begin(done.stdout)
    assert rep.is_compound and rep.toname == str(s2) and rep.payload_len > 0

    # Forwarding header bytes first, then the rest, gives a stream that
    # `zfs receive` takes, and the received snapshots keep the guids we read.
    copy = Dataset(cn_pool.name).child("copy")
    begin, raw, rest = await _read_begin_from_send(zfs, SendSpec(s1))
    assert begin == full and len(raw) == BEGIN_RECORD_SIZE
    await receive_bytes(zfs, copy, raw + rest)
    begin, raw, rest = await _read_begin_from_send(zfs, SendSpec(s2, base=s1))
    assert begin == inc
    await receive_bytes(zfs, copy, raw + rest)
    assert [s.guid for s in await zfs.snapshots(copy)] == [g1, g2]
