"""A zone following the coordinator's identity registry: CNs and their keys, each
VM's owning CN, restore grants (``GET /v1/identity``, ``IdentityDocument``).

Polled every ``interval`` seconds (1 s by default) with the version held
(``?since=N``): while nothing changed the answer is one line, so a change
reaches every zone within about a second, with no restart. Answers are signed
by the coordinator for each request (the session checks it against
``coordinator_key``), and the zone keeps its last verified copy on disk with
that signature: a zone restarted while no coordinator answers loads it, checks
the signature again, and keeps using it. A copy whose signature does not check
(edited, or from another coordinator) is ignored.

What the registry says comes before the static config for what it names: a
VM it maps to a CN belongs to that CN (a VM it does not name falls back to the
config's ``[vms]``), and its CN keys are trusted beside the config's
``[[keys]]``. A key removed from it is refused on its next command (the zone
checks its principal again per command: ``snapper_zone/daemon/service.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import asyncssh

from replication.coordinator_client import (
    CoordinatorClient,
    CoordinatorUnavailable,
    SignedAnswer,
)
from snapper_zone.common.bootstrap import write_atomically
from snapper_zone.common.config import TrustedKey
from snapper_zone.common.httpsig import UntrustedResponse, verify_response
from snapper_zone.common.tasks import cancel_and_wait
from snapper_zone.wire import IdentityDocument, InvalidDocument, jsontext

__all__ = ["IdentityFollower"]

DEFAULT_INTERVAL = 1.0


class IdentityFollower:
    """The registry as this zone last verified it, kept fresh by ``start()``."""

    def __init__(self, coordinator: CoordinatorClient, path: Path, log: logging.Logger,
                 interval: float = DEFAULT_INTERVAL) -> None:
        self.coordinator = coordinator
        self.path = path
        self.log = log
        self.interval = interval
        self.doc: IdentityDocument | None = None
        self.keys: dict[bytes, TrustedKey] = {}  # a registry CN key by its wire encoding
        self.polls = 0  # answers received (for tests and logs)
        self._task: asyncio.Task[None] | None = None

    # -- what the zone asks --

    @property
    def version(self) -> int | None:
        return None if self.doc is None else self.doc.version

    def owner_of(self, vm: str) -> str | None:
        """The VM's CN per the registry; None when it does not name the VM."""
        return None if self.doc is None else self.doc.vms.get(vm)

    def granted(self, vm: str, cn: str) -> bool:
        return self.doc is not None and self.doc.granted(vm, cn, time.time())

    # -- keeping it --

    def _install(self, doc: IdentityDocument) -> None:
        keys: dict[bytes, TrustedKey] = {}
        for c in doc.cns:
            for line in c.keys:
                try:
                    k = asyncssh.import_public_key(line)
                except (asyncssh.KeyImportError, ValueError):
                    self.log.warning("registry key of CN %s unusable; ignored", c.id)
                    continue
                keys[k.public_data] = TrustedKey(
                    role="cn", public_key=line, fingerprint=k.get_fingerprint(),
                    key_data=k.public_data, cn_id=c.id)
        old = self.version
        self.doc, self.keys = doc, keys
        if old is not None and doc.version < old:
            # Signed by the coordinator all the same: its store was replaced.
            self.log.warning("registry version went back", extra={"was": old,
                                                                  "now": doc.version})
        self.log.info("identity registry followed", extra={
            "version": doc.version, "cns": len(doc.cns), "vms": len(doc.vms),
            "grants": len(doc.grants)})

    def _check(self, answer: SignedAnswer) -> IdentityDocument | None:
        """The document an answer holds, its signature checked (again, from disk)."""
        key = self.coordinator.coordinator_key
        if key is not None:
            verify_response(key, answer.nonce, 200, answer.body, answer.signature)
        doc = jsontext.loads(answer.body, "identity")
        if isinstance(doc, dict) and doc.get("unchanged") is True:
            return None
        return IdentityDocument.from_json(doc)

    def load(self) -> bool:
        """The copy on disk, if there is one and its signature checks."""
        try:
            saved = json.loads(self.path.read_text())
            answer = SignedAnswer(saved["body"].encode(), saved["nonce"], saved["signature"])
            doc = self._check(answer)
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError, AttributeError,
                UntrustedResponse, InvalidDocument, jsontext.InvalidJson) as e:
            self.log.warning("identity copy on disk not used", extra={
                "path": str(self.path), "err_msg": str(e)})
            return False
        if doc is None:
            return False
        self._install(doc)
        return True

    def _save(self, answer: SignedAnswer) -> None:
        data = {"nonce": answer.nonce, "signature": answer.signature,
                "body": answer.body.decode()}
        try:
            write_atomically(self.path, json.dumps(data).encode(), 0o600)
        except OSError as e:  # still followed in memory; said in the log
            self.log.warning("cannot keep the identity copy on disk",
                             extra={"path": str(self.path), "err_msg": str(e)})

    async def poll(self) -> bool:
        """Ask once; True when the registry changed. CoordinatorUnavailable when no
        (trusted) answer came: the last copy stays in force."""
        since = "" if self.version is None else f"?since={self.version}"
        answer = await self.coordinator.signed("/v1/identity" + since)
        self.polls += 1
        try:
            doc = self._check(answer)
        except (UntrustedResponse, InvalidDocument, jsontext.InvalidJson) as e:
            raise CoordinatorUnavailable(f"identity answer refused: {e}") from e
        if doc is None or (self.doc is not None and doc == self.doc):
            return False
        self._install(doc)
        self._save(answer)
        return True

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                await self.poll()
                if failing:
                    self.log.info("identity registry reachable again",
                                  extra={"version": self.version})
                failing = False
            except CoordinatorUnavailable as e:
                if not failing:  # once per outage, not every second
                    self.log.warning("identity registry unavailable; keeping the last copy",
                                     extra={"version": self.version, "err_msg": str(e)})
                failing = True
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="identity")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
