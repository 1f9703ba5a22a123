"""Policy as code: one tenant's roles, grants, groups and users as a YAML (or JSON) document.

    tenant: acme
    roles:                          # always managed: roles not listed are deleted
      viewer:
        description: reads documents
        permissions: [document:read]
      editor:
        inherits: [viewer]
        permissions:
          - document:write
          - {permission: document:delete, condition: 'action.properties.mode == "soft"'}
    groups:                         # managed when present (absent: left as they are)
      eng:
        members: [carol]
        roles: [{role: viewer}]     # scope '*' unless given; expires_at optional
    users:                          # managed when present
      alice:
        status: active              # the default
        attributes: {email: alice@acme.test}
        roles: [{role: editor, scope: "document:roadmap"}]

`plan` compares the document with the database (a `State`: each table's rows by key),
`Plan.effect` says which users gain or lose which permissions, `export` writes a state
back in the same form, so export -> apply changes nothing. Pure: no I/O; errors name
the document position (`FILE:LINE:COLUMN: roles.editor.permissions[1]: ...`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import yaml

from pdp.conditions import validate
from pdp.errors import UserError

Key = tuple[str, ...]
Rows = dict[Key, dict[str, Any]]
State = dict[str, Rows]

# Tables a document manages, parents first; which section manages each.
SECTIONS: dict[str, tuple[str, ...]] = {
    "roles": ("roles", "role_inherits", "role_permissions"),
    "groups": ("groups", "group_members", "group_roles"),
    "users": ("users", "user_roles"),
}
ORDER = ("users", "groups", "group_members", "roles", "role_inherits", "role_permissions",
         "user_roles", "group_roles")  # fmt: skip
KEYS: dict[str, tuple[str, ...]] = {
    "users": ("id",), "groups": ("id",), "group_members": ("group_id", "user_id"),
    "roles": ("id",), "role_inherits": ("role_id", "inherits_id"),
    "role_permissions": ("role_id", "permission"), "user_roles": ("user_id", "role_id", "scope"),
    "group_roles": ("group_id", "role_id", "scope"),
}  # fmt: skip
FIELDS: dict[str, tuple[str, ...]] = {
    "users": ("status", "attributes"), "groups": ("description",), "roles": ("description",),
    "user_roles": ("expires_at",), "group_roles": ("expires_at",),
    "role_permissions": ("condition",),
}  # fmt: skip


DEFAULTS: dict[str, Any] = {
    "status": "active",
    "attributes": {},
    "description": "",
    "expires_at": None,
    "condition": None,
}


class PolicyError(UserError):
    """A document that cannot be applied; the message starts with its position."""


# --- reading a document with positions --------------------------------------------------


@dataclass
class _Doc:
    source: str
    marks: dict[str, tuple[int, int]] = field(default_factory=dict)  # where each value starts
    keys: dict[str, tuple[int, int]] = field(default_factory=dict)  # where each key is

    def fail(self, path: str, message: str, *, at_key: bool = False) -> PolicyError:
        line, column = (self.keys if at_key else self.marks).get(path, (0, 0))
        where = f"{self.source}:{line}:{column}" if line else self.source
        return PolicyError(f"{where}: {path or 'document'}: {message}")


def _value(node: yaml.Node, path: str, doc: _Doc) -> Any:
    doc.marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if not isinstance(key_node, yaml.ScalarNode) or key in out:
                raise doc.fail(path, f"duplicate or non-text key {key!r}")
            child = f"{path}.{key}" if path else key
            doc.keys[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[key] = _value(value_node, child, doc)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_value(n, f"{path}[{i}]", doc) for i, n in enumerate(node.value)]
    return yaml.safe_load(yaml.serialize(node))  # the scalar, typed as safe_load types it


def parse(text: str, source: str = "policy") -> tuple[dict[str, Any], _Doc]:
    doc = _Doc(source)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise PolicyError(f"{where}: not YAML: {getattr(exc, 'problem', exc)}") from None
    if node is None:
        raise PolicyError(f"{source}: empty document")
    value = _value(node, "", doc)
    if not isinstance(value, dict):
        raise doc.fail("", "must be a mapping with tenant and roles")
    return value, doc


# --- document -> desired state ----------------------------------------------------------


def _text(value: object, path: str, doc: _Doc, *, allow_empty: bool = False) -> str:
    if (
        isinstance(value, str)
        and (allow_empty or value)
        and len(value) <= 256
        and "\x00" not in value
    ):
        return value
    raise doc.fail(path, "must be a non-empty string of at most 256 characters")


def _mapping(value: object, path: str, doc: _Doc) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise doc.fail(path, "must be a mapping")
    return value


def _list(value: object, path: str, doc: _Doc) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise doc.fail(path, "must be a list")
    return value


def _only(value: dict[str, Any], allowed: tuple[str, ...], path: str, doc: _Doc) -> None:
    for key in value:
        if key not in allowed:
            where = f"{path}.{key}" if path else key
            raise doc.fail(where, f"unknown key (allowed: {', '.join(allowed)})", at_key=True)


def timestamp(value: object) -> str | None:
    """A time as the state holds it: ISO 8601 in UTC, or None."""
    if value is None:
        return None
    stamp = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if stamp.tzinfo is None:
        raise ValueError("needs a UTC offset")
    return stamp.astimezone(UTC).isoformat()


def _assignments(value: object, path: str, doc: _Doc) -> Iterator[tuple[str, str, str | None]]:
    for i, item in enumerate(_list(value, path, doc)):
        where = f"{path}[{i}]"
        entry = {"role": item} if isinstance(item, str) else _mapping(item, where, doc)
        _only(entry, ("role", "scope", "expires_at"), where, doc)
        role = _text(entry.get("role"), f"{where}.role", doc)
        scope = _text(entry.get("scope", "*"), f"{where}.scope", doc)
        try:
            expires = timestamp(entry.get("expires_at"))
        except ValueError as exc:
            raise doc.fail(
                f"{where}.expires_at", f"not an ISO 8601 time with offset ({exc})"
            ) from None
        yield role, scope, expires


def desired(value: dict[str, Any], doc: _Doc, tenant: str | None = None) -> tuple[str, State]:
    """The tenant a document names and the rows of the tables it manages."""
    _only(value, ("tenant", "roles", "groups", "users"), "", doc)
    named = value.get("tenant")
    if named is None and tenant is None:
        raise doc.fail("", "names no tenant (add 'tenant: T')")
    if named is not None:
        named = _text(named, "tenant", doc)
        if tenant is not None and named != tenant:
            raise doc.fail("tenant", f"is {named!r}, not {tenant!r}")
    if "roles" not in value:
        raise doc.fail("", "has no 'roles' section (it may be empty: 'roles: {}')")
    state: State = _roles(_mapping(value["roles"], "roles", doc), doc)
    if "groups" in value:
        state |= _groups(_mapping(value["groups"], "groups", doc), doc)
    if "users" in value:
        state |= _users(_mapping(value["users"], "users", doc), doc)
    return named or str(tenant), state


def _description(spec: dict[str, Any], where: str, doc: _Doc) -> dict[str, Any]:
    text = _text(spec.get("description", ""), f"{where}.description", doc, allow_empty=True)
    return {"description": text}


def _roles(section: dict[str, Any], doc: _Doc) -> State:
    roles: Rows = {}
    inherits: Rows = {}
    grants: Rows = {}
    for role, raw in section.items():
        where = f"roles.{role}"
        _text(role, where, doc)
        spec = _mapping(raw, where, doc)
        _only(spec, ("description", "inherits", "permissions"), where, doc)
        roles[(role,)] = _description(spec, where, doc)
        for i, parent in enumerate(_list(spec.get("inherits"), f"{where}.inherits", doc)):
            inherits[(role, _text(parent, f"{where}.inherits[{i}]", doc))] = {}
        for i, item in enumerate(_list(spec.get("permissions"), f"{where}.permissions", doc)):
            grant = _grant(item, f"{where}.permissions[{i}]", doc)
            grants[(role, grant[0])] = {"condition": grant[1]}
    return {"roles": roles, "role_inherits": inherits, "role_permissions": grants}


def _grant(item: object, where: str, doc: _Doc) -> tuple[str, str | None]:
    """`document:read`, or `{permission: document:edit, condition: CEL}`."""
    entry = {"permission": item} if isinstance(item, str) else _mapping(item, where, doc)
    _only(entry, ("permission", "condition"), where, doc)
    path = where if isinstance(item, str) else f"{where}.permission"
    text = _text(entry.get("permission"), path, doc)
    if ":" not in text:
        raise doc.fail(path, "must be type:action ('*' for any)")
    condition = entry.get("condition")
    if condition is not None:
        if not isinstance(condition, str):
            raise doc.fail(f"{where}.condition", "must be a CEL expression (a string)")
        problem = validate(condition)
        if problem is not None:
            raise doc.fail(f"{where}.condition", f"does not compile: {problem}")
    return text, condition


def _groups(section: dict[str, Any], doc: _Doc) -> State:
    groups: Rows = {}
    members: Rows = {}
    held: Rows = {}
    for group, raw in section.items():
        where = f"groups.{group}"
        spec = _mapping(raw, where, doc)
        _only(spec, ("description", "members", "roles"), where, doc)
        groups[(group,)] = _description(spec, where, doc)
        for i, user in enumerate(_list(spec.get("members"), f"{where}.members", doc)):
            members[(group, _text(user, f"{where}.members[{i}]", doc))] = {}
        for role, scope, expires in _assignments(spec.get("roles"), f"{where}.roles", doc):
            held[(group, role, scope)] = {"expires_at": expires}
    return {"groups": groups, "group_members": members, "group_roles": held}


def _users(section: dict[str, Any], doc: _Doc) -> State:
    users: Rows = {}
    held: Rows = {}
    for user, raw in section.items():
        where = f"users.{user}"
        spec = _mapping(raw, where, doc)
        _only(spec, ("status", "attributes", "roles"), where, doc)
        status = spec.get("status", "active")
        if status not in ("active", "disabled"):
            raise doc.fail(f"{where}.status", "must be active or disabled")
        attributes = spec.get("attributes", {})
        if not isinstance(attributes, dict):
            raise doc.fail(f"{where}.attributes", "must be a mapping")
        users[(user,)] = {"status": status, "attributes": attributes}
        for role, scope, expires in _assignments(spec.get("roles"), f"{where}.roles", doc):
            held[(user, role, scope)] = {"expires_at": expires}
    return {"users": users, "user_roles": held}


# --- the plan ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    op: str  # "create" | "update" | "delete"
    table: str
    key: Key
    fields: dict[str, Any]

    def line(self) -> str:
        sign = {"create": "+", "update": "~", "delete": "-"}[self.op]
        shown = ", ".join(f"{c}={v!r}" for c, v in zip(KEYS[self.table], self.key, strict=True))
        fields = {k: v for k, v in self.fields.items() if self.op == "update" or v != DEFAULTS[k]}
        extra = " " + json.dumps(fields, sort_keys=True) if fields and self.op != "delete" else ""
        return f"{sign} {self.table} {shown}{extra}"


@dataclass(frozen=True, slots=True)
class Plan:
    tenant: str
    changes: tuple[Change, ...]
    before: State
    after: State

    def effect(self, now: datetime | None = None) -> list[str]:
        """'+ user permission on scope' / '- ...' for every effective grant gained or lost."""
        at = (now or datetime.now(UTC)).isoformat()
        old, new = effective(self.before, at), effective(self.after, at)
        lines = []
        for user in sorted(old.keys() | new.keys()):
            was, will = old.get(user, set()), new.get(user, set())
            lines += [f"+ {user} {p} on {s}" for p, s in sorted(will - was)]
            lines += [f"- {user} {p} on {s}" for p, s in sorted(was - will)]
        return lines

    def ordered(self) -> list[Change]:
        """Deletes children first, then creates and updates parents first (foreign keys)."""
        rank = {t: i for i, t in enumerate(ORDER)}
        deletes = sorted(
            (c for c in self.changes if c.op == "delete"), key=lambda c: -rank[c.table]
        )
        rest = sorted((c for c in self.changes if c.op != "delete"), key=lambda c: rank[c.table])
        return [*deletes, *rest]


def plan(tenant: str, current: State, wanted: State) -> Plan:
    changes = []
    after = {t: dict(rows) for t, rows in current.items()}
    for table in ORDER:
        if table not in wanted:
            continue
        have, want = current.get(table, {}), wanted[table]
        changes += [Change("create", table, k, want[k]) for k in sorted(want.keys() - have.keys())]
        changes += [Change("delete", table, k, {}) for k in sorted(have.keys() - want.keys())]
        changes += [
            Change("update", table, k, want[k])
            for k in sorted(want.keys() & have.keys())
            if want[k] != have[k]
        ]
        after[table] = dict(want)
    return Plan(tenant, tuple(changes), current, after)


def effective(state: State, at: str) -> dict[str, set[tuple[str, str]]]:
    """Each active user's (permission, scope) pairs, through groups and inheritance."""
    closure: dict[str, set[str]] = {}

    def reach(role: str, seen: frozenset[str] = frozenset()) -> set[str]:
        if role not in closure:
            found = {role}
            for child, parent in state.get("role_inherits", {}):
                if child == role and parent not in seen:
                    found |= reach(parent, seen | {role})
            closure[role] = found
        return closure[role]

    grants: dict[str, set[str]] = {}
    for (role, permission), fields in state.get("role_permissions", {}).items():
        condition = fields.get("condition")
        shown = permission if condition is None else f"{permission} if {condition}"
        grants.setdefault(role, set()).add(shown)
    members: dict[str, set[str]] = {}
    for group, user in state.get("group_members", {}):
        members.setdefault(user, set()).add(group)

    def live(fields: dict[str, Any]) -> bool:
        expires = fields.get("expires_at")
        return expires is None or expires > at

    out: dict[str, set[tuple[str, str]]] = {}
    for (user,), fields in state.get("users", {}).items():
        if fields.get("status") != "active":
            continue
        assigned = [
            (r, s) for (u, r, s), f in state.get("user_roles", {}).items() if u == user and live(f)
        ]
        for group in members.get(user, ()):
            assigned += [
                (r, s)
                for (g, r, s), f in state.get("group_roles", {}).items()
                if g == group and live(f)
            ]
        pairs = {
            (p, scope)
            for role, scope in assigned
            for r in reach(role)
            for p in grants.get(r, ())
            if _applies(p, scope)
        }
        if pairs:
            out[user] = pairs
    return out


