"""``snapper export`` and ``snapper import``: a VM snapshot to a file and back.

For a site without a second zone (RFD 148): the copy a zone holds also goes
to a file, e.g. on an NFS mount, and comes back onto any CN from there.

Both run on the CN side, where the file is; the zone needs no mount and no new
command. ``export_snapshot`` pulls each dataset's full stream with the zone's
``send`` (a restore's stream, under the same owner rule and send limits) and
writes it to the file with ``aiofiles``; the container (``wire/archive.py``)
names the VM, snapshot, datasets, guids, lengths and checksums. It writes to a
hidden ``.FILE.part`` beside FILE and links it into place only when whole.

``import_snapshot`` reads the header, checks the file's length and every
stream's sha256 (one full read) before anything is received; a truncated or
damaged file is refused then, with nothing changed. Each stream then goes
through the one receive path (``transfer.local.receive_stream``: vetted,
guid-confirmed) into a dataset that must not exist yet; the bytes are hashed
again on the way (the file may change under us, say on NFS), and a failure
destroys what this import created.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os
from aiofiles.threadpool.binary import AsyncBufferedIOBase, AsyncBufferedReader

from snapper_zone.common.progress import NoProgress, Reporter
from snapper_zone.common.version import version
from snapper_zone.errors import DatasetBusy, SnapperError
from snapper_zone.transfer.local import Expect, receive_stream
from snapper_zone.transfer.remote import ZoneClient
from snapper_zone.transfer.stream import ClientGone, Inbound
from snapper_zone.wire.archive import (
    PREAMBLE_SIZE,
    ROOT_LABEL,
    ArchiveCorrupt,
    ArchiveHeader,
    ArchivePart,
    ArchiveTruncated,
    decode_header,
    decode_preamble,
    encode,
    region_for,
)
from snapper_zone.wire.protocol import Receive, Send
from snapper_zone.zfs.names import Dataset, check_component, check_uuid
from snapper_zone.zfs.sendstream import StreamHeaderError, read_begin
from snapper_zone.zfs.zfs import Zfs

__all__ = ["ArchiveReport", "ExportFailed", "ImportRefused", "export_snapshot",
           "import_snapshot", "import_to_zone", "read_header", "verify"]

CHUNK = 1 << 20

log = logging.getLogger("snapper.cn")


class ExportFailed(SnapperError):
    """The export could not be written; no file named FILE was made."""

    code = "ExportFailed"
    http_status = 409


class ImportRefused(SnapperError):
    """The import's target is not somewhere a whole VM can be received; nothing changed."""

    code = "ImportRefused"
    http_status = 409


@dataclass
class ArchiveReport:
    header: ArchiveHeader
    path: Path
    target: str | None = None  # import: the top dataset, or the zone's endpoint
    seconds: float = 0.0
    # import: the datasets made; onto a zone, the zones that hold it (the commit's answer)
    datasets: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return self.header.stream_bytes

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.header.vm, "snapshot": self.header.snapshot,
                "file": str(self.path), "bytes": self.bytes, "target": self.target,
                "datasets": [p.to_json() for p in self.header.parts]}


# -- export ---------------------------------------------------------------------------


