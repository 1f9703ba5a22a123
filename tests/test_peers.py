"""The peer comparison's harness (`loadtests.peers`) without the peers: the dataset and
query generation, the naive reference rule against pdp's engine, the query sets a peer
may be excused from, the agreement check (it must catch a wrong engine), and the
encodings' generated policy text. The peers themselves run by hand:
`python -m loadtests.peers` (see loadtests/README.md); where cedarpy or pycasbin
happen to be installed, they are held to the reference on a small dataset too."""

from __future__ import annotations

import importlib
import json
from dataclasses import replace

import pytest

from loadtests.peers import cerbos, engines
from loadtests.peers.dataset import (
    UNKNOWN_EVERY,
    Dataset,
    Query,
    check_agreement,
    expiry_dependent,
    features,
    from_rows,
    generate,
    make_queries,
    query_sets,
    reference,
)
from pdp.engine import Engine, Row, Snapshot

NOW = 1_767_225_600.0  # 2026-01-01


@pytest.fixture(scope="module")
def data() -> Dataset:
    return generate(600)


@pytest.fixture(scope="module")
def queries(data: Dataset) -> list[Query]:
    return make_queries(data, 1200)


def _pdp(data: Dataset) -> engines.InProcess:
    return engines.build_pdp(data)


def tiny() -> Dataset:
    """alice: editor on document:1 directly (editor inherits viewer: document:read);
    bob: viewer on everything through group g, and an expired approver grant;
    carol: disabled admin; dave: a reader whose `*:read` expires after NOW."""
    rows: dict[str, list[Row]] = {
        "tenants": [("t",)],
        "users": [("t", u, "disabled" if u == "carol" else "active")
                  for u in ("alice", "bob", "carol", "dave")],
        "groups": [("t", "g")],
        "group_members": [("t", "g", "bob")],
        "roles": [("t", r) for r in ("viewer", "editor", "admin", "approver", "reader")],
        "role_inherits": [("t", "editor", "viewer"), ("t", "admin", "editor")],
        "role_permissions": [
            ("t", "viewer", "document:read"), ("t", "editor", "document:write"),
            ("t", "admin", "*:*"), ("t", "approver", "invoice:approve"),
            ("t", "reader", "*:read"),
        ],
        "user_roles": [
            ("t", "alice", "editor", "document:1", None),
            ("t", "bob", "approver", "invoice:*", NOW - 60),
            ("t", "carol", "admin", "*", None),
            ("t", "dave", "reader", "*", NOW + 60),
        ],
        "group_roles": [("t", "g", "viewer", "*", None)],
    }  # fmt: skip
    return from_rows("t", NOW, rows, resource_ids=10, types=("document", "invoice"),
                     actions=("read", "write", "approve"))  # fmt: skip


TINY_CASES = [
    (Query("alice", "document", "1", "read"), True, {"inherited", "scope:id"}),
    (Query("alice", "document", "1", "write"), True, {"scope:id"}),
    (Query("alice", "document", "2", "read"), False, {"deny"}),
    (Query("bob", "document", "7", "read"), True, {"group", "scope:*"}),
    (Query("bob", "invoice", "3", "approve"), False, {"deny"}),
    (Query("carol", "document", "1", "read"), False, {"deny", "disabled"}),
    (Query("dave", "invoice", "4", "read"), True, {"scope:*", "wildcard permission", "expiring"}),
    (Query("nobody", "document", "1", "read"), False, {"deny", "unknown user"}),
]


@pytest.mark.parametrize(("query", "allowed", "tags"), TINY_CASES)
def test_reference_rule_and_features(query: Query, allowed: bool, tags: set[str]) -> None:
    small = tiny()
    assert reference(small, query) is allowed
    assert features(small, query) == tags
    engine = Engine.build(small.rows, Snapshot(1, 1))
    decision = engine.check("t", query.user, query.rtype, query.rid, query.action, NOW)
    assert decision.allowed is allowed


def test_expiry_dependent_queries() -> None:
    small = tiny()
    # bob's approver grant expired: with it treated as permanent he would be allowed.
    assert expiry_dependent(small, Query("bob", "invoice", "3", "approve"))
    # dave's live reader grant decides his read.
    assert expiry_dependent(small, Query("dave", "invoice", "4", "read"))
    assert not expiry_dependent(small, Query("alice", "document", "1", "read"))
    assert not expiry_dependent(small, Query("dave", "invoice", "4", "write"))
    queries = [Query("bob", "invoice", "3", "approve"), Query("alice", "document", "1", "read")]
    assert query_sets(small, queries) == {"expiry": frozenset({0})}


def test_dataset_is_deterministic_and_complete(data: Dataset) -> None:
    again = generate(600)
    assert again.rows == data.rows
    assert set(data.grants) == set(data.inherits)
    assert all(role in data.reach[role] for role in data.grants)
    assert all(p in data.grants for parents in data.inherits.values() for p in parents)
    assert sum(map(len, data.user_roles.values())) == len(data.rows["user_roles"])
    assert any(e is not None for grants in data.user_roles.values() for _, _, e in grants)


def test_moving_now_keeps_every_answer(data: Dataset, queries: list[Query]) -> None:
    moved = generate(600, now=NOW + 300 * 86400)
    assert moved.now == NOW + 300 * 86400
    assert [reference(moved, q) for q in queries] == [reference(data, q) for q in queries]


