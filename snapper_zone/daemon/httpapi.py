"""snapperd's HTTP API (aiohttp): health, inventory, delete, capacity, transfers, metrics.

Routes, and the roles that may call each (``ROUTES``, the one table)::

    GET    /ping                              open: {"ping": "pong", zone, version}
    GET    /v1/vms                            operator, coordinator:
                                              [{uuid, cn, snapshots, complete, bytes,
                                              newest}] (newest: its newest complete
                                              snapshot's creation time, or null)
    GET    /v1/vms/{uuid}/snapshots           operator, coordinator, own cn:
                                              [VmSnapshot JSON], oldest first
                                              (?metadata=true: each with "metadata")
    GET    /v1/vms/{uuid}/snapshots/{name}    the same: VmSnapshot JSON + "metadata"
    DELETE /v1/vms/{uuid}/snapshots/{name}    operator, own cn: 204 once the mirror
                                              followed (or after the mirror timeout);
                                              409 ResourceBusy while in use
    GET    /v1/vms/{uuid}/tombstones          operator, coordinator, own cn:
                                              [{guid, deleted}]: part guids deleted on
                                              purpose (here, or on the peer and adopted)
    POST   /v1/vms/{uuid}/sync                coordinator, operator: {"peer", "bwlimit"}:
                                              reconcile now -> state
    DELETE /v1/vms/{uuid}                     coordinator, operator: drop this copy;
                                              body {"elsewhere": ...} required (422
                                              without); 409 CopyNotRedundant / ResourceBusy
    POST   /v1/vms/{uuid}/placement           coordinator, operator: learn the VM's
                                              placement from the coordinator now (a
                                              move switched it) -> {"zones": [...]}
    POST   /v1/vms/{uuid}/prune               operator: apply the retention policy now
                                              (?dry_run=true: what would go, and why;
                                              ?force=true: though another zone prunes it)
                                              -> {vm, policy, pruner, keep, delete, deleted}
    POST   /v1/prune                          operator: the same for every VM here
    GET    /v1/replication                    operator, coordinator, zone: each VM's peer,
                                              state, lag
    GET    /v1/capacity                       operator, coordinator, zone:
                                              {root, available, used, referenced, pool}
    GET    /v1/transfers                      operator, coordinator: [Transfer JSON] in flight
    GET    /metrics                           open: Prometheus text format

Every route but ``/ping`` (liveness for load balancers and health checks) and
``/metrics`` (Prometheus scrapes; counters and gauges, no VM data) must be
signed (``common/httpsig``: HTTP Signatures with the caller's SSH key) by a
key this zone knows: its config's ``[[keys]]`` (operator, cn, peer -> role
"zone"), ``coordinator_key`` (role "coordinator") or a peer zone the
coordinator registered. Unsigned, unknown, stale or replayed: 401
``Unauthorized`` (with ``WWW-Authenticate``); a role the route does not name,
or a CN asking about a VM that is not its own (the same owner rule as
``daemon/auth.py``): 403 ``NotAuthorized``; a body that is not
``application/json``: 415 ``UnsupportedMediaType``. The verified caller is
``request[PRINCIPAL]`` for handlers.

Errors are JSON ``{"code", "message"}`` with a matching status, as Triton's
restify services answer: every :class:`SnapperError` maps to its own code and
status; an unknown route is 404 ``ResourceNotFound``, a wrong method 405
``MethodNotAllowed``, and anything unexpected 500 ``InternalError`` whose
message names the request id only (the stack goes to the log, not the client).

Names in URLs are validated before a handler runs (422 ``InvalidArgument``),
so nothing unvalidated ever reaches ZFS.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid as _uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from replication.peers import NoPeer
from replication.replicator import Replicator
from snapper_zone.common.httpguard import OPEN, PRINCIPAL, Route, add_routes, guard
from snapper_zone.common.httpsig import (
    WWW_AUTHENTICATE,
    Unauthorized,
    Verifier,
)
from snapper_zone.common.metrics import CONTENT_TYPE_LATEST
from snapper_zone.common.version import version
from snapper_zone.daemon.auth import check_owner
from snapper_zone.daemon.prune import Pruner
from snapper_zone.daemon.zone import Zone
from snapper_zone.errors import InvalidName, SnapperError
from snapper_zone.transfer.registry import SnapshotInUse
from snapper_zone.transfer.store import P_META_COUNT, decode_metadata, set_aside
from snapper_zone.wire import InvalidDocument, elsewhere_from_json, jsontext, tombstones_to_json
from snapper_zone.zfs.names import Dataset, check_component, check_uuid, is_uuid

__all__ = ["ROUTES", "ZONE", "MethodNotAllowed", "NoRetentionPolicy", "ResourceNotFound",
           "SnapshotInUse", "make_app"]

ZONE = web.AppKey("zone", Zone)
VERIFIER = web.AppKey("verifier", Verifier)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Listing every VM runs one `zfs get` per VM; bound how many run at once.
_LIST_CONCURRENCY = 8
# A client may name its request (restify's x-request-id); otherwise we do.
_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


class ResourceNotFound(SnapperError):
    code = "ResourceNotFound"
    http_status = 404


class MethodNotAllowed(SnapperError):
    code = "MethodNotAllowed"
    http_status = 405


# Every URL parameter and the check it must pass; a route whose parameter has
# no entry here fails loudly rather than handing an unchecked string to a handler.
_PARAM_CHECKS: dict[str, Callable[[str], str]] = {
    "uuid": lambda v: check_uuid(v, "VM uuid"),
    "name": lambda v: check_component(v, "snapshot name"),
}

# Status codes aiohttp raises itself (bad requests, oversized bodies...) and
# the Triton-style code each one answers with.
_HTTP_CODES = {
    400: "BadRequest",
    404: "ResourceNotFound",
    405: "MethodNotAllowed",
    408: "RequestTimeout",
    413: "RequestEntityTooLarge",
    415: "UnsupportedMediaType",
    422: "InvalidArgument",
}


def _error_response(status: int, code: str, message: str,
                    headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status,
                             headers=headers)


def _request_id(request: web.Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.fullmatch(given) else str(_uuid.uuid4())


@web.middleware
async def _errors_and_audit(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate, validate URL names, turn every failure into JSON, log every request."""
    zone = request.app[ZONE]
    req_id = _request_id(request)
    start = time.monotonic()
    response: web.StreamResponse
    try:
        who = await guard(request, ROUTES, request.app[VERIFIER], zone.http_identity)
        for key, value in request.match_info.items():
            check = _PARAM_CHECKS.get(key)
            if check is None:
                raise RuntimeError(f"route parameter {key!r} has no validator")
            check(value)
        if who is not None and who.role == "cn" and "uuid" in request.match_info:
            vm = request.match_info["uuid"]
            check_owner(who.id, vm, zone.owner_of(vm), f"{request.method} {request.path}")
        response = await handler(request)
    except SnapperError as e:
        if e.http_status >= 500:
            zone.log.error("request failed: %s", e.message, exc_info=True,
                           extra={"req_id": req_id, "code": e.code})
        response = _error_response(e.http_status, e.code, e.message,
                                   {"WWW-Authenticate": WWW_AUTHENTICATE}
                                   if isinstance(e, Unauthorized) else None)
    except web.HTTPException as e:
        if e.status < 400:
            raise  # redirects and the like are answers, not errors
        headers: dict[str, str] = {}
        if isinstance(e, web.HTTPMethodNotAllowed):
            headers["Allow"] = ", ".join(sorted(e.allowed_methods))
            message = f"{request.method} is not allowed on {request.path}"
        elif e.status == 404:
            message = f"{request.path} does not exist"
        else:
            message = e.reason
        response = _error_response(e.status, _HTTP_CODES.get(e.status, "HttpError"),
                                   message, headers)
    except Exception:
        # A bug or an unforeseen failure: the stack goes to the log; the
        # client learns only which request to look up there.
        zone.log.exception("unexpected error handling request",
                           extra={"req_id": req_id, "method": request.method,
                                  "url": request.path_qs})
        response = _error_response(500, "InternalError",
                                   f"internal error (request {req_id})")
    response.headers["x-request-id"] = req_id
    who = request.get(PRINCIPAL)
    zone.log.info("handled request", extra={
        "req_id": req_id, "method": request.method, "url": request.path_qs,
        "status": response.status, "remote": request.remote,
        "principal": who.label if who is not None else None,
        "latency_ms": round((time.monotonic() - start) * 1000, 3)})
    return response


