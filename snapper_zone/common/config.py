"""The one config loader: snapperd's configuration (schema, parsing, validation),
and the reading and field checks the coordinator's and the CN's files use too.

A file is TOML (stdlib ``tomllib``); a ``.json`` file with the same shape is
accepted too (``read_document``). See ``etc/snapperd.example.toml`` for a
documented example; ``etc/coordinator.example.toml`` and
``etc/snapper-cn.example.toml`` are parsed with the same ``FieldParser``.

Every problem is a :class:`ConfigError` naming the file and the dotted field
(``ssh.port``, ``keys[2].cn_id``, ``vms.<uuid>``), so an operator can fix it
without reading this code. Unknown fields are errors that suggest the field
meant (a misspelt optional field would otherwise silently fall back to its
default). Sizes (``vm_quota_bytes``, ``metadata_max_bytes``, the coordinator's
``moves.bandwidth``) take an integer of bytes or a size string, ``"50GiB"``,
in the grammar of ``progress.parse_size`` (the CLI's ``--capacity``, ``--bwlimit``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import pwd
import re
import tomllib
import types
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast
from urllib.parse import urlsplit

from snapper_zone.common.progress import SizeError, parse_size

if TYPE_CHECKING:
    import asyncssh

# asyncssh is imported where a key is parsed: ``snapper push`` reads its config
# (and hands the push to a running agent) without it, a third of its start.

__all__ = [
    "DEFAULT_LISTEN_HOST",
    "DEFAULT_MAX_CONCURRENT_RECEIVES",
    "DEFAULT_METADATA_MAX_BYTES",
    "FIXED_LIMITS",
    "LIVE_FIELDS",
    "ConfigError",
    "Durability",
    "FieldParser",
    "GateConfig",
    "HTTPConfig",
    "Limits",
    "PeerConfig",
    "Role",
    "SSHConfig",
    "TrustedKey",
    "ZoneConfig",
    "load_config",
    "parse_config",
    "parse_keys",
    "read_document",
    "reloaded",
]

Role = Literal["cn", "peer", "operator"]
Durability = Literal["mirrored", "local"]

ROLES: tuple[Role, ...] = ("cn", "peer", "operator")
DURABILITIES: tuple[Durability, ...] = ("mirrored", "local")

DEFAULT_LISTEN_HOST = "127.0.0.1"
DEFAULT_MAX_CONCURRENT_RECEIVES = 4
DEFAULT_METADATA_MAX_BYTES = 256 * 1024
DEFAULT_RECONCILE_INTERVAL_MS = 30_000
# VMs the replication loop reconciles at once. Each is one copy stream at a
# time (one ssh, about a core's worth at full speed), so a zone with cores and
# bandwidth to spare repairs a lost peer's copies faster with more.
DEFAULT_RECONCILE_CONCURRENCY = 2
DEFAULT_MIRROR_TIMEOUT_SECONDS = 600
# A client that sends nothing for this long while its stream is read is cut
# off: its VM lock and receive slot go to the others.
DEFAULT_STREAM_IDLE_SECONDS = 60
# The coordinator answer cache and other state that outlives a restart (the
# coordinator keeps its own in /var/db/snapper too; file names never collide).
DEFAULT_STATE_DIR = "/var/db/snapper"
# Addresses that mean "every interface": fine to bind, useless to advertise.
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "[::]", "*", ""})

# ZFS's own limit (ZFS_MAX_DATASET_NAME_LEN includes the NUL).
_MAX_DATASET_LEN = 255
_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_DATASET_COMPONENT_RE = re.compile(r"[A-Za-z0-9_.:-]+")
# Zone names and CN ids are opaque labels (a Triton server uuid, a hostname);
# kept to a safe charset because they end up in logs and metric labels.
_IDENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


class ConfigError(Exception):
    """A config file that cannot be used: which file, which field, and why.

    ``field`` is dotted (``ssh.port``, ``keys[0].public_key``), or ``""`` for
    a problem with the file as a whole (unreadable, not TOML).
    """

    def __init__(self, path: str, field: str, message: str) -> None:
        self.path = path
        self.field = field
        self.message = message
        where = f"{path}: {field}" if field else path
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class SSHConfig:
    """Where the SSH endpoint listens, the address others reach it at, its host key."""

    port: int
    host_key: Path
    host: str = DEFAULT_LISTEN_HOST
    # What the coordinator is told (``host`` when unset); never a wildcard.
    advertise_host: str | None = None

    @property
    def advertised(self) -> str:
        return self.advertise_host or self.host


@dataclass(frozen=True)
class HTTPConfig:
    """Where the HTTP API listens, and the address others reach it at."""

    port: int
    host: str = DEFAULT_LISTEN_HOST
    advertise_host: str | None = None

    def advertised_url(self, port: int) -> str:
        """The API's URL as registered with the coordinator (``port``: the bound one)."""
        host = self.advertise_host or self.host
        bare = ":" in host and not host.startswith("[")  # IPv6 needs brackets in a URL
        return f"http://[{host}]:{port}" if bare else f"http://{host}:{port}"


