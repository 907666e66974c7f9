"""``snapper agent`` on a real CN pool and a real zone (in-process snapperd over
loopback SSH, zfs-fuse): the schedule, the base each level names, backoff,
restarts, and the CN side kept small. Time is the test's clock."""

from __future__ import annotations

import asyncio
import calendar
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapper_zone.cn.agent import Agent, AgentState
from snapper_zone.cn.cli import CnPusher, CnSettings
from snapper_zone.cn.cli import main as cli_main
from snapper_zone.daemon.zone import Zone
from snapper_zone.fleet.pools import FilePool
from snapper_zone.policy import PolicySet, parse_policies
from snapper_zone.zfs import proc
from snapper_zone.zfs.names import Dataset
from snapper_zone.zfs.zfs import Zfs
from tests.helpers import cn_settings, cn_vm, ssh_zone, wait_for, write_keypair, write_random

pytestmark = pytest.mark.zfs

ZONE_UUID = "bd932c2b-caae-495a-abf2-fb958111c3fb"
CN_ID = "44454c4c-3800-1051-8036-b4c04f4e3232"
VM = "74c59c61-4559-4ca2-b1ef-0ca22f2f936a"
POLICY_DOC = {"policy": [{
    "name": "p", "vms": ["*"], "durability": "local", "retention": {"keep": {"hourly": 24}},
    "level": [{"name": "daily", "cron": "0 3 * * *"}, {"name": "hourly", "every": "1h"}]}]}
T3 = float(calendar.timegm((2026, 12, 2, 3, 0, 0)))  # a daily and an hourly are due


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class Env:
    zfs: Zfs
    zone: Zone
    settings: CnSettings
    cn_pool: FilePool
    vm: Dataset
    tmp: Path
    policies: PolicySet
    clock: Clock

    def agent(self) -> Agent:
        pusher = CnPusher(self.settings, zfs=self.zfs, vmadm=None)
        return Agent(self.policies, pusher, AgentState.load(self.tmp / "state.json"),
                     clock=self.clock, backoff=(60, 600))

    async def local(self) -> list[str]:
        return [i.snapshot.name for i in await self.zfs.snapshots(self.vm)]

    async def zone_names(self) -> list[str]:
        return [s.name for s in await self.zone.store.snapshots(VM) if s.complete]


@pytest.fixture
async def env(zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool,
              tmp_path: Path) -> AsyncIterator[Env]:
    async with ssh_zone(zfs, zone_pool, tmp_path, uuid=ZONE_UUID, cn_id=CN_ID,
                        vms={VM: CN_ID}) as z:
        vm = await cn_vm(zfs, cn_pool, VM)
        settings = cn_settings(z, cn_pool)
        yield Env(zfs, z.zone, settings, cn_pool, vm, tmp_path, parse_policies(POLICY_DOC),
                  Clock(T3 + 5))


async def test_schedule_incrementals_and_a_small_cn_side(env: Env) -> None:
    agent = env.agent()
    [first] = await agent.tick()
    assert first.ok and first.level == "daily" and first.snapshot == \
        "snapper-daily-20261202T030000Z"
    assert await agent.tick() == []  # the hourly due at 03:00 ran with it
    hourlies: list[str] = []
    for h in (1, 2, 3):
        env.clock.t = T3 + h * 3600 + 5
        write_random(env.cn_pool, env.vm, f"f{h}", 64 << 10)
        [o] = await agent.tick()
        assert o.ok and o.level == "hourly", o
        # each from the zone's newest: the daily, then the previous hourly
        assert o.base == (hourlies[-1] if hourlies else first.snapshot)
        hourlies.append(o.snapshot)
    assert await env.zone_names() == [first.snapshot, *hourlies]
    # The CN keeps only what the next push is sent from: the last one.
    assert await env.local() == [hourlies[-1]]
    assert await agent.tick() == []


async def test_restart_misses_nothing_and_repeats_nothing(env: Env) -> None:
    assert [o.ok for o in await env.agent().tick()] == [True]
    state = json.loads((env.tmp / "state.json").read_text())
    assert set(state["vms"][VM]["last"]) == {"daily", "hourly"}
    # A new agent (a restart) at the same time: nothing; five hours later: one hourly.
    assert await env.agent().tick() == []
    env.clock.t = T3 + 5 * 3600 + 30
    [o] = await env.agent().tick()
    assert o.ok and o.snapshot == "snapper-hourly-20261202T080000Z"
    assert await env.agent().tick() == []


async def test_a_failed_push_backs_off_and_retries_the_same_snapshot(env: Env) -> None:
    good = env.settings
    env.settings = CnSettings("127.0.0.1", 1, good.key, None, good.host_key, good.dataset_root,
                              (("127.0.0.1", 1),))  # nothing listens there
    agent = env.agent()
    [o] = await agent.tick()
    assert not o.ok and "ZoneUnreachable" in (o.error or "")
    st = agent.state.vm(VM)
    assert st.failures == 1 and st.retry_at == env.clock.t + 60
    env.clock.t += 30
    assert await agent.tick() == []  # backing off
    env.clock.t += 31
    [o] = await agent.tick()
    assert not o.ok and agent.state.vm(VM).retry_at == env.clock.t + 120  # doubled
    # The zone is back: the retry pushes the snapshot scheduled at 03:00, not a new one.
    env.settings = good
    agent = env.agent()  # (a restart too: the pending name is in the state file)
    env.clock.t += 121
    [o] = await agent.tick()
    assert o.ok and o.snapshot == "snapper-daily-20261202T030000Z"
    assert await env.zone_names() == [o.snapshot]
    assert agent.state.vm(VM).failures == 0


