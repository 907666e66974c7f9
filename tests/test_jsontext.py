"""Bounded JSON parsing (``wire.jsontext``): pure, no I/O."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapper_zone.wire import jsontext

scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=5)
documents = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3)
                         | st.dictionaries(st.text(max_size=3), kids, max_size=3),
                         max_leaves=20)


def _nest(n: int, inner: Any = 1) -> Any:
    for _ in range(n):
        inner = [inner]
    return inner


@given(documents)
def test_documents_within_the_bound_parse_as_json_does(doc: Any) -> None:
    text = json.dumps(doc)
    assert jsontext.depth(doc) <= jsontext.MAX_DEPTH
    assert jsontext.loads(text) == json.loads(text)


@given(st.integers(min_value=0, max_value=3 * jsontext.MAX_DEPTH))
def test_depth_is_the_nesting_and_the_bound_is_exact(n: int) -> None:
    doc = _nest(n)
    assert jsontext.depth(doc) == min(n, jsontext.MAX_DEPTH + 1)
    if n <= jsontext.MAX_DEPTH:
        assert jsontext.loads(json.dumps(doc)) == doc
    else:
        with pytest.raises(jsontext.InvalidJson, match="nests deeper"):
            jsontext.loads(json.dumps(doc))


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"a":' * 3000 + "1" + "}" * 3000])
def test_nesting_that_would_recurse_out_is_refused(text: str) -> None:
    with pytest.raises(jsontext.InvalidJson, match="nests deeper"):
        jsontext.loads(text)


@pytest.mark.parametrize("text", ["", "{", "nope", b"\xff\xfe"])
def test_not_json_is_refused(text: str | bytes) -> None:
    with pytest.raises(jsontext.InvalidJson) as info:
        jsontext.loads(text, "metadata")
    assert info.value.code == "InvalidArgument" and "metadata" in info.value.message
