"""Operator commands that talk to the coordinator (and, for the live view, the zones)
over HTTP.

    snapper zones [--json]
    snapper zone add UUID --name N --ssh-host H [--ssh-port P] --http-url URL
                          --host-key KEY|FILE --capacity SIZE
    snapper zone drain|lost|activate|remove UUID     (activate a pending zone: admit it)
    snapper zone rekey UUID --host-key KEY|FILE      (rotate its pinned host key)
    snapper rebalance [--dry-run] [--json]
    snapper moves [--state S ...] [--limit N [--marker M]] [--json]
    snapper transfers [--json]                       (every zone's streams in flight)
    snapper status [--json] [--watch [--interval S] [--count N]]
    snapper cn add ID --key FILE|-                   (a CN and its public key(s))
    snapper cn remove ID [--key FILE|-]              (the CN, or one of its keys)
                                                     (their operator key: --operator-key)
    snapper cn list [--json]
    snapper vm assign VM CN                          (the VM now belongs to CN)
    snapper vm sync FILE|URL                         (owners from a VMAPI listing)
    snapper grant restore VM --to-cn CN --for 1h     (CN may restore VM, for a while)
    snapper policy set NAME FILE                     (the registry's copy of a policy file)
    snapper policy show NAME [--json] | list [--json] | remove NAME

Each takes ``--coordinator URL``, else ``$SNAPPER_COORDINATOR``, else the
``coordinator_url`` of ``snapper``'s config file (``snapper --config FILE``,
else ``$SNAPPER_CN_CONFIG``, else ``/opt/smartdc/snapper/etc/snapper-cn.toml``
if it exists); and ``--key PATH``, the operator's SSH private key every
request is signed with (default ``$SNAPPER_KEY``, else the first of
``~/.ssh/id_ed25519``, ``~/.ssh/id_ecdsa``, ``~/.ssh/id_rsa``); the
coordinator and the zones know its public key from their ``[[keys]]`` (role
``operator``). Arguments are checked (uuids, sizes, ports, URLs, intervals)
before anything goes on the network: a bad one is exit 2 and a usage message.
``register(subparsers)`` adds them to ``snapper``'s parser; ``dispatch`` runs
one.  Exit status: 0 done (``--watch``: also after Ctrl-C), 1 the coordinator
refused or did not answer, 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
import asyncssh

from snapper_zone.common.config import ConfigError, read_document
from snapper_zone.common.durations import parse_duration
from snapper_zone.common.httpsig import NoAnswer, Signer, call_json, signing_session
from snapper_zone.common.progress import (
    SizeError,
    format_bytes,
    format_eta,
    format_rate,
    parse_size,
    render_bar,
)
from snapper_zone.errors import InvalidName
from snapper_zone.policy import InvalidPolicy, check_policy_document, check_policy_name
from snapper_zone.wire import ZoneRegistration
from snapper_zone.zfs.names import check_uuid

SYNC_BATCH = 5000  # VMs per request: the coordinator's own cap (coordinator.SYNC_BATCH)

__all__ = ["COORDINATOR_ENV", "CoordinatorError", "dispatch", "fleet_view", "parse_size",
           "register", "render_view", "run"]

COORDINATOR_ENV = "SNAPPER_COORDINATOR"
KEY_ENV = "SNAPPER_KEY"
DEFAULT_KEYS = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")
STALEST = 5  # VMs the live view lists, stalest first
ZONE_TIMEOUT = 5.0  # s the live view waits for one zone: a dead zone must not stall it


class UsageError(Exception):
    pass


class CoordinatorError(Exception):
    """The coordinator answered with an error, or not at all."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


# -- arguments, checked by argparse before any network access (exit 2) --------------


def _uuid_arg(text: str) -> str:
    try:
        return check_uuid(text.lower(), "uuid")
    except InvalidName as e:
        raise argparse.ArgumentTypeError(e.message) from None


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except SizeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _port_arg(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1-65535)")
    return int(text)


def _url_arg(text: str) -> str:
    try:
        parts = urlsplit(text)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http(s) URL with a host")
    return text


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0.1..3600)")
    return value


