"""The in-process contenders: pdp's engine, OPA's Rego engine, Cedar and pycasbin.

Each `build_*` takes the `Dataset` and returns an `InProcess` whose `check(query)`
answers with the peer's own evaluation. What each encoding resolves itself and what
it cannot express is in `HOW` (printed in the report and the README):

- **pdp**: `Engine.build` over the rows `pdp seed` would load.
- **OPA** (Rego via `opa_bindings`, OPA's Go library): the rows as they are, as
  `data.pdp` documents; the policy does everything at query time (groups folded in,
  expiry against `input.now`, scope match, `graph.reachable` over `inherits`, the
  four permission patterns). Nothing is precomputed.
- **Cedar** (cedarpy): the hierarchy does groups and inheritance. `User` is `in`
  its `Group`s and in one `RoleAt::"role@scope"` per direct assignment, a group in
  one per group assignment; `RoleAt::"R@S"` is `in` `RoleAt::"P@S"` for every role
  P that R inherits. Each scope (`Scope::"document:5"`, `"document:*"`, `"*"`)
  carries one tag per role held there, pointing at its `RoleAt`. One policy per
  role that holds permissions: `action in` its permissions (actions form groups:
  `document:read` in `document:*` and `*:read`, both in `*:*`), and
  `principal in` the role's `RoleAt` tag of the resource's scope, of its type or of
  the tenant. The request names the resource's type and tenant scopes in `context`.
  Cannot express: expiry (a condition on one edge of the hierarchy; static policies
  per expiring assignment would make every check linear in them).
- **pycasbin**: RBAC with domains, the domain being the assignment's scope:
  `g, user, role, scope`, `g, group, role, scope`, and per scope a group holds a
  role at, `g, member, group, scope` and the inheritance edges its roles reach
  (`g, role, parent, scope`); `g2, user, active`; `p, role, type, action` per grant
  (`*` for wildcards). The matcher asks the three scopes of the resource. The name and
  domain matching functions are None (pycasbin's domain manager otherwise gives every
  domain an equality lambda, making each added link scan the domain's roles: the
  `*` domain's graph never finishes building). Cannot express here: expiry
  (pycasbin's conditional role managers take a condition function per link; not
  wired up).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests.peers.dataset import Dataset, Query

HOW = {
    "pdp": "its own engine over the seed rows (precomputed transitive grants, per-user"
    " assignments with groups folded in)",
    "OPA": "the rows as data documents; Rego resolves groups, expiry, scope,"
    " inheritance (graph.reachable) and wildcards per query",
    "Cedar": "entity hierarchy: user in groups and in RoleAt(role@scope), RoleAt in the"
    " RoleAt of inherited roles; scopes tag their RoleAt per role; one policy per role;"
    " expiry not expressible",
    "pycasbin": "RBAC with domains (domain = scope), inheritance and membership links"
    " per scope; g2 for active users; expiry not expressed",
    "Cerbos": "stateless: the request carries the user's assignments (direct and through"
    " its groups, looked up by the harness); derived roles do scope, expiry and"
    " inheritance in CEL, resource policies the wildcards",
}


@dataclass
class InProcess:
    """One engine in this process: `check` answers a query; `cannot_express` names
    the query sets (`dataset.query_sets`) left out for it."""

    name: str
    check: Callable[[Query], bool]
    cannot_express: tuple[str, ...] = ()
    build_s: float = 0.0


# --- pdp -----------------------------------------------------------------------------


def build_pdp(data: Dataset) -> InProcess:
    from pdp.engine import Engine, Snapshot  # noqa: PLC0415

    engine = Engine.build(data.rows, Snapshot(1, 1))
    tenant, now, check = data.tenant, data.now, engine.check

    def answer(q: Query) -> bool:
        return check(tenant, q.user, q.rtype, q.rid, q.action, now).allowed

    return InProcess("pdp", answer)


# --- OPA -----------------------------------------------------------------------------

REGO = """
package pdp

import rego.v1

default allow := false

allow if {
	user := data.pdp.users[input.user]
	user.active
	some a in array.concat(user.roles, [g |
		some group in user.groups
		some g in data.pdp.groups[group]
	])
	live(a)
	a.scope in {"*", concat(":", [input.type, "*"]), concat(":", [input.type, input.id])}
	some role in graph.reachable(data.pdp.inherits, {a.role})
	some granted in data.pdp.grants[role]
	granted in {
		concat(":", [input.type, input.action]), concat(":", [input.type, "*"]),
		concat(":", ["*", input.action]), "*:*",
	}
}

