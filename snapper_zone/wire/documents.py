"""The documents zones, CNs, replication and the coordinator exchange, typed.

One codec per type: ``to_json`` gives plain JSON-able data, ``from_json``
checks every field's type and range and raises :class:`InvalidDocument`
(one error, with the path of the bad field) on anything else. Unknown keys
are ignored, so a newer writer may add fields; a zone registration is the one
exception (see :class:`ZoneRegistration`).

Guids: an ``int`` in Python (0 .. 2**64-1), a decimal string on the wire
(JavaScript clients cannot hold 64-bit integers as numbers). Readers also take
the older forms: a JSON integer, and tombstones as ``{hex guid: unix time}``.
Tombstones are written as ``[{"guid": "<decimal>", "deleted": <unix time>}]``:
a list, so a reader can never mistake the new decimal guids for the old hex.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import urlsplit

from snapper_zone.errors import InvalidName, SnapperError
from snapper_zone.zfs.names import check_component, check_uuid

GUID_MAX = 2**64 - 1
INT_MAX = 2**63 - 1  # sizes, txgs, times: ZFS's own are far below
MAX_TEXT = 1024  # a source, an in-use name, a host key line: short
MAX_ITEMS = 100_000  # snapshots, parts, tombstones in one document
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,19}")
_HEX = re.compile(r"[0-9a-f]{1,16}")
_TOKEN = re.compile(r"[0-9A-Za-z-]{8,65536}")  # as snapper_zone.zfs.zfs checks resume tokens


class InvalidDocument(SnapperError, ValueError):
    """A wire document is not the shape its writer must produce."""

    code = "InvalidDocument"
    http_status = 400


def _fail(where: str, message: str) -> NoReturn:
    raise InvalidDocument(f"{where}: {message}")


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


# -- field readers ------------------------------------------------------------------


def _obj(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        _fail(where, f"expected an object, got {_kind(value)}")
    if len(value) > MAX_ITEMS:
        _fail(where, f"more than {MAX_ITEMS} entries")
    return value


def _list(value: object, where: str) -> list[Any]:
    if not isinstance(value, list):
        _fail(where, f"expected a list, got {_kind(value)}")
    if len(value) > MAX_ITEMS:
        _fail(where, f"more than {MAX_ITEMS} entries")
    return value


def _field(doc: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in doc:
        _fail(where, f"missing field {key!r}")
    return doc[key]


def _int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(where, f"expected an integer, got {_kind(value)}")
    if not 0 <= value <= INT_MAX:
        _fail(where, f"{value} is out of range (0 .. 2**63-1)")
    return value


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        _fail(where, f"expected true or false, got {_kind(value)}")
    return value


def _text(value: object, where: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str) or not value:
        _fail(where, f"expected a non-empty string, got {_kind(value) if value != '' else 'empty'}")
    if len(value) > limit:
        _fail(where, f"longer than {limit} characters")
    return value


def _checked(check: Any, value: object, where: str) -> str:
    try:
        out: str = check(value)
    except InvalidName as exc:
        _fail(where, exc.message)
    return out


def _label(value: object, where: str) -> str:
    return _checked(lambda v: check_component(v, "dataset label"), value, where)


# -- guids --------------------------------------------------------------------------


def guid_to_json(guid: int) -> str:
    """A guid as every writer puts it on the wire: a decimal string."""
    return str(guid)


def guid_from_json(value: object, where: str = "guid") -> int:
    """A guid from the wire: a decimal string (or, from older writers, a JSON integer)."""
    if isinstance(value, str) and _DECIMAL.fullmatch(value):
        guid = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        guid = value
    else:
        _fail(where, f"expected a guid as a decimal string, got {value!r:.40}")
    if not 0 <= guid <= GUID_MAX:
        _fail(where, f"guid {guid} is out of range (0 .. 2**64-1)")
    return guid


# -- tombstones: guid -> unix time deleted ----------------------------------------------


def tombstones_to_json(stones: Mapping[int, int]) -> list[dict[str, Any]]:
    return [{"guid": guid_to_json(g), "deleted": t} for g, t in sorted(stones.items())]


def tombstones_from_json(value: object, where: str = "tombstones") -> dict[int, int]:
    """``[{"guid", "deleted"}]``, or the older ``{hex guid: unix time}``."""
    out: dict[int, int] = {}
    if isinstance(value, Mapping):  # the older form
        for key, when in _obj(value, where).items():
            if not isinstance(key, str) or not _HEX.fullmatch(key):
                _fail(where, f"expected a hex guid as key, got {key!r:.40}")
            out[int(key, 16)] = _int(when, f"{where}.{key}")
        return out
    for i, item in enumerate(_list(value, where)):
        at = f"{where}[{i}]"
        stone = _obj(item, at)
        guid = guid_from_json(_field(stone, "guid", at), f"{at}.guid")
        if guid in out:
            _fail(at, f"guid {guid} listed twice")
        out[guid] = _int(_field(stone, "deleted", at), f"{at}.deleted")
    return out


# -- "elsewhere": snapshot -> dataset label -> guid (DELETE /v1/vms/{uuid}) ---------------


def elsewhere_to_json(held: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, str]]:
    return {name: {ds: guid_to_json(g) for ds, g in sorted(parts.items())}
            for name, parts in sorted(held.items())}


def elsewhere_from_json(value: object, where: str = "elsewhere") -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for name, parts in _obj(value, where).items():
        at = f"{where}.{name}"
        _checked(lambda v: check_component(v, "snapshot name"), name, at)
        out[name] = {_label(ds, f"{at}.{ds}"): guid_from_json(g, f"{at}.{ds}")
                     for ds, g in _obj(parts, at).items()}
    return out


# -- the snapshots answer -------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One VM dataset's snapshot as a zone lists it (``datasets.<label>``)."""

    dataset: str
    guid: int
    createtxg: int
    used: int
    referenced: int

    def to_json(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "guid": guid_to_json(self.guid),
                "createtxg": self.createtxg, "used": self.used, "referenced": self.referenced}

    @classmethod
    def from_json(cls, value: object, label: str, where: str = "part") -> Part:
        doc = _obj(value, where)
        dataset = _label(doc.get("dataset", label), f"{where}.dataset")
        if dataset != label:
            _fail(f"{where}.dataset", f"{dataset!r} is listed under {label!r}")
        return cls(dataset, guid_from_json(_field(doc, "guid", where), f"{where}.guid"),
                   *(_int(_field(doc, k, where), f"{where}.{k}")
                     for k in ("createtxg", "used", "referenced")))


