"""A VM's datasets as SmartOS lays them out, and where each goes back. Pure.

Every brand keeps its zone root at ``zones/<uuid>``; its children are the
VM's other datasets (a joyent zone's delegated ``data``, a bhyve VM's
``disk0`` zvols, ...); a KVM VM keeps its disks beside it, as sibling zvols
``zones/<uuid>-disk<N>``. The zone names each part by a label (one dataset
component under ``<root>/<vm>/`` there):

    zones/<uuid>            root
    zones/<uuid>/<child>    <child>
    zones/<uuid>-disk<N>    root-disk<N>   (the top dataset's name, plus the suffix)

``place`` is the inverse, relative to any top dataset: a restore into
``--target pool/copy`` puts ``root-disk0`` at ``pool/copy-disk0``, a
sibling again. Datasets below a child (a delegated dataset's own children)
are not parts of the snapshot: ``discover`` names them, so the CN says so.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from snapper_zone.errors import SnapperError
from snapper_zone.zfs.names import Dataset, check_component

ROOT_LABEL = "root"  # the zone's name for the VM's top dataset (<root>/<vm>)
SIBLING = re.compile(r"-disk(0|[1-9][0-9]{0,3})")  # KVM: zones/<uuid>-disk<N>

__all__ = ["ROOT_LABEL", "SIBLING", "Layout", "LayoutError", "discover", "place"]


class LayoutError(SnapperError):
    """The VM's datasets cannot be named on a zone one-to-one (a name would collide)."""

    code = "DatasetLayout"
    http_status = 409


@dataclass(frozen=True)
class Layout:
    """label -> dataset (root first, then children, then sibling disks); and the
    datasets below a child, which a VM snapshot does not include."""

    parts: dict[str, Dataset]
    skipped: tuple[Dataset, ...] = ()

    @property
    def siblings(self) -> list[Dataset]:
        return [ds for label, ds in self.parts.items() if label.startswith(ROOT_LABEL + "-")]


def _disk_order(label: str) -> int:
    return int(label.rsplit("disk", 1)[1])


def discover(top: Dataset, listed: Iterable[tuple[str, str]]) -> Layout:
    """The VM at ``top``'s parts among ``listed`` (``(name, type)`` rows of ``zfs
    list``: any datasets, snapshots and bookmarks, in any order).

    ``top`` must be among them (else ``LayoutError``). A child named ``root``
    or ``root-...`` would take another part's label on the zone: refused.
    Sibling disks count only as volumes (a filesystem by that name is not a
    KVM disk).
    """
    kinds: dict[str, str] = {}
    for name, kind in listed:
        if "@" in name or "#" in name or kind not in ("filesystem", "volume"):
            continue
        kinds[name] = kind
    if top.path not in kinds:
        raise LayoutError(f"{top} does not exist: no such VM on this CN")
    children: dict[str, Dataset] = {}
    siblings: dict[str, Dataset] = {}
    skipped: list[Dataset] = []
    inside = top.path + "/"
    for name, kind in kinds.items():
        if name.startswith(inside):
            rest = name[len(inside):]
            if "/" in rest:
                skipped.append(Dataset(name))
                continue
            if rest == ROOT_LABEL or rest.startswith(ROOT_LABEL + "-"):
                raise LayoutError(f"{name}: a child called {rest!r} would collide with "
                                  "the VM's top dataset or a sibling disk on the zone")
            children[rest] = Dataset(name)
        elif name.startswith(top.path) and kind == "volume" and \
                SIBLING.fullmatch(suffix := name[len(top.path):]):
            siblings[ROOT_LABEL + suffix] = Dataset(name)
    parts = {ROOT_LABEL: top}
    parts.update(sorted(children.items()))
    parts.update(sorted(siblings.items(), key=lambda kv: _disk_order(kv[0])))
    return Layout(parts, tuple(sorted(skipped, key=lambda d: d.path)))


def place(top: Dataset, label: str) -> Dataset:
    """Where the part ``label`` of a VM snapshot goes when the VM's top is ``top``."""
    if label == ROOT_LABEL:
        return top
    if label.startswith(ROOT_LABEL + "-"):
        suffix = label[len(ROOT_LABEL):]
        if not SIBLING.fullmatch(suffix):
            raise LayoutError(f"part {label!r} is no sibling disk this CN knows how to place")
        return Dataset(top.path + suffix)
    return top.child(check_component(label, "VM dataset"))
