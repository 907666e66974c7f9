"""JSON text from a client, parsed with bounds: one place for every request body.

``json.loads`` recurses once per nesting level, so a body of a few kilobytes
of ``[[[[...`` raises RecursionError (a crash, not a refusal). ``loads``
turns that, and any nesting beyond ``MAX_DEPTH``, into ``InvalidJson``.
"""

from __future__ import annotations

import json
from typing import Any

from snapper_zone.errors import SnapperError

__all__ = ["MAX_DEPTH", "InvalidJson", "loads"]

MAX_DEPTH = 64  # far beyond any document of ours or a VM's metadata


class InvalidJson(SnapperError, ValueError):
    """A request body that is not bounded JSON."""

    code = "InvalidArgument"
    http_status = 422


def loads(text: str | bytes, what: str = "the body") -> Any:
    """Parse ``text``; ``InvalidJson`` if it is not JSON or nests beyond MAX_DEPTH."""
    try:
        doc = json.loads(text)
    except RecursionError:
        raise InvalidJson(f"{what} nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise InvalidJson(f"{what} is not JSON: {exc}") from None
    if depth(doc) > MAX_DEPTH:
        raise InvalidJson(f"{what} nests deeper than {MAX_DEPTH} levels")
    return doc


def depth(doc: Any) -> int:
    """How deeply ``doc`` nests (a scalar is 0), without recursion."""
    deepest = 0
    todo: list[tuple[Any, int]] = [(doc, 0)]
    while todo:
        node, d = todo.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            d += 1
            deepest = max(deepest, d)
            if d > MAX_DEPTH:
                break
            todo.extend((child, d) for child in node)
    return deepest
