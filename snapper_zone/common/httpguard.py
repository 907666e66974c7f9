"""The server side of HTTP Signatures: each app's route table names the roles that
may call each route, and :func:`guard` authenticates (``httpsig.Verifier``) and
authorises every request by it. Apart from ``httpsig`` so that a client (a CN's
``snapper``) does not import aiohttp's server to sign a request."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from aiohttp import web

from snapper_zone.common.httpsig import (
    Identity,
    KeyLookup,
    NotAuthorized,
    UnsupportedMediaType,
    Verifier,
)

__all__ = ["OPEN", "PRINCIPAL", "Handler", "Route", "add_routes", "guard", "route_of"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN: frozenset[str] = frozenset()  # a route anyone may call (health, metrics)
# The verified caller, for handlers: ``request[PRINCIPAL]`` (absent on open routes).
PRINCIPAL = web.RequestKey("principal", Identity)


@dataclass(frozen=True)
class Route:
    """One route and the roles that may call it; ``roles`` empty: open to anyone."""

    method: str
    path: str
    handler: Handler
    roles: frozenset[str]


def add_routes(app: web.Application, routes: Sequence[Route]) -> None:
    for r in routes:
        app.router.add_route(r.method, r.path, r.handler)


def route_of(request: web.Request, routes: Sequence[Route]) -> Route | None:
    """The table's entry for the route aiohttp matched (None: 404/405 to come)."""
    resource = request.match_info.route.resource
    if resource is None or request.match_info.http_exception is not None:
        return None
    method = "GET" if request.method == "HEAD" else request.method
    for r in routes:
        if r.path == resource.canonical and r.method == method:
            return r
    return None


async def guard(request: web.Request, routes: Sequence[Route], verifier: Verifier,
                lookup: KeyLookup, presented: Identity | None = None) -> Identity | None:
    """Authenticate and authorise one request by its route's roles.

    Open routes pass unsigned (None). Anything else must be signed by a known
    key (401) whose role the route names (403); a body must be JSON (415).
    Unknown routes are authenticated too, so their 404 tells nobody anything.
    """
    route = route_of(request, routes)
    if route is not None and not route.roles:
        return None
    body = await request.read()
    who = await verifier.verify(request.method, request.raw_path, request.headers, body,
                                lookup, presented)
    if route is not None and who.role not in route.roles:
        raise NotAuthorized(f"{who.role} key {who.fingerprint} ({who.label}) may not call "
                            f"{route.method} {route.path}; allowed: "
                            f"{', '.join(sorted(route.roles))}")
    if body and request.content_type != "application/json":
        # A text/plain POST is what a browser sends cross-site without asking.
        raise UnsupportedMediaType(f"a body must be application/json, not "
                                   f"{request.content_type!r}")
    request[PRINCIPAL] = who
    return who
