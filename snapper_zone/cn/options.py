"""``snapper``'s CN options: the command line, the config file, the settings.

Light on purpose: it imports neither asyncssh nor the CN client, so that
``snapper push`` can read its arguments and config and hand the push to a
running ``snapper agent`` (``cn/control.py``) without them. The commands
themselves are in ``cn/cli.py``, looked up by name.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapper_zone.common.config import FieldParser, read_document
from snapper_zone.common.durations import parse_duration
from snapper_zone.common.progress import CHOICES, SizeError, parse_size
from snapper_zone.common.version import add_version_argument
from snapper_zone.errors import InvalidName
from snapper_zone.zfs.names import check_uuid

DEFAULT_CONFIG = "/opt/smartdc/snapper/etc/snapper-cn.toml"
CONFIG_ENV = "SNAPPER_CN_CONFIG"
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
        import asyncssh  # only here: a push's start-up reads the config without it

        try:
            asyncssh.import_public_key(str(data["coordinator_key"]).strip())
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise f.err("coordinator_key", f"not an OpenSSH public key line: {exc}") from exc
    # Relative paths are relative to the config file, so the two can move together.
    for k in ("key", "known_hosts", "host_key", "state_dir"):
        if k in data:
            data[k] = str(f.path(k, data[k]))
    return data


def read_metadata(path: str | None) -> dict[str, Any] | None:
    """``--metadata FILE``: the JSON object in it (None without one); UsageError if not."""
    if not path:
        return None
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"--metadata {path}: {exc}") from exc
    if not isinstance(meta, dict):
        raise UsageError(f"--metadata {path}: must hold a JSON object")
    return meta


def config_path(args: argparse.Namespace) -> Path | None:
    """The ``snapper`` config file: ``--config``, else ``$SNAPPER_CN_CONFIG``, else
    the default path if it exists (the CN's file; operator commands read its
    ``coordinator_url`` too)."""
    given = getattr(args, "config", None) or os.environ.get(CONFIG_ENV)
    if given:
        return Path(given)
    return Path(DEFAULT_CONFIG) if Path(DEFAULT_CONFIG).exists() else None


def config(args: argparse.Namespace) -> dict[str, Any]:
    path = config_path(args)
    return load_cn_config(path) if path is not None else {}


def dataset_root(args: argparse.Namespace) -> str:
    """Where this CN's VMs are (what a command that needs no zone takes of the config)."""
    return str(args.dataset_root or config(args).get("dataset_root") or "zones")


def settings(args: argparse.Namespace) -> CnSettings:
    cfg = config(args)
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
    push.add_argument("--no-agent", action="store_true",
                      help="push from this process even when snapper agent runs (by default "
                      "a running agent takes the push: its links are logged in already)")

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

    export = sub.add_parser("export", help="write a VM snapshot the zone holds (every "
                            "dataset) to one file, e.g. on an NFS mount")
    export.add_argument("vm", metavar="VM_UUID")
    export.add_argument("snapshot", metavar="SNAP")
    export.add_argument("file", metavar="FILE", help="the export file (must not exist)")
    export.add_argument("--json", action="store_true", help="print the result as JSON")

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

    lst = sub.add_parser("list", help="what the zone holds (default: this CN's VMs)")
    lst.add_argument("vm", metavar="VM_UUID", nargs="?", type=parse_vm)
    lst.add_argument("--json", action="store_true", help="print JSON instead of a table")

    if more is not None:
        more(sub)

    for sp in (push, restore, export, imp):
        sp.add_argument("--progress", choices=CHOICES, default="auto",
                        help="progress on stderr: a bar on a terminal, JSON lines otherwise")
    return p
