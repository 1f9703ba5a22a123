"""Prometheus metrics of pdp, on an injected `CollectorRegistry` (never the global one).

Metric names are a contract with the dashboards and alerts (DESIGN.md section 6).
This module imports no aiohttp: the sync workers call the `Metrics` methods too.

The request hot path costs plain integer arithmetic only: decisions and HTTP
requests are counted in dicts of ints and the decision-duration histogram is a list
of bucket counts, all turned into metric families by a custom collector at scrape
time. A prometheus_client `Counter.labels(...).inc()` takes a lock and a label
lookup, several times the cost. The values that describe the replica (staleness,
readiness, object counts, revision) are also read at scrape time, so they can never
be stale themselves. Readiness is `pdp.readiness.Health`'s, the same `/readyz` says.
"""

from __future__ import annotations

import contextlib
import math
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from pdp import conditions
from pdp.readiness import Health

# A check answers in ~10 us from memory; a slow batch or a consistency wait can take 100 ms+.
DECISION_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
)  # fmt: skip
# Commit to applied: a NOTIFY round trip is milliseconds, the poll safety net ~1 s.
CATCHUP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30)
PROPAGATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Phases are milliseconds each: finer steps around the 15 ms propagation goal.
PHASE_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1)


class Metrics:
    """Every pdp metric, registered on `registry`.

    Hot path (web layer): `decided`, `decided_batch`, `http_request`: plain int
    arithmetic, no locks. HTTP edge: `connection_rejected`. Sync layer:
    `observe_propagation`, `changes_applied`,
    `catchup`, `full_reload`, `reconnect`, `snapshot_loaded`, `snapshot_file_loaded`,
    `snapshot_file_written`, `set_consistent`,
    `forget_tenant`, `tenant_reloaded`, `decision_log_dropped`. Supervisor:
    `worker_restarted`, `worker_up`. Call `watch(health)` once so the scrape-time
    gauges have a source.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._decisions: defaultdict[tuple[str, bool], int] = defaultdict(int)
        self._requests: defaultdict[tuple[str, int], int] = defaultdict(int)
        self._bucket_counts = [0] * (len(DECISION_BUCKETS) + 1)
        self._duration_sum = 0.0
        self._health: Health | None = None

        self.propagation = Histogram(
            "pdp_sync_propagation_seconds",
            "Seconds from a change's commit (change_log.changed_at) to applied in memory",
            buckets=PROPAGATION_BUCKETS,
            registry=registry,
        )
        self.phases = Histogram(
            "pdp_sync_phase_seconds",
            "Where propagation goes, by phase: notify (a transaction's start to the doorbell "
            "that woke its catch-up), wait (doorbell to the catch-up's read: coalescing and "
            "a catch-up already running), read (the catch-up's SQL), apply (into memory)",
            ["phase"],
            buckets=PHASE_BUCKETS,
            registry=registry,
        )
        self.changes = Counter(
            "pdp_sync_changes_applied", "Row changes applied to the replica", registry=registry
        )
        self.catchups = Counter(
            "pdp_sync_catchups", "Catch-up transactions completed", registry=registry
        )
        self.catchup_duration = Histogram(
            "pdp_sync_catchup_seconds",
            "Duration of a catch-up: its snapshot read, the changed rows re-read and applied",
            buckets=CATCHUP_BUCKETS,
            registry=registry,
        )
        self.full_reloads = Counter(
            "pdp_sync_full_reloads",
            "Full snapshot reloads, by cause",
            ["reason"],
            registry=registry,
        )
        self.cache_hits = Counter(
            "pdp_cache_hits",
            "On-demand mode: checks whose user was already loaded",
            registry=registry,
        )
        self.cache_misses = Counter(
            "pdp_cache_misses",
            "On-demand mode: checks that waited for their user's rows (concurrent misses"
            " for one user share one query)",
            registry=registry,
        )
        self.reconnects = Counter(
            "pdp_sync_reconnects", "Listener reconnections", registry=registry
        )
        self.snapshot_load = Gauge(
            "pdp_snapshot_load_seconds", "Duration of the last snapshot load", registry=registry
        )
        self.change_log_age = Gauge(
            "pdp_change_log_oldest_age_seconds",
            "Age of the change log's oldest row at the last verification (pdp prune keeps it"
            " near PDP_CHANGE_RETENTION)",
            registry=registry,
        )
        self.snapshot_file_loads = Counter(
            "pdp_snapshot_file_loads",
            "Starts that looked for PDP_SNAPSHOT_FILE, by result: loaded, missing, expired, "
            "corrupt",
            ["result"],
            registry=registry,
        )
        self.snapshot_file_writes = Counter(
            "pdp_snapshot_file_writes",
            "PDP_SNAPSHOT_FILE writes, by result: ok or error",
            ["result"],
            registry=registry,
        )
        self.snapshot_file_write_seconds = Gauge(
            "pdp_snapshot_file_write_seconds",
            "Duration of the last PDP_SNAPSHOT_FILE write (encode, fsync, rename)",
            registry=registry,
        )
        self.snapshot_file_bytes = Gauge(
            "pdp_snapshot_file_bytes", "Size of the last PDP_SNAPSHOT_FILE written",
            registry=registry,
        )  # fmt: skip
        self.read_replica_lag = Gauge(
            "pdp_read_replica_lag_seconds",
            "With PDP_READ_DATABASE_URL: age of the oldest primary snapshot the standby had "
            "not replayed at the last catch-up (0: it had replayed all)",
            registry=registry,
        )
        self.consistent = Gauge(
            "pdp_cache_consistent",
            "1 when the tenant's cache digest matched PostgreSQL's at the last verification",
            ["tenant"],
            registry=registry,
        )
        self.tenant_reloads = Counter(
            "pdp_cache_tenant_reloads",
            "Tenants reloaded after a digest mismatch",
            registry=registry,
        )
        self.log_dropped = Counter(
            "pdp_decision_log_dropped",
            "Decision log entries dropped (queue full)",
            registry=registry,
        )
        self.worker_restarts = Counter(
            "pdp_worker_restarts",
            "Background workers restarted by the supervisor after a crash",
            ["worker"],
            registry=registry,
        )
        self.workers_up = Gauge(
            "pdp_worker_up",
            "1 while a supervised background worker runs, 0 while it waits to restart",
            ["worker"],
            registry=registry,
        )
        self.connections_rejected = Counter(
            "pdp_http_connections_rejected",
            "Connections refused at PDP_MAX_CONNECTIONS (no idle keep-alive one to close)",
            registry=registry,
        )
        registry.register(_ScrapeCollector(self))

    # --- hot path (never awaits, never locks) ----------------------------------------

    def decided(self, endpoint: str, allowed: bool, seconds: float) -> None:
        """Count one decision and observe the request's decision time."""
        self._decisions[endpoint, allowed] += 1
        self._bucket_counts[bisect_left(DECISION_BUCKETS, seconds)] += 1
        self._duration_sum += seconds

    def decided_batch(self, endpoint: str, allowed: int, denied: int, seconds: float) -> None:
        """Count a batch's decisions and observe the whole request's decision time once."""
        self._decisions[endpoint, True] += allowed
        self._decisions[endpoint, False] += denied
        self._bucket_counts[bisect_left(DECISION_BUCKETS, seconds)] += 1
        self._duration_sum += seconds

    def http_request(self, route: str, status: int) -> None:
        """Count one HTTP response; `route` is a route template, never a raw path."""
        self._requests[route, status] += 1

    def connection_rejected(self) -> None:
        """Count one connection refused at the connection cap (rare: not the hot path)."""
        self.connections_rejected.inc()

    # --- sync layer -----------------------------------------------------------------

    def watch(self, health: Health) -> None:
        """Read readiness, staleness, revision and object counts from `health` at scrape time."""
        self._health = health

    def observe_propagation(self, seconds: float) -> None:
        self.propagation.observe(seconds)

    def changes_applied(self, n: int) -> None:
        self.changes.inc(n)

    def sync_phase(self, phase: str, seconds: float) -> None:
        """Where propagation goes: `notify` (commit to the doorbell), `wait` (doorbell
        to the catch-up's read), `read`, `apply`."""
        self.phases.labels(phase).observe(seconds)

    def catchup(self, seconds: float) -> None:
        """One catch-up done: read in its snapshot and applied, in `seconds`."""
        self.catchups.inc()
        self.catchup_duration.observe(seconds)

    def full_reload(self, reason: str) -> None:
        """`reason` from a closed set: epoch, purged, truncate, bulk_load, too_many_keys, ..."""
        self.full_reloads.labels(reason).inc()

    def reconnect(self) -> None:
        self.reconnects.inc()

    def cache_hit(self) -> None:
        self.cache_hits.inc()

    def cache_miss(self) -> None:
        self.cache_misses.inc()

    def snapshot_loaded(self, seconds: float) -> None:
        self.snapshot_load.set(seconds)

    def snapshot_file_loaded(self, result: str) -> None:
        """`result`: loaded, missing, expired or corrupt."""
        self.snapshot_file_loads.labels(result).inc()

    def snapshot_file_written(self, ok: bool, seconds: float, size: int) -> None:
        self.snapshot_file_writes.labels("ok" if ok else "error").inc()
        if ok:
            self.snapshot_file_write_seconds.set(seconds)
            self.snapshot_file_bytes.set(size)

    def set_read_replica_lag(self, seconds: float) -> None:
        self.read_replica_lag.set(seconds)

    def set_consistent(self, tenant: str, ok: bool) -> None:
        self.consistent.labels(tenant).set(1 if ok else 0)

    def set_change_log_age(self, seconds: float) -> None:
        self.change_log_age.set(seconds)

    def forget_tenant(self, tenant: str) -> None:
        """Drop a deleted tenant's `pdp_cache_consistent` series."""
        with contextlib.suppress(KeyError):
            self.consistent.remove(tenant)

    def tenant_reloaded(self) -> None:
        self.tenant_reloads.inc()

    def decision_log_dropped(self, n: int = 1) -> None:
        self.log_dropped.inc(n)

    def worker_restarted(self, worker: str) -> None:
        self.worker_restarts.labels(worker).inc()

    def worker_up(self, worker: str, up: bool) -> None:
        self.workers_up.labels(worker).set(1 if up else 0)

    # --- scrape time ----------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """The hot-path counters and the replica gauges as metric families."""
        decisions = CounterMetricFamily(
            "pdp_decisions", "Decisions answered, by endpoint", labels=["endpoint", "decision"]
        )
        for (endpoint, allowed), n in sorted(self._decisions.items()):
            decisions.add_metric([endpoint, "allow" if allowed else "deny"], n)
        yield decisions
        requests = CounterMetricFamily(
            "pdp_http_requests", "HTTP responses, by route and status", labels=["route", "status"]
        )
        for (route, status), n in sorted(self._requests.items()):
            requests.add_metric([route, str(status)], n)
        yield requests
        yield CounterMetricFamily(
            "pdp_condition_errors",
            "Distinct grant conditions that do not compile (they never grant)",
            value=conditions.compile_errors(),
        )
        yield self._duration_family()
        yield from self._replica_families()

    def _duration_family(self) -> HistogramMetricFamily:
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip((*DECISION_BUCKETS, math.inf), self._bucket_counts, strict=True):
            total += n
            buckets.append(("+Inf" if bound == math.inf else repr(bound), total))
        return HistogramMetricFamily(
            "pdp_decision_duration_seconds",
            "Time to parse, decide and serialize one evaluation request (a batch counts once)",
            buckets=buckets,
            sum_value=self._duration_sum,
        )

    def _replica_families(self) -> Iterator[Metric]:
        if self._health is None:
            return
        replica = self._health.replica
        state = self._health.readiness()
        yield GaugeMetricFamily(
            "pdp_ready", "1 when a snapshot is loaded and fresh", value=1 if state.ready else 0
        )
        yield GaugeMetricFamily(
            "pdp_sync_staleness_seconds",
            "Seconds since the replica was last proven current (+Inf before the first load)",
            value=state.staleness,
        )
        yield GaugeMetricFamily(
            "pdp_sync_max_staleness_seconds",
            "The staleness bound (PDP_MAX_STALENESS_SECONDS): past it the sidecar is not ready",
            value=self._health.max_staleness,
        )
        revision = replica.revision
        if revision is not None:
            yield GaugeMetricFamily(
                "pdp_sync_revision_xmin", "xmin of the replica's snapshot", value=revision.xmin
            )
        engine = replica.engine
        if engine is not None:
            objects = GaugeMetricFamily(
                "pdp_cache_objects", "Rows held in memory, by kind", labels=["kind"]
            )
            for kind, n in engine.counts().items():
                objects.add_metric([kind], n)
            yield objects


