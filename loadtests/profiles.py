"""Load-test profiles, their gates, and the pure statistics the gates are judged on.

No I/O: percentiles from Locust's response-time histograms and from Prometheus
histogram buckets, and the gate verdicts, are plain functions tested by tables
(`tests/test_loadtest.py`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

# Locust request names (type POST) of single evaluations: the gated population.
EVALUATION_PREFIX = "evaluation "
# The writer's measurements: request type and names (see locustfile.Writer).
PROPAGATION_TYPE = "commit-to-visible"
POLL = "poll"
MIN_REVISION = "min-revision"


@dataclass(frozen=True, slots=True)
class Gates:
    """Limits a run must meet; None means not gated (still reported)."""

    p95_ms: float | None = None
    p99_ms: float | None = None
    max_failure_ratio: float = 0.0
    propagation_p99_ms: float | None = None
    # False: the latency and propagation limits are reported beside the measurement but do not
    # fail the run (CI on a shared machine; timing targets belong to benchmarks there).
    timing_gated: bool = True


@dataclass(frozen=True, slots=True)
class Mix:
    """What the Locust users do. Rates are totals per second across all users of a kind.

    `eval_rate` None means no pacing: each evaluation user waits `think_time`
    (uniform between the two bounds, seconds) or, when that is None too, not at all.
    """

    eval_users: int
    eval_rate: float | None = None
    think_time: tuple[float, float] | None = None
    allow_share: float = 0.75
    scoped_share: float = 0.6
    batch_users: int = 0
    batch_rate: float = 0.0
    batch_size: int = 20
    search_users: int = 0
    search_rate: float = 0.0
    writer_rate: float = 0.0  # committed permission changes per second (one writer user)

    def user_classes(self) -> dict[str, int]:
        """Locust user class name -> number of users, for the classes that run."""
        counts = {
            "Evaluator": self.eval_users,
            "BatchEvaluator": self.batch_users,
            "Searcher": self.search_users,
            "Writer": 1 if self.writer_rate > 0 else 0,
        }
        return {name: n for name, n in counts.items() if n > 0}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Profile:
    """One named load test: dataset size, the mix, how long, and its gates."""

    name: str
    description: str
    users: int  # dataset users per tenant
    duration_s: int
    mix: Mix
    gates: Gates
    tenants: int = 1
    spawn_rate: float = 100.0
    processes: int = 1  # Locust processes (>1: `--processes N`, N forked workers)
    # Distributed mode: a `--master` process and this many `--worker` processes (0: off).
    workers: int = 0
    unpaced_s: int = 0  # a following unpaced phase measuring the highest rate reached
    unpaced_users: int = 32
    restart_at: float | None = None  # fraction of the duration: restart the sidecar then
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def database(self) -> str:
        """The database this profile's dataset lives in (shared by equal sizes)."""
        return f"pdp_load_u{self.users}_t{self.tenants}"

    def unpaced_mix(self) -> Mix:
        return Mix(eval_users=self.unpaced_users, allow_share=self.mix.allow_share)


_PACED_GATES = Gates(p95_ms=10.0, p99_ms=25.0, max_failure_ratio=0.0, propagation_p99_ms=100.0)

PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            name="smoke",
            description="CI: 2,000 evaluations/s paced, writes, batch and search; 10,000 users",
            users=10_000,
            duration_s=30,
            mix=Mix(
                eval_users=40,
                eval_rate=2000.0,
                batch_users=1,
                batch_rate=5.0,
                search_users=1,
                search_rate=5.0,
                writer_rate=4.0,
            ),
            gates=_PACED_GATES,
            spawn_rate=100.0,
            unpaced_s=10,
        ),
        Profile(
            name="standard",
            description="1,000 Locust users at 2,000 evaluations/s paced; 100,000 users",
            users=100_000,
            duration_s=120,
            mix=Mix(
                eval_users=1000,
                eval_rate=2000.0,
                batch_users=2,
                batch_rate=10.0,
                search_users=2,
                search_rate=10.0,
                writer_rate=4.0,
            ),
            gates=_PACED_GATES,
            spawn_rate=250.0,
            unpaced_s=20,
        ),
        Profile(
            name="seed-target",
            description="10,000 concurrent users with 5-15 s think time (~1,000 checks/s)",
            users=100_000,
            duration_s=150,
            mix=Mix(eval_users=10_000, think_time=(5.0, 15.0), writer_rate=2.0),
            gates=Gates(p95_ms=100.0, max_failure_ratio=0.0),
            spawn_rate=500.0,
            workers=2,  # distributed mode: a master and two worker processes
        ),
        Profile(
            name="soak",
            description="30 min at 1,000 evaluations/s with writes; sidecar restart at half time",
            users=100_000,
            duration_s=1800,
            mix=Mix(
                eval_users=200,
                eval_rate=1000.0,
                batch_users=1,
                batch_rate=5.0,
                search_users=1,
                search_rate=5.0,
                writer_rate=2.0,
            ),
            # The restart refuses connections for the seconds a snapshot load takes.
            gates=Gates(p95_ms=10.0, p99_ms=50.0, max_failure_ratio=0.01, propagation_p99_ms=250.0),
            spawn_rate=100.0,
            restart_at=0.5,
        ),
    )
}


