"""``snapper``: the compute node's command line (push, restore, list, export, import).

    snapper [--config F] [--zone HOST:PORT] [--key PATH]
            [--known-hosts PATH | --host-key PUBFILE] [--dataset-root DS] COMMAND ...

    snapper push VM_UUID [--name SNAP] [--from BASE] [--metadata FILE]
                 [--durability mirrored|local]
    snapper restore VM_UUID SNAP [--target DATASET] [--rollback] [--metadata-out FILE]
                    [--to-cn CN]
    snapper list [VM_UUID] [--json]
    snapper export VM_UUID SNAP FILE [--json]
    snapper import FILE [--target DATASET] [--check] [--metadata-out FILE] [--json]
    snapper import FILE --onto-zone [--durability mirrored|local]

Options on the command line override the config file (TOML, see
``etc/snapper-cn.example.toml``). Errors print one line on stderr; the exit
status is 0 on success, 1 when the operation failed, 2 for a usage or
configuration error. Each subcommand is one function taking the parsed
arguments, so later ones (``demo``, ``zones``, ``status``) slot in beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncssh

from snapper_zone.cn.client import (
    CnClient,
    PlanError,
    PushReport,
    lookup_placement,
    lookup_policy,
)
from snapper_zone.cn.client import placement as placement  # re-exported: the CN's lookup
from snapper_zone.cn.links import ZoneLinks
from snapper_zone.common import progress
from snapper_zone.common.answers import AnswerCache
from snapper_zone.common.config import ConfigError, FieldParser, read_document
from snapper_zone.common.durations import parse_duration
from snapper_zone.common.progress import SizeError, format_bytes, parse_size
from snapper_zone.common.version import add_version_argument
from snapper_zone.errors import InvalidName, NotPlacedHere, SnapperError
from snapper_zone.policy import InvalidPolicy, PolicySet, Snap, level_of, load_policies
from snapper_zone.transfer.remote import ZoneClient, ZoneError, ZoneUnreachable
from snapper_zone.zfs.names import Dataset, check_uuid
from snapper_zone.zfs.zfs import Zfs

if TYPE_CHECKING:
    from snapper_zone.cn.agent import Outcome

# ``cn.agent`` and ``cn.archive`` (which brings the zone's receive path) are
# imported by the commands that use them: a push starts without them.

DEFAULT_CONFIG = "/opt/smartdc/snapper/etc/snapper-cn.toml"
CONFIG_ENV = "SNAPPER_CN_CONFIG"
log = logging.getLogger("snapper.cn")
_CONFIG_FIELDS = ("zones", "key", "known_hosts", "host_key", "dataset_root",
                  "coordinator_url", "coordinator_key", "state_dir", "ssh_client",
                  "ssh_user", "use_gate")
# What carries a pushed stream: OpenSSH's ssh (when installed; about twice the
# rate of asyncssh's client in Python, bench/cn_path.py), or asyncssh.
SSH_CLIENTS = ("openssh", "asyncssh")
# The CN's answer cache (the coordinator's last verified placement per VM), in
# state_dir: by default beside the agent's state file.
ANSWERS_FILE = "cn-placements.json"
DEFAULT_STATE_DIR = "/var/opt/smartdc/snapper"


class UsageError(Exception):
    """Bad arguments or configuration: exit status 2."""


@dataclass(frozen=True)
class CnSettings:
    zone_host: str
    zone_port: int
    key: Path
    known_hosts: Path | None
    host_key: Path | None
    dataset_root: str
    # Every zone of the config, in order: a push fails over to the next one
    # when a zone does not answer (the first is ``zone_host:zone_port``).
    zones: tuple[tuple[str, int], ...] = ()
    coordinator_url: str | None = None
    coordinator_key: str | None = None  # OpenSSH line: placements must be signed by it
    # Where the last verified placement of each VM is kept: pushes go on to the
    # known pair while no coordinator answers.
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    openssh: str | None = None  # the ssh binary that carries pushed streams; None: asyncssh
    # Who we log in as: snapperd ignores it, a zone's sshd gate (docs/data-plane.md) does not.
    ssh_user: str = "snapper"
    use_gate: bool = True  # a zone's sshd gate for large streams, when it offers one


def parse_endpoint(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6addr]:port``."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"zone endpoint {text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def parse_vm(text: str) -> str:
    """A VM uuid argument, checked before anything runs (argparse: exit 2)."""
    try:
        return check_uuid(text.lower(), "VM uuid")
    except InvalidName as e:
        raise argparse.ArgumentTypeError(e.message) from None


def parse_rate(text: str) -> float:
    """"50M", "50MiB" -> 52428800.0 bytes/s: the one size grammar (``progress.parse_size``),
    for argparse (ArgumentTypeError on bad input)."""
    try:
        value = parse_size(text)
    except SizeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"rate must be positive: {text!r}")
    return float(value)


def load_cn_config(path: Path) -> dict[str, Any]:
    """Read and check the CN config file with the one config loader
    (``common/config.py``): every problem is a ConfigError naming the file and
    the field, an unknown field suggests the one meant."""
    f = FieldParser(str(path))
    data = dict(f.table("", read_document(path), _CONFIG_FIELDS))
    zones = data.get("zones", [])
    if not isinstance(zones, list):
        raise f.err("zones", 'must be a list of "HOST:PORT" strings')
    for i, z in enumerate(zones):
        try:
            parse_endpoint(f.string(f"zones[{i}]", z))
        except UsageError as e:
            raise f.err(f"zones[{i}]", str(e)) from None
    for k in ("key", "known_hosts", "host_key", "dataset_root", "coordinator_key", "state_dir"):
        if k in data:
            f.string(k, data[k])
    if "ssh_user" in data:
        f.ident("ssh_user", data["ssh_user"])
    if "use_gate" in data:
        f.boolean("use_gate", data["use_gate"])
    if "coordinator_url" in data:
        f.url("coordinator_url", data["coordinator_url"])
    if "ssh_client" in data and f.string("ssh_client", data["ssh_client"]) not in SSH_CLIENTS:
        raise f.err("ssh_client", f"{data['ssh_client']!r} is not one of: "
                    + ", ".join(SSH_CLIENTS))
    if "coordinator_key" in data:
        try:
            asyncssh.import_public_key(str(data["coordinator_key"]).strip())
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise f.err("coordinator_key", f"not an OpenSSH public key line: {exc}") from exc
    # Relative paths are relative to the config file, so the two can move together.
    for k in ("key", "known_hosts", "host_key", "state_dir"):
        if k in data:
            data[k] = str(f.path(k, data[k]))
    return data


def config_path(args: argparse.Namespace) -> Path | None:
    """The ``snapper`` config file: ``--config``, else ``$SNAPPER_CN_CONFIG``, else
    the default path if it exists (the CN's file; operator commands read its
    ``coordinator_url`` too)."""
    given = getattr(args, "config", None) or os.environ.get(CONFIG_ENV)
    if given:
        return Path(given)
    return Path(DEFAULT_CONFIG) if Path(DEFAULT_CONFIG).exists() else None


def _config(args: argparse.Namespace) -> dict[str, Any]:
    path = config_path(args)
    return load_cn_config(path) if path is not None else {}


def dataset_root(args: argparse.Namespace) -> str:
    """Where this CN's VMs are (what a command that needs no zone takes of the config)."""
    return str(args.dataset_root or _config(args).get("dataset_root") or "zones")


