"""Weighted rendezvous hashing: which zones a VM goes to, computed alike everywhere.

One definition, used by the coordinator's placement (``rebalance.placement``,
which adds a vectorised form of the same keys) and by zones pairing VMs
without a coordinator (``replication.peers.pair_of``): every party that knows
the same zones computes the same order.
"""

from __future__ import annotations

import hashlib
import math
import struct
import sys
from collections.abc import Sequence

__all__ = ["rank"]

M32 = 0xFFFFFFFF
F1 = 0x85EBCA6B
F2 = 0xC2B2AE35
INV_2_32 = 2.0**-32
LE = sys.byteorder == "little"
LOW0, LOW1 = (0, 1) if LE else (7, 6)  # the two low-order bytes of a native double

def fmix(x: int) -> int:
    """MurmurHash3's 32-bit finaliser."""
    x ^= x >> 16
    x = (x * F1) & M32
    x ^= x >> 13
    x = (x * F2) & M32
    return x ^ (x >> 16)


def zone_salt(zone_id: str) -> int:
    digest = hashlib.blake2b(zone_id.encode(), digest_size=4, person=b"snapper-hrw").digest()
    return int.from_bytes(digest, "little")


def vm_key(vm: str) -> int:
    raw = uuid_bytes([vm])
    k = 0
    for j in range(4):
        k = fmix(k ^ int.from_bytes(raw[4 * j : 4 * j + 4], "little"))
    return k


def tag(key: float, zone_index: int) -> float:
    """``key`` with its 16 low-order mantissa bits replaced by ``zone_index``."""
    bits = struct.unpack("<Q", struct.pack("<d", key))[0]
    return float(struct.unpack("<d", struct.pack("<Q", (bits & ~0xFFFF) | zone_index))[0])


def uuid_bytes(vms: Sequence[str]) -> bytes:
    """The 16 bytes of each canonical lowercase UUID, concatenated (validated in bulk)."""
    joined = "".join(vms)
    n = len(vms)
    digits = joined.replace("-", "")
    if (len(joined) == 36 * n and len(digits) == 32 * n and digits == digits.lower()
            and all(joined[p::36] == "-" * n for p in (8, 13, 18, 23))):
        try:
            return bytes.fromhex(digits)
        except ValueError:
            pass
    for vm in vms:  # name the culprit
        if len(vm) != 36 or "".join(vm[p] for p in (8, 13, 18, 23)) != "----" or (
                vm != vm.lower() or not _is_hex32(vm.replace("-", ""))):
            raise ValueError(f"vm {vm!r} is not a lowercase canonical UUID")
    raise ValueError("vm ids are not lowercase canonical UUIDs")  # pragma: no cover


def _is_hex32(s: str) -> bool:
    if len(s) != 32 or not s.isascii() or not s.isalnum():
        return False
    try:
        bytes.fromhex(s)
    except ValueError:
        return False
    return True


def rank(vm: str, zones: Sequence[tuple[str, int]]) -> list[str]:
    """The ids of ``zones`` ((id, capacity) of each eligible zone) for ``vm``, best first.

    With ``u = (2**32 - 0.5 - x) / 2**32`` for ``x = fmix(vm key ^ zone salt)``,
    a zone's key is ``ln(u) / (w / w_max)`` (computed as ``log(u, e**(w/w_max))``)
    with its 16 low mantissa bits replaced by the zone's index among the
    zones sorted by id; larger keys win.  That is the order of the weighted
    score ``-w / ln(u)``, read to 2**-36 relative precision, with exact ties
    going to the zone whose id sorts first.
    """
    eligible = sorted(zones)
    if not eligible:
        return []
    wmax = max(w for _, w in eligible)
    k = vm_key(vm)
    keys = [
        tag(math.log((4294967295.5 - fmix(k ^ zone_salt(z))) * INV_2_32, math.exp(w / wmax)), i)
        for i, (z, w) in enumerate(eligible)
    ]
    order = sorted(range(len(eligible)), key=lambda i: keys[i], reverse=True)
    return [eligible[i][0] for i in order]
