"""The soak's JSON report and its short human summary."""

from __future__ import annotations

import contextlib
import json
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from soak.driver import SoakResult
from soak.faults import PlannedFault
from soak.records import to_json


def schedule_text(seed: int, schedule: list[PlannedFault], kinds: Sequence[str] = ()) -> str:
    """What is printed first, so that a failing run can be replayed."""
    lines = [f"soak seed {seed}: {len(schedule)} faults (replay: --seed {seed} with the same "
             "--duration, --zones and --coordinator"
             + (f" and --kinds {','.join(kinds)}" if kinds else "") + ")"]
    lines += [f"  {f.at:7.1f}s  {f.kind:<16} pick={f.pick:<6} hold={f.hold}s" for f in schedule]
    return "\n".join(lines)


def build(result: SoakResult) -> dict[str, Any]:
    c = result.config
    pushes = result.pushes
    acked = [p for p in pushes if p.acked]
    losses = [f for f in result.faults if f.loss]
    return {
        "passed": result.passed,
        "config": {"seed": c.seed, "duration": c.duration, "cns": c.cns, "zones": c.zones,
                   "kinds": list(c.kinds()),
                   "vms_per_cn": c.vms_per_cn, "coordinator": c.coordinator,
                   "pool_size": c.pool_size},
        "schedule": [f.to_json() for f in result.schedule],
        "skipped": [f.to_json() for f in result.skipped],
        "seconds": {"run": round(result.run_seconds, 1),
                    "settle": round(result.settle_seconds, 1),
                    "total": round(result.total_seconds, 1)},
        "pushes": {"attempted": len(pushes), "acked": len(acked),
                   "failed": len(pushes) - len(acked),
                   "by_durability": dict(Counter(p.durability for p in acked)),
                   "truncated": sum(1 for p in pushes if p.cut_after is not None),
                   "bytes_sent": sum(p.bytes for p in acked),
                   "bytes_written": result.bytes_written},
        "deletes": {"attempted": len(result.deletes),
                    "ok": sum(1 for d in result.deletes if d.ok)},
        "restores": {"attempted": len(result.restores),
                     "ok": sum(1 for r in result.restores if r.ok),
                     "identical": sum(1 for r in result.restores if r.identical)},
        "faults": {"injected": len(result.faults),
                   "by_kind": dict(Counter(f.kind for f in result.faults)),
                   "failed": sum(1 for f in result.faults if f.error)},
        "back_to_two_s": [{"kind": f.kind, "target": f.target, "at": f.started,
                           "seconds": f.back_to_two_s} for f in losses],
        "agents": {"runs": len(result.agent_runs),
                   "killed": sum(1 for r in result.agent_runs if r.killed),
                   "pushed": sum(1 for r in result.agent_runs for o in r.outcomes if o.get("ok")),
                   "failed": sum(1 for r in result.agent_runs for o in r.outcomes
                                 if not o.get("ok"))},
        "invariants": [ch.to_json() for ch in result.checks],
        "rss_kib": {"before": [to_json(s) for s in result.rss_before],
                    "after": [to_json(s) for s in result.rss_after]},
        "fault_log": [to_json(f) for f in result.faults],
        "push_log": [to_json(p) for p in pushes],
        "delete_log": [to_json(d) for d in result.deletes],
        "restore_log": [to_json(r) for r in result.restores],
        "agent_log": [to_json(r) for r in result.agent_runs],
    }