live(a) if not a.expires
live(a) if a.expires > input.now
"""


def opa_data(data: Dataset) -> dict[str, Any]:
    """`data.pdp`: users (active, groups, direct assignments), groups' assignments,
    each role's directly inherited roles and own permissions."""

    def grants(rows: tuple[tuple[str, str, float | None], ...]) -> list[dict[str, Any]]:
        return [
            {"role": r, "scope": s, **({"expires": e} if e is not None else {})} for r, s, e in rows
        ]

    return {
        "users": {
            user: {
                "active": active,
                "groups": list(data.groups_of.get(user, ())),
                "roles": grants(data.user_roles.get(user, ())),
            }
            for user, active in data.active.items()
        },
        "groups": {g: grants(rows) for g, rows in data.group_roles.items()},
        "inherits": {r: list(p) for r, p in data.inherits.items()},
        "grants": {r: list(p) for r, p in data.grants.items()},
    }


def build_opa(data: Dataset) -> InProcess:
    from opa_bindings import OpaEngine  # noqa: PLC0415 -- installed by loadtests.peers

    engine = OpaEngine()
    engine.add_policy("pdp.rego", REGO)
    engine.add_data(opa_data(data), path="pdp")
    evaluate, now = engine.eval_document, data.now

    def answer(q: Query) -> bool:
        given = {"user": q.user, "type": q.rtype, "id": q.rid, "action": q.action, "now": now}
        return evaluate("pdp.allow", given) is True

    check = InProcess("OPA", answer)
    check.engine = engine  # type: ignore[attr-defined]  # keep the Go engine alive
    return check


# --- Cedar ---------------------------------------------------------------------------


def _uid(kind: str, ident: str) -> dict[str, str]:
    return {"type": kind, "id": ident}


def _ref(kind: str, ident: str) -> dict[str, dict[str, str]]:
    return {"__entity": _uid(kind, ident)}


def cedar_tag(role: str) -> str:
    return role


def cedar_entities(data: Dataset) -> list[dict[str, Any]]:
    """Users, groups, RoleAt nodes (with the inheritance edges), scopes with their
    role tags, and the action groups; every assignment without its expiry."""
    role_at: dict[str, set[str]] = {}  # "R@S" -> parents

    def node(role: str, scope: str) -> dict[str, str]:
        key = f"{role}@{scope}"
        if key not in role_at:
            role_at[key] = {f"{p}@{scope}" for p in data.inherits[role]}
            for parent in data.inherits[role]:
                node(parent, scope)
        return _uid("RoleAt", key)

    out: list[dict[str, Any]] = []
    for user, active in data.active.items():
        parents = [_uid("Group", g) for g in data.groups_of.get(user, ())]
        parents += [node(r, s) for r, s, _ in data.user_roles.get(user, ())]
        out.append({"uid": _uid("User", user), "attrs": {"active": active}, "parents": parents})
    for group, rows in data.group_roles.items():
        out.append({"uid": _uid("Group", group), "attrs": {},
                    "parents": [node(r, s) for r, s, _ in rows]})  # fmt: skip
    tags: dict[str, dict[str, Any]] = {}
    for key, inherited in role_at.items():
        out.append({"uid": _uid("RoleAt", key), "attrs": {},
                    "parents": [_uid("RoleAt", p) for p in sorted(inherited)]})  # fmt: skip
        role, _, scope = key.partition("@")
        tags.setdefault(scope, {})[cedar_tag(role)] = _ref("RoleAt", key)
    out += [
        {"uid": _uid("Scope", scope), "attrs": {}, "parents": [], "tags": held}
        for scope, held in tags.items()
    ]
    out += list(_cedar_actions(data))
    return out


def _cedar_actions(data: Dataset) -> Iterator[dict[str, Any]]:
    for rtype in data.types:
        for action in data.actions:
            parents = [_uid("Action", f"{rtype}:*"), _uid("Action", f"*:{action}")]
            yield {"uid": _uid("Action", f"{rtype}:{action}"), "attrs": {}, "parents": parents}
    for group in [f"{t}:*" for t in data.types] + [f"*:{a}" for a in data.actions]:
        yield {"uid": _uid("Action", group), "attrs": {}, "parents": [_uid("Action", "*:*")]}
    yield {"uid": _uid("Action", "*:*"), "attrs": {}, "parents": []}


def cedar_policies(data: Dataset) -> str:
    """One policy per role that holds permissions itself."""
    out = []
    for role, permissions in sorted(data.grants.items()):
        if not permissions:
            continue
        actions = ", ".join(f'Action::"{p}"' for p in permissions)
        tag = json.dumps(cedar_tag(role))
        held = " ||\n    ".join(
            f"({where}.hasTag({tag}) && principal in {where}.getTag({tag}))"
            for where in ("resource", "context.type", "context.root")
        )
        out.append(
            f"@id({json.dumps(role)})\npermit(principal, action in [{actions}], resource)\n"
            f"when {{ principal.active && (\n    {held}) }};"
        )
    return "\n\n".join(out) + "\n"


def cedar_request(q: Query) -> dict[str, Any]:
    return {
        "principal": f'User::"{q.user}"',
        "action": f'Action::"{q.rtype}:{q.action}"',
        "resource": f'Scope::"{q.rtype}:{q.rid}"',
        "context": {"type": _ref("Scope", f"{q.rtype}:*"), "root": _ref("Scope", "*")},
    }