def _count_arg(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (1..1000)")
    return int(text)


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
    def __init__(self, url: str, signer: Signer, timeout: float = 60.0,
                 unreachable: str = "CoordinatorUnreachable") -> None:
        self.url = url.rstrip("/")
        self.signer = signer
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.unreachable = unreachable  # the code when no answer comes

    async def call(self, method: str, path: str, body: object = None) -> Any:
        try:
            async with signing_session(self.signer, timeout=self.timeout) as http:
                got = await call_json(http, method, self.url + path, body=body)
        except NoAnswer as e:
            raise CoordinatorError(self.unreachable, f"{self.url}: {e.message}") from e
        if not got.ok:
            raise CoordinatorError(*got.error())
        if got.body is None and got.text.strip():
            raise CoordinatorError("BadResponse", f"{method} {path}: not JSON")
        return got.body

    async def pages(self, path: str, key: str, **query: str) -> list[Any]:
        """Every item of a paged list route, following ``next`` page by page."""
        out: list[Any] = []
        while True:
            sep = "&" if "?" in path else "?"
            page = await self.call("GET", f"{path}{sep}{urlencode(query)}" if query else path)
            out += page[key]
            if not page.get("next"):
                return out
            query = {**query, "marker": str(page["next"])}

    def at(self, url: str, timeout: float) -> Client:
        """The same signer towards another server (a zone's HTTP API)."""
        return Client(url, self.signer, timeout, "ZoneUnreachable")


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


def history_table(moves: Sequence[dict[str, Any]]) -> str:
    """``snapper moves``: a move's whole record, one line each."""
    rows = [["ID", "VM", "REASON", "FROM", "TO", "STATE", "STEP", "PROGRESS", "ETA",
             "FINISHED", "ERROR"]]
    for m in moves:
        done = f"{format_bytes(m['progress'])}/{format_bytes(m['bytes'])}"
        rows.append([str(m["id"]), m["vm"], m["reason"], _short(m["from_zone"]),
                     _short(m["to_zone"]), m["state"], m.get("step") or "-", done,
                     format_eta(m.get("eta")) if m["state"] == "running" else "-",
                     _when(m.get("finished")), _one_line(m.get("error") or "-", 60)])
    return _table(rows)


def transfers_table(transfers: Sequence[dict[str, Any]]) -> str:
    rows = [["ZONE", "KIND", "VM", "DATASET", "SNAPSHOT", "PEER", "DONE", "RATE", "ETA"]]
    for t in transfers:
        done = format_bytes(t["bytes"]) + (f"/{format_bytes(t['expected'])}"
                                           if t.get("expected") else "")
        rows.append([t["zone_name"], t["kind"], t["vm"], t["dataset"], t["snapshot"],
                     str(t.get("peer") or "-")[:20], done, format_rate(t.get("rate") or 0),
                     format_eta(t.get("eta"))])
    return _table(rows)


def _when(t: float | None) -> str:
    return "-" if not t else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _one_line(text: str, n: int) -> str:
    one = " ".join(str(text).split())
    return one if len(one) <= n else one[:n - 1] + "…"


def format_age(seconds: float | None) -> str:
    """``3d 4h``, ``2h 05m``, ``40s``; ``never`` for no complete snapshot."""
    if seconds is None:
        return "never"
    s = max(int(seconds), 0)
    d, h, m = s // 86400, s // 3600 % 24, s // 60 % 60
    return f"{d}d {h}h" if d else f"{h}h {m:02d}m" if h else f"{m}m {s % 60:02d}s" if m \
        else f"{s}s"


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
    if status.get("rebuild_grace_left"):
        lines.append(f"rebuilding:       started on an empty store; zones re-registering "
                     f"for {status['rebuild_grace_left']:.0f} s more (placements of VMs "
                     "not found on two zones wait)")
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
    zones = await c.pages("/v1/zones", "zones")
    print(json.dumps(zones, indent=2) if args.json else
          zones_table(zones) if zones else "no zones registered")
    return 0


async def cmd_zone(args: argparse.Namespace, c: Client) -> int:
    action = args.action
    if action == "add":
        reg = ZoneRegistration(uuid=args.uuid, name=args.name, ssh_host=args.ssh_host,
                               ssh_port=args.ssh_port, http_url=args.http_url,
                               host_key=_host_key(args.host_key), capacity=args.capacity)
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


async def cmd_moves(args: argparse.Namespace, c: Client) -> int:
    query = [("state", s) for s in args.state or ()]
    if args.limit is None:
        moves = await c.pages("/v1/moves" + (f"?{urlencode(query)}" if query else ""), "moves")
        more = None
    else:
        query += [("limit", str(args.limit))] + ([("marker", args.marker)] if args.marker
                                                  else [])
        page = await c.call("GET", f"/v1/moves?{urlencode(query)}")
        moves, more = page["moves"], page.get("next")
    print(json.dumps(moves, indent=2) if args.json else
          history_table(moves) if moves else "no moves")
    if more:
        print(f"more: snapper moves --limit {args.limit} --marker {more}", file=sys.stderr)
    return 0


async def cmd_transfers(args: argparse.Namespace, c: Client) -> int:
    view = await fleet_view(c)
    print(json.dumps(view["transfers"], indent=2) if args.json else
          transfers_table(view["transfers"]) if view["transfers"] else "no transfers")
    for z in view["unreachable"]:
        print(f"snapper: transfers: zone {z['name']} ({z['zone']}): {z['error']}",
              file=sys.stderr)
    return 1 if view["unreachable"] else 0


async def cmd_status(args: argparse.Namespace, c: Client) -> int:
    if args.watch:
        return await watch(args, c)
    status = await c.call("GET", "/v1/status")
    print(json.dumps(status, indent=2) if args.json else status_text(status))
    return 0


# -- identity: CNs, VM owners, restore grants ----------------------------------------


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


def _seconds_for(text: str) -> float:
    """``--for``: the one duration grammar (90s, 15m, 1h, 2d)."""
    try:
        return float(parse_duration(text))
    except ValueError as e:
        raise UsageError(f"--for: {e}") from None


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
        _print_list(args, (await c.call("GET", "/v1/cns"))["cns"], "no CNs registered",
                    ["CN", "KEYS", "VMS"],
                    lambda cn: [cn["id"], ", ".join(
                        asyncssh.import_public_key(k).get_fingerprint()
                        for k in cn["keys"]) or "-", str(cn["vms"])])
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
                                            "seconds": _seconds_for(args.duration)})
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(g["expires"]))
    print(f"CN {g['cn']} may restore VM {g['vm']} until {until} "
          f"(snapper restore {g['vm']} SNAP --to-cn {g['cn']}, on that CN)")
    return 0


