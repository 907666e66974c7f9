"""Push and resume planning: pure, matched by guid, checked against a model of ZFS.

Histories are written as short strings. CN: ``"a b #c d"`` is snapshots a, b,
d and a bookmark c, oldest first. Zone: ``"a c x"``. The same letter is the
same guid on both sides; a name written ``a'`` is a different guid with the
same name (a snapshot re-created after a rollback, say).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapper_zone.transfer.plan import (
    AbortPartial,
    AlreadyThere,
    BadBase,
    Conflict,
    Diverged,
    Full,
    Incremental,
    NoCommonBase,
    OrderDiffers,
    Plan,
    Reordered,
    Resume,
    TargetDeleted,
    TargetNotFound,
    TokenInfo,
    Version,
    ZoneAhead,
    ZoneSnapshot,
    ZoneVmSnapshot,
    carried_along,
    chain_after,
    common_base,
    find_version,
    plan_push,
    plan_resume,
    push_chain,
)


def guid(name: str) -> int:
    # Stable and distinct per spelling, so "a" and "a'" differ.
    return int.from_bytes(name.encode(), "big") + 1000


def cn(text: str) -> list[Version]:
    out = []
    for txg, word in enumerate(text.split(), start=1):
        if word.startswith("#"):
            out.append(Version(txg, "bookmark", word[1:].rstrip("'"), guid(word[1:])))
        else:
            out.append(Version(txg, "snapshot", word.rstrip("'"), guid(word)))
    return out


def zone(text: str) -> list[ZoneSnapshot]:
    return [ZoneSnapshot(w.rstrip("'"), guid(w)) for w in text.split()]


# -- table tests -----------------------------------------------------------------


def test_first_push_is_full() -> None:
    p = plan_push(cn("a b"), zone(""), "b")
    assert p == Full(cn("a b")[1])


def test_incremental_from_zone_newest() -> None:
    p = plan_push(cn("a b c"), zone("a b"), "c")
    assert isinstance(p, Incremental)
    assert (p.base.name, p.target.name, p.zone_base.name) == ("b", "c", "b")


def test_bookmark_is_a_source() -> None:
    # The CN deleted @b after pushing it and kept #b.
    p = plan_push(cn("#a #b c"), zone("a b"), "c")
    assert isinstance(p, Incremental)
    assert p.base.kind == "bookmark" and p.base.name == "b"


def test_snapshot_preferred_over_its_bookmark() -> None:
    versions = [*cn("a b"), Version(2, "bookmark", "b", guid("b")),
                Version(5, "snapshot", "c", guid("c"))]
    p = plan_push(versions, zone("a b"), "c")
    assert isinstance(p, Incremental) and p.base.kind == "snapshot"


def test_zone_deleted_intermediate_still_incremental() -> None:
    p = plan_push(cn("a b c d"), zone("a c"), "d")
    assert isinstance(p, Incremental) and p.base.name == "c"


def test_matched_by_guid_not_name() -> None:
    # The zone's "b" is another b (different guid): the newest common is a,
    # but the zone's newest is unknown to the CN.
    with pytest.raises(Diverged) as ei:
        plan_push(cn("a b c"), zone("a b'"), "c")
    assert ei.value.common is not None and ei.value.common.name == "a"
    assert [z.name for z in ei.value.zone_only] == ["b"]


def test_no_common_base() -> None:
    with pytest.raises(NoCommonBase) as ei:
        plan_push(cn("a b"), zone("x y"), "b")
    assert len(ei.value.cn) == 2 and len(ei.value.zone) == 2
    assert "CN:" in ei.value.detail() and "@x @y" in ei.value.detail()


def test_zone_ahead() -> None:
    with pytest.raises(ZoneAhead) as ei:
        plan_push(cn("a b c"), zone("a c"), "b")
    assert ei.value.zone_newest.name == "c"


def test_already_there() -> None:
    p = plan_push(cn("a b"), zone("a b"), "b")
    assert isinstance(p, AlreadyThere)
    p = plan_push(cn("a b"), zone("a b"), "a")  # even if not the newest
    assert isinstance(p, AlreadyThere)


def test_target_must_be_a_snapshot() -> None:
    with pytest.raises(TargetNotFound):
        plan_push(cn("a #b"), zone(""), "b")
    with pytest.raises(TargetNotFound):
        plan_push(cn("a"), zone(""), "zz")


def test_explicit_base() -> None:
    p = plan_push(cn("a b c"), zone("a b"), "c", base="b")
    assert isinstance(p, Incremental) and p.base.name == "b"
    with pytest.raises(ZoneAhead):  # the zone's newest is b, not a
        plan_push(cn("a b c"), zone("a b"), "c", base="a")
    with pytest.raises(BadBase):
        plan_push(cn("a b c"), zone("a b"), "c", base="nope")
    with pytest.raises(BadBase):
        plan_push(cn("a b c"), zone("a"), "b", base="c")  # not older
    with pytest.raises(BadBase):
        plan_push(cn("a b c"), zone(""), "c", base="a")  # not on the zone
    with pytest.raises(Diverged):
        plan_push(cn("a b c"), zone("a x"), "c", base="a")


def test_find_version_prefers_snapshot() -> None:
    versions = [Version(1, "bookmark", "a", 7), Version(1, "snapshot", "a", 7)]
    v = find_version(versions, "a")
    assert v is not None and v.is_snapshot
    assert find_version(versions, "b") is None


# -- a model of ZFS receive, and exhaustive properties --------------------------


def accepts(zone_snaps: list[ZoneSnapshot], base: Version | None, target: Version) -> bool:
    """Would ``zfs receive`` (no -F) on the zone take this stream?"""
    if any(z.guid == target.guid for z in zone_snaps):
        return False  # destination already has that snapshot
    if base is None:
        return not zone_snaps
    return bool(zone_snaps) and zone_snaps[-1].guid == base.guid


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Version], list[ZoneSnapshot], str]:
    """A CN history (some snapshots turned into bookmarks or deleted), the zone's
    subset of it in order, maybe with a foreign tail or head, and a target."""
    n = draw(st.integers(1, 7))
    names = [f"s{i}" for i in range(n)]
    fates = draw(st.lists(st.sampled_from(["snap", "snap", "bookmark", "both", "gone"]),
                          min_size=n, max_size=n))
    target_i = draw(st.sampled_from(range(n)))
    fates[target_i] = "snap"
    versions: list[Version] = []
    for i, (name, fate) in enumerate(zip(names, fates, strict=True)):
        if fate in ("snap", "both"):
            versions.append(Version(i + 1, "snapshot", name, i + 1))
        if fate in ("bookmark", "both"):
            versions.append(Version(i + 1, "bookmark", name, i + 1))
    kept = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    zone_snaps = [ZoneSnapshot(name, i + 1) for i, name in enumerate(names) if kept[i]]
    head = draw(st.integers(0, 2))
    tail = draw(st.integers(0, 2))
    foreign = [ZoneSnapshot(f"x{i}", 100 + i) for i in range(head + tail)]
    zone_snaps = foreign[:head] + zone_snaps + foreign[head:]
    return versions, zone_snaps, names[target_i]


@given(scenarios())
def test_plan_is_accepted_iff_some_stream_would_be(
        s: tuple[list[Version], list[ZoneSnapshot], str]) -> None:
    versions, zone_snaps, target = s
    tgt = next(v for v in versions if v.name == target and v.is_snapshot)
    # Every stream the CN could produce: full, or from any older version.
    candidates: list[Version | None] = [None, *(v for v in versions
                                                if v.createtxg < tgt.createtxg)]
    possible = [b for b in candidates if accepts(zone_snaps, b, tgt)]
    there = any(z.guid == tgt.guid for z in zone_snaps)
    try:
        plan: Plan = plan_push(versions, zone_snaps, target)
    except Conflict as c:
        assert not possible and not there, f"{type(c).__name__} but {possible} would work"
        assert c.cn and c.message
        _check_conflict_kind(c, versions, zone_snaps)
        return
    if isinstance(plan, AlreadyThere):
        assert there
    elif isinstance(plan, Full):
        assert not there and accepts(zone_snaps, None, tgt)
    else:
        assert not there and accepts(zone_snaps, plan.base, tgt)
        assert plan.base.createtxg < tgt.createtxg
        assert plan.zone_base.guid == plan.base.guid
        # The newest common version: nothing newer and older than the target works.
        assert all(b is None or b.createtxg <= plan.base.createtxg for b in possible)


def test_push_chain_skips_snapshots_deleted_on_the_zone() -> None:
    versions, z = cn("a b c d"), zone("a")
    plan = plan_push(versions, z, "d")
    assert isinstance(plan, Incremental)
    assert [v.name for v in push_chain(versions, plan)] == ["b", "c", "d"]
    assert [v.name for v in push_chain(versions, plan, {guid("c")})] == ["b", "d"]
    with pytest.raises(TargetDeleted):
        plan_push(versions, z, "d", deleted={guid("d")})


@given(scenarios(), st.data())
def test_push_chain_is_received_stream_by_stream(
        s: tuple[list[Version], list[ZoneSnapshot], str], data: st.DataObject) -> None:
    """Each stream of the chain is one the zone takes after the ones before it;
    it holds every snapshot between base and target except the deleted ones."""
    versions, zone_snaps, target = s
    snaps = [v for v in versions if v.is_snapshot]
    deleted = set(data.draw(st.sets(st.sampled_from([v.guid for v in snaps]))))
    tgt = next(v for v in snaps if v.name == target)
    try:
        plan = plan_push(versions, zone_snaps, target, deleted=deleted)
    except TargetDeleted:
        assert tgt.guid in deleted
        return
    except Conflict:
        return
    assert tgt.guid not in deleted
    if isinstance(plan, AlreadyThere):
        return
    chain = push_chain(versions, plan, deleted)
    assert chain[-1] == tgt and not {v.guid for v in chain} & deleted
    held, base = list(zone_snaps), plan.base if isinstance(plan, Incremental) else None
    for v in chain:
        assert accepts(held, base, v), f"{v} refused after {held}"
        held.append(ZoneSnapshot(v.name, v.guid))
        base = v
    low = plan.base.createtxg if isinstance(plan, Incremental) else 0
    assert {v.guid for v in chain} == {v.guid for v in snaps if low < v.createtxg
                                       <= tgt.createtxg and v.guid not in deleted}


def _check_conflict_kind(c: Conflict, versions: list[Version],
                         zone_snaps: list[ZoneSnapshot]) -> None:
    guids = {v.guid for v in versions}
    common = [z for z in zone_snaps if z.guid in guids]
    if isinstance(c, NoCommonBase):
        assert zone_snaps and not common
    elif isinstance(c, Diverged):
        assert common and zone_snaps[-1].guid not in guids
        assert c.zone_only and all(z.guid not in guids for z in c.zone_only)
        assert c.zone_only[-1] == zone_snaps[-1]
    elif isinstance(c, ZoneAhead):
        assert zone_snaps[-1].guid in guids
    else:
        raise AssertionError(f"unexpected conflict {c!r}")


@given(scenarios(), st.data())
def test_explicit_base_accepted_or_refused(
        s: tuple[list[Version], list[ZoneSnapshot], str], data: st.DataObject) -> None:
    versions, zone_snaps, target = s
    tgt = next(v for v in versions if v.name == target and v.is_snapshot)
    base_name = data.draw(st.sampled_from([v.name for v in versions] + ["nope"]))
    try:
        plan = plan_push(versions, zone_snaps, target, base=base_name)
    except Conflict:
        base = find_version(versions, base_name)
        there = any(z.guid == tgt.guid for z in zone_snaps)
        assert there is False
        assert base is None or base.createtxg >= tgt.createtxg or not accepts(
            zone_snaps, base, tgt)
        return
    if isinstance(plan, Incremental):
        assert plan.base.name == base_name and accepts(zone_snaps, plan.base, tgt)
    else:
        assert isinstance(plan, AlreadyThere)


# -- resume ----------------------------------------------------------------------


def token(to: str, frm: str | None = None, ds: str = "zones/vm") -> TokenInfo:
    return TokenInfo(guid(to), guid(frm) if frm else 0, f"{ds}@{to.rstrip(chr(39))}")


def test_resume_full_and_incremental() -> None:
    assert plan_resume(cn("a b"), token("a")) == Resume(cn("a b")[0], None)
    d = plan_resume(cn("a b"), token("b", "a"), "zones/vm", zone("a"))
    assert isinstance(d, Resume) and d.base is not None and d.base.name == "a"
    d = plan_resume(cn("#a b"), token("b", "a"))
    assert isinstance(d, Resume) and d.base is not None and d.base.kind == "bookmark"


def test_stale_tokens_are_aborted() -> None:
    assert isinstance(plan_resume(cn("a #b"), token("b", "a")), AbortPartial)  # snapshot gone
    assert isinstance(plan_resume(cn("b"), token("b", "a")), AbortPartial)  # base gone
    assert isinstance(plan_resume(cn("a b'"), token("b", "a")), AbortPartial)  # other b
    d = plan_resume(cn("a b"), token("b", "a", ds="other/vm"), "zones/vm")
    assert isinstance(d, AbortPartial) and "other/vm" in d.reason
    assert isinstance(plan_resume(cn("a b"), token("b", "a"), None, zone("a b")), AbortPartial)


def test_a_zone_resumes_only_the_snapshot_it_is_about_to_send() -> None:
    """``want``: the executor's case (a zone pushing one snapshot to its peer)."""
    d = plan_resume(cn("a b c"), token("b", "a"), want=guid("b"))
    assert isinstance(d, Resume) and d.target.name == "b"
    d = plan_resume(cn("a b c"), token("b", "a"), want=guid("c"))
    assert isinstance(d, AbortPartial) and "not of the snapshot to send" in d.reason
    assert isinstance(plan_resume(cn("b c"), token("b", "a"), want=guid("b")), AbortPartial)


