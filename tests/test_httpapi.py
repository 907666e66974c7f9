"""The HTTP API, served for real on loopback, over a zone pool on real ZFS."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from snapper_zone.common.config import parse_config
from snapper_zone.common.httpsig import Signer, signing_session
from snapper_zone.common.version import version
from snapper_zone.daemon.httpapi import make_app
from snapper_zone.daemon.zone import Zone
from snapper_zone.fleet.pools import FilePool
from snapper_zone.zfs.names import Dataset
from snapper_zone.zfs.zfs import SendSpec, Zfs
from tests.helpers import write_random

pytestmark = pytest.mark.zfs

ZONE_UUID = "bd932c2b-caae-495a-abf2-fb958111c3fb"
VM = "74c59c61-4559-4ca2-b1ef-0ca22f2f936a"
VM2 = "5d0b9a3e-7c1f-4d6b-9a2e-3f8b1c2d4e5f"
OTHER_VM = "7250abe7-581d-4b91-9ae1-5601a17f5dff"
META = {"uuid": VM, "alias": "web0", "brand": "joyent", "ram": 1024}
OPERATOR = asyncssh.generate_private_key("ssh-ed25519", comment="ops@test")
CN0 = asyncssh.generate_private_key("ssh-ed25519")  # VM's CN
CN1 = asyncssh.generate_private_key("ssh-ed25519")  # another CN


def _pub(key: asyncssh.SSHKey) -> str:
    return str(key.export_public_key().decode().strip())


@dataclass
class Api:
    zone: Zone
    server: TestServer
    http: aiohttp.ClientSession
    cn_pool: FilePool
    cn: Dataset  # the simulated CN's dataset for VM's "root"

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    async def call(self, method: str, path: str) -> tuple[int, Any]:
        async with self.http.request(method, self.url(path)) as r:
            body = await r.json() if r.content_type == "application/json" else await r.text()
            return r.status, body


async def push(api: Api, name: str, base: str | None) -> None:
    """What a CN push amounts to on the zone: receive the dataset, then mark it whole."""
    cn_snap = api.cn.snapshot(name)
    spec = SendSpec(cn_snap, base=api.cn.snapshot(base) if base else None)
    await api.zone.zfs.pipe(spec, api.zone.store.part_dataset(VM, "root"))
    await api.zone.store.mark_complete(VM, name, ["root"], {**META, "snap": name}, "cn:test")


@pytest.fixture
async def api(zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool,
              tmp_path: Path) -> AsyncIterator[Api]:
    config = parse_config({
        "uuid": ZONE_UUID, "name": "snapper0", "root": f"{zone_pool.name}/snapper",
        "ssh": {"port": 0, "host_key": str(tmp_path / "host_key")},
        "http": {"port": 0},
        "keys": [{"role": "operator", "public_key": _pub(OPERATOR)},
                 {"role": "cn", "cn_id": "cn0", "public_key": _pub(CN0)},
                 {"role": "cn", "cn_id": "cn1", "public_key": _pub(CN1)}],
        "vms": {VM: "cn0"},
    }, str(tmp_path / "snapperd.toml"))
    await zfs.create(Dataset(config.root))
    zone = Zone.from_config(config, zfs)
    await zone.store.ensure_vm(VM)

    cn = Dataset(cn_pool.name).child(VM)
    await zfs.create(cn)
    for i in (1, 2, 3):
        write_random(cn_pool, cn, f"f{i}", 256 << 10)
        await zfs.snapshot([cn.snapshot(f"s{i}")])

    server = TestServer(make_app(zone), host="127.0.0.1")
    await server.start_server()
    async with signing_session(Signer(OPERATOR)) as http:
        a = Api(zone, server, http, cn_pool, cn)
        for name, base in (("s1", None), ("s2", "s1"), ("s3", "s2")):
            await push(a, name, base)
        yield a
    await server.close()


async def test_ping(api: Api) -> None:
    async with aiohttp.ClientSession() as anon, anon.get(api.url("/ping")) as r:
        assert r.status == 200
        assert await r.json() == {"ping": "pong", "zone": ZONE_UUID, "version": version()}


async def test_inventory_guids_equal_the_cns(api: Api) -> None:
    # An incomplete VM snapshot (a push still in progress) and a dataset that
    # is not a VM, both as a zone may really have them.
    write_random(api.cn_pool, api.cn, "f4", 64 << 10)
    await api.zone.zfs.snapshot([api.cn.snapshot("s4")])
    await api.zone.zfs.pipe(SendSpec(api.cn.snapshot("s4"), base=api.cn.snapshot("s3")),
                            api.zone.store.part_dataset(VM, "root"))
    await api.zone.zfs.create(api.zone.store.root.child("stray"))
    cn_guids = {s.name: str(s.guid) for s in await api.zone.zfs.snapshots(api.cn)}

    status, vms = await api.call("GET", "/v1/vms")
    assert status == 200
    assert len(vms) == 1
    (vm,) = vms
    assert (vm["uuid"], vm["snapshots"], vm["complete"], vm["cn"]) == (VM, 4, 3, "cn0")
    assert vm["bytes"] > 3 * (256 << 10)

    status, snaps = await api.call("GET", f"/v1/vms/{VM}/snapshots")
    assert status == 200
    assert [(s["name"], s["complete"]) for s in snaps] == [
        ("s1", True), ("s2", True), ("s3", True), ("s4", False)]
    for s in snaps:
        assert s["vm"] == VM and "metadata" not in s
        assert s["datasets"]["root"]["guid"] == cn_guids[s["name"]]
        assert s["size"] >= 0
    assert all(s["created"] > 0 and s["source"] == "cn:test" for s in snaps[:3])
    # The inventory names the newest complete one's time (the live view's stalest VMs).
    assert vm["newest"] == max(s["created"] for s in snaps[:3])

    status, snaps = await api.call("GET", f"/v1/vms/{VM}/snapshots?metadata=true")
    assert status == 200
    assert [s["metadata"] for s in snaps] == [
        {**META, "snap": "s1"}, {**META, "snap": "s2"}, {**META, "snap": "s3"}, None]
    status, body = await api.call("GET", f"/v1/vms/{VM}/snapshots?metadata=yes-please")
    assert (status, body["code"]) == (422, "InvalidArgument")


async def test_one_snapshot_with_metadata(api: Api) -> None:
    status, snap = await api.call("GET", f"/v1/vms/{VM}/snapshots/s2")
    assert status == 200
    assert snap["name"] == "s2" and snap["complete"] is True
    assert snap["metadata"] == {**META, "snap": "s2"}
    assert set(snap["datasets"]) == {"root"}


async def test_delete_intermediate_keeps_the_others(api: Api) -> None:
    before = {s["name"]: s for s in (await api.call("GET", f"/v1/vms/{VM}/snapshots"))[1]}

    async with api.http.delete(api.url(f"/v1/vms/{VM}/snapshots/s2")) as r:
        assert r.status == 204
        assert await r.read() == b""

    status, snaps = await api.call("GET", f"/v1/vms/{VM}/snapshots")
    assert status == 200
    assert [s["name"] for s in snaps] == ["s1", "s3"]
    for s in snaps:
        assert s["datasets"]["root"]["guid"] == before[s["name"]]["datasets"]["root"]["guid"]
    status, body = await api.call("GET", f"/v1/vms/{VM}/snapshots/s2")
    assert (status, body["code"]) == (404, "ResourceNotFound")
    status, stones = await api.call("GET", f"/v1/vms/{VM}/tombstones")
    assert status == 200 and [t["guid"] for t in stones] == [
        before["s2"]["datasets"]["root"]["guid"]]

    # The chain still takes the next incremental from the newest snapshot.
    write_random(api.cn_pool, api.cn, "f4", 64 << 10)
    await api.zone.zfs.snapshot([api.cn.snapshot("s4")])
    await push(api, "s4", "s3")
    status, snaps = await api.call("GET", f"/v1/vms/{VM}/snapshots")
    assert [s["name"] for s in snaps] == ["s1", "s3", "s4"]


async def test_delete_refused_while_a_transfer_uses_it(api: Api) -> None:
    t = api.zone.transfers.start("send", VM, "root", "s3", base="s1", peer="cn:test",
                                 expected=1 << 20)
    try:
        for name in ("s1", "s3"):  # the base and the subject
            status, body = await api.call("DELETE", f"/v1/vms/{VM}/snapshots/{name}")
            assert status == 409
            assert body["code"] == "ResourceBusy" and name in body["message"]
        t.add(4096)
        status, active = await api.call("GET", "/v1/transfers")
        assert status == 200
        assert [(x["id"], x["vm"], x["snapshot"], x["base"], x["bytes"]) for x in active] == [
            (t.id, VM, "s3", "s1", 4096)]
        assert active[0]["rate"] >= 0 and active[0]["expected"] == 1 << 20
        # A snapshot the transfer does not touch may go.
        assert (await api.call("DELETE", f"/v1/vms/{VM}/snapshots/s2"))[0] == 204
    finally:
        api.zone.transfers.finish(t, "ok")
    status, snaps = await api.call("GET", f"/v1/vms/{VM}/snapshots")
    assert [s["name"] for s in snaps] == ["s1", "s3"]
    assert (await api.call("GET", "/v1/transfers")) == (200, [])
    assert (await api.call("DELETE", f"/v1/vms/{VM}/snapshots/s1"))[0] == 204


async def test_drop_copy_refused_while_it_holds_more_than_the_new_copy(api: Api) -> None:
    """A move's delete names what the new copy holds; a snapshot beyond it keeps the copy."""
    snaps = (await api.call("GET", f"/v1/vms/{VM}/snapshots"))[1]
    held = {s["name"]: {"root": s["datasets"]["root"]["guid"]} for s in snaps}
    for elsewhere, why in (({k: v for k, v in held.items() if k != "s3"}, "s3"),
                           ({**held, "s3": {"root": "1"}}, "s3")):  # lacks s3 / wrong guid
        async with api.http.delete(api.url(f"/v1/vms/{VM}"),
                                   json={"elsewhere": elsewhere}) as r:
            body = await r.json()
            assert (r.status, body["code"]) == (409, "CopyNotRedundant") and why in body["message"]
        assert len((await api.call("GET", f"/v1/vms/{VM}/snapshots"))[1]) == 3
    async with api.http.delete(api.url(f"/v1/vms/{VM}"), json={"elsewhere": "no"}) as r:
        assert (r.status, (await r.json())["code"]) == (422, "InvalidArgument")
    async with api.http.delete(api.url(f"/v1/vms/{VM}"), json={"elsewhere": held}) as r:
        assert r.status == 204
    assert (await api.call("GET", f"/v1/vms/{VM}/snapshots"))[0] == 404


