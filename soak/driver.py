"""The soak driver: a real local fleet, N simulated CNs, a fault schedule, the verdict.

Each CN is one task: it changes its VMs' data, pushes a snapshot (mirrored;
``local`` when the mirror is unavailable; the other zone when its zone does
not answer, as ``snapper push`` fails over), now and then restores one and
compares it byte for byte, or deletes an older one. Every outcome is
recorded. Meanwhile the faults of the schedule run one after another. Then
the fleet is brought back (every zone up, nothing filled) and left to settle,
and ``invariants`` judges what was recorded against what the zones hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from replication.peers import pair_of
from snapper_zone.cn.cli import placement
from snapper_zone.cn.client import CnClient, PushReport
from snapper_zone.errors import DatasetBusy, SnapperError
from snapper_zone.fleet.local import LocalCN, LocalCoordinator, LocalFleet, LocalZone
from snapper_zone.fleet.zookeeper import LocalZooKeeper
from snapper_zone.transfer.remote import ZoneError
from snapper_zone.zfs import proc
from snapper_zone.zfs.names import Dataset
from snapper_zone.zfs.zfs import Zfs
from soak import invariants
from soak.agents import Agents
from soak.faults import (
    AGENT_KINDS,
    COORDINATOR_KINDS,
    FAULTS,
    STATIC_KINDS,
    CuttingZoneClient,
    PlannedFault,
    make_schedule,
)
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

DISK = "disk0"


@dataclass
class SoakConfig:
    duration: float = 300.0  # seconds of load; longer while the last fault recovers
    seed: int = 0
    cns: int = 2
    zones: int = 3
    vms_per_cn: int = 2
    coordinator: bool = False
    # > 1: that many coordinators on one ZooKeeper chroot (kill-coordinator
    # kills the leader); ``zookeeper`` its hosts, else a private one is started.
    coordinators: int = 1
    zookeeper: str | None = None
    workdir: Path = Path("/var/tmp/snapper-soak")
    pool_size: int = 1 << 30
    interval: tuple[float, float] = (0.3, 2.0)  # seconds between a CN's operations
    write: tuple[int, int] = (16 << 10, 512 << 10)  # bytes changed before a push
    settle_timeout: float = 180.0
    restore_sample: int = 4
    min_faults: int = 6
    min_kinds: int = 4
    schedule: list[PlannedFault] | None = None  # None: from the seed
    fault_kinds: tuple[str, ...] | None = None  # None: every kind this mode has
    zone_module: str = "snapper_zone.daemon.main"  # a test's broken build runs its own
    # CNs that run a ``snapper agent`` for one more VM each (``soak/agents.py``);
    # None: one when an agent fault kind is scheduled, else none.
    agents: int | None = None
    # Every zone behind its own sshd gate taking every stream (min_bytes 0), the
    # CNs' pushes and restores through it with OpenSSH's ssh (docs/data-plane.md).
    gates: bool = False

    def kinds(self) -> tuple[str, ...]:
        if self.fault_kinds is not None:
            return self.fault_kinds
        return COORDINATOR_KINDS if self.coordinator else STATIC_KINDS

    def agent_cns(self) -> int:
        if self.agents is not None:
            return min(self.agents, self.cns)
        kinds = {f.kind for f in self.schedule} if self.schedule is not None else set(
            self.kinds())
        return 1 if kinds & set(AGENT_KINDS) else 0

    def make_schedule(self) -> list[PlannedFault]:
        if self.schedule is not None:
            return self.schedule
        return make_schedule(self.seed, self.duration, self.kinds(), zones=self.zones)


@dataclass
class SoakResult:
    config: SoakConfig
    schedule: list[PlannedFault]
    pushes: list[PushRecord]
    deletes: list[DeleteRecord]
    restores: list[RestoreRecord]
    faults: list[FaultRecord]
    checks: list[invariants.Check]
    rss_before: list[RssSample]
    rss_after: list[RssSample]
    bytes_written: int
    run_seconds: float
    settle_seconds: float
    total_seconds: float
    skipped: list[PlannedFault] = field(default_factory=list)
    agent_runs: list[AgentRun] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks)


async def _destroy(zfs: Zfs, ds: Dataset, timeout: float = 30.0) -> None:
    """Destroy a restored copy; zfs-fuse may still be settling a mount it just made."""
    deadline = time.monotonic() + timeout
    while await zfs.exists(ds):
        try:
            await zfs.destroy(ds, recursive=True)
        except DatasetBusy:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)  # retrying a busy dataset, with a deadline


def _hash_tree(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.iterdir()) if p.is_file()}


class Workload:
    """The simulated CNs and everything they record."""

    def __init__(self, soak: Soak) -> None:
        self.soak = soak
        self.pushes: list[PushRecord] = []
        self.deletes: list[DeleteRecord] = []
        self.restores: list[RestoreRecord] = []
        self.bytes_written = 0
        # (vm, snapshot) -> dataset label -> file -> sha256, as pushed
        self.manifests: dict[tuple[str, str], dict[str, dict[str, str]]] = {}
        self._files: dict[str, dict[str, dict[str, str]]] = {}
        self._counter: dict[str, int] = {}
        self._cuts: dict[str, tuple[int, asyncio.Future[PushRecord]]] = {}
        self._restores = 0

    # -- the VMs' data ----------------------------------------------------------------

    def top(self, cn: LocalCN, vm: str) -> Dataset:
        return Dataset(cn.pool.name).child(vm)

    def dir_of(self, cn: LocalCN, ds: Dataset) -> Path:
        assert cn.pool.mountpoint is not None
        return cn.pool.mountpoint / ds.relative_to(Dataset(cn.pool.name))

    async def make_vms(self) -> None:
        zfs = self.soak.fleet.zfs
        for cn in self.soak.fleet.cns:
            for vm in cn.vms:
                await zfs.create(self.top(cn, vm))
                await zfs.create(self.top(cn, vm).child(DISK))
                self._files[vm] = {"root": {}, DISK: {}}

    def mutate(self, cn: LocalCN, vm: str, rng: random.Random) -> None:
        """Change the VM's data: new files, an overwrite, now and then a removal."""
        files = self._files[vm]
        label = DISK if rng.random() < 0.8 else "root"
        ds = self.top(cn, vm) if label == "root" else self.top(cn, vm).child(DISK)
        where = self.dir_of(cn, ds)
        have = sorted(files[label])
        if have and rng.random() < 0.15:
            gone = rng.choice(have)
            (where / gone).unlink()
            del files[label][gone]
        name = rng.choice(have) if have and rng.random() < 0.3 else f"f{len(have):04d}"
        data = rng.randbytes(rng.randint(*self.soak.config.write))
        (where / name).write_bytes(data)
        files[label][name] = hashlib.sha256(data).hexdigest()
        self.bytes_written += len(data)

    def vms(self, cn: LocalCN) -> list[str]:
        """The CN's VMs this workload drives (not those an agent runs)."""
        return [vm for vm in cn.vms if vm not in self.soak.agents.vms]

    def next_name(self, vm: str) -> str:
        self._counter[vm] = self._counter.get(vm, 0) + 1
        return f"s{self._counter[vm]:05d}"

    # -- the loop of one CN -------------------------------------------------------------

    async def run_cn(self, index: int, until: float, faults_done: asyncio.Event) -> None:
        cn = self.soak.fleet.cns[index]
        rng = random.Random(self.soak.config.seed * 7919 + index)
        retry: dict[str, str] = {}  # vm -> a snapshot whose push failed: push it again
        while time.monotonic() < until or not faults_done.is_set():
            await asyncio.sleep(rng.uniform(*self.soak.config.interval))  # the workload's pace
            vm = rng.choice(self.vms(cn))
            roll = rng.random()
            if roll < 0.10:
                await self.restore_one(cn, vm, rng)
            elif roll < 0.20:
                await self.delete_one(vm, rng)
            else:
                name = retry.pop(vm, None)
                if name is None:
                    self.mutate(cn, vm, rng)
                    name = self.next_name(vm)
                rec = await self.push(cn, vm, name)
                if not rec.ok:
                    retry[vm] = name  # as a CN's next run would: the same snapshot again

    async def cut_next_push(self, cn_id: str, cut: int, timeout: float) -> PushRecord:
        """Truncate ``cn_id``'s next push stream after ``cut`` bytes; its record."""
        fut: asyncio.Future[PushRecord] = asyncio.get_running_loop().create_future()
        self._cuts[cn_id] = (cut, fut)
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._cuts.pop(cn_id, None)

    # -- push -------------------------------------------------------------------------

    async def push(self, cn: LocalCN, vm: str, name: str) -> PushRecord:
        rec = PushRecord(cn.id, vm, name, self.soak.now(), ok=False)
        cut = self._cuts.pop(cn.id, None)
        rec.cut_after = cut[0] if cut else None
        try:
            rep = await self._push(cn, vm, name, rec.cut_after, rec.attempts)
        except (SnapperError, OSError, TimeoutError) as exc:
            rec.error = f"{type(exc).__name__}: {exc}"[:300]
        else:
            rec.ok = True
            rec.durability, rec.zones, rec.bytes = rep.durability, rep.zones, rep.bytes
            rec.guids = await self.cn_guids(cn, vm, name)
            self.manifests[(vm, name)] = {lb: dict(f) for lb, f in self._files[vm].items()}
            rec.ack_check = await self.soak.ack_check(vm, name, rec.guids, rep.zones)
        self.pushes.append(rec)
        if cut and not cut[1].done():
            cut[1].set_result(rec)
        return rec

    async def _push(self, cn: LocalCN, vm: str, name: str, cut: int | None,
                    attempts: list[str]) -> PushReport:
        last: Exception | None = None
        for zone in await self.soak.targets(vm):
            for durability in ("mirrored", "local"):
                zc = self.soak.client(zone, cn.key_path, cut=cut is not None)
                zc.cut_after, cut = cut, None  # only the first attempt is cut
                try:
                    async with zc:
                        client = CnClient(zc, dataset_root=cn.pool.name, zfs=self.soak.fleet.zfs,
                                          vmadm=None)
                        return await client.push(vm, name, metadata={"uuid": vm},
                                                 durability=durability)
                except ZoneError as exc:
                    last = exc
                    attempts.append(f"{zone.name} {durability}: {exc.code}: {exc}"[:200])
                    if exc.code != "MirrorUnavailable":
                        break  # this zone cannot take it: the other zone
                except (SnapperError, OSError, TimeoutError) as exc:
                    last = exc
                    attempts.append(f"{zone.name} {durability}: {type(exc).__name__}: {exc}"
                                    [:200])
                    break
        assert last is not None
        raise last

    async def cn_guids(self, cn: LocalCN, vm: str, name: str) -> dict[str, int]:
        zfs = self.soak.fleet.zfs
        out = {}
        for label, ds in (("root", self.top(cn, vm)), (DISK, self.top(cn, vm).child(DISK))):
            out[label] = next(s.guid for s in await zfs.snapshots(ds) if s.name == name)
        return out

    # -- delete and restore --------------------------------------------------------------

    def _candidates(self, vm: str, keep_newest: int) -> list[str]:
        gone = {d.snapshot for d in self.deletes if d.vm == vm}
        acked = [p.snapshot for p in self.pushes if p.vm == vm and p.acked
                 and p.snapshot not in gone]
        return acked[:-keep_newest] if keep_newest else acked

    async def delete_one(self, vm: str, rng: random.Random) -> None:
        # Never one of the newest two: the next incremental's base stays (a
        # delete of a snapshot in use is refused with ResourceBusy).
        names = self._candidates(vm, 2)
        if not names:
            return
        snap = rng.choice(names)
        for zone in await self.soak.targets(vm):
            rec = DeleteRecord(vm, snap, self.soak.now(), zone.uuid, ok=False)
            try:
                async with self.soak.http.delete(
                        f"{zone.http_url}/v1/vms/{vm}/snapshots/{snap}") as r:
                    rec.ok = r.status == 204
                    rec.error = "" if rec.ok else f"{r.status} {(await r.text())[:200]}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                rec.error = f"{type(exc).__name__}: {exc}"
            self.deletes.append(rec)
            if rec.ok:
                return

    async def restore_one(self, cn: LocalCN, vm: str, rng: random.Random, *,
                          final: bool = False) -> RestoreRecord | None:
        names = self._candidates(vm, 0)
        if not names:
            return None
        snap = rng.choice(names)
        targets = await self.soak.targets(vm)
        if not targets:
            return None  # no placement known yet (the coordinator is down)
        rec = RestoreRecord(vm, snap, self.soak.now(), targets[0].uuid, ok=False, final=final)
        self._restores += 1
        target = Dataset(cn.pool.name).child(f"restore{self._restores}")
        zfs = self.soak.fleet.zfs
        try:
            for zone in targets:
                rec.zone = zone.uuid
                try:
                    async with self.soak.client(zone, cn.key_path) as zc:
                        client = CnClient(zc, dataset_root=cn.pool.name, zfs=zfs, vmadm=None)
                        await client.restore(vm, snap, str(target))
                    break
                except (SnapperError, OSError, TimeoutError) as exc:
                    rec.error = f"{type(exc).__name__}: {exc}"[:300]
                    await _destroy(zfs, target)
            else:
                return self._done(rec)
            rec.ok, rec.error = True, ""
            got = {lb: await self._files_of(cn, ds) for lb, ds in
                   (("root", target), (DISK, target.child(DISK)))}
            rec.identical = got == self.manifests[(vm, snap)]
            if not rec.identical:
                rec.error = f"files differ: {sorted(got[DISK])} vs " \
                            f"{sorted(self.manifests[(vm, snap)][DISK])}"[:300]
        finally:
            await _destroy(zfs, target)
        return self._done(rec)

    def _done(self, rec: RestoreRecord) -> RestoreRecord:
        self.restores.append(rec)
        return rec

    async def _files_of(self, cn: LocalCN, ds: Dataset) -> dict[str, str]:
        zfs = self.soak.fleet.zfs
        if (await zfs.capabilities()).receive_unmounted:
            done = await proc.run([zfs.zfs_bin, "mount", str(ds)], timeout=60)
            if not done.ok and "already mounted" not in done.stderr:
                raise RuntimeError(f"zfs mount {ds}: {done.stderr}")
        return await asyncio.to_thread(_hash_tree, self.dir_of(cn, ds))


