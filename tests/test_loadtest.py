"""The load-test runner's pure parts, and its manifest built from a small seeded database."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from loadtests import ceiling, report
from loadtests.pg_dataset import build_manifest
from loadtests.profiles import (
    PROFILES,
    Gates,
    Measured,
    Mix,
    Profile,
    bucket_percentile,
    cpu_stats,
    evaluate_gates,
    generator_short_of_cpu,
    histogram_delta,
    locust_percentile,
    merge_histograms,
    parse_histogram,
    run_passed,
    sample_percentile,
    tail_by_generator_load,
)
from loadtests.run import CpuSampler, locust_command, phases, result_dir, worker_command
from pdp.pg import seed
from pdp.pg.seed_data import SeedSpec, synthetic

GATES = Gates(p95_ms=10, p99_ms=25, max_failure_ratio=0.0, propagation_p99_ms=100)


@pytest.mark.parametrize(
    ("measured", "failed"),
    [
        (Measured(3.0, 9.0, 1000, 0, 40.0), []),
        (Measured(10.0, 25.0, 1000, 0, 100.0), []),  # limits are inclusive
        (Measured(10.1, 9.0, 1000, 0, 40.0), ["evaluation p95 ms"]),
        (Measured(3.0, 26.0, 1000, 0, 40.0), ["evaluation p99 ms"]),
        (Measured(3.0, 9.0, 1000, 1, 40.0), ["failure ratio"]),
        (Measured(3.0, 9.0, 1000, 0, 101.0), ["propagation p99 ms"]),
        # Nothing measured is a failure, never a pass.
        (
            Measured(None, None, 0, 0, None),
            [
                "evaluation p95 ms",
                "evaluation p99 ms",
                "failure ratio",
                "propagation p99 ms",
            ],
        ),
    ],
)
def test_gates(measured: Measured, failed: list[str]) -> None:
    verdicts = evaluate_gates(GATES, measured)
    assert [v.name for v in verdicts if not v.passed] == failed


def test_ungated_limits_are_not_judged() -> None:
    verdicts = evaluate_gates(Gates(p95_ms=100.0), Measured(50.0, 900.0, 10, 0, None))
    assert [v.name for v in verdicts] == ["evaluation p95 ms", "failure ratio"]
    assert all(v.passed for v in verdicts)


def test_reported_timing_does_not_fail_the_run_but_failures_do() -> None:
    over = Measured(30.0, 90.0, 1000, 0, 400.0)  # every timing limit exceeded, no failure
    reported = replace(GATES, timing_gated=False)
    verdicts = evaluate_gates(reported, over)
    assert [v.name for v in verdicts if not v.passed] == [
        "evaluation p95 ms",
        "evaluation p99 ms",
        "propagation p99 ms",
    ]
    assert run_passed(verdicts)
    assert verdicts[0].line() == "INFO  evaluation p95 ms: 30 (over limit 10, not gated)"
    assert not run_passed(evaluate_gates(GATES, over))
    assert not run_passed(evaluate_gates(reported, replace(over, failures=1)))


BUCKETS = [(0.001, 50.0), (0.0025, 90.0), (0.005, 100.0), (math.inf, 100.0)]


@pytest.mark.parametrize(
    ("buckets", "q", "expected"),
    [
        (BUCKETS, 0.5, 0.001),  # the rank lands on a bucket's upper bound
        (BUCKETS, 0.25, 0.0005),  # first bucket: interpolated from 0
        (BUCKETS, 0.7, 0.00175),  # halfway through the second bucket
        (BUCKETS, 0.95, 0.00375),
        ([(0.001, 0.0), (math.inf, 10.0)], 0.99, 0.001),  # in +Inf: the last finite bound
        ([(0.001, 0.0), (math.inf, 0.0)], 0.5, None),
        ([], 0.5, None),
    ],
)
def test_bucket_percentile(
    buckets: list[tuple[float, float]], q: float, expected: float | None
) -> None:
    value = bucket_percentile(buckets, q)
    assert value == pytest.approx(expected) if expected is not None else value is None


METRICS = """\
# TYPE pdp_decision_duration_seconds histogram
pdp_decision_duration_seconds_bucket{le="0.001"} 80.0
pdp_decision_duration_seconds_bucket{le="0.0025"} 95.0
pdp_decision_duration_seconds_bucket{le="+Inf"} 100.0
pdp_decision_duration_seconds_count 100.0
pdp_sync_propagation_seconds_bucket{le="0.001"} 7.0
"""


def test_histogram_from_metrics_and_delta() -> None:
    after = parse_histogram(METRICS, "pdp_decision_duration_seconds")
    assert after == [(0.001, 80.0), (0.0025, 95.0), (math.inf, 100.0)]
    before = [(0.001, 30.0), (0.0025, 40.0), (math.inf, 40.0)]
    assert histogram_delta(before, after) == [(0.001, 50.0), (0.0025, 55.0), (math.inf, 60.0)]
    assert histogram_delta([], after) == after
    row = report.server_side(METRICS.replace("80.0", "0.0"), METRICS)
    assert row["requests"] == 0  # +Inf unchanged: nothing new was timed


@pytest.mark.parametrize(
    ("histogram", "q", "expected"),
    [
        ({1.0: 90, 2.0: 9, 50.0: 1}, 0.5, 1.0),
        ({1.0: 90, 2.0: 9, 50.0: 1}, 0.95, 2.0),
        ({1.0: 90, 2.0: 9, 50.0: 1}, 0.99, 50.0),  # Locust's rule: at most 99 of 100 below
        ({1.0: 90, 2.0: 9, 50.0: 1}, 1.0, 50.0),
        ({0.4: 1}, 0.99, 0.4),
        ({}, 0.5, None),
    ],
)
def test_locust_percentile(histogram: dict[float, int], q: float, expected: float | None) -> None:
    assert locust_percentile(histogram, q) == expected


def test_merge_histograms_and_samples() -> None:
    assert merge_histograms([{"1.5": 2, "3": 1}, {1.5: 1}]) == {1.5: 3, 3.0: 1}
    assert sample_percentile([5.0, 1.0, 3.0, 2.0, 4.0], 0.5) == 3.0
    assert sample_percentile([5.0, 1.0, 3.0, 2.0, 4.0], 0.99) == 5.0
    assert sample_percentile([], 0.99) is None


def test_result_dir_layout(tmp_path: Path) -> None:
    now = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    first = result_dir("smoke", tmp_path, now)
    second = result_dir("smoke", tmp_path, now)
    assert first == tmp_path / "smoke-20260304-050607"
    assert second == tmp_path / "smoke-20260304-050607-1"
    assert first.is_dir()
    assert second.is_dir()


def test_phases_and_locust_command(tmp_path: Path) -> None:
    smoke = PROFILES["smoke"]
    (main, mix), (unpaced, unpaced_mix) = phases(smoke)
    assert main.classes == ("Evaluator", "BatchEvaluator", "Searcher", "Writer")
    assert main.users == smoke.mix.eval_users + 3
    assert mix["eval_rate"] == 2000.0
    assert unpaced.classes == ("Evaluator",)
    assert unpaced_mix["eval_rate"] is None
    assert unpaced_mix["think_time"] is None
    command = locust_command(main, "http://127.0.0.1:1", tmp_path)
    assert command[-4:] == list(main.classes)
    assert "--processes" not in command
    for flag, value in (("--csv", "main"), ("--html", "main.html"), ("--json-file", "main")):
        assert command[command.index(flag) + 1] == str(tmp_path / value)
    forked = phases(replace(PROFILES["standard"], processes=2))[0][0]
    assert "--processes" in locust_command(forked, "http://x", tmp_path)
    target = phases(PROFILES["seed-target"])[0][0]
    assert target.workers == 2  # distributed mode by default
    assert "--master" in locust_command(target, "http://x", tmp_path, master_port=1)


def test_distributed_mode_commands(tmp_path: Path) -> None:
    """--workers N: a --master expecting N workers on a given loopback port, and the
    workers' own command pointing at it; the master needs the port."""
    profile = replace(PROFILES["seed-target"], workers=3)
    main = phases(profile)[0][0]
    assert main.workers == 3
    master = locust_command(main, "http://x", tmp_path, master_port=5599)
    assert "--master" in master
    assert "--processes" not in master
    assert master[master.index("--expect-workers") + 1] == "3"
    assert master[master.index("--master-bind-port") + 1] == "5599"
    assert master[master.index("--master-bind-host") + 1] == "127.0.0.1"
    assert master[-len(main.classes):] == list(main.classes)
    worker = worker_command(5599)
    assert "--worker" in worker
    assert worker[worker.index("--master-port") + 1] == "5599"
    with pytest.raises(ValueError, match="port"):
        locust_command(main, "http://x", tmp_path)


