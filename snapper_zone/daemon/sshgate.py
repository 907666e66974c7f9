"""snapper-gate: the forced command of the zone's sshd when it carries pushed streams.

With ``[gate]`` in snapperd's config, the zone's OpenSSH ``sshd`` can carry
pushed streams instead of snapperd's own SSH server: each connection is then
decrypted by its own ``sshd`` process, in C, on as many cores as there are
connections (``docs/data-plane.md``). ``sshd`` only authenticates and carries
bytes; snapperd decides everything, in the same code as for its own port.

snapperd writes the ``authorized_keys`` file sshd reads (``gate.authorized_keys``):
one line per key it trusts, each forcing this program with ``restrict`` (no
forwarding, pty or rc files). The program hands its stdin, stdout and stderr
(``SCM_RIGHTS``), the client's command line (``SSH_ORIGINAL_COMMAND``, never
seen by a shell) and the key to snapperd on its unix socket
(``daemon/gateserver.py``), which runs the command on them, and exits with
the status snapperd sends back.

Standard library only, nothing of snapper's imported, and started with
``python -I -S`` (no site, no user paths): each push through the gate starts
one, so it starts in ~30 ms. The request is one JSON line (``Request``), the
answer ``{"status": N}``.
"""

from __future__ import annotations

import binascii
import json
import os
import socket
import sys
from collections.abc import Sequence

__all__ = ["MAX_LINE", "GateError", "Request", "authorized_line", "decode_key", "main"]

MAX_LINE = 64 << 10  # a request; a command line is far shorter
CONNECT_TIMEOUT = 10.0


class GateError(Exception):
    """A message that is not one: too long, not JSON, a field missing or wrong."""


class Request:
    """What a gate asks snapperd: run ``command`` for ``key`` on the descriptors
    passed along with this line. (A plain class: dataclasses' import costs more
    than the rest of this program's start.)"""

    __slots__ = ("client", "command", "key")

    def __init__(self, key: bytes, command: str, client: str = "") -> None:
        self.key = key  # the public key's wire encoding
        self.command = command
        self.client = client  # SSH_CLIENT: "address port localport", for logs

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Request) and \
            (self.key, self.command, self.client) == (other.key, other.command, other.client)

    def __repr__(self) -> str:
        return f"Request(command={self.command!r}, client={self.client!r})"

    def to_line(self) -> bytes:
        doc = {"key": _b64(self.key),
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
        key, command, client = (doc.get(f) for f in ("key", "command", "client"))
        if not isinstance(key, str) or not isinstance(command, str) or \
                not isinstance(client, str):
            raise GateError("key, command and client must be strings")
        return cls(decode_key(key), command, client[:200])


def decode_key(text: str) -> bytes:
    """A key's base64 as its wire encoding; GateError if it is not one."""
    try:
        data = binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        raise GateError("the key is not base64") from None
    if not data or len(data) > 16 << 10:
        raise GateError("the key is empty or too long")
    return data


def forced_argv(sock: str) -> list[str]:
    """How sshd starts this program: this Python, isolated and without site (the
    module needs nothing but the standard library), on this very file."""
    return [sys.executable, "-I", "-S", os.path.abspath(__file__), "--socket", sock]


def authorized_line(argv: Sequence[str], key_type: str, key: bytes) -> str:
    """The ``authorized_keys`` line of a trusted key: it may run ``argv --key KEY`` only.

    The forced command goes through the user's shell, so every word is
    single-quoted; sshd ends the option at a double quote and gives backslashes
    meaning, so a word holding a quote, a backslash or a newline is refused.
    """
    if not key_type.replace("-", "").replace("@", "").replace(".", "").isalnum():
        raise GateError(f"{key_type!r} is not a key type")
    for w in argv:
        if any(c in w for c in "'\"\\\n\x00"):
            raise GateError(f"the gate's command line cannot be quoted for sshd: {w!r}")
    import shlex  # snapperd's side only: not imported per push

    b64 = _b64(key)
    forced = " ".join(shlex.quote(w) for w in (*argv, "--key", b64))
    return f'restrict,command="{forced}" {key_type} {b64}\n'


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


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


def _say(message: str, code: str = "GateUnavailable") -> None:
    """An error line as snapperd writes them (the CN parses it), on our stderr."""
    try:
        os.write(2, json.dumps({"code": code, "message": message}).encode() + b"\n")
    except OSError:
        pass


def run(sock_path: str, key_b64: str) -> int:
    try:
        request = Request(decode_key(key_b64), os.environ.get("SSH_ORIGINAL_COMMAND", ""),
                          os.environ.get("SSH_CLIENT", ""))
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(CONNECT_TIMEOUT)
        s.connect(sock_path)
        socket.send_fds(s, [request.to_line()], [0, 1, 2])
    except (OSError, GateError) as exc:
        _say(f"this zone's snapperd does not take the command on its gate: {exc}")
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
    args = list(sys.argv[1:] if argv is None else argv)
    # Two fixed options, written by snapperd: no argparse to import per push.
    if len(args) != 4 or args[0] != "--socket" or args[2] != "--key":
        _say("usage: snapper-gate --socket PATH --key BASE64 (sshd's forced command)",
             "BadCommand")
        return 2
    return run(args[1], args[3])


if __name__ == "__main__":
    sys.exit(main())
