"""The monitoring pack (``monitoring/``) against a real fleet.

The alert rules parse (``promtool check rules`` where Debian's ``prometheus`` is
installed, a structural check always); every metric the rules and the Grafana
dashboard name is in a scrape of a real local fleet (a coordinator, two zones,
a CN that pushed); and Prometheus's own rule engine (``promtool test rules``),
fed that fleet's scrapes as its series, fires no alert on the healthy fleet,
``SnapperVMNoFreshCopy`` on both zones once the VM's snapshots are two days
old, and ``SnapperZoneDown`` for a zone once it is stopped.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from snapper_zone.cn.client import CnClient, placement
from snapper_zone.fleet.local import LocalFleet
from snapper_zone.transfer.remote import ZoneClient
from snapper_zone.zfs import proc
from snapper_zone.zfs.names import Dataset
from snapper_zone.zfs.zfs import Zfs
from tests.conftest import ZfsTier
from tests.helpers import wait_until, write_random

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
RULES = MONITORING / "snapper.rules.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
# make deps unpacks it into the venv (from Debian's prometheus package); else PATH's.
PROMTOOL = shutil.which("promtool", path=f"{Path(sys.executable).parent}{os.pathsep}"
                        f"{os.environ.get('PATH', '')}")
NEEDS_PROMTOOL = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found (make deps puts it in the venv)")
# The alerts the issue asks for, by what they watch.
REQUIRED = {"SnapperVMNoFreshCopy", "SnapperUnderReplicatedVMs", "SnapperZoneDown",
            "SnapperPoolNearlyFull", "SnapperReplicationFailing"}
# Series Prometheus makes itself for each target, not scraped from it.
PROMETHEUS_OWN = {"up"}
_METRIC = re.compile(r"\b((?:snapper|process|python)_[a-z0-9_]+|up)\b(?!\s*\()")
JOBS = ("snapperd", "snapper-coordinator")


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def metric_names(exprs: Iterable[str]) -> set[str]:
    """Metric names in PromQL expressions (ours are prefixed; label names are not)."""
    names: set[str] = set()
    for e in exprs:
        # Label matchers' values are strings, never names: drop them first.
        names |= set(_METRIC.findall(re.sub(r'"[^"]*"', '""', e)))
    return names


def test_rules_are_well_formed() -> None:
    doc = yaml.safe_load(RULES.read_text())
    assert set(doc) == {"groups"}
    rules = _rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)) and REQUIRED <= set(names)
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, r
        assert isinstance(r["expr"], str) and metric_names([r["expr"]]), r["alert"]
        assert r["labels"]["severity"] in ("critical", "warning"), r["alert"]
        assert r["annotations"]["summary"], r["alert"]
        if "for" in r:
            assert re.fullmatch(r"\d+[smh]", r["for"]), r["alert"]


def test_dashboard_is_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    graphs = [p for p in dash["panels"] if p["type"] != "row"]
    assert graphs and all(p["targets"] and all(t["expr"] for t in p["targets"])
                          for p in graphs)
    assert all(p["datasource"]["uid"] == "${DS_PROMETHEUS}" for p in graphs)


@NEEDS_PROMTOOL
async def test_promtool_checks_the_rules_and_the_example_config() -> None:
    assert PROMTOOL is not None
    for args in (["check", "rules", str(RULES)],
                 ["check", "config", str(MONITORING / "prometheus.example.yml")]):
        done = await proc.run([PROMTOOL, *args], timeout=60)
        assert done.returncode == 0, done.stdout.decode() + done.stderr


# -- against a real fleet -----------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass
class Scrape:
    """Every target's samples, labelled as Prometheus would (job, instance), and ``up``."""

    samples: list[Sample]

    def names(self) -> set[str]:
        return {s.name for s in self.samples}

    def value(self, name: str, **labels: str) -> float:
        return sum(s.value for s in self.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def scrape_fleet(fleet: LocalFleet) -> Scrape:
    assert fleet.coordinator is not None
    targets = [("snapper-coordinator", fleet.coordinator.url)] + [
        ("snapperd", z.http_url) for z in fleet.zones]
    out: list[Sample] = []
    # /metrics is open: scraped unsigned, as Prometheus does.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        for job, url in targets:
            instance = url.removeprefix("http://")
            target = {"job": job, "instance": instance}
            try:
                async with http.get(f"{url}/metrics") as r:
                    r.raise_for_status()
                    text = await r.text()
            except aiohttp.ClientError:
                out.append(Sample("up", target, 0.0))
                continue
            out.append(Sample("up", target, 1.0))
            out += [Sample(s.name, {**s.labels, **target}, float(s.value))
                    for fam in text_string_to_metric_families(text) for s in fam.samples]
    return Scrape(out)


async def push(fleet: LocalFleet, zfs: Zfs, vm: str, name: str) -> None:
    """A mirrored push to the VM's primary, as ``snapper push`` does."""
    assert fleet.coordinator is not None
    cn = fleet.cns[0]
    write_random(cn.pool, Dataset(cn.pool.name).child(vm), name, 256 << 10)
    (first, *_) = await placement(fleet.coordinator.url, vm, cn.key_path,
                                  fleet.coordinator.public_key)
    zone = next(z for z in fleet.zones if z.uuid == first["uuid"])
    async with ZoneClient("127.0.0.1", zone.ssh_port, cn.key_path,
                          host_key=zone.host_key_pub) as zc:
        rep = await CnClient(zc, dataset_root=cn.pool.name, zfs=zfs, vmadm=None).push(
            vm, name, metadata={"uuid": vm})
    assert len(rep.zones) == 2, rep.zones


@pytest.fixture
async def fleet(zfs_tier: ZfsTier, zfs: Zfs, tmp_path: Path) -> AsyncIterator[LocalFleet]:
    # lost_after well past the test: a stopped zone stays "active" and down.
    lf = await LocalFleet.start(tmp_path / "fleet", zones=2, cns=1, vms_per_cn=1,
                                pool_size=256 << 20, coordinator=True,
                                reconcile_interval_ms=500, lost_after=600.0)
    try:
        for vm in lf.cns[0].vms:
            await zfs.create(Dataset(lf.cns[0].pool.name).child(vm))
        yield lf
    finally:
        await lf.stop()


def _series(samples: Iterable[Sample], minutes: int) -> list[dict[str, str]]:
    """promtool input series: each sample held at its scraped value for ``minutes``."""
    out = []
    for s in samples:
        if math.isnan(s.value):
            continue
        labels = ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(s.labels.items()))
        out.append({"series": f"{s.name}{{{labels}}}", "values": f"{s.value:f}x{minutes}"})
    return out