@dataclass(frozen=True)
class VmSnapshot:
    """One VM snapshot as a zone lists it: its parts, and whether it is complete."""

    vm: str
    name: str
    complete: bool
    created: int  # unix seconds
    parts: Mapping[str, Part]  # dataset label -> part
    source: str | None = None  # who pushed it: "cn:<id>" or "zone:<uuid>"

    @property
    def size(self) -> int:
        return sum(p.used for p in self.parts.values())

    @property
    def guids(self) -> dict[str, int]:
        return {label: p.guid for label, p in self.parts.items()}

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "name": self.name, "complete": self.complete,
                "created": self.created, "size": self.size, "source": self.source,
                "datasets": {k: v.to_json() for k, v in sorted(self.parts.items())}}

    @classmethod
    def from_json(cls, value: object, where: str = "snapshot") -> VmSnapshot:
        doc = _obj(value, where)
        vm = _checked(lambda v: check_uuid(v, "VM uuid"), _field(doc, "vm", where),
                      f"{where}.vm")
        name = _checked(lambda v: check_component(v, "snapshot name"),
                        _field(doc, "name", where), f"{where}.name")
        at = f"{where}({name})"
        source = doc.get("source")
        if "size" in doc:
            _int(doc["size"], f"{at}.size")  # derived from the parts; checked, not kept
        return cls(vm, name, _bool(_field(doc, "complete", at), f"{at}.complete"),
                   _int(_field(doc, "created", at), f"{at}.created"),
                   {_label(k, f"{at}.datasets"): Part.from_json(v, k, f"{at}.datasets.{k}")
                    for k, v in _obj(_field(doc, "datasets", at), f"{at}.datasets").items()},
                   None if source is None else _text(source, f"{at}.source"))


