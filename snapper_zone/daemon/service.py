"""The zone's command handlers: what each line of the SSH grammar does.

Transport-agnostic: a transport (the SSH session in ``sshserver``) parses
nothing itself. It hands ``Service.execute`` the authenticated principal, the
exec line and an ``Io``: an ``Inbound`` it pushes the client's bytes into, and
ways to write stdout/stderr. ``execute`` parses, authorises, runs, counts the
command in metrics and returns the exit status; on failure it has already
written ``protocol.error_line(err)`` to stderr.

The receive data path is the hot one. Bytes are pushed from the transport's
callback straight into a kernel pipe that is ``zfs receive``'s stdin (no task
switch or extra copy per packet); the transport's reading is paused while the
pipe's write buffer is above asyncio's high-water mark and resumed when it
drains, so memory stays bounded by the SSH window plus one pipe buffer.
"""

from __future__ import annotations

import json
import os
from typing import Any, Protocol

from replication.pipeline import MirrorTee, SshMirrorTee
from replication.replicator import MirrorUnavailable
from snapper_zone.common import log as slog
from snapper_zone.daemon.auth import NotAuthorized, Principal, authorize, verb, vm_of
from snapper_zone.daemon.limits import TooManySends
from snapper_zone.daemon.zone import Zone
from snapper_zone.errors import SnapperError
from snapper_zone.transfer.local import (
    SPACE_MARGIN,
    Expect,
    InsufficientSpace,
    OpenTee,
    ReceiveRequest,
    StreamRefused,
)
from snapper_zone.transfer.registry import PENDING_TTL, SnapshotInUse
from snapper_zone.transfer.store import SnapshotNotFound, VmSnapshot
from snapper_zone.transfer.stream import ClientGone, Inbound, Sink, copy_out, splice_out
from snapper_zone.wire import jsontext, protocol
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
from snapper_zone.zfs import proc
from snapper_zone.zfs.names import Snapshot
from snapper_zone.zfs.zfs import SendSpec, choose_send_options

__all__ = [
    "SPACE_MARGIN",
    "ClientGone",
    "Inbound",
    "InsufficientSpace",
    "InvalidMetadata",
    "Io",
    "Service",
    "SnapshotInUse",
    "SnapshotIncomplete",
    "StreamRefused",
]

class SnapshotIncomplete(SnapperError):
    code = "SnapshotIncomplete"
    http_status = 409


class InvalidMetadata(SnapperError):
    code = "InvalidArgument"
    http_status = 422


class Io(Protocol):
    """What a transport gives a handler: the client's bytes and its two outputs."""

    @property
    def inbound(self) -> Inbound: ...

    def write(self, data: bytes) -> None:
        """stdout; raises ClientGone once the client is gone."""

    async def drain(self) -> None:
        """Wait until the client can take more stdout (raises ClientGone)."""

    def write_stderr(self, data: bytes) -> None: ...

    def stdout_pipe(self) -> int | None:
        """A descriptor of stdout to splice a stream into (the caller's to close), or
        None: ``write``/``drain`` only. Nothing written before it is still held."""


