"""``Store`` on a ZooKeeper ensemble (kazoo), for coordinators that share state.

Layout under the chroot (``/snapper`` by default), JSON znodes:

    schema              the layout's version
    move-seq            the next move id (bumped, version-checked, in the
                        transaction that creates moves: ids are unique)
    zones/<uuid>        a ZoneRecord
    placement/<bucket>  {vm: [primary, mirror]} for the VMs hashed to it
                        (1024 buckets: see _BUCKETS)
    sizes/<bucket>      {vm: bytes}, the same buckets (apart from placement,
                        so a size update never races a placement change)
    moves/<id>          a MoveRecord (ids zero-padded: children sort by id)
    active/<id>         empty: the move is planned or running (what the mover
                        lists, without reading every finished move)
    failed/<id>         empty: the move failed (counts by state read no history;
                        added to a store laid out before it, at open)
    refs/<zone>/p-<vm>  the zone is in the VM's placement
    refs/<zone>/m-<id>  the zone is in an active move (from, to or source)
    identity            the registry's version (an integer): every transaction
                        that changes a CN, an owner or a grant sets it, checked
                        against the version read, so identity writers are
                        serialised and a reader can tell a torn read
    cns/<id>            a CN: {"keys": [OpenSSH lines], "added"}
    owners/<bucket>     {vm: cn id}, the placement's buckets
    grants/<vm>@<cn>    a restore grant: {"expires", "granted_by", "created"}
    policies/<name>     a policy file's document: {"document", "updated",
                        "updated_by"}; its version is the znode's version + 1

Every mutation is ONE ZooKeeper transaction (``multi``) whose ``set_data`` and
``delete`` carry the version read before: a concurrent writer makes it fail
whole, never half-applied. A failed version check (another writer, or
another VM of the same bucket) is read again and decided as the SQLite
backend decides it (``PlacementConflict`` when the placement is
no longer the expected one; a concurrent health or progress write is just
retried). ``refs`` make "delete a zone only while nothing names it" atomic:
the transaction deletes ``refs/<zone>``, which ZooKeeper refuses while it has
children, so no scan of the placement is needed and none can race.

Two writes are chunked into several transactions because one ZooKeeper
request is limited to about 1 MB: ``set_sizes`` (each bucket whole; each
VM's size stands alone) and ``add_moves`` of a large plan (each move whole;
a crash between chunks records part of a plan, the next rebalance plans the
rest).

Several coordinators share a chroot; ``election/`` holds one ephemeral
sequential znode per coordinator (``n-<guid>-<seq>``, data ``{id, url}``), and
the lowest leads (``ZkElection``). A leader's fenced view (``fenced``) puts a
``check`` of its own znode and version first in every transaction it commits:
once its session is gone the znode is gone, the check fails, and the whole
transaction with it (``NotLeader``), so a deposed leader's step in flight
cannot land after a follower took over.

kazoo is threaded (a connection thread; its sync calls block). The event loop
must never wait on the network, so calls go through kazoo's async results,
awaited via ``loop.call_soon_threadsafe``; only connect and close, which have
no async form, run in ``asyncio.to_thread``. Every call is bounded by
``timeout``: a lost connection or session is ``StoreUnavailable`` (503),
never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import hashlib
import json
import logging
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, TypeVar

from kazoo.client import KazooClient, TransactionRequest
from kazoo.exceptions import (
    BadVersionError,
    ConnectionClosedError,
    ConnectionLoss,
    NodeExistsError,
    NoNodeError,
    NotEmptyError,
    OperationTimeoutError,
    RolledBackError,
    SessionExpiredError,
)
from kazoo.protocol.states import KazooState, ZnodeStat

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
    NotLeader,
    PlacementConflict,
    PolicyNotFound,
    PolicyRecord,
    Registry,
    StoreUnavailable,
    ZoneNotEmpty,
    ZoneNotFound,
    ZoneRecord,
    ZoneRegistration,
    add_keys,
    drop_key,
    key_identity,
    next_move,
)

__all__ = ["SCHEMA_VERSION", "ZkElection", "ZkStore", "vm_bucket"]

log = logging.getLogger("snapper.coordinator.store")
T = TypeVar("T")
SCHEMA_VERSION = 1
# VMs per znode: a whole placement read is one get per bucket (kazoo manages a
# few thousand gets a second, too slow for 100k VMs one znode each), while a
# write rewrites one small bucket (~10 kB at 100k VMs). Fixed by the schema.
_BUCKETS = 1024
_DIRS = ("zones", "placement", "sizes", "moves", "active", "refs", "failed", "election")
# The identity registry's, created on every open (a chroot laid out before them
# gains them; schema 1 stands, older coordinators just ignore them).
_IDENTITY_DIRS = ("cns", "owners", "grants", "policies")
_ACTIVE = frozenset({MoveState.PLANNED, MoveState.RUNNING})
# Below ZooKeeper's 1 MB request limit with room to spare (a sizes bucket is
# ~5 kB at 100k VMs, a move with its index and refs ~600 bytes).
_BUCKETS_PER_TXN = 16
_MOVES_PER_TXN = 200
# Version races (not conflicts) are retried; this many in a row means a writer
# is hammering one record, which never happens in a healthy fleet.
_MAX_RACES = 200
# What says the ensemble is out of reach (the outcome of a write is unknown).
_UNREACHABLE = (ConnectionLoss, SessionExpiredError, ConnectionClosedError,
                OperationTimeoutError)


class _Race(Exception):
    """Someone wrote between our read and our transaction: read again."""


def _name(kind: str, value: str) -> str:
    """A path component, checked (ids come validated; a '/' must never reach a path)."""
    if not value or "/" in value or value in (".", ".."):
        raise ValueError(f"{kind} {value!r}: not usable as a ZooKeeper node name")
    return value


def _dump(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _zone_bytes(z: ZoneRecord) -> bytes:
    return _dump({**asdict(z), "state": str(z.state)})


def _zone_of(data: bytes) -> ZoneRecord:
    d = json.loads(data)
    return ZoneRecord(**{**d, "state": ZoneState(d["state"])})


def _move_bytes(m: MoveRecord) -> bytes:
    d = asdict(m)
    del d["id"]  # the node's name
    return _dump({**d, "state": str(m.state), "step": None if m.step is None else str(m.step)})


def _move_of(move_id: int, data: bytes) -> MoveRecord:
    d = json.loads(data)
    return MoveRecord(id=move_id, **{**d, "state": MoveState(d["state"]),
                                     "step": None if d["step"] is None else MoveStep(d["step"])})


def _move_zones(m: Move | MoveRecord) -> set[str]:
    return {z for z in (m.from_zone, m.to_zone, m.source) if z is not None}


def vm_bucket(vm: str) -> str:
    """The bucket of placement/ and sizes/ that holds ``vm`` (stable hash)."""
    h = int.from_bytes(hashlib.blake2b(vm.encode(), digest_size=4).digest(), "big")
    return f"{h % _BUCKETS:03x}"


@dataclass(slots=True)
class _Bucket:
    """One bucket znode as read: ``version`` None when it does not exist yet."""

    path: str
    data: dict[str, Any]
    version: int | None

    def write(self, t: TransactionRequest, data: dict[str, Any]) -> None:
        """Create it, or replace it if it is still the version read."""
        if self.version is None:
            t.create(self.path, _dump(data))
        else:
            t.set_data(self.path, _dump(data), self.version)


class ZkStore:
    """``Store`` on ZooKeeper; ``await ZkStore.open(hosts, chroot)`` connects."""

    def __init__(self, client: KazooClient, chroot: str, timeout: float) -> None:
        self._zk = client
        self.chroot = chroot.rstrip("/") or "/"
        self.timeout = timeout
        self._refs_known: set[str] = set()  # refs/<zone> dirs seen to exist
        # Sessions the ensemble expired; kazoo then opens a new one by itself.
        # Nothing here is tied to a session (no ephemeral nodes), so the store
        # simply works again; calls meanwhile were StoreUnavailable.
        self.sessions_lost = 0
        self._closing = False
        # Set on a leader's fenced view (``fenced``): checked by every transaction.
        self._fence: Fence | None = None
        client.add_listener(self._state)

    def _state(self, state: KazooState) -> None:
        # On kazoo's thread: only count and log. stop() reports LOST too.
        if self._closing:
            return
        if state == KazooState.LOST:
            self.sessions_lost += 1
            log.warning("ZooKeeper session lost", extra={"chroot": self.chroot})
        elif state == KazooState.SUSPENDED:
            log.warning("ZooKeeper connection lost", extra={"chroot": self.chroot})

    @classmethod
    async def open(cls, hosts: str, chroot: str = "/snapper", *, timeout: float = 10.0,
                   session_timeout: float = 6.0) -> ZkStore:
        """Connect (within ``timeout`` s, else StoreUnavailable) and lay out the chroot."""
        client = KazooClient(hosts=hosts, timeout=session_timeout)
        try:
            # start() blocks until connected: a thread, not the loop. On timeout
            # it stops its own connection thread.
            await asyncio.to_thread(client.start, timeout)
        except client.handler.timeout_exception as e:
            raise StoreUnavailable(f"ZooKeeper {hosts}: no connection in {timeout:g} s") from e
        store = cls(client, chroot, timeout)
        try:
            await store._layout()
        except BaseException:
            await store.close()
            raise
        return store

    # -- plumbing --

    def _p(self, *parts: str) -> str:
        return "/".join((self.chroot.rstrip("/"), *parts)) if parts else self.chroot

    async def _wait_all(self, start: Callable[[], Sequence[Any]]) -> list[Any]:
        """Start kazoo async calls and wait for all: each its value or its exception.

        One future per batch (not per call): the last callback, on kazoo's
        thread, hands the batch to the loop."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        try:
            pending = list(start())
        except _UNREACHABLE as e:  # a closed client refuses at once
            raise StoreUnavailable(f"ZooKeeper: {type(e).__name__}") from e
        left = [len(pending)]
        lock = threading.Lock()

        def settle() -> None:
            if not done.done():
                done.set_result(None)

        def one(_: Any) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                loop.call_soon_threadsafe(settle)

        if pending:
            for r in pending:
                r.rawlink(one)
            try:
                async with asyncio.timeout(self.timeout):
                    await asyncio.shield(done)
            except TimeoutError as e:
                raise StoreUnavailable(f"ZooKeeper: no answer in {self.timeout:g} s "
                                       f"(state {self._zk.state})") from e
        out = [r.value if r.successful() else r.exception for r in pending]
        for x in out:
            if isinstance(x, _UNREACHABLE):
                raise StoreUnavailable(f"ZooKeeper: {type(x).__name__} "
                                       f"(state {self._zk.state})") from x
        return out

    async def _one(self, start: Callable[[], Any]) -> Any:
        [x] = await self._wait_all(lambda: [start()])
        if isinstance(x, BaseException):
            raise x
        return x

    async def _get(self, path: str) -> tuple[bytes, ZnodeStat] | None:
        x = (await self._wait_all(lambda: [self._zk.get_async(path)]))[0]
        if isinstance(x, NoNodeError):
            return None
        if isinstance(x, BaseException):
            raise x
        return (x[0], x[1])

    async def _get_many(self, paths: Sequence[str]) -> list[bytes | None]:
        """Pipelined reads (one round trip's latency for all): None where absent."""
        out: list[bytes | None] = []
        for i in range(0, len(paths), 5000):
            got = await self._wait_all(functools.partial(self._start_gets, paths[i:i + 5000]))
            for x in got:
                if isinstance(x, NoNodeError):
                    out.append(None)
                elif isinstance(x, BaseException):
                    raise x
                else:
                    out.append(x[0])
        return out

    def _start_gets(self, paths: Sequence[str]) -> list[Any]:
        return [self._zk.get_async(p) for p in paths]

    async def _children(self, path: str) -> list[str]:
        return list(await self._one(lambda: self._zk.get_children_async(path)))

    async def _commit(self, build: Callable[[TransactionRequest], object]) -> None:
        """One transaction; its failing operation's exception (never RolledBackError).
        On a fenced view the term's check comes first: NotLeader when it fails."""
        t = self._zk.transaction()
        fence = self._fence
        if fence is not None:
            t.check(fence.path, fence.version)
        build(t)
        results = await self._one(t.commit_async)
        if fence is not None and isinstance(results[0], Exception) \
                and not isinstance(results[0], RolledBackError):
            raise NotLeader(f"leadership term {fence.path.rsplit('/', 1)[-1]} is over "
                            f"({type(results[0]).__name__}): nothing was written")
        for r in results:
            if isinstance(r, Exception) and not isinstance(r, RolledBackError):
                raise r

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        for _ in range(_MAX_RACES):
            try:
                return await attempt()
            except _Race:
                continue
        raise StoreUnavailable(f"ZooKeeper: {_MAX_RACES} write races in a row on one record")

    async def _ensure_refs(self, zones: Iterable[str]) -> None:
        """``refs/<zone>`` exists for each (a zone the store never registered too:
        placement does not require registration, as in SQLite)."""
        missing = [z for z in zones if z not in self._refs_known]
        got = await self._wait_all(lambda: [
            self._zk.create_async(self._p("refs", _name("zone", z))) for z in missing])
        for z, x in zip(missing, got, strict=True):
            if isinstance(x, BaseException) and not isinstance(x, NodeExistsError):
                raise x
            self._refs_known.add(z)

    async def _layout(self) -> None:
        schema = await self._get(self._p("schema"))
        if schema is not None:
            version = int(schema[0])
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"ZooKeeper {self.chroot}: store schema {version} is newer "
                                   f"than this coordinator's ({SCHEMA_VERSION})")
            await self._index_failed()
            await self._identity_layout()
            return
        # Idempotent: coordinators starting together both get through; schema last,
        # so whoever sees it sees every directory.
        paths = [self._p(d) for d in _DIRS]
        await self._one(lambda: self._zk.ensure_path_async(self._p()))
        for batch in ([(p, b"") for p in paths], [(self._p("move-seq"), b"1")],
                      [(self._p("schema"), str(SCHEMA_VERSION).encode())]):
            got = await self._wait_all(lambda b=batch: [  # type: ignore[misc]
                self._zk.create_async(p, v) for p, v in b])
            for x in got:
                if isinstance(x, BaseException) and not isinstance(x, NodeExistsError):
                    raise x
        await self._identity_layout()

    async def _identity_layout(self) -> None:
        got = await self._wait_all(lambda: [
            self._zk.create_async(p, v) for p, v in
            [(self._p(d), b"") for d in _IDENTITY_DIRS] + [(self._p("identity"), b"0")]])
        for x in got:
            if isinstance(x, BaseException) and not isinstance(x, NodeExistsError):
                raise x

    async def _index_failed(self) -> None:
        """A store laid out before ``failed/`` existed: index its failed moves once."""
        if await self._get(self._p("failed")) is not None:
            return
        names = sorted(await self._children(self._p("moves")))
        got = await self._get_many([self._p("moves", n) for n in names])
        failed = [n for n, d in zip(names, got, strict=True)
                  if d is not None and _move_of(int(n), d).state is MoveState.FAILED]
        # Children first under a temporary name would need a rename ZooKeeper lacks:
        # the directory, then its entries (a coordinator meanwhile counts a few less).
        for batch in ([self._p("failed")], [self._p("failed", n) for n in failed]):
            for x in await self._wait_all(lambda b=batch: [  # type: ignore[misc]
                    self._zk.create_async(p) for p in b]):
                if isinstance(x, BaseException) and not isinstance(x, NodeExistsError):
                    raise x

    def fenced(self, fence: Fence) -> ZkStore:
        """A view on the same client whose every transaction checks ``fence`` first."""
        view = copy.copy(self)  # shares the client and the refs cache
        view._fence = fence
        return view

    def election(self, me: Candidate) -> ZkElection:
        return ZkElection(self, me)

    async def close(self) -> None:
        if self._fence is not None:
            return  # a view: the store it came from owns the client
        self._closing = True

        def stop() -> None:
            self._zk.stop()
            self._zk.close()
        await asyncio.to_thread(stop)

    # -- zones --

    async def zones(self) -> list[ZoneRecord]:
        names = sorted(await self._children(self._p("zones")))
        got = await self._get_many([self._p("zones", n) for n in names])
        return [_zone_of(d) for d in got if d is not None]

    async def _zone(self, uuid: str) -> tuple[ZoneRecord, int] | None:
        got = await self._get(self._p("zones", _name("zone", uuid)))
        return None if got is None else (_zone_of(got[0]), got[1].version)

    async def zone(self, uuid: str) -> ZoneRecord | None:
        got = await self._zone(uuid)
        return None if got is None else got[0]

    async def upsert_zone(self, reg: ZoneRegistration, now: float) -> tuple[ZoneRecord, bool]:
        path = self._p("zones", _name("zone", reg.uuid))

        async def attempt() -> tuple[ZoneRecord, bool]:
            got = await self._zone(reg.uuid)
            if got is None:
                z = ZoneRecord(uuid=reg.uuid, name=reg.name, ssh_host=reg.ssh_host,
                               ssh_port=reg.ssh_port, http_url=reg.http_url,
                               host_key=reg.host_key, capacity=reg.capacity,
                               state=ZoneState.PENDING, registered=now)
                await self._ensure_refs([reg.uuid])
                try:
                    await self._commit(lambda t: t.create(path, _zone_bytes(z)))
                except NodeExistsError as e:
                    raise _Race from e  # registered meanwhile: update it instead
                return z, True
            old, version = got
            if key_identity(old.host_key) != key_identity(reg.host_key):
                # Whoever knows a zone's uuid must not take over its endpoint.
                raise HostKeyMismatch(
                    f"zone {reg.uuid} is registered with another host key; a key is "
                    "changed only by an operator (snapper zone rekey)")
            z = replace(old, name=reg.name, ssh_host=reg.ssh_host, ssh_port=reg.ssh_port,
                        http_url=reg.http_url, capacity=reg.capacity)
            await self._set_zone(z, version)
            return z, False
        return await self._retrying(attempt)

    async def _set_zone(self, z: ZoneRecord, version: int) -> None:
        path = self._p("zones", z.uuid)
        try:
            await self._commit(lambda t: t.set_data(path, _zone_bytes(z), version))
        except (BadVersionError, NoNodeError) as e:
            raise _Race from e

    async def _update_zone(self, uuid: str, fn: Callable[[ZoneRecord], ZoneRecord]) -> ZoneRecord:
        async def attempt() -> ZoneRecord:
            got = await self._zone(uuid)
            if got is None:
                raise ZoneNotFound(f"zone {uuid} is not registered")
            z = fn(got[0])
            await self._set_zone(z, got[1])
            return z
        return await self._retrying(attempt)

    async def set_host_key(self, uuid: str, host_key: str) -> ZoneRecord:
        return await self._update_zone(uuid, lambda z: replace(z, host_key=host_key))

    async def set_zone_state(self, uuid: str, state: ZoneState) -> ZoneRecord:
        return await self._update_zone(uuid, lambda z: replace(z, state=state))

    async def set_zone_health(self, uuid: str, *, last_seen: float | None,
                              suspect_since: float | None, used: int | None = None,
                              free: int | None = None) -> ZoneRecord:
        return await self._update_zone(uuid, lambda z: replace(
            z, last_seen=last_seen, suspect_since=suspect_since,
            used=z.used if used is None else used, free=z.free if free is None else free))

    async def delete_zone(self, uuid: str) -> None:
        zpath, rpath = self._p("zones", _name("zone", uuid)), self._p("refs", uuid)

        async def attempt() -> None:
            got = await self._zone(uuid)
            if got is None:
                raise ZoneNotFound(f"zone {uuid} is not registered")
            await self._ensure_refs([uuid])  # a zone registered before refs existed
            try:
                # refs/<zone> is deleted only while empty: the check and the delete
                # are one step, so no placement or move can slip in between.
                await self._commit(lambda t: (t.delete(zpath, got[1]), t.delete(rpath)))
            except NotEmptyError as e:
                refs = await self._children(rpath)
                placed = sum(r.startswith("p-") for r in refs)
                raise ZoneNotEmpty(f"zone {uuid} still holds {placed} VM copies and is part "
                                   f"of {len(refs) - placed} active moves; drain it "
                                   "first") from e
            except (BadVersionError, NoNodeError) as e:
                raise _Race from e
            self._refs_known.discard(uuid)
        await self._retrying(attempt)

    # -- placement --

    async def _buckets(self, kinds: Sequence[str], vm: str) -> list[_Bucket]:
        """The VM's bucket of each kind ("placement", "sizes"), read together."""
        paths = [self._p(k, vm_bucket(vm)) for k in kinds]
        got = await self._wait_all(functools.partial(self._start_gets, paths))
        out = []
        for path, x in zip(paths, got, strict=True):
            if isinstance(x, NoNodeError):
                out.append(_Bucket(path, {}, None))
            elif isinstance(x, BaseException):
                raise x
            else:
                out.append(_Bucket(path, json.loads(x[0]), x[1].version))
        return out

    async def _all_buckets(self, kind: str) -> dict[str, Any]:
        names = await self._children(self._p(kind))
        merged: dict[str, Any] = {}
        for data in await self._get_many([self._p(kind, n) for n in names]):
            if data is not None:
                merged.update(json.loads(data))
        return merged

    async def placement(self, vm: str) -> tuple[str, str] | None:
        [b] = await self._buckets(["placement"], _name("vm", vm))
        pair = b.data.get(vm)
        return None if pair is None else (pair[0], pair[1])

    async def placements(self) -> dict[str, tuple[str, str]]:
        got = await self._all_buckets("placement")
        return {vm: (got[vm][0], got[vm][1]) for vm in sorted(got)}

    async def vm_sizes(self) -> dict[str, int]:
        return {vm: int(b) for vm, b in (await self._all_buckets("sizes")).items()}

    async def place(self, vm: str, zones: tuple[str, str], size: int = 0) -> tuple[str, str]:
        if zones[0] == zones[1]:
            raise ValueError(f"vm {vm}: both copies on zone {zones[0]}")
        _name("vm", vm)

        async def attempt() -> tuple[str, str]:
            pb, sb = await self._buckets(["placement", "sizes"], vm)
            if vm in pb.data:
                return (pb.data[vm][0], pb.data[vm][1])
            await self._ensure_refs(zones)

            def build(t: TransactionRequest) -> None:
                pb.write(t, {**pb.data, vm: list(zones)})
                sb.write(t, {**sb.data, vm: size})
                for z in zones:
                    t.create(self._p("refs", z, f"p-{vm}"))
            try:
                await self._commit(build)
            except (NodeExistsError, BadVersionError) as e:
                # Two CNs asking at once (the first wins: read it), or another VM
                # of the same bucket written meanwhile.
                raise _Race from e
            except NoNodeError as e:
                self._refs_known.difference_update(zones)  # a refs dir went with its zone
                raise _Race from e
            return zones
        return await self._retrying(attempt)

    async def set_sizes(self, sizes: dict[str, int]) -> None:
        by_bucket: dict[str, list[str]] = {}
        for vm in sizes:
            by_bucket.setdefault(vm_bucket(_name("vm", vm)), []).append(vm)
        names = sorted(by_bucket)
        paths = [self._p("sizes", n) for n in names]

        async def attempt() -> None:
            got = await self._wait_all(functools.partial(self._start_gets, paths))
            writes: list[tuple[_Bucket, dict[str, int]]] = []
            for name, path, x in zip(names, paths, got, strict=True):
                if isinstance(x, NoNodeError):
                    continue  # no VM of it is placed
                if isinstance(x, BaseException):
                    raise x
                b = _Bucket(path, json.loads(x[0]), x[1].version)
                # Unplaced VMs are skipped (as SQLite's UPDATE does), unchanged ones
                # too: every ZooKeeper write goes through the quorum's disks.
                new = {vm: sizes[vm] for vm in by_bucket[name]
                       if vm in b.data and b.data[vm] != sizes[vm]}
                if new:
                    writes.append((b, {**b.data, **new}))
            # Each bucket whole, in as few transactions as the request limit allows;
            # a bucket written meanwhile is read again (those done read as unchanged).
            for i in range(0, len(writes), _BUCKETS_PER_TXN):
                chunk = writes[i:i + _BUCKETS_PER_TXN]

                def build(t: TransactionRequest,
                          chunk: list[tuple[_Bucket, dict[str, int]]] = chunk) -> None:
                    for b, d in chunk:
                        b.write(t, d)
                try:
                    await self._commit(build)
                except (BadVersionError, NodeExistsError) as e:
                    raise _Race from e
        await self._retrying(attempt)

    def _swap_refs(self, t: TransactionRequest, vm: str, old: tuple[str, str],
                   new: tuple[str, str]) -> None:
        for z in set(old) - set(new):
            t.delete(self._p("refs", z, f"p-{vm}"))
        for z in set(new) - set(old):
            t.create(self._p("refs", z, f"p-{vm}"))

    async def _cas(self, vm: str, expected: tuple[str, str], new: tuple[str, str],
                   more: Callable[[], Awaitable[Callable[[TransactionRequest], None]]]
                   | None = None) -> None:
        """Placement ``expected -> new`` (plus ``more``'s operations) in one transaction."""
        if new[0] == new[1]:
            raise ValueError(f"vm {vm}: both copies on zone {new[0]}")
        _name("vm", vm)

        async def attempt() -> None:
            [b] = await self._buckets(["placement"], vm)
            pair = b.data.get(vm)
            current = None if pair is None else (pair[0], pair[1])
            if current is None or current != expected:
                raise PlacementConflict(f"vm {vm}: placement is {current}, expected {expected}")
            extra = None if more is None else await more()
            await self._ensure_refs(new)

            def build(t: TransactionRequest) -> None:
                b.write(t, {**b.data, vm: list(new)})
                self._swap_refs(t, vm, current, new)
                if extra is not None:
                    extra(t)
            try:
                await self._commit(build)
            except BadVersionError as e:
                raise _Race from e  # decided again on what is there now
            except (NoNodeError, NodeExistsError) as e:
                self._refs_known.difference_update(new)
                raise _Race from e
        await self._retrying(attempt)

    async def reassign(self, vm: str, expected: tuple[str, str], new: tuple[str, str]) -> None:
        await self._cas(vm, expected, new)

    async def switch_placement(self, move_id: int, vm: str, expected: tuple[str, str],
                               new: tuple[str, str], now: float) -> MoveRecord:
        out: list[MoveRecord] = []

        async def step() -> Callable[[TransactionRequest], None]:
            got = await self._move(move_id)
            if got is None:
                raise KeyError(f"move {move_id}")
            m = replace(got[0], step=MoveStep.DELETE, updated=now)
            out[:] = [m]
            return lambda t: t.set_data(self._p("moves", f"{move_id:010d}"), _move_bytes(m),
                                        got[1])
        await self._cas(vm, expected, new, step)
        return out[0]

    # -- moves --

    async def add_moves(self, moves: Sequence[Move], now: float) -> list[MoveRecord]:
        out: list[MoveRecord] = []
        for i in range(0, len(moves), _MOVES_PER_TXN):
            out += await self._retrying(functools.partial(
                self._add_chunk, moves[i:i + _MOVES_PER_TXN], now))
        return out

    async def _add_chunk(self, moves: Sequence[Move], now: float) -> list[MoveRecord]:
        seq = await self._get(self._p("move-seq"))
        if seq is None:
            raise StoreUnavailable(f"ZooKeeper {self.chroot}: move-seq is missing")
        first = int(seq[0])
        records = [MoveRecord(id=first + i, vm=m.vm, from_zone=m.from_zone, to_zone=m.to_zone,
                              source=m.source, bytes=m.bytes, reason=m.reason,
                              state=MoveState.PLANNED, step=None, progress=0, error=None,
                              attempts=0, created=now, updated=now, started=None,
                              finished=None) for i, m in enumerate(moves)]
        zones = set().union(*(_move_zones(m) for m in moves))
        await self._ensure_refs(zones)

        def build(t: TransactionRequest) -> None:
            t.set_data(self._p("move-seq"), str(first + len(moves)).encode(), seq[1].version)
            for m in records:
                name = f"{m.id:010d}"
                t.create(self._p("moves", name), _move_bytes(m))
                t.create(self._p("active", name))
                for z in _move_zones(m):
                    t.create(self._p("refs", z, f"m-{name}"))
        try:
            await self._commit(build)
        except BadVersionError as e:
            raise _Race from e  # another coordinator took these ids
        except NoNodeError as e:
            self._refs_known.difference_update(zones)
            raise _Race from e
        return records

    async def moves(self, states: Iterable[MoveState] | None = None, *,
                    after: int | None = None, limit: int | None = None) -> list[MoveRecord]:
        wanted = None if states is None else {MoveState(s) for s in states}
        # The indexes list a state's moves without reading the others.
        where = ("active" if wanted is not None and wanted <= _ACTIVE else
                 "failed" if wanted == {MoveState.FAILED} else "moves")
        names = sorted(n for n in await self._children(self._p(where))
                       if after is None or int(n) > after)
        out: list[MoveRecord] = []
        # A page reads only as far as it needs: chunks until ``limit`` match.
        chunk = len(names) if limit is None else max(limit, 1 if wanted is None else 200)
        for i in range(0, len(names), max(chunk, 1)):
            part = names[i:i + chunk]
            got = await self._get_many([self._p("moves", n) for n in part])
            out += [m for m in (_move_of(int(n), d) for n, d in zip(part, got, strict=True)
                                if d is not None) if wanted is None or m.state in wanted]
            if limit is not None and len(out) >= limit:
                return out[:limit]
        return out

    async def move_counts(self) -> dict[MoveState, int]:
        # Listed in this order, a move finishing meanwhile is counted once at most.
        total = len(await self._children(self._p("moves")))
        active = await self.moves(_ACTIVE)
        failed = len(await self._children(self._p("failed")))
        counts = {s: sum(1 for m in active if m.state is s) for s in _ACTIVE}
        return {**counts, MoveState.FAILED: failed,
                MoveState.DONE: max(total - len(active) - failed, 0)}

    async def prune_moves(self, finished_before: float, keep: int) -> int:
        listed = await self._children(self._p("moves"))
        active = set(await self._children(self._p("active")))
        finished = sorted(n for n in listed if n not in active)
        candidates = finished[:max(len(finished) - keep, 0)]
        pruned = 0
        for i in range(0, len(candidates), _MOVES_PER_TXN):
            part = candidates[i:i + _MOVES_PER_TXN]
            got = await self._wait_all(functools.partial(
                self._start_gets, [self._p("moves", n) for n in part]))
            old: list[tuple[str, int, bool]] = []
            for n, x in zip(part, got, strict=True):
                if isinstance(x, BaseException):
                    continue  # gone meanwhile (another coordinator pruned it)
                m = _move_of(int(n), x[0])
                if not m.active and m.finished is not None and m.finished < finished_before:
                    old.append((n, x[1].version, m.state is MoveState.FAILED))
            if not old:
                continue

            def build(t: TransactionRequest, old: list[tuple[str, int, bool]] = old) -> None:
                for n, version, failed in old:
                    t.delete(self._p("moves", n), version)
                    if failed:
                        t.delete(self._p("failed", n))
            try:
                await self._commit(build)
            except (BadVersionError, NoNodeError):
                continue  # pruned or written meanwhile: the next pass sees it again
            pruned += len(old)
        return pruned

    async def _move(self, move_id: int) -> tuple[MoveRecord, int] | None:
        got = await self._get(self._p("moves", f"{move_id:010d}"))
        return None if got is None else (_move_of(move_id, got[0]), got[1].version)

    async def move(self, move_id: int) -> MoveRecord | None:
        got = await self._move(move_id)
        return None if got is None else got[0]

    async def update_move(self, move_id: int, now: float, *, state: MoveState | None = None,
                          step: MoveStep | None = None, progress: int | None = None,
                          error: str | None = None, clear_error: bool = False,
                          attempt: bool = False) -> MoveRecord:
        name = f"{move_id:010d}"

        async def once() -> MoveRecord:
            got = await self._move(move_id)
            if got is None:
                raise KeyError(f"move {move_id}")
            old, version = got
            new = next_move(old, now, state=state, step=step, progress=progress, error=error,
                            clear_error=clear_error, attempt=attempt)
            if new.active and not old.active:
                await self._ensure_refs(_move_zones(new))

            def build(t: TransactionRequest) -> None:
                t.set_data(self._p("moves", name), _move_bytes(new), version)
                # The active index and the zones' refs follow the state, in the
                # same transaction.
                if old.active != new.active:
                    op = t.create if new.active else t.delete
                    op(self._p("active", name))
                    for z in _move_zones(new):
                        op(self._p("refs", z, f"m-{name}"))
                failed = new.state is MoveState.FAILED
                if failed != (old.state is MoveState.FAILED):
                    (t.create if failed else t.delete)(self._p("failed", name))
            try:
                await self._commit(build)
            except (BadVersionError, NoNodeError, NodeExistsError) as e:
                self._refs_known.difference_update(_move_zones(new))
                raise _Race from e
            return new
        return await self._retrying(once)


    # -- identity --

    async def _identity(self) -> tuple[int, int]:
        """The registry's version and its znode's (what a writer checks)."""
        got = await self._get(self._p("identity"))
        if got is None:
            raise StoreUnavailable(f"ZooKeeper {self.chroot}: identity is missing")
        return int(got[0] or b"0"), got[1].version

    async def registry_version(self) -> int:
        return (await self._identity())[0]

    async def _cns(self) -> list[CnRecord]:
        names = sorted(await self._children(self._p("cns")))
        got = await self._get_many([self._p("cns", n) for n in names])
        out = []
        for n, d in zip(names, got, strict=True):
            if d is not None:
                doc = json.loads(d)
                out.append(CnRecord(n, tuple(doc["keys"]), float(doc["added"])))
        return out

    async def _grants(self) -> list[GrantRecord]:
        names = sorted(await self._children(self._p("grants")))
        got = await self._get_many([self._p("grants", n) for n in names])
        out = []
        for n, d in zip(names, got, strict=True):
            if d is not None:
                vm, _, cn = n.partition("@")
                doc = json.loads(d)
                out.append(GrantRecord(vm, cn, float(doc["expires"]), str(doc["granted_by"]),
                                       float(doc["created"])))
        return out

    async def registry(self, now: float) -> Registry:
        async def attempt() -> Registry:
            version, _ = await self._identity()
            cns = await self._cns()
            owners = await self._all_buckets("owners")
            grants = [g for g in await self._grants() if g.expires > now]
            if (await self._identity())[0] != version:
                raise _Race  # a writer between the reads: read it all again
            return Registry(version, tuple(cns), dict(sorted(owners.items())), tuple(grants))
        return await self._retrying(attempt)

    async def _identity_commit(self, version: tuple[int, int],
                               build: Callable[[TransactionRequest], None]) -> None:
        """``build``'s writes and the registry's version bump, as one transaction;
        any identity write since ``version`` was read makes it a race."""
        def with_bump(t: TransactionRequest) -> None:
            build(t)
            t.set_data(self._p("identity"), str(version[0] + 1).encode(), version[1])
        try:
            await self._commit(with_bump)
        except (BadVersionError, NoNodeError, NodeExistsError) as e:
            raise _Race from e

    async def add_cn_keys(self, cn: str, keys: Sequence[str], now: float) -> CnRecord:
        path = self._p("cns", _name("cn", cn))

        async def attempt() -> CnRecord:
            version = await self._identity()
            cns = await self._cns()
            new = add_keys(cns, cn, keys, now)
            data = _dump({"keys": list(new.keys), "added": new.added})
            exists = any(c.id == cn for c in cns)
            await self._identity_commit(version, lambda t: (
                t.set_data(path, data) if exists else t.create(path, data)))
            return new
        return await self._retrying(attempt)

    async def remove_cn(self, cn: str, key: str | None = None) -> CnRecord | None:
        path = self._p("cns", _name("cn", cn))

        async def attempt() -> CnRecord | None:
            version = await self._identity()
            old = next((c for c in await self._cns() if c.id == cn), None)
            new = drop_key(old, cn, key)
            gone = [g for g in await self._grants() if g.cn == cn] if new is None else []

            def build(t: TransactionRequest) -> None:
                if new is None:
                    t.delete(path)
                    for g in gone:
                        t.delete(self._p("grants", f"{g.vm}@{g.cn}"))
                else:
                    t.set_data(path, _dump({"keys": list(new.keys), "added": new.added}))
            await self._identity_commit(version, build)
            return new
        return await self._retrying(attempt)

    async def assign_vms(self, owners: Mapping[str, str]) -> int:
        by_bucket: dict[str, list[str]] = {}
        for vm in owners:
            by_bucket.setdefault(vm_bucket(_name("vm", vm)), []).append(vm)
        names = sorted(by_bucket)
        paths = [self._p("owners", n) for n in names]
        changed: set[str] = set()  # over retries: a chunk committed stays counted

        async def attempt() -> None:
            version = await self._identity()
            known = {c.id for c in await self._cns()}
            missing = sorted(set(owners.values()) - known)
            if missing:
                raise CnNotFound(f"CN {missing[0]} is not registered (snapper cn add)")
            got = await self._wait_all(functools.partial(self._start_gets, paths))
            writes: list[tuple[_Bucket, dict[str, str]]] = []
            for name, path, x in zip(names, paths, got, strict=True):
                if isinstance(x, BaseException) and not isinstance(x, NoNodeError):
                    raise x
                b = _Bucket(path, {}, None) if isinstance(x, NoNodeError) else \
                    _Bucket(path, json.loads(x[0]), x[1].version)
                new = {vm: owners[vm] for vm in by_bucket[name] if b.data.get(vm) != owners[vm]}
                if new:
                    writes.append((b, {**b.data, **new}))
            # Each chunk of buckets one transaction with its own version bump (the
            # 1 MB request limit); a crash between chunks leaves each VM's owner
            # whole, and a sync again does the rest.
            for i in range(0, len(writes), _BUCKETS_PER_TXN):
                chunk = writes[i:i + _BUCKETS_PER_TXN]

                def build(t: TransactionRequest,
                          chunk: list[tuple[_Bucket, dict[str, str]]] = chunk) -> None:
                    for b, d in chunk:
                        b.write(t, d)
                await self._identity_commit(version, build)
                version = (version[0] + 1, version[1] + 1)
                for b, d in chunk:
                    changed.update(vm for vm, cn in d.items() if b.data.get(vm) != cn)
        await self._retrying(attempt)
        return len(changed)

    async def add_grant(self, grant: GrantRecord) -> GrantRecord:
        path = self._p("grants", f"{_name('vm', grant.vm)}@{_name('cn', grant.cn)}")

        async def attempt() -> GrantRecord:
            version = await self._identity()
            if not any(c.id == grant.cn for c in await self._cns()):
                raise CnNotFound(f"CN {grant.cn} is not registered (snapper cn add)")
            mine = [g for g in await self._grants() if g.vm == grant.vm]
            data = _dump({"expires": grant.expires, "granted_by": grant.granted_by,
                          "created": grant.created})

            def build(t: TransactionRequest) -> None:
                for g in mine:
                    if g.cn != grant.cn and g.expires <= grant.created:
                        t.delete(self._p("grants", f"{g.vm}@{g.cn}"))
                if any(g.cn == grant.cn for g in mine):
                    t.set_data(path, data)
                else:
                    t.create(path, data)
            await self._identity_commit(version, build)
            return grant
        return await self._retrying(attempt)

    # -- policies --

    def _policy_of(self, name: str, data: bytes, stat: ZnodeStat) -> PolicyRecord:
        doc = json.loads(data)
        return PolicyRecord(name, doc["document"], stat.version + 1, float(doc["updated"]),
                            str(doc["updated_by"]))

    async def policies(self) -> list[PolicyRecord]:
        names = sorted(await self._children(self._p("policies")))
        got = await self._wait_all(functools.partial(
            self._start_gets, [self._p("policies", n) for n in names]))
        out = []
        for n, x in zip(names, got, strict=True):
            if isinstance(x, NoNodeError):
                continue  # deleted between the listing and the read
            if isinstance(x, BaseException):
                raise x
            out.append(self._policy_of(n, x[0], x[1]))
        return out

    async def policy(self, name: str) -> PolicyRecord | None:
        got = await self._get(self._p("policies", _name("policy", name)))
        return None if got is None else self._policy_of(name, *got)

    async def put_policy(self, name: str, document: Mapping[str, Any], updated_by: str,
                         now: float) -> PolicyRecord:
        path = self._p("policies", _name("policy", name))
        data = _dump({"document": dict(document), "updated": now, "updated_by": updated_by})

        async def attempt() -> PolicyRecord:
            old = await self._get(path)
            try:
                if old is None:
                    await self._commit(lambda t: t.create(path, data))
                else:
                    await self._commit(lambda t: t.set_data(path, data, old[1].version))
            except (BadVersionError, NoNodeError, NodeExistsError) as e:
                raise _Race from e  # another writer: read again, write over it
            version = 1 if old is None else old[1].version + 2
            return PolicyRecord(name, dict(document), version, now, updated_by)
        return await self._retrying(attempt)

    async def delete_policy(self, name: str) -> None:
        path = self._p("policies", _name("policy", name))
        try:
            await self._commit(lambda t: t.delete(path))
        except NoNodeError as e:
            raise PolicyNotFound(f"no policy {name!r}") from e


