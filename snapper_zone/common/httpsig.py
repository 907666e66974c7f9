"""HTTP Signatures with the fleet's SSH keys: who is calling snapperd or the coordinator.

The scheme is draft-cavage-http-signatures, as Triton's CloudAPI uses it: the
client signs a canonical string of a few request headers with its SSH private
key and sends::

    Authorization: Signature keyId="SHA256:<fingerprint>",algorithm="ed25519",
        headers="(request-target) host date x-snapper-nonce digest",signature="<base64>"

``x-snapper-nonce`` is random per request and ``digest`` is ``SHA-256=<base64>``
of the body (of the empty body too), so a signature covers what is asked,
of whom, when, and with what payload. The server finds the key by its
fingerprint in its key ring (fingerprint -> :class:`Identity`: role, id,
key), checks the signature, the date (within ``WINDOW`` seconds), the body's
digest, and that the nonce was not seen within the window (nor signed before
the server started: the seen nonces are kept in memory); anything else is
401 ``Unauthorized``. ``signature`` is the SSH signature blob (``string
algorithm, string signature``, what ``SSHKey.sign`` returns), so asyncssh
signs and verifies ed25519, ecdsa and rsa (``rsa-sha2-256``; SHA-1 ``ssh-rsa``
is refused) alike.

Why signatures rather than mTLS: the fleet already distributes and pins SSH
keys (CN keys, zone host keys, the operator's key); signatures reuse them as
they are, with no CA to run and no certificates to issue, rotate or revoke
beside the keys — revoking an SSH key revokes its HTTP access too. It is what
CloudAPI does, so Triton operators know it.

Responses the zones rely on (the coordinator's zone list and placements) are
signed back: ``x-snapper-response-signature`` over the request's nonce, the
status and the body's digest (:meth:`Signer.response_header`,
:func:`verify_response`), so an answer cannot be replayed for another request
nor come from anyone reachable at the coordinator's address.

The canonical string and the header grammar are pure (:func:`canonical`,
:func:`parse_authorization`); :func:`signing_session` is the one client (an
aiohttp session that signs every request) and :func:`call_json` the one way
to make a call with it and read the JSON answer (``HttpAnswer``: status, body,
the ``{"code", "message"}`` of an error; ``NoAnswer`` when none came);
:class:`Verifier` checks a request, and ``httpguard`` applies it to a
server's routes.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import heapq
import json
import math
import re
import secrets
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncssh

from snapper_zone.errors import SnapperError

if TYPE_CHECKING:
    import aiohttp

__all__ = [
    "NONCE_HEADER",
    "RESPONSE_HEADER",
    "SIGNED_HEADERS",
    "WINDOW",
    "WWW_AUTHENTICATE",
    "HttpAnswer",
    "Identity",
    "NoAnswer",
    "NotAuthorized",
    "ReplayCache",
    "SignatureParams",
    "Signer",
    "Unauthorized",
    "UnsupportedMediaType",
    "UntrustedResponse",
    "Verifier",
    "call_json",
    "canonical",
    "digest",
    "parse_authorization",
    "parse_params",
    "signing_session",
    "verify_response",
]

WINDOW = 300.0  # seconds a request's Date may be off, either way
NONCE_HEADER = "x-snapper-nonce"
RESPONSE_HEADER = "x-snapper-response-signature"
SIGNED_HEADERS: tuple[str, ...] = ("(request-target)", "host", "date", NONCE_HEADER, "digest")
WWW_AUTHENTICATE = f'Signature realm="snapper",headers="{" ".join(SIGNED_HEADERS)}"'
MAX_NONCES = 100_000  # nonces remembered at once; beyond, requests wait (503)

# The SSH signature algorithms accepted, by the cavage name in ``algorithm``.
ALGORITHMS: dict[str, str] = {
    "ed25519": "ssh-ed25519",
    "ecdsa-sha256": "ecdsa-sha2-nistp256",
    "ecdsa-sha384": "ecdsa-sha2-nistp384",
    "ecdsa-sha512": "ecdsa-sha2-nistp521",
    "rsa-sha256": "rsa-sha2-256",
    "rsa-sha512": "rsa-sha2-512",
}
_NAME_OF = {ssh: name for name, ssh in ALGORITHMS.items()}


class Unauthorized(SnapperError):
    """No valid signature: missing, malformed, unknown key, bad, stale, replayed."""

    code = "Unauthorized"
    http_status = 401


class NotAuthorized(SnapperError):
    """A known key whose role may not do this."""

    code = "NotAuthorized"
    http_status = 403


class UnsupportedMediaType(SnapperError):
    code = "UnsupportedMediaType"
    http_status = 415


class NonceCacheFull(SnapperError):
    code = "ServiceUnavailable"
    http_status = 503


class UntrustedResponse(SnapperError):
    """An answer not signed by the key the client expects it from."""

    code = "UntrustedResponse"
    http_status = 502


# -- pure parts ------------------------------------------------------------------------


@dataclass(frozen=True)
class SignatureParams:
    key_id: str
    algorithm: str
    headers: tuple[str, ...]
    signature: bytes


# key="value": the value may hold no quote and no backslash (nothing we sign needs
# escaping), so the grammar stays a regular one with no ambiguity.
_PARAM = re.compile(r'([a-zA-Z]+)="([^"\\]*)"')
_MAX_HEADER = 8192


def parse_params(text: str, allowed: Iterable[str], required: Iterable[str]) -> dict[str, str]:
    """``k1="v1",k2="v2"`` strictly: known keys once each, the required ones present."""
    if len(text) > _MAX_HEADER:
        raise Unauthorized("signature parameters too long")
    known = set(allowed)
    out: dict[str, str] = {}
    pos = 0
    while True:
        m = _PARAM.match(text, pos)
        if m is None:
            raise Unauthorized(f"malformed signature parameters at offset {pos}: "
                               'expected key="value"')
        key, value = m.group(1), m.group(2)
        if key not in known:
            raise Unauthorized(f"unknown signature parameter {key!r}")
        if key in out:
            raise Unauthorized(f"signature parameter {key!r} given twice")
        out[key] = value
        pos = m.end()
        if pos == len(text):
            break
        if text[pos] != ",":
            raise Unauthorized(f"malformed signature parameters at offset {pos}: expected ','")
        pos += 1
    missing = [k for k in required if k not in out]
    if missing:
        raise Unauthorized(f"signature parameters lack {', '.join(missing)}")
    return out


def _b64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise Unauthorized(f"{what} is not base64") from None


def parse_authorization(value: str) -> SignatureParams:
    """An ``Authorization: Signature ...`` header; Unauthorized for anything else."""
    scheme, sep, rest = value.partition(" ")
    if scheme != "Signature" or not sep:
        raise Unauthorized("Authorization must use the Signature scheme")
    p = parse_params(rest, ("keyId", "algorithm", "headers", "signature"),
                     ("keyId", "algorithm", "headers", "signature"))
    if p["algorithm"] not in ALGORITHMS:
        raise Unauthorized(f"algorithm {p['algorithm']!r} is not one of "
                           f"{', '.join(ALGORITHMS)}")
    names = tuple(p["headers"].split(" "))
    # Every field, each once (in any order): nothing of the request goes unsigned.
    if len(names) != len(SIGNED_HEADERS) or set(names) != set(SIGNED_HEADERS):
        raise Unauthorized(f"headers must sign exactly: {' '.join(SIGNED_HEADERS)}")
    sig = _b64(p["signature"], "signature")
    if not sig:
        raise Unauthorized("empty signature")
    return SignatureParams(p["keyId"], p["algorithm"], names, sig)


def digest(body: bytes) -> str:
    return "SHA-256=" + base64.b64encode(hashlib.sha256(body).digest()).decode()


def canonical(method: str, target: str, headers: Mapping[str, str],
              names: Sequence[str] = SIGNED_HEADERS) -> bytes:
    """The signing string: one ``name: value`` line per signed header, in order.

    ``target`` is the path and query as sent; ``headers`` keyed lower-case.
    """
    lines = []
    for n in names:
        value = f"{method.lower()} {target}" if n == "(request-target)" else headers[n]
        if "\n" in value or "\r" in value:
            raise Unauthorized(f"header {n} holds a line break")
        lines.append(f"{n}: {value}")
    return "\n".join(lines).encode()


def _response_string(nonce: str, status: int, body: bytes) -> bytes:
    return f"{NONCE_HEADER}: {nonce}\nstatus: {status}\ndigest: {digest(body)}".encode()


def _blob_algorithm(sig: bytes) -> str:
    """The algorithm name an SSH signature blob starts with (``string`` encoding)."""
    if len(sig) < 4:
        return ""
    (n,) = struct.unpack(">I", sig[:4])
    return sig[4:4 + n].decode("ascii", "replace") if n <= 64 else ""


def _check_signature(key: asyncssh.SSHKey, algorithm: str, data: bytes, sig: bytes) -> None:
    # The blob names its own algorithm; it must be the one claimed (no SHA-1
    # downgrade) and one this key can make.
    want = ALGORITHMS.get(algorithm)
    if want is None or _blob_algorithm(sig) != want \
            or want.encode() not in key.sig_algorithms:
        raise Unauthorized(f"signature algorithm does not fit key {key.get_fingerprint()}")
    try:
        ok = key.verify(data, sig)
    except Exception:  # asyncssh raises assorted errors on a mangled blob: all mean "bad"
        ok = False
    if not ok:
        raise Unauthorized("bad signature")


# -- keys and identities -----------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """A caller the server knows: its role, who it is within the role, its public key.

    Roles: ``operator``, ``cn``, ``zone``, ``coordinator``.
    """

    role: str
    id: str
    key: asyncssh.SSHKey

    @property
    def fingerprint(self) -> str:
        return str(self.key.get_fingerprint())

    @property
    def label(self) -> str:
        return f"{self.role}:{self.id}"


KeyLookup = Callable[[str], Awaitable[Identity | None]]


class Signer:
    """Signs requests (and, for the coordinator, responses) with one private key."""

    def __init__(self, key: asyncssh.SSHKey, clock: Callable[[], float] = time.time) -> None:
        self.key = key
        self.clock = clock  # tests sign with a skewed clock
        sig_alg = key.sig_algorithms[0].decode()
        if sig_alg not in _NAME_OF:
            raise ValueError(f"key type {key.algorithm.decode()} cannot sign HTTP requests")
        self._sig_alg = sig_alg
        self.algorithm = _NAME_OF[sig_alg]
        self.key_id = str(key.get_fingerprint())

    @classmethod
    def load(cls, path: str | Path) -> Signer:
        return cls(asyncssh.read_private_key(str(path)))

    def sign(self, data: bytes) -> bytes:
        return bytes(self.key.sign(data, self._sig_alg.encode()))

    def _params(self, data: bytes, names: Sequence[str] | None) -> str:
        head = f'keyId="{self.key_id}",algorithm="{self.algorithm}",'
        if names is not None:
            head += f'headers="{" ".join(names)}",'
        return head + f'signature="{base64.b64encode(self.sign(data)).decode()}"'

    def request_headers(self, method: str, target: str, host: str,
                        body: bytes) -> dict[str, str]:
        """Date, nonce, Digest and Authorization for one request."""
        h = {"host": host, "date": email.utils.formatdate(self.clock(), usegmt=True),
             NONCE_HEADER: secrets.token_urlsafe(18), "digest": digest(body)}
        sig = self._params(canonical(method, target, h), SIGNED_HEADERS)
        return {"Date": h["date"], NONCE_HEADER: h[NONCE_HEADER], "Digest": h["digest"],
                "Authorization": f"Signature {sig}"}

    def response_header(self, nonce: str, status: int, body: bytes) -> str:
        return self._params(_response_string(nonce, status, body), None)


def verify_response(key: asyncssh.SSHKey, nonce: str, status: int, body: bytes,
                    header: str | None) -> None:
    """Refuse (UntrustedResponse) an answer not signed by ``key`` for this request."""
    try:
        if header is None:
            raise Unauthorized("the answer is not signed")
        p = parse_params(header, ("keyId", "algorithm", "signature"),
                         ("keyId", "algorithm", "signature"))
        if p["keyId"] != key.get_fingerprint():
            raise Unauthorized(f"signed by {p['keyId']}, not {key.get_fingerprint()}")
        _check_signature(key, p["algorithm"], _response_string(nonce, status, body),
                         _b64(p["signature"], "signature"))
    except Unauthorized as e:
        raise UntrustedResponse(f"untrusted answer: {e.message}") from None


class ReplayCache:
    """Nonces seen within the window, per key; bounded (503 rather than forget one)."""

    def __init__(self, max_entries: int = MAX_NONCES) -> None:
        self.max_entries = max_entries
        self._seen: dict[tuple[str, str], float] = {}  # (key id, nonce) -> expiry
        self._expiry: list[tuple[float, tuple[str, str]]] = []  # a heap of the same

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, key_id: str, nonce: str, expires: float, now: float) -> None:
        """Remember a nonce until ``expires``; Unauthorized if it is already there."""
        while self._expiry and self._expiry[0][0] <= now:
            _, old = heapq.heappop(self._expiry)
            del self._seen[old]
        k = (key_id, nonce)
        if k in self._seen:
            raise Unauthorized("replayed request (nonce already seen)")
        if len(self._seen) >= self.max_entries:
            raise NonceCacheFull("too many signed requests in the window; retry shortly")
        self._seen[k] = expires
        heapq.heappush(self._expiry, (expires, k))


class Verifier:
    """The server side: one per app (it owns the replay cache)."""

    def __init__(self, window: float = WINDOW, clock: Callable[[], float] = time.time,
                 cache: ReplayCache | None = None) -> None:
        self.window = window
        self.clock = clock
        self.cache = cache or ReplayCache()
        # Nonces live in memory: a request signed before this process started
        # may have been seen by the one before it, so it is not taken. Dates
        # have whole seconds: one signed in the second of the start passes.
        self.started = math.floor(clock())

    async def verify(self, method: str, target: str, headers: Mapping[str, str],
                     body: bytes, lookup: KeyLookup,
                     presented: Identity | None = None) -> Identity:
        """Who signed this request; Unauthorized when it is not a valid signature.

        ``headers`` keyed case-insensitively (aiohttp's). ``presented``: an
        identity the request itself offers (a zone registering its host key),
        accepted when the signature is by that very key.
        """
        raw = headers.get("Authorization")
        if raw is None:
            raise Unauthorized("this request must be signed (Authorization: Signature ...)")
        params = parse_authorization(raw)
        who = await lookup(params.key_id)
        if who is None and presented is not None and presented.fingerprint == params.key_id:
            who = presented
        if who is None:
            raise Unauthorized(f"unknown key {params.key_id}")
        try:
            signed = {n: headers[n] for n in params.headers if n != "(request-target)"}
        except KeyError as e:
            raise Unauthorized(f"signed header {e.args[0]} is missing") from None
        _check_signature(who.key, params.algorithm, canonical(method, target, signed,
                                                              params.headers), params.signature)
        parsed = email.utils.parsedate_to_datetime(signed["date"]) \
            if _looks_like_date(signed["date"]) else None
        if parsed is None or parsed.tzinfo is None:
            raise Unauthorized(f"date {signed['date']!r} is not an HTTP date")
        when, now = parsed.timestamp(), self.clock()
        if abs(now - when) > self.window:
            raise Unauthorized(f"date {signed['date']} is more than {self.window:g}s "
                               "from the server's clock")
        if when < self.started:
            raise Unauthorized(f"date {signed['date']} is before this server started (a "
                               "replay cannot be ruled out): sign the request again")
        if signed["digest"] != digest(body):
            raise Unauthorized("digest does not match the body")
        nonce = signed[NONCE_HEADER]
        if not 8 <= len(nonce) <= 128:
            raise Unauthorized("nonce must be 8-128 characters")
        self.cache.add(params.key_id, nonce, when + self.window, now)
        return who


_HTTP_DATE = re.compile(r"[A-Za-z]{3}, \d{2} [A-Za-z]{3} \d{4} \d{2}:\d{2}:\d{2} GMT")


def _looks_like_date(value: str) -> bool:
    return _HTTP_DATE.fullmatch(value) is not None


# -- client ---------------------------------------------------------------------------


def signing_session(signer: Signer, *, response_key: asyncssh.SSHKey | None = None,
                    **kwargs: Any) -> aiohttp.ClientSession:
    """An aiohttp session that signs every request with ``signer``.

    With ``response_key``, every answer must be signed by that key for the
    request's nonce (UntrustedResponse otherwise, raised by the request).
    """
    # Imported here: aiohttp is a fifth of a CLI's start-up, and a CN's push
    # needs it only with a coordinator.
    import aiohttp

    async def sign(req: aiohttp.ClientRequest,
                   handler: aiohttp.ClientHandlerType) -> aiohttp.ClientResponse:
        body = req.body
        raw = await body.as_bytes() if isinstance(body, aiohttp.payload.Payload) else bytes(body)
        host = req.headers.get("Host") or req.url.host_port_subcomponent or ""
        signed = signer.request_headers(req.method, req.url.raw_path_qs, host, raw)
        req.headers.update(signed)
        resp = await handler(req)
        if response_key is not None:
            verify_response(response_key, signed[NONCE_HEADER], resp.status, await resp.read(),
                            resp.headers.get(RESPONSE_HEADER))
        return resp

    return aiohttp.ClientSession(middlewares=(sign,), **kwargs)


class NoAnswer(SnapperError):
    """No HTTP answer: refused, reset, timed out, not HTTP."""

    code = "Unreachable"
    http_status = 503


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """An answer as ``call_json`` read it: ``body`` is its JSON (None: empty or not JSON)."""

    status: int
    body: Any
    text: str
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status < 400

    def error(self) -> tuple[str, str]:
        """An error answer's ``(code, message)``: our services' ``{"code", "message"}``,
        else the status and whatever text came."""
        b = self.body if isinstance(self.body, dict) else {}
        return (str(b.get("code", self.status)),
                str(b.get("message", self.text.strip()[:500] or self.reason)))


async def call_json(http: aiohttp.ClientSession, method: str, url: str, *, body: Any = None,
                    timeout: float | None = None,
                    connect_timeout: float | None = None) -> HttpAnswer:
    """One request with ``http`` (a ``signing_session``), its JSON answer read whole.

    NoAnswer when none came (the message names the request); an answer that
    fails its signature check raises UntrustedResponse as the session does.
    Error statuses are the caller's to judge (``HttpAnswer.error``)."""
    import aiohttp  # as in signing_session

    try:
        # Without a timeout of its own, the session's applies.
        req = http.request(method, url, json=body) if timeout is None else \
            http.request(method, url, json=body, timeout=aiohttp.ClientTimeout(
                total=timeout, sock_connect=connect_timeout))
        async with req as r:
            text = await r.text()
            status, reason = r.status, r.reason or ""
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        raise NoAnswer(f"{method} {url}: {type(e).__name__}: {e}") from e
    try:
        doc = json.loads(text) if text.strip() else None
    except ValueError:
        doc = None
    return HttpAnswer(status, doc, text, reason)