# --- statistics ----------------------------------------------------------------------


def locust_percentile(histogram: Mapping[float, int], q: float) -> float | None:
    """The q-quantile (0..1) of a Locust response-time histogram {ms bucket: count}.

    Locust's own rule (`calculate_response_time_percentile`), so the figure matches
    its CSV: the largest bucket with at most floor(q * n) requests below it. None
    when empty.
    """
    total = sum(histogram.values())
    if total == 0:
        return None
    allowed_below = int(total * q)
    seen = 0
    for bucket in sorted(histogram, reverse=True):
        seen += histogram[bucket]
        if total - seen <= allowed_below:
            return float(bucket)
    return float(min(histogram))


def merge_histograms(histograms: Iterable[Mapping[Any, int]]) -> dict[float, int]:
    """Sum Locust histograms (JSON keys are strings)."""
    merged: dict[float, int] = {}
    for histogram in histograms:
        for bucket, count in histogram.items():
            key = float(bucket)
            merged[key] = merged.get(key, 0) + count
    return merged


def sample_percentile(samples: Sequence[float], q: float) -> float | None:
    """Nearest-rank q-quantile of raw samples; None when there are none."""
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def bucket_percentile(buckets: Sequence[tuple[float, float]], q: float) -> float | None:
    """The q-quantile of a Prometheus histogram, as `histogram_quantile` computes it.

    `buckets` are (upper bound, cumulative count) sorted by bound, ending at +Inf.
    Linear interpolation inside the bucket the rank falls in; the first bucket's
    lower bound is 0; a rank in +Inf answers the largest finite bound. None when empty.
    """
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(bound):
                return lower
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 0.0)
        lower, below = bound, cumulative
    return lower


def parse_histogram(text: str, name: str) -> list[tuple[float, float]]:
    """(le, cumulative count) of the unlabelled histogram `name` in Prometheus text."""
    prefix = f'{name}_bucket{{le="'
    buckets = []
    for line in text.splitlines():
        if line.startswith(prefix):
            bound, _, value = line[len(prefix) :].partition('"} ')
            buckets.append((float(bound), float(value)))
    return sorted(buckets)


def histogram_delta(
    before: Sequence[tuple[float, float]], after: Sequence[tuple[float, float]]
) -> list[tuple[float, float]]:
    """What `after` counted since `before` (bucket by bucket; `before` may be empty)."""
    earlier = dict(before)
    return [(bound, count - earlier.get(bound, 0.0)) for bound, count in after]


# --- gates ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    """One gate: what was measured against what was allowed."""

    name: str
    limit: float
    measured: float | None
    gating: bool = True  # False: reported only, the run's result does not depend on it

    @property
    def passed(self) -> bool:
        return self.measured is not None and self.measured <= self.limit

    def line(self) -> str:
        shown = "n/a" if self.measured is None else f"{self.measured:g}"
        if not self.gating:
            within = "within" if self.passed else "over"
            return f"INFO  {self.name}: {shown} ({within} limit {self.limit:g}, not gated)"
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name}: {shown} (limit {self.limit:g})"


@dataclass(frozen=True, slots=True)
class Measured:
    """What the gates read from one run."""

    eval_p95_ms: float | None
    eval_p99_ms: float | None
    requests: int
    failures: int
    propagation_p99_ms: float | None

    @property
    def failure_ratio(self) -> float | None:
        return self.failures / self.requests if self.requests else None


