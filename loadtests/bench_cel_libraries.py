"""Which CEL library pdp.conditions uses, by measurement (compile and evaluate times).

    python -m loadtests.bench_cel_libraries

Times each installed candidate on an ownership test and a `now` window, with the full
activation a check builds (subject, resource, action, context, now). Candidates not
installed are reported as such: `pip install common-expression-language cel-python`
beside pdp's own `cel-expr-python` to compare all three.
"""

from __future__ import annotations

import datetime as dt
import importlib
import timeit
from collections.abc import Callable
from functools import partial
from typing import Any

OWNERSHIP = "resource.properties.ownerID == subject.attributes.email"
WINDOW = "now >= timestamp('2026-01-01T00:00:00Z') && now < timestamp('2027-01-01T00:00:00Z')"
NOW = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
DATA: dict[str, Any] = {
    "subject": {"type": "user", "id": "alice", "properties": {}, "attributes": {"email": "a@x"}},
    "resource": {"type": "document", "id": "d1", "properties": {"ownerID": "a@x"}},
    "action": {"name": "edit", "properties": {}},
    "context": {},
    "now": NOW,
}


def _us(fn: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def _eval(program: Any, env: Any) -> object:
    return program.eval(env.Activation(DATA)).value()


def _program(env: Any, text: str) -> object:
    return env.program(env.compile(text))


def _cel_expr_python() -> list[tuple[str, float, float]]:
    cel: Any = importlib.import_module("cel_expr_python.cel")
    names = ("subject", "resource", "action", "context")
    env = cel.NewEnv(variables=dict.fromkeys(names, cel.Type.DYN) | {"now": cel.Type.TIMESTAMP})
    out = []
    for text in (OWNERSHIP, WINDOW):
        program = env.compile(text)
        assert program.eval(data=DATA).value() is True
        out.append(
            (
                text,
                _us(partial(env.compile, text), 200),
                _us(partial(_eval, program, env), 2000),
            )
        )
    return out


def _cel_rust() -> list[tuple[str, float, float]]:
    cel: Any = importlib.import_module("cel")
    out = []
    for text in (OWNERSHIP, WINDOW):
        program = cel.compile(text)
        assert program.execute(DATA) is True
        out.append(
            (
                text,
                _us(partial(cel.compile, text), 200),
                _us(partial(program.execute, DATA), 2000),
            )
        )
    return out


def _cel_python() -> list[tuple[str, float, float]]:
    celpy: Any = importlib.import_module("celpy")
    env = celpy.Environment()
    out = []
    for text in (OWNERSHIP, WINDOW):
        program = env.program(env.compile(text))

        def run(p: Any = program) -> object:
            values = celpy.json_to_cel({k: v for k, v in DATA.items() if k != "now"})
            values["now"] = celpy.celtypes.TimestampType(NOW)
            return p.evaluate(values)

        assert bool(run())
        out.append((text, _us(partial(_program, env, text), 5), _us(run, 50)))
    return out


def main() -> None:
    candidates = {
        "cel-expr-python (pdp's)": _cel_expr_python,
        "common-expression-language": _cel_rust,
        "cel-python": _cel_python,
    }
    print(f"{'library':30} {'expression':28} {'compile us':>11} {'evaluate us':>12}")
    for name, run in candidates.items():
        try:
            rows = run()
        except ImportError:
            print(f"{name:30} not installed")
            continue
        for text, compiled, evaluated in rows:
            print(f"{name:30} {text[:28]:28} {compiled:11.1f} {evaluated:12.2f}")


if __name__ == "__main__":
    main()