# -- handlers ---------------------------------------------------------------


async def ping(request: web.Request) -> web.Response:
    # Open to anyone: liveness, which zone, which version; nothing else.
    zone = request.app[ZONE]
    return web.json_response({"ping": "pong", "zone": zone.config.uuid, "version": version()})


async def list_vms(request: web.Request) -> web.Response:
    zone = request.app[ZONE]
    root = zone.store.root
    # One `zfs get` for every VM's space; `used` of the VM's container counts
    # its datasets and all their snapshots: what the VM costs this zone.
    children = [i for i in await zone.zfs.datasets(root, depth=1) if i.dataset.parent == root]
    infos = [i for i in children if is_uuid(i.dataset.basename)]
    if stray := sorted(i.dataset.basename for i in children
                       if i not in infos and not set_aside(i.dataset.basename)):
        # Not ours (someone's hand-made dataset): one bad name must not hide every VM.
        zone.log.warning("datasets under the root that are not VMs", extra={"stray": stray})
    limit = asyncio.Semaphore(_LIST_CONCURRENCY)

    async def describe(vm: str, used: int) -> dict[str, Any]:
        async with limit:
            snaps = await zone.store.snapshots(vm)
        done = [s.created for s in snaps if s.complete]
        return {"uuid": vm, "cn": zone.config.cn_for_vm(vm), "snapshots": len(snaps),
                "complete": len(done), "bytes": used, "newest": max(done, default=None)}

    vms = await asyncio.gather(*(describe(i.dataset.basename, i.used)
                                 for i in sorted(infos, key=lambda i: i.dataset.path)))
    return web.json_response(list(vms))


