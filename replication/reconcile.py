"""Reconcile one VM's snapshots between its two snapper zones: pure, matched by guid.

No I/O. The daemon lists both zones (``ZoneInventory``: per VM dataset, the
snapshots oldest first with guid, createtxg and whether a complete VM
snapshot marker on that zone lists the part's guid), passes the tombstones
both zones keep and the names of snapshots in use, and gets back the actions
that make the two zones hold the same history, in the order they must run.
The rules are in ``replication/DESIGN.md``; in short:

* two snapshots are the same only when their guids are equal;
* nothing is ever received with ``-F``: an incremental goes onto the
  receiver's newest snapshot, a full stream only where the dataset is absent
  (or exists with no snapshot at all);
* a snapshot is destroyed only when a tombstone says it was deleted, when it
  is debris (incomplete on every zone holding it, not in use: never
  acknowledged), or when the same guid stays on the same zone's main line (a
  duplicate, or a moved-aside copy that is redundant);
* a divergent tail (each zone holds snapshots after the common base that the
  other lacks) is never dropped: the losing zone's tail is moved aside into a
  sibling dataset ``<dataset>.diverged-<tag>`` (a clone of the common base),
  the winning tail is received on top of the base, and the sibling is copied
  to the other zone, so both tails end with two copies. A zone that merely
  skipped snapshots is *rewound*: its tail is moved aside, the longer tail
  received, and the aside copy dropped;
* in-use snapshots (transfer targets and bases) are never destroyed or moved.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from snapper_zone.transfer.plan import OrderDiffers, chain_after, common_base

DIVERGED = ".diverged-"

# -- inputs -------------------------------------------------------------------


@dataclass(frozen=True)
class Snap:
    """One snapshot of one VM dataset on one zone."""

    name: str
    guid: int
    createtxg: int
    complete: bool = True  # a complete VM snapshot marker on this zone lists this guid
    created: int = 0  # ZFS ``creation`` (seconds): set by the CN, carried by every stream
    written: int = 0  # bytes since the previous snapshot (ZFS ``written``), for lag


@dataclass(frozen=True)
class Origin:
    """A clone's origin: the snapshot ``guid`` of ``dataset`` (same VM, same zone)."""

    dataset: str
    guid: int


@dataclass(frozen=True)
class ZoneInventory:
    """What one zone holds of one VM. Lists are in the zone's own order (createtxg)."""

    zone: str
    datasets: Mapping[str, Sequence[Snap]]
    origins: Mapping[str, Origin] = field(default_factory=dict)

    def snaps(self, dataset: str) -> list[Snap]:
        return sorted(self.datasets.get(dataset, ()), key=lambda s: s.createtxg)


@dataclass(frozen=True)
class Tombstone:
    """A dataset snapshot deleted on purpose (by guid), kept until both zones lack it."""

    guid: int
    deleted_at: int = 0


# -- outputs ------------------------------------------------------------------


@dataclass(frozen=True)
class SnapRef:
    name: str
    guid: int

    def __str__(self) -> str:
        return f"@{self.name}({self.guid:x})"


@dataclass(frozen=True)
class SendIncremental:
    """``zfs send -I base target`` on from_zone | ``zfs receive`` (no -F) on to_zone.

    ``snapshots`` is what the stream carries, oldest first, to verify by guid.
    With ``clone_from``, ``base`` is a snapshot of ``clone_from`` (present on
    both zones) and ``dataset`` does not exist yet on to_zone: it is created
    as a clone of it (a clone stream).
    """

    dataset: str
    from_zone: str
    to_zone: str
    base: SnapRef
    target: SnapRef
    intermediates: bool = True
    snapshots: tuple[SnapRef, ...] = ()
    clone_from: str | None = None


@dataclass(frozen=True)
class SendFull:
    """A full stream of ``target`` creating ``dataset`` on to_zone.

    ``replace_empty``: to_zone has the dataset but no snapshot of it (nothing
    acknowledged can live there); the receiver destroys it first.
    """

    dataset: str
    from_zone: str
    to_zone: str
    target: SnapRef
    replace_empty: bool = False


