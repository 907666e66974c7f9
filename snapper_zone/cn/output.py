"""What ``snapper push`` prints when it is done, from the push's JSON document:
the same whether this process pushed or a running agent did (``cn/control.py``).
Light: the standard library and the byte formatter only."""

from __future__ import annotations

import json
from typing import Any

from snapper_zone.common.progress import format_bytes

__all__ = ["show_push"]


def show_push(doc: dict[str, Any], as_json: bool) -> None:
    """Print a push's result: the document itself with ``--json``, else for people."""
    if as_json:
        print(json.dumps({k: v for k, v in doc.items() if k != "not_included"}))
        return
    zones = doc.get("zones") or []
    copies = len(zones)
    print(f"pushed {doc['vm']}@{doc['snapshot']} ({format_bytes(doc['bytes'])}, "
          f"metadata: {doc['metadata']}); durability {doc.get('durability') or 'n/a'}: "
          f"{copies} cop{'y' if copies == 1 else 'ies'} on {', '.join(zones) or '?'}")
    for d in doc.get("datasets") or []:
        base = f" from {d['base']}" if d.get("base") else ""
        how = f" ({', '.join(d['options'])})" if d.get("options") else ""
        print(f"  {d['label']:<12} {d['action']}{base}{how}  {format_bytes(d['bytes'])}")
    if doc.get("not_included"):
        print(f"  not included (below a child dataset): {', '.join(doc['not_included'])}")
    if doc.get("carried"):
        print(f"  also committed (earlier snapshots sent with it, durability local): "
              f"{', '.join(doc['carried'])}")
