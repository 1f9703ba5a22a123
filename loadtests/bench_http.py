"""HTTP benchmark: pdp's AuthZEN endpoint against a bare aiohttp handler, driven by wrk.

    .venv/bin/python loadtests/bench_http.py [--users 100000] [--duration 15]
        [--connections 64] [--batch 100] [--conditional-share 0.2] [--no-uvloop]

Each server runs in its own process on 127.0.0.1 (random port), pinned to the last
CPU when there are several, with wrk pinned to the others (1 thread). The two
single-evaluation runs alternate for `--rounds` rounds and the medians are reported,
so background load on the machine hits both alike. pdp is
`pdp.web.app.build_app` over a Replica loaded from the synthetic dataset of
`pdp.pg.seed_data` (no database); the baseline is `loadtests/bare_app.py` (JSON parse
+ dict lookup). Bodies are drawn round-robin from a list of real users and resource
ids, so decisions mix allow and deny. Prints req/s, p50 and p99 for both, the
ratio, and decisions/s for batches of `--batch` on `/access/v1/evaluations` (a round of
them after each round of singles, median reported).

The parent process only orchestrates (subprocesses and wrk); pdp is imported in the
server process alone (`--serve`).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
EVALUATION = "/access/v1/evaluation"
EVALUATIONS = "/access/v1/evaluations"
FORWARD_AUTH = "/forward-auth"
TENANT = "bench-1"  # seed_data names tenants <prefix>-1, <prefix>-2, ...

LUA = """
local bodies = {}
for line in io.lines("%(bodies)s") do bodies[#bodies + 1] = line end
local i = math.random(#bodies)
local headers = {["Content-Type"] = "application/json"}
request = function()
  i = i %% #bodies + 1
  return wrk.format("POST", "%(path)s", headers, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %%d %%d %%.1f %%.1f %%.1f %%d\\n", summary.requests,
    summary.duration, latency:percentile(50), latency:percentile(99), latency.mean,
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""
LUA_FORWARD_AUTH = """
local lines = {}
for line in io.lines("%(bodies)s") do
  local path, user = line:match("([^\t]+)\t(.+)")
  lines[#lines + 1] = {path, user}
end
local i = math.random(#lines)
request = function()
  i = i %% #lines + 1
  return wrk.format("GET", "/forward-auth" .. lines[i][1], {["X-User-Id"] = lines[i][2]})
end
""" + LUA[LUA.index("done = function") :].replace("e.status + ", "")  # a 403 deny is an answer


# --- the pdp server process --------------------------------------------------------


# The condition a `--conditional-share` of the grants carry; bodies then give
# `resource.properties.level` (1-5), so about 3 in 5 conditional decisions allow.
CONDITION = "resource.properties.level <= 3"


def _engine_rows(users: int, conditional: float = 0.0) -> dict[str, list[tuple[Any, ...]]]:
    """seed_data's synthetic tenant in the engine's row format (column prefix, epoch floats);
    a `conditional` share of the role_permissions rows carry CONDITION."""
    from pdp.engine import COLUMNS  # noqa: PLC0415 -- server process only
    from pdp.pg import seed_data  # noqa: PLC0415 -- server process only

    spec = seed_data.SeedSpec(users=users, tenant_prefix=TENANT.rsplit("-", 1)[0])
    assert spec.tenant_ids() == (TENANT,)
    tables = seed_data.synthetic(spec).tables(TENANT)
    rows: dict[str, list[tuple[Any, ...]]] = {}
    for table, it in tables.items():
        width = len(COLUMNS[table])
        rows[table] = [
            tuple(v.timestamp() if isinstance(v, datetime) else v for v in row[:width])
            for row in it
        ]
    if conditional:
        rng = random.Random(11)
        rows["role_permissions"] = [
            (*row[:3], CONDITION if rng.random() < conditional else None)
            for row in rows["role_permissions"]
        ]
    return rows


def _bodies(
    users: int, count: int, batch: int, conditional: float = 0.0
) -> tuple[list[str], list[str]]:
    """Single and batch request bodies over real user ids and resource ids."""
    from pdp.pg import seed_data  # noqa: PLC0415 -- server process only

    rng = random.Random(7)
    resources = max(100, users // 5)

    def entry() -> dict[str, Any]:
        resource: dict[str, Any] = {
            "type": rng.choice(seed_data.RESOURCE_TYPES),
            "id": str(int(resources ** rng.random())),
        }
        if conditional:
            resource["properties"] = {"level": rng.randint(1, 5)}
        return {
            "subject": {"type": "user", "id": seed_data.user_id(rng.randint(1, users))},
            "action": {"name": rng.choice(seed_data.ACTIONS)},
            "resource": resource,
        }

    entries = [entry() for _ in range(count)]
    singles = [json.dumps(e) for e in entries]
    batches = []
    for _ in range(max(1, count // batch)):
        subject = {"type": "user", "id": seed_data.user_id(rng.randint(1, users))}
        items = [{k: v for k, v in entry().items() if k != "subject"} for _ in range(batch)]
        batches.append(json.dumps({"subject": subject, "evaluations": items}))
    return singles, batches


def _forward_auth_lines(singles: list[str]) -> list[str]:
    """The single bodies as forward-auth requests (path, tab, user): the same decisions."""
    from loadtests.route_tables import request_path  # noqa: PLC0415 -- server process only

    lines = []
    for body in map(json.loads, singles):
        resource = body["resource"]
        path = request_path(resource["type"], resource["id"], body["action"]["name"])
        lines.append(f"{path}\t{body['subject']['id']}")
    return lines


async def _serve_pdp(
    users: int, workdir: Path, batch: int, routes: int, conditional: float = 0.0
) -> None:
    from aiohttp import web  # noqa: PLC0415 -- server process only
    from prometheus_client import CollectorRegistry  # noqa: PLC0415 -- server process only

    from loadtests.route_tables import routes_yaml  # noqa: PLC0415 -- server process only
    from pdp.conditions import Facts  # noqa: PLC0415 -- server process only
    from pdp.config import Settings  # noqa: PLC0415 -- server process only
    from pdp.engine import Engine, Snapshot  # noqa: PLC0415 -- server process only
    from pdp.gateway import parse_routes  # noqa: PLC0415 -- server process only
    from pdp.http_edge import EdgeLimits  # noqa: PLC0415 -- server process only
    from pdp.replica import Replica  # noqa: PLC0415 -- server process only
    from pdp.sidecar import edge_runner  # noqa: PLC0415 -- server process only
    from pdp.web.app import build_app  # noqa: PLC0415 -- server process only
    from pdp.web.forward_auth import Gateway, RouteBox  # noqa: PLC0415 -- server process only

    started = time.perf_counter()
    engine = Engine.build(_engine_rows(users, conditional), Snapshot(1, 1))
    replica = Replica(clock=time.monotonic)
    # Bench runs far past max_staleness with no sync worker: serve, never "stale".
    replica.install(engine, epoch="bench", synced_at=time.monotonic())
    settings = Settings(
        default_tenant=TENANT, max_staleness_seconds=1e9, max_batch=batch,
        forward_auth_mode="envoy",
    )  # fmt: skip
    gateway = Gateway(RouteBox(parse_routes(routes_yaml(routes))))
    app = build_app(settings, replica=replica, registry=CollectorRegistry(), gateway=gateway)
    singles, batches = _bodies(users, 2000, batch, conditional)
    (workdir / "single.jsonl").write_text("\n".join(singles) + "\n")
    (workdir / "forward.tsv").write_text("\n".join(_forward_auth_lines(singles)) + "\n")
    (workdir / "batch.jsonl").write_text("\n".join(batches) + "\n")
    decisions = [
        engine.check(TENANT, b["subject"]["id"], b["resource"]["type"], b["resource"]["id"],
                     b["action"]["name"], time.time(),
                     Facts(resource=b["resource"].get("properties")))
        for b in map(json.loads, singles)
    ]  # fmt: skip
    allowed = sum(d.allowed for d in decisions)
    by_condition = sum(d.condition is not None for d in decisions)
    gc.collect()
    gc.freeze()  # as a service would after loading: keep the collector off the long-lived heap
    # Served as `pdp serve` serves it: the HTTP edge (read deadlines, connection cap,
    # drain, the hot routes without the router) with the sidecar's runner arguments.
    runner = edge_runner(app, settings, EdgeLimits(settings.request_read_timeout_seconds, 10_000))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    load = time.perf_counter() - started
    print(f"INFO load {load:.1f}s, {allowed / len(singles):.0%} of single bodies allowed, "
          f"{by_condition / len(singles):.0%} decided by a condition", flush=True)  # fmt: skip
    print(f"PORT {runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


# --- the orchestrating parent ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Result:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def _pin(cpus: set[int]) -> list[str]:
    return ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if shutil.which("taskset") else []


def _cpus() -> tuple[set[int], set[int]]:
    """(server CPUs, wrk CPUs): split when there are at least two."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return set(cpus), set(cpus)
    return {cpus[-1]}, set(cpus[:-1])


def _start(argv: list[str], server_cpus: set[int]) -> tuple[subprocess.Popen[str], int, str]:
    proc = subprocess.Popen(
        [*_pin(server_cpus), *argv], stdout=subprocess.PIPE, text=True, cwd=HERE.parent
    )
    assert proc.stdout is not None
    info = ""
    for line in proc.stdout:
        if line.startswith("INFO "):
            info = line[5:].strip()
        if line.startswith("PORT "):
            return proc, int(line.split()[1]), info
    proc.kill()
    raise RuntimeError(f"{argv} exited before listening (code {proc.wait()})")


def _wrk(port: int, path: str, bodies: Path, args: argparse.Namespace, seconds: float) -> Result:
    script = bodies.with_suffix(f".{path.rsplit('/', 1)[-1]}.lua")
    lua = LUA_FORWARD_AUTH if path == FORWARD_AUTH else LUA
    script.write_text(lua % {"bodies": bodies, "path": path})
    _, wrk_cpus = _cpus()
    out = subprocess.run(
        [*_pin(wrk_cpus), "wrk", "-t1", f"-c{args.connections}", f"-d{round(seconds)}s",
         "--timeout", "5s", "-s", str(script), f"http://127.0.0.1:{port}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    requests, micros, p50, p99, _mean, errors = line.split()[1:]
    return Result(int(requests), int(micros) / 1e6, float(p50) / 1000, float(p99) / 1000,
                  int(errors))  # fmt: skip


def _measure(port: int, path: str, bodies: Path, args: argparse.Namespace) -> Result:
    _wrk(port, path, bodies, args, args.warmup)
    return _wrk(port, path, bodies, args, args.duration)


def _line(name: str, r: Result, per_request: int = 1) -> str:
    rate = f"{r.rps:>9,.0f} req/s"
    if per_request > 1:
        rate += f" = {r.rps * per_request:>11,.0f} decisions/s"
    errors = f"  errors {r.errors}" if r.errors else ""
    return f"{name:<28}{rate}   p50 {r.p50_ms:6.2f} ms   p99 {r.p99_ms:6.2f} ms{errors}"


def _median(results: list[Result]) -> Result:
    return sorted(results, key=lambda r: r.rps)[len(results) // 2]


def orchestrate(args: argparse.Namespace) -> None:
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install -y wrk)")
    server_cpus, wrk_cpus = _cpus()
    loop_flag = ["--no-uvloop"] if args.no_uvloop else []
    me = [sys.executable, str(Path(__file__).resolve())]
    print(f"python {sys.version.split()[0]}  users={args.users}  connections={args.connections}"
          f"  duration={args.duration}s x {args.rounds} rounds  uvloop={not args.no_uvloop}  "
          f"server cpu {sorted(server_cpus)}, wrk cpu {sorted(wrk_cpus)}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="pdp-bench-") as tmp:
        work = Path(tmp)
        single_bodies, batch_bodies = work / "single.jsonl", work / "batch.jsonl"
        pdp, pdp_port, info = _start(
            [*me, "--serve", "--users", str(args.users), "--batch", str(args.batch),
             "--routes", str(args.routes), "--workdir", tmp,
             "--conditional-share", str(args.conditional_share), *loop_flag], server_cpus,
        )  # fmt: skip
        bare, bare_port, _ = _start(
            [sys.executable, str(HERE / "bare_app.py"), *loop_flag], server_cpus
        )
        print(f"pdp: {info}")
        try:
            # Interleaved rounds, medians reported: the ratio survives a noisy machine.
            bares, singles, forwards, batches = [], [], [], []
            for _ in range(args.rounds):
                bares.append(_measure(bare_port, EVALUATION, single_bodies, args))
                singles.append(_measure(pdp_port, EVALUATION, single_bodies, args))
                forwards.append(_measure(pdp_port, FORWARD_AUTH, work / "forward.tsv", args))
                batches.append(_measure(pdp_port, EVALUATIONS, batch_bodies, args))
        finally:
            for proc in (pdp, bare):
                proc.kill()
                proc.wait()
    baseline, single = _median(bares), _median(singles)
    print(_line("bare aiohttp (baseline)", baseline))
    print(_line("pdp /evaluation", single))
    ratios = ", ".join(f"{s.rps / b.rps:.2f}" for b, s in zip(bares, singles, strict=True))
    print(f"{'ratio pdp / bare':<28}{single.rps / baseline.rps:>9.2f}   (per round: {ratios})")
    forward = _median(forwards)
    print(_line(f"pdp /forward-auth ({args.routes} routes)", forward))
    ratios = ", ".join(f"{f.rps / s.rps:.2f}" for s, f in zip(singles, forwards, strict=True))
    ratio = forward.rps / single.rps
    print(f"{'ratio forward-auth / eval':<28}{ratio:>9.2f}   (per round: {ratios})")
    rates = ", ".join(f"{b.rps * args.batch:,.0f}" for b in batches)
    print(_line(f"pdp /evaluations x{args.batch}", _median(batches), args.batch))
    print(f"{'':<28}(decisions/s per round: {rates})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--duration", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--routes", type=int, default=500, help="forward-auth route table size")
    parser.add_argument(
        "--conditional-share", type=float, default=0.0,
        help="share of grants carrying a condition (bodies then give resource properties)",
    )  # fmt: skip
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.serve:
        orchestrate(args)
        return
    sys.path.insert(0, str(HERE.parent))  # run as a script: make `loadtests` importable
    from loadtests.bare_app import run_loop  # noqa: PLC0415 -- server process only

    run_loop(
        _serve_pdp(args.users, args.workdir, args.batch, args.routes, args.conditional_share),
        uvloop=not args.no_uvloop,
    )


if __name__ == "__main__":
    main()