class Reason(StrEnum):
    TOMBSTONE = "tombstone"  # deleted on purpose (on either zone)
    DEBRIS = "debris"  # incomplete on every zone that has it, not in use: never acked
    DUPLICATE = "duplicate"  # the same guid is on this zone's main line
    REDUNDANT = "redundant"  # a moved-aside tail whose every guid is back on the main line


@dataclass(frozen=True)
class Delete:
    """Destroy ``dataset@name`` on zone; ``dataset`` None means the VM-level marker."""

    zone: str
    dataset: str | None
    name: str
    guid: int | None
    reason: Reason


@dataclass(frozen=True)
class Aside:
    """One dataset's tail moved aside into the sibling ``into`` (see PreserveDiverged)."""

    dataset: str
    base: SnapRef | None
    tail: tuple[SnapRef, ...]
    into: str


@dataclass(frozen=True)
class PreserveDiverged:
    """Move tails aside on ``zone``, one VM at once; nothing is destroyed.

    Per part, with a base: ``zfs clone ds@base T; zfs promote T; zfs rename ds
    into; zfs rename T ds``: ``ds`` ends at ``base`` and ``into`` (a clone of
    ``ds@base``) holds the tail. Without a base: ``zfs rename ds into``. Then the
    VM markers in ``markers`` are renamed ``name`` -> ``name + DIVERGED + tag``
    (they keep their guids: the preserved VM snapshots keep their identity).
    The executor records the whole action as an intent on the VM container
    first and finishes it before anything else after a crash: it is one step.
    """

    zone: str
    tag: str
    parts: tuple[Aside, ...]
    markers: tuple[str, ...] = ()


@dataclass(frozen=True)
class DropDataset:
    """Destroy a moved-aside sibling whose every guid is again on the zone's main line."""

    zone: str
    dataset: str
    guids: tuple[int, ...]
    reason: Reason = Reason.REDUNDANT


@dataclass(frozen=True)
class MarkComplete:
    """Mark VM snapshot ``name`` complete on zone, copying the metadata from from_zone."""

    zone: str
    from_zone: str
    name: str
    guids: tuple[int, ...]


class ConflictKind(StrEnum):
    ORDER = "order"  # the common guids are not in the same order on both zones
    DUPLICATE_GUID = "duplicate-guid"  # a guid twice in one dataset's list
    SIBLING_EXISTS = "sibling-exists"  # the name to move a tail aside to is taken
    SPLIT = "split"  # a VM snapshot would have parts both moved aside and on the main line


@dataclass(frozen=True)
class Conflict:
    """Nothing is done to ``dataset``: an operator must look."""

    dataset: str
    kind: ConflictKind
    detail: str
    a: tuple[SnapRef, ...] = ()
    b: tuple[SnapRef, ...] = ()


@dataclass(frozen=True)
class Defer:
    """Part of the work waits for snapshots in use (or a clone origin) to be released."""

    dataset: str
    reason: str


@dataclass(frozen=True)
class InSync:
    """Both zones hold the same snapshots, complete on both; nothing to do."""


Action = (SendIncremental | SendFull | Delete | PreserveDiverged | DropDataset | MarkComplete
          | Conflict | Defer | InSync)


def fills(act: Action, zone: str) -> bool:
    """Whether ``act`` adds to ``zone``'s copy (a snapshot or a marker arrives there).

    A zone the VM is not placed on does not fill its own copy: it is a move's
    target (the move's source fills it) or a copy about to be dropped.
    """
    if isinstance(act, SendFull | SendIncremental):
        return act.to_zone == zone
    return isinstance(act, MarkComplete) and act.zone == zone


# -- helpers ------------------------------------------------------------------


def marker_name(dataset: str, name: str) -> str:
    """The VM snapshot a dataset snapshot belongs to (its marker on the VM container)."""
    i = dataset.find(DIVERGED)
    return name if i < 0 else name + dataset[i:]


def is_sibling(dataset: str) -> bool:
    return DIVERGED in dataset


def _ref(s: Snap) -> SnapRef:
    return SnapRef(s.name, s.guid)


