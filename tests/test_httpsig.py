"""HTTP Signatures: the pure grammar and signing string, and a real aiohttp server."""

from __future__ import annotations

import asyncio
import email.utils
import functools
import math
import time
from collections.abc import AsyncIterator

import aiohttp
import asyncssh
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from snapper_zone.common.httpguard import PRINCIPAL, Route, add_routes, guard
from snapper_zone.common.httpsig import (
    NONCE_HEADER,
    RESPONSE_HEADER,
    SIGNED_HEADERS,
    Identity,
    ReplayCache,
    Signer,
    Unauthorized,
    UntrustedResponse,
    Verifier,
    parse_authorization,
    signing_session,
    verify_response,
)

KEYS = {"ssh-ed25519": asyncssh.generate_private_key("ssh-ed25519"),
        "ecdsa-sha2-nistp256": asyncssh.generate_private_key("ecdsa-sha2-nistp256"),
        "ssh-rsa": asyncssh.generate_private_key("ssh-rsa", key_size=2048)}
ED = Signer(KEYS["ssh-ed25519"])


def _pub(key: asyncssh.SSHKey) -> asyncssh.SSHKey:
    return asyncssh.import_public_key(key.export_public_key())


def _ring(*ids: Identity):  # type: ignore[no-untyped-def]
    by_fp = {i.fingerprint: i for i in ids}

    async def lookup(fp: str) -> Identity | None:
        return by_fp.get(fp)
    return lookup


ED_ID = Identity("operator", "ops", _pub(KEYS["ssh-ed25519"]))


def _verify(v: Verifier, method: str, target: str, headers: CIMultiDict[str],
            body: bytes, *ids: Identity) -> Identity:
    return asyncio.run(v.verify(method, target, headers, body, _ring(*(ids or (ED_ID,)))))


def _headers(signer: Signer, method: str, target: str, body: bytes,
             host: str = "zone:8080") -> CIMultiDict[str]:
    h = CIMultiDict(signer.request_headers(method, target, host, body))
    h["host"] = host
    return h


# -- the grammar ------------------------------------------------------------------------


@given(st.text(max_size=300))
def test_the_parser_refuses_junk_with_unauthorized_only(text: str) -> None:
    try:
        parse_authorization(text)
    except Unauthorized:
        pass


@given(st.sampled_from(list(KEYS)), st.data())
@settings(max_examples=50, suppress_health_check=[HealthCheck.too_slow])
def test_a_real_header_parses_and_any_cut_or_junk_is_refused(kind: str, data: st.DataObject
                                                             ) -> None:
    header = Signer(KEYS[kind]).request_headers("GET", "/v1/vms", "h", b"")["Authorization"]
    p = parse_authorization(header)
    assert p.headers == SIGNED_HEADERS and p.key_id == KEYS[kind].get_fingerprint()
    # A fraction: an ecdsa signature's length varies from one run to the next.
    cut = int(data.draw(st.floats(0, 1, exclude_max=True)) * len(header))
    junk = data.draw(st.text(min_size=1, max_size=3))
    for bad in (header[:cut], header + "," + junk, header.replace('keyId="', 'keyid="'),
                header.replace("headers=", "headers=x,headers=")):
        if bad == header:
            continue
        with pytest.raises(Unauthorized):
            p2 = parse_authorization(bad)
            # A cut inside the base64 can still parse: then its signature is not the one.
            assert p2.signature == p.signature and p2 == p


def test_headers_must_sign_every_field() -> None:
    header = ED.request_headers("GET", "/", "h", b"")["Authorization"]
    for fewer in ("(request-target) host date digest", "host date x-snapper-nonce digest",
                  "(request-target) host date x-snapper-nonce digest digest"):
        with pytest.raises(Unauthorized, match="headers must sign"):
            parse_authorization(header.replace(" ".join(SIGNED_HEADERS), fewer))


# -- sign / verify round trip -----------------------------------------------------------

_methods = st.sampled_from(["GET", "POST", "PUT", "DELETE"])
_targets = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1,
                   max_size=80).map(lambda s: "/" + s)


