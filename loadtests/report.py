"""Turn one run's files into `summary.json`, a table and PNG plots.

Reads what the run left in its directory: Locust's `<phase>.json` (final stats with
response-time histograms), the locustfile's `timeline-<phase>.jsonl` and
`propagation-*.jsonl`, and the /metrics scrapes the runner took around each phase.
Client-side latency is Locust's (its own CPU use on a 2-core machine inflates it);
server-side is the sidecar's `pdp_decision_duration_seconds`, interpolated from its
histogram buckets as Prometheus' `histogram_quantile` does.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtests.profiles import (
    EVALUATION_PREFIX,
    MIN_REVISION,
    POLL,
    PROPAGATION_TYPE,
    Measured,
    Profile,
    Verdict,
    bucket_percentile,
    busiest_generator,
    cpu_stats,
    evaluate_gates,
    histogram_delta,
    is_generator,
    locust_percentile,
    merge_histograms,
    most_starved_generator,
    parse_histogram,
    run_passed,
    sample_percentile,
    tail_by_generator_load,
)

if TYPE_CHECKING:  # matplotlib is imported only when plotting (heavy)
    from matplotlib.figure import Figure

DECISION_HISTOGRAM = "pdp_decision_duration_seconds"
QUANTILES = (0.5, 0.95, 0.99)
CPU_NOTE = (
    "client latency is measured by Locust on the same 2-core machine as the sidecar:"
    " its own CPU use inflates it; the server-side column is the sidecar's own"
    " pdp_decision_duration_seconds (parse, decide, serialize)"
)


def _is_eval(entry: dict[str, Any]) -> bool:
    return bool(entry["method"] == "POST" and entry["name"].startswith(EVALUATION_PREFIX))


def _groups(entries: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Table rows -> the Locust entries they combine."""

    def pick(test: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        return [e for e in entries if test(e)]

    return {
        "single evaluations": pick(_is_eval),
        **{e["name"]: [e] for e in sorted(entries, key=lambda e: e["name"]) if _is_eval(e)},
        "evaluations batch": pick(lambda e: e["name"] == "evaluations batch"),
        "searches": pick(lambda e: e["name"].startswith("search ")),
        "writer poll checks": pick(lambda e: e["name"] == "writer poll"),
        "pg commit": pick(lambda e: e["method"] == "pg"),
        "commit-to-visible poll": pick(
            lambda e: e["method"] == PROPAGATION_TYPE and e["name"] == POLL
        ),
        "commit-to-visible min-revision": pick(
            lambda e: e["method"] == PROPAGATION_TYPE and e["name"] == MIN_REVISION
        ),
    }


def entry_row(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Requests, failures, rate and percentiles (ms) of Locust entries combined."""
    requests = sum(e["num_requests"] for e in entries)
    if not requests:
        return None
    histogram = merge_histograms(e["response_times"] for e in entries)
    span = max(e["last_request_timestamp"] or 0 for e in entries) - min(
        e["start_time"] for e in entries
    )
    return {
        "requests": requests,
        "failures": sum(e["num_failures"] for e in entries),
        "rps": round(requests / span, 1) if span > 0 else None,
        **{f"p{round(q * 100)}": locust_percentile(histogram, q) for q in QUANTILES},
        "max": max(e["max_response_time"] for e in entries),
    }


def server_side(before: str, after: str) -> dict[str, Any]:
    """Count and percentiles (ms) of the decisions the sidecar timed between scrapes."""
    delta = histogram_delta(
        parse_histogram(before, DECISION_HISTOGRAM), parse_histogram(after, DECISION_HISTOGRAM)
    )
    row: dict[str, Any] = {"requests": int(delta[-1][1]) if delta else 0}
    for q in QUANTILES:
        value = bucket_percentile(delta, q)
        row[f"p{round(q * 100)}"] = None if value is None else round(value * 1000, 3)
    return row


def propagation_samples(out: Path) -> dict[str, list[dict[str, Any]]]:
    samples: dict[str, list[dict[str, Any]]] = {POLL: [], MIN_REVISION: []}
    for path in sorted(out.glob("propagation-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            sample = json.loads(line)
            samples.setdefault(sample["kind"], []).append(sample)
    return samples


def propagation_row(samples: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [s["ms"] for s in samples if "error" not in s]
    row: dict[str, Any] = {"samples": len(samples), "errors": len(samples) - len(ok)}
    for q in (*QUANTILES, 1.0):
        row["max" if q == 1.0 else f"p{round(q * 100)}"] = sample_percentile(ok, q)
    reasons: dict[str, int] = {}
    for s in samples:
        if s.get("reason"):
            reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
    if reasons:
        row["reasons"] = reasons
    return row


def load_stats(out: Path, phase: str) -> list[dict[str, Any]]:
    """Locust's final stats entries: the locustfile's `stats-<phase>.json` (right in
    multi-process mode too), else Locust's own `--json-file` output."""
    for path in (out / f"stats-{phase}.json", out / f"{phase}.json"):
        if path.exists():
            entries: list[dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))
            if entries:
                return entries
    return []


def _phase(out: Path, name: str, measured: dict[str, Any], duration_s: int) -> dict[str, Any]:
    entries = load_stats(out, name)
    wall = measured.get("cpu_wall_s") or duration_s
    rows = {label: entry_row(group) for label, group in _groups(entries).items()}
    server = server_side(measured["metrics_before"], measured["metrics_after"])
    return {
        "rows": {label: row for label, row in rows.items() if row is not None},
        "all": entry_row(entries),
        "server": server,
        "cpu_cores": {
            "sidecar": round(measured["sidecar_cpu_s"] / wall, 2),
            "locust": round(measured["locust_cpu_s"] / wall, 2),
            **{
                role: round(seconds / wall, 2)
                for role, seconds in sorted(measured.get("cpu_s_by_process", {}).items())
                if is_generator(role)
            },
        },
        **cpu_beside_latency(out, name),
        "cpu_ms_per_decision": cpu_per_decision(measured, server["requests"]),
        "locust_command": measured["command"],
    }


def cpu_per_decision(measured: dict[str, Any], decisions: int) -> dict[str, float | None]:
    """CPU milliseconds the sidecar and Locust spent per decision the sidecar made over
    the phase (both counted over the same span): what each side costs, whatever the
    contention on the machine."""
    if not decisions:
        return {"sidecar": None, "locust": None}
    return {
        "sidecar": round(measured["sidecar_cpu_s"] * 1000 / decisions, 3),
        "locust": round(measured["locust_cpu_s"] * 1000 / decisions, 3),
    }


def cpu_beside_latency(out: Path, phase: str) -> dict[str, Any]:
    """From `cpu-<phase>.jsonl` and `timeline-<phase>.jsonl`: per-process CPU
    statistics and the tail split by whether the generator was saturated."""
    cpu_path, timeline_path = out / f"cpu-{phase}.jsonl", out / f"timeline-{phase}.jsonl"
    if not cpu_path.exists():
        return {}
    samples = _jsonl([cpu_path])
    timeline = _jsonl([timeline_path]) if timeline_path.exists() else []
    steady = steady_from(timeline)
    result: dict[str, Any] = {
        "cpu_per_second": cpu_stats([s for s in samples if s["t"] >= steady],
                                    os.cpu_count() or 1),
    }  # fmt: skip
    if timeline:
        result["tail_by_generator_load"] = tail_by_generator_load(
            [w for w in timeline if w["t"] > steady], samples
        )
    probe_path = out / f"probe-{phase}.jsonl"
    if probe_path.exists():
        probes = [p for p in _jsonl([probe_path]) if p["t"] >= steady]
        result["probe"] = propagation_row(probes)
    return result


def steady_from(timeline: list[dict[str, Any]]) -> float:
    """When every user was spawned (Locust's statistics restart then): the start of
    the first timeline window at the final user count; 0 without a timeline."""
    if not timeline:
        return 0.0
    final = timeline[-1]["users"]
    ends = [w["t"] for w in timeline]
    for i, window in enumerate(timeline):
        if window["users"] == final:
            return float(ends[i - 1]) if i else float(ends[0]) - 2.0
    return 0.0


def machine() -> dict[str, Any]:
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def summarize(
    profile: Profile, out: Path, measured: dict[str, Any], *, ready_s: float, seeded: bool
) -> dict[str, Any]:
    """The run as one JSON-ready dict, gates judged."""
    main = _phase(out, "main", measured["main"], profile.duration_s)
    samples = propagation_samples(out)
    propagation = {kind: propagation_row(s) for kind, s in samples.items() if s}
    evals = main["rows"].get("single evaluations", {})
    total = main["all"] or {"requests": 0, "failures": 0}
    verdicts = evaluate_gates(
        profile.gates,
        Measured(
            eval_p95_ms=evals.get("p95"),
            eval_p99_ms=evals.get("p99"),
            requests=total["requests"],
            failures=total["failures"],
            propagation_p99_ms=propagation.get(POLL, {}).get("p99"),
        ),
    )
    summary: dict[str, Any] = {
        "profile": profile.name,
        "description": profile.description,
        "duration_s": profile.duration_s,
        "dataset": {"tenants": profile.tenants, "users": profile.users, "seeded_now": seeded},
        "mix": profile.mix.to_json(),
        "locust_processes": profile.processes,
        "locust_workers": profile.workers,  # > 0: distributed mode, a master and N workers
        "sidecar_ready_s": round(ready_s, 2),
        "machine": machine(),
        "main": main,
        "propagation": propagation,
        "gates": [
            {
                "gate": v.name,
                "limit": v.limit,
                "measured": v.measured,
                "passed": v.passed,
                "gating": v.gating,
            }
            for v in verdicts
        ],
        "passed": run_passed(verdicts),
        "note": CPU_NOTE,
    }
    if "unpaced" in measured:
        summary["unpaced"] = _phase(out, "unpaced", measured["unpaced"], profile.unpaced_s)
    return summary


# --- the table ---------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 1 else f"{value:.1f}"


def _line(label: str, row: dict[str, Any]) -> str:
    rps = "-" if row.get("rps") is None else f"{row['rps']:,.0f}"
    return (
        f"  {label:<36} {row.get('requests', row.get('samples', 0)):>9,} {rps:>7}"
        f" {_ms(row.get('p50')):>7} {_ms(row.get('p95')):>7} {_ms(row.get('p99')):>7}"
        f" {_ms(row.get('max')):>8} {row.get('failures', row.get('errors', 0)):>6}"
    )


def table(summary: dict[str, Any]) -> str:
    """A short human-readable table of the run (stdout)."""
    head = f"  {'':<36} {'requests':>9} {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7}"
    head += f" {'max ms':>8} {'fails':>6}"
    main = summary["main"]
    lines = [f"\n{summary['profile']}: {summary['duration_s']} s, {summary['description']}", head]
    lines += [_line(label, row) for label, row in main["rows"].items()]
    lines.append(_line("server-side decision time", main["server"]))
    if "probe" in main:
        lines.append(_line("probe (the runner, 20 checks/s)", main["probe"]))
    for kind, row in summary["propagation"].items():
        lines.append(_line(f"propagation samples ({kind})", row))
    cpu = main["cpu_cores"]
    lines.append("  CPU cores used (mean over the phase): " + ", ".join(
        f"{role} {cores}" for role, cores in cpu.items()
    ))  # fmt: skip
    per = main.get("cpu_ms_per_decision", {})
    if per.get("sidecar") is not None:
        lines.append(f"  CPU per decision: sidecar {per['sidecar']} ms, Locust {per['locust']} ms")
    for role, stats in main.get("cpu_per_second", {}).items():
        if role.endswith(".wait"):
            lines.append(
                f"    {role:<14} waited for a CPU p95 {stats['p95']} max {stats['max']} s/s,"
                f" starved (>= 0.5 s/s) in {stats['saturated_share']:.0%} of seconds"
            )
        else:
            lines.append(
                f"    {role:<14} per second: p95 {stats['p95']} max {stats['max']} cores,"
                f" saturated in {stats['saturated_share']:.0%} of seconds"
            )
    for group, row in main.get("tail_by_generator_load", {}).items():
        lines.append(
            f"    {group}: {row['windows']} windows, {row['evaluations']:,} evaluations,"
            f" {row['over_100ms']:,} >= 100 ms, worst window p99 {_ms(row['worst_p99_ms'])} ms"
        )
    if "unpaced" in summary:
        unpaced = summary["unpaced"]
        evals = unpaced["rows"].get("single evaluations", {})
        lines.append(
            f"  unpaced: {evals.get('rps') or 0:,.0f} evaluations/s"
            f" (p95 {_ms(evals.get('p95'))} ms client, {_ms(unpaced['server']['p95'])} ms server;"
            f" CPU cores sidecar {unpaced['cpu_cores']['sidecar']},"
            f" locust {unpaced['cpu_cores']['locust']})"
        )
    lines.append(f"  note: {summary['note']}")
    for gate in summary["gates"]:
        verdict = Verdict(gate["gate"], gate["limit"], gate["measured"], gate.get("gating", True))
        lines.append(f"  {verdict.line()}")
    lines.append("  result: " + ("PASS" if summary["passed"] else "FAIL"))
    return "\n".join(lines)


# --- plots -------------------------------------------------------------------------------


def _jsonl(paths: Iterable[Path]) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        rows += [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x]
    return rows


def plot(out: Path) -> list[Path]:
    """latency.png, throughput.png, cpu.png and propagation.png (small) from the run's files."""
    import matplotlib  # noqa: PLC0415  (heavy; only the runner plots)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    written = []
    timeline = (
        _jsonl([out / "timeline-main.jsonl"]) if (out / "timeline-main.jsonl").exists() else []
    )
    if timeline:
        t0 = timeline[0]["t"]
        xs = [row["t"] - t0 for row in timeline]
        fig, ax = plt.subplots(figsize=(7, 3), dpi=90)
        for q, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
            ax.plot(xs, [row[q] for row in timeline], style, label=q)
        ax.set(
            xlabel="seconds", ylabel="ms", title="Single evaluations: client latency (2 s windows)"
        )
        ax.legend(loc="upper right")
        written.append(_save(fig, out / "latency.png"))
        fig, ax = plt.subplots(figsize=(7, 3), dpi=90)
        ax.plot(xs, [row["eval_rps"] for row in timeline], label="single evaluations/s")
        ax.plot(xs, [row["rps"] for row in timeline], "--", label="all requests/s")
        ax.plot(xs, [row["fails_per_s"] for row in timeline], ":", label="failures/s")
        users = ax.twinx()
        users.plot(xs, [row["users"] for row in timeline], color="grey", alpha=0.4)
        users.set_ylabel("Locust users")
        users.set_ylim(bottom=0)
        ax.set(xlabel="seconds", ylabel="per second", title="Throughput")
        ax.legend(loc="lower right")
        written.append(_save(fig, out / "throughput.png"))
    cpu_path = out / "cpu-main.jsonl"
    if timeline and cpu_path.exists():
        written.append(_plot_cpu(timeline, _jsonl([cpu_path]), out / "cpu.png"))
    samples = propagation_samples(out)
    if any(samples.values()):
        fig, ax = plt.subplots(figsize=(7, 3), dpi=90)
        for kind, rows in samples.items():
            ms = sorted(s["ms"] for s in rows if "error" not in s)
            if ms:
                ax.step(ms, [(i + 1) / len(ms) for i in range(len(ms))], where="post", label=kind)
        ax.set(xlabel="ms from COMMIT acknowledged to the new decision", ylabel="share of changes",
               title="Commit-to-visible (CDF)")  # fmt: skip
        ax.legend(loc="lower right")
        written.append(_save(fig, out / "propagation.png"))
    return written


def _plot_cpu(timeline: list[dict[str, Any]], samples: list[dict[str, Any]], path: Path) -> Path:
    """Cores per process each second (the busiest Locust process bold) under the
    single evaluations' p99 per timeline window: the generator's CPU beside the tail."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    t0 = timeline[0]["t"]
    fig, (lat, cpu) = plt.subplots(2, 1, figsize=(7, 4.5), dpi=90, sharex=True)
    lat.plot([r["t"] - t0 for r in timeline], [r["p99"] for r in timeline], label="p99")
    lat.plot([r["t"] - t0 for r in timeline], [r["p95"] for r in timeline], "--", label="p95")
    lat.set(ylabel="ms (log)", yscale="log", title="Single evaluations vs CPU per process")
    lat.legend(loc="upper right")
    kept = [s for s in samples[1:] if s["t"] >= t0]
    xs = [s["t"] - t0 for s in kept]
    roles = sorted({k for s in kept for k in s if is_generator(k) or k == "sidecar"})
    for role in roles:
        cpu.plot(xs, [s.get(role, 0.0) for s in kept], lw=0.8, label=role)
    cpu.plot(xs, [busiest_generator(s) for s in kept], "k", lw=1.6, label="busiest Locust")
    cpu.plot(xs, [most_starved_generator(s) for s in kept], "r--", lw=1, label="Locust wait s/s")
    cpu.plot(xs, [s["machine"] for s in kept], ":", color="grey", label="machine")
    cpu.plot(xs, [s.get("others", 0.0) for s in kept], "-.", color="grey", label="others")
    cpu.set(xlabel="seconds", ylabel="cores")
    cpu.legend(loc="upper right", fontsize=7, ncol=2)
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    fig.clf()
    import matplotlib.pyplot as plt  # noqa: PLC0415

    plt.close(fig)
    return path
