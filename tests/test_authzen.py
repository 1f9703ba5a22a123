"""The pure AuthZEN layer: parsing, defaults, paging tokens; and what it must not import."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdp import protocol
from pdp.errors import RequestError
from pdp.protocol import Batch, Page, Query


def _evaluation(**extra: Any) -> dict[str, Any]:
    return {
        "subject": {"type": "user", "id": "u1"},
        "action": {"name": "read"},
        "resource": {"type": "doc", "id": "d1"},
        **extra,
    }


def test_parse_evaluation() -> None:
    body = _evaluation()
    body["subject"]["properties"] = {"tenant": "t9", "role": "admin"}
    assert protocol.parse_evaluation(body, None) == Query("t9", "user", "u1", "doc", "d1", "read")
    assert protocol.parse_evaluation(_evaluation(), "dflt").tenant == "dflt"


def test_batch_entries_replace_defaults_whole() -> None:
    body = _evaluation(
        evaluations=[
            {},
            {"subject": {"type": "user", "id": "u2", "properties": {"tenant": "t2"}}},
            {"resource": {"type": "doc"}},
        ],
        options={"evaluations_semantic": "deny_on_first_deny"},
    )
    parsed = protocol.parse_evaluations(body, "t", max_batch=10)
    assert isinstance(parsed, Batch)
    assert parsed.semantic == "deny_on_first_deny"
    first, second, third = parsed.entries
    assert first == Query("t", "user", "u1", "doc", "d1", "read")
    assert second == Query("t2", "user", "u2", "doc", "d1", "read")
    assert isinstance(third, RequestError)
    assert third.field == "evaluations[2].resource.id"


def test_empty_batch_is_one_query() -> None:
    assert isinstance(protocol.parse_evaluations(_evaluation(evaluations=[]), "t", 5), Query)
    assert isinstance(protocol.parse_evaluations(_evaluation(), "t", 5), Query)


@pytest.mark.parametrize(
    ("semantic", "allowed", "stops"),
    [
        ("execute_all", False, False),
        ("execute_all", True, False),
        ("deny_on_first_deny", False, True),
        ("deny_on_first_deny", True, False),
        ("permit_on_first_permit", True, True),
        ("permit_on_first_permit", False, False),
    ],
)
def test_stops_after(semantic: str, allowed: bool, stops: bool) -> None:
    assert protocol.stops_after(semantic, allowed) is stops


def test_page_token_round_trip_and_binding() -> None:
    body = {"subject": {"type": "user", "id": "u"}, "action": {"name": "r"},
            "resource": {"type": "doc"}}  # fmt: skip
    first = protocol.parse_resource_search(body, "t").page
    assert first == Page(0, protocol.DEFAULT_PAGE_LIMIT, first.fingerprint)
    token = protocol.page_token(40, first.fingerprint)
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    again = protocol.parse_resource_search({**body, "page": {"token": token, "limit": 7}}, "t")
    assert (again.page.offset, again.page.limit) == (40, 7)
    # The searched-for id is ignored by the search, so it may change between pages.
    moved = {**body, "resource": {"type": "doc", "id": "x"}, "page": {"token": token}}
    assert protocol.parse_resource_search(moved, "t").page.offset == 40
    with pytest.raises(RequestError) as caught:
        protocol.parse_resource_search({**body, "context": {"a": 1}, "page": {"token": token}}, "t")
    assert caught.value.field == "page.token"
    forged = protocol.page_token(-5, first.fingerprint)
    with pytest.raises(RequestError):
        protocol.parse_resource_search({**body, "page": {"token": forged}}, "t")


def test_paged() -> None:
    page = Page(offset=3, limit=2, fingerprint="f")
    results, meta = protocol.paged(tuple("abcdef"), page, lambda x: {"id": x})
    assert results == [{"id": "d"}, {"id": "e"}]
    assert meta["count"] == 2
    assert meta["total"] == 6
    assert meta["next_token"] == protocol.page_token(5, "f")
    results, meta = protocol.paged(tuple("abcdef"), Page(5, 2, "f"), lambda x: {"id": x})
    assert (results, meta["next_token"]) == ([{"id": "f"}], "")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
ENTITY_KEYS = st.sampled_from(
    ["subject", "action", "resource", "context", "evaluations", "options", "page", "type", "id",
     "name", "properties", "tenant", "token", "limit", "evaluations_semantic"]
)  # fmt: skip
shaped = st.recursive(
    json_values,
    lambda inner: st.dictionaries(ENTITY_KEYS, inner, max_size=5) | st.lists(inner, max_size=3),
    max_leaves=20,
)


REQUEST_MEMBERS = {"subject", "action", "resource", "context", "evaluations", "options", "page"}


@settings(max_examples=300, deadline=None)
@given(body=st.dictionaries(ENTITY_KEYS, shaped, max_size=6))
def test_parsers_raise_only_request_error(body: dict[str, Any]) -> None:
    """Whatever the JSON, a parser returns a value or raises RequestError (a 400), never else."""
    parsers: list[Callable[[], object]] = [
        lambda: protocol.parse_evaluation(body, "t"),
        lambda: protocol.parse_evaluations(body, "t", 5),
        lambda: protocol.parse_subject_search(body, None),
        lambda: protocol.parse_resource_search(body, "t"),
        lambda: protocol.parse_action_search(body, "t"),
    ]
    for parse in parsers:
        try:
            parse()
        except RequestError as exc:
            error = exc
        else:
            continue
        # The 400 names the offending part of the (object) body.
        assert error.field is not None, error.message
        assert re.split(r"[.\[]", error.field)[0] in REQUEST_MEMBERS, error.field
        assert error.message


def _loads_aiohttp(module: str) -> bool:
    code = f"import sys, {module}; print('aiohttp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {"True": True, "False": False}[out.stdout.strip()]


@pytest.mark.parametrize("module", ["pdp.protocol", "pdp.metrics"])
def test_no_aiohttp_import(module: str) -> None:
    """The sync workers import these: they must not drag in the web framework."""
    assert _loads_aiohttp(module) is False
    assert _loads_aiohttp("pdp.web.app") is True  # the probe does see it when loaded