def test_cpu_statistics_and_the_tail_split() -> None:
    samples = [
        {"t": 0.0, "machine": 2.0, "worker-1": 5.0},  # start-up: skipped
        {"t": 1.0, "machine": 1.0, "worker-1": 0.95, "worker-1.wait": 0.1, "sidecar": 0.2},
        {"t": 2.0, "machine": 1.96, "worker-1": 0.3, "worker-1.wait": 0.7, "sidecar": 0.2},
        {"t": 3.0, "machine": 0.5, "worker-1": 0.2, "worker-1.wait": 0.0, "sidecar": 0.2},
        {"t": 4.0, "machine": 0.5, "worker-1": 0.2, "worker-1.wait": 0.0, "sidecar": 0.2},
    ]
    stats = cpu_stats(samples, machine_cores=2)
    assert stats["worker-1"]["max"] == 0.95
    assert stats["worker-1"]["saturated_share"] == 0.25  # one second of four at >= 0.9
    assert stats["worker-1.wait"]["saturated_share"] == 0.25  # starved: >= 0.5 s/s
    assert stats["machine"]["saturated_share"] == 0.25  # >= 95 % of 2 cores
    assert stats["sidecar"]["saturated_share"] == 0.0
    assert [generator_short_of_cpu(s) for s in samples[1:]] == [True, True, False, False]
    assert not generator_short_of_cpu({"sidecar": 1.0, "sidecar.wait": 1.0})
    timeline = [
        {"t": 2.0, "eval_rps": 100.0, "over_100ms": 7, "p99": 300.0},
        {"t": 4.0, "eval_rps": 100.0, "over_100ms": 0, "p99": 4.0},
    ]
    split = tail_by_generator_load(timeline, samples)
    assert split["generator short of CPU"] == {
        "windows": 1, "evaluations": 200, "over_100ms": 7, "worst_p99_ms": 300.0
    }  # fmt: skip
    assert split["generator not short of CPU"]["worst_p99_ms"] == 4.0