class Service:
    """Runs commands for one zone."""

    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self.log = zone.log

    async def execute(self, principal: Principal, line: str, io: Io) -> int:
        """Parse, authorise and run one command; return its exit status."""
        label = _verb_label(line)
        try:
            now = self.zone.current(principal)
            if now is None:
                # Revoked since the connection authenticated: refused per command.
                self.zone.metrics.auth_failures.labels("not_authorized").inc()
                self.log.warning("command refused: key no longer trusted", extra={
                    "principal": principal.label, "fingerprint": principal.fingerprint,
                    "command": line[:200]})
                raise NotAuthorized(f"key {principal.fingerprint} ({principal.label}) is no "
                                    "longer trusted by this zone")
            principal = now
            cmd = protocol.parse(line)
            label = verb(cmd)
            vm = vm_of(cmd)
            # A peer acts only on VMs placed (or moving) on both zones: look it up first.
            scope = await self.zone.peer_scope(vm, principal.id) \
                if principal.role == "peer" and vm is not None else None
            try:
                authorize(principal, cmd, self.zone.owner_of, me=self.zone.config.uuid,
                          scope=scope, granted=self.zone.granted)
            except NotAuthorized as err:
                self.zone.metrics.auth_failures.labels("not_authorized").inc()
                self.log.warning("command refused", extra={
                    "principal": principal.label, "fingerprint": principal.fingerprint,
                    "command": line[:200], "reason": err.message})
                raise
            await self._dispatch(principal, cmd, io)
        except SnapperError as err:
            self.zone.metrics.commands.labels(label, err.code).inc()
            io.write_stderr(protocol.error_line(err).encode())
            return 1
        except Exception as exc:  # a bug: tell the client something, keep serving
            self.log.exception("command crashed", extra={"command": line[:200],
                                                         "principal": principal.label})
            bug = SnapperError(f"internal error: {type(exc).__name__}: {exc}")
            self.zone.metrics.commands.labels(label, bug.code).inc()
            io.write_stderr(protocol.error_line(bug).encode())
            return 1
        self.zone.metrics.commands.labels(label, "ok").inc()
        return 0

    async def _dispatch(self, p: Principal, cmd: Command, io: Io) -> None:
        match cmd:
            case Receive():
                await self.receive(p, cmd, io)
            case Send():
                await self.send(p, cmd, io)
            case ResumeToken(vm, ds):
                token = await self.zone.endpoint(p.label).resume_token(vm, ds)
                io.write(f"{token or '-'}\n".encode())
            case Abort(vm, ds):
                await self.zone.endpoint(p.label).abort(vm, ds)
            case Snapshots(vm):
                doc = await self.zone.endpoint(p.label).inventory(vm)
                io.write(_json_line(doc.to_json()))
            case Commit():
                await self.commit(p, cmd, io)
            case Metadata(vm, snap):
                io.write(_json_line(await self.zone.endpoint(p.label).metadata(vm, snap)))
            case Delete(vm, snap):
                await self.zone.delete_snapshot(vm, snap)
                self.log.info("deleted snapshot", extra={"vm": vm, "snapshot": snap,
                                                         "principal": p.label})
            case Destroy(vm, snap, ds, guid):
                await self.zone.endpoint(p.label).destroy(vm, snap, ds, guid)
            case Ping():
                io.write(b"pong\n")
            case Whoami():
                io.write(_json_line({"connection": p.connection, "principal": p.label}))
            case Features():
                caps = await self.zone.zfs.capabilities()
                answer: dict[str, Any] = {"flavour": caps.flavour,
                                          "features": sorted(caps.stream_features())}
                if self.zone.config.gate is not None:
                    # Pushed streams may come through the zone's sshd instead
                    # (same host, same host key): docs/data-plane.md.
                    answer["stream_port"] = self.zone.config.gate.port
                    answer["stream_port_min_bytes"] = self.zone.config.gate.min_bytes
                    if (user := self.zone.config.gate.user()) is not None:
                        answer["stream_user"] = user  # whom sshd runs the gate as
                io.write(_json_line(answer))

    # -- receive --------------------------------------------------------------

    async def receive(self, p: Principal, cmd: Receive, io: Io) -> None:
        if cmd.bind is None:
            await self._receive(p, cmd, io)
            return
        # Parts bound to another connection: it must be this client's own, open.
        if self.zone.transfers.owner(cmd.bind) != p.label:
            raise NotAuthorized(f"connection {cmd.bind} is not an open connection of "
                                f"{p.label}")
        with self.zone.transfers.holding_open(cmd.bind):
            await self._receive(p, cmd, io)

    async def _receive(self, p: Principal, cmd: Receive, io: Io) -> None:
        zone = self.zone
        tees = zone.replicator.pipeliner if zone.replicator is not None else None
        kind = "receive" if p.role == "cn" else "mirror-in"
        if kind == "receive":
            await zone.check_placed(cmd.vm)
        req = ReceiveRequest(kind, cmd.vm, cmd.dataset,
                             Expect(cmd.snapshot, cmd.base, cmd.resume), p.label, cmd.size,
                             # A peer's parts end with its link (its push does); a
                             # client's too when it asks (--session, or --bind to
                             # another of its connections), else a lease.
                             connection=cmd.bind if cmd.bind is not None
                             else p.connection if p.role == "peer" or cmd.session
                             else None)
        open_tee: OpenTee | None = None
        teed: list[MirrorTee | SshMirrorTee] = []
        if tees is not None and kind == "receive" and not cmd.resume:
            async def open_tee(base: str | None) -> Sink | None:
                assert tees is not None
                tee = await tees.open(cmd, base, io.inbound)
                teed.extend([tee] if tee is not None else [])
                return tee
        got, _t = await zone.receiver.receive(req, io.inbound, open_tee=open_tee)
        if teed and tees is not None:
            # Every byte the CN sent went to the mirror too; its receive ends
            # about when ours did. Waiting here means the commit finds it there.
            await tees.finish(cmd, teed[0])
        # Say what is now awaiting a commit, and for how long: a client that
        # commits from another connection (plain OpenSSH) knows its lease.
        io.write(_json_line({"pending": {
            "vm": cmd.vm, "snapshot": cmd.snapshot, "dataset": cmd.dataset,
            "guid": str(got.begin.toguid), "base": got.base,
            # With --session (--bind) the parts end with this (that) connection: no lease.
            "lease_seconds": None if cmd.session or cmd.bind is not None
            else int(PENDING_TTL)}}))

    # -- send -------------------------------------------------------------------

    async def send(self, p: Principal, cmd: Send, io: Io) -> None:
        zone = self.zone
        cap = zone.sends.cap
        with zone.sends.holding(p.label, TooManySends(
                f"{p.label} already has {cap} send(s) running on this zone, the most "
                "one client may; retry when one has finished")):
            await self._send(p, cmd, io)

    async def _send(self, p: Principal, cmd: Send, io: Io) -> None:
        zone = self.zone
        store = zone.store
        snap = await store.snapshot(cmd.vm, cmd.snapshot)
        if p.role == "cn" and not snap.complete:
            raise SnapshotIncomplete(f"VM {cmd.vm} snapshot {cmd.snapshot!r} is not complete "
                                     "on this zone; it cannot be restored from here")
        if cmd.dataset not in snap.parts:
            raise SnapshotNotFound(f"VM {cmd.vm} snapshot {cmd.snapshot!r} has no dataset "
                                   f"{cmd.dataset!r}")
        ds = store.part_dataset(cmd.vm, cmd.dataset)
        base: Snapshot | None = None
        if cmd.base is not None:
            have = await store.snapshot(cmd.vm, cmd.base)
            if cmd.dataset not in have.parts:
                raise SnapshotNotFound(f"VM {cmd.vm} snapshot {cmd.base!r} has no dataset "
                                       f"{cmd.dataset!r}")
            base = Snapshot(ds, cmd.base)
        # Raw for an encrypted part (this zone has no key: ciphertext or nothing),
        # else whatever shortens the stream that the receiver said it takes.
        options = choose_send_options(
            (await zone.zfs.capabilities()).stream_features(), cmd.accept,
            encrypted=await zone.zfs.encrypted(ds),
            what=f"VM {cmd.vm} dataset {cmd.dataset!r}")
        kind = "send" if p.role == "cn" else "mirror-out"
        t = zone.transfers.start(kind, cmd.vm, cmd.dataset, cmd.snapshot, cmd.base, p.label)
        lg = slog.child(self.log, vm=cmd.vm, snapshot=cmd.snapshot, dataset=cmd.dataset,
                        kind=kind, peer=p.label, transfer=t.id)
        spec = SendSpec(Snapshot(ds, cmd.snapshot), base, options=options)
        idle = zone.config.stream_idle_seconds
        with zone.transfers.running(t, lg):
            out = io.stdout_pipe()
            if out is not None:
                # Through the gate: zfs send's pipe into sshd's, in the kernel.
                try:
                    child, src = await proc.child_on_pipe(
                        lambda w: zone.zfs.send(spec, stdout=w), child_writes=True)
                except BaseException:
                    os.close(out)
                    raise
            else:
                child = await zone.zfs.send(spec)
            try:
                if out is not None:
                    await splice_out(src, out, t.add, stall_timeout=idle)
                else:
                    await copy_out(child.stdout, io.write, io.drain, t.add, stall_timeout=idle)
                await zone.zfs.check(child)
            finally:
                if child.proc.returncode is None:
                    await child.abort()

    # -- inventory and metadata ------------------------------------------------

    async def commit(self, p: Principal, cmd: Commit, io: Io) -> None:
        raw = await io.inbound.read_all(self.zone.config.metadata_max_bytes)
        meta: dict[str, Any] | None = None
        if raw.strip():
            doc = jsontext.loads(raw, "metadata")
            if not isinstance(doc, dict):
                raise InvalidMetadata("metadata must be a JSON object")
            meta = doc
        zone = self.zone
        async with zone.vm_locks[cmd.vm]:
            done = await zone.store.mark_complete(cmd.vm, cmd.snapshot, cmd.datasets,
                                                  meta, p.label)
            # In use until the answer is written: a move must not drop this copy
            # while the ack that names this zone is on its way.
            zone.transfers.pending(cmd.vm, cmd.snapshot, p.label)
        try:
            await self._acknowledge(p, cmd, done, io)
        finally:
            zone.transfers.committed(cmd.vm, cmd.snapshot)

    async def _acknowledge(self, p: Principal, cmd: Commit, done: VmSnapshot, io: Io) -> None:
        zone = self.zone
        mode = cmd.durability or zone.config.durability
        self.log.info("snapshot complete", extra={"vm": cmd.vm, "snapshot": cmd.snapshot,
                                                  "principal": p.label, "durability": mode,
                                                  "datasets": list(cmd.datasets)})
        out = done.to_json()
        out.update(durability=mode, zones=[zone.config.uuid], mirror=None)
        rep = zone.replicator
        if p.role != "cn" or rep is None:
            # A peer's commit is itself replication; a zone without peers has one copy.
            io.write(_json_line(out))
            return
        if mode == "local":
            rep.kick(cmd.vm)
            io.write(_json_line(out))
            return
        peer, why = await self.mirrored(cmd, done)
        if why is not None:
            raise MirrorUnavailable(
                f"VM {cmd.vm} snapshot {cmd.snapshot!r} is complete on zone "
                f"{zone.config.uuid} only; mirror zone {peer}: {why}. Not acknowledged as "
                "mirrored: retry later, or push with durability 'local' to accept one copy "
                "until the mirror catches up")
        out.update(zones=[zone.config.uuid, peer], mirror=peer)
        io.write(_json_line(out))

    async def mirrored(self, cmd: Commit, done: VmSnapshot) -> tuple[str | None, str | None]:
        """Wait until the mirror holds ``done`` (by guid): (mirror zone, why not)."""
        rep = self.zone.replicator
        assert rep is not None
        guids = {d: part.guid for d, part in done.parts.items()}
        return await rep.confirm_mirrored(cmd.vm, cmd.snapshot, guids,
                                          self.zone.config.mirror_timeout_seconds)


def _json_line(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _verb_label(line: str) -> str:
    # Metric labels must stay few: an unknown verb is "invalid", not itself.
    words = line.split(maxsplit=1)
    return words[0] if words and words[0] in protocol._GRAMMAR else "invalid"