# -- leader election ---------------------------------------------------------------------

_ELECTION = "election"
# How often a waiting candidate or leader looks again without an event: only a
# safety net for a watch that never came; watches and state changes wake it.
_RECHECK = 5.0


def _seq(name: str) -> int:
    return int(name.rsplit("-", 1)[-1])


class ZkElection:
    """Leader election on ephemeral sequential znodes under ``election/``.

    Our own recipe rather than kazoo's ``Election``/``Lock``: those block a
    thread in ``run()`` and hide the znode, while fencing needs the leader's
    znode path and version, and the coordinator's loop needs to await each
    term's start and end. Each candidate watches only the one just ahead of
    it (no herd when the leader goes); a guid in the name finds our own node
    again after a create whose answer was lost.
    """

    solo = False

    def __init__(self, store: ZkStore, me: Candidate) -> None:
        self._s = store
        self.me = me
        self._guid = uuid.uuid4().hex
        self._name: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        store._zk.add_listener(self._state)

    def _poke(self, *_: object) -> None:
        # On kazoo's thread (a watch, a state change): wake the loop's waiter.
        loop, changed = self._loop, self._changed
        if loop is not None and changed is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(changed.set)

    def _state(self, state: KazooState) -> None:
        self._poke()

    def _events(self) -> asyncio.Event:
        if self._changed is None:
            self._loop = asyncio.get_running_loop()
            self._changed = asyncio.Event()
        return self._changed

    def _path(self, *name: str) -> str:
        return self._s._p(_ELECTION, *name)

    async def _wait(self, changed: asyncio.Event) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_RECHECK):
                await changed.wait()

    async def _names(self) -> list[str]:
        names = await self._s._children(self._path())
        return sorted((n for n in names if n.startswith("n-")), key=_seq)

    async def join(self) -> None:
        self._events()
        zk = self._s._zk
        await self._s._one(lambda: zk.ensure_path_async(self._path()))  # an older chroot
        mine = [n for n in await self._names() if n.startswith(f"n-{self._guid}-")]
        if mine:  # an earlier create landed though its answer was lost
            self._name = mine[0]
            return
        data = _dump(self.me.to_json())
        path = await self._s._one(lambda: zk.create_async(
            self._path(f"n-{self._guid}-"), data, ephemeral=True, sequence=True))
        self._name = str(path).rsplit("/", 1)[-1]
        log.info("standing for election", extra={"candidate": self.me.id, "node": self._name})

    async def campaign(self) -> Fence:
        changed = self._events()
        zk = self._s._zk
        while True:
            changed.clear()
            if zk.state == KazooState.CONNECTED:
                try:
                    fence = await self._lead_or_watch()
                except StoreUnavailable:
                    fence = None
                if fence is not None:
                    return fence
            await self._wait(changed)

    async def _lead_or_watch(self) -> Fence | None:
        """Our term's fence if we lead now; else a watch set on the one ahead."""
        zk = self._s._zk
        if self._name is None:
            await self.join()
        names = await self._names()
        if self._name not in names:  # our session expired: stand again
            self._name = None
            await self.join()
            names = await self._names()
        assert self._name is not None
        i = names.index(self._name)
        mine = self._path(self._name)
        if i == 0:
            stat = await self._s._one(lambda: zk.exists_async(mine))
            return None if stat is None else Fence(mine, stat.version)
        ahead = self._path(names[i - 1])
        await self._s._one(lambda: zk.exists_async(ahead, watch=self._poke))
        return None  # gone already or not: look again (the watch, or at once)

    async def deposed(self, fence: Fence) -> None:
        changed = self._events()
        zk = self._s._zk
        while True:
            changed.clear()
            # Suspended: the session may be expiring and a follower about to
            # lead; stop before that can happen rather than after.
            if zk.state != KazooState.CONNECTED:
                return
            try:
                stat = await self._s._one(lambda: zk.exists_async(fence.path,
                                                                  watch=self._poke))
            except StoreUnavailable:
                return
            if stat is None or stat.version != fence.version:
                return
            await self._wait(changed)

    async def candidates(self) -> list[Candidate]:
        names = await self._names()
        out = []
        for data in await self._s._get_many([self._path(n) for n in names]):
            if data is not None:
                d = json.loads(data)
                out.append(Candidate(str(d["id"]), str(d["url"])))
        return out

    async def resign(self) -> None:
        name, self._name = self._name, None
        if name is not None:
            got = await self._s._wait_all(lambda: [self._s._zk.delete_async(self._path(name))])
            if isinstance(got[0], BaseException) and not isinstance(got[0], NoNodeError):
                raise got[0]
        self._poke()
