"""The export file: one VM snapshot, every dataset of it, as one self-checking file.

``snapper export`` writes it and ``snapper import`` reads it (``cn/archive.py``),
for a site without a second zone (RFD 148): the copy goes to a file, e.g. on an
NFS mount. Layout (integers big-endian)::

    offset   size  field
    0        8     magic  b"SNAPPERX"
    8        2     format version (1)
    10       4     H, the header region's length (4 KiB multiple, at most 16 MiB)
    14       32    sha256 of the header region (all H bytes)
    46       H     the header: a UTF-8 JSON object, padded with spaces to H bytes
    46+H     ...   each dataset's full ``zfs send`` stream, back to back, in the
                   header's order; the file ends with the last one

The header names the VM, the snapshot, its metadata, and per dataset its label
(``root`` first), guid (decimal string), stream length and the stream's
sha256. The region is sized before the streams are known (``region_for``), so
the exporter writes it last, in place, and no byte is copied twice.

Everything here is pure: a truncated file is ``ArchiveTruncated``, anything
else that does not check out is ``ArchiveCorrupt``; both are typed errors with
a ``code``, raised before a single stream byte reaches ZFS.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from snapper_zone.errors import SnapperError
from snapper_zone.wire.documents import (
    INT_MAX,
    InvalidDocument,
    _checked,
    _field,
    _int,
    _label,
    _list,
    _obj,
    guid_from_json,
    guid_to_json,
)
from snapper_zone.zfs.names import check_component, check_uuid

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "PREAMBLE_SIZE",
    "ROOT_LABEL",
    "ArchiveCorrupt",
    "ArchiveHeader",
    "ArchivePart",
    "ArchiveTruncated",
    "Preamble",
    "decode_header",
    "decode_preamble",
    "encode",
    "region_for",
]

MAGIC = b"SNAPPERX"
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct(">8sHI32s")
PREAMBLE_SIZE = _PREAMBLE.size  # 46
REGION_ALIGN = 4096
MAX_REGION = 16 << 20  # VM metadata is small; a bigger header is not one we wrote
ROOT_LABEL = "root"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ZERO_SHA = "0" * 64


class ArchiveCorrupt(SnapperError):
    """The file is not an export we can trust: bad magic, checksum, header or size."""

    code = "ArchiveCorrupt"
    http_status = 422


class ArchiveTruncated(ArchiveCorrupt):
    """The file ends before the header says it does (a copy cut short)."""

    code = "ArchiveTruncated"


@dataclass(frozen=True)
class ArchivePart:
    """One dataset's stream in the file."""

    label: str  # "root" for <root>/<vm>, else the child's name
    guid: int  # the snapshot's guid: the stream's toguid
    bytes: int = 0
    sha256: str = _ZERO_SHA

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "guid": guid_to_json(self.guid), "bytes": self.bytes,
                "sha256": self.sha256}

    @classmethod
    def from_json(cls, value: object, where: str) -> ArchivePart:
        doc = _obj(value, where)
        digest = _field(doc, "sha256", where)
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise InvalidDocument(f"{where}.sha256: expected 64 lowercase hex digits")
        return cls(_label(_field(doc, "label", where), f"{where}.label"),
                   guid_from_json(_field(doc, "guid", where), f"{where}.guid"),
                   _int(_field(doc, "bytes", where), f"{where}.bytes"), digest)


