"""``snapper-coordinator --config FILE``: zone registry, placement, moves (HTTP API).

Routes (JSON; errors are ``{"code", "message"}`` with a matching status, as
snapperd's), with the roles that may call each (``ROUTES``, the one table)::

    GET    /ping                      open: {"ping": "pong", "version", "role"}
                                      (common/version.py; role: leader or follower)
    POST   /v1/zones                  the zone itself (signed by the very host key the
                                      body registers: proof of possession), operator:
                                      register/update, idempotent by uuid: body {uuid,
                                      name, ssh_host, ssh_port, http_url, host_key,
                                      capacity} -> 201 (new: state "pending") or 200, the
                                      zone; 409 HostKeyMismatch: another key than the
                                      pinned one
    GET    /v1/zones[?admitted=true]  zone, operator: {"zones": [zone], "next"} (admitted=true:
                                      the trust list; by uuid, paged: see below)
    GET    /v1/zones/{uuid}           zone, operator: zone (a pending zone: its own only)
    PUT    /v1/zones/{uuid}/state     operator: {"state": "active"|"draining"|"lost"} -> zone
                                      ("active" on a pending zone admits it)
    PUT    /v1/zones/{uuid}/host-key  operator: {"host_key": "ssh-ed25519 AAAA..."} -> zone
                                      (a key rotation)
    DELETE /v1/zones/{uuid}           operator: 204; 409 ZoneNotEmpty while it holds a copy
    GET    /v1/placement/{vm}[?create=false]
                                      cn, zone, operator: {"vm", "zones": [primary, mirror],
                                       "endpoints": [{uuid, ssh_host, ssh_port, http_url,
                                                      host_key}, ...],
                                       "scope": [zone uuids whose peers may act on it]};
                                       create=false: 404 for a VM not placed (else it is)
    GET    /v1/moves[?state=S]        operator: {"moves": [move], "next"} by id, oldest
                                      first, paged; finished moves are pruned after
                                      [moves] keep_days, beyond the newest keep_finished
    POST   /v1/rebalance?dry_run=B    operator: {"dry_run", "moves", "moved_bytes",
                                       "projected", "warnings", "degraded", "stale_copies"};
                                       not a dry run: the leader only (503 NotLeader)
    GET    /v1/status                 operator: fleet summary (``snapper status``) with
                                      "coordinator": {id, url, role}, "leader": {id, url},
                                      "candidates": [{id, url}, ...]
    GET    /v1/identity[?since=N]     zone, operator: the registry (CNs and their keys, VM
                                      owners, grants in force) as an IdentityDocument;
                                      {"version": N, "unchanged": true} while it is at N
    GET    /v1/cns                    operator: {"cns": [{id, keys, added, vms}]}
    POST   /v1/cns/{cn}/keys          operator: {"keys": [OpenSSH lines]} -> the CN (created
                                      if new); 409 KeyInUse: another CN's (or the config's)
    DELETE /v1/cns/{cn}[?key=FP]      operator: 204; the CN (with its grants), or one key
    PUT    /v1/vms/{vm}/owner         operator: {"cn": ID} -> {"vm", "cn"}
    POST   /v1/vms/owners             operator: {"vms": [{"uuid", "server_uuid"}, ...]} (a
                                      VMAPI listing, 5000 at most) -> {"assigned",
                                      "unchanged", "skipped": {cn: n}, "invalid": n}
    POST   /v1/grants                 operator: {"vm", "cn", "seconds"} -> the grant
    GET    /v1/grants                 operator: {"grants": [grant in force]}
    GET    /v1/policies               cn, zone, operator: {"policies": [{name, version,
                                      updated, updated_by}]} by name
    GET    /v1/policies/{name}        cn, zone, operator: {name, document, version, updated,
                                      updated_by}; 404 PolicyNotFound
    PUT    /v1/policies/{name}        operator: body the policy file's document as JSON
                                      (``snapper_zone/policy/spec.py``) -> the record
                                      (version + 1); 422 InvalidPolicy naming the field
    DELETE /v1/policies/{name}        operator: 204; 404 PolicyNotFound
    GET    /metrics                   open: Prometheus text

List routes are paged: ``?limit=N`` (1..1000, default 1000) and ``?marker=M``
(the ``next`` of the previous page: the last uuid or move id it held; the page
starts after it). ``next`` is null on the last page. A bad limit or marker is
422 ``InvalidArgument``.

Requests are HTTP Signatures (``common/httpsig``) by a key the coordinator
knows: its config's ``[[keys]]`` (operator and cn keys, snapperd's shape) or a
registered zone's host key; 401 ``Unauthorized`` / 403 ``NotAuthorized`` /
415 ``UnsupportedMediaType`` as snapperd. A pending zone's key has the role
``pending-zone``: it may register again and read its own record, nothing
else. Every answer to a signed request carries
``x-snapper-response-signature`` by the coordinator's own ``key``
(generated at first start if missing), which zones check against their
``coordinator_key``.

A zone is ``{uuid, name, ssh_host, ssh_port, http_url, host_key, capacity,
used, free, state, admitted, health, vms, last_seen, suspect_since}``.

Admission: a zone registering for the first time is ``pending`` (never
placed on, never a move target, never contacted, not health-checked, in no
zone's trust list) until an operator activates it; its host key is pinned
then and changes only by ``PUT .../host-key``. A VM's ``scope`` is its
placement plus every zone of a move in flight for it: zones outside it may
not act on the VM as each other's peers (``snapper_zone/daemon/auth.py``).

Several coordinators may share one ZooKeeper store: they elect a leader
(``Store.election``), which alone runs the mover, the health checks and
automatic planning, each term through a store view fenced to that term
(``Store.fenced``). Every coordinator answers reads and the writes that are one
store transaction (registration, zone state, host key, removal, placement of
a new VM); planning and moving (``POST /v1/rebalance``) is the leader's.

Exit status as snapperd's: 0 after SIGTERM/SIGINT, 2 for a bad config or
arguments, 1 otherwise.  Logs are bunyan JSON lines on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import socket
import sys
import time
import uuid as _uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
from aiohttp import web

from rebalance.health import HealthChecker, HealthSettings
from rebalance.metrics import CONTENT_TYPE_LATEST, CoordinatorMetrics
from rebalance.mover import Mover, MoverSettings
from rebalance.placement import VmInfo, ZoneInfo, ZoneState, hrw_ranking, plan
from rebalance.store import (
    Candidate,
    CnNotFound,
    GrantRecord,
    HostKeyMismatch,
    KeyInUse,
    MoveRecord,
    MoveState,
    MoveStep,
    NotLeader,
    PlacementConflict,
    PolicyNotFound,
    Registry,
    Store,
    StoreUnavailable,
    ZkTarget,
    ZoneNotEmpty,
    ZoneNotFound,
    ZoneRecord,
    open_store,
    parse_zk_url,
)
from rebalance.zoneclient import HttpZoneApi, InventoryVm, SnapshotView, ZoneApi
from snapper_zone.common.bootstrap import (
    EXIT_OK,
    EXIT_USAGE,
    Parser,
    StartupError,
    ensure_private_key,
    run_daemon,
    write_atomically,
)
from snapper_zone.common.config import (
    ConfigError,
    FieldParser,
    TrustedKey,
    parse_keys,
    read_document,
)
from snapper_zone.common.httpguard import OPEN, PRINCIPAL, Route, add_routes, guard
from snapper_zone.common.httpsig import (
    NONCE_HEADER,
    RESPONSE_HEADER,
    WWW_AUTHENTICATE,
    Identity,
    NotAuthorized,
    Signer,
    Unauthorized,
    Verifier,
)
from snapper_zone.common.tasks import cancel_and_wait
from snapper_zone.common.version import version
from snapper_zone.errors import InvalidName, SnapperError
from snapper_zone.policy import check_policy_document, check_policy_name
from snapper_zone.wire import (
    CnIdentity,
    IdentityDocument,
    InvalidDocument,
    RestoreGrant,
    ZoneRegistration,
    check_cn_id,
    jsontext,
)
from snapper_zone.zfs.names import check_uuid

__all__ = ["COORDINATOR", "Coordinator", "CoordinatorConfig", "load_config", "main",
           "make_app", "order_holders", "parse_config"]

log = logging.getLogger("snapper.coordinator")

HTTP_DRAIN = 5.0
# The HTTP role of a registered zone no operator has admitted yet.
PENDING_ZONE = "pending-zone"
GRACE_MARGIN = 0.05  # s past the end of rebuild_grace that the deferred pass wakes
PAGE_LIMIT = 1000  # the most (and default) items of a list route's page
PRUNE_INTERVAL = 600.0  # s between prunings of finished moves

SYNC_BATCH = 5000  # VMs per POST /v1/vms/owners (the CLI sends a listing in batches)
MAX_GRANT = 30 * 86400.0  # the longest restore grant, seconds
# What a SIGHUP reloads; the rest (listen address, store, key, intervals) is
# bound at start-up.
LIVE_FIELDS = ("keys",)
ELECTION_RETRY = 1.0  # s before standing again after an unexpected election error


class InvalidArgument(SnapperError):
    code = "InvalidArgument"
    http_status = 422


class NotEnoughZones(SnapperError):
    code = "NotEnoughZones"
    http_status = 503


class NotPlaced(SnapperError):
    """``GET /v1/placement/{vm}?create=false`` of a VM with no placement."""

    code = "ResourceNotFound"
    http_status = 404


def shown_seconds(left: float) -> float:
    """Seconds left as shown (tenths), rounded up: 0 only once none are left (0.04 s
    shown as 0 was still a grace that refused placements)."""
    return math.ceil(left * 10) / 10


class Rebuilding(SnapperError):
    """The store is new; zones are still registering: a VM's second copy may be on one."""

    code = "Rebuilding"
    http_status = 503


