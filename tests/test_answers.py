"""The coordinator answer cache (``common/answers``) and the CN's placement lookup
with it: what is kept, what is read back, what a corrupt file does, and that a
coordinator that does not answer is bridged only by a verified earlier answer."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import asyncssh
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from replication.coordinator_client import CoordinatorClient, VmPlacement
from snapper_zone.cn.cli import main as cn_main
from snapper_zone.cn.client import PlacementUnknown, lookup_placement
from snapper_zone.common.answers import AnswerCache, CacheCorrupt, Seen, decode, encode
from snapper_zone.common.httpsig import Signer
from snapper_zone.fleet.local import free_port
from snapper_zone.transfer.remote import ZoneError

LOG = logging.getLogger("test")
VM = "7b1a8a8e-3c4f-4d0e-9a55-0f6c3c2b1a10"
A, B, C = (f"{i:08x}-0000-4000-8000-000000000000" for i in (1, 2, 3))

json_scalars = st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=10)
docs = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
times = st.floats(0, 4e9, allow_nan=False)
seens = st.builds(Seen, docs, times)


@given(st.dictionaries(st.uuids().map(str), seens, max_size=5), st.none() | seens,
       st.dictionaries(st.text(min_size=1, max_size=8), seens, max_size=3))
def test_encode_decode_round_trip(placements: dict[str, Seen], zones: Seen | None,
                                  policies: dict[str, Seen]) -> None:
    got, got_zones, got_policies = decode(encode(placements, zones, policies))
    assert got == {vm: Seen(dict(s.doc), float(s.at)) for vm, s in placements.items()}
    assert got_zones == (None if zones is None else Seen(dict(zones.doc), float(zones.at)))
    assert got_policies == {n: Seen(dict(s.doc), float(s.at)) for n, s in policies.items()}


@settings(max_examples=300)
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_decode_of_anything_else_is_cache_corrupt_or_a_cache(raw: bytes) -> None:
    try:
        placements, _zones, _policies = decode(raw)
    except CacheCorrupt as exc:
        assert exc.code == "CacheCorrupt"
        return
    assert all(isinstance(s.doc, dict) and s.at >= 0 for s in placements.values())


@given(st.sampled_from([b'{"format": 1, "placements": {"v": {"at": -1, "doc": {}}}}',
                        b'{"format": 1, "placements": {"v": {"at": 1e999, "doc": {}}}}',
                        b'{"format": 1, "placements": {"v": {"at": 1, "doc": []}}}',
                        b'{"format": 2, "placements": {}}', b'{"format": 1}', b"[]",
                        b'{"format": 1, "placements": {}, "zones": {"at": true, "doc": {}}}',
                        b'{"format": 1, "placements": {}, "policies": []}',
                        b'{"format": 1, "placements": {}, "policies": {"p": {"at": 1}}}']))
def test_decode_refuses_each_malformed_part(raw: bytes) -> None:
    with pytest.raises(CacheCorrupt):
        decode(raw)


async def test_the_file_survives_a_restart_and_a_corrupt_one_starts_empty(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state" / "answers.json"
    cache = AnswerCache.load(path, LOG, min_interval=0)
    cache.put_placement(VM, {"zones": [A, B]}, at=100.0)
    cache.put_zones({"zones": []}, at=200.0)
    await cache.flush()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    again = AnswerCache.load(path, LOG)
    assert again.placement(VM) == Seen({"zones": [A, B]}, 100.0)
    assert again.zones() == Seen({"zones": []}, 200.0)
    assert [p.name for p in path.parent.iterdir()] == ["answers.json"]  # no temporary left
    path.write_bytes(b'{"format": 1, "placements": {')  # a torn write by another tool
    with caplog.at_level(logging.WARNING):
        empty = AnswerCache.load(path, LOG)
    assert empty.vms() == [] and "corrupt" in caplog.text


async def test_writes_are_coalesced_and_a_same_answer_only_refreshes_its_time(
        tmp_path: Path) -> None:
    path = tmp_path / "answers.json"
    cache = AnswerCache(path, LOG, min_interval=60.0, touch_interval=60.0)
    cache.put_placement(VM, {"zones": [A, B]}, at=1.0)
    await cache.flush()  # the first write goes at once
    assert decode(path.read_bytes())[0][VM].at == 1.0
    cache.put_placement(VM, {"zones": [A, B]}, at=2.0)
    await cache.flush()  # same answer, newer time: not worth a write yet
    assert decode(path.read_bytes())[0][VM].at == 1.0
    cache.put_placement(VM, {"zones": [A, C]}, at=3.0)
    await cache.flush()  # a change, but within min_interval: written later (or at close)
    assert decode(path.read_bytes())[0][VM].doc == {"zones": [A, B]}
    await cache.close()
    assert decode(path.read_bytes())[0][VM] == Seen({"zones": [A, C]}, 3.0)


# -- against a coordinator that answers, then does not ----------------------------------


def _key(path: Path) -> asyncssh.SSHKey:
    key = asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(str(path))
    return key


class FakeCoordinator:
    """A real aiohttp server answering placements; ``down`` makes it answer 503."""

    def __init__(self, key: asyncssh.SSHKey) -> None:
        self.key = key
        self.down = False
        self.pair = [A, B]
        self.runner: web.AppRunner | None = None
        self.port = free_port()

    async def placement(self, request: web.Request) -> web.Response:
        if self.down:
            return web.json_response({"code": "StoreUnavailable", "message": "zk"}, status=503)
        eps = [{"uuid": z, "ssh_host": "127.0.0.1", "ssh_port": 22, "http_url": "http://x",
                "host_key": self.key.export_public_key().decode().strip()}
               for z in self.pair]
        return web.json_response({"vm": request.match_info["vm"], "zones": self.pair,
                                  "endpoints": eps, "scope": self.pair})

    async def __aenter__(self) -> FakeCoordinator:
        app = web.Application()
        app.router.add_get("/v1/placement/{vm}", self.placement)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def test_cn_uses_its_cached_placement_only_when_the_coordinator_does_not_answer(
        tmp_path: Path) -> None:
    key = _key(tmp_path / "cn_key")
    cache = AnswerCache.load(tmp_path / "cn.json", LOG, min_interval=0)
    async with FakeCoordinator(key) as coord:
        with pytest.raises(PlacementUnknown):  # never seen, no answer: no guess
            coord.down = True
            await lookup_placement(coord.url, VM, tmp_path / "cn_key", cache=cache)
        coord.down = False
        fresh = await lookup_placement(coord.url, VM, tmp_path / "cn_key", cache=cache)
        assert fresh.seen_at is None and [e["uuid"] for e in fresh.endpoints] == [A, B]
        coord.down = True
        # Another process (the next `snapper push`) reads the file.
        again = AnswerCache.load(tmp_path / "cn.json", LOG, min_interval=0)
        got = await lookup_placement(coord.url, VM, tmp_path / "cn_key", cache=again)
        assert [e["uuid"] for e in got.endpoints] == [A, B] and got.seen_at is not None
        assert got.note() is not None and got.note().startswith(  # type: ignore[union-attr]
            "coordinator unreachable: using the placement seen at ")
    # Stopped for good: connection refused, bounded, the cache again.
    got = await asyncio.wait_for(
        lookup_placement(coord.url, VM, tmp_path / "cn_key", cache=again), 15)
    assert got.seen_at is not None


async def test_cn_never_caches_an_answer_it_cannot_verify(tmp_path: Path) -> None:
    key = _key(tmp_path / "cn_key")
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    cache = AnswerCache.load(tmp_path / "cn.json", LOG, min_interval=0)
    async with FakeCoordinator(key) as coord:  # it signs nothing
        with pytest.raises(ZoneError) as err:
            await lookup_placement(coord.url, VM, tmp_path / "cn_key", other, cache)
        assert err.value.code == "UntrustedResponse"
    assert cache.placement(VM) is None and not (tmp_path / "cn.json").exists()


async def test_zone_client_answers_from_the_file_and_pauses_after_a_failure(
        tmp_path: Path) -> None:
    key = _key(tmp_path / "zone_key")
    path = tmp_path / "zone.json"
    async with FakeCoordinator(key) as coord:
        client = CoordinatorClient(coord.url, Signer.load(tmp_path / "zone_key"),
                                   cache=AnswerCache.load(path, LOG, min_interval=0))
        assert await client.placement(VM) == (A, B)
        await client.close()
        coord.down = True
        # A restarted zone: the file's answer, though the coordinator says 503.
        restarted = CoordinatorClient(coord.url, Signer.load(tmp_path / "zone_key"),
                                      cache=AnswerCache.load(path, LOG, min_interval=0))
        got = await restarted.lookup(VM, fresh=True)
        assert got == VmPlacement((A, B), frozenset({A, B}))
        coord.down = False
        coord.pair = [A, C]
        # Within RETRY_AFTER of the failure: not asked, the cache answers at once.
        assert await restarted.placement(VM, fresh=True) == (A, B)
        await restarted.close()


def test_snapper_push_with_no_coordinator_and_no_cache_is_placement_unknown(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI: a clear typed error, exit 1, nothing guessed and nothing written."""
    _key(tmp_path / "cn_key")
    conf = tmp_path / "cn.toml"
    conf.write_text(f'coordinator_url = "http://127.0.0.1:{free_port()}"\n'
                    'key = "cn_key"\nstate_dir = "state"\n')
    assert cn_main(["--config", str(conf), "push", VM]) == 1
    err = capsys.readouterr().err
    assert "PlacementUnknown" in err and "has not seen its placement" in err
    assert not (tmp_path / "state").exists()


