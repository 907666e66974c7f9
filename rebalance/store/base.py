"""The coordinator's store: the narrow ``Store`` protocol, its records and errors.

``Store`` is what the coordinator, health checker and mover use; every
mutation is atomic (all of it or nothing). Two backends implement it:
``sqlite.SqliteStore`` (one file, the embedded default) and
``zookeeper.ZkStore`` (a ZooKeeper ensemble, for several coordinators).
``tests/test_coordinator_store.py`` is the one contract suite, run on both.

Several coordinators may share one store (ZooKeeper): ``Store.election``
elects the one that runs the mover, health checks and planning, and
``Store.fenced`` gives that leader a view of the store whose every mutation
commits only while its term lasts (``Fence``; ``NotLeader`` otherwise). On
SQLite one process owns the file: it is always the leader and a fenced view
is the store itself.

The zones' ZFS contents remain the truth about what exists: placement is
what the coordinator *wants*, and it can be rebuilt from the zones'
inventories (see ``coordinator.Coordinator.adopt_inventory``) if the store
is lost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Protocol

from rebalance.placement import Move, ZoneState
from snapper_zone.errors import SnapperError
from snapper_zone.wire import ZoneRegistration  # what a zone says about itself: POST /v1/zones

__all__ = [
    "Candidate",
    "CnNotFound",
    "CnRecord",
    "Election",
    "Fence",
    "GrantRecord",
    "HostKeyMismatch",
    "KeyInUse",
    "MoveRecord",
    "MoveState",
    "MoveStep",
    "NotLeader",
    "PlacementConflict",
    "PolicyNotFound",
    "PolicyRecord",
    "Registry",
    "SoloElection",
    "Store",
    "StoreUnavailable",
    "ZoneNotEmpty",
    "ZoneNotFound",
    "ZoneRecord",
    "ZoneRegistration",
    "add_keys",
    "drop_key",
    "key_identity",
    "next_move",
]


class ZoneNotFound(SnapperError):
    code = "ResourceNotFound"
    http_status = 404


class HostKeyMismatch(SnapperError):
    """A registration of a known zone with another host key than the one pinned."""

    code = "HostKeyMismatch"
    http_status = 409


def key_identity(line: str) -> str:
    """An OpenSSH public key line without its comment: what pinning compares."""
    return " ".join(line.split()[:2])


class CnNotFound(SnapperError):
    """A CN (or one of its keys) the registry does not hold."""

    code = "ResourceNotFound"
    http_status = 404


class KeyInUse(SnapperError):
    """A key already registered for another CN: one key, one identity."""

    code = "KeyInUse"
    http_status = 409


class ZoneNotEmpty(SnapperError):
    code = "ZoneNotEmpty"
    http_status = 409


class StoreUnavailable(SnapperError):
    """The store cannot be reached now (ZooKeeper connection or session lost, or no
    answer in time). For a write the outcome is unknown: read again before retrying."""

    code = "StoreUnavailable"
    http_status = 503


class NotLeader(SnapperError):
    """Leader-only work asked of a follower, or a fenced write whose term is over
    (the leader's election znode is gone: its session expired or it resigned).
    The write changed nothing."""

    code = "NotLeader"
    http_status = 503


@dataclass(frozen=True, slots=True)
class Fence:
    """One leadership term: the leader's election znode and the version it was
    created with. A fenced transaction checks both; the znode is ephemeral and
    its name is never reused, so once the term is over no check can pass again."""

    path: str
    version: int = 0


@dataclass(frozen=True, slots=True)
class Candidate:
    """A coordinator standing in the election: its id and the URL it serves on."""

    id: str
    url: str

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "url": self.url}


class Election(Protocol):
    """Who of the coordinators sharing a store leads (runs the background work)."""

    me: Candidate  # may be replaced until join() (the port is known late)
    # True: this process is the only possible leader (SQLite); it leads at once.
    solo: bool

    async def join(self) -> None:
        """Stand as a candidate (idempotent); campaign() joins if need be."""
        ...

    async def campaign(self) -> Fence:
        """Until this candidate leads: the fence of its term."""
        ...

    async def deposed(self, fence: Fence) -> None:
        """Returns once the term of ``fence`` is over or can no longer be proven
        (its znode gone, the session lost, the connection suspended)."""
        ...

    async def candidates(self) -> list[Candidate]:
        """Every candidate, the leader first (then the order they would take over)."""
        ...

    async def resign(self) -> None:
        """Leave the election (a clean stop: a follower takes over at once)."""
        ...


class SoloElection:
    """The election of a store only one process opens (SQLite): it always leads."""

    solo = True
    FENCE = Fence("", 0)

    def __init__(self, me: Candidate) -> None:
        self.me = me
        self._resigned: asyncio.Event | None = None

    async def join(self) -> None:
        return None

    async def campaign(self) -> Fence:
        return self.FENCE

    async def deposed(self, fence: Fence) -> None:
        if self._resigned is None:
            self._resigned = asyncio.Event()
        await self._resigned.wait()

    async def candidates(self) -> list[Candidate]:
        return [self.me]

    async def resign(self) -> None:
        if self._resigned is not None:
            self._resigned.set()


class PlacementConflict(SnapperError):
    """The placement changed under a move (another move, an operator)."""

    code = "PlacementConflict"
    http_status = 409


class MoveState(StrEnum):
    PLANNED = "planned"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class MoveStep(StrEnum):
    """Where a running move is; persisted before the step starts."""

    COPY = "copy"
    VERIFY = "verify"
    DELETE = "delete"  # placement already switched (same transaction as this step)


@dataclass(frozen=True, slots=True)
class ZoneRecord:
    uuid: str
    name: str
    ssh_host: str
    ssh_port: int
    http_url: str
    host_key: str
    capacity: int
    state: ZoneState
    registered: float
    suspect_since: float | None = None
    last_seen: float | None = None
    used: int | None = None  # observed by the health check (None: never seen)
    free: int | None = None

    @property
    def admitted(self) -> bool:
        """An operator activated it: it may hold copies and its key is trusted."""
        return self.state is not ZoneState.PENDING

    @property
    def readable(self) -> bool:
        """Its inventory and copies count: admitted and not lost."""
        return self.admitted and self.state is not ZoneState.LOST

    @property
    def health(self) -> str:
        if self.suspect_since is not None:
            return "down" if self.state is ZoneState.LOST else "suspect"
        return "healthy" if self.last_seen is not None else "unknown"

    def endpoint(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "ssh_host": self.ssh_host, "ssh_port": self.ssh_port,
                "http_url": self.http_url, "host_key": self.host_key}


@dataclass(frozen=True, slots=True)
class MoveRecord:
    id: int
    vm: str
    from_zone: str | None
    to_zone: str
    source: str
    bytes: int
    reason: str
    state: MoveState
    step: MoveStep | None
    progress: int
    error: str | None
    attempts: int
    created: float
    updated: float
    started: float | None
    finished: float | None

    @property
    def active(self) -> bool:
        return self.state in (MoveState.PLANNED, MoveState.RUNNING)

    def eta(self, now: float) -> float | None:
        """Seconds left at the average rate so far, while copying."""
        if self.state is not MoveState.RUNNING or self.started is None:
            return None
        if self.progress <= 0 or self.progress >= self.bytes:
            return None
        rate = self.progress / max(now - self.started, 1e-3)
        return (self.bytes - self.progress) / rate

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        eta = self.eta(time.time() if now is None else now)
        return {"id": self.id, "vm": self.vm, "from_zone": self.from_zone,
                "to_zone": self.to_zone, "source": self.source, "bytes": self.bytes,
                "reason": self.reason, "state": str(self.state),
                "step": None if self.step is None else str(self.step),
                "progress": self.progress, "error": self.error, "attempts": self.attempts,
                "created": self.created, "updated": self.updated, "started": self.started,
                "finished": self.finished, "eta": None if eta is None else round(eta, 1)}


@dataclass(frozen=True, slots=True)
class CnRecord:
    """A compute node in the registry: its id (a Triton server uuid, or any
    ``cn_id``) and the OpenSSH public key lines it may sign with."""

    id: str
    keys: tuple[str, ...]
    added: float

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "keys": list(self.keys), "added": self.added}


@dataclass(frozen=True, slots=True)
class GrantRecord:
    """An operator's leave for CN ``cn`` to restore VM ``vm`` (not its own) until
    ``expires`` (epoch seconds)."""

    vm: str
    cn: str
    expires: float
    granted_by: str
    created: float

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "cn": self.cn, "expires": self.expires,
                "granted_by": self.granted_by, "created": self.created}


@dataclass(frozen=True, slots=True)
class Registry:
    """Who is who, as one consistent read: ``version`` grows with every change
    of a CN, an owner or a grant (what zones poll for)."""

    version: int
    cns: tuple[CnRecord, ...] = ()
    owners: Mapping[str, str] = field(default_factory=dict)  # vm -> cn id
    grants: tuple[GrantRecord, ...] = ()  # those in force at the read's ``now``


def add_keys(cns: Iterable[CnRecord], cn: str, keys: Sequence[str],
             now: float) -> CnRecord:
    """``Store.add_cn_keys``'s rule, one for every backend: the CN with ``keys``
    added (created if new); KeyInUse when another CN holds one of them."""
    have = {c.id: c for c in cns}
    wanted = {key_identity(k): k.strip() for k in keys}
    for other in have.values():
        if other.id != cn:
            taken = wanted.keys() & {key_identity(k) for k in other.keys}
            if taken:
                raise KeyInUse(f"key {sorted(taken)[0][:40]}... is CN {other.id}'s; "
                               "one key belongs to one CN")
    old = have.get(cn)
    mine = list(old.keys) if old is not None else []
    known = {key_identity(k) for k in mine}
    mine += [line for ident, line in wanted.items() if ident not in known]
    return CnRecord(cn, tuple(mine), old.added if old is not None else now)


def drop_key(old: CnRecord | None, cn: str, key: str | None) -> CnRecord | None:
    """``Store.remove_cn``'s rule: None (the whole CN goes), or the CN without
    ``key``; CnNotFound for a CN or key it does not hold."""
    if old is None:
        raise CnNotFound(f"CN {cn} is not registered")
    if key is None:
        return None
    left = tuple(k for k in old.keys if key_identity(k) != key_identity(key))
    if len(left) == len(old.keys):
        raise CnNotFound(f"CN {cn} has no such key")
    return replace(old, keys=left)


class PolicyNotFound(SnapperError):
    code = "PolicyNotFound"
    http_status = 404


@dataclass(frozen=True, slots=True)
class PolicyRecord:
    """The registry's copy of a policy file (``snapper_zone/policy/spec.py``'s
    document, as JSON), by name. ``version`` grows by one with every write of it:
    an agent or zone can tell it has the newest."""

    name: str
    document: Mapping[str, Any]
    version: int
    updated: float
    updated_by: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "document": dict(self.document), "version": self.version,
                "updated": self.updated, "updated_by": self.updated_by}


class Store(Protocol):
    """The coordinator's state; every mutation is atomic."""

    async def zones(self) -> list[ZoneRecord]: ...
    async def zone(self, uuid: str) -> ZoneRecord | None: ...
    async def upsert_zone(self, reg: ZoneRegistration, now: float) -> tuple[ZoneRecord, bool]:
        """Register (state ``pending``, its host key pinned) or update a known zone's
        endpoint, name and capacity (state, health and host key are kept); True when
        it is new. Raises HostKeyMismatch, changing nothing, when ``reg`` carries
        another host key than the pinned one."""
        ...
    async def set_host_key(self, uuid: str, host_key: str) -> ZoneRecord:
        """Pin another host key (an operator's rotation); the only way to change it."""
        ...
    async def set_zone_state(self, uuid: str, state: ZoneState) -> ZoneRecord: ...
    async def set_zone_health(self, uuid: str, *, last_seen: float | None,
                              suspect_since: float | None, used: int | None = None,
                              free: int | None = None) -> ZoneRecord: ...
    async def delete_zone(self, uuid: str) -> None:
        """Refused (ZoneNotEmpty) while a placement or an active move names it."""
        ...

    async def placement(self, vm: str) -> tuple[str, str] | None: ...
    async def placements(self) -> dict[str, tuple[str, str]]: ...
    async def vm_sizes(self) -> dict[str, int]: ...
    async def place(self, vm: str, zones: tuple[str, str], size: int = 0) -> tuple[str, str]:
        """Record ``vm -> zones`` unless it is placed already; the placement in force."""
        ...
    async def set_sizes(self, sizes: dict[str, int]) -> None: ...
    async def reassign(self, vm: str, expected: tuple[str, str], new: tuple[str, str]) -> None:
        """Placement ``expected -> new`` with no move: a VM with no data yet, or one
        whose placement follows the zones that hold its copies."""
        ...

    async def add_moves(self, moves: Sequence[Move], now: float) -> list[MoveRecord]: ...
    async def moves(self, states: Iterable[MoveState] | None = None, *,
                    after: int | None = None, limit: int | None = None) -> list[MoveRecord]:
        """Moves by id, oldest first: of ``states`` (None: all), with an id above
        ``after``, at most ``limit`` of them (a page: ``GET /v1/moves``'s marker)."""
        ...
    async def move_counts(self) -> dict[MoveState, int]:
        """How many moves there are in each state, without reading finished ones."""
        ...
    async def prune_moves(self, finished_before: float, keep: int) -> int:
        """Forget finished moves (done, failed) that finished before ``finished_before``,
        except the ``keep`` newest finished ones; how many went."""
        ...
    async def move(self, move_id: int) -> MoveRecord | None: ...
    async def update_move(self, move_id: int, now: float, *, state: MoveState | None = None,
                          step: MoveStep | None = None, progress: int | None = None,
                          error: str | None = None, clear_error: bool = False,
                          attempt: bool = False) -> MoveRecord: ...
    async def switch_placement(self, move_id: int, vm: str, expected: tuple[str, str],
                               new: tuple[str, str], now: float) -> MoveRecord:
        """Placement ``expected -> new`` and the move to step ``delete``, in one transaction.

        Raises PlacementConflict when the placement is no longer ``expected``.
        """
        ...

    # -- identity: CNs, VM owners, restore grants (one ``Registry``) --

    async def registry(self, now: float) -> Registry:
        """Every CN, owner and grant in force at ``now``, read as one."""
        ...
    async def registry_version(self) -> int:
        """The version ``registry`` would say (cheap: what a zone polls)."""
        ...
    async def add_cn_keys(self, cn: str, keys: Sequence[str], now: float) -> CnRecord:
        """Register CN ``cn`` (if new) with ``keys`` added; KeyInUse, changing nothing,
        when another CN holds one of them (compared without comments)."""
        ...
    async def remove_cn(self, cn: str, key: str | None = None) -> CnRecord | None:
        """Remove one key of a CN, or (``key`` None) the CN with its keys and
        grants (its VMs keep naming it: nobody can act on them). CnNotFound."""
        ...
    async def assign_vms(self, owners: Mapping[str, str]) -> int:
        """VM -> owning CN, for each given; the count that changed. CnNotFound,
        changing nothing, when one names a CN not registered."""
        ...
    async def add_grant(self, grant: GrantRecord) -> GrantRecord:
        """Record (or replace) the grant for (vm, cn); CnNotFound for an unknown CN.
        Expired grants of the VM are dropped on the way."""
        ...

    async def policies(self) -> list[PolicyRecord]:
        """Every policy, by name."""
        ...
    async def policy(self, name: str) -> PolicyRecord | None: ...
    async def put_policy(self, name: str, document: Mapping[str, Any], updated_by: str,
                         now: float) -> PolicyRecord:
        """Create or replace (version + 1); the document is checked by the caller."""
        ...
    async def delete_policy(self, name: str) -> None:
        """PolicyNotFound when there is none of that name."""
        ...

    def fenced(self, fence: Fence) -> Store:
        """This store, every mutation of which also checks ``fence`` in its own
        transaction: NotLeader (nothing changed) once that term is over. Reads
        are the store's. SQLite: the store itself (one process, always leader)."""
        ...

    def election(self, me: Candidate) -> Election:
        """The election among the coordinators sharing this store."""
        ...

    async def close(self) -> None: ...


def next_move(old: MoveRecord, now: float, *, state: MoveState | None = None,
              step: MoveStep | None = None, progress: int | None = None,
              error: str | None = None, clear_error: bool = False,
              attempt: bool = False) -> MoveRecord:
    """``Store.update_move``'s rule, one for every backend: ``started`` set by the
    first ``running``, ``finished`` by ``done`` or ``failed``."""
    new = replace(old, updated=now)
    if state is not None:
        new = replace(new, state=state)
        if state is MoveState.RUNNING and old.started is None:
            new = replace(new, started=now)
        if state in (MoveState.DONE, MoveState.FAILED):
            new = replace(new, finished=now)
    if step is not None:
        new = replace(new, step=step)
    if progress is not None:
        new = replace(new, progress=progress)
    if error is not None or clear_error:
        new = replace(new, error=error)
    if attempt:
        new = replace(new, attempts=old.attempts + 1)
    return new
