"""What every daemon's start shares: exit codes, the startup error, atomic files.

Used by ``snapperd`` (``daemon/main.py``) and ``snapper-coordinator``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "StartupError", "write_atomically"]

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
