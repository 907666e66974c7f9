"""Operator commands that talk to the coordinator over HTTP.

    snapper zones [--json]
    snapper zone add UUID --name N --ssh-host H [--ssh-port P] --http-url URL
                          --host-key KEY|FILE --capacity SIZE
    snapper zone drain|lost|activate|remove UUID     (activate a pending zone: admit it)
    snapper zone rekey UUID --host-key KEY|FILE      (rotate its pinned host key)
    snapper rebalance [--dry-run] [--json]
    snapper status [--json]
    snapper cn add ID --key FILE|-                   (a CN and its public key(s))
    snapper cn remove ID [--key FILE|-]              (the CN, or one of its keys)
                                                     (their operator key: --operator-key)
    snapper cn list [--json]
    snapper vm assign VM CN                          (the VM now belongs to CN)
    snapper vm sync FILE|URL                         (owners from a VMAPI listing)
    snapper grant restore VM --to-cn CN --for 1h     (CN may restore VM, for a while)

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
from urllib.parse import quote

import aiohttp
import asyncssh

from snapper_zone.common.httpsig import Signer, signing_session
from snapper_zone.common.progress import format_bytes, render_bar
from snapper_zone.wire import ZoneRegistration

SYNC_BATCH = 5000  # VMs per request: the coordinator's own cap (coordinator.SYNC_BATCH)

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


def _public_keys(source: str) -> list[str]:
    """``--key FILE`` (``-``: stdin): one or more OpenSSH public key lines."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as e:
        raise UsageError(f"--key {source}: {e.strerror or e}") from e
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if not lines:
        raise UsageError(f"--key {source}: no public key line in it")
    return lines


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``1h``, ``2d`` -> seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd]?)", text.strip())
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"duration {text!r}: expected a positive number with s, m, h or d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


async def cmd_cn(args: argparse.Namespace, c: Client) -> int:
    if args.action == "add":
        cn = await c.call("POST", f"/v1/cns/{args.id}/keys",
                          {"keys": _public_keys(args.cn_key)})
        print(f"CN {cn['id']}: {len(cn['keys'])} key(s); zones follow within seconds")
    elif args.action == "remove":
        if args.cn_key is None:
            await c.call("DELETE", f"/v1/cns/{args.id}")
            print(f"CN {args.id} removed: its keys are refused on their next command")
            return 0
        for line in _public_keys(args.cn_key):
            try:
                fp = asyncssh.import_public_key(line).get_fingerprint()
            except (asyncssh.KeyImportError, ValueError) as e:
                raise UsageError(f"--key {args.cn_key}: not an OpenSSH public key: {e}") from e
            await c.call("DELETE", f"/v1/cns/{args.id}?key={quote(fp, safe='')}")
            print(f"CN {args.id}: key {fp} revoked")
    else:
        cns = (await c.call("GET", "/v1/cns"))["cns"]
        if args.json:
            print(json.dumps(cns, indent=2))
        elif not cns:
            print("no CNs registered")
        else:
            rows = [["CN", "KEYS", "VMS"]]
            for cn in cns:
                fps = [asyncssh.import_public_key(k).get_fingerprint() for k in cn["keys"]]
                rows.append([cn["id"], ", ".join(fps) or "-", str(cn["vms"])])
            print(_table(rows))
    return 0


def _read(source: str) -> str:
    return sys.stdin.read() if source == "-" else Path(source).read_text()


async def _listing(source: str) -> list[dict[str, Any]]:
    """A VMAPI-style listing (``GET /vms``'s answer), from a file or a URL."""
    try:
        if source.startswith(("http://", "https://")):
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as h, \
                    h.get(source) as r:
                r.raise_for_status()
                doc = json.loads(await r.read())
        else:
            doc = json.loads(await asyncio.to_thread(_read, source))
    except (OSError, aiohttp.ClientError, TimeoutError, ValueError) as e:
        raise UsageError(f"{source}: cannot read a VM listing: {e}") from e
    if not isinstance(doc, list) or not all(isinstance(v, dict) for v in doc):
        raise UsageError(f"{source}: expected a JSON list of {{\"uuid\", \"server_uuid\"}}")
    return [{"uuid": v.get("uuid"), "server_uuid": v.get("server_uuid")} for v in doc]