# -- config -------------------------------------------------------------------------


def _guids(s: SnapshotView) -> set[int]:
    """A snapshot's part guids."""
    return set(s.guids.values())


@dataclass(frozen=True)
class CoordinatorConfig:
    host: str = "127.0.0.1"
    port: int = 8480
    # A SQLite file, or a ZooKeeper ensemble: zk://host:port[,host:port...]/chroot
    store: Path | ZkTarget = Path("/var/db/snapper/coordinator.db")
    health_interval: float = 10.0
    health_timeout: float = 5.0
    lost_after: float = 300.0
    per_zone: int = 2
    move_bandwidth: float = 0.0  # bytes/s of move traffic per zone; 0: unlimited
    max_attempts: int = 5
    retry_delay: float = 10.0
    sync_timeout: float = 6 * 3600.0
    auto_rebalance: bool = True
    settle: float = 30.0
    rebalance_interval: float = 600.0
    # After starting on an empty store (lost, or a first start), how long zones
    # get to register again before a VM seen on one zone only is placed.
    rebuild_grace: float = 120.0
    # Its own private key: signs its requests to zones and its answers.
    key: Path = Path("/var/db/snapper/coordinator_key")
    # Operator and CN public keys (snapperd's [[keys]] shape); zones are known
    # by the host keys they registered with.
    keys: tuple[TrustedKey, ...] = ()
    # Finished moves (done, failed) kept for GET /v1/moves: those newer than
    # keep_days, and at least the newest keep_finished of them; older ones pruned.
    keep_days: float = 30.0
    keep_finished: int = 1000
    # Several coordinators on one ZooKeeper store: this one's id ("": its
    # hostname:port) and the URL the others show for it ("": http://host:port).
    coordinator_id: str = ""
    advertise_url: str = ""
    # ZooKeeper session timeout: a dead leader's term ends this long after its
    # last word, then a follower leads (the failover time).
    session_timeout: float = 6.0


# table -> field -> (attribute, kind, lowest value); kind "size": bytes or "50MiB".
_SCHEMA: dict[str, dict[str, tuple[str, str, float]]] = {
    "listen": {"host": ("host", "str", 0), "port": ("port", "port", 0)},
    "health": {"interval": ("health_interval", "float", 0.01),
               "timeout": ("health_timeout", "float", 0.01),
               "lost_after": ("lost_after", "float", 0)},
    "moves": {"per_zone": ("per_zone", "int", 1), "max_attempts": ("max_attempts", "int", 1),
              "bandwidth": ("move_bandwidth", "size", 0),
              "retry_delay": ("retry_delay", "float", 0),
              "sync_timeout": ("sync_timeout", "float", 1),
              "keep_days": ("keep_days", "float", 0),
              "keep_finished": ("keep_finished", "int", 0)},
    "rebalance": {"auto": ("auto_rebalance", "bool", 0), "settle": ("settle", "float", 0),
                  "interval": ("rebalance_interval", "float", 1),
                  "rebuild_grace": ("rebuild_grace", "float", 0)},
    "election": {"id": ("coordinator_id", "text", 0), "url": ("advertise_url", "url", 0),
                 "session_timeout": ("session_timeout", "float", 1)},
}
_TOP = ("store", "key", "keys", *_SCHEMA)


def parse_config(data: object, source: str = "<config>",
                 base: Path | None = None) -> CoordinatorConfig:
    """Every problem is a ConfigError naming the file and the dotted field; an
    unknown field suggests the one meant (snapperd's ``FieldParser``)."""
    f = FieldParser(source)
    top = f.table("", data, _TOP)
    values: dict[str, Any] = {}
    for key, value in top.items():
        if key == "store" and isinstance(value, str) and value.startswith("zk://"):
            try:
                values[key] = parse_zk_url(value)
            except ValueError as e:
                raise ConfigError(source, key, f"zk://host:port[,host:port...]/chroot: {e}"
                                  ) from e
            continue
        if key in ("store", "key"):
            if not isinstance(value, str) or not value:
                raise ConfigError(source, key, "must be a non-empty path")
            path = Path(value)
            values[key] = path if path.is_absolute() or base is None else base / path
            continue
        if key == "keys":
            values["keys"] = parse_keys(value, source, roles=("operator", "cn"))
            continue
        fields = _SCHEMA[key]
        for name, v in f.table(key, value, fields).items():
            where = f"{key}.{name}"
            attr, kind, lowest = fields[name]
            if kind == "bool":
                values[attr] = f.boolean(where, v)
            elif kind == "str":
                values[attr] = f.host(where, v)
            elif kind == "text":
                values[attr] = f.string(where, v)
            elif kind == "url":
                values[attr] = f.url(where, v)
            elif kind == "port":
                values[attr] = f.port(where, v, allow_zero=True)
            elif kind == "int":
                values[attr] = f.integer(where, v, int(lowest))
            elif kind == "size":
                values[attr] = float(f.size(where, v, int(lowest)))
            else:
                values[attr] = f.number(where, v, lowest)
    url = values.get("advertise_url", "")
    if url and not url.startswith(("http://", "https://")):
        raise ConfigError(source, "election.url", "must be an http:// or https:// URL")
    if any(c.isspace() or c == "/" for c in values.get("coordinator_id", "")):
        raise ConfigError(source, "election.id", "must have no space and no '/'")
    return CoordinatorConfig(**values)


def load_config(path: str | Path) -> CoordinatorConfig:
    p = Path(path)
    return parse_config(read_document(p), str(p), p.parent)


# -- the coordinator ------------------------------------------------------------------


def _registration(body: object) -> ZoneRegistration:
    """A ``POST /v1/zones`` body: the wire document, then its host key parsed
    (asyncssh is the coordinator's, not the wire's)."""
    try:
        reg = ZoneRegistration.from_json(body)
    except InvalidDocument as e:
        raise InvalidArgument(e.message) from e
    _host_key(reg.host_key, f"zone({reg.uuid}).host_key")
    return reg


def _host_key(text: object, where: str) -> str:
    """One OpenSSH public key line, parsed (asyncssh is the coordinator's, not the wire's)."""
    if not isinstance(text, str) or "\n" in text.strip() or not text.strip():
        raise InvalidArgument(f"{where}: must be one OpenSSH public key line")
    try:
        asyncssh.import_public_key(text)
    except (asyncssh.KeyImportError, ValueError) as e:
        raise InvalidArgument(f"{where}: not an OpenSSH public key line: {e}") from e
    return text.strip()


def _cn_id(value: object) -> str:
    try:
        return check_cn_id(value, "cn")
    except InvalidDocument as e:
        raise InvalidArgument(e.message) from e


def vm_scope(pair: Sequence[str] | None, moves: Sequence[MoveRecord]) -> list[str]:
    """The zones that may act on a VM as each other's peers: its placement and
    every zone of a move in flight for it (the copy replaced, source, target)."""
    zones = set(pair or ())
    for m in moves:
        if m.active:
            zones.update(z for z in (m.from_zone, m.source, m.to_zone) if z is not None)
    return sorted(zones)


@functools.lru_cache(maxsize=4096)
def _fingerprint(host_key: str) -> str | None:
    """A registered host key's fingerprint (every signed request looks zones up by it)."""
    try:
        return str(asyncssh.import_public_key(host_key).get_fingerprint())
    except (asyncssh.KeyImportError, ValueError):
        return None


def _zone_info(z: ZoneRecord, held: int) -> ZoneInfo:
    used = z.used if z.used is not None else held
    free = z.free if z.free is not None else max(z.capacity - used, 0)
    return ZoneInfo(z.uuid, z.state, z.capacity, used, free)


def order_holders(vm: str, holders: Mapping[str, Sequence[SnapshotView]],
                  zones: Sequence[ZoneRecord]) -> list[str]:
    """The zones holding a copy of ``vm``, the one to be its primary first.

    Rebuilding placement after the store is lost: the primary is the zone the
    CN pushed the newest complete snapshot to (source ``cn:...``), the mirror
    one received it from a zone; then the copy with more complete snapshots,
    then the hash ranking.  Zones that cannot take copies (lost, draining) go last.
    """
    rank = {z: i for i, z in enumerate(hrw_ranking(vm, [_zone_info(r, 0) for r in zones]))}
    eligible = {z.uuid for z in zones if z.state is ZoneState.ACTIVE}

    def key(zone: str) -> tuple[int, int, int, int]:
        done = [s for s in holders[zone] if s.complete]
        newest = max(done, key=lambda s: (s.created, s.name), default=None)
        pushed = newest is not None and (newest.source or "").startswith("cn:")
        return (zone not in eligible, not pushed, -len(done), rank.get(zone, len(rank)))

    return sorted(holders, key=key)


