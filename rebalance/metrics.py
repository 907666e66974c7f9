"""Prometheus metrics of the coordinator, on a registry of its own (as snapperd's)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "CoordinatorMetrics"]


class CoordinatorMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.zones = Gauge("snapper_coordinator_zones", "Registered zones by state and health",
                           ["state", "health"], registry=r)
        self.vms = Gauge("snapper_coordinator_vms", "VMs in the placement", registry=r)
        self.under_replicated = Gauge(
            "snapper_coordinator_under_replicated_vms",
            "VMs with a copy on a lost zone (fewer than two live copies)", registry=r)
        self.moves = Counter("snapper_coordinator_moves", "Finished moves by reason and result",
                             ["reason", "result"], registry=r)
        self.moves_active = Gauge("snapper_coordinator_moves_active", "Moves planned or running",
                                  ["state"], registry=r)
        self.bytes_moved = Counter("snapper_coordinator_bytes_moved",
                                   "Bytes of VMs copied by finished moves", registry=r)
        self.health_checks = Counter("snapper_coordinator_health_checks",
                                     "Zone health checks by result", ["result"], registry=r)
        self.zones_lost = Counter("snapper_coordinator_zones_declared_lost",
                                  "Zones the health checker declared lost", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
