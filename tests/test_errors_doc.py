"""docs/errors.md lists every error code Snapper can raise, each with its one
HTTP status, and no code that does not exist.

The codes are read from the classes themselves: every ``SnapperError``
subclass in the three packages, and the CN's planning conflicts (which reach
the CLI through ``PlanError`` with the conflict's code).
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections import defaultdict
from pathlib import Path
from typing import TypeVar

from snapper_zone.cn.client import PlanError
from snapper_zone.errors import SnapperError
from snapper_zone.transfer.plan import Conflict

DOC = Path(__file__).resolve().parent.parent / "docs" / "errors.md"
PACKAGES = ("snapper_zone", "replication", "rebalance")
T = TypeVar("T")
ROW = re.compile(r"^\| `(?P<code>[A-Za-z]+)` \| (?P<status>\d{3}) \|", re.MULTILINE)


def _subclasses(cls: type[T]) -> set[type[T]]:
    """``cls``'s subclasses in the product (not those a test defines)."""
    out: set[type[T]] = set()
    for sub in cls.__subclasses__():
        out |= _subclasses(sub)
        if sub.__module__.split(".")[0] in PACKAGES:
            out.add(sub)
    return out


def _raised_codes() -> dict[str, set[int]]:
    """Every code a class can carry, with the HTTP statuses it maps to."""
    for name in PACKAGES:
        pkg = importlib.import_module(name)
        for mod in pkgutil.walk_packages(pkg.__path__, f"{name}."):
            importlib.import_module(mod.name)
    codes: dict[str, set[int]] = defaultdict(set)
    for cls in _subclasses(SnapperError) | {SnapperError}:
        codes[cls.code].add(cls.http_status)
    for conflict in _subclasses(Conflict) | {Conflict}:
        codes[conflict.code].add(PlanError.http_status)
    return codes


def _documented() -> dict[str, list[int]]:
    rows: dict[str, list[int]] = defaultdict(list)
    for m in ROW.finditer(DOC.read_text()):
        rows[m["code"]].append(int(m["status"]))
    return rows


def test_every_code_has_one_status() -> None:
    """A client may act on the code alone: no code means two statuses."""
    mixed = {code: sorted(s) for code, s in _raised_codes().items() if len(s) > 1}
    assert not mixed


def test_every_code_is_documented_once_with_its_status() -> None:
    raised, documented = _raised_codes(), _documented()
    assert not sorted(set(raised) - set(documented)), "codes missing from docs/errors.md"
    assert not sorted(set(documented) - set(raised)), "docs/errors.md names unknown codes"
    twice = {code: s for code, s in documented.items() if len(s) > 1}
    assert not twice, "codes documented more than once"
    wrong = {code: (documented[code][0], sorted(s)) for code, s in raised.items()
             if documented[code][0] not in s}
    assert not wrong, "documented status differs from the code's"


def test_the_row_pattern_reads_the_tables() -> None:
    """The check above is only as good as its parser: it must see every table row."""
    text = DOC.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == sum(len(s) for s in _documented().values()) > 60
