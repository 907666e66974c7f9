"""What every daemon's start shares: exit codes, arguments, logs, atomic files.

Used by ``snapperd`` (``daemon/main.py``) and ``snapper-coordinator``: both
parse their arguments with ``Parser``, then hand ``run_daemon`` how to load
their config and what to serve.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import sys
import tempfile
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import asyncssh

from snapper_zone.common.config import ConfigError
from snapper_zone.common.log import parse_level, setup_logging
from snapper_zone.common.version import add_version_argument, version

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "Parser", "StartupError",
           "ensure_private_key", "run_daemon", "write_atomically"]

C = TypeVar("C")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class StartupError(Exception):
    """The daemon cannot start; ``status`` is its exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Readers see the old file or the whole new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class Parser(argparse.ArgumentParser):
    """argparse exits by itself; a daemon's main() returns its status instead.

    Every daemon's parser has ``--version``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        add_version_argument(self)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise StartupError(f"{self.prog}: {message}", EXIT_USAGE)


def run_daemon(name: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None,
               load: Callable[[str], C],
               serve: Callable[[C, argparse.Namespace, logging.Logger],
                                Coroutine[Any, Any, int]]) -> int:
    """Parse ``argv`` (``--config``, ``--log-level``), load the config, log, serve.

    ``--version`` and ``--help`` print and return 0. Usage and config errors are
    printed and exit 2; the first log line names the version; once logging is set up,
    failures are logged as bunyan records (with the stack for a bug) and exit 1.
    """
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --version, --help: printed, a clean exit
            return int(e.code or 0)
        try:
            level = parse_level(args.log_level)
        except ValueError as e:
            raise StartupError(f"{name}: --log-level: {e}", EXIT_USAGE) from e
        try:
            config = load(args.config)
        except ConfigError as e:
            raise StartupError(f"{name}: config error: {e}", EXIT_USAGE) from e
    except StartupError as e:
        print(e, file=sys.stderr)
        return e.status
    log = setup_logging(name, level)
    # The first line of every daemon's log says which build is running.
    log.info(f"{name} starting", extra={"version": version(),
                                        "open_files": raise_open_files()})
    try:
        return asyncio.run(serve(config, args, log))
    # From here on stderr carries only bunyan lines, so failures are logged, not printed.
    except StartupError as e:
        log.critical(str(e))
        return e.status
    except Exception:
        # ZFS not answering, a port already taken, a bug: logged with its stack
        # as one record rather than a bare traceback.
        log.critical(f"{name} cannot run", exc_info=True)
        return EXIT_FAILED


def raise_open_files() -> int:
    """Lift this process's soft limit on open descriptors to its hard limit, as
    Go's runtime does for every server; the limit after. Each connection, each
    child's pipes and a copy buffer's pipes (up to 128 per copy on Linux,
    ``stream.PipeRing``) take descriptors, and 1024 (a common default) is few."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Some OSes refuse an infinite soft limit: a large finite one instead.
    want = max(soft, 1 << 20) if hard == resource.RLIM_INFINITY else hard
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
    return soft


def ensure_private_key(path: Path, field: str, comment: str, log: logging.Logger) -> None:
    """Generate an ed25519 key (mode 0600, and ``.pub`` beside it) at ``path``
    unless a usable one is there (snapperd's host key, the coordinator's key)."""
    if path.exists():
        try:
            asyncssh.read_private_key(str(path))
        except (OSError, asyncssh.KeyImportError) as e:
            raise StartupError(f"{field} {path} is not a usable private key: {e}",
                               EXIT_USAGE) from e
        if path.stat().st_mode & 0o077:
            log.warning("private key is readable by others; chmod 600 it",
                        extra={"path": path})
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
    write_atomically(path, key.export_private_key(), mode=0o600)
    with contextlib.suppress(OSError):
        write_atomically(path.with_name(path.name + ".pub"), key.export_public_key())
    log.info("generated SSH key", extra={"path": path, "fingerprint": key.get_fingerprint()})
