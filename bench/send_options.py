#!/usr/bin/env python3
"""What the send options save: bytes of a plain ``zfs send`` beside ``-c -L -e``.

A pool on a sparse file, one dataset per kind of data (``compression=lz4``,
``recordsize=1M``): ``text`` (log-like, compresses well), ``random``
(incompressible: what -c cannot shrink) and ``zeros`` (holes and embedded
blocks). Each is snapshotted and sent both ways into a byte counter; printed:
bytes of each stream and their ratio. A push uses the compressed form where
both ZFSes have it (``zfs.choose_send_options``), so the ratio is what a CN's
link and a zone's mirror link carry less. Needs OpenZFS (zfs-fuse has no
``send -c``); everything created is destroyed.

    python bench/send_options.py [--size-mib 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import string
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from snapper_zone.fleet import pools
from snapper_zone.zfs.names import Dataset, Snapshot
from snapper_zone.zfs.zfs import SendOptions, SendSpec, Zfs

CHUNK = 1 << 20


async def stream_bytes(zfs: Zfs, spec: SendSpec) -> int:
    """Bytes of ``zfs send SPEC``, counted and dropped."""
    child = await zfs.send(spec)
    n = 0
    while chunk := await child.stdout.read(CHUNK):
        n += len(chunk)
    await zfs.check(child)
    return n


async def measure(zfs: Zfs, snap: Snapshot) -> tuple[int, int]:
    """(plain, compressed) stream bytes of ``snap``: no options, then every one of
    -c -L -e this ZFS has."""
    caps = await zfs.capabilities()
    opts = SendOptions(compressed=caps.compressed_send, large_blocks=caps.large_blocks,
                       embedded=caps.embedded_data)
    return (await stream_bytes(zfs, SendSpec(snap)),
            await stream_bytes(zfs, SendSpec(snap, options=opts)))


def _text(size: int) -> bytes:
    line = "".join(string.ascii_letters[i % 52] * 64 for i in range(4096)).encode()
    return (line * (size // len(line) + 1))[:size]


def _zeros(size: int) -> bytes:
    return bytes(size)


KINDS: dict[str, Callable[[int], bytes]] = {"text": _text, "random": os.urandom,
                                            "zeros": _zeros}


async def main(size_mib: int) -> int:
    zfs = Zfs()
    caps = await zfs.capabilities()
    if not caps.compressed_send:
        print(f"this ZFS ({caps.flavour}) has no send -c: nothing to compare", file=sys.stderr)
        return 2
    size = size_mib << 20
    with tempfile.TemporaryDirectory(prefix="snapper-bench-") as tmp:
        pool = await pools.create_pool(zfs, Path(tmp), "bench", size=4 * size + (256 << 20))
        try:
            print(f"{'data':<8} {'plain':>14} {'-c -L -e':>14} {'ratio':>7}")
            for kind, make in KINDS.items():
                ds = Dataset(pool.name).child(kind)
                await zfs.create(ds, props={"compression": "lz4", "recordsize": "1M"})
                assert pool.mountpoint is not None
                data = make(size)
                await asyncio.to_thread((pool.mountpoint / kind / "f").write_bytes, data)
                await zfs.snapshot([ds.snapshot("s1")])
                plain, compressed = await measure(zfs, ds.snapshot("s1"))
                print(f"{kind:<8} {plain:>14,} {compressed:>14,} {compressed / plain:>7.3f}")
        finally:
            await pool.destroy(zfs)
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=64)
    sys.exit(asyncio.run(main(ap.parse_args().size_mib)))