def snapshot_list_from_json(value: object, where: str = "snapshots") -> list[VmSnapshot]:
    """A bare list of VM snapshots (``GET /v1/vms/{uuid}/snapshots``), oldest first."""
    return [VmSnapshot.from_json(s, f"{where}[{i}]") for i, s in enumerate(_list(value, where))]


@dataclass(frozen=True)
class Inventory:
    """A zone's answer to ``snapshots VM``: what it holds of one VM.

    ``datasets``: each VM dataset's resume token (None: no partial receive);
    ``tombstones``: part guid -> unix time deleted on purpose; ``in_use``: the
    snapshot names a transfer or a push between parts holds right now.
    """

    vm: str
    snapshots: tuple[VmSnapshot, ...]
    datasets: Mapping[str, str | None] = field(default_factory=dict)
    tombstones: Mapping[int, int] = field(default_factory=dict)
    in_use: frozenset[str] = frozenset()

    def snapshot(self, name: str) -> VmSnapshot | None:
        return next((s for s in self.snapshots if s.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "snapshots": [s.to_json() for s in self.snapshots],
                "datasets": {k: {"resume_token": v} for k, v in sorted(self.datasets.items())},
                "tombstones": tombstones_to_json(self.tombstones),
                "in_use": sorted(self.in_use)}

    @classmethod
    def from_json(cls, value: object, vm: str | None = None,
                  where: str = "inventory") -> Inventory:
        """``vm``: the VM asked about; the answer must be about it. An older zone
        answered with the snapshot list alone: taken when ``vm`` is given."""
        if isinstance(value, list) and vm is not None:
            value = {"vm": vm, "snapshots": value}
        doc = _obj(value, where)
        got = _checked(lambda v: check_uuid(v, "VM uuid"), _field(doc, "vm", where),
                       f"{where}.vm")
        if vm is not None and got != vm:
            _fail(f"{where}.vm", f"asked about VM {vm}, got an answer about {got}")
        snaps = tuple(snapshot_list_from_json(_field(doc, "snapshots", where),
                                              f"{where}.snapshots"))
        if stray := [s.name for s in snaps if s.vm != got]:
            _fail(f"{where}.snapshots", f"snapshots of another VM: {', '.join(stray)}")
        datasets: dict[str, str | None] = {}
        for label, state in _obj(doc.get("datasets") or {}, f"{where}.datasets").items():
            at = f"{where}.datasets.{label}"
            token = _obj(state, at).get("resume_token")
            if token is not None and (not isinstance(token, str) or not _TOKEN.fullmatch(token)):
                _fail(f"{at}.resume_token", f"not a resume token: {token!r:.40}")
            datasets[_label(label, at)] = token
        in_use = frozenset(_text(x, f"{where}.in_use[{i}]")
                           for i, x in enumerate(_list(doc.get("in_use") or [],
                                                       f"{where}.in_use")))
        return cls(got, snaps, datasets,
                   tombstones_from_json(doc.get("tombstones") or [], f"{where}.tombstones"),
                   in_use)


# -- zones: what a zone tells the coordinator, and the coordinator lists -----------------

MAX_HOST_KEY = 16384  # one OpenSSH public key line; a 16384-bit RSA key is about 2800
_ZONE_FIELDS = ("uuid", "name", "ssh_host", "ssh_port", "http_url", "host_key", "capacity")


def _line(value: object, where: str, limit: int = MAX_TEXT) -> str:
    """Non-empty text on one line, surrounding blanks dropped."""
    text = _text(value, where, limit).strip()
    if not text:
        _fail(where, "expected a non-empty string, got blanks")
    if "\n" in text or "\r" in text:
        _fail(where, "expected one line")
    return text


def _http_url(value: object, where: str) -> str:
    """``http(s)://HOST[:PORT]``, without the trailing slash."""
    url = _line(value, where).rstrip("/")
    try:
        parts = urlsplit(url)
        ok = (parts.scheme in ("http", "https") and bool(parts.hostname)
              and not (parts.path or parts.query or parts.fragment)
              and (parts.port is None or parts.port > 0))
    except ValueError:  # a port that is not a number, or out of range
        ok = False
    if not ok:
        _fail(where, f"expected http(s)://HOST[:PORT], got {url!r:.60}")
    return url


def _zone_fields(doc: Mapping[str, Any], where: str) -> tuple[str, str, str, int, str, str, int]:
    """The registration's fields, in ``_ZONE_FIELDS`` order, each checked."""
    uuid = _checked(lambda v: check_uuid(v, "zone uuid"), _field(doc, "uuid", where),
                    f"{where}.uuid")
    at = f"{where}({uuid})"
    port = _int(_field(doc, "ssh_port", at), f"{at}.ssh_port")
    if not 0 < port < 65536:
        _fail(f"{at}.ssh_port", f"{port} is not a port (1-65535)")
    return (uuid, _line(_field(doc, "name", at), f"{at}.name"),
            _line(_field(doc, "ssh_host", at), f"{at}.ssh_host"), port,
            _http_url(_field(doc, "http_url", at), f"{at}.http_url"),
            _line(_field(doc, "host_key", at), f"{at}.host_key", MAX_HOST_KEY),
            _int(_field(doc, "capacity", at), f"{at}.capacity"))


@dataclass(frozen=True)
class ZoneRegistration:
    """A zone as it registers itself, or an operator adds it: ``POST /v1/zones``.

    Stricter than the other documents: every field is required and an unknown
    one is refused. The coordinator records a registration whole, so a field
    it would drop is a writer's mistake, not a newer writer. ``host_key`` is
    checked for shape only; the coordinator parses the key itself.
    """

    uuid: str
    name: str
    ssh_host: str
    ssh_port: int  # 1-65535
    http_url: str  # http(s)://HOST[:PORT], no trailing slash
    host_key: str  # one OpenSSH public key line
    capacity: int  # bytes

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _ZONE_FIELDS}

    @classmethod
    def from_json(cls, value: object, where: str = "zone") -> ZoneRegistration:
        doc = _obj(value, where)
        if missing := [k for k in _ZONE_FIELDS if k not in doc]:
            _fail(where, f"missing fields: {', '.join(missing)}")
        if extra := sorted(str(k) for k in doc if k not in _ZONE_FIELDS):
            _fail(where, f"unknown fields: {', '.join(extra)}")
        return cls(*_zone_fields(doc, where))