def settings(args: argparse.Namespace) -> CnSettings:
    cfg = _config(args)
    listed = [args.zone] if args.zone else list(cfg.get("zones") or [])
    coordinator = cfg.get("coordinator_url")
    if not listed and not coordinator:
        raise UsageError("no zone: give --zone HOST:PORT, or zones = [...] or "
                         "coordinator_url in --config")
    endpoints = tuple(parse_endpoint(z) for z in listed)
    host, port = endpoints[0] if endpoints else ("", 0)
    key = args.key or cfg.get("key")
    if not key:
        raise UsageError("no client key: give --key PATH or key = \"...\" in --config")
    known = args.known_hosts
    pinned = args.host_key
    if known is None and pinned is None:
        known, pinned = cfg.get("known_hosts"), cfg.get("host_key")
    if known and pinned:
        raise UsageError("give either a known_hosts file or a pinned host key, not both")
    for what, path in (("key", key), ("known_hosts", known), ("host_key", pinned)):
        if path and not Path(path).is_file():
            raise UsageError(f"{what} {path}: no such file")
    client = getattr(args, "ssh_client", None) or cfg.get("ssh_client")
    openssh = shutil.which("ssh") if client in (None, "openssh") else None
    if client == "openssh" and openssh is None:
        raise UsageError("ssh_client openssh: no ssh command on PATH")
    return CnSettings(host, port, Path(key), Path(known) if known else None,
                      Path(pinned) if pinned else None,
                      args.dataset_root or cfg.get("dataset_root") or "zones",
                      endpoints, str(coordinator) if coordinator else None,
                      cfg.get("coordinator_key"),
                      Path(cfg.get("state_dir") or DEFAULT_STATE_DIR), openssh,
                      str(cfg.get("ssh_user") or "snapper"), cfg.get("use_gate", True))


