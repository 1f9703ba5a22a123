"""Timing: in-process cost per check, and server throughput over loopback HTTP.

In-process: rounds; in each, every engine answers the same random sample of the
queries it can express (engines in a rotated order), each call timed with
`perf_counter_ns`. Reported per engine: median and p99 over all rounds, and the
ratio of its median to pdp's in the same round (the median of those ratios: the
machine is shared and noisy, a ratio within a round survives that).

Server: pdp's `POST /access/v1/evaluation` (`pdp_server`) and the Cerbos server's
`POST /api/check/resources`, each pinned to the same CPU (Cerbos with GOMAXPROCS=1),
wrk (one thread) pinned to the other, closed loop, each query's body in turn;
connection counts and the two servers alternate in rounds.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtests.bench_http import LUA
from loadtests.peers.dataset import Query
from loadtests.peers.engines import InProcess
from loadtests.profiles import sample_percentile

HERE = Path(__file__).resolve().parent
EVALUATION = "/access/v1/evaluation"


# --- in process ----------------------------------------------------------------------


def _timed(check: Callable[[Query], bool], queries: Sequence[Query]) -> list[int]:
    clock, out = time.perf_counter_ns, []
    for query in queries:
        started = clock()
        check(query)
        out.append(clock() - started)
    return out


def in_process(
    engines: Sequence[InProcess],
    queries: Sequence[Query],
    excluded: dict[str, frozenset[int]],
    rounds: int,
    per_round: int,
    seed: int = 11,
) -> dict[str, dict[str, Any]]:
    """Per engine: median_us, p99_us, calls, round medians and ratio_to_pdp."""
    rng = random.Random(seed)
    samples: dict[str, list[int]] = {e.name: [] for e in engines}
    medians: dict[str, list[float]] = {e.name: [] for e in engines}
    for n in range(rounds):
        picked = rng.sample(range(len(queries)), min(per_round, len(queries)))
        order = list(engines[n % len(engines) :]) + list(engines[: n % len(engines)])
        for engine in order:
            skip = excluded.get(engine.name, frozenset())
            ns = _timed(engine.check, [queries[i] for i in picked if i not in skip])
            samples[engine.name] += ns
            medians[engine.name].append(statistics.median(ns) / 1000)
    out: dict[str, dict[str, Any]] = {}
    for engine in engines:
        ns = samples[engine.name]
        ratios = [m / p for m, p in zip(medians[engine.name], medians.get("pdp", []), strict=False)]
        out[engine.name] = {
            "median_us": round(statistics.median(ns) / 1000, 2),
            "p99_us": round((sample_percentile(ns, 0.99) or 0) / 1000, 2),
            "calls": len(ns),
            "round_medians_us": [round(m, 2) for m in medians[engine.name]],
            "ratio_to_pdp": round(statistics.median(ratios), 2) if ratios else None,
            "build_s": round(engine.build_s, 2),
        }
    return out


# --- servers -------------------------------------------------------------------------


def pin(cpus: set[int]) -> list[str]:
    return ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if shutil.which("taskset") else []


def cpu_split() -> tuple[set[int], set[int]]:
    """(server CPU, client CPUs): the last CPU for the servers, the rest for wrk."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return set(cpus), set(cpus)
    return {cpus[-1]}, set(cpus[:-1])


def start_pdp(
    users: int, seed: int, now: float, log: Path, cpus: set[int]
) -> tuple[subprocess.Popen[str], int]:
    command = [*pin(cpus), sys.executable, "-m", "loadtests.peers.pdp_server",
               "--users", str(users), "--seed", str(seed), "--now", repr(now)]  # fmt: skip
    with log.open("ab") as err:
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=err, text=True, cwd=HERE.parent.parent
        )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("PORT "):
            return proc, int(line.split()[1])
    raise RuntimeError(f"pdp server exited before listening ({proc.wait()}); see {log}")


