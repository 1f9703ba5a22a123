"""The typed fast path of one evaluation: the same Query as the general parser for the
common shape, and None (the general parser answers, with its messages) for the rest."""

from __future__ import annotations

import json

import pytest

from pdp import protocol
from pdp.protocol import decode_evaluation, parse_evaluation

pytestmark = pytest.mark.skipif(not protocol.TYPED, reason="msgspec is not installed")

COMMON = {
    "subject": {"type": "user", "id": "alice"},
    "action": {"name": "read"},
    "resource": {"type": "document", "id": "42"},
}


def _raw(body: object) -> bytes:
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    "body",
    [
        COMMON,
        {**COMMON, "subject": {"type": "identity", "id": "é" * 256}},
        {"resource": COMMON["resource"], "action": COMMON["action"], "subject": COMMON["subject"]},
    ],
)
def test_the_common_shape_decodes_to_the_general_parsers_query(body: dict[str, object]) -> None:
    query = decode_evaluation(_raw(body), "t1")
    assert query is not None
    assert query == parse_evaluation(protocol.loads(_raw(body)), "t1")
    assert query.facts() is None


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[]",
        b"{",
        b'{"subject": 1}',
        _raw({**COMMON, "context": {}}),  # a context: conditions may read it
        _raw({**COMMON, "subject": {**COMMON["subject"], "properties": {"tenant": "t2"}}}),
        _raw({**COMMON, "resource": {**COMMON["resource"], "properties": {"level": 1}}}),
        _raw({**COMMON, "extra": 1e308}),  # unknown member: the general parser decides
        _raw({**COMMON, "subject": {"type": "user", "id": ""}}),
        _raw({**COMMON, "subject": {"type": "user", "id": "x" * 257}}),
        _raw({**COMMON, "subject": {"type": "user", "id": "a\x00b"}}),
        _raw({**COMMON, "action": {"name": ""}}),  # every id is bounded, not only the user's
        _raw({**COMMON, "resource": {"type": "document", "id": "9" * 257}}),
        _raw({**COMMON, "resource": {"type": "do\x00c", "id": "1"}}),
        _raw({**COMMON, "subject": {"type": "user", "id": 7}}),
        _raw({"subject": COMMON["subject"], "action": COMMON["action"]}),
        _raw(COMMON)[:-1] + b"} x",
    ],
)
def test_anything_else_is_left_to_the_general_parser(raw: bytes) -> None:
    assert decode_evaluation(raw, "t1") is None


def test_without_a_default_tenant_the_general_parser_answers() -> None:
    assert decode_evaluation(_raw(COMMON), None) is None
