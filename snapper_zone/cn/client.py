"""The compute node's side: push a VM snapshot to a snapper zone, list it, restore it.

The connection to a zone is ``transfer.remote.ZoneClient`` (the endpoint over
SSH, shared with the zones' replication).

``CnClient`` is the product on top: ``push`` (the VM's datasets as SmartOS
lays them out, ``cn.datasets``; one atomic snapshot; send options by both
sides' capabilities, raw for an encrypted dataset; per dataset plan by guid,
resume or abort a partial receive, send, commit with metadata, bookmark),
``restore`` (each part where it was) and ``list``. Every decision about *what* to send is in
``planning``; this module only gathers inputs and carries out the plan.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from snapper_zone.cn.datasets import ROOT_LABEL, Layout, discover, place
from snapper_zone.common.answers import AnswerCache
from snapper_zone.common.httpsig import (
    NoAnswer,
    Signer,
    UntrustedResponse,
    call_json,
    signing_session,
)
from snapper_zone.common.progress import NoProgress, Reporter
from snapper_zone.common.tasks import cancel_and_wait
from snapper_zone.errors import (
    ResumeTokenInvalid,
    ResumeTokenStale,
    SnapperError,
    ZfsError,
)
from snapper_zone.policy import PolicySet, check_policy_document, check_policy_name
from snapper_zone.transfer import plan as planning
from snapper_zone.transfer.plan import (
    AbortPartial,
    AlreadyThere,
    Incremental,
    Resume,
    TokenInfo,
    Version,
    ZoneSnapshot,
    ZoneVmSnapshot,
)
from snapper_zone.transfer.remote import (
    StreamResult,
    ZoneClient,
    ZoneError,
    ZoneUnreachable,
)
from snapper_zone.wire import VmSnapshot
from snapper_zone.wire.protocol import (
    Receive,
    Send,
)
from snapper_zone.zfs import proc
from snapper_zone.zfs.names import Bookmark, Dataset, Snapshot, check_component, check_uuid
from snapper_zone.zfs.zfs import (
    BookmarkInfo,
    DatasetInfo,
    SendOptions,
    SendSpec,
    SnapshotInfo,
    Tree,
    Zfs,
    choose_send_options,
)

log = logging.getLogger("snapper.cn")

BOOKMARK_PREFIX = "snapper-"

class PushError(SnapperError):
    code = "PushFailed"


class RestoreError(SnapperError):
    code = "RestoreFailed"


class PlanError(SnapperError):
    """A planning conflict, with both histories for the message."""

    def __init__(self, dataset: str, conflict: planning.Conflict) -> None:
        super().__init__(f"{dataset}: {conflict.detail()}")
        self.code = conflict.code
        self.conflict = conflict


# -- the SSH connection -----------------------------------------------------------


class PlacementUnknown(SnapperError):
    """No coordinator answers and this CN has no placement of the VM it saw before.

    No fallback guesses one: a zone chosen here (a hash over the zones this CN
    knows) could be draining, full or lost, and the coordinator would later
    place the VM elsewhere, leaving an unplaced copy; the snapshot stays on
    the CN instead, and the next push with an answer carries it along.
    """

    code = "PlacementUnknown"
    http_status = 503


@dataclass(frozen=True)
class Placement:
    """Where to push a VM: its zones' endpoints, primary first; ``seen_at`` (unix
    time) when they come from the cache because no coordinator answered."""

    endpoints: list[dict[str, Any]]
    seen_at: float | None = None
    why: str = ""  # what the coordinator did instead of answering

    def note(self) -> str | None:
        """The line a person is told when the placement is not fresh."""
        if self.seen_at is None:
            return None
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.seen_at))
        return f"coordinator unreachable: using the placement seen at {at} ({self.why})"


# Bounded: a coordinator that is gone fails the connect within 3 s (the cache
# answers next); one that hangs, within 15 s (placing a new VM asks the zones).
_COORDINATOR_TIMEOUT = (15.0, 3.0)  # seconds: the whole answer, the connection


async def lookup_placement(coordinator_url: str, vm: str, key: Path,
                           coordinator_key: str | None = None,
                           cache: AnswerCache | None = None) -> Placement:
    """The VM's zones (primary first) with their endpoints, from the coordinator.

    Asked as this CN: the request is signed with its SSH key ``key``. The
    answer names the host keys the CN then pins, so with ``coordinator_key``
    (an OpenSSH public key line) it must be signed by the coordinator:
    whoever merely answers at its address cannot send a push elsewhere.

    With ``cache``, a verified answer is kept (on disk), and used when the
    coordinator does not answer (down, timeout, 5xx, an answer not signed by
    it); a refusal (401, 403, 4xx) is never bridged. Nothing cached:
    ``PlacementUnknown``.
    """
    try:
        endpoints = await _ask_placement(coordinator_url, vm, key, coordinator_key)
    except (ZoneUnreachable, ZoneError) as exc:
        if isinstance(exc, ZoneError) and not _no_answer(exc):
            raise
        seen = cache.placement(vm) if cache is not None else None
        cached = _endpoints(seen.doc) if seen is not None else None
        if seen is None or not cached:
            if isinstance(exc, ZoneUnreachable):
                raise PlacementUnknown(
                    f"VM {vm}: no coordinator answers ({exc.message}) and this CN has not "
                    "seen its placement before; no zone can be chosen safely. The "
                    "snapshot stays here; push again once the coordinator answers") from exc
            raise
        found = Placement(cached, seen.at, " ".join(exc.message.split())[:200])
        log.info(found.note(), extra={"vm": vm})  # the CLI tells the person itself
        return found
    if cache is not None:
        cache.put_placement(vm, {"endpoints": endpoints})
        await cache.flush()
    return Placement(endpoints)


async def placement(coordinator_url: str, vm: str, key: Path,
                    coordinator_key: str | None = None) -> list[dict[str, Any]]:
    """``lookup_placement``'s endpoints, without a cache (the coordinator must answer)."""
    return (await lookup_placement(coordinator_url, vm, key, coordinator_key)).endpoints


