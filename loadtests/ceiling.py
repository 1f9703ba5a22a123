"""Throughput ceiling: the most checks/s the sidecar sustains at p99 <= 5 ms, measured
with wrk (compiled, closed loop) beside a bare aiohttp handler in the same run.

    .venv/bin/python -m loadtests.ceiling [--seconds 5] [--connections 1,2,4,...]

Both servers get the same AuthZEN bodies (labelled probes of the smoke dataset,
rotated by a wrk Lua script). Each connection count runs `wrk -t1 --latency`;
a server's ceiling is the highest Requests/sec among runs whose p99 is within the
limit. The ratio pdp/bare is the figure that matters: the machine's noise moves
both. With `--pin` (default) the server runs on CPU 0 and wrk on CPU 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtests.pg_dataset import build_manifest, ensure_dataset, server_url
from loadtests.profiles import PROFILES
from loadtests.run import RESULTS, SetupError, Sidecar, free_port, result_dir

HERE = Path(__file__).resolve().parent
P99_LIMIT_MS = 5.0
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}
_LATENCY = re.compile(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_ERRORS = re.compile(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)")

LUA = """
local bodies = {%s}
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i %% #bodies + 1
  return wrk.format(nil, "/access/v1/evaluation", nil, bodies[i])
end
"""


@dataclass(frozen=True, slots=True)
class WrkResult:
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: str


def parse_wrk(text: str, connections: int) -> WrkResult:
    """Requests/sec and the p50/p99 of `wrk --latency` output."""
    latency = {int(q): float(v) * _UNITS[unit] for q, v, unit in _LATENCY.findall(text)}
    rps = _RPS.search(text)
    if rps is None or 99 not in latency:
        raise SetupError(f"unexpected wrk output:\n{text}")
    errors = "; ".join(m.group(0) for m in _ERRORS.finditer(text))
    return WrkResult(connections, float(rps.group(1)), latency[50], latency[99], errors)


def ceiling(results: list[WrkResult], limit_ms: float = P99_LIMIT_MS) -> WrkResult | None:
    """The highest-rate run within the p99 limit (and with no errors)."""
    within = [r for r in results if r.p99_ms <= limit_ms and not r.errors]
    return max(within, key=lambda r: r.rps, default=None)


def lua_script(bodies: list[bytes]) -> str:
    quoted = ",".join("[[" + b.decode() + "]]" for b in bodies)
    return LUA % quoted


def _pin(pid: int, cpu: int, enabled: bool) -> None:
    if enabled and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(pid, {cpu})


def wrk(url: str, script: Path, connections: int, seconds: int, pin: bool) -> WrkResult:
    """One `wrk -t1` run (pinned to CPU 1)."""
    proc = subprocess.Popen(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _pin(proc.pid, 1, pin)
    out, _ = proc.communicate(timeout=seconds + 30)
    return parse_wrk(out, connections)


@contextmanager
def bare_app(pin: bool) -> Iterator[str]:
    """`bare_app.py` (the other engineer's baseline) on a free port; yields its URL."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "bare_app.py"), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until it listens (or exits: empty line)
        if not line.startswith("PORT "):
            raise SetupError("bare_app.py did not start")
        _pin(proc.pid, 0, pin)
        yield f"http://127.0.0.1:{int(line.split()[1])}/access/v1/evaluation"
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def measure(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Both servers up; for each connection count, wrk against pdp then the bare app
    (interleaved, so a noisy moment hits both)."""
    connections = [int(c) for c in args.connections.split(",")]
    results: dict[str, list[WrkResult]] = {"pdp": [], "bare": []}
    with server_url() as admin_url, contextlib.ExitStack() as stack:
        url, _ = asyncio.run(ensure_dataset(admin_url, PROFILES["smoke"]))
        script = _script(asyncio.run(build_manifest(url, PROFILES["smoke"], probes=500)), out)
        sidecar = Sidecar(url, free_port(), out / "sidecar.log", "tenant-1")
        stack.callback(sidecar.stop)
        sidecar.start()
        assert sidecar.proc is not None
        _pin(sidecar.proc.pid, 0, args.pin)
        targets = {
            "pdp": f"{sidecar.base}/access/v1/evaluation",
            "bare": stack.enter_context(bare_app(args.pin)),
        }
        for n in connections:
            for name, target in targets.items():
                r = wrk(target, script, n, args.seconds, args.pin)
                results[name].append(r)
                print(
                    f"  {name:<5} c={n:<4} {r.rps:>9,.0f} req/s  p50 {r.p50_ms:6.2f} ms"
                    f"  p99 {r.p99_ms:6.2f} ms {r.errors}"
                )
    best = {name: ceiling(runs) for name, runs in results.items()}
    pdp, bare = best["pdp"], best["bare"]
    return {
        "p99_limit_ms": P99_LIMIT_MS,
        "seconds": args.seconds,
        "pinned": args.pin,
        "runs": {name: [asdict(r) for r in runs] for name, runs in results.items()},
        "ceiling": {name: None if r is None else asdict(r) for name, r in best.items()},
        "ratio": pdp.rps / bare.rps if pdp and bare else None,
    }


def _script(manifest: dict[str, Any], out: Path) -> Path:
    """The wrk script rotating through 200 labelled probes of the manifest."""
    pools = manifest["probes"].values()
    probes = [p for by_decision in pools for pool in by_decision.values() for p in pool]
    path = out / "bodies.lua"
    path.write_text(lua_script([_body(p) for p in probes[:200]]), encoding="utf-8")
    return path


def _body(probe: list[str]) -> bytes:
    tenant, user, rtype, rid, action = probe
    entry = {
        "subject": {"type": "user", "id": user, "properties": {"tenant": tenant}},
        "resource": {"type": rtype, "id": rid},
        "action": {"name": action},
    }
    return json.dumps(entry, separators=(",", ":")).encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.ceiling", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seconds", type=int, default=5, help="per wrk run (default 5)")
    parser.add_argument("--connections", default="1,2,4,8,16,32,64", help="comma-separated")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin CPUs")
    args = parser.parse_args(argv)
    out = result_dir("ceiling", RESULTS)
    try:
        summary = measure(args, out)
    except SetupError as exc:
        print(f"ceiling: error: {exc}", file=sys.stderr)
        return 2
    (out / "ceiling.json").write_text(json.dumps(summary, indent=2) + "\n")
    for name, best in summary["ceiling"].items():
        shown = (
            "none within the limit"
            if best is None
            else f"{best['rps']:,.0f} checks/s at c={best['connections']}"
            + f" (p99 {best['p99_ms']:.2f} ms)"
        )
        print(f"  ceiling {name}: {shown}")
    if summary["ratio"] is not None:
        print(f"  ratio pdp / bare aiohttp: {summary['ratio']:.2f}")
    print(f"  results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
