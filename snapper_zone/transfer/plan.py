"""What to send for one VM dataset: pure decisions, matched by guid.

No I/O here. The CN client gathers its local versions of a dataset
(snapshots and bookmarks, each with guid and createtxg) and the zone's
snapshots of the same dataset (name and guid, oldest first), and asks:

- ``common_base`` and ``chain_after``: the ZFS rules below as pure functions
  on two histories, used here and by reconcile (``replication/reconcile.py``):
  the base is the end of the longest common prefix, the chain what follows
  it on the sender, in order, up to the target.
- ``plan_push``: full, incremental from the newest version both sides hold,
  nothing (the zone already has it), or a typed conflict that says why a
  plain ``zfs receive`` on the zone would refuse the stream.
- ``push_chain``: the snapshots that plan sends, one stream each.
- ``plan_resume``: the receiver has a partial receive (a resume token); resume
  it with ``zfs send -t`` if the sender still has what the token names,
  otherwise abort it and plan again from scratch. The one resume rule: a zone
  pushing to its peer (``replication/executor.py``) asks it too.

``replication/DESIGN.md`` (b) states these rules with the theorems they serve.

Names are never trusted to identify data: two snapshots are "the same" only
when their guids are equal. Names are carried for messages and argv.

Rules, as ZFS imposes them on a receive without ``-F`` (which Snapper never
uses on a zone, since it would destroy acknowledged snapshots):

1. An incremental stream is accepted only if its base is the receiver's
   newest snapshot of that dataset.
2. A full stream is accepted only if the receiver has no such dataset yet
   (the zone creates the dataset from a full stream).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

VersionKind = Literal["snapshot", "bookmark"]


# -- the shared rules: base and chain on two histories -----------------------


class HasGuid(Protocol):
    @property
    def guid(self) -> int: ...


G = TypeVar("G", bound=HasGuid)


class OrderDiffers(Exception):
    """The guids both histories hold are not in the same order: not one ZFS history."""


def common_base(sender: Sequence[int], receiver: Sequence[int]) -> int | None:
    """The base of a send between two histories (guids, oldest first, no guid twice).

    The position, in both lists, of the newest snapshot of their longest
    common prefix (by guid); None when they do not start alike. What follows
    it on the receiver is the receiver's tail: an incremental from the base
    is accepted only once that tail is gone (rule 1), a full stream only if
    the receiver holds nothing (rule 2). Each caller first drops what it may
    ignore: reconcile the one-sided snapshots that go anyway, the CN what one
    side lacks below the other's newest (``plan_push``). Raises
    :class:`OrderDiffers` when the guids both hold are in different orders.
    """
    mine = set(receiver)
    shared = [g for g in sender if g in mine]
    theirs = set(shared)
    if shared != [g for g in receiver if g in theirs]:
        raise OrderDiffers("the common snapshots are not in the same order on both sides")
    k = 0
    while k < min(len(sender), len(receiver)) and sender[k] == receiver[k]:
        k += 1
    return k - 1 if k else None


def chain_after(sender: Sequence[G], base: int | None, target: int | None = None) -> list[G]:
    """The sender's snapshots after ``base`` up to ``target`` (guids), oldest first.

    What a send from the base carries: everything the sender holds after the
    base's (last) position, up to and including the target's; ``base`` None:
    from the first; ``target`` None: to the newest. Empty when the target
    does not come after the base; ValueError when either is not in ``sender``.
    """
    start = 0
    if base is not None:
        start = max(i for i, s in enumerate(sender) if s.guid == base) + 1
    end = len(sender)
    if target is not None:
        end = max(i for i, s in enumerate(sender) if s.guid == target) + 1
    return list(sender[start:end])


@dataclass(frozen=True, order=True)
class Version:
    """One of the CN's versions of a dataset: a snapshot or a bookmark.

    Ordered by (createtxg, kind, ...) so sorting gives the dataset's history.
    """

    createtxg: int
    kind: VersionKind
    name: str
    guid: int

    @property
    def is_snapshot(self) -> bool:
        return self.kind == "snapshot"

    def __str__(self) -> str:
        return f"{'@' if self.is_snapshot else '#'}{self.name}"


@dataclass(frozen=True)
class ZoneSnapshot:
    """One of the zone's snapshots of the dataset (the zone's order is its own)."""

    name: str
    guid: int

    def __str__(self) -> str:
        return f"@{self.name}"


# -- decisions --------------------------------------------------------------


@dataclass(frozen=True)
class Full:
    """The zone has no snapshot of this dataset: send everything up to ``target``."""

    target: Version


@dataclass(frozen=True)
class Incremental:
    """Send ``target`` incrementally from ``base`` (a CN snapshot or bookmark)."""

    base: Version
    target: Version
    zone_base: ZoneSnapshot  # the same data on the zone, for the receive command


@dataclass(frozen=True)
class AlreadyThere:
    """The zone already holds ``target`` (same guid): nothing to send."""

    target: Version
    zone_snapshot: ZoneSnapshot


Plan = Full | Incremental | AlreadyThere


class Conflict(Exception):
    """A push that ZFS on the zone would refuse; carries both sides' histories."""

    code = "PlanConflict"

    def __init__(self, message: str, cn: Sequence[Version], zone: Sequence[ZoneSnapshot]) -> None:
        super().__init__(message)
        self.message = message
        self.cn = tuple(cn)
        self.zone = tuple(zone)

    def detail(self) -> str:
        cn = " ".join(str(v) for v in self.cn) or "(none)"
        zone = " ".join(str(z) for z in self.zone) or "(none)"
        return f"{self.message}\n  CN:   {cn}\n  zone: {zone}"