async def test_drop_copy_counts_a_marker_that_outlived_its_parts(api: Api) -> None:
    """A listing that lacks a marked snapshot's parts (a destroy cut short) makes it
    incomplete, not unknown: the drop still wants the new copy to hold it."""
    snaps = (await api.call("GET", f"/v1/vms/{VM}/snapshots"))[1]
    held = {s["name"]: {"root": s["datasets"]["root"]["guid"]} for s in snaps}
    assert all(s["complete"] for s in snaps)
    await api.zone.zfs.destroy(api.zone.store.part_dataset(VM, "root"), recursive=True)
    left = (await api.call("GET", f"/v1/vms/{VM}/snapshots"))[1]
    assert [(s["name"], s["complete"], s["datasets"]) for s in left] == [
        (n, False, {}) for n in held]
    async with api.http.delete(api.url(f"/v1/vms/{VM}"), json={"elsewhere": {
            k: v for k, v in held.items() if k != "s2"}}) as r:
        body = await r.json()
        assert (r.status, body["code"]) == (409, "CopyNotRedundant") and "s2" in body["message"]
    async with api.http.delete(api.url(f"/v1/vms/{VM}"), json={"elsewhere": held}) as r:
        assert r.status == 204
    assert (await api.call("GET", f"/v1/vms/{VM}/snapshots"))[0] == 404


