"""The registry's copy of policy files (issue 15) through the coordinator's real
aiohttp server, on SQLite and on ZooKeeper: operators write, CNs and zones read
signed answers; every bad document is a typed error naming the field and
changes nothing; ``snapper policy``; the CN's lookup with its last verified copy
when the coordinator is away; an agent following the registry."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from replication.coordinator_client import CoordinatorClient, CoordinatorNotFound
from snapper_zone.cli import main as cli_main
from snapper_zone.cn.agent import Agent, AgentState
from snapper_zone.cn.client import lookup_policy
from snapper_zone.common.answers import AnswerCache
from snapper_zone.common.httpsig import Signer, signing_session
from snapper_zone.policy import Snap
from snapper_zone.transfer.remote import ZoneError, ZoneUnreachable
from tests.test_coordinator_api import COORD, HOST_KEYS, OPERATOR, ZONES, Env, env, fleet

__all__ = ["env", "fleet"]  # fixtures shared with the coordinator's API suite

BOTH = pytest.mark.parametrize("env", ["sqlite", "zookeeper"], indirect=True)
CN = asyncssh.generate_private_key("ssh-ed25519", comment="cn-a")
VM = "74c59c61-4559-4ca2-b1ef-0ca22f2f936a"
DOC: dict[str, Any] = {"policy": [{
    "name": "default", "vms": ["*"], "durability": "local",
    "retention": {"grid": "1x1h(keep=all) | 24x1h", "keep": {"daily": 7}},
    "level": [{"name": "daily", "cron": "0 3 * * *"}, {"name": "hourly", "every": "1h"}]}]}
LOG = logging.getLogger("test.policy_registry")
EXAMPLE = Path(__file__).resolve().parent.parent / "etc" / "policy.example.toml"


def pub(key: asyncssh.SSHKey) -> str:
    return str(key.export_public_key().decode().strip())


async def as_signed(env: Env, key: asyncssh.SSHKey, method: str, path: str,
                    body: object = None) -> tuple[int, Any]:
    """A request signed with ``key``, the answer checked to be the coordinator's."""
    coordinator = asyncssh.import_public_key(pub(COORD.key))
    async with signing_session(Signer(key), response_key=coordinator) as http, \
            http.request(method, str(env.server.make_url(path)), json=body) as r:
        text = await r.text()
        return r.status, json.loads(text) if text else None


@BOTH
async def test_operators_write_cns_and_zones_read(env: Env) -> None:
    assert await env.call("GET", "/v1/policies") == {"policies": []}
    first = await env.call("PUT", "/v1/policies/fleet", DOC)
    assert first["name"] == "fleet" and first["version"] == 1
    assert first["document"] == DOC and first["updated_by"].startswith("operator:")
    changed = json.loads(json.dumps(DOC))
    changed["policy"][0]["durability"] = "mirrored"
    assert (await env.call("PUT", "/v1/policies/fleet", changed))["version"] == 2
    # A CN of the registry and an admitted zone read it, signed by the coordinator.
    await env.call("POST", "/v1/cns/cn-a/keys", {"keys": [pub(CN)]})
    await env.fleet.add(ZONES[0])
    await env.register(ZONES[0])
    for key in (CN, HOST_KEYS[ZONES[0]]):
        status, got = await as_signed(env, key, "GET", "/v1/policies/fleet")
        assert status == 200 and got["document"] == changed and got["version"] == 2
        status, listed = await as_signed(env, key, "GET", "/v1/policies")
        assert status == 200 and [p["name"] for p in listed["policies"]] == ["fleet"]
        # Neither may write or remove one.
        for method, body in (("PUT", DOC), ("DELETE", None)):
            status, err = await as_signed(env, key, method, "/v1/policies/fleet", body)
            assert (status, err["code"]) == (403, "NotAuthorized"), err
    await env.call("DELETE", "/v1/policies/fleet", status=204)
    err = await env.call("GET", "/v1/policies/fleet", status=404)
    assert err["code"] == "PolicyNotFound"
    assert (await env.call("DELETE", "/v1/policies/fleet", status=404))["code"] == \
        "PolicyNotFound"


def _bad(change: Any) -> object:
    doc = json.loads(json.dumps(DOC))
    change(doc)
    return doc


