"""The agent's choices alone: which snapshot each pass takes, from the schedule
and the state, with an in-memory pusher (no ZFS, no zone) and the test's clock.
What the pushes do on real ZFS is tests/test_agent.py's."""

from __future__ import annotations

import calendar
from collections.abc import Sequence
from typing import Any

from snapper_zone.cn.agent import Agent, AgentState
from snapper_zone.policy import Snap, parse_policies

VM = "74c59c61-4559-4ca2-b1ef-0ca22f2f936a"
T0 = float(calendar.timegm((2026, 12, 2, 8, 20, 0)))  # a slow (2m) and a fast (1m) tick
POLICIES = parse_policies({"policy": [{
    "name": "p", "vms": ["*"], "durability": "local", "retention": {"keep": {"slow": 9}},
    "level": [{"name": "slow", "every": "2m"}, {"name": "fast", "every": "1m"}]}]})


class Pushes:
    """A CN whose pushes always work; it remembers what it was asked to push."""

    def __init__(self) -> None:
        self.pushed: list[str] = []

    async def local_vms(self) -> list[str]:
        return [VM]

    async def tags(self, vm: str) -> dict[str, str]:
        return {}

    async def local_snapshots(self, vm: str) -> list[str]:
        return list(self.pushed)

    async def zone_snapshots(self, vm: str) -> list[Snap]:
        return []

    async def push(self, vm: str, name: str, base: str | None, durability: str,
                   bwlimit: float | None = None) -> Any:
        self.pushed.append(name)
        return None

    async def destroy_local(self, vm: str, names: Sequence[str]) -> None:
        return None


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def _passes(agent: Agent) -> list[str]:
    """Passes until nothing is due (what ``run`` does before it sleeps)."""
    names: list[str] = []
    while done := await agent.tick():
        names += [o.snapshot for o in done if o.ok]
    return names


async def test_a_fine_tick_after_the_coarse_one_gets_its_own_snapshot() -> None:
    """Back at 08:23:03 with slow last run at 08:20 and fast at 08:21: slow's tick
    (08:22) and fast's (08:23) are both due. The slow snapshot is named for 08:22;
    08:23 comes after it, so it is taken too, at once, and nothing after."""
    clock = Clock(T0 + 183)
    state = AgentState.load(None)
    state.vm(VM).last.update({"slow": T0, "fast": T0 + 60})
    pusher = Pushes()
    agent = Agent(POLICIES, pusher, state, clock=clock)
    assert await _passes(agent) == ["snapper-slow-20261202T082200Z",
                                    "snapper-fast-20261202T082300Z"]
    assert pusher.pushed == ["snapper-slow-20261202T082200Z",
                             "snapper-fast-20261202T082300Z"]


async def test_levels_due_at_one_tick_share_one_snapshot() -> None:
    """On time (08:22:01, both due at 08:22): one snapshot, the coarse level's."""
    clock = Clock(T0 + 121)
    state = AgentState.load(None)
    state.vm(VM).last.update({"slow": T0, "fast": T0 + 60})
    agent = Agent(POLICIES, Pushes(), state, clock=clock)
    assert await _passes(agent) == ["snapper-slow-20261202T082200Z"]
    clock.t = T0 + 181  # 08:23:01: the fast tick alone
    assert await _passes(agent) == ["snapper-fast-20261202T082300Z"]


async def test_a_long_outage_is_caught_up_with_one_snapshot_per_level() -> None:
    """Down from 08:20 to 08:29:30: slow's last tick 08:28, fast's 08:29: two
    snapshots, not one per missed tick."""
    clock = Clock(T0 + 570)
    state = AgentState.load(None)
    state.vm(VM).last.update({"slow": T0, "fast": T0})
    agent = Agent(POLICIES, Pushes(), state, clock=clock)
    assert await _passes(agent) == ["snapper-slow-20261202T082800Z",
                                    "snapper-fast-20261202T082900Z"]
