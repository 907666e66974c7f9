"""Who a client is, and what it may do: pure, so it can be tested exhaustively.

Every SSH client is one of the keys in the zone's config, and each key has a
role:

- ``cn``: a compute node. It may push, restore, list, commit, read and delete
  snapshots of the VMs mapped to it (the coordinator's registry, else the
  static ``[vms]``), and nothing of any other VM, except restoring (list, read
  metadata, ``send``) a VM an operator's grant in force names it for.
- ``peer``: another snapper zone. It may run every command, but only on a
  VM whose *scope* holds both zones: the VM's placement and every zone of a
  move in flight for it (the coordinator's ``scope``), or without a
  coordinator the static pair (``replication.peers.static_scope``). A
  peer's command on any other VM, tombstones and ``destroy`` included, is
  refused: a zone's key is no master key to every VM in the fleet.
- ``operator``: a human or tool watching the fleet: list, read metadata and
  delete; never a stream in or out.

``authorize`` decides from the command alone (and the VM -> CN map, and for a
peer the VM's scope, looked up beforehand), before anything runs; what a
command would then do to ZFS is none of its business.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from snapper_zone.common.config import Role, TrustedKey
from snapper_zone.common.httpsig import NotAuthorized
from snapper_zone.wire.protocol import (
    Abort,
    Command,
    Commit,
    Delete,
    Destroy,
    Features,
    Metadata,
    Ping,
    Receive,
    ResumeToken,
    Send,
    Snapshots,
    Whoami,
)

__all__ = ["RESTORE_VERBS", "NotAuthorized", "Principal", "allowed_verbs", "authorize",
           "check_owner", "peer_in_scope", "verb", "vm_of"]


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
    Features: "features",
    Whoami: "whoami",
}

_ALLOWED: dict[Role, frozenset[str]] = {
    "cn": frozenset({"receive", "send", "resume-token", "abort", "snapshots", "commit",
                     "metadata", "delete", "ping", "features", "whoami"}),
    "peer": frozenset(_VERBS.values()),
    "operator": frozenset({"ping", "features", "whoami", "snapshots", "metadata", "delete"}),
}


# What a restore grant lets a CN run on a VM not its own: reading, never writing.
RESTORE_VERBS = frozenset({"snapshots", "metadata", "send"})


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
    # The key's wire encoding: who it is is looked up again per command.
    key_data: bytes = field(default=b"", repr=False, compare=False)

    @classmethod
    def from_key(cls, key: TrustedKey, connection: int = 0) -> Principal:
        return cls(key.role, key.name, key.fingerprint, connection, key.key_data)

    @property
    def label(self) -> str:
        """Who this is in logs, metrics and ``snapper:source``: "cn:<id>", "zone:<uuid>"..."""
        prefix = {"cn": "cn", "peer": "zone", "operator": "operator"}[self.role]
        return f"{prefix}:{self.id}"


def vm_of(command: Command) -> str | None:
    """The VM a command acts on (None: ``ping``, ``features``, ``whoami``)."""
    return None if isinstance(command, Ping | Features | Whoami) else command.vm


def peer_in_scope(me: str, peer: str, scope: Collection[str] | None) -> bool:
    """Whether peer zone ``peer`` may act, on zone ``me``, on a VM whose scope is
    ``scope`` (None: unknown). Both zones must be in it, and a zone is not its own peer."""
    return scope is not None and peer != me and me in scope and peer in scope


def authorize(principal: Principal, command: Command,
              owner_of: Callable[[str], str | None], *, me: str = "",
              scope: Collection[str] | None = None,
              granted: Callable[[str, str], bool] = lambda vm, cn: False) -> None:
    """Return if ``principal`` may run ``command``; raise NotAuthorized otherwise.

    ``owner_of(vm)`` is the CN id a VM is mapped to (None when unmapped);
    ``scope`` is the command's VM's scope, for a peer on zone ``me``;
    ``granted(vm, cn)`` whether a restore grant in force names the CN.
    """
    name = verb(command)
    if name not in _ALLOWED[principal.role]:
        raise NotAuthorized(
            f"{principal.role} key {principal.fingerprint} ({principal.label}) may not run "
            f"{name!r}; a {principal.role} key may run: "
            f"{', '.join(sorted(_ALLOWED[principal.role]))}")
    vm = vm_of(command)
    if vm is None or principal.role == "operator":
        return
    if principal.role == "peer":
        if not peer_in_scope(me, principal.id, scope):
            where = "an unknown placement" if scope is None else \
                f"placed on {', '.join(sorted(scope)) or 'no zone'}"
            raise NotAuthorized(f"VM {vm} is {where}: peer zone {principal.id} may not "
                                f"{name} it here (zone {me})")
        return
    owner = owner_of(vm)
    if owner != principal.id and name in RESTORE_VERBS and granted(vm, principal.id):
        return  # an operator let this CN restore the VM, for a while
    check_owner(principal.id, vm, owner, name)


def check_owner(cn_id: str, vm: str, owner: str | None, what: str) -> None:
    """A CN acts on its own VMs only (SSH commands and HTTP routes alike)."""
    if owner != cn_id:
        whose = "is not mapped to any CN" if owner is None else "belongs to another CN"
        raise NotAuthorized(f"VM {vm} {whose}; CN {cn_id} may only {what} its own VMs")