# -- policies: the registry's copy of policy files -----------------------------------


def _policy_name(text: str) -> str:
    try:
        return check_policy_name(text)
    except InvalidPolicy as e:
        raise argparse.ArgumentTypeError(e.message) from None


async def cmd_policy(args: argparse.Namespace, c: Client) -> int:
    if args.action == "set":
        # Checked here as the coordinator checks it: a bad file is exit 2, nothing sent.
        doc = read_document(args.file)
        try:
            policies = check_policy_document(doc, args.name)
        except InvalidPolicy as e:
            raise UsageError(e.message) from None
        got = await c.call("PUT", f"/v1/policies/{args.name}", doc)
        print(f"policy {got['name']} version {got['version']}: "
              f"{len(policies.policies)} polic{'y' if len(policies.policies) == 1 else 'ies'}; "
              "agents that follow it (snapper agent --policy-from-coordinator) take it on "
              "their next pass")
    elif args.action == "show":
        got = await c.call("GET", f"/v1/policies/{args.name}")
        print(json.dumps(got if args.json else got["document"], indent=2, sort_keys=True))
    elif args.action == "remove":
        await c.call("DELETE", f"/v1/policies/{args.name}")
        print(f"policy {args.name} removed (agents following it keep their last copy)")
    else:
        _print_list(args, (await c.call("GET", "/v1/policies"))["policies"],
                    "no policies (snapper policy set NAME FILE)",
                    ["NAME", "VERSION", "UPDATED", "BY"],
                    lambda p: [p["name"], str(p["version"]), _when(p["updated"]),
                               p["updated_by"]])
    return 0


def _print_list(args: argparse.Namespace, items: list[dict[str, Any]], none: str,
                header: list[str], row: Callable[[dict[str, Any]], list[str]]) -> None:
    """A registry list: as JSON with ``--json``, else a table (or ``none``)."""
    if args.json:
        print(json.dumps(items, indent=2))
    elif not items:
        print(none)
    else:
        print(_table([header, *map(row, items)]))


