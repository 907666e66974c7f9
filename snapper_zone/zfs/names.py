"""Validated names: the only way a dataset, snapshot or bookmark reaches argv.

ZFS accepts more than we do. We accept a conservative grammar so that no
name can be mistaken for an option (leading ``-``), walk out of the delegated
root (``..``, ``/``), or smuggle a snapshot or bookmark separator.
"""

from __future__ import annotations

import re
import uuid as _uuid
from dataclasses import dataclass

from snapper_zone.errors import InvalidName

# One path component: starts alphanumeric so it can never read as an option.
_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}")
UUID_PATTERN = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_UUID = re.compile(UUID_PATTERN)
_USER_PROP = re.compile(r"snapper:[a-z0-9][a-z0-9_.-]{0,63}")
MAX_DATASET_LEN = 200  # ZFS's limit is 256 including the snapshot part


def check_component(value: str, what: str = "name") -> str:
    """Return ``value`` if it is one safe path component, else raise InvalidName."""
    if not isinstance(value, str) or not _COMPONENT.fullmatch(value) or value in (".", ".."):
        raise InvalidName(f"invalid {what} {value!r}: use letters, digits and _ . : - "
                          "(starting with a letter or digit, at most 100 characters)")
    if ".." in value:
        raise InvalidName(f"invalid {what} {value!r}: '..' is not allowed")
    return value


def check_uuid(value: str, what: str = "uuid") -> str:
    """Return ``value`` if it is a lowercase canonical UUID."""
    if not isinstance(value, str) or not _UUID.fullmatch(value):
        raise InvalidName(f"invalid {what} {value!r}: expected a lowercase UUID")
    _uuid.UUID(value)
    return value


def is_uuid(value: str) -> bool:
    """Whether ``value`` passes check_uuid (a VM's dataset, not something beside it)."""
    try:
        check_uuid(value)
    except InvalidName:
        return False
    return True


def check_user_property(name: str) -> str:
    """Only ``snapper:*`` user properties are ours to read and write."""
    if not _USER_PROP.fullmatch(name):
        raise InvalidName(f"invalid user property {name!r}: expected snapper:<name>")
    return name


@dataclass(frozen=True, order=True)
class Dataset:
    """A filesystem or volume, e.g. ``zones/snapper/<vm>/disk0``."""

    path: str

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path or len(self.path) > MAX_DATASET_LEN:
            raise InvalidName(f"invalid dataset {self.path!r}")
        for part in self.path.split("/"):
            check_component(part, "dataset component")

    @property
    def pool(self) -> str:
        return self.path.split("/", 1)[0]

    @property
    def basename(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> Dataset | None:
        return Dataset(self.path.rsplit("/", 1)[0]) if "/" in self.path else None

    def child(self, name: str) -> Dataset:
        return Dataset(f"{self.path}/{check_component(name, 'dataset component')}")

    def snapshot(self, name: str) -> Snapshot:
        return Snapshot(self, name)

    def bookmark(self, name: str) -> Bookmark:
        return Bookmark(self, name)

    def is_within(self, root: Dataset) -> bool:
        """True if this dataset is ``root`` or below it (component-wise)."""
        return self.path == root.path or self.path.startswith(root.path + "/")

    def relative_to(self, root: Dataset) -> str:
        if not self.is_within(root) or self == root:
            raise InvalidName(f"{self.path} is not below {root.path}")
        return self.path[len(root.path) + 1 :]

    def __str__(self) -> str:
        return self.path


@dataclass(frozen=True, order=True)
class Snapshot:
    dataset: Dataset
    name: str

    def __post_init__(self) -> None:
        check_component(self.name, "snapshot name")

    @classmethod
    def parse(cls, full: str) -> Snapshot:
        ds, sep, name = full.partition("@")
        if not sep:
            raise InvalidName(f"invalid snapshot {full!r}: expected dataset@name")
        return cls(Dataset(ds), name)

    def __str__(self) -> str:
        return f"{self.dataset.path}@{self.name}"


@dataclass(frozen=True, order=True)
class Bookmark:
    dataset: Dataset
    name: str

    def __post_init__(self) -> None:
        check_component(self.name, "bookmark name")

    @classmethod
    def parse(cls, full: str) -> Bookmark:
        ds, sep, name = full.partition("#")
        if not sep:
            raise InvalidName(f"invalid bookmark {full!r}: expected dataset#name")
        return cls(Dataset(ds), name)

    def __str__(self) -> str:
        return f"{self.dataset.path}#{self.name}"