@given(scenarios(), st.data())
def test_resume_only_when_send_t_can_work(
        s: tuple[list[Version], list[ZoneSnapshot], str], data: st.DataObject) -> None:
    versions, zone_snaps, _ = s
    pool = sorted({v.guid for v in versions} | {100, 101})
    to = data.draw(st.sampled_from(pool))
    frm = data.draw(st.sampled_from([0, *pool]))
    want = data.draw(st.sampled_from([None, *pool]))
    ds = data.draw(st.sampled_from([None, "zones/vm", "other/vm"]))
    held = data.draw(st.sampled_from([[], zone_snaps]))
    d = plan_resume(versions, TokenInfo(to, frm, f"zones/vm@n{to}"), ds, held, want)
    snaps = {v.guid for v in versions if v.is_snapshot}
    anything = {v.guid for v in versions}
    can = (to in snaps and (frm == 0 or frm in anything) and ds in (None, "zones/vm")
           and want in (None, to) and all(z.guid != to for z in held))
    assert isinstance(d, Resume) == can, d
    if isinstance(d, Resume):
        assert d.target.guid == to and d.target.is_snapshot
        assert (d.base is None) == (frm == 0)
        assert d.base is None or d.base.guid == frm
    else:
        assert d.reason


def test_token_info_from_zfs_output() -> None:
    t = TokenInfo.from_zfs({"toguid": "0x1f", "fromguid": "0x2", "toname": "p/vm@s2",
                            "object": "5"})
    assert t == TokenInfo(31, 2, "p/vm@s2") and t.to_snapshot == "s2"
    assert t.to_dataset == "p/vm"
    assert TokenInfo.from_zfs({"toguid": "12", "toname": "p/vm@s1"}).fromguid == 0
    with pytest.raises(ValueError):
        TokenInfo.from_zfs({"toguid": "12", "toname": "p/vm"})
    with pytest.raises(ValueError):
        TokenInfo.from_zfs({"toname": "p/vm@x"})