async def export_snapshot(zone: ZoneClient, vm: str, snap: str, path: str | Path, *,
                          progress: Reporter | None = None) -> ArchiveReport:
    """Write VM snapshot ``snap`` as the zone holds it (every dataset) to ``path``."""
    vm = check_uuid(vm, "VM uuid")
    check_component(snap, "snapshot name")
    progress = progress or NoProgress()
    path = Path(path)
    if await _taken(path):
        raise ExportFailed(f"{path} exists; remove it or export to another name")
    entry = next((s for s in await zone.snapshots(vm) if s.name == snap), None)
    if entry is None:
        raise ExportFailed(f"the zone holds no snapshot {snap!r} of VM {vm}")
    if not entry.complete:
        raise ExportFailed(f"snapshot {snap!r} of VM {vm} is incomplete on the zone "
                           "(a push that did not finish); it cannot be exported")
    if ROOT_LABEL not in entry.parts:
        raise ExportFailed(f"snapshot {snap!r} of VM {vm} has no {ROOT_LABEL!r} dataset")
    labels = sorted(entry.parts, key=lambda lb: (lb != ROOT_LABEL, lb))
    header = ArchiveHeader(vm, snap, entry.created, int(time.time()),
                           tuple(ArchivePart(lb, entry.parts[lb].guid) for lb in labels),
                           await zone.metadata(vm, snap), f"snapper {version()}")
    try:
        region = region_for(header)
    except ValueError as exc:
        raise ExportFailed(str(exc)) from None
    part_path = path.with_name(f".{path.name}.part")
    started = time.monotonic()
    try:
        f = await aiofiles.open(part_path, "xb")
    except FileExistsError:
        # Not ours to remove: another export to FILE, or one that died.
        raise ExportFailed(f"{part_path} exists: another export to {path} is running, or "
                           "one died; remove it if none is running") from None
    except OSError as exc:
        raise ExportFailed(f"{path}: {exc.strerror or exc}") from exc
    try:
        try:
            # The header goes in last, where this placeholder is (its checksum
            # is of zeros, so a file left by a crash never passes for whole).
            await f.write(b"\0" * (PREAMBLE_SIZE + region))
            parts = []
            for p in header.parts:
                total = entry.parts[p.label].referenced or None
                progress.start(f"{vm[:8]}/{p.label}@{snap} > {path.name}", total, vm=vm,
                               dataset=p.label, snapshot=snap, file=str(path))
                try:
                    n, digest = await zone.pull(Send(vm, p.label, snap, None),
                                                _write_stream(f, p, snap, progress.advance))
                except BaseException as exc:
                    progress.done(False, str(exc) or type(exc).__name__)
                    raise
                progress.done(True)
                parts.append(replace(p, bytes=n, sha256=digest))
            header = replace(header, parts=tuple(parts))
            await f.seek(0)
            await f.write(encode(header, region))
            await f.flush()
            await asyncio.to_thread(os.fsync, f.fileno())
        finally:
            await f.close()
        await _link_into_place(part_path, path)
    except OSError as exc:
        await _remove(part_path)
        raise ExportFailed(f"{path}: {exc.strerror or exc}") from exc
    except BaseException:
        await _remove(part_path)
        raise
    return ArchiveReport(header, path, seconds=time.monotonic() - started)


def _write_stream(f: AsyncBufferedIOBase, part: ArchivePart, snap: str,
                  advance: Callable[[int], None]) -> Callable[[Inbound],
                                                              Awaitable[tuple[int, str]]]:
    async def write(source: Inbound) -> tuple[int, str]:
        # The zone's stream must be the full stream of this very snapshot.
        try:
            begin, head = await read_begin(source.read)
        except StreamHeaderError as exc:
            raise ExportFailed(f"{part.label}: the zone's stream is not usable: {exc}") \
                from None
        if begin.snapname != snap or begin.toguid != part.guid or begin.is_incremental:
            raise ExportFailed(f"{part.label}: the zone sent {begin.toname} (guid "
                               f"{begin.toguid}), not the full stream of @{snap} (guid "
                               f"{part.guid})")
        digest = hashlib.sha256()
        n = 0
        chunk = head
        while chunk:
            digest.update(chunk)
            await f.write(chunk)
            n += len(chunk)
            advance(len(chunk))
            chunk = await source.read(CHUNK)
        return n, digest.hexdigest()
    return write


async def _link_into_place(part_path: Path, path: Path) -> None:
    """``part_path`` becomes ``path``, never over a file that appeared meanwhile."""
    try:
        await aiofiles.os.link(part_path, path)
    except FileExistsError:
        raise ExportFailed(f"{path} appeared while exporting; the export was "
                           "discarded") from None
    except OSError:
        # A filesystem without hard links: a rename, after a last look.
        if await _taken(path):
            raise ExportFailed(f"{path} appeared while exporting; the export was "
                               "discarded") from None
        await aiofiles.os.rename(part_path, path)
        return
    await aiofiles.os.remove(part_path)


async def _taken(path: Path) -> bool:
    return await aiofiles.os.path.exists(path) or await aiofiles.os.path.islink(path)