def evaluate_gates(gates: Gates, measured: Measured) -> list[Verdict]:
    """One verdict per configured gate. No requests at all fails the failure-ratio gate."""
    timed = gates.timing_gated
    verdicts = []
    if gates.p95_ms is not None:
        verdicts.append(Verdict("evaluation p95 ms", gates.p95_ms, measured.eval_p95_ms, timed))
    if gates.p99_ms is not None:
        verdicts.append(Verdict("evaluation p99 ms", gates.p99_ms, measured.eval_p99_ms, timed))
    verdicts.append(Verdict("failure ratio", gates.max_failure_ratio, measured.failure_ratio))
    if gates.propagation_p99_ms is not None:
        verdicts.append(
            Verdict(
                "propagation p99 ms", gates.propagation_p99_ms, measured.propagation_p99_ms, timed
            )
        )
    return verdicts


def run_passed(verdicts: list[Verdict]) -> bool:
    """The run's result: every gating verdict passed."""
    return all(v.passed for v in verdicts if v.gating)


# --- CPU beside latency ----------------------------------------------------------------

SATURATED_CORES = 0.9  # a Python process at >= 0.9 cores in a second is CPU-bound then
GENERATOR_ROLES = ("locust", "master")  # plus every `worker-N`


def is_generator(role: str) -> bool:
    return role in GENERATOR_ROLES or (role.startswith("worker-") and "." not in role)


def cpu_stats(
    samples: Sequence[Mapping[str, float]], machine_cores: int
) -> dict[str, dict[str, float]]:
    """Per key of the runner's 1 s CPU samples (roles, `<role>.wait`, `machine`,
    `others`): mean, p95 and max, and the share of seconds at or above the key's
    limit (`SATURATED_CORES`; `STARVED_WAIT` for a wait; every core but 5 % for the
    machine). `t` is skipped; the first sample (it counts process start-up) too."""
    by_role: dict[str, list[float]] = {}
    for sample in samples[1:]:
        for role, cores in sample.items():
            if role != "t":
                by_role.setdefault(role, []).append(cores)
    out = {}
    for role, values in sorted(by_role.items()):
        if role.endswith(".wait"):
            limit = STARVED_WAIT
        else:
            limit = 0.95 * machine_cores if role == "machine" else SATURATED_CORES
        out[role] = {
            "mean": round(sum(values) / len(values), 3),
            "p95": round(sample_percentile(values, 0.95) or 0.0, 3),
            "max": round(max(values), 3),
            "saturated_share": round(sum(1 for v in values if v >= limit) / len(values), 3),
        }
    return out


STARVED_WAIT = 0.5  # runnable but waiting for a CPU half of each second: starved


def busiest_generator(sample: Mapping[str, float]) -> float:
    """Cores of the busiest Locust process in one CPU sample (0 when none ran)."""
    return max((v for k, v in sample.items() if is_generator(k)), default=0.0)


def most_starved_generator(sample: Mapping[str, float]) -> float:
    """Run-queue wait (s/s) of the most starved Locust process in one CPU sample."""
    return max(
        (v for k, v in sample.items() if k.endswith(".wait") and is_generator(k[:-5])),
        default=0.0,
    )


def generator_short_of_cpu(sample: Mapping[str, float]) -> bool:
    """Some Locust process was CPU-bound (saturated) or starved (waiting for a CPU)."""
    return (
        busiest_generator(sample) >= SATURATED_CORES
        or most_starved_generator(sample) >= STARVED_WAIT
    )


def tail_by_generator_load(
    timeline: Sequence[Mapping[str, Any]], samples: Sequence[Mapping[str, float]]
) -> dict[str, dict[str, Any]]:
    """Split the timeline's windows by whether a Locust process was short of CPU in
    them (some CPU sample inside the window saturated or starved), and give each
    group's window count, evaluations, evaluations of 100 ms or more and worst window
    p99: if the slow ones sit in the short windows, the generator is the bottleneck."""
    groups: dict[str, dict[str, Any]] = {
        name: {"windows": 0, "evaluations": 0.0, "over_100ms": 0, "worst_p99_ms": None}
        for name in ("generator short of CPU", "generator not short of CPU")
    }
    previous: float | None = None
    for window in timeline:
        end = float(window["t"])
        start = previous if previous is not None else end - 2.0
        previous = end
        inside = [s for s in samples if start < s["t"] <= end]
        short = any(generator_short_of_cpu(s) for s in inside)
        group = groups["generator short of CPU" if short else "generator not short of CPU"]
        group["windows"] += 1
        group["evaluations"] += float(window.get("eval_rps") or 0.0) * (end - start)
        group["over_100ms"] += int(window.get("over_100ms") or 0)
        p99 = window.get("p99")
        if p99 is not None and (group["worst_p99_ms"] is None or p99 > group["worst_p99_ms"]):
            group["worst_p99_ms"] = p99
    for group in groups.values():
        group["evaluations"] = round(group["evaluations"])
    return groups
