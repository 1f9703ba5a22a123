"""What each real gateway adds, with pdp's forward-auth in the path and without.

    .venv/bin/python loadtests/bench_gateways.py [--duration 10] [--connections 4]
        [--rounds 3] [--only nginx envoy traefik]

Per gateway (the deploy/gateways/ configuration, one worker each: nginx
`master_process off`, Envoy `--concurrency 1`, Traefik `GOMAXPROCS=1`), in rounds that
alternate the three targets so machine noise hits them alike, wrk (1 thread, -c N):

    direct     the upstream itself                          (GET /api/bench)
    proxy      through the gateway, pdp not asked           (GET /healthz)
    with pdp   through the gateway, forward-auth to pdp     (GET /projects/p1/documents/d1)

The upstream is a minimal aiohttp app; pdp is the real application (`build_app`,
the gateway's mode, deploy/gateways/routes.yaml) over an in-memory replica of a
small tenant in which the request is allowed, so every answer is a 200 through the
upstream. Prints median p50/p99 per target and the difference "with pdp - proxy":
the latency forward-auth adds. Needs wrk (apt-get install -y wrk).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests.gateway_harness import DEPLOY, GATEWAYS, Gateway, Proc, free_port, poll, request

PROTECTED = "/projects/p1/documents/d1"
ROWS: dict[str, list[tuple[str | float | None, ...]]] = {
    "tenants": [("acme",)],
    "users": [("acme", "alice", "active")],
    "roles": [("acme", "reader")],
    "role_permissions": [("acme", "reader", "document:read")],
    "user_roles": [("acme", "alice", "reader", "*", None)],
}


# --- server processes ----------------------------------------------------------------


async def _serve_upstream(port: int) -> None:
    from aiohttp import web  # noqa: PLC0415 -- server process only

    body = b'{"upstream": true}'

    async def echo(_request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


async def _serve_pdp(port: int, mode: str) -> None:
    import time  # noqa: PLC0415 -- server process only

    from aiohttp import web  # noqa: PLC0415 -- server process only
    from prometheus_client import CollectorRegistry  # noqa: PLC0415 -- server process only

    from pdp.config import Settings  # noqa: PLC0415 -- server process only
    from pdp.engine import Engine, Snapshot  # noqa: PLC0415 -- server process only
    from pdp.replica import Replica  # noqa: PLC0415 -- server process only
    from pdp.web.app import build_app  # noqa: PLC0415 -- server process only
    from pdp.web.forward_auth import gateway_from_settings  # noqa: PLC0415 -- server only

    settings = Settings(
        default_tenant="acme", max_staleness_seconds=1e9, forward_auth_mode=mode,
        routes_path=DEPLOY / "routes.yaml",
    )  # fmt: skip
    replica = Replica()
    replica.install(Engine.build(ROWS, Snapshot(1, 1)), epoch="bench", synced_at=time.monotonic())
    app = build_app(
        settings, replica=replica, registry=CollectorRegistry(),
        gateway=gateway_from_settings(settings),
    )  # fmt: skip
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


# --- measuring -------------------------------------------------------------------------


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    assert match is not None, text
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def _wrk(url: str, args: argparse.Namespace) -> tuple[float, float, float, int]:
    """(p50 ms, p99 ms, requests/s, non-2xx) of one wrk run."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--latency",
         "-H", "X-User-Id: alice", url],
        capture_output=True, text=True, check=True, timeout=args.duration + 60,
    ).stdout  # fmt: skip
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    assert p50, out
    assert p99, out
    assert rps, out
    return (
        _ms(p50.group(1)),
        _ms(p99.group(1)),
        float(rps.group(1)),
        int(bad.group(1)) if bad else 0,
    )


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _bench_gateway(
    name: str, upstream_port: int, work: Path, args: argparse.Namespace
) -> dict[str, list[tuple[float, float, float, int]]]:
    me = [sys.executable, str(Path(__file__).resolve())]
    pdp_port = free_port()
    pdp = Proc(
        f"pdp-{name}", [*me, "--pdp", str(pdp_port), "--mode", name], work / f"pdp-{name}.log"
    )
    try:
        poll(lambda: request(pdp_port, "GET", "/healthz").status == 200, 30, "pdp", pdp)
        gateway = Gateway(name, work / name, pdp_port, upstream_port, env={"GOMAXPROCS": "1"})
        try:
            check = gateway.send("GET", PROTECTED, {"X-User-Id": "alice"})
            assert check.upstream is not None, (check.status, check.body[:200])
            targets = {
                "direct": f"http://127.0.0.1:{upstream_port}/api/bench",
                "proxy": f"http://127.0.0.1:{gateway.port}/healthz",
                "with pdp": f"http://127.0.0.1:{gateway.port}{PROTECTED}",
            }
            results: dict[str, list[tuple[float, float, float, int]]] = {t: [] for t in targets}
            for _ in range(args.rounds):
                for target, url in targets.items():
                    _wrk(url, argparse.Namespace(**{**vars(args), "duration": 2}))  # warm-up
                    results[target].append(_wrk(url, args))
            return results
        finally:
            gateway.stop()
    finally:
        pdp.stop()


def orchestrate(args: argparse.Namespace) -> None:
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install -y wrk)")
    me = [sys.executable, str(Path(__file__).resolve())]
    print(f"wrk -t1 -c{args.connections} -d{args.duration}s, {args.rounds} rounds; medians")
    print(f"{'gateway':<9}{'target':<10}{'p50 ms':>8}{'p99 ms':>8}{'req/s':>9}   added by pdp")
    with tempfile.TemporaryDirectory(prefix="pdp-bench-gw-") as tmp:
        work = Path(tmp)
        upstream_port = free_port()
        upstream = Proc("upstream", [*me, "--upstream", str(upstream_port)], work / "up.log")
        try:
            poll(
                lambda: request(upstream_port, "GET", "/x").status == 200, 30, "upstream", upstream
            )
            for name in args.only:
                results = _bench_gateway(name, upstream_port, work, args)
                medians = {
                    target: tuple(_median([r[i] for r in runs]) for i in range(3))
                    for target, runs in results.items()
                }
                bad = sum(r[3] for runs in results.values() for r in runs)
                for target, (p50, p99, rps) in medians.items():
                    added = ""
                    if target == "with pdp":
                        proxy = medians["proxy"]
                        added = f"   p50 +{p50 - proxy[0]:.2f} ms, p99 +{p99 - proxy[1]:.2f} ms"
                    print(f"{name:<9}{target:<10}{p50:>8.2f}{p99:>8.2f}{rps:>9.0f}{added}")
                if bad:
                    print(f"{name:<9}non-2xx answers: {bad}")
        finally:
            upstream.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=list(GATEWAYS), choices=GATEWAYS)
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pdp", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream is not None:
        asyncio.run(_serve_upstream(args.upstream))
    elif args.pdp is not None:
        asyncio.run(_serve_pdp(args.pdp, args.mode))
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