@dataclass(frozen=True)
class GateConfig:
    """The zone's sshd as a second front door for streams (``daemon/gateserver.py``)."""

    socket: Path  # snapperd listens here for snapper-gate
    port: int  # the zone's sshd, as CNs are told to reach it (``features``)
    authorized_keys: Path  # snapperd writes it, sshd reads it (AuthorizedKeysFile)
    uid: int | None = None  # the user sshd runs snapper-gate as; None: snapperd's own
    # Streams estimated smaller go to snapperd's own port: the gate's login (an
    # sshd process, snapper-gate started) costs more than it saves on them.
    min_bytes: int = 64 << 20

    def user(self) -> str | None:
        """The name of the user sshd runs the gate as (clients log in as it)."""
        try:
            return pwd.getpwuid(self.uid if self.uid is not None else os.geteuid()).pw_name
        except KeyError:
            return None


@dataclass(frozen=True)
class Limits:
    """What one client may hold on a zone, so that none can stall or fill it.

    Every count is per zone process; 0 for a quota means none.
    """

    max_connections: int = 256  # SSH connections in all, authenticated or not
    max_connections_per_principal: int = 16
    max_channels_per_connection: int = 8
    max_sends_per_principal: int = 4  # concurrent ``send`` (restore, mirror-out)
    # Of max_concurrent_receives, what one client's pushes may hold at once
    # (None: half of them, rounded up); a peer's mirror-in has slots of its own.
    max_receives_per_principal: int | None = None
    max_concurrent_mirror_receives: int | None = None  # None: max_concurrent_receives
    connection_idle_seconds: float = 300  # no channel running a command for this long
    login_timeout_seconds: float = 30
    keepalive_interval_seconds: float = 30
    keepalive_count_max: int = 4
    vm_quota_bytes: int = 0  # ZFS ``used`` of a VM's copy on this zone
    cn_quota_bytes: int = 0  # the sum over a CN's VMs
    # Memory between a peer zone's stream and ``zfs receive`` (each mirror-in,
    # move or repair through the gate; 0: none): it lets the sender go on while
    # the receive stalls on a transaction group (stream.RingPump: a queue of
    # pipes on Linux, memory elsewhere).
    copy_buffer_bytes: int = 64 << 20


@dataclass(frozen=True)
class RetentionConfig:
    """Where the zone's retention policy is (``policy/spec.py``'s file format: a
    file, or the coordinator's registry copy of that name) and how often the VMs
    pushed to this zone are pruned by it."""

    policy: Path | None
    interval_seconds: int = 600
    policy_from_coordinator: str | None = None


@dataclass(frozen=True)
class TrustedKey:
    """A client key snapperd accepts and the role it grants.

    ``cn_id`` is set exactly when ``role == "cn"``; ``zone`` (the peer zone's
    uuid) exactly when ``role == "peer"``.
    """

    role: Role
    public_key: str  # normalised OpenSSH line: "ssh-ed25519 AAAA... [comment]"
    fingerprint: str  # "SHA256:...", for logs
    # The SSH wire encoding, what a client presents at auth time (SSHKey.public_data).
    key_data: bytes = field(repr=False)
    cn_id: str | None = None
    zone: str | None = None

    def ssh_key(self) -> asyncssh.SSHKey:
        import asyncssh

        return asyncssh.import_public_key(self.public_key)

    @property
    def name(self) -> str:
        """Who this is within its role: the cn_id, the peer zone's uuid, or an
        operator's key comment ("alice@ops"; a label for logs), else its fingerprint."""
        if self.cn_id is not None:
            return self.cn_id
        if self.zone is not None:
            return self.zone
        parts = self.public_key.split(maxsplit=2)
        return parts[2].strip() if len(parts) == 3 and parts[2].strip() else self.fingerprint


@dataclass(frozen=True)
class PeerConfig:
    """Another snapper zone this one mirrors to (static; the coordinator may add more)."""

    uuid: str
    ssh_host: str
    ssh_port: int
    http_url: str


