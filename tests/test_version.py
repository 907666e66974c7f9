"""One version everywhere: ``--version`` of every command, read from the package's metadata
(or the checkout's ``pyproject.toml``)."""

from __future__ import annotations

import os
import sys
import tempfile
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapper_zone.common import version as version_mod
from snapper_zone.common.version import UNKNOWN, version
from snapper_zone.zfs import proc

REPO = Path(__file__).resolve().parent.parent


def test_version_is_the_distributions() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    # Looked up by the name pyproject gives the distribution.
    assert version_mod.DISTRIBUTION == project["name"]
    # The checkout's own number, and the installed distribution's where this
    # checkout is what is installed (editable); a tree run beside another
    # install (a worktree) reads its pyproject.
    assert version() == project["version"]
    try:
        installed = metadata.version(version_mod.DISTRIBUTION)
    except metadata.PackageNotFoundError:
        assert version_mod._from_metadata() is None
    else:
        assert version_mod._from_metadata() == installed


@given(st.from_regex(r"\A[0-9]{1,3}(\.[0-9]{1,3}){0,3}(\.dev[0-9]+|rc[0-9]+)?\Z"))
def test_a_checkout_reads_its_pyproject(v: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "pyproject.toml"
        p.write_text(f'[project]\nname = "x"\nversion = "{v}"\n')
        assert version_mod._from_checkout(p) == v


@pytest.mark.parametrize("text", ["", "[project]\n", 'project = "x"\n', "not toml [", None])
def test_an_unreadable_pyproject_gives_none(tmp_path: Path, text: str | None) -> None:
    p = tmp_path / "pyproject.toml"
    if text is not None:
        p.write_text(text)
    assert version_mod._from_checkout(p) is None


def test_nothing_known_is_unknown_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(version_mod, "_PYPROJECT", Path("/nonexistent/pyproject.toml"))
    monkeypatch.setattr(version_mod, "DISTRIBUTION", "no-such-distribution-here")
    version_mod.version.cache_clear()
    try:
        assert version_mod.version() == UNKNOWN
    finally:
        monkeypatch.undo()
        version_mod.version.cache_clear()
    assert version_mod.version() != UNKNOWN


@pytest.mark.parametrize(("module", "prog"), [
    ("snapper_zone.cli", "snapper"),
    ("snapper_zone.daemon.main", "snapperd"),
    ("rebalance.coordinator", "snapper-coordinator"),
])
async def test_every_command_has_version(module: str, prog: str) -> None:
    # A separate process: the command as an operator runs it, exit status included.
    done = await proc.run([sys.executable, "-m", module, "--version"],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    out = done.stdout.decode().strip()
    assert (done.returncode, out) == (0, f"{prog} {version()}"), done.stderr