@dataclass(frozen=True)
class PolicyAnswer:
    """The registry's copy of a policy file: checked (``check_policy_document``), its
    version; ``seen_at`` when it is the last verified copy because no coordinator
    answered."""

    name: str
    policies: PolicySet
    version: int
    seen_at: float | None = None
    why: str = ""

    def note(self) -> str | None:
        if self.seen_at is None:
            return None
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.seen_at))
        return (f"coordinator unreachable: policy {self.name} version {self.version} as seen "
                f"at {at} ({self.why})")


async def lookup_policy(coordinator_url: str, name: str, key: Path,
                        coordinator_key: str | None = None,
                        cache: AnswerCache | None = None) -> PolicyAnswer:
    """Policy ``name`` from the coordinator's registry (``GET /v1/policies/{name}``),
    asked as this CN, the answer signed by ``coordinator_key``, checked field by
    field before it is believed or kept. As with placements, a verified copy is
    kept in ``cache`` and used while no coordinator answers; a refusal (404: no
    such policy, 403) is never bridged. Nothing cached: ``ZoneUnreachable``."""
    try:
        body = await _ask_coordinator(
            coordinator_url, f"/v1/policies/{check_policy_name(name)}", key, coordinator_key,
            "policy")
    except (ZoneUnreachable, ZoneError) as exc:
        if isinstance(exc, ZoneError) and not _no_answer(exc):
            raise
        seen = cache.policy(name) if cache is not None else None
        if seen is None:
            raise ZoneUnreachable(f"policy {name}: no coordinator answers ({exc.message}) "
                                  "and this CN has no copy of it yet") from exc
        return PolicyAnswer(name, check_policy_document(seen.doc.get("document"), name),
                            int(seen.doc.get("version") or 0), seen.at,
                            " ".join(exc.message.split())[:200])
    policies = check_policy_document(body.get("document"), name)
    version = body.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ZoneError("BadAnswer", f"policy {name}: the answer has no version", "policy")
    if cache is not None:
        cache.put_policy(name, {"document": body["document"], "version": version})
        await cache.flush()
    return PolicyAnswer(name, policies, version)


def _no_answer(exc: ZoneError) -> bool:
    """A coordinator error that is as good as no answer: one not signed by it."""
    return exc.code == UntrustedResponse.code


def _endpoints(doc: Any) -> list[dict[str, Any]]:
    got = doc.get("endpoints") if isinstance(doc, dict) else None
    if not isinstance(got, list):
        return []
    return [e for e in got if isinstance(e, dict)]


