"""The admin API's OpenAPI 3.1 document, built from the same `KINDS` the routes are.

Generated rather than written by hand, so it cannot drift from the routes: every
kind's collection and item paths, their parameters, bodies and answers.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import yaml

from pdp.admin import access_review, audit
from pdp.admin.kinds import KINDS, MAX_ID, Field, Kind

ID: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_ID,
    "pattern": "^[^\\x00]+$",
}
_TYPES: dict[str, dict[str, Any]] = {
    "text": {"type": "string", "pattern": "^[^\\x00]*$"},
    "status": {"type": "string", "enum": ["active", "disabled"]},
    "object": {"type": "object"},
    "timestamp": {"type": "string", "format": "date-time"},
    "condition": {"type": "string", "description": "a CEL expression; compiled on write"},
}
_ERRORS = {
    "400": "malformed request (names the field)",
    "401": "no valid bearer token",
    "403": "the token lacks the scope",
    "404": "no such tenant (or not this token's) or object",
    "409": "already exists",
    "412": "If-Match does not match the current ETag",
    "413": "body too large",
    "415": "not application/json",
    "422": "the data model refuses the value (names the field)",
}
_PATH_PARAM = re.compile(r"{(\w+)}")


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _field(spec: Field) -> dict[str, Any]:
    schema = dict(_TYPES[spec.type])
    if spec.nullable:
        schema = {"anyOf": [schema, {"type": "null"}]}
    return schema


def _row(kind: Kind) -> dict[str, Any]:
    properties: dict[str, Any] = {"tenant_id": ID, **dict.fromkeys(kind.key, ID)}
    properties |= {f.name: _field(f) for f in kind.fields}
    if kind.table == "users":
        properties |= {"created_at": _TYPES["timestamp"], "updated_at": _TYPES["timestamp"]}
    return {"type": "object", "properties": properties, "required": list(properties)}


def _create(kind: Kind) -> dict[str, Any]:
    given = [k for k in kind.key if k not in kind.parent_key]
    properties = dict.fromkeys(given, ID) | {f.name: _field(f) for f in kind.fields}
    defaults = dict(kind.query_defaults)
    required = [k for k in given if k not in defaults]
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


def _errors(*codes: str) -> dict[str, Any]:
    """These answers, and the three any operation can give (bad parameter, token, scope)."""
    return {
        c: {"description": _ERRORS[c], "content": {"application/json": {"schema": _ref("Error")}}}
        for c in sorted({"400", "401", "403", *codes})
    }


def _params(template: str, kind: Kind | None = None, *, item: bool = False) -> list[dict[str, Any]]:
    params = [
        {"name": n, "in": "path", "required": True, "schema": ID}
        for n in _PATH_PARAM.findall(template)
    ]
    if kind is not None and item:
        params += [
            {"name": q, "in": "query", "required": False, "schema": {**ID, "default": "*"}}
            for q in kind.query_key
        ]
    return params


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _ok(schema: dict[str, Any], code: str = "200", description: str = "done") -> dict[str, Any]:
    return {code: {"description": description, "content": {"application/json": {"schema": schema}}}}


def _written(kind: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["revision"],
        "properties": {"revision": {"type": "string"}, "data": _ref(kind)},
    }


_IF_MATCH = {"name": "If-Match", "in": "header", "required": False, "schema": {"type": "string"}}
_PAGE = [
    {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
    },
    {
        "name": "after",
        "in": "query",
        "required": False,
        "schema": {"type": "string"},
        "description": "the 'next' token of the previous page (any other string: 400)",
    },
]


def _kind_paths(kind: Kind, base: str) -> dict[str, Any]:
    collection, item = base + kind.collection, base + kind.item
    filters = [
        {"name": c, "in": "query", "required": False, "schema": ID}
        for c in (*kind.key, *(f.name for f in kind.fields if f.type in ("text", "status")))
        if c not in kind.parent_key
    ]
    listing = {
        "type": "object",
        "required": ["data", "next"],
        "properties": {
            "data": {"type": "array", "items": _ref(kind.name)},
            "next": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
    }
    paths: dict[str, Any] = {
        collection: {
            "parameters": _params(collection),
            "get": {
                "summary": f"list {kind.name}",
                "operationId": f"list_{kind.name}",
                "parameters": [*_PAGE, *filters],
                "responses": {**_ok(listing), **_errors("400", "401", "403", "404")},
            },
            "post": {
                "summary": f"create one of {kind.name}",
                "operationId": f"create_{kind.name}",
                "requestBody": _json_body(_create(kind)),
                "responses": {
                    **_ok(_written(kind.name), "201", "created"),
                    **_errors("400", "401", "403", "404", "409", "413", "415", "422"),
                },
            },
        },
        item: {
            "parameters": _params(item, kind, item=True),
            "get": {
                "summary": f"one of {kind.name}",
                "operationId": f"get_{kind.name}",
                "responses": {
                    **_ok(
                        {
                            "type": "object",
                            "required": ["data"],
                            "properties": {"data": _ref(kind.name)},
                        }
                    ),
                    **_errors("400", "401", "403", "404", "422"),
                },
            },
            "delete": {
                "summary": f"delete one of {kind.name}",
                "operationId": f"delete_{kind.name}",
                "parameters": [_IF_MATCH],
                "responses": {
                    **_ok(_written(kind.name)),
                    **_errors("400", "401", "403", "404", "412", "422"),
                },
            },
        },
    }
    if kind.fields:
        patch = {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": False,
            "properties": {f.name: _field(f) for f in kind.fields},
        }
        paths[item]["patch"] = {
            "summary": f"change one of {kind.name}",
            "operationId": f"update_{kind.name}",
            "parameters": [_IF_MATCH],
            "requestBody": _json_body(patch),
            "responses": {
                **_ok(_written(kind.name)),
                **_errors("400", "401", "403", "404", "412", "413", "415", "422"),
            },
        }
    return paths


_JSONB = {"anyOf": [{"type": "object"}, {"type": "null"}]}
_TEXT_OR_NULL = {"anyOf": [{"type": "string"}, {"type": "null"}]}
_AUDIT_RECORD = {
    "type": "object",
    "required": list(audit.COLUMNS),
    "properties": {
        "id": {"type": "integer"},
        "txid": {"type": "string"},
        "tenant_id": _TEXT_OR_NULL,
        "entity": {"type": "string"},
        "op": {"enum": ["insert", "update", "delete", "truncate", "bulk_load"]},
        "key": _JSONB,
        "old": _JSONB,
        "new": _JSONB,
        "actor": _TEXT_OR_NULL,
        "changed_at": _TYPES["timestamp"],
    },
}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name, "in": "query", "required": False, "schema": schema,
        "description": description,
    }  # fmt: skip


def _compliance_paths(base: str) -> dict[str, Any]:
    moment = {"type": "string", "format": "date-time"}
    listing = {
        "type": "object",
        "required": ["data", "next"],
        "properties": {
            "data": {"type": "array", "items": _ref("audit_record")},
            "next": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
    }
    row = {
        "type": "object",
        "required": list(access_review.COLUMNS),
        "properties": {
            **dict.fromkeys(access_review.COLUMNS, _TEXT_OR_NULL),
            "user_id": {"type": "string"},
            "permission": {"type": "string"},
            "role": {"type": "string"},
            "path": {"type": "string"},
            "scope": {"type": "string"},
            "change": {"enum": ["gained", "lost"]},
        },
    }
    review = {
        "parameters": _params(base),
        "get": {
            "summary": "every user's effective permissions, one row per grant path (streamed)",
            "operationId": "access_review",
            "parameters": [
                _query("at", moment, "a past moment, rebuilt from the change log (default now)"),
                _query("since", moment, "rows gained and lost between this moment and at"),
                _query("format", {"enum": ["json", "jsonl", "csv"], "default": "json"}, "body"),
            ],
            "responses": {
                "200": {
                    "description": "the rows, ordered by user_id, permission, path",
                    "content": {
                        "application/json": {"schema": {"type": "array", "items": row}},
                        "application/x-ndjson": {"schema": row},
                        "text/csv": {"schema": {"type": "string"}},
                    },
                },
                **_errors("400", "401", "403", "404"),
            },
        },
    }
    return {
        base + "/access-review": review,
        "/admin/v1/audit": {
            "get": {
                "summary": "the audit trail: change-log and archive rows in id order",
                "operationId": "audit",
                "parameters": [
                    _query("tenant", ID, "the tenant (a platform token must name it)"),
                    _query("actor", ID, "rows written by this actor"),
                    _query("entity", {"enum": list(audit.ENTITIES)}, "one table's rows"),
                    _query("since", moment, "changed at or after"),
                    _query("until", moment, "changed before"),
                    _query(
                        "txid", {"type": "string", "pattern": "^[0-9]{1,19}$"}, "one transaction"
                    ),
                    _PAGE[0],
                    {**_PAGE[1], "description": "the 'next' of the previous page (an id)"},
                ],
                "responses": {**_ok(listing), **_errors("400", "401", "403", "404")},
            },
        },
    }


def document() -> dict[str, Any]:
    base = "/admin/v1/tenants/{tenant}"
    tenant = {
        "type": "object",
        "required": ["id", "name", "created_at"],
        "properties": {"id": ID, "name": {"type": "string"}, "created_at": _TYPES["timestamp"]},
    }
    operation = {
        "type": "object",
        "required": ["op", "kind"],
        "properties": {
            "op": {"enum": ["create", "update", "delete"]},
            "kind": {"enum": [k.name for k in KINDS]},
            "key": {"type": "object"},
            "fields": {"type": "object"},
            "if_match": {"type": "string"},
        },
    }
    policy = {
        "type": "object",
        "required": ["tenant", "changes", "effect", "applied", "revision"],
        "properties": {
            "tenant": ID,
            "changes": {"type": "array", "items": {"type": "string"}},
            "effect": {"type": "array", "items": {"type": "string"}},
            "applied": {"type": "boolean"},
            "revision": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
    }
    paths: dict[str, Any] = {
        "/admin/v1/tenants": {
            "get": {
                "summary": "tenants this token may see",
                "operationId": "list_tenants",
                "responses": {
                    **_ok(
                        {
                            "type": "object",
                            "required": ["data", "next"],
                            "properties": {
                                "data": {"type": "array", "items": _ref("tenant")},
                                "next": {"type": "null"},
                            },
                        }
                    ),
                    **_errors("401", "403"),
                },
            },
            "post": {
                "summary": "create a tenant (platform token, admin scope)",
                "operationId": "create_tenant",
                "requestBody": _json_body(
                    {
                        "type": "object",
                        "required": ["id"],
                        "additionalProperties": False,
                        "properties": {"id": ID, "name": {"type": "string"}},
                    }
                ),
                "responses": {
                    **_ok(_written("tenant"), "201", "created"),
                    **_errors("400", "401", "403", "409", "413", "415", "422"),
                },
            },
        },
        base: {
            "parameters": _params(base),
            "get": {
                "summary": "one tenant",
                "operationId": "get_tenant",
                "responses": {
                    **_ok(
                        {
                            "type": "object",
                            "required": ["data"],
                            "properties": {"data": _ref("tenant")},
                        }
                    ),
                    **_errors("401", "403", "404", "422"),
                },
            },
            "delete": {
                "summary": "delete a tenant and everything in it (platform token, admin scope)",
                "operationId": "delete_tenant",
                "responses": {
                    **_ok(
                        {
                            "type": "object",
                            "required": ["revision"],
                            "properties": {"revision": {"type": "string"}},
                        }
                    ),
                    **_errors("401", "403", "404"),
                },
            },
        },
        base + "/bulk": {
            "parameters": _params(base),
            "post": {
                "summary": "many operations in one transaction",
                "operationId": "bulk",
                "requestBody": _json_body(
                    {
                        "type": "object",
                        "required": ["operations"],
                        "properties": {
                            "operations": {
                                "type": "array",
                                "minItems": 1,
                                "maxItems": 1000,
                                "items": operation,
                            }
                        },
                    }
                ),
                "responses": {
                    **_ok(
                        {
                            "type": "object",
                            "required": ["revision", "results"],
                            "properties": {
                                "revision": {"type": "string"},
                                "results": {"type": "array"},
                            },
                        }
                    ),
                    **_errors("400", "401", "403", "404", "409", "412", "413", "415", "422"),
                },
            },
        },
        base + "/policy": {
            "parameters": _params(base),
            "get": {
                "summary": "the tenant's policy as YAML",
                "operationId": "export_policy",
                "responses": {
                    "200": {
                        "description": "the document",
                        "content": {"application/yaml": {"schema": {"type": "object"}}},
                    },
                    **_errors("401", "403", "404"),
                },
            },
            "put": {
                "summary": "plan (dry_run=true) or apply a policy document",
                "operationId": "apply_policy",
                "parameters": [
                    {
                        "name": "dry_run",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": ["true", "false"]},
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/yaml": {"schema": {"type": "string"}}},
                },
                "responses": {
                    **_ok(policy),
                    **_errors("400", "401", "403", "404", "413", "415", "422"),
                },
            },
        },
    }
    paths |= _compliance_paths(base)
    for kind in KINDS:
        paths |= _kind_paths(kind, base)
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "required": ["error", "message"],
            "properties": {
                "error": {"type": "string"},
                "message": {"type": "string"},
                "field": {"type": "string"},
            },
        },
        "tenant": tenant,
        "audit_record": _AUDIT_RECORD,
        **{k.name: _row(k) for k in KINDS},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "pdp admin API", "version": "1"},
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


@functools.cache
def document_yaml() -> str:
    # Through JSON first: no YAML anchors for the schema objects shared between paths.
    return yaml.safe_dump(json.loads(json.dumps(document())), sort_keys=False)
