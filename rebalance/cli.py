"""Operator commands that talk to the coordinator over HTTP.

    snapper zones [--json]
    snapper zone add UUID --name N --ssh-host H [--ssh-port P] --http-url URL
                          --host-key KEY|FILE --capacity SIZE
    snapper zone drain|lost|activate|remove UUID     (activate a pending zone: admit it)
    snapper zone rekey UUID --host-key KEY|FILE      (rotate its pinned host key)
    snapper rebalance [--dry-run] [--json]
    snapper status [--json]

Each takes ``--coordinator URL`` (default ``$SNAPPER_COORDINATOR``) and
``--key PATH``, the operator's SSH private key every request is signed with
(default ``$SNAPPER_KEY``, else the first of ``~/.ssh/id_ed25519``,
``~/.ssh/id_ecdsa``, ``~/.ssh/id_rsa``); the coordinator knows its public key
from its ``[[keys]]`` (role ``operator``).
``register(subparsers)`` adds them to ``snapper``'s parser; ``dispatch`` runs
one.  Exit status: 0 done, 1 the coordinator refused or did not answer, 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh

from snapper_zone.common.httpsig import Signer, signing_session
from snapper_zone.common.progress import format_bytes, render_bar
from snapper_zone.wire import ZoneRegistration

__all__ = ["COORDINATOR_ENV", "CoordinatorError", "dispatch", "parse_size", "register", "run"]

COORDINATOR_ENV = "SNAPPER_COORDINATOR"
KEY_ENV = "SNAPPER_KEY"
DEFAULT_KEYS = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?", re.IGNORECASE)


class UsageError(Exception):
    pass


class CoordinatorError(Exception):
    """The coordinator answered with an error, or not at all."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def parse_size(text: str) -> int:
    """``1073741824``, ``500G``, ``1.5TiB`` (binary units) -> bytes."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise UsageError(f"size {text!r}: expected a number with an optional K/M/G/T/P suffix")
    return int(float(m.group(1)) * 1024 ** " KMGTP".index((m.group(2) or " ").upper()))


def operator_key(given: str | None) -> Path:
    """``--key``, else ``$SNAPPER_KEY``, else the first default key that exists."""
    if given or os.environ.get(KEY_ENV):
        return Path(given or os.environ[KEY_ENV]).expanduser()
    for p in DEFAULT_KEYS:
        if Path(p).expanduser().is_file():
            return Path(p).expanduser()
    raise UsageError(f"no operator key: give --key PATH, set ${KEY_ENV}, or have one of "
                     f"{', '.join(DEFAULT_KEYS)}")


class Client:
    def __init__(self, url: str, signer: Signer, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.signer = signer
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    async def call(self, method: str, path: str, body: object = None) -> Any:
        try:
            async with signing_session(self.signer, timeout=self.timeout) as http, \
                    http.request(method, self.url + path, json=body) as r:
                text = await r.text()
                data = json.loads(text) if text else None
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise CoordinatorError("CoordinatorUnreachable", f"{self.url}: {e}") from e
        except ValueError as e:
            raise CoordinatorError("BadResponse", f"{method} {path}: {e}") from e
        if r.status >= 400:
            err = data if isinstance(data, dict) else {}
            raise CoordinatorError(str(err.get("code", r.status)), str(err.get("message", text)))
        return data


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _short(uuid: str | None) -> str:
    return "-" if uuid is None else uuid[:8]


def zones_table(zones: Sequence[dict[str, Any]]) -> str:
    rows = [["UUID", "NAME", "STATE", "HEALTH", "CAPACITY", "USED", "FREE", "VMS", "HTTP",
             "SSH"]]
    for z in zones:
        rows.append([z["uuid"], z["name"], z["state"], z["health"], format_bytes(z["capacity"]),
                     format_bytes(z["used"]), format_bytes(z["free"]), str(z["vms"]),
                     z["http_url"], f"{z['ssh_host']}:{z['ssh_port']}"])
    return _table(rows)


def moves_table(moves: Sequence[dict[str, Any]]) -> str:
    rows = [["ID", "VM", "REASON", "FROM", "TO", "SOURCE", "SIZE", "STATE"]]
    for m in moves:
        rows.append([str(m.get("id", "-")), m["vm"], m["reason"], _short(m["from_zone"]),
                     _short(m["to_zone"]), _short(m["source"]), format_bytes(m["bytes"]),
                     str(m.get("state", "planned"))])
    return _table(rows)


def status_text(status: dict[str, Any], width: int = 80) -> str:
    zones = ", ".join(f"{n} {s}" for s, n in sorted(status["zones"].items())) or "none"
    moves = status["moves"]
    lines = [f"zones:            {zones}",
             f"VMs:              {status['vms']} ({status['copies']} live copies)",
             f"under-replicated: {status['under_replicated']}",
             f"moves:            {moves['running']} running, {moves['planned']} planned, "
             f"{moves['done']} done, {moves['failed']} failed"]
    me, leader = status.get("coordinator"), status.get("leader")
    if me is not None:  # several coordinators on one ZooKeeper store: who leads
        lead = f"{leader['id']} ({leader['url']})" if leader else "none elected"
        lines[:0] = [f"leader:           {lead}",
                     f"this coordinator: {me['id']} ({me['role']}), "
                     f"{len(status.get('candidates', []))} standing"]
    now = time.time()
    for m in status["in_flight"]:
        label = f"{m['vm'][:8]} {m['reason']} -> {_short(m['to_zone'])}"
        if m["state"] == "planned":
            lines.append(f"  {label}  planned ({format_bytes(m['bytes'])})")
            continue
        elapsed = max(now - (m["started"] or now), 1e-3)
        lines.append("  " + render_bar(label, m["progress"], m["bytes"] or None,
                                       m["progress"] / elapsed, width - 2)
                     + (f"  [{m['step']}]" if m.get("step") else ""))
        if m.get("error"):
            lines.append(f"    last error: {m['error']}")
    return "\n".join(lines)


def _host_key(text: str) -> str:
    # A path to a .pub file, or the key line itself.
    path = Path(text)
    if not text.startswith(("ssh-", "ecdsa-", "sk-")) and path.is_file():
        return path.read_text().strip()
    return text.strip()


# -- commands -------------------------------------------------------------------------


async def cmd_zones(args: argparse.Namespace, c: Client) -> int:
    zones = (await c.call("GET", "/v1/zones"))["zones"]
    print(json.dumps(zones, indent=2) if args.json else
          zones_table(zones) if zones else "no zones registered")
    return 0


async def cmd_zone(args: argparse.Namespace, c: Client) -> int:
    action = args.action
    if action == "add":
        reg = ZoneRegistration(uuid=args.uuid, name=args.name, ssh_host=args.ssh_host,
                               ssh_port=args.ssh_port, http_url=args.http_url,
                               host_key=_host_key(args.host_key),
                               capacity=parse_size(args.capacity))
        z = await c.call("POST", "/v1/zones", reg.to_json())
        print(f"zone {z['uuid']} ({z['name']}) registered: {z['state']}, "
              f"capacity {format_bytes(z['capacity'])}")
    elif action == "rekey":
        z = await c.call("PUT", f"/v1/zones/{args.uuid}/host-key",
                         {"host_key": _host_key(args.host_key)})
        print(f"zone {z['uuid']} ({z['name']}): host key replaced; it is {z['state']}")
    elif action == "remove":
        await c.call("DELETE", f"/v1/zones/{args.uuid}")
        print(f"zone {args.uuid} removed")
    else:
        state = {"drain": "draining", "lost": "lost", "activate": "active"}[action]
        old = await c.call("GET", f"/v1/zones/{args.uuid}")
        z = await c.call("PUT", f"/v1/zones/{args.uuid}/state", {"state": state})
        admitted = " (admitted: its peers trust its key now)" if not old["admitted"] else ""
        print(f"zone {z['uuid']} ({z['name']}) is now {z['state']}{admitted}; it holds "
              f"{z['vms']} VMs")
    return 0


async def cmd_rebalance(args: argparse.Namespace, c: Client) -> int:
    flag = "true" if args.dry_run else "false"
    try:
        res = await c.call("POST", f"/v1/rebalance?dry_run={flag}")
    except CoordinatorError as e:
        if e.code != "NotLeader":
            raise
        # Several coordinators: planning is the leader's; ask it, once.
        leader = (await c.call("GET", "/v1/status")).get("leader")
        if not leader or leader["url"].rstrip("/") == c.url:
            raise
        print(f"asking the leader, {leader['id']} at {leader['url']}", file=sys.stderr)
        c = Client(leader["url"], c.signer, c.timeout.total or 60.0)
        res = await c.call("POST", f"/v1/rebalance?dry_run={flag}")
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    verb = "would move" if args.dry_run else "moving"
    print(f"{verb} {len(res['moves'])} VM copies ({format_bytes(res['moved_bytes'])})")
    if res["moves"]:
        print(moves_table(res["moves"]))
    for w in res["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    if res["degraded"]:
        print(f"{len(res['degraded'])} VMs stay below two copies", file=sys.stderr)
    return 0


async def cmd_status(args: argparse.Namespace, c: Client) -> int:
    status = await c.call("GET", "/v1/status")
    print(json.dumps(status, indent=2) if args.json else status_text(status))
    return 0


Command = Callable[[argparse.Namespace, Client], Coroutine[Any, Any, int]]


def register(sub: Any) -> None:
    """Add the operator commands to ``snapper``'s subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--coordinator", metavar="URL",
                        help=f"the coordinator's HTTP URL (default ${COORDINATOR_ENV})")
    common.add_argument("--key", metavar="PATH",
                        help=f"the operator's SSH private key requests are signed with "
                             f"(default ${KEY_ENV}, else ~/.ssh/id_ed25519, id_ecdsa, id_rsa)")

    def add(name: str, cmd: Command, help: str, own: bool = True) -> argparse.ArgumentParser:
        # `zone` leaves --coordinator to its actions: argparse would reset it otherwise.
        p: argparse.ArgumentParser = sub.add_parser(name, help=help,
                                                    parents=[common] if own else [])
        p.set_defaults(standalone=run, coordinator_command=cmd)
        return p

    p = add("zones", cmd_zones, "list the snapper zones the coordinator knows")
    p.add_argument("--json", action="store_true")
    p = add("zone", cmd_zone, "add a zone, admit (activate) it, drain it, mark it lost, "
            "rotate its key, remove it", own=False)
    acts = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = acts.add_parser("add", help="register (or update) a zone; new ones are pending "
                        "until activated", parents=[common])
    a.add_argument("uuid", metavar="UUID")
    a.add_argument("--name", required=True)
    a.add_argument("--ssh-host", required=True)
    a.add_argument("--ssh-port", type=int, default=22)
    a.add_argument("--http-url", required=True, metavar="URL")
    a.add_argument("--host-key", required=True, metavar="KEY|FILE",
                   help="the zone's SSH host public key: the line, or a .pub file")
    a.add_argument("--capacity", required=True, metavar="SIZE",
                   help="its weight in bytes (suffixes K, M, G, T, P)")
    for action, what in (("drain", "move every VM off it"),
                         ("lost", "declare it lost: its VMs get new second copies"),
                         ("activate", "admit a pending zone; take copies again (also: "
                          "bring back a lost zone)"),
                         ("remove", "forget it (refused while it holds a VM copy)")):
        acts.add_parser(action, help=what, parents=[common]).add_argument("uuid", metavar="UUID")
    a = acts.add_parser("rekey", help="replace the zone's pinned SSH host key (a rotation; "
                        "a registration never changes it)", parents=[common])
    a.add_argument("uuid", metavar="UUID")
    a.add_argument("--host-key", required=True, metavar="KEY|FILE",
                   help="the zone's new SSH host public key: the line, or a .pub file")
    p = add("rebalance", cmd_rebalance, "plan moves (and run them, unless --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    p.add_argument("--json", action="store_true")
    p = add("status", cmd_status, "fleet summary: zones, VMs, copies, moves in flight")
    p.add_argument("--json", action="store_true")


async def dispatch(args: argparse.Namespace) -> int:
    url = args.coordinator or os.environ.get(COORDINATOR_ENV)
    if not url:
        raise UsageError(f"no coordinator: give --coordinator URL or set ${COORDINATOR_ENV}")
    path = operator_key(args.key)
    try:
        signer = Signer.load(path)
    except (OSError, ValueError, asyncssh.KeyImportError) as e:
        raise UsageError(f"operator key {path}: {e}") from e
    command: Command = args.coordinator_command
    return await command(args, Client(url, signer))


def run(args: argparse.Namespace) -> int:
    """The ``standalone`` entry ``snapper``'s main calls."""
    try:
        return asyncio.run(dispatch(args))
    except UsageError as e:
        print(f"snapper: {e}", file=sys.stderr)
        return 2
    except CoordinatorError as e:
        print(f"snapper: {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("snapper: interrupted", file=sys.stderr)
        return 130