class RelayMetrics(Metrics):
    """The relay's metrics: the sync ones (its catch-up loop) and its publishing."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        self.relay_leading = Gauge(
            "pdp_relay_leader", "1 while this relay holds the lock and publishes", registry=registry
        )
        self.relay_entries = Counter(
            "pdp_relay_entries_published",
            "Stream entries appended, by kind (changes, heartbeat, reset)",
            ["kind"],
            registry=registry,
        )
        self.relay_snapshot_seconds = Gauge(
            "pdp_relay_snapshot_write_seconds",
            "Duration of the last stored-snapshot write",
            registry=registry,
        )
        self.relay_snapshot_bytes = Gauge(
            "pdp_relay_snapshot_bytes", "Size of the last stored snapshot", registry=registry
        )
        self.relay_divergences = Counter(
            "pdp_relay_diverged",
            "Appends refused because the stream ended elsewhere (another relay wrote)",
            registry=registry,
        )

    def relay_leader(self, leading: bool) -> None:
        self.relay_leading.set(1 if leading else 0)

    def relay_published(self, kind: str) -> None:
        self.relay_entries.labels(kind).inc()

    def relay_snapshot_written(self, seconds: float, size: int) -> None:
        self.relay_snapshot_seconds.set(seconds)
        self.relay_snapshot_bytes.set(size)

    def relay_diverged(self) -> None:
        self.relay_divergences.inc()


class _ScrapeCollector:
    """Adapts `Metrics.collect` to the registry (kept apart so `describe` is static)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics.collect()

    def describe(self) -> list[Metric]:
        """Names only, so the registry detects a duplicate registration."""
        return [
            CounterMetricFamily("pdp_decisions", ""),
            CounterMetricFamily("pdp_http_requests", ""),
            CounterMetricFamily("pdp_condition_errors", ""),
            HistogramMetricFamily("pdp_decision_duration_seconds", ""),
            GaugeMetricFamily("pdp_ready", ""),
            GaugeMetricFamily("pdp_sync_staleness_seconds", ""),
            GaugeMetricFamily("pdp_sync_max_staleness_seconds", ""),
            GaugeMetricFamily("pdp_sync_revision_xmin", ""),
            GaugeMetricFamily("pdp_cache_objects", ""),
        ]


PROCESS_LABEL = "process"


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def merge_expositions(texts: dict[str, str]) -> bytes:
    """One exposition of several processes' (`{process: text}`, `pdp serve --workers`):
    every sample labelled `process`, each family's HELP and TYPE once. Scrape time only."""
    merged: dict[str, Metric] = {}
    for process in sorted(texts):
        for family in text_string_to_metric_families(texts[process]):
            into = merged.setdefault(
                family.name, Metric(family.name, family.documentation, family.type, family.unit)
            )
            into.samples.extend(
                Sample(s.name, {**s.labels, PROCESS_LABEL: process}, s.value, s.timestamp)
                for s in family.samples
            )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(merged.values())))
    return generate_latest(registry)
