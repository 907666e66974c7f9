"""snapperd's config: the example parses, bad configs name the bad field."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rebalance.coordinator import CoordinatorConfig
from rebalance.coordinator import load_config as load_coordinator
from snapper_zone.common.config import (
    DEFAULT_METADATA_MAX_BYTES,
    ConfigError,
    ZoneConfig,
    load_config,
    parse_config,
    parse_keys,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "etc" / "snapperd.example.toml"

ZONE = "bd932c2b-caae-495a-abf2-fb958111c3fb"
PEER = "02f6d6c3-c496-439f-8cad-5ad138936fa4"
CN = "44454c4c-3800-1051-8036-b4c04f4e3232"
VM = "74c59c61-4559-4ca2-b1ef-0ca22f2f936a"


@cache
def pubkey(n: int) -> str:
    """A fresh public key line; the private half is never written anywhere."""
    key = asyncssh.generate_private_key("ssh-ed25519", comment=f"test key {n}")
    return key.export_public_key().decode().strip()


def valid() -> dict[str, Any]:
    return {
        "uuid": ZONE,
        "name": "snapper0",
        "root": f"zones/{ZONE}/data",
        "ssh": {"port": 2222, "host_key": "/etc/snapper/host_key"},
        "http": {"port": 8080},
        "keys": [
            {"role": "cn", "cn_id": CN, "public_key": pubkey(0)},
            {"role": "peer", "zone": PEER, "public_key": pubkey(1)},
            {"role": "operator", "public_key": pubkey(2)},
        ],
        "vms": {VM: CN},
        "peers": [
            {
                "uuid": PEER,
                "ssh_host": "10.0.0.2",
                "ssh_port": 2222,
                "http_url": "http://10.0.0.2:8080",
            }
        ],
    }


# --- the good cases


def test_example_parses() -> None:
    cfg = load_config(EXAMPLE)
    assert isinstance(cfg, ZoneConfig)
    assert cfg.root == f"zones/{cfg.uuid}/data"
    assert {k.role for k in cfg.keys} == {"cn", "peer", "operator"}
    assert cfg.durability == "mirrored"
    assert cfg.max_concurrent_receives == 4
    assert cfg.reconcile_concurrency == 2
    for vm in cfg.vms:
        cn = cfg.cn_for_vm(vm)
        assert cn is not None
        assert any(k.cn_id == cn for k in cfg.keys)


def test_gate_section() -> None:
    data = valid()
    assert parse_config(data, "/etc/snapper/z.toml").gate is None
    data["gate"] = {"socket": "gate.sock", "port": 22, "authorized_keys": "/var/k",
                    "uid": 1000, "min_bytes": "1GiB"}
    gate = parse_config(data, "/etc/snapper/z.toml").gate
    assert gate is not None
    assert (gate.socket, gate.port, gate.authorized_keys, gate.uid, gate.min_bytes) == (
        Path("/etc/snapper/gate.sock"), 22, Path("/var/k"), 1000, 1 << 30)
    data["gate"] = {"socket": "/run/g", "port": 22, "authorized_keys": "/var/k"}
    gate = parse_config(data, "/etc/snapper/z.toml").gate
    assert gate is not None and gate.uid is None and gate.min_bytes == 64 << 20


def test_defaults_and_values() -> None:
    data = valid()
    del data["peers"]
    del data["vms"]
    cfg = parse_config(data, "/etc/snapper/snapperd.toml")
    assert cfg.ssh.host == "127.0.0.1"
    assert cfg.http.host == "127.0.0.1"
    assert cfg.ssh.port == 2222
    assert cfg.ssh.host_key == Path("/etc/snapper/host_key")
    assert cfg.durability == "mirrored"
    assert cfg.max_concurrent_receives == 4
    assert cfg.metadata_max_bytes == DEFAULT_METADATA_MAX_BYTES == 256 * 1024
    assert cfg.coordinator_url is None
    assert cfg.peers == ()
    assert dict(cfg.vms) == {}
    cn, peer, op = cfg.keys
    assert (cn.role, cn.cn_id, cn.zone) == ("cn", CN, None)
    assert (peer.role, peer.cn_id, peer.zone) == ("peer", None, PEER)
    assert (op.role, op.cn_id, op.zone) == ("operator", None, None)
    assert cn.fingerprint.startswith("SHA256:")
    hash(cfg)  # frozen and hashable, despite the vms mapping


def test_key_lookup_by_wire_data() -> None:
    cfg = parse_config(valid())
    presented = asyncssh.import_public_key(pubkey(1))
    found = cfg.key_for(presented.public_data)
    assert found is not None and found.role == "peer" and found.zone == PEER
    assert found.ssh_key().public_data == presented.public_data
    assert cfg.key_for(asyncssh.import_public_key(pubkey(9)).public_data) is None


def test_uuids_normalised_to_lower_case() -> None:
    data = valid()
    data["uuid"] = ZONE.upper()
    data["vms"] = {VM.upper(): CN}
    cfg = parse_config(data)
    assert cfg.uuid == ZONE
    assert cfg.cn_for_vm(VM) == CN
    assert cfg.cn_for_vm(VM.upper()) == CN


def test_config_is_immutable() -> None:
    cfg = parse_config(valid())
    with pytest.raises(AttributeError):
        cfg.root = "elsewhere"  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.vms["x"] = "y"  # type: ignore[index]


def test_zero_listen_port_allowed_for_tests() -> None:
    data = valid()
    data["ssh"]["port"] = 0
    data["http"]["port"] = 0
    cfg = parse_config(data)
    assert (cfg.ssh.port, cfg.http.port) == (0, 0)


def test_public_key_file_relative_to_config(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "cn.pub").write_text(pubkey(0) + "\n")
    data = valid()
    data["keys"][0] = {"role": "cn", "cn_id": CN, "public_key_file": "keys/cn.pub"}
    data["ssh"]["host_key"] = "host_key"
    conf = tmp_path / "snapperd.json"
    conf.write_text(json.dumps(data))
    cfg = load_config(conf)
    assert cfg.keys[0].public_key == pubkey(0)
    assert cfg.ssh.host_key == tmp_path / "host_key"


def test_toml_file_round_trip(tmp_path: Path) -> None:
    conf = tmp_path / "snapperd.toml"
    conf.write_text(
        f"""