class Coordinator:
    def __init__(self, store: Store, api: ZoneApi, config: CoordinatorConfig,
                 metrics: CoordinatorMetrics | None = None) -> None:
        self.store = store
        self.api = api
        self.config = config
        self.metrics = metrics or CoordinatorMetrics()
        self.mover, self.health = self._workers(store)
        self.me = self._candidate(config.port)
        self.election = store.election(self.me)
        # The store the leader's work writes through, fenced to its term; None
        # while following. A solo store (SQLite) always leads.
        self._leading: Store | None = store if self.election.solo else None
        self._led = asyncio.Event()  # set while leading
        if self._leading is not None:
            self._led.set()
        self._term_tasks: list[asyncio.Task[None]] = []
        self.terms = 0  # terms led so far (tests, logs)
        self._plan_lock = asyncio.Lock()
        self._started = time.monotonic()
        self._fresh_store: bool | None = None  # learnt by prepare(): no zone registered yet
        self._place_lock = asyncio.Lock()
        self._trigger = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.auto_passes = 0  # automatic planning passes finished, for whoever waits on one
        self.deferred = False  # a change seen during rebuild_grace awaits the pass after it
        # The identity registry as last read, and a CN key fingerprint -> CN id
        # index of it (every signed request looks its key up).
        self._registry: Registry | None = None
        self._cn_keys: dict[str, tuple[str, str]] = {}

    # -- leadership --

    def _workers(self, store: Store) -> tuple[Mover, HealthChecker]:
        c = self.config
        mover = Mover(store, self.api, MoverSettings(
            per_zone=c.per_zone, max_attempts=c.max_attempts,
            retry_delay=c.retry_delay, bandwidth=c.move_bandwidth), self.metrics)
        health = HealthChecker(store, self.api, HealthSettings(
            interval=c.health_interval, timeout=c.health_timeout,
            lost_after=c.lost_after), on_lost=self._zone_lost, metrics=self.metrics)
        return mover, health

    def _candidate(self, port: int) -> Candidate:
        c = self.config
        return Candidate(c.coordinator_id or f"{socket.gethostname()}:{port}",
                         c.advertise_url or f"http://{c.host}:{port}")

    def set_port(self, port: int) -> None:
        """The port it listens on, known once bound (``listen.port = 0``): the
        defaults of its id and URL name it. Before ``join``."""
        self.me = self._candidate(port)
        self.election.me = self.me

    @property
    def role(self) -> str:
        return "leader" if self._leading is not None else "follower"

    async def join(self) -> None:
        """Stand for election now (before saying ready); ``start`` campaigns."""
        try:
            await self.election.join()
        except StoreUnavailable as e:
            log.warning("cannot stand for election yet; will retry", extra={"err_msg": str(e)})

    async def leadership(self) -> dict[str, Any]:
        """Who leads (as the election says), and this coordinator's role."""
        try:
            cands = [c.to_json() for c in await self.election.candidates()]
        except StoreUnavailable:
            cands = []
        return {"coordinator": {**self.me.to_json(), "role": self.role},
                "leader": cands[0] if cands else None, "candidates": cands}

    async def _leader_store(self) -> Store:
        """The store view of this leader's term; NotLeader on a follower.

        A coordinator whose election shows no other leader (just started, or the
        leader just went) waits for its own term up to a session timeout."""
        if self._leading is None and self._tasks:
            cands = await self.election.candidates()
            if not cands or cands[0].id == self.me.id:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.config.session_timeout):
                        await self._led.wait()
        store = self._leading
        if store is None:
            cands = await self.election.candidates()
            who = f"{cands[0].id} at {cands[0].url}" if cands else "not elected yet"
            raise NotLeader(f"coordinator {self.me.id} is a follower; planning and moves "
                            f"are the leader's: {who}")
        return store

    async def _lead(self) -> None:
        """Campaign; lead each term won until it is over; then stand again."""
        while True:
            try:
                fence = await self.election.campaign()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("election failed; standing again")
                await asyncio.sleep(ELECTION_RETRY)  # a backoff, not a synchronisation
                continue
            self._begin_term(self.store.fenced(fence))
            log.info("leading", extra={"coordinator": self.me.id, "url": self.me.url,
                                       "term": fence.path})
            try:
                await self.election.deposed(fence)
            finally:
                await self._end_term()
            log.warning("no longer leading", extra={"coordinator": self.me.id,
                                                    "term": fence.path})

    def _begin_term(self, store: Store) -> None:
        # New workers per term: a task of an older term never writes through
        # this term's fence.
        if store is not self.store:
            self.mover, self.health = self._workers(store)
        self._leading = store
        self.terms += 1
        self.metrics.leader.set(1)
        self._term_tasks = [asyncio.create_task(self.mover.run(), name="mover"),
                            asyncio.create_task(self.health.run(), name="health"),
                            asyncio.create_task(self._pruning(), name="prune-moves")]
        if not self.election.solo:
            self._term_tasks.append(asyncio.create_task(self._watch_zones(store),
                                                        name="zone-watch"))
        if self.config.auto_rebalance:
            self._term_tasks.append(asyncio.create_task(self._auto(store),
                                                        name="auto-rebalance"))
            self.trigger()
        self._led.set()
        self.mover.kick()  # resume the moves a previous term or run left running

    async def _end_term(self) -> None:
        self._led.clear()
        if not self.election.solo:
            self._leading = None
        self.metrics.leader.set(0)
        await cancel_and_wait(*self._term_tasks)
        self._term_tasks = []

    async def _watch_zones(self, store: Store) -> None:
        """Plan again when the zone set changes: an operator's change may reach a
        follower (any coordinator takes zone writes), which cannot plan."""
        seen: dict[str, tuple[str, int]] | None = None
        while True:
            with contextlib.suppress(SnapperError):
                now = {z.uuid: (str(z.state), z.capacity) for z in await store.zones()}
                if seen is not None and now != seen:
                    self.trigger()
                seen = now
            await asyncio.sleep(self.config.health_interval)  # a period, like health's

    # -- background work --

    async def prepare(self) -> None:
        """Before serving: learn whether the store is new. Asked only later, the
        first zone to re-register would already be in it, and a VM seen on that
        zone alone would be placed by hash instead of waiting for its other copy."""
        await self._in_grace()

    async def _in_grace(self) -> bool:
        if self._fresh_store is None:
            self._fresh_store = not await self.store.zones()
        return self._fresh_store and self.grace_left() > 0

    def grace_left(self) -> float:
        """Seconds of ``rebuild_grace`` left (0 on a store that was not new)."""
        if not self._fresh_store:
            return 0.0
        return max(0.0, self.config.rebuild_grace - (time.monotonic() - self._started))

    def start(self) -> None:
        """The background work: at once on a solo store, else once elected."""
        if self.election.solo:
            self._begin_term(self.store)
            self._tasks = list(self._term_tasks)
        else:
            self._tasks = [asyncio.create_task(self._lead(), name="election")]

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks = []
        await self._end_term()
        if not self.election.solo:
            # A clean stop hands over at once, not a session timeout later.
            with contextlib.suppress(SnapperError):
                await self.election.resign()

    def trigger(self) -> None:
        """The zone set changed: plan again once it has settled."""
        self._trigger.set()

    async def _auto(self, store: Store) -> None:
        """Plan after the zone set changes; in between, only repairs.

        Balancing is driven by capacity changes (a zone added, drained, lost,
        set active): the periodic pass moves nothing for balance alone, so
        copies of unequal size do not ping-pong between zones near their share.
        An operator's ``snapper rebalance`` balances whenever asked.

        During ``rebuild_grace`` after a start on an empty store the view may be
        partial (zones still re-registering, VMs not adopted yet): passes make
        repairs only, and a change seen meanwhile is kept, not dropped, for the
        first pass after the grace.  Zones re-registering into a new store with
        their data are not a capacity change, so that pass balances only if an
        active zone holds no copy at all: a zone added during the grace (or a
        first start's zones), which would otherwise stay empty until the next
        change.
        """
        while True:
            changed = True
            wait = self.config.rebalance_interval
            if self.deferred:  # wake when the grace ends, not a whole interval later
                wait = min(wait, self.grace_left() + GRACE_MARGIN)
            try:
                async with asyncio.timeout(wait):
                    await self._trigger.wait()
            except TimeoutError:
                changed = False
            # Settle: zones (re)registering together, say after a rebuild, make one plan.
            while True:
                self._trigger.clear()
                try:
                    async with asyncio.timeout(self.config.settle):
                        await self._trigger.wait()
                except TimeoutError:
                    break
                changed = True  # a change while settling counts, even on a periodic pass
            grace = await self._in_grace()
            after_grace = self.deferred and not grace
            if grace:
                self.deferred = self.deferred or changed
            try:
                await self.rebalance(dry_run=False, repairs_only=grace or not changed,
                                     balance_empty_zones=after_grace, store=store)
            except Exception:
                log.exception("automatic rebalance failed")
            if after_grace:
                self.deferred = False
            self.auto_passes += 1

    async def prune(self, now: float | None = None) -> int:
        """Forget finished moves older than ``keep_days`` beyond the newest ``keep_finished``."""
        now = time.time() if now is None else now
        n = await self.store.prune_moves(now - self.config.keep_days * 86400.0,
                                         self.config.keep_finished)
        if n:
            log.info("finished moves pruned", extra={"moves": n})
        return n

    async def _pruning(self) -> None:
        while True:
            try:
                await self.prune()
            except Exception:
                log.exception("pruning finished moves failed")
            await asyncio.sleep(PRUNE_INTERVAL)

    def reload(self, new: CoordinatorConfig) -> list[str]:
        """SIGHUP (SMF ``refresh``): the config's ``[[keys]]`` (operators, static CNs)
        take effect at once; every other field needs a restart: the names of those
        that changed, which keep their running values."""
        fixed = [f.name for f in dataclasses.fields(new) if f.name not in LIVE_FIELDS
                 and getattr(new, f.name) != getattr(self.config, f.name)]
        self.config = dataclasses.replace(
            self.config, **{k: getattr(new, k) for k in LIVE_FIELDS})
        return fixed

    async def _zone_lost(self, z: ZoneRecord) -> None:
        self.trigger()

    # -- zones --

    async def register(self, body: object) -> tuple[ZoneRecord, bool]:
        """A zone says where it is. New: ``pending``, its host key pinned; known:
        endpoint and capacity updated, only with the pinned key (HostKeyMismatch)."""
        reg = _registration(body)
        try:
            z, created = await self.store.upsert_zone(reg, time.time())
        except HostKeyMismatch:
            log.warning("registration refused: another host key", extra={
                "zone": reg.uuid, "ssh_host": reg.ssh_host, "http_url": reg.http_url})
            raise
        log.info("zone registered (pending: snapper zone activate admits it)" if created
                 else "zone updated",
                 extra={"zone": z.uuid, "zone_name": z.name, "capacity": z.capacity,
                        "state": str(z.state)})
        # A new zone is no capacity until admitted: activation triggers planning.
        return z, created

    async def rekey(self, uuid: str, body: object) -> ZoneRecord:
        """An operator rotates a zone's pinned host key (the only way to change it)."""
        key = body.get("host_key") if isinstance(body, dict) else None
        if not isinstance(body, dict) or set(body) != {"host_key"}:
            raise InvalidArgument('body must be {"host_key": "<OpenSSH public key line>"}')
        line = _host_key(key, "host_key")
        old = await self.zone(uuid)
        z = await self.store.set_host_key(old.uuid, line)
        log.warning("zone host key rotated", extra={"zone": z.uuid, "zone_name": z.name})
        return z

    async def http_identity(self, fingerprint: str) -> Identity | None:
        """Who signed a request with this key: an operator or CN of the config,
        or a registered zone (by the host key pinned for it; role ``pending-zone``
        until admitted)."""
        for k in self.config.keys:
            if k.fingerprint == fingerprint:
                return Identity(k.role, k.name, k.ssh_key())
        await self.registry()
        if fingerprint in self._cn_keys:
            cn, line = self._cn_keys[fingerprint]
            return Identity("cn", cn, asyncssh.import_public_key(line))
        for z in await self.store.zones():
            if _fingerprint(z.host_key) == fingerprint:
                # Not admitted: it may register again and see its own record only.
                role = "zone" if z.admitted else PENDING_ZONE
                return Identity(role, z.uuid, asyncssh.import_public_key(z.host_key))
        return None

    async def zone(self, uuid: str) -> ZoneRecord:
        z = await self.store.zone(check_uuid(uuid, "zone uuid"))
        if z is None:
            raise ZoneNotFound(f"zone {uuid} is not registered")
        return z

    async def set_state(self, uuid: str, body: object) -> ZoneRecord:
        state = body.get("state") if isinstance(body, dict) else None
        if state not in ("active", "draining", "lost"):
            raise InvalidArgument('body must be {"state": "active"|"draining"|"lost"}')
        old = await self.zone(uuid)
        if not old.admitted and state != "active":
            raise InvalidArgument(f"zone {uuid} is pending: activate it (admit it) or "
                                  "remove it")
        z = await self.store.set_zone_state(old.uuid, ZoneState(state))
        log.info("zone admitted" if not old.admitted else "zone state set",
                 extra={"zone": z.uuid, "from": str(old.state), "to": str(z.state)})
        if z.state is not old.state:
            self.trigger()
        return z

    async def remove(self, uuid: str) -> None:
        z = await self.zone(uuid)
        if z.readable:  # never contact a pending zone: it is not known to be ours
            # The placement may not know of a copy (a rolled-back move's leftovers):
            # ask the zone itself, when it answers.
            try:
                held = await self.api.list_vms(z.http_url)
            except SnapperError:
                held = []  # unreachable: the placement alone decides
            if held:
                raise ZoneNotEmpty(f"zone {uuid} still holds {len(held)} VMs; drain it first")
        await self.store.delete_zone(z.uuid)
        log.info("zone removed", extra={"zone": uuid, "zone_name": z.name})

    async def zones_json(self, admitted_only: bool = False) -> list[dict[str, Any]]:
        zones = [z for z in await self.store.zones() if z.admitted or not admitted_only]
        placements = await self.store.placements()
        sizes = await self.store.vm_sizes()
        count: Counter[str] = Counter()
        held: Counter[str] = Counter()
        for vm, pair in placements.items():
            for z in pair:
                count[z] += 1
                held[z] += sizes.get(vm, 0)
        return [self._zone_json(z, count[z.uuid], held[z.uuid]) for z in zones]

    @staticmethod
    def _zone_json(z: ZoneRecord, vms: int, held: int) -> dict[str, Any]:
        info = _zone_info(z, held)
        return {**z.endpoint(), "name": z.name, "capacity": z.capacity, "used": info.used,
                "free": info.free, "state": str(z.state), "admitted": z.admitted,
                "health": z.health, "vms": vms,
                "last_seen": z.last_seen, "suspect_since": z.suspect_since}

    async def zone_json(self, z: ZoneRecord) -> dict[str, Any]:
        [out] = [j for j in await self.zones_json() if j["uuid"] == z.uuid] or [
            self._zone_json(z, 0, 0)]
        return out

    # -- identity: CNs, VM owners, restore grants --

    async def registry(self) -> Registry:
        """The registry, read again only when its version moved (one cheap read)."""
        version = await self.store.registry_version()
        if self._registry is None or self._registry.version != version:
            reg = await self.store.registry(time.time())
            index: dict[str, tuple[str, str]] = {}
            for c in reg.cns:
                for line in c.keys:
                    fp = _fingerprint(line)
                    if fp is not None:
                        index[fp] = (c.id, line)
            self._registry, self._cn_keys = reg, index
        assert self._registry is not None
        return self._registry

    async def identity_json(self, since: int | None) -> dict[str, Any]:
        """``GET /v1/identity``: the registry as zones follow it."""
        reg = await self.registry()
        if since is not None and since == reg.version:
            return {"version": reg.version, "unchanged": True}
        now = time.time()
        return IdentityDocument(
            reg.version, tuple(CnIdentity(c.id, c.keys) for c in reg.cns), dict(reg.owners),
            tuple(RestoreGrant(g.vm, g.cn, g.expires, g.granted_by)
                  for g in reg.grants if g.expires > now)).to_json()

    async def cns_json(self) -> list[dict[str, Any]]:
        reg = await self.registry()
        owned = Counter(reg.owners.values())
        return [{**c.to_json(), "vms": owned.get(c.id, 0)} for c in reg.cns]

    async def add_cn_keys(self, cn: str, body: object) -> dict[str, Any]:
        cn = _cn_id(cn)
        keys = body.get("keys") if isinstance(body, dict) else None
        if not isinstance(body, dict) or set(body) != {"keys"} or not isinstance(keys, list) \
                or not keys or len(keys) > 64:
            raise InvalidArgument('body must be {"keys": ["<OpenSSH public key line>", ...]} '
                                  "(1 to 64 keys)")
        lines = [_host_key(k, f"keys[{i}]") for i, k in enumerate(keys)]
        for line in lines:
            # A config key is an operator's or a static CN's: never a registry CN's too.
            fp = _fingerprint(line)
            clash = next((k for k in self.config.keys if k.fingerprint == fp), None)
            if clash is not None:
                raise KeyInUse(f"key {fp} is the config's {clash.role} key "
                               f"({clash.name}); one key belongs to one identity")
        rec = await self.store.add_cn_keys(cn, lines, time.time())
        log.info("CN keys added", extra={"cn": cn, "keys": len(rec.keys)})
        return rec.to_json()

    async def remove_cn(self, cn: str, fingerprint: str | None) -> None:
        cn = _cn_id(cn)
        line: str | None = None
        if fingerprint is not None:
            reg = await self.registry()
            rec = next((c for c in reg.cns if c.id == cn), None)
            line = next((k for k in (rec.keys if rec else ()) if _fingerprint(k) == fingerprint),
                        None)
            if line is None:
                raise CnNotFound(f"CN {cn} has no key {fingerprint}")
        await self.store.remove_cn(cn, line)
        log.warning("CN key revoked" if line else "CN removed",
                    extra={"cn": cn, "fingerprint": fingerprint})

    async def assign(self, vm: str, body: object) -> dict[str, Any]:
        vm = check_uuid(vm, "VM uuid")
        cn = body.get("cn") if isinstance(body, dict) else None
        if not isinstance(body, dict) or set(body) != {"cn"}:
            raise InvalidArgument('body must be {"cn": "<CN id>"}')
        cn = _cn_id(cn)
        await self.store.assign_vms({vm: cn})
        log.info("VM assigned", extra={"vm": vm, "cn": cn})
        return {"vm": vm, "cn": cn}

    async def sync_owners(self, body: object) -> dict[str, Any]:
        """A VMAPI-style listing's owners: each VM's ``server_uuid`` becomes its
        owner when that CN is registered; others are counted, never guessed."""
        vms = body.get("vms") if isinstance(body, dict) else None
        if not isinstance(body, dict) or set(body) != {"vms"} or not isinstance(vms, list):
            raise InvalidArgument('body must be {"vms": [{"uuid", "server_uuid"}, ...]}')
        if len(vms) > SYNC_BATCH:
            raise InvalidArgument(f"at most {SYNC_BATCH} VMs per request (send batches)")
        reg = await self.registry()
        known = {c.id for c in reg.cns}
        want: dict[str, str] = {}
        skipped: Counter[str] = Counter()
        invalid = 0
        for i, v in enumerate(vms):
            if not isinstance(v, dict):
                raise InvalidArgument(f"vms[{i}]: expected an object")
            try:
                vm = check_uuid(v.get("uuid"), "VM uuid")  # type: ignore[arg-type]
            except InvalidName as e:
                raise InvalidArgument(f"vms[{i}].uuid: {e.message}") from e
            server = v.get("server_uuid")
            if server is None:  # VMAPI lists VMs not (or no longer) on any CN
                invalid += 1
                continue
            try:
                cn = check_cn_id(server, f"vms[{i}].server_uuid")
            except InvalidDocument as e:
                raise InvalidArgument(e.message) from e
            if cn in known:
                want[vm] = cn
            else:
                skipped[cn] += 1
        changed = await self.store.assign_vms(want)
        log.info("VM owners synced", extra={"assigned": changed, "listed": len(vms),
                                            "skipped": sum(skipped.values())})
        return {"assigned": changed, "unchanged": len(want) - changed,
                "skipped": dict(skipped), "invalid": invalid}

    async def grant(self, body: object, who: str) -> dict[str, Any]:
        if not isinstance(body, dict) or set(body) != {"vm", "cn", "seconds"}:
            raise InvalidArgument('body must be {"vm", "cn", "seconds"}')
        vm = check_uuid(body["vm"], "VM uuid")
        cn = _cn_id(body["cn"])
        seconds = body["seconds"]
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) \
                or not 0 < seconds <= MAX_GRANT:
            raise InvalidArgument(f"seconds must be a number in (0, {MAX_GRANT:.0f}]")
        now = time.time()
        g = await self.store.add_grant(GrantRecord(vm, cn, now + float(seconds), who, now))
        log.warning("restore granted", extra={"vm": vm, "cn": cn, "expires": g.expires,
                                              "granted_by": who})
        return g.to_json()

    async def set_policy(self, name: str, body: object, who: str) -> dict[str, Any]:
        """Checked as the file is (every field), then stored whole; nothing is
        stored when one field is wrong."""
        name = check_policy_name(name)
        check_policy_document(body, name)
        assert isinstance(body, dict)  # a PolicySet parsed from it: a table
        rec = await self.store.put_policy(name, body, who, time.time())
        log.info("policy stored", extra={"policy": name, "version": rec.version, "by": who})
        return rec.to_json()

    async def policy_json(self, name: str) -> dict[str, Any]:
        rec = await self.store.policy(check_policy_name(name))
        if rec is None:
            raise PolicyNotFound(f"no policy {name!r} (snapper policy list)")
        return rec.to_json()

    async def policies_json(self) -> list[dict[str, Any]]:
        return [{"name": r.name, "version": r.version, "updated": r.updated,
                 "updated_by": r.updated_by} for r in await self.store.policies()]

    async def remove_policy(self, name: str, who: str) -> None:
        await self.store.delete_policy(check_policy_name(name))
        log.warning("policy removed", extra={"policy": name, "by": who})

    async def grants_json(self) -> list[dict[str, Any]]:
        now = time.time()
        return [g.to_json() for g in (await self.registry()).grants if g.expires > now]

    # -- placement --

    async def placement(self, vm: str, create: bool = True
                        ) -> tuple[tuple[str, str], dict[str, ZoneRecord]]:
        """The VM's pair; a VM not placed yet is placed now, unless not ``create``
        (a zone checking a peer's scope: no VM comes into being by being asked about)."""
        vm = check_uuid(vm, "VM uuid")
        pair = await self.store.placement(vm)
        zones = {z.uuid: z for z in await self.store.zones()}
        if pair is None and not create:
            raise NotPlaced(f"VM {vm} is not placed")
        if pair is None:
            async with self._place_lock:
                pair = await self.store.placement(vm) or await self._place_new(vm, zones)
        return pair, zones

    async def _place_new(self, vm: str, zones: Mapping[str, ZoneRecord]) -> tuple[str, str]:
        # A VM we have not seen may still be on zones (the store was lost): ask them first.
        readable = [z for z in zones.values() if z.readable]
        found = await asyncio.gather(*(self.api.snapshots(z.http_url, vm) for z in readable),
                                     return_exceptions=True)
        holders = {z.uuid: r for z, r in zip(readable, found, strict=True)
                   if isinstance(r, list)}
        if len(holders) < 2 and await self._in_grace():
            self._wait_for_holders(vm, holders, [
                z.uuid for z, r in zip(readable, found, strict=True)
                if isinstance(r, BaseException)], zones)
        pair = self._choose_pair(vm, holders, list(zones.values()))
        got = await self.store.place(vm, pair)
        log.info("VM placed", extra={"vm": vm, "placement": got,
                                     "found_on": sorted(holders)})
        return got

    def _wait_for_holders(self, vm: str, holders: Mapping[str, object],
                          unanswered: Sequence[str], zones: Mapping[str, ZoneRecord]) -> None:
        """During the grace, Rebuilding unless the zones' silence is proof.

        Placed from one copy found, or from none while a zone did not answer
        or is registered but not admitted yet (it is never asked), the VM would
        go to a hashed pair that a zone could mirror to before any planning
        pass points it back at its data. Every zone known answering "no copy"
        means a new VM: placed by hash, as outside the grace.
        """
        pending = [z.uuid for z in zones.values()
                   if not z.admitted and z.state is not ZoneState.LOST]
        if holders:
            why = "is on one registered zone"
        elif unanswered or pending:
            why = (f"is on no zone that answered ({len(unanswered)} did not, "
                   f"{len(pending)} not admitted yet)")
        else:
            return
        raise Rebuilding(f"VM {vm} {why}; zones are still registering after a restart "
                         f"on an empty store (at most {self.config.rebuild_grace:.0f} s): "
                         f"ask again")

    def _choose_pair(self, vm: str, holders: Mapping[str, Sequence[SnapshotView]],
                     zones: Sequence[ZoneRecord]) -> tuple[str, str]:
        chosen = order_holders(vm, holders, zones)[:2]
        # Fill up with the hash's best active zones (free space is the planner's business).
        for z in hrw_ranking(vm, [_zone_info(r, 0) for r in zones]):
            if len(chosen) == 2:
                break
            if z not in chosen:
                chosen.append(z)
        if len(chosen) < 2:
            raise NotEnoughZones(f"cannot place VM {vm}: fewer than two active zones")
        return chosen[0], chosen[1]

    async def placement_json(self, vm: str, create: bool = True) -> dict[str, Any]:
        pair, zones = await self.placement(vm, create)
        # Pushes go to a surviving copy while the other zone is lost: survivors first.
        ordered = sorted(pair, key=lambda z: z not in zones or zones[z].state is ZoneState.LOST)
        moves = [m for m in await self.store.moves([MoveState.PLANNED, MoveState.RUNNING])
                 if m.vm == vm]
        return {"vm": vm, "zones": ordered,
                "endpoints": [zones[z].endpoint() for z in ordered if z in zones],
                "scope": vm_scope(pair, moves)}

    # -- inventory and planning --

    async def inventories(self, zones: Sequence[ZoneRecord]) -> dict[str, list[InventoryVm]]:
        """Each readable zone's ``GET /v1/vms``; zones that do not answer are left out."""
        readable = [z for z in zones if z.readable]
        got = await asyncio.gather(*(self.api.list_vms(z.http_url) for z in readable),
                                   return_exceptions=True)
        out = {}
        for z, r in zip(readable, got, strict=True):
            if isinstance(r, list):
                out[z.uuid] = r
            else:
                log.warning("zone inventory unavailable", extra={"zone": z.uuid, "err_msg": str(r)})
        return out

    async def adopt_inventory(self, zones: Sequence[ZoneRecord],
                              inv: Mapping[str, Sequence[InventoryVm]],
                              store: Store | None = None) -> int:
        """Place every VM the zones hold that the placement does not know (a rebuild)."""
        store = store or self.store
        placed = await store.placements()
        unknown: dict[str, list[str]] = {}
        for zone, vms in inv.items():
            for v in vms:
                if v.uuid not in placed and v.complete > 0:
                    unknown.setdefault(v.uuid, []).append(zone)
        by_id = {z.uuid: z for z in zones}
        n = 0
        grace = await self._in_grace()
        for vm, where in sorted(unknown.items()):
            if grace and len(where) < 2:
                continue  # its other copy may be on a zone that has not registered yet
            lists = await asyncio.gather(*(self.api.snapshots(by_id[z].http_url, vm)
                                           for z in where), return_exceptions=True)
            holders = {z: r for z, r in zip(where, lists, strict=True) if isinstance(r, list)}
            if grace and len(holders) < 2:
                continue  # a holder did not answer: by hash, its copy could be passed over
            try:
                pair = self._choose_pair(vm, holders, zones)
            except NotEnoughZones:
                continue
            await store.place(vm, pair)
            n += 1
        if n:
            log.info("placement adopted from the zones' inventories", extra={"vms": n})
        return n

    async def rebalance(self, dry_run: bool, repairs_only: bool = False, *,
                        balance_empty_zones: bool = False,
                        store: Store | None = None) -> dict[str, Any]:
        """Plan (and unless ``dry_run``, record and start) the moves.

        Not a dry run: the leader's work, written through its term's ``store``
        (NotLeader on a follower). A dry run reads only: any coordinator.

        ``repairs_only`` keeps the repairs and drops the balancing moves; with
        ``balance_empty_zones`` it balances all the same when an active zone
        holds no complete copy (new capacity, see ``_auto``).
        """
        if store is None:
            store = self.store if dry_run else await self._leader_store()
        async with self._plan_lock:
            zones = await store.zones()
            inv = await self.inventories(zones)
            if not dry_run:
                await self.adopt_inventory(zones, inv, store)
            placements = await store.placements()
            fresh: dict[str, int] = {}  # a VM's size: its largest copy now
            for vms in inv.values():
                for v in vms:
                    fresh[v.uuid] = max(v.bytes, fresh.get(v.uuid, 0))
            seen = set(fresh)
            sizes = {**await store.vm_sizes(), **fresh}
            by_id = {z.uuid: z for z in zones}
            if not dry_run:
                await store.set_sizes({vm: sizes[vm] for vm in placements if vm in sizes})
                await self._replace_unpushed(placements, seen, by_id, store)
                placements = await store.placements()
            active = await store.moves([MoveState.PLANNED, MoveState.RUNNING])
            busy = {m.vm for m in active}
            if not dry_run and await self._follow_holders(placements, inv, busy, by_id, store):
                placements = await store.placements()
            stale = await self.stale_copies(zones, inv, placements, busy, dry_run)
            current = {vm: pair for vm, pair in placements.items()
                       if vm in seen and vm not in busy}
            held: Counter[str] = Counter()
            for vm, pair in placements.items():
                for z in pair:
                    held[z] += sizes.get(vm, 0)
            # Moves in flight count where they are going: planning again before
            # they finish must not fill the same gap twice. (At step delete the
            # placement has switched already and counts them so.)
            for m in active:
                if m.step is MoveStep.DELETE:
                    continue
                held[m.to_zone] += sizes.get(m.vm, 0)
                if m.from_zone is not None and m.from_zone in by_id:
                    held[m.from_zone] -= sizes.get(m.vm, 0)
            p = plan([_zone_info(z, held[z.uuid]) for z in zones],
                     [VmInfo(vm, sizes.get(vm, 0)) for vm in current], current)
            empty = sorted(z.uuid for z in zones if z.state is ZoneState.ACTIVE
                           and z.capacity > 0 and z.uuid in inv
                           and not any(v.complete > 0 for v in inv[z.uuid]))
            if repairs_only and balance_empty_zones and empty:
                repairs_only = False
                log.info("empty zones after the rebuild grace: balancing",
                         extra={"zones": empty})
            if repairs_only:
                p = dataclasses.replace(p, moves=tuple(m for m in p.moves
                                                       if m.reason != "rebalance"))
            moves: list[dict[str, Any]]
            if dry_run or not p.moves:
                moves = [{"vm": m.vm, "from_zone": m.from_zone, "to_zone": m.to_zone,
                          "source": m.source, "bytes": m.bytes, "reason": m.reason}
                         for m in p.moves]
            else:
                records = await store.add_moves(p.moves, time.time())
                moves = [r.to_json() for r in records]
                self.mover.kick()
            log.info("rebalance planned", extra={
                "dry_run": dry_run, "repairs_only": repairs_only, "moves": len(p.moves),
                "moved_bytes": p.moved_bytes,
                "warnings": list(p.warnings), "skipped_busy": len(busy)})
            return {"dry_run": dry_run, "moves": moves, "moved_bytes": p.moved_bytes,
                    "projected": p.projected, "warnings": list(p.warnings),
                    "degraded": {vm: list(z) for vm, z in p.degraded.items()},
                    "stale_copies": stale}

    async def stale_copies(self, zones: Sequence[ZoneRecord],
                           inv: Mapping[str, Sequence[InventoryVm]],
                           placements: Mapping[str, tuple[str, str]], busy: set[str],
                           dry_run: bool) -> list[dict[str, Any]]:
        """Copies on zones the placement does not name: discard those that hold nothing new.

        They come from a lost zone set active again, or from a rolled-back move
        whose partial copy could not be removed.  A copy is discarded only if
        every complete snapshot on it is on one of the VM's placed copies with
        the same guids; one holding a snapshot nobody else has (a divergent
        tail, acked in ``local`` mode) is kept and reported, never overwritten.
        VMs with a move planned or running are left alone: the move's target
        holds a copy the placement does not name yet.
        """
        by_id = {z.uuid: z for z in zones}
        live = {z.uuid for z in zones if z.readable}
        out: list[dict[str, Any]] = []
        for zone, vms in sorted(inv.items()):
            for v in vms:
                pair = placements.get(v.uuid)
                if pair is None or zone in pair or v.uuid in busy:
                    continue
                placed = [z for z in pair if z in live and z in inv]
                verdict = await self._judge_stale(by_id[zone], v.uuid,
                                                  [by_id[z] for z in placed], dry_run)
                out.append({"vm": v.uuid, "zone": zone, "action": verdict})
        return out

    async def _judge_stale(self, zone: ZoneRecord, vm: str, placed: Sequence[ZoneRecord],
                           dry_run: bool) -> str:
        try:
            mine = await self.api.snapshots(zone.http_url, vm)
            theirs = [await self.api.snapshots(z.http_url, vm) for z in placed]
        except SnapperError as e:
            return f"kept: cannot compare ({e.message})"
        if mine is None:
            return "gone"
        # Discarded only when *every* placed copy holds each of its snapshots: a
        # copy is never the one that keeps a snapshot at two copies.
        held = [{(s.name, tuple(sorted(s.guids.items()))) for s in copy if s.complete}
                for copy in theirs if copy is not None]
        new = [s for s in mine
               if s.complete and not all((s.name, tuple(sorted(s.guids.items()))) in h
                                         for h in held)]
        if new:
            # Deleted on purpose where the VM is placed (a delete this copy missed
            # while it was moved away) is not a snapshot the placed copies lack.
            try:
                gone = set().union(*[await self.api.tombstones(z.http_url, vm)
                                     for z in placed])
            except SnapperError as e:
                return f"kept: cannot compare ({e.message})"
            new = [s for s in new if not _guids(s) <= gone]
        if new or len(theirs) < 2 or not all(theirs):
            why = f"holds {len(new)} snapshots not on both placed copies: " \
                f"{', '.join(s.name for s in new[:5])}" if new else \
                "the placed copies did not both answer"
            log.warning("stale copy kept", extra={"vm": vm, "zone": zone.uuid, "why": why})
            return f"kept: {why}"
        if dry_run:
            return "would discard"
        both = [s for s in theirs[0] or [] if s.complete
                and all((s.name, tuple(sorted(s.guids.items()))) in h for h in held)]
        try:
            # The zone checks again under its VM lock (a push may land meanwhile).
            await self.api.delete_vm(zone.http_url, vm, elsewhere=both)
        except SnapperError as e:
            return f"kept: delete failed ({e.message})"
        log.info("stale copy discarded", extra={"vm": vm, "zone": zone.uuid})
        return "discarded"

    async def _follow_holders(self, placements: Mapping[str, tuple[str, str]],
                              inv: Mapping[str, Sequence[InventoryVm]], busy: set[str],
                              zones: Mapping[str, ZoneRecord], store: Store) -> int:
        """Point a placement at the zones that hold the VM, where one of its zones does not.

        After the store was rebuilt from zones that registered one by one, a VM
        may have been placed on a hashed zone while its real second copy sat on
        a zone that had not registered yet. The data is the truth: the
        placement follows it, and nothing moves.
        """
        holders: dict[str, list[str]] = {}
        for zone, vms in inv.items():
            z = zones.get(zone)
            if z is None or z.state is not ZoneState.ACTIVE:
                continue
            for v in vms:
                if v.complete > 0:
                    holders.setdefault(v.uuid, []).append(zone)
        n = 0
        for vm, pair in placements.items():
            have = holders.get(vm, [])
            if vm in busy or len(have) < 2 or all(z in have for z in pair):
                continue
            extra = iter(sorted(z for z in have if z not in pair))
            new = [z if z in have else next(extra, z) for z in pair]
            if new[0] == new[1] or tuple(new) == pair:
                continue
            try:
                await store.reassign(vm, pair, (new[0], new[1]))
            except PlacementConflict:
                continue
            n += 1
            log.info("placement follows the data", extra={"vm": vm, "placement": new,
                                                          "was": list(pair)})
        return n

    async def _replace_unpushed(self, placements: Mapping[str, tuple[str, str]],
                                seen: set[str], zones: Mapping[str, ZoneRecord],
                                store: Store) -> None:
        """A VM no zone holds yet has no data to move: re-place it off a zone it must leave."""
        for vm, pair in placements.items():
            if vm in seen or all(z in zones and zones[z].state is ZoneState.ACTIVE
                                 for z in pair):
                continue
            keep = [z for z in pair if z in zones and zones[z].state is ZoneState.ACTIVE]
            try:
                new = self._choose_pair(vm, {z: [] for z in keep}, list(zones.values()))
                await store.reassign(vm, pair, new)
            except (NotEnoughZones, PlacementConflict):
                continue

    # -- status --

    async def status(self) -> dict[str, Any]:
        """The fleet summary and who leads (``snapper status``)."""
        # The grace after a start on an empty store: why a VM may get 503 Rebuilding.
        return {**await self._fleet(), **await self.leadership(),
                "rebuild_grace_left": shown_seconds(self.grace_left())}

    async def _fleet(self) -> dict[str, Any]:
        zones = {z.uuid: z for z in await self.store.zones()}
        placements = await self.store.placements()
        # Counts and the active moves: a status (a scrape) reads no finished history.
        active = await self.store.moves([MoveState.PLANNED, MoveState.RUNNING])
        counts = await self.store.move_counts()
        live = {u for u, z in zones.items() if z.readable}
        by_copies = Counter(sum(1 for z in set(pair) if z in live)
                            for pair in placements.values())
        under = sum(n for k, n in by_copies.items() if k < 2)
        copies = sum(k * n for k, n in by_copies.items())
        now = time.time()
        return {"zones": dict(Counter(str(z.state) for z in zones.values())),
                "vms": len(placements), "copies": copies, "under_replicated": under,
                "vms_by_copies": {str(k): by_copies.get(k, 0) for k in (0, 1, 2)},
                "moves": {s.value: counts.get(s, 0) for s in MoveState},
                "in_flight": [m.to_json(now) for m in active]}

    async def update_gauges(self) -> None:
        zones = await self.store.zones()
        self.metrics.zones.clear()
        for (state, health), n in Counter((str(z.state), z.health) for z in zones).items():
            self.metrics.zones.labels(state, health).set(n)
        # Admitted zones only: a pending one is never contacted, so never up or down.
        self.metrics.zone_up.clear()
        for z in zones:
            if z.admitted:
                self.metrics.zone_up.labels(z.uuid, z.name, str(z.state)).set(
                    1 if z.health == "healthy" else 0)
        s = await self._fleet()
        self.metrics.vms.set(s["vms"])
        self.metrics.under_replicated.set(s["under_replicated"])
        for k, n in s["vms_by_copies"].items():
            self.metrics.vms_by_copies.labels(k).set(n)
        for state in (MoveState.PLANNED, MoveState.RUNNING):
            self.metrics.moves_active.labels(state.value).set(s["moves"][state.value])