def _client(s: CnSettings) -> ZoneClient:
    if not s.zone_host:
        raise UsageError("this command needs a zone: give --zone HOST:PORT or zones = [...]")
    return ZoneClient(s.zone_host, s.zone_port, s.key, known_hosts=s.known_hosts,
                      host_key=s.host_key, openssh=s.openssh, username=s.ssh_user,
                      use_gate=s.use_gate)


async def _push_targets(s: CnSettings, vm: str) -> list[ZoneClient]:
    """Where to push ``vm``, best first: the coordinator's placement, else the config's zones.

    The coordinator names both of the VM's zones with their host keys; the
    CN pins those. Without one, a pinned ``--host-key`` fits only the first
    zone, so failover needs a known_hosts file.
    """
    if s.coordinator_url:
        cache = AnswerCache.load(s.state_dir / ANSWERS_FILE, log, min_interval=0)
        placed = await lookup_placement(s.coordinator_url, vm, s.key, s.coordinator_key,
                                        cache)
        if placed.seen_at is not None:
            print(f"snapper: push: {placed.note()}", file=sys.stderr)
        try:
            return [ZoneClient(e["ssh_host"], int(e["ssh_port"]), s.key,
                               host_key=asyncssh.import_public_key(e["host_key"]),
                               openssh=s.openssh, username=s.ssh_user, use_gate=s.use_gate)
                    for e in placed.endpoints]
        except (KeyError, TypeError, ValueError, asyncssh.KeyImportError) as exc:
            raise ZoneError("BadAnswer", f"placement of VM {vm}: an endpoint without a "
                            f"usable ssh_host, ssh_port or host_key: {exc}",
                            "placement") from exc
    zones = s.zones or ((s.zone_host, s.zone_port),)
    if s.host_key is not None:
        zones = zones[:1]
    return [ZoneClient(h, p, s.key, known_hosts=s.known_hosts, host_key=s.host_key,
                       openssh=s.openssh, username=s.ssh_user, use_gate=s.use_gate)
            for h, p in zones]


def _reporter(choice: str) -> progress.Reporter:
    if choice == "none":
        return progress.NoProgress()
    if choice == "json":
        return progress.JsonProgress(sys.stderr)
    if choice == "bar":
        return progress.TtyProgress(sys.stderr)
    return progress.for_stream(sys.stderr)


async def push_with_failover(s: CnSettings, vm: str, *, name: str | None, base: str | None,
                             metadata: dict[str, Any] | None, durability: str | None,
                             bwlimit: float | None, reporter: progress.Reporter,
                             links: ZoneLinks | None = None) -> PushReport:
    """Push to the VM's first zone that answers (``snapper push`` and the agent).

    ``links``: the agent's kept connections, used (and kept) instead of a
    connection made for this push and closed after it."""
    targets = await _push_targets(s, vm)
    for i, zone in enumerate(targets):
        try:
            async with _link(zone, links) as link:
                cn = CnClient(link, dataset_root=s.dataset_root, progress=reporter)
                cn.bwlimit = bwlimit
                return await cn.push(vm, name=name, base=base, metadata=metadata,
                                     durability=durability)
        except (ZoneUnreachable, ZoneError) as exc:
            # A zone a move took the VM away from (a placement from the cache)
            # says so before anything is sent: the pair's other zone may still hold it.
            moved = isinstance(exc, ZoneError) and exc.code == NotPlacedHere.code
            if i + 1 == len(targets) or not (moved or isinstance(exc, ZoneUnreachable)):
                raise
            # Failover: the other zone takes this snapshot; the pair converges later.
            print(f"snapper: push: {zone.endpoint} "
                  f"{'does not hold the VM' if moved else 'unreachable'} "
                  f"({_one_line(str(exc))}); trying {targets[i + 1].endpoint}",
                  file=sys.stderr)
    raise ZoneUnreachable(f"VM {vm}: no zone to push to")


