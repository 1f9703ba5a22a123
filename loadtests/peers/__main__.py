"""`python -m loadtests.peers`: pdp against its peers on one dataset, agreement first.

    .venv/bin/pip install -e '.[peers]'      # cedarpy, pycasbin (OPA and Cerbos: below)
    .venv/bin/python -m loadtests.peers [--users 100000] [--queries 10000]

1. Installs OPA's Rego bindings (pip download of the 3.14 wheel, unpacked) and the
   Cerbos server (npm) into `--tools` unless present (`--no-install`: use what is).
2. Generates the dataset (`pdp.pg.seed_data`, in memory) and the queries; the
   expected answers are pdp's engine's, which must match the naive reference too.
3. Builds every engine that installed and asks it every query it can express; any
   disagreement is listed and the run stops (exit 1) before anything is timed.
4. In-process cost per check (rounds, alternating), then server throughput: pdp
   over loopback HTTP against the Cerbos server, wrk at each `--connections`.
5. Writes `loadtests/results/peers-<stamp>/`: summary.json, table.md, peers.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadtests.peers import bench, cerbos, dataset, engines, install, results
from loadtests.peers.dataset import Agreement, Dataset, Query
from loadtests.peers.engines import InProcess
from loadtests.run import free_port

RESULTS = Path(__file__).resolve().parent.parent / "results"
BUILDERS: dict[str, Callable[[Dataset], InProcess]] = {
    "pdp": engines.build_pdp,
    "OPA": engines.build_opa,
    "Cedar": engines.build_cedar,
    "pycasbin": engines.build_casbin,
}


def _say(text: str) -> None:
    print(text, flush=True)


def build_engines(data: Dataset, names: list[str]) -> tuple[list[InProcess], dict[str, str]]:
    """The engines that build here, and why the others did not."""
    built, missing = [], {}
    for name in names:
        started = time.perf_counter()
        try:
            engine = BUILDERS[name](data)
        except ImportError as exc:
            missing[name] = f"not installed ({exc})"
            _say(f"  {name}: not installed ({exc})")
            continue
        engine.build_s = time.perf_counter() - started
        _say(f"  {name}: built in {engine.build_s:.1f} s")
        built.append(engine)
    return built, missing


def agreement(
    built: list[InProcess],
    queries: list[Query],
    expected: list[bool],
    sets: dict[str, frozenset[int]],
) -> tuple[list[Agreement], dict[str, frozenset[int]]]:
    found, excluded = [], {}
    for engine in built:
        excluded[engine.name] = frozenset().union(*(sets[s] for s in engine.cannot_express))
        result = dataset.check_agreement(
            engine.name, engine.check, queries, expected, excluded[engine.name]
        )
        _say(f"  {result.line()}")
        found.append(result)
    return found, excluded


def servers(
    args: argparse.Namespace,
    data: Dataset,
    queries: list[Query],
    expected: list[bool],
    out: Path,
) -> tuple[dict[str, Any], list[Agreement], dict[str, Any]]:
    """Both servers up, agreement over HTTP, then the wrk rounds; also what the
    harness's per-query principal lookup for Cerbos costs."""
    server_cpus, client_cpus = bench.cpu_split()
    binary = install.cerbos_binary(args.tools)
    found: list[Agreement] = []
    lookup = _lookup_cost(data, queries)
    with tempfile.TemporaryDirectory(prefix="pdp-peers-") as tmp:
        work = Path(tmp)
        pdp_proc, pdp_port = bench.start_pdp(
            args.users, args.seed, data.now, out / "pdp-server.log", server_cpus
        )
        http_port = free_port()
        conf = cerbos.write(data, work, http_port, free_port())
        cerbos_proc = cerbos.start(
            binary, conf, http_port, out / "cerbos.log", bench.pin(server_cpus)
        )
        try:
            contenders: dict[str, tuple[int, str, list[bytes], Callable[[bytes, Query], bool]]] = {
                "pdp (HTTP)": (
                    pdp_port, bench.EVALUATION,
                    [bench.pdp_body(q, data.tenant) for q in queries],
                    lambda response, _: bench.pdp_allowed(response),
                ),
                "Cerbos": (
                    http_port, cerbos.CHECK, [cerbos.body(data, q) for q in queries],
                    lambda response, q: cerbos.allowed(response, q.action),
                ),
            }  # fmt: skip
            files: dict[str, tuple[int, str, Path]] = {}
            for name, (port, path, bodies, decided) in contenders.items():
                client = bench.Client(port)
                index = {id(q): i for i, q in enumerate(queries)}
                result = dataset.check_agreement(
                    name,
                    lambda q: decided(client.post(path, bodies[index[id(q)]]), q),  # noqa: B023
                    queries,
                    expected,
                )
                client.close()
                _say(f"  {result.line()}")
                found.append(result)
                files[name] = (port, path, bench.write_bodies(work / f"{len(files)}.jsonl", bodies))
            if not all(a.ok for a in found):
                return {}, found, lookup
            _say(f"  wrk: {args.rounds} rounds x connections {args.connections},"
                 f" {args.duration} s each, servers on CPU {sorted(server_cpus)}")  # fmt: skip
            measured = bench.throughput(
                files, args.connections, args.rounds, args.duration, 2, client_cpus
            )
        finally:
            for proc in (pdp_proc, cerbos_proc):
                proc.terminate()
                proc.wait(timeout=30)
    return measured, found, lookup


