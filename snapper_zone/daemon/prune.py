"""Retention on the zone: the policy's plan applied to the VMs pushed here.

The zone a CN pushes to prunes (the newest complete snapshot came from a CN,
not from a peer): one zone per VM decides, and its deletes reach the mirror
through tombstones, as an operator's delete does. During a failover both zones
may prune for a while; every delete is still one the rules allow on the zone
making it, so nothing needed goes.

Besides the policy's own guarantees (``policy/retention.py``: never the
newest, an incomplete or a hand-made snapshot), a
snapshot a transfer uses now — a restore, a move's copy, a mirror, a push
built on it — is pinned, and ``Zone.delete_snapshot`` refuses it again under
the same check, so a transfer starting between plan and delete is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from snapper_zone.errors import SnapperError
from snapper_zone.policy import PolicySet, Snap, Verdict, level_of, plan_prune, time_of

if TYPE_CHECKING:
    from snapper_zone.daemon.zone import Zone

__all__ = ["PrunePlan", "Pruner"]

log = logging.getLogger("snapper.prune")


@dataclass(frozen=True)
class PrunePlan:
    vm: str
    policy: str | None  # None: no policy names this VM (nothing is deleted)
    pruner: bool  # this zone is the one that prunes the VM
    verdicts: tuple[Verdict, ...]
    deleted: tuple[str, ...] = ()
    failed: Mapping[str, str] | None = None  # name -> why the delete did not happen

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "policy": self.policy, "pruner": self.pruner,
                "keep": [{"name": v.name, "reason": v.reason} for v in self.verdicts if v.keep],
                "delete": [{"name": v.name, "reason": v.reason}
                           for v in self.verdicts if not v.keep],
                "deleted": list(self.deleted), "failed": dict(self.failed or {})}


class Pruner:
    def __init__(self, zone: Zone, policies: PolicySet, interval: float,
                 source: Callable[[], Awaitable[PolicySet]] | None = None) -> None:
        self.zone = zone
        self.policies = policies
        # The coordinator's copy, asked again before each pass over every VM (the
        # last verified one while it does not answer); None: ``policies`` (a file).
        self.source = source
        self.interval = interval
        self.passes = 0
        self._wake = asyncio.Event()

    async def plan(self, vm: str) -> PrunePlan:
        snaps = await self.zone.store.snapshots(vm)
        complete = [s for s in snaps if s.complete]
        newest = max(complete, key=lambda s: (s.created, s.name), default=None)
        pruner = newest is not None and (newest.source or "").startswith("cn:")
        tags: dict[str, str] = {}
        if newest is not None:
            meta = await self.zone.store.metadata(vm, newest.name)
            raw = (meta or {}).get("tags")
            if isinstance(raw, dict):
                tags = {str(k): str(v) for k, v in raw.items()}
        policy = self.policies.for_vm(vm, self.zone.owner_of(vm), tags)
        if policy is None:
            keep = tuple(Verdict(s.name, True, "no policy names this VM") for s in snaps)
            return PrunePlan(vm, None, pruner, keep)
        pinned = {n: "a transfer uses it now" for n in self.zone.transfers.in_use(vm)}
        # A policy snapshot counts from its scheduled time (in its name), not from
        # when a late or retried push happened to take it.
        view = [Snap(s.name, time_of(s.name) or float(s.created), s.complete, level_of(s.name))
                for s in snaps]
        verdicts = plan_prune(view, policy.retention, pinned=pinned)
        return PrunePlan(vm, policy.name, pruner, tuple(verdicts))

    async def prune(self, vm: str, *, dry_run: bool, force: bool = False) -> PrunePlan:
        """Plan, and unless ``dry_run`` delete what the plan lets go — if this zone
        is the VM's pruner (``force``: an operator asked this zone anyway)."""
        plan = await self.plan(vm)
        if dry_run or plan.policy is None or not (plan.pruner or force):
            return plan
        deleted, failed = [], {}
        for v in plan.verdicts:
            if v.keep:
                continue
            try:
                await self.zone.delete_snapshot(vm, v.name)
            except SnapperError as e:  # in use since the plan, or gone: the next pass
                failed[v.name] = e.message
                continue
            deleted.append(v.name)
            log.info("pruned snapshot", extra={"vm": vm, "snapshot": v.name,
                                               "policy": plan.policy, "reason": v.reason})
        return PrunePlan(vm, plan.policy, plan.pruner, plan.verdicts, tuple(deleted), failed)

    async def refresh(self) -> None:
        if self.source is None:
            return
        try:
            self.policies = await self.source()
        except SnapperError as e:  # the policy held stays in force (none: nothing goes)
            log.warning("cannot refresh the retention policy; keeping the one held",
                        extra={"err_code": e.code, "err_msg": e.message})

    async def prune_all(self, *, dry_run: bool) -> list[PrunePlan]:
        await self.refresh()
        out = []
        for vm in await self.zone.store.vms():
            out.append(await self.prune(vm, dry_run=dry_run))
        return out

    def kick(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Prune every ``interval`` seconds (or when kicked); a failing pass is logged
        and the next one tries again."""
        while True:
            started = time.monotonic()
            try:
                plans = await self.prune_all(dry_run=False)
                n = sum(len(p.deleted) for p in plans)
                if n:
                    log.info("retention pass", extra={"deleted": n, "vms": len(plans)})
            except SnapperError as e:
                log.warning("retention pass failed", extra={"err_msg": e.message})
            self.passes += 1
            self._wake.clear()
            left = self.interval - (time.monotonic() - started)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(left, 0.0)):
                    await self._wake.wait()
