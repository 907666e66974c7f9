"""Admission and scoped peers in a real fleet: a coordinator and 3 snapperd zones.

A zone of the fleet, whose key every zone trusts as a peer's, may not act on
a VM placed on the other two (real asyncssh, real ZFS); a zone registering by
itself is pending and the fleet's zones never let its key in.
"""

from __future__ import annotations

import asyncssh
import pytest

from snapper_zone.common.httpsig import Signer, signing_session
from snapper_zone.daemon.sshserver import ENCRYPTION_ALGS
from snapper_zone.wire import ZoneRegistration, protocol
from tests.helpers import wait_until
from tests.test_fleet_coordinated import (  # noqa: F401  (fleet: a fixture, used by name)
    Fleet,
    _push_rounds,
    fleet,
)
from tests.test_sshserver import run

pytestmark = pytest.mark.zfs


async def _connect(port: int, key: object) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect(
        "127.0.0.1", port, username="snapper", known_hosts=None, client_keys=[key],
        agent_path=None, config=[], encryption_algs=ENCRYPTION_ALGS, compression_algs=None)


@pytest.mark.vms(2)
async def test_a_fleet_zone_outside_a_vms_placement_is_refused(
        fleet: Fleet) -> None:  # noqa: F811
    await _push_rounds(fleet, ["s1"])
    vm = fleet.cn.vms[0]
    pair = (await fleet.get(f"{fleet.url}/v1/placement/{vm}"))["zones"]
    outsider = next(z for z in fleet.f.zones if z.uuid not in pair)
    placed = fleet.zone(pair[0])
    before = (await fleet.get(f"{placed.http_url}/v1/vms/{vm}/snapshots"))
    guid = before[0]["datasets"]["disk0"]["guid"]
    conn = await _connect(placed.ssh_port, str(outsider.host_key_pub.with_suffix("")))
    try:
        for line in (f"send {vm} disk0 s1", f"destroy {vm} s1",
                     f"destroy {vm} s1 --dataset disk0 --guid {guid}", f"delete {vm} s1",
                     f"snapshots {vm}"):
            status, out, err = await run(conn, line)
            assert status == 1 and out == b"", line
            assert protocol.parse_error_line(err)[0] == "NotAuthorized", (line, err)
        assert (await run(conn, "ping"))[0] == 0  # a trusted zone: only the VM is out of reach
    finally:
        conn.close()
    assert await fleet.get(f"{placed.http_url}/v1/vms/{vm}/snapshots") == before
    # Its own partner in the pair may, the same commands.
    partner = fleet.zone(pair[1])
    conn = await _connect(placed.ssh_port, str(partner.host_key_pub.with_suffix("")))
    try:
        status, stream, err = await run(conn, f"send {vm} disk0 s1")
        assert status == 0 and stream, err
    finally:
        conn.close()


@pytest.mark.vms(1)
async def test_a_zone_registering_by_itself_stays_pending_and_untrusted(
        fleet: Fleet) -> None:  # noqa: F811
    fake_uuid = "0badc0de-0000-4000-8000-000000000001"
    key = asyncssh.generate_private_key("ssh-ed25519")
    reg = ZoneRegistration(uuid=fake_uuid, name="fake", ssh_host="127.0.0.1", ssh_port=1,
                           http_url="http://127.0.0.1:1", capacity=1 << 40,
                           host_key=key.export_public_key().decode().strip())
    async with signing_session(Signer(key)) as http, \
            http.post(f"{fleet.url}/v1/zones", json=reg.to_json()) as r:
        assert r.status == 201, await r.text()
        assert (await r.json())["state"] == "pending"
    zones = {z["uuid"]: z for z in (await fleet.get(f"{fleet.url}/v1/zones"))["zones"]}
    assert (zones[fake_uuid]["state"], zones[fake_uuid]["admitted"]) == ("pending", False)
    trusted = (await fleet.get(f"{fleet.url}/v1/zones?admitted=true"))["zones"]
    assert fake_uuid not in {z["uuid"] for z in trusted}
    # A zone pending during the rebuild grace may hold copies nobody may ask it
    # about: the coordinator places no VM it cannot find twice until the grace ends.
    async def grace_over() -> bool:
        return bool((await fleet.get(f"{fleet.url}/v1/status"))["rebuild_grace_left"] == 0)

    await wait_until(grace_over, 30, "the coordinator's rebuild grace over")
    await _push_rounds(fleet, ["s1"])  # the VM is placed, never on the fake zone
    vm = fleet.cn.vms[0]
    assert fake_uuid not in (await fleet.get(f"{fleet.url}/v1/placement/{vm}"))["zones"]
    # Pending, its key opens no SSH session on any zone, nor is it anyone's peer.
    for z in fleet.f.zones:
        with pytest.raises(asyncssh.PermissionDenied):
            await _connect(z.ssh_port, key)
        peers = (await fleet.get(f"{z.http_url}/v1/replication"))["peers"]
        assert fake_uuid not in {p["uuid"] for p in peers}
    # Admission is what lets it in: once activated, the zones learn it.
    async with fleet.http.put(f"{fleet.url}/v1/zones/{fake_uuid}/state",
                              json={"state": "active"}) as r:
        assert r.status == 200, await r.text()
    zone = fleet.f.zones[0]

    async def learnt() -> bool:
        peers = (await fleet.get(f"{zone.http_url}/v1/replication"))["peers"]
        return fake_uuid in {p["uuid"] for p in peers}

    await wait_until(learnt, 30, "the admitted zone learnt as a peer")
    conn = await _connect(zone.ssh_port, key)
    try:
        assert (await run(conn, "ping"))[0] == 0
        # Trusted, and still scoped: no VM is placed on it, and asking about a VM
        # nobody placed places nothing.
        unknown = "0badc0de-0000-4000-8000-0000000000ff"
        for other in (vm, unknown):
            status, _, err = await run(conn, f"snapshots {other}")
            assert (status, protocol.parse_error_line(err)[0]) == (1, "NotAuthorized")
        async with fleet.http.get(f"{fleet.url}/v1/placement/{unknown}?create=false") as r:
            assert r.status == 404
    finally:
        conn.close()
