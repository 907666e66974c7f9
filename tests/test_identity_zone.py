"""A zone's side of the identity registry, without ZFS: the grant rule (pure, every
command), what a SIGHUP reloads (pure), and ``IdentityFollower`` against a real
coordinator on 127.0.0.1 (its answers signed; the copy on disk checked again,
used while no coordinator answers, refused when tampered with).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import asyncssh
import pytest
from hypothesis import given
from hypothesis import strategies as st

from replication.coordinator_client import CoordinatorClient, CoordinatorUnavailable
from replication.identity import IdentityFollower
from snapper_zone.common.config import FIXED_LIMITS, parse_config, reloaded
from snapper_zone.common.httpsig import Signer
from snapper_zone.daemon.auth import (
    RESTORE_VERBS,
    NotAuthorized,
    Principal,
    allowed_verbs,
    authorize,
    verb,
    vm_of,
)
from snapper_zone.wire import CnIdentity, IdentityDocument, InvalidDocument, RestoreGrant
from tests.test_auth import commands
from tests.test_coordinator_api import COORD, HOST_KEYS, ZONES, Env, env, fleet

__all__ = ["env", "fleet"]  # fixtures shared with the coordinator's API suite

CN_KEY = asyncssh.generate_private_key("ssh-ed25519")
VM = "11111111-1111-4111-8111-111111111111"
log = logging.getLogger("test")


def pub(key: asyncssh.SSHKey) -> str:
    return str(key.export_public_key().decode().strip())


# -- the grant rule --------------------------------------------------------------


@given(cmd=commands, owner=st.sampled_from(["me", "other", None]), grant=st.booleans())
def test_a_grant_opens_restoring_only(cmd: object, owner: str | None, grant: bool) -> None:
    """A CN acts on its own VMs; on another's (or an unmapped one) a grant in force
    lets it list, read metadata and ``send``, and nothing else."""
    me = Principal("cn", "me", "SHA256:x")
    owner_id = {"me": "me", "other": "cn-other", None: None}[owner]
    try:
        authorize(me, cmd, lambda vm: owner_id,  # type: ignore[arg-type]
                  granted=lambda vm, cn: grant and cn == "me")
        allowed = True
    except NotAuthorized:
        allowed = False
    name = verb(cmd)  # type: ignore[arg-type]
    if name not in allowed_verbs("cn"):
        assert not allowed  # destroy: never a CN's, grant or not
        return
    # ping, features and whoami name no VM: anyone's
    vmless = vm_of(cmd) is None  # type: ignore[arg-type]
    assert allowed == (vmless or owner == "me" or (grant and name in RESTORE_VERBS))


# -- SIGHUP ------------------------------------------------------------------------


def _config(tmp_path: Path, **extra: object) -> dict[str, object]:
    key = tmp_path / "k.pub"
    key.write_text(pub(CN_KEY) + "\n")
    return {"uuid": ZONES[0], "name": "z", "root": "pool/snapper",
            "ssh": {"port": 0, "host_key": str(tmp_path / "host")}, "http": {"port": 0},
            "keys": [{"role": "cn", "cn_id": "cn0", "public_key_file": str(key)}], **extra}


def test_reload_takes_live_fields_and_names_the_rest(tmp_path: Path) -> None:
    old = parse_config(_config(tmp_path))
    new = parse_config(_config(tmp_path, vms={VM: "cn0"}, durability="local",
                               limits={"vm_quota_bytes": 5, "max_connections": 3,
                                       "max_sends_per_principal": 2},
                               root="pool/other", max_concurrent_receives=9))
    got, fixed = reloaded(old, new)
    assert dict(got.vms) == {VM: "cn0"} and got.durability == "local"
    assert got.limits.vm_quota_bytes == 5 and got.limits.max_sends_per_principal == 2
    assert got.limits.max_connections == old.limits.max_connections
    assert (got.root, got.max_concurrent_receives) == (old.root, old.max_concurrent_receives)
    assert sorted(fixed) == ["limits.max_connections", "max_concurrent_receives", "root"]
    assert "max_connections" in FIXED_LIMITS
    assert reloaded(old, old) == (old, [])


# -- following the coordinator -------------------------------------------------------


def client(url: str) -> CoordinatorClient:
    """As a zone: signed with an admitted zone's host key, answers checked."""
    return CoordinatorClient(url, Signer(HOST_KEYS[ZONES[0]]), pub(COORD.key))


