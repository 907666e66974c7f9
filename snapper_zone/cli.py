"""``snapper``: the one command for compute nodes and operators.

The CN's commands (``push``, ``restore``, ``list``: ``cn/cli.py``), the
operator's (``zones``, ``zone``, ``rebalance``, ``status``: ``rebalance/cli.py``)
and ``demo`` (``fleet/demo.py``). This module sits on top: it is the only one
that imports all three.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

__all__ = ["main", "run"]

# The CN's commands need neither the operator's (aiohttp) nor the demo's (a
# whole local fleet): a command line that names one of them and nothing else
# leaves those modules unimported, a third of a push's start-up. Anything else
# (another command, none, help first) gets every command.
CN_COMMANDS = frozenset({"push", "restore", "export", "import", "agent", "list"})
OTHER_COMMANDS = frozenset({"demo", "zones", "zone", "rebalance", "moves", "transfers",
                            "status", "cn", "vm", "grant", "policy"})


def _more(sub: Any) -> None:
    from rebalance import cli as coordinator_cli
    from snapper_zone.fleet import demo

    demo_p = sub.add_parser("demo", help="run a local fleet of zones on file-backed pools "
                            "and show the whole mission, narrated (no CN settings needed)")
    demo.add_arguments(demo_p)
    demo_p.set_defaults(standalone=demo.run)
    coordinator_cli.register(sub, _config_coordinator_url)


def _config_coordinator_url(args: argparse.Namespace) -> str | None:
    """The operator commands' last resort: ``coordinator_url`` of snapper's config
    file (the CN's: ``--config``, ``$SNAPPER_CN_CONFIG``, or the default path)."""
    from snapper_zone.cn.options import config_path, load_cn_config

    path = config_path(args)
    url = None if path is None else load_cn_config(path).get("coordinator_url")
    return None if url is None else str(url)


def cn_only(argv: Sequence[str]) -> bool:
    """Whether ``argv`` can only be one of the CN's commands (see CN_COMMANDS)."""
    for a in argv:
        if a in ("-h", "--help", "--version"):
            return False
        if a in CN_COMMANDS:
            return not any(b in OTHER_COMMANDS for b in argv)
    return False


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if cn_only(args):
        # A running agent takes a push with its client started and logged in:
        # this process then needs neither asyncssh nor the CN client (cn/handoff.py).
        from snapper_zone.cn.handoff import push_via_agent

        try:
            status = push_via_agent(args)
        except KeyboardInterrupt:
            print("snapper: interrupted", file=sys.stderr)
            return 130
        if status is not None:
            return status
    from snapper_zone.cn import cli as cn_cli

    return cn_cli.main(args, None if cn_only(args) else _more)


def run() -> NoReturn:
    """The ``snapper`` program: ``main``, then out without the interpreter's teardown.

    Tearing down asyncssh's and cryptography's ~600 modules takes ~50 ms, a
    tenth of a small push, and buys nothing at the end of a command: every
    file and connection is closed by the command itself, so only the standard
    streams and the log handlers are left to flush. (``main`` returns
    normally, for callers in a process that goes on, such as the tests.)
    """
    status = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to say there
            status = status or 1
    os._exit(status)


if __name__ == "__main__":
    run()