def expect_id(expect: dict[str, list[dict[str, str]]]) -> str:
    return "-".join(sorted(expect)) or "none"


def _expand(template: str, labels: dict[str, str], value: str) -> str:
    """The rule's annotation as Prometheus renders it (``$labels.x`` and ``$value``)."""
    out = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), template)
    return out.replace("{{ $value }}", value)


async def promtool_test(tmp_path: Path, scrape: Scrape,
                        expect: dict[str, list[dict[str, str]]]) -> None:
    """Evaluate every rule on ``scrape`` held for an hour; ``expect``: alert -> the label
    sets it must fire with, and its ``$value`` (every other rule: none)."""
    assert PROMTOOL is not None
    rules = {r["alert"]: r for r in _rules()}
    tests = []
    for alert, rule in rules.items():
        exp = []
        for want in expect.get(alert, []):
            extra = dict(want)
            value = extra.pop("$value", "")
            labels = {**rule["labels"], **extra}
            exp.append({"exp_labels": labels,
                        "exp_annotations": {k: _expand(v, labels, value)
                                            for k, v in rule["annotations"].items()}})
        tests.append({"eval_time": "60m", "alertname": alert, "exp_alerts": exp})
    doc = {"rule_files": [str(RULES)], "evaluation_interval": "1m",
           "tests": [{"interval": "1m", "input_series": _series(scrape.samples, 70),
                      "alert_rule_test": tests}]}
    path = tmp_path / f"promtool-test-{expect_id(expect)}.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    done = await proc.run([PROMTOOL, "test", "rules", str(path)], timeout=120)
    assert done.returncode == 0, done.stdout.decode()[-4000:] + done.stderr[-2000:]