@contextlib.asynccontextmanager
async def _link(zone: ZoneClient, links: ZoneLinks | None) -> AsyncIterator[ZoneClient]:
    """``zone`` connected for one push and closed after it, or (with ``links``) the
    kept link to it; a kept link is let go when anything but the zone's own answer
    (a ZoneError) ends the work on it, so that a retry starts on a new one."""
    if links is None:
        async with zone:
            yield zone
        return
    link = await links.connected(zone)
    try:
        yield link
    except ZoneError:
        raise
    except BaseException:
        await links.forget(link)
        raise


def slowest(*rates: float | None) -> float | None:
    """The lowest of the limits given (bytes/s); None when there is none."""
    given = [r for r in rates if r is not None]
    return min(given) if given else None


class CnPusher:
    """The agent's I/O (``cn/agent.Pusher``) on the CN client, with ``snapper push``'s
    zone failover."""

    def __init__(self, s: CnSettings, *, zfs: Zfs | None = None, vmadm: str | None = "vmadm",
                 bwlimit: float | None = None, links: ZoneLinks | None = None) -> None:
        self.s = s
        self.zfs = zfs or Zfs()
        self.vmadm = vmadm
        self.bwlimit = bwlimit
        self.links = links  # the agent's kept connections to its zones

    def _local(self) -> CnClient:
        # Local work only: the zone client is never connected.
        return CnClient(ZoneClient("127.0.0.1", 1, self.s.key), dataset_root=self.s.dataset_root,
                        zfs=self.zfs, vmadm=self.vmadm)

    async def local_vms(self) -> list[str]:
        return await self._local().local_vms()

    async def tags(self, vm: str) -> dict[str, str]:
        return await self._local().vm_tags(vm)

    async def local_snapshots(self, vm: str) -> list[str]:
        cn = self._local()
        return [i.snapshot.name for i in await self.zfs.snapshots(cn.vm_dataset(vm))]

    async def zone_snapshots(self, vm: str) -> list[Snap]:
        targets = await _push_targets(self.s, vm)
        for i, zone in enumerate(targets):
            try:
                async with _link(zone, self.links) as link:
                    snaps = await link.snapshots(vm)
                return [Snap(x.name, float(x.created), x.complete, level_of(x.name))
                        for x in snaps]
            except ZoneUnreachable:
                if i + 1 == len(targets):
                    raise
        return []

    async def push(self, vm: str, name: str, base: str | None, durability: str,
                   bwlimit: float | None = None) -> PushReport:
        return await push_with_failover(self.s, vm, name=name, base=base, metadata=None,
                                        durability=durability,
                                        bwlimit=slowest(self.bwlimit, bwlimit),
                                        reporter=progress.NoProgress(), links=self.links)

    async def destroy_local(self, vm: str, names: Sequence[str]) -> None:
        # Every part's: children, and a KVM VM's sibling disks, which -r on the
        # top would miss.
        parts = (await self._local().vm_layout(vm)).parts.values()
        for n in names:
            for ds in parts:
                if await self.zfs.exists(ds.snapshot(n)):
                    await self.zfs.destroy(ds.snapshot(n))


def _outcome_printer(as_json: bool) -> Callable[[Outcome], None]:
    def show(o: Outcome) -> None:
        if as_json:
            print(json.dumps(o.to_json(), sort_keys=True), flush=True)
            return
        what = f"from {o.base}" if o.base else "from the newest common snapshot"
        print(f"{o.vm} {o.level}: {o.snapshot} {what}: "
              + ("pushed" + (f", trimmed {len(o.trimmed)}" if o.trimmed else "")
                 if o.ok else f"FAILED: {o.error}"), flush=True)
    return show


def parse_backoff(text: str) -> tuple[float, float]:
    """``MIN,MAX`` durations (``30s,1h``): the agent's retry delays, for argparse."""
    lo, sep, hi = text.partition(",")
    try:
        got = (float(parse_duration(lo.strip())), float(parse_duration(hi.strip())))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"backoff {text!r}: {e}") from None
    if not sep or not 0 < got[0] <= got[1]:
        raise argparse.ArgumentTypeError(f"backoff {text!r}: write MIN,MAX with 0 < MIN <= MAX")
    return got


