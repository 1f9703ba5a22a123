"""The CEL runtime behind `pdp.conditions` (Google's C++ CEL through cel-expr-python).

Compiled programs are cached by expression text: the engine compiles a condition when
its row is loaded or changed, never per request. A text that does not compile gives a
Condition with `error` set: it never grants, is logged once per distinct text and
counted (`compile_errors`, exported as `pdp_condition_errors_total`).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from cel_expr_python import cel

log = logging.getLogger(__name__)

Outcome = Literal["true", "false", "error"]
TRUE: Outcome = "true"
FALSE: Outcome = "false"
ERROR: Outcome = "error"

_CACHE_LIMIT = 10_000
VARIABLES = frozenset(("subject", "resource", "action", "context", "now"))
_NAMES = re.compile(r"\b(subject|resource|action|context|now)\b")
_EMPTY: dict[str, Any] = {}
_UTC = dt.UTC

_ENV = cel.NewEnv(
    variables={
        "subject": cel.Type.DYN,
        "resource": cel.Type.DYN,
        "action": cel.Type.DYN,
        "context": cel.Type.DYN,
        "now": cel.Type.TIMESTAMP,
    }
)
_BOOLEAN_OK = (cel.Type.BOOL, cel.Type.DYN)


@dataclass(frozen=True, slots=True, eq=False)
class Condition:
    """One expression: its compiled program, or why it does not compile."""

    text: str
    program: Any  # cel.Expression, or None when `error` is set
    error: str | None = None
    # The variables the text may name (a superset: a word in a string literal counts
    # too); an activation needs only these.
    uses: frozenset[str] = frozenset()


_cache: dict[str, Condition] = {}
_failed: set[str] = set()
_lock = threading.Lock()  # a snapshot load compiles in a worker thread


def _compile(text: str) -> Condition:
    try:
        program = _ENV.compile(text)
    except (RuntimeError, ValueError) as exc:
        return Condition(text, None, _first_line(str(exc)))
    returns = program.return_type()
    if not any(returns == ok for ok in _BOOLEAN_OK):
        return Condition(text, None, f"the expression returns {returns.name()}, not a bool")
    return Condition(text, program, None, frozenset(_NAMES.findall(text)))


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0][:300] if message.strip() else "does not compile"


def compile_condition(text: str) -> Condition:
    """The Condition of `text`, compiled once per distinct text (cached).

    A text that does not compile is logged the first time it is seen and counted.
    """
    found = _cache.get(text)
    if found is not None:
        return found
    condition = _compile(text)
    with _lock:
        if len(_cache) >= _CACHE_LIMIT:
            _cache.clear()
        _cache[text] = condition
        first = condition.error is not None and text not in _failed
        if first:
            _failed.add(text)
    if first:
        log.warning("condition does not compile and never grants: %r: %s", text, condition.error)
    return condition


def validate(text: str) -> str | None:
    """Why `text` is not a usable condition (None when it is): for pdp's own write paths."""
    if not text.strip():
        return "the condition is empty"
    return _compile(text).error


def compile_errors() -> int:
    """How many distinct expressions failed to compile in this process."""
    return len(_failed)


@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> Mapping[str, Any]:
    # Shared between checks: callers only read it (a merge makes a new dict).
    try:
        value = json.loads(text)
    except ValueError:
        return _EMPTY
    return value if isinstance(value, dict) else _EMPTY


def _attrs(raw: str | Mapping[str, Any] | None) -> Mapping[str, Any]:
    if raw is None:
        return _EMPTY
    if isinstance(raw, str):
        return _EMPTY if raw == "{}" else _parse(raw)
    return raw


@dataclass(frozen=True, slots=True)
class Facts:
    """What a request says beyond the ids: its properties objects and its context.

    Every field may be None (not given). Built only for requests that carry something.
    """

    subject_type: str = "user"
    subject: Mapping[str, Any] | None = None
    resource: Mapping[str, Any] | None = None
    action: Mapping[str, Any] | None = None
    context: Mapping[str, Any] | None = None


NO_FACTS = Facts()
Attributes = str | Mapping[str, Any] | None


def activation(  # noqa: PLR0917 -- the request's parts, positional on purpose
    facts: Facts | None,
    user: str,
    user_attributes: Attributes,
    rtype: str,
    rid: str,
    resource_attributes: Attributes,
    action: str,
    now: float,
    uses: frozenset[str] = VARIABLES,
) -> Any:
    """The values a condition sees (see the package docstring), ready for `evaluate`.

    Stored attributes may be the JSON text of a jsonb column. Built once per check and
    shared by every candidate grant's evaluation; only the variables in `uses` (the
    union of the candidates' `Condition.uses`) are converted: the conversion is most of
    a condition's cost.
    """
    f = facts or NO_FACTS
    data: dict[str, Any] = {}
    if "subject" in uses:
        data["subject"] = {
            "type": f.subject_type,
            "id": user,
            "properties": f.subject or _EMPTY,
            "attributes": _attrs(user_attributes),
        }
    if "resource" in uses:
        r_attrs = _attrs(resource_attributes)
        r_props: Mapping[str, Any] = f.resource or _EMPTY
        if r_attrs:
            r_props = {**r_attrs, **r_props}
        data["resource"] = {"type": rtype, "id": rid, "properties": r_props, "attributes": r_attrs}
    if "action" in uses:
        data["action"] = {"name": action, "properties": f.action or _EMPTY}
    if "context" in uses:
        data["context"] = f.context or _EMPTY
    if "now" in uses:
        data["now"] = dt.datetime.fromtimestamp(now, _UTC)
    try:
        return _ENV.Activation(data)
    except (RuntimeError, ValueError, TypeError) as exc:
        # A value CEL cannot hold (it came from a request): every condition errs.
        return _Unusable(_first_line(str(exc)))


@dataclass(frozen=True, slots=True)
class _Unusable:
    error: str


def evaluate(condition: Condition, values: Any) -> tuple[Outcome, str | None]:  # noqa: PLR0911
    """TRUE, FALSE or ERROR (with its message) for `condition` over `activation(...)` values."""
    if condition.program is None:
        return ERROR, condition.error
    if isinstance(values, _Unusable):
        return ERROR, values.error
    try:
        result = condition.program.eval(values)
        value = result.value()
    except (RuntimeError, ValueError, TypeError) as exc:
        return ERROR, _first_line(str(exc))
    if value is True:
        return TRUE, None
    if value is False:
        return FALSE, None
    if result.type() == cel.Type.ERROR:
        return ERROR, _first_line(str(value))
    return ERROR, f"the condition gave {result.type().name()}, not a bool"