# -- the live view -------------------------------------------------------------------


async def _zone_facts(c: Client, zone: dict[str, Any]) -> dict[str, Any]:
    z = c.at(zone["http_url"], ZONE_TIMEOUT)
    try:
        transfers, vms = await asyncio.gather(z.call("GET", "/v1/transfers"),
                                              z.call("GET", "/v1/vms"))
    except CoordinatorError as e:
        return {"error": str(e)}
    return {"transfers": transfers, "vms": vms}


async def fleet_view(c: Client, now: float | None = None) -> dict[str, Any]:
    """What the live view shows, as JSON: the coordinator's status and zones, every
    readable zone's transfers in flight, and the VMs whose newest complete copy is
    oldest (``stalest``; ``newest`` null: none complete). Zones that do not answer
    are listed in ``unreachable``, not fatal."""
    status = await c.call("GET", "/v1/status")
    zones = await c.pages("/v1/zones", "zones")
    readable = [z for z in zones if z["admitted"] and z["state"] != "lost"]
    facts = await asyncio.gather(*(_zone_facts(c, z) for z in readable))
    now = time.time() if now is None else now
    transfers: list[dict[str, Any]] = []
    newest: dict[str, int | None] = {}
    held: dict[str, list[str]] = {}
    unreachable = []
    for z, f in zip(readable, facts, strict=True):
        if "error" in f:
            unreachable.append({"zone": z["uuid"], "name": z["name"], "error": f["error"]})
            continue
        transfers += [{"zone": z["uuid"], "zone_name": z["name"], **t} for t in f["transfers"]]
        for v in f["vms"]:
            got = v.get("newest")
            have = newest.get(v["uuid"])
            newest[v["uuid"]] = got if have is None or (got is not None and got > have) \
                else have
            held.setdefault(v["uuid"], []).append(z["name"])
    stalest = sorted(newest, key=lambda vm: (newest[vm] is not None, newest[vm] or 0, vm))
    return {"time": now, "status": status, "zones": zones, "transfers": transfers,
            "stalest": [{"vm": vm, "newest": newest[vm],
                         "age": None if newest[vm] is None else now - (newest[vm] or 0),
                         "zones": sorted(held[vm])} for vm in stalest[:STALEST]],
            "unreachable": unreachable}