async def _ask_placement(coordinator_url: str, vm: str, key: Path,
                         coordinator_key: str | None) -> list[dict[str, Any]]:
    body = await _ask_coordinator(coordinator_url, f"/v1/placement/{vm}", key,
                                  coordinator_key, "placement")
    endpoints = _endpoints(body)
    if not endpoints:
        raise ZoneError("BadAnswer", f"coordinator gave no endpoints for VM {vm}", "placement")
    return endpoints


async def _ask_coordinator(coordinator_url: str, path: str, key: Path,
                           coordinator_key: str | None, what: str) -> dict[str, Any]:
    """``GET path`` of the coordinator signed as this CN, the answer checked against
    ``coordinator_key``: the JSON object of a 200. No answer, or a 5xx (its store
    away, rebuilding): ``ZoneUnreachable``; any other refusal: ``ZoneError``."""
    url = f"{coordinator_url.rstrip('/')}{path}"
    trusted = None if coordinator_key is None else asyncssh.import_public_key(coordinator_key)
    try:
        async with signing_session(Signer.load(key), response_key=trusted) as http:
            total, connect = _COORDINATOR_TIMEOUT
            got = await call_json(http, "GET", url, timeout=total, connect_timeout=connect)
    except UntrustedResponse as exc:
        raise ZoneError(exc.code, f"coordinator {coordinator_url}: {exc.message}",
                        what) from exc
    except NoAnswer as exc:
        raise ZoneUnreachable(f"coordinator {coordinator_url}: {exc.message}") from exc
    if got.status != 200:
        code, msg = got.error()
        if got.status >= 500:
            raise ZoneUnreachable(f"coordinator {coordinator_url}: {got.status} {code}: {msg}")
        raise ZoneError(code, msg, what)
    return got.body if isinstance(got.body, dict) else {}


# -- what a zone holds, per dataset ----------------------------------------------


def zone_history(snaps: Sequence[VmSnapshot], label: str) -> list[ZoneSnapshot]:
    """The zone's snapshots of one VM dataset, oldest first (by the zone's createtxg)."""
    rows = [(p.createtxg, ZoneSnapshot(s.name, p.guid)) for s in snaps
            if (p := s.parts.get(label)) is not None]
    rows.sort(key=lambda r: r[0])
    return [z for _, z in rows]


def zone_vm_snapshots(snaps: Sequence[VmSnapshot]) -> list[ZoneVmSnapshot]:
    """The zone's VM snapshots with their parts' guids, in the zone's order."""
    return [ZoneVmSnapshot(s.name, s.complete, s.guids) for s in snaps]


# -- the CN library ---------------------------------------------------------------


@dataclass(frozen=True)
class _Listed:
    """The snapshots (and bookmarks, where ZFS has them) of a VM's dataset and
    its children, from one listing."""

    top: Dataset
    tree: Tree
    # Every dataset listed with it (the pool's top level, the VM's below it).
    infos: Mapping[Dataset, DatasetInfo] = field(default_factory=dict)

    def covers(self, ds: Dataset) -> bool:
        return self.top in (ds, ds.parent)

    def has(self, snap: Snapshot) -> bool:
        return any(s.snapshot == snap for s in self.tree.snapshots)

    def of(self, ds: Dataset) -> list[SnapshotInfo] | None:
        """``ds``'s snapshots, oldest first; None for a dataset this does not cover."""
        if not self.covers(ds):
            return None
        return [s for s in self.tree.snapshots if s.snapshot.dataset == ds]

    def marks(self, ds: Dataset) -> list[BookmarkInfo] | None:
        """``ds``'s bookmarks, oldest first; None where this does not cover it
        or was read without them."""
        if not self.covers(ds) or self.tree.bookmarks is None:
            return None
        return [b for b in self.tree.bookmarks if b.bookmark.dataset == ds]


@dataclass
class DatasetReport:
    label: str
    dataset: str
    action: str  # "full", "incremental", "resumed+incremental", "already there", ...
    base: str | None = None
    bytes: int = 0
    seconds: float = 0.0
    options: list[str] = field(default_factory=list)  # raw, compressed, ... (zfs send)
    streams: int = 0  # sent (resumed ones included)


@dataclass
class PushReport:
    vm: str
    snapshot: str
    datasets: list[DatasetReport] = field(default_factory=list)
    metadata_source: str = ""
    durability: str = ""
    zones: list[str] = field(default_factory=list)  # uuids of the zones holding it complete
    carried: list[str] = field(default_factory=list)  # earlier snapshots committed with it
    not_included: list[str] = field(default_factory=list)  # datasets below a child

    @property
    def bytes(self) -> int:
        return sum(d.bytes for d in self.datasets)