def summary(doc: dict[str, Any]) -> str:
    p, f = doc["pushes"], doc["faults"]
    c = doc["config"]
    lines = [
        f"soak {'PASSED' if doc['passed'] else 'FAILED'}: seed {c['seed']}, "
        f"{c['cns']} CNs, {c['zones']} zones{' + coordinator' if c['coordinator'] else ''}, "
        f"{doc['seconds']['run']}s of load + {doc['seconds']['settle']}s to settle "
        f"({doc['seconds']['total']}s in all)",
        f"pushes: {p['attempted']} attempted, {p['acked']} acked {p['by_durability']}, "
        f"{p['failed']} failed ({p['truncated']} truncated on purpose); "
        f"{p['bytes_sent'] / 1e6:.1f} MB sent, {p['bytes_written'] / 1e6:.1f} MB written",
        f"deletes: {doc['deletes']['ok']}/{doc['deletes']['attempted']}; restores: "
        f"{doc['restores']['identical']} identical of {doc['restores']['attempted']}",
        f"faults: {f['injected']} injected {f['by_kind']}, {f['failed']} failed"
        + (f", {len(doc['skipped'])} skipped (out of time)" if doc["skipped"] else ""),
    ]
    a = doc["agents"]
    if a["runs"]:
        lines.append(f"agents: {a['runs']} lives ({a['killed']} killed), {a['pushed']} pushes, "
                     f"{a['failed']} failed and retried")
    back = [f"{b['kind']} {b['target']} {b['seconds']}s" for b in doc["back_to_two_s"]]
    if back:
        lines.append("back to two copies: " + ", ".join(back))
    for ch in doc["invariants"]:
        lines.append(f"  [{'ok' if ch['ok'] else 'FAIL'}] {ch['name']} ({ch['checked']})")
        for d in ch["detail"][:5] if not ch["ok"] else []:
            lines.append(f"        {d}")
    return "\n".join(lines)


_VM_SNAP = re.compile(r"\b([0-9a-f]{8})@(\S+)")


# What happens to a VM's copy as a whole (a move, a drop): shown with its snapshots'
# lines, since a copy that went away takes every snapshot with it.
_VM_EVENTS = ("placement switched", "dropped VM copy", "move ", "partner")


def evidence(doc: dict[str, Any], workdir: Path, head: int = 30, tail: int = 60) -> str:
    """The daemons' log lines about each ``vm@snapshot`` a failed check names (that
    snapshot, a warning or a move about the VM), oldest first, and which zone
    each uuid is: what a failure on a machine whose work directory is gone (CI)
    leaves to read. SSH's own per-channel lines are left out (the daemons log
    each command themselves)."""
    wanted = {m.groups() for ch in doc["invariants"] if not ch["ok"]
              for d in ch["detail"] for m in _VM_SNAP.finditer(d)}
    if not wanted:
        return ""
    rows: list[tuple[str, str]] = []
    for log in sorted(workdir.rglob("*.log")):
        who = log.parent.name
        with open(log, errors="replace") as f:
            for line in f:
                hit = [(vm, snap) for vm, snap in wanted if vm in line]
                if not hit:
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(rec, dict):
                    continue
                level = int(rec.get("level") or 0)
                msg = str(rec.get("msg"))
                if rec.get("component") == "asyncssh" and level < 40:
                    continue
                if not any(snap in line for _, snap in hit) and level < 40 \
                        and not any(e in msg for e in _VM_EVENTS):
                    continue
                extra = {k: v for k, v in rec.items() if k not in
                         ("v", "name", "hostname", "pid", "level", "time", "msg")}
                rows.append((str(rec.get("time")),
                             f"{who}: {rec.get('msg')} {json.dumps(extra)[:300]}"))
    rows.sort()
    # A failure repeated every round (reconcile's) is one line with its count,
    # so the lines before it stay in view.
    seen: dict[str, list[Any]] = {}
    for t, text in rows:
        if text in seen:
            seen[text][1] += 1
            seen[text][2] = t
        else:
            seen[text] = [t, 1, t]
    lines = [f"{t} {text}" + (f" [x{n}, last {last}]" if n > 1 else "")
             for text, (t, n, last) in seen.items()]
    if len(lines) > head + tail:
        lines = [*lines[:head], f"[... {len(lines) - head - tail} lines ...]", *lines[-tail:]]
    return "\n".join([zone_legend(workdir),
                      f"log lines about {', '.join(f'{v}@{s}' for v, s in sorted(wanted))} "
                      f"({len(rows)}, {len(seen)} distinct):", *lines])


def zone_legend(workdir: Path) -> str:
    """"zones: zone0=7944adf9 ...": the uuids the checks and logs name, by zone."""
    names = []
    for cfg in sorted(workdir.glob("zone*/snapperd.json")):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            names.append(f"{cfg.parent.name}={json.loads(cfg.read_text())['uuid'][:8]}")
    return "zones: " + (" ".join(names) or "none found")


def write(result: SoakResult, path: Path | None) -> dict[str, Any]:
    doc = build(result)
    if path is not None:
        path.write_text(json.dumps(doc, indent=2) + "\n")
    return doc
