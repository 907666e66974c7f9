"""The README's main command: ``snapper demo`` runs end to end and leaves nothing behind."""

from __future__ import annotations

import re
import socket
import sys

import pytest

from snapper_zone.fleet.local import free_port
from snapper_zone.zfs import proc
from snapper_zone.zfs.zfs import Zfs
from tests.conftest import ZfsTier

pytestmark = pytest.mark.zfs


async def test_demo_runs_and_cleans_up(zfs_tier: ZfsTier, zfs: Zfs) -> None:
    done = await proc.run([sys.executable, "-m", "snapper_zone.cli", "demo", "--data-mib", "2"],
                          timeout=600)
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr
    assert "byte-for-byte equal to the CN's data at @s3: True" in out
    assert "incremental from @s3" in out  # after deleting @s2 on the zone
    pools = set(re.findall(r"pool (\S+), ssh", out))
    assert len(pools) == 3
    assert not pools & set(await zfs.pools())
    pids = re.findall(r"snapperd pid (\d+)", out)
    assert len(pids) == 3
    for pid in pids:
        assert not (await proc.run(["kill", "-0", pid], timeout=10)).ok


def test_fleet_ports_stay_out_of_the_ephemeral_range() -> None:
    """A daemon binds its port after the fleet picked it (and again after a
    restart): a port from the ephemeral range could meanwhile be an outgoing
    connection's source port, and the daemon would not start (seen in CI)."""
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= p < low for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))