def _refs(ss: Iterable[Snap]) -> tuple[SnapRef, ...]:
    return tuple(_ref(s) for s in ss)


@dataclass
class _State:
    """A light projection of both zones, to know what holds after earlier actions.

    A marker is a VM snapshot name with the guids of its parts: a part is
    complete on a zone when one of the zone's markers lists its guid.
    """

    entries: dict[str, dict[str, list[Snap]]]  # zone -> dataset -> snaps
    markers: dict[str, dict[str, frozenset[int]]]  # zone -> marker name -> guids

    @classmethod
    def of(cls, *invs: ZoneInventory) -> _State:
        st = cls({}, {})
        for inv in invs:
            st.entries[inv.zone] = {d: inv.snaps(d) for d in inv.datasets}
            marks: dict[str, set[int]] = {}
            for d, ss in inv.datasets.items():
                for s in ss:
                    if s.complete:
                        marks.setdefault(marker_name(d, s.name), set()).add(s.guid)
            st.markers[inv.zone] = {k: frozenset(v) for k, v in marks.items()}
        return st

    def held(self, zone: str) -> set[int]:
        return {s.guid for ss in self.entries[zone].values() for s in ss}

    def complete(self, zone: str) -> set[int]:
        return {g for gs in self.markers[zone].values() for g in gs}

    def apply(self, act: Action, sources: Mapping[int, Snap]) -> None:
        if isinstance(act, SendIncremental | SendFull):
            refs = act.snapshots if isinstance(act, SendIncremental) else (act.target,)
            self.entries[act.to_zone].setdefault(act.dataset, []).extend(
                Snap(r.name, r.guid, 0, False, sources[r.guid].created,
                     sources[r.guid].written) for r in refs)
        elif isinstance(act, Delete):
            if act.dataset is None:
                self.markers[act.zone].pop(act.name, None)
            else:
                ss = self.entries[act.zone].get(act.dataset, [])
                ss[:] = [s for s in ss if s.guid != act.guid]
        elif isinstance(act, PreserveDiverged):
            ents = self.entries[act.zone]
            for p in act.parts:
                moved = {r.guid for r in p.tail}
                ents[p.into] = [s for s in ents[p.dataset] if s.guid in moved]
                ents[p.dataset] = [s for s in ents[p.dataset] if s.guid not in moved]
            marks = self.markers[act.zone]
            for m in act.markers:
                if m in marks:
                    marks[m + DIVERGED + act.tag] = marks.pop(m)
        elif isinstance(act, DropDataset):
            self.entries[act.zone].pop(act.dataset, None)
        elif isinstance(act, MarkComplete):
            self.markers[act.zone][act.name] = frozenset(act.guids)


# -- per-dataset analysis -----------------------------------------------------


@dataclass
class _Ds:
    name: str
    a: list[Snap]
    b: list[Snap]
    base: Snap | None = None  # newest snapshot of the common prefix
    tail_a: list[Snap] = field(default_factory=list)
    tail_b: list[Snap] = field(default_factory=list)
    pre: list[tuple[str, Snap]] = field(default_factory=list)  # (zone, snap) destroy first
    base_dead: Reason | None = None  # the base itself is to be destroyed after the sends
    state: str = "sync"  # sync | send | rewind | diverged | defer | conflict
    note: str = ""


class _Ctx:
    def __init__(self, a: ZoneInventory, b: ZoneInventory, dead: set[int],
                 in_use: frozenset[str]) -> None:
        self.a, self.b, self.dead, self.in_use = a, b, dead, in_use
        self.complete: set[int] = {s.guid for inv in (a, b) for ss in inv.datasets.values()
                                   for s in ss if s.complete}
        self.origins: dict[str, set[tuple[str, int]]] = {
            inv.zone: {(o.dataset, o.guid) for o in inv.origins.values()} for inv in (a, b)}

    def used(self, ds: str, s: Snap) -> bool:
        return s.name in self.in_use or marker_name(ds, s.name) in self.in_use

    def unwanted(self, s: Snap) -> Reason | None:
        """Why ``s`` should go (wherever it is), or None if it should stay."""
        if s.guid in self.dead:
            return Reason.TOMBSTONE
        if s.guid not in self.complete:
            return Reason.DEBRIS
        return None

    def held(self, zone: str, ds: str, s: Snap) -> bool:
        return self.used(ds, s) or (ds, s.guid) in self.origins[zone]


