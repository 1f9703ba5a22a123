"""An order-independent digest of one tenant's decision-relevant rows.

Definition (a SQL version computes the same value from the tables at one snapshot):

1. For every row of every table below that belongs to the tenant, form one line:
   `entity || '|' || field1 || '|' || field2 ...`, where the fields are the row's
   columns in this order (`pdp.engine.rows.COLUMNS`):

       tenants           id
       users             tenant_id, id, status
       groups            tenant_id, id
       group_members     tenant_id, group_id, user_id
       roles             tenant_id, id
       role_inherits     tenant_id, role_id, inherits_id
       role_permissions  tenant_id, role_id, permission
       user_roles        tenant_id, user_id, role_id, scope, expires_at
       group_roles       tenant_id, group_id, role_id, scope, expires_at

   A NULL field is the empty string. `expires_at` is written as the integer number
   of microseconds since 1970-01-01 00:00:00 UTC, in decimal without padding
   (Python `str(int(round(x * 1_000_000)))` of the epoch seconds `x`; SQL
   `(extract(epoch FROM expires_at) * 1000000)::bigint::text`). So a tenant's line is
   `tenants|<id>` and a user's is `users|<tenant_id>|<id>|<status>`.
2. Each line's value is the first 16 hex digits of the MD5 of its UTF-8 bytes, read
   as an unsigned 64-bit integer (SQL: `('x' || left(md5(line), 16))::bit(64)`,
   taken as unsigned, e.g. via numeric: add 2^64 when the bigint is negative).
3. digest = (sum of the line values mod 2^64) as 16 lowercase hex digits, then `:`,
   then the number of lines in decimal. A tenant with no rows is `0000000000000000:0`.

Equal digests mean (up to MD5 collisions) the same multiset of rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from hashlib import md5

from pdp.engine.grants import Grant, iter_grants
from pdp.engine.tenant import TenantState

_MASK = (1 << 64) - 1


def render_expiry(expires: float | None) -> str:
    """An expires_at field as it appears in a digest line."""
    return "" if expires is None else str(round(expires * 1_000_000))


def line_value(line: str) -> int:
    """One line's contribution: the first 64 bits of its MD5, unsigned."""
    return int(md5(line.encode(), usedforsecurity=False).hexdigest()[:16], 16)


def digest_lines(lines: Iterator[str]) -> str:
    """Combine lines as the module docstring defines."""
    total = 0
    n = 0
    for line in lines:
        total += line_value(line)
        n += 1
    return f"{total & _MASK:016x}:{n}"


def _grant_line(entity: str, tenant: str, holder: str, grant: Grant) -> str:
    role, scope, expires = grant
    return f"{entity}|{tenant}|{holder}|{role}|{scope}|{render_expiry(expires)}"


def tenant_lines(state: TenantState) -> Iterator[str]:
    """Every digest line of the rows the engine holds for this tenant."""
    if state.exists:
        yield f"tenants|{state.tenant_id}"
    yield from _user_lines(state)
    yield from _group_lines(state)
    yield from _role_lines(state)


def _user_lines(state: TenantState) -> Iterator[str]:
    t = state.tenant_id
    for uid, (status, grants, groups) in state.users.items():
        if status is not None:
            yield f"users|{t}|{uid}|{status}"
        for grant in iter_grants(grants):
            yield _grant_line("user_roles", t, uid, grant)
        for gid in groups:
            yield f"group_members|{t}|{gid}|{uid}"


def _group_lines(state: TenantState) -> Iterator[str]:
    t = state.tenant_id
    for gid in state.groups:
        yield f"groups|{t}|{gid}"
    for gid, index in state.group_grants.items():
        for grant in iter_grants(index):
            yield _grant_line("group_roles", t, gid, grant)


def _role_lines(state: TenantState) -> Iterator[str]:
    t = state.tenant_id
    graph = state.roles
    for role in graph.roles:
        yield f"roles|{t}|{role}"
    for role, inherits in graph.edges.items():
        for target in inherits:
            yield f"role_inherits|{t}|{role}|{target}"
    for role, perms in graph.perms.items():
        for perm in perms:
            yield f"role_permissions|{t}|{role}|{perm}"


def digest(state: TenantState | None) -> str:
    """The digest of a tenant's rows (of no rows when `state` is None)."""
    return digest_lines(tenant_lines(state) if state is not None else iter(()))
