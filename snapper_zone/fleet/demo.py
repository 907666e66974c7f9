"""``snapper demo``: the whole mission on one machine, narrated.

Starts a local fleet (snapper zones as real ``snapperd`` processes on
file-backed pools, simulated compute nodes with VMs holding real data), then
pushes full and incremental snapshots, lists them over the HTTP API,
deletes an intermediate one, pushes again, restores into a new dataset and
checks it byte for byte. Uses the machine's ZFS when it has one, zfs-fuse
otherwise. Cleans up after itself, Ctrl-C included; ``--keep`` leaves the
fleet up and prints the command that stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from replication.peers import pair_of
from snapper_zone.cn.client import CnClient, placement
from snapper_zone.common import progress
from snapper_zone.errors import NotPlacedHere
from snapper_zone.fleet import pools as localpool
from snapper_zone.fleet.local import LocalCN, LocalFleet, LocalZone
from snapper_zone.transfer.remote import ZoneClient, ZoneError
from snapper_zone.zfs.names import Dataset
from snapper_zone.zfs.zfs import Zfs

_MOVED_RETRIES = 5  # placement lookups per push while moves switch it under us

STATE_FILE = "fleet.json"
T = TypeVar("T")


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def info(text: str) -> None:
    print(f"    {text}", flush=True)


def _fill(path: Path, name: str, size: int) -> str:
    data = os.urandom(size)
    (path / name).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.iterdir()) if p.is_file()}


class Demo:
    def __init__(self, fleet: LocalFleet, data_mib: int) -> None:
        self.fleet = fleet
        self.zfs = fleet.zfs
        self.data = data_mib << 20
        # sha256 of each VM's disk0 files as they were when a snapshot was pushed
        self.digests: dict[tuple[str, str], dict[str, str]] = {}

        self.placed: dict[str, tuple[str, str]] = {}

    async def wait_registered(self) -> None:
        c = self.fleet.coordinator
        if c is None:
            return
        url, n = f"{c.url}/v1/zones", len(self.fleet.zones)

        async def all_in() -> bool | None:
            async with self.fleet.http() as http, http.get(url) as r:
                return True if len((await r.json())["zones"]) >= n else None

        await poll(all_in, 60, "every zone registered with the coordinator")

    async def refresh_placement(self, only: str | None = None) -> None:
        """Each VM's (primary, mirror) as the coordinator places it (what a CN
        asks); ``only``: that VM's alone."""
        c = self.fleet.coordinator
        for cn in self.fleet.cns:
            for vm in cn.vms:
                if only is not None and vm != only:
                    continue
                if c is None:
                    a, b = pair_of(vm, [z.uuid for z in self.fleet.zones])
                else:
                    ends = await placement(c.url, vm, cn.key_path, c.public_key)
                    a, b = ends[0]["uuid"], ends[1]["uuid"]
                self.placed[vm] = (a, b)

    def pair(self, vm: str) -> tuple[LocalZone, LocalZone]:
        by_uuid = {z.uuid: z for z in self.fleet.zones}
        a, b = self.placed[vm]
        return by_uuid[a], by_uuid[b]

    def primary(self, vm: str) -> LocalZone:
        return self.pair(vm)[0]

    def name_of(self, zone_uuid: str) -> str:
        return next((z.name for z in self.fleet.zones if z.uuid == zone_uuid), zone_uuid[:8])

    def mnt(self, cn: LocalCN, ds: Dataset) -> Path:
        assert cn.pool.mountpoint is not None
        return cn.pool.mountpoint / ds.relative_to(Dataset(cn.pool.name))

    def client(self, cn: LocalCN, zone: LocalZone) -> tuple[ZoneClient, CnClient]:
        zc = ZoneClient("127.0.0.1", zone.ssh_port, cn.key_path, host_key=zone.host_key_pub)
        # On a terminal a progress bar per stream; otherwise our own summary lines.
        bar = progress.for_stream(sys.stderr) if sys.stderr.isatty() else progress.NoProgress()
        return zc, CnClient(zc, dataset_root=cn.dataset_root, zfs=self.zfs, progress=bar,
                            vmadm=None)

    async def make_vms(self) -> None:
        say("Creating VMs on the compute nodes (a zone root and a disk0 each, with data)")
        for cn in self.fleet.cns:
            for vm in cn.vms:
                top = Dataset(cn.pool.name).child(vm)
                await self.zfs.create(top)
                await self.zfs.create(top.child("disk0"))
                _fill(self.mnt(cn, top), "etc-passwd", 4096)
                _fill(self.mnt(cn, top.child("disk0")), "blocks-0", self.data)
                p, m = self.pair(vm)
                info(f"{cn.id}: VM {vm} -> primary {p.name}, mirror {m.name}")

    async def push_all(self, label: str, durability: str | None = None,
                       only: str | None = None) -> None:
        for cn in self.fleet.cns:
            for vm in cn.vms:
                if only is not None and vm != only:
                    continue
                t0 = time.monotonic()
                for attempt in range(_MOVED_RETRIES):
                    # As a CN does: where the coordinator places the VM now. The
                    # fleet may rebalance mid-demo (a zone left without copies).
                    await self.refresh_placement(only=vm)
                    zone = self.primary(vm)
                    zc, client = self.client(cn, zone)
                    try:
                        async with zc:
                            rep = await client.push(
                                vm, name=label, durability=durability,
                                metadata={"uuid": vm, "alias": f"demo-{vm[:8]}",
                                          "brand": "joyent"})
                        break
                    except ZoneError as exc:
                        # A move switched the placement between the lookup and the
                        # push; nothing was sent. Ask again.
                        if exc.code != NotPlacedHere.code or attempt + 1 == _MOVED_RETRIES:
                            raise
                        info(f"{cn.id}: {vm[:8]} moved off {zone.name} just now; "
                             "asking the coordinator again")
                secs = time.monotonic() - t0
                disk = Dataset(cn.pool.name).child(vm).child("disk0")
                self.digests[(vm, label)] = _digests(self.mnt(cn, disk))
                kinds = ", ".join(f"{d.label}: {d.action or 'sent'}"
                                  + (f" from @{d.base.rpartition('@')[2]}" if d.base else "")
                                  for d in rep.datasets)
                held = " + ".join(self.name_of(z) for z in rep.zones)
                info(f"{cn.id} pushed {vm[:8]}@{label} to {zone.name}: "
                     f"{progress.format_bytes(rep.bytes)} in {secs:.1f}s ({kinds}); "
                     f"{rep.durability}: stored on {held}")

    async def change_data(self, tag: str) -> None:
        for cn in self.fleet.cns:
            for vm in cn.vms:
                disk = Dataset(cn.pool.name).child(vm).child("disk0")
                _fill(self.mnt(cn, disk), f"blocks-{tag}", self.data // 4)

    async def list_http(self, http: aiohttp.ClientSession) -> None:
        say("Listing what each VM's two zones hold (HTTP API), guids checked against the CN's")
        print(f"    {'zone':<6} {'vm':<9} {'snapshot':<9} {'complete':<8} "
              f"{'refer':>9}  guid(disk0)          equal")
        for cn in self.fleet.cns:
            for vm in cn.vms:
                disk = Dataset(cn.pool.name).child(vm).child("disk0")
                local = {s.name: s.guid for s in await self.zfs.snapshots(disk)}
                for zone in self.pair(vm):
                    async with http.get(f"{zone.http_url}/v1/vms/{vm}/snapshots") as r:
                        r.raise_for_status()
                        snaps: list[dict[str, Any]] = await r.json()
                    for s in snaps:
                        part = s["datasets"]["disk0"]
                        guid = int(part["guid"])
                        same = "yes" if local.get(s["name"]) == guid else "CN deleted it"
                        print(f"    {zone.name:<6} {vm[:8]:<9} {s['name']:<9} "
                              f"{s['complete']!s:<8} "
                              f"{progress.format_bytes(part['referenced']):>9}  "
                              f"{guid:<20} {same}")

    async def delete_intermediate(self, http: aiohttp.ClientSession, name: str) -> None:
        say(f"Deleting the intermediate snapshot @{name} on the zones (any snapshot "
            "can go, not only the newest)")
        await self.moves_done(http)
        for cn in self.fleet.cns:
            for vm in cn.vms:
                for attempt in (1, 2):
                    zone = self.primary(vm)
                    url = f"{zone.http_url}/v1/vms/{vm}/snapshots/{name}"
                    async with http.delete(url) as r:
                        if r.status == 204:
                            break
                        if attempt == 2:
                            raise RuntimeError(f"DELETE failed: {r.status} {await r.text()}")
                    # A move took the copy elsewhere meanwhile: ask the new primary.
                    await self.moves_done(http)
                info(f"{zone.name}: deleted {vm[:8]}@{name}")
        for cn in self.fleet.cns:
            for vm in cn.vms:
                t0 = time.monotonic()
                mirror = await self.wait_gone(http, vm, name)
                info(f"{mirror.name} (mirror): {vm[:8]}@{name} gone too, "
                     f"{time.monotonic() - t0:.1f}s later (tombstone + reconcile)")

    async def moves_done(self, http: aiohttp.ClientSession) -> None:
        """Wait until the coordinator runs no move, then learn the placement again.

        It rebalances by itself: when the first placements happen to leave a
        zone without copies (4 VMs on one pair: ~4% of runs), it moves some
        onto it while the demo goes on."""
        c = self.fleet.coordinator
        if c is None:
            return

        async def idle() -> bool | None:
            async with http.get(f"{c.url}/v1/moves?state=planned&state=running") as r:
                return True if not (await r.json())["moves"] else None

        await poll(idle, 180, "the coordinator's moves")
        await self.refresh_placement()

    async def wait_gone(self, http: aiohttp.ClientSession, vm: str, name: str,
                        timeout: float = 60.0) -> LocalZone:
        """Wait until ``vm``'s mirror (wherever a move has put it) no longer holds
        ``name``; return that mirror."""
        async def gone() -> LocalZone | None:
            await self.refresh_placement(only=vm)
            mirror = self.pair(vm)[1]
            held = await _complete(http, mirror, vm)
            return mirror if held is not None and name not in held else None

        return await poll(gone, timeout, f"{vm}'s mirror dropping @{name}")

    async def restore_and_check(self, snap: str) -> None:
        cn = self.fleet.cns[0]
        vm = cn.vms[0]
        target = f"{cn.pool.name}/restored-{vm[:8]}"
        say(f"Restoring {vm[:8]}@{snap} from {self.primary(vm).name} into {target}")
        zc, client = self.client(cn, self.primary(vm))
        async with zc:
            rep = await client.restore(vm, snap, target)
        info(f"restored {len(rep.datasets)} datasets; metadata alias = "
             f"{(rep.metadata or {}).get('alias')}")
        want = self.digests[(vm, snap)]
        got = _digests(self.mnt(cn, Dataset(target).child("disk0")))
        ok = want == got
        info(f"disk0 byte-for-byte equal to the CN's data at @{snap}: {ok} "
             f"({len(got)} files, sha256)")
        if not ok:
            raise RuntimeError("restored data differs from the original")

    async def mirror_outage(self, http: aiohttp.ClientSession, label: str) -> None:
        cn = self.fleet.cns[0]
        vm = cn.vms[0]
        primary, mirror = self.pair(vm)
        say(f"Killing {mirror.name} (SIGKILL), the mirror of VM {vm[:8]}")
        assert mirror.daemon is not None
        mirror.daemon.kill()
        mirror.daemon = None
        await self.change_data(label)
        try:
            await self.push_all(label, only=vm)
        except ZoneError as exc:
            info(f"a 'mirrored' push is refused, with the reason: {exc.code}")
        say(f"Pushing @{label} again with --durability local: one copy now, two later")
        await self.push_all(label, durability="local", only=vm)
        say(f"Restarting {mirror.name}: {primary.name} notices and sends what it lacks")
        t0 = time.monotonic()
        await self.fleet.start_zone(mirror)
        await wait_same(http, primary, mirror, vm)
        info(f"{mirror.name} caught up in {time.monotonic() - t0:.1f}s: every snapshot of "
             f"{vm[:8]} on both zones, guids equal")

    async def zones_table(self, http: aiohttp.ClientSession) -> None:
        c = self.fleet.coordinator
        if c is None:
            return
        async with http.get(f"{c.url}/v1/zones") as r:
            zones = (await r.json())["zones"]
        print(f"    {'zone':<6} {'state':<9} {'health':<8} {'VMs':>4} {'used':>10}")
        for z in sorted(zones, key=lambda z: str(z["name"])):
            print(f"    {z['name']:<6} {z['state']:<9} {z['health']:<8} {z['vms']:>4} "
                  f"{progress.format_bytes(int(z.get('used') or 0)):>10}")

    async def add_zone(self, http: aiohttp.ClientSession) -> None:
        c = self.fleet.coordinator
        assert c is not None
        new = await self.fleet.add_zone(1 << 30)
        say(f"Adding {new.name}: it registers with the coordinator, which moves about a "
            "quarter of the copies onto it (copy, verify by guid, switch, delete)")
        t0 = time.monotonic()
        await self.fleet.start_zone(new)

        async def done() -> list[dict[str, Any]] | None:
            async with http.get(f"{c.url}/v1/moves") as r:
                moves: list[dict[str, Any]] = (await r.json())["moves"]
            if moves and all(m["state"] in ("done", "failed") for m in moves):
                return moves
            return None

        moves = await poll(done, 180, "the moves onto the new zone")
        for m in moves:
            info(f"moved {m['vm'][:8]} {self.name_of(m['from_zone'])} -> "
                 f"{self.name_of(m['to_zone'])}: {progress.format_bytes(m['bytes'])}, "
                 f"{m['state']}")
        info(f"rebalanced in {time.monotonic() - t0:.1f}s")
        await self.refresh_placement()
        await self.zones_table(http)

    async def lose_zone(self, http: aiohttp.ClientSession) -> None:
        c = self.fleet.coordinator
        assert c is not None
        counts = {z.uuid: 0 for z in self.fleet.zones}
        for a, b in self.placed.values():
            counts[a] += 1
            counts[b] += 1
        victim = next(z for z in self.fleet.zones if z.uuid == max(counts, key=counts.__getitem__))
        say(f"Losing {victim.name} for good: snapperd killed, its pool destroyed. The "
            f"coordinator declares it lost after {c.lost_after:.0f}s of failed health checks "
            "and copies each of its VMs from the surviving copy to another zone")
        t0 = time.monotonic()
        assert victim.daemon is not None
        victim.daemon.kill()
        victim.daemon = None
        await victim.pool.destroy(self.zfs)
        self.fleet.zones.remove(victim)
        live = list(self.fleet.zones)

        async def two_copies() -> bool | None:
            for cn in self.fleet.cns:
                for vm in cn.vms:
                    held = [h for z in live if (h := await _complete(http, z, vm))]
                    if len(held) != 2 or held[0] != held[1]:
                        return None
            return True

        await poll(two_copies, 240, "every VM back on two zones")
        info(f"every VM is on two live zones again, guids equal, "
             f"{time.monotonic() - t0:.1f}s after the loss")
        await self.refresh_placement()
        await self.zones_table(http)

    async def run(self) -> None:
        z = self.fleet.zones
        say(f"Fleet up: {len(z)} snapper zones, {len(self.fleet.cns)} compute nodes "
            f"({localpool.tier()} ZFS, {(await self.zfs.capabilities()).flavour})")
        for zone in z:
            pid = zone.daemon.pid if zone.daemon else None
            info(f"{zone.name}: pool {zone.pool.name}, ssh 127.0.0.1:{zone.ssh_port}, "
                 f"http {zone.http_url}, snapperd pid {pid}")
        if self.fleet.coordinator is not None:
            c = self.fleet.coordinator
            info(f"coordinator: {c.url} (placement, health, moves), pid "
                 f"{c.daemon.pid if c.daemon else None}")
        await self.wait_registered()
        await self.refresh_placement()
        await self.make_vms()
        say("Pushing full snapshots @s1 over SSH")
        await self.push_all("s1")
        for n in ("s2", "s3"):
            await self.change_data(n)
            say(f"Pushing incremental snapshots @{n}")
            await self.push_all(n)
        async with self.fleet.http() as http:
            await self.list_http(http)
            await self.delete_intermediate(http, "s2")
            await self.change_data("s4")
            say("Pushing @s4: still incremental, from @s3")
            await self.push_all("s4")
            await self.mirror_outage(http, "s5")
            await self.list_http(http)
            await self.restore_and_check("s3")
            if self.fleet.coordinator is not None:
                say("The fleet as the coordinator sees it (snapper zones)")
                await self.zones_table(http)
                await self.add_zone(http)
                await self.lose_zone(http)
        say("Where to look (these stay up with --keep)")
        info("/metrics and /ping are open; every other route wants a request signed "
             f"with a fleet key (HTTP Signatures), e.g. the operator's {self.fleet.operator_key} "
             "through `snapper ... --key`; docs/trust-model.md")
        for zone in self.fleet.zones:
            info(f"{zone.name}: {zone.http_url}/v1/vms  {zone.http_url}/v1/replication  "
                 f"{zone.http_url}/metrics  log {zone.config_path.with_name('snapperd.log')}")
        if self.fleet.coordinator is not None:
            c = self.fleet.coordinator
            info(f"coordinator: {c.url}/v1/zones  {c.url}/v1/moves  {c.url}/v1/status  "
                 f"{c.url}/metrics  (snapper zones --coordinator {c.url} "
                 f"--key {self.fleet.operator_key})")


async def _complete(http: aiohttp.ClientSession, zone: LocalZone,
                    vm: str) -> dict[str, dict[str, str]] | None:
    try:
        async with http.get(f"{zone.http_url}/v1/vms/{vm}/snapshots") as r:
            if r.status != 200:
                return None
            snaps: list[dict[str, Any]] = await r.json()
    except aiohttp.ClientError:
        return None
    return {s["name"]: {d: p["guid"] for d, p in s["datasets"].items()}
            for s in snaps if s["complete"]}


async def poll(cond: Callable[[], Awaitable[T | None]], timeout: float, what: str) -> T:
    """The first non-None answer of ``cond``, asked every 0.3 s, within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = await cond()
        if got is not None:
            return got
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not reached within {timeout:.0f}s")
        await asyncio.sleep(0.3)


async def wait_same(http: aiohttp.ClientSession, a: LocalZone, b: LocalZone, vm: str,
                    timeout: float = 120.0) -> None:
    async def same() -> bool | None:
        ha, hb = await _complete(http, a, vm), await _complete(http, b, vm)
        return True if ha and ha == hb else None

    await poll(same, timeout, f"{a.name} and {b.name} holding the same snapshots of {vm}")


def _write_state(fleet: LocalFleet) -> Path:
    state = {
        "workdir": str(fleet.workdir),
        "pids": [z.daemon.pid for z in fleet.zones if z.daemon is not None],
        "coordinator_pid": fleet.coordinator.daemon.pid
        if fleet.coordinator and fleet.coordinator.daemon else None,
        "fuse_pid": fleet.fuse.daemon.pid if fleet.fuse and fleet.fuse.daemon else None,
        "pools": [z.pool.name for z in fleet.zones] + [c.pool.name for c in fleet.cns],
    }
    path = fleet.workdir / STATE_FILE
    path.write_text(json.dumps(state, indent=2))
    return path


def _ours(pid: int, needle: str) -> bool:
    try:
        return needle in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


async def stop_kept(workdir: Path) -> int:
    """Stop a fleet left by ``--keep``: its daemons by pid, its pools, its zfs-fuse."""
    state = json.loads((workdir / STATE_FILE).read_text())
    daemons = [(p, "snapper_zone.daemon.main") for p in state["pids"]]
    if state.get("coordinator_pid"):
        daemons.append((state["coordinator_pid"], "rebalance.coordinator"))
    for pid, needle in daemons:
        if _ours(pid, needle):
            os.kill(pid, signal.SIGTERM)
    zfs = Zfs()
    for pool in state["pools"]:
        if pool in await zfs.pools():
            await zfs.pool_destroy(pool)
    fuse = state.get("fuse_pid")
    if fuse and _ours(fuse, "zfs-fuse"):
        os.kill(fuse, signal.SIGTERM)
    # Say "stopped" only once it is true: each process is gone (or 30 s passed).
    deadline = time.monotonic() + 30
    for pid, needle in daemons + ([(fuse, "zfs-fuse")] if fuse else []):
        while _ours(pid, needle) and time.monotonic() < deadline:  # noqa: ASYNC110 (not our child: no event to wait on)
            await asyncio.sleep(0.1)
        if _ours(pid, needle):
            print(f"warning: pid {pid} is still running", file=sys.stderr)
    print(f"stopped the fleet in {workdir}")
    return 0


async def run_demo(keep: bool, workdir: Path | None, data_mib: int) -> int:
    wd = workdir or Path(tempfile.mkdtemp(prefix="snapper-demo-"))
    say(f"Starting a local fleet in {wd}")
    fleet = await LocalFleet.start(wd, zones=3, cns=2, vms_per_cn=2, pool_size=1 << 30,
                                   coordinator=True, lost_after=5.0)
    ok = False
    try:
        await Demo(fleet, data_mib).run()
        ok = True
        if keep:
            state = _write_state(fleet)
            say("Fleet left running (--keep). Stop it with:")
            info(f"snapper demo --stop {state.parent}")
            return 0
        say("Demo complete: cleaning up (daemons stopped, pools destroyed)")
        return 0
    finally:
        if not keep:
            await fleet.stop()
            if ok and workdir is None:
                shutil.rmtree(wd, ignore_errors=True)
            elif not ok:
                print(f"logs kept in {wd}", file=sys.stderr)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep", action="store_true", help="leave the fleet running afterwards")
    p.add_argument("--stop", metavar="WORKDIR", type=Path,
                   help="stop a fleet left running by --keep")
    p.add_argument("--workdir", type=Path, help="where pools, keys and logs go (default: a "
                   "new temporary directory)")
    p.add_argument("--data-mib", type=int, default=16, help="MiB of data per VM disk")


def run(args: argparse.Namespace) -> int:
    if args.stop is not None:
        return asyncio.run(stop_kept(args.stop))
    try:
        return asyncio.run(run_demo(args.keep, args.workdir, args.data_mib))
    except KeyboardInterrupt:
        print("\ninterrupted: the fleet was stopped and its pools destroyed", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="snapper demo", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
