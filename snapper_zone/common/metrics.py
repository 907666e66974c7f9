"""Prometheus metrics of one snapperd, on a registry of its own.

A registry per zone (not the global default) lets a test or the demo run
several zones in one process and read each one's figures apart.

Names follow Prometheus's conventions: the unit last, then ``_total`` for a
counter (``snapper_received_bytes_total``); no ``_created`` series (a counter's
creation time doubles every series and no rule reads it). Every registry
(``new_registry``, the coordinator's too) carries ``snapper_build_info{daemon,
version} 1`` and the process collector's ``process_*`` (CPU, memory, open fds,
start time; where ``/proc`` has Linux's layout, else none).

Per-VM freshness with bounded cardinality (no VM label): the age of each VM's
newest complete snapshot on this zone, as a gauge histogram
``snapper_vm_newest_snapshot_age_seconds`` (``_bucket{le}``, ``_gcount``,
``_gsum``; buckets ``AGE_BUCKETS``), recomputed at each scrape from one
recursive ``zfs get``; VMs holding no complete snapshot yet are
``snapper_vms_without_complete_snapshot``.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeHistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from snapper_zone.common.version import version

__all__ = ["AGE_BUCKETS", "CONTENT_TYPE_LATEST", "AgeHistogram", "Metrics", "age_buckets",
           "new_registry"]

# A process-wide switch in prometheus-client; every registry here wants it off.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Seconds: 15 min, 1 h, 6 h, 12 h, 1 d, 26 h (a daily schedule plus slack), 2 d, 3 d, 7 d,
# 30 d. Alert rules compare against these edges, so changing one changes the rules.
AGE_BUCKETS: tuple[float, ...] = (900, 3600, 6 * 3600, 12 * 3600, 86400, 26 * 3600,
                                  2 * 86400, 3 * 86400, 7 * 86400, 30 * 86400)


def new_registry(daemon: str) -> CollectorRegistry:
    """A daemon's registry: build info and process metrics, no ``_created`` series."""
    r = CollectorRegistry()
    Info("snapper_build", "This daemon's build (value 1)", registry=r).info(
        {"daemon": daemon, "version": version()})
    ProcessCollector(registry=r)
    PlatformCollector(registry=r)
    return r


def age_buckets(ages: Iterable[float], edges: Sequence[float] = AGE_BUCKETS
                ) -> tuple[list[int], int, float]:
    """Cumulative bucket counts (one per edge, then +Inf), count and sum of ``ages``.

    An age equal to an edge falls in that edge's bucket (Prometheus's ``le``).
    """
    counts = [0] * (len(edges) + 1)
    total = 0.0
    n = 0
    for a in ages:
        counts[bisect.bisect_left(edges, a)] += 1
        total += a
        n += 1
    cumulative = []
    running = 0
    for c in counts:
        running += c
        cumulative.append(running)
    return cumulative, n, total


