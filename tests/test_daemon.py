"""snapperd as a real process: ready file, HTTP, bunyan logs, clean SIGTERM, exit codes."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import resource
import socket
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
import pytest

from snapper_zone.common.bootstrap import raise_open_files
from snapper_zone.common.config import parse_config
from snapper_zone.common.httpsig import Signer, signing_session
from snapper_zone.common.version import version
from snapper_zone.daemon import main as daemon_mod
from snapper_zone.daemon.zone import Zone
from snapper_zone.fleet.pools import FilePool
from snapper_zone.zfs import proc
from snapper_zone.zfs.names import Dataset
from snapper_zone.zfs.zfs import Zfs
from tests.helpers import wait_for

REPO = Path(__file__).resolve().parent.parent
ZONE_UUID = "bd932c2b-caae-495a-abf2-fb958111c3fb"
VM = "74c59c61-4559-4ca2-b1ef-0ca22f2f936a"
STOP_BOUND = 15.0  # seconds from SIGTERM to exit with nothing in flight
READY_BOUND = 60.0
HAVE_SSH = importlib.util.find_spec("snapper_zone.daemon.sshserver") is not None


OPERATOR = asyncssh.generate_private_key("ssh-ed25519")


def write_config(tmp_path: Path, root: str, **overrides: Any) -> Path:
    key = OPERATOR.export_public_key().decode().strip()
    http = overrides.pop("http_port", 0)
    conf = tmp_path / "snapperd.toml"
    conf.write_text(f"""
uuid = "{ZONE_UUID}"
name = "snapper-test"
root = "{root}"
[ssh]
port = 0
host_key = "keys/ssh_host_ed25519_key"
[http]
port = {http}
[[keys]]
role = "operator"
public_key = "{key}"
""")
    return conf


def snapperd(*args: str) -> list[str]:
    return [sys.executable, "-m", "snapper_zone.daemon.main", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _read_ready(ready: Path) -> dict[str, Any] | None:
    try:
        info: dict[str, Any] = json.loads(ready.read_text())
    except FileNotFoundError:
        return None
    return info


def _log_of(daemon: proc.Daemon) -> str:
    return Path(daemon.log_path).read_text()


async def wait_ready(daemon: proc.Daemon, ready: Path) -> dict[str, Any]:
    """Wait for the ready file (it appears atomically), failing fast if the daemon dies."""
    try:
        await wait_for(lambda: ready.exists() or not daemon.alive(), READY_BOUND,
                       "snapperd ready", poll=0.05)
    except TimeoutError:
        pytest.fail(f"snapperd not ready in {READY_BOUND}s:\n" + _log_of(daemon))
    info = _read_ready(ready)
    if info is None:
        pytest.fail("snapperd exited before ready:\n" + _log_of(daemon))
    return info


def log_records(path: Path) -> list[dict[str, Any]]:
    """Every line of the daemon's stderr, each of which must be one bunyan record."""
    records = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        assert isinstance(rec, dict)
        assert {"v", "name", "hostname", "pid", "level", "msg", "time"} <= rec.keys(), rec
        records.append(rec)
    return records


@pytest.fixture
def started() -> Iterator[list[proc.Daemon]]:
    """Daemons a test started: each is stopped by its pid if the test left it running."""
    daemons: list[proc.Daemon] = []
    yield daemons
    for d in daemons:
        d.stop(timeout=10)