@pytest.mark.parametrize("env", ["sqlite", "zookeeper"], indirect=True)
async def test_follower_polls_keeps_a_checked_copy_and_survives_an_outage(
        env: Env, tmp_path: Path) -> None:
    await env.fleet.add(ZONES[0])
    await env.register(ZONES[0])
    path = tmp_path / "identity.json"
    url = str(env.server.make_url(""))
    c = client(url)
    f = IdentityFollower(c, path, log)
    try:
        assert await f.poll() is True and f.version == 0 and f.keys == {}
        assert await f.poll() is False  # unchanged: one line, nothing rewritten
        await env.call("POST", "/v1/cns/cn-a/keys", {"keys": [pub(CN_KEY)]})
        await env.call("PUT", f"/v1/vms/{VM}/owner", {"cn": "cn-a"})
        await env.call("POST", "/v1/grants", {"vm": VM, "cn": "cn-a", "seconds": 60},
                       status=201)
        assert await f.poll() is True
        assert f.owner_of(VM) == "cn-a" and f.granted(VM, "cn-a")
        assert not f.granted(VM, "cn-b")
        [k] = f.keys.values()
        assert (k.role, k.cn_id, k.key_data) == ("cn", "cn-a", CN_KEY.public_data)
    finally:
        await c.close()
    # A zone restarted with no coordinator answering: the copy on disk, checked.
    await env.server.close()
    c2 = client(url)
    again = IdentityFollower(c2, path, log)
    try:
        assert again.load() is True
        assert again.doc == f.doc and again.keys == f.keys
        with pytest.raises(CoordinatorUnavailable):
            await again.poll()
        assert again.owner_of(VM) == "cn-a"  # still in force
    finally:
        await c2.close()
    # A copy edited by hand (another owner) is not the coordinator's: refused.
    saved = json.loads(path.read_text())
    saved["body"] = saved["body"].replace("cn-a", "cn-x")
    path.write_text(json.dumps(saved))
    c3 = client(url)
    try:
        assert IdentityFollower(c3, path, log).load() is False
    finally:
        await c3.close()


async def test_an_unsigned_identity_answer_is_no_answer(env: Env, tmp_path: Path) -> None:
    await env.fleet.add(ZONES[0])
    await env.register(ZONES[0])
    other = asyncssh.generate_private_key("ssh-ed25519")  # not the coordinator's key
    c = CoordinatorClient(str(env.server.make_url("")), Signer(HOST_KEYS[ZONES[0]]), pub(other))
    f = IdentityFollower(c, tmp_path / "identity.json", log)
    try:
        with pytest.raises(CoordinatorUnavailable):
            await f.poll()
        assert f.doc is None and not (tmp_path / "identity.json").exists()
    finally:
        await c.close()



# -- the document ---------------------------------------------------------------------

cn_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}", fullmatch=True)
vm_ids = st.uuids().map(str)
docs = st.builds(
    IdentityDocument, st.integers(0, 2**63 - 1),
    st.lists(st.builds(CnIdentity, cn_ids, st.lists(st.just(pub(CN_KEY)), max_size=2)
                       .map(tuple)), max_size=3).map(tuple),
    st.dictionaries(vm_ids, cn_ids, max_size=5),
    st.lists(st.builds(RestoreGrant, vm_ids, cn_ids, st.integers(0, 2**39).map(float),
                       st.text(max_size=20)), max_size=3).map(tuple))


@given(doc=docs)
def test_identity_document_round_trips(doc: IdentityDocument) -> None:
    assert IdentityDocument.from_json(json.loads(json.dumps(doc.to_json()))) == doc


@pytest.mark.parametrize("bad", [
    [], {"cns": []}, {"version": -1}, {"version": "1"},
    {"version": 1, "cns": [{"id": "bad id", "keys": []}]},
    {"version": 1, "cns": [{"id": "a", "keys": ["two\nlines"]}]},
    {"version": 1, "vms": {"not-a-uuid": "a"}},
    {"version": 1, "vms": {VM: "bad id"}},
    {"version": 1, "grants": [{"vm": VM, "cn": "a", "expires": "soon"}]},
    {"version": 1, "grants": [{"vm": VM, "cn": "a", "expires": float("nan")}]},
])
def test_a_bad_identity_document_is_a_typed_error(bad: object) -> None:
    with pytest.raises(InvalidDocument):
        IdentityDocument.from_json(bad)
