"""The typed fast path of `POST /access/v1/evaluation`: msgspec decodes the common shape
straight into a `Query`, or says None and the caller takes the general path.

The common shape is exactly `{"subject": {"type", "id"}, "action": {"name"},
"resource": {"type", "id"}}` with string ids: no properties, no context, no unknown
member anywhere (`forbid_unknown_fields`). Every byte of such a body is decoded into a
typed string, so the fast path accepts exactly the bodies the general path
(`codec.loads` + `parse_evaluation`) would accept with the same Query; anything else
(a `properties` member, a number, malformed JSON, an id of the wrong length or with a
NUL) makes it return None, and the general path answers, with its error messages. A
Struct decode costs ~0.3 us where orjson + `parse_evaluation` cost ~2 us (measured in
the README's Benchmarks). Without msgspec installed (an optional extra, like orjson)
`decode_evaluation` always returns None.
"""

from __future__ import annotations

from typing import Annotated

from pdp.protocol.evaluation import SEMANTICS, Batch, Query
from pdp.protocol.fields import MAX_ID_LENGTH

try:
    import msgspec
except ImportError:  # pragma: no cover - the plain path; msgspec is an optional extra
    msgspec = None  # type: ignore[assignment]

__all__ = ["TYPED", "decode_evaluation", "decode_evaluations"]

TYPED = msgspec is not None  # whether this install has the fast path

if msgspec is not None:
    # The id bounds are checked by msgspec while it decodes (lengths in characters,
    # as Python's len): no Python-level pass over the five strings.
    _Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH)]

    class _Entity(msgspec.Struct, forbid_unknown_fields=True):
        type: _Id
        id: _Id

    class _Action(msgspec.Struct, forbid_unknown_fields=True):
        name: _Id

    class _Evaluation(msgspec.Struct, forbid_unknown_fields=True):
        subject: _Entity
        action: _Action
        resource: _Entity

    _decode = msgspec.json.Decoder(_Evaluation).decode

    # A batch of the common shape: top-level defaults and entries of subject, action and
    # resource only (no options, context or properties); a key absent from an entry takes
    # the default (null is not absent: the general parser names it).
    class _Entry(msgspec.Struct, forbid_unknown_fields=True):
        subject: _Entity | msgspec.UnsetType = msgspec.UNSET
        action: _Action | msgspec.UnsetType = msgspec.UNSET
        resource: _Entity | msgspec.UnsetType = msgspec.UNSET

    class _Evaluations(msgspec.Struct, forbid_unknown_fields=True):
        evaluations: list[_Entry]
        subject: _Entity | msgspec.UnsetType = msgspec.UNSET
        action: _Action | msgspec.UnsetType = msgspec.UNSET
        resource: _Entity | msgspec.UnsetType = msgspec.UNSET

    _decode_batch = msgspec.json.Decoder(_Evaluations).decode
    _ERRORS: tuple[type[Exception], ...] = (msgspec.DecodeError,)


def decode_evaluation(raw: bytes, default_tenant: str | None) -> Query | None:
    """The Query of a body of the common shape (see the module), else None."""
    if msgspec is None or default_tenant is None:  # no default: the tenant is a property
        return None
    # JSON can only carry a NUL escaped, as \u0000 (a raw control character is not
    # valid JSON): a body without that sequence has no NUL in any string. One with it
    # (or with an escaped backslash before "u0000") takes the general path, which says
    # which field is wrong.
    if _NUL in raw:
        return None
    try:
        body = _decode(raw)
    except _ERRORS:  # malformed, another shape, or an id out of bounds
        return None
    subject, resource = body.subject, body.resource
    return Query(
        default_tenant, subject.type, subject.id, resource.type, resource.id, body.action.name
    )


_NUL = b"\\u0000"


def decode_evaluations(raw: bytes, default_tenant: str | None, max_batch: int) -> Batch | None:
    """The Batch of an `evaluations` body of the common shape (1 to `max_batch` entries,
    each naming, itself or through the defaults, a subject, an action and a resource), as
    the general parser would make it; else None."""
    if msgspec is None or default_tenant is None or _NUL in raw:
        return None
    try:
        body = _decode_batch(raw)
    except _ERRORS:
        return None
    entries = body.evaluations
    if not 0 < len(entries) <= max_batch:  # none: one evaluation; too many: an error
        return None
    unset, subject, action, resource = msgspec.UNSET, body.subject, body.action, body.resource
    if subject is not unset and resource is unset:
        queries = _with_subject(default_tenant, subject, action, entries)
        if queries is not None:
            return Batch(tuple(queries), SEMANTICS[0], False)
    queries = []
    for entry in entries:
        s = subject if entry.subject is unset else entry.subject
        a = action if entry.action is unset else entry.action
        r = resource if entry.resource is unset else entry.resource
        if s is unset or a is unset or r is unset:
            return None  # the general parser names what is missing
        queries.append(Query(default_tenant, s.type, s.id, r.type, r.id, a.name))
    return Batch(tuple(queries), SEMANTICS[0], False)


def _with_subject(
    tenant: str, subject: _Entity, action: _Action | msgspec.UnsetType, entries: list[_Entry]
) -> list[Query] | None:
    """The common batch, one comprehension instead of the general loop: the subject given
    once at the top, every entry naming its resource (and its action, unless the top
    does) and no subject of its own; None for any other batch."""
    unset = msgspec.UNSET
    if any(entry.subject is not unset for entry in entries):
        return None
    stype, sid = subject.type, subject.id
    try:
        if action is unset:
            return [
                Query(tenant, stype, sid, (r := e.resource).type, r.id, e.action.name)  # type: ignore[union-attr]
                for e in entries
            ]
        if any(entry.action is not unset for entry in entries):
            return None
        name = action.name
        return [Query(tenant, stype, sid, (r := e.resource).type, r.id, name) for e in entries]  # type: ignore[union-attr]
    except AttributeError:  # an entry without a resource (UNSET has no .type) or action
        return None
