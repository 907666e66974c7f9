"""Carry out reconcile's actions between this zone and one peer: the I/O half.

``reconcile`` decides; this module moves bytes and destroys snapshots, one
action at a time. Both zones are ``transfer.endpoint.Endpoint``s: this zone
is ``LocalEndpoint`` (``here``), the peer its ``ZoneClient``; deletes and
markers go to whichever zone the action names (``_at``). Streams go through
the one transfer path: to the peer with ``ZoneClient.push_stream`` into its
``receive`` (vetted there as a CN's push is), from the peer with
``ZoneClient.pull`` into this zone's ``ZoneReceiver`` (vetted here: no
``-R``/``-p``, the planned snapshot and guid, a receive slot). Each dataset
snapshot is its own ``-i`` stream: the receive grammar takes one snapshot
per stream, and a failure part-way keeps every snapshot already across.

Locks: a zone takes its VM lock only to change its own datasets (a receive
here, a destroy here), never while it waits on a peer, so two zones
reconciling the same VM from both ends cannot deadlock.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from replication.reconcile import (
    Action,
    Delete,
    DropDataset,
    MarkComplete,
    PreserveDiverged,
    SendFull,
    SendIncremental,
    SnapRef,
)
from snapper_zone.common import log as slog
from snapper_zone.errors import SnapperError, UnsupportedFeature
from snapper_zone.transfer.endpoint import Endpoint
from snapper_zone.transfer.local import Expect, LocalEndpoint, ReceiveRequest
from snapper_zone.transfer.plan import (
    AbortPartial,
    Resume,
    ResumeDecision,
    TokenInfo,
    Version,
    plan_resume,
)
from snapper_zone.transfer.registry import Transfer
from snapper_zone.transfer.remote import ZoneClient
from snapper_zone.wire.protocol import Receive, Send
from snapper_zone.zfs.names import Snapshot
from snapper_zone.zfs.zfs import SendSpec, choose_send_options

if TYPE_CHECKING:
    from replication.zone import LocalZone

__all__ = ["HOLD_TAG", "Executor", "GuidMismatch", "NeedsOperator"]

HOLD_TAG = "snapper-mirror"  # zfs hold on a base while a transfer sends from it


class GuidMismatch(SnapperError):
    """A received snapshot is not the one reconcile planned (guid differs)."""

    code = "GuidMismatch"
    http_status = 409


class NeedsOperator(SnapperError):
    """An action this version does not carry out by itself (a divergent history)."""

    code = "NeedsOperator"
    http_status = 409


class _Counted:
    """A progress reporter that feeds a zone transfer record (for /v1/transfers)."""

    def __init__(self, t: Transfer) -> None:
        self.t = t

    def start(self, label: str, total: int | None, **fields: Any) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        self.t.add(nbytes)

    def done(self, ok: bool = True, error: str | None = None) -> None:
        pass


@dataclass
class Executor:
    zone: LocalZone
    vm: str
    peer: str  # the peer zone's uuid
    client: ZoneClient
    moved: int = 0  # stream bytes moved by this executor
    bwlimit: float | None = None  # bytes/s for the streams this zone sends; pulls are not paced

    @property
    def me(self) -> str:
        return self.zone.config.uuid

    @property
    def here(self) -> LocalEndpoint:
        """This zone as an endpoint; what it commits came from the peer."""
        return LocalEndpoint(self.zone.zfs, self.zone.store, self.zone.transfers,
                             self.zone.vm_locks, f"zone:{self.peer}")

    @property
    def log(self) -> logging.Logger:
        return self.zone.log

    async def run(self, act: Action) -> None:
        match act:
            case SendFull():
                await self._send_chain(act.dataset, act.from_zone, None, (act.target,))
            case SendIncremental(clone_from=None):
                await self._send_chain(act.dataset, act.from_zone, act.base,
                                       act.snapshots or (act.target,))
            case SendIncremental():
                raise NeedsOperator(f"VM {self.vm}: {act.dataset} needs a clone stream "
                                    f"from {act.clone_from} (a divergent history)")
            case Delete():
                await self._delete(act)
            case MarkComplete():
                await self._mark(act)
            case PreserveDiverged() | DropDataset():
                raise NeedsOperator(f"VM {self.vm}: the two zones' histories diverged "
                                    f"({type(act).__name__} on {act.zone}); see "
                                    "replication/DESIGN.md (c)")
            case _:
                pass  # notices

    # -- streams ----------------------------------------------------------------

    async def _send_chain(self, ds: str, from_zone: str, base: SnapRef | None,
                          chain: tuple[SnapRef, ...]) -> None:
        prev = base
        for snap in chain:
            if from_zone == self.me:
                await self._push(ds, prev, snap)
            else:
                await self._pull(ds, prev, snap)
            prev = snap

    async def _push(self, ds: str, base: SnapRef | None, snap: SnapRef) -> None:
        store = self.zone.store
        local = store.part_dataset(self.vm, ds)
        from_snap = Snapshot(local, base.name) if base else None
        # Raw for an encrypted part (ciphertext, no key here), else every option
        # both zones have; refused before a byte moves when the peer cannot.
        options = choose_send_options(
            (await self.zone.zfs.capabilities()).stream_features(),
            await self.client.features(), encrypted=await self.zone.zfs.encrypted(local),
            what=f"VM {self.vm} dataset {ds!r}")
        spec = SendSpec(Snapshot(local, snap.name), from_snap, options=options)
        resume = await self._resumable(ds, snap)
        async with self._transfer("mirror-out", ds, snap, base) as t, self._held(from_snap):
            size = None
            if resume is not None:
                spec = SendSpec(resume_token=resume)
            elif (await self.zone.zfs.capabilities()).send_size_estimate:
                with contextlib.suppress(SnapperError):
                    size = await self.zone.zfs.send_size(spec)
            cmd = Receive(self.vm, ds, snap.name, base.name if base else None, size,
                          resume is not None)
            res = await self.client.push_stream(cmd, spec, self.zone.zfs, _Counted(t),
                                                bwlimit=self.bwlimit)
            self.moved += res.bytes
        await self._check_remote(ds, snap)

    async def _resumable(self, ds: str, snap: SnapRef) -> str | None:
        """The peer's resume token if ``planning.plan_resume`` says to resume it for
        ``snap``; any other partial receive is aborted.

        A transfer cut by a crash (OpenZFS, ``receive -s``) goes on from where
        it stopped; a token for another snapshot, or whose base this zone no
        longer holds, is stale: discarded, and the transfer starts over from
        the newest common snapshot.
        """
        token = await self.client.resume_token(self.vm, ds)
        if token is None:
            return None
        try:
            info = TokenInfo.from_zfs(await self.zone.zfs.resume_token_info(token))
            have = [Version(s.createtxg, "snapshot", s.name, s.guid) for s in
                    await self.zone.zfs.snapshots(self.zone.store.part_dataset(self.vm, ds))]
            # No dataset check: a partial teed from a CN's push names the CN's
            # dataset; `zfs send -t` looks the snapshot up by guid and refuses
            # a token it cannot serve.
            decision: ResumeDecision = plan_resume(have, info, want=snap.guid)
        except (SnapperError, ValueError) as exc:
            decision = AbortPartial(f"the token cannot be used here: {exc}")
        if isinstance(decision, Resume):
            self.log.info("resuming an interrupted mirror transfer", extra={
                "vm": self.vm, "dataset": ds, "snapshot": snap.name, "peer": self.peer})
            return token
        self.log.info("discarding the peer's partial receive: %s", decision.reason)
        await self.client.abort(self.vm, ds)
        return None

    async def _pull(self, ds: str, base: SnapRef | None, snap: SnapRef) -> None:
        """The peer's ``send`` into this zone, through the zone's one receive path:
        vetted (no ``-R``/``-p``, this snapshot, this guid), a receive slot,
        the VM lock, guid-confirmed."""
        cmd = Send(self.vm, ds, snap.name, base.name if base else None,
                   (await self.zone.zfs.capabilities()).stream_features())
        req = ReceiveRequest("mirror-in", self.vm, ds,
                             Expect(snap.name, cmd.base, toguid=snap.guid),
                             f"zone:{self.peer}", lease=False)
        result = "error"
        try:
            _got, t = await self.client.pull(cmd, lambda source: self.zone.receiver.receive(
                req, source))
            self.moved += t.bytes
            result = "ok"
        except SnapperError as err:
            result = err.code
            raise
        finally:
            self.zone.metrics.mirror_transfers.labels(self.peer, "in", result).inc()

    async def _check_remote(self, ds: str, snap: SnapRef) -> None:
        # The peer already refused a stream that was not this snapshot (it
        # reads DRR_BEGIN and checks toguid); asking again costs one listing
        # and catches a peer that changed under us.
        for s in await self.client.snapshots(self.vm):
            if s.name == snap.name:
                part = s.parts.get(ds)
                if part is not None and part.guid == snap.guid:
                    return
        raise GuidMismatch(f"zone {self.peer}: {self.vm}/{ds}@{snap.name} is not guid "
                           f"{snap.guid} after the transfer")

    @contextlib.asynccontextmanager
    async def _transfer(self, kind: str, ds: str, snap: SnapRef,
                        base: SnapRef | None) -> AsyncIterator[Transfer]:
        t = self.zone.transfers.start(kind, self.vm, ds, snap.name,
                                      base.name if base else None, f"zone:{self.peer}")
        lg = slog.child(self.log, vm=self.vm, dataset=ds, snapshot=snap.name, kind=kind,
                        peer=self.peer, transfer=t.id)

        def count(result: str) -> None:
            self.zone.metrics.mirror_transfers.labels(self.peer, "out", result).inc()

        with self.zone.transfers.running(t, lg, count):
            yield t

    @contextlib.asynccontextmanager
    async def _held(self, base: Snapshot | None) -> AsyncIterator[None]:
        """``zfs hold`` the base while we send from it (where ZFS has holds)."""
        held = False
        if base is not None:
            try:
                await self.zone.zfs.hold(HOLD_TAG, [base])
                held = True
            except UnsupportedFeature:
                pass
            except SnapperError as exc:  # already held by a concurrent transfer: fine
                self.log.debug("hold %s: %s", base, exc)
        try:
            yield
        finally:
            if held and base is not None:
                with contextlib.suppress(SnapperError):
                    await self.zone.zfs.release(HOLD_TAG, [base])

    # -- deletes and markers --------------------------------------------------------

    async def _delete(self, act: Delete) -> None:
        await self._at(act.zone).destroy(self.vm, act.name, act.dataset, act.guid)
        self.log.info("reconcile destroyed", extra={
            "vm": self.vm, "zone": act.zone, "dataset": act.dataset, "snapshot": act.name,
            "reason": str(act.reason)})

    async def _mark(self, act: MarkComplete) -> None:
        """Commit on ``act.zone`` the parts (by guid) and metadata the other zone has."""
        here, there = self.here, self.client
        marked, other = (here, there) if act.zone == self.me else (there, here)
        meta = await other.metadata(self.vm, act.name)
        snap = await self.zone.store.snapshot(self.vm, act.name)
        guids = set(act.guids)
        parts = [d for d, p in snap.parts.items() if p.guid in guids]
        await marked.commit(self.vm, act.name, parts, meta)

    def _at(self, zone: str) -> Endpoint:
        return self.here if zone == self.me else self.client
