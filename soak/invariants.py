"""What "nothing lost" means after a soak, judged over recorded data.

The ``check_*`` functions are pure (records and a snapshot of the zones'
holdings in, problems out), so they are tested without a fleet. ``parse_inventory``
and ``rss_kib`` are the only bits that look at the outside world's shapes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapper_zone.policy import level_of, time_of
from soak.records import (
    AgentRun,
    DeleteRecord,
    FaultRecord,
    Holdings,
    PartialState,
    PushRecord,
    RestoreRecord,
    RssSample,
)

# A daemon may grow by this much over a run (caches, asyncio buffers, imported
# modules warming up) before it counts as a leak.
RSS_GROWTH_FRACTION = 0.5
RSS_GROWTH_KIB = 64 << 10


@dataclass
class Check:
    name: str
    ok: bool
    detail: list[str] = field(default_factory=list)  # the problems, at most a few dozen
    checked: int = 0  # how many things were looked at

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "checked": self.checked,
                "detail": self.detail[:40]}


def _check(name: str, problems: list[str], checked: int) -> Check:
    return Check(name, not problems, problems, checked)


Key = tuple[str, str]  # (vm, snapshot)


def stored(pushes: Iterable[PushRecord], deletes: Iterable[DeleteRecord]) -> dict[Key, PushRecord]:
    """Every snapshot a push reported as stored and nobody tried to delete since."""
    out = {(p.vm, p.snapshot): p for p in pushes if p.acked}
    for d in deletes:
        out.pop((d.vm, d.snapshot), None)  # a failed delete may still have half-happened
    return out


def excused(rec: PushRecord, losses: Mapping[str, float]) -> bool:
    """A local ack whose only copies were on a zone destroyed after it: lost by
    definition of ``local`` (one copy until the mirror catches up)."""
    return rec.durability == "local" and bool(rec.zones) and all(
        z in losses and rec.t <= losses[z] for z in rec.zones)


def copies_problems(acked: Mapping[Key, PushRecord], holdings: Holdings, *, exact: bool,
                    static_pairs: bool, losses: Mapping[str, float] | None = None
                    ) -> list[str]:
    """Each acked snapshot on two zones with the CN's guids (``exact``: on exactly two).

    ``static_pairs``: nothing moves copies, so the zones the ack named must be
    among the holders too.
    """
    out = []
    for (vm, snap), rec in sorted(acked.items()):
        if losses and excused(rec, losses):
            continue
        copies = holdings.get(vm, {})
        holders = sorted(z for z, snaps in copies.items() if snap in snaps)
        good = [z for z in holders if copies[z][snap] == rec.guids]
        for z in holders:
            if z not in good:
                out.append(f"{vm[:8]}@{snap} on {z[:8]}: guids {copies[z][snap]} "
                           f"!= the CN's {rec.guids}")
        if len(good) != 2 if exact else len(good) < 2:
            out.append(f"{vm[:8]}@{snap} ({rec.durability}) on {len(good)} zones: "
                       f"{[z[:8] for z in good]}")
        if static_pairs:
            for z in rec.zones:
                if z not in good:
                    out.append(f"{vm[:8]}@{snap}: the ack named {z[:8]}, which lacks it")
    return out


def check_copies(acked: Mapping[Key, PushRecord], holdings: Holdings, *, static_pairs: bool,
                 losses: Mapping[str, float]) -> Check:
    return _check("acked snapshots on exactly two zones, guids as on the CN",
                  copies_problems(acked, holdings, exact=True, static_pairs=static_pairs,
                                  losses=losses), len(acked))


def check_excused(acked: Mapping[Key, PushRecord], holdings: Holdings,
                  losses: Mapping[str, float]) -> Check:
    """Not a failure: listed so a reader sees what a zone loss took with it."""
    gone = [f"{vm[:8]}@{snap}" for (vm, snap), r in sorted(acked.items())
            if excused(r, losses) and not any(snap in s for s in holdings.get(vm, {}).values())]
    return Check("local acks lost with their only zone (allowed, listed)", True, gone,
                 len(gone))


def ack_seen(held: Mapping[str, int] | None, guids: Mapping[str, int]) -> str:
    """What a zone named by an ack held of the snapshot right after it: "ok", or why not."""
    if held is None:
        return "missing or incomplete"
    if dict(held) == dict(guids):
        return "ok"
    lacking = sorted(set(guids) - set(held))
    differ = sorted(d for d in guids if d in held and held[d] != guids[d])
    return "guid-mismatch: " + ", ".join(
        [f"{d} lacking" for d in lacking] + [f"{d} {held[d]} != {guids[d]}" for d in differ])


def check_acks(pushes: Sequence[PushRecord]) -> Check:
    """At the ack, every zone the ack named held the snapshot complete, guid-equal;
    a mirrored ack names two zones (invariant 1 of the design)."""
    out = []
    acked = [p for p in pushes if p.acked]
    for p in acked:
        if p.durability == "mirrored" and len(set(p.zones)) != 2:
            out.append(f"{p.vm[:8]}@{p.snapshot}: mirrored ack names {len(p.zones)} zones")
        for z, seen in sorted(p.ack_check.items()):
            if seen not in ("ok", "unreachable") and not seen.startswith("moved: "):
                out.append(f"{p.vm[:8]}@{p.snapshot} ({p.durability}) on {z[:8]} at ack: {seen}")
    return _check("every ack true when given (zones named hold it complete)", out, len(acked))


def check_deletes(deletes: Sequence[DeleteRecord], holdings: Holdings) -> Check:
    out = []
    done = [d for d in deletes if d.ok]
    for d in done:
        back = sorted(z[:8] for z, snaps in holdings.get(d.vm, {}).items() if d.snapshot in snaps)
        if back:
            out.append(f"{d.vm[:8]}@{d.snapshot} deleted at {d.t:.1f}s, still on {back}")
    return _check("deleted snapshots stay deleted", out, len(done))


def check_partial(partial: Mapping[str, Mapping[str, PartialState]], settled_at: float) -> Check:
    """No resume token left; no incomplete snapshot created before the fleet settled."""
    out = []
    n = 0
    for vm, zones in sorted(partial.items()):
        for z, st in sorted(zones.items()):
            n += 1
            if st.resume_tokens:
                out.append(f"{vm[:8]} on {z[:8]}: resume token on {st.resume_tokens}")
            for name, created in st.incomplete:
                if created < settled_at:
                    out.append(f"{vm[:8]}@{name} on {z[:8]}: incomplete")
    return _check("no partial receive state left", out, n)


def check_restores(restores: Sequence[RestoreRecord]) -> Check:
    """Every restore that finished gave the bytes pushed; the after-settle sample
    must all finish (one during a fault may fail: its zone is down)."""
    out = []
    for r in restores:
        if r.ok and r.identical is not True:
            out.append(f"{r.vm[:8]}@{r.snapshot} from {r.zone[:8]} differs")
        elif r.final and not r.ok:
            out.append(f"{r.vm[:8]}@{r.snapshot} from {r.zone[:8]} failed: {r.error[:120]}")
    finals = [r for r in restores if r.final]
    if not finals:
        out.append("no restore in the after-settle sample")
    return _check("restores byte-identical", out, len(restores))


def check_rss(before: Sequence[RssSample], after: Sequence[RssSample]) -> Check:
    """Per daemon (by name; a restarted one is its new process): after <= before *
    (1 + RSS_GROWTH_FRACTION) + RSS_GROWTH_KIB."""
    out = []
    first = {s.name: s for s in before}
    for s in after:
        b = first.get(s.name)
        if b is None:
            continue
        bound = int(b.kib * (1 + RSS_GROWTH_FRACTION)) + RSS_GROWTH_KIB
        if s.kib > bound:
            out.append(f"{s.name}: {b.kib} KiB -> {s.kib} KiB (bound {bound} KiB)")
    return _check(f"daemon RSS growth within +{int(RSS_GROWTH_FRACTION * 100)}% "
                  f"+ {RSS_GROWTH_KIB >> 10} MiB", out, len(after))


def check_faults(faults: Sequence[FaultRecord], *, min_faults: int, min_kinds: int) -> Check:
    out = [f"{f.kind} on {f.target or '-'} at {f.started:.1f}s: {f.error}"
           for f in faults if f.error]
    kinds = {f.kind for f in faults if not f.error}
    if len(faults) < min_faults or len(kinds) < min_kinds:
        out.append(f"{len(faults)} faults of {len(kinds)} kinds injected; "
                   f"wanted >= {min_faults} of >= {min_kinds}")
    return _check("faults injected, and the fleet back to two copies after each loss",
                  out, len(faults))


def check_all(*, pushes: Sequence[PushRecord], deletes: Sequence[DeleteRecord],
              restores: Sequence[RestoreRecord], faults: Sequence[FaultRecord],
              holdings: Holdings, partial: Mapping[str, Mapping[str, PartialState]],
              settled_at: float, rss_before: Sequence[RssSample],
              rss_after: Sequence[RssSample], losses: Mapping[str, float],
              static_pairs: bool, min_faults: int = 0, min_kinds: int = 0) -> list[Check]:
    acked = stored(pushes, deletes)
    return [
        check_acks(pushes),
        check_copies(acked, holdings, static_pairs=static_pairs, losses=losses),
        check_excused(acked, holdings, losses),
        check_deletes(deletes, holdings),
        check_partial(partial, settled_at),
        check_restores(restores),
        check_rss(rss_before, rss_after),
        check_faults(faults, min_faults=min_faults, min_kinds=min_kinds),
    ]


# -- reading the outside world ------------------------------------------------------


def parse_inventory(doc: Mapping[str, Any]) -> tuple[dict[str, dict[str, int]], PartialState]:
    """A zone's ``snapshots VM`` answer -> (complete snapshots' guids, partial state)."""
    complete: dict[str, dict[str, int]] = {}
    st = PartialState()
    for s in doc.get("snapshots") or []:
        guids = {d: int(p["guid"]) for d, p in (s.get("datasets") or {}).items()}
        if s.get("complete"):
            complete[str(s["name"])] = guids
        else:
            st.incomplete.append((str(s["name"]), int(s.get("created") or 0)))
    for label, d in sorted((doc.get("datasets") or {}).items()):
        if isinstance(d, Mapping) and d.get("resume_token"):
            st.resume_tokens.append(label)
    return complete, st


def rss_kib(pid: int) -> int | None:
    """VmRSS of a live process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


