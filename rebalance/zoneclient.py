"""What the coordinator asks of a snapper zone's HTTP API, as a typed interface.

``ZoneApi`` is the interface the mover, the health checker and the
coordinator use; ``HttpZoneApi`` speaks it to snapperd (``snapper_zone/httpapi.py``):

    GET    /ping                       {"ping": "pong", ...}
    GET    /v1/vms                     [{uuid, cn, snapshots, complete, bytes}]
    GET    /v1/vms/{vm}/snapshots      [VmSnapshot JSON] (``snapper_zone.wire``); 404 when
                                       the zone has no such VM
    GET    /v1/vms/{vm}/tombstones     [{guid, deleted}] (or the older {hex guid: time})
    POST   /v1/vms/{vm}/sync           {"peer": zone uuid} -> {vm, peer, state, error? |
                                       last_error?}; state "in_sync" when the peer has it all
    DELETE /v1/vms/{vm}                removes the zone's whole copy; 404 when absent
    GET    /v1/capacity                {available, used, ...}
    GET    /v1/transfers               [{vm, peer, bytes, ...}] in flight

Tests use an in-memory implementation of the same Protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from snapper_zone.common.httpsig import NoAnswer, Signer, call_json, signing_session
from snapper_zone.errors import SnapperError
from snapper_zone.wire import (
    InvalidDocument,
    elsewhere_to_json,
    snapshot_list_from_json,
    tombstones_from_json,
)

__all__ = [
    "HttpZoneApi",
    "InventoryVm",
    "SnapshotView",
    "SyncResult",
    "ZoneApi",
    "ZoneRequestFailed",
    "ZoneUnreachable",
    "parse_snapshots",
]



class ZoneUnreachable(SnapperError):
    code = "ZoneUnreachable"
    http_status = 503


class ZoneRequestFailed(SnapperError):
    """The zone answered with an error (its own ``{"code", "message"}``)."""

    code = "ZoneRequestFailed"
    http_status = 502

    def __init__(self, zone_url: str, status: int, zone_code: str, message: str) -> None:
        super().__init__(f"{zone_url}: {status} {zone_code}: {message}")
        self.status = status
        self.zone_code = zone_code


@dataclass(frozen=True, slots=True)
class InventoryVm:
    uuid: str
    bytes: int
    snapshots: int
    complete: int


@dataclass(frozen=True, slots=True)
class SnapshotView:
    """One VM snapshot as a zone lists it: what verification compares."""

    name: str
    complete: bool
    guids: Mapping[str, int]  # dataset label -> guid
    source: str | None = None
    created: int = 0


@dataclass(frozen=True, slots=True)
class SyncResult:
    vm: str
    peer: str
    state: str  # "in_sync" is done; anything else (behind, failing, blocked, ...) is not
    error: str | None = None


class ZoneApi(Protocol):
    """A zone is named by its HTTP base URL (``ZoneRecord.http_url``)."""

    async def ping(self, url: str, timeout: float) -> None: ...
    async def list_vms(self, url: str) -> list[InventoryVm]: ...
    async def snapshots(self, url: str, vm: str) -> list[SnapshotView] | None:
        """None when the zone holds no copy of ``vm``."""
        ...
    async def sync(self, url: str, vm: str, peer: str,
                   bwlimit: float | None = None) -> SyncResult:
        """Make ``url``'s zone reconcile ``vm`` with ``peer``; ``bwlimit`` bytes/s."""
        ...
    async def delete_vm(self, url: str, vm: str, elsewhere: Sequence[SnapshotView]) -> bool:
        """True when a copy was removed, False when there was none.

        ``elsewhere``: the snapshots the VM's other copy holds; the zone refuses
        (``CopyNotRedundant``) if its copy holds a complete one they lack. Always
        given: no copy is dropped without that check.
        """
        ...
    async def relearn_placement(self, url: str, vm: str) -> None:
        """Have the zone ask for ``vm``'s placement now (a move switched it)."""
        ...
    async def capacity(self, url: str) -> tuple[int, int]:
        """(used, available) bytes under the zone's root."""
        ...
    async def tombstones(self, url: str, vm: str) -> set[int]:
        """Part guids of ``vm`` deleted on purpose on that zone (none if no copy)."""
        ...
    async def sending(self, url: str, vm: str, peer: str) -> int:
        """Bytes sent so far by the zone's transfers of ``vm`` to ``peer`` in flight."""
        ...