async def cmd_agent(args: argparse.Namespace, s: CnSettings) -> int:
    """Run the CN's policies: in the foreground until SIGTERM/SIGINT, or one pass.
    Each push's outcome is printed as it happens (a line, or JSON with ``--json``)."""
    from snapper_zone.cn.agent import Agent, AgentState

    source = None
    if args.policy_from_coordinator is not None:
        if not s.coordinator_url:
            raise UsageError("agent: --policy-from-coordinator needs coordinator_url in the "
                             "CN config (--config)")
        cache = AnswerCache.load(s.state_dir / ANSWERS_FILE, log, min_interval=0)
        name = args.policy_from_coordinator
        url, coordinator_key = s.coordinator_url, s.coordinator_key

        async def source() -> PolicySet:
            got = await lookup_policy(url, name, s.key, coordinator_key, cache)
            if got.note():
                print(f"snapper: agent: {got.note()}", file=sys.stderr, flush=True)
            return got.policies

        try:  # the first copy: from the coordinator, else the last one verified
            policies = await source()
        except InvalidPolicy as e:
            raise UsageError(f"agent: {e.message}") from e
    else:
        try:
            policies = load_policies(args.policy)
        except ConfigError as e:
            raise UsageError(f"agent: {e}") from e
    state = AgentState.load(Path(args.state))
    speed, origin = args.clock_speed, args.clock_origin
    if not speed > 0:
        raise UsageError(f"agent: --clock-speed {speed}: must be positive")
    if speed != 1.0 and origin is None:
        raise UsageError("agent: --clock-speed needs --clock-origin (the same on every "
                         "restart, so the compressed clock goes on where it was)")

    def clock() -> float:
        now = time.time()
        return now if origin is None else origin + (now - origin) * speed

    links = ZoneLinks()  # a pass's pushes to one zone share one login
    agent = Agent(policies, CnPusher(s, bwlimit=args.bwlimit, links=links), state,
                  cn_id=args.cn_id, backoff=args.backoff, report=_outcome_printer(args.json),
                  clock=clock, speed=speed, source=source)
    try:
        if args.once:
            outcomes = await agent.tick()
            return 0 if all(o.ok for o in outcomes) else 1
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, agent.wake.set)  # run a pass now
        await agent.run(stop)
        return 0
    finally:
        await links.close()


# -- subcommands ------------------------------------------------------------------


async def cmd_push(args: argparse.Namespace, s: CnSettings) -> int:
    meta: dict[str, Any] | None = None
    if args.metadata:
        try:
            meta = json.loads(await asyncio.to_thread(Path(args.metadata).read_text))
        except (OSError, ValueError) as exc:
            raise UsageError(f"--metadata {args.metadata}: {exc}") from exc
        if not isinstance(meta, dict):
            raise UsageError(f"--metadata {args.metadata}: must hold a JSON object")
    report = await push_with_failover(s, args.vm, name=args.name, base=args.base,
                                      metadata=meta, durability=args.durability,
                                      bwlimit=args.bwlimit, reporter=_reporter(args.progress))
    if args.json:
        print(json.dumps({"vm": report.vm, "snapshot": report.snapshot, "bytes": report.bytes,
                          "metadata": report.metadata_source, "durability": report.durability,
                          "zones": report.zones, "carried": report.carried,
                          "datasets": [vars(d) for d in report.datasets]}))
        return 0
    copies = len(report.zones)
    print(f"pushed {report.vm}@{report.snapshot} ({format_bytes(report.bytes)}, "
          f"metadata: {report.metadata_source}); durability {report.durability or 'n/a'}: "
          f"{copies} cop{'y' if copies == 1 else 'ies'} on {', '.join(report.zones) or '?'}")
    for d in report.datasets:
        base = f" from {d.base}" if d.base else ""
        how = f" ({', '.join(d.options)})" if d.options else ""
        print(f"  {d.label:<12} {d.action}{base}{how}  {format_bytes(d.bytes)}")
    if report.not_included:
        print(f"  not included (below a child dataset): {', '.join(report.not_included)}")
    if report.carried:
        print(f"  also committed (earlier snapshots sent with it, durability local): "
              f"{', '.join(report.carried)}")
    return 0


