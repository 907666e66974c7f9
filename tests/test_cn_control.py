"""``snapper push`` handed to a running agent (``cn/handoff.py``, ``cn/control.py``):
the real CLI in a subprocess, the agent's control server over a real Unix socket, a real zone
(in-process snapperd over loopback SSH) and real CN and zone pools (zfs-fuse).
What the CLI prints and exits with is the same as when it pushes itself."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapper_zone.cn.cli import CnPusher, failure
from snapper_zone.cn.control import ControlServer
from snapper_zone.cn.handoff import ControlError, PushRequest, ask_agent, socket_path
from snapper_zone.cn.links import ZoneLinks
from snapper_zone.cn.options import CnSettings
from snapper_zone.common.progress import NoProgress
from snapper_zone.daemon.zone import Zone
from snapper_zone.fleet.pools import FilePool
from snapper_zone.zfs import proc
from snapper_zone.zfs.names import Dataset
from snapper_zone.zfs.zfs import Zfs
from tests.helpers import cn_settings, cn_vm, ssh_zone, wait_for, write_random

ZONE_UUID = "7b2e9d41-0c3a-4f5e-8a6b-1d2c3e4f5a60"
CN_ID = "44454c4c-3800-1051-8036-b4c04f4e3232"
VM = "3a1f5c7e-9b2d-4e6f-8a0c-2b4d6f8a0c1e"


@dataclass
class Env:
    zfs: Zfs
    zone: Zone
    pusher: CnPusher
    links: ZoneLinks
    server: ControlServer
    config: Path
    cn_pool: FilePool
    vm: Dataset

    async def snapper(self, *args: str, importtime: bool = False) -> proc.Completed:
        """``snapper --config C ARGS`` as a CN runs it."""
        flags = ["-X", "importtime"] if importtime else []
        return await proc.run([sys.executable, *flags, "-m", "snapper_zone.cli",
                               "--config", str(self.config), *args], timeout=120)

    async def complete(self) -> list[str]:
        return [s.name for s in await self.zone.store.snapshots(VM) if s.complete]


@pytest.fixture
async def env(zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool,
              tmp_path: Path) -> AsyncIterator[Env]:
    async with ssh_zone(zfs, zone_pool, tmp_path, uuid=ZONE_UUID, cn_id=CN_ID,
                        vms={VM: CN_ID}) as z:
        vm = await cn_vm(zfs, cn_pool, VM)
        state = tmp_path / "state"
        config = tmp_path / "snapper-cn.toml"
        config.write_text(f'zones = ["127.0.0.1:{z.port}"]\nkey = "{z.cn_key}"\n'
                          f'host_key = "{z.host_pub}"\ndataset_root = "{cn_pool.name}"\n'
                          f'state_dir = "{state}"\nssh_client = "asyncssh"\n')
        settings = cn_settings(z, cn_pool, state_dir=state)
        links = ZoneLinks()
        pusher = CnPusher(settings, zfs=zfs, vmadm=None, links=links)
        state.mkdir(mode=0o700)
        server = ControlServer(socket_path(state), pusher.push_for_cli,
                               lambda exc: failure("push", exc))
        await server.start()
        try:
            yield Env(zfs, z.zone, pusher, links, server, config, cn_pool, vm)
        finally:
            await server.close()
            await links.close()


@pytest.mark.zfs
async def test_the_agent_pushes_for_the_cli(env: Env) -> None:
    got = await env.snapper("push", VM, "--name", "s1", "--metadata", "/dev/null",
                            "--progress", "json", importtime=True)
    # /dev/null is no JSON object: said as the CLI says it, before any agent is asked.
    assert got.returncode == 2 and "--metadata /dev/null" in got.stderr
    assert env.server.served == 0
    got = await env.snapper("push", VM, "--name", "s1", "--progress", "json",
                            importtime=True)
    assert got.returncode == 0, got.stderr
    assert got.stdout.decode().startswith(f"pushed {VM}@s1 (")
    assert env.server.served == 1 and env.links.logins == 1
    assert await env.complete() == ["s1"]
    events = [json.loads(ln) for ln in got.stderr.splitlines() if ln.startswith("{")]
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    assert events[-1]["ok"] is True
    # This process started no SSH client of its own: asyncssh was never imported.
    imported = {ln.split("|")[-1].strip() for ln in got.stderr.splitlines()
                if ln.startswith("import time:")}
    assert "snapper_zone.cn.handoff" in imported
    assert "asyncio" not in imported
    assert "asyncssh" not in imported and "snapper_zone.cn.client" not in imported
    # The next push goes on the agent's same link, incremental, printed as JSON.
    write_random(env.cn_pool, env.vm, "f1", 64 << 10)
    got = await env.snapper("push", VM, "--name", "s2", "--json", "--progress", "none")
    assert got.returncode == 0, got.stderr
    doc = json.loads(got.stdout)
    assert doc["snapshot"] == "s2" and doc["datasets"][0]["base"].endswith("@s1")
    assert env.links.logins == 1 and await env.complete() == ["s1", "s2"]


@pytest.mark.zfs
async def test_a_failed_push_says_what_the_cli_says(env: Env) -> None:
    by_agent = await env.snapper("push", VM, "--name", "s1", "--from", "nosuch")
    by_itself = await env.snapper("push", VM, "--name", "s1", "--from", "nosuch", "--no-agent")
    assert env.server.served == 1
    assert by_agent.returncode == by_itself.returncode == 1
    assert by_agent.stderr == by_itself.stderr and by_agent.stderr.startswith("snapper: push: ")
    assert await env.complete() == []


@pytest.mark.zfs
async def test_without_an_agent_the_cli_pushes_itself(env: Env) -> None:
    await env.server.close()
    path = env.server.path
    assert not path.exists()
    got = await env.snapper("push", VM, "--name", "s1")
    assert got.returncode == 0, got.stderr
    # A socket an agent left when it died: nobody listens, the CLI pushes itself.
    with socket.socket(socket.AF_UNIX) as left:
        left.bind(str(path))
        write_random(env.cn_pool, env.vm, "f1", 64 << 10)
        got = await env.snapper("push", VM, "--name", "s2")
    assert got.returncode == 0, got.stderr
    assert env.server.served == 0 and env.links.logins == 0
    assert await env.complete() == ["s1", "s2"]
    # The next agent replaces that socket.
    again = ControlServer(path, env.pusher.push_for_cli, lambda exc: failure("push", exc))
    await again.start()
    try:
        write_random(env.cn_pool, env.vm, "f2", 64 << 10)
        got = await env.snapper("push", VM, "--name", "s3")
        assert got.returncode == 0, got.stderr
        assert again.served == 1
    finally:
        await again.close()
    # While one agent listens, a second does not take its socket.
    await env.server.start()
    with pytest.raises(ControlError, match="another agent"):
        await ControlServer(path, env.pusher.push_for_cli, lambda exc: None).start()


@pytest.mark.zfs
async def test_only_the_agents_user_is_served(env: Env) -> None:
    await env.server.close()
    other = ControlServer(env.server.path, env.pusher.push_for_cli,
                          lambda exc: failure("push", exc), uid=os.geteuid() + 1)
    await other.start()
    try:
        assert env.server.path.stat().st_mode & 0o777 == 0o600
        got = await env.snapper("push", VM, "--name", "s1")
        assert got.returncode == 2
        assert "the agent takes pushes from its own user only" in got.stderr
        assert other.served == 0 and await env.complete() == []
    finally:
        await other.close()


async def test_a_refusal_sent_before_the_request_is_read_still_reaches_the_cli(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The agent refuses another user's CLI at once, without reading its request.
    A request larger than the socket's buffer is still being written when the agent
    closes, so the CLI's write fails (EPIPE): it must still read the refusal, not
    report a lost agent (the race, under load, failed the test above in CI)."""
    async def never(*_: Any) -> dict[str, Any]:
        raise AssertionError("a refused request is never pushed")

    path = tmp_path / "control.sock"
    server = ControlServer(path, never, lambda exc: None, uid=os.geteuid() + 1)
    await server.start()
    try:
        settings = CnSettings("127.0.0.1", 1, tmp_path / "key", None, None, "zones")
        req = PushRequest(settings, VM, "s1", None, {"pad": "x" * (8 << 20)}, None, None)
        got = await asyncio.to_thread(ask_agent, path, req, NoProgress())
        assert got == (2, None)
        assert "the agent takes pushes from its own user only" in capsys.readouterr().err
        assert server.served == 0
    finally:
        await server.close()


