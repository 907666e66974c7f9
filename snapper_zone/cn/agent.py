"""``snapper agent``: the CN runs its VMs' policies — snapshots on schedule,
pushed as ``snapper push`` does, the CN side kept small.

One pass (``Agent.tick``) looks at every VM on this CN: the policy that names
it (``policy/spec.py``), the levels due since their last run (from the state
file), and pushes one snapshot named for the first due level at its scheduled
time; a finer level whose own tick came after that time is still due, and
the next pass (at once) takes it. A push that fails is retried with
exponential backoff under the *same* name, which the CN client finishes where
it stopped; only a successful push records the run, so a restart misses
nothing and repeats nothing. VMs are pushed one at a time: two pushes of one
VM never overlap (and the zone's VM lock would serialise a manual ``snapper
push`` too).

After a push the CN keeps, of the snapshots the policy made, only what the
next push needs: the one just pushed (the next is sent from it); the rest are
destroyed locally once the zone holds them complete (where ZFS has bookmarks
the client also keeps ``#snapper-<snap>``).
Snapshots the policy did not make are never touched.

The I/O is the ``Pusher``'s (the CLI builds it on the CN client, with the same
zone failover as ``snapper push``); this module decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from snapper_zone.common.bootstrap import write_atomically
from snapper_zone.common.tasks import cancel_and_wait
from snapper_zone.errors import SnapperError
from snapper_zone.policy import PolicySet, Snap, level_of, snapshot_name, time_of

__all__ = ["Agent", "AgentState", "Outcome", "Pusher", "VmState"]

log = logging.getLogger("snapper.agent")
STATE_VERSION = 1


class Pusher(Protocol):
    async def local_vms(self) -> list[str]: ...

    async def tags(self, vm: str) -> dict[str, str]: ...

    async def local_snapshots(self, vm: str) -> list[str]:
        """Names of the VM's snapshots on this CN."""
        ...

    async def zone_snapshots(self, vm: str) -> list[Snap]:
        """The VM's snapshots on its zone (complete or not)."""
        ...

    async def push(self, vm: str, name: str, base: str | None, durability: str,
                   bwlimit: float | None = None) -> Any:
        """``bwlimit``: the policy's bytes/s (the CN's own cap, if lower, still holds)."""
        ...

    async def destroy_local(self, vm: str, names: Sequence[str]) -> None: ...


@dataclass
class VmState:
    last: dict[str, float] = field(default_factory=dict)  # level -> when it last ran
    failures: int = 0
    retry_at: float = 0.0
    last_error: str | None = None
    pending: str | None = None  # the snapshot a failed push will be retried as

    def to_json(self) -> dict[str, Any]:
        return {"last": self.last, "failures": self.failures, "retry_at": self.retry_at,
                "last_error": self.last_error, "pending": self.pending}

    @classmethod
    def from_json(cls, v: Any) -> VmState:
        return cls({str(k): float(t) for k, t in dict(v.get("last") or {}).items()},
                   int(v.get("failures") or 0), float(v.get("retry_at") or 0.0),
                   v.get("last_error"), v.get("pending"))


@dataclass
class AgentState:
    """What the agent has done, per VM, in one JSON file written atomically."""

    path: Path | None
    vms: dict[str, VmState] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None) -> AgentState:
        if path is None or not path.exists():
            return cls(path)
        try:
            doc = json.loads(path.read_text())
            if doc.get("version") != STATE_VERSION:
                raise ValueError(f"state version {doc.get('version')!r}")
            return cls(path, {vm: VmState.from_json(v) for vm, v in doc["vms"].items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise SnapperError(f"agent state {path} cannot be read ({e}); move it aside to "
                               "start afresh (every level then runs once now)") from e

    def vm(self, vm: str) -> VmState:
        return self.vms.setdefault(vm, VmState())

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"version": STATE_VERSION, "vms": {k: v.to_json() for k, v in self.vms.items()}}
        write_atomically(self.path, json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n",
                         mode=0o600)


@dataclass(frozen=True)
class Outcome:
    vm: str
    level: str
    snapshot: str
    base: str | None
    ok: bool
    error: str | None = None
    trimmed: tuple[str, ...] = ()
    bytes: int = 0  # sent, all datasets
    # On the agent's clock: when the push began and when the pass was done with
    # the VM (trim included); after a failure, when it is tried again. What an
    # outside judge (the soak) needs to tell a missed tick from a busy agent.
    started: float = 0.0
    ended: float = 0.0
    retry_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "level": self.level, "snapshot": self.snapshot,
                "base": self.base, "ok": self.ok, "error": self.error,
                "trimmed": list(self.trimmed), "bytes": self.bytes, "started": self.started,
                "ended": self.ended, "retry_at": self.retry_at}