class NoCommonBase(Conflict):
    """The zone holds snapshots of the dataset, none of which the CN has (by guid)."""

    code = "NoCommonBase"


class Diverged(Conflict):
    """The zone's newest snapshot is unknown to the CN: it has a tail the CN lacks.

    An incremental from the newest common version would be refused (rule 1),
    and forcing it would destroy the zone's tail. Someone must decide.
    """

    code = "Diverged"

    def __init__(self, message: str, cn: Sequence[Version], zone: Sequence[ZoneSnapshot],
                 common: Version | None, zone_only: Sequence[ZoneSnapshot]) -> None:
        super().__init__(message, cn, zone)
        self.common = common
        self.zone_only = tuple(zone_only)


class ZoneAhead(Conflict):
    """The zone already holds a version newer than the snapshot being pushed."""

    code = "ZoneAhead"

    def __init__(self, message: str, cn: Sequence[Version], zone: Sequence[ZoneSnapshot],
                 zone_newest: Version) -> None:
        super().__init__(message, cn, zone)
        self.zone_newest = zone_newest


class BadBase(Conflict):
    """The base the user named cannot be used (unknown, not older, not on the zone)."""

    code = "BadBase"


class Reordered(Conflict):
    """The snapshots both sides hold are in different orders: not one ZFS history."""

    code = "Reordered"


class TargetNotFound(Conflict):
    """The snapshot to push is not one of the CN's snapshots."""

    code = "TargetNotFound"


class TargetDeleted(Conflict):
    """The snapshot to push was deleted on purpose on the zone (it holds its
    tombstone): stored again, reconcile would only delete it again."""

    code = "SnapshotDeleted"


# -- planning -----------------------------------------------------------------


def history(versions: Iterable[Version]) -> list[Version]:
    """The CN's versions oldest first (snapshot before its own bookmark at equal txg)."""
    return sorted(versions)


def _by_guid(cn: Sequence[Version]) -> dict[int, Version]:
    # A bookmark shares its snapshot's guid; prefer the snapshot: every ZFS
    # can send from a snapshot, only some from a bookmark.
    out: dict[int, Version] = {}
    for v in cn:
        if v.guid not in out or (v.is_snapshot and not out[v.guid].is_snapshot):
            out[v.guid] = v
    return out


def find_version(cn: Sequence[Version], name: str) -> Version | None:
    """The CN version called ``name``: the snapshot if there is one, else the bookmark."""
    named = sorted((not v.is_snapshot, v) for v in cn if v.name == name)
    return named[0][1] if named else None


