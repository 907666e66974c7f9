"""Which zone mirrors a VM, and one SSH connection per peer zone.

A zone talks to its peers as any client does: the grammar in
``snapper_zone.wire.protocol`` over asyncssh (``ZoneClient``), as role ``peer``.
Its client key is its own SSH host key, and it pins each peer's host key to
the peer key the config trusts for that zone uuid: one key per zone serves
both directions, so adding a zone to a fleet is one key exchange.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncssh

from replication.coordinator_client import CoordinatorClient, CoordinatorUnavailable, KnownZone
from snapper_zone.common.config import TrustedKey, ZoneConfig
from snapper_zone.common.hashing import rank
from snapper_zone.common.metrics import Metrics
from snapper_zone.errors import SnapperError
from snapper_zone.transfer.remote import ZoneClient, ZoneUnreachable

__all__ = ["NoPeer", "Peer", "PeerLinks", "pair_of", "static_partner", "static_scope"]


class NoPeer(SnapperError):
    """No zone to mirror to: none configured, or the named one is unknown."""

    code = "MirrorUnavailable"
    http_status = 503


@dataclass(frozen=True)
class Peer:
    uuid: str
    ssh_host: str
    ssh_port: int
    http_url: str
    host_key: str | None  # OpenSSH public key line; None: not trusted as a peer


def pair_of(vm: str, zones: Sequence[str]) -> tuple[str, ...]:
    """The two zones a VM lives on when no coordinator says otherwise.

    Rendezvous hashing over the zone uuids, equal weights: every zone with the
    same list computes the same pair, the CN's placement included.
    """
    return tuple(rank(vm, [(z, 1) for z in zones])[:2])


def static_partner(me: str, vm: str, peers: Sequence[str]) -> str | None:
    """The zone holding ``vm``'s other copy with no coordinator: the only peer,
    or ``pair_of`` over this zone and its configured peers (None: no peer)."""
    if not peers:
        return None
    if len(peers) == 1:
        return peers[0]
    return next(z for z in pair_of(vm, [me, *peers]) if z != me)


def static_scope(me: str, vm: str, peers: Sequence[str]) -> frozenset[str]:
    """The zones that may act on ``vm`` as each other's peers with no coordinator:
    the static pair (this zone and its only peer, or ``pair_of``), which every
    zone of a fleet with the same list computes alike."""
    if len(peers) <= 1:
        return frozenset({me, *peers})
    return frozenset(pair_of(vm, [me, *peers]))


class PeerLinks:
    """The peers of one zone and a cached connection to each."""

    def __init__(self, config: ZoneConfig, log: logging.Logger,
                 coordinator: CoordinatorClient | None = None,
                 metrics: Metrics | None = None) -> None:
        self.log = log
        self.coordinator = coordinator
        self.metrics = metrics
        self.reconfigure(config)
        # Zones the coordinator knows (its registry), with their host keys;
        # the config's own peers win over them.
        self._learned: dict[str, Peer] = {}
        self.learned_keys: dict[bytes, TrustedKey] = {}
        # The coordinator answered without us: its store is new; register again.
        self.forgotten = asyncio.Event()
        self._clients: dict[str, ZoneClient] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        cached = coordinator.cached_zones() if coordinator is not None else None
        if cached is not None:
            # The trust list as last verified (an earlier run): peers and their
            # keys stay trusted while the coordinator does not answer, until
            # its next answer replaces the list.
            self._learn(cached[0])
            self.log.info("trust list from the answer cache", extra={
                "zones": len(self._learned), "seen_at": cached[1]})

    def reconfigure(self, config: ZoneConfig) -> None:
        """The static peers, each pinned to its ``[[keys]]`` peer key (again after a
        SIGHUP: a peer key rotated in the config pins the next connection)."""
        self.config = config
        keys = {k.zone: k.public_key for k in config.keys if k.role == "peer"}
        self._static = {p.uuid: Peer(p.uuid, p.ssh_host, p.ssh_port, p.http_url,
                                     keys.get(p.uuid)) for p in config.peers}

    @property
    def _peers(self) -> dict[str, Peer]:
        return {**self._learned, **self._static}

    @property
    def peers(self) -> list[Peer]:
        return list(self._peers.values())

    def get(self, uuid: str) -> Peer:
        try:
            return self._peers[uuid]
        except KeyError:
            raise NoPeer(f"zone {uuid} is not a peer of this zone") from None

    async def refresh(self) -> None:
        """Learn the fleet's zones from the coordinator (no-op without one)."""
        if self.coordinator is None:
            return
        try:
            zones = await self.coordinator.zones()
        except CoordinatorUnavailable as exc:
            self.log.info("coordinator unavailable; keeping the last view: %s", exc)
            return
        if all(z.uuid != self.config.uuid for z in zones):
            # Not in the trust list: pending (not admitted yet) or forgotten.
            try:
                if not await self.coordinator.knows(self.config.uuid):
                    self.forgotten.set()
            except CoordinatorUnavailable:
                pass
        self._learn(zones)

    def _learn(self, zones: Sequence[KnownZone]) -> None:
        """Trust ``zones`` (a trust list from the coordinator) as this zone's peers."""
        learned: dict[str, Peer] = {}
        keys: dict[bytes, TrustedKey] = {}
        for z in zones:
            # Only a zone an operator admitted is trusted (zones() keeps only
            # those; checked again here, as trust hangs on it).
            if z.uuid == self.config.uuid or z.state == "lost" or not z.admitted:
                continue
            try:
                key = asyncssh.import_public_key(z.host_key)
            except (asyncssh.KeyImportError, ValueError):
                self.log.warning("zone %s: unusable host key from the coordinator", z.uuid)
                continue
            learned[z.uuid] = Peer(z.uuid, z.ssh_host, z.ssh_port, z.http_url, z.host_key)
            keys[key.public_data] = TrustedKey(
                role="peer", public_key=z.host_key, fingerprint=key.get_fingerprint(),
                key_data=key.public_data, zone=z.uuid)
        self._learned, self.learned_keys = learned, keys

    async def partner(self, vm: str, fresh: bool = False) -> Peer | None:
        """``partner_of``, asking the coordinator's placement first when there is one
        (``fresh``: not from the cache, for a push that is about to make a copy)."""
        found = await self.partner_or_why(vm, fresh)
        return found if isinstance(found, Peer) else None

    async def partner_or_why(self, vm: str, fresh: bool = False) -> Peer | str:
        """``partner``, or why there is none (for the VM's state and the CN's ack)."""
        if self.coordinator is None:
            return self.partner_of(vm) or "no peer zone is configured"
        # The coordinator decides where copies go; with no answer ever seen
        # for this VM (placement() bridges an outage with the last one) no
        # copy is made by guesswork: wait for it.
        pair = await self.coordinator.placement(vm, fresh=fresh)
        if not pair:
            return "the coordinator gave no placement for this VM (down or rebuilding)"
        me = self.config.uuid
        # Not in the pair (a move just took the VM away): the pair's first
        # zone is where our copy's snapshots belong.
        other = next((z for z in pair if z != me), None) if me in pair else pair[0]
        if other is None:
            return "the coordinator places this VM on this zone alone (no second zone yet)"
        if other not in self._peers:
            await self.refresh()
        if other not in self._peers:
            return (f"the coordinator places this VM with zone {other}, which the "
                    "coordinator's list of zones does not name (yet)")
        return self._peers[other]

    def partner_of(self, vm: str) -> Peer | None:
        """The zone that holds ``vm``'s other copy, or None when there is no peer."""
        other = static_partner(self.config.uuid, vm, list(self._peers))
        return None if other is None else self._peers[other]

    async def client(self, uuid: str) -> ZoneClient:
        """A connected client to peer ``uuid`` (connecting if need be)."""
        peer = self.get(uuid)
        if peer.host_key is None:
            raise NoPeer(f"zone {uuid} has no trusted peer key in the config; its host key "
                         "cannot be checked")
        lock = self._connecting.setdefault(uuid, asyncio.Lock())
        async with lock:
            have = self._clients.get(uuid)
            if have is not None and have.conn is not None and not have.conn.is_closed():
                return have
            # A peer with an sshd gate takes large copies (moves, repairs,
            # catch-up, a push's pipelined mirror) through it, decrypted by its
            # sshd: bench/zone_copy.py. Logged-in ssh masters, as many as a
            # zone takes mirror streams at once, spare each copy a login.
            client = ZoneClient(peer.ssh_host, peer.ssh_port, self.config.ssh.host_key,
                                host_key=asyncssh.import_public_key(peer.host_key),
                                connect_timeout=10.0, openssh=shutil.which("ssh"),
                                openssh_gate_only=True,
                                keep_logins=self.config.mirror_receives,
                                on_login=self._login_counter(uuid))
            await client.connect()
            self._clients[uuid] = client
            return client

    def _login_counter(self, uuid: str) -> Callable[[str], None] | None:
        if self.metrics is None:
            return None
        logins = self.metrics.peer_ssh_logins
        return lambda how: logins.labels(uuid, how).inc()

    async def forget(self, uuid: str) -> None:
        """Drop a connection after an error; the next use reconnects."""
        client = self._clients.pop(uuid, None)
        if client is not None:
            try:
                await client.close()
            except (OSError, asyncssh.Error):
                pass

    async def close(self) -> None:
        for uuid in list(self._clients):
            await self.forget(uuid)
        if self.coordinator is not None:
            await self.coordinator.close()


def unreachable(exc: BaseException) -> bool:
    """Errors after which the peer is retried later rather than reported as a bug."""
    return isinstance(exc, ZoneUnreachable | OSError | asyncssh.Error | TimeoutError)
