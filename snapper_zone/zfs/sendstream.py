"""Parse the first record (DRR_BEGIN) of a ZFS send stream.

snapperd reads this header before it hands a stream to ``zfs receive`` so it
can check the stream's guids and snapshot name against what was asked for and
what the zone holds.  Everything here works on bytes and never consumes more
of a stream than the header itself, so the caller can forward the header
bytes first and then the rest unchanged.

Layout (OpenZFS ``include/sys/zfs_ioctl.h``; identical in illumos and in
zfs-fuse's pool-v23 code): a fixed-size ``dmu_replay_record_t`` of 312 bytes::

    u32 drr_type            DRR_BEGIN == 0
    u32 drr_payloadlen      bytes of nvlist that follow the record
    u64 drr_magic           DMU_BACKUP_MAGIC, tells the byte order
    u64 drr_versioninfo     bits 0-1 header type, bits 2-31 feature flags
    u64 drr_creation_time
    u32 drr_type            objset type (2 = filesystem, 3 = zvol)
    u32 drr_flags
    u64 drr_toguid
    u64 drr_fromguid        0 for a full stream
    char drr_toname[256]    "pool/fs@snap", NUL-terminated

The whole record is written in the sender's native byte order; the receiver
detects a foreign order by finding the magic byte-swapped.
"""

from __future__ import annotations

import enum
import struct
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "BEGIN_RECORD_SIZE",
    "DMU_BACKUP_MAGIC",
    "MAX_BEGIN_PAYLOAD",
    "DrrFlag",
    "Feature",
    "HeaderType",
    "ObjsetType",
    "Reason",
    "StreamBegin",
    "StreamHeaderError",
    "parse_begin",
    "read_begin",
]

BEGIN_RECORD_SIZE = 312
DMU_BACKUP_MAGIC = 0x2F5BACBAC
DRR_BEGIN = 0
MAXNAMELEN = 256

# A resume or redaction nvlist is a few hundred bytes; a -R package lists
# every dataset and snapshot, so allow plenty, but never let a peer make us
# buffer an arbitrary amount before we have checked anything.
MAX_BEGIN_PAYLOAD = 16 * 1024 * 1024

_MAGIC_SWAPPED = int.from_bytes(DMU_BACKUP_MAGIC.to_bytes(8, "little"), "big")
_LAYOUT = "IIQQQIIQQ256s"
_LE = struct.Struct("<" + _LAYOUT)
_BE = struct.Struct(">" + _LAYOUT)
assert _LE.size == BEGIN_RECORD_SIZE

ByteOrder = Literal["little", "big"]


class HeaderType(enum.IntEnum):
    """Low two bits of drr_versioninfo (once a version number: 1 or 2)."""

    SUBSTREAM = 1
    COMPOUNDSTREAM = 2  # a `zfs send -R` package: nvlist payload, then substreams


class ObjsetType(enum.IntEnum):
    """dmu_objset_type_t."""

    NONE = 0
    META = 1
    ZFS = 2
    ZVOL = 3
    OTHER = 4
    ANY = 5


class Feature(enum.IntFlag):
    """DMU_BACKUP_FEATURE_* bits of the feature-flag field.

    Unknown bits are kept (IntFlag's default boundary), so a newer sender's
    flags survive a round trip through this type.
    """

    DEDUP = 1 << 0
    DEDUPPROPS = 1 << 1
    SA_SPILL = 1 << 2
    EMBED_DATA = 1 << 16
    LZ4 = 1 << 17
    LARGE_BLOCKS = 1 << 19
    RESUMING = 1 << 20
    REDACTED = 1 << 21
    COMPRESSED = 1 << 22
    LARGE_DNODE = 1 << 23
    RAW = 1 << 24
    ZSTD = 1 << 25
    HOLDS = 1 << 26
    SWITCH_TO_LARGE_BLOCKS = 1 << 27
    # Newer OpenZFS adds LONGNAME and LARGE_MICROZAP above these; their bits
    # are kept as unnamed flags rather than guessed here.


