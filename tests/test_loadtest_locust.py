"""The locustfile, headless for a few seconds, against a real `pdp serve` on a small database:
every user class runs, no request fails (a wrong decision is a failure), and the
writer's commit-to-visible measurements reach Locust's stats and the samples file."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from loadtests import report
from loadtests.pg_dataset import build_manifest
from loadtests.profiles import PROFILES, Mix
from loadtests.run import Phase, Sidecar, free_port, locust_command, write_manifest
from pdp.pg import seed
from pdp.pg.seed_data import SeedSpec, synthetic

SECONDS = 6
MIX = Mix(
    eval_users=4, eval_rate=200.0, batch_users=1, batch_rate=4.0,
    search_users=1, search_rate=6.0, writer_rate=4.0,
)  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_locustfile_against_a_real_sidecar(db_url: str, tmp_path: Path) -> None:
    await seed.load(db_url, synthetic(SeedSpec(users=500)))
    profile = replace(PROFILES["smoke"], users=500, mix=MIX, duration_s=SECONDS)
    dataset = await build_manifest(db_url, profile, probes=300, writer_targets=5)
    phase = Phase("main", SECONDS, 7, 100.0, 1, tuple(MIX.user_classes()))
    env = {
        **os.environ,
        "PDP_LOADTEST_MANIFEST": str(write_manifest(tmp_path, dataset, "main", MIX.to_json())),
        "PDP_LOADTEST_DATABASE_URL": db_url,
    }
    sidecar = Sidecar(db_url, free_port(), tmp_path / "sidecar.log", "tenant-1")
    try:
        await asyncio.to_thread(sidecar.start, 60.0)
        command = locust_command(phase, sidecar.base, tmp_path)
        result = await asyncio.to_thread(
            subprocess.run, command, env=env, capture_output=True, timeout=60, check=False
        )
    finally:
        await asyncio.to_thread(sidecar.stop)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    entries = json.loads((tmp_path / "main.json").read_text())
    names = {(e["method"], e["name"]) for e in entries}
    assert ("POST", "evaluations batch") in names
    assert ("commit-to-visible", "poll") in names
    assert ("commit-to-visible", "min-revision") in names
    assert any(n.startswith("search ") for _, n in names)
    assert sum(1 for m, n in names if m == "POST" and n.startswith("evaluation ")) == 4
    failures = {(e["method"], e["name"]): e["num_failures"] for e in entries if e["num_failures"]}
    assert failures == {}
    samples = report.propagation_samples(tmp_path)
    assert samples["poll"]
    assert samples["min-revision"]
    assert all("error" not in s for kinds in samples.values() for s in kinds)
    assert (tmp_path / "main_stats.csv").exists()
    assert (tmp_path / "main.html").exists()
    assert (tmp_path / "timeline-main.jsonl").read_text().strip()