def test_queries(data: Dataset, queries: list[Query]) -> None:
    assert make_queries(data, 1200) == queries
    assert len(queries) == 1200
    unknown = [q for q in queries if q.user not in data.active]
    assert len(unknown) == 1200 // UNKNOWN_EVERY
    scoped = sum(1 for q in queries[::2] if (q.rtype, q.rid) in data.scoped_resources(q.user))
    assert scoped > 0.8 * 600  # even draws name a held resource when the user holds one
    assert {q.action for q in queries} == set(data.actions)
    assert 0.05 < sum(reference(data, q) for q in queries) / len(queries) < 0.95


def test_pdp_agrees_with_the_reference(data: Dataset, queries: list[Query]) -> None:
    expected = [reference(data, q) for q in queries]
    result = check_agreement("pdp", _pdp(data).check, queries, expected)
    assert result.ok, result.disagreements[:5]
    assert result.agreed == len(queries)


def test_agreement_catches_a_wrong_engine(data: Dataset, queries: list[Query]) -> None:
    """An engine that forgets groups must disagree; excluded queries are not asked;
    an engine that raises is a disagreement with the error, never a skip."""
    expected = [reference(data, q) for q in queries]
    no_groups = replace(data, groups_of={})
    wrong = check_agreement("no groups", lambda q: reference(no_groups, q), queries, expected)
    assert not wrong.ok
    assert wrong.disagreements
    assert all(d.expected and d.answered is False for d in wrong.disagreements)
    via_group = {d.index for d in wrong.disagreements}
    excused = check_agreement(
        "no groups", lambda q: reference(no_groups, q), queries, expected, excluded=via_group
    )
    assert excused.ok
    assert (excused.asked, excused.excluded) == (len(queries) - len(via_group), len(via_group))

    def broken(q: Query) -> bool:
        raise RuntimeError("engine down")

    failed = check_agreement("broken", broken, queries[:3], expected[:3])
    assert [d.answered for d in failed.disagreements] == ["RuntimeError: engine down"] * 3
    assert "DISAGREES on 3" in failed.line()
    assert not check_agreement("none", broken, [], []).ok  # nothing asked proves nothing


def test_cerbos_policies_and_bodies() -> None:
    small = tiny()
    files = cerbos.policies(small)
    derived = json.loads(files["derived_roles.yaml"])["derivedRoles"]["definitions"]
    by_name = {d["name"]: d["condition"]["match"]["expr"] for d in derived}
    # viewer's grants reach holders of viewer, editor and admin.
    assert '["admin", "editor", "viewer"]' in by_name["has_viewer"]
    document = json.loads(files["resource_document.yaml"])["resourcePolicy"]
    rules = {r["actions"][0]: set(r["derivedRoles"]) for r in document["rules"]}
    assert rules["read"] == {"has_viewer", "has_admin", "has_reader"}
    assert rules["write"] == {"has_editor", "has_admin"}
    assert "approve" in {r["actions"][0] for r in json.loads(
        files["resource_invoice.yaml"])["resourcePolicy"]["rules"]}  # fmt: skip
    sent = json.loads(cerbos.body(small, Query("bob", "invoice", "3", "approve")))
    attr = sent["principal"]["attr"]
    assert attr["active"] is True
    assert attr["now"] == NOW
    assert {"role": "viewer", "scope": "*"} in attr["assignments"]  # through group g
    assert {"role": "approver", "scope": "invoice:*", "exp": NOW - 60} in attr["assignments"]
    assert cerbos.allowed(b'{"results":[{"actions":{"read":"EFFECT_ALLOW"}}]}', "read")
    assert not cerbos.allowed(b'{"results":[{"actions":{"read":"EFFECT_DENY"}}]}', "read")


def test_casbin_and_cedar_encodings() -> None:
    small = tiny()
    lines = set(engines.casbin_policy(small))
    assert "p, admin, *, *" in lines
    assert "g, alice, editor, document:1" in lines
    assert "g, editor, viewer, document:1" in lines  # inheritance, in the scope it is used
    assert "g, bob, g, *" in lines  # membership, in each scope the group holds a role at
    assert "g2, carol, active" not in lines
    entities = {(e["uid"]["type"], e["uid"]["id"]): e for e in engines.cedar_entities(small)}
    assert {"type": "RoleAt", "id": "viewer@document:1"} in (
        entities[("RoleAt", "editor@document:1")]["parents"])  # fmt: skip
    assert entities[("Scope", "*")]["tags"]["viewer"] == {
        "__entity": {"type": "RoleAt", "id": "viewer@*"}}  # fmt: skip
    assert ("Action", "*:*") in entities
    policy = engines.cedar_policies(small)
    assert policy.count("permit(") == 5
    assert 'action in [Action::"*:*"]' in policy


@pytest.mark.parametrize("name", ["Cedar", "pycasbin"])
def test_installed_peers_agree_on_a_small_dataset(
    name: str, data: Dataset, queries: list[Query]
) -> None:
    importlib.import_module({"Cedar": "cedarpy", "pycasbin": "casbin"}[name])  # in the test extra
    build = {"Cedar": engines.build_cedar, "pycasbin": engines.build_casbin}[name]
    peer = build(data)
    expected = [reference(data, q) for q in queries]
    excluded = query_sets(data, queries)["expiry"]
    result = check_agreement(name, peer.check, queries[:400], expected[:400],
                             {i for i in excluded if i < 400})  # fmt: skip
    assert result.ok, result.disagreements[:5]