@dataclass(frozen=True)
class ZoneConfig:
    """The whole of snapperd's configuration."""

    uuid: str
    name: str
    root: str  # the delegated dataset; nothing outside it is ever named
    ssh: SSHConfig
    http: HTTPConfig
    keys: tuple[TrustedKey, ...]
    durability: Durability = "mirrored"
    max_concurrent_receives: int = DEFAULT_MAX_CONCURRENT_RECEIVES
    metadata_max_bytes: int = DEFAULT_METADATA_MAX_BYTES
    # vm uuid -> cn_id; read-only. Left out of the hash since a mapping has none.
    vms: Mapping[str, str] = field(default_factory=lambda: types.MappingProxyType({}), hash=False)
    coordinator_url: str | None = None
    # The coordinator's public key (OpenSSH line): it signs its HTTP requests
    # to this zone and the answers this zone relies on (zone list, placement).
    coordinator_key: str | None = None
    peers: tuple[PeerConfig, ...] = ()
    # How often every VM is reconciled with its peer even with nothing new
    # (a peer that was down is noticed within this time).
    reconcile_interval_ms: int = DEFAULT_RECONCILE_INTERVAL_MS
    # How many VMs the loop reconciles at once.
    reconcile_concurrency: int = DEFAULT_RECONCILE_CONCURRENCY
    # How long a ``mirrored`` commit waits for the peer before it fails.
    mirror_timeout_seconds: int = DEFAULT_MIRROR_TIMEOUT_SECONDS
    # A stream (or metadata) that brings no byte for this long is cut off.
    stream_idle_seconds: float = DEFAULT_STREAM_IDLE_SECONDS
    # Forward a CN's stream to the peer while it is received (two copies in
    # the time of one); off: the peer is sent the snapshot after it is in.
    pipelined_mirroring: bool = True
    limits: Limits = field(default_factory=Limits)
    # Where the zone keeps what must outlive a restart beside its pool: the
    # coordinator's last verified answers (placements, trust list).
    state_dir: Path = Path(DEFAULT_STATE_DIR)

    @property
    def answers_path(self) -> Path:
        """The answer cache (``common/answers``); one per zone uuid, so zones may share a dir."""
        return self.state_dir / f"coordinator-answers-{self.uuid}.json"

    @property
    def identity_path(self) -> Path:
        """The last verified copy of the coordinator's identity registry
        (``replication/identity``), its signature with it."""
        return self.state_dir / f"coordinator-identity-{self.uuid}.json"
    retention: RetentionConfig | None = None  # None: snapshots are deleted by hand only
    gate: GateConfig | None = None  # None: streams come through snapperd's SSH server only

    @property
    def receives_per_principal(self) -> int:
        given = self.limits.max_receives_per_principal
        return given if given is not None else max(1, (self.max_concurrent_receives + 1) // 2)

    @property
    def mirror_receives(self) -> int:
        given = self.limits.max_concurrent_mirror_receives
        return given if given is not None else self.max_concurrent_receives

    def key_for(self, key_data: bytes) -> TrustedKey | None:
        """The trusted key whose wire encoding is ``key_data`` (``SSHKey.public_data``)."""
        for k in self.keys:
            if k.key_data == key_data:
                return k
        return None

    def cn_for_vm(self, vm_uuid: str) -> str | None:
        """The CN a VM belongs to per the static map, or None if unmapped."""
        return self.vms.get(vm_uuid.lower())


# What a SIGHUP (SMF ``refresh``) changes in a running snapperd; every other
# field is bound at start-up (listeners, root, uuid, peers, coordinator, receive
# slots) and a change to it is logged and left for a restart.
LIVE_FIELDS = ("keys", "vms", "durability", "mirror_timeout_seconds", "stream_idle_seconds",
               "limits")
# Of ``limits``, these are bound at start-up too (the SSH server's own settings).
FIXED_LIMITS = ("max_connections", "max_connections_per_principal", "login_timeout_seconds",
                "keepalive_interval_seconds", "keepalive_count_max", "max_receives_per_principal",
                "max_concurrent_mirror_receives")


def reloaded(old: ZoneConfig, new: ZoneConfig) -> tuple[ZoneConfig, list[str]]:
    """The config a SIGHUP puts in force: ``new``'s live fields, ``old``'s others;
    and the dotted names of the changes left for a restart."""
    fixed = [f.name for f in dataclasses.fields(new) if f.name not in LIVE_FIELDS
             and getattr(new, f.name) != getattr(old, f.name)]
    fixed += [f"limits.{n}" for n in FIXED_LIMITS
              if getattr(new.limits, n) != getattr(old.limits, n)]
    limits = dataclasses.replace(new.limits, **{n: getattr(old.limits, n)
                                                for n in FIXED_LIMITS})
    live = {n: getattr(new, n) for n in LIVE_FIELDS}
    return dataclasses.replace(old, **{**live, "limits": limits}), fixed


# --------------------------------------------------------------------------
# Loading


def load_config(path: str | Path) -> ZoneConfig:
    """Read and validate a config file (TOML, or JSON when it ends in ``.json``)."""
    return parse_config(read_document(path), str(path))


def read_document(path: str | Path) -> object:
    """A config file decoded (TOML, or JSON when it ends in ``.json``); ConfigError
    naming the file when it cannot be read or decoded."""
    p = Path(path)
    src = str(p)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(src, "", f"cannot read: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(src, "", f"not UTF-8: {e}") from e
    data: object
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConfigError(src, "", f"invalid JSON: {e}") from e
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(src, "", f"invalid TOML: {e}") from e
    return data


def parse_keys(value: object, source: str, roles: Collection[Role] = ROLES
               ) -> tuple[TrustedKey, ...]:
    """A ``[[keys]]`` list as snapperd's config has it (the coordinator's too),
    limited to ``roles``; relative ``public_key_file`` paths against ``source``'s dir."""
    keys = FieldParser(source).keys(value, "")
    for i, k in enumerate(keys):
        if k.role not in roles:
            raise ConfigError(source, f"keys[{i}].role",
                              f"{k.role!r} is not one of: {', '.join(roles)}")
    return keys


def parse_config(data: object, source: str = "<config>") -> ZoneConfig:
    """Validate an already-decoded config document.

    Pure apart from reading the ``.pub`` files that ``keys[].public_key_file``
    names. Relative paths (``ssh.host_key``, ``public_key_file``) are resolved
    against the directory of ``source``, so a config and its keys can move
    together.
    """
    return FieldParser(source).zone(data)


# --------------------------------------------------------------------------
# Validation


_TOP_FIELDS = (
    "retention",
    "uuid",
    "name",
    "root",
    "ssh",
    "http",
    "durability",
    "max_concurrent_receives",
    "metadata_max_bytes",
    "keys",
    "vms",
    "coordinator_url",
    "coordinator_key",
    "peers",
    "reconcile_interval_ms",
    "reconcile_concurrency",
    "mirror_timeout_seconds",
    "stream_idle_seconds",
    "pipelined_mirroring",
    "limits",
    "state_dir",
    "gate",
)
_SSH_FIELDS = ("host", "port", "host_key", "advertise_host")
_HTTP_FIELDS = ("host", "port", "advertise_host")
_LIMIT_FIELDS = (
    "max_connections",
    "max_connections_per_principal",
    "max_channels_per_connection",
    "max_sends_per_principal",
    "max_receives_per_principal",
    "max_concurrent_mirror_receives",
    "connection_idle_seconds",
    "login_timeout_seconds",
    "keepalive_interval_seconds",
    "keepalive_count_max",
    "vm_quota_bytes",
    "cn_quota_bytes",
    "copy_buffer_bytes",
)
_KEY_FIELDS = ("role", "public_key", "public_key_file", "cn_id", "zone")
_PEER_FIELDS = ("uuid", "ssh_host", "ssh_port", "http_url")

_MISSING = object()


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _kind(value: object) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return type(value).__name__


def _is_dataset_name(name: str) -> bool:
    if not name or len(name) > _MAX_DATASET_LEN or name.startswith("/"):
        return False
    # ZFS allows "." and ".." in names, but they read as path tricks; refuse
    # them outright. '@' and '#' (snapshot, bookmark) fall outside the charset.
    if ".." in name:
        return False
    return all(comp != "." and _DATASET_COMPONENT_RE.fullmatch(comp) for comp in name.split("/"))


class FieldParser:
    """Checks for one file's fields, each failing with a ConfigError naming the file
    and the dotted field: snapperd's sections here, and the coordinator's and the
    CN's files (``rebalance/coordinator.py``, ``cn/cli.py``) with the same helpers."""

    def __init__(self, source: str) -> None:
        self.src = source
        self.base_dir = Path(source).parent

    def err(self, fld: str, message: str) -> ConfigError:
        return ConfigError(self.src, fld, message)

    # --- structural helpers

    def table(self, fld: str, value: object, allowed: Collection[str]) -> dict[str, object]:
        if not isinstance(value, dict):
            what = "the document" if not fld else fld
            raise self.err(fld, f"{what} must be a table, not {_kind(value)}")
        for k in value:
            if not isinstance(k, str):
                raise self.err(fld, f"field names must be strings, got {k!r}")
        # Unknown fields first: a typo of a required field ("prot") should be
        # reported as the typo, not as the required field being missing.
        for k in value:
            if k not in allowed:
                hint = difflib.get_close_matches(k, list(allowed), n=1)
                tip = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise self.err(_join(fld, k), f"unknown field{tip}")
        return cast(dict[str, object], value)

    def required(self, tbl: Mapping[str, object], prefix: str, name: str) -> object:
        if name not in tbl:
            raise self.err(_join(prefix, name), "missing required field")
        return tbl[name]

    def string(self, fld: str, value: object) -> str:
        if not isinstance(value, str):
            raise self.err(fld, f"must be a string, not {_kind(value)}")
        if not value.strip():
            raise self.err(fld, "must be a non-empty string")
        return value

    def integer(self, fld: str, value: object, lo: int, hi: int | None = None) -> int:
        # bool is an int in Python; "port = true" is a mistake, not port 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.err(fld, f"must be an integer, not {_kind(value)}")
        if value < lo or (hi is not None and value > hi):
            rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise self.err(fld, f"{value} is out of range ({rng})")
        return value

    def number(self, fld: str, value: object, lo: float, hi: float | None = None) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.err(fld, f"must be a number, not {_kind(value)}")
        if value != value or value < lo or (hi is not None and value > hi):
            rng = f"{lo:g}..{hi:g}" if hi is not None else f">= {lo:g}"
            raise self.err(fld, f"{value} is out of range ({rng})")
        return float(value)

    def boolean(self, fld: str, value: object) -> bool:
        if not isinstance(value, bool):
            raise self.err(fld, f"must be true or false, not {_kind(value)}")
        return value

    def size(self, fld: str, value: object, lo: int = 0, hi: int = 1 << 62) -> int:
        """Bytes: an integer, or a size string (``"50GiB"``, ``"1.5T"``)."""
        if isinstance(value, str):
            try:
                value = parse_size(value)
            except SizeError as e:
                raise self.err(fld, str(e)) from None
        elif isinstance(value, bool) or not isinstance(value, int):
            raise self.err(fld, f"must be a size: an integer of bytes or a string such as "
                           f"\"50GiB\", not {_kind(value)}")
        if value < lo or value > hi:
            raise self.err(fld, f"{value} is out of range ({lo}..{hi} bytes)")
        return value

    def uuid(self, fld: str, value: object) -> str:
        s = self.string(fld, value)
        if not _UUID_RE.fullmatch(s):
            raise self.err(fld, f"{s!r} is not a uuid (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)")
        # Dataset names are built from VM uuids; one spelling avoids two datasets.
        return s.lower()

    def ident(self, fld: str, value: object) -> str:
        s = self.string(fld, value)
        if not _IDENT_RE.fullmatch(s):
            raise self.err(
                fld, f"{s!r} is not a valid id (letters, digits, '_', '.', ':', '-'; max 64)"
            )
        return s

    def host(self, fld: str, value: object) -> str:
        s = self.string(fld, value)
        if any(c.isspace() for c in s) or len(s) > 255:
            raise self.err(fld, f"{s!r} is not a host name or address")
        return s

    def port(self, fld: str, value: object, *, allow_zero: bool) -> int:
        # A listen port of 0 asks the OS for a free one (tests); a peer's can't be 0.
        return self.integer(fld, value, 0 if allow_zero else 1, 65535)

    def path(self, fld: str, value: object) -> Path:
        p = Path(self.string(fld, value))
        return p if p.is_absolute() else self.base_dir / p

    def url(self, fld: str, value: object) -> str:
        s = self.string(fld, value)
        try:
            parts = urlsplit(s)
            has_host = bool(parts.hostname)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as e:
            raise self.err(fld, f"{s!r} is not a valid URL: {e}") from e
        if parts.scheme not in ("http", "https") or not has_host:
            raise self.err(fld, f"{s!r} is not an http(s) URL with a host")
        return s

    # --- sections

    def zone(self, data: object) -> ZoneConfig:
        top = self.table("", data, _TOP_FIELDS)
        zone_uuid = self.uuid("uuid", self.required(top, "", "uuid"))
        name = self.ident("name", self.required(top, "", "name"))

        root = self.string("root", self.required(top, "", "root"))
        if not _is_dataset_name(root):
            raise self.err(
                "root",
                f"{root!r} is not a dataset name (components of [A-Za-z0-9_.:-] "
                "separated by '/'; no leading '/', no '..', no '@' or '#')",
            )

        ssh = self.ssh(self.required(top, "", "ssh"))
        http = self.http(self.required(top, "", "http"))

        durability_raw = top.get("durability", "mirrored")
        durability = self.string("durability", durability_raw)
        if durability not in DURABILITIES:
            raise self.err("durability", f"{durability!r} is not one of: mirrored, local")

        max_recv = self.integer(
            "max_concurrent_receives",
            top.get("max_concurrent_receives", DEFAULT_MAX_CONCURRENT_RECEIVES),
            1,
            1024,
        )
        meta_max = self.size(
            "metadata_max_bytes",
            top.get("metadata_max_bytes", DEFAULT_METADATA_MAX_BYTES),
            1,
        )

        keys = self.keys(self.required(top, "", "keys"), zone_uuid)
        vms = self.vms(top.get("vms", {}), keys)

        coordinator = top.get("coordinator_url", _MISSING)
        coordinator_url = (
            None if coordinator is _MISSING else self.url("coordinator_url", coordinator)
        )
        coordinator_key = None
        if "coordinator_key" in top:
            ck = self._import_key("coordinator_key",
                                  self.string("coordinator_key", top["coordinator_key"]))
            coordinator_key = ck.export_public_key("openssh").decode("ascii").strip()
        peers = self.peers(top.get("peers", []), zone_uuid)
        interval = self.integer("reconcile_interval_ms",
                                top.get("reconcile_interval_ms", DEFAULT_RECONCILE_INTERVAL_MS),
                                100, 86_400_000)
        concurrency = self.integer(
            "reconcile_concurrency",
            top.get("reconcile_concurrency", DEFAULT_RECONCILE_CONCURRENCY), 1, 64)
        mirror_timeout = self.integer(
            "mirror_timeout_seconds",
            top.get("mirror_timeout_seconds", DEFAULT_MIRROR_TIMEOUT_SECONDS), 1, 86_400)
        idle = self.integer("stream_idle_seconds",
                            top.get("stream_idle_seconds", DEFAULT_STREAM_IDLE_SECONDS),
                            1, 86_400)
        pipelined = self.boolean("pipelined_mirroring", top.get("pipelined_mirroring", True))
        limits = self.limits(top.get("limits", {}), max_recv)
        state_dir = self.path("state_dir", top.get("state_dir", DEFAULT_STATE_DIR))
        retention = self.retention(top["retention"]) if "retention" in top else None
        gate = self.gate(top["gate"]) if "gate" in top else None
        if retention is not None and retention.policy_from_coordinator and not coordinator_url:
            raise self.err("retention.policy_from_coordinator", "needs coordinator_url: the "
                           "policy is the coordinator's copy")
        if coordinator_url is not None:
            # Registration tells the coordinator where to reach us: a wildcard
            # would have it (and every peer) health-check itself.
            for sect, cfg in (("ssh", ssh.advertise_host or ssh.host),
                              ("http", http.advertise_host or http.host)):
                if cfg in WILDCARD_HOSTS:
                    raise self.err(f"{sect}.advertise_host",
                                   f"{sect}.host is {cfg!r} (every interface), which cannot "
                                   "be registered with the coordinator: set "
                                   f"{sect}.advertise_host to this zone's admin-network "
                                   "address")

        return ZoneConfig(
            uuid=zone_uuid,
            name=name,
            root=root,
            ssh=ssh,
            http=http,
            keys=keys,
            durability=durability,
            max_concurrent_receives=max_recv,
            metadata_max_bytes=meta_max,
            vms=types.MappingProxyType(vms),
            coordinator_url=coordinator_url,
            coordinator_key=coordinator_key,
            peers=peers,
            reconcile_interval_ms=interval,
            reconcile_concurrency=concurrency,
            mirror_timeout_seconds=mirror_timeout,
            stream_idle_seconds=idle,
            pipelined_mirroring=pipelined,
            limits=limits,
            state_dir=state_dir,
            retention=retention,
            gate=gate,
        )

    def gate(self, value: object) -> GateConfig:
        t = self.table("gate", value, ("socket", "port", "authorized_keys", "uid", "min_bytes"))
        sock = self.path("gate.socket", self.required(t, "gate", "socket"))
        if len(bytes(sock)) > 100:  # sun_path holds 104-108 bytes, by system
            raise self.err("gate.socket", f"{str(sock)!r} is too long for a unix socket")
        port = self.port("gate.port", self.required(t, "gate", "port"), allow_zero=False)
        keys = self.path("gate.authorized_keys", self.required(t, "gate", "authorized_keys"))
        uid = self.integer("gate.uid", t["uid"], 0, 2**31 - 1) if "uid" in t else None
        least = self.size("gate.min_bytes", t.get("min_bytes", GateConfig.min_bytes))
        return GateConfig(sock, port, keys, uid, least)

    def retention(self, value: object) -> RetentionConfig:
        t = self.table("retention", value, ("policy", "policy_from_coordinator",
                                            "interval_seconds"))
        interval = self.integer("retention.interval_seconds",
                                t.get("interval_seconds", 600), 10, 86_400)
        if "policy_from_coordinator" in t:
            if "policy" in t:
                raise self.err("retention.policy", "give policy (a file) or "
                               "policy_from_coordinator (the registry's), not both")
            name = self.string("retention.policy_from_coordinator",
                               t["policy_from_coordinator"])
            return RetentionConfig(None, interval, name)
        policy = self.path("retention.policy", self.required(t, "retention", "policy"))
        return RetentionConfig(policy, interval)

    def limits(self, value: object, max_recv: int) -> Limits:
        t = self.table("limits", value, _LIMIT_FIELDS)
        d = Limits()

        def count(name: str, lo: int = 1, hi: int = 1 << 20) -> int:
            return self.integer(f"limits.{name}", t.get(name, getattr(d, name)), lo, hi)

        def seconds(name: str) -> float:
            v = t.get(name, getattr(d, name))
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise self.err(f"limits.{name}", f"must be a number, not {_kind(v)}")
            if not 0.1 <= v <= 86_400:
                raise self.err(f"limits.{name}", f"{v} is out of range (0.1..86400 seconds)")
            return float(v)

        per: int | None = None
        if "max_receives_per_principal" in t:
            per = self.integer("limits.max_receives_per_principal",
                               t["max_receives_per_principal"], 1, max_recv)
        mirror: int | None = None
        if "max_concurrent_mirror_receives" in t:
            mirror = self.integer("limits.max_concurrent_mirror_receives",
                                  t["max_concurrent_mirror_receives"], 1, 1024)
        return Limits(
            max_connections=count("max_connections"),
            max_connections_per_principal=count("max_connections_per_principal"),
            max_channels_per_connection=count("max_channels_per_connection", 1, 1024),
            max_sends_per_principal=count("max_sends_per_principal", 1, 1024),
            max_receives_per_principal=per,
            max_concurrent_mirror_receives=mirror,
            connection_idle_seconds=seconds("connection_idle_seconds"),
            login_timeout_seconds=seconds("login_timeout_seconds"),
            keepalive_interval_seconds=seconds("keepalive_interval_seconds"),
            keepalive_count_max=count("keepalive_count_max", 1, 1000),
            vm_quota_bytes=self.size("limits.vm_quota_bytes",
                                     t.get("vm_quota_bytes", d.vm_quota_bytes)),
            cn_quota_bytes=self.size("limits.cn_quota_bytes",
                                     t.get("cn_quota_bytes", d.cn_quota_bytes)),
            copy_buffer_bytes=self.size("limits.copy_buffer_bytes",
                                        t.get("copy_buffer_bytes", d.copy_buffer_bytes),
                                        0, 1 << 30),
        )

    def advertise(self, fld: str, value: object) -> str | None:
        if value is _MISSING:
            return None
        s = self.host(fld, value)
        if s in WILDCARD_HOSTS:
            raise self.err(fld, f"{s!r} means every interface; advertise the address "
                           "other zones and the coordinator reach this zone at")
        return s

    def ssh(self, value: object) -> SSHConfig:
        t = self.table("ssh", value, _SSH_FIELDS)
        return SSHConfig(
            host=self.host("ssh.host", t.get("host", DEFAULT_LISTEN_HOST)),
            port=self.port("ssh.port", self.required(t, "ssh", "port"), allow_zero=True),
            host_key=self.path("ssh.host_key", self.required(t, "ssh", "host_key")),
            advertise_host=self.advertise("ssh.advertise_host",
                                          t.get("advertise_host", _MISSING)),
        )

    def http(self, value: object) -> HTTPConfig:
        t = self.table("http", value, _HTTP_FIELDS)
        return HTTPConfig(
            host=self.host("http.host", t.get("host", DEFAULT_LISTEN_HOST)),
            port=self.port("http.port", self.required(t, "http", "port"), allow_zero=True),
            advertise_host=self.advertise("http.advertise_host",
                                          t.get("advertise_host", _MISSING)),
        )

    def keys(self, value: object, own_uuid: str) -> tuple[TrustedKey, ...]:
        if not isinstance(value, list):
            raise self.err("keys", f"must be a list of tables ([[keys]]), not {_kind(value)}")
        out: list[TrustedKey] = []
        seen: dict[bytes, int] = {}
        for i, item in enumerate(value):
            prefix = f"keys[{i}]"
            key, fld = self.key(prefix, item, own_uuid)
            if key.key_data in seen:
                j = seen[key.key_data]
                raise self.err(fld, f"duplicate key: same key as keys[{j}] ({key.fingerprint})")
            seen[key.key_data] = i
            out.append(key)
        return tuple(out)

    def key(self, prefix: str, value: object, own_uuid: str) -> tuple[TrustedKey, str]:
        """One [[keys]] entry, and the dotted field its key material came from."""
        t = self.table(prefix, value, _KEY_FIELDS)
        role_s = self.string(_join(prefix, "role"), self.required(t, prefix, "role"))
        if role_s not in ROLES:
            raise self.err(_join(prefix, "role"), f"{role_s!r} is not one of: cn, peer, operator")
        role = role_s

        has_line, has_file = "public_key" in t, "public_key_file" in t
        if has_line == has_file:
            fld = _join(prefix, "public_key")
            raise self.err(fld, "give exactly one of public_key, public_key_file")
        if has_line:
            fld = _join(prefix, "public_key")
            text = self.string(fld, t["public_key"])
        else:
            fld = _join(prefix, "public_key_file")
            path = self.path(fld, t["public_key_file"])
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise self.err(fld, f"cannot read {str(path)!r}: {e}") from e
        ssh_key = self._import_key(fld, text)

        cn_id = zone = None
        cn_fld, zone_fld = _join(prefix, "cn_id"), _join(prefix, "zone")
        if role == "cn":
            cn_id = self.ident(cn_fld, self.required(t, prefix, "cn_id"))
        elif "cn_id" in t:
            raise self.err(cn_fld, f"only a key with role 'cn' has a cn_id (role is {role!r})")
        if role == "peer":
            zone = self.uuid(zone_fld, self.required(t, prefix, "zone"))
            if zone == own_uuid:
                raise self.err(zone_fld, "a peer key cannot name this zone's own uuid")
        elif "zone" in t:
            raise self.err(zone_fld, f"only a key with role 'peer' has a zone (role is {role!r})")

        trusted = TrustedKey(
            role=role,
            public_key=ssh_key.export_public_key("openssh").decode("ascii").strip(),
            fingerprint=ssh_key.get_fingerprint(),
            key_data=ssh_key.public_data,
            cn_id=cn_id,
            zone=zone,
        )
        return trusted, fld

    def _import_key(self, fld: str, text: str) -> asyncssh.SSHKey:
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        if len(lines) != 1:
            raise self.err(fld, "must hold exactly one OpenSSH public key line")
        import asyncssh

        try:
            return asyncssh.import_public_key(lines[0].strip())
        except Exception as e:  # asyncssh raises several types on junk; all mean "bad key"
            raise self.err(fld, f"not a usable OpenSSH public key: {e}") from e

    def vms(self, value: object, keys: tuple[TrustedKey, ...]) -> dict[str, str]:
        if not isinstance(value, dict):
            raise self.err("vms", f"must be a table of vm_uuid = cn_id, not {_kind(value)}")
        known_cns = {k.cn_id for k in keys if k.cn_id is not None}
        out: dict[str, str] = {}
        for raw_vm, raw_cn in value.items():
            fld = f"vms.{raw_vm}"
            vm = self.uuid(fld, raw_vm)
            cn = self.ident(fld, raw_cn)
            if vm in out:
                raise self.err(fld, "duplicate VM (uuids are compared case-insensitively)")
            # A VM mapped to a CN nobody holds a key for could never be pushed.
            if cn not in known_cns:
                raise self.err(fld, f"cn_id {cn!r} has no key with role 'cn'")
            out[vm] = cn
        return out

    def peers(self, value: object, own_uuid: str) -> tuple[PeerConfig, ...]:
        if not isinstance(value, list):
            raise self.err("peers", f"must be a list of tables ([[peers]]), not {_kind(value)}")
        out: list[PeerConfig] = []
        seen: set[str] = set()
        for i, item in enumerate(value):
            prefix = f"peers[{i}]"
            t = self.table(prefix, item, _PEER_FIELDS)
            uuid_fld = _join(prefix, "uuid")
            peer_uuid = self.uuid(uuid_fld, self.required(t, prefix, "uuid"))
            if peer_uuid == own_uuid:
                raise self.err(uuid_fld, "a zone is not its own peer")
            if peer_uuid in seen:
                raise self.err(uuid_fld, f"duplicate peer {peer_uuid}")
            seen.add(peer_uuid)
            out.append(
                PeerConfig(
                    uuid=peer_uuid,
                    ssh_host=self.host(
                        _join(prefix, "ssh_host"), self.required(t, prefix, "ssh_host")
                    ),
                    ssh_port=self.port(
                        _join(prefix, "ssh_port"),
                        self.required(t, prefix, "ssh_port"),
                        allow_zero=False,
                    ),
                    http_url=self.url(
                        _join(prefix, "http_url"), self.required(t, prefix, "http_url")
                    ),
                )
            )
        return tuple(out)
