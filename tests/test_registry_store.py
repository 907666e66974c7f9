"""The identity registry in the coordinator's store (CNs, VM owners, restore
grants), the same contract on both backends (``test_coordinator_store.backend``):
every change bumps the version, refusals change nothing, racing writers all land
or are refused whole, and a model of it agrees under random operations.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from pathlib import Path

import asyncssh
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rebalance.store import CnNotFound, GrantRecord, KeyInUse, SqliteStore, open_store
from rebalance.store.base import key_identity
from tests.test_coordinator_store import Backend, backend

__all__ = ["backend"]  # the parametrised fixture, shared with the store's contract suite

VM1, VM2, VM3 = (str(uuid.UUID(int=i, version=4)) for i in (1, 2, 3))
_KEYS = [asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
         for _ in range(4)]
K1, K2, K3, K4 = _KEYS


async def test_cns_owners_and_grants_round_trip_with_a_version(backend: Backend) -> None:
    s = await backend.open()
    r0 = await s.registry(now=0.0)
    assert (r0.cns, dict(r0.owners), r0.grants) == ((), {}, ())
    cn = await s.add_cn_keys("cn-a", [K1 + " alice"], now=5.0)
    assert (cn.id, cn.keys, cn.added) == ("cn-a", (K1 + " alice",), 5.0)
    # Adding again (the same key, another comment) changes nothing; a second key adds.
    again = await s.add_cn_keys("cn-a", [K1, K2], now=6.0)
    assert again.keys == (K1 + " alice", K2) and again.added == 5.0
    await s.add_cn_keys("cn-b", [K3], now=7.0)
    assert await s.assign_vms({VM1: "cn-a", VM2: "cn-b"}) == 2
    assert await s.assign_vms({VM1: "cn-a"}) == 0  # unchanged is not counted
    g = await s.add_grant(GrantRecord(VM1, "cn-b", expires=100.0, granted_by="operator:o",
                                      created=10.0))
    r = await s.registry(now=50.0)
    assert r.version > r0.version and await s.registry_version() == r.version
    assert [(c.id, c.keys) for c in r.cns] == [("cn-a", (K1 + " alice", K2)), ("cn-b", (K3,))]
    assert dict(r.owners) == {VM1: "cn-a", VM2: "cn-b"}
    assert r.grants == (g,)
    assert (await s.registry(now=100.0)).grants == ()  # expired: not in force
    await s.close()
    s2 = await backend.open()  # survives a reopen
    r2 = await s2.registry(now=50.0)
    assert (r2.version, r2.cns, dict(r2.owners), r2.grants) == (
        r.version, r.cns, dict(r.owners), r.grants)


async def test_refusals_change_nothing(backend: Backend) -> None:
    s = await backend.open()
    await s.add_cn_keys("cn-a", [K1], now=1.0)
    before = await s.registry(now=1.0)
    with pytest.raises(KeyInUse):  # one key, one CN
        await s.add_cn_keys("cn-b", [K4, K1 + " other-comment"], now=2.0)
    with pytest.raises(CnNotFound):  # every owner must be a registered CN, or none lands
        await s.assign_vms({VM1: "cn-a", VM2: "nobody"})
    with pytest.raises(CnNotFound):
        await s.add_grant(GrantRecord(VM1, "nobody", 9.0, "operator:o", 1.0))
    with pytest.raises(CnNotFound):
        await s.remove_cn("nobody")
    with pytest.raises(CnNotFound):
        await s.remove_cn("cn-a", K2)
    after = await s.registry(now=1.0)
    assert (after.version, after.cns, dict(after.owners), after.grants) == (
        before.version, before.cns, {}, ())


async def test_removing_a_key_or_a_cn(backend: Backend) -> None:
    s = await backend.open()
    await s.add_cn_keys("cn-a", [K1, K2], now=1.0)
    await s.add_cn_keys("cn-b", [K3], now=1.0)
    await s.assign_vms({VM1: "cn-a"})
    await s.add_grant(GrantRecord(VM1, "cn-b", 99.0, "operator:o", 1.0))
    left = await s.remove_cn("cn-a", K1 + " any comment")
    assert left is not None and left.keys == (K2,)
    v = await s.registry_version()
    assert await s.remove_cn("cn-b") is None
    r = await s.registry(now=2.0)
    assert r.version > v
    assert [c.id for c in r.cns] == ["cn-a"]
    assert r.grants == ()  # its grants went with it
    assert dict(r.owners) == {VM1: "cn-a"}
    # The key freed is anyone's again.
    assert (await s.add_cn_keys("cn-c", [K3], now=3.0)).keys == (K3,)


async def test_a_new_grant_replaces_and_expired_ones_are_dropped(backend: Backend) -> None:
    s = await backend.open()
    for cn, k in (("cn-a", K1), ("cn-b", K2), ("cn-c", K3)):
        await s.add_cn_keys(cn, [k], now=0.0)
    await s.add_grant(GrantRecord(VM1, "cn-b", 10.0, "operator:o", 1.0))
    await s.add_grant(GrantRecord(VM1, "cn-b", 30.0, "operator:p", 2.0))  # replaces
    await s.add_grant(GrantRecord(VM1, "cn-c", 50.0, "operator:o", 40.0))  # cn-b's expired
    r = await s.registry(now=0.0)
    assert [(g.cn, g.expires, g.granted_by) for g in r.grants] == [("cn-c", 50.0, "operator:o")]


async def test_racing_identity_writers_all_land(backend: Backend) -> None:
    s1, s2 = await backend.open(), await backend.open()
    await s1.add_cn_keys("cn-a", [K1], now=0.0)
    v = await s1.registry_version()
    vms = [str(uuid.UUID(int=100 + i, version=4)) for i in range(12)]
    await asyncio.gather(*(s.assign_vms({vm: "cn-a"})
                           for s, vm in zip([s1, s2] * 6, vms, strict=True)),
                         s2.add_cn_keys("cn-b", [K2], now=1.0),
                         s1.add_cn_keys("cn-c", [K3], now=1.0))
    r = await s2.registry(now=0.0)
    assert dict(r.owners) == {vm: "cn-a" for vm in vms}
    assert [c.id for c in r.cns] == ["cn-a", "cn-b", "cn-c"]
    assert r.version == v + 14  # each write its own version


async def test_racing_key_claims_one_wins(backend: Backend) -> None:
    s1, s2 = await backend.open(), await backend.open()
    got = await asyncio.gather(s1.add_cn_keys("cn-a", [K1], now=0.0),
                               s2.add_cn_keys("cn-b", [K1], now=0.0), return_exceptions=True)
    assert sum(isinstance(g, KeyInUse) for g in got) == 1, got
    r = await s1.registry(now=0.0)
    assert len(r.cns) == 1


async def test_sqlite_store_of_schema_2_gains_the_registry(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    s = SqliteStore(path)
    await s.close()
    db = sqlite3.connect(path)
    db.executescript("DROP TABLE cns; DROP TABLE owners; DROP TABLE grants; "
                     "DROP TABLE registry_version; PRAGMA user_version=2;")
    db.close()
    s = SqliteStore(path)
    assert await s.registry_version() == 0
    await s.add_cn_keys("cn-a", [K1], now=0.0)
    assert await s.registry_version() == 1
    await s.close()


cn_st = st.sampled_from(["cn-a", "cn-b", "cn-c"])
vm_st = st.sampled_from([VM1, VM2, VM3])
op_st = st.one_of(
    st.tuples(st.just("add"), cn_st, st.sampled_from(_KEYS)),
    st.tuples(st.just("remove"), cn_st, st.sampled_from([None, *_KEYS])),
    st.tuples(st.just("assign"), vm_st, cn_st),
)


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op_st, max_size=20))
@pytest.mark.parametrize("kind", ["sqlite", "zookeeper"])
def test_registry_matches_a_model(kind: str, request: pytest.FixtureRequest, tmp_path: Path,
                                  ops: list[tuple[str, str, str | None]]) -> None:
    """CNs and owners behave like two dicts with the rules: one key one CN, owners
    only of registered CNs, refusals change nothing; the version counts changes."""
    zk = request.getfixturevalue("zookeeper") if kind == "zookeeper" else None

    async def run() -> None:
        s = await open_store(Backend(kind, tmp_path / uuid.uuid4().hex, zk).where)
        cns: dict[str, list[str]] = {}
        owners: dict[str, str] = {}
        changes = 0
        for op, a, b in ops:
            if op == "add":
                assert b is not None
                holder = next((c for c, ks in cns.items()
                               if key_identity(b) in map(key_identity, ks)), None)
                if holder not in (None, a):
                    with pytest.raises(KeyInUse):
                        await s.add_cn_keys(a, [b], 0.0)
                    continue
                await s.add_cn_keys(a, [b], 0.0)
                mine = cns.setdefault(a, [])
                if b not in mine:
                    mine.append(b)
                changes += 1
            elif op == "remove":
                if a not in cns or (b is not None and b not in cns[a]):
                    with pytest.raises(CnNotFound):
                        await s.remove_cn(a, b)
                    continue
                await s.remove_cn(a, b)
                if b is None:
                    del cns[a]
                else:
                    cns[a].remove(b)
                changes += 1
            else:
                if b not in cns:
                    with pytest.raises(CnNotFound):
                        await s.assign_vms({a: str(b)})
                    continue
                n = await s.assign_vms({a: str(b)})
                assert n == (owners.get(a) != b)
                changes += n
                owners[a] = str(b)
        r = await s.registry(0.0)
        assert {c.id: list(c.keys) for c in r.cns} == cns
        assert dict(r.owners) == owners
        assert r.version == changes
        await s.close()

    asyncio.run(run())