# -- what a push carried along -------------------------------------------------------


def vm_zone(spec: list[tuple[str, bool, dict[str, str]]]) -> list[ZoneVmSnapshot]:
    """(name, complete, {label: spelling}): the zone's parts by the spelling's guid."""
    return [ZoneVmSnapshot(n, c, {lb: guid(w) for lb, w in parts.items()})
            for n, c, parts in spec]


def test_carried_along_takes_whole_unfinished_snapshots_below_the_target() -> None:
    two = {"root": cn("a b c d"), "disk0": cn("a b c d")}
    z = vm_zone([("a", True, {"root": "a", "disk0": "a"}),
                 ("b", False, {"root": "b", "disk0": "b"}),      # whole: committed
                 ("c", False, {"root": "c"}),                     # a part missing
                 ("d", False, {"root": "d", "disk0": "d"})])      # the target itself
    assert carried_along(two, z, "d") == ["b"]
    # a part whose guid is not the CN's (another history), or a newer snapshot
    z2 = vm_zone([("b", False, {"root": "b", "disk0": "b'"}),
                  ("e", False, {"root": "e", "disk0": "e"})])
    assert carried_along({"root": cn("a b c e"), "disk0": cn("a b c e")}, z2, "c") == []
    # a snapshot the CN no longer has
    assert carried_along({"root": cn("a c d")}, vm_zone([("b", False, {"root": "b"})]),
                         "d") == []


