"""``snapperd --config FILE``: the daemon of one snapper zone (SSH streams + HTTP API).

Exit status: 0 after a clean stop (SIGTERM/SIGINT), 2 for a problem an
operator must fix before a restart can help (bad config or arguments, a
missing delegated root), 1 for anything else that stops it.
Logs are bunyan JSON lines on stderr (SMF captures them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncssh
from aiohttp import web

from replication.coordinator_client import CoordinatorClient
from replication.identity import IdentityFollower
from replication.peers import PeerLinks
from replication.registration import Registrar, zone_record
from replication.replicator import Replicator
from snapper_zone.common.answers import AnswerCache
from snapper_zone.common.bootstrap import (
    EXIT_OK,
    EXIT_USAGE,
    Parser,
    StartupError,
    ensure_private_key,
    run_daemon,
    write_atomically,
)
from snapper_zone.common.config import ConfigError, ZoneConfig, load_config
from snapper_zone.common.httpsig import Signer
from snapper_zone.daemon.gateserver import GateServer
from snapper_zone.daemon.httpapi import make_app
from snapper_zone.daemon.prune import Pruner
from snapper_zone.daemon.service import Service
from snapper_zone.daemon.sshserver import start_ssh_server
from snapper_zone.daemon.zone import Zone
from snapper_zone.errors import SnapperError
from snapper_zone.policy import PolicySet, load_policies
from snapper_zone.wire import ZoneRegistration
from snapper_zone.zfs.names import Dataset
from snapper_zone.zfs.zfs import SAFE_CONTAINER_PROPS, Zfs

__all__ = ["main"]

# SMF's stop method (:kill) waits 60 s before SIGKILL; the HTTP drain plus the
# transfer grace period stay well inside it by default.
DEFAULT_GRACE = 30.0
HTTP_DRAIN = 5.0
_POLL = 0.1  # how often the grace period looks at the transfer registry

def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="snapperd", description="Snapper zone daemon: receives, keeps and "
                "serves VM snapshots in this zone's delegated ZFS dataset.")
    p.add_argument("--config", required=True, metavar="FILE",
                   help="snapperd config (TOML, or JSON if it ends in .json)")
    p.add_argument("--log-level", default="info",
                   help="trace, debug, info, warn, error or fatal (default: info)")
    p.add_argument("--ready-file", type=Path, metavar="PATH",
                   help='once both listeners are up, write {"pid", "ssh_port", "http_port"} '
                   "here (atomically)")
    p.add_argument("--create-root", action="store_true",
                   help="create the delegated root dataset if missing (development and "
                   "demos; in production it must already exist)")
    p.add_argument("--grace", type=float, default=DEFAULT_GRACE, metavar="SECONDS",
                   help="on SIGTERM, how long in-flight transfers may run on "
                   f"(default: {DEFAULT_GRACE:g})")
    return p


def ensure_host_key(path: Path, log: logging.Logger) -> None:
    """Generate an ed25519 host key (mode 0600) at ``path`` unless one is there."""
    ensure_private_key(path, "ssh.host_key", "snapperd host key", log)


async def ensure_root(zfs: Zfs, root: Dataset, create: bool, log: logging.Logger) -> None:
    """The delegated root exists and is safe: never mounted, nothing in it runnable
    (``SAFE_CONTAINER_PROPS``, which its VMs' datasets inherit)."""
    if await zfs.exists(root):
        await _make_safe(zfs, root, log)
        return
    if not create:
        raise StartupError(f"delegated root dataset {root} does not exist: delegate it to "
                           "this zone (or run with --create-root for a demo)", EXIT_USAGE)
    try:
        await zfs.create(root, parents=True, props=SAFE_CONTAINER_PROPS)
    except SnapperError as e:
        raise StartupError(f"cannot create root dataset {root}: {e}", EXIT_USAGE) from e
    log.info("created root dataset", extra={"root": str(root)})


async def _make_safe(zfs: Zfs, root: Dataset, log: logging.Logger) -> None:
    """Set ``SAFE_CONTAINER_PROPS`` on an existing root where they differ; a zone not
    delegated the right to is told in the log, not stopped (the operator's call)."""
    have = await zfs.props(root, list(SAFE_CONTAINER_PROPS))
    wrong = {k: v for k, v in SAFE_CONTAINER_PROPS.items() if have.get(k) != v}
    if not wrong:
        return
    try:
        await zfs.set_props(root, wrong)
        log.info("made the root dataset non-mountable", extra={"root": str(root),
                                                               "set": wrong})
    except SnapperError as e:
        log.warning("cannot make the root dataset non-mountable; set these on it",
                    extra={"root": str(root), "props": wrong, "error": str(e)})


async def _wait_for_transfers(zone: Zone, grace: float) -> None:
    deadline = time.monotonic() + grace
    if zone.transfers.active():
        zone.log.info("waiting for transfers in flight",
                      extra={"transfers": len(zone.transfers.active()), "grace": grace})
    # The registry has no "became empty" event; polling it with a deadline is
    # the wait itself, not a stand-in for one.
    while zone.transfers.active() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(_POLL)
    if left := zone.transfers.active():
        zone.log.warning("grace period over; cutting transfers in flight (each resumes "
                         "or restarts from its last complete snapshot)",
                         extra={"transfers": [t.to_json() for t in left]})


async def serve(config: ZoneConfig, args: argparse.Namespace, log: logging.Logger,
                service: type[Service] = Service) -> int:
    zfs = Zfs()
    zone = Zone.from_config(config, zfs, log)
    await ensure_root(zfs, zone.store.root, args.create_root, log)
    await zone.store.sweep_aside()  # copies a drop set aside before a crash
    caps = await zfs.capabilities()
    ensure_host_key(config.ssh.host_key, log)
    # The zone signs its requests to the coordinator with its host key: the
    # key it registers is the key it proves it holds.
    # Its last verified answers, kept across restarts: pushes and mirroring go
    # on with the known pairs while no coordinator answers.
    coordinator = CoordinatorClient(
        config.coordinator_url, Signer.load(config.ssh.host_key), config.coordinator_key,
        AnswerCache.load(config.answers_path, log)) if config.coordinator_url else None
    if config.peers or coordinator is not None:
        zone.replicator = Replicator(zone, PeerLinks(config, log, coordinator, zone.metrics))
    if coordinator is not None:
        # The registry's last verified copy is in force before the first command:
        # a zone restarted while no coordinator answers keeps who is who.
        zone.identity = IdentityFollower(coordinator, config.identity_path, log)
        zone.identity.load()
    if config.retention is not None and config.retention.policy is not None:
        try:
            policies = load_policies(config.retention.policy)
        except ConfigError as e:
            raise StartupError(f"retention policy: {e}", EXIT_USAGE) from e
        zone.pruner = Pruner(zone, policies, config.retention.interval_seconds)
    elif config.retention is not None and config.retention.policy_from_coordinator:
        assert coordinator is not None  # the config requires coordinator_url
        name, client = config.retention.policy_from_coordinator, coordinator
        # Until the first answer (or the cached copy) no policy names a VM: nothing goes.
        zone.pruner = Pruner(zone, PolicySet(()), config.retention.interval_seconds,
                             source=lambda: client.policy(name))
    registrar: Registrar | None = None
    pruning: asyncio.Task[None] | None = None

    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, reload_config, zone, args.config)

    acceptor: asyncssh.SSHAcceptor | None = None
    gate: GateServer | None = None
    # aiohttp's access log would repeat the API's own audit line for each request.
    runner = web.AppRunner(make_app(zone), access_log=None, shutdown_timeout=HTTP_DRAIN)
    try:
        svc = service(zone)
        acceptor = await start_ssh_server(zone, svc)
        if config.gate is not None:
            gate = GateServer(zone, svc, config.gate)
            await gate.start()
        await runner.setup()
        site = web.TCPSite(runner, config.http.host, config.http.port)
        await site.start()
        http_port = int(runner.addresses[0][1])
        ssh_port = acceptor.get_port()
        log.info("snapperd started", extra={
            "zone": config.uuid, "zone_name": config.name, "root": config.root,
            "zfs": caps.flavour, "ssh_port": ssh_port, "http_port": http_port,
            "ssh_host": config.ssh.host, "http_host": config.http.host,
            "ssh_advertised": config.ssh.advertised,
            "http_advertised": config.http.advertised_url(http_port)})
        if args.ready_file is not None:
            ready: dict[str, Any] = {"pid": os.getpid(), "ssh_port": ssh_port,
                                     "http_port": http_port}
            write_atomically(args.ready_file, json.dumps(ready).encode() + b"\n")
        if zone.identity is not None:
            zone.identity.start()
        if zone.replicator is not None:
            zone.replicator.start()
            if coordinator is not None:
                registrar = Registrar(coordinator, zone.replicator.links,
                                      await _registration(zone, ssh_port, http_port), log)
                registrar.start()
        if zone.pruner is not None:
            pruning = asyncio.create_task(zone.pruner.run(), name="retention")

        await stop.wait()
        log.info("stopping", extra={"signal": received[0] if received else None})
    finally:
        # Stop accepting on both endpoints first, so nothing new starts. Open
        # SSH connections stay up through the grace period: they carry the
        # transfers being waited for. (Not wait_closed(): on newer Pythons it
        # waits for every connection, which is the grace period's job.)
        if acceptor is not None:
            acceptor.close()
        if gate is not None:
            await gate.close()
        await runner.cleanup()  # stops listening, lets requests in flight finish
    if pruning is not None:
        pruning.cancel()
        await asyncio.gather(pruning, return_exceptions=True)
    await _wait_for_transfers(zone, args.grace)
    if zone.identity is not None:
        await zone.identity.stop()
    if registrar is not None:
        await registrar.stop()
    if zone.replicator is not None:
        await zone.replicator.stop()  # between rounds; a cut transfer is redone later
    log.info("stopped")
    return EXIT_OK