class Soak:
    """The running fleet and what faults and checks need of it."""

    def __init__(self, config: SoakConfig, fleet: LocalFleet, http: aiohttp.ClientSession,
                 log: Callable[[str], None]) -> None:
        self.config = config
        self.log = log
        self.fleet = fleet
        self.http = http
        self.pool_size = config.pool_size
        self.settle_timeout = config.settle_timeout
        self.t0 = time.monotonic()  # record times are seconds since this
        self.run_start = self.t0  # the schedule's times are seconds since this
        self.workload = Workload(self)
        self.gone: set[str] = set()  # zones lost for good (no longer in the fleet)
        self.losses: dict[str, float] = {}  # zone uuid -> when its pool was destroyed
        self._placements: dict[str, list[str]] = {}
        # The last VM of each of the first ``agents`` CNs is an agent's.
        self.agents = Agents(self, [(cn, cn.vms[-1])
                                    for cn in fleet.cns[:config.agent_cns()]])

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 3)

    # -- zones ------------------------------------------------------------------------

    def zones(self) -> list[LocalZone]:
        return [z for z in self.fleet.zones if z.uuid not in self.gone]

    def running_zones(self) -> list[LocalZone]:
        return [z for z in self.zones() if z.daemon is not None]

    def zone(self, uuid: str) -> LocalZone | None:
        return next((z for z in self.fleet.zones if z.uuid == uuid), None)

    def lost_zone(self, zone: LocalZone, *, gone: bool = False) -> None:
        self.losses[zone.uuid] = self.now()
        if gone:
            self.gone.add(zone.uuid)

    def client(self, zone: LocalZone, key: Path, *, cut: bool = False) -> CuttingZoneClient:
        """A CN's client; through the zone's gate when the soak runs gates, except
        a push to be ``cut``: the cut is made in snapper's own channel."""
        ssh = shutil.which("ssh") if self.config.gates and not cut else None
        return CuttingZoneClient("127.0.0.1", zone.ssh_port, key, host_key=zone.host_key_pub,
                                 openssh=ssh)

    async def leader(self) -> LocalCoordinator:
        """The coordinator that leads, as the zones' own says (its own self if
        there is one coordinator, or none answers)."""
        front = self.fleet.coordinator
        assert front is not None
        if len(self.fleet.coordinators) > 1:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, KeyError, TypeError):
                async with self.http.get(f"{front.url}/v1/status") as r:
                    lead = (await r.json())["leader"]["id"]
                return next((c for c in self.fleet.coordinators if c.id == lead), front)
        return front

    async def targets(self, vm: str) -> list[LocalZone]:
        """The VM's zones, primary first: the static pair, or the coordinator's
        placement (the last one it gave while it is down, as a CN would cache it)."""
        if self.fleet.coordinator is None:
            uuids = list(pair_of(vm, [z.uuid for z in self.zones()]))
        else:
            uuids = self._placements.get(vm, [])
            # Any live coordinator answers (a follower reads the shared store): the
            # one the CNs are given may be the leader just killed, and a stale
            # placement would judge a copy that a move took away as lost.
            live = [c for c in self.fleet.coordinators if c.daemon is not None] \
                or [self.fleet.coordinator]
            for c in live:
                try:
                    uuids = [str(e["uuid"]) for e in await placement(
                        c.url, vm, self.fleet.operator_key, c.public_key)]
                except SnapperError:
                    continue
                self._placements[vm] = uuids
                break
        return [z for u in uuids if (z := self.zone(u)) is not None and u not in self.gone]

    # -- what the zones hold --------------------------------------------------------------

    def all_vms(self) -> list[str]:
        return [vm for cn in self.fleet.cns for vm in cn.vms]

    async def inventories(self, zone: LocalZone, vms: Sequence[str]) -> dict[str, dict[str, Any]]:
        async with self.client(zone, self.fleet.operator_key) as zc:
            return {vm: (await zc.inventory(vm)).to_json() for vm in vms}

    async def survey(self) -> tuple[Holdings, dict[str, dict[str, PartialState]], list[str]]:
        """(holdings, partial state, zones that did not answer) over the fleet's zones."""
        holdings: Holdings = {}
        partial: dict[str, dict[str, PartialState]] = {}
        silent = []
        vms = self.all_vms()
        for zone in self.zones():
            if zone.daemon is None:
                silent.append(zone.uuid)
                continue
            try:
                docs = await asyncio.wait_for(self.inventories(zone, vms), 60)
            except (SnapperError, OSError, TimeoutError):
                silent.append(zone.uuid)
                continue
            for vm, doc in docs.items():
                complete, st = invariants.parse_inventory(doc)
                if complete or doc.get("datasets"):
                    holdings.setdefault(vm, {})[zone.uuid] = complete
                    partial.setdefault(vm, {})[zone.uuid] = st
        return holdings, partial, silent

    async def ack_check(self, vm: str, name: str, guids: dict[str, int],
                        zones: Sequence[str]) -> dict[str, str]:
        """What each zone the ack named holds right now (no waiting: the ack is a promise)."""
        out = {uuid: await self._holds(uuid, vm, name, guids) for uuid in zones}
        if self.fleet.coordinator is not None and any(
                v not in ("ok", "unreachable") for v in out.values()):
            # A move may have taken the copy away between the ack and this look:
            # fine only if as many zones the VM is placed on now hold it as the
            # ack promised copies (both for a mirrored ack, one for a local one).
            placed = [z.uuid for z in await self.targets(vm)]
            there = sorted([u for u in placed
                            if await self._holds(u, vm, name, guids) == "ok"])
            for uuid, seen in out.items():
                if seen not in ("ok", "unreachable") and uuid not in placed \
                        and len(there) >= len(set(zones)):
                    out[uuid] = "moved: on " + ", ".join(u[:8] for u in there)
        return out

    async def _holds(self, uuid: str, vm: str, name: str, guids: dict[str, int]) -> str:
        zone = self.zone(uuid)
        if zone is None or zone.daemon is None:
            return "unreachable"
        try:
            async with self.client(zone, self.fleet.operator_key) as zc:
                complete, _ = invariants.parse_inventory((await zc.inventory(vm)).to_json())
        except (SnapperError, OSError, TimeoutError):
            return "unreachable"
        return invariants.ack_seen(complete.get(name), guids)

    def acked_keys(self) -> list[tuple[str, str]]:
        return sorted(invariants.stored(self.workload.pushes, self.workload.deletes))

    async def copies_problems(self, keys: Sequence[tuple[str, str]], *, exact: bool) -> list[str]:
        acked = invariants.stored(self.workload.pushes, self.workload.deletes)
        want = {k: acked[k] for k in keys if k in acked}
        holdings, _, silent = await self.survey()
        problems = invariants.copies_problems(
            want, holdings, exact=exact, static_pairs=self.fleet.coordinator is None,
            losses=self.losses)
        return problems + [f"zone {z[:8]} does not answer" for z in silent]

    async def wait_two_copies(self, keys: Sequence[tuple[str, str]],
                              timeout: float) -> float | None:
        """time.monotonic() when ``keys`` were all on two zones, None after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            if not await self.copies_problems(keys, exact=False):
                return time.monotonic()
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.5)  # polling the zones' state, with a deadline

    async def zone_receiving(self, timeout: float, pick: int = 0,
                             vm: str | None = None) -> tuple[LocalZone, str]:
        """A running zone with a receive in progress (of ``vm``'s, if given) that has
        moved some bytes (asked in an order rotated by ``pick``, so every zone gets
        its turn)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            zones = self.running_zones()
            for zone in zones[pick % len(zones):] + zones[:pick % len(zones)] if zones else []:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with self.http.get(f"{zone.http_url}/v1/transfers") as r:
                        rows = await r.json() if r.status == 200 else []
                    for t in rows:
                        if t.get("kind") in ("receive", "mirror-in") and t.get("bytes", 0) > 0 \
                                and vm in (None, t.get("vm")):
                            return zone, (f"{t['kind']} of {str(t.get('vm'))[:8]}/"
                                          f"{t.get('dataset')}@{t.get('snapshot')} "
                                          f"at {t['bytes']} bytes")
            await asyncio.sleep(0.02)  # transfers are short: poll fast, with a deadline
        raise TimeoutError(f"no zone was receiving within {timeout:.0f}s")

    # -- the coordinator ------------------------------------------------------------------

    async def _coord(self, method: str, path: str, body: Any = None) -> Any:
        assert self.fleet.coordinator is not None
        async with self.http.request(method, self.fleet.coordinator.url + path,
                                     json=body) as r:
            if r.status >= 400:
                raise RuntimeError(f"{method} {path}: {r.status} {await r.text()}")
            return await r.json(content_type=None) if r.status != 204 else None

    async def wait_registered(self, zone: LocalZone, timeout: float = 60.0) -> None:
        await self._until(lambda: self._has_zone(zone), timeout, f"{zone.name} registered")

    async def _has_zone(self, zone: LocalZone) -> bool:
        zones = (await self._coord("GET", "/v1/zones"))["zones"]
        return any(z["uuid"] == zone.uuid for z in zones)

    async def set_zone_state(self, zone: LocalZone, state: str) -> None:
        await self._coord("PUT", f"/v1/zones/{zone.uuid}/state", {"state": state})

    async def wait_empty(self, zone: LocalZone, timeout: float) -> None:
        """Until the zone holds no VM and no active move names it: the zone's last
        copy goes before the coordinator ends that move, and until then the
        coordinator refuses the zone's removal (ZoneNotEmpty)."""
        async def empty() -> bool:
            async with self.http.get(f"{zone.http_url}/v1/vms") as r:
                if r.status != 200 or await r.json():
                    return False
            return not any(zone.uuid in (m["from_zone"], m["to_zone"], m["source"])
                           for m in await self.active_moves())
        await self._until(empty, timeout, f"{zone.name} drained")

    async def remove_zone(self, zone: LocalZone) -> None:
        await self._coord("DELETE", f"/v1/zones/{zone.uuid}")
        self.gone.add(zone.uuid)
        self.fleet.stop_zone(zone)
        await zone.pool.destroy(self.fleet.zfs)

    async def active_moves(self) -> list[dict[str, Any]]:
        # The active ones only: /v1/moves is paged, and the history may be long.
        moves: list[dict[str, Any]] = (
            await self._coord("GET", "/v1/moves?state=planned&state=running"))["moves"]
        return moves

    async def moves_settled(self) -> bool:
        return not await self.active_moves()

    async def _until(self, cond: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(aiohttp.ClientError, RuntimeError, TimeoutError):
                if await cond():
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not within {timeout:.0f}s")
            await asyncio.sleep(0.5)  # polling another process's state, with a deadline

    # -- processes ------------------------------------------------------------------------

    def rss(self) -> list[RssSample]:
        procs: list[tuple[str, proc.Daemon | None]] = [(z.name, z.daemon) for z in self.zones()]
        procs += [(c.id, c.daemon) for c in self.fleet.coordinators]
        out = []
        for name, d in procs:
            if d is not None and (kib := invariants.rss_kib(d.pid)) is not None:
                out.append(RssSample(name, d.pid, kib))
        return out

    async def bring_back(self) -> None:
        """Every zone that is not gone for good runs; every coordinator runs."""
        for c in self.fleet.coordinators:
            if c.daemon is None:
                await self.fleet.start_coordinator(c)
        for zone in self.zones():
            if zone.daemon is None:
                await self.fleet.start_zone(zone)


async def _run_faults(soak: Soak, schedule: Sequence[PlannedFault], until: float,
                      done: list[FaultRecord], skipped: list[PlannedFault],
                      finished: asyncio.Event) -> None:
    try:
        for planned in schedule:
            await _run_fault(soak, planned, until, done, skipped)
    finally:
        finished.set()


async def _run_fault(soak: Soak, planned: PlannedFault, until: float,
                     done: list[FaultRecord], skipped: list[PlannedFault]) -> None:
    wait = soak.run_start + planned.at - time.monotonic()
    if wait > 0:
        await asyncio.sleep(wait)  # the schedule's own timing
    if time.monotonic() >= until:
        skipped.append(planned)  # earlier recoveries ran far past the run's end
        return
    rec = await FAULTS[planned.kind](planned, soak).inject()
    done.append(rec)
    soak.log(f"fault {rec.kind} on {rec.target or '-'} {rec.started:.1f}-{rec.ended:.1f}s"
             + (f", back to two copies in {rec.back_to_two_s}s"
                if rec.back_to_two_s is not None else "")
             + (f" ERROR {rec.error}" if rec.error else ""))


async def run_soak(config: SoakConfig, *, log: Callable[[str], None] = print) -> SoakResult:
    """Run a whole soak; the fleet is always stopped and its pools destroyed."""
    schedule = config.make_schedule()
    started = time.monotonic()
    zk: LocalZooKeeper | None = None
    store_url = None
    if config.coordinators > 1:
        hosts = config.zookeeper
        if hosts is None:
            zk = LocalZooKeeper(config.workdir / "zookeeper")
            await asyncio.to_thread(zk.start)
            hosts = zk.hosts
        store_url = f"zk://{hosts}/soak-{config.seed}-{os.getpid()}-{int(started)}"
    try:
        fleet = await LocalFleet.start(
            config.workdir, zones=config.zones, cns=config.cns,
            vms_per_cn=config.vms_per_cn + (1 if config.agent_cns() else 0),
            pool_size=config.pool_size, coordinator=config.coordinator,
            reconcile_interval_ms=1000, lost_after=6.0, zone_module=config.zone_module,
            coordinators=config.coordinators, store_url=store_url,
            gate_min_bytes=0 if config.gates else None)
        try:
            async with fleet.http(timeout=aiohttp.ClientTimeout(total=60)) as http:
                soak = Soak(config, fleet, http, log)
                return await _run(soak, schedule, started)
        finally:
            await fleet.stop()
    finally:
        if zk is not None:
            await asyncio.to_thread(zk.stop)


async def _run(soak: Soak, schedule: list[PlannedFault], started: float) -> SoakResult:
    config, w = soak.config, soak.workload
    if soak.fleet.coordinator is not None:
        for z in soak.fleet.zones:
            await soak.wait_registered(z)
    await w.make_vms()
    # Every VM once, so the RSS baseline is taken with the daemons warmed up.
    for cn in soak.fleet.cns:
        for vm in w.vms(cn):
            w.mutate(cn, vm, random.Random(config.seed))
            await w.push(cn, vm, w.next_name(vm))
    await soak.agents.start()
    rss_before = soak.rss()
    soak.run_start = time.monotonic()
    until = soak.run_start + config.duration
    faults: list[FaultRecord] = []
    skipped: list[PlannedFault] = []
    # The load goes on until the last fault has recovered (every fault happens under
    # load); a schedule whose recoveries run past twice the duration is cut short.
    finished = asyncio.Event()
    # A TaskGroup: if one task fails the others are cancelled before the fleet stops.
    async with asyncio.TaskGroup() as tg:
        tg.create_task(_run_faults(soak, schedule, soak.run_start + 2 * config.duration,
                                   faults, skipped, finished))
        for i in range(len(soak.fleet.cns)):
            tg.create_task(w.run_cn(i, until, finished))
        tg.create_task(soak.agents.feed(until, finished))
    agent_runs = await soak.agents.stop()
    run_end = time.monotonic()
    soak.log(f"workload done after {run_end - soak.run_start:.0f}s: {len(w.pushes)} pushes; "
             "settling")
    await soak.bring_back()
    settled_at = time.time()
    deadline = time.monotonic() + config.settle_timeout
    while True:
        problems = await soak.copies_problems(soak.acked_keys(), exact=True)
        holdings, partial, _ = await soak.survey()
        tokens = any(st.resume_tokens or st.incomplete
                     for zs in partial.values() for st in zs.values())
        moving = soak.fleet.coordinator is not None and not await soak.moves_settled()
        undeleted = not invariants.check_deletes(w.deletes, holdings).ok
        # The agents' snapshots are acked by no record here: wait for two copies each.
        problems += invariants.agent_copies_problems(soak.agents.vms, holdings)
        if (not problems and not tokens and not moving and not undeleted) \
                or time.monotonic() > deadline:
            break
        await asyncio.sleep(1.0)  # the fleet settles on its own; poll with a deadline
    settle_seconds = time.monotonic() - run_end
    rng = random.Random(config.seed + 1)
    for _ in range(config.restore_sample):
        cn = rng.choice(soak.fleet.cns)
        await w.restore_one(cn, rng.choice(w.vms(cn)), rng, final=True)
    holdings, partial, _ = await soak.survey()
    rss_after = soak.rss()
    checks = invariants.check_all(
        pushes=w.pushes, deletes=w.deletes, restores=w.restores, faults=faults,
        holdings=holdings, partial=partial, settled_at=settled_at, rss_before=rss_before,
        rss_after=rss_after, losses=soak.losses,
        static_pairs=soak.fleet.coordinator is None,
        min_faults=config.min_faults, min_kinds=min(config.min_kinds, len(config.kinds())))
    if agent_runs:
        pairs = None if soak.fleet.coordinator is not None else {
            vm: [z.uuid for z in await soak.targets(vm)] for vm in soak.agents.vms}
        checks.append(invariants.check_agents(agent_runs, holdings, soak.agents.clock,
                                              pairs=pairs))
    return SoakResult(config, schedule, w.pushes, w.deletes, w.restores, faults, checks,
                      rss_before, rss_after, w.bytes_written, run_end - soak.run_start,
                      settle_seconds, time.monotonic() - started, skipped, agent_runs)


def default_workdir() -> Path:
    return Path(os.environ.get("SNAPPER_SOAK_DIR", "/var/tmp")) / f"snapper-soak-{os.getpid()}"
