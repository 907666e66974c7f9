"""The coordinator's identity registry over its HTTP API (real aiohttp servers,
the ``env`` of ``test_coordinator_api``), on SQLite and on ZooKeeper: CNs and
their keys, VM owners (one by one and from a VMAPI-style listing), restore
grants, and the signed, versioned identity document zones follow.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from rebalance.coordinator import SYNC_BATCH, CoordinatorConfig
from snapper_zone.cli import main as cli_main
from snapper_zone.common.config import parse_keys
from snapper_zone.common.httpsig import Signer, signing_session
from snapper_zone.wire import IdentityDocument
from tests.test_coordinator_api import COORD, OPERATOR, Env, env, fleet

__all__ = ["env", "fleet"]  # fixtures shared with the coordinator's API suite

BOTH = pytest.mark.parametrize("env", ["sqlite", "zookeeper"], indirect=True)
CN_A = asyncssh.generate_private_key("ssh-ed25519", comment="cn-a")
CN_A2 = asyncssh.generate_private_key("ssh-ed25519")
CN_B = asyncssh.generate_private_key("ssh-ed25519")
VM1 = "11111111-1111-4111-8111-111111111111"
VM2 = "22222222-2222-4222-8222-222222222222"
VM3 = "33333333-3333-4333-8333-333333333333"


def pub(key: asyncssh.SSHKey) -> str:
    return str(key.export_public_key().decode().strip())


async def identity(env: Env, since: int | None = None) -> dict[str, Any]:
    """``GET /v1/identity`` as a zone checks it: the answer signed by the coordinator."""
    coordinator = asyncssh.import_public_key(pub(COORD.key))
    async with signing_session(Signer(OPERATOR), response_key=coordinator) as http:
        url = env.server.make_url("/v1/identity" + ("" if since is None else f"?since={since}"))
        async with http.get(str(url)) as r:
            assert r.status == 200, await r.text()
            doc: dict[str, Any] = await r.json()
            return doc


@BOTH
async def test_cns_owners_grants_and_the_identity_document(env: Env) -> None:
    v0 = (await identity(env))["version"]
    got = await env.call("POST", "/v1/cns/cn-a/keys", {"keys": [pub(CN_A)]})
    assert got["id"] == "cn-a" and got["keys"] == [pub(CN_A)]
    await env.call("POST", "/v1/cns/cn-a/keys", {"keys": [pub(CN_A2)]})
    await env.call("POST", "/v1/cns/cn-b/keys", {"keys": [pub(CN_B)]})
    assert await env.call("PUT", f"/v1/vms/{VM1}/owner", {"cn": "cn-a"}) == \
        {"vm": VM1, "cn": "cn-a"}
    grant = await env.call("POST", "/v1/grants", {"vm": VM1, "cn": "cn-b", "seconds": 3600},
                           status=201)
    assert grant["granted_by"].startswith("operator:") and grant["cn"] == "cn-b"
    doc = IdentityDocument.from_json(await identity(env))
    assert doc.version == v0 + 5
    assert {c.id: c.keys for c in doc.cns} == {"cn-a": (pub(CN_A), pub(CN_A2)),
                                               "cn-b": (pub(CN_B),)}
    assert dict(doc.vms) == {VM1: "cn-a"}
    assert [(g.vm, g.cn) for g in doc.grants] == [(VM1, "cn-b")]
    # A zone polling with the version it holds gets a one-line answer.
    assert await identity(env, since=doc.version) == {"version": doc.version,
                                                      "unchanged": True}
    listed = (await env.call("GET", "/v1/cns"))["cns"]
    assert [(c["id"], c["vms"]) for c in listed] == [("cn-a", 1), ("cn-b", 0)]
    assert len((await env.call("GET", "/v1/grants"))["grants"]) == 1
    # Revoke one key of cn-a by its fingerprint, then all of cn-b (its grant goes too).
    fp = CN_A2.get_fingerprint()
    await env.call("DELETE", f"/v1/cns/cn-a?key={fp}", status=204)
    await env.call("DELETE", "/v1/cns/cn-b", status=204)
    doc = IdentityDocument.from_json(await identity(env, since=doc.version))
    assert {c.id: c.keys for c in doc.cns} == {"cn-a": (pub(CN_A),)}
    assert doc.grants == ()


@BOTH
async def test_bad_requests_are_typed_and_change_nothing(env: Env) -> None:
    await env.call("POST", "/v1/cns/cn-a/keys", {"keys": [pub(CN_A)]})
    before = await identity(env)
    for method, path, body, status, code in (
            ("POST", "/v1/cns/bad id/keys", {"keys": [pub(CN_B)]}, 422, "InvalidArgument"),
            ("POST", "/v1/cns/cn-b/keys", {"keys": ["ssh-ed25519 nope"]}, 422,
             "InvalidArgument"),
            ("POST", "/v1/cns/cn-b/keys", {"keys": []}, 422, "InvalidArgument"),
            ("POST", "/v1/cns/cn-b/keys", {"keys": [pub(CN_A)]}, 409, "KeyInUse"),
            ("POST", "/v1/cns/cn-b/keys", {"keys": [pub(OPERATOR)]}, 409, "KeyInUse"),
            ("DELETE", "/v1/cns/cn-z", None, 404, "ResourceNotFound"),
            ("DELETE", "/v1/cns/cn-a?key=SHA256:nothing", None, 404, "ResourceNotFound"),
            ("PUT", f"/v1/vms/{VM1}/owner", {"cn": "cn-z"}, 404, "ResourceNotFound"),
            ("PUT", "/v1/vms/not-a-uuid/owner", {"cn": "cn-a"}, 422, "InvalidArgument"),
            ("PUT", f"/v1/vms/{VM1}/owner", {"cn": "cn-a", "x": 1}, 422, "InvalidArgument"),
            ("POST", "/v1/grants", {"vm": VM1, "cn": "cn-z", "seconds": 60}, 404,
             "ResourceNotFound"),
            ("POST", "/v1/grants", {"vm": VM1, "cn": "cn-a", "seconds": 0}, 422,
             "InvalidArgument"),
            ("POST", "/v1/grants", {"vm": VM1, "cn": "cn-a", "seconds": True}, 422,
             "InvalidArgument"),
            ("POST", "/v1/grants", {"vm": 7, "cn": "cn-a", "seconds": 60}, 422,
             "InvalidArgument"),
            ("POST", "/v1/vms/owners", {"vms": [{"uuid": VM1, "server_uuid": "cn-a"},
                                                {"uuid": "nope", "server_uuid": "cn-a"}]},
             422, "InvalidArgument"),
            ("POST", "/v1/vms/owners", {"vms": [{"uuid": VM1, "server_uuid": 5}]}, 422,
             "InvalidArgument"),
            ("POST", "/v1/vms/owners", {"vms": [{"uuid": VM1}] * (SYNC_BATCH + 1)}, 422,
             "InvalidArgument")):
        got = await env.call(method, path, body, status=status)
        assert got["code"] == code, (method, path, got)
    assert await identity(env) == before
    assert (await env.call("GET", "/v1/identity?since=x", status=422))["code"] == \
        "InvalidArgument"


@BOTH
async def test_sync_from_a_vmapi_listing(env: Env) -> None:
    await env.call("POST", "/v1/cns/cn-a/keys", {"keys": [pub(CN_A)]})
    await env.call("POST", "/v1/cns/cn-b/keys", {"keys": [pub(CN_B)]})
    await env.call("PUT", f"/v1/vms/{VM1}/owner", {"cn": "cn-a"})
    # VMAPI's ListVms entries carry many more fields: only these two are read.
    listing = [{"uuid": VM1, "server_uuid": "cn-b", "alias": "web0", "state": "running"},
               {"uuid": VM2, "server_uuid": "cn-a"},
               {"uuid": VM3, "server_uuid": "cn-unknown"},
               {"uuid": "44444444-4444-4444-8444-444444444444", "server_uuid": None}]
    got = await env.call("POST", "/v1/vms/owners", {"vms": listing})
    assert got == {"assigned": 2, "unchanged": 0, "skipped": {"cn-unknown": 1}, "invalid": 1}
    again = await env.call("POST", "/v1/vms/owners", {"vms": listing})
    assert (again["assigned"], again["unchanged"]) == (0, 2)
    doc = IdentityDocument.from_json(await identity(env))
    assert dict(doc.vms) == {VM1: "cn-b", VM2: "cn-a"}


async def test_a_registry_cn_signs_as_a_cn_until_removed(env: Env) -> None:
    await env.call("POST", "/v1/cns/cn-a/keys", {"keys": [pub(CN_A)]})
    async with signing_session(Signer(CN_A)) as cn:
        # A CN may read placement, nothing of the registry or the zones.
        for path in ("/v1/zones", "/v1/identity", "/v1/cns"):
            async with cn.get(str(env.server.make_url(path))) as r:
                assert r.status == 403, path
        await env.call("DELETE", "/v1/cns/cn-a", status=204)
        async with cn.get(str(env.server.make_url("/v1/zones"))) as r:
            assert r.status == 401  # a stranger now


async def test_reload_takes_keys_and_reports_the_rest(env: Env) -> None:
    c = env.coordinator
    other = parse_keys([{"role": "operator", "public_key": pub(CN_B)}], "c.toml")
    new = dataclasses.replace(c.config, keys=other, port=9999, per_zone=7)
    assert sorted(c.reload(new)) == ["per_zone", "port"]
    assert c.config.keys == other and c.config.port == CoordinatorConfig().port
    # The old operator key is refused now; the new one is let in.
    async with env.http.get(str(env.server.make_url("/v1/status"))) as r:
        assert r.status == 401
    async with signing_session(Signer(CN_B)) as ops, \
            ops.get(str(env.server.make_url("/v1/status"))) as r:
        assert r.status == 200


# -- the operator CLI -------------------------------------------------------------------


async def snapper(env: Env, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                  *argv: str) -> tuple[int, str]:
    """``snapper ARGV`` in a thread (its own event loop), the operator's key from
    ``$SNAPPER_KEY`` (``cn add|remove`` take ``--key`` for the CN's)."""
    key = env.tmp_path / "operator_key"
    if not key.exists():
        OPERATOR.write_private_key(str(key))
    monkeypatch.setenv("SNAPPER_KEY", str(key))
    url = str(env.server.make_url("/"))
    status = await asyncio.to_thread(cli_main, [*argv, "--coordinator", url])
    out = capsys.readouterr()
    return status, out.out + out.err


async def test_cli_cn_vm_grant(env: Env, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    keys = tmp_path / "cn-a.pub"
    keys.write_text(f"# cn-a's keys\n{pub(CN_A)}\n{pub(CN_A2)}\n")
    rc, out = await snapper(env, capsys, monkeypatch, "cn", "add", "cn-a", "--key", str(keys))
    assert rc == 0 and "2 key(s)" in out, out
    (tmp_path / "cn-b.pub").write_text(pub(CN_B) + "\n")
    assert (await snapper(env, capsys, monkeypatch, "cn", "add", "cn-b", "--key",
                          str(tmp_path / "cn-b.pub")))[0] == 0
    rc, out = await snapper(env, capsys, monkeypatch, "vm", "assign", VM1, "cn-a")
    assert rc == 0 and "belongs to CN cn-a" in out, out
    # A sync from a file, and from a URL (VMAPI's GET /vms answers the same list).
    listing = [{"uuid": VM2, "server_uuid": "cn-b", "brand": "joyent"},
               {"uuid": VM3, "server_uuid": "cn-9"}]
    (tmp_path / "vms.json").write_text(json.dumps(listing))
    rc, out = await snapper(env, capsys, monkeypatch, "vm", "sync", str(tmp_path / "vms.json"))
    assert rc == 0 and "1 assigned" in out and "cn-9 (1)" in out, out

    async def vms(_: web.Request) -> web.Response:
        return web.json_response([{"uuid": VM3, "server_uuid": "cn-b"}])
    app = web.Application()
    app.router.add_get("/vms", vms)
    async with TestServer(app, host="127.0.0.1") as vmapi:
        rc, out = await snapper(env, capsys, monkeypatch, "vm", "sync", "--json",
                                str(vmapi.make_url("/vms?state=active")))
    assert rc == 0 and json.loads(out)["assigned"] == 1, out
    rc, out = await snapper(env, capsys, monkeypatch, "grant", "restore", VM1, "--to-cn", "cn-b",
                            "--for", "90s")
    assert rc == 0 and "CN cn-b may restore VM" in out, out
    rc, out = await snapper(env, capsys, monkeypatch, "cn", "list", "--json")
    assert [(c["id"], c["vms"]) for c in json.loads(out)] == [("cn-a", 1), ("cn-b", 2)]
    rc, out = await snapper(env, capsys, monkeypatch, "cn", "list")
    assert CN_A2.get_fingerprint() in out
    (tmp_path / "a2.pub").write_text(pub(CN_A2))
    rc, out = await snapper(env, capsys, monkeypatch, "cn", "remove", "cn-a", "--key",
                            str(tmp_path / "a2.pub"))
    assert rc == 0 and "revoked" in out, out
    doc = IdentityDocument.from_json(await identity(env))
    assert {c.id: c.keys for c in doc.cns}["cn-a"] == (pub(CN_A),)
    assert dict(doc.vms) == {VM1: "cn-a", VM2: "cn-b", VM3: "cn-b"}
    assert [(g.vm, g.cn) for g in doc.grants] == [(VM1, "cn-b")]
    # Refusals: the coordinator's typed code (exit 1); bad usage (exit 2).
    rc, out = await snapper(env, capsys, monkeypatch, "vm", "assign", VM1, "cn-nobody")
    assert rc == 1 and "ResourceNotFound" in out, out
    rc, out = await snapper(env, capsys, monkeypatch, "grant", "restore", VM1, "--to-cn", "cn-b",
                            "--for", "soon")
    assert rc == 2 and "duration" in out, out
    rc, out = await snapper(env, capsys, monkeypatch, "vm", "sync", str(tmp_path / "none.json"))
    assert rc == 2, out
    rc, out = await snapper(env, capsys, monkeypatch, "cn", "remove", "cn-b")
    assert rc == 0 and "removed" in out


async def test_a_fingerprint_with_a_plus_removes_its_key(env: Env) -> None:
    """base64's '+' reads as a space in a query string sent unquoted: still found."""
    key = next(k for k in iter(lambda: asyncssh.generate_private_key("ssh-ed25519"), None)
               if "+" in k.get_fingerprint())
    await env.call("POST", "/v1/cns/cn-a/keys", {"keys": [pub(CN_A), pub(key)]})
    await env.call("DELETE", f"/v1/cns/cn-a?key={key.get_fingerprint()}", status=204)
    assert [c["keys"] for c in (await env.call("GET", "/v1/cns"))["cns"]] == [[pub(CN_A)]]
