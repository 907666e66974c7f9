"""The coordinator's SQLite store: atomic mutations, refusals, survival of a reopen."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rebalance.placement import Move, ZoneState
from rebalance.store import (
    MoveState,
    MoveStep,
    PlacementConflict,
    SqliteStore,
    ZoneNotEmpty,
    ZoneNotFound,
    ZoneRegistration,
)

A, B, C = (f"00000000-0000-4000-8000-00000000000{i}" for i in (1, 2, 3))
VM = "74c59c61-4559-4ca2-b1ef-0ca22f2f936a"


def reg(zone: str, capacity: int = 100, port: int = 2222) -> ZoneRegistration:
    return ZoneRegistration(uuid=zone, name=f"z{zone[-1]}", ssh_host="127.0.0.1",
                            ssh_port=port, http_url="http://127.0.0.1:1", host_key="ssh-ed25519 X",
                            capacity=capacity)


async def test_register_is_idempotent_and_keeps_state(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "c.db")
    z, created = await s.upsert_zone(reg(A), now=1.0)
    assert created and z.state is ZoneState.PENDING and z.health == "unknown"
    assert not z.admitted and not z.readable
    await s.set_zone_state(A, ZoneState.DRAINING)
    z, created = await s.upsert_zone(reg(A, capacity=200, port=2223), now=2.0)
    assert not created
    assert (z.capacity, z.ssh_port, z.state, z.registered) == (200, 2223, ZoneState.DRAINING, 1.0)
    assert [x.uuid for x in await s.zones()] == [A]
    await s.close()


async def test_state_survives_reopen_and_file_is_wal(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    s = SqliteStore(path)
    await s.upsert_zone(reg(A), 1.0)
    await s.upsert_zone(reg(B), 1.0)
    await s.place(VM, (A, B), size=42)
    [m] = await s.add_moves([Move(VM, B, C, B, 42, "rebalance")], now=3.0)
    await s.update_move(m.id, 4.0, state=MoveState.RUNNING, step=MoveStep.COPY)
    await s.close()
    s2 = SqliteStore(path)
    assert await s2.placements() == {VM: (A, B)}
    assert await s2.vm_sizes() == {VM: 42}
    [m2] = await s2.moves([MoveState.RUNNING])
    assert (m2.step, m2.started, m2.vm) == (MoveStep.COPY, 4.0, VM)
    await s2.close()
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


async def test_place_first_answer_wins() -> None:
    s = SqliteStore(":memory:")
    answers = await asyncio.gather(s.place(VM, (A, B)), s.place(VM, (C, A)))
    assert answers[0] == answers[1]
    with pytest.raises(ValueError):
        await s.place("11111111-1111-4111-8111-111111111111", (A, A))


async def test_delete_zone_refused_while_it_holds_a_copy_or_a_move() -> None:
    s = SqliteStore(":memory:")
    for z in (A, B, C):
        await s.upsert_zone(reg(z), 1.0)
    await s.place(VM, (A, B))
    with pytest.raises(ZoneNotEmpty):
        await s.delete_zone(A)
    [m] = await s.add_moves([Move(VM, B, C, B, 1, "drain")], 2.0)
    with pytest.raises(ZoneNotEmpty):
        await s.delete_zone(C)  # an active move is filling it
    await s.switch_placement(m.id, VM, (A, B), (A, C), 3.0)
    with pytest.raises(ZoneNotEmpty):
        await s.delete_zone(B)  # the move has not deleted B's copy yet
    await s.update_move(m.id, 4.0, state=MoveState.DONE)
    await s.delete_zone(B)
    assert [z.uuid for z in await s.zones()] == [A, C]
    with pytest.raises(ZoneNotFound):
        await s.delete_zone(B)
    with pytest.raises(ZoneNotFound):
        await s.set_zone_state(B, ZoneState.LOST)


async def test_switch_is_atomic_with_the_step_and_checks_expected() -> None:
    s = SqliteStore(":memory:")
    await s.place(VM, (A, B))
    [m] = await s.add_moves([Move(VM, B, C, B, 1, "rebalance")], 1.0)
    with pytest.raises(PlacementConflict):
        await s.switch_placement(m.id, VM, (B, A), (A, C), 2.0)
    assert (await s.move(m.id)).step is None  # type: ignore[union-attr]
    assert await s.placement(VM) == (A, B)
    m2 = await s.switch_placement(m.id, VM, (A, B), (A, C), 2.0)
    assert m2.step is MoveStep.DELETE and await s.placement(VM) == (A, C)


async def test_move_lifecycle_fields() -> None:
    s = SqliteStore(":memory:")
    [m] = await s.add_moves([Move(VM, None, C, A, 1000, "add-copy")], 1.0)
    assert m.state is MoveState.PLANNED and m.active and m.to_json()["eta"] is None
    m = await s.update_move(m.id, 2.0, state=MoveState.RUNNING, step=MoveStep.COPY, attempt=True)
    m = await s.update_move(m.id, 4.0, progress=500, error="behind")
    assert m.eta(4.0) == pytest.approx(2.0)
    m = await s.update_move(m.id, 5.0, clear_error=True, state=MoveState.DONE)
    assert (m.error, m.finished, m.attempts, m.started) == (None, 5.0, 1, 2.0)
    assert not m.active
    assert await s.moves([MoveState.PLANNED]) == []
    assert await s.move(999) is None


zones_st = st.sampled_from([A, B, C])
vms_st = st.builds(lambda i: str(uuid.UUID(int=i, version=4)), st.integers(0, 5))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(vms_st, zones_st, zones_st, st.booleans()), max_size=30))
def test_placement_matches_a_dict_model(ops: list[tuple[str, str, str, bool]]) -> None:
    """place() and switch_placement() behave like a dict: first placement wins,
    a switch applies only over the expected pair, and a pair is never one zone."""

    async def run() -> None:
        s = SqliteStore(":memory:")
        model: dict[str, tuple[str, str]] = {}
        [m] = await s.add_moves([Move(VM, None, A, B, 0, "add-copy")], 0.0)
        for vm, z1, z2, switch in ops:
            if z1 == z2:
                with pytest.raises(ValueError):
                    await s.place(vm, (z1, z2))
                continue
            if switch and vm in model:
                expected = model[vm]
                await s.switch_placement(m.id, vm, expected, (z1, z2), 1.0)
                model[vm] = (z1, z2)
            else:
                got = await s.place(vm, (z1, z2))
                assert got == model.setdefault(vm, (z1, z2))
        assert await s.placements() == dict(sorted(model.items()))
        await s.close()

    asyncio.run(run())
