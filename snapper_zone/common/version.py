"""The one version of snapper: ``--version``, ``/ping``, the first log line, ``build_info``.

Read from the installed distribution's metadata (``importlib.metadata``), looked
up by the distribution's name (``snapper-zone``, pyproject's ``project.name``;
tests/test_version.py holds the two together). A checkout that was never
installed reads ``pyproject.toml`` beside the package instead, and anything else
says ``0+unknown`` rather than failing to start.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["DISTRIBUTION", "UNKNOWN", "add_version_argument", "version"]

UNKNOWN = "0+unknown"
DISTRIBUTION = "snapper-zone"
_PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


# importlib.metadata and tomllib are imported when a version is asked for, not
# by every command's parser: the lookup scans sys.path (~10 ms of a CN push).


def _from_metadata() -> str | None:
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def _from_checkout(pyproject: Path | None = None) -> str | None:
    import tomllib

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


class _VersionAction(argparse.Action):
    """argparse's ``version`` action, the version looked up only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(f"{parser.prog} {version()}")  # on stdout, as argparse's own action
        parser.exit()


def add_version_argument(parser: argparse.ArgumentParser) -> None:
    """``--version``: print ``PROG VERSION`` on stdout and exit 0, as every command does."""
    parser.add_argument("--version", action=_VersionAction,
                        help="show the program's version and exit")
