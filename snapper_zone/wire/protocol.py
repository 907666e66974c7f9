"""The SSH command grammar every snapper zone speaks, and its clients build.

An SSH exec request carries one line; it is split on whitespace (no quoting,
no shell: every token is a validated name or number) and parsed into a typed
command. The same module builds the lines on the client side, so the CN
client, the zone-to-zone mirror and an operator's plain ``ssh`` agree.

    receive VM DATASET SNAP [--from BASE] [--size BYTES] [--resume]
            [--session | --bind CONNECTION]
        stdin: a zfs send stream of VM's DATASET at SNAP (incremental from
        BASE when given; ``--resume`` when it is a ``zfs send -t`` stream).
        The parts wait for their ``commit`` for a lease (any connection may
        commit); with ``--session`` they end with this connection instead, as
        snapper's own client commits on the connection it pushed on; with
        ``--bind`` they end with CONNECTION, another open connection of the
        same client (``whoami``), kept from idling while the stream runs: a
        stream carried by a separate ``ssh`` that commits on the first one.
    send VM DATASET SNAP [--from BASE] [--accept FEATURE[,FEATURE...]]
                                            stdout: a zfs send stream, with the
                                            options (raw, compressed, large_blocks,
                                            embedded) the receiver accepts and this
                                            zone has; an encrypted dataset goes raw
                                            or not at all (EncryptionUnsupported)
    features                                stdout: JSON {"flavour", "features": [...]},
                                            the stream options this zone sends and
                                            receives (a sender chooses by them)
    resume-token VM DATASET                 stdout: the token or "-"
    abort VM DATASET                        discard a partial receive
    snapshots VM                            stdout: JSON {"vm", "snapshots": [...],
                                            "datasets": {name: {"resume_token"}}}
    commit VM SNAP DATASET[,DATASET...] [--durability mirrored|local]
                                            stdin: metadata JSON (may be empty);
                                            marks the VM snapshot complete; stdout:
                                            the snapshot and the zones holding it;
                                            refused if a part was deleted here
                                            (PartDeleted)
    metadata VM SNAP                        stdout: the metadata JSON
    delete VM SNAP                          destroy a VM snapshot (all parts)
    destroy VM SNAP [--dataset DS --guid G] zone to zone (reconcile): destroy one
                                            part if it is still guid G, or (no
                                            --dataset) only the VM's marker;
                                            refused while SNAP is in use
                                            (ResourceBusy) or a complete snapshot
                                            here includes the part (PartComplete)
    ping                                    stdout: "pong"
    whoami                                  stdout: JSON {"connection", "principal"}:
                                            this connection's number (for --bind)

Exit status 0 is success; otherwise stderr holds one JSON line
``{"code": ..., "message": ...}`` (the same shape as the HTTP API's errors).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from snapper_zone.errors import InvalidName, SnapperError
from snapper_zone.zfs.names import check_component, check_uuid
from snapper_zone.zfs.zfs import STREAM_FEATURES

MAX_LINE = 4096


class BadCommand(SnapperError):
    code = "BadCommand"
    http_status = 400


@dataclass(frozen=True)
class Receive:
    vm: str
    dataset: str
    snapshot: str
    base: str | None = None
    size: int | None = None  # the sender's estimate (send -n -P), for the space check
    resume: bool = False
    session: bool = False  # uncommitted parts end with this connection, not a lease
    bind: int | None = None  # ... or with this other connection of the same client


@dataclass(frozen=True)
class Send:
    vm: str
    dataset: str
    snapshot: str
    base: str | None = None
    # The stream options the receiver takes (``zfs.STREAM_FEATURES``); an older
    # client names none and gets a plain stream.
    accept: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ResumeToken:
    vm: str
    dataset: str


@dataclass(frozen=True)
class Abort:
    vm: str
    dataset: str


@dataclass(frozen=True)
class Snapshots:
    vm: str


@dataclass(frozen=True)
class Commit:
    vm: str
    snapshot: str
    datasets: tuple[str, ...]
    durability: str | None = None  # None: the zone's configured default


DURABILITIES = ("mirrored", "local")


@dataclass(frozen=True)
class Metadata:
    vm: str
    snapshot: str


@dataclass(frozen=True)
class Delete:
    vm: str
    snapshot: str


@dataclass(frozen=True)
class Destroy:
    vm: str
    snapshot: str
    dataset: str | None = None
    guid: int | None = None


@dataclass(frozen=True)
class Ping:
    pass


@dataclass(frozen=True)
class Features:
    pass


@dataclass(frozen=True)
class Whoami:
    pass


Command = (Receive | Send | ResumeToken | Abort | Snapshots | Commit | Metadata | Delete
           | Destroy | Ping | Features | Whoami)


# verb -> (number of positional args, allowed options and whether each takes a value)
_GRAMMAR: dict[str, tuple[int, dict[str, bool]]] = {
    "receive": (3, {"--from": True, "--size": True, "--resume": False, "--session": False,
                    "--bind": True}),
    "send": (3, {"--from": True, "--accept": True}),
    "resume-token": (2, {}),
    "abort": (2, {}),
    "snapshots": (1, {}),
    "commit": (3, {"--durability": True}),
    "metadata": (2, {}),
    "delete": (2, {}),
    "destroy": (2, {"--dataset": True, "--guid": True}),
    "ping": (0, {}),
    "features": (0, {}),
    "whoami": (0, {}),
}


def parse(line: str) -> Command:
    """Parse one exec line; raise BadCommand (or InvalidName) on anything else."""
    if len(line) > MAX_LINE:
        raise BadCommand("command line too long")
    words = line.split()
    if not words:
        raise BadCommand("empty command; try: ping")
    verb, rest = words[0], words[1:]
    if verb not in _GRAMMAR:
        raise BadCommand(f"unknown command {verb[:40]!r}; known: {', '.join(_GRAMMAR)}")
    nargs, allowed = _GRAMMAR[verb]
    args: list[str] = []
    opts: dict[str, str | None] = {}
    i = 0
    while i < len(rest):
        word = rest[i]
        if word.startswith("--"):
            if word not in allowed:
                raise BadCommand(f"{verb}: unknown option {word[:40]!r}")
            if word in opts:
                raise BadCommand(f"{verb}: {word} given twice")
            if allowed[word]:
                if i + 1 >= len(rest):
                    raise BadCommand(f"{verb}: {word} needs a value")
                opts[word] = rest[i + 1]
                i += 2
                continue
            opts[word] = None
        else:
            args.append(word)
        i += 1
    if len(args) != nargs:
        raise BadCommand(f"{verb}: expected {nargs} arguments, got {len(args)}")
    try:
        return _build(verb, args, opts)
    except InvalidName:
        raise
    except ValueError as exc:
        raise BadCommand(f"{verb}: {exc}") from exc


def _build(verb: str, a: list[str], o: dict[str, str | None]) -> Command:
    if verb == "ping":
        return Ping()
    if verb == "features":
        return Features()
    if verb == "whoami":
        return Whoami()
    vm = check_uuid(a[0], "VM uuid")
    if verb == "snapshots":
        return Snapshots(vm)
    if verb in ("receive", "send"):
        ds = check_component(a[1], "VM dataset")
        snap = check_component(a[2], "snapshot name")
        base = check_component(b, "base snapshot") if (b := o.get("--from")) else None
        if verb == "send":
            return Send(vm, ds, snap, base, _accept(o.get("--accept")))
        size = o.get("--size")
        if size is not None and (not size.isdigit() or len(size) > 19):
            raise ValueError("--size must be a byte count")
        bind = o.get("--bind")
        if bind is not None and (not bind.isdigit() or len(bind) > 19):
            raise ValueError("--bind must be a connection number")
        if bind is not None and "--session" in o:
            raise ValueError("--session and --bind: give one")
        return Receive(vm, ds, snap, base, int(size) if size else None, "--resume" in o,
                       "--session" in o, int(bind) if bind is not None else None)
    if verb == "resume-token":
        return ResumeToken(vm, check_component(a[1], "VM dataset"))
    if verb == "abort":
        return Abort(vm, check_component(a[1], "VM dataset"))
    snap = check_component(a[1], "snapshot name")
    if verb == "commit":
        parts = tuple(check_component(d, "VM dataset") for d in a[2].split(","))
        if len(set(parts)) != len(parts):
            raise ValueError("a dataset is listed twice")
        mode = o.get("--durability")
        if mode is not None and mode not in DURABILITIES:
            raise ValueError(f"--durability must be one of: {', '.join(DURABILITIES)}")
        return Commit(vm, snap, parts, mode)
    if verb == "metadata":
        return Metadata(vm, snap)
    if verb == "destroy":
        part, guid = o.get("--dataset"), o.get("--guid")
        if (part is None) != (guid is None):
            raise ValueError("--dataset and --guid go together")
        if guid is not None and (not guid.isdigit() or len(guid) > 20):
            raise ValueError("--guid must be a decimal guid")
        return Destroy(vm, snap, check_component(part, "VM dataset") if part else None,
                       int(guid) if guid else None)
    return Delete(vm, snap)


def format_command(cmd: Command) -> str:
    """The exec line for ``cmd``; ``parse(format_command(c)) == c``."""
    match cmd:
        case Ping():
            return "ping"
        case Features():
            return "features"
        case Whoami():
            return "whoami"
        case Receive(vm, ds, snap, base, size, resume, session, bind):
            line = f"receive {vm} {ds} {snap}"
            if base:
                line += f" --from {base}"
            if size is not None:
                line += f" --size {size}"
            return line + (" --resume" if resume else "") + (" --session" if session else "") \
                + (f" --bind {bind}" if bind is not None else "")
        case Send(vm, ds, snap, base, accept):
            return f"send {vm} {ds} {snap}" + (f" --from {base}" if base else "") + (
                f" --accept {','.join(sorted(accept))}" if accept else "")
        case ResumeToken(vm, ds):
            return f"resume-token {vm} {ds}"
        case Abort(vm, ds):
            return f"abort {vm} {ds}"
        case Snapshots(vm):
            return f"snapshots {vm}"
        case Commit(vm, snap, parts, mode):
            return f"commit {vm} {snap} {','.join(parts)}" + (
                f" --durability {mode}" if mode else "")
        case Destroy(vm, snap, ds, guid):
            return f"destroy {vm} {snap}" + (f" --dataset {ds} --guid {guid}" if ds else "")
        case Metadata(vm, snap):
            return f"metadata {vm} {snap}"
        case Delete(vm, snap):
            return f"delete {vm} {snap}"
    raise TypeError(f"not a command: {cmd!r}")


def _accept(value: str | None) -> frozenset[str]:
    """``--accept``'s features; one this grammar does not know is refused (a typo
    would silently turn into a plain stream)."""
    if value is None:
        return frozenset()
    words = value.split(",")
    unknown = [w for w in words if w not in STREAM_FEATURES]
    if unknown:
        raise ValueError(f"--accept: unknown feature {unknown[0][:40]!r}; known: "
                         f"{', '.join(STREAM_FEATURES)}")
    return frozenset(words)


def error_line(err: SnapperError) -> str:
    return json.dumps(err.to_json()) + "\n"


def parse_error_line(text: str) -> tuple[str, str]:
    """(code, message) from a zone's stderr; tolerant of non-JSON text."""
    for line in reversed(text.strip().splitlines()):
        try:
            obj = json.loads(line)
        except ValueError:
            # An SSH disconnect reason arrives with " (error N)" appended.
            try:
                obj = json.loads(line[line.find("{"): line.rfind("}") + 1])
            except ValueError:
                continue
        if isinstance(obj, dict) and "code" in obj:
            return str(obj["code"]), str(obj.get("message", ""))
    return "RemoteError", text.strip()[:1000]
