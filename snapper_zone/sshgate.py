"""snapper-gate: the zone's OpenSSH ``sshd`` as snapperd's second front door.

With ``[gate]`` in snapperd's config, the zone's ``sshd`` can carry pushed
streams instead of snapperd's own SSH server: each connection is then
decrypted by its own ``sshd`` process, in C, on as many cores as there are
connections (``docs/data-plane.md``). ``sshd`` only authenticates and carries
bytes; snapperd still decides everything, in the same code as for its own
SSH server. Two small programs, both this module, meet snapperd on a unix
socket (``daemon/gateserver.py``):

``snapper-gate keys --socket S USER TYPE KEY``
    sshd's ``AuthorizedKeysCommand`` (``%u %t %k``): asks snapperd whether it
    trusts the key now (its config, the registry's CNs, learned peers) and,
    if so, prints one ``authorized_keys`` line forcing ``snapper-gate run``
    with that key. Nothing printed: sshd refuses the key. A revoked key is
    refused at its next login, as by snapperd itself.

``snapper-gate run --socket S --key KEY``
    the forced command: passes its stdin, stdout and stderr (``SCM_RIGHTS``)
    with the client's command line (``SSH_ORIGINAL_COMMAND``, never seen by
    a shell) and the key to snapperd, which runs the command on them, and
    exits with the status snapperd sends back.

Standard library only, and nothing of snapper's imported: each push starts
one of these, so it starts in a few tens of milliseconds. The messages are
single JSON lines (``Request``/answers below), the only thing the two ends share.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import shlex
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["MAX_LINE", "GateError", "Request", "authorized_line", "main", "read_line"]

MAX_LINE = 64 << 10  # a request or an answer; a command line is far shorter
TIMEOUT = 10.0  # for snapperd's answer to a key question, and to accept a command


class GateError(Exception):
    """A message that is not one: too long, not JSON, a field missing or wrong."""


@dataclass(frozen=True)
class Request:
    """What a gate asks snapperd: ``keys`` (is KEY trusted?) or ``run`` (run COMMAND
    for KEY on the descriptors passed along)."""

    op: str  # "keys" | "run"
    key: bytes  # the public key's wire encoding (what sshd's %k is the base64 of)
    command: str = ""
    client: str = ""  # SSH_CLIENT: "address port localport", for logs

    def to_line(self) -> bytes:
        doc = {"op": self.op, "key": base64.b64encode(self.key).decode("ascii"),
               "command": self.command, "client": self.client}
        return json.dumps(doc).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> Request:
        try:
            doc = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            raise GateError(f"not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise GateError("not a JSON object")
        op, key, command, client = (doc.get(f) for f in ("op", "key", "command", "client"))
        if op not in ("keys", "run"):
            raise GateError(f"op must be keys or run, not {op!r}")
        if not isinstance(key, str) or not isinstance(command, str) or \
                not isinstance(client, str):
            raise GateError("key, command and client must be strings")
        return cls(op, decode_key(key), command, client[:200])


def decode_key(text: str) -> bytes:
    """A key's base64 (sshd's ``%k``) as its wire encoding; GateError if it is not one."""
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise GateError("the key is not base64") from None
    if not data or len(data) > 16 << 10:
        raise GateError("the key is empty or too long")
    return data


def authorized_line(gate: str, sock: str, key_type: str, key: bytes) -> str:
    """The ``authorized_keys`` line for a trusted key: it may run ``gate run`` only.

    ``restrict`` turns off forwarding, ptys and rc files; the forced command
    goes through the user's shell, so every word is quoted, and the key
    travels as base64 (letters, digits, ``+/=``).
    """
    if not key_type.replace("-", "").replace("@", "").replace(".", "").isalnum():
        raise GateError(f"{key_type!r} is not a key type")
    b64 = base64.b64encode(key).decode("ascii")
    forced = " ".join(shlex.quote(w) for w in (gate, "run", "--socket", sock, "--key", b64))
    return f'restrict,command="{forced}" {key_type} {b64}\n'


def read_line(sock: socket.socket) -> bytes:
    """One newline-ended line from a blocking socket (``b""``: closed before one)."""
    buf = bytearray()
    while b"\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            return b""
        buf += chunk
        if len(buf) > MAX_LINE:
            raise GateError("answer too long")
    return bytes(buf[: buf.index(b"\n")])


def _connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    s.connect(path)
    return s


def _say(message: str, code: str = "GateUnavailable") -> None:
    """An error line as snapperd writes them (the CN parses it), on our stderr."""
    line = json.dumps({"code": code, "message": message})
    try:
        os.write(2, line.encode() + b"\n")
    except OSError:
        pass


def _keys(args: argparse.Namespace) -> int:
    try:
        key = decode_key(args.key)
        with _connect(args.socket) as s:
            s.sendall(Request("keys", key).to_line())
            answer = json.loads(read_line(s) or b"{}")
        if isinstance(answer, dict) and answer.get("trusted") is True:
            sys.stdout.write(authorized_line(os.path.abspath(sys.argv[0]), args.socket,
                                             args.type, key))
    except (OSError, ValueError, GateError) as exc:
        # Printing nothing refuses the key; sshd logs our stderr.
        print(f"snapper-gate keys: {exc}", file=sys.stderr)
    return 0


def _run(args: argparse.Namespace) -> int:
    try:
        key = decode_key(args.key)
        s = _connect(args.socket)
    except (OSError, GateError) as exc:
        _say(f"this zone's snapperd does not answer on its gate: {exc}")
        return 1
    request = Request("run", key, os.environ.get("SSH_ORIGINAL_COMMAND", ""),
                      os.environ.get("SSH_CLIENT", ""))
    try:
        socket.send_fds(s, [request.to_line()], [0, 1, 2])
    except OSError as exc:
        _say(f"could not hand the command to snapperd: {exc}")
        return 1
    # snapperd holds the channel's descriptors now; ours would keep sshd from
    # seeing the end of the output when snapperd closes its copies.
    keep = os.dup(2)  # to say so if snapperd dies before it answers
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    s.settimeout(None)  # the command runs as long as its stream
    try:
        line = read_line(s)
        status = json.loads(line)["status"] if line else None
    except (OSError, ValueError, KeyError, TypeError, GateError):
        status = None
    if not isinstance(status, int) or isinstance(status, bool) or not 0 <= status < 255:
        os.dup2(keep, 2)
        _say("snapperd ended the command without an exit status (it stopped?)")
        return 1
    return status


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="snapper-gate", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="op", required=True)
    k = sub.add_parser("keys", help="sshd's AuthorizedKeysCommand (%%u %%t %%k)")
    k.add_argument("--socket", required=True)
    k.add_argument("user")
    k.add_argument("type")
    k.add_argument("key")
    r = sub.add_parser("run", help="the forced command of a key keys printed")
    r.add_argument("--socket", required=True)
    r.add_argument("--key", required=True)
    args = p.parse_args(argv)
    return _keys(args) if args.op == "keys" else _run(args)


if __name__ == "__main__":
    sys.exit(main())