# -- HTTP ---------------------------------------------------------------------------

COORDINATOR = web.AppKey("coordinator", Coordinator)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_HTTP_CODES = {400: "BadRequest", 404: "ResourceNotFound", 405: "MethodNotAllowed",
               413: "RequestEntityTooLarge", 415: "UnsupportedMediaType"}


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status)


SIGNER = web.AppKey("signer", Signer)
VERIFIER = web.AppKey("verifier", Verifier)


async def _presented(request: web.Request) -> Identity | None:
    """The host key a registration offers: a zone not known yet proves it holds it."""
    if request.method != "POST" or request.path != "/v1/zones":
        return None
    try:
        body = jsontext.loads(await request.text())
        key = asyncssh.import_public_key(str(body["host_key"]))
        return Identity("zone", str(body["uuid"]), key)
    except (jsontext.InvalidJson, KeyError, TypeError, ValueError, asyncssh.KeyImportError):
        return None  # not a registration: the handler says why, if it gets that far


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    req_id = str(_uuid.uuid4())
    start = time.monotonic()
    c = request.app[COORDINATOR]
    response: web.StreamResponse
    try:
        await guard(request, ROUTES, request.app[VERIFIER], c.http_identity,
                    await _presented(request))
        response = await handler(request)
    except SnapperError as e:
        if e.http_status >= 500:
            log.error("request failed: %s", e.message, extra={"req_id": req_id, "code": e.code})
        response = _error(e.http_status, e.code, e.message)
        if isinstance(e, Unauthorized):
            response.headers["WWW-Authenticate"] = WWW_AUTHENTICATE
    except web.HTTPException as e:
        if e.status < 400:
            raise
        response = _error(e.status, _HTTP_CODES.get(e.status, "HttpError"),
                          f"{request.method} {request.path}: {e.reason}")
    except Exception:
        log.exception("unexpected error handling request",
                      extra={"req_id": req_id, "method": request.method, "url": request.path_qs})
        response = _error(500, "InternalError", f"internal error (request {req_id})")
    response.headers["x-request-id"] = req_id
    nonce = request.headers.get(NONCE_HEADER)
    if nonce and isinstance(response, web.Response) and isinstance(response.body, bytes):
        # Bound to the caller's nonce: not replayable as the answer to another request.
        response.headers[RESPONSE_HEADER] = request.app[SIGNER].response_header(
            nonce, response.status, response.body)
    who = request.get(PRINCIPAL)
    # Every zone asks for the identity registry each second: those polls go to debug.
    level = logging.DEBUG if request.path == "/v1/identity" and response.status == 200 \
        else logging.INFO
    log.log(level, "handled request", extra={
        "req_id": req_id, "method": request.method, "url": request.path_qs,
        "status": response.status, "principal": who.label if who is not None else None,
        "latency_ms": round((time.monotonic() - start) * 1000, 3)})
    return response