async def _all_metadata(zone: Zone, vm: str) -> dict[str, dict[str, Any] | None]:
    """Every snapshot's metadata in two `zfs get`s, however many snapshots there are.

    The first reads each marker's chunk count, the second every chunk up to the
    largest count (``store.metadata`` per snapshot would be two calls each).
    """
    container = zone.store.vm_dataset(vm)
    counts = {s.snapshot.name: int(s.user_props[P_META_COUNT])
              for s in await zone.zfs.snapshots(container, user_props=[P_META_COUNT])
              if P_META_COUNT in s.user_props}
    if not counts:
        return {}
    chunks = [P_META_COUNT, *(f"snapper:m.{i}" for i in range(max(counts.values())))]
    return {s.snapshot.name: decode_metadata(s.user_props)
            for s in await zone.zfs.snapshots(container, user_props=chunks)
            if s.snapshot.name in counts}


def _flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise InvalidName(f"invalid {name} {value!r}: expected true or false")
    return value in ("true", "1")


async def _known_vm(zone: Zone, vm: str) -> None:
    if not await zone.zfs.exists(zone.store.vm_dataset(vm)):
        raise ResourceNotFound(f"VM {vm} is not on this zone")


async def list_tombstones(request: web.Request) -> web.Response:
    """The part guids deleted on purpose, here or on the peer, with the time of
    the delete: the coordinator tells a stale copy's deleted snapshot from one
    the placed copies lack."""
    zone = request.app[ZONE]
    vm = request.match_info["uuid"]
    await _known_vm(zone, vm)
    return web.json_response(tombstones_to_json(await zone.store.tombstones(vm)))


async def list_snapshots(request: web.Request) -> web.Response:
    zone = request.app[ZONE]
    vm = request.match_info["uuid"]
    with_metadata = _flag(request, "metadata")
    snaps = await zone.store.snapshots(vm)
    if not snaps:
        # The store lists an unknown VM as empty; tell the two apart.
        await _known_vm(zone, vm)
    body = [s.to_json() for s in snaps]
    if with_metadata and snaps:
        meta = await _all_metadata(zone, vm)
        for s in body:
            s["metadata"] = meta.get(s["name"]) if s["complete"] else None
    return web.json_response(body)


async def get_snapshot(request: web.Request) -> web.Response:
    zone = request.app[ZONE]
    vm, name = request.match_info["uuid"], request.match_info["name"]
    snap = await zone.store.snapshot(vm, name)
    body = snap.to_json()
    # Metadata lives on the completion marker; an incomplete snapshot has none yet.
    body["metadata"] = await zone.store.metadata(vm, name) if snap.complete else None
    return web.json_response(body)


async def delete_snapshot(request: web.Request) -> web.Response:
    zone = request.app[ZONE]
    vm, name = request.match_info["uuid"], request.match_info["name"]
    await zone.delete_snapshot(vm, name)
    zone.log.info("deleted snapshot", extra={"vm": vm, "snapshot": name})
    return web.Response(status=204)


