"""``snapper``'s CN commands start without the operator's and the demo's modules
(aiohttp, a local fleet), nor the zone's receive path, the agent or the archive
code, and the program leaves without the interpreter's teardown: a push's
start-up and exit are part of every push's time (bench/cn_path.py)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from snapper_zone import cli
from snapper_zone.cn import cli as cn_cli

VM = "3f0c9a52-7d1e-4b6a-8c2d-5e4f3a2b1c0d"


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def test_the_lists_name_every_command_once() -> None:
    every = _commands(cn_cli.build_parser(cli._more))
    assert cli.CN_COMMANDS == _commands(cn_cli.build_parser(None))
    assert cli.OTHER_COMMANDS == every - cli.CN_COMMANDS
    assert not cli.CN_COMMANDS & cli.OTHER_COMMANDS


@pytest.mark.parametrize(("argv", "lean"), [
    (["push", VM], True),
    (["--zone", "h:1", "--key", "k", "restore", VM, "s1"], True),
    (["push", VM, "--name", "status"], False),  # more imported than needed: still right
    (["list"], True),
    (["cn", "list"], False),  # the operator's cn list: "list" is its action
    (["policy", "list"], False),
    (["--help", "push"], False),  # snapper's own help lists every command
    (["push", "--help"], True),
    ([], False),
    (["--version"], False),
    (["status"], False),
    (["demo"], False),
])
def test_cn_only(argv: list[str], lean: bool) -> None:
    assert cli.cn_only(argv) is lean


# What a push does not need: the operator's commands, the demo, and the zone's
# side (its receive path pulls in prometheus_client), the agent, the archive.
OPERATOR = ("aiohttp", "rebalance.cli", "snapper_zone.fleet.demo")
HEAVY = (*OPERATOR, "prometheus_client", "snapper_zone.transfer.local",
         "snapper_zone.cn.agent", "snapper_zone.cn.archive")


def _imports_after(argv: list[str]) -> set[str]:
    code = ("import sys, contextlib, io\n"
            "from snapper_zone.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    main({argv!r})\n"
            f"print(' '.join(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    return set(done.stdout.split())


def test_a_cn_command_imports_neither_aiohttp_nor_the_operators_commands() -> None:
    assert _imports_after(["push", "--help"]) == set()
    # The full command still has the operator's.
    assert set(OPERATOR) <= _imports_after(["--help"])


@pytest.mark.parametrize(("argv", "status", "out", "err"), [
    (["--version"], 0, "snapper ", ""),
    (["push"], 2, "", "the following arguments are required: VM_UUID"),
    (["--zone", "127.0.0.1:1", "--key", "/nonexistent/key", "list", VM], 2, "",
     "/nonexistent/key"),
])
def test_the_program_exits_with_mains_status_and_says_everything(
        argv: list[str], status: int, out: str, err: str) -> None:
    # The program skips the interpreter's teardown (cli.run): its status and
    # every line it printed still arrive, through pipes as a caller sees them.
    done = subprocess.run([sys.executable, "-m", "snapper_zone.cli", *argv],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == status, done.stderr
    assert done.stdout.startswith(out) and err in done.stderr
