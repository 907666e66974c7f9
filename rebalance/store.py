"""The coordinator's durable state: zones, placement, moves.

``Store`` is the narrow interface the coordinator, health checker and mover
use; ``SqliteStore`` implements it on the standard library's sqlite3 (WAL
mode, one transaction per mutation, so a crash leaves either the old or the
new state of each call, never a half).  A later store (etcd, for an HA
coordinator) only has to implement the same Protocol.

The zones' ZFS contents remain the truth about what exists: placement is
what the coordinator *wants*, and it can be rebuilt from the zones'
inventories (see ``coordinator.Coordinator.adopt_inventory``) if this file
is lost.

Every call runs its blocking sqlite work in a thread (``asyncio.to_thread``)
under one lock, so the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, TypeVar

from rebalance.placement import Move, ZoneState
from snapper_zone.errors import SnapperError
from snapper_zone.wire import ZoneRegistration  # what a zone says about itself: POST /v1/zones

__all__ = [
    "HostKeyMismatch",
    "MoveRecord",
    "MoveState",
    "MoveStep",
    "PlacementConflict",
    "SqliteStore",
    "Store",
    "ZoneNotEmpty",
    "ZoneNotFound",
    "ZoneRecord",
    "ZoneRegistration",
]

T = TypeVar("T")


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


class ZoneNotEmpty(SnapperError):
    code = "ZoneNotEmpty"
    http_status = 409


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
    async def moves(self, states: Iterable[MoveState] | None = None) -> list[MoveRecord]: ...
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

    async def close(self) -> None: ...


_ZONES = """
CREATE TABLE IF NOT EXISTS {table} (
    uuid TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    ssh_host TEXT NOT NULL,
    ssh_port INTEGER NOT NULL,
    http_url TEXT NOT NULL,
    host_key TEXT NOT NULL,
    capacity INTEGER NOT NULL CHECK (capacity >= 0),
    state TEXT NOT NULL CHECK (state IN ('pending', 'active', 'draining', 'lost')),
    registered REAL NOT NULL,
    suspect_since REAL,
    last_seen REAL,
    used INTEGER,
    free INTEGER
);
"""
_SCHEMA = _ZONES.format(table="zones") + """
CREATE TABLE IF NOT EXISTS placement (
    vm TEXT PRIMARY KEY,
    primary_zone TEXT NOT NULL,
    mirror_zone TEXT NOT NULL,
    bytes INTEGER NOT NULL DEFAULT 0,
    CHECK (primary_zone != mirror_zone)
);
CREATE INDEX IF NOT EXISTS placement_primary ON placement (primary_zone);
CREATE INDEX IF NOT EXISTS placement_mirror ON placement (mirror_zone);
CREATE TABLE IF NOT EXISTS moves (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vm TEXT NOT NULL,
    from_zone TEXT,
    to_zone TEXT NOT NULL,
    source TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    reason TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('planned', 'running', 'done', 'failed')),
    step TEXT CHECK (step IS NULL OR step IN ('copy', 'verify', 'delete')),
    progress INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS moves_state ON moves (state);
