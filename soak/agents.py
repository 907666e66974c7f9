"""The soak's policy agents: the real ``snapper agent``, a subprocess as on a CN.

One VM of each of the first ``SoakConfig.agents`` CNs is left to an agent
instead of the simulated CN: a policy with two levels (``slow`` every 2m,
``fast`` every 1m) on a compressed clock (``--clock-speed``: the policy's
minute is five real seconds), ``mirrored``, retried with a short backoff.
A writer changes the VM's data all along, so each push has a stream to cut.
Faults (``soak/faults.py``: ``kill-agent``, ``kill-zone-mid-schedule``)
SIGKILL an agent or its VM's zone, mid-push when they can; each life of each
agent is recorded (``AgentRun``), with what it printed, for
``invariants.check_agents``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from snapper_zone.fleet.local import LocalCN
from snapper_zone.zfs import proc
from soak.invariants import AgentClock
from soak.records import AgentRun

if TYPE_CHECKING:
    from soak.driver import Soak

SPEED = 12.0  # agent seconds per real second: the policy's minute in 5 s
EVERY = 60.0  # the fine level's interval, agent seconds
BACKOFF = "12s,96s"  # a failed push is retried after 1 s, doubling to 8 s (real)
WRITE = (16 << 10, 96 << 10)  # bytes the VM changes per real second
POLICY = """# The soak's agents: written by soak/agents.py.
[[policy]]
name = "soak"
vms = [{vms}]
durability = "mirrored"
retention = {{ keep = {{ slow = 1000, fast = 1000 }} }}

[[policy.level]]
name = "slow"
every = "2m"

[[policy.level]]
name = "fast"
every = "1m"
"""


class AgentProc:
    """One CN's agent: its config, its state file, its process and its lives."""

    def __init__(self, soak: Soak, cn: LocalCN, vm: str, workdir: Path, policy: Path,
                 clock: AgentClock) -> None:
        self.soak, self.cn, self.vm = soak, cn, vm
        self.dir = workdir
        self.policy = policy
        self.clock = clock
        self.daemon: proc.Daemon | None = None
        self.runs: list[AgentRun] = []
        self._logs: list[Path] = []

    async def write_config(self) -> Path:
        """The CN config: the coordinator, or the VM's static pair (with their host keys)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        lines = [f'key = "{self.cn.key_path}"', f'dataset_root = "{self.cn.dataset_root}"',
                 f'state_dir = "{self.dir}"']
        c = self.soak.fleet.coordinator
        if c is not None:
            lines += [f'coordinator_url = "{c.url}"', f'coordinator_key = "{c.public_key}"']
        else:
            pair = await self.soak.targets(self.vm)
            known = self.dir / "known_hosts"
            known.write_text("".join(f"[127.0.0.1]:{z.ssh_port} {z.host_key_pub.read_text()}"
                                     for z in pair))
            lines += ["zones = [" + ", ".join(f'"127.0.0.1:{z.ssh_port}"' for z in pair) + "]",
                      f'known_hosts = "{known}"']
        path = self.dir / "cn.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def argv(self, config: Path) -> list[str]:
        return [sys.executable, "-m", "snapper_zone.cli", "--config", str(config), "agent",
                "--policy", str(self.policy), "--state", str(self.dir / "state.json"),
                "--cn-id", self.cn.id, "--json", "--backoff", BACKOFF,
                "--clock-speed", str(self.clock.speed),
                "--clock-origin", str(self.clock.origin)]

    def start(self) -> None:
        assert self.daemon is None
        log = self.dir / f"run{len(self.runs)}.log"
        self._logs.append(log)
        self.runs.append(AgentRun(self.cn.id, self.vm, time.time()))
        self.daemon = proc.Daemon(self.argv(self.dir / "cn.toml"), str(log))

    def kill(self) -> None:
        """SIGKILL: a crash (or a CN reboot) in the middle of whatever it does."""
        assert self.daemon is not None
        self.daemon.kill()
        self.runs[-1].ended, self.runs[-1].killed = time.time(), True
        self.daemon = None

    async def stop(self) -> None:
        """SIGTERM: the pass under way finishes, then it exits."""
        if self.daemon is not None:
            await asyncio.to_thread(self.daemon.stop, 60.0)
            self.runs[-1].ended = time.time()
            self.daemon = None

    def collect(self) -> list[AgentRun]:
        """Each life with the outcomes it printed (other lines are its messages)."""
        for run, log in zip(self.runs, self._logs, strict=True):
            run.outcomes = []
            with contextlib.suppress(OSError):
                for line in log.read_text(errors="replace").splitlines():
                    with contextlib.suppress(ValueError):
                        doc = json.loads(line)
                        if isinstance(doc, dict) and doc.get("vm") == self.vm:
                            run.outcomes.append(doc)
        return self.runs


class Agents:
    """Every agent of the soak, and the writer that keeps their VMs changing."""

    def __init__(self, soak: Soak, pairs: list[tuple[LocalCN, str]]) -> None:
        self.soak = soak
        self.pairs = pairs
        self.clock = AgentClock(origin=time.time(), speed=SPEED, every=EVERY)
        self.procs: list[AgentProc] = []

    @property
    def vms(self) -> set[str]:
        return {vm for _, vm in self.pairs}

    async def start(self) -> None:
        if not self.pairs:
            return
        root = self.soak.config.workdir / "agents"
        root.mkdir(parents=True, exist_ok=True)
        policy = root / "policy.toml"
        policy.write_text(POLICY.format(vms=", ".join(f'"{vm}"' for _, vm in self.pairs)))
        for cn, vm in self.pairs:
            a = AgentProc(self.soak, cn, vm, root / cn.id, policy, self.clock)
            await a.write_config()
            a.start()
            self.procs.append(a)

    def pick(self, n: int) -> AgentProc:
        if not self.procs:
            raise RuntimeError("no agent runs in this soak (SoakConfig.agents is 0)")
        return self.procs[n % len(self.procs)]

    async def feed(self, until: float, done: asyncio.Event) -> None:
        """Change each agent VM's data about every second, while the load runs."""
        rng = random.Random(self.soak.config.seed * 31 + 7)
        w = self.soak.workload
        n = 0
        while self.pairs and (time.monotonic() < until or not done.is_set()):
            await asyncio.sleep(1.0)  # the VMs' own pace of change
            for cn, vm in self.pairs:
                disk = w.top(cn, vm).child("disk0")
                data = rng.randbytes(rng.randint(*WRITE))
                # A few files rewritten in turn: the pool does not fill up.
                (w.dir_of(cn, disk) / f"a{n % 8}").write_bytes(data)
                w.bytes_written += len(data)
            n += 1

    async def stop(self) -> list[AgentRun]:
        for a in self.procs:
            await a.stop()
        return [r for a in self.procs for r in a.collect()]
