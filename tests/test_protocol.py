"""The SSH command grammar: parse and format are inverse; anything else is refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapper_zone.errors import InvalidName, SnapperError
from snapper_zone.wire import protocol
from snapper_zone.wire.protocol import (
    Abort,
    BadCommand,
    Command,
    Commit,
    Delete,
    Destroy,
    Features,
    Metadata,
    Ping,
    Receive,
    ResumeToken,
    Send,
    Snapshots,
    Whoami,
    format_command,
    parse,
)
from snapper_zone.zfs.zfs import STREAM_FEATURES

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,20}", fullmatch=True).filter(
    lambda s: ".." not in s)
vms = st.uuids().map(str)
commands: st.SearchStrategy[Command] = st.one_of(
    st.builds(Receive, vms, names, names, st.none() | names,
              st.none() | st.integers(0, 2**62), st.booleans(), st.booleans()),
    st.builds(Receive, vms, names, names, st.none() | names,
              st.none() | st.integers(0, 2**62), st.booleans(), st.just(False),
              st.integers(0, 2**62)),
    st.builds(Send, vms, names, names, st.none() | names,
              st.frozensets(st.sampled_from(STREAM_FEATURES))),
    st.builds(ResumeToken, vms, names),
    st.builds(Abort, vms, names),
    st.builds(Snapshots, vms),
    st.builds(Commit, vms, names, st.lists(names, min_size=1, max_size=4, unique=True)
              .map(tuple), st.sampled_from([None, *protocol.DURABILITIES])),
    st.builds(Metadata, vms, names),
    st.builds(Delete, vms, names),
    st.builds(Destroy, vms, names),
    st.builds(lambda vm, snap, ds, g: Destroy(vm, snap, ds, g),
              vms, names, names, st.integers(0, 2**64 - 1)),
    st.just(Ping()),
    st.just(Features()),
    st.just(Whoami()),
)


@given(commands)
def test_format_then_parse_is_identity(cmd: Command) -> None:
    assert parse(format_command(cmd)) == cmd


@given(st.text(max_size=200))
def test_any_line_parses_or_is_refused_with_a_typed_error(line: str) -> None:
    try:
        cmd = parse(line)
    except (BadCommand, InvalidName) as err:
        assert err.to_json()["code"] in ("BadCommand", "InvalidArgument")
        return
    assert parse(format_command(cmd)) == cmd


VM = "0b4f5a3c-1f2e-4d3c-9b8a-7f6e5d4c3b2a"


@pytest.mark.parametrize("line", [
    "", "shell", "receive", f"receive {VM} disk0", f"receive {VM} ../x s1",
    f"receive {VM} disk0 s1 --from", f"receive {VM} disk0 s1 --size -5",
    f"receive {VM} disk0 s1 --force", f"receive {VM} disk0 s1 --from a --from b",
    f"send {VM.upper()} disk0 s1", f"send {VM} disk0 $(id)", f"commit {VM} s1 a,a",
    f"delete {VM} s1; rm -rf /", "ping extra", "x" * 5000, "features extra",
    f"send {VM} disk0 s1 --accept", f"send {VM} disk0 s1 --accept raw,dedup",
    f"send {VM} disk0 s1 --accept raw --accept compressed",
    f"receive {VM} disk0 s1 --bind", f"receive {VM} disk0 s1 --bind -1",
    f"receive {VM} disk0 s1 --bind x", f"receive {VM} disk0 s1 --session --bind 3",
    "whoami me",
])
def test_bad_lines_refused(line: str) -> None:
    with pytest.raises(SnapperError):
        parse(line)


def test_error_line_round_trip() -> None:
    line = protocol.error_line(BadCommand("nope"))
    assert protocol.parse_error_line("noise\n" + line) == ("BadCommand", "nope")
    assert protocol.parse_error_line("plain text")[0] == "RemoteError"


@pytest.mark.parametrize("line", [
    "commit 6b0e0f7c-1c0a-4bde-9a3e-6a3f4c4f9e11 s1 root --durability twice",
    "destroy 6b0e0f7c-1c0a-4bde-9a3e-6a3f4c4f9e11 s1 --dataset root",
    "destroy 6b0e0f7c-1c0a-4bde-9a3e-6a3f4c4f9e11 s1 --guid 12",
    "destroy 6b0e0f7c-1c0a-4bde-9a3e-6a3f4c4f9e11 s1 --dataset root --guid -3",
])
def test_replication_options_are_checked(line: str) -> None:
    with pytest.raises(BadCommand):
        parse(line)