def _analyse(ctx: _Ctx, name: str) -> _Ds:
    za, zb = ctx.a.zone, ctx.b.zone
    d = _Ds(name, ctx.a.snaps(name), ctx.b.snaps(name))
    ga, gb = [s.guid for s in d.a], [s.guid for s in d.b]
    if len(set(ga)) != len(ga) or len(set(gb)) != len(gb):
        d.state, d.note = "conflict", ConflictKind.DUPLICATE_GUID.value
        return d
    common = set(ga) & set(gb)

    def removable(zone: str, s: Snap) -> bool:
        return ctx.unwanted(s) is not None and not ctx.held(zone, name, s)

    # One-sided removable snapshots vanish first; common ones may still serve as base.
    la = [s for s in d.a if s.guid in common or not removable(za, s)]
    lb = [s for s in d.b if s.guid in common or not removable(zb, s)]
    try:
        at = common_base([s.guid for s in la], [s.guid for s in lb])
    except OrderDiffers:
        d.state, d.note = "conflict", ConflictKind.ORDER.value
        return d
    d.base = la[at] if at is not None else None
    base_gone = d.base is not None and removable(za, d.base) and removable(zb, d.base)
    for zone, full, kept in ((za, d.a, la), (zb, d.b, lb)):
        for s in full:
            if d.base is not None and s.guid == d.base.guid:
                continue
            if removable(zone, s):
                d.pre.append((zone, s))
        tail = [s for s in chain_after(kept, d.base.guid if d.base else None)
                if not removable(zone, s)]
        if zone == za:
            d.tail_a = tail
        else:
            d.tail_b = tail
    if base_gone and d.base is not None:
        d.base_dead = ctx.unwanted(d.base)
    if any(ctx.unwanted(s) is not None and ctx.held(z, name, s)
           for z, ss in ((za, d.a), (zb, d.b)) for s in ss):
        d.note = "a deleted or unfinished snapshot is held (in use or a clone origin)"

    def blocked(zone: str, s: Snap) -> bool:
        return ctx.unwanted(s) is not None  # held, else it would have been removed

    blocked_any = any(blocked(za, s) for s in d.tail_a) or any(blocked(zb, s) for s in d.tail_b)
    if not d.tail_a and not d.tail_b:
        d.state = "sync"
    elif blocked_any and bool(d.tail_a) != bool(d.tail_b):
        # One zone is simply ahead and a push is still arriving there: send what
        # comes before the snapshot in use; the rest goes once it is finished
        # (or removed). A move onto a busy VM so never waits for a quiet moment.
        zone, tail = (za, d.tail_a) if d.tail_a else (zb, d.tail_b)
        head = []
        for s in tail:
            if blocked(zone, s):
                break
            head.append(s)
        if zone == za:
            d.tail_a = head
        else:
            d.tail_b = head
        d.state = "send" if head else "defer"
        d.note = "a tail holds a snapshot in use that is unfinished or deleted"
    elif blocked_any:
        d.state, d.note = "defer", "a tail holds a snapshot in use that is unfinished or deleted"
    elif not d.tail_a or not d.tail_b:
        d.state = "send"
    elif any(ctx.used(name, s) for s in d.tail_a + d.tail_b):
        d.state, d.note = "defer", "a divergent tail holds a snapshot in use"
    else:
        sa, sb = {s.guid for s in d.tail_a}, {s.guid for s in d.tail_b}
        d.state = "rewind" if sa <= sb or sb <= sa else "diverged"
    return d


# -- the plan -----------------------------------------------------------------


