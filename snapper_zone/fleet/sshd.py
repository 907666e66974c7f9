"""A private OpenSSH ``sshd`` on 127.0.0.1, for a local fleet's gates, the gate's
tests and the benches: one writer of its config, one wait for its port.

``gate_options`` are the lines that make it a zone's gate (as in
etc/sshd_config.gate.example): the keys file snapperd writes, and nothing but
the forced command (``snapper-gate``) for whoever logs in.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import time
from collections.abc import Sequence
from pathlib import Path

from snapper_zone.transfer.remote import AES_GCM
from snapper_zone.zfs import proc

# AES-GCM: this CPU family's cheapest (AES-NI); chacha20, OpenSSH's default
# choice, costs ~1.5x per byte (../shared/notes/ssh-throughput.md).
CIPHERS = ",".join(AES_GCM)


def sshd_path() -> str | None:
    """OpenSSH's sshd, on PATH or in /usr/sbin (not on a user's PATH on Debian)."""
    return shutil.which("sshd") or shutil.which("sshd", path="/usr/sbin")


def gate_options(keys: Path) -> list[str]:
    """What makes an sshd a zone's gate: every key in ``keys`` carries its forced
    command; root (the local fleet's user) only with one; nothing else offered."""
    return [f"AuthorizedKeysFile {keys}", "PermitRootLogin forced-commands-only",
            "DisableForwarding yes", "PermitTTY no", "PermitUserRC no"]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def start_sshd(d: Path, port: int, host_key: Path, options: Sequence[str], *,
                     name: str = "sshd", timeout: float = 20.0) -> proc.Daemon:
    """sshd on 127.0.0.1:``port`` with ``host_key`` and ``options``; its config,
    pid file and log are ``d/{name}_config``, ``.pid`` and ``.log``. Returns once it
    accepts; RuntimeError (naming the log) when it dies or is not up by ``timeout``."""
    sshd = sshd_path()
    if sshd is None:
        raise RuntimeError("needs OpenSSH's sshd: apt-get install openssh-server")
    cfg = d / f"{name}_config"
    # An empty HOME for the sessions' shell: it runs every command sshd starts
    # (each stream, the gate's included) and, as root's bash here, would source
    # root's ~/.bashrc each time (~80 ms on a box with `pyenv init`). A zone's
    # gate user has a plain /bin/sh (etc/sshd_config.gate.example); this stands
    # in for it without a second user on the machine.
    home = d / f"{name}_home"
    await asyncio.to_thread(home.mkdir, exist_ok=True)
    cfg.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}",
        f"PidFile {d / (name + '.pid')}", *options, f"SetEnv HOME={home}",
        "StrictModes no", "UsePAM no", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "Compression no",
        # Many clients log in at once (a scale bench's CNs): drop none unauthenticated.
        "MaxStartups 200", "PerSourceMaxStartups none", f"Ciphers {CIPHERS}", ""]))
    # sshd refuses to start without its privilege separation directory.
    await asyncio.to_thread(os.makedirs, "/run/sshd", exist_ok=True)
    daemon = proc.Daemon([sshd, "-D", "-e", "-f", str(cfg)], str(d / f"{name}.log"))
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(listening, port):
        if not daemon.alive() or time.monotonic() > deadline:
            daemon.stop()
            raise RuntimeError(f"sshd on port {port} did not start; see {daemon.log_path}")
        await asyncio.sleep(0.05)  # another process's port, with a deadline
    return daemon
