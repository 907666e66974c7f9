"""Imports point one way: each package may import only the layers below it.

Read from the source (every import, ``TYPE_CHECKING`` ones included), so a
cycle cannot hide behind a lazy or type-only import. The layers, bottom up:

    errors
    zfs (zfs, names, proc, sendstream)      common (config, log, metrics, ...)
    wire (protocol, documents)              policy (schedules, retention: pure)
    transfer (stream, local, remote, plan, registry, store)
    replication            cn (the CN client)            rebalance (coordinator)
    daemon (snapperd)
    fleet (local fleet, demo)
    snapper_zone.cli (the ``snapper`` command: composes cn, rebalance, fleet)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BOTTOM = {"snapper_zone.errors"}
ALLOWED: dict[str, set[str]] = {
    "snapper_zone.errors": set(),
    "snapper_zone.zfs": {"snapper_zone.errors"},
    "snapper_zone.common": {"snapper_zone.errors"},
    "snapper_zone.wire": {"snapper_zone.errors", "snapper_zone.zfs"},
}
ALLOWED["snapper_zone.transfer"] = {"snapper_zone", "snapper_zone.common",
                                    *ALLOWED["snapper_zone.wire"], "snapper_zone.wire"}
ALLOWED["snapper_zone.policy"] = {"snapper_zone.errors", "snapper_zone.common"}
ALLOWED["replication"] = {*ALLOWED["snapper_zone.transfer"], "snapper_zone.transfer",
                          "snapper_zone.policy"}
ALLOWED["snapper_zone.cn"] = set(ALLOWED["replication"])
# policy: the registry checks a policy document as the agent reads it (one parser).
ALLOWED["rebalance"] = {"snapper_zone.errors", "snapper_zone.common", "snapper_zone.wire",
                        "snapper_zone.zfs", "snapper_zone.policy"}
ALLOWED["snapper_zone.daemon"] = {*ALLOWED["replication"], "replication"}
ALLOWED["snapper_zone.fleet"] = {*ALLOWED["snapper_zone.daemon"], "snapper_zone.daemon",
                                 "snapper_zone.cn"}
ALLOWED["snapper_zone.cli"] = {*ALLOWED["snapper_zone.fleet"], "snapper_zone.fleet",
                               "rebalance"}


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "snapper_zone":
        return parts[0]
    return ".".join(parts[:2]) if len(parts) > 1 else "snapper_zone"


def _modules() -> list[tuple[str, Path]]:
    out = []
    for top in ("snapper_zone", "replication", "rebalance"):
        for f in sorted((ROOT / top).rglob("*.py")):
            mod = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            out.append((mod.removesuffix(".__init__"), f))
    return out


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {n for n in found if n.split(".")[0] in ("snapper_zone", "replication",
                                                     "rebalance")}


MODULES = _modules()


def test_every_package_has_a_layer() -> None:
    layers = {_layer(m) for m, _ in MODULES} - {"snapper_zone"}
    assert layers <= set(ALLOWED), f"packages with no layer: {layers - set(ALLOWED)}"
    assert len(MODULES) > 40  # the walk found the code


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[m for m, _ in MODULES])
def test_imports_point_down(module: str, path: Path) -> None:
    mine = _layer(module)
    if mine == "snapper_zone":
        return  # the package's own __init__
    wrong = sorted(n for n in _imports(path)
                   if _layer(n) != mine and _layer(n) not in ALLOWED[mine]
                   # "from snapper_zone import wire" names the module snapper_zone.wire
                   and not (_layer(n) == "snapper_zone" and n in BOTTOM | {"snapper_zone"}))
    assert not wrong, f"{module} ({mine}) imports {wrong}: not below it"


def test_the_layers_have_no_cycle() -> None:
    seen: dict[str, int] = {}

    def depth(layer: str, stack: tuple[str, ...] = ()) -> int:
        assert layer not in stack, f"cycle: {' -> '.join((*stack, layer))}"
        if layer not in seen:
            below = ALLOWED.get(layer, set()) - {layer, "snapper_zone"}
            seen[layer] = 1 + max((depth(b, (*stack, layer)) for b in below), default=0)
        return seen[layer]

    assert depth("snapper_zone.cli") > depth("snapper_zone.daemon") > depth("replication") \
        > depth("snapper_zone.transfer") > depth("snapper_zone.wire") > depth("snapper_zone.zfs")