"""
# 2: zone state 'pending' (admission). A version 1 store's zones were all let in
# before admission existed: they keep their states, i.e. count as admitted.
_SCHEMA_VERSION = 2
_ZONE_COLS = ("uuid, name, ssh_host, ssh_port, http_url, host_key, capacity, state, "
              "registered, suspect_since, last_seen, used, free")
_MOVE_COLS = ("id, vm, from_zone, to_zone, source, bytes, reason, state, step, progress, "
              "error, attempts, created, updated, started, finished")


def _zone(row: sqlite3.Row) -> ZoneRecord:
    return ZoneRecord(uuid=row["uuid"], name=row["name"], ssh_host=row["ssh_host"],
                      ssh_port=row["ssh_port"], http_url=row["http_url"],
                      host_key=row["host_key"], capacity=row["capacity"],
                      state=ZoneState(row["state"]), registered=row["registered"],
                      suspect_since=row["suspect_since"], last_seen=row["last_seen"],
                      used=row["used"], free=row["free"])


def _move(row: sqlite3.Row) -> MoveRecord:
    return MoveRecord(id=row["id"], vm=row["vm"], from_zone=row["from_zone"],
                      to_zone=row["to_zone"], source=row["source"], bytes=row["bytes"],
                      reason=row["reason"], state=MoveState(row["state"]),
                      step=None if row["step"] is None else MoveStep(row["step"]),
                      progress=row["progress"], error=row["error"], attempts=row["attempts"],
                      created=row["created"], updated=row["updated"], started=row["started"],
                      finished=row["finished"])


class SqliteStore:
    """``Store`` on one SQLite file (``":memory:"`` for a throwaway one)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        # One connection shared by the worker threads, serialised by the lock.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed switch of placement survives a power cut, which
        # matters more here than write speed (a few writes per move).
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > _SCHEMA_VERSION:
            raise RuntimeError(f"{self.path}: store schema {version} is newer than this "
                               f"coordinator's ({_SCHEMA_VERSION})")
        # SQLite cannot alter a CHECK: version 1's zones table is copied into
        # one that allows 'pending', rows and states unchanged.
        migrate = "" if version != 1 else (
            _ZONES.format(table="zones_v2") + f"INSERT INTO zones_v2 ({_ZONE_COLS}) "
            f"SELECT {_ZONE_COLS} FROM zones; DROP TABLE zones; "
            "ALTER TABLE zones_v2 RENAME TO zones;")
        with self._lock:
            self._db.executescript(f"BEGIN; {migrate} {_SCHEMA} "
                                   f"PRAGMA user_version={_SCHEMA_VERSION}; COMMIT;")

    # -- plumbing --

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(self._locked, fn)

    def _locked(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            return fn(self._db)

    async def _txn(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run(db: sqlite3.Connection) -> T:
            # IMMEDIATE: take the write lock first, so a check-then-write
            # cannot interleave with another writer on the same file.
            db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return out
        return await self._run(run)

    async def close(self) -> None:
        await self._run(lambda db: db.close())

    # -- zones --

    async def zones(self) -> list[ZoneRecord]:
        return await self._run(lambda db: [
            _zone(r) for r in db.execute(f"SELECT {_ZONE_COLS} FROM zones ORDER BY uuid")])

    @staticmethod
    def _get_zone(db: sqlite3.Connection, uuid: str) -> ZoneRecord | None:
        row = db.execute(f"SELECT {_ZONE_COLS} FROM zones WHERE uuid = ?", (uuid,)).fetchone()
        return None if row is None else _zone(row)

    def _must_zone(self, db: sqlite3.Connection, uuid: str) -> ZoneRecord:
        z = self._get_zone(db, uuid)
        if z is None:
            raise ZoneNotFound(f"zone {uuid} is not registered")
        return z

    async def zone(self, uuid: str) -> ZoneRecord | None:
        return await self._run(lambda db: self._get_zone(db, uuid))

    async def upsert_zone(self, reg: ZoneRegistration, now: float) -> tuple[ZoneRecord, bool]:
        def fn(db: sqlite3.Connection) -> tuple[ZoneRecord, bool]:
            old = self._get_zone(db, reg.uuid)
            if old is None:
                db.execute(f"INSERT INTO zones ({_ZONE_COLS}) VALUES "
                           "(?, ?, ?, ?, ?, ?, ?, 'pending', ?, NULL, NULL, NULL, NULL)",
                           (reg.uuid, reg.name, reg.ssh_host, reg.ssh_port, reg.http_url,
                            reg.host_key, reg.capacity, now))
            elif key_identity(old.host_key) != key_identity(reg.host_key):
                # Whoever knows a zone's uuid must not take over its endpoint.
                raise HostKeyMismatch(
                    f"zone {reg.uuid} is registered with another host key; a key is "
                    "changed only by an operator (snapper zone rekey)")
            else:
                db.execute("UPDATE zones SET name=?, ssh_host=?, ssh_port=?, http_url=?, "
                           "capacity=? WHERE uuid=?",
                           (reg.name, reg.ssh_host, reg.ssh_port, reg.http_url,
                            reg.capacity, reg.uuid))
            return self._must_zone(db, reg.uuid), old is None
        return await self._txn(fn)

    async def set_host_key(self, uuid: str, host_key: str) -> ZoneRecord:
        def fn(db: sqlite3.Connection) -> ZoneRecord:
            self._must_zone(db, uuid)
            db.execute("UPDATE zones SET host_key=? WHERE uuid=?", (host_key, uuid))
            return self._must_zone(db, uuid)
        return await self._txn(fn)

    async def set_zone_state(self, uuid: str, state: ZoneState) -> ZoneRecord:
        def fn(db: sqlite3.Connection) -> ZoneRecord:
            self._must_zone(db, uuid)
            db.execute("UPDATE zones SET state=? WHERE uuid=?", (str(state), uuid))
            return self._must_zone(db, uuid)
        return await self._txn(fn)

    async def set_zone_health(self, uuid: str, *, last_seen: float | None,
                              suspect_since: float | None, used: int | None = None,
                              free: int | None = None) -> ZoneRecord:
        def fn(db: sqlite3.Connection) -> ZoneRecord:
            self._must_zone(db, uuid)
            db.execute("UPDATE zones SET last_seen=?, suspect_since=?, "
                       "used=COALESCE(?, used), free=COALESCE(?, free) WHERE uuid=?",
                       (last_seen, suspect_since, used, free, uuid))
            return self._must_zone(db, uuid)
        return await self._txn(fn)

    async def delete_zone(self, uuid: str) -> None:
        def fn(db: sqlite3.Connection) -> None:
            self._must_zone(db, uuid)
            placed = db.execute("SELECT COUNT(*) FROM placement WHERE primary_zone=? OR "
                                "mirror_zone=?", (uuid, uuid)).fetchone()[0]
            moving = db.execute("SELECT COUNT(*) FROM moves WHERE state IN "
                                "('planned', 'running') AND (from_zone=? OR to_zone=? OR "
                                "source=?)", (uuid, uuid, uuid)).fetchone()[0]
            if placed or moving:
                raise ZoneNotEmpty(f"zone {uuid} still holds {placed} VM copies and is part "
                                   f"of {moving} active moves; drain it first")
            db.execute("DELETE FROM zones WHERE uuid=?", (uuid,))
        await self._txn(fn)

    # -- placement --

    async def placement(self, vm: str) -> tuple[str, str] | None:
        def fn(db: sqlite3.Connection) -> tuple[str, str] | None:
            row = db.execute("SELECT primary_zone, mirror_zone FROM placement WHERE vm=?",
                             (vm,)).fetchone()
            return None if row is None else (row[0], row[1])
        return await self._run(fn)

    async def placements(self) -> dict[str, tuple[str, str]]:
        return await self._run(lambda db: {
            r[0]: (r[1], r[2]) for r in db.execute(
                "SELECT vm, primary_zone, mirror_zone FROM placement ORDER BY vm")})

    async def vm_sizes(self) -> dict[str, int]:
        return await self._run(lambda db: {
            r[0]: r[1] for r in db.execute("SELECT vm, bytes FROM placement")})

    async def place(self, vm: str, zones: tuple[str, str], size: int = 0) -> tuple[str, str]:
        if zones[0] == zones[1]:
            raise ValueError(f"vm {vm}: both copies on zone {zones[0]}")

        def fn(db: sqlite3.Connection) -> tuple[str, str]:
            # Two CNs asking at once for a new VM get the same answer: the first wins.
            db.execute("INSERT OR IGNORE INTO placement (vm, primary_zone, mirror_zone, bytes) "
                       "VALUES (?, ?, ?, ?)", (vm, zones[0], zones[1], size))
            row = db.execute("SELECT primary_zone, mirror_zone FROM placement WHERE vm=?",
                             (vm,)).fetchone()
            return (row[0], row[1])
        return await self._txn(fn)

    async def set_sizes(self, sizes: dict[str, int]) -> None:
        def fn(db: sqlite3.Connection) -> None:
            db.executemany("UPDATE placement SET bytes=? WHERE vm=?",
                           [(b, vm) for vm, b in sizes.items()])
        await self._txn(fn)

    # -- moves --

    async def add_moves(self, moves: Sequence[Move], now: float) -> list[MoveRecord]:
        def fn(db: sqlite3.Connection) -> list[MoveRecord]:
            ids = []
            for m in moves:
                cur = db.execute(
                    "INSERT INTO moves (vm, from_zone, to_zone, source, bytes, reason, state, "
                    "created, updated) VALUES (?, ?, ?, ?, ?, ?, 'planned', ?, ?)",
                    (m.vm, m.from_zone, m.to_zone, m.source, m.bytes, m.reason, now, now))
                ids.append(cur.lastrowid)
            return [_move(db.execute(f"SELECT {_MOVE_COLS} FROM moves WHERE id=?",
                                     (i,)).fetchone()) for i in ids]
        return await self._txn(fn)

    async def moves(self, states: Iterable[MoveState] | None = None) -> list[MoveRecord]:
        wanted = None if states is None else [str(s) for s in states]

        def fn(db: sqlite3.Connection) -> list[MoveRecord]:
            if wanted is None:
                rows = db.execute(f"SELECT {_MOVE_COLS} FROM moves ORDER BY id")
            else:
                marks = ", ".join("?" * len(wanted))
                rows = db.execute(f"SELECT {_MOVE_COLS} FROM moves WHERE state IN ({marks}) "
                                  "ORDER BY id", wanted)
            return [_move(r) for r in rows]
        return await self._run(fn)

    @staticmethod
    def _get_move(db: sqlite3.Connection, move_id: int) -> MoveRecord:
        row = db.execute(f"SELECT {_MOVE_COLS} FROM moves WHERE id=?", (move_id,)).fetchone()
        if row is None:
            raise KeyError(f"move {move_id}")
        return _move(row)

    async def move(self, move_id: int) -> MoveRecord | None:
        def fn(db: sqlite3.Connection) -> MoveRecord | None:
            try:
                return self._get_move(db, move_id)
            except KeyError:
                return None
        return await self._run(fn)

    async def update_move(self, move_id: int, now: float, *, state: MoveState | None = None,
                          step: MoveStep | None = None, progress: int | None = None,
                          error: str | None = None, clear_error: bool = False,
                          attempt: bool = False) -> MoveRecord:
        def fn(db: sqlite3.Connection) -> MoveRecord:
            old = self._get_move(db, move_id)
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
            self._write_move(db, new)
            return new
        return await self._txn(fn)

    @staticmethod
    def _write_move(db: sqlite3.Connection, m: MoveRecord) -> None:
        db.execute("UPDATE moves SET state=?, step=?, progress=?, error=?, attempts=?, "
                   "updated=?, started=?, finished=? WHERE id=?",
                   (str(m.state), None if m.step is None else str(m.step), m.progress,
                    m.error, m.attempts, m.updated, m.started, m.finished, m.id))

    @staticmethod
    def _cas_placement(db: sqlite3.Connection, vm: str, expected: tuple[str, str],
                       new: tuple[str, str]) -> None:
        if new[0] == new[1]:
            raise ValueError(f"vm {vm}: both copies on zone {new[0]}")
        row = db.execute("SELECT primary_zone, mirror_zone FROM placement WHERE vm=?",
                         (vm,)).fetchone()
        current = None if row is None else (row[0], row[1])
        if current != expected:
            raise PlacementConflict(f"vm {vm}: placement is {current}, expected {expected}")
        db.execute("UPDATE placement SET primary_zone=?, mirror_zone=? WHERE vm=?",
                   (new[0], new[1], vm))

    async def reassign(self, vm: str, expected: tuple[str, str], new: tuple[str, str]) -> None:
        await self._txn(lambda db: self._cas_placement(db, vm, expected, new))

    async def switch_placement(self, move_id: int, vm: str, expected: tuple[str, str],
                               new: tuple[str, str], now: float) -> MoveRecord:
        def fn(db: sqlite3.Connection) -> MoveRecord:
            self._cas_placement(db, vm, expected, new)
            m = replace(self._get_move(db, move_id), step=MoveStep.DELETE, updated=now)
            self._write_move(db, m)
            return m
        return await self._txn(fn)