@BOTH
async def test_bad_documents_are_typed_name_the_field_and_change_nothing(env: Env) -> None:
    await env.call("PUT", "/v1/policies/fleet", DOC)
    cases: list[tuple[str, object, str]] = [
        ("/v1/policies/fleet", _bad(lambda d: d["policy"][0]["level"][1].update(every="1x")),
         "policy[0].level[1].every"),
        ("/v1/policies/fleet", _bad(lambda d: d["policy"][0].pop("retention")),
         "policy[0].retention"),
        ("/v1/policies/fleet", _bad(lambda d: d["policy"][0].update(durabilty="local")),
         "durabilty"),
        ("/v1/policies/fleet", _bad(lambda d: d["policy"][0]["level"][0].update(base="daily")),
         "policy[0].level[0].base"),
        ("/v1/policies/fleet", {"policy": []}, "policy"),
        ("/v1/policies/fleet", [1, 2], ""),
        ("/v1/policies/Bad%20Name", DOC, "policy name"),
    ]
    for path, body, field in cases:
        err = await env.call("PUT", path, body, status=422)
        assert err["code"] == "InvalidPolicy" and field in err["message"], (field, err)
    got = await env.call("GET", "/v1/policies/fleet")
    assert got["version"] == 1 and got["document"] == DOC
    assert [p["name"] for p in (await env.call("GET", "/v1/policies"))["policies"]] == ["fleet"]
    # Not JSON: refused as every other body is.
    async with env.http.put(str(env.server.make_url("/v1/policies/fleet")), data=b"x = 1",
                            headers={"Content-Type": "application/toml"}) as r:
        assert r.status == 415 and (await r.json())["code"] == "UnsupportedMediaType"


