"""Who a client is, and what it may do: pure, so it can be tested exhaustively.

Every SSH client is one of the keys in the zone's config, and each key has a
role:

- ``cn``: a compute node. It may push, restore, list, commit, read and delete
  snapshots of the VMs mapped to it, and nothing of any other VM.
- ``peer``: another snapper zone. Zone-to-zone mirror and move traffic may
  touch any VM, so a peer may run every command.
- ``operator``: a human or tool watching the fleet: list, read metadata and
  delete; never a stream in or out.

``authorize`` decides from the command alone (and the VM -> CN map), before
anything runs; what a command would then do to ZFS is none of its business.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from snapper_zone.common.config import Role, TrustedKey
from snapper_zone.errors import SnapperError
from snapper_zone.wire.protocol import (
    Abort,
    Command,
    Commit,
    Delete,
    Destroy,
    Metadata,
    Ping,
    Receive,
    ResumeToken,
    Send,
    Snapshots,
)

__all__ = ["NotAuthorized", "Principal", "allowed_verbs", "authorize", "verb"]


class NotAuthorized(SnapperError):
    code = "NotAuthorized"
    http_status = 403


_VERBS: dict[type, str] = {
    Receive: "receive",
    Send: "send",
    ResumeToken: "resume-token",
    Abort: "abort",
    Snapshots: "snapshots",
    Commit: "commit",
    Metadata: "metadata",
    Delete: "delete",
    Destroy: "destroy",
    Ping: "ping",
}

_ALLOWED: dict[Role, frozenset[str]] = {
    "cn": frozenset({"receive", "send", "resume-token", "abort", "snapshots", "commit",
                     "metadata", "delete", "ping"}),
    "peer": frozenset(_VERBS.values()),
    "operator": frozenset({"ping", "snapshots", "metadata", "delete"}),
}


def verb(command: Command) -> str:
    """The grammar's verb for a parsed command ("resume-token", ...)."""
    return _VERBS[type(command)]


def allowed_verbs(role: Role) -> frozenset[str]:
    return _ALLOWED[role]


@dataclass(frozen=True)
class Principal:
    """An authenticated client: its role, who it is within the role, and its key."""

    role: Role
    id: str  # cn_id, peer zone uuid, or operator name (key comment, else fingerprint)
    fingerprint: str
    connection: int = 0  # which SSH connection (for logs)

    @classmethod
    def from_key(cls, key: TrustedKey, connection: int = 0) -> Principal:
        if key.role == "cn":
            assert key.cn_id is not None  # the config guarantees it for role cn
            ident = key.cn_id
        elif key.role == "peer":
            assert key.zone is not None  # likewise for role peer
            ident = key.zone
        else:
            # An operator is named by the comment on its key ("alice@ops"),
            # which is only a label for logs; the fingerprint is the identity.
            parts = key.public_key.split(maxsplit=2)
            ident = parts[2].strip() if len(parts) == 3 and parts[2].strip() else key.fingerprint
        return cls(key.role, ident, key.fingerprint, connection)

    @property
    def label(self) -> str:
        """Who this is in logs, metrics and ``snapper:source``: "cn:<id>", "zone:<uuid>"..."""
        prefix = {"cn": "cn", "peer": "zone", "operator": "operator"}[self.role]
        return f"{prefix}:{self.id}"


def _vm_of(command: Command) -> str | None:
    return None if isinstance(command, Ping) else command.vm


def authorize(principal: Principal, command: Command,
              owner_of: Callable[[str], str | None]) -> None:
    """Return if ``principal`` may run ``command``; raise NotAuthorized otherwise.

    ``owner_of(vm)`` is the CN id a VM is mapped to (None when unmapped).
    """
    name = verb(command)
    if name not in _ALLOWED[principal.role]:
        raise NotAuthorized(
            f"{principal.role} key {principal.fingerprint} ({principal.label}) may not run "
            f"{name!r}; a {principal.role} key may run: "
            f"{', '.join(sorted(_ALLOWED[principal.role]))}")
    if principal.role != "cn":
        return
    vm = _vm_of(command)
    if vm is None:
        return
    owner = owner_of(vm)
    if owner != principal.id:
        whose = "is not mapped to any CN" if owner is None else "belongs to another CN"
        raise NotAuthorized(f"VM {vm} {whose}; CN {principal.id} may only {name} its own VMs")
