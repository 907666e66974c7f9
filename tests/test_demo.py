"""The README's main command: ``snapper demo`` runs end to end and leaves nothing behind."""

from __future__ import annotations

import re
import sys

import pytest

from snapper_zone import proc
from snapper_zone.zfs import Zfs
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
