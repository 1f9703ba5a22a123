"""The three search requests (subject, resource, action): inputs and paging.

`facts` carries the properties and context the request gives, for conditional grants.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdp.conditions import Facts
from pdp.protocol.codec import JsonObject
from pdp.protocol.fields import check_properties, optional_object, required_object, string, tenant
from pdp.protocol.paging import Page, parse_page


@dataclass(frozen=True, slots=True)
class SubjectSearch:
    tenant: str
    subject_type: str
    resource_type: str
    resource_id: str
    action: str
    page: Page
    facts: Facts | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class ResourceSearch:
    tenant: str
    subject_type: str
    user: str
    resource_type: str
    action: str
    page: Page
    facts: Facts | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class ActionSearch:
    tenant: str
    subject_type: str
    user: str
    resource_type: str
    resource_id: str
    page: Page
    facts: Facts | None = field(default=None, compare=False)


def _facts(body: JsonObject, stype: str) -> Facts | None:
    """The properties (of subject, resource, action) and context a search gives."""
    props = []
    for key in ("subject", "resource", "action"):
        part = body.get(key)
        value = part.get("properties") if type(part) is dict else None
        props.append(value if type(value) is dict and value else None)
    context = body.get("context")
    context = context if type(context) is dict and context else None
    if not any(props) and context is None:
        return None
    return Facts(stype, props[0], props[1], props[2], context)


def _subject_input(
    body: JsonObject, default_tenant: str | None, *, with_id: bool
) -> tuple[str, str, str]:
    """(type, id or "" when not an input, tenant) of a search request's subject."""
    subject = required_object(body, "subject", "subject")
    stype = string(subject, "type", "subject.type")
    user = string(subject, "id", "subject.id") if with_id else ""
    return stype, user, tenant(subject, "subject", default_tenant)


def _action_input(body: JsonObject) -> str:
    """The action name of a search request (an input of subject and resource search)."""
    action = required_object(body, "action", "action")
    name = string(action, "name", "action.name")
    check_properties(action, "action")
    return name


def _resource_input(body: JsonObject, *, with_id: bool) -> tuple[str, str]:
    """(type, id or "" when not an input) of a search request's resource."""
    resource = required_object(body, "resource", "resource")
    rtype = string(resource, "type", "resource.type")
    rid = string(resource, "id", "resource.id") if with_id else ""
    check_properties(resource, "resource")
    return rtype, rid


def parse_subject_search(body: JsonObject, default_tenant: str | None) -> SubjectSearch:
    """Subject search: `subject.type` is searched (id ignored); resource and action are inputs."""
    stype, _, tenant_id = _subject_input(body, default_tenant, with_id=False)
    name = _action_input(body)
    rtype, rid = _resource_input(body, with_id=True)
    optional_object(body, "context", "context")
    page = parse_page(body, "subject", ("subject", "id"))
    return SubjectSearch(tenant_id, stype, rtype, rid, name, page, _facts(body, stype))


def parse_resource_search(body: JsonObject, default_tenant: str | None) -> ResourceSearch:
    """Resource search: subject and action are inputs; `resource.type` is searched."""
    stype, user, tenant_id = _subject_input(body, default_tenant, with_id=True)
    name = _action_input(body)
    rtype, _ = _resource_input(body, with_id=False)
    optional_object(body, "context", "context")
    page = parse_page(body, "resource", ("resource", "id"))
    return ResourceSearch(tenant_id, stype, user, rtype, name, page, _facts(body, stype))


def parse_action_search(body: JsonObject, default_tenant: str | None) -> ActionSearch:
    """Action search: subject and resource are inputs; any `action` member is ignored."""
    stype, user, tenant_id = _subject_input(body, default_tenant, with_id=True)
    rtype, rid = _resource_input(body, with_id=True)
    optional_object(body, "context", "context")
    page = parse_page(body, "action", ("action", None))
    return ActionSearch(tenant_id, stype, user, rtype, rid, page, _facts(body, stype))
