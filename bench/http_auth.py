"""What HTTP Signatures cost: signed requests beside unsigned ones, one run.

    python3 bench/http_auth.py [--requests 400] [--runs 3] [--key ed25519|ecdsa|rsa]

A real aiohttp server on 127.0.0.1 with two routes answering the same small
JSON: one open, one guarded by ``httpguard.guard`` (signature, date, digest,
nonce, role). A client sends ``--requests`` sequential GETs to each, as the
coordinator's and an operator's clients do (the open route through a plain
session, the guarded one through ``signing_session``). Prints the median of
``--runs`` for each, requests/s and CPU-microseconds per request of this
process (client and server both live here), and the ratio signed/open.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import asyncssh
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from snapper_zone.common.httpguard import OPEN, Route, add_routes, guard
from snapper_zone.common.httpsig import (
    Identity,
    Signer,
    Verifier,
    signing_session,
)

KEY_TYPES = {"ed25519": "ssh-ed25519", "ecdsa": "ecdsa-sha2-nistp256", "rsa": "ssh-rsa"}


async def _answer(request: web.Request) -> web.Response:
    return web.json_response({"ping": "pong"})


async def _serve(key: asyncssh.SSHKey) -> tuple[web.AppRunner, str]:
    me = Identity("operator", "bench", asyncssh.import_public_key(key.export_public_key()))
    verifier = Verifier()
    routes = (Route("GET", "/open", _answer, OPEN),
              Route("GET", "/signed", _answer, frozenset({"operator"})))

    async def lookup(key_id: str) -> Identity | None:
        return me if key_id == me.fingerprint else None

    @web.middleware
    async def auth(request: web.Request,
                   handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                   ) -> web.StreamResponse:
        await guard(request, routes, verifier, lookup)
        return await handler(request)

    app = web.Application(middlewares=[auth])
    add_routes(app, routes)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def _timed(http: aiohttp.ClientSession, url: str, n: int) -> tuple[float, float]:
    """Seconds of wall clock and of this process's CPU for ``n`` GETs."""
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        async with http.get(url) as r:
            assert r.status == 200, await r.text()
            await r.read()
    return time.perf_counter() - w0, time.process_time() - c0


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--key", choices=sorted(KEY_TYPES), default="ed25519")
    args = ap.parse_args()
    key = asyncssh.generate_private_key(KEY_TYPES[args.key])
    runner, url = await _serve(key)
    results: dict[str, list[tuple[float, float]]] = {"open": [], "signed": []}
    try:
        async with aiohttp.ClientSession() as plain, signing_session(Signer(key)) as signed:
            await _timed(plain, f"{url}/open", 20)  # warm both paths up
            await _timed(signed, f"{url}/signed", 20)
            for _ in range(args.runs):  # interleaved, so drift hits both alike
                results["open"].append(await _timed(plain, f"{url}/open", args.requests))
                results["signed"].append(await _timed(signed, f"{url}/signed", args.requests))
    finally:
        await runner.cleanup()
    n = args.requests
    print(f"HTTP Signatures ({args.key} key), {n} sequential GETs, median of {args.runs}:")
    rows = {}
    for name, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        rows[name] = (n / wall, cpu / n * 1e6)
        print(f"  {name:7s} {n / wall:8.0f} req/s   {cpu / n * 1e6:7.0f} CPU-us/request")
    print(f"  ratio signed/open: {rows['signed'][0] / rows['open'][0]:.2f}x req/s, "
          f"{rows['signed'][1] / rows['open'][1]:.2f}x CPU per request")


if __name__ == "__main__":
    asyncio.run(main())