@given(_methods, _targets, st.binary(max_size=300), st.sampled_from(list(KEYS)))
@settings(max_examples=60, deadline=None)
def test_any_request_verifies(method: str, target: str, body: bytes, kind: str) -> None:
    ident = Identity("cn", "cn0", _pub(KEYS[kind]))
    # The server runs before the client signs: a verifier started after it (a
    # second later, with a slow RSA signature) rightly refuses the request.
    verifier = Verifier()
    h = _headers(Signer(KEYS[kind]), method, target, body)
    assert _verify(verifier, method, target, h, body, ident) == ident


@given(_methods, _targets, st.binary(max_size=200), st.data())
@settings(max_examples=80, deadline=None)
def test_any_one_byte_change_fails(method: str, target: str, body: bytes,
                                   data: st.DataObject) -> None:
    h = _headers(ED, method, target, body)
    what = data.draw(st.sampled_from(["method", "target", "body", "host", "date", "nonce",
                                      "digest", "signature"]))
    if what == "body":
        if body:
            i = data.draw(st.integers(0, len(body) - 1))
            body = body[:i] + bytes([body[i] ^ 1]) + body[i + 1:]
        else:
            body = b"x"
    elif what == "method":
        method = {"GET": "PUT", "PUT": "POST", "POST": "DELETE", "DELETE": "GET"}[method]
    elif what == "target":
        i = data.draw(st.integers(0, len(target) - 1))
        target = target[:i] + chr(ord(target[i]) ^ 1) + target[i + 1:]
    else:
        name = {"nonce": NONCE_HEADER, "signature": "authorization"}.get(what, what)
        value = h[name]
        # A byte of the value that matters (not the quote of a parameter).
        i = data.draw(st.integers(0, len(value) - 1)) if what != "signature" else \
            value.index('signature="') + 11 + data.draw(st.integers(0, 40))
        c = value[i]
        swap = "B" if c == "A" else "A" if c.isalnum() else "0"
        h[name] = value[:i] + swap + value[i + 1:]
        if h[name] == value:
            return
    with pytest.raises(Unauthorized):
        _verify(Verifier(), method, target, h, body)


def _skewed(skew: float) -> float:
    return time.time() + skew


def test_a_request_signed_before_the_server_started_is_not_taken() -> None:
    """The replay cache is in memory: what the last process saw, this one has not.
    A request signed before the start (captured, say) is refused, not replayed."""
    now = [1_800_000_000.5]
    old = Signer(KEYS["ssh-ed25519"], clock=lambda: now[0] - 2)
    h = _headers(old, "GET", "/v1/x", b"")
    now[0] += 1.0
    v = Verifier(clock=lambda: now[0])  # started after `old` signed
    with pytest.raises(Unauthorized, match="before this server started"):
        _verify(v, "GET", "/v1/x", h, b"")
    assert len(v.cache) == 0  # refused before its nonce was taken
    # Signed in the second it started (dates have whole seconds): taken.
    same = Signer(KEYS["ssh-ed25519"], clock=lambda: math.floor(now[0]) + 0.0)
    _verify(v, "GET", "/v1/x", _headers(same, "GET", "/v1/x", b""), b"")


def test_replay_skew_and_unknown_key() -> None:
    v = Verifier()
    h = _headers(ED, "POST", "/v1/x", b"{}")
    _verify(v, "POST", "/v1/x", h, b"{}")
    with pytest.raises(Unauthorized, match="replayed"):
        _verify(v, "POST", "/v1/x", h, b"{}")
    for skew in (-301.0, 301.0):
        old = Signer(KEYS["ssh-ed25519"], clock=functools.partial(_skewed, skew))
        with pytest.raises(Unauthorized, match="more than 300s"):
            _verify(v, "GET", "/", _headers(old, "GET", "/", b""), b"")
    other = Signer(KEYS["ecdsa-sha2-nistp256"])
    with pytest.raises(Unauthorized, match="unknown key"):
        _verify(v, "GET", "/", _headers(other, "GET", "/", b""), b"")
    # Signed by the key, but claiming another key's fingerprint: unknown or bad.
    h = _headers(other, "GET", "/", b"")
    h["authorization"] = h["authorization"].replace(other.key_id, ED.key_id)
    with pytest.raises(Unauthorized):
        _verify(v, "GET", "/", h, b"")


