"""Policies: when snapshots are taken, from which base they are sent, how long
they are kept. Pure: the CN's agent and the zones' pruning do the I/O."""

from snapper_zone.common.durations import parse_duration
from snapper_zone.policy.retention import Grid, Retention, Snap, Verdict, plan_prune
from snapper_zone.policy.schedule import Cron, Interval, parse_schedule
from snapper_zone.policy.spec import (
    InvalidPolicy,
    Level,
    Policy,
    PolicySet,
    check_policy_document,
    check_policy_name,
    level_of,
    load_policies,
    parse_policies,
    snapshot_name,
    time_of,
)

__all__ = ["Cron", "Grid", "Interval", "InvalidPolicy", "Level", "Policy", "PolicySet",
           "Retention", "Snap", "Verdict", "check_policy_document", "check_policy_name",
           "level_of", "load_policies", "parse_duration", "parse_policies", "parse_schedule",
           "plan_prune", "snapshot_name", "time_of"]
