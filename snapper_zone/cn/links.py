"""The agent's links to its zones, kept between pushes.

``snapper push`` connects, pushes and goes. ``snapper agent`` pushes the
same few zones again and again, so it keeps each zone's connection (and,
for streams through the zone's sshd gate, a logged-in ``ssh`` master) and
the next push starts without a login: a login is most of a small scheduled
push's fixed cost on the CN, and a key exchange for the zone, per push, per
CN (bench/cn_path.py: the agent's push on a kept link).

A link the zone closed (its ``connection_idle_seconds``) or that broke is
seen closed at the next use and replaced; one that fails during a push is
forgotten by the caller, so the push's retry starts on a new one. As the
zones' own links to their peers (``replication.peers.PeerLinks``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncssh

from snapper_zone.transfer.remote import ZoneClient

__all__ = ["KEPT_LOGINS", "ZoneLinks"]

# Logged-in ssh masters per zone gate: the agent pushes one VM at a time.
KEPT_LOGINS = 1

_Identity = tuple[str, int, str, str, str]


def _identity(z: ZoneClient) -> _Identity:
    """What makes two clients the same link: where, as whom, checked against what."""
    pinned = z.host_key
    trust = (pinned.export_public_key().decode().strip()
             if isinstance(pinned, asyncssh.SSHKey) else f"pinned:{pinned}"
             if pinned is not None else f"known:{z.known_hosts}")
    key = z.client_key
    mine = key.get_fingerprint() if isinstance(key, asyncssh.SSHKey) else str(Path(key))
    return (z.host, z.port, z.username, mine, trust)


class ZoneLinks:
    """Connected ``ZoneClient``s, one per zone identity, kept until ``close``."""

    def __init__(self) -> None:
        self._links: dict[_Identity, ZoneClient] = {}
        self._locks: dict[_Identity, asyncio.Lock] = {}
        self.logins = 0  # connections made: each a login on the zone

    async def connected(self, wanted: ZoneClient) -> ZoneClient:
        """The kept link to ``wanted``'s zone, or ``wanted`` itself, connected and kept.

        ``wanted`` is a client as a one-off push would build it; its settings
        (and ``keep_logins`` of at least ``KEPT_LOGINS``) are those of a new link.
        """
        ident = _identity(wanted)
        async with self._locks.setdefault(ident, asyncio.Lock()):
            have = self._links.get(ident)
            if have is not None and have.conn is not None and not have.conn.is_closed():
                return have
            if have is not None:
                await self._drop(ident)
            wanted.keep_logins = max(wanted.keep_logins, KEPT_LOGINS)
            await wanted.connect()
            self.logins += 1
            self._links[ident] = wanted
            return wanted

    async def forget(self, zone: ZoneClient) -> None:
        """Close ``zone``'s link after an error: the next use connects again."""
        ident = _identity(zone)
        if self._links.get(ident) is zone:
            await self._drop(ident)

    async def _drop(self, ident: _Identity) -> None:
        link = self._links.pop(ident, None)
        if link is not None:
            try:
                await link.close()
            except (OSError, asyncssh.Error):
                pass  # already broken: nothing left to close cleanly

    async def close(self) -> None:
        for ident in list(self._links):
            await self._drop(ident)