# -- the policy agents -----------------------------------------------------------------


@dataclass(frozen=True)
class AgentClock:
    """The agents' compressed clock and schedule: two levels, ``coarse`` every
    ``2 * every`` and ``fine`` every ``every`` seconds of agent time."""

    origin: float  # wall clock where agent time agrees with it
    speed: float  # agent seconds per wall second
    every: float  # the fine level's interval, agent seconds
    coarse: str = "slow"
    fine: str = "fast"

    def at(self, wall: float) -> float:
        return self.origin + (wall - self.origin) * self.speed


def _covered(windows: Sequence[tuple[float, float]], lo: float, hi: float) -> float:
    """The longest stretch of [lo, hi) that no window covers."""
    gap, at = 0.0, lo
    for a, b in sorted(windows):
        if b <= a or b <= at or a >= hi:  # empty, or outside what is left
            continue
        gap = max(gap, min(a, hi) - at)
        at = max(at, b)
        if at >= hi:
            return gap
    return max(gap, hi - at)


def agent_copies_problems(vms: Iterable[str], holdings: Holdings) -> list[str]:
    """Each snapshot of an agent's VM on exactly two zones with equal guids."""
    out = []
    for vm in sorted(vms):
        copies = holdings.get(vm, {})
        for n in sorted({s for snaps in copies.values() for s in snaps}):
            held = [snaps[n] for snaps in copies.values() if n in snaps]
            if len(held) != 2 or held[0] != held[1]:
                out.append(f"{vm[:8]}@{n}: {len(held)} copies"
                           + (", guids differ" if len(held) == 2 else ""))
    return out


