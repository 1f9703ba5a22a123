"""The typed fast path of one evaluation: the same Query as the general parser for the
common shape, and None (the general parser answers, with its messages) for the rest."""

from __future__ import annotations

import json

import pytest

from pdp import protocol
from pdp.protocol import decode_evaluation, parse_evaluation, parse_evaluations

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


# --- batches ---------------------------------------------------------------------------

READ = {"name": "read"}
DOC = {"type": "document", "id": "42"}
ALICE = {"type": "user", "id": "alice"}


@pytest.mark.parametrize(
    "body",
    [
        {"subject": ALICE, "evaluations": [{"action": READ, "resource": DOC}] * 3},
        {"evaluations": [COMMON, {**COMMON, "subject": {"type": "user", "id": "bob"}}]},
        # The subject (and the action) once at the top, in each combination with entries
        # that name their own.
        {"subject": ALICE, "action": READ, "evaluations": [{"resource": DOC}] * 3},
        {
            "subject": ALICE,
            "action": READ,
            "evaluations": [{"resource": DOC}, {"resource": DOC, "action": {"name": "write"}}],
        },
        {
            "subject": ALICE,
            "evaluations": [
                {"action": READ, "resource": DOC},
                {**COMMON, "subject": {"type": "user", "id": "bob"}},
            ],
        },
        {  # an entry's key replaces the default whole
            "subject": ALICE,
            "action": READ,
            "resource": DOC,
            "evaluations": [
                {},
                {"action": {"name": "write"}},
                {"resource": {"type": "f", "id": "1"}},
            ],
        },
    ],
)
def test_a_common_batch_decodes_to_the_general_parsers_batch(body: dict[str, object]) -> None:
    batch = protocol.decode_evaluations(_raw(body), "t1", 100)
    assert batch is not None
    assert batch == parse_evaluations(protocol.loads(_raw(body)), "t1", 100)
    assert all(entry.facts() is None for entry in batch.entries)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "body",
    [
        {"subject": ALICE, "evaluations": []},  # no entries: one evaluation
        {"subject": ALICE, "evaluations": [{"action": READ, "resource": DOC}] * 101},  # too many
        {"subject": ALICE, "evaluations": [{"action": READ}]},  # no resource anywhere
        {"subject": ALICE, "evaluations": [{"action": READ, "resource": DOC}, {"resource": DOC}]},
        {"subject": None, "evaluations": [COMMON]},  # null is not absent
        {"evaluations": [{**COMMON, "subject": None}]},
        {"evaluations": [COMMON], "options": {"include_reasons": True}},
        {"evaluations": [{**COMMON, "context": {"ip": "10.0.0.1"}}]},
        {"evaluations": [COMMON], "context": {}},
        {"evaluations": [{**COMMON, "resource": {**DOC, "properties": {"level": 1}}}]},
        {"evaluations": [{**COMMON, "resource": {"type": "document", "id": "a\x00"}}]},
        {"evaluations": [{**COMMON, "action": {"name": ""}}]},
        {"evaluations": [COMMON, 7]},
        {"evaluations": {"0": COMMON}},
    ],
)
def test_any_other_batch_is_left_to_the_general_parser(body: dict[str, object]) -> None:
    assert protocol.decode_evaluations(_raw(body), "t1", 100) is None


def test_a_batch_without_a_default_tenant_is_left_to_the_general_parser() -> None:
    assert protocol.decode_evaluations(_raw({"evaluations": [COMMON]}), None, 100) is None