async def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        await aiofiles.os.remove(path)


# -- reading and verifying ---------------------------------------------------------------


async def read_header(f: AsyncBufferedReader, size: int) -> tuple[ArchiveHeader, int]:
    """The header of an open export and its region length; the file's length checked."""
    await f.seek(0)
    preamble = decode_preamble(await f.read(PREAMBLE_SIZE))
    header = decode_header(preamble, await f.read(preamble.region))
    header.check_size(preamble.region, size)
    return header, preamble.region


async def verify(path: str | Path, *,
                 progress: Reporter | None = None) -> tuple[ArchiveHeader, int]:
    """Check ``path`` whole: header, length, every stream's sha256. One full read."""
    progress = progress or NoProgress()
    path = Path(path)
    try:
        async with aiofiles.open(path, "rb") as f:
            size = (await aiofiles.os.stat(f.fileno())).st_size
            header, region = await read_header(f, size)
            progress.start(f"verify {path.name}", header.stream_bytes, file=str(path))
            ok = False
            try:
                for part, offset in header.spans(region):
                    await f.seek(offset)
                    digest = hashlib.sha256()
                    left = part.bytes
                    while left:
                        chunk = await f.read(min(CHUNK, left))
                        if not chunk:
                            raise ArchiveTruncated(f"{part.label}: the file ended while "
                                                   "being read")
                        digest.update(chunk)
                        left -= len(chunk)
                        progress.advance(len(chunk))
                    if digest.hexdigest() != part.sha256:
                        raise ArchiveCorrupt(f"{part.label}: the stream's sha256 is "
                                             f"{digest.hexdigest()}, the header says "
                                             f"{part.sha256}: the file is damaged")
                ok = True
            finally:
                progress.done(ok)
    except OSError as exc:
        raise ImportRefused(f"{path}: {exc.strerror or exc}") from exc
    return header, region


# -- import ---------------------------------------------------------------------------


async def import_snapshot(path: str | Path, zfs: Zfs, *, target: Dataset | None = None,
                          dataset_root: str = "zones",
                          progress: Reporter | None = None) -> ArchiveReport:
    """Receive the export at ``path`` into ``target`` (default: the VM's own dataset,
    ``dataset_root/VM``) and its children; it must not exist."""
    progress = progress or NoProgress()
    path = Path(path)
    started = time.monotonic()
    header, region = await verify(path, progress=progress)
    top = target if target is not None else Dataset(dataset_root).child(header.vm)
    if await zfs.exists(top):
        raise ImportRefused(f"{top} exists; import into a new dataset (--target), or "
                            "restore from a zone to bring an existing VM up to date")
    parent = top.parent
    if parent is None or not await zfs.exists(parent):
        raise ImportRefused(f"{top}: its parent {parent} does not exist")
    report = ArchiveReport(header, path, str(top))
    try:
        async with aiofiles.open(path, "rb") as f:
            for part, offset in header.spans(region):
                local = top if part.label == ROOT_LABEL else top.child(part.label)
                report.datasets.append(str(local))
                await _receive_part(f, offset, part, local, zfs, header.snapshot, progress)
    except BaseException as exc:
        # Nothing of a half import stays: the whole tree was ours (top did not exist).
        if report.datasets:
            await _undo(zfs, top)
        if isinstance(exc, OSError):
            raise ImportRefused(f"{path}: {exc.strerror or exc}") from exc
        raise
    report.seconds = time.monotonic() - started
    return report


