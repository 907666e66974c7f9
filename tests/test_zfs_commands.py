"""What a push costs a zone in ``zfs`` commands (issue 17).

Each ``zfs`` command is a process, and on zfs-fuse a round trip through its
daemon: with many CNs pushing small snapshots, they are much of a zone's work
per push. These tests pin which commands a receive runs, so a change that adds
one is seen. Real asyncssh on loopback, real ZFS; the commands are read from
the ZFS layer's own debug log (``snapper.proc``).
"""

from __future__ import annotations

import logging
import re

import pytest

from snapper_zone.fleet.pools import FilePool
from snapper_zone.transfer import local as transfer_local
from snapper_zone.zfs.names import Dataset
from snapper_zone.zfs.zfs import Zfs
from tests.test_sshserver import VM_A, MakeHarness, cn_vm, make_harness, push, zone_root

__all__ = ["make_harness"]  # a fixture, imported for pytest
# The same commands on OpenZFS (where receive -x keeps the properties out).
pytestmark = [pytest.mark.zfs, pytest.mark.openzfs]

_COMMAND = re.compile(r"^(?:ran|stream) \S*zfs (\S+)((?: \S+)*)")


def _commands(caplog: pytest.LogCaptureFixture, root: Dataset) -> list[str]:
    """Each zfs command logged: ``get space`` (the root's own row), ``get
    snapshots`` (a listing with guids), ``get props``, or the verb alone."""
    out = []
    for rec in caplog.records:
        m = _COMMAND.match(rec.getMessage()) if rec.name == "snapper.proc" else None
        if m is None:
            continue
        verb, args = m.group(1), m.group(2).split()
        target = next((a for a in reversed(args) if a.startswith(root.pool)), None)
        if target is None:
            continue  # the test's own (the CN's zfs send)
        if verb == "get" and target == str(root) and "-d" in args \
                and args[args.index("-d") + 1] == "0":
            out.append("get space")
        elif verb == "get":
            out.append("get " + ("snapshots" if "guid" in " ".join(args) else "props"))
        else:
            out.append(verb)
    return out


async def test_a_push_costs_the_zone_four_or_five_zfs_commands(
        zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool, make_harness: MakeHarness,
        caplog: pytest.LogCaptureFixture) -> None:
    """A full push into a new VM: the target listed, space read once (the
    receive got its lock and slot at once), the container created without
    asking first, the receive, one read after it. An incremental: the same
    without the create."""
    h = await make_harness(await zone_root(zfs, zone_pool), {"cn-a": [VM_A]})
    src, _ = await cn_vm(zfs, cn_pool, "vm", 2, size=64 << 10)
    conn = await h.connect("cn-a")
    caplog.set_level(logging.DEBUG, logger="snapper.proc")

    assert (await push(conn, zfs, src, VM_A, "s1"))[0] == 0
    assert _commands(caplog, h.root) == ["get space", "get snapshots", "create", "receive",
                                         "get snapshots"]
    caplog.clear()
    assert (await push(conn, zfs, src, VM_A, "s2", "s1"))[0] == 0
    assert _commands(caplog, h.root) == ["get space", "get snapshots", "receive",
                                         "get snapshots"]


async def test_space_is_read_again_once_the_first_reading_is_stale(
        zfs: Zfs, cn_pool: FilePool, zone_pool: FilePool, make_harness: MakeHarness,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A receive that waited for its lock or slot longer than a reading stays
    fresh asks the pool again before it starts (space may have gone meanwhile)."""
    monkeypatch.setattr(transfer_local, "_SPACE_FRESH_SECONDS", 0.0)
    h = await make_harness(await zone_root(zfs, zone_pool), {"cn-a": [VM_A]})
    src, _ = await cn_vm(zfs, cn_pool, "vm", 1, size=64 << 10)
    caplog.set_level(logging.DEBUG, logger="snapper.proc")
    assert (await push(await h.connect("cn-a"), zfs, src, VM_A, "s1"))[0] == 0
    assert _commands(caplog, h.root)[:3] == ["get space", "get space", "get snapshots"]