def reconcile(a: ZoneInventory, b: ZoneInventory, tombstones: Iterable[Tombstone] = (),
              in_use: Collection[str] = ()) -> list[Action]:
    """The actions that converge zones ``a`` and ``b`` for one VM, in execution order.

    Conflict and Defer entries come first and are notices, not steps. A plan
    without them leaves both zones with the same guids in the same datasets,
    every VM snapshot complete on one zone complete on both.
    """
    za, zb = a.zone, b.zone
    orig = {za: a, zb: b}
    dead = {t.guid for t in tombstones}
    used = frozenset(in_use)
    pre: list[Action] = []
    # A sibling whose every guid is again on its zone's main line (a rewind
    # that was cut short) is redundant: drop it and plan without it.
    invs: dict[str, ZoneInventory] = {}
    for zone, inv in orig.items():
        main = {s.guid for ds, ss in inv.datasets.items() if not is_sibling(ds) for s in ss}
        origins = {o.dataset for o in inv.origins.values()}
        spare = [ds for ds, ss in inv.datasets.items()
                if is_sibling(ds) and ss and ds not in origins
                and all(s.guid in main and s.name not in used
                        and marker_name(ds, s.name) not in used for s in ss)]
        pre.extend(DropDataset(zone, ds, tuple(s.guid for s in inv.snaps(ds))) for ds in spare)
        invs[zone] = ZoneInventory(zone,
                                   {d: v for d, v in inv.datasets.items() if d not in spare},
                                   {d: o for d, o in inv.origins.items() if d not in spare})
    a, b = invs[za], invs[zb]
    ctx = _Ctx(a, b, dead, used)
    names = sorted(set(a.datasets) | set(b.datasets))
    dss = [_analyse(ctx, n) for n in names]
    notices: list[Action] = []
    asides: list[Action] = []
    sends: list[Action] = []
    after: list[Action] = []
    post: list[Action] = []
    sources = {s.guid: s for inv in orig.values() for ss in inv.datasets.values() for s in ss}

    # The divergent tails' winner is chosen once per VM, so a VM snapshot's parts
    # stay together: the zone whose tails hold the newest snapshot (CN time, then
    # guid) keeps its line; it is the line the CN went on pushing from.
    div = [d for d in dss if d.state == "diverged"]
    winner = loser = ""
    tag = ""
    if div:
        own_a = [s for d in div for s in d.tail_a if s.guid not in {x.guid for x in d.tail_b}]
        own_b = [s for d in div for s in d.tail_b if s.guid not in {x.guid for x in d.tail_a}]
        best_a = max((s.created, s.guid) for s in own_a)
        best_b = max((s.created, s.guid) for s in own_b)
        winner, loser = (za, zb) if best_a > best_b else (zb, za)
        own_l = own_a if loser == za else own_b
        tag = f"{min((d.tail_a if loser == za else d.tail_b)[0].guid for d in div):016x}"
        # A VM snapshot is moved aside whole or not at all: if one of the loser's
        # VM snapshots in a moved tail also has a part that stays on the main
        # line, its marker cannot follow both; an operator decides.
        moved = {(d.name, s.guid) for d in div for s in (d.tail_a if loser == za else d.tail_b)
                 if s in own_l}
        keys = {marker_name(ds, s.name) for ds, ss in invs[loser].datasets.items() for s in ss
                if (ds, s.guid) in moved}
        split = sorted({marker_name(ds, s.name) for ds, ss in invs[loser].datasets.items()
                        for s in ss if marker_name(ds, s.name) in keys
                        and (ds, s.guid) not in moved})
        taken = sorted(d.name + DIVERGED + tag for d in div
                       if any(d.name + DIVERGED + tag in inv.datasets for inv in orig.values()))
        for d in div if split or taken else ():
            d.state, d.note = "conflict", (f"{ConflictKind.SPLIT.value}: {' '.join(split)}"
                                           if split else
                                           f"{ConflictKind.SIBLING_EXISTS.value}: {taken[0]}")

    def send_chain(ds: str, src: str, dst: str, base: Snap | None, chain: Sequence[Snap],
                   replace_empty: bool, clone_from: str | None, out: list[Action]) -> None:
        if not chain:
            return
        if base is None:
            out.append(SendFull(ds, src, dst, _ref(chain[0]), replace_empty))
            if len(chain) > 1:
                out.append(SendIncremental(ds, src, dst, _ref(chain[0]), _ref(chain[-1]),
                                           True, _refs(chain[1:])))
        else:
            out.append(SendIncremental(ds, src, dst, _ref(base), _ref(chain[-1]), True,
                                       _refs(chain), clone_from))

    def origin_base(src: str, dst: str, ds: str) -> tuple[Snap | None, str | None]:
        o = invs[src].origins.get(ds)
        if o is None:
            return None, None
        have = {s.guid for s in invs[dst].snaps(o.dataset)
                if ctx.unwanted(s) is None or ctx.held(dst, o.dataset, s)}
        src_snap = next((s for s in invs[src].snaps(o.dataset) if s.guid == o.guid), None)
        if o.guid in have and src_snap is not None:
            return src_snap, o.dataset
        return None, None

    vm_parts: list[Aside] = []
    vm_markers: list[str] = []
    for d in dss:
        if d.state == "conflict":
            notices.append(Conflict(d.name, ConflictKind(d.note.split(":")[0]), d.note,
                                    _refs(d.a), _refs(d.b)))
            continue
        if d.state == "defer":
            notices.append(Defer(d.name, d.note))
            continue
        if d.note:
            notices.append(Defer(d.name, d.note))
        base = d.base
        if d.state == "rewind":
            sa = {s.guid for s in d.tail_a}
            lz, wz = (za, zb) if sa <= {s.guid for s in d.tail_b} else (zb, za)
            ltag = f"{(d.tail_a if lz == za else d.tail_b)[0].guid:016x}"
            if any(d.name + DIVERGED + ltag in inv.datasets for inv in orig.values()):
                notices.append(Conflict(d.name, ConflictKind.SIBLING_EXISTS,
                                        f"{d.name}{DIVERGED}{ltag} exists", _refs(d.a),
                                        _refs(d.b)))
                continue
        # destroy first: marker, then parts (as the store deletes)
        for zone, s in d.pre:
            pre.extend(_delete(zone, d.name, s, ctx.unwanted(s) or Reason.DEBRIS))
        if d.state == "send":
            src, dst, chain = (za, zb, d.tail_a) if d.tail_a else (zb, za, d.tail_b)
            clone_from = None
            exists = d.name in invs[dst].datasets
            on_dst_main = {s.guid for ds, ss in invs[dst].datasets.items()
                           if not is_sibling(ds) for s in ss}
            if is_sibling(d.name) and not exists and all(s.guid in on_dst_main for s in chain):
                chain = []  # a rewind's leftover: the peer has it all on its main line
            if base is None and not exists:
                base, clone_from = origin_base(src, dst, d.name)
            send_chain(d.name, src, dst, base, chain, exists and base is None, clone_from,
                       sends)
        elif d.state in ("rewind", "diverged"):
            if d.state == "diverged":
                lz, wz, ltag = loser, winner, tag
            lt, wt = (d.tail_a, d.tail_b) if lz == za else (d.tail_b, d.tail_a)
            into = d.name + DIVERGED + ltag
            wg = {s.guid for s in wt}
            rest = [s for s in lt if s.guid not in wg]
            part = Aside(d.name, _ref(base) if base else None, _refs(lt), into)
            if d.state == "rewind":
                asides.append(PreserveDiverged(lz, ltag, (part,)))
            else:
                vm_parts.append(part)
                vm_markers.extend(marker_name(d.name, s.name) for s in rest if s.complete)
            send_chain(d.name, wz, lz, base, wt, False, None, sends)
            if not rest:
                after.append(DropDataset(lz, into, tuple(s.guid for s in lt)))
            else:
                after.extend(Delete(lz, into, s.name, s.guid, Reason.DUPLICATE)
                             for s in lt if s.guid in wg)
                send_chain(into, lz, wz, base, rest, False, d.name if base else None, after)
                if d.base_dead is not None:
                    notices.append(Defer(d.name, "the common base is deleted but is now the "
                                                 "origin of " + into))
                    d.base_dead = None
        if d.base_dead is not None and base is not None:
            for zone, own in ((za, d.a), (zb, d.b)):
                mine = next(s for s in own if s.guid == base.guid)
                post.extend(_delete(zone, d.name, mine, d.base_dead))
        if is_sibling(d.name) and d.state == "sync":
            # a moved-aside tail whose every snapshot was deleted: drop the empty clone
            for zone, ss in ((za, d.a), (zb, d.b)):
                gone = {s.guid for z, s in d.pre if z == zone}
                if d.base_dead is not None and base is not None:
                    gone.add(base.guid)
                if d.name in invs[zone].datasets and {s.guid for s in ss} <= gone:
                    post.append(DropDataset(zone, d.name, (), Reason.TOMBSTONE))
    if vm_parts:
        asides.insert(0, PreserveDiverged(loser, tag, tuple(vm_parts),
                                          tuple(dict.fromkeys(vm_markers))))

    plan: list[Action] = [*pre, *asides, *sends, *after]
    st = _State.of(*orig.values())
    for act in plan:
        st.apply(act, sources)
    marks = _marks(st, za, zb, dead)
    if not asides and not after and not any(
            isinstance(a, SendIncremental) and a.clone_from for a in sends):
        plan = [*pre, *_by_snapshot(sends, marks)]
        marks = []
    steps = list(dict.fromkeys([*plan, *marks, *post]))  # one marker delete per VM snapshot
    if not steps and not notices:
        return [InSync()]
    return [*notices, *steps]