@dataclass(frozen=True)
class ZoneEndpoint(ZoneRegistration):
    """A zone as ``GET /v1/zones`` lists it: its registration, the state the
    coordinator set, and whether an operator admitted it. The listing's other
    fields (used, free, health...) are ignored."""

    state: str = "active"  # pending, active, draining or lost
    # Only an admitted zone's key is trusted; a listing that does not say so
    # (an older coordinator) is not taken as admission.
    admitted: bool = False

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "state": self.state, "admitted": self.admitted}

    @classmethod
    def from_json(cls, value: object, where: str = "zone") -> ZoneEndpoint:
        doc = _obj(value, where)
        fields = _zone_fields(doc, where)
        state = doc.get("state", "active")
        if state not in ("pending", "active", "draining", "lost"):
            _fail(f"{where}({fields[0]}).state",
                  f"expected pending, active, draining or lost, got {state!r:.40}")
        admitted = doc.get("admitted", False)
        if not isinstance(admitted, bool):
            _fail(f"{where}({fields[0]}).admitted", "must be true or false")
        return cls(*fields, state, admitted and state != "pending")


# -- identity: CNs, VM owners, restore grants (``GET /v1/identity``) ------------------

# As a config's cn_id (a Triton server uuid, a hostname): it ends up in logs and labels.
_CN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
MAX_VMS = 1_000_000  # a datacenter's VMs, in one identity document


