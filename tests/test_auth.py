"""Authorisation is a pure function: checked over every role x command x owner x scope."""

from __future__ import annotations

import itertools

import asyncssh
import pytest
from hypothesis import given
from hypothesis import strategies as st

from replication.peers import pair_of, static_scope
from snapper_zone.common.config import Role, TrustedKey
from snapper_zone.daemon.auth import NotAuthorized, Principal, authorize, peer_in_scope, verb
from snapper_zone.wire import protocol
from snapper_zone.wire.protocol import (
    Abort,
    Command,
    Commit,
    Delete,
    Destroy,
    Features,
    Metadata,
    Ping,
    Receive,
    ResumeToken,
    Send,
    Snapshots,
    Whoami,
)
from snapper_zone.zfs.zfs import STREAM_FEATURES

CN_VERBS = {"receive", "send", "resume-token", "abort", "snapshots", "commit", "metadata",
            "delete", "ping", "features", "whoami"}
OPERATOR_VERBS = {"ping", "features", "whoami", "snapshots", "metadata", "delete"}

vms = st.uuids().map(str)
names = st.from_regex(r"[a-z0-9][a-z0-9_.:-]{0,20}", fullmatch=True).filter(
    lambda s: ".." not in s)
opt_names = st.none() | names

commands: st.SearchStrategy[Command] = st.one_of(
    st.builds(Receive, vms, names, names, opt_names,
              st.none() | st.integers(0, 2**40), st.booleans()),
    st.builds(Send, vms, names, names, opt_names,
              st.frozensets(st.sampled_from(STREAM_FEATURES))),
    st.builds(ResumeToken, vms, names),
    st.builds(Abort, vms, names),
    st.builds(Snapshots, vms),
    st.builds(Commit, vms, names, st.lists(names, min_size=1, max_size=3, unique=True)
              .map(tuple)),
    st.builds(Metadata, vms, names),
    st.builds(Delete, vms, names),
    st.builds(Destroy, vms, names, opt_names, st.none() | st.integers(1, 2**64 - 1)),
    st.just(Ping()),
    st.just(Features()),
    st.just(Whoami()),
)
roles: st.SearchStrategy[Role] = st.sampled_from(["cn", "peer", "operator"])
# Who owns the command's VM, relative to the principal.
ownership = st.sampled_from(["self", "other", "unmapped"])
ME = "0c8b1f6e-0000-4000-8000-0000000000aa"  # the zone deciding
OTHER = "0c8b1f6e-0000-4000-8000-0000000000bb"  # a third zone
# The VM's scope relative to this zone and the peer (None: unknown).
scopes = st.sampled_from(["none", "empty", "me", "peer", "both", "both+other", "me+other"])


def _principal(role: Role) -> Principal:
    return Principal(role, {"cn": "cn-1", "peer": "0c8b1f6e-0000-4000-8000-000000000001",
                            "operator": "alice@ops"}[role], "SHA256:test")


@given(role=roles, command=commands, owner=ownership, where=scopes)
def test_authorize_matrix(role: Role, command: Command, owner: str, where: str) -> None:
    principal = _principal(role)
    mapped = {"self": principal.id, "other": "cn-2", "unmapped": None}[owner]
    peer = _principal("peer").id
    scope = None if where == "none" else {
        "empty": set(), "me": {ME}, "peer": {peer}, "both": {ME, peer},
        "both+other": {ME, peer, OTHER}, "me+other": {ME, OTHER}}[where]
    asked: list[str] = []

    def owner_of(vm: str) -> str | None:
        asked.append(vm)
        return mapped

    name = verb(command)
    if role == "peer":
        # Any verb, but only on a VM whose scope holds both zones.
        expect_ok = isinstance(command, Ping | Features | Whoami) or where in ("both", "both+other")
    elif role == "operator":
        expect_ok = name in OPERATOR_VERBS
    else:
        expect_ok = name in CN_VERBS and (isinstance(command, Ping | Features | Whoami)
                                          or owner == "self")
    if expect_ok:
        authorize(principal, command, owner_of, me=ME, scope=scope)
    else:
        with pytest.raises(NotAuthorized) as info:
            authorize(principal, command, owner_of, me=ME, scope=scope)
        err = info.value
        assert err.code == "NotAuthorized" and err.http_status == 403
        assert name in err.message  # says what was refused
        assert err.to_json() == {"code": "NotAuthorized", "message": err.message}
    # Only a CN's command about a VM consults the VM map.
    if role == "cn" and not isinstance(command, Ping | Features | Whoami) and name in CN_VERBS:
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


ZONES = ["z0", "z1", "z2", "z3"]


def test_peer_scope_exhaustively() -> None:
    """Every (this zone, peer, scope) over four zones: allowed exactly when both
    are in the scope and they differ; an unknown scope allows nothing."""
    subsets = [set(c) for n in range(len(ZONES) + 1) for c in itertools.combinations(ZONES, n)]
    for me, peer in itertools.product(ZONES, ZONES):
        assert not peer_in_scope(me, peer, None)
        for scope in subsets:
            want = me != peer and me in scope and peer in scope
            assert peer_in_scope(me, peer, scope) is want, (me, peer, scope)
            assert peer_in_scope(me, peer, frozenset(scope)) is want


def test_a_peer_refused_a_destroy_says_where_the_vm_is() -> None:
    vm = "7250abe7-581d-4b91-9ae1-5601a17f5dff"
    peer = _principal("peer")
    with pytest.raises(NotAuthorized, match=f"placed on {ME}, {OTHER}: peer zone {peer.id} "
                       "may not destroy it"):
        authorize(peer, Destroy(vm, "s1"), lambda _: None, me=ME, scope={ME, OTHER})
    with pytest.raises(NotAuthorized, match="unknown placement"):
        authorize(peer, Delete(vm, "s1"), lambda _: None, me=ME, scope=None)
    authorize(peer, Ping(), lambda _: None, me=ME, scope=None)  # no VM: nothing to scope


@given(vm=vms, n=st.integers(0, 5), data=st.data())
def test_static_pairs_agree_on_every_zone(vm: str, n: int, data: st.DataObject) -> None:
    """Without a coordinator a peer may act where the static pair holds both zones;
    every zone with the same fleet list computes the same pair, ``pair_of``'s."""
    fleet = [f"zone-{i}" for i in range(n + 1)]
    me = data.draw(st.sampled_from(fleet))
    scope = static_scope(me, vm, [z for z in fleet if z != me])
    if len(fleet) <= 2:
        assert scope == set(fleet)  # one peer (or none): it holds every VM with us
        return
    assert scope == set(pair_of(vm, fleet))
    for z in fleet:
        assert static_scope(z, vm, [y for y in fleet if y != z]) == scope
