"""What one client may hold on a zone's SSH endpoint, and the errors it gets past it.

The numbers are the zone's ``[limits]`` (``common.config.Limits``); the SSH
server (``sshserver``) enforces connections, channels and idle connections,
the command handlers (``service``) concurrent sends, the receiver
(``transfer.local``) receive slots and quotas.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from snapper_zone.errors import SnapperError

__all__ = ["ConnectionIdle", "PerPrincipal", "TooManyChannels", "TooManyConnections",
           "TooManySends"]


class TooManyConnections(SnapperError):
    """The zone, or this client, holds as many SSH connections as it may."""

    code = "TooManyConnections"
    http_status = 429


class TooManyChannels(SnapperError):
    """This connection has as many channels open as one may."""

    code = "TooManyChannels"
    http_status = 429


class TooManySends(SnapperError):
    """This client has as many ``send`` streams running as it may."""

    code = "TooManySends"
    http_status = 429


class ConnectionIdle(SnapperError):
    """A connection ran no command for too long and was closed."""

    code = "ConnectionIdle"
    http_status = 408


class PerPrincipal:
    """How many of something each client holds, under one cap."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._held: Counter[str] = Counter()

    def __getitem__(self, who: str) -> int:
        return self._held[who]

    def total(self) -> int:
        return sum(self._held.values())

    def take(self, who: str) -> bool:
        """Count one more for ``who``; False (and nothing counted) at the cap."""
        if self._held[who] >= self.cap:
            return False
        self._held[who] += 1
        return True

    def give_back(self, who: str) -> None:
        self._held[who] -= 1
        if self._held[who] <= 0:
            del self._held[who]

    @contextlib.contextmanager
    def holding(self, who: str, refusal: SnapperError) -> Iterator[None]:
        """One held for the block's duration, or ``refusal`` raised when at the cap."""
        if not self.take(who):
            raise refusal
        try:
            yield
        finally:
            self.give_back(who)