def check_agents(runs: Sequence[AgentRun], holdings: Holdings, clock: AgentClock, *,
                 pairs: Mapping[str, Sequence[str]] | None = None,
                 slack: float | None = None) -> Check:
    """For each VM an agent ran, what the zones hold is exactly its schedule.

    - every snapshot is a policy snapshot at a tick of its level, of the coarse
      level where both are due, and no two are for one scheduled time (doubled);
    - none was pushed twice (an ok outcome repeated after a restart);
    - each is on two zones (``pairs``: the VM's static pair) with equal guids,
      and every ok outcome's snapshot is among them;
    - each was pushed by an ok outcome, or taken before a SIGKILL by the run
      killed (its push carried by the next one, as a CN's unsent snapshots are);
    - no fine tick was missed: a tick ``t`` may be absent only if no stretch of
      ``[t, t + every)`` longer than ``slack`` found the agent idle — it was
      down (killed, or not yet started), pushing, or backing off after a failure.
      That is the documented catch-up: several runs due during one outage or one
      long push are caught up with one snapshot per level (a finer level's
      when its last tick came after the coarse one's).
    """
    slack = clock.every / 2 if slack is None else slack
    out: list[str] = []
    checked = 0
    by_vm: dict[str, list[AgentRun]] = {}
    for r in runs:
        by_vm.setdefault(r.vm, []).append(r)
    for vm, vruns in sorted(by_vm.items()):
        vruns = sorted(vruns, key=lambda r: r.started)
        copies = holdings.get(vm, {})
        names = sorted({s for snaps in copies.values() for s in snaps})
        checked += len(names)
        oks = [o for r in vruns for o in r.outcomes if o.get("ok")]
        pushed = [str(o["snapshot"]) for o in oks]
        for n in sorted({n for n in pushed if pushed.count(n) > 1}):
            out.append(f"{vm[:8]}: {n} pushed {pushed.count(n)} times")
        times: dict[float, str] = {}
        for n in names:
            level, t = level_of(n), time_of(n)
            if level is None or t is None:
                out.append(f"{vm[:8]}: {n} is not a policy snapshot")
                continue
            step = 2 * clock.every if level == clock.coarse else clock.every
            if level not in (clock.coarse, clock.fine) or t % step:
                out.append(f"{vm[:8]}: {n} is not at a tick of its level")
            elif level == clock.fine and t % (2 * clock.every) == 0:
                out.append(f"{vm[:8]}: {n} should be {clock.coarse} (both were due)")
            if t in times:
                out.append(f"{vm[:8]}: {times[t]} and {n}: doubled (one scheduled time)")
            times[t] = n
            holders = sorted(z for z, snaps in copies.items() if n in snaps)
            if len(holders) != 2 or copies[holders[0]][n] != copies[holders[-1]][n]:
                out.append(f"{vm[:8]}@{n} on {[z[:8] for z in holders]}: not two copies "
                           "with equal guids")
            elif pairs is not None and vm in pairs and set(holders) != set(pairs[vm]):
                out.append(f"{vm[:8]}@{n} on {[z[:8] for z in holders]}, not its pair")
            if n not in pushed and not any(
                    r.killed and r.ended is not None and clock.at(r.started) - 2 * step
                    <= t <= clock.at(r.ended) for r in vruns):
                out.append(f"{vm[:8]}: {n} held, but no agent pushed it or was killed "
                           "while it was due")
        for n in sorted(set(pushed) - set(names)):
            out.append(f"{vm[:8]}: {n} pushed (ok) but not on the zones")
        # When the agent could not have taken a tick: dead, starting, busy, backing off.
        windows: list[tuple[float, float]] = []
        prev_end: float | None = None
        for r in vruns:
            start = clock.at(r.started)
            if prev_end is not None:
                windows.append((prev_end, start))
            first = min((float(o["started"]) for o in r.outcomes), default=None)
            ready = start + 10 * clock.speed  # a start takes a few seconds at most
            windows.append((start, min(first, ready) if first is not None else ready))
            for o in r.outcomes:
                windows.append((float(o["started"]), float(o["ended"])))
                if not o.get("ok") and o.get("retry_at") is not None:
                    windows.append((float(o["started"]), float(o["retry_at"])))
            prev_end = clock.at(r.ended) if r.ended is not None else None
        if not oks and not names:
            out.append(f"{vm[:8]}: the agent pushed nothing")
            continue
        first_t = min(float(o["started"]) for r in vruns for o in r.outcomes)
        last_t = max((clock.at(r.ended) for r in vruns if r.ended is not None),
                     default=first_t)
        t = (first_t // clock.every + 1) * clock.every
        while t + clock.every <= last_t:
            if t not in times:
                idle = _covered(windows, t, t + clock.every)
                if idle > slack:
                    out.append(f"{vm[:8]}: the tick at agent time {t:.0f} missed: the agent "
                               f"was idle {idle:.0f}s of the {clock.every:.0f}s after it")
            t += clock.every
    return _check("policy agents: each VM holds its schedule's ticks, none missed or "
                  "doubled, on two zones by guid", out, checked)
