"""Metrics: names and labels are a contract; counting is exact; registries never collide."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient

from pdp.metrics import DECISION_BUCKETS, Metrics
from pdp.readiness import Health
from pdp.replica import Replica
from tests.test_web_support import Clock, evaluation, loaded_replica, make_app


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition as {(name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return samples(generate_latest(registry).decode())


async def test_requests_show_up_with_labels(aiohttp_client: AiohttpClient) -> None:
    registry = CollectorRegistry()
    client = await aiohttp_client(make_app(loaded_replica(Clock()), registry=registry))
    for _ in range(3):
        await client.post("/access/v1/evaluation", json=evaluation("alice"))
    await client.post("/access/v1/evaluation", json=evaluation("bob", "write"))
    batch = {
        "subject": {"type": "user", "id": "bob"},
        "action": {"name": "read"},
        "evaluations": [{"resource": {"type": "document", "id": d}} for d in ("d1", "d2", "d3")],
    }
    await client.post("/access/v1/evaluations", json=batch)
    await client.post("/access/v1/evaluation", data=b"{")
    await client.get("/no/such/path")
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.content_type == "text/plain"
    got = samples(await response.text())

    def decisions(endpoint: str, decision: str) -> float:
        labels = (("decision", decision), ("endpoint", endpoint))
        return got["pdp_decisions_total", labels]

    assert decisions("evaluation", "allow") == 3
    assert decisions("evaluation", "deny") == 1
    assert decisions("evaluations", "allow") == 2
    assert decisions("evaluations", "deny") == 1

    def requests(route: str, status: str) -> float:
        return got["pdp_http_requests_total", (("route", route), ("status", status))]

    assert requests("/access/v1/evaluation", "200") == 4
    assert requests("/access/v1/evaluation", "400") == 1
    assert requests("/access/v1/evaluations", "200") == 1
    assert requests("unmatched", "404") == 1
    assert got["pdp_decision_duration_seconds_count", ()] == 5
    assert got["pdp_decision_duration_seconds_bucket", (("le", "+Inf"),)] == 5
    assert 0 < got["pdp_decision_duration_seconds_sum", ()] < 5
    assert got["pdp_ready", ()] == 1
    assert got["pdp_sync_revision_xmin", ()] == 100
    assert got["pdp_cache_objects", (("kind", "users"),)] == 32
    assert got["pdp_cache_objects", (("kind", "assignments"),)] == 44
    assert got["pdp_sync_staleness_seconds", ()] == 0


async def test_two_apps_have_separate_registries(aiohttp_client: AiohttpClient) -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    a = await aiohttp_client(make_app(loaded_replica(Clock()), registry=first))
    await aiohttp_client(make_app(loaded_replica(Clock()), registry=second))
    await a.post("/access/v1/evaluation", json=evaluation())
    allow = ("pdp_decisions_total", (("decision", "allow"), ("endpoint", "evaluation")))
    assert scrape(first)[allow] == 1
    assert allow not in scrape(second)


def test_one_registry_cannot_hold_two_metrics() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Metrics(registry)


def test_scrape_time_gauges_follow_the_replica() -> None:
    clock = Clock()
    replica = Replica(clock=clock)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.watch(Health(replica, max_staleness=5.0))
    got = scrape(registry)
    assert got["pdp_ready", ()] == 0
    assert got["pdp_sync_staleness_seconds", ()] == math.inf
    assert ("pdp_sync_revision_xmin", ()) not in got
    replica = loaded_replica(clock)
    metrics.watch(Health(replica, max_staleness=5.0))
    clock.advance(6)
    got = scrape(registry)
    assert got["pdp_ready", ()] == 0
    assert got["pdp_sync_staleness_seconds", ()] == 6
    assert got["pdp_sync_revision_xmin", ()] == 100  # present once a revision is loaded
    replica.mark_synced(clock())
    assert scrape(registry)["pdp_ready", ()] == 1


def test_sync_layer_methods() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.observe_propagation(0.02)
    metrics.changes_applied(7)
    metrics.catchup(0.002)
    metrics.full_reload("epoch")
    metrics.full_reload("epoch")
    metrics.reconnect()
    metrics.snapshot_loaded(1.25)
    metrics.set_consistent("acme", True)
    metrics.set_consistent("globex", False)
    metrics.tenant_reloaded()
    metrics.decision_log_dropped(3)
    got = scrape(registry)
    assert got["pdp_sync_propagation_seconds_count", ()] == 1
    assert got["pdp_sync_changes_applied_total", ()] == 7
    assert got["pdp_sync_catchups_total", ()] == 1
    assert got["pdp_sync_catchup_seconds_count", ()] == 1
    assert got["pdp_sync_catchup_seconds_sum", ()] == 0.002
    assert got["pdp_sync_full_reloads_total", (("reason", "epoch"),)] == 2
    assert got["pdp_sync_reconnects_total", ()] == 1
    assert got["pdp_snapshot_load_seconds", ()] == 1.25
    assert got["pdp_cache_consistent", (("tenant", "acme"),)] == 1
    assert got["pdp_cache_consistent", (("tenant", "globex"),)] == 0
    assert got["pdp_cache_tenant_reloads_total", ()] == 1
    assert got["pdp_decision_log_dropped_total", ()] == 3
    metrics.forget_tenant("globex")
    metrics.forget_tenant("never-seen")
    assert ("pdp_cache_consistent", (("tenant", "globex"),)) not in scrape(registry)


@pytest.mark.parametrize(
    ("seconds", "first_bucket"),
    [(0.0, 0), (0.00001, 0), (0.0000101, 1), (0.003, 8), (0.25, 13), (7.0, len(DECISION_BUCKETS))],
)
def test_duration_buckets_are_le(seconds: float, first_bucket: int) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.decided("evaluation", True, seconds)
    got = scrape(registry)
    bounds = [*(repr(b) for b in DECISION_BUCKETS), "+Inf"]
    counts = [got["pdp_decision_duration_seconds_bucket", (("le", b),)] for b in bounds]
    assert counts == [0] * first_bucket + [1] * (len(bounds) - first_bucket)
