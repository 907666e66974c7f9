"""The one version of snapper: ``--version``, ``/ping``, the first log line, ``build_info``.

Read from the installed distribution's metadata (``importlib.metadata``), looked
up by the distribution's name (``snapper-zone``, pyproject's ``project.name``;
tests/test_version.py holds the two together). A checkout that was never
installed reads ``pyproject.toml`` beside the package instead, and anything else
says ``0+unknown`` rather than failing to start.
"""

from __future__ import annotations

import argparse
import tomllib
from functools import cache
from importlib import metadata
from pathlib import Path

__all__ = ["DISTRIBUTION", "UNKNOWN", "add_version_argument", "version"]

UNKNOWN = "0+unknown"
DISTRIBUTION = "snapper-zone"
_PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _from_metadata() -> str | None:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def _from_checkout(pyproject: Path | None = None) -> str | None:
    try:
        project = tomllib.loads((pyproject or _PYPROJECT).read_text()).get("project")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    v = project.get("version") if isinstance(project, dict) else None
    return v if isinstance(v, str) and v else None


@cache
def version() -> str:
    """This build's version (computed once per process)."""
    return _from_metadata() or _from_checkout() or UNKNOWN


def add_version_argument(parser: argparse.ArgumentParser) -> None:
    """``--version``: print ``PROG VERSION`` on stdout and exit 0, as every command does."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