async def test_unknown_vm_is_404(api: Api) -> None:
    for method, path in (("GET", f"/v1/vms/{OTHER_VM}/snapshots"),
                         ("GET", f"/v1/vms/{OTHER_VM}/snapshots/s1"),
                         ("DELETE", f"/v1/vms/{OTHER_VM}/snapshots/s1"),
                         ("DELETE", f"/v1/vms/{VM}/snapshots/nosuch")):
        status, body = await api.call(method, path)
        assert status == 404, (method, path)
        assert body["code"] == "ResourceNotFound" and body["message"]


@pytest.mark.parametrize("path", [
    "/v1/vms/not-a-uuid/snapshots",
    f"/v1/vms/{VM.upper()}/snapshots",
    "/v1/vms/..%2F..%2Fetc/snapshots",
    f"/v1/vms/{VM}/snapshots/-rf",
    f"/v1/vms/{VM}/snapshots/a%40b",
    f"/v1/vms/{VM}/snapshots/a..b",
])
async def test_bad_names_are_422(api: Api, path: str) -> None:
    for method in ("GET", "DELETE") if path.count("/") == 5 else ("GET",):
        status, body = await api.call(method, path)
        assert status == 422, (method, path, body)
        assert body["code"] == "InvalidArgument"
    status, snaps = await api.call("GET", f"/v1/vms/{VM}/snapshots")
    assert len(snaps) == 3  # nothing was touched


