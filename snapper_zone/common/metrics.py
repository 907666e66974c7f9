"""Prometheus metrics of one snapperd, on a registry of its own.

A registry per zone (not the global default) lets a test or the demo run
several zones in one process and read each one's figures apart.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.bytes_received = Counter("snapper_bytes_received", "Stream bytes received",
                                      ["kind"], registry=r)
        self.bytes_sent = Counter("snapper_bytes_sent", "Stream bytes sent", ["kind"],
                                  registry=r)
        self.transfers = Counter("snapper_transfers", "Finished transfers",
                                 ["kind", "result"], registry=r)
        self.transfer_seconds = Histogram(
            "snapper_transfer_duration_seconds", "Transfer duration", ["kind"], registry=r,
            buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 14400))
        self.active = Gauge("snapper_active_transfers", "Transfers in flight", ["kind"],
                            registry=r)
        self.pool_free = Gauge("snapper_pool_free_bytes", "Bytes available under the root",
                               registry=r)
        self.auth_failures = Counter("snapper_auth_failures", "Refused keys and commands",
                                     ["reason"], registry=r)
        self.commands = Counter("snapper_commands", "SSH commands by verb and result",
                                ["verb", "result"], registry=r)

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

    def render(self) -> bytes:
        return generate_latest(self.registry)
