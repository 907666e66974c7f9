"""Authorisation is a pure function: checked over every role x command x owner."""

from __future__ import annotations

import asyncssh
import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapper_zone.common.config import Role, TrustedKey
from snapper_zone.daemon.auth import NotAuthorized, Principal, authorize, verb
from snapper_zone.wire import protocol
from snapper_zone.wire.protocol import (
    Abort,
    Command,
    Commit,
    Delete,
    Metadata,
    Ping,
    Receive,
    ResumeToken,
    Send,
    Snapshots,
)

CN_VERBS = {"receive", "send", "resume-token", "abort", "snapshots", "commit", "metadata",
            "delete", "ping"}
OPERATOR_VERBS = {"ping", "snapshots", "metadata", "delete"}

vms = st.uuids().map(str)
names = st.from_regex(r"[a-z0-9][a-z0-9_.:-]{0,20}", fullmatch=True).filter(
    lambda s: ".." not in s)
opt_names = st.none() | names

commands: st.SearchStrategy[Command] = st.one_of(
    st.builds(Receive, vms, names, names, opt_names,
              st.none() | st.integers(0, 2**40), st.booleans()),
    st.builds(Send, vms, names, names, opt_names),
    st.builds(ResumeToken, vms, names),
    st.builds(Abort, vms, names),
    st.builds(Snapshots, vms),
    st.builds(Commit, vms, names, st.lists(names, min_size=1, max_size=3, unique=True)
              .map(tuple)),
    st.builds(Metadata, vms, names),
    st.builds(Delete, vms, names),
    st.just(Ping()),
)
roles: st.SearchStrategy[Role] = st.sampled_from(["cn", "peer", "operator"])
# Who owns the command's VM, relative to the principal.
ownership = st.sampled_from(["self", "other", "unmapped"])


def _principal(role: Role) -> Principal:
    return Principal(role, {"cn": "cn-1", "peer": "0c8b1f6e-0000-4000-8000-000000000001",
                            "operator": "alice@ops"}[role], "SHA256:test")


@given(role=roles, command=commands, owner=ownership)
def test_authorize_matrix(role: Role, command: Command, owner: str) -> None:
    principal = _principal(role)
    mapped = {"self": principal.id, "other": "cn-2", "unmapped": None}[owner]
    asked: list[str] = []

    def owner_of(vm: str) -> str | None:
        asked.append(vm)
        return mapped

    name = verb(command)
    if role == "peer":
        expect_ok = True
    elif role == "operator":
        expect_ok = name in OPERATOR_VERBS
    else:
        expect_ok = name in CN_VERBS and (isinstance(command, Ping) or owner == "self")
    if expect_ok:
        authorize(principal, command, owner_of)
    else:
        with pytest.raises(NotAuthorized) as info:
            authorize(principal, command, owner_of)
        err = info.value
        assert err.code == "NotAuthorized" and err.http_status == 403
        assert name in err.message  # says what was refused
        assert err.to_json() == {"code": "NotAuthorized", "message": err.message}
    # Only a CN's command about a VM consults the VM map.
    if role == "cn" and not isinstance(command, Ping) and name in CN_VERBS:
        assert asked == [command.vm]


@given(command=commands)
def test_verbs_round_trip_with_the_grammar(command: Command) -> None:
    assert protocol.format_command(command).split()[0] == verb(command)


def _key(role: Role, comment: str = "", **ids: str) -> TrustedKey:
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment or None)
    line = key.export_public_key("openssh").decode().strip()
    return TrustedKey(role=role, public_key=line, fingerprint=key.get_fingerprint(),
                      key_data=key.public_data, **ids)


def test_principal_from_keys() -> None:
    cn = Principal.from_key(_key("cn", cn_id="cn-7"))
    assert (cn.role, cn.id, cn.label) == ("cn", "cn-7", "cn:cn-7")
    zone = "0c8b1f6e-0000-4000-8000-000000000002"
    peer = Principal.from_key(_key("peer", zone=zone))
    assert peer.label == f"zone:{zone}"
    op = Principal.from_key(_key("operator", "alice@ops"))
    assert op.id == "alice@ops" and op.fingerprint.startswith("SHA256:")
    anon = Principal.from_key(_key("operator"))
    assert anon.id == anon.fingerprint


def test_refusal_messages_are_clear() -> None:
    vm = "7250abe7-581d-4b91-9ae1-5601a17f5dff"
    cn = _principal("cn")
    with pytest.raises(NotAuthorized, match="belongs to another CN"):
        authorize(cn, Send(vm, "disk0", "s1"), lambda _: "cn-2")
    with pytest.raises(NotAuthorized, match="not mapped to any CN"):
        authorize(cn, Receive(vm, "disk0", "s1"), lambda _: None)
    with pytest.raises(NotAuthorized, match=r"operator key .* may not run 'receive'"):
        authorize(_principal("operator"), Receive(vm, "disk0", "s1"), lambda _: None)
