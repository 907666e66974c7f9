"""The coordinator's last verified answers, kept on disk: the coordinator off the push path.

CNs and zones ask the coordinator where a VM lives (``GET /v1/placement/{vm}``)
and zones which zones are admitted with their pinned host keys (``GET
/v1/zones?admitted=true``, the trust list); a CN's agent asks for its policy
(``GET /v1/policies/{name}``). Each answer they have *verified*
(signed by ``coordinator_key`` when one is configured) is put here with the
time it arrived, and written to one JSON file in the state dir (atomically:
a temporary file, fsync, rename). While no coordinator answers, the last
answer is used instead (``rebalance/README.md``, "Without the coordinator").

One job: remember documents. What a document means (its zones, endpoints,
keys) is checked again by whoever reads it back, as for a fresh answer.
A file that cannot be read or parsed is a ``CacheCorrupt``: the cache starts
empty (a cache only ever saves a round trip or bridges an outage; it is never
the only copy of anything), says so once in the log, and the next answer
overwrites the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapper_zone.common.bootstrap import write_atomically
from snapper_zone.errors import SnapperError

__all__ = ["FORMAT", "AnswerCache", "CacheCorrupt", "Seen", "decode", "encode"]

FORMAT = 1  # the file's "format"; another one is not read (starts empty)
MAX_VMS = 1_000_000  # a bound on what one file may claim to hold


class CacheCorrupt(SnapperError):
    """The cache file is not one this version wrote (truncated, edited, another format)."""

    code = "CacheCorrupt"
    http_status = 500


@dataclass(frozen=True)
class Seen:
    """One answer of the coordinator and when it arrived (unix time)."""

    doc: Mapping[str, Any]
    at: float


def encode(placements: Mapping[str, Seen], zones: Seen | None,
           policies: Mapping[str, Seen] | None = None) -> bytes:
    """The file's bytes: ``{"format", "placements": {vm: {"at", "doc"}}, "zones",
    "policies": {name: {"at", "doc"}}}`` (``policies`` only when there are some: a
    file without them is read as before)."""
    out: dict[str, Any] = {
        "format": FORMAT,
        "placements": {vm: {"at": s.at, "doc": dict(s.doc)}
                       for vm, s in sorted(placements.items())},
        "zones": None if zones is None else {"at": zones.at, "doc": dict(zones.doc)},
    }
    if policies:
        out["policies"] = {n: {"at": s.at, "doc": dict(s.doc)}
                           for n, s in sorted(policies.items())}
    return json.dumps(out, separators=(",", ":"), sort_keys=True).encode()


def _seen(value: object, where: str) -> Seen:
    if not isinstance(value, dict) or set(value) != {"at", "doc"}:
        raise CacheCorrupt(f"{where}: expected {{\"at\", \"doc\"}}")
    at, doc = value["at"], value["doc"]
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at) \
            or at < 0:
        raise CacheCorrupt(f"{where}.at: not a time")
    if not isinstance(doc, dict):
        raise CacheCorrupt(f"{where}.doc: not an object")
    return Seen(doc, float(at))


def decode(raw: bytes) -> tuple[dict[str, Seen], Seen | None, dict[str, Seen]]:
    """``encode``'s inverse; anything else is a ``CacheCorrupt``."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CacheCorrupt(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CacheCorrupt(f"not a cache file of format {FORMAT}")
    placements = data.get("placements")
    if not isinstance(placements, dict) or len(placements) > MAX_VMS:
        raise CacheCorrupt("placements: not an object (or too large)")
    got = {str(vm): _seen(s, f"placements[{vm!r:.60}]") for vm, s in placements.items()}
    zones = data.get("zones")
    policies = data.get("policies", {})
    if not isinstance(policies, dict) or len(policies) > MAX_VMS:
        raise CacheCorrupt("policies: not an object (or too large)")
    return (got, None if zones is None else _seen(zones, "zones"),
            {str(n): _seen(s, f"policies[{n!r:.60}]") for n, s in policies.items()})


