"""``snapper``: the one command for compute nodes and operators.

The CN's commands (``push``, ``restore``, ``list``: ``cn/cli.py``), the
operator's (``zones``, ``zone``, ``rebalance``, ``status``: ``rebalance/cli.py``)
and ``demo`` (``fleet/demo.py``). This module sits on top: it is the only one
that imports all three.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from rebalance import cli as coordinator_cli
from snapper_zone.cn import cli as cn_cli
from snapper_zone.fleet import demo

__all__ = ["main"]


def _more(sub: Any) -> None:
    demo_p = sub.add_parser("demo", help="run a local fleet of zones on file-backed pools "
                            "and show the whole mission, narrated (no CN settings needed)")
    demo.add_arguments(demo_p)
    demo_p.set_defaults(standalone=demo.run)
    coordinator_cli.register(sub, _config_coordinator_url)


def _config_coordinator_url(args: argparse.Namespace) -> str | None:
    """The operator commands' last resort: ``coordinator_url`` of snapper's config
    file (the CN's: ``--config``, ``$SNAPPER_CN_CONFIG``, or the default path)."""
    path = cn_cli.config_path(args)
    url = None if path is None else cn_cli.load_cn_config(path).get("coordinator_url")
    return None if url is None else str(url)


def main(argv: Sequence[str] | None = None) -> int:
    return cn_cli.main(argv, _more)


if __name__ == "__main__":
    sys.exit(main())
