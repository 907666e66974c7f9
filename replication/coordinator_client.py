"""A zone's view of the coordinator (``rebalance/coordinator.py``) over its HTTP API.

The zone registers itself (``POST /v1/zones``, again every few minutes, so a
coordinator whose store was lost learns the fleet back), learns the other
admitted zones with their SSH endpoints and host keys (``GET
/v1/zones?admitted=true``: the trust list) and asks where a VM lives and
which zones may act on it (``GET /v1/placement/{vm}``: its pair and scope).
Every verified answer is cached, in memory and on disk (``common/answers``,
in the zone's ``state_dir``): a coordinator that is down slows nothing and
stops nothing; the zone keeps the last view (across its own restarts too),
or its static config when it never had one. After a failed call the
coordinator is not asked again for ``RETRY_AFTER`` seconds (every lookup in
between answers from the cache at once), and each call is bounded by
``_TIMEOUT`` (``_PROBE_TIMEOUT`` until the coordinator answers again).

Every request is signed with the zone's host key (``common/httpsig``); with
``coordinator_key`` configured, every answer must be signed by the
coordinator for that request (an unsigned or badly signed one counts as no
answer): a coordinator that can merely be reached is not trusted with the
trust list or a placement.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncssh

from snapper_zone.common.answers import AnswerCache
from snapper_zone.common.httpsig import (
    NONCE_HEADER,
    RESPONSE_HEADER,
    Signer,
    UntrustedResponse,
    signing_session,
)
from snapper_zone.errors import SnapperError
from snapper_zone.policy import PolicySet, check_policy_document, check_policy_name
from snapper_zone.wire import InvalidDocument, ZoneEndpoint, ZoneRegistration

__all__ = ["CoordinatorClient", "CoordinatorNotFound", "CoordinatorUnavailable", "KnownZone",
           "SignedAnswer", "VmPlacement"]

# Short and bounded: a coordinator that does not answer must not hold a push up.
_TIMEOUT = aiohttp.ClientTimeout(total=5, sock_connect=2)
# Once a call failed, the next lookups only probe (a hung coordinator costs a
# second per RETRY_AFTER, not five per push) until one is answered.
_PROBE_TIMEOUT = aiohttp.ClientTimeout(total=1, sock_connect=1)
PLACEMENT_TTL = 10.0  # seconds a VM's placement is trusted before asking again
RETRY_AFTER = 2.0  # seconds without a call after one failed: the cache answers meanwhile

log = logging.getLogger("snapperd")


class CoordinatorUnavailable(SnapperError):
    code = "CoordinatorUnavailable"
    http_status = 503


class CoordinatorNotFound(CoordinatorUnavailable):
    """The coordinator answered 404: it has no such thing (zone, placement)."""


# Another zone as ``GET /v1/zones`` lists it: where to reach it, its host key.
KnownZone = ZoneEndpoint


@dataclass(frozen=True)
class VmPlacement:
    """A VM as ``GET /v1/placement/{vm}`` answers: its (primary, mirror) and its
    scope, the zones that may act on it as peers (the pair and any move's zones)."""

    zones: tuple[str, ...]
    scope: frozenset[str]

    def to_json(self) -> dict[str, Any]:
        """What the answer cache keeps of it (the zone has no use for endpoints)."""
        return {"zones": list(self.zones), "scope": sorted(self.scope)}

    @classmethod
    def from_json(cls, doc: Any) -> VmPlacement | None:
        """A placement answer (or a cached one); None when it names no pair."""
        zones = tuple(str(z) for z in doc.get("zones") or []) if isinstance(doc, dict) else ()
        if len(zones) < 2:
            return None
        scope = doc.get("scope")
        # An older coordinator names no scope: the pair is all it vouches for.
        return cls(zones, frozenset(str(z) for z in scope) if isinstance(scope, list)
                   else frozenset(zones))


@dataclass(frozen=True)
class SignedAnswer:
    """An answer as it came, with what proves it is the coordinator's: the
    request's nonce and the response signature over it (``verify_response``)."""

    body: bytes
    nonce: str
    signature: str | None


class CoordinatorClient:
    def __init__(self, url: str, signer: Signer, coordinator_key: str | None = None,
                 cache: AnswerCache | None = None) -> None:
        """``signer``: this zone's host key; ``coordinator_key``: the coordinator's
        public key (OpenSSH line) its answers must be signed with; ``cache``: where
        verified answers are kept (None: in memory only)."""
        self.url = url.rstrip("/")
        self.signer = signer
        self.coordinator_key = None if coordinator_key is None else \
            asyncssh.import_public_key(coordinator_key)
        self.cache = cache or AnswerCache(None, log)
        self._session: aiohttp.ClientSession | None = None
        # vm -> (monotonic time asked, answer); from the file: asked "long ago".
        self._placement: dict[str, tuple[float, VmPlacement]] = {}
        for vm in self.cache.vms():
            seen = self.cache.placement(vm)
            got = VmPlacement.from_json(seen.doc) if seen is not None else None
            if got is not None:
                self._placement[vm] = (-PLACEMENT_TTL, got)
        # Monotonic: no lookup before (the last call failed); 0: the last one was answered.
        self._down_until = 0.0
        self._noted: set[str] = set()  # VMs whose cached placement was used this outage
        self._noted_policies: set[str] = set()  # the same, for policies

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = signing_session(self.signer, response_key=self.coordinator_key,
                                            timeout=_TIMEOUT)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self.cache.close()

    async def _call(self, method: str, path: str, body: Any = None, *,
                    pause: bool = True) -> Any:
        """One request; ``pause``: not sent within ``RETRY_AFTER`` of a failure (the
        lookups, which have the cache; registration has its own backoff)."""
        now = time.monotonic()
        if pause and now < self._down_until:
            raise CoordinatorUnavailable(f"{method} {self.url}{path}: not answering (asked "
                                         f"again in {self._down_until - now:.1f} s)")
        # (No timeout argument at all means the session's: None would mean none.)
        probe: dict[str, Any] = {"timeout": _PROBE_TIMEOUT} if pause and self._down_until \
            else {}
        try:
            async with self._http().request(method, self.url + path, json=body,
                                            **probe) as r:
                doc = await r.json(content_type=None)
                if r.status >= 400:
                    msg = doc.get("message", "") if isinstance(doc, dict) else ""
                    what = CoordinatorNotFound if r.status == 404 else CoordinatorUnavailable
                    if r.status >= 500:
                        self._failed()  # its store is away, say: as good as no answer
                    raise what(f"{method} {path}: {r.status} {msg}")
        except (aiohttp.ClientError, TimeoutError, ValueError, UntrustedResponse) as exc:
            self._failed()
            raise CoordinatorUnavailable(f"{method} {self.url}{path}: {exc!r}") from exc
        self._down_until = 0.0
        if self._noted:
            log.info("coordinator answers again", extra={"vms_served_from_cache":
                                                          len(self._noted)})
            self._noted.clear()
        return doc

    def _failed(self) -> None:
        self._down_until = time.monotonic() + RETRY_AFTER

    async def signed(self, path: str) -> SignedAnswer:
        """``GET path``'s answer kept whole with its signature (already checked
        against ``coordinator_key`` by the session), to be checked again later."""
        try:
            async with self._http().get(self.url + path) as r:
                body = await r.read()
                if r.status >= 400:
                    what = CoordinatorNotFound if r.status == 404 else CoordinatorUnavailable
                    raise what(f"GET {path}: {r.status} {body[:200]!r}")
                return SignedAnswer(body, r.request_info.headers.get(NONCE_HEADER, ""),
                                    r.headers.get(RESPONSE_HEADER))
        except (aiohttp.ClientError, TimeoutError, UntrustedResponse) as exc:
            raise CoordinatorUnavailable(f"GET {self.url}{path}: {exc!r}") from exc

    async def register(self, record: ZoneRegistration) -> None:
        await self._call("POST", "/v1/zones", record.to_json(), pause=False)

    async def knows(self, zone: str) -> bool:
        """Whether the coordinator has ``zone`` registered (a new store has nobody)."""
        try:
            async with self._http().get(f"{self.url}/v1/zones/{zone}") as r:
                if r.status == 404:
                    return False
                if r.status >= 400:
                    raise CoordinatorUnavailable(f"GET /v1/zones/{zone}: {r.status}")
                return True
        except (aiohttp.ClientError, TimeoutError, UntrustedResponse) as exc:
            raise CoordinatorUnavailable(f"GET {self.url}/v1/zones/{zone}: {exc!r}") from exc

    async def zones(self) -> list[KnownZone]:
        """The admitted zones: the coordinator lists only those, and says so of each;
        one it does not mark admitted is left out all the same."""
        doc = await self._call("GET", "/v1/zones?admitted=true")
        out = _admitted(doc)
        self.cache.put_zones({"zones": [z.to_json() for z in out]})
        await self.cache.flush()
        return out

    def cached_zones(self) -> tuple[list[KnownZone], float] | None:
        """The last trust list ``zones`` got (this run or an earlier one) and when."""
        seen = self.cache.zones()
        return None if seen is None else (_admitted(seen.doc), seen.at)

    async def placement(self, vm: str, fresh: bool = False) -> tuple[str, ...] | None:
        """The VM's (primary, mirror) zone uuids, or None when the coordinator is away.

        ``fresh`` skips the cache: before creating a copy where there was none.
        """
        got = await self.lookup(vm, fresh)
        return None if got is None else got.zones

    def cached(self, vm: str) -> VmPlacement | None:
        """The VM's last answer while it is fresh (``PLACEMENT_TTL``), without asking."""
        hit = self._placement.get(vm)
        if hit is None or time.monotonic() - hit[0] >= PLACEMENT_TTL:
            return None
        return hit[1]

    async def lookup(self, vm: str, fresh: bool = False,
                     create: bool = True) -> VmPlacement | None:
        """``placement`` with the VM's scope; the last answer when the coordinator is away.

        Not ``create``: a VM the coordinator has not placed is not placed by
        asking (a peer's command about it); its answer is an empty placement.
        """
        now = time.monotonic()
        cached = self._placement.get(vm)
        if cached is not None and now - cached[0] < PLACEMENT_TTL and not fresh:
            return cached[1]
        try:
            doc = await self._call("GET", f"/v1/placement/{vm}"
                                   + ("" if create else "?create=false"))
        except CoordinatorNotFound:
            if create:
                return cached[1] if cached else None
            return VmPlacement((), frozenset())  # not cached: a push may place it any time
        except CoordinatorUnavailable as exc:
            return self._from_cache(vm, exc)
        got = VmPlacement.from_json(doc)
        if got is None:
            return cached[1] if cached else None
        self._placement[vm] = (now, got)
        self.cache.put_placement(vm, got.to_json())
        await self.cache.flush()
        return got

    def _from_cache(self, vm: str, why: CoordinatorUnavailable) -> VmPlacement | None:
        """The last placement seen of ``vm`` while the coordinator does not answer."""
        cached = self._placement.get(vm)
        if cached is None:
            return None
        if vm not in self._noted:  # once per VM and outage, not once per call
            self._noted.add(vm)
            seen = self.cache.placement(vm)
            at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seen.at)) if seen else "?"
            log.warning(f"coordinator unreachable: using the placement seen at {at}",
                        extra={"vm": vm, "placement": list(cached[1].zones),
                               "error": why.message})
        return cached[1]

    async def policy(self, name: str) -> PolicySet:
        """Policy ``name`` from the registry (``GET /v1/policies/{name}``), checked
        field by field; while the coordinator does not answer, the last copy
        verified (kept in the answer cache). CoordinatorNotFound: removed, or never
        set; CoordinatorUnavailable: no answer and no copy; InvalidPolicy."""
        try:
            doc = await self._call("GET", f"/v1/policies/{check_policy_name(name)}")
        except CoordinatorNotFound:
            raise
        except CoordinatorUnavailable as exc:
            seen = self.cache.policy(name)
            if seen is None:
                raise
            if name not in self._noted_policies:  # once per outage
                self._noted_policies.add(name)
                at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seen.at))
                log.warning(f"coordinator unreachable: using policy {name} as seen at {at}",
                            extra={"policy": name, "error": exc.message})
            return check_policy_document(seen.doc.get("document"), name)
        self._noted_policies.clear()
        got = check_policy_document(doc.get("document") if isinstance(doc, dict) else None,
                                    name)
        self.cache.put_policy(name, {"document": doc["document"],
                                     "version": doc.get("version")})
        await self.cache.flush()
        return got

    def seen_at(self, vm: str) -> float | None:
        """When the cached placement of ``vm`` arrived (unix time), if there is one."""
        seen = self.cache.placement(vm)
        return None if seen is None else seen.at


def _admitted(doc: Any) -> list[KnownZone]:
    """The admitted zones of a ``GET /v1/zones`` answer: the coordinator lists only
    those, and says so of each; one it does not mark admitted is left out all the same."""
    out = []
    for z in doc.get("zones", []) if isinstance(doc, dict) else []:
        try:
            known = KnownZone.from_json(z)
        except InvalidDocument:
            continue  # a half-registered zone is not a peer yet
        if known.admitted:
            out.append(known)
    return out