async def cmd_restore(args: argparse.Namespace, s: CnSettings) -> int:
    async with _client(s) as zone:
        cn = CnClient(zone, dataset_root=s.dataset_root, progress=_reporter(args.progress))
        try:
            report = await cn.restore(args.vm, args.snapshot, args.target,
                                      rollback=args.rollback, metadata_path=args.metadata_out)
        except ZoneError as e:
            if args.to_cn is None or e.code != "NotAuthorized":
                raise
            # Onto another CN than the VM's own: only an operator's grant in force lets it.
            raise ZoneError(e.code, f"{e.message}. Restoring VM {args.vm} onto CN "
                            f"{args.to_cn} needs an operator's grant in force: snapper grant "
                            f"restore {args.vm} --to-cn {args.to_cn} --for 1h",
                            e.command, e.exit_status) from e
    for d in report.datasets:
        base = f" from @{d.base}" if d.base else ""
        print(f"restored {d.dataset}@{report.snapshot}: {d.action}{base} "
              f"({format_bytes(d.bytes)})", file=sys.stderr)
        if "raw" in d.options:
            print(f"  {d.dataset} is encrypted, as it was: open it with "
                  f"`zfs load-key {d.dataset}` (the VM's key)", file=sys.stderr)
    if args.metadata_out is None:
        # The metadata goes to stdout so it can be piped (e.g. into vmadm).
        print(json.dumps(report.metadata, indent=2))
    return 0


async def cmd_export(args: argparse.Namespace, s: CnSettings) -> int:
    from snapper_zone.cn import archive

    async with _client(s) as zone:
        report = await archive.export_snapshot(zone, args.vm, args.snapshot, args.file,
                                               progress=_reporter(args.progress))
    if args.json:
        print(json.dumps(report.to_json()))
        return 0
    h = report.header
    print(f"exported {h.vm}@{h.snapshot} to {report.path} ({format_bytes(report.bytes)}, "
          f"{len(h.parts)} dataset{'s' if len(h.parts) != 1 else ''})")
    for p in h.parts:
        print(f"  {p.label:<12} guid {p.guid}  {format_bytes(p.bytes)}  sha256 {p.sha256}")
    return 0


async def cmd_import(args: argparse.Namespace, root: str) -> int:
    """Runs without a zone (the file holds all it needs), unless ``--onto-zone``."""
    from snapper_zone.cn import archive

    if args.onto_zone and (args.target or args.metadata_out):
        raise UsageError("--onto-zone takes neither --target nor --metadata-out")
    if args.durability and not args.onto_zone:
        raise UsageError("--durability is for --onto-zone only")
    progress = _reporter(args.progress)
    if args.check:
        header, _ = await archive.verify(args.file, progress=progress)
        report = archive.ArchiveReport(header, Path(args.file))
        if args.json:
            print(json.dumps(report.to_json()))
        else:
            print(f"{args.file}: {header.vm}@{header.snapshot}, {len(header.parts)} "
                  f"dataset(s), {format_bytes(header.stream_bytes)}: every checksum matches")
        return 0
    if args.onto_zone:
        async with _client(settings(args)) as zone:
            report = await archive.import_to_zone(args.file, zone, durability=args.durability,
                                                  progress=progress)
        if args.json:
            print(json.dumps({**report.to_json(), "zones": report.datasets}))
        else:
            h = report.header
            print(f"imported {h.vm}@{h.snapshot} into zone {report.target} "
                  f"({format_bytes(report.bytes)}); held by {', '.join(report.datasets) or '?'}")
        return 0
    report = await archive.import_snapshot(
        args.file, Zfs(), target=Dataset(args.target) if args.target else None,
        dataset_root=root, progress=progress)
    for p, ds in zip(report.header.parts, report.datasets, strict=True):
        print(f"imported {ds}@{report.header.snapshot} ({format_bytes(p.bytes)}, "
              f"guid {p.guid})", file=sys.stderr)
    meta = report.header.metadata
    if args.json:
        print(json.dumps({**report.to_json(), "metadata": meta}))
    elif args.metadata_out is not None:
        text = json.dumps(meta, indent=2) + "\n"
        await asyncio.to_thread(Path(args.metadata_out).write_text, text)
    else:
        print(json.dumps(meta, indent=2))  # as restore: pipe it into vmadm
    return 0


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


async def cmd_list(args: argparse.Namespace, s: CnSettings) -> int:
    async with _client(s) as zone:
        held = await CnClient(zone, dataset_root=s.dataset_root).list(args.vm)
    if args.json:
        print(json.dumps(held))
        return 0
    rows = [["VM", "SNAPSHOT", "COMPLETE", "CREATED", "SIZE", "DATASETS"]]
    for vm, snaps in held.items():
        for snap in snaps:
            created = snap.get("created") or 0
            rows.append([vm, str(snap.get("name")), "yes" if snap.get("complete") else "no",
                         time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))
                         if created else "-",
                         format_bytes(int(snap.get("size") or 0)),
                         ",".join(sorted(snap.get("datasets") or {}))])
    print(_table(rows))
    return 0


