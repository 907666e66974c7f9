"""The attack suite: issue 13's scenarios against a real fleet, each refused, nothing changed.

A coordinator, three snapperd zones on their own zfs-fuse pools, two CNs with a
VM each, every snapshot mirrored. The attacker sits on the admin network with
no credentials, with a key of its own, with the other CN's key, or with a key
stolen and then revoked. Each scenario asserts the typed refusal and that the
fleet holds exactly what it held before (zones, placements, every snapshot
of every VM on every zone, by guid).

Scenarios of the issue run elsewhere too, against the part they attack:
- a fake zone registering itself, a real zone outside a VM's placement:
  ``test_admission_fleet.py``; pinned keys and rekey: ``test_admission.py``;
- idle receives holding locks and slots, 50 idle connections, quotas,
  ``--size``, received properties, caps: ``test_limits.py``;
- compound/clone/raw/redacted streams and a peer's wrong stream:
  ``test_transfer_path.py``; signatures (replay, skew, tamper): ``test_http_auth.py``;
- the SSH grammar and the send-stream header, fuzzed: ``test_protocol.py``,
  ``test_sendstream.py``; nested JSON: ``test_jsontext.py``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
import pytest

from snapper_zone.cn.client import CnClient, placement
from snapper_zone.common.httpsig import Signer, signing_session
from snapper_zone.daemon.sshserver import ENCRYPTION_ALGS
from snapper_zone.fleet.local import LocalCN, LocalFleet, LocalZone
from snapper_zone.transfer.remote import ZoneClient
from snapper_zone.wire import ZoneRegistration, protocol
from snapper_zone.zfs.names import Dataset
from snapper_zone.zfs.zfs import Zfs
from tests.conftest import ZfsTier
from tests.helpers import wait_until, write_random
from tests.test_sshserver import run

pytestmark = pytest.mark.zfs

Holdings = dict[str, dict[str, dict[str, dict[str, str]]]]  # zone -> vm -> snap -> ds -> guid


@dataclass
class Target:
    fleet: LocalFleet
    zfs: Zfs
    operator: aiohttp.ClientSession
    url: str  # the coordinator's

    @property
    def victim(self) -> LocalCN:
        return self.fleet.cns[0]

    @property
    def other_cn(self) -> LocalCN:
        return self.fleet.cns[1]

    def zone(self, uuid: str) -> LocalZone:
        return next(z for z in self.fleet.zones if z.uuid == uuid)

    async def get(self, url: str) -> Any:
        async with self.operator.get(url) as r:
            assert r.status == 200, (url, r.status, await r.text())
            return await r.json()

    async def push(self, cn: LocalCN, vm: str, name: str) -> list[str]:
        assert self.fleet.coordinator is not None
        ends = await placement(self.url, vm, cn.key_path, self.fleet.coordinator.public_key)
        zone = self.zone(ends[0]["uuid"])
        write_random(cn.pool, Dataset(cn.pool.name).child(vm).child("disk0"), name, 64 << 10)
        async with ZoneClient("127.0.0.1", zone.ssh_port, cn.key_path,
                              host_key=zone.host_key_pub) as zc:
            rep = await CnClient(zc, dataset_root=cn.pool.name, zfs=self.zfs,
                                 vmadm=None).push(vm, name, metadata={"secret": vm})
        return rep.zones

    async def holdings(self) -> Holdings:
        """Every snapshot of every VM on every zone, complete or not, by guid."""
        out: Holdings = {}
        for z in self.fleet.zones:
            for cn in self.fleet.cns:
                for vm in cn.vms:
                    async with self.operator.get(f"{z.http_url}/v1/vms/{vm}/snapshots") as r:
                        if r.status == 404:
                            continue
                        assert r.status == 200, await r.text()
                        out.setdefault(z.uuid, {})[vm] = {
                            s["name"]: {d: str(p["guid"]) for d, p in s["datasets"].items()}
                            | {"complete": str(s["complete"])} for s in await r.json()}
        return out

    async def zones(self) -> dict[str, dict[str, Any]]:
        return {z["uuid"]: z for z in (await self.get(f"{self.url}/v1/zones"))["zones"]}

    async def placements(self) -> dict[str, list[str]]:
        return {vm: (await self.get(f"{self.url}/v1/placement/{vm}?create=false"))["zones"]
                for cn in self.fleet.cns for vm in cn.vms}

    async def state(self) -> tuple[Holdings, dict[str, dict[str, Any]], dict[str, list[str]]]:
        zones = await self.zones()
        for z in zones.values():  # what moves with time is not what an attack changes
            for k in ("last_seen", "used", "free", "health", "suspect_since"):
                z.pop(k, None)
        return await self.holdings(), zones, await self.placements()


@pytest.fixture
async def target(zfs_tier: ZfsTier, zfs: Zfs, tmp_path: Path) -> AsyncIterator[Target]:
    lf = await LocalFleet.start(tmp_path / "fleet", zones=3, cns=2, vms_per_cn=1,
                                pool_size=256 << 20, coordinator=True,
                                reconcile_interval_ms=5000, lost_after=30.0)
    try:
        assert lf.coordinator is not None
        async with lf.http() as http:  # as the fleet's operator
            t = Target(lf, zfs, http, lf.coordinator.url)

            async def admitted() -> bool:
                zones = await t.zones()
                return [z["state"] for z in zones.values()].count("active") == 3

            await wait_until(admitted, 60, "3 zones admitted")
            for cn in lf.cns:
                for vm in cn.vms:
                    top = Dataset(cn.pool.name).child(vm)
                    await zfs.create(top)
                    await zfs.create(top.child("disk0"))
                    for snap in ("s1", "s2"):
                        assert len(await t.push(cn, vm, snap)) == 2  # mirrored
            yield t
    finally:
        await lf.stop()


async def _status(session: aiohttp.ClientSession, method: str, url: str,
                  **kw: Any) -> tuple[int, str]:
    async with session.request(method, url, **kw) as r:
        body = await r.json(content_type=None) if r.content_length != 0 else None
        return r.status, body.get("code", "") if isinstance(body, dict) else ""


def _session(key: asyncssh.SSHKey | Path) -> aiohttp.ClientSession:
    return signing_session(Signer(key) if isinstance(key, asyncssh.SSHKey) else Signer.load(key))


async def _ssh(zone: LocalZone, key: object) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect(
        "127.0.0.1", zone.ssh_port, username="snapper", known_hosts=None, client_keys=[key],
        agent_path=None, config=[], encryption_algs=ENCRYPTION_ALGS, compression_algs=None)


async def test_nobody_without_a_role_changes_the_coordinator(target: Target) -> None:
    before = await target.state()
    real = target.fleet.zones[0]
    zurl = f"{target.url}/v1/zones/{real.uuid}"
    mine = asyncssh.generate_private_key("ssh-ed25519")
    # Unsigned, with a key nobody knows, with a CN's key: every change refused.
    async with aiohttp.ClientSession() as anon, _session(mine) as stranger, \
            _session(target.victim.key_path) as cn:
        for who, want in ((anon, (401, "Unauthorized")), (stranger, (401, "Unauthorized")),
                          (cn, (403, "NotAuthorized"))):
            assert await _status(who, "PUT", f"{zurl}/state", json={"state": "lost"}) == want
            assert await _status(who, "DELETE", zurl) == want
            assert await _status(who, "POST", f"{target.url}/v1/rebalance?dry_run=false",
                                 json={}) == want
            assert await _status(who, "PUT", f"{zurl}/host-key",
                                 json={"host_key": mine.export_public_key().decode()}) == want
        assert (await _status(anon, "GET", f"{target.url}/v1/zones"))[0] == 401
        # Taking over a real zone's uuid with my endpoint and my key: refused.
        reg = ZoneRegistration(uuid=real.uuid, name="evil", ssh_host="127.0.0.1", ssh_port=1,
                               http_url="http://127.0.0.1:1", capacity=1 << 50,
                               host_key=mine.export_public_key().decode().strip())
        status, code = await _status(stranger, "POST", f"{target.url}/v1/zones",
                                     json=reg.to_json())
        assert status in (403, 409) and code in ("NotAuthorized", "HostKeyMismatch"), code
        # A browser's cross-site form (text/plain), even with the operator's key.
        assert await _status(target.operator, "PUT", f"{zurl}/state",
                             data=json.dumps({"state": "lost"}),
                             headers={"Content-Type": "text/plain"}) == \
            (415, "UnsupportedMediaType")
        # Nested JSON from a signed zone: a typed refusal, not a crash.
        deep = '{"a":' * 10_000 + "1" + "}" * 10_000
        async with _session(real.host_key_pub.with_suffix("")) as zone_key:
            assert await _status(zone_key, "POST", f"{target.url}/v1/zones", data=deep,
                                 headers={"Content-Type": "application/json"}) == \
                (422, "InvalidArgument")
    assert await target.state() == before


async def test_nobody_reads_or_deletes_what_it_does_not_own_on_a_zone(target: Target) -> None:
    before = await target.state()
    vm = target.victim.vms[0]
    zone = target.zone(before[2][vm][0])  # the VM's primary
    snap = f"{zone.http_url}/v1/vms/{vm}/snapshots"
    async with aiohttp.ClientSession() as anon, \
            _session(target.other_cn.key_path) as other_cn:
        for who, want in ((anon, (401, "Unauthorized")), (other_cn, (403, "NotAuthorized"))):
            assert await _status(who, "DELETE", f"{snap}/s1") == want
            assert await _status(who, "GET", f"{snap}?metadata=true") == want
            assert await _status(who, "GET", f"{snap}/s1") == want
            assert await _status(who, "DELETE", f"{zone.http_url}/v1/vms/{vm}",
                                 json={"elsewhere": {}}) == want
            assert await _status(who, "POST", f"{zone.http_url}/v1/vms/{vm}/sync",
                                 json={}) == want
        assert (await _status(anon, "GET", f"{zone.http_url}/v1/vms"))[0] == 401
        assert (await _status(other_cn, "GET", f"{zone.http_url}/v1/transfers"))[0] == 403
    # The operator may drop a copy only naming the copy that stays (no body: 422).
    assert await _status(target.operator, "DELETE", f"{zone.http_url}/v1/vms/{vm}") == \
        (422, "InvalidArgument")
    # A captured signed read, replayed byte for byte: refused.
    signer = Signer.load(target.fleet.operator_key)
    target_path = f"/v1/vms/{vm}/snapshots?metadata=true"
    headers = signer.request_headers("GET", target_path, f"127.0.0.1:{zone.http_port}", b"")
    async with aiohttp.ClientSession() as wire:
        assert (await _status(wire, "GET", f"{zone.http_url}{target_path}",
                              headers=headers))[0] == 200
        assert await _status(wire, "GET", f"{zone.http_url}{target_path}",
                             headers=headers) == (401, "Unauthorized")
    # An admitted zone reads no VM's metadata over HTTP (it reads VMs over SSH,
    # within their scope): the VM -> CN map and customer metadata stay private.
    partner = target.zone(before[2][vm][1])
    async with _session(partner.host_key_pub.with_suffix("")) as a_zone:
        assert await _status(a_zone, "GET", f"{snap}?metadata=true") == \
            (403, "NotAuthorized")
        assert await _status(a_zone, "GET", f"{zone.http_url}/v1/vms") == \
            (403, "NotAuthorized")
    # The other CN's SSH key: no stream of this VM in or out, no delete.
    conn = await _ssh(zone, str(target.other_cn.key_path))
    try:
        for line in (f"send {vm} disk0 s1", f"delete {vm} s1", f"metadata {vm} s1",
                     f"snapshots {vm}", f"receive {vm} disk0 s9", f"commit {vm} s2 disk0"):
            status, out, err = await run(conn, line)
            assert (status, out) == (1, b""), line
            assert protocol.parse_error_line(err)[0] == "NotAuthorized", (line, err)
    finally:
        conn.close()
    assert await target.state() == before


async def test_a_stolen_cn_key_is_refused_once_revoked(target: Target) -> None:
    """The operator revokes CN 1's key (removed from the zones' and the
    coordinator's keys, daemons restarted): whoever holds it gets nothing."""
    stolen = target.other_cn
    vm = stolen.vms[0]
    zone = target.fleet.zones[0]
    async with _session(stolen.key_path) as thief:  # before: it works
        assert (await _status(thief, "GET", f"{zone.http_url}/v1/vms/{vm}/snapshots"))[0] \
            in (200, 404)
    target.fleet.cns.remove(stolen)  # the configs the daemons restart with omit it
    try:
        target.fleet.stop_coordinator()
        await target.fleet.start_coordinator()
        for z in target.fleet.zones:
            target.fleet.stop_zone(z)
            await target.fleet.start_zone(z)
        with pytest.raises(asyncssh.PermissionDenied):
            await _ssh(zone, str(stolen.key_path))
        async with _session(stolen.key_path) as thief:
            for z in target.fleet.zones:
                assert await _status(thief, "GET", f"{z.http_url}/v1/vms/{vm}/snapshots") \
                    == (401, "Unauthorized")
            assert await _status(thief, "GET", f"{target.url}/v1/placement/{vm}") == \
                (401, "Unauthorized")
        # The CN that was not revoked goes on.
        assert len(await target.push(target.victim, target.victim.vms[0], "s3")) == 2
    finally:
        target.fleet.cns.append(stolen)  # so the fleet's stop destroys its pool too
