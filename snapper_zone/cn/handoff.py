"""``snapper push`` through a running ``snapper agent``: the request and the CLI's end.

A CN that runs the agent (SMF: ``svc:/smartdc/snapper-agent``) has snapper's
client already started and its links to the zones logged in
(``cn/links.py``). ``snapper push`` hands its push to it over a Unix socket
in the agent's state directory (``cn/control.py``, the agent's end) instead
of starting its own: no asyncssh or asyncio to import, no login, and the
agent's own pushes of the same VM never run at the same time as it (one
lock per VM). The CLI reads its arguments and
config as always (``cn/options.py``, light) and sends the settings it would
have used; the output, progress and exit status are the same as when it
pushes itself. Without an agent (no socket, or nobody listening) it pushes
itself, as before; ``--no-agent`` always does.

Who may ask: the socket is the agent user's alone (0600), and on Linux the
agent also checks the caller's uid (SO_PEERCRED). A caller can only ask for
what it could do itself: the push runs with the key and settings it names.

The protocol, one JSON object per line. The CLI sends
``{"push": {"settings": ..., "vm": ..., "name": ..., "base": ...,
"metadata": ..., "durability": ..., "bwlimit": ...}}``; the agent answers
with any of ``{"say": LINE}`` (a note for stderr), ``{"start": {"label",
"total", "fields"}}``, ``{"advance": BYTES}`` and ``{"done": {"ok",
"error"}}`` (progress, replayed on the CLI's own reporter), then one of
``{"result": DOC}`` (``snapper push --json``'s document) or ``{"error":
{"text": LINES, "status": N}}``. A CLI that goes away cancels its push.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from snapper_zone.cn.options import CnSettings, UsageError, build_parser, read_metadata, settings
from snapper_zone.cn.output import show_push
from snapper_zone.common.config import ConfigError
from snapper_zone.common.progress import Reporter, for_choice
from snapper_zone.errors import InvalidName
from snapper_zone.zfs.names import check_uuid

__all__ = ["MAX_LINE", "SOCKET_NAME", "ControlError", "PushRequest", "ask_agent",
           "push_via_agent", "socket_path", "wire_line"]

SOCKET_NAME = "agent.sock"
MAX_LINE = 1 << 20  # a request carries settings and metadata: small


def socket_path(state_dir: Path) -> Path:
    return state_dir / SOCKET_NAME


class ControlError(Exception):
    """A request the agent cannot take (malformed, or from someone else)."""


@dataclass(frozen=True)
class PushRequest:
    settings: CnSettings
    vm: str
    name: str | None
    base: str | None
    metadata: dict[str, Any] | None
    durability: str | None
    bwlimit: float | None

    def to_json(self) -> dict[str, Any]:
        s = {f.name: getattr(self.settings, f.name) for f in fields(CnSettings)}
        s = {k: (str(v) if isinstance(v, Path) else v) for k, v in s.items()}
        return {"push": {"settings": s, "vm": self.vm, "name": self.name, "base": self.base,
                         "metadata": self.metadata, "durability": self.durability,
                         "bwlimit": self.bwlimit}}

    @classmethod
    def from_json(cls, doc: Any) -> PushRequest:
        """The request in ``doc``, each field's type checked: ControlError if not."""
        try:
            p = doc["push"]
            s = p["settings"]
            paths = {"key", "known_hosts", "host_key", "state_dir"}
            given: dict[str, Any] = {}
            for f in fields(CnSettings):
                v = s[f.name]
                if f.name in paths:
                    v = None if v is None else Path(_text(v))
                elif f.name == "zones":
                    v = tuple((_text(h), _int(n)) for h, n in v)
                elif f.name == "zone_port":
                    v = _int(v)
                elif f.name == "use_gate":
                    if not isinstance(v, bool):
                        raise ControlError(f"use_gate {v!r}: not true or false")
                elif v is not None:
                    v = _text(v)
                given[f.name] = v
            if given["key"] is None:
                raise ControlError("settings without a key")
            meta = p["metadata"]
            if meta is not None and not isinstance(meta, dict):
                raise ControlError("metadata: not a JSON object")
            bw = p["bwlimit"]
            if bw is not None and (not isinstance(bw, int | float) or isinstance(bw, bool)
                                   or not bw > 0):
                raise ControlError("bwlimit: not a positive number")
            durability = _opt(p["durability"])
            if durability not in (None, "mirrored", "local"):
                raise ControlError(f"durability {durability!r}: not mirrored or local")
            return cls(CnSettings(**given), check_uuid(_text(p["vm"]), "VM uuid"),
                       _opt(p["name"]), _opt(p["base"]), meta, durability,
                       None if bw is None else float(bw))
        except InvalidName as exc:
            raise ControlError(exc.message) from None
        except (KeyError, TypeError, ValueError) as exc:
            raise ControlError(f"not a push request: {exc}") from None


def _text(v: Any) -> str:
    if not isinstance(v, str):
        raise ControlError(f"{v!r}: not a string")
    return v


def _opt(v: Any) -> str | None:
    return None if v is None else _text(v)


def _int(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise ControlError(f"{v!r}: not an integer")
    return v


def wire_line(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


def ask_agent(path: Path, req: PushRequest, reporter: Reporter) -> \
        tuple[int, dict[str, Any] | None] | None:
    """Have the agent listening at ``path`` push ``req``: (exit status, the result
    document or None), its notes and errors printed on stderr and its progress
    on ``reporter``; None if no agent listens there (push here instead).

    Blocking, on purpose: the CLI has nothing else to do meanwhile, and
    asyncio is one more import before the push can start."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None  # no agent, or a socket an agent left when it died
    with sock, sock.makefile("rb") as lines:
        try:
            try:
                sock.sendall(wire_line(req.to_json()))
            except (BrokenPipeError, ConnectionResetError):
                pass  # it refused before reading the request: its answer is there to read
            for raw in lines:
                ev = json.loads(raw)
                if "say" in ev:
                    print(ev["say"], file=sys.stderr, flush=True)
                elif "start" in ev:
                    st = ev["start"]
                    reporter.start(st["label"], st["total"], **st["fields"])
                elif "advance" in ev:
                    reporter.advance(int(ev["advance"]))
                elif "done" in ev:
                    reporter.done(bool(ev["done"]["ok"]), ev["done"]["error"])
                elif "result" in ev:
                    return 0, ev["result"]
                elif "error" in ev:
                    print(ev["error"]["text"], file=sys.stderr)
                    return int(ev["error"]["status"]), None
            why = "the agent went away before the push ended"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            why = f"lost the agent: {exc}"
    print(f"snapper: push: {why}; `snapper list {req.vm}` shows what the zone holds",
          file=sys.stderr)
    return 1, None


def push_via_agent(argv: Sequence[str]) -> int | None:
    """``snapper push ARGS`` handed to a running agent: the exit status, or None
    when this process should push itself (no agent, ``--no-agent``, another
    command, or arguments the full command line will report on)."""
    if "push" not in argv:
        return None
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # usage errors: said by the full path
            args = build_parser(None).parse_args(argv)
    except SystemExit:
        return None
    if args.command != "push" or args.no_agent:
        return None
    try:
        s = settings(args)
        meta = read_metadata(args.metadata)
    except (UsageError, ConfigError):
        return None
    path = socket_path(s.state_dir)
    if not path.exists():
        return None
    req = PushRequest(s, args.vm, args.name, args.base, meta, args.durability, args.bwlimit)
    got = ask_agent(path, req, for_choice(args.progress))
    if got is None:
        return None
    status, doc = got
    if doc is not None:
        show_push(doc, args.json)
    return status