def test_cpu_sampler_counts_processes_started_before_it_from_then_on(tmp_path: Path) -> None:
    """This process predates the sampler: its earlier CPU is not counted."""
    sampler = CpuSampler(tmp_path / "cpu.jsonl")
    sampler.sample({"me": [os.getpid()]})
    spent = time.process_time() + 0.05
    while time.process_time() < spent:  # some CPU to count (psutil's ticks are 10 ms)
        sum(i * i for i in range(1000))
    sampler.sample({"me": [os.getpid()]})
    sampler.close()
    lines = [json.loads(x) for x in (tmp_path / "cpu.jsonl").read_text().splitlines()]
    assert lines[0]["me"] == 0.0
    assert {"machine", "others", "me.wait"} <= set(lines[1])
    assert 0.0 < sampler.totals()["me"] < 60.0
    assert sampler.wall_s > 0


def test_steady_state_starts_when_every_user_is_spawned() -> None:
    timeline = [{"t": 10.0, "users": 5}, {"t": 12.0, "users": 9}, {"t": 14.0, "users": 9}]
    assert report.steady_from(timeline) == 10.0
    assert report.steady_from([]) == 0.0


def test_profiles_meet_the_issue() -> None:
    assert PROFILES["smoke"].duration_s == 30
    assert PROFILES["standard"].users == 100_000
    assert PROFILES["standard"].mix.eval_users == 1000
    assert PROFILES["seed-target"].mix.eval_users == 10_000
    assert PROFILES["seed-target"].mix.think_time is not None
    assert PROFILES["soak"].duration_s == 1800
    assert PROFILES["soak"].restart_at == 0.5
    for name in ("smoke", "standard"):
        assert PROFILES[name].mix.eval_rate == 2000.0
        assert PROFILES[name].gates == GATES