@pytest.mark.zfs
async def test_daemon_serves_and_stops_cleanly(zfs: Zfs, zone_pool: FilePool, tmp_path: Path,
                                               started: list[proc.Daemon]) -> None:
    root = f"{zone_pool.name}/snapper"
    conf = write_config(tmp_path, root)
    ready = tmp_path / "ready.json"
    log_path = tmp_path / "snapperd.log"
    daemon = proc.Daemon(snapperd("--config", str(conf), "--ready-file", str(ready),
                                  "--create-root", "--log-level", "debug"),
                         str(log_path), env=env())
    started.append(daemon)

    info = await wait_ready(daemon, ready)
    assert info["pid"] == daemon.pid
    assert isinstance(info["http_port"], int) and info["http_port"] > 0
    if HAVE_SSH:
        assert isinstance(info["ssh_port"], int) and info["ssh_port"] > 0
        reader, writer = await asyncio.open_connection("127.0.0.1", info["ssh_port"])
        banner = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        assert banner.startswith(b"SSH-2.0-")
    else:
        assert info["ssh_port"] is None

    assert await zfs.exists(Dataset(root))
    key = tmp_path / "keys" / "ssh_host_ed25519_key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert asyncssh.read_private_key(str(key)).algorithm == b"ssh-ed25519"

    async with signing_session(Signer(OPERATOR)) as http:
        async with http.get(f"http://127.0.0.1:{info['http_port']}/ping") as r:
            assert r.status == 200
            # Open to anyone: liveness, which zone, which version; nothing else.
            assert await r.json() == {"ping": "pong", "zone": ZONE_UUID, "version": version()}
        async with http.get(f"http://127.0.0.1:{info['http_port']}/v1/vms") as r:
            assert (r.status, await r.json()) == (200, [])
    async with aiohttp.ClientSession() as anon, \
            anon.get(f"http://127.0.0.1:{info['http_port']}/v1/vms") as r:
        assert r.status == 401 and "Signature" in r.headers["WWW-Authenticate"]

    t0 = time.monotonic()
    assert daemon.stop(timeout=STOP_BOUND) == 0
    assert time.monotonic() - t0 < STOP_BOUND

    records = log_records(log_path)
    assert all(r["name"] == "snapperd" and r["pid"] == daemon.pid for r in records)
    msgs = [r["msg"] for r in records]
    # The first line names the build, before anything else can go wrong.
    assert (msgs[0], records[0]["version"]) == ("snapperd starting", version())
    assert records[0]["open_files"] >= resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    (start,) = [r for r in records if r["msg"] == "snapperd started"]
    assert (start["http_port"], start["ssh_port"]) == (info["http_port"], info["ssh_port"])
    assert start["level"] == 30 and start["zone"] == ZONE_UUID and start["root"] == root
    audit = [r for r in records if r["msg"] == "handled request"]
    assert [(a["method"], a["url"], a["status"]) for a in audit] == [
        ("GET", "/ping", 200), ("GET", "/v1/vms", 200), ("GET", "/v1/vms", 401)]
    assert {"created root dataset", "generated SSH key", "stopping", "stopped"} <= set(msgs)
    assert msgs[-1] == "stopped"


@pytest.mark.zfs
async def test_missing_root_is_exit_2_without_create_root(
        zone_pool: FilePool, tmp_path: Path) -> None:
    conf = write_config(tmp_path, f"{zone_pool.name}/absent")
    done = await proc.run(snapperd("--config", str(conf)), env=env(), timeout=60)
    assert done.returncode == 2, done.stderr
    first, rec = [json.loads(line) for line in done.stderr.splitlines()]
    assert (first["msg"], first["version"]) == ("snapperd starting", version())
    assert rec["level"] == 60
    assert f"{zone_pool.name}/absent" in rec["msg"] and "does not exist" in rec["msg"]


@pytest.mark.parametrize(("edit", "field"), [
    (lambda t: t.replace("port = 0", 'port = "twenty-two"', 1), "ssh.port"),
    (lambda t: t.replace('name = "snapper-test"', 'nmae = "x"'), "nmae"),
    (lambda t: t.replace('role = "operator"', 'role = "admin"'), "keys[0].role"),
])
async def test_bad_config_is_exit_2_naming_the_field(tmp_path: Path, edit: Any,
                                                     field: str) -> None:
    conf = write_config(tmp_path, "tank/snapper")
    conf.write_text(edit(conf.read_text()))
    done = await proc.run(snapperd("--config", str(conf)), env=env(), timeout=60)
    assert done.returncode == 2
    assert str(conf) in done.stderr and field in done.stderr, done.stderr


async def test_usage_errors_are_exit_2(tmp_path: Path) -> None:
    done = await proc.run(snapperd(), env=env(), timeout=60)
    assert done.returncode == 2 and "--config" in done.stderr
    missing = tmp_path / "nope.toml"
    done = await proc.run(snapperd("--config", str(missing)), env=env(), timeout=60)
    assert done.returncode == 2 and str(missing) in done.stderr
    conf = write_config(tmp_path, "tank/snapper")
    done = await proc.run(snapperd("--config", str(conf), "--log-level", "loud"),
                          env=env(), timeout=60)
    assert done.returncode == 2 and "log level" in done.stderr