def build_cedar(data: Dataset) -> InProcess:
    import cedarpy  # noqa: PLC0415 -- the peers extra

    policies = cedarpy.PolicySet.from_str(cedar_policies(data))
    entities = cedarpy.Entities.from_json_str(json.dumps(cedar_entities(data)))
    authorize = cedarpy.is_authorized

    def answer(q: Query) -> bool:
        return bool(authorize(cedar_request(q), policies, entities).allowed)

    return InProcess("Cedar", answer, cannot_express=("expiry",))


# --- pycasbin ------------------------------------------------------------------------

CASBIN_MODEL = """
[request_definition]
r = sub, rtype, rid, act

[policy_definition]
p = role, rtype, act

[role_definition]
g = _, _, _
g2 = _, _

[policy_effect]
e = some(where (p.eft == allow))

[matchers]
m = g2(r.sub, "active") && (p.rtype == r.rtype || p.rtype == "*") \
&& (p.act == r.act || p.act == "*") \
&& (g(r.sub, p.role, "*") || g(r.sub, p.role, r.rtype + ":*") \
|| g(r.sub, p.role, r.rtype + ":" + r.rid))
"""


def casbin_policy(data: Dataset) -> Iterator[str]:
    """The CSV policy lines (every assignment without its expiry)."""
    for role, permissions in sorted(data.grants.items()):
        for permission in permissions:
            rtype, _, action = permission.partition(":")
            yield f"p, {role}, {rtype}, {action}"
    edges: set[tuple[str, str, str]] = set()  # (role, parent, scope)

    def inherit(role: str, scope: str) -> None:
        for parent in data.inherits[role]:
            if (role, parent, scope) not in edges:
                edges.add((role, parent, scope))
                inherit(parent, scope)

    members: dict[str, list[str]] = {}
    for user, groups in data.groups_of.items():
        for group in groups:
            members.setdefault(group, []).append(user)
    for user, active in data.active.items():
        if active:
            yield f"g2, {user}, active"
        for role, scope, _ in data.user_roles.get(user, ()):
            yield f"g, {user}, {role}, {scope}"
            inherit(role, scope)
    for group, rows in data.group_roles.items():
        for scope in sorted({s for _, s, _ in rows}):
            for user in members.get(group, ()):
                yield f"g, {user}, {group}, {scope}"
        for role, scope, _ in rows:
            yield f"g, {group}, {role}, {scope}"
            inherit(role, scope)
    for role, parent, scope in sorted(edges):
        yield f"g, {role}, {parent}, {scope}"


def build_casbin(data: Dataset, workdir: Path | None = None) -> InProcess:
    import casbin  # noqa: PLC0415 -- the peers extra

    with tempfile.TemporaryDirectory(prefix="pdp-peers-casbin-", dir=workdir) as tmp:
        model, policy = Path(tmp) / "model.conf", Path(tmp) / "policy.csv"
        model.write_text(CASBIN_MODEL)
        policy.write_text("\n".join(casbin_policy(data)) + "\n")
        enforcer = casbin.Enforcer(str(model), str(policy))
    # No pattern matching of names or domains: pycasbin's domain manager otherwise
    # hands every domain's role manager an equality lambda as its matching function,
    # and with one set each new link is compared with every role of the domain, so
    # building a large domain's role graph (scope `*`) is quadratic and never ends.
    enforcer.add_named_matching_func("g", None)
    enforcer.add_named_domain_matching_func("g", None)
    enforce = enforcer.enforce

    def answer(q: Query) -> bool:
        return bool(enforce(q.user, q.rtype, q.rid, q.action))

    return InProcess("pycasbin", answer, cannot_express=("expiry",))


# --- floors: the bindings' own cost per call -------------------------------------------


def build_floors(built: list[InProcess]) -> list[InProcess]:
    """For OPA and Cedar, the same call with a policy that allows everything and no
    data: what the binding costs per check before any evaluation (timed beside the
    engines, never held to the answers)."""
    names = {engine.name for engine in built}
    floors = []
    if "OPA" in names:
        from opa_bindings import OpaEngine  # noqa: PLC0415

        opa = OpaEngine()
        opa.add_policy("floor.rego", "package floor\n\nallow := true\n")

        def opa_floor(q: Query) -> bool:
            given = {"user": q.user, "type": q.rtype, "id": q.rid, "action": q.action}
            return opa.eval_document("floor.allow", given) is True

        floor = InProcess("OPA floor", opa_floor)
        floor.engine = opa  # type: ignore[attr-defined]  # keep the Go engine alive
        floors.append(floor)
    if "Cedar" in names:
        import cedarpy  # noqa: PLC0415

        policies = cedarpy.PolicySet.from_str("permit(principal, action, resource);")
        entities = cedarpy.Entities.from_json_str("[]")

        def cedar_floor(q: Query) -> bool:
            return bool(cedarpy.is_authorized(cedar_request(q), policies, entities).allowed)

        floors.append(InProcess("Cedar floor", cedar_floor))
    return floors