WRK_OUTPUT = """\
Running 5s test @ http://127.0.0.1:1/access/v1/evaluation
  1 threads and 16 connections
  Latency Distribution
     50%  812.00us
     75%    1.10ms
     90%    2.00ms
     99%    4.41ms
  73375 requests in 5.00s, 19.80MB read
Requests/sec:  14675.12
Transfer/sec:      3.96MB
"""


def test_wrk_parsing_and_ceiling() -> None:
    result = ceiling.parse_wrk(WRK_OUTPUT, 16)
    assert (result.rps, result.p50_ms, result.p99_ms, result.errors) == (
        14675.12, 0.812, 4.41, "",
    )  # fmt: skip
    slow = ceiling.WrkResult(64, 20000.0, 4.0, 9.8, "")
    broken = ceiling.WrkResult(32, 30000.0, 1.0, 2.0, "Socket errors: connect 0, read 5")
    assert ceiling.ceiling([result, slow, broken]) == result
    assert ceiling.ceiling([slow]) is None


async def test_manifest_from_a_seeded_database(db_url: str) -> None:
    await seed.load(db_url, synthetic(SeedSpec(users=300)))
    profile = Profile("tiny", "", users=300, duration_s=1, mix=Mix(eval_users=1), gates=Gates())
    manifest = await build_manifest(db_url, profile, probes=200, subjects=50, writer_targets=5)
    assert manifest["tenants"] == ["tenant-1"]
    assert len(manifest["subjects"]) == 50
    weights = [s[2] for s in manifest["subjects"]]
    assert weights == sorted(weights, reverse=True)  # hottest first (Zipf rank order)
    pools = manifest["probes"]
    assert all(pools[kind][d] for kind in ("scoped", "tenant-wide") for d in ("allow", "deny"))
    assert sum(len(p) for by in pools.values() for p in by.values()) == 400
    assert len(manifest["writer"]) == 5
    conn = await asyncpg.connect(db_url)
    try:
        for decision in ("allow", "deny"):
            for probe in pools["scoped"][decision][:20]:
                allowed = await conn.fetchval("SELECT pdp.check($1, $2, $3, $4, $5)", *probe)
                assert allowed is (decision == "allow")
                scopes = await _scopes(conn, probe[0], probe[1])
                assert f"{probe[2]}:{probe[3]}" in scopes
        for tenant, user, role, rtype, rid, action in manifest["writer"]:
            assert rid.startswith("lt-")
            assert not await conn.fetchval(
                "SELECT pdp.check($1, $2, $3, $4, $5)", tenant, user, rtype, rid, action
            )
            assert await conn.fetchval(
                "SELECT 1 FROM pdp.role_permissions WHERE tenant_id = $1 AND role_id = $2"
                " AND permission = $3", tenant, role, f"{rtype}:{action}",
            )  # fmt: skip
    finally:
        await conn.close()


async def _scopes(conn: asyncpg.Connection, tenant: str, user: str) -> set[str]:
    rows = await conn.fetch(
        "SELECT scope FROM pdp.user_roles WHERE tenant_id = $1 AND user_id = $2"
        " UNION SELECT gr.scope FROM pdp.group_members gm JOIN pdp.group_roles gr"
        " ON gr.tenant_id = gm.tenant_id AND gr.group_id = gm.group_id"
        " WHERE gm.tenant_id = $1 AND gm.user_id = $2",
        tenant, user,
    )  # fmt: skip
    return {r[0] for r in rows}