@pytest.mark.zfs
async def test_a_cli_that_goes_away_stops_its_push(env: Env) -> None:
    write_random(env.cn_pool, env.vm, "big", 4 << 20)
    cli = await proc.spawn([sys.executable, "-m", "snapper_zone.cli", "--config",
                            str(env.config), "push", VM, "--name", "s1", "--bwlimit", "256k",
                            "--progress", "none"])
    try:
        await wait_for(lambda: bool(env.zone.transfers.active()), 30,
                       "the agent's push under way on the zone")
    finally:
        cli.kill()
        await cli.wait()
    await wait_for(lambda: not env.zone.transfers.active(), 30,
                   "the push stopped once its CLI went away")
    assert env.server.served == 1 and await env.complete() == []


@pytest.mark.zfs
async def test_a_request_it_cannot_read_changes_nothing(env: Env) -> None:
    def ask(junk: bytes) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(env.server.path))
            s.sendall(junk)
            answer: dict[str, Any] = json.loads(s.makefile("rb").readline())
            return answer

    for junk in (b"not json\n", b'{"push": {"vm": 1}}\n', b"[]\n"):
        # A blocking client, in a thread: the agent's server is on this loop.
        answer = await asyncio.to_thread(ask, junk)
        assert answer["error"]["status"] == 2
        assert "cannot read the request" in answer["error"]["text"]
    assert env.server.served == 0 and await env.complete() == []