def test_the_replay_cache_forgets_expired_and_is_bounded() -> None:
    c = ReplayCache(max_entries=2)
    c.add("k", "n1", 10.0, 0.0)
    c.add("k", "n2", 20.0, 0.0)
    with pytest.raises(Unauthorized):
        c.add("k", "n1", 10.0, 5.0)
    with pytest.raises(Exception, match="too many"):
        c.add("k", "n3", 30.0, 5.0)
    c.add("k", "n3", 30.0, 11.0)  # n1 expired
    assert len(c) == 2
    c.add("k", "n1", 40.0, 21.0)  # n1 and n2 expired: n1 is new again
    assert len(c) == 2


def test_response_signature() -> None:
    key = _pub(KEYS["ssh-ed25519"])
    header = ED.response_header("nonce1", 200, b'{"a":1}')
    verify_response(key, "nonce1", 200, b'{"a":1}', header)
    for nonce, status, body, h in (("nonce2", 200, b'{"a":1}', header),
                                   ("nonce1", 404, b'{"a":1}', header),
                                   ("nonce1", 200, b'{"a":2}', header),
                                   ("nonce1", 200, b'{"a":1}', None),
                                   ("nonce1", 200, b'{"a":1}', Signer(KEYS["ssh-rsa"])
                                    .response_header("nonce1", 200, b'{"a":1}'))):
        with pytest.raises(UntrustedResponse):
            verify_response(key, nonce, status, body, h)


# -- through a real server -----------------------------------------------------------------


async def _echo(request: web.Request) -> web.Response:
    who = request.get(PRINCIPAL)
    return web.json_response({"who": who.label if who else None,
                              "body": (await request.read()).decode()})

ROUTES = (Route("GET", "/ping", _echo, frozenset()),
          Route("POST", "/v1/things/{id}", _echo, frozenset({"operator"})),
          Route("GET", "/v1/things", _echo, frozenset({"operator", "cn"})))


@pytest.fixture
async def server() -> AsyncIterator[tuple[TestServer, Verifier]]:
    verifier = Verifier()
    signer_cn = Identity("cn", "cn0", _pub(KEYS["ecdsa-sha2-nistp256"]))
    lookup = _ring(ED_ID, signer_cn)

    @web.middleware
    async def mw(request: web.Request, handler):  # type: ignore[no-untyped-def]
        try:
            await guard(request, ROUTES, verifier, lookup)
        except Exception as e:
            code = getattr(e, "code", "x")
            status = getattr(e, "http_status", 500)
            return web.json_response({"code": code, "message": str(e)}, status=status)
        return await handler(request)

    app = web.Application(middlewares=[mw])
    add_routes(app, ROUTES)
    s = TestServer(app, host="127.0.0.1")
    await s.start_server()
    yield s, verifier
    await s.close()


async def test_through_a_server(server: tuple[TestServer, Verifier]) -> None:
    s, _ = server
    url = str(s.make_url(""))
    async with aiohttp.ClientSession() as anon, \
            signing_session(ED) as ops, signing_session(Signer(KEYS["ecdsa-sha2-nistp256"])) as cn:
        async with anon.get(url + "/ping") as r:
            assert r.status == 200 and (await r.json())["who"] is None
        async with anon.get(url + "/v1/things") as r:
            assert r.status == 401
        async with ops.get(url + "/v1/things?x=1") as r:
            assert r.status == 200 and (await r.json())["who"] == "operator:ops"
        async with ops.post(url + "/v1/things/a", json={"n": 1}) as r:
            assert r.status == 200 and (await r.json())["body"] == '{"n": 1}'
        async with cn.post(url + "/v1/things/a", json={}) as r:
            assert r.status == 403 and (await r.json())["code"] == "NotAuthorized"
        async with ops.post(url + "/v1/things/a", data="{}",
                            headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 415
        async with ops.get(url + "/nowhere") as r:
            assert r.status == 404
        async with anon.get(url + "/nowhere") as r:
            assert r.status == 401


async def test_response_key_refuses_unsigned_answers(server: tuple[TestServer, Verifier]
                                                     ) -> None:
    s, _ = server
    async with signing_session(ED, response_key=_pub(KEYS["ssh-rsa"])) as ops:
        with pytest.raises(UntrustedResponse):
            async with ops.get(str(s.make_url("/v1/things"))):
                pass


def test_a_date_must_be_an_http_date() -> None:
    h = _headers(ED, "GET", "/", b"")
    assert email.utils.parsedate_to_datetime(h["date"]).tzinfo is not None
    assert RESPONSE_HEADER.startswith("x-snapper")