def test_cn_config_state_dir_must_be_a_path(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "cn.toml"
    conf.write_text('coordinator_url = "http://c:1"\nkey = "k"\nstate_dir = ""\n')
    assert cn_main(["--config", str(conf), "push", VM]) == 2
    assert "state_dir: must be a non-empty string" in capsys.readouterr().err


async def test_a_hung_coordinator_costs_a_zone_one_bounded_wait_then_probes(
        tmp_path: Path) -> None:
    """It accepts connections and never answers (a stopped process): the first
    lookup waits the call's timeout, the next ones answer from the cache at
    once or after a one-second probe."""
    _key(tmp_path / "zone_key")
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/v1/placement/{vm}", hang)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    cache = AnswerCache(None, LOG)
    cache.put_placement(VM, {"zones": [A, B], "scope": [A, B]})
    client = CoordinatorClient(f"http://127.0.0.1:{port}", Signer.load(tmp_path / "zone_key"),
                               cache=cache)
    loop = asyncio.get_running_loop()
    try:
        t0 = loop.time()
        assert await client.placement(VM, fresh=True) == (A, B)
        first = loop.time() - t0
        t1 = loop.time()
        for _ in range(20):
            assert await client.placement(VM, fresh=True) == (A, B)
        rest = loop.time() - t1
        assert first < 6.5, f"first lookup took {first:.1f} s"
        assert rest < 2.5, f"20 more lookups took {rest:.1f} s"
    finally:
        release.set()
        await client.close()
        await runner.cleanup()