class DrrFlag(enum.IntFlag):
    """DRR_FLAG_* bits of drr_begin.drr_flags."""

    CLONE = 1 << 0
    CI_DATA = 1 << 1
    FREERECORDS = 1 << 2
    SPILL_BLOCK = 1 << 3


class Reason(enum.StrEnum):
    """Why a header was refused; StreamHeaderError.reason is one of these."""

    SHORT = "short"  # fewer than BEGIN_RECORD_SIZE bytes given to parse_begin
    EOF = "eof"  # the stream ended before the header (record + payload) did
    RECORD_TYPE = "record_type"
    MAGIC = "magic"
    TONAME = "toname"
    HDRTYPE = "hdrtype"
    PAYLOAD_TOO_LARGE = "payload_too_large"


class StreamHeaderError(ValueError):
    """The bytes are not the start of a send stream Snapper can vet."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class StreamBegin:
    """The fields of a DRR_BEGIN record, already in host byte order."""

    toguid: int
    fromguid: int
    toname: str
    creation_time: int
    objset_type: int
    flags: int
    featureflags: int
    hdrtype: int
    byteswapped: bool
    payload_len: int

    @property
    def dataset(self) -> str:
        """The part of toname before '@' (as named on the sender)."""
        return self.toname.partition("@")[0]

    @property
    def snapname(self) -> str:
        """The part of toname after '@'."""
        return self.toname.partition("@")[2]

    @property
    def is_incremental(self) -> bool:
        # A -R package carries guid 0s in its own BEGIN record; its
        # substreams say whether they are incremental.
        return self.fromguid != 0

    @property
    def is_compound(self) -> bool:
        return self.hdrtype == HeaderType.COMPOUNDSTREAM

    @property
    def is_clone(self) -> bool:
        return bool(self.flags & DrrFlag.CLONE)

    @property
    def is_resume(self) -> bool:
        # The sender sets RESUMING exactly when it puts resume_object /
        # resume_offset in the payload, so the flag is the reliable signal
        # and the nvlist (XDR or native encoding) need not be decoded.
        return bool(self.featureflags & Feature.RESUMING)

    @property
    def is_redacted(self) -> bool:
        return bool(self.featureflags & Feature.REDACTED)

    @property
    def has_payload(self) -> bool:
        return self.payload_len > 0

    @property
    def features(self) -> Feature:
        return Feature(self.featureflags)

    @property
    def is_filesystem(self) -> bool:
        return self.objset_type == ObjsetType.ZFS

    @property
    def is_zvol(self) -> bool:
        return self.objset_type == ObjsetType.ZVOL

    @property
    def byteorder(self) -> ByteOrder:
        """Byte order of the sending host."""
        if self.byteswapped:
            return "big" if sys.byteorder == "little" else "little"
        return "little" if sys.byteorder == "little" else "big"

    @property
    def header_len(self) -> int:
        """Bytes of the stream the header occupies: record plus payload."""
        return BEGIN_RECORD_SIZE + self.payload_len


def parse_begin(buf: bytes | bytearray | memoryview) -> StreamBegin:
    """Parse the DRR_BEGIN record at the start of ``buf``.

    Bytes after the first BEGIN_RECORD_SIZE are ignored (the payload, if any,
    is not needed to parse the record).  Raises StreamHeaderError.
    """
    rec = bytes(memoryview(buf)[:BEGIN_RECORD_SIZE])
    if len(rec) < BEGIN_RECORD_SIZE:
        raise StreamHeaderError(Reason.SHORT, f"need {BEGIN_RECORD_SIZE} bytes, got {len(rec)}")

    # DRR_BEGIN is 0, which reads the same in either byte order, so the type
    # can be checked before the order is known.
    if rec[:4] != b"\0\0\0\0":
        raise StreamHeaderError(
            Reason.RECORD_TYPE, f"first record is not DRR_BEGIN (type bytes {rec[:4].hex()})"
        )

    magic = int.from_bytes(rec[8:16], "little")
    if magic == DMU_BACKUP_MAGIC:
        order: ByteOrder = "little"
        layout = _LE
    elif magic == _MAGIC_SWAPPED:
        order = "big"
        layout = _BE
    else:
        raise StreamHeaderError(Reason.MAGIC, f"bad magic 0x{magic:016x}")

    (
        _rtype,
        payload_len,
        _magic,
        versioninfo,
        creation_time,
        objset_type,
        flags,
        toguid,
        fromguid,
        rawname,
    ) = layout.unpack(rec)

    hdrtype = versioninfo & 0x3
    if hdrtype not in (HeaderType.SUBSTREAM, HeaderType.COMPOUNDSTREAM):
        raise StreamHeaderError(Reason.HDRTYPE, f"unknown header type {hdrtype}")
    featureflags = (versioninfo >> 2) & ((1 << 30) - 1)

    return StreamBegin(
        toguid=toguid,
        fromguid=fromguid,
        toname=_decode_toname(rawname),
        creation_time=creation_time,
        objset_type=objset_type,
        flags=flags,
        featureflags=featureflags,
        hdrtype=hdrtype,
        byteswapped=order != sys.byteorder,
        payload_len=payload_len,
    )


def _decode_toname(raw: bytes) -> str:
    nul = raw.find(b"\0")
    if nul < 0:
        raise StreamHeaderError(Reason.TONAME, "toname is not NUL-terminated")
    try:
        name = raw[:nul].decode("utf-8")
    except UnicodeDecodeError as e:
        raise StreamHeaderError(Reason.TONAME, f"toname is not UTF-8: {e}") from None
    # A send's source is always a snapshot (a filesystem send is named
    # "fs@--head--"), so anything but "dataset@snap" is not a stream we know.
    ds, at, snap = name.partition("@")
    if not at or not ds or not snap or "@" in snap:
        raise StreamHeaderError(Reason.TONAME, f"toname {name!r} is not dataset@snapshot")
    return name


async def read_begin(
    read: Callable[[int], Awaitable[bytes]],
    *,
    max_payload: int = MAX_BEGIN_PAYLOAD,
) -> tuple[StreamBegin, bytes]:
    """Read exactly the stream header (record + payload) and parse it.

    ``read(n)`` must return at most ``n`` bytes and ``b""`` only at EOF, as
    asyncio.StreamReader.read and asyncssh's readers do.  Returns the parsed
    header and the raw bytes consumed, which the caller forwards to
    ``zfs receive`` before the rest of the stream.  The record is parsed
    before the payload is read, so a bad stream is refused after 312 bytes.
    """
    buf = bytearray()
    await _read_exactly(read, buf, BEGIN_RECORD_SIZE)
    begin = parse_begin(buf)
    if begin.payload_len > max_payload:
        raise StreamHeaderError(
            Reason.PAYLOAD_TOO_LARGE,
            f"BEGIN payload of {begin.payload_len} bytes exceeds the cap of {max_payload}",
        )
    await _read_exactly(read, buf, begin.header_len)
    return begin, bytes(buf)


async def _read_exactly(
    read: Callable[[int], Awaitable[bytes]], buf: bytearray, total: int
) -> None:
    while len(buf) < total:
        want = total - len(buf)
        chunk = await read(want)
        if not chunk:
            raise StreamHeaderError(
                Reason.EOF, f"stream ended after {len(buf)} of {total} header bytes"
            )
        if len(chunk) > want:
            # Keeping the extra bytes would break "never consume more than the
            # header"; dropping them would corrupt the stream.  Either way the
            # reader is broken, so refuse loudly.
            raise ValueError(f"read({want}) returned {len(chunk)} bytes")
        buf += chunk