def _replicator(zone: Zone) -> Replicator:
    if zone.replicator is None:
        raise NoPeer("this zone has no peer zones configured; nothing is replicated")
    return zone.replicator


async def replication(request: web.Request) -> web.Response:
    zone = request.app[ZONE]
    if zone.replicator is None:
        return web.json_response({"zone": zone.config.uuid, "peers": [], "vms": []})
    return web.json_response(zone.replicator.report())


async def sync_vm(request: web.Request) -> web.Response:
    """Reconcile one VM with a peer now (a move's copy step, or an operator's nudge).

    Body (optional): {"peer": zone uuid, "bwlimit": bytes/s}; default the VM's
    own partner, as fast as it goes.
    """
    zone = request.app[ZONE]
    vm = check_uuid(request.match_info["uuid"], "VM uuid")
    peer: str | None = None
    bwlimit: float | None = None
    if request.body_exists:
        body = await _json_body(request, '{"peer": "<zone uuid>", "bwlimit": <bytes/s>}')
        if isinstance(body, dict) and body.get("peer") is not None:
            peer = check_uuid(str(body["peer"]), "peer zone uuid")
        if isinstance(body, dict) and body.get("bwlimit") is not None:
            bwlimit = body["bwlimit"]
            if isinstance(bwlimit, bool) or not isinstance(bwlimit, int | float) \
                    or not bwlimit > 0:
                raise InvalidName(f"bwlimit must be a positive number of bytes/s, "
                                  f"not {bwlimit!r}")
    state = await _replicator(zone).sync_vm(vm, peer, bwlimit)
    return web.json_response(state.to_json())


async def drop_vm(request: web.Request) -> web.Response:
    """Remove this zone's whole copy of a VM (after a move placed it elsewhere).

    Body ``{"elsewhere": {snapshot: {dataset: guid}}}``, required: what the
    new copy holds complete; the drop is refused (409 CopyNotRedundant) if this
    copy holds a complete snapshot beyond it (``Zone.drop_copy``). Without it
    (422) nothing is dropped: no copy goes without the redundancy check.
    """
    zone = request.app[ZONE]
    vm = check_uuid(request.match_info["uuid"], "VM uuid")
    if not request.body_exists:
        raise InvalidName(f"DELETE /v1/vms/{vm} needs a body: {_ELSEWHERE}")
    elsewhere = _parse_elsewhere(await _json_body(request, _ELSEWHERE))
    await _known_vm(zone, vm)
    await zone.drop_copy(vm, elsewhere)
    return web.Response(status=204)


_ELSEWHERE = '{"elsewhere": {"<snapshot>": {"<dataset>": "<guid>"}}}'


async def relearn_placement(request: web.Request) -> web.Response:
    """Learn the VM's placement from the coordinator now, past the cache's TTL.

    The coordinator calls it on both zones of a VM's new pair once a move has
    switched it: the staying zone would otherwise mirror to the old copy until
    its cached answer expires, and go on doing so through a coordinator outage
    that starts meanwhile. ``zones`` is what the zone now holds ([] when no
    coordinator answered: it keeps what it had).
    """
    zone = request.app[ZONE]
    vm = check_uuid(request.match_info["uuid"], "VM uuid")
    got = await zone.relearn_placement(vm)
    return web.json_response({"zones": list(got or ())})


async def _json_body(request: web.Request, shape: str) -> Any:
    # guard() refused any body that is not application/json (415).
    try:
        return jsontext.loads(await request.text())
    except jsontext.InvalidJson as exc:
        raise InvalidName(f"{exc.message}: {shape}") from None


def _parse_elsewhere(body: Any) -> dict[str, dict[str, int]]:
    raw = body.get("elsewhere") if isinstance(body, dict) else None
    if raw is None:
        raise InvalidName(f"the body must name what the new copy holds: {_ELSEWHERE}")
    try:
        return elsewhere_from_json(raw)
    except InvalidDocument as exc:
        raise InvalidName(f"{exc.message}; expected {_ELSEWHERE}") from None


async def capacity(request: web.Request) -> web.Response:
    zone = request.app[ZONE]
    root = await zone.zfs.dataset(zone.store.root)
    # The pool's top dataset's `available` is the pool's writable space as ZFS
    # offers it to datasets (after its reserve); the root may have a quota below it.
    pool = await zone.zfs.dataset(Dataset(zone.store.root.pool))
    zone.metrics.pool_free.set(root.available)
    return web.json_response({
        "root": str(zone.store.root), "available": root.available, "used": root.used,
        "referenced": root.referenced,
        "pool": {"name": zone.store.root.pool, "free": pool.available}})


