"""AuthZEN 1.0 as pure functions: parsing, batch semantics, paging, discovery, errors.

No I/O and no web framework (import-linter holds it). Every parse function takes the
decoded JSON body and returns a value object or raises `RequestError(message, field)`,
`field` being the dotted JSON path of the offending member
(`subject.properties.tenant`, `evaluations[2].resource.id`, `page.token`). Unknown
members are ignored, as the spec requires.

    codec        JSON bytes <-> objects (orjson when installed), error bodies
    fields       the shared member checks (ids, objects, tenant)
    evaluation   Query, Batch, batch semantics, per-entry errors
    search       the three search requests
    paging       page tokens bound to their request, page slicing
    discovery    the metadata document
    headers      X-PDP-Min-Revision
    typed        the msgspec fast path of one evaluation's common shape
"""

from pdp.protocol.codec import JsonObject, dumps, error_body, loads
from pdp.protocol.discovery import configuration
from pdp.protocol.evaluation import (
    SEMANTICS,
    Batch,
    Query,
    entry_error,
    parse_evaluation,
    parse_evaluations,
    stops_after,
)
from pdp.protocol.fields import MAX_ID_LENGTH
from pdp.protocol.headers import MIN_REVISION, parse_min_revision
from pdp.protocol.paging import DEFAULT_PAGE_LIMIT, MAX_PAGE_LIMIT, Page, page_token, paged
from pdp.protocol.search import (
    ActionSearch,
    ResourceSearch,
    SubjectSearch,
    parse_action_search,
    parse_resource_search,
    parse_subject_search,
)
from pdp.protocol.typed import TYPED, decode_evaluation, decode_evaluations

__all__ = [
    "DEFAULT_PAGE_LIMIT",
    "MAX_ID_LENGTH",
    "MAX_PAGE_LIMIT",
    "MIN_REVISION",
    "SEMANTICS",
    "TYPED",
    "ActionSearch",
    "Batch",
    "JsonObject",
    "Page",
    "Query",
    "ResourceSearch",
    "SubjectSearch",
    "configuration",
    "decode_evaluation",
    "decode_evaluations",
    "dumps",
    "entry_error",
    "error_body",
    "loads",
    "page_token",
    "paged",
    "parse_action_search",
    "parse_evaluation",
    "parse_evaluations",
    "parse_min_revision",
    "parse_resource_search",
    "parse_subject_search",
    "stops_after",
]