def _by_snapshot(sends: Sequence[Action], marks: Sequence[MarkComplete]) -> list[Action]:
    """The same transfers one snapshot per step, VM snapshot after VM snapshot,
    each marker copied as soon as its parts are across.

    Sent dataset by dataset, a VM snapshot would be complete on the receiver
    only at the end of the whole plan: if the sender is lost mid-way (the
    only copy during a repair), the receiver keeps parts and no usable
    snapshot. Each dataset's own order is kept (ZFS needs it).
    """
    queues: dict[tuple[str, str, str], list[SendFull | SendIncremental]] = {}
    for act in sends:
        if not isinstance(act, SendFull | SendIncremental):
            raise TypeError(f"not a send: {act!r}")
        q = queues.setdefault((act.dataset, act.from_zone, act.to_zone), [])
        if isinstance(act, SendFull):
            q.append(act)
            continue
        prev = act.base
        for snap in act.snapshots or (act.target,):
            q.append(SendIncremental(act.dataset, act.from_zone, act.to_zone, prev, snap,
                                     True, (snap,)))
            prev = snap
    due: dict[tuple[str, int], int] = {}
    for q in queues.values():
        for a in q:
            due[(a.to_zone, a.target.guid)] = due.get((a.to_zone, a.target.guid), 0) + 1
    out: list[Action] = []
    left = list(marks)

    def ready() -> None:
        for m in list(left):
            if not any(due.get((m.zone, g)) for g in m.guids):
                out.append(m)
                left.remove(m)

    ready()
    while any(queues.values()):
        name = next(q for q in queues.values() if q)[0].target.name
        for q in queues.values():
            if any(a.target.name == name for a in q):
                while q:
                    a = q.pop(0)
                    out.append(a)
                    due[(a.to_zone, a.target.guid)] -= 1
                    if a.target.name == name:
                        break
        ready()
    return [*out, *left]