@dataclass(frozen=True)
class ArchiveHeader:
    vm: str
    snapshot: str
    created: int  # the snapshot's creation, unix seconds (the zone's listing)
    exported: int  # when the file was written, unix seconds
    parts: tuple[ArchivePart, ...]
    metadata: Mapping[str, Any] | None = None  # the VM's metadata as the zone holds it
    writer: str = ""  # "snapper <version>"

    def __post_init__(self) -> None:
        labels = [p.label for p in self.parts]
        if not labels or labels[0] != ROOT_LABEL:
            raise InvalidDocument(f"datasets: the first must be {ROOT_LABEL!r}, got {labels}")
        if len(set(labels)) != len(labels):
            raise InvalidDocument(f"datasets: a label is listed twice: {labels}")

    @property
    def stream_bytes(self) -> int:
        return sum(p.bytes for p in self.parts)

    def spans(self, region: int) -> list[tuple[ArchivePart, int]]:
        """Each part with the offset its stream starts at, in a file of this region."""
        out, at = [], PREAMBLE_SIZE + region
        for p in self.parts:
            out.append((p, at))
            at += p.bytes
        return out

    def file_size(self, region: int) -> int:
        return PREAMBLE_SIZE + region + self.stream_bytes

    def check_size(self, region: int, size: int) -> None:
        """The file must be exactly as long as the header says."""
        want = self.file_size(region)
        if size < want:
            raise ArchiveTruncated(f"the file has {size} bytes, its header promises {want}: "
                                   "it was cut short")
        if size > want:
            raise ArchiveCorrupt(f"the file has {size} bytes, its header promises {want}: "
                                 f"{size - want} bytes more than the streams")

    def to_json(self) -> dict[str, Any]:
        return {"format": "snapper-export", "vm": self.vm,
                "snapshot": self.snapshot, "created": self.created, "exported": self.exported,
                "writer": self.writer,
                "metadata": dict(self.metadata) if self.metadata is not None else None,
                "datasets": [p.to_json() for p in self.parts]}

    @classmethod
    def from_json(cls, value: object) -> ArchiveHeader:
        doc = _obj(value, "header")
        if doc.get("format") != "snapper-export":
            raise InvalidDocument("header.format: not 'snapper-export'")
        vm = _checked(lambda v: check_uuid(v, "VM uuid"), _field(doc, "vm", "header"),
                      "header.vm")
        snap = _checked(lambda v: check_component(v, "snapshot name"),
                        _field(doc, "snapshot", "header"), "header.snapshot")
        meta = doc.get("metadata")
        if meta is not None:
            meta = dict(_obj(meta, "header.metadata"))
        writer = doc.get("writer", "")
        if not isinstance(writer, str):
            raise InvalidDocument("header.writer: expected a string")
        parts = tuple(ArchivePart.from_json(p, f"header.datasets[{i}]")
                      for i, p in enumerate(_list(_field(doc, "datasets", "header"),
                                                  "header.datasets")))
        # Unknown keys are ignored, as in every wire document: a newer writer may add some.
        return cls(vm, snap, _int(_field(doc, "created", "header"), "header.created"),
                   _int(_field(doc, "exported", "header"), "header.exported"), parts, meta,
                   writer)


@dataclass(frozen=True)
class Preamble:
    region: int  # H
    digest: bytes  # sha256 of the region


def _header_bytes(header: ArchiveHeader) -> bytes:
    # Canonical: sorted keys, no spaces, so equal headers encode equally.
    return json.dumps(header.to_json(), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False).encode()


def region_for(header: ArchiveHeader) -> int:
    """A header region that holds ``header`` whatever its streams' lengths turn out to be.

    Digests are fixed-width; lengths are widest at ``INT_MAX``. The exporter
    reserves this before streaming and fills it in at the end.
    """
    widest = replace(header, parts=tuple(replace(p, bytes=INT_MAX) for p in header.parts))
    need = len(_header_bytes(widest))
    region = -(-need // REGION_ALIGN) * REGION_ALIGN
    if region > MAX_REGION:
        raise ValueError(f"the header needs {need} bytes, more than {MAX_REGION}: "
                         "the VM's metadata is too large to export")
    return region


def encode(header: ArchiveHeader, region: int) -> bytes:
    """The file's first ``PREAMBLE_SIZE + region`` bytes for ``header``."""
    body = _header_bytes(header)
    if len(body) > region:
        raise ValueError(f"the header takes {len(body)} bytes, the region has {region}")
    padded = body + b" " * (region - len(body))
    return _PREAMBLE.pack(MAGIC, FORMAT_VERSION, region,
                          hashlib.sha256(padded).digest()) + padded


def decode_preamble(buf: bytes) -> Preamble:
    """The first ``PREAMBLE_SIZE`` bytes (fewer: the file is truncated)."""
    if len(buf) < PREAMBLE_SIZE:
        raise ArchiveTruncated(f"the file has {len(buf)} bytes, fewer than the "
                               f"{PREAMBLE_SIZE} of the preamble")
    magic, version, region, digest = _PREAMBLE.unpack_from(buf)
    if magic != MAGIC:
        raise ArchiveCorrupt("not a snapper export (no SNAPPERX magic at the start)")
    if version != FORMAT_VERSION:
        raise ArchiveCorrupt(f"export format version {version}: this snapper reads "
                             f"version {FORMAT_VERSION} only")
    if not REGION_ALIGN <= region <= MAX_REGION or region % REGION_ALIGN:
        raise ArchiveCorrupt(f"header region of {region} bytes: not a multiple of "
                             f"{REGION_ALIGN} between {REGION_ALIGN} and {MAX_REGION}")
    return Preamble(region, digest)


def decode_header(preamble: Preamble, region: bytes) -> ArchiveHeader:
    """The header from its region (fewer bytes than the preamble says: truncated)."""
    if len(region) < preamble.region:
        raise ArchiveTruncated(f"the file ends inside its header ({len(region)} of "
                               f"{preamble.region} bytes)")
    region = region[: preamble.region]
    if hashlib.sha256(region).digest() != preamble.digest:
        raise ArchiveCorrupt("the header's checksum does not match: the file is damaged")
    try:
        doc = json.loads(region.rstrip(b" ").decode())
        return ArchiveHeader.from_json(doc)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # InvalidDocument is a ValueError. A header that checks out but does
        # not parse was not written by snapper export.
        raise ArchiveCorrupt(f"the header is not a snapper export's: {exc}") from None