async def _body(request: web.Request) -> object:
    # A text/plain POST is what a browser sends cross-site without asking.
    if request.content_type != "application/json":
        raise InvalidArgument(f"body must be application/json, not {request.content_type!r}")
    try:
        return jsontext.loads(await request.text())
    except jsontext.InvalidJson as e:
        raise InvalidArgument(e.message) from None


def _flag(request: web.Request, name: str, default: str) -> bool:
    value = request.query.get(name, default).lower()
    if value not in ("true", "false", "1", "0"):
        raise InvalidArgument(f"invalid {name} {value!r}: expected true or false")
    return value in ("true", "1")


async def ping(request: web.Request) -> web.Response:
    # Open to anyone (health checks): liveness and version, nothing about the fleet.
    return web.json_response({"ping": "pong", "version": version(),
                              "role": request.app[COORDINATOR].role})


async def post_zone(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    body = await _body(request)
    who = request[PRINCIPAL]
    if who.role in ("zone", PENDING_ZONE):
        # Proof of possession: a zone registers only the key it signed with, and
        # only under its own uuid (an operator may register any zone by hand).
        reg = _registration(body)
        if asyncssh.import_public_key(reg.host_key).get_fingerprint() != who.fingerprint:
            raise NotAuthorized(f"a zone registers the host key it signs with; this "
                                f"request is signed by {who.fingerprint}")
        if who.id != reg.uuid:
            raise NotAuthorized(f"key {who.fingerprint} is zone {who.id}'s; it cannot "
                                f"register zone {reg.uuid}")
    z, created = await c.register(body)
    return web.json_response(await c.zone_json(z), status=201 if created else 200)


def _limit(request: web.Request) -> int:
    text = request.query.get("limit", str(PAGE_LIMIT))
    if not text.isdigit() or not 1 <= int(text) <= PAGE_LIMIT:
        raise InvalidArgument(f"invalid limit {text!r}: expected 1..{PAGE_LIMIT}")
    return int(text)


async def list_zones(request: web.Request) -> web.Response:
    admitted = _flag(request, "admitted", "false")
    limit = _limit(request)
    marker = request.query.get("marker")
    if marker is not None:
        check_uuid(marker, "marker (a zone uuid)")
    # A fleet has tens of zones: paged after reading them all, by uuid.
    zones = [z for z in await request.app[COORDINATOR].zones_json(admitted)
             if marker is None or z["uuid"] > marker]
    page = zones[:limit]
    more = len(zones) > limit
    return web.json_response({"zones": page, "next": page[-1]["uuid"] if more else None})


async def get_zone(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    uuid = request.match_info["uuid"]
    who = request[PRINCIPAL]
    if who.role == PENDING_ZONE and who.id != uuid:
        raise NotAuthorized(f"zone {who.id} is pending (not admitted): it may read its own "
                            "record only")
    return web.json_response(await c.zone_json(await c.zone(uuid)))


async def put_state(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    z = await c.set_state(request.match_info["uuid"], await _body(request))
    return web.json_response(await c.zone_json(z))


async def put_host_key(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    z = await c.rekey(request.match_info["uuid"], await _body(request))
    return web.json_response(await c.zone_json(z))


async def delete_zone(request: web.Request) -> web.Response:
    await request.app[COORDINATOR].remove(request.match_info["uuid"])
    return web.Response(status=204)


async def get_placement(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    create = _flag(request, "create", "true")
    return web.json_response(await c.placement_json(request.match_info["vm"], create))


async def list_moves(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    wanted = request.query.getall("state", [])
    try:
        states = [MoveState(s) for s in wanted] or None
    except ValueError as e:
        raise InvalidArgument(f"state: {e}") from e
    limit = _limit(request)
    marker = request.query.get("marker")
    if marker is not None and not marker.isdigit():
        raise InvalidArgument(f"invalid marker {marker!r}: expected a move id")
    # One more than the page: whether there is a next page, without counting.
    got = await c.store.moves(states, after=None if marker is None else int(marker),
                              limit=limit + 1)
    page = got[:limit]
    now = time.time()
    return web.json_response({"moves": [m.to_json(now) for m in page],
                              "next": str(page[-1].id) if len(got) > limit else None})


async def post_rebalance(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    return web.json_response(await c.rebalance(_flag(request, "dry_run", "false")))


async def get_status(request: web.Request) -> web.Response:
    return web.json_response(await request.app[COORDINATOR].status())


async def get_identity(request: web.Request) -> web.Response:
    raw = request.query.get("since")
    since: int | None = None
    if raw is not None:
        if not raw.isdigit() or len(raw) > 18:
            raise InvalidArgument(f"since must be a version number, not {raw[:40]!r}")
        since = int(raw)
    return web.json_response(await request.app[COORDINATOR].identity_json(since))


async def list_cns(request: web.Request) -> web.Response:
    return web.json_response({"cns": await request.app[COORDINATOR].cns_json()})


async def post_cn_keys(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    return web.json_response(await c.add_cn_keys(request.match_info["cn"], await _body(request)))


async def delete_cn(request: web.Request) -> web.Response:
    key = request.query.get("key")
    # A '+' of the base64 fingerprint sent unquoted reads as a space: never one in base64.
    await request.app[COORDINATOR].remove_cn(request.match_info["cn"],
                                             None if key is None else key.replace(" ", "+"))
    return web.Response(status=204)


async def put_owner(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    return web.json_response(await c.assign(request.match_info["vm"], await _body(request)))


async def post_owners(request: web.Request) -> web.Response:
    return web.json_response(await request.app[COORDINATOR].sync_owners(await _body(request)))


async def post_grant(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    return web.json_response(await c.grant(await _body(request), request[PRINCIPAL].label),
                             status=201)


async def list_grants(request: web.Request) -> web.Response:
    return web.json_response({"grants": await request.app[COORDINATOR].grants_json()})


async def list_policies(request: web.Request) -> web.Response:
    return web.json_response({"policies": await request.app[COORDINATOR].policies_json()})


async def get_policy(request: web.Request) -> web.Response:
    return web.json_response(await request.app[COORDINATOR].policy_json(
        request.match_info["name"]))


async def put_policy(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    return web.json_response(await c.set_policy(request.match_info["name"],
                                                await _body(request), request[PRINCIPAL].label))


async def delete_policy(request: web.Request) -> web.Response:
    await request.app[COORDINATOR].remove_policy(request.match_info["name"],
                                                 request[PRINCIPAL].label)
    return web.Response(status=204)


async def metrics(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    await c.update_gauges()
    return web.Response(body=c.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


_OPERATOR = frozenset({"operator"})

# Every route with the roles that may call it; a test checks none is missing.
ROUTES: tuple[Route, ...] = (
    Route("GET", "/ping", ping, OPEN),
    Route("POST", "/v1/zones", post_zone, frozenset({"zone", PENDING_ZONE, "operator"})),
    Route("GET", "/v1/zones", list_zones, frozenset({"zone", "operator"})),
    Route("GET", "/v1/zones/{uuid}", get_zone, frozenset({"zone", PENDING_ZONE, "operator"})),
    Route("PUT", "/v1/zones/{uuid}/state", put_state, _OPERATOR),
    Route("PUT", "/v1/zones/{uuid}/host-key", put_host_key, _OPERATOR),
    Route("DELETE", "/v1/zones/{uuid}", delete_zone, _OPERATOR),
    Route("GET", "/v1/placement/{vm}", get_placement, frozenset({"cn", "zone", "operator"})),
    Route("GET", "/v1/moves", list_moves, _OPERATOR),
    Route("POST", "/v1/rebalance", post_rebalance, _OPERATOR),
    Route("GET", "/v1/status", get_status, _OPERATOR),
    Route("GET", "/v1/identity", get_identity, frozenset({"zone", "operator"})),
    Route("GET", "/v1/cns", list_cns, _OPERATOR),
    Route("POST", "/v1/cns/{cn}/keys", post_cn_keys, _OPERATOR),
    Route("DELETE", "/v1/cns/{cn}", delete_cn, _OPERATOR),
    Route("PUT", "/v1/vms/{vm}/owner", put_owner, _OPERATOR),
    Route("POST", "/v1/vms/owners", post_owners, _OPERATOR),
    Route("POST", "/v1/grants", post_grant, _OPERATOR),
    Route("GET", "/v1/grants", list_grants, _OPERATOR),
    Route("GET", "/v1/policies", list_policies, frozenset({"cn", "zone", "operator"})),
    Route("GET", "/v1/policies/{name}", get_policy, frozenset({"cn", "zone", "operator"})),
    Route("PUT", "/v1/policies/{name}", put_policy, _OPERATOR),
    Route("DELETE", "/v1/policies/{name}", delete_policy, _OPERATOR),
    Route("GET", "/metrics", metrics, OPEN),
)


def make_app(coordinator: Coordinator, signer: Signer,
             verifier: Verifier | None = None) -> web.Application:
    """``signer``: the coordinator's own key, which signs every answer."""
    app = web.Application(middlewares=[_errors])
    app[COORDINATOR] = coordinator
    app[SIGNER] = signer
    app[VERIFIER] = verifier or Verifier()
    add_routes(app, ROUTES)
    return app


# -- daemon -------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="snapper-coordinator", description="Snapper coordinator: zone registry, "
                "placement of each VM on two zones, health checks and moves.")
    p.add_argument("--config", required=True, metavar="FILE", help="coordinator config (TOML)")
    p.add_argument("--log-level", default="info",
                   help="trace, debug, info, warn, error or fatal (default: info)")
    p.add_argument("--ready-file", type=Path, metavar="PATH",
                   help='once listening, write {"pid", "http_port"} here (atomically)')
    return p


def _reload(coordinator: Coordinator, path: str) -> None:
    """SIGHUP: read the config again; a bad one is logged and changes nothing."""
    try:
        new = load_config(path)
    except ConfigError as e:
        log.error("config not reloaded: %s", e, extra={"config": path})
        return
    fixed = coordinator.reload(new)
    log.info("config reloaded", extra={"config": path, "live": list(LIVE_FIELDS),
                                       "keys": len(new.keys)})
    if fixed:
        log.warning("config changes that need a restart were not applied",
                    extra={"fields": fixed})


async def serve(config: CoordinatorConfig, args: argparse.Namespace) -> int:
    try:
        store = await open_store(config.store, session_timeout=config.session_timeout)
    except (OSError, RuntimeError, SnapperError) as e:
        raise StartupError(f"store {config.store}: {e}", EXIT_USAGE) from e
    ensure_private_key(config.key, "key", "snapper-coordinator", log)
    signer = Signer.load(config.key)
    api = HttpZoneApi(signer, request_timeout=max(config.health_timeout, 30.0),
                      sync_timeout=config.sync_timeout)
    coordinator = Coordinator(store, api, config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, coordinator, args.config)
    runner = web.AppRunner(make_app(coordinator, signer), access_log=None,
                           shutdown_timeout=HTTP_DRAIN)
    try:
        await coordinator.prepare()
        await runner.setup()
        await web.TCPSite(runner, config.host, config.port).start()
        port = int(runner.addresses[0][1])
        coordinator.set_port(port)
        await coordinator.join()
        coordinator.start()
        log.info("snapper-coordinator started", extra={
            "http_host": config.host, "http_port": port, "store": str(config.store),
            "coordinator": coordinator.me.id, "url": coordinator.me.url})
        if args.ready_file is not None:
            write_atomically(args.ready_file,
                             json.dumps({"pid": os.getpid(), "http_port": port}).encode() + b"\n")
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()
        # Moves in flight stop here; each resumes from its persisted step next start.
        await coordinator.stop()
        await api.close()
        await store.close()
    log.info("stopped")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    async def run(config: CoordinatorConfig, args: argparse.Namespace,
                  _log: logging.Logger) -> int:
        return await serve(config, args)

    return run_daemon("snapper-coordinator", _parser(), argv, load_config, run)

if __name__ == "__main__":
    sys.exit(main())