class Client:
    """One keep-alive HTTP/1.1 connection to a loopback server."""

    def __init__(self, port: int) -> None:
        self._conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def post(self, path: str, body: bytes) -> bytes:
        self._conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = self._conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:300]!r}")
        return data

    def close(self) -> None:
        self._conn.close()


@dataclass(frozen=True, slots=True)
class WrkResult:
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def wrk(
    port: int, path: str, bodies: Path, connections: int, seconds: int, cpus: set[int]
) -> WrkResult:
    """wrk -t1 closed loop, the bodies in turn; requests/s and latency percentiles."""
    script = bodies.with_suffix(f".{connections}.lua")
    script.write_text(LUA % {"bodies": bodies, "path": path})
    out = subprocess.run(
        [*pin(cpus), "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
         "-s", str(script), f"http://127.0.0.1:{port}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    requests, micros, p50, p99, _mean, errors = line.split()[1:]
    return WrkResult(connections, int(requests) / (int(micros) / 1e6), float(p50) / 1000,
                     float(p99) / 1000, int(errors))  # fmt: skip


def throughput(
    servers: dict[str, tuple[int, str, Path]],
    connections: Sequence[int],
    rounds: int,
    seconds: int,
    warmup: int,
    cpus: set[int],
) -> dict[str, dict[str, Any]]:
    """`servers`: name -> (port, path, bodies file). Per connection count and server:
    the median round's checks/s, p50, p99, every round's rate, and the ratio to the
    first server per round (median)."""
    runs: dict[tuple[int, str], list[WrkResult]] = {}
    names = list(servers)
    for n in range(rounds):
        for c in connections:
            for name in names[n % 2 :] + names[: n % 2]:
                port, path, bodies = servers[name]
                if n == 0:
                    wrk(port, path, bodies, c, warmup, cpus)
                runs.setdefault((c, name), []).append(wrk(port, path, bodies, c, seconds, cpus))
    out: dict[str, dict[str, Any]] = {}
    for c in connections:
        row: dict[str, Any] = {}
        first = runs[(c, names[0])]
        for name in names:
            results = runs[(c, name)]
            middle = sorted(results, key=lambda r: r.rps)[len(results) // 2]
            ratios = [r.rps / f.rps for r, f in zip(results, first, strict=True)]
            row[name] = {
                **asdict(middle),
                "rps": round(middle.rps),
                "round_rps": [round(r.rps) for r in results],
                f"ratio_to_{names[0]}": round(statistics.median(ratios), 3),
            }
        out[str(c)] = row
    return out


def tool_versions(tools: Path, cerbos_binary: Path | None) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    found = {}
    for name in ("cedarpy", "casbin"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    for meta in (tools / "opa").glob("opa_golib_python_bindings-*.dist-info/METADATA"):
        match = re.search(r"^Version: (\S+)", meta.read_text(), re.MULTILINE)
        if match:
            found["opa-golib-python-bindings"] = match.group(1)
    if cerbos_binary is not None and cerbos_binary.exists():
        shown = subprocess.run([str(cerbos_binary), "--version"], capture_output=True,
                               text=True, check=False).stdout  # fmt: skip
        match = re.search(r"(\d+\.\d+\.\d+)", shown)
        found["cerbos"] = match.group(1) if match else shown.strip()[:40]
    return found


def write_bodies(path: Path, bodies: Sequence[bytes]) -> Path:
    path.write_bytes(b"\n".join(bodies) + b"\n")
    return path


def pdp_body(q: Query, tenant: str) -> bytes:
    return json.dumps({
        "subject": {"type": "user", "id": q.user, "properties": {"tenant": tenant}},
        "action": {"name": q.action},
        "resource": {"type": q.rtype, "id": q.rid},
    }, separators=(",", ":")).encode()  # fmt: skip


def pdp_allowed(response: bytes) -> bool:
    return json.loads(response)["decision"] is True