class AgeHistogram(Collector):
    """A gauge histogram of ages set as a whole (``set``), read at each scrape."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry,
                 edges: Sequence[float] = AGE_BUCKETS) -> None:
        self.name, self.documentation, self.edges = name, documentation, tuple(edges)
        self._ages: tuple[float, ...] = ()
        registry.register(self)

    def set(self, ages: Iterable[float]) -> None:
        self._ages = tuple(ages)

    def collect(self) -> Iterator[Metric]:
        cumulative, _n, total = age_buckets(self._ages, self.edges)
        # As prometheus-client writes a Histogram's le ("3600.0"): rules select on it.
        les = [floatToGoString(e) for e in self.edges] + ["+Inf"]  # type: ignore[no-untyped-call]
        yield GaugeHistogramMetricFamily(self.name, self.documentation,
                                         buckets=list(zip(les, cumulative, strict=True)),
                                         gsum_value=total)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = new_registry("snapperd")
        self.bytes_received = Counter("snapper_received_bytes", "Stream bytes received",
                                      ["kind"], registry=r)
        self.bytes_sent = Counter("snapper_sent_bytes", "Stream bytes sent (kind "
                                  "mirror-pipelined: a CN's push teed to the mirror)",
                                  ["kind"], registry=r)
        self.transfers = Counter("snapper_transfers", "Finished transfers",
                                 ["kind", "result"], registry=r)
        self.transfer_seconds = Histogram(
            "snapper_transfer_duration_seconds", "Transfer duration", ["kind"], registry=r,
            buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 14400))
        self.active = Gauge("snapper_active_transfers", "Transfers in flight", ["kind"],
                            registry=r)
        self.pool_free = Gauge("snapper_pool_free_bytes", "Bytes available under the root",
                               registry=r)
        self.pool_used = Gauge("snapper_pool_used_bytes", "Bytes used under the root",
                               registry=r)
        self.auth_failures = Counter("snapper_auth_failures", "Refused keys and commands",
                                     ["reason"], registry=r)
        self.commands = Counter("snapper_commands", "SSH commands by verb and result",
                                ["verb", "result"], registry=r)
        self.gate_commands = Counter("snapper_gate_commands", "Commands the sshd gate "
                                     "handed over, by result (ok, failed, refused)",
                                     ["result"], registry=r)
        self.gate_running = Gauge("snapper_gate_running", "Gate commands running",
                                  registry=r)
        # Against the rate of copies: how well a link's kept logins serve them.
        self.peer_ssh_logins = Counter(
            "snapper_peer_ssh_logins", "ssh logins to carry copies to a peer's gate: a "
            "kept master's (how=master) or a copy's own, none being free (how=alone)",
            ["peer", "how"], registry=r)

        self.lag_snapshots = Gauge("snapper_replication_lag_snapshots",
                                   "VM snapshots complete here and not yet on the peer",
                                   ["peer"], registry=r)
        self.lag_bytes = Gauge("snapper_replication_lag_bytes",
                               "Bytes of snapshots here the peer lacks", ["peer"], registry=r)
        self.mirror_transfers = Counter("snapper_mirror_transfers",
                                        "Zone-to-zone snapshot transfers by result",
                                        ["peer", "direction", "result"], registry=r)
        self.reconcile_runs = Counter("snapper_reconcile_runs", "Reconcile rounds by outcome",
                                      ["result"], registry=r)
        self.reconcile_running = Gauge("snapper_reconcile_running",
                                       "VMs the replication loop is reconciling now",
                                       registry=r)
        self.reconcile_waiting = Gauge(
            "snapper_reconcile_waiting", "VMs waiting for the replication loop: kicked "
            "(after a push or a delete) or what is left of its round", ["kind"], registry=r)

        self.vms = Gauge("snapper_vms", "VM copies held by this zone", registry=r)
        self.vms_without_complete = Gauge(
            "snapper_vms_without_complete_snapshot",
            "VM copies here holding no complete snapshot", registry=r)
        self.newest_age = AgeHistogram(
            "snapper_vm_newest_snapshot_age_seconds",
            "Age of each VM's newest complete snapshot on this zone (one VM, one "
            "observation; set at each scrape)", r)

        # Known label sets from 0: a series born at 1 is invisible to increase().
        for reason in ("unknown_key", "not_authorized"):
            self.auth_failures.labels(reason)
        for result in ("acted", "in_sync", "blocked", "failed"):
            self.reconcile_runs.labels(result)
        for kind in ("send", "mirror-out", "mirror-pipelined"):
            self.bytes_sent.labels(kind)
        for kind in ("receive", "mirror-in"):
            self.bytes_received.labels(kind)
        for result in ("ok", "failed", "refused"):
            self.gate_commands.labels(result)
        for kind in ("kicked", "round"):
            self.reconcile_waiting.labels(kind)

    def set_freshness(self, newest: dict[str, int | None], now: float) -> None:
        """``newest``: each VM held here -> its newest complete snapshot's creation time."""
        self.vms.set(len(newest))
        self.vms_without_complete.set(sum(1 for t in newest.values() if t is None))
        self.newest_age.set(max(0.0, now - t) for t in newest.values() if t is not None)

    def render(self) -> bytes:
        return generate_latest(self.registry)
