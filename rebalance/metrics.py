"""Prometheus metrics of the coordinator, on a registry of its own (as snapperd's).

The same conventions as ``snapper_zone/common/metrics.py`` (unit-last names, no
``_created`` series, ``snapper_build_info`` and ``process_*`` from ``new_registry``).
Per-zone series are labelled by zone (a fleet has tens of zones, not thousands);
per-VM figures are counts only: ``snapper_coordinator_vms_by_copies{copies}`` is how
many VMs have 0, 1 or 2 of their placed copies on admitted, not-lost zones.
"""

from __future__ import annotations

from typing import get_args

from prometheus_client import Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from rebalance.placement import MoveReason
from snapper_zone.common.metrics import new_registry

__all__ = ["CONTENT_TYPE_LATEST", "CoordinatorMetrics"]


class CoordinatorMetrics:
    def __init__(self) -> None:
        r = self.registry = new_registry("snapper-coordinator")
        self.zones = Gauge("snapper_coordinator_zones", "Registered zones by state and health",
                           ["state", "health"], registry=r)
        self.zone_up = Gauge("snapper_coordinator_zone_up",
                             "1 if the zone's last health check passed, else 0 (admitted "
                             "zones)", ["zone", "zone_name", "state"], registry=r)
        self.vms = Gauge("snapper_coordinator_vms", "VMs in the placement", registry=r)
        self.under_replicated = Gauge(
            "snapper_coordinator_under_replicated_vms",
            "VMs with a copy on a lost zone (fewer than two live copies)", registry=r)
        self.vms_by_copies = Gauge(
            "snapper_coordinator_vms_by_copies",
            "VMs by how many of their placed copies are on live (admitted, not lost) zones",
            ["copies"], registry=r)
        self.moves = Counter("snapper_coordinator_moves", "Finished moves by reason and result",
                             ["reason", "result"], registry=r)
        self.moves_active = Gauge("snapper_coordinator_moves_active", "Moves planned or running",
                                  ["state"], registry=r)
        self.bytes_moved = Counter("snapper_coordinator_moved_bytes",
                                   "Bytes of VMs copied by finished moves", registry=r)
        self.health_checks = Counter("snapper_coordinator_health_checks",
                                     "Zone health checks by result", ["result"], registry=r)
        self.leader = Gauge("snapper_coordinator_leader",
                            "1 while this coordinator leads (runs moves, health checks and "
                            "planning), else 0", registry=r)
        self.zones_lost = Counter("snapper_coordinator_zones_declared_lost",
                                  "Zones the health checker declared lost", registry=r)

        # Every known label set from 0, so increase() sees the first failure too.
        for reason in get_args(MoveReason):
            for result in ("done", "failed"):
                self.moves.labels(reason, result)
        for result in ("ok", "failed"):
            self.health_checks.labels(result)

    def render(self) -> bytes:
        return generate_latest(self.registry)
