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
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
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
from snapper_zone.cn.control import ControlServer
from snapper_zone.cn.handoff import ControlError, PushRequest, socket_path
from snapper_zone.cn.links import ZoneLinks
from snapper_zone.cn.options import (
    ANSWERS_FILE,
    CONFIG_ENV,
    DEFAULT_CONFIG,
    DEFAULT_STATE_DIR,
    SSH_CLIENTS,
    CnSettings,
    UsageError,
    build_parser,
    config_path,
    dataset_root,
    load_cn_config,
    parse_backoff,
    parse_endpoint,
    parse_rate,
    parse_vm,
    read_metadata,
    settings,
)
from snapper_zone.cn.output import show_push
from snapper_zone.common import progress
from snapper_zone.common.answers import AnswerCache
from snapper_zone.common.config import ConfigError
from snapper_zone.common.progress import format_bytes
from snapper_zone.errors import NotPlacedHere, SnapperError
from snapper_zone.policy import InvalidPolicy, PolicySet, Snap, level_of, load_policies
from snapper_zone.transfer.remote import ZoneClient, ZoneError, ZoneUnreachable
from snapper_zone.zfs.names import Dataset
from snapper_zone.zfs.zfs import Zfs

if TYPE_CHECKING:
    from snapper_zone.cn.agent import Outcome

# Re-exported: this module is the CN's command line, its options included.
__all__ = ["ANSWERS_FILE", "CONFIG_ENV", "DEFAULT_CONFIG", "DEFAULT_STATE_DIR", "SSH_CLIENTS",
           "CnPusher", "CnSettings", "UsageError", "build_parser", "config_path",
           "dataset_root", "load_cn_config", "main", "parse_backoff", "parse_endpoint",
           "parse_rate", "parse_vm", "placement", "push_with_failover", "settings", "slowest"]
log = logging.getLogger("snapper.cn")

# ``cn.agent`` and ``cn.archive`` (which brings the zone's receive path) are
# imported by the commands that use them: a push starts without them.

def _client(s: CnSettings) -> ZoneClient:
    if not s.zone_host:
        raise UsageError("this command needs a zone: give --zone HOST:PORT or zones = [...]")
    return ZoneClient(s.zone_host, s.zone_port, s.key, known_hosts=s.known_hosts,
                      host_key=s.host_key, openssh=s.openssh, username=s.ssh_user,
                      use_gate=s.use_gate)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def _push_targets(s: CnSettings, vm: str,
                        say: Callable[[str], None] = _stderr) -> list[ZoneClient]:
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
            say(f"snapper: push: {placed.note()}")
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


async def push_with_failover(s: CnSettings, vm: str, *, name: str | None, base: str | None,
                             metadata: dict[str, Any] | None, durability: str | None,
                             bwlimit: float | None, reporter: progress.Reporter,
                             links: ZoneLinks | None = None,
                             say: Callable[[str], None] = _stderr) -> PushReport:
    """Push to the VM's first zone that answers (``snapper push`` and the agent).

    ``links``: the agent's kept connections, used (and kept) instead of a
    connection made for this push and closed after it. ``say``: where the
    notes for the person pushing go (stderr; the agent's: its client's)."""
    targets = await _push_targets(s, vm, say)
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
            say(f"snapper: push: {zone.endpoint} "
                f"{'does not hold the VM' if moved else 'unreachable'} "
                f"({_one_line(str(exc))}); trying {targets[i + 1].endpoint}")
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
        # One push of a VM at a time: the agent's own and those `snapper push` hands it.
        self._vm_locks: dict[str, asyncio.Lock] = {}

    def vm_lock(self, vm: str) -> asyncio.Lock:
        return self._vm_locks.setdefault(vm, asyncio.Lock())

    async def push_for_cli(self, req: PushRequest, reporter: progress.Reporter,
                           say: Callable[[str], None]) -> dict[str, Any]:
        """A push `snapper push` handed over (``cn/control.py``): its settings, its
        options and its own pace, on this agent's links."""
        async with self.vm_lock(req.vm):
            report = await push_with_failover(
                req.settings, req.vm, name=req.name, base=req.base, metadata=req.metadata,
                durability=req.durability, bwlimit=req.bwlimit, reporter=reporter,
                links=self.links, say=say)
        return push_document(report)

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
        async with self.vm_lock(vm):
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
    pusher = CnPusher(s, bwlimit=args.bwlimit, links=links)
    agent = Agent(policies, pusher, state, cn_id=args.cn_id, backoff=args.backoff,
                  report=_outcome_printer(args.json), clock=clock, speed=speed, source=source)
    control: ControlServer | None = None
    try:
        if args.once:
            outcomes = await agent.tick()
            return 0 if all(o.ok for o in outcomes) else 1
        control = await _control(s, pusher)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, agent.wake.set)  # run a pass now
        await agent.run(stop)
        return 0
    finally:
        if control is not None:
            await control.close()
        await links.close()