uuid = "{ZONE}"
name = "z"
root = "tank/snapper"
coordinator_url = "https://coord.example:8443/"
[ssh]
port = 22
host_key = "/k"
[http]
port = 80
[[keys]]
role = "operator"
public_key = "{pubkey(3)}"
"""
    )
    cfg = load_config(conf)
    assert cfg.root == "tank/snapper"
    assert cfg.coordinator_url == "https://coord.example:8443/"


# --- the bad cases: each must name the field at fault

Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Mutation:
    def mutate(d: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node: Any = d
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[int(last) if last.isdigit() else last] = value

    return mutate


def _del(path: str) -> Mutation:
    def mutate(d: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node: Any = d
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        del node[int(last) if last.isdigit() else last]

    return mutate


def _append_key(entry: dict[str, Any]) -> Mutation:
    def mutate(d: dict[str, Any]) -> None:
        d["keys"].append(entry)

    return mutate


BAD: list[tuple[str, Mutation, str, str]] = [
    # (case id, mutation, expected field, a word the message must contain)
    ("missing uuid", _del("uuid"), "uuid", "missing"),
    ("missing root", _del("root"), "root", "missing"),
    ("missing ssh", _del("ssh"), "ssh", "missing"),
    ("missing ssh port", _del("ssh/port"), "ssh.port", "missing"),
    ("missing host key", _del("ssh/host_key"), "ssh.host_key", "missing"),
    ("missing http port", _del("http/port"), "http.port", "missing"),
    ("missing keys", _del("keys"), "keys", "missing"),
    ("missing role", _del("keys/2/role"), "keys[2].role", "missing"),
    ("missing peer ssh_port", _del("peers/0/ssh_port"), "peers[0].ssh_port", "missing"),
    ("unknown top field", _set("durabilty", "local"), "durabilty", "durability"),
    ("no reconcile slot", _set("reconcile_concurrency", 0), "reconcile_concurrency", "1"),
    ("reconcile slots junk", _set("reconcile_concurrency", "many"), "reconcile_concurrency",
     "integer"),
    ("unknown ssh field", _set("ssh/prot", 22), "ssh.prot", "unknown"),
    ("unknown key field", _set("keys/0/cnid", CN), "keys[0].cnid", "unknown"),
    ("unknown peer field", _set("peers/0/url", "http://x"), "peers[0].url", "unknown"),
    ("bad zone uuid", _set("uuid", "not-a-uuid"), "uuid", "uuid"),
    ("uuid with braces", _set("uuid", "{" + ZONE + "}"), "uuid", "uuid"),
    ("bad peer key zone", _set("keys/1/zone", "1234"), "keys[1].zone", "uuid"),
    ("bad vm uuid", _set("vms", {"vm-one": CN}), "vms.vm-one", "uuid"),
    ("bad peer uuid", _set("peers/0/uuid", "x"), "peers[0].uuid", "uuid"),
    ("root leading slash", _set("root", "/zones/x"), "root", "dataset"),
    ("root dotdot", _set("root", "zones/../etc"), "root", "dataset"),
    ("root dotdot inside", _set("root", "zones/a..b"), "root", "dataset"),
    ("root dot", _set("root", "zones/./data"), "root", "dataset"),
    ("root snapshot", _set("root", "zones/data@snap"), "root", "dataset"),
    ("root bookmark", _set("root", "zones/data#mark"), "root", "dataset"),
    ("root space", _set("root", "zones/my data"), "root", "dataset"),
    ("root trailing slash", _set("root", "zones/data/"), "root", "dataset"),
    ("root double slash", _set("root", "zones//data"), "root", "dataset"),
    ("root too long", _set("root", "z/" + "a" * 300), "root", "dataset"),
    ("root empty", _set("root", ""), "root", "empty"),
    ("root not string", _set("root", 3), "root", "string"),
    ("ssh port too big", _set("ssh/port", 65536), "ssh.port", "range"),
    ("http port negative", _set("http/port", -1), "http.port", "range"),
    ("peer port zero", _set("peers/0/ssh_port", 0), "peers[0].ssh_port", "range"),
    ("port is bool", _set("ssh/port", True), "ssh.port", "integer"),
    ("port is string", _set("http/port", "8080"), "http.port", "integer"),
    ("bad durability", _set("durability", "paranoid"), "durability", "mirrored"),
    ("zero receives", _set("max_concurrent_receives", 0), "max_concurrent_receives", "range"),
    ("metadata float", _set("metadata_max_bytes", 1.5), "metadata_max_bytes", "integer"),
    ("bad role", _set("keys/2/role", "admin"), "keys[2].role", "operator"),
    ("cn without id", _del("keys/0/cn_id"), "keys[0].cn_id", "missing"),
    ("peer without zone", _del("keys/1/zone"), "keys[1].zone", "missing"),
    ("cn_id on operator", _set("keys/2/cn_id", CN), "keys[2].cn_id", "role"),
    ("zone on cn", _set("keys/0/zone", PEER), "keys[0].zone", "role"),
    ("peer key is self", _set("keys/1/zone", ZONE), "keys[1].zone", "own"),
    ("bad cn_id", _set("keys/0/cn_id", "cn one"), "keys[0].cn_id", "id"),
    ("garbage key", _set("keys/2/public_key", "ssh-ed25519 AAAAnope"), "keys[2].public_key", "key"),
    ("not a key", _set("keys/2/public_key", "hello"), "keys[2].public_key", "key"),
    (
        "two key lines",
        _set("keys/2/public_key", pubkey(4) + "\n" + pubkey(5)),
        "keys[2].public_key",
        "one",
    ),
    ("no key material", _del("keys/2/public_key"), "keys[2].public_key", "exactly one"),
    (
        "both key and file",
        _set("keys/2/public_key_file", "/x.pub"),
        "keys[2].public_key",
        "exactly one",
    ),
    (
        "unreadable key file",
        _append_key({"role": "operator", "public_key_file": "/nonexistent/k.pub"}),
        "keys[3].public_key_file",
        "cannot read",
    ),
    (
        "duplicate key",
        _append_key({"role": "operator", "public_key": pubkey(0)}),
        "keys[3].public_key",
        "duplicate",
    ),
    (
        "duplicate key other comment",
        _append_key({"role": "operator", "public_key": pubkey(1).rsplit(" ", 2)[0] + " other"}),
        "keys[3].public_key",
        "keys[1]",
    ),
    ("keys not a list", _set("keys", {"role": "cn"}), "keys", "list"),
    ("key not a table", _set("keys/0", "ssh-ed25519 AAAA"), "keys[0]", "table"),
    ("vm of unknown cn", _set("vms", {VM: "some-other-cn"}), f"vms.{VM}", "no key"),
    ("duplicate vm by case", _set("vms", {VM: CN, VM.upper(): CN}), f"vms.{VM.upper()}", "dup"),
    ("vms not a table", _set("vms", [VM]), "vms", "table"),
    ("bad coordinator url", _set("coordinator_url", "ftp://x"), "coordinator_url", "http"),
    ("coordinator no host", _set("coordinator_url", "http://"), "coordinator_url", "host"),
    ("coordinator bad port", _set("coordinator_url", "http://x:99999"), "coordinator_url", "URL"),
    ("coordinator key junk", _set("coordinator_key", "ssh-ed25519 AAAA"), "coordinator_key",
     "public key"),
    ("coordinator key not a string", _set("coordinator_key", 1), "coordinator_key", "string"),
    ("peer is self", _set("peers/0/uuid", ZONE), "peers[0].uuid", "own peer"),
    (
        "duplicate peer",
        lambda d: d["peers"].append(dict(d["peers"][0])),
        "peers[1].uuid",
        "duplicate",
    ),
    ("peer bad host", _set("peers/0/ssh_host", "a b"), "peers[0].ssh_host", "host"),
    ("ssh host empty", _set("ssh/host", " "), "ssh.host", "empty"),
    ("bad zone name", _set("name", "snapper zero"), "name", "id"),
    ("ssh not a table", _set("ssh", "0.0.0.0:22"), "ssh", "table"),
    ("gate without socket", _set("gate", {"port": 22, "authorized_keys": "k"}),
     "gate.socket", "missing"),
    ("gate without keys file", _set("gate", {"port": 22, "socket": "/run/g"}),
     "gate.authorized_keys", "missing"),
    ("gate port zero", _set("gate", {"port": 0, "socket": "/run/g", "authorized_keys": "k"}),
     "gate.port", "range"),
    ("gate socket too long",
     _set("gate", {"port": 22, "socket": "/" + "s" * 120, "authorized_keys": "k"}),
     "gate.socket", "too long"),
    ("gate unknown field",
     _set("gate", {"port": 22, "socket": "/run/g", "authorized_keys": "k", "sockt": 1}),
     "gate.sockt", "unknown"),
    ("gate min_bytes junk",
     _set("gate", {"port": 22, "socket": "/run/g", "authorized_keys": "k", "min_bytes": "x"}),
     "gate.min_bytes", "size"),
]


@pytest.mark.parametrize(
    ("mutate", "field", "word"),
    [pytest.param(m, f, w, id=i) for i, m, f, w in BAD],
)
def test_invalid_names_field(mutate: Mutation, field: str, word: str) -> None:
    data = copy.deepcopy(valid())
    mutate(data)
    with pytest.raises(ConfigError) as info:
        parse_config(data, "/etc/snapper/bad.toml")
    err = info.value
    assert err.path == "/etc/snapper/bad.toml"
    assert err.field == field, str(err)
    assert word.lower() in err.message.lower(), str(err)
    assert str(err).startswith(f"/etc/snapper/bad.toml: {field}: ")


def test_document_not_a_table() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config([1, 2], "x.toml")
    assert info.value.field == ""


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert info.value.path == str(tmp_path / "nope.toml")
    assert info.value.field == ""
    assert "cannot read" in info.value.message


@pytest.mark.parametrize(
    ("name", "text", "what"),
    [
        ("bad.toml", "uuid = [", "invalid TOML"),
        ("bad.json", "{", "invalid JSON"),
        ("latin1.toml", b"name = '\xe9'", "UTF-8"),
    ],
)
def test_unparsable_file(tmp_path: Path, name: str, text: str | bytes, what: str) -> None:
    conf = tmp_path / name
    if isinstance(text, bytes):
        conf.write_bytes(text)
    else:
        conf.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(conf)
    assert what in info.value.message


# --- junk never escapes as anything but ConfigError

_FIELD_NAMES = [
    "uuid", "name", "root", "ssh", "http", "durability", "max_concurrent_receives",
    "metadata_max_bytes", "keys", "vms", "coordinator_url", "peers", "host", "port",
    "host_key", "role", "public_key", "public_key_file", "cn_id", "zone", "ssh_host",
    "ssh_port", "http_url",
]  # fmt: skip

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=40)
    | st.sampled_from([ZONE, CN, "cn", "peer", "local", "tank/x", "ssh-ed25519 AAAA"])
    | st.binary(max_size=8)
)
_junk = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(_FIELD_NAMES) | st.text(max_size=8) | st.integers(), inner, max_size=5
        )
    ),
    max_leaves=25,
)


def _check(data: object) -> None:
    try:
        cfg = parse_config(data, "junk.toml")
    except ConfigError as e:
        assert e.path == "junk.toml"
        assert isinstance(e.field, str)
    else:
        assert isinstance(cfg, ZoneConfig)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_junk)
def test_junk_documents_only_raise_config_error(data: object) -> None:
    _check(data)


@st.composite
def _valid_with_junk(draw: st.DrawFn) -> dict[str, Any]:
    """A valid document with one value somewhere replaced by junk: reaches deep checks."""
    data = copy.deepcopy(valid())
    paths: list[list[str | int]] = []

    def walk(node: Any, path: list[str | int]) -> None:
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, [*path, k])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, [*path, i])

    walk(data, [])
    path = draw(st.sampled_from(paths[1:]))
    node: Any = data
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = draw(_junk)
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_valid_with_junk())
def test_valid_documents_with_junk_only_raise_config_error(data: dict[str, Any]) -> None:
    _check(data)


def test_coordinator_key_is_normalised() -> None:
    data = {**valid(), "coordinator_key": f"  {pubkey(3)}  "}
    assert parse_config(data).coordinator_key == pubkey(3)
    assert parse_config(valid()).coordinator_key is None


def test_parse_keys_limits_roles() -> None:
    """The coordinator's [[keys]]: snapperd's shape, operator and cn only."""
    keys = parse_keys([{"role": "operator", "public_key": pubkey(2)},
                       {"role": "cn", "cn_id": CN, "public_key": pubkey(0)}], "c.toml",
                      roles=("operator", "cn"))
    assert [(k.role, k.name) for k in keys] == [("operator", "test key 2"), ("cn", CN)]
    with pytest.raises(ConfigError) as info:
        parse_keys([{"role": "peer", "zone": PEER, "public_key": pubkey(1)}], "c.toml",
                   roles=("operator", "cn"))
    assert info.value.field == "keys[0].role"


# --- one loader for the three files: snapperd's, the coordinator's, the CN's


def _coordinator(path: Path) -> CoordinatorConfig:
    return load_coordinator(path)


def _cn(path: Path) -> object:
    from snapper_zone.cn.cli import load_cn_config
    return load_cn_config(path)


def _zone_toml(extra: str) -> str:
    return (f'uuid = "{ZONE}"\nname = "z"\nroot = "zones/z"\n{extra}\n'
            f'[ssh]\nport = 2222\nhost_key = "k"\n[http]\nport = 8080\n'
            f'[[keys]]\nrole = "operator"\npublic_key = "{pubkey(2)}"\n')


@pytest.mark.parametrize("load, text, field, says", [
    (load_config, _zone_toml("durabilty = 'local'"), "durabilty", "did you mean 'durability'"),
    (load_config, _zone_toml("[limits]\nvm_quota_bytes = '5X'"), "limits.vm_quota_bytes",
     "not a size"),
    (load_config, _zone_toml("metadata_max_bytes = true"), "metadata_max_bytes",
     "must be a size: an integer"),
    (load_config, _zone_toml("[limits]\ncopy_buffer_bytes = '2GiB'"),
     "limits.copy_buffer_bytes", "out of range"),
    (_coordinator, "[moves]\nper_zon = 3\n", "moves.per_zon", "did you mean 'per_zone'"),
    (_coordinator, "[helth]\ninterval = 3\n", "helth", "did you mean 'health'"),
    (_coordinator, "[health]\ninterval = 'often'\n", "health.interval",
     "must be a number, not a string"),
    (_coordinator, "[moves]\nbandwidth = '50 furlongs'\n", "moves.bandwidth", "not a size"),
    (_coordinator, "[rebalance]\nauto = 1\n", "rebalance.auto", "must be true or false"),
    (_coordinator, "[listen]\nport = 70000\n", "listen.port", "out of range"),
    (_cn, 'zone = ["h:1"]\n', "zone", "did you mean 'zones'"),
    (_cn, 'zones = ["h"]\n', "zones[0]", "HOST:PORT"),
    (_cn, 'zones = "h:1"\n', "zones", "must be a list"),
    (_cn, 'key = 3\n', "key", "must be a string, not an integer"),
    (_cn, 'coordinator_url = "ftp://c"\n', "coordinator_url", "http(s) URL"),
])
def test_the_three_config_files_name_file_and_field(
        tmp_path: Path, load: Callable[[Path], object], text: str, field: str,
        says: str) -> None:
    path = tmp_path / "some.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load(path)
    assert (e.value.path, e.value.field) == (str(path), field)
    assert says in e.value.message and str(e.value).startswith(f"{path}: {field}: ")


def test_sizes_in_config_files_take_the_one_grammar(tmp_path: Path) -> None:
    z = tmp_path / "z.toml"
    z.write_text(_zone_toml('metadata_max_bytes = "64KiB"\n[limits]\nvm_quota_bytes = "1.5T"\n'
                            'cn_quota_bytes = 1048576'))
    zc = load_config(z)
    assert (zc.metadata_max_bytes, zc.limits.vm_quota_bytes, zc.limits.cn_quota_bytes) == \
        (64 << 10, 3 << 39, 1 << 20)
    assert zc.limits.copy_buffer_bytes == 64 << 20  # the default
    z.write_text(_zone_toml('[limits]\ncopy_buffer_bytes = "16MiB"'))
    assert load_config(z).limits.copy_buffer_bytes == 16 << 20
    z.write_text(_zone_toml('[limits]\ncopy_buffer_bytes = 0'))  # none
    assert load_config(z).limits.copy_buffer_bytes == 0
    c = tmp_path / "c.toml"
    c.write_text('[moves]\nbandwidth = "50MiB"\nkeep_days = 7\nkeep_finished = 10\n')
    cc = _coordinator(c)
    assert (cc.move_bandwidth, cc.keep_days, cc.keep_finished) == (50 << 20, 7.0, 10)