def _lookup_cost(data: Dataset, queries: list[Query]) -> dict[str, Any]:
    """The harness's work before each Cerbos call: the principal's attributes
    (user, groups, assignments) and the request body, per query."""
    ns = []
    for n, q in enumerate(queries):
        started = time.perf_counter_ns()
        cerbos.body(data, q, n)
        ns.append(time.perf_counter_ns() - started)
    ns.sort()
    return {
        "median_us": round(ns[len(ns) // 2] / 1000, 2),
        "p99_us": round(ns[int(len(ns) * 0.99)] / 1000, 2),
    }


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out / f"peers-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    _say(f"pdp vs peers: {args.users:,} users, {args.queries:,} queries; results in {out}")
    problems: dict[str, str] = {}
    if "OPA" in args.only:
        try:
            install.use_opa(args.tools, install=not args.no_install)
        except install.InstallError as exc:
            problems["OPA"] = str(exc)
    if args.server and not args.no_install:
        try:
            install.install_cerbos(args.tools)
        except install.InstallError as exc:
            problems["Cerbos"] = str(exc)
    # Decisions at the wall clock's time (expiries moved along): pdp's HTTP API reads it.
    data = dataset.generate(args.users, args.seed, now=float(round(time.time())))
    queries = dataset.make_queries(data, args.queries, args.seed + 6)
    reference = [dataset.reference(data, q) for q in queries]
    sets = dataset.query_sets(data, queries)
    _say(f"  dataset: {_counts(data)}; {sum(reference):,} of the queries allowed,"
         f" {len(sets['expiry'])} depend on an expiry")  # fmt: skip
    built, missing = build_engines(data, ["pdp", *[n for n in args.only if n != "pdp"]])
    problems.update(missing)
    pdp = next(e for e in built if e.name == "pdp")
    expected = [pdp.check(q) for q in queries]
    by_query = {id(q): answer for q, answer in zip(queries, reference, strict=True)}
    checked = dataset.check_agreement("reference", lambda q: by_query[id(q)], queries, expected)
    _say(f"  pdp vs the naive reference: {checked.line()}")
    found, excluded = agreement(built, queries, expected, sets)
    found.insert(0, checked)
    summary: dict[str, Any] = {
        "command": " ".join(["python -m loadtests.peers", *sys.argv[1:]]),
        "dataset": {**_counts(data), "queries": len(queries), "allowed": sum(expected),
                    "query_sets": {k: len(v) for k, v in sets.items()},
                    "features": results.feature_counts(data, queries)},
        "how": engines.HOW,
        "excluded": {e.name: sorted(e.cannot_express) for e in built if e.cannot_express},
        "not_run": problems,
        "versions": bench.tool_versions(args.tools, install.cerbos_binary(args.tools)),
    }  # fmt: skip
    if all(a.ok for a in found):
        _say(f"  in process: {args.rounds} rounds of {args.per_round:,} queries")
        floors = engines.build_floors(built)
        summary["in_process"] = bench.in_process(
            built + floors, queries, excluded, args.rounds, args.per_round
        )
        if args.server and "Cerbos" not in problems:
            measured, http_found, lookup = servers(args, data, queries, expected, out)
            found += http_found
            summary["server"] = measured
            summary["cerbos_lookup"] = lookup
    summary["agreement"] = [
        {"engine": a.engine, "asked": a.asked, "excluded": a.excluded, "agreed": a.agreed,
         "disagreements": [{"query": _query(d.query), "expected": d.expected,
                            "answered": d.answered} for d in a.disagreements[:20]]}
        for a in found
    ]  # fmt: skip
    summary["duration_s"] = round(time.monotonic() - started)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = results.table(summary)
    (out / "table.md").write_text(table + "\n")
    if "in_process" in summary:
        results.plot(summary, out / "peers.png")
    _say("\n" + table)
    if not all(a.ok for a in found):
        _say("\nDISAGREEMENT: see summary.json 'agreement'; nothing was timed past it")
        return 1
    return 0


def _query(q: Query) -> dict[str, str]:
    return {"user": q.user, "type": q.rtype, "id": q.rid, "action": q.action}


def _counts(data: Dataset) -> dict[str, int]:
    return {
        "users": len(data.active),
        "groups": len(data.group_roles),
        "roles": len(data.grants),
        "user_roles": sum(map(len, data.user_roles.values())),
        "group_roles": sum(map(len, data.group_roles.values())),
        "group_members": sum(map(len, data.groups_of.values())),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.peers", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (both parts)")
    parser.add_argument("--per-round", type=int, default=2000, help="in-process calls per round")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 16], help="wrk connection counts, e.g. 1,16")  # fmt: skip
    parser.add_argument("--only", type=lambda s: s.split(","), default=list(BUILDERS),
                        help="in-process engines, e.g. pdp,OPA (pdp always runs)")  # fmt: skip
    parser.add_argument("--no-server", dest="server", action="store_false",
                        help="skip the HTTP round (pdp server vs Cerbos)")  # fmt: skip
    parser.add_argument("--tools", type=Path, default=install.DEFAULT_TOOLS)
    parser.add_argument("--no-install", action="store_true", help="use only what is installed")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