def _zone(tmp_path: Path) -> Zone:
    key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    return Zone.from_config(parse_config({
        "uuid": ZONE_UUID, "name": "z", "root": "tank/snapper",
        "ssh": {"port": 0, "host_key": str(tmp_path / "k")}, "http": {"port": 0},
        "keys": [{"role": "operator", "public_key": key}]}))


async def test_grace_period_ends_when_the_last_transfer_does(tmp_path: Path) -> None:
    zone = _zone(tmp_path)
    await asyncio.wait_for(daemon_mod._wait_for_transfers(zone, 30), 1)  # nothing in flight

    t = zone.transfers.start("receive", VM, "root", "s2", "s1", "cn:test")
    waiter = asyncio.create_task(daemon_mod._wait_for_transfers(zone, 30))
    # It keeps waiting while the transfer runs (observed for a while, not one turn).
    done, _ = await asyncio.wait({waiter}, timeout=0.3)
    assert not done
    zone.transfers.finish(t, "ok")
    await asyncio.wait_for(waiter, 5)  # long before the 30 s grace


async def test_grace_period_is_bounded(tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    zone = _zone(tmp_path)
    zone.transfers.start("receive", VM, "root", "s2", "s1", "cn:test")
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="snapperd"):
        await asyncio.wait_for(daemon_mod._wait_for_transfers(zone, 0.3), 5)
    assert 0.3 <= time.monotonic() - t0 < 5
    (cut,) = [r for r in caplog.records if r.getMessage().startswith("grace period over")]
    assert [x["snapshot"] for x in cut.__dict__["transfers"]] == ["s2"]


@pytest.mark.zfs
async def test_startup_failures_are_logged_and_exit_nonzero(
        zfs: Zfs, zone_pool: FilePool, tmp_path: Path) -> None:
    root = f"{zone_pool.name}/snapper"
    await zfs.create(Dataset(root))

    # An unusable host key is the operator's to fix: exit 2, naming the field.
    key = tmp_path / "keys" / "ssh_host_ed25519_key"
    key.parent.mkdir()
    key.write_text("not a key\n")
    conf = write_config(tmp_path, root)
    done = await proc.run(snapperd("--config", str(conf)), env=env(), timeout=60)
    assert done.returncode == 2, done.stderr
    # (Before it, the root made non-mountable, at info level.)
    (rec,) = [r for r in map(json.loads, done.stderr.splitlines()) if r["level"] > 30]
    assert "ssh.host_key" in rec["msg"] and rec["level"] == 60
    key.unlink()

    # A port already taken: exit 1, and still only bunyan lines on stderr.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        conf = write_config(tmp_path, root, http_port=taken.getsockname()[1])
        done = await proc.run(snapperd("--config", str(conf)), env=env(), timeout=60)
    assert done.returncode == 1, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines()]
    assert records[-1]["msg"] == "snapperd cannot run" and records[-1]["level"] == 60
    assert "address already in use" in records[-1]["err"]["message"].lower()


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
async def test_a_killed_daemon_takes_its_children_with_it(tmp_path: Path) -> None:
    """A crash (the soak's kill -9) ends the service's children too, as its SMF
    contract does: an orphaned `zfs send` held a snapshot busy for minutes."""
    log = tmp_path / "d.log"
    d = proc.Daemon(["sh", "-c", "sleep 300 & echo $!; wait"], str(log))
    await wait_for(lambda: log.read_text().strip().isdigit(), 10, "the child's pid")
    child = int(log.read_text())
    assert _running(child)
    d.kill()
    await wait_for(lambda: not _running(child), 10, "the child's end")


def test_a_daemon_lifts_its_open_files_limit_to_the_hard_one() -> None:
    """A copy buffer's pipes (``stream.PipeRing``) and every connection take
    descriptors: a daemon does not stay at a low soft limit it could lift."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard limit here is {hard}: nothing to lift")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        got = raise_open_files()
        assert got == resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 256
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[1] == hard  # never lowered
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
