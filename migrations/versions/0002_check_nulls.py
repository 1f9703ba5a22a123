"""pdp.check and pdp.explain deny when any argument is NULL.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

In 0001 a NULL resource id matched a `*` scope and a NULL action matched `type:*`
or `*:*` grants, so `pdp.check('acme', 'alice', 'document', NULL, 'read')` was true.
A NULL is an unknown: fail closed. Same bodies otherwise; the shared fragments come
from revision 0001, which is frozen.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from pdp.migrations.replaceable import ReplaceableObject, replace

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_v1 = importlib.import_module("pdp.migrations.versions.0001_schema")

_NO_NULLS = "num_nulls(p_tenant_id, p_user_id, p_resource_type, p_resource_id, p_action, p_at) = 0"

CHECK = ReplaceableObject(
    _v1.CHECK.name,
    _v1.CHECK.create.replace(
        f"SELECT coalesce({_v1._ACTIVE_USER}", f"SELECT coalesce({_NO_NULLS} AND {_v1._ACTIVE_USER}"
    ),
    _v1.CHECK.drop,
)

EXPLAIN = ReplaceableObject(
    _v1.EXPLAIN.name,
    _v1.EXPLAIN.create.replace(
        f"      AND {_v1._ACTIVE_USER}", f"      AND {_v1._ACTIVE_USER}\n      AND {_NO_NULLS}"
    ),
    _v1.EXPLAIN.drop,
)

assert CHECK.create != _v1.CHECK.create, "0001's pdp.check body no longer has the expected shape"
assert EXPLAIN.create != _v1.EXPLAIN.create, (
    "0001's pdp.explain body no longer has the expected shape"
)


def upgrade() -> None:
    replace(CHECK, _v1.CHECK)
    replace(EXPLAIN, _v1.EXPLAIN)


def downgrade() -> None:
    replace(_v1.CHECK, CHECK)
    replace(_v1.EXPLAIN, EXPLAIN)