async def transfers(request: web.Request) -> web.Response:
    zone = request.app[ZONE]
    return web.json_response([t.to_json() for t in zone.transfers.active()])


async def metrics(request: web.Request) -> web.Response:
    zone = request.app[ZONE]
    for refresh, what in ((zone.refresh_capacity, "pool space"),
                          (zone.refresh_freshness, "VM snapshot ages")):
        try:
            await refresh()
        except SnapperError:
            # A scrape must still answer (transfer counters matter most when ZFS
            # is unwell); the gauges keep their last values and the log says why.
            zone.log.warning(f"cannot refresh {what} for /metrics", exc_info=True)
    # CONTENT_TYPE_LATEST carries a charset, which content_type= refuses.
    return web.Response(body=zone.metrics.render(),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


class NoRetentionPolicy(SnapperError):
    code = "NoRetentionPolicy"
    http_status = 409


def _pruner(zone: Zone) -> Pruner:
    if zone.pruner is None:
        raise NoRetentionPolicy("this zone has no retention policy configured "
                                "([retention] policy in snapperd's config)")
    return zone.pruner


async def prune_vm(request: web.Request) -> web.Response:
    """Apply the retention policy to one VM now (``?dry_run=true``: only say what
    would go and why; ``?force=true``: even if the CN pushes to the other zone)."""
    zone = request.app[ZONE]
    vm = check_uuid(request.match_info["uuid"], "VM uuid")
    dry_run, force = _flag(request, "dry_run"), _flag(request, "force")
    await _known_vm(zone, vm)
    plan = await _pruner(zone).prune(vm, dry_run=dry_run, force=force)
    return web.json_response({"dry_run": dry_run, **plan.to_json()})


async def prune_all(request: web.Request) -> web.Response:
    """Apply the retention policy to every VM on this zone now (``?dry_run=true``)."""
    zone = request.app[ZONE]
    dry_run = _flag(request, "dry_run")
    plans = await _pruner(zone).prune_all(dry_run=dry_run)
    return web.json_response({"dry_run": dry_run, "vms": [p.to_json() for p in plans]})


_OPERATORS = frozenset({"operator", "coordinator"})
# A peer zone reads VMs over SSH, within their scope (``auth.authorize``); over
# HTTP it sees only fleet-level state, never the VM -> CN map or metadata.
_READERS = _OPERATORS | {"zone"}
_VM_READERS = _OPERATORS | {"cn"}  # a CN: its own VMs only (the middleware checks)

# Every route with the roles that may call it; a test checks none is missing.
ROUTES: tuple[Route, ...] = (
    Route("GET", "/ping", ping, OPEN),
    Route("GET", "/v1/vms", list_vms, _OPERATORS),
    Route("GET", "/v1/vms/{uuid}/snapshots", list_snapshots, _VM_READERS),
    Route("GET", "/v1/vms/{uuid}/tombstones", list_tombstones, _VM_READERS),
    Route("GET", "/v1/vms/{uuid}/snapshots/{name}", get_snapshot, _VM_READERS),
    Route("DELETE", "/v1/vms/{uuid}/snapshots/{name}", delete_snapshot,
          frozenset({"operator", "cn"})),
    Route("POST", "/v1/vms/{uuid}/sync", sync_vm, _OPERATORS),
    Route("POST", "/v1/vms/{uuid}/prune", prune_vm, frozenset({"operator"})),
    Route("POST", "/v1/prune", prune_all, frozenset({"operator"})),
    Route("DELETE", "/v1/vms/{uuid}", drop_vm, _OPERATORS),
    Route("POST", "/v1/vms/{uuid}/placement", relearn_placement, _OPERATORS),
    Route("GET", "/v1/replication", replication, _READERS),
    Route("GET", "/v1/capacity", capacity, _READERS),
    Route("GET", "/v1/transfers", transfers, _OPERATORS),
    Route("GET", "/metrics", metrics, OPEN),
)


def make_app(zone: Zone, verifier: Verifier | None = None) -> web.Application:
    app = web.Application(middlewares=[_errors_and_audit])
    app[ZONE] = zone
    app[VERIFIER] = verifier or Verifier()
    add_routes(app, ROUTES)
    return app
