"""The distribution: its name and license, every package, and etc/ and smf/ as package data.

A wheel is built from a copy of the checkout (``pip wheel``, as ``make deps``'s
editable install builds it: setuptools from the package index) and installed
into a scratch directory; what an operator gets there is compared with the repo.
"""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# What the wheel carries beside the code, by where it lands in site-packages.
DATA = {"snapper_zone/data/etc": REPO / "etc", "snapper_zone/data/smf": REPO / "smf"}
SHIPPED = sorted(
    (f"{dest}/{f.relative_to(src).as_posix()}", f)
    for dest, src in DATA.items() for f in src.rglob("*") if f.is_file())
BUILD_FILES = ("pyproject.toml", "README.md", "LICENSE", "snapper_zone", "replication",
               "rebalance", "etc", "smf")


def test_every_package_is_listed() -> None:
    # An explicit list (the data packages need a mapping), so a new package
    # left out of it would be missing from the wheel: the tree decides.
    code = {".".join(p.parent.relative_to(REPO).parts)
            for top in ("snapper_zone", "replication", "rebalance")
            for p in (REPO / top).rglob("__init__.py")}
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    mapped = PYPROJECT["tool"]["setuptools"]["package-dir"]
    data = {pkg for pkg in listed if pkg.startswith("snapper_zone.data.")}
    assert listed - data == code
    for pkg in data:
        parent = next(p for p in mapped if pkg == p or pkg.startswith(p + "."))
        src = REPO / mapped[parent] / Path(*pkg.removeprefix(parent).split(".")[1:])
        assert src.is_dir(), f"{pkg}: {src} is not a directory"
    assert not (REPO / "snapper_zone" / "data").exists()  # only ever the mapped copies


def test_name_license_and_commands() -> None:
    project = PYPROJECT["project"]
    assert project["name"] == "snapper-zone"
    assert project["license"] == "MPL-2.0"  # SPDX (PEP 639), not the deprecated table
    assert project["license-files"] == ["LICENSE"]
    assert (REPO / "LICENSE").read_text().startswith("Mozilla Public License Version 2.0")
    assert not any(c.startswith("License ::") for c in project.get("classifiers", []))
    scripts = project["scripts"]
    assert scripts["snapper-zone"] == scripts["snapper"]
    assert scripts["snapper-zoned"] == scripts["snapperd"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A wheel built from a copy of the checkout (a build writes into its source
    tree); the wheel and the build's log."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    for name in BUILD_FILES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    out = base / "dist"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--disable-pip-version-check",
         "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PIP_NO_INPUT": "1"})
    log = done.stdout + done.stderr
    assert done.returncode == 0, f"pip wheel failed:\n{log[-4000:]}"
    (built,) = out.glob("*.whl")
    return built, log


def test_the_wheel_builds_without_a_license_warning(wheel: tuple[Path, str]) -> None:
    built, log = wheel
    assert built.name.startswith("snapper_zone-")
    warnings = [line for line in log.splitlines()
                if "warning" in line.lower() and "byte-compil" not in line]
    # None at all: the deprecated license table was one (BuildBackendWarning).
    assert not warnings, "\n".join(warnings)
    with zipfile.ZipFile(built) as z:
        (meta_name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        meta = email.parser.Parser().parsestr(z.read(meta_name).decode())
        licenses = [n for n in z.namelist() if ".dist-info/licenses/" in n]
        entry_points = z.read(meta_name.replace("METADATA", "entry_points.txt")).decode()
    assert meta["Name"] == "snapper-zone"
    assert meta["License-Expression"] == "MPL-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert [n.rsplit("/", 1)[1] for n in licenses] == ["LICENSE"]
    for command in ("snapper", "snapperd", "snapper-coordinator", "snapper-zone",
                    "snapper-zoned"):
        assert f"\n{command} = " in entry_points, command


def test_the_wheel_ships_etc_and_smf(wheel: tuple[Path, str], tmp_path: Path) -> None:
    built, _ = wheel
    with zipfile.ZipFile(built) as z:
        names = set(z.namelist())
        for dest, repo_file in SHIPPED:
            assert dest in names, f"{dest} is not in the wheel"
            assert z.read(dest) == repo_file.read_bytes(), dest
    assert {d for d, _ in SHIPPED} >= {"snapper_zone/data/etc/snapperd.example.toml",
                                       "snapper_zone/data/smf/manifests/snapperd.xml",
                                       "snapper_zone/data/smf/method/snapperd"}
    # Installed as pip installs it: the files are package resources, methods executable.
    target = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
         "--disable-pip-version-check", "--target", str(target), str(built)],
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    probe = ("from importlib.resources import files; "
             "print(files('snapper_zone.data.etc').joinpath('snapperd.example.toml')"
             ".read_text(), end='')")
    read = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, check=False, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(target)})
    assert read.returncode == 0, read.stderr
    assert read.stdout == (REPO / "etc" / "snapperd.example.toml").read_text()
    for method in (REPO / "smf" / "method").iterdir():
        installed = target / "snapper_zone" / "data" / "smf" / "method" / method.name
        assert os.access(installed, os.X_OK), f"{installed} is not executable"