async def test_unknown_route_and_wrong_method(api: Api) -> None:
    status, body = await api.call("GET", "/v1/nothing-here")
    assert (status, body["code"]) == (404, "ResourceNotFound")
    async with api.http.post(api.url("/v1/vms")) as r:
        assert r.status == 405
        assert (await r.json())["code"] == "MethodNotAllowed"
        assert "GET" in r.headers["Allow"]


async def test_unexpected_error_is_500_without_internals(
        api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    async def broken(vm: str) -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(api.zone.store, "snapshots", broken)
    with caplog.at_level(logging.INFO, logger="snapperd"):
        async with api.http.get(api.url(f"/v1/vms/{VM}/snapshots")) as r:
            body = await r.json()
            req_id = r.headers["x-request-id"]
    assert r.status == 500
    assert body["code"] == "InternalError"
    assert "secret" not in body["message"] and req_id in body["message"]
    logged = [rec for rec in caplog.records if getattr(rec, "req_id", None) == req_id]
    assert any(rec.exc_info and "secret" in str(rec.exc_info[1]) for rec in logged)


async def test_every_request_logged(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="snapperd"):
        await api.call("GET", "/ping")
        await api.call("GET", "/nope")
    audit = [r.__dict__ for r in caplog.records if r.getMessage() == "handled request"]
    assert [(a["method"], a["url"], a["status"]) for a in audit] == [
        ("GET", "/ping", 200), ("GET", "/nope", 404)]
    assert all(a["latency_ms"] >= 0 and a["req_id"] for a in audit)


async def test_capacity_and_metrics(api: Api) -> None:
    status, cap = await api.call("GET", "/v1/capacity")
    assert status == 200
    assert cap["root"] == str(api.zone.store.root)
    assert cap["available"] > 0 and cap["used"] > 3 * (256 << 10) and cap["referenced"] > 0
    assert cap["pool"]["name"] == api.zone.store.root.pool and cap["pool"]["free"] > 0

    async with api.http.get(api.url("/metrics")) as r:
        assert r.status == 200
        assert r.content_type == "text/plain"
        text = await r.text()
    m = re.search(r"^snapper_pool_free_bytes (\S+)$", text, re.M)
    assert m is not None and float(m.group(1)) > 0
    assert "snapper_active_transfers" in text


async def test_metrics_name_the_build_the_process_and_each_vms_freshness(api: Api) -> None:
    # A second VM with nothing complete yet, and a dataset that is no VM (ignored).
    await api.zone.store.ensure_vm(VM2)
    await api.zone.zfs.create(api.zone.store.root.child("not-a-vm"))
    async with api.http.get(api.url("/metrics")) as r:
        samples = [s for fam in text_string_to_metric_families(await r.text())
                   for s in fam.samples]
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in samples}
    # Prometheus naming: unit last, no _created series doubling every counter.
    assert not [s.name for s in samples if s.name.endswith("_created")]
    assert values[("snapper_build_info", (("daemon", "snapperd"),
                                          ("version", version())))] == 1
    assert values[("process_cpu_seconds_total", ())] > 0
    assert values[("snapper_pool_used_bytes", ())] > 3 * (256 << 10)
    assert values[("snapper_vms", ())] == 2
    assert values[("snapper_vms_without_complete_snapshot", ())] == 1
    # VM's newest complete snapshot (s3) was made just now: the first bucket holds it.
    age = "snapper_vm_newest_snapshot_age_seconds"
    assert values[(f"{age}_gcount", ())] == 1
    assert values[(f"{age}_bucket", (("le", "900.0"),))] == 1
    assert values[(f"{age}_bucket", (("le", "+Inf"),))] == 1
    assert 0 <= values[(f"{age}_gsum", ())] < 900


