"""The wire documents: round trips, the legacy forms read, malformed input refused."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapper_zone.errors import SnapperError
from snapper_zone.wire import (
    GUID_MAX,
    InvalidDocument,
    Inventory,
    Part,
    VmSnapshot,
    ZoneEndpoint,
    ZoneRegistration,
    elsewhere_from_json,
    elsewhere_to_json,
    guid_from_json,
    snapshot_list_from_json,
    tombstones_from_json,
    tombstones_to_json,
)

VM = "74c59c61-4559-4ca2-b1ef-0ca22f2f9300"
ZONE = "00000000-0000-4000-8000-000000000001"

guids = st.integers(0, GUID_MAX)
counts = st.integers(0, 2**63 - 1)
labels = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,8}", fullmatch=True).filter(
    lambda s: ".." not in s)
names = labels
uuids = st.uuids().map(str)


@st.composite
def parts(draw: st.DrawFn, label: str) -> Part:
    return Part(label, draw(guids), draw(counts), draw(st.integers(0, 2**40)), draw(counts))


@st.composite
def vm_snapshots(draw: st.DrawFn, vm: str) -> VmSnapshot:
    ls = draw(st.lists(labels, max_size=3, unique=True))
    return VmSnapshot(vm, draw(names), draw(st.booleans()), draw(counts),
                      {label: draw(parts(label)) for label in ls},
                      draw(st.none() | st.text(min_size=1, max_size=40)))


@st.composite
def inventories(draw: st.DrawFn) -> Inventory:
    vm = draw(uuids)
    return Inventory(
        vm, tuple(draw(st.lists(vm_snapshots(vm), max_size=4))),
        draw(st.dictionaries(labels, st.none() | st.from_regex(r"1-[0-9a-f]{8,20}",
                                                                  fullmatch=True), max_size=3)),
        draw(st.dictionaries(guids, counts, max_size=5)),
        frozenset(draw(st.lists(names, max_size=3))))


def _through_json(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


@given(inventories())
def test_inventory_round_trips(inv: Inventory) -> None:
    assert Inventory.from_json(_through_json(inv.to_json())) == inv
    assert Inventory.from_json(_through_json(inv.to_json()), vm=inv.vm) == inv


@given(st.lists(vm_snapshots(VM), max_size=4))
def test_snapshot_list_round_trips(snaps: list[VmSnapshot]) -> None:
    assert snapshot_list_from_json(_through_json([s.to_json() for s in snaps])) == snaps


@given(st.dictionaries(guids, counts, max_size=20))
def test_tombstones_round_trip_and_read_the_older_hex_form(stones: dict[int, int]) -> None:
    assert tombstones_from_json(_through_json(tombstones_to_json(stones))) == stones
    assert tombstones_from_json({f"{g:x}": t for g, t in stones.items()}) == stones


@given(st.dictionaries(names, st.dictionaries(labels, guids, max_size=3), max_size=4))
def test_elsewhere_round_trips(held: dict[str, dict[str, int]]) -> None:
    assert elsewhere_from_json(_through_json(elsewhere_to_json(held))) == held


lines = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp")),
               min_size=1, max_size=30)
hosts = st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}", fullmatch=True)
urls = st.builds(lambda scheme, host, port: f"{scheme}://{host}" + (f":{port}" if port else ""),
                 st.sampled_from(["http", "https"]), hosts, st.none() | st.integers(1, 65535))


@st.composite
def registrations(draw: st.DrawFn) -> ZoneRegistration:
    return ZoneRegistration(draw(uuids), draw(lines), draw(hosts), draw(st.integers(1, 65535)),
                            draw(urls), "ssh-ed25519 " + draw(lines), draw(counts))


@given(registrations())
def test_zone_registration_round_trips(reg: ZoneRegistration) -> None:
    doc = _through_json(reg.to_json())
    assert set(doc) == {"uuid", "name", "ssh_host", "ssh_port", "http_url", "host_key",
                        "capacity"}
    assert ZoneRegistration.from_json(doc) == reg


@given(registrations(), st.sampled_from(["active", "draining", "lost"]))
def test_zone_endpoint_round_trips(reg: ZoneRegistration, state: str) -> None:
    z = ZoneEndpoint(**vars(reg), state=state)
    assert ZoneEndpoint.from_json(_through_json(z.to_json())) == z
    # The coordinator's listing carries more than the endpoint: ignored.
    listed = {**z.to_json(), "used": 1, "free": 2, "health": "unknown", "vms": 0}
    assert ZoneEndpoint.from_json(listed) == z
    assert ZoneEndpoint.from_json({**reg.to_json()}) == ZoneEndpoint(**vars(reg))


def test_a_registration_is_read_tidied() -> None:
    doc = {"uuid": ZONE, "name": " z1 ", "ssh_host": "h ", "ssh_port": 22,
           "http_url": "http://h:8470/", "host_key": "ssh-ed25519 AAAA\n", "capacity": 0}
    assert ZoneRegistration.from_json(doc) == ZoneRegistration(
        ZONE, "z1", "h", 22, "http://h:8470", "ssh-ed25519 AAAA", 0)


@given(guids)
def test_guids_are_one_form_out_and_any_older_form_in(g: int) -> None:
    part = Part("root", g, 1, 2, 3)
    assert part.to_json()["guid"] == str(g)
    assert guid_from_json(str(g)) == guid_from_json(g) == g


def test_the_older_bare_list_answer_is_read_for_the_vm_asked() -> None:
    snap = VmSnapshot(VM, "s1", True, 5, {"root": Part("root", 7, 1, 2, 3)})
    inv = Inventory.from_json([snap.to_json()], vm=VM)
    assert inv == Inventory(VM, (snap,))
    with pytest.raises(InvalidDocument):
        Inventory.from_json([snap.to_json()])  # no VM asked: a list is not an inventory


def _doc() -> dict[str, Any]:
    snap = VmSnapshot(VM, "s1", True, 5, {"root": Part("root", 7, 1, 2, 3)}, "cn:cn1")
    return Inventory(VM, (snap,), {"root": None}, {7: 100}, frozenset({"s1"})).to_json()


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    at = doc
    for k in path[:-1]:
        at = at[k]
    if value is _DELETE:
        del at[path[-1]]
    else:
        at[path[-1]] = value
    return doc


_DELETE = object()
_PART = ("snapshots", 0, "datasets", "root")

BAD = [
    ((), ["not", "an", "object"]),
    (("vm",), "not-a-uuid"),
    (("vm",), _DELETE),
    (("snapshots",), {"s1": {}}),
    (("snapshots",), _DELETE),
    (("snapshots", 0), "s1"),
    (("snapshots", 0, "vm"), "74c59c61-4559-4ca2-b1ef-0ca22f2f9399"),  # another VM's
    (("snapshots", 0, "name"), "-rf"),
    (("snapshots", 0, "name"), "a/b"),
    (("snapshots", 0, "name"), 7),
    (("snapshots", 0, "complete"), "yes"),
    (("snapshots", 0, "complete"), 1),
    (("snapshots", 0, "complete"), _DELETE),
    (("snapshots", 0, "created"), -1),
    (("snapshots", 0, "created"), 1.5),
    (("snapshots", 0, "created"), "5"),
    (("snapshots", 0, "created"), 2**63),
    (("snapshots", 0, "size"), -3),
    (("snapshots", 0, "source"), 12),
    (("snapshots", 0, "source"), "x" * 5000),
    (("snapshots", 0, "datasets"), []),
    (("snapshots", 0, "datasets"), _DELETE),
    (("snapshots", 0, "datasets", "../etc"), {"guid": "1", "createtxg": 1, "used": 1,
                                             "referenced": 1}),
    ((*_PART, "guid"), _DELETE),
    ((*_PART, "guid"), "-1"),
    ((*_PART, "guid"), -1),
    ((*_PART, "guid"), str(GUID_MAX + 1)),
    ((*_PART, "guid"), GUID_MAX + 1),
    ((*_PART, "guid"), "0x1f"),
    ((*_PART, "guid"), "1f"),
    ((*_PART, "guid"), " 12"),
    ((*_PART, "guid"), "012"),
    ((*_PART, "guid"), ""),
    ((*_PART, "guid"), 1.0),
    ((*_PART, "guid"), True),
    ((*_PART, "guid"), None),
    ((*_PART, "dataset"), "disk0"),  # listed under "root"
    ((*_PART, "createtxg"), _DELETE),
    ((*_PART, "used"), -1),
    ((*_PART, "used"), None),
    ((*_PART, "referenced"), 10**30),
    (("datasets",), ["root"]),
    (("datasets", "root"), "token"),
    (("datasets", "root", "resume_token"), "short"),
    (("datasets", "root", "resume_token"), 5),
    (("tombstones",), "7:100"),
    (("tombstones", 0, "guid"), "zz"),
    (("tombstones", 0, "guid"), _DELETE),
    (("tombstones", 0, "deleted"), -5),
    (("tombstones", 0, "deleted"), "100"),
    (("tombstones",), [{"guid": "7", "deleted": 1}, {"guid": "7", "deleted": 2}]),
    (("tombstones",), {"nothex": 1}),
    (("tombstones",), {"12345678901234567": 1}),  # 17 hex digits: beyond 64 bits
    (("tombstones",), {"7": "soon"}),
    (("in_use",), "s1"),
    (("in_use",), [""]),
    (("in_use",), [3]),
]


@pytest.mark.parametrize(("path", "value"), BAD)
def test_malformed_inventories_are_refused_with_one_error(path: tuple[Any, ...],
                                                          value: Any) -> None:
    doc = _set(_doc(), path, value) if path else value
    with pytest.raises(InvalidDocument) as err:
        Inventory.from_json(doc, vm=None if path else VM)
    assert isinstance(err.value, SnapperError) and err.value.code == "InvalidDocument"
    assert err.value.message.startswith("inventory")


def test_the_error_names_the_bad_field() -> None:
    doc = _set(_doc(), (*_PART, "guid"), "1f")
    with pytest.raises(InvalidDocument, match=r"inventory\.snapshots\[0\]\(s1\)\.datasets"
                                              r"\.root\.guid: expected a guid"):
        Inventory.from_json(doc)


def test_an_answer_about_another_vm_is_refused() -> None:
    with pytest.raises(InvalidDocument, match="asked about VM"):
        Inventory.from_json(_doc(), vm="74c59c61-4559-4ca2-b1ef-0ca22f2f9399")


def test_unknown_keys_are_ignored_and_older_optional_fields_default() -> None:
    doc = _doc()
    doc["snapshots"][0]["metadata"] = {"alias": "web"}
    doc["future"] = 1
    assert Inventory.from_json(doc) == Inventory.from_json(_doc())
    for key in ("datasets", "tombstones", "in_use"):
        del doc[key]
    inv = Inventory.from_json(doc)
    assert (inv.datasets, inv.tombstones, inv.in_use) == ({}, {}, frozenset())


@pytest.mark.parametrize("body", [
    None, [], {"uuid": ZONE},
    {"uuid": ZONE, "ssh_host": "h", "ssh_port": 0, "http_url": "u", "host_key": "k"},
    {"uuid": ZONE, "ssh_host": "h", "ssh_port": "22", "http_url": "u", "host_key": "k"},
    {"uuid": ZONE, "ssh_host": "", "ssh_port": 22, "http_url": "u", "host_key": "k"},
    {"uuid": ZONE, "ssh_host": "h", "ssh_port": 22, "http_url": "u", "host_key": "k",
     "capacity": -1},
    {"uuid": ZONE, "ssh_host": "h", "ssh_port": 22, "http_url": "u", "host_key": "k",
     "state": "gone"},
    {"uuid": "zone1", "ssh_host": "h", "ssh_port": 22, "http_url": "u", "host_key": "k"},
])
def test_malformed_zone_records_are_refused(body: Any) -> None:
    with pytest.raises(InvalidDocument):
        ZoneEndpoint.from_json(body)


_REG = {"uuid": ZONE, "name": "z1", "ssh_host": "h", "ssh_port": 22,
        "http_url": "http://h:8470", "host_key": "ssh-ed25519 AAAA", "capacity": 1}


@pytest.mark.parametrize("change, words", [
    ({"uuid": "zone1"}, "zone.uuid"),
    ({"uuid": 7}, "zone.uuid"),
    ({"name": ""}, f"zone({ZONE}).name"),
    ({"name": "  "}, f"zone({ZONE}).name"),
    ({"name": None}, f"zone({ZONE}).name"),
    ({"ssh_host": "a\nb"}, f"zone({ZONE}).ssh_host: expected one line"),
    ({"ssh_port": 0}, f"zone({ZONE}).ssh_port"),
    ({"ssh_port": 65536}, f"zone({ZONE}).ssh_port"),
    ({"ssh_port": "22"}, f"zone({ZONE}).ssh_port"),
    ({"ssh_port": True}, f"zone({ZONE}).ssh_port"),
    ({"http_url": "ftp://h"}, f"zone({ZONE}).http_url"),
    ({"http_url": "http://h/api"}, f"zone({ZONE}).http_url"),
    ({"http_url": "http://h:x"}, f"zone({ZONE}).http_url"),
    ({"http_url": "http://h:0"}, f"zone({ZONE}).http_url"),
    ({"http_url": "http://"}, f"zone({ZONE}).http_url"),
    ({"http_url": "http://h?q=1"}, f"zone({ZONE}).http_url"),
    ({"host_key": ""}, f"zone({ZONE}).host_key"),
    ({"host_key": "k" * 16385}, f"zone({ZONE}).host_key"),
    ({"capacity": -1}, f"zone({ZONE}).capacity"),
    ({"capacity": 1.5}, f"zone({ZONE}).capacity"),
    ({"capacity": None}, f"zone({ZONE}).capacity"),
    ({"state": "active"}, "zone: unknown fields: state"),
    ({"extra": 1, "more": 2}, "zone: unknown fields: extra, more"),
])
def test_malformed_registrations_are_refused(change: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidDocument) as err:
        ZoneRegistration.from_json({**_REG, **change})
    assert err.value.message.startswith(words)


@pytest.mark.parametrize("body, words", [
    (None, "zone: expected an object, got null"),
    ([], "zone: expected an object, got list"),
    ({}, "zone: missing fields: uuid, name, ssh_host, ssh_port, http_url, host_key, capacity"),
    ({k: v for k, v in _REG.items() if k != "capacity"}, "zone: missing fields: capacity"),
])
def test_registrations_that_are_not_one_are_refused(body: Any, words: str) -> None:
    with pytest.raises(InvalidDocument) as err:
        ZoneRegistration.from_json(body)
    assert err.value.message == words


def test_malformed_elsewhere_is_refused() -> None:
    bodies: list[Any] = [[], {"s1": []}, {"s1": {"root": "x"}}, {"-s": {"root": "1"}},
                         {"s1": {"a/b": "1"}}]
    for body in bodies:
        with pytest.raises(InvalidDocument):
            elsewhere_from_json(body)
