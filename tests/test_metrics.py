"""The metrics' pure parts: the age histogram's buckets, the registry every daemon shares."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import Counter
from prometheus_client.parser import text_string_to_metric_families

from rebalance.metrics import CoordinatorMetrics
from snapper_zone.common.metrics import AGE_BUCKETS, Metrics, age_buckets
from snapper_zone.common.version import version

_edges = st.lists(st.floats(0, 1e7, allow_nan=False), min_size=1, max_size=8, unique=True)
_ages = st.lists(st.floats(0, 1e8, allow_nan=False), max_size=50)


@given(_ages, _edges)
def test_age_buckets_count_what_each_le_holds(ages: list[float], edges: list[float]) -> None:
    edges.sort()
    cumulative, n, total = age_buckets(ages, edges)
    assert cumulative == [sum(1 for a in ages if a <= e) for e in edges] + [len(ages)]
    assert n == len(ages) and total == sum(ages)


@given(st.dictionaries(st.uuids().map(str), st.none() | st.integers(0, 2_000_000_000),
                       max_size=30),
       st.floats(0, 2_100_000_000, allow_nan=False))
def test_freshness_is_one_observation_per_vm(newest: dict[str, int | None],
                                             now: float) -> None:
    m = Metrics()
    m.set_freshness(newest, now)
    fams = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    complete = [t for t in newest.values() if t is not None]
    (vms,) = fams["snapper_vms"].samples
    (none,) = fams["snapper_vms_without_complete_snapshot"].samples
    assert (vms.value, none.value) == (len(newest), len(newest) - len(complete))
    buckets = {s.labels["le"]: s.value
               for s in fams["snapper_vm_newest_snapshot_age_seconds"].samples}
    assert len(buckets) == len(AGE_BUCKETS) + 1 and buckets["+Inf"] == len(complete)
    # Bounded: no VM label anywhere, however many VMs.
    assert not any("vm" in s.labels for f in fams.values() for s in f.samples)


def test_both_registries_carry_build_and_process_and_no_created() -> None:
    for metrics, daemon in ((Metrics(), "snapperd"),
                            (CoordinatorMetrics(), "snapper-coordinator")):
        Counter("snapper_test_things", "a counter", registry=metrics.registry).inc()
        samples = {s.name: s for f in text_string_to_metric_families(metrics.render().decode())
                   for s in f.samples}
        assert samples["snapper_build_info"].labels == {"daemon": daemon, "version": version()}
        assert samples["snapper_test_things_total"].value == 1
        assert "process_cpu_seconds_total" in samples and "python_info" in samples
        assert not [n for n in samples if n.endswith("_created")]