@pytest.mark.zfs
async def test_a_client_that_says_nothing_is_let_go(env: Env) -> None:
    await env.server.close()
    quick = ControlServer(env.server.path, env.pusher.push_for_cli,
                          lambda exc: failure("push", exc), request_seconds=0.5)
    await quick.start()

    def silent() -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(quick.path))
            answer: dict[str, Any] = json.loads(s.makefile("rb").readline())
            return answer

    try:
        answer = await asyncio.to_thread(silent)
    finally:
        await quick.close()
    assert answer["error"]["status"] == 2 and "none within 0.5 s" in answer["error"]["text"]
    assert quick.served == 0


SETTINGS = CnSettings("zone.example", 2222, Path("/k"), None, Path("/h.pub"), "zones",
                      (("zone.example", 2222), ("z2.example", 22)))


@given(name=st.none() | st.text(max_size=20), bw=st.none() | st.floats(1, 1e12),
       meta=st.none() | st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
       gate=st.booleans(), url=st.none() | st.just("https://c.example"))
def test_a_request_reads_back_as_sent(name: str | None, bw: float | None,
                                      meta: dict[str, int] | None, gate: bool,
                                      url: str | None) -> None:
    req = PushRequest(replace(SETTINGS, use_gate=gate, coordinator_url=url), VM, name, None,
                      meta, "local", bw)
    assert PushRequest.from_json(json.loads(json.dumps(req.to_json()))) == req


def test_a_request_naming_no_vm_or_an_unknown_durability_is_refused() -> None:
    doc = PushRequest(SETTINGS, VM, "s", None, None, None, None).to_json()
    for field, value in (("vm", "../../etc"), ("vm", VM.upper()), ("durability", "maybe")):
        bad = json.loads(json.dumps(doc))
        bad["push"][field] = value
        with pytest.raises(ControlError):
            PushRequest.from_json(bad)


@pytest.mark.parametrize("bad", [
    {"push": {}},
    {"push": {"settings": {}}},
    "push",
])
def test_a_malformed_request_is_refused(bad: object) -> None:
    with pytest.raises(ControlError):
        PushRequest.from_json(bad)


@pytest.mark.parametrize(("field", "value"), [
    ("zone_port", "22"), ("use_gate", "yes"), ("key", None), ("zones", [["h", "22"]]),
    ("state_dir", 7)])
def test_a_request_with_a_wrong_field_is_refused(field: str, value: object) -> None:
    doc = PushRequest(SETTINGS, VM, "s", None, None, None, None).to_json()
    doc["push"]["settings"][field] = value
    with pytest.raises(ControlError):
        PushRequest.from_json(doc)