def reload_config(zone: Zone, path: str) -> None:
    """SIGHUP (SMF ``refresh``): read the config again and put its live fields in
    force (``config.LIVE_FIELDS``: keys, vms, durability, timeouts, most limits);
    a bad file is logged and changes nothing, as is a change needing a restart."""
    try:
        new = load_config(path)
    except ConfigError as e:
        zone.log.error("config not reloaded: %s", e, extra={"config": path})
        return
    fixed = zone.reload(new)
    zone.log.info("config reloaded", extra={"config": path, "keys": len(new.keys),
                                            "vms": len(new.vms)})
    if fixed:
        zone.log.warning("config changes that need a restart were not applied",
                         extra={"fields": fixed})


async def _registration(zone: Zone, ssh_port: int, http_port: int) -> ZoneRegistration:
    """This zone as the coordinator's registry records it (``POST /v1/zones``)."""
    root = await zone.zfs.dataset(zone.store.root)
    return zone_record(zone.config, ssh_port, http_port, root.available + root.used)


def main(argv: Sequence[str] | None = None, service: type[Service] = Service) -> int:
    """snapperd; ``service`` is the command handler class (a test build may subclass it)."""

    async def run(config: ZoneConfig, args: argparse.Namespace, log: logging.Logger) -> int:
        return await serve(config, args, log, service)

    return run_daemon("snapperd", _parser(), argv, load_config, run)

if __name__ == "__main__":
    sys.exit(main())