async def cmd_vm(args: argparse.Namespace, c: Client) -> int:
    if args.action == "assign":
        got = await c.call("PUT", f"/v1/vms/{args.vm}/owner", {"cn": args.cn})
        print(f"VM {got['vm']} belongs to CN {got['cn']}; zones follow within seconds")
        return 0
    vms = await _listing(args.source)
    total = {"assigned": 0, "unchanged": 0, "invalid": 0}
    skipped: dict[str, int] = {}
    for i in range(0, len(vms), SYNC_BATCH):  # each batch one request, applied whole
        got = await c.call("POST", "/v1/vms/owners", {"vms": vms[i:i + SYNC_BATCH]})
        for k in total:
            total[k] += got[k]
        for cn, n in got["skipped"].items():
            skipped[cn] = skipped.get(cn, 0) + n
    if args.json:
        print(json.dumps({**total, "skipped": skipped}, indent=2))
        return 0
    print(f"{len(vms)} VMs listed: {total['assigned']} assigned, {total['unchanged']} "
          f"unchanged, {total['invalid']} on no CN")
    if skipped:
        print(f"{sum(skipped.values())} VMs on CNs not registered (snapper cn add): "
              + ", ".join(f"{cn} ({n})" for cn, n in sorted(skipped.items())), file=sys.stderr)
    return 0


async def cmd_grant(args: argparse.Namespace, c: Client) -> int:
    g = await c.call("POST", "/v1/grants", {"vm": args.vm, "cn": args.to_cn,
                                            "seconds": parse_duration(args.duration)})
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(g["expires"]))
    print(f"CN {g['cn']} may restore VM {g['vm']} until {until} "
          f"(snapper restore {g['vm']} SNAP --to-cn {g['cn']}, on that CN)")
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

    # `cn add|remove` take --key for the CN's public key: the operator's is --operator-key.
    cn_common = argparse.ArgumentParser(add_help=False)
    cn_common.add_argument("--coordinator", metavar="URL",
                           help=f"the coordinator's HTTP URL (default ${COORDINATOR_ENV})")
    cn_common.add_argument("--operator-key", dest="key", metavar="PATH",
                           help=f"the operator's SSH private key (default ${KEY_ENV}, ...)")

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
    p = add("cn", cmd_cn, "the compute nodes zones accept: add, remove (or revoke a key), "
            "list", own=False)
    acts = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = acts.add_parser("add", help="register a CN with its public key(s), or add keys",
                        parents=[cn_common])
    a.add_argument("id", metavar="ID", help="the CN's id (its Triton server uuid)")
    a.add_argument("--key", dest="cn_key", required=True, metavar="FILE|-",
                   help="its OpenSSH public key(s), one a line (-: stdin)")
    a = acts.add_parser("remove", help="remove a CN (every key), or with --key one key",
                        parents=[cn_common])
    a.add_argument("id", metavar="ID")
    a.add_argument("--key", dest="cn_key", metavar="FILE|-",
                   help="revoke only this public key")
    acts.add_parser("list", help="the CNs, their key fingerprints and VM counts",
                    parents=[common]).add_argument("--json", action="store_true")
    p = add("vm", cmd_vm, "which CN owns a VM: assign one, or sync from a VMAPI listing",
            own=False)
    acts = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = acts.add_parser("assign", help="the VM belongs to CN from now on", parents=[common])
    a.add_argument("vm", metavar="VM")
    a.add_argument("cn", metavar="CN")
    a = acts.add_parser("sync", help="owners from a VMAPI-style listing: a JSON list of "
                        '{"uuid", "server_uuid"} (a file, -, or a URL such as '
                        "http://vmapi/vms?state=active)", parents=[common])
    a.add_argument("source", metavar="FILE|URL")
    a.add_argument("--json", action="store_true")
    p = add("grant", cmd_grant, "let a CN restore a VM it does not own, for a while",
            own=False)
    acts = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = acts.add_parser("restore", help="CN may list, read and restore VM's snapshots until "
                        "the grant expires", parents=[common])
    a.add_argument("vm", metavar="VM")
    a.add_argument("--to-cn", required=True, metavar="CN")
    a.add_argument("--for", dest="duration", required=True, metavar="DURATION",
                   help="how long: 90s, 15m, 1h, 2d (30 days at most)")


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