async def _control(s: CnSettings, pusher: CnPusher) -> ControlServer | None:
    """The socket `snapper push` hands its pushes to (``cn/control.py``), in state_dir;
    None, said on stderr, where it cannot listen (the agent runs on without it)."""
    path = socket_path(s.state_dir)
    server = ControlServer(path, pusher.push_for_cli, lambda exc: failure("push", exc))
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        await server.start()
    except (OSError, ControlError) as exc:
        print(f"snapper: agent: no control socket ({exc}): `snapper push` pushes by itself",
              file=sys.stderr, flush=True)
        return None
    return server


# -- subcommands ------------------------------------------------------------------


def push_document(report: PushReport) -> dict[str, Any]:
    """A push's result as ``snapper push --json`` prints it (and the agent hands it back)."""
    return {"vm": report.vm, "snapshot": report.snapshot, "bytes": report.bytes,
            "metadata": report.metadata_source, "durability": report.durability,
            "zones": report.zones, "carried": report.carried,
            "datasets": [vars(d) for d in report.datasets],
            "not_included": report.not_included}


async def cmd_push(args: argparse.Namespace, s: CnSettings) -> int:
    meta = await asyncio.to_thread(read_metadata, args.metadata)
    report = await push_with_failover(s, args.vm, name=args.name, base=args.base,
                                      metadata=meta, durability=args.durability,
                                      bwlimit=args.bwlimit,
                                      reporter=progress.for_choice(args.progress))
    show_push(push_document(report), args.json)
    return 0


async def cmd_restore(args: argparse.Namespace, s: CnSettings) -> int:
    async with _client(s) as zone:
        cn = CnClient(zone, dataset_root=s.dataset_root,
                      progress=progress.for_choice(args.progress))
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
                                               progress=progress.for_choice(args.progress))
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
    reporter = progress.for_choice(args.progress)
    if args.check:
        header, _ = await archive.verify(args.file, progress=reporter)
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
                                                  progress=reporter)
        if args.json:
            print(json.dumps({**report.to_json(), "zones": report.datasets}))
        else:
            h = report.header
            print(f"imported {h.vm}@{h.snapshot} into zone {report.target} "
                  f"({format_bytes(report.bytes)}); held by {', '.join(report.datasets) or '?'}")
        return 0
    report = await archive.import_snapshot(
        args.file, Zfs(), target=Dataset(args.target) if args.target else None,
        dataset_root=root, progress=reporter)
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


# The CN's commands by name (options.build_parser names them).
HANDLERS: dict[str, Handler] = {"push": cmd_push, "restore": cmd_restore, "export": cmd_export,
                                "agent": cmd_agent, "list": cmd_list}
OFFLINE: dict[str, OfflineHandler] = {"import": cmd_import}


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
        offline = OFFLINE.get(args.command)
        if offline is not None:
            return asyncio.run(offline(args, dataset_root(args)))
        s = settings(args)
        handler: Handler = getattr(args, "handler", None) or HANDLERS[args.command]
        return asyncio.run(handler(args, s))
    except KeyboardInterrupt:
        print("snapper: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        said = failure(args.command, exc)
        if said is None:
            raise
        print(said[0], file=sys.stderr)
        return said[1]


def failure(command: str, exc: BaseException) -> tuple[str, int] | None:
    """What a command that failed with ``exc`` prints on stderr, and its exit status
    (2 for usage or configuration, 1 for the operation); None for a bug."""
    if isinstance(exc, UsageError | ConfigError):
        return f"snapper: {exc}", 2
    if isinstance(exc, PlanError):
        # The one multi-line error: both histories are what a person needs to decide.
        return f"snapper: {command}: {exc.code}: {exc.message}", 1
    if isinstance(exc, ZoneError | ZoneUnreachable | SnapperError):
        code = getattr(exc, "code", type(exc).__name__)
        return f"snapper: {command}: {code}: {_one_line(str(exc))}", 1
    return None


def _one_line(text: str) -> str:
    return " ".join(text.split())[:2000]


if __name__ == "__main__":
    sys.exit(main())