class Agent:
    def __init__(self, policies: PolicySet, pusher: Pusher, state: AgentState, *,
                 cn_id: str | None = None, clock: Callable[[], float] = time.time,
                 backoff: tuple[float, float] = (30.0, 3600.0),
                 report: Callable[[Outcome], None] | None = None,
                 speed: float = 1.0,
                 source: Callable[[], Awaitable[PolicySet]] | None = None) -> None:
        self.policies = policies
        self.pusher = pusher
        self.state = state
        self.cn_id = cn_id
        self.clock = clock
        self.backoff = backoff
        self.report = report  # each outcome as it happens (the CLI prints it)
        # ``clock`` runs this many times faster than real time (a compressed clock
        # for tests and the soak): the waits between passes shrink with it.
        self.speed = speed
        # Where the policies come from anew before each pass (the coordinator's
        # registry, with the CN's last verified copy while it does not answer);
        # None: ``policies`` as given (a file).
        self.source = source
        self.wake = asyncio.Event()  # set to run a pass now (tests, SIGHUP)

    async def tick(self) -> list[Outcome]:
        """One pass over this CN's VMs: push what is due, trim what is not needed."""
        if self.source is not None:
            try:
                self.policies = await self.source()
            except SnapperError as e:  # keep the policies held: the schedule goes on
                log.warning("agent: cannot refresh the policy; keeping the one held",
                            extra={"err_code": e.code, "err_msg": e.message})
        out = []
        for vm in await self.pusher.local_vms():
            try:
                got = await self._one(vm)
            except SnapperError as e:  # listing the VM failed: next pass
                log.warning("agent: cannot look at VM", extra={"vm": vm, "err_msg": e.message})
                continue
            if got is not None:
                out.append(got)
                if self.report is not None:
                    self.report(got)
        return out

    async def _one(self, vm: str) -> Outcome | None:
        now = self.clock()
        policy = self.policies.for_vm(vm, self.cn_id, await self.pusher.tags(vm))
        if policy is None:
            return None
        st = self.state.vm(vm)
        if now < st.retry_at:
            return None
        due = policy.due(st.last, now)
        if not due:
            return None
        level = due[0]
        # A retry pushes the snapshot it already took (the client finishes it).
        retry = st.pending
        name = retry or snapshot_name(level.name, level.schedule.last_at_or_before(now))
        base_name = None
        try:
            # From the zone's newest snapshot: the only one a live pool receives on.
            report = await self.pusher.push(vm, name, None, policy.durability,
                                            policy.bwlimit)
            base = next((str(d.base) for d in getattr(report, "datasets", ()) if d.base), None)
            # "pool/vm@snap" or "pool/vm#bookmark": the name is what the VM's snapshots share
            base_name = base.replace("#", "@").rpartition("@")[2] if base else None
        except SnapperError as e:
            st.failures += 1
            lo, hi = self.backoff
            st.retry_at = now + min(hi, lo * 2 ** (st.failures - 1))
            st.last_error = f"{e.code}: {e.message}"
            st.pending = name if name in await self._local(vm) else None
            self.state.save()
            log.warning("agent: push failed; will retry", extra={
                "vm": vm, "snapshot": name, "err_code": e.code, "err_msg": e.message,
                "failures": st.failures, "retry_in": st.retry_at - now})
            return Outcome(vm, level_of(name) or level.name, name, base_name, False,
                           st.last_error,
                           started=now, ended=self.clock(), retry_at=st.retry_at)
        # The snapshot serves every level due up to its own scheduled time. A tick
        # after it (a retry's snapshot is from an earlier tick; after an outage
        # the coarse level's last tick can be older than the fine one's) is still
        # due, and the next pass, at once, takes it: the one catch-up per level.
        ran = time_of(name) or now
        for lv in due:
            st.last[lv.name] = max(st.last.get(lv.name, ran), ran)
        st.failures, st.retry_at, st.last_error, st.pending = 0, 0.0, None, None
        self.state.save()
        log.info("agent: pushed", extra={"vm": vm, "snapshot": name, "base": base_name,
                                         "levels": [lv.name for lv in due]})
        trimmed = await self._trim(vm, name)
        return Outcome(vm, level_of(name) or level.name, name, base_name, True, trimmed=trimmed,
                       bytes=int(getattr(report, "bytes", 0)), started=now, ended=self.clock())

    async def _local(self, vm: str) -> set[str]:
        with contextlib.suppress(SnapperError):
            return set(await self.pusher.local_snapshots(vm))
        return set()

    async def _trim(self, vm: str, pushed: str) -> tuple[str, ...]:
        """Destroy local policy snapshots the next pushes do not need (best effort)."""
        try:
            local = await self.pusher.local_snapshots(vm)
            on_zone = {s.name for s in await self.pusher.zone_snapshots(vm) if s.complete}
        except SnapperError as e:
            log.warning("agent: cannot trim", extra={"vm": vm, "err_msg": e.message})
            return ()
        drop = [n for n in local if level_of(n) is not None and n != pushed and n in on_zone]
        if drop:
            try:
                await self.pusher.destroy_local(vm, drop)
            except SnapperError as e:
                log.warning("agent: cannot trim", extra={"vm": vm, "err_msg": e.message})
                return ()
        return tuple(drop)

    def next_wake(self, now: float) -> float:
        """When the next pass is worth running: the next scheduled run of any policy,
        or the earliest retry."""
        times = [p.next_run(now) for p in self.policies.policies]
        times += [s.retry_at for s in self.state.vms.values() if s.retry_at > now]
        return min(times)

    async def run(self, stop: asyncio.Event) -> None:
        """Passes until ``stop`` is set; between them, wait for the next due time."""
        while not stop.is_set():
            done = await self.tick()
            self.wake.clear()
            if any(o.ok for o in done):
                # A push takes time: a run that fell due meanwhile is taken now,
                # not skipped until the next scheduled time.
                continue
            delay = max(self.next_wake(self.clock()) - self.clock(), 0.0) / self.speed
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.wake.wait())]
            try:
                await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            finally:
                await cancel_and_wait(*waits)