@pytest.mark.zfs
async def test_every_metric_exists_and_a_stopped_zone_fires(
        fleet: LocalFleet, zfs: Zfs, tmp_path: Path) -> None:
    vm = fleet.cns[0].vms[0]
    for name in ("s1", "s2"):
        await push(fleet, zfs, vm, name)

    got: list[Scrape] = []

    async def settled() -> bool:
        # A reconcile round on both zones found nothing behind; the coordinator saw
        # both zones healthy.
        s = await scrape_fleet(fleet)
        got[:] = [s]
        return (s.value("snapper_reconcile_runs_total", result="in_sync") >= 2
                and s.value("snapper_replication_lag_snapshots") == 0
                and "snapper_replication_lag_snapshots" in s.names()
                and s.value("snapper_coordinator_zone_up") == 2)

    await wait_until(settled, 120, "both zones in sync and healthy", poll=0.5)
    healthy = got[0]

    used = metric_names([r["expr"] for r in _rules()]) | metric_names(_dashboard_exprs())
    missing = sorted(used - healthy.names() - PROMETHEUS_OWN)
    assert not missing, f"named by the rules or the dashboard, absent from the scrape: {missing}"
    assert {"snapper_vm_newest_snapshot_age_seconds_bucket", "snapper_build_info",
            "process_cpu_seconds_total"} <= used
    # The VM's two copies are fresh, one per zone.
    assert healthy.value("snapper_vm_newest_snapshot_age_seconds_bucket", le="900.0") == 2
    assert healthy.value("snapper_coordinator_vms_by_copies", copies="2") == 1

    if PROMTOOL is None:
        pytest.skip("promtool not installed: the rules were not evaluated")
    await promtool_test(tmp_path, healthy, {})

    # As if the CN's last push were two days ago: every copy's newest complete
    # snapshot is stale, so the VM has no fresh copy, on both its zones.
    two_days_ago = str(int(time.time()) - 2 * 86400)
    for z in fleet.zones:
        for name in ("s1", "s2"):
            await zfs.set_user_props(Dataset(z.root).child(vm).snapshot(name),
                                     {"snapper:created": two_days_ago})
    stale = await scrape_fleet(fleet)
    assert stale.value("snapper_vm_newest_snapshot_age_seconds_bucket", le="93600.0") == 0
    assert stale.value("snapper_vm_newest_snapshot_age_seconds_bucket", le="259200.0") == 2
    zones = [{"job": "snapperd", "instance": z.http_url.removeprefix("http://")}
             for z in fleet.zones]
    await promtool_test(tmp_path, stale, {
        "SnapperVMNoFreshCopy": [{**z, "$value": "1"} for z in zones]})

    victim = fleet.zones[1]
    fleet.stop_zone(victim)

    async def seen_down() -> bool:
        s = await scrape_fleet(fleet)
        got[:] = [s]
        return s.value("snapper_coordinator_zone_up", zone=victim.uuid) == 0 \
            and "snapper_coordinator_zone_up" in s.names()

    await wait_until(seen_down, 60, "the coordinator sees the zone down", poll=0.5)
    down = got[0]
    assert fleet.coordinator is not None
    coordinator = {"job": "snapper-coordinator",
                   "instance": fleet.coordinator.url.removeprefix("http://")}
    await promtool_test(tmp_path, down, {
        "SnapperZoneDown": [{**coordinator, "zone": victim.uuid, "zone_name": victim.name,
                             "state": "active"}],
        "SnapperTargetDown": [zones[1]],
        # The surviving copy is still the stale one.
        "SnapperVMNoFreshCopy": [{**zones[0], "$value": "1"}],
    })