Handler = Callable[[argparse.Namespace, CnSettings], Coroutine[Any, Any, int]]
# A command that needs no zone (import): it gets the CN's dataset root only.
OfflineHandler = Callable[[argparse.Namespace, str], Coroutine[Any, Any, int]]


def build_parser(more: Callable[[Any], None] | None = None) -> argparse.ArgumentParser:
    """The CN's commands; ``more(subparsers)`` adds the rest of ``snapper``'s."""
    p = argparse.ArgumentParser(prog="snapper", description="Push VM snapshots to snapper "
                                "zones and restore them (run on a compute node).")
    add_version_argument(p)
    p.add_argument("--config", help=f"CN config file (TOML); default ${CONFIG_ENV} or "
                   f"{DEFAULT_CONFIG} if it exists. Its coordinator_url is also where the "
                   "operator commands go without --coordinator or $SNAPPER_COORDINATOR")
    p.add_argument("--zone", metavar="HOST:PORT", help="the snapper zone's SSH endpoint")
    p.add_argument("--key", metavar="PATH", help="this CN's SSH private key")
    trust = p.add_mutually_exclusive_group()
    trust.add_argument("--known-hosts", metavar="PATH", help="known_hosts file for the zone")
    trust.add_argument("--host-key", metavar="PUBFILE", help="pin the zone's host key (.pub)")
    p.add_argument("--dataset-root", metavar="DATASET",
                   help="parent of the VMs' datasets on this CN (default: zones)")
    p.add_argument("--ssh-client", choices=SSH_CLIENTS,
                   help="what carries a pushed stream: OpenSSH's ssh (the default when "
                   "installed: faster) or asyncssh (snapper's own connection)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    push = sub.add_parser("push", help="snapshot a VM and store it on the zone")
    push.add_argument("vm", metavar="VM_UUID", type=parse_vm)
    push.add_argument("--name", help="snapshot name (default: UTC time, e.g. 20260101T120000Z); "
                      "an existing local snapshot of that name is pushed as is")
    push.add_argument("--from", dest="base", metavar="BASE",
                      help="incremental from this snapshot or bookmark (default: the newest "
                      "one both sides hold)")
    push.add_argument("--metadata", metavar="FILE",
                      help="VM metadata JSON to store with it (default: vmadm get)")
    push.add_argument("--durability", choices=("mirrored", "local"),
                      help="mirrored: return once both of the VM's zones hold it; local: once "
                      "the zone pushed to does (the mirror follows). Default: the zone's")
    push.add_argument("--bwlimit", type=parse_rate, metavar="RATE",
                      help="pace the stream to RATE bytes/s (50MiB, 1.5G, 100k: powers of 1024)")
    push.add_argument("--json", action="store_true", help="print the result as JSON")
    push.set_defaults(handler=cmd_push)

    restore = sub.add_parser("restore", help="bring a VM snapshot back from the zone")
    restore.add_argument("vm", metavar="VM_UUID", type=parse_vm)
    restore.add_argument("snapshot", metavar="SNAP")
    restore.add_argument("--target", metavar="DATASET",
                         help="restore into this new dataset instead of the VM's own")
    restore.add_argument("--rollback", action="store_true",
                         help="roll the VM's datasets back, discarding later local snapshots "
                         "and changes (receive -F)")
    restore.add_argument("--metadata-out", metavar="FILE",
                         help="write the metadata JSON here (default: stdout)")
    restore.add_argument("--to-cn", metavar="CN",
                         help="this CN (its id) restores a VM it does not own, under an "
                         "operator's grant (snapper grant restore VM --to-cn CN --for 1h)")
    restore.set_defaults(handler=cmd_restore)

    export = sub.add_parser("export", help="write a VM snapshot the zone holds (every "
                            "dataset) to one file, e.g. on an NFS mount")
    export.add_argument("vm", metavar="VM_UUID")
    export.add_argument("snapshot", metavar="SNAP")
    export.add_argument("file", metavar="FILE", help="the export file (must not exist)")
    export.add_argument("--json", action="store_true", help="print the result as JSON")
    export.set_defaults(handler=cmd_export)

    imp = sub.add_parser("import", help="receive an export file onto this CN (checked "
                         "whole first; needs no zone)")
    imp.add_argument("file", metavar="FILE")
    imp.add_argument("--target", metavar="DATASET",
                     help="receive into this new dataset (default: the VM's own, "
                     "DATASET_ROOT/VM_UUID, which must not exist)")
    imp.add_argument("--check", action="store_true",
                     help="only verify the file (header, length, checksums); receive nothing")
    imp.add_argument("--metadata-out", metavar="FILE",
                     help="write the VM's metadata JSON here (default: stdout)")
    imp.add_argument("--onto-zone", action="store_true",
                     help="push it into the zone (--zone or the config's first) instead, "
                     "as this CN: for a zone that must hold the VM again")
    imp.add_argument("--durability", choices=("mirrored", "local"),
                     help="with --onto-zone: as push's (default: the zone's)")
    imp.add_argument("--json", action="store_true", help="print the result as JSON")
    imp.set_defaults(offline=cmd_import)

    agent = sub.add_parser("agent", help="run the policies for this CN's VMs: snapshots "
                           "on schedule, pushed from their base (SMF: svc:/smartdc/snapper-agent)")
    which = agent.add_mutually_exclusive_group(required=True)
    which.add_argument("--policy", metavar="FILE",
                       help="the policy file (etc/policy.example.toml documents it)")
    which.add_argument("--policy-from-coordinator", metavar="NAME",
                       help="the coordinator's copy of policy NAME (snapper policy set), "
                       "read again before each pass; the last verified copy (in state_dir) "
                       "while the coordinator does not answer")
    agent.add_argument("--state", metavar="FILE",
                       default="/var/opt/smartdc/snapper/agent-state.json",
                       help="where the agent records what it did (default: %(default)s)")
    agent.add_argument("--cn-id", metavar="ID", help="this CN's id, for policies by cns")
    agent.add_argument("--once", action="store_true",
                       help="one pass (push what is due now), then exit: 1 if a push failed")
    agent.add_argument("--bwlimit", type=parse_rate, metavar="RATE",
                       help="pace each stream to RATE bytes/s")
    agent.add_argument("--backoff", type=parse_backoff, metavar="MIN,MAX", default=(30.0, 3600.0),
                       help="a failed push is retried after MIN, doubling up to MAX "
                       "(durations: 30s,1h, the default)")
    agent.add_argument("--json", action="store_true",
                       help="print each outcome as one JSON line (started, ended and "
                       "retry_at in seconds since the epoch, on the agent's clock)")
    # A compressed clock, for tests and the soak: a policy's hour in a minute.
    agent.add_argument("--clock-speed", type=float, default=1.0, metavar="K",
                       help="for tests: the agent's clock runs K times real time from "
                       "--clock-origin (schedules, backoff and snapshot names follow it)")
    agent.add_argument("--clock-origin", type=float, default=None, metavar="EPOCH",
                       help="for tests: where the compressed clock agrees with real time")
    agent.set_defaults(handler=cmd_agent)

    lst = sub.add_parser("list", help="what the zone holds (default: this CN's VMs)")
    lst.add_argument("vm", metavar="VM_UUID", nargs="?", type=parse_vm)
    lst.add_argument("--json", action="store_true", help="print JSON instead of a table")
    lst.set_defaults(handler=cmd_list)

    if more is not None:
        more(sub)

    for sp in (push, restore, export, imp):
        sp.add_argument("--progress", choices=("auto", "bar", "json", "none"), default="auto",
                        help="progress on stderr: a bar on a terminal, JSON lines otherwise")
    return p


def main(argv: Sequence[str] | None = None,
         more: Callable[[Any], None] | None = None) -> int:
    parser = build_parser(more)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    if getattr(args, "standalone", None) is not None:
        status: int = args.standalone(args)
        return status
    try:
        offline: OfflineHandler | None = getattr(args, "offline", None)
        if offline is not None:
            return asyncio.run(offline(args, dataset_root(args)))
        s = settings(args)
        handler: Handler = args.handler
        return asyncio.run(handler(args, s))
    except (UsageError, ConfigError) as exc:
        print(f"snapper: {exc}", file=sys.stderr)
        return 2
    except PlanError as exc:
        # The one multi-line error: both histories are what a person needs to decide.
        print(f"snapper: {args.command}: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except (ZoneError, ZoneUnreachable, SnapperError) as exc:
        code = getattr(exc, "code", type(exc).__name__)
        print(f"snapper: {args.command}: {code}: {_one_line(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("snapper: interrupted", file=sys.stderr)
        return 130


def _one_line(text: str) -> str:
    return " ".join(text.split())[:2000]


if __name__ == "__main__":
    sys.exit(main())
