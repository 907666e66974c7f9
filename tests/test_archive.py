"""The export file's container (``wire/archive.py``), pure: what it writes it reads back,
and a damaged or cut-short file is a typed error, never a wrong header or a crash."""

from __future__ import annotations

import hashlib
import itertools
import json
import struct

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from snapper_zone.wire.archive import (
    MAGIC,
    PREAMBLE_SIZE,
    ArchiveCorrupt,
    ArchiveHeader,
    ArchivePart,
    ArchiveTruncated,
    decode_header,
    decode_preamble,
    encode,
    region_for,
)
from snapper_zone.wire.documents import GUID_MAX, INT_MAX, InvalidDocument

VM = "74c59c61-4559-4ca2-b1ef-0ca22f2f936a"

labels = st.from_regex(r"\A[a-z][a-z0-9_]{0,11}\Z").filter(lambda s: s != "root")
# What check_component takes: its alphabet, and no ".." anywhere.
snapshot_names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,20}\Z").filter(
    lambda s: ".." not in s)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53),
                      st.text(max_size=30))
metadata = st.one_of(st.none(), st.dictionaries(
    st.text(min_size=1, max_size=10),
    st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3)
                 | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8),
    max_size=6))


@st.composite
def headers(draw: st.DrawFn) -> ArchiveHeader:
    children = draw(st.lists(labels, unique=True, max_size=4))
    parts = tuple(ArchivePart(label, draw(st.integers(0, GUID_MAX)),
                              draw(st.integers(0, INT_MAX)),
                              draw(st.binary(min_size=32, max_size=32)).hex())
                  for label in ["root", *children])
    return ArchiveHeader(VM, draw(snapshot_names),
                         draw(st.integers(0, 2**40)), draw(st.integers(0, 2**40)), parts,
                         draw(metadata), draw(st.text(max_size=20)))


def _decode(buf: bytes) -> ArchiveHeader:
    pre = decode_preamble(buf[:PREAMBLE_SIZE])
    return decode_header(pre, buf[PREAMBLE_SIZE:])


@given(headers())
def test_what_is_written_reads_back(header: ArchiveHeader) -> None:
    region = region_for(header)
    buf = encode(header, region)
    assert len(buf) == PREAMBLE_SIZE + region and region % 4096 == 0
    assert _decode(buf) == header
    # The region is sized for any lengths: the exporter reserves it before streaming.
    widest = ArchiveHeader(header.vm, header.snapshot, header.created, header.exported,
                           tuple(ArchivePart(p.label, p.guid, INT_MAX, p.sha256)
                                 for p in header.parts), header.metadata, header.writer)
    assert _decode(encode(widest, region)) == widest


@given(headers(), st.data())
def test_any_damaged_byte_of_the_header_is_refused(header: ArchiveHeader,
                                                   data: st.DataObject) -> None:
    buf = bytearray(encode(header, region_for(header)))
    at = data.draw(st.integers(0, len(buf) - 1), label="at")
    flip = data.draw(st.integers(1, 255), label="xor")
    buf[at] ^= flip
    with pytest.raises(ArchiveCorrupt):
        _decode(bytes(buf))


@given(headers(), st.data())
def test_a_file_cut_inside_its_header_is_truncated(header: ArchiveHeader,
                                                   data: st.DataObject) -> None:
    buf = encode(header, region_for(header))
    cut = data.draw(st.integers(0, len(buf) - 1), label="cut")
    with pytest.raises(ArchiveTruncated):
        _decode(buf[:cut])


@given(headers(), st.integers(0, 2**45))
def test_the_file_must_be_exactly_as_long_as_its_streams(header: ArchiveHeader,
                                                         size: int) -> None:
    region = region_for(header)
    want = PREAMBLE_SIZE + region + sum(p.bytes for p in header.parts)
    header.check_size(region, want)
    if size < want:
        with pytest.raises(ArchiveTruncated):
            header.check_size(region, size)
    elif size > want:
        with pytest.raises(ArchiveCorrupt) as ei:
            header.check_size(region, size)
        assert not isinstance(ei.value, ArchiveTruncated)
    spans = header.spans(region)
    assert spans[0][1] == PREAMBLE_SIZE + region
    assert [p for p, _ in spans] == list(header.parts)
    for (p, at), (_, nxt) in itertools.pairwise(spans):
        assert nxt == at + p.bytes