def _applies(permission: str, scope: str) -> bool:
    """Whether a grant can ever allow anything on a scope (`document:x` never on `folder:*`)."""
    ptype = permission.partition(":")[0].partition(" ")[0]
    return scope == "*" or ptype == "*" or scope.partition(":")[0] == ptype


# --- state -> document -----------------------------------------------------------------


def export(tenant: str, state: State) -> str:
    """The document whose plan against `state` is empty."""
    roles: dict[str, Any] = {}
    for (role,), fields in sorted(state.get("roles", {}).items()):
        spec: dict[str, Any] = {}
        if fields.get("description"):
            spec["description"] = fields["description"]
        inherits = sorted(p for (r, p) in state.get("role_inherits", {}) if r == role)
        permissions: list[Any] = [
            p if f.get("condition") is None else {"permission": p, "condition": f["condition"]}
            for (r, p), f in sorted(state.get("role_permissions", {}).items())
            if r == role
        ]
        if inherits:
            spec["inherits"] = inherits
        if permissions:
            spec["permissions"] = permissions
        roles[role] = spec
    doc: dict[str, Any] = {"tenant": tenant, "roles": roles}

    def assignments(rows: Rows, holder: str) -> list[Any]:
        out: list[Any] = []
        for (h, role, scope), fields in sorted(rows.items()):
            if h != holder:
                continue
            entry: dict[str, Any] = {"role": role}
            if scope != "*":
                entry["scope"] = scope
            if fields.get("expires_at") is not None:
                entry["expires_at"] = fields["expires_at"]
            out.append(entry)
        return out

    groups: dict[str, Any] = {}
    for (group,), fields in sorted(state.get("groups", {}).items()):
        spec = {}
        if fields.get("description"):
            spec["description"] = fields["description"]
        members = sorted(u for (g, u) in state.get("group_members", {}) if g == group)
        if members:
            spec["members"] = members
        if held := assignments(state.get("group_roles", {}), group):
            spec["roles"] = held
        groups[group] = spec
    doc["groups"] = groups
    users: dict[str, Any] = {}
    for (user,), fields in sorted(state.get("users", {}).items()):
        spec = {}
        if fields.get("status", "active") != "active":
            spec["status"] = fields["status"]
        if fields.get("attributes"):
            spec["attributes"] = fields["attributes"]
        if held := assignments(state.get("user_roles", {}), user):
            spec["roles"] = held
        users[user] = spec
    doc["users"] = users
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, default_flow_style=False)