def parse_snapshots(body: Any) -> list[SnapshotView]:
    """A zone's snapshot listing; ``wire.InvalidDocument`` when it is not one."""
    return [SnapshotView(name=s.name, complete=s.complete, guids=s.guids, source=s.source,
                         created=s.created) for s in snapshot_list_from_json(body)]


class HttpZoneApi:
    """``ZoneApi`` over aiohttp; one session for every zone, every request signed
    with the coordinator's key (zones know it as their ``coordinator_key``)."""

    def __init__(self, signer: Signer, request_timeout: float = 30.0,
                 sync_timeout: float = 6 * 3600.0) -> None:
        self.signer = signer
        self.request_timeout = request_timeout
        # A sync copies every snapshot of a VM: hours for a big one.
        self.sync_timeout = sync_timeout
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = signing_session(self.signer)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _call(self, method: str, url: str, path: str, *, json: Any = None,
                    timeout: float | None = None, allow_404: bool = False) -> Any:
        full = url.rstrip("/") + path
        try:
            got = await call_json(self._http(), method, full, body=json,
                                  timeout=timeout or self.request_timeout)
        except NoAnswer as e:
            raise ZoneUnreachable(e.message) from e
        if got.status == 404 and allow_404:
            return None
        if not got.ok:
            code, msg = got.error() if isinstance(got.body, dict) else ("HttpError", got.reason)
            raise ZoneRequestFailed(url, got.status, code, msg)
        if got.status == 204:
            return {}
        if got.body is None:
            raise ZoneRequestFailed(url, got.status, "BadResponse", f"{method} {path}: not JSON")
        return got.body

    async def ping(self, url: str, timeout: float) -> None:
        await self._call("GET", url, "/ping", timeout=timeout)

    async def list_vms(self, url: str) -> list[InventoryVm]:
        body = await self._call("GET", url, "/v1/vms")
        return [InventoryVm(uuid=str(v["uuid"]), bytes=int(v.get("bytes") or 0),
                            snapshots=int(v.get("snapshots") or 0),
                            complete=int(v.get("complete") or 0)) for v in body]

    async def snapshots(self, url: str, vm: str) -> list[SnapshotView] | None:
        body = await self._call("GET", url, f"/v1/vms/{vm}/snapshots", allow_404=True)
        try:
            return None if body is None else parse_snapshots(body)
        except InvalidDocument as exc:
            raise ZoneRequestFailed(url, 200, exc.code, exc.message) from None

    async def sync(self, url: str, vm: str, peer: str,
                   bwlimit: float | None = None) -> SyncResult:
        req: dict[str, Any] = {"peer": peer}
        if bwlimit:
            req["bwlimit"] = bwlimit
        body = await self._call("POST", url, f"/v1/vms/{vm}/sync", json=req,
                                timeout=self.sync_timeout)
        state = body.get("state") if isinstance(body, dict) else None
        if not isinstance(state, str):
            raise ZoneRequestFailed(url, 200, "BadResponse", f"sync answered {body!r}")
        # snapperd's replicator calls it last_error; the move contract says error.
        error = body.get("error") or body.get("last_error")
        return SyncResult(vm=vm, peer=peer, state=state,
                          error=None if error is None else str(error))

    async def delete_vm(self, url: str, vm: str, elsewhere: Sequence[SnapshotView]) -> bool:
        body = {"elsewhere": elsewhere_to_json(
            {s.name: s.guids for s in elsewhere if s.complete})}
        return await self._call("DELETE", url, f"/v1/vms/{vm}", json=body,
                                allow_404=True) is not None

    async def relearn_placement(self, url: str, vm: str) -> None:
        await self._call("POST", url, f"/v1/vms/{vm}/placement")

    async def tombstones(self, url: str, vm: str) -> set[int]:
        body = await self._call("GET", url, f"/v1/vms/{vm}/tombstones", allow_404=True)
        try:
            return set(tombstones_from_json(body or []))
        except InvalidDocument as exc:
            raise ZoneRequestFailed(url, 200, exc.code, exc.message) from None

    async def capacity(self, url: str) -> tuple[int, int]:
        body = await self._call("GET", url, "/v1/capacity")
        return int(body["used"]), int(body["available"])

    async def sending(self, url: str, vm: str, peer: str) -> int:
        body = await self._call("GET", url, "/v1/transfers")
        return sum(int(t.get("bytes") or 0) for t in body
                   if t.get("vm") == vm and t.get("peer") in (peer, None))


async def tcp_reachable(host: str, port: int, timeout: float) -> bool:
    """Can we open a TCP connection (the SSH endpoint's reachability)?"""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return True