def render_view(view: dict[str, Any], width: int = 100, interval: float | None = None) -> str:
    """The live view as text (pure): header, status, zones, transfers, stalest VMs."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(view["time"]))
    every = f"  every {interval:g}s, Ctrl-C quits" if interval else ""
    lines = [f"snapper status  {stamp}{every}", "", status_text(view["status"], width), ""]
    rows = [["ZONE", "STATE", "HEALTH", "USED", "FREE", "VMS"]]
    for z in view["zones"]:
        rows.append([z["name"], z["state"], z["health"], format_bytes(z["used"]),
                     format_bytes(z["free"]), str(z["vms"])])
    lines += [_table(rows) if view["zones"] else "no zones registered", ""]
    lines.append(f"transfers in flight: {len(view['transfers'])}")
    for t in view["transfers"]:
        label = f"{t['zone_name']} {t['kind']} {t['vm'][:8]}/{t['dataset']}@{t['snapshot']}"
        lines.append("  " + render_bar(label, t["bytes"], t.get("expected"),
                                       float(t.get("rate") or 0), width - 2))
    lines += ["", "stalest VMs (newest complete copy):"]
    rows = [["AGE", "VM", "ON", "NEWEST"]]  # what matters first: a narrow terminal cuts the end
    for v in view["stalest"]:
        rows.append([format_age(v["age"]), v["vm"], ",".join(v["zones"]), _when(v["newest"])])
    lines.append(_table(rows) if view["stalest"] else "  no VMs on any zone")
    for z in view["unreachable"]:
        lines.append(f"zone {z['name']} ({_short(z['zone'])}) unreachable: "
                     f"{_one_line(z['error'], width - 40)}")
    return "\n".join(line[:width] for line in "\n".join(lines).split("\n"))


async def watch(args: argparse.Namespace, c: Client) -> int:
    """Redraw the view in place every ``--interval`` s until Ctrl-C (or ``--count``
    frames). On a terminal: cursor home, each line cleared to its end, the rest
    of the screen cleared, cursor hidden meanwhile; otherwise frames one after
    another. ``--json``: one view per line."""
    out = sys.stdout
    tty = out.isatty() and not args.json
    frames = 0
    if tty:
        out.write("\x1b[?25l")
    try:
        while True:
            try:
                view = await fleet_view(c)
            except CoordinatorError as e:
                if not frames:
                    raise  # the first look fails: a wrong URL or key, not an outage
                view = None
                text = f"snapper status: coordinator: {e} (retrying)"
            if args.json:
                out.write(json.dumps(view) + "\n" if view is not None else "")
            else:
                width = max(shutil.get_terminal_size((100, 40)).columns, 40)
                text = render_view(view, width, args.interval) if view is not None else text
                if tty:
                    out.write("\x1b[H" + "".join(f"{ln}\x1b[K\n" for ln in text.split("\n"))
                              + "\x1b[J")
                else:
                    out.write(text + "\n\n")
            out.flush()
            frames += 1
            if args.count is not None and frames >= args.count:
                return 0
            await asyncio.sleep(args.interval)
    finally:
        if tty:
            out.write("\x1b[?25h")
            out.flush()


Command = Callable[[argparse.Namespace, Client], Coroutine[Any, Any, int]]


ConfigUrl = Callable[[argparse.Namespace], "str | None"]


def register(sub: Any, config_url: ConfigUrl | None = None) -> None:
    """Add the operator commands to ``snapper``'s subparsers. ``config_url(args)``:
    the ``coordinator_url`` of ``snapper``'s config file, if any (``snapper_zone/cli.py``)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--coordinator", metavar="URL", type=_url_arg,
                        help=f"the coordinator's HTTP URL (default ${COORDINATOR_ENV}, else "
                             "coordinator_url in snapper's --config file)")
    common.add_argument("--key", metavar="PATH",
                        help=f"the operator's SSH private key requests are signed with "
                             f"(default ${KEY_ENV}, else ~/.ssh/id_ed25519, id_ecdsa, id_rsa)")

    # `cn add|remove` take --key for the CN's public key: the operator's is --operator-key.
    cn_common = argparse.ArgumentParser(add_help=False)
    cn_common.add_argument("--coordinator", metavar="URL", type=_url_arg,
                           help=f"the coordinator's HTTP URL (default ${COORDINATOR_ENV})")
    cn_common.add_argument("--operator-key", dest="key", metavar="PATH",
                           help=f"the operator's SSH private key (default ${KEY_ENV}, ...)")

    def add(name: str, cmd: Command, help: str, own: bool = True) -> argparse.ArgumentParser:
        # `zone` leaves --coordinator to its actions: argparse would reset it otherwise.
        p: argparse.ArgumentParser = sub.add_parser(name, help=help,
                                                    parents=[common] if own else [])
        p.set_defaults(standalone=run, coordinator_command=cmd, config_url=config_url)
        return p

    p = add("zones", cmd_zones, "list the snapper zones the coordinator knows")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = add("zone", cmd_zone, "add a zone, admit (activate) it, drain it, mark it lost, "
            "rotate its key, remove it", own=False)
    acts = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = acts.add_parser("add", help="register (or update) a zone; new ones are pending "
                        "until activated", parents=[common])
    a.add_argument("uuid", metavar="UUID", type=_uuid_arg)
    a.add_argument("--name", required=True)
    a.add_argument("--ssh-host", required=True)
    a.add_argument("--ssh-port", type=_port_arg, default=22)
    a.add_argument("--http-url", required=True, metavar="URL", type=_url_arg)
    a.add_argument("--host-key", required=True, metavar="KEY|FILE",
                   help="the zone's SSH host public key: the line, or a .pub file")
    a.add_argument("--capacity", required=True, metavar="SIZE", type=_size_arg,
                   help="its weight in bytes (50TiB, 1.5T, 500G: powers of 1024)")
    for action, what in (("drain", "move every VM off it"),
                         ("lost", "declare it lost: its VMs get new second copies"),
                         ("activate", "admit a pending zone; take copies again (also: "
                          "bring back a lost zone)"),
                         ("remove", "forget it (refused while it holds a VM copy)")):
        acts.add_parser(action, help=what, parents=[common]).add_argument(
            "uuid", metavar="UUID", type=_uuid_arg)
    a = acts.add_parser("rekey", help="replace the zone's pinned SSH host key (a rotation; "
                        "a registration never changes it)", parents=[common])
    a.add_argument("uuid", metavar="UUID", type=_uuid_arg)
    a.add_argument("--host-key", required=True, metavar="KEY|FILE",
                   help="the zone's new SSH host public key: the line, or a .pub file")
    p = add("rebalance", cmd_rebalance, "plan moves (and run them, unless --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = add("moves", cmd_moves, "the moves: in flight and finished (kept [moves] keep_days)")
    p.add_argument("--state", action="append", choices=("planned", "running", "done", "failed"),
                   help="only moves in this state (repeatable)")
    p.add_argument("--limit", type=_count_arg, metavar="N",
                   help="one page of at most N moves (the next page: --marker)")
    p.add_argument("--marker", metavar="ID", type=_marker_arg,
                   help="with --limit: start after this move id (the 'more:' hint)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = add("transfers", cmd_transfers, "streams in flight on every zone, with rates and ETAs")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = add("status", cmd_status, "fleet summary: zones, VMs, copies, moves in flight "
            "(--watch: a live view with transfers and the stalest VMs)")
    p.add_argument("--json", action="store_true",
                   help="print JSON (with --watch: one view per line)")
    p.add_argument("--watch", action="store_true",
                   help="redraw a live view in place until Ctrl-C: zones, moves, transfers "
                        "with rates and ETAs, the VMs with the oldest newest copy")
    p.add_argument("--interval", type=_seconds_arg, default=2.0, metavar="S",
                   help="with --watch: seconds between redraws (default 2)")
    p.add_argument("--count", type=_count_arg, metavar="N",
                   help="with --watch: stop after N views")
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
    p = add("policy", cmd_policy, "the registry's copy of policy files (what agents with "
            "--policy-from-coordinator follow): set, show, list, remove", own=False)
    acts = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = acts.add_parser("set", help="store FILE (TOML, or JSON by its suffix: "
                        "etc/policy.example.toml) as policy NAME; checked first, field by "
                        "field", parents=[common])
    a.add_argument("name", metavar="NAME", type=_policy_name)
    a.add_argument("file", metavar="FILE")
    a = acts.add_parser("show", help="the document (--json: with its version)",
                        parents=[common])
    a.add_argument("name", metavar="NAME", type=_policy_name)
    a.add_argument("--json", action="store_true")
    a = acts.add_parser("remove", help="forget policy NAME", parents=[common])
    a.add_argument("name", metavar="NAME", type=_policy_name)
    acts.add_parser("list", help="the policies, their versions and who set them",
                    parents=[common]).add_argument("--json", action="store_true")


def _marker_arg(text: str) -> str:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a move id")
    return text


def coordinator_url(args: argparse.Namespace) -> str:
    """``--coordinator``, else ``$SNAPPER_COORDINATOR``, else the config file's
    ``coordinator_url``; checked before any request (UsageError)."""
    url = args.coordinator or os.environ.get(COORDINATOR_ENV)
    source = "--coordinator" if args.coordinator else f"${COORDINATOR_ENV}"
    if not url and getattr(args, "config_url", None) is not None:
        url, source = args.config_url(args), "coordinator_url in the config file"
    if not url:
        raise UsageError(f"no coordinator: give --coordinator URL, set ${COORDINATOR_ENV}, "
                         "or coordinator_url in snapper's config file (--config)")
    try:
        return _url_arg(url)
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"{source}: {e}") from None


def _check_usage(args: argparse.Namespace) -> None:
    """What argparse cannot say alone: options that need another."""
    if getattr(args, "marker", None) and getattr(args, "limit", None) is None:
        raise UsageError("moves: --marker needs --limit")
    if getattr(args, "watch", None) is False and getattr(args, "count", None) is not None:
        raise UsageError("status: --count needs --watch")


async def dispatch(args: argparse.Namespace) -> int:
    _check_usage(args)
    url = coordinator_url(args)
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
    except (UsageError, ConfigError) as e:
        print(f"snapper: {e}", file=sys.stderr)
        return 2
    except CoordinatorError as e:
        print(f"snapper: {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if getattr(args, "watch", False):
            return 0  # how a live view is left
        print("snapper: interrupted", file=sys.stderr)
        return 130
