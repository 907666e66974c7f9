"""A push's pipelined mirror through the peer's sshd gate (docs/data-plane.md).

Two real snapperd zones, each with its own OpenSSH sshd as its gate, peers
of each other, on real ZFS. The primary tees the CN's stream into an ``ssh``
to the mirror's gate: in the kernel (tee(2)) when the CN's stream came
through the primary's gate, from Python when it came to snapperd's own port.
Either way the push returns mirrored, guid for guid, and the copy went in
through the mirror's gate. Each test runs twice: with splice(2) and tee(2)
(Linux), and with every stream copied through Python as on illumos
(``SNAPPER_NO_SPLICE``).
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from snapper_zone.cn.client import CnClient
from snapper_zone.fleet.local import LocalFleet, LocalZone
from snapper_zone.fleet.sshd import sshd_path
from snapper_zone.transfer.remote import ZoneClient
from snapper_zone.transfer.stream import can_tee
from snapper_zone.zfs.zfs import Zfs
from tests.conftest import ZfsTier
from tests.test_replication import Pair

pytestmark = pytest.mark.zfs

SSH = shutil.which("ssh")


class GatedPair(Pair):
    def cn_client(self, zone: LocalZone, *, openssh: bool) -> tuple[ZoneClient, CnClient]:
        """The CN's client; with ``openssh`` its streams go through ``ssh`` (to the
        zone's gate), else over its asyncssh connection to snapperd's own port."""
        zc = ZoneClient("127.0.0.1", zone.ssh_port, self.cn.key_path,
                        host_key=zone.host_key_pub, openssh=SSH if openssh else None)
        return zc, CnClient(zc, dataset_root=self.cn.pool.name, zfs=self.zfs, vmadm=None)

    async def push_via(self, name: str, *, openssh: bool) -> None:
        zc, cn = self.cn_client(self.primary, openssh=openssh)
        async with zc:
            rep = await cn.push(self.vm, name)
            assert zc.stream_port == (self.primary.gate_port if openssh else None) or \
                not openssh
        assert rep.durability == "mirrored"
        want = await self.cn_guids(name)
        # At the ack: both zones hold it, guids as on the CN.
        assert (await self.holdings(self.primary))[name] == want
        assert (await self.holdings(self.mirror))[name] == want

    async def gate_runs(self, zone: LocalZone) -> float:
        return await self.metric(zone, "snapper_gate_commands_total", result="ok")

    async def teed(self) -> float:
        return await self.metric(self.primary, "snapper_mirror_transfers_total",
                                 direction="pipelined", peer=self.mirror.uuid, result="ok")


@pytest.fixture(params=["splice", "copy"])
async def gated(request: pytest.FixtureRequest, zfs_tier: ZfsTier, zfs: Zfs, tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[GatedPair]:
    """A pair with gates; each stream moved by splice(2) and tee(2) where Linux has
    them, or ("copy") through Python as on illumos, in the CN and in both zones."""
    if sshd_path() is None or SSH is None:
        pytest.skip("needs OpenSSH's sshd and ssh (apt-get install openssh-server)")
    if request.param == "copy":
        monkeypatch.setenv("SNAPPER_NO_SPLICE", "1")  # the zones are started with it
    elif not can_tee():
        pytest.skip("no splice(2)/tee(2) here (Linux only): the copy variant runs")
    fleet = await LocalFleet.start(tmp_path / "fleet", zones=2, cns=1, vms_per_cn=1,
                                   pool_size=512 << 20, reconcile_interval_ms=500,
                                   gate_min_bytes=0)
    try:
        p = GatedPair(fleet, zfs)
        await p.make_vm()
        yield p
    finally:
        await fleet.stop()


async def test_a_push_through_the_gate_is_teed_into_the_mirrors_gate(
        gated: GatedPair) -> None:
    """In the kernel (tee(2)) with splice, from Python's copy without it."""
    gated.write("big", 6 << 20)
    await gated.push_via("g1", openssh=True)
    gated.write("more", 1 << 20)
    await gated.push_via("g2", openssh=True)  # incremental
    assert await gated.teed() == 4  # two datasets, two pushes
    # The CN's streams came in through the primary's gate, the copies through
    # the mirror's (each a receive there, whose parts the link committed).
    assert await gated.gate_runs(gated.primary) >= 4
    assert await gated.gate_runs(gated.mirror) == 4
    assert await gated.metric(gated.primary, "snapper_sent_bytes_total",
                              kind="mirror-pipelined") > 7 << 20
    # Four copies on the link's kept logins: a master per copy at once, at most.
    logins = {how: await gated.metric(gated.primary, "snapper_peer_ssh_logins_total",
                                      peer=gated.mirror.uuid, how=how)
              for how in ("master", "alone")}
    assert logins["master"] >= 1 and logins["master"] + logins["alone"] <= 2, logins


async def test_a_push_to_snapperds_port_is_teed_from_python_into_the_mirrors_gate(
        gated: GatedPair) -> None:
    gated.write("big", 4 << 20)
    await gated.push_via("p1", openssh=False)
    assert await gated.teed() == 2
    assert await gated.gate_runs(gated.primary) == 0
    assert await gated.gate_runs(gated.mirror) == 2


async def test_a_mirror_whose_gate_is_down_still_gets_the_push_before_the_ack(
        gated: GatedPair) -> None:
    """The mirror's sshd is gone: the tee's ssh cannot log in (exit 255), the tee
    is let go, and the primary sends the mirror the snapshot before it acks;
    the next push is teed over the link's own channel."""
    assert gated.mirror.gate_sshd is not None
    gated.mirror.gate_sshd.stop()
    gated.mirror.gate_sshd = None
    gated.write("big", 4 << 20)
    await gated.push_via("d1", openssh=True)
    gated.write("more", 1 << 20)
    await gated.push_via("d2", openssh=True)
    assert await gated.teed() >= 2  # the second push's, over the channel
    assert await gated.gate_runs(gated.mirror) == 0
    # The master could not log in either: that copy's ssh tried alone.
    assert await gated.metric(gated.primary, "snapper_peer_ssh_logins_total",
                              peer=gated.mirror.uuid, how="alone") >= 1