async def import_to_zone(path: str | Path, zone: ZoneClient, *,
                         durability: str | None = None,
                         progress: Reporter | None = None) -> ArchiveReport:
    """Push the export at ``path`` into ``zone`` and commit it with its metadata.

    For a zone that must hold the VM again (its only zone was lost): the file
    takes a push's way in (the CN's key, the zone's vetting, slots, quotas),
    each dataset's full stream as a ``receive --session``, so what is not
    committed ends with the connection. The zone must not hold the VM's
    datasets yet (a full stream onto snapshots is refused there).
    """
    progress = progress or NoProgress()
    path = Path(path)
    started = time.monotonic()
    header, region = await verify(path, progress=progress)
    snap = header.snapshot
    if any(s.name == snap for s in await zone.snapshots(header.vm)):
        raise ImportRefused(f"the zone already holds {header.vm}@{snap}")
    try:
        async with aiofiles.open(path, "rb") as f:
            for part, offset in header.spans(region):
                digest = hashlib.sha256()
                progress.start(f"{part.label}@{snap} > {zone.endpoint}", part.bytes,
                               dataset=part.label, snapshot=snap)
                ok = False
                try:
                    await zone.push_chunks(
                        Receive(header.vm, part.label, snap, None, part.bytes, session=True),
                        _chunks(f, offset, part, digest), progress)
                    ok = True
                finally:
                    progress.done(ok)
                if digest.hexdigest() != part.sha256:
                    # Not committed: the zone drops the parts with our connection.
                    raise ArchiveCorrupt(f"{part.label}: the file changed while being "
                                         "imported (its sha256 no longer matches the header)")
    except OSError as exc:
        raise ImportRefused(f"{path}: {exc.strerror or exc}") from exc
    done = await zone.commit(header.vm, snap, [p.label for p in header.parts],
                             header.metadata, durability)
    report = ArchiveReport(header, path, zone.endpoint, time.monotonic() - started)
    report.datasets = [str(z) for z in done.get("zones") or []]
    return report


async def _chunks(f: AsyncBufferedReader, offset: int, part: ArchivePart,
                  digest: hashlib._Hash) -> AsyncIterator[bytes]:
    """The part's stream from the file, hashed as it goes."""
    await f.seek(offset)
    left = part.bytes
    while left:
        chunk = await f.read(min(CHUNK, left))
        if not chunk:
            raise ArchiveTruncated(f"{part.label}: the file shrank while being imported")
        digest.update(chunk)
        left -= len(chunk)
        yield chunk


async def _undo(zfs: Zfs, top: Dataset, settle: float = 30.0) -> None:
    """Destroy the tree a failed import made (it did not exist before).

    zfs-fuse reports a dataset it mounted moments ago as busy for a while
    (``fleet.pools`` retries the same way); anything else is logged, not
    raised: the import's own error is the one to report.
    """
    deadline = time.monotonic() + settle
    while True:
        try:
            if await zfs.exists(top):
                await zfs.destroy(top, recursive=True)
            return
        except DatasetBusy:
            if time.monotonic() > deadline:
                log.warning("could not destroy %s after a failed import: still busy", top)
                return
            await asyncio.sleep(0.2)
        except SnapperError as exc:
            log.warning("could not destroy %s after a failed import: %s", top, exc)
            return


async def _receive_part(f: AsyncBufferedReader, offset: int, part: ArchivePart,
                        local: Dataset, zfs: Zfs, snap: str, progress: Reporter) -> None:
    # The file region becomes the Inbound a zone's stream would be: the receive
    # path's flow control pauses the reading when its pipe is full.
    flowing = asyncio.Event()
    flowing.set()
    source = Inbound(flowing.clear, flowing.set)
    digest = hashlib.sha256()

    async def feed() -> None:
        await f.seek(offset)
        left = part.bytes
        while left:
            await flowing.wait()
            chunk = await f.read(min(CHUNK, left))
            if not chunk:
                source.feed_error(ClientGone(f"{part.label}: the file shrank while being "
                                             "imported"))
                return
            digest.update(chunk)
            left -= len(chunk)
            source.feed(chunk)
        source.feed_eof()

    progress.start(f"{part.label}@{snap} > {local}", part.bytes, dataset=part.label,
                   snapshot=snap, target=str(local))
    feeder = asyncio.ensure_future(feed())
    ok = False
    try:
        await receive_stream(zfs, local, source, Expect(snap, None, toguid=part.guid),
                             on_bytes=progress.advance, resumable=False)
        await feeder  # what follows DRR_END, if anything, is hashed too
        ok = True
    finally:
        if not feeder.done():
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
        progress.done(ok)
    if digest.hexdigest() != part.sha256:
        raise ArchiveCorrupt(f"{part.label}: the file changed while being imported "
                             "(its sha256 no longer matches the header)")
