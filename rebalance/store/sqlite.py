"""``Store`` on one SQLite file: WAL mode, one transaction per mutation, so a
crash leaves either the old or the new state of each call, never a half.

Every call runs its blocking sqlite work in a thread (``asyncio.to_thread``)
under one lock, so the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from rebalance.placement import Move, ZoneState
from rebalance.store.base import (
    Candidate,
    CnNotFound,
    CnRecord,
    Fence,
    GrantRecord,
    HostKeyMismatch,
    MoveRecord,
    MoveState,
    MoveStep,
    PlacementConflict,
    PolicyNotFound,
    PolicyRecord,
    Registry,
    SoloElection,
    ZoneNotEmpty,
    ZoneNotFound,
    ZoneRecord,
    ZoneRegistration,
    add_keys,
    drop_key,
    key_identity,
    next_move,
)

T = TypeVar("T")


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
CREATE TABLE IF NOT EXISTS cns (
    id TEXT PRIMARY KEY,
    keys TEXT NOT NULL,  -- JSON list of OpenSSH public key lines
    added REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS owners (
    vm TEXT PRIMARY KEY,
    cn TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS grants (
    vm TEXT NOT NULL,
    cn TEXT NOT NULL,
    expires REAL NOT NULL,
    granted_by TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (vm, cn)
);
CREATE TABLE IF NOT EXISTS registry_version (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    version INTEGER NOT NULL
);
INSERT OR IGNORE INTO registry_version (one, version) VALUES (1, 0);
CREATE TABLE IF NOT EXISTS policies (
    name TEXT PRIMARY KEY,
    document TEXT NOT NULL,  -- JSON: the policy file's document
    version INTEGER NOT NULL,
    updated REAL NOT NULL,
    updated_by TEXT NOT NULL
);
"""
# 2: zone state 'pending' (admission). A version 1 store's zones were all let in
# before admission existed: they keep their states, i.e. count as admitted.
# 3: the identity registry (cns, owners, grants, registry_version): new tables only.
# 4: policies (the registry's copy of policy files): a new table only.
_SCHEMA_VERSION = 4
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

    def fenced(self, fence: Fence) -> SqliteStore:
        # One process owns the file: its term never ends while it runs.
        return self

    def election(self, me: Candidate) -> SoloElection:
        return SoloElection(me)

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

    async def moves(self, states: Iterable[MoveState] | None = None, *,
                    after: int | None = None, limit: int | None = None) -> list[MoveRecord]:
        where = ["id > ?"]
        params: list[object] = [-1 if after is None else after]
        if states is not None:
            wanted = [str(s) for s in states]
            where.append(f"state IN ({', '.join('?' * len(wanted))})")
            params += wanted
        tail = "" if limit is None else f" LIMIT {int(limit)}"

        def fn(db: sqlite3.Connection) -> list[MoveRecord]:
            return [_move(r) for r in db.execute(
                f"SELECT {_MOVE_COLS} FROM moves WHERE {' AND '.join(where)} ORDER BY id{tail}",
                params)]
        return await self._run(fn)

    async def move_counts(self) -> dict[MoveState, int]:
        def fn(db: sqlite3.Connection) -> dict[MoveState, int]:
            got = dict(db.execute("SELECT state, COUNT(*) FROM moves GROUP BY state").fetchall())
            return {s: int(got.get(str(s), 0)) for s in MoveState}
        return await self._run(fn)

    async def prune_moves(self, finished_before: float, keep: int) -> int:
        def fn(db: sqlite3.Connection) -> int:
            cur = db.execute(
                "DELETE FROM moves WHERE state IN ('done', 'failed') AND finished < ? AND id "
                "NOT IN (SELECT id FROM moves WHERE state IN ('done', 'failed') "
                "ORDER BY id DESC LIMIT ?)", (finished_before, keep))
            return int(cur.rowcount)
        return await self._txn(fn)

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
            new = next_move(self._get_move(db, move_id), now, state=state, step=step,
                            progress=progress, error=error, clear_error=clear_error,
                            attempt=attempt)
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

    # -- identity --

    @staticmethod
    def _cns(db: sqlite3.Connection) -> list[CnRecord]:
        return [CnRecord(r[0], tuple(json.loads(r[1])), r[2])
                for r in db.execute("SELECT id, keys, added FROM cns ORDER BY id")]

    @staticmethod
    def _bump(db: sqlite3.Connection) -> None:
        db.execute("UPDATE registry_version SET version = version + 1")

    @staticmethod
    def _version(db: sqlite3.Connection) -> int:
        return int(db.execute("SELECT version FROM registry_version").fetchone()[0])

    async def registry_version(self) -> int:
        return await self._run(self._version)

    async def registry(self, now: float) -> Registry:
        def fn(db: sqlite3.Connection) -> Registry:
            # One read transaction: the version and what it versions agree.
            db.execute("BEGIN")
            try:
                return Registry(
                    self._version(db), tuple(self._cns(db)),
                    {r[0]: r[1] for r in db.execute("SELECT vm, cn FROM owners ORDER BY vm")},
                    tuple(GrantRecord(*r) for r in db.execute(
                        "SELECT vm, cn, expires, granted_by, created FROM grants "
                        "WHERE expires > ? ORDER BY vm, cn", (now,))))
            finally:
                db.execute("COMMIT")
        return await self._run(fn)

    async def add_cn_keys(self, cn: str, keys: Sequence[str], now: float) -> CnRecord:
        def fn(db: sqlite3.Connection) -> CnRecord:
            new = add_keys(self._cns(db), cn, keys, now)
            db.execute("INSERT OR REPLACE INTO cns (id, keys, added) VALUES (?, ?, ?)",
                       (new.id, json.dumps(list(new.keys)), new.added))
            self._bump(db)
            return new
        return await self._txn(fn)

    async def remove_cn(self, cn: str, key: str | None = None) -> CnRecord | None:
        def fn(db: sqlite3.Connection) -> CnRecord | None:
            old = next((c for c in self._cns(db) if c.id == cn), None)
            new = drop_key(old, cn, key)
            if new is None:
                db.execute("DELETE FROM cns WHERE id=?", (cn,))
                db.execute("DELETE FROM grants WHERE cn=?", (cn,))
            else:
                db.execute("UPDATE cns SET keys=? WHERE id=?", (json.dumps(list(new.keys)), cn))
            self._bump(db)
            return new
        return await self._txn(fn)

    async def assign_vms(self, owners: Mapping[str, str]) -> int:
        def fn(db: sqlite3.Connection) -> int:
            known = {c.id for c in self._cns(db)}
            missing = sorted(set(owners.values()) - known)
            if missing:
                raise CnNotFound(f"CN {missing[0]} is not registered (snapper cn add)")
            n = 0
            for vm, cn in owners.items():
                row = db.execute("SELECT cn FROM owners WHERE vm=?", (vm,)).fetchone()
                if row is None or row[0] != cn:
                    db.execute("INSERT OR REPLACE INTO owners (vm, cn) VALUES (?, ?)",
                               (vm, cn))
                    n += 1
            if n:
                self._bump(db)
            return n
        return await self._txn(fn)

    async def add_grant(self, grant: GrantRecord) -> GrantRecord:
        def fn(db: sqlite3.Connection) -> GrantRecord:
            if db.execute("SELECT 1 FROM cns WHERE id=?", (grant.cn,)).fetchone() is None:
                raise CnNotFound(f"CN {grant.cn} is not registered (snapper cn add)")
            db.execute("DELETE FROM grants WHERE vm=? AND expires <= ?",
                       (grant.vm, grant.created))
            db.execute("INSERT OR REPLACE INTO grants (vm, cn, expires, granted_by, created) "
                       "VALUES (?, ?, ?, ?, ?)", (grant.vm, grant.cn, grant.expires,
                                                  grant.granted_by, grant.created))
            self._bump(db)
            return grant
        return await self._txn(fn)

    # -- policies --

    @staticmethod
    def _policy(row: sqlite3.Row) -> PolicyRecord:
        return PolicyRecord(row["name"], json.loads(row["document"]), row["version"],
                            row["updated"], row["updated_by"])

    async def policies(self) -> list[PolicyRecord]:
        return await self._run(lambda db: [self._policy(r) for r in db.execute(
            "SELECT name, document, version, updated, updated_by FROM policies ORDER BY name")])

    async def policy(self, name: str) -> PolicyRecord | None:
        def one(db: sqlite3.Connection) -> PolicyRecord | None:
            row = db.execute("SELECT name, document, version, updated, updated_by "
                             "FROM policies WHERE name=?", (name,)).fetchone()
            return None if row is None else self._policy(row)
        return await self._run(one)

    async def put_policy(self, name: str, document: Mapping[str, Any], updated_by: str,
                         now: float) -> PolicyRecord:
        def put(db: sqlite3.Connection) -> PolicyRecord:
            row = db.execute("SELECT version FROM policies WHERE name=?", (name,)).fetchone()
            rec = PolicyRecord(name, dict(document), (row[0] if row else 0) + 1, now,
                               updated_by)
            db.execute("INSERT OR REPLACE INTO policies (name, document, version, updated, "
                       "updated_by) VALUES (?, ?, ?, ?, ?)",
                       (name, json.dumps(rec.document, sort_keys=True), rec.version, now,
                        updated_by))
            return rec
        return await self._txn(put)

    async def delete_policy(self, name: str) -> None:
        def delete(db: sqlite3.Connection) -> None:
            if db.execute("DELETE FROM policies WHERE name=?", (name,)).rowcount == 0:
                raise PolicyNotFound(f"no policy {name!r}")
        await self._txn(delete)