class AnswerCache:
    """The last verified placement per VM and the last trust list, on disk at ``path``.

    ``path`` None: in memory only. Writes are coalesced: at most one every
    ``min_interval`` seconds (a zone learning thousands of VMs at start
    writes a few times, not thousands); a CN (one push, then exit) uses 0.
    An answer equal to the one held only refreshes its time, written with
    the next change or after ``touch_interval``.
    """

    def __init__(self, path: Path | None, log: logging.Logger, *,
                 min_interval: float = 1.0, touch_interval: float = 60.0) -> None:
        self.path = path
        self.log = log
        self.min_interval = min_interval
        self.touch_interval = touch_interval
        self._placements: dict[str, Seen] = {}
        self._zones: Seen | None = None
        self._policies: dict[str, Seen] = {}
        self._changed = False  # a document differs from the file's
        self._touched = False  # only times differ
        self._written = 0.0  # monotonic time of the last write
        self._lock = asyncio.Lock()
        self._later: asyncio.Task[None] | None = None

    @classmethod
    def load(cls, path: Path | None, log: logging.Logger, **kwargs: Any) -> AnswerCache:
        """The cache as ``path`` holds it; empty when there is none or it is corrupt."""
        cache = cls(path, log, **kwargs)
        if path is None:
            return cache
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return cache
        except OSError as exc:
            log.warning("coordinator answer cache unreadable; starting empty",
                        extra={"path": str(path), "error": str(exc)})
            return cache
        try:
            cache._placements, cache._zones, cache._policies = decode(raw)
        except CacheCorrupt as exc:
            log.warning("coordinator answer cache corrupt; starting empty",
                        extra={"path": str(path), "code": exc.code, "error": exc.message})
        return cache

    # -- reading --------------------------------------------------------------------

    def placement(self, vm: str) -> Seen | None:
        return self._placements.get(vm)

    def zones(self) -> Seen | None:
        return self._zones

    def vms(self) -> list[str]:
        return sorted(self._placements)

    def policy(self, name: str) -> Seen | None:
        return self._policies.get(name)

    # -- remembering ----------------------------------------------------------------

    def put_placement(self, vm: str, doc: Mapping[str, Any], at: float | None = None) -> None:
        self._mark(self._placements.get(vm), doc)
        self._placements[vm] = Seen(dict(doc), time.time() if at is None else at)

    def put_zones(self, doc: Mapping[str, Any], at: float | None = None) -> None:
        self._mark(self._zones, doc)
        self._zones = Seen(dict(doc), time.time() if at is None else at)

    def put_policy(self, name: str, doc: Mapping[str, Any], at: float | None = None) -> None:
        self._mark(self._policies.get(name), doc)
        self._policies[name] = Seen(dict(doc), time.time() if at is None else at)

    def forget(self, vm: str) -> None:
        if self._placements.pop(vm, None) is not None:
            self._changed = True

    def _mark(self, old: Seen | None, doc: Mapping[str, Any]) -> None:
        if old is None or dict(old.doc) != dict(doc):
            self._changed = True
        else:
            self._touched = True

    # -- writing --------------------------------------------------------------------

    async def flush(self) -> None:
        """Write what changed (coalesced, see the class); never raises for a write
        that fails: the cache goes on in memory and the next flush tries again."""
        if self.path is None or not (self._changed or self._touched):
            return
        wait = self._written + self.min_interval - time.monotonic()
        if not self._changed and time.monotonic() - self._written < self.touch_interval:
            return
        if wait > 0:
            if self._later is None or self._later.done():
                self._later = asyncio.create_task(self._flush_later(wait),
                                                  name="answer-cache-flush")
            return
        await self._write()

    async def _flush_later(self, delay: float) -> None:
        await asyncio.sleep(delay)  # the coalescing delay itself, not a synchronisation
        await self._write()

    async def _write(self) -> None:
        assert self.path is not None
        async with self._lock:
            if not (self._changed or self._touched):
                return
            data = encode(self._placements, self._zones, self._policies)
            self._changed = self._touched = False
            self._written = time.monotonic()
            try:
                await asyncio.to_thread(_write, self.path, data)
            except OSError as exc:
                self._changed = True
                self.log.warning("cannot write the coordinator answer cache",
                                 extra={"path": str(self.path), "error": str(exc)})

    async def close(self) -> None:
        """Write what is pending now (a zone stopping)."""
        if self._later is not None:
            self._later.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._later
            self._later = None
        if self.path is not None and (self._changed or self._touched):
            await self._write()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomically(path, data, mode=0o600)
