"""Conditions on grants: CEL expressions, compiled once per distinct text, evaluated per check.

One evaluator serves the engine (in memory) and the SQL fallback (`pdp.check_candidates`
rows), so both read the same activation and decide alike:

    subject  {type, id, properties, attributes}   attributes: pdp.users.attributes
    resource {type, id, properties, attributes}   attributes: the pdp.resources inventory;
                                                  properties: the request's, over the
                                                  inventory's where both give a key
    action   {name, properties}
    context  the request's context object
    now      the decision time (a CEL timestamp)

A grant applies only when its condition evaluates to `true`. `false` denies that grant;
an error (missing key, wrong type, a non-boolean result, or an expression that does not
compile) denies it too and is reported as an error. No I/O, no clock: `now` is given.
"""

from pdp.conditions.cel import (
    ERROR,
    FALSE,
    NO_FACTS,
    TRUE,
    Condition,
    Facts,
    Outcome,
    activation,
    compile_condition,
    compile_errors,
    evaluate,
    validate,
)

__all__ = [
    "ERROR",
    "FALSE",
    "NO_FACTS",
    "TRUE",
    "Condition",
    "Facts",
    "Outcome",
    "activation",
    "compile_condition",
    "compile_errors",
    "evaluate",
    "validate",
]