def check_cn_id(value: object, where: str = "cn") -> str:
    """A CN id (letters, digits, ``_ . : -``, at most 64), or InvalidDocument."""
    if not isinstance(value, str) or not _CN_ID.fullmatch(value):
        _fail(where, f"{value!r:.80} is not a CN id (letters, digits, '_', '.', ':', '-'; "
              "at most 64, starting with a letter or digit)")
    return value


def _time(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        _fail(where, f"expected a time (seconds since the epoch), got {_kind(value)}")
    if not 0 <= value < 2**40:
        _fail(where, f"{value} is out of range")
    return float(value)


@dataclass(frozen=True)
class CnIdentity:
    """A compute node and the OpenSSH public key lines it signs with."""

    id: str
    keys: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "keys": list(self.keys)}


@dataclass(frozen=True)
class RestoreGrant:
    """CN ``cn`` may restore VM ``vm`` (not its own) until ``expires``."""

    vm: str
    cn: str
    expires: float
    granted_by: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "cn": self.cn, "expires": self.expires,
                "granted_by": self.granted_by}


@dataclass(frozen=True)
class IdentityDocument:
    """Who is who, as the coordinator's registry says at ``version``: CNs and their
    keys, each VM's owning CN, and the restore grants in force. Zones follow it
    (``replication/identity.py``); ``version`` only grows."""

    version: int
    cns: tuple[CnIdentity, ...] = ()
    vms: Mapping[str, str] = field(default_factory=dict)  # vm uuid -> cn id
    grants: tuple[RestoreGrant, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "cns": [c.to_json() for c in self.cns],
                "vms": dict(self.vms), "grants": [g.to_json() for g in self.grants]}

    def granted(self, vm: str, cn: str, now: float) -> bool:
        """Whether a grant lets CN ``cn`` restore ``vm`` at ``now``."""
        return any(g.vm == vm and g.cn == cn and g.expires > now for g in self.grants)

    @classmethod
    def from_json(cls, value: object, where: str = "identity") -> IdentityDocument:
        if not isinstance(value, Mapping):
            _fail(where, f"expected an object, got {_kind(value)}")
        version = _int(_field(value, "version", where), f"{where}.version")
        cns = []
        for i, c in enumerate(_list(value.get("cns", []), f"{where}.cns")):
            at = f"{where}.cns[{i}]"
            doc = _obj(c, at)
            cn = check_cn_id(_field(doc, "id", at), f"{at}.id")
            keys = tuple(_line(k, f"{at}.keys[{j}]", MAX_HOST_KEY)
                         for j, k in enumerate(_list(_field(doc, "keys", at), f"{at}.keys")))
            cns.append(CnIdentity(cn, keys))
        raw = value.get("vms", {})
        if not isinstance(raw, Mapping) or len(raw) > MAX_VMS:
            _fail(f"{where}.vms", f"expected an object of at most {MAX_VMS} VMs")
        vms = {_checked(lambda v: check_uuid(v, "VM uuid"), vm, f"{where}.vms"):
               check_cn_id(cn, f"{where}.vms.{vm}") for vm, cn in raw.items()}
        grants = []
        for i, g in enumerate(_list(value.get("grants", []), f"{where}.grants")):
            at = f"{where}.grants[{i}]"
            doc = _obj(g, at)
            grants.append(RestoreGrant(
                _checked(lambda v: check_uuid(v, "VM uuid"), _field(doc, "vm", at), f"{at}.vm"),
                check_cn_id(_field(doc, "cn", at), f"{at}.cn"),
                _time(_field(doc, "expires", at), f"{at}.expires"),
                str(doc.get("granted_by", ""))[:MAX_TEXT]))
        return cls(version, tuple(cns), vms, tuple(grants))
