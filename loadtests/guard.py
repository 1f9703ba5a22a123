"""The CI regression guard: a short benchmark compared with a committed baseline.

    .venv/bin/python -m loadtests.guard [--rounds 5] [--seconds 3] [--write-baseline]

Prints the engine's median check (in process, `bench_engine`'s synthetic tenant) and
the HTTP ratio of pdp's `POST /access/v1/evaluation` requests/s to a bare aiohttp
handler's (`bench_http`'s servers, 16 connections each, both driven at once on one
CPU for `--rounds` rounds: see `http_ratios`; the median of the per-round ratios).
Absolute numbers move with the load on a shared machine, so only the ratio is judged:
the guard fails (exit 1) when it falls below `THRESHOLD` (0.8) of the baseline ratio
in `loadtests/baseline.json`, in the first measurement and again in a second one (a
noisy set of rounds is measured once more before it can fail). The engine median is
printed beside its baseline, never judged. `--write-baseline` stores this run's numbers
as the new baseline.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BASELINE = HERE / "baseline.json"
THRESHOLD = 0.8  # fail below this share of the baseline ratio
USERS = 20_000
CONNECTIONS = 16


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    ratio: float
    floor: float
    message: str


def verdict(baseline: dict[str, Any], ratio: float, threshold: float = THRESHOLD) -> Verdict:
    """Judge a measured HTTP ratio (pdp / bare req/s) against the baseline's `http_ratio`."""
    base = float(baseline["http_ratio"])
    if not base > 0:
        raise ValueError(f"the baseline's http_ratio must be positive, not {base}")
    floor = base * threshold
    ok = ratio >= floor
    relative = ratio / base
    message = (
        f"HTTP ratio {ratio:.2f} is {relative:.0%} of the baseline {base:.2f} "
        f"(fails below {floor:.2f}, {threshold:.0%} of it)"
    )
    if not ok:
        message = "REGRESSION: " + message
    return Verdict(ok, ratio, floor, message)


def engine_median_ns(users: int = USERS, checks: int = 50_000) -> float:
    """The engine's median check latency in ns over `bench_engine`'s synthetic tenant."""
    from loadtests import bench_engine  # noqa: PLC0415 -- imports pdp: only when measuring
    from pdp.engine import Engine, Snapshot  # noqa: PLC0415 -- as above

    engine = Engine.build(bench_engine.synthetic(users, 1), Snapshot(1, 1, frozenset()))
    gc.collect()
    gc.freeze()
    latencies = bench_engine.bench_checks(engine, users, checks, 1)
    gc.unfreeze()
    return float(statistics.median(latencies))


def http_ratios(rounds: int, seconds: int) -> list[float]:
    """Per-round ratios of pdp's /evaluation req/s to the bare handler's.

    In each round both servers are driven at once, each by its own wrk, and they share
    one pinned CPU: the scheduler gives two busy processes equal time, so the ratio of
    their requests/s is the ratio of their costs per request, and whatever else runs on
    the machine takes from both alike (measuring them one after the other, as
    `bench_http` does, lets a burst of load land on one of them only).
    """
    from loadtests import bench_http as bh  # noqa: PLC0415 -- orchestration only

    me = [sys.executable, str(HERE / "bench_http.py")]
    server_cpus, wrk_cpus = bh._cpus()  # the bench's own helpers, reused
    with tempfile.TemporaryDirectory(prefix="pdp-guard-") as tmp:
        bodies = Path(tmp) / "single.jsonl"
        pdp, pdp_port, _ = bh._start(
            [*me, "--serve", "--users", str(USERS), "--batch", "100", "--routes", "10",
             "--workdir", tmp], server_cpus,
        )  # fmt: skip
        bare, bare_port, _ = bh._start([sys.executable, str(HERE / "bare_app.py")], server_cpus)
        script = Path(tmp) / "single.lua"
        script.write_text(bh.LUA % {"bodies": bodies, "path": bh.EVALUATION})
        try:
            _together(bh, (bare_port, pdp_port), script, wrk_cpus, 1)  # warm-up
            ratios = []
            for _ in range(rounds):
                b, p = _together(bh, (bare_port, pdp_port), script, wrk_cpus, seconds)
                ratios.append(p / b)
        finally:
            for proc in (pdp, bare):
                proc.kill()
                proc.wait()
    return ratios


def _together(
    bh: Any, ports: tuple[int, int], script: Path, cpus: set[int], seconds: int
) -> tuple[float, float]:
    """Requests/s of the two servers driven at the same time (one wrk each)."""
    procs = [
        subprocess.Popen(
            [
                *bh._pin(cpus),
                "wrk",
                "-t1",
                f"-c{CONNECTIONS}",
                f"-d{seconds}s",
                "--timeout",
                "5s",
                "-s",
                str(script),
                f"http://127.0.0.1:{port}",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for port in ports
    ]
    rates = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"wrk exited with {proc.returncode}")
        line = next(x for x in out.splitlines() if x.startswith("RESULT "))
        requests, micros, *_, errors = line.split()[1:]
        if int(errors):
            raise RuntimeError(f"wrk saw {errors} errors")
        rates.append(int(requests) / (int(micros) / 1e6))
    return rates[0], rates[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=3, help="measured seconds per run")
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    parser.add_argument("--write-baseline", action="store_true")
    args = parser.parse_args(argv)
    started = time.monotonic()
    engine_ns = engine_median_ns()
    print(f"engine: median check {engine_ns:.0f} ns ({USERS} users, in process)", flush=True)
    ratios = http_ratios(args.rounds, args.seconds)
    ratio = statistics.median(ratios)
    shown = ", ".join(f"{r:.2f}" for r in ratios)
    print(f"http: pdp / bare aiohttp {ratio:.2f} (median of rounds: {shown})", flush=True)
    if args.write_baseline:
        args.baseline.write_text(
            json.dumps({"http_ratio": round(ratio, 3), "engine_median_ns": round(engine_ns)}) + "\n"
        )
        print(f"baseline written to {args.baseline}")
        return 0
    baseline = json.loads(args.baseline.read_text())
    print(f"engine baseline {baseline.get('engine_median_ns')} ns (printed, not judged)")
    result = verdict(baseline, ratio)
    if not result.ok:  # one noisy set of rounds must not fail CI: measure again
        print(result.message + "; measuring once more", flush=True)
        ratios = http_ratios(args.rounds, args.seconds)
        ratio = statistics.median(ratios)
        shown = ", ".join(f"{r:.2f}" for r in ratios)
        print(f"http: pdp / bare aiohttp {ratio:.2f} (median of rounds: {shown})", flush=True)
        result = verdict(baseline, ratio)
    print(f"{result.message}  [{time.monotonic() - started:.0f} s]")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