def plan_push(cn: Sequence[Version], zone: Sequence[ZoneSnapshot], target: str,
              base: str | None = None, deleted: Collection[int] = ()) -> Plan:
    """Decide how to get the CN's snapshot ``target`` onto the zone.

    ``zone`` is the zone's snapshots of the dataset, oldest first. ``base``,
    when given, is the name of the CN version the user wants as the
    incremental source; it must be the zone's newest snapshot (by guid).
    ``deleted`` holds the guids the zone has tombstones for.
    Raises a :class:`Conflict` subclass when no stream would be accepted.
    """
    cn = history(cn)
    zone = list(zone)
    tgt = next((v for v in cn if v.name == target and v.is_snapshot), None)
    if tgt is None:
        raise TargetNotFound(f"the CN has no snapshot @{target}", cn, zone)
    if tgt.guid in deleted:
        raise TargetDeleted(
            f"@{target} was deleted on the zone on purpose; take a new snapshot to "
            "store this VM again", cn, zone)
    by_guid = _by_guid(cn)
    for z in zone:
        if z.guid == tgt.guid:
            # Already received (a rerun after a crash between receive and commit).
            return AlreadyThere(tgt, z)

    if base is not None:
        return _plan_from_base(cn, zone, tgt, base, by_guid)

    if not zone:
        return Full(tgt)
    # The CN ignores what one side lacks below the other's newest: its own
    # versions the zone lacks (the chain sends them, or the zone deleted them)
    # and the zone's snapshots it lacks below a common one (pruned here).
    on_zone = {z.guid for z in zone}
    last = max((i for i, z in enumerate(zone) if z.guid in by_guid), default=-1)
    receiver = [z.guid for i, z in enumerate(zone) if i > last or z.guid in by_guid]
    try:
        at = common_base([g for g in by_guid if g in on_zone], receiver)
    except OrderDiffers as e:
        raise Reordered(f"{e}; the zone's history is not the CN's", cn, zone) from None
    if at is None:
        raise NoCommonBase(
            f"the zone holds {len(zone)} snapshot(s) of this dataset and the CN has none "
            "of them (compared by guid); a full send would be refused", cn, zone)
    if at + 1 < len(receiver):
        last_common = by_guid[receiver[at]]
        tail = zone[last + 1:]
        raise Diverged(
            f"the zone's newest snapshot @{zone[-1].name} is not on the CN; the newest "
            f"common one is {last_common}, and an incremental from it "
            "would be refused", cn, zone, last_common, tail)
    newest = zone[-1]
    src = by_guid[newest.guid]
    if src.createtxg >= tgt.createtxg:
        raise ZoneAhead(
            f"the zone already holds {src}, which is not older than @{tgt.name}",
            cn, zone, src)
    return Incremental(src, tgt, newest)


def _plan_from_base(cn: list[Version], zone: list[ZoneSnapshot], tgt: Version, base: str,
                    by_guid: dict[int, Version]) -> Plan:
    src = find_version(cn, base)
    if src is None:
        raise BadBase(f"the CN has no snapshot or bookmark named {base!r}", cn, zone)
    if src.createtxg >= tgt.createtxg:
        raise BadBase(f"base {src} is not older than @{tgt.name}", cn, zone)
    on_zone = [z for z in zone if z.guid == src.guid]
    if not on_zone:
        raise BadBase(f"base {src} is not on the zone (compared by guid)", cn, zone)
    newest = zone[-1]
    if newest.guid != src.guid:
        if newest.guid in by_guid:
            raise ZoneAhead(
                f"the zone's newest snapshot is {by_guid[newest.guid]}, not the base {src}; "
                "the zone would refuse an incremental from it", cn, zone, by_guid[newest.guid])
        tail = zone[zone.index(on_zone[-1]) + 1:]
        raise Diverged(
            f"the zone's newest snapshot @{newest.name} is not on the CN; an incremental "
            f"from {src} would be refused", cn, zone, src, tail)
    return Incremental(src, tgt, on_zone[-1])


# -- committing what a push carried along -------------------------------------


def push_chain(cn: Sequence[Version], plan: Full | Incremental,
               deleted: Collection[int] = ()) -> list[Version]:
    """The CN snapshots a push sends, oldest first, one stream each.

    Every CN snapshot above the plan's base up to its target: a zone that
    skipped one could never take it from its peer (replication/DESIGN.md (b),
    Theorem R). Snapshots deleted on purpose on the zone (``deleted`` guids)
    are skipped: sent again they would come back, or be deleted again.
    """
    src = plan.base.guid if isinstance(plan, Incremental) else None
    return [v for v in chain_after(history(cn), src, plan.target.guid) if v.is_snapshot
            and (v.guid not in deleted or v == plan.target)]


@dataclass(frozen=True)
class ZoneVmSnapshot:
    """One VM snapshot as the zone lists it: its parts' guids and whether it is complete."""

    name: str
    complete: bool
    parts: Mapping[str, int]  # dataset label -> guid