async def test_an_agent_killed_mid_push_neither_misses_nor_doubles(env: Env) -> None:
    """SIGKILL while the stream flows; the next start finishes the same snapshot."""
    write_random(env.cn_pool, env.vm, "big", 6 << 20)
    policy = env.tmp / "policy.toml"
    # A yearly level: its name cannot change between the two runs.
    policy.write_text('[[policy]]\nname = "p"\nvms = ["*"]\ndurability = "local"\n'
                      'retention = { keep = { yearly = 3 } }\n'
                      '[[policy.level]]\nname = "yearly"\nevery = "1y"\n')
    s = env.settings
    argv = [sys.executable, "-m", "snapper_zone.cli", "--zone", f"127.0.0.1:{s.zone_port}",
            "--key", str(s.key), "--host-key", str(s.host_key), "--dataset-root",
            s.dataset_root, "agent", "--policy", str(policy), "--state",
            str(env.tmp / "kill-state.json"), "--once"]
    agent = proc.Daemon([*argv, "--bwlimit", "1M"], str(env.tmp / "agent1.log"))
    try:
        await wait_for(lambda: any(t.bytes > 0 for t in env.zone.transfers.active()), 60,
                       "the push's stream flowing")
    finally:
        agent.kill()
    assert await env.zone_names() == []
    done = await proc.run(argv, timeout=120)
    assert done.ok, done.stderr
    [name] = await env.zone_names()
    assert name.startswith("snapper-yearly-") and name in done.stdout.decode()
    assert await env.local() == [name]
    again = await proc.run(argv, timeout=60)
    assert again.ok and again.stdout == b""  # nothing due: nothing repeated
    assert await env.zone_names() == [name]


async def test_cli_once_and_bad_policy(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    policy = env.tmp / "policy.toml"
    policy.write_text('[[policy]]\nname = "p"\nvms = ["*"]\nretention = { grid = "24x1h" }\n'
                      '[[policy.level]]\nname = "hourly"\nevery = "1h"\n')
    s = env.settings
    args = ["--zone", f"127.0.0.1:{s.zone_port}", "--key", str(s.key),
            "--host-key", str(s.host_key), "--dataset-root", s.dataset_root]
    # In a thread: the CLI runs its own event loop; the zone runs on this one.
    rc = await asyncio.to_thread(cli_main, [*args, "agent", "--policy", str(policy), "--state",
                                            str(env.tmp / "cli-state.json"), "--once"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"{VM} hourly: snapper-hourly-" in out and "pushed" in out
    assert len(await env.zone_names()) == 1
    policy.write_text('[[policy]]\nname = "p"\n')
    rc = await asyncio.to_thread(cli_main, [*args, "agent", "--policy", str(policy), "--once"])
    err = capsys.readouterr().err
    assert rc == 2 and "policy[0]" in err


async def test_a_retried_snapshot_is_its_own_tick_then_the_catch_up(env: Env) -> None:
    good = env.settings
    env.settings = CnSettings("127.0.0.1", 1, good.key, None, good.host_key, good.dataset_root,
                              (("127.0.0.1", 1),))  # nothing listens there
    # The snapshot was taken before the push failed (as when the mirror is down).
    await env.zfs.snapshot([env.vm.snapshot("snapper-daily-20261202T030000Z")])
    [o] = await env.agent().tick()
    assert not o.ok and o.retry_at == env.clock.t + 60 and o.started <= o.ended
    # The zone is back 2.5 hours later: the snapshot taken at 03:00 goes first, then
    # the one catch-up for the hourlies due meanwhile (05:00), not one per hour.
    env.settings = good
    env.clock.t = T3 + 2.5 * 3600
    agent = env.agent()
    [o] = await agent.tick()
    assert o.ok and o.snapshot == "snapper-daily-20261202T030000Z" and o.level == "daily"
    [o] = await agent.tick()
    assert o.ok and o.snapshot == "snapper-hourly-20261202T050000Z"
    assert await agent.tick() == []
    assert await env.zone_names() == ["snapper-daily-20261202T030000Z",
                                      "snapper-hourly-20261202T050000Z"]


async def test_run_takes_what_fell_due_during_a_push_at_once(env: Env) -> None:
    """A pass that pushed runs again at once: a run due meanwhile is not left for
    the next scheduled time."""
    seen: list[str] = []
    agent = env.agent()
    stop = asyncio.Event()

    def report(o: object) -> None:
        seen.append(getattr(o, "snapshot", ""))
        if len(seen) == 1:
            env.clock.t = T3 + 3600 + 5  # the push took an hour: 04:00 is due now
        else:
            stop.set()

    agent.report = report
    await asyncio.wait_for(agent.run(stop), 60)
    assert seen == ["snapper-daily-20261202T030000Z", "snapper-hourly-20261202T040000Z"]


def test_cli_agent_options_are_checked(capsys: pytest.CaptureFixture[str],
                                       tmp_path: Path) -> None:
    key = write_keypair(tmp_path / "k")
    base = ["--zone", "127.0.0.1:1", "--key", str(key), "agent", "--policy", "x.toml"]
    assert cli_main([*base, "--backoff", "1h,1m"]) == 2
    assert "0 < MIN <= MAX" in capsys.readouterr().err
    assert cli_main([*base, "--backoff", "soon"]) == 2
    assert cli_main([*base, "--clock-speed", "10"]) == 2
    assert "--clock-origin" in capsys.readouterr().err
    # The registry's copy needs a coordinator; one source of policies, not two.
    assert cli_main([*base[:-2], "--policy-from-coordinator", "fleet"]) == 2
    assert "coordinator_url" in capsys.readouterr().err
    assert cli_main([*base, "--policy-from-coordinator", "fleet"]) == 2