def _delete(zone: str, ds: str, s: Snap, why: Reason) -> list[Action]:
    out: list[Action] = []
    if s.complete:
        out.append(Delete(zone, None, marker_name(ds, s.name), None, why))
    out.append(Delete(zone, ds, s.name, s.guid, why))
    return out


def _marks(st: _State, za: str, zb: str, dead: set[int]) -> list[MarkComplete]:
    """Copy a peer's marker where this zone now holds all its parts, not all complete."""
    out: list[MarkComplete] = []
    for z, peer in ((za, zb), (zb, za)):
        held, done = st.held(z), st.complete(z)
        for n, guids in sorted(st.markers[peer].items()):
            if n in st.markers[z] or not guids <= held or guids <= done or guids & dead:
                continue
            out.append(MarkComplete(z, peer, n, tuple(sorted(guids))))
    return out


# -- the ack rule (DESIGN.md (a)) ----------------------------------------------


def holds_complete(inv: ZoneInventory, name: str, parts: Mapping[str, int]) -> bool:
    """Whether ``inv``'s zone holds VM snapshot ``name`` complete with exactly ``parts``
    (dataset -> guid): what a ``mirrored`` commit waits for on the peer
    (``Replicator.confirm_mirrored``) before it acks. No parts: never held.
    """
    return bool(parts) and {ds: s.guid for ds, ss in inv.datasets.items() for s in ss
                            if s.name == name and s.complete} == dict(parts)