@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=8),
       st.integers(0, 7))
def test_carried_along_is_only_ever_whole_cn_snapshots_below_the_target(
        flags: list[tuple[bool, bool]], t: int) -> None:
    names = [f"s{i}" for i in range(len(flags))]
    target = names[min(t, len(names) - 1)]
    history = {"root": cn(" ".join(names)), "disk0": cn(" ".join(names))}
    z = vm_zone([(n, done, {"root": n, **({"disk0": n} if both else {})})
                 for n, (done, both) in zip(names, flags, strict=True)])
    got = carried_along(history, z, target)
    below = names[:names.index(target)]
    assert got == [n for n, (done, both) in zip(names, flags, strict=True)
                   if n in below and not done and both]


# -- the shared rules: common_base and chain_after -----------------------------------


@st.composite
def two_histories(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    """Two histories of distinct guids: often a common past then a tail each
    (maybe with gaps), sometimes two unrelated orders of one pool."""
    if draw(st.integers(0, 3)) == 0:
        pool = st.integers(1, 9)
        return (draw(st.lists(pool, unique=True, max_size=7)),
                draw(st.lists(pool, unique=True, max_size=7)))
    past = list(range(1, draw(st.integers(0, 5)) + 1))
    later = draw(st.lists(st.integers(10, 19), unique=True, max_size=6))
    sides = []
    for _ in range(2):
        keep_past = [g for g in past if draw(st.integers(0, 5)) > 0]
        sides.append(keep_past + [g for g in later if draw(st.booleans())])
    return sides[0], sides[1]


@given(two_histories())
def test_common_base_is_the_end_of_the_longest_common_prefix(
        h: tuple[list[int], list[int]]) -> None:
    sender, receiver = h
    shared = set(sender) & set(receiver)
    if [g for g in sender if g in shared] != [g for g in receiver if g in shared]:
        with pytest.raises(OrderDiffers):
            common_base(sender, receiver)
        return
    at = common_base(sender, receiver)
    assert at == common_base(receiver, sender)  # the same whichever side sends
    k = 0 if at is None else at + 1
    assert sender[:k] == receiver[:k]
    assert k == len(sender) or k == len(receiver) or sender[k] != receiver[k]
    # ZFS takes the send from the base once the receiver's tail after it is gone
    # (rule 1), a full stream where there is no base (rule 2).
    rest = receiver[:k]
    base = None if at is None else Version(at + 1, "snapshot", "b", sender[at])
    for g in sender[k:]:
        zs = [ZoneSnapshot(str(x), x) for x in rest]
        assert accepts(zs, base, Version(99, "snapshot", str(g), g))
        rest.append(g)
        base = Version(99, "snapshot", str(g), g)


def test_common_base_tables() -> None:
    assert common_base([], []) is None
    assert common_base([1, 2, 3], []) is None
    assert common_base([1, 2, 3], [1, 2]) == 1
    assert common_base([1, 2, 3], [1, 3]) == 0  # a gap ends the prefix
    assert common_base([1, 2, 3], [1, 2, 4]) == 1
    assert common_base([5, 1], [1]) is None
    with pytest.raises(OrderDiffers):
        common_base([1, 2], [2, 1])


@given(st.lists(st.integers(1, 30), unique=True, max_size=8), st.data())
def test_chain_after_is_what_lies_after_the_base_up_to_the_target(
        guids: list[int], data: st.DataObject) -> None:
    sender = [ZoneSnapshot(f"s{g}", g) for g in guids]
    base = data.draw(st.sampled_from([None, *guids]))
    target = data.draw(st.sampled_from([None, *guids]))
    got = chain_after(sender, base, target)
    lo = -1 if base is None else guids.index(base)
    hi = len(guids) - 1 if target is None else guids.index(target)
    assert got == [s for i, s in enumerate(sender) if lo < i <= hi]
    # received one stream each onto a receiver that ends at the base, every one is taken
    held = sender[:lo + 1]
    prev = None if base is None else Version(1, "snapshot", "b", base)
    for s in got:
        assert accepts(held, prev, Version(2, "snapshot", s.name, s.guid))
        held.append(s)
        prev = Version(2, "snapshot", s.name, s.guid)
    with pytest.raises(ValueError):
        chain_after(sender, 99, None)


def test_chain_after_skips_the_bases_own_snapshot_behind_its_bookmark() -> None:
    # a bookmark sorts before its own snapshot: the chain starts after both
    versions = sorted([*cn("a b c"), Version(2, "bookmark", "b", guid("b"))])
    assert [str(v) for v in chain_after(versions, guid("b"), guid("c"))] == ["@c"]
    assert [str(v) for v in chain_after(versions, None, guid("b"))] == ["@a", "#b", "@b"]


def test_push_with_the_common_snapshots_in_another_order_is_refused() -> None:
    # not a ZFS history: no push is planned on it
    with pytest.raises(Reordered):
        plan_push(cn("a b c"), zone("b a"), "c")