async def test_metadata_over_several_chunks(api: Api) -> None:
    # Incompressible, so it spans several snapper:m.N properties.
    big = {**META, "customer_metadata": {"blob": os.urandom(12000).hex()}}
    await api.zone.store.mark_complete(VM, "s2", ["root"], big, "cn:test")
    status, one = await api.call("GET", f"/v1/vms/{VM}/snapshots/s2")
    assert (status, one["metadata"]) == (200, big)
    status, snaps = await api.call("GET", f"/v1/vms/{VM}/snapshots?metadata=1")
    assert [s["metadata"] for s in snaps] == [
        {**META, "snap": "s1"}, big, {**META, "snap": "s3"}]


@pytest.mark.zfs
async def test_a_drop_with_a_text_plain_or_deep_body_is_refused(api: Api) -> None:
    """A browser's cross-site text/plain POST, or JSON nested past any real document,
    never reaches the handler: 415 / 422 with the JSON error shape, the copy untouched;
    nor does a drop with no body at all (the redundancy check is not optional)."""
    status, before = await api.call("GET", f"/v1/vms/{VM}/snapshots")
    assert status == 200 and before
    for data, ctype, code, word in (
            ('{"elsewhere": {}}', "text/plain", "UnsupportedMediaType", "application/json"),
            ("[" * 5000 + "]" * 5000, "application/json", "InvalidArgument", "nests deeper"),
            (None, None, "InvalidArgument", "elsewhere"),
            ("{}", "application/json", "InvalidArgument", "elsewhere")):
        async with api.http.delete(api.url(f"/v1/vms/{VM}"), data=data,
                                   headers={"Content-Type": ctype} if ctype else None) as r:
            doc = await r.json(content_type=None)
            assert (r.status, doc["code"]) == ({"UnsupportedMediaType": 415}.get(code, 422),
                                               code), doc
            assert word in doc["message"]
    assert await api.call("GET", f"/v1/vms/{VM}/snapshots") == (200, before)


async def test_a_cn_reads_and_deletes_its_own_vms_only(api: Api) -> None:
    """Metadata (customer_metadata, user-scripts) is authorised like a write: the
    VM's own CN may read it, another CN gets 403 and learns nothing."""
    url = api.url(f"/v1/vms/{VM}/snapshots?metadata=true")
    async with signing_session(Signer(CN0)) as mine, signing_session(Signer(CN1)) as other:
        async with mine.get(url) as r:
            assert r.status == 200 and (await r.json())[0]["metadata"] == {**META, "snap": "s1"}
        for method, path in (("GET", f"/v1/vms/{VM}/snapshots?metadata=true"),
                             ("GET", f"/v1/vms/{VM}/snapshots/s1"),
                             ("GET", f"/v1/vms/{VM}/tombstones"),
                             ("DELETE", f"/v1/vms/{VM}/snapshots/s1")):
            async with other.request(method, api.url(path)) as r:
                doc = await r.json()
                assert (r.status, doc["code"]) == (403, "NotAuthorized"), (method, path, doc)
                assert "meta" not in json.dumps(doc).replace("metadata=true", "")
        # Nor the inventory (the VM -> CN map), nor dropping a copy, even its own.
        for method, path in (("GET", "/v1/vms"), ("DELETE", f"/v1/vms/{VM}")):
            async with mine.request(method, api.url(path), json={"elsewhere": {}}
                                    if method == "DELETE" else None) as r:
                assert r.status == 403, (method, path)
        async with mine.delete(api.url(f"/v1/vms/{VM}/snapshots/s1")) as r:
            assert r.status == 204
    assert [s["name"] for s in (await api.call("GET", f"/v1/vms/{VM}/snapshots"))[1]] == [
        "s2", "s3"]
