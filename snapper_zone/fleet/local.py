"""A local fleet on one machine: snapper zones and compute nodes on file-backed pools.

Used by ``snapper demo`` and by multi-zone tests. Every zone is a real
``snapperd`` process with its own pool, SSH and HTTP port on 127.0.0.1; a
compute node is a pool (mounted, so VMs can hold real data) and an SSH key.
Everything it starts it stops, by pid; everything it creates it destroys.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh

from snapper_zone.common.httpsig import Signer, signing_session
from snapper_zone.fleet import pools as localpool
from snapper_zone.fleet import sshd
from snapper_zone.fleet.pools import FilePool
from snapper_zone.zfs import proc
from snapper_zone.zfs.zfs import Zfs


@dataclass
class LocalZone:
    uuid: str
    name: str
    pool: FilePool
    root: str
    config_path: Path
    ready_path: Path
    host_key_pub: Path
    daemon: proc.Daemon | None = None
    ssh_port: int = 0
    http_port: int = 0
    # Zones peer with every other zone of their group; None: no peer at all.
    group: str | None = "fleet"
    pipelined: bool = True
    # Activated at the coordinator (by this fleet, as its operator).
    admitted: bool = False
    # With gates: the zone's own sshd in front of snapperd's gate socket.
    gate_port: int | None = None
    gate_sshd: proc.Daemon | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


@dataclass
class LocalCN:
    id: str
    pool: FilePool
    key_path: Path
    vms: list[str] = field(default_factory=list)
    # In the zones' and the coordinator's static config ([[keys]], [vms]); a CN
    # that is not is known through the coordinator's registry only (snapper cn add).
    static: bool = True

    @property
    def dataset_root(self) -> str:
        return self.pool.name


def _keypair(path: Path, comment: str) -> str:
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
    key.write_private_key(str(path))
    os.chmod(path, 0o600)
    pub: str = key.export_public_key().decode().strip()
    path.with_suffix(".pub").write_text(pub + "\n")
    return pub


async def _wait_ready(daemon: proc.Daemon, ready: Path, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(ready.exists):
        if not daemon.alive():
            raise RuntimeError(f"{what} exited; see {daemon.log_path}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready within {timeout}s")
        await asyncio.sleep(0.05)  # polling a file another process writes, with a deadline


async def _gate_sshd(zone: LocalZone, port: int, timeout: float) -> proc.Daemon:
    """The zone's sshd in front of snapperd's gate (etc/sshd_config.gate.example,
    logging in as this fleet's own user): the zone's host key, the keys file
    snapperd writes, every login forced to snapper-gate."""
    d = zone.config_path.parent
    try:
        return await sshd.start_sshd(d, port, zone.host_key_pub.with_suffix(""),
                                     sshd.gate_options(d / "gate_keys"),
                                     name="gate_sshd", timeout=timeout)
    except RuntimeError as e:
        raise RuntimeError(f"{zone.name}'s gate: {e}") from e


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A port free now, for a daemon that binds it later (and again after a restart).

    Taken below the kernel's ephemeral range: a port from that range, free when
    we looked, could meanwhile become the source port of any outgoing
    connection (or any port-0 bind), and the daemon would fail to start.
    """
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(max(1024, low // 2), low)
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port
    raise RuntimeError(f"no free port below the ephemeral range ({low})")


@dataclass
class LocalCoordinator:
    config_path: Path
    ready_path: Path
    port: int
    lost_after: float = 10.0
    daemon: proc.Daemon | None = None
    # zk://... : several coordinators share it (and elect a leader); None: SQLite.
    store_url: str | None = None
    # Coordinators of one store share one key (zones pin one coordinator_key).
    key_file: Path | None = None
    id: str = "coordinator"
    # After a start on a new store: how long VMs seen on one zone wait for their
    # other copy's zone to be back (short for the tests; 120 s by default).
    rebuild_grace: float = 8.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def store(self) -> Path:
        return self.config_path.with_name("coordinator.db")

    @property
    def key(self) -> Path:
        """Its private key (``key`` in its config); zones get the ``.pub`` as
        their ``coordinator_key``."""
        return self.key_file or self.config_path.with_name("coordinator_ed25519")

    @property
    def public_key(self) -> str:
        """What zones and CNs know it by: its answers must be signed by it."""
        return self.key.with_suffix(".pub").read_text().strip()


class AdmissionFailed(RuntimeError):
    """The fleet could not admit its zones at the coordinator."""


class LocalFleet:
    """Create with ``await LocalFleet.start(...)``; always ``await fleet.stop()``.

    With ``coordinator=True`` a ``snapper-coordinator`` runs too: zones have no
    static peers, register with it, and learn the fleet (and each VM's pair)
    from it; CNs ask it where to push. A zone registers as ``pending``; the
    fleet, as the fleet's operator, admits each zone it starts for the first
    time with ``snapper zone activate`` (and again after the coordinator
    started on a new store, where every zone registers anew).
    """

    def __init__(self, workdir: Path, *, mirrored: bool = True,
                 reconcile_interval_ms: int = 2000, pipelined: bool = True,
                 zone_module: str = "snapper_zone.daemon.main",
                 zone_settings: dict[str, Any] | None = None,
                 gate_min_bytes: int | None = None) -> None:
        self.workdir = workdir
        # Not None: every zone runs an sshd gate (``[gate]``, docs/data-plane.md)
        # taking streams of at least this many bytes.
        self.gate_min_bytes = gate_min_bytes
        # Extra top-level snapperd settings for every zone (e.g. "limits").
        self.zone_settings = dict(zone_settings or {})
        self.zone_module = zone_module  # python -m this, for each zone
        # Every zone peers with every other (a full mesh); a VM's pair is chosen
        # by rendezvous hashing on each zone alike (replication.peers.pair_of).
        self.mirrored = mirrored
        self.reconcile_interval_ms = reconcile_interval_ms
        self.pipelined = pipelined
        # The one zones and CNs are given (coordinator_url); with several on one
        # ZooKeeper store, the last of ``coordinators`` (any of them answers).
        self.coordinator: LocalCoordinator | None = None
        self.coordinators: list[LocalCoordinator] = []
        self.zfs = Zfs()
        self.fuse: localpool.ZfsFuse | None = None
        self.zones: list[LocalZone] = []
        self.cns: list[LocalCN] = []
        self.operator_key = workdir / "operator_ed25519"

    @classmethod
    async def start(cls, workdir: Path, *, zones: int = 3, cns: int = 2, vms_per_cn: int = 2,
                    pool_size: int = 1 << 30, mirrored: bool = True,
                    reconcile_interval_ms: int = 2000, pipelined: bool = True,
                    coordinator: bool = False, lost_after: float = 10.0,
                    zone_module: str = "snapper_zone.daemon.main",
                    zone_settings: dict[str, Any] | None = None,
                    coordinators: int = 1, store_url: str | None = None,
                    gate_min_bytes: int | None = None) -> LocalFleet:
        """``coordinators`` > 1 needs ``store_url`` (``zk://...``): they share it,
        started in order (the first leads), and zones and CNs use the last.
        ``gate_min_bytes``: every zone runs an sshd gate for streams that large."""
        fleet = cls(workdir, mirrored=mirrored, reconcile_interval_ms=reconcile_interval_ms,
                    pipelined=pipelined, zone_module=zone_module, zone_settings=zone_settings,
                    gate_min_bytes=gate_min_bytes)
        if coordinators > 1 and store_url is None:
            raise ValueError("several coordinators share a ZooKeeper store: give store_url")
        try:
            if coordinator:
                cdir = workdir / "coordinator"
                for i in range(coordinators):
                    one = cdir if coordinators == 1 else cdir / f"c{i}"
                    os.makedirs(one, exist_ok=True)
                    fleet.coordinators.append(LocalCoordinator(
                        one / "coordinator.toml", one / "ready.json", free_port(), lost_after,
                        store_url=store_url, key_file=cdir / "coordinator_ed25519",
                        id="coordinator" if coordinators == 1 else f"coordinator{i}"))
                fleet.coordinator = fleet.coordinators[-1]
            await fleet._start(zones, cns, vms_per_cn, pool_size)
        except BaseException:
            await fleet.stop()
            raise
        return fleet

    async def _start(self, zones: int, cns: int, vms_per_cn: int, pool_size: int) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if localpool.tier() == "fuse":
            self.fuse = localpool.ZfsFuse(self.workdir / "zfs-fuse")
            await asyncio.to_thread(self.fuse.start)
        _keypair(self.operator_key, "operator")
        for _ in range(cns):
            await self.add_cn(vms_per_cn, pool_size)
        # After the operator and CN keys: their configs trust them. One by one:
        # each stands for election before it is ready, so the first leads.
        for c in self.coordinators:
            await self.start_coordinator(c)
        for _ in range(zones):
            await self.add_zone(pool_size)
        await asyncio.gather(*(self.start_zone(z, admit=False) for z in self.zones))
        if self.coordinator is not None:
            await self.admit(self.zones)

    async def add_cn(self, vms: int = 1, pool_size: int = 1 << 30, *,
                     static: bool = True) -> LocalCN:
        """A compute node: a pool, a key and ``vms`` VM uuids. Static ones are in the
        configs written after this; others are the registry's to know
        (``register_cn``)."""
        pool = await localpool.create_pool(self.zfs, self.workdir / "pools", "cn",
                                           size=pool_size)
        n = len(self.cns)
        cn = LocalCN(f"cn{n}", pool, self.workdir / f"cn{n}_ed25519", static=static)
        _keypair(cn.key_path, cn.id)
        cn.vms = [str(uuid.uuid4()) for _ in range(vms)]
        self.cns.append(cn)
        return cn

    async def register_cn(self, cn: LocalCN) -> None:
        """As the operator: the CN and its key into the coordinator's registry, and
        its VMs assigned to it (``snapper cn add``, ``snapper vm assign``)."""
        await self.snapper("cn", "add", cn.id, "--key", f"{cn.key_path}.pub")
        for vm in cn.vms:
            await self.snapper("vm", "assign", vm, cn.id)

    def zone_config(self, zone: LocalZone) -> dict[str, Any]:
        keys: list[dict[str, str]] = [
            {"role": "cn", "cn_id": cn.id, "public_key_file": str(cn.key_path) + ".pub"}
            for cn in self.cns if cn.static]
        keys.append({"role": "operator", "public_key_file": str(self.operator_key) + ".pub"})
        keys += [{"role": "peer", "zone": z.uuid, "public_key_file": str(z.host_key_pub)}
                 for z in self.zones if z is not zone and z.host_key_pub.exists()]
        peers = [{"uuid": z.uuid, "ssh_host": "127.0.0.1", "ssh_port": z.ssh_port,
                  "http_url": z.http_url} for z in self.zones
                 if z is not zone and zone.group is not None and z.group == zone.group
                 and self.coordinator is None]
        return {
            "uuid": zone.uuid, "name": zone.name, "root": zone.root,
            "ssh": {"host": "127.0.0.1", "advertise_host": "127.0.0.1", "port": zone.ssh_port,
                    "host_key": str(zone.host_key_pub.with_suffix(""))},
            "http": {"host": "127.0.0.1", "advertise_host": "127.0.0.1",
                     "port": zone.http_port},
            "keys": keys,
            "vms": {vm: cn.id for cn in self.cns if cn.static for vm in cn.vms},
            "peers": peers if self.mirrored else [],
            "reconcile_interval_ms": self.reconcile_interval_ms,
            "pipelined_mirroring": self.pipelined and zone.pipelined,
            # The coordinator's last answers, beside the zone's other files.
            "state_dir": str(zone.config_path.parent),
            **({"coordinator_url": self.coordinator.url,
                "coordinator_key": self.coordinator.public_key} if self.coordinator else {}),
            **({"gate": {"socket": str(zone.config_path.with_name("gate.sock")),
                         "port": zone.gate_port,
                         "authorized_keys": str(zone.config_path.with_name("gate_keys")),
                         "min_bytes": self.gate_min_bytes}}
               if zone.gate_port is not None and self.gate_min_bytes is not None else {}),
            **self.zone_settings,
        }

    async def add_zone(self, pool_size: int = 1 << 30, *, group: str | None = "fleet",
                       pipelined: bool = True, gate: bool = True) -> LocalZone:
        """A zone (started by ``start_zone``); ``gate``: with an sshd gate, if the
        fleet runs gates (``gate_min_bytes``)."""
        pool = await localpool.create_pool(self.zfs, self.workdir / "pools", "zone",
                                           size=pool_size, mounted=False)
        n = len(self.zones)
        zdir = self.workdir / f"zone{n}"
        zdir.mkdir(parents=True, exist_ok=True)
        host_key = zdir / "ssh_host_ed25519_key"
        _keypair(host_key, f"zone{n}")
        # Ports are fixed for the zone's life: its peers' configs name them,
        # and a restarted zone must be found where it was.
        zone = LocalZone(str(uuid.uuid4()), f"zone{n}", pool, f"{pool.name}/snapper",
                         zdir / "snapperd.json", zdir / "ready.json",
                         host_key.with_suffix(".pub"), ssh_port=free_port(),
                         http_port=free_port(), group=group, pipelined=pipelined,
                         gate_port=free_port() if gate and self.gate_min_bytes is not None
                         else None)
        self.zones.append(zone)
        return zone

    async def start_zone(self, zone: LocalZone, timeout: float = 60.0, *,
                         admit: bool = True) -> None:
        """Start (or restart) a zone; with a coordinator, admit it the first time."""
        zone.config_path.write_text(json.dumps(self.zone_config(zone), indent=2))
        zone.ready_path.unlink(missing_ok=True)
        zone.daemon = proc.Daemon(
            [sys.executable, "-m", self.zone_module, "--config", str(zone.config_path),
             "--ready-file", str(zone.ready_path), "--create-root"],
            str(zone.config_path.with_name("snapperd.log")))
        await _wait_ready(zone.daemon, zone.ready_path, f"{zone.name}'s snapperd", timeout)
        if zone.gate_port is not None and zone.gate_sshd is None:
            zone.gate_sshd = await _gate_sshd(zone, zone.gate_port, timeout)
        ready = json.loads(zone.ready_path.read_text())
        zone.ssh_port, zone.http_port = int(ready["ssh_port"]), int(ready["http_port"])
        if admit and not zone.admitted and self.coordinator is not None \
                and self.coordinator.daemon is not None:
            await self.admit([zone])

    async def snapper(self, *args: str) -> Any:
        """Run the ``snapper`` operator CLI against our coordinator; its JSON output
        with ``--json``; AdmissionFailed (with its stderr) when it fails."""
        return await self._snapper(*args)

    def reload_zone(self, zone: LocalZone) -> None:
        """Write the zone's config again and have it reload (SIGHUP, SMF ``refresh``)."""
        assert zone.daemon is not None
        zone.config_path.write_text(json.dumps(self.zone_config(zone), indent=2))
        os.kill(zone.daemon.pid, signal.SIGHUP)

    async def _snapper(self, *args: str) -> Any:
        """Run the ``snapper`` operator CLI against our coordinator; its JSON output."""
        assert self.coordinator is not None
        # As the fleet's operator: its key signs (SNAPPER_KEY, the CLI's default key).
        env = {**os.environ, "SNAPPER_KEY": str(self.operator_key)}
        done = await proc.run([sys.executable, "-m", "snapper_zone.cli", *args,
                               "--coordinator", self.coordinator.url], timeout=60.0,
                              env=env)
        if not done.ok:
            raise AdmissionFailed(f"snapper {' '.join(args)}: {done.stderr.strip()}")
        return json.loads(done.stdout) if "--json" in args else None

    async def admit(self, zones: list[LocalZone], timeout: float = 90.0) -> None:
        """As an operator would: wait until each zone has registered, then
        ``snapper zone activate`` the pending ones (nothing else is changed: a
        draining or lost zone stays so)."""
        deadline = time.monotonic() + timeout
        left = {z.uuid: z for z in zones}
        while left:
            try:
                listed = {z["uuid"]: z for z in await self._snapper("zones", "--json")}
            except AdmissionFailed:
                listed = {}  # the coordinator is starting: ask again
            pending = [u for u in left if u in listed and listed[u]["state"] == "pending"]
            await asyncio.gather(*(self._snapper("zone", "activate", u) for u in pending))
            for u in [u for u in left if u in listed]:
                left.pop(u).admitted = True
            if not left:
                return
            if time.monotonic() > deadline:
                raise AdmissionFailed(f"zones never registered: {', '.join(sorted(left))}")
            await asyncio.sleep(0.2)  # the zones register on their own schedule; deadline above

    async def start_coordinator(self, c: LocalCoordinator | None = None,
                                timeout: float = 60.0) -> None:
        """Start (or restart) one coordinator (default: the zones' own)."""
        c = c or self.coordinator
        assert c is not None
        if not c.key.exists():  # kept across restarts: the zones pin its .pub
            _keypair(c.key, "snapper-coordinator")
        keys = "".join(f'[[keys]]\nrole = "cn"\ncn_id = "{cn.id}"\n'
                       f'public_key_file = "{cn.key_path}.pub"\n' for cn in self.cns
                       if cn.static)
        election = ""
        if c.store_url is not None:
            # A short session: a killed leader is followed within seconds.
            election = (f'[election]\nid = "{c.id}"\nurl = "{c.url}"\n'
                        "session_timeout = 4.0\n")
        c.config_path.write_text(
            f'store = "{c.store_url or c.store}"\nkey = "{c.key}"\n' + election +
            f'[listen]\nhost = "127.0.0.1"\nport = {c.port}\n'
            f"[health]\ninterval = 0.5\ntimeout = 2.0\nlost_after = {c.lost_after}\n"
            "[moves]\nper_zone = 2\nmax_attempts = 20\nretry_delay = 0.5\n"
            "[rebalance]\nauto = true\nsettle = 1.0\ninterval = 5.0\n"
            f"rebuild_grace = {c.rebuild_grace}\n"
            f'[[keys]]\nrole = "operator"\npublic_key_file = "{self.operator_key}.pub"\n'
            + keys)
        c.ready_path.unlink(missing_ok=True)
        # A ZooKeeper store outlives its coordinators: the zones stay admitted.
        new_store = c.store_url is None and not c.store.exists()
        c.daemon = proc.Daemon(
            [sys.executable, "-m", "rebalance.coordinator", "--config", str(c.config_path),
             "--ready-file", str(c.ready_path)],
            str(c.config_path.with_name("coordinator.log")))
        await _wait_ready(c.daemon, c.ready_path, "the coordinator", timeout)
        if new_store:
            # A new store knows no zone: the running ones register anew, pending.
            running = [z for z in self.zones if z.daemon is not None]
            if running:
                await self.admit(running)

    def http(self, **kwargs: Any) -> aiohttp.ClientSession:
        """An HTTP session as the fleet's operator: every request signed with its key."""
        return signing_session(Signer.load(self.operator_key), **kwargs)

    def stop_coordinator(self, *, kill: bool = False, c: LocalCoordinator | None = None) -> None:
        c = c or self.coordinator
        if c is not None and c.daemon is not None:
            c.daemon.kill() if kill else c.daemon.stop()
            c.daemon = None

    def stop_zone(self, zone: LocalZone, *, gate: bool = False) -> None:
        """Stop its snapperd (and, with ``gate``, its gate's sshd: a zone's sshd
        outlives snapperd's restarts, as on a real zone)."""
        if zone.daemon is not None:
            zone.daemon.stop()
            zone.daemon = None
        if gate and zone.gate_sshd is not None:
            zone.gate_sshd.stop()
            zone.gate_sshd = None

    async def stop(self) -> None:
        """Stop every daemon, destroy every pool, stop zfs-fuse if we started it."""
        for zone in self.zones:
            self.stop_zone(zone, gate=True)
        for c in self.coordinators:
            self.stop_coordinator(c=c)
        for pool in [z.pool for z in self.zones] + [c.pool for c in self.cns]:
            try:
                await pool.destroy(self.zfs)
            except Exception as exc:  # keep cleaning; report what is left behind
                print(f"warning: could not destroy pool {pool.name}: {exc}", file=sys.stderr)
        if self.fuse is not None:
            await asyncio.to_thread(self.fuse.stop)
            self.fuse = None