async def test_cli_set_show_list_remove(env: Env, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    key = tmp_path / "operator"
    OPERATOR.write_private_key(str(key))
    monkeypatch.setenv("SNAPPER_KEY", str(key))
    url = str(env.server.make_url("/"))

    async def snapper(*argv: str) -> tuple[int, str]:
        status = await asyncio.to_thread(cli_main, [*argv, "--coordinator", url])
        out = capsys.readouterr()
        return status, out.out + out.err

    status, out = await snapper("policy", "set", "fleet", str(EXAMPLE))
    assert status == 0 and "policy fleet version 1: 2 policies" in out, out
    status, out = await snapper("policy", "show", "fleet")
    assert status == 0 and json.loads(out)["policy"][0]["name"] == "default"
    status, out = await snapper("policy", "list")
    assert status == 0 and "fleet" in out and "operator:" in out, out
    # A bad file is exit 2 before anything is sent; a bad name too.
    bad = tmp_path / "bad.toml"
    bad.write_text('[[policy]]\nname = "p"\nvms = ["*"]\n')
    status, out = await snapper("policy", "set", "fleet", str(bad))
    assert status == 2 and "policy[0]" in out, out
    status, out = await snapper("policy", "set", "No Good", str(EXAMPLE))
    assert status == 2, out
    assert (await env.call("GET", "/v1/policies/fleet"))["version"] == 1
    status, out = await snapper("policy", "remove", "fleet")
    assert status == 0 and "removed" in out
    status, out = await snapper("policy", "show", "fleet")
    assert status == 1 and "PolicyNotFound" in out, out


@BOTH
async def test_the_cn_keeps_its_last_verified_copy(env: Env, tmp_path: Path) -> None:
    await env.call("POST", "/v1/cns/cn-a/keys", {"keys": [pub(CN)]})
    await env.call("PUT", "/v1/policies/fleet", DOC)
    key = tmp_path / "cn"
    CN.write_private_key(str(key))
    url, coord = str(env.server.make_url("/")), pub(COORD.key)
    cache = AnswerCache.load(tmp_path / "state" / "answers.json", LOG, min_interval=0)
    got = await lookup_policy(url, "fleet", key, coord, cache)
    assert got.version == 1 and got.note() is None
    assert got.policies.for_vm(VM) is not None
    # An answer not signed by the coordinator is no answer: the copy, said so.
    other = pub(asyncssh.generate_private_key("ssh-ed25519"))
    seen = await lookup_policy(url, "fleet", key, other, cache)
    assert seen.version == 1 and "unreachable" in (seen.note() or "")
    # The coordinator gone: the copy on disk (a restarted agent reads it back).
    reread = AnswerCache.load(tmp_path / "state" / "answers.json", LOG)
    gone = await lookup_policy("http://127.0.0.1:1", "fleet", key, coord, reread)
    assert gone.version == 1 and gone.seen_at is not None
    with pytest.raises(ZoneUnreachable):
        await lookup_policy("http://127.0.0.1:1", "other", key, coord, reread)
    # A refusal is not bridged: a policy removed is gone for the CN too.
    await env.call("DELETE", "/v1/policies/fleet", status=204)
    with pytest.raises(ZoneError) as e:
        await lookup_policy(url, "fleet", key, coord, cache)
    assert e.value.code == "PolicyNotFound"


class _Pusher:
    """The agent's I/O with nothing behind it: one VM, every push fine."""

    def __init__(self) -> None:
        self.pushed: list[str] = []
        self.rates: list[float | None] = []

    async def local_vms(self) -> list[str]:
        return [VM]

    async def tags(self, vm: str) -> dict[str, str]:
        return {}

    async def local_snapshots(self, vm: str) -> list[str]:
        return []

    async def zone_snapshots(self, vm: str) -> list[Snap]:
        return []

    async def push(self, vm: str, name: str, base: str | None, durability: str,
                   bwlimit: float | None = None) -> Any:
        self.pushed.append(name)
        self.rates.append(bwlimit)
        return None

    async def destroy_local(self, vm: str, names: Any) -> None:
        return None


async def test_an_agent_follows_the_registry(env: Env, tmp_path: Path) -> None:
    """A new version is taken on the next pass; with the coordinator away, the last
    verified copy goes on."""
    await env.call("POST", "/v1/cns/cn-a/keys", {"keys": [pub(CN)]})
    await env.call("PUT", "/v1/policies/fleet", DOC)
    key = tmp_path / "cn"
    CN.write_private_key(str(key))
    cache = AnswerCache.load(tmp_path / "answers.json", LOG, min_interval=0)
    where = {"url": str(env.server.make_url("/"))}

    async def source() -> Any:
        return (await lookup_policy(where["url"], "fleet", key, pub(COORD.key),
                                    cache)).policies

    clock = [1_796_000_000.0]
    pusher = _Pusher()
    agent = Agent(await source(), pusher, AgentState(None), clock=lambda: clock[0],
                  source=source)
    await agent.tick()
    assert [n.split("-")[1] for n in pusher.pushed] == ["daily"]
    # The operator narrows it to a 15-minute level: the agent's next pass uses it.
    quick = json.loads(json.dumps(DOC))
    quick["policy"][0]["level"] = [{"name": "quarter", "every": "15m"}]
    quick["policy"][0]["retention"] = {"keep": {"quarter": 4}}
    quick["policy"][0]["bwlimit"] = "20M"  # and paces its pushes
    await env.call("PUT", "/v1/policies/fleet", quick)
    clock[0] += 900
    await agent.tick()
    assert pusher.pushed[-1].startswith("snapper-quarter-")
    assert pusher.rates == [None, 20 << 20]
    where["url"] = "http://127.0.0.1:1"  # the coordinator away: the copy goes on
    clock[0] += 900
    await agent.tick()
    assert len(pusher.pushed) == 3 and pusher.pushed[-1].startswith("snapper-quarter-")


@BOTH
async def test_a_zone_takes_its_retention_from_the_registry(env: Env, tmp_path: Path) -> None:
    """``[retention] policy_from_coordinator``: the zone's coordinator client reads
    the policy as the zone (its host key), keeps the verified copy, and uses it
    while the coordinator is away; a removed policy is not bridged."""
    await env.fleet.add(ZONES[0])
    await env.register(ZONES[0])
    await env.call("PUT", "/v1/policies/fleet", DOC)
    path = tmp_path / "answers.json"
    client = CoordinatorClient(str(env.server.make_url("/")), Signer(HOST_KEYS[ZONES[0]]),
                               pub(COORD.key), AnswerCache(path, LOG, min_interval=0))
    try:
        got = await client.policy("fleet")
        policy = got.for_vm(VM)
        assert policy is not None and policy.retention.counts == {"daily": 7}
    finally:
        await client.close()
    away = CoordinatorClient("http://127.0.0.1:1", Signer(HOST_KEYS[ZONES[0]]),
                             pub(COORD.key), AnswerCache.load(path, LOG))
    try:
        assert (await away.policy("fleet")).for_vm(VM) is not None
    finally:
        await away.close()
    await env.call("DELETE", "/v1/policies/fleet", status=204)
    client = CoordinatorClient(str(env.server.make_url("/")), Signer(HOST_KEYS[ZONES[0]]),
                               pub(COORD.key), AnswerCache.load(path, LOG))
    try:
        with pytest.raises(CoordinatorNotFound):
            await client.policy("fleet")
    finally:
        await client.close()
