"""Typed documents that cross the wire between zone, CN, replication and coordinator.

Below everything else: imports only ``snapper_zone.errors`` and ``snapper_zone.zfs.names``.
"""

from snapper_zone.wire.documents import (
    GUID_MAX,
    CnIdentity,
    IdentityDocument,
    InvalidDocument,
    Inventory,
    Part,
    RestoreGrant,
    VmSnapshot,
    ZoneEndpoint,
    ZoneRegistration,
    check_cn_id,
    elsewhere_from_json,
    elsewhere_to_json,
    guid_from_json,
    guid_to_json,
    snapshot_list_from_json,
    tombstones_from_json,
    tombstones_to_json,
)

__all__ = [
    "GUID_MAX",
    "CnIdentity",
    "IdentityDocument",
    "InvalidDocument",
    "Inventory",
    "Part",
    "RestoreGrant",
    "VmSnapshot",
    "ZoneEndpoint",
    "ZoneRegistration",
    "check_cn_id",
    "elsewhere_from_json",
    "elsewhere_to_json",
    "guid_from_json",
    "guid_to_json",
    "snapshot_list_from_json",
    "tombstones_from_json",
    "tombstones_to_json",
]