def carried_along(cn: Mapping[str, Sequence[Version]], zone: Sequence[ZoneVmSnapshot],
                  target: str) -> list[str]:
    """The CN snapshots below ``target`` that the zone holds whole but not complete.

    A push sends every CN snapshot above the zone's newest (one stream each),
    so snapshots of earlier failed pushes arrive with it. Left without a
    marker they would be unfinished on the zone: in use while pending, then
    debris. They are the CN's real snapshots, so they are committed too, oldest
    first. Only those whose every dataset the zone holds with the CN's guid,
    and which the CN still holds below the target, qualify.
    """
    cn_snaps = {label: {v.name: v for v in vs if v.is_snapshot} for label, vs in cn.items()}
    out = []
    for z in zone:
        if z.complete or z.name == target or set(z.parts) != set(cn_snaps):
            continue
        ok = True
        for label, guid in z.parts.items():
            mine, tgt = cn_snaps[label].get(z.name), cn_snaps[label].get(target)
            if mine is None or tgt is None or mine.guid != guid \
                    or mine.createtxg >= tgt.createtxg:
                ok = False
                break
        if ok:
            out.append(z.name)
    return out


# -- resuming -----------------------------------------------------------------


@dataclass(frozen=True)
class TokenInfo:
    """What a resume token says (``zfs send -nvt TOKEN``)."""

    toguid: int
    fromguid: int  # 0 for a full stream
    toname: str  # the sender's dataset@snapshot

    @property
    def to_snapshot(self) -> str:
        return self.toname.partition("@")[2]

    @property
    def to_dataset(self) -> str:
        return self.toname.partition("@")[0]

    @classmethod
    def from_zfs(cls, info: dict[str, str]) -> TokenInfo:
        """From ``Zfs.resume_token_info``; raises ValueError on a malformed answer."""
        toguid = _guid(info.get("toguid", ""))
        fromguid = _guid(info.get("fromguid", "0")) if info.get("fromguid") else 0
        toname = info.get("toname", "")
        if "@" not in toname:
            raise ValueError(f"resume token names no snapshot: {toname!r}")
        return cls(toguid, fromguid, toname)


def _guid(text: str) -> int:
    # `zfs send -nvt` prints guids in hex (0x...) on OpenZFS; accept decimal too.
    text = text.strip()
    return int(text, 16) if text.lower().startswith("0x") else int(text)


@dataclass(frozen=True)
class Resume:
    """Resume the partial receive with ``zfs send -t``; it ends at ``target``."""

    target: Version
    base: Version | None  # the CN version the token's stream is incremental from


@dataclass(frozen=True)
class AbortPartial:
    """Discard the zone's partial receive (``zfs receive -A``) and plan afresh."""

    reason: str


ResumeDecision = Resume | AbortPartial


def plan_resume(have: Sequence[Version], token: TokenInfo, dataset: str | None = None,
                zone: Sequence[ZoneSnapshot] = (), want: int | None = None) -> ResumeDecision:
    """Resume the receiver's partial receive, or discard it: the one resume rule.

    Used by the CN before a push (``cnclient.CnClient._resume_decision``) and by
    a zone before it pushes a snapshot to its peer
    (``executor.Executor._resumable``).
    ``have`` is the sender's versions of the dataset. ``zfs send -t`` needs
    the token's snapshot itself (a bookmark has no data) and, for an
    incremental, its base (a snapshot or a bookmark), both by guid. With
    ``dataset``, the token must name that dataset: a token from another sender
    cannot be resumed from here. With ``want`` (a guid), the token must be for
    that snapshot: the sender is about to send it and nothing else. A token
    whose snapshot the receiver already holds (``zone``) is leftover state.
    Anything else is discarded (``zfs receive -A``) and planned afresh.
    """
    snaps = {v.guid: v for v in have if v.is_snapshot}
    target = snaps.get(token.toguid)
    if dataset is not None and token.to_dataset != dataset:
        return AbortPartial(f"the partial receive came from {token.to_dataset}, not {dataset}")
    if want is not None and token.toguid != want:
        return AbortPartial(f"the partial receive is of @{token.to_snapshot} (guid "
                            f"{token.toguid}), not of the snapshot to send (guid {want})")
    if target is None:
        return AbortPartial(f"snapshot @{token.to_snapshot} (guid {token.toguid}) of the "
                            "partial receive is gone from the sender")
    if any(z.guid == token.toguid for z in zone):
        return AbortPartial(f"the receiver already holds @{token.to_snapshot}")
    if token.fromguid == 0:
        return Resume(target, None)
    base = _by_guid(have).get(token.fromguid)
    if base is None:
        return AbortPartial(f"the base (guid {token.fromguid}) of the partial receive is "
                            "gone from the sender")
    return Resume(target, base)