@dataclass
class RestoreReport:
    vm: str
    snapshot: str
    target: str
    datasets: list[DatasetReport] = field(default_factory=list)
    metadata: dict[str, Any] | None = None


def default_snapshot_name(now: float | None = None) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))


class CnClient:
    """push / restore / list for the VMs under ``dataset_root`` on this CN."""

    def __init__(self, zone: ZoneClient, *, dataset_root: str = "zones", zfs: Zfs | None = None,
                 progress: Reporter | None = None, vmadm: str | None = "vmadm") -> None:
        self.zone = zone
        self.root = Dataset(dataset_root)
        self.zfs = zfs or Zfs()
        self.progress = progress or NoProgress()
        self.vmadm = vmadm
        self.bwlimit: float | None = None  # bytes/s per stream, None: as fast as it goes

    def vm_dataset(self, vm: str) -> Dataset:
        return self.root.child(check_uuid(vm, "VM uuid"))

    async def vm_layout(self, vm: str) -> Layout:
        """The VM's datasets as SmartOS lays them out (``cn.datasets.discover``):
        <root>/<vm>, its children, and KVM's sibling zvols <root>/<vm>-disk<N>."""
        return (await self._layout_listing(vm))[0]

    async def _layout_listing(self, vm: str) -> tuple[Layout, _Listed]:
        """``vm_layout``, and the snapshots of the VM's dataset and its children
        (not of sibling disks), read with it: a push needs to know whether its
        snapshot is there, and each ``zfs`` command costs a process."""
        top = self.vm_dataset(vm)
        # Siblings are beside the VM (one level under the root); children and
        # the datasets below them (named, not sent) under it.
        below = await self.zfs.tree(top, depth=2, bookmarks=True)
        rows = [*await self.zfs.datasets(self.root, depth=1), *below.datasets]
        return (discover(top, ((str(i.dataset), i.type) for i in rows)),
                _Listed(top, below, {i.dataset: i for i in rows}))

    async def vm_datasets(self, vm: str) -> dict[str, Dataset]:
        """label -> dataset: ``root`` for <root>/<vm>, each child by its basename,
        ``root-disk<N>`` for a sibling zvol <root>/<vm>-disk<N>."""
        return (await self.vm_layout(vm)).parts

    async def versions(self, ds: Dataset, listed: _Listed | None = None) -> list[Version]:
        """This CN's snapshots and (where ZFS has them) bookmarks of ``ds``; its
        snapshots from ``listed`` where that covers it."""
        snaps = listed.of(ds) if listed is not None else None
        if snaps is None:
            snaps = await self.zfs.snapshots(ds)
        out = [Version(s.createtxg, "snapshot", s.name, s.guid) for s in snaps]
        if (await self.zfs.capabilities()).bookmarks:
            marks = listed.marks(ds) if listed is not None else None
            if marks is None:
                marks = await self.zfs.bookmarks(ds)
            out += [Version(b.createtxg, "bookmark", b.bookmark.name, b.guid) for b in marks]
        return planning.history(out)

    # -- push -----------------------------------------------------------------------

    async def push(self, vm: str, name: str | None = None, base: str | None = None,
                   metadata: Mapping[str, Any] | None = None,
                   durability: str | None = None) -> PushReport:
        """Snapshot the VM (all its datasets, atomically) and store it on the zone.

        Re-running with the name of an existing local snapshot finishes that
        push (what the zone already has is skipped), so a crash mid-push is
        recovered by running the same command again.
        """
        vm = check_uuid(vm, "VM uuid")
        snap = check_component(name or default_snapshot_name(), "snapshot name")
        if base is not None:
            check_component(base, "base snapshot")
        # The zone's answers do not depend on anything here: asked while this
        # CN's ZFS is read (a push's round trips are much of a small push's time).
        asked = (asyncio.ensure_future(self.zone.features()),
                 asyncio.ensure_future(self.zone.inventory(vm)))
        try:
            layout, listed = await self._layout_listing(vm)
            top = self.vm_dataset(vm)
            datasets = layout.parts
            # Chosen before anything changes: an encrypted dataset a zone cannot
            # take raw is refused here, with no snapshot taken and no byte sent.
            options = await self._send_options(datasets, await asked[0], listed)
            # The listing has the VM's and its children's snapshots; a sibling
            # disk's is asked for.
            have = [listed.has(ds.snapshot(snap)) if listed.covers(ds)
                    else await self.zfs.exists(ds.snapshot(snap)) for ds in datasets.values()]
            if not any(have):
                # One command, so one transaction group: the VM and its sibling
                # disks are snapshotted at the same instant.
                await self.zfs.snapshot([self.vm_dataset(vm).snapshot(snap),
                                         *(ds.snapshot(snap) for ds in layout.siblings)],
                                        recursive=True)
                # Listed again at once, for every part it covers (each part
                # would otherwise list its own).
                listed = _Listed(top, await self.zfs.tree(top, depth=2, bookmarks=True))
            elif not all(have):
                missing = [label for label, h in zip(datasets, have, strict=True) if not h]
                raise PushError(f"snapshot @{snap} exists on some of the VM's datasets but "
                                f"not on: {', '.join(missing)}")
            inventory = await asked[1]
        finally:
            await cancel_and_wait(*asked)  # none left running, no failure unheard
        report = PushReport(vm, snap, not_included=[str(d) for d in layout.skipped])
        if layout.skipped:
            log.warning("%s: not part of the VM snapshot (below a child dataset): %s", vm,
                        ", ".join(report.not_included))
        zone_snaps = list(inventory.snapshots)
        deleted = frozenset(inventory.tombstones)
        for label, ds in datasets.items():
            report.datasets.append(await self._push_dataset(vm, label, ds, snap, base,
                                                            zone_snaps, deleted,
                                                            options[label], listed,
                                                            inventory.datasets))
        meta, report.metadata_source = await self._metadata(vm, list(datasets), metadata)
        if any(not s.complete for s in zone_snaps) or any(d.streams > 1
                                                          for d in report.datasets):
            # Something unfinished on the zone, or more than the target sent:
            # earlier snapshots may have arrived whole. Otherwise none can
            # have, and asking the zone again costs the push two listings.
            report.carried = await self._commit_carried(vm, datasets, snap, meta)
        done = await self.zone.commit(vm, snap, list(datasets), meta, durability)
        report.durability = str(done.get("durability") or durability or "")
        report.zones = [str(z) for z in done.get("zones") or []]
        await self._bookmark(datasets.values(), snap, listed)
        return report

    async def _send_options(self, datasets: Mapping[str, Dataset], theirs: frozenset[str],
                            listed: _Listed) -> dict[str, SendOptions]:
        """Per part: raw for an encrypted dataset, else what both ZFSes have (-c -L -e);
        ``theirs``: the zone's ``features``; whether each is encrypted from ``listed``."""
        mine = (await self.zfs.capabilities()).stream_features()

        async def encrypted(ds: Dataset) -> bool:
            info = listed.infos.get(ds)
            return info.encrypted if info is not None else await self.zfs.encrypted(ds)

        return {label: choose_send_options(mine, theirs, encrypted=await encrypted(ds),
                                           what=str(ds))
                for label, ds in datasets.items()}

    async def _commit_carried(self, vm: str, datasets: Mapping[str, Dataset], snap: str,
                              meta: Mapping[str, Any]) -> list[str]:
        """Commit the earlier snapshots this push carried along (``planning.carried_along``).

        They take the target's metadata (the VM as it is now) and durability
        ``local``: nobody asked for them, so none waits for their mirror. One
        that fails stays unfinished (debris that reconcile removes), and the
        push goes on.
        """
        cn = {label: await self.versions(ds) for label, ds in datasets.items()}
        zone = zone_vm_snapshots(await self.zone.snapshots(vm))
        done = []
        for name in planning.carried_along(cn, zone, snap):
            try:
                await self.zone.commit(vm, name, list(datasets), meta, "local")
            except ZoneError as exc:
                log.warning("could not commit %s@%s carried along by this push: %s",
                            vm, name, exc)
            else:
                done.append(name)
        return done

    async def _push_dataset(self, vm: str, label: str, ds: Dataset, snap: str,
                            base: str | None, zone_snaps: list[VmSnapshot],
                            deleted: frozenset[int],
                            options: SendOptions | None = None,
                            listed: _Listed | None = None,
                            tokens: Mapping[str, str | None] | None = None) -> DatasetReport:
        options = options or SendOptions()
        report = DatasetReport(label, str(ds), "", options=sorted(options.features()))
        caps = await self.zfs.capabilities()
        # Bounded: a resume, then the real push. A token that survives an abort
        # is an error, not a reason to loop.
        for _attempt in range(3):
            # The push's own listing and the zone's inventory (each part's resume
            # token) serve the first round; a later one asks again. A token that
            # appeared since is met as PartialReceiveExists, below.
            versions = await self.versions(ds, listed)
            token = (tokens.get(label) if tokens is not None
                     else await self.zone.resume_token(vm, label))
            listed, tokens = None, None
            if token is not None:
                decision = await self._resume_decision(token, versions, ds, label, zone_snaps,
                                                       caps.resumable_receive)
                if isinstance(decision, Resume):
                    try:
                        res = await self._send(vm, label, decision.target.name,
                                               SendSpec(resume_token=token), resume=True,
                                               base_zone=self._zone_name(decision.base,
                                                                         label, zone_snaps))
                    except (ResumeTokenStale, ResumeTokenInvalid) as exc:
                        # Raced with a local snapshot deletion: start over.
                        log.info("resume of %s failed (%s); aborting the partial receive",
                                 ds, exc.code)
                        await self.zone.abort(vm, label)
                    else:
                        report.action = "resumed+"
                        report.streams += 1
                        report.bytes += res.bytes
                        report.seconds += res.seconds
                    zone_snaps = await self.zone.snapshots(vm)
                    continue
                log.info("aborting stale partial receive of %s/%s: %s", vm, label,
                         decision.reason)
                await self.zone.abort(vm, label)
                report.action = "aborted stale partial+"
                continue
            try:
                plan = planning.plan_push(versions, zone_history(zone_snaps, label), snap, base,
                                          deleted)
            except planning.Conflict as conflict:
                raise PlanError(f"{vm}/{label} ({ds})", conflict) from None
            if isinstance(plan, AlreadyThere):
                report.action += "already there"
                return report
            src = plan.base if isinstance(plan, Incremental) else None
            report.base = str(_source(ds, src)) if src else None
            chain = planning.push_chain(versions, plan, deleted)
            base_zone = plan.zone_base.name if isinstance(plan, Incremental) else None
            try:
                for v in chain:
                    res = await self._send(vm, label, v.name,
                                           SendSpec(ds.snapshot(v.name), base=_source(ds, src),
                                                    options=options),
                                           base_zone=base_zone)
                    report.streams += 1
                    report.bytes += res.bytes
                    report.seconds += res.seconds
                    src, base_zone = v, v.name
            except ZoneError as exc:
                if exc.code != "PartialReceiveExists":
                    raise
                # An interrupted receive settled on the zone after we asked for
                # its token (the zone finishes it under the VM lock): go round.
                zone_snaps = await self.zone.snapshots(vm)
                continue
            report.action += "incremental" if isinstance(plan, Incremental) else "full"
            return report
        raise PushError(f"{vm}/{label}: the zone still reports a partial receive after "
                        "resuming or aborting it")

    async def _resume_decision(self, token: str, versions: list[Version], ds: Dataset,
                               label: str, zone_snaps: list[VmSnapshot],
                               can_resume: bool) -> planning.ResumeDecision:
        if not can_resume:
            return AbortPartial("this CN's ZFS cannot resume a send")
        try:
            info = TokenInfo.from_zfs(await self.zfs.resume_token_info(token))
        except (ZfsError, ValueError) as exc:
            return AbortPartial(f"the token cannot be decoded here: {exc}")
        return planning.plan_resume(versions, info, str(ds), zone_history(zone_snaps, label))

    @staticmethod
    def _zone_name(v: Version | None, label: str,
                   zone_snaps: list[VmSnapshot]) -> str | None:
        """The zone's name for the CN version ``v`` (matched by guid)."""
        if v is None:
            return None
        for z in zone_history(zone_snaps, label):
            if z.guid == v.guid:
                return z.name
        return v.name

    async def _send(self, vm: str, label: str, snap: str, spec: SendSpec, *,
                    resume: bool = False, base_zone: str | None = None) -> StreamResult:
        size = await self._estimate(spec)
        # --session: what this push leaves uncommitted ends with our connection
        # (we commit on it), not a lease that would hold debris for minutes.
        cmd = Receive(vm, label, snap, base_zone, size, resume, session=True)
        self.progress.start(f"{vm[:8]}/{label}@{snap}", size, vm=vm, dataset=label,
                            snapshot=snap, base=base_zone, resume=resume)
        try:
            res = await self.zone.push_stream(cmd, spec, self.zfs, self.progress,
                                              bwlimit=self.bwlimit)
        except BaseException as exc:
            self.progress.done(False, str(exc) or type(exc).__name__)
            raise
        self.progress.done(True)
        return res

    async def _estimate(self, spec: SendSpec) -> int | None:
        if not (await self.zfs.capabilities()).send_size_estimate:
            return None
        try:
            return await self.zfs.send_size(spec)
        except ZfsError as exc:
            log.debug("no size estimate: %s", exc)
            return None

    async def vm_tags(self, vm: str) -> dict[str, str]:
        """The VM's tags (``vmadm get``'s ``tags``): policies may name VMs by tag."""
        meta, _ = await self._metadata(vm, [], None)
        tags = meta.get("tags")
        return {str(k): str(v) for k, v in tags.items()} if isinstance(tags, dict) else {}

    async def _metadata(self, vm: str, labels: list[str],
                        given: Mapping[str, Any] | None) -> tuple[dict[str, Any], str]:
        """The user's file wins; else ``vmadm get`` on SmartOS; else a minimal record."""
        if given is not None:
            return dict(given), "file"
        if self.vmadm and shutil.which(self.vmadm):
            done = await proc.run([self.vmadm, "get", vm], timeout=60)
            if done.ok:
                obj = json.loads(done.stdout)
                if isinstance(obj, dict):
                    return obj, "vmadm"
            log.warning("vmadm get %s failed: %s", vm, done.stderr.strip())
        return {"uuid": vm, "datasets": labels}, "minimal"

    async def _bookmark(self, datasets: Iterable[Dataset], snap: str,
                        listed: _Listed | None = None) -> None:
        """Keep ``#snapper-<snap>`` so the next push is incremental even if @snap goes.

        ``listed``: the push's listing, taken after @snap was; where it covers a
        dataset, its bookmarks and @snap's txg come from it instead of asking."""
        if not (await self.zfs.capabilities()).bookmarks:
            return
        name = BOOKMARK_PREFIX + snap
        for ds in datasets:
            marks = listed.marks(ds) if listed is not None else None
            taken = next((s for s in (listed.of(ds) or []) if s.name == snap),
                         None) if listed is not None else None
            if marks is None or taken is None:
                marks, taken = await self.zfs.bookmarks(ds), None
            mine = next((b.createtxg for b in marks if b.bookmark.name == name), None)
            if mine is None:
                await self.zfs.bookmark(ds.snapshot(snap), name)
                # A bookmark keeps its snapshot's txg.
                mine = taken.createtxg if taken is not None else next(
                    b.createtxg for b in await self.zfs.bookmarks(ds) if b.bookmark.name == name)
            for b in marks:
                # Older snapper bookmarks only: never someone else's, never a newer one.
                if b.bookmark.name.startswith(BOOKMARK_PREFIX) and b.createtxg < mine:
                    await self.zfs.destroy(b.bookmark)

    # -- restore --------------------------------------------------------------------

    async def restore(self, vm: str, snap: str, target: str | None = None, *,
                      rollback: bool = False,
                      metadata_path: str | Path | None = None) -> RestoreReport:
        """Bring VM snapshot ``snap`` back from the zone.

        Into the VM's own datasets (``target`` None): incremental onto the
        newest local snapshot the zone also holds; that snapshot must be the
        local newest and unmodified unless ``rollback`` (then later local
        snapshots and changes are discarded: ``zfs rollback -r`` and
        ``receive -F``). Into ``target`` (a new dataset): full streams.
        """
        vm = check_uuid(vm, "VM uuid")
        check_component(snap, "snapshot name")
        snaps = await self.zone.snapshots(vm)
        entry = next((s for s in snaps if s.name == snap), None)
        if entry is None:
            raise RestoreError(f"the zone holds no snapshot {snap!r} of VM {vm}")
        if not entry.complete:
            raise RestoreError(f"snapshot {snap!r} of VM {vm} is incomplete on the zone "
                               "(a push that did not finish); it cannot be restored")
        top = Dataset(target) if target else self.vm_dataset(vm)
        labels = sorted(entry.parts, key=lambda lb: lb != ROOT_LABEL)
        if ROOT_LABEL not in labels:
            raise RestoreError(f"snapshot {snap!r} of VM {vm} has no {ROOT_LABEL!r} dataset")
        # Each part where it was: children under the top, sibling disks beside it.
        places = {label: place(top, label) for label in labels}
        report = RestoreReport(vm, snap, str(top))
        for label in labels:
            local = places[label]
            report.datasets.append(await self._restore_dataset(vm, label, local, snap, snaps,
                                                               rollback))
        report.metadata = await self.zone.metadata(vm, snap)
        if metadata_path is not None:
            text = json.dumps(report.metadata, indent=2) + "\n"
            await asyncio.to_thread(Path(metadata_path).write_text, text)
        return report

    async def _restore_dataset(self, vm: str, label: str, local: Dataset, snap: str,
                               snaps: list[VmSnapshot], rollback: bool) -> DatasetReport:
        report = DatasetReport(label, str(local), "")
        history = zone_history(snaps, label)
        want = next(z for z in history if z.name == snap)
        older = history[: history.index(want)]
        base: ZoneSnapshot | None = None
        force = False
        if await self.zfs.exists(local):
            mine = await self.zfs.snapshots(local)
            by_guid = {s.guid: s for s in mine}
            if want.guid in by_guid:
                if rollback:
                    await self.zfs.rollback(by_guid[want.guid].snapshot, destroy_later=True)
                    report.action = "rolled back locally"
                else:
                    report.action = "already there"
                return report
            common = [z for z in older if z.guid in by_guid]
            if not common:
                raise RestoreError(
                    f"{local} exists and shares no snapshot with the zone's {label}@{snap}; "
                    "restore into a new dataset with --target")
            base = common[-1]
            newest = mine[-1] if mine else None
            if newest is None or newest.guid != base.guid:
                if not rollback:
                    raise RestoreError(
                        f"{local}: its newest snapshot @{newest.name if newest else '-'} is "
                        f"not @{by_guid[base.guid].name}, the newest one the zone also holds; "
                        "use --rollback to discard the later local snapshots, or --target")
                await self.zfs.rollback(by_guid[base.guid].snapshot, destroy_later=True)
            # -F discards changes made since the base, but only when asked to roll back.
            force = rollback
        # The zone picks the options (raw for an encrypted part) among those we take.
        accept = (await self.zfs.capabilities()).stream_features()
        cmd = Send(vm, label, snap, base.name if base else None, accept)
        total = None
        if base is None:
            total = next(s for s in snaps if s.name == snap).parts[label].referenced or None
        self.progress.start(f"{vm[:8]}/{label}@{snap}", total, vm=vm, dataset=label,
                            snapshot=snap, base=base.name if base else None)
        try:
            # Vetted and guid-confirmed by the one receive path (transfer.local).
            res = await self.zone.pull_stream(cmd, local, self.zfs, self.progress,
                                              toguid=want.guid, force=force, size=total)
        except BaseException as exc:
            self.progress.done(False, str(exc) or type(exc).__name__)
            raise
        self.progress.done(True)
        report.action = "incremental" if base else "full"
        report.base = base.name if base else None
        if await self.zfs.encrypted(local):
            # It came raw: ciphertext until `zfs load-key` with the VM's key.
            report.options = ["raw"]
        report.bytes, report.seconds = res.bytes, res.seconds
        return report

    # -- list -------------------------------------------------------------------------

    async def local_vms(self) -> list[str]:
        out = []
        for info in await self.zfs.datasets(self.root, depth=1):
            if info.dataset.parent == self.root:
                try:
                    out.append(check_uuid(info.dataset.basename))
                except ValueError:
                    continue
        return sorted(out)

    async def list(self, vm: str | None = None) -> dict[str, list[dict[str, Any]]]:
        """VM uuid -> the zone's snapshots of it; without ``vm``, this CN's VMs."""
        vms = [check_uuid(vm, "VM uuid")] if vm else await self.local_vms()
        return {v: [s.to_json() for s in await self.zone.snapshots(v)] for v in vms}


def _source(ds: Dataset, v: Version | None) -> Snapshot | Bookmark | None:
    if v is None:
        return None
    return ds.snapshot(v.name) if v.is_snapshot else ds.bookmark(v.name)