# -- summaries ----------------------------------------------------------------


def lag(inv_a: ZoneInventory, inv_b: ZoneInventory,
        tombstones: Iterable[Tombstone] = ()) -> tuple[int, int]:
    """How far ``inv_b`` is behind ``inv_a``: (VM snapshots, bytes).

    A VM snapshot counts when it is complete on ``a`` and not complete on ``b``
    with the same guids; bytes are the ``written`` of every dataset snapshot
    of ``a`` whose guid ``b`` lacks. Tombstoned snapshots do not count.
    """
    dead = {t.guid for t in tombstones}
    sa, sb = _State.of(inv_a), _State.of(inv_b)
    za, zb = inv_a.zone, inv_b.zone
    have_b = {s.guid for ss in sb.entries[zb].values() for s in ss}
    done_b = sb.complete(zb)
    behind = sum(1 for g in sa.markers[za].values() if not g & dead and not g <= done_b)
    size = sum(s.written for ss in sa.entries[za].values() for s in ss
               if s.guid not in have_b and s.guid not in dead)
    return behind, size


TOMBSTONE_KEEP_SECONDS = 86400
"""How long a tombstone outlives the last copy of its snapshot in the pair.

Neither zone holding the guid is not enough: a third copy (a move's target,
a zone declared lost that comes back) may still hold it, and would send it
back to a pair that had forgotten it was deleted.
"""


def expired(inv_a: ZoneInventory, inv_b: ZoneInventory, tombstones: Iterable[Tombstone],
            now: float, keep: float = TOMBSTONE_KEEP_SECONDS) -> frozenset[int]:
    """Tombstones that may be forgotten: their guid is on neither zone any
    more and they are at least ``keep`` seconds old."""
    held = {s.guid for inv in (inv_a, inv_b) for ss in inv.datasets.values() for s in ss}
    return frozenset(t.guid for t in tombstones
                     if t.guid not in held and now - t.deleted_at >= keep)


def tombstones_to_adopt(mine: Iterable[Tombstone], theirs: Iterable[Tombstone],
                        holds_vm: bool) -> dict[int, int]:
    """The peer's tombstones this zone keeps too: guid -> the delete's time.

    Those it lacks, with their original time, so a delete is remembered by
    both zones of the pair (a move that drops the zone which took it, or the
    loss of that zone, does not let a third copy bring the snapshot back).
    None where this zone holds nothing of the VM: the VM's container keeps
    them, and there is none.
    """
    if not holds_vm:
        return {}
    have = {t.guid for t in mine}
    return {t.guid: t.deleted_at for t in theirs if t.guid not in have}


# -- parts teed here by the peer (DESIGN.md (e)) -----------------------------


def still_awaited(peer_in_use: Iterable[str], peer_complete: Iterable[str],
                  placed_here: bool | None) -> set[str]:
    """Names of the VM's snapshots whose parts the peer teed here still await a commit.

    Those its listing shows in use (its push is still running), and those it
    holds complete (its commit will mark them here too), unless the VM is no
    longer placed here (``placed_here`` False; None: not asked): the peer,
    told of a move, commits them on the new copy, and held here they would
    block the drop. Parts of any other snapshot belong to a push that died
    there: no commit will come, and held they would defer the VM for minutes.
    """
    busy = set(peer_in_use)
    if placed_here is not False:
        busy |= set(peer_complete)
    return busy