@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_a_typed_refusal(buf: bytes) -> None:
    with pytest.raises(ArchiveCorrupt):
        _decode(buf)


def _sealed(doc: object, region: int = 4096) -> bytes:
    """A preamble and region whose checksum matches, around any JSON: only the
    header's own checks stand between it and an import."""
    body = json.dumps(doc).encode()
    padded = body + b" " * (region - len(body))
    return struct.pack(">8sHI32s", MAGIC, 1, region,
                       hashlib.sha256(padded).digest()) + padded


GOOD = {"format": "snapper-export", "vm": VM, "snapshot": "s1", "created": 1,
        "exported": 2, "writer": "snapper 0.1.0", "metadata": None,
        "datasets": [{"label": "root", "guid": "12", "bytes": 3, "sha256": "a" * 64}]}


def test_a_sealed_good_header_reads() -> None:
    header = _decode(_sealed(GOOD))
    assert header.parts == (ArchivePart("root", 12, 3, "a" * 64),)
    assert _decode(_sealed({**GOOD, "newer": "field"})) == header  # unknown keys ignored


@pytest.mark.parametrize("change", [
    {"format": "zip"},
    {"vm": "not-a-uuid"},
    {"snapshot": "a/b"},
    {"created": -1},
    {"metadata": [1]},
    {"writer": 3},
    {"datasets": []},
    {"datasets": [{"label": "disk0", "guid": "1", "bytes": 1, "sha256": "a" * 64}]},
    {"datasets": [GOOD["datasets"][0], GOOD["datasets"][0]]},  # type: ignore[index]
    {"datasets": [{"label": "root", "guid": "-1", "bytes": 1, "sha256": "a" * 64}]},
    {"datasets": [{"label": "root", "guid": "1", "bytes": 1, "sha256": "A" * 64}]},
    {"datasets": [{"label": "root", "guid": "1", "bytes": True, "sha256": "a" * 64}]},
    {"datasets": [{"label": "../x", "guid": "1", "bytes": 1, "sha256": "a" * 64}]},
])
def test_a_header_that_checks_out_but_is_not_ours_is_refused(change: dict[str, object]) \
        -> None:
    with pytest.raises(ArchiveCorrupt, match="not a snapper export's"):
        _decode(_sealed({**GOOD, **change}))


def test_the_preamble_says_why() -> None:
    buf = bytearray(_sealed(GOOD))
    with pytest.raises(ArchiveCorrupt, match="no SNAPPERX magic"):
        _decode(b"PK\x03\x04" + bytes(buf[4:]))
    buf[9] = 2
    with pytest.raises(ArchiveCorrupt, match="format version 2"):
        _decode(bytes(buf))
    for region in (0, 4095, 4097, 32 << 20):
        bad = struct.pack(">8sHI32s", MAGIC, 1, region, b"\0" * 32)
        with pytest.raises(ArchiveCorrupt, match="header region"):
            decode_preamble(bad)


def test_a_header_must_start_with_root() -> None:
    with pytest.raises(InvalidDocument):
        ArchiveHeader(VM, "s", 0, 0, (ArchivePart("disk0", 1),))
    with pytest.raises(InvalidDocument):
        ArchiveHeader(VM, "s", 0, 0, (ArchivePart("root", 1), ArchivePart("root", 2)))


@given(headers())
def test_a_header_too_big_for_its_region_is_not_written(header: ArchiveHeader) -> None:
    region = region_for(header)
    big = ArchiveHeader(header.vm, header.snapshot, header.created, header.exported,
                        header.parts, {"pad": "x" * region}, header.writer)
    assume(len(json.dumps(big.to_json())) > region)
    with pytest.raises(ValueError, match="region has"):
        encode(big, region)
