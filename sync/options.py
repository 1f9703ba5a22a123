"""Tuning of the sync worker: pacing, bounds and timeouts (the sidecar maps settings here)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SyncOptions:
    poll_interval: float = 1.0  # catch up at least this often (also proves freshness)
    # Between catch-up starts: under a stream of commits each catch-up gathers at least
    # this long of them (at most 1/min_interval catch-ups a second), and a change waits
    # at most this long beyond a catch-up already running. 2 ms (was 5): the catch-up read
    # now costs PostgreSQL 0.2-0.8 ms of CPU, not 2-2.5 ms, so the extra catch-ups cost
    # less than the fewer ones did (bench_sync: its backend at 0.12-0.14 CPU s/s doing
    # ~170 catch-ups/s, against 0.27-0.34 s/s doing ~90/s before).
    min_interval: float = 0.002
    max_batch_keys: int = 50_000  # a batch naming more keys reloads everything instead
    heartbeat: float = 5.0  # listener liveness probe period (and its timeout)
    backoff_initial: float = 0.1
    # Reconnect pacing while PostgreSQL is unreachable. The cap bounds recovery: once
    # the server answers again the next attempt is at most this far away (a longer cap
    # grew to 5-6 s of extra staleness after an outage). Jitter still spreads a fleet.
    backoff_max: float = 1.0
    connect_timeout: float = 5.0
    # Client-side bounds: a half-open link raises nothing, so a read must time out.
    read_timeout: float = 10.0
    full_read_timeout: float = 600.0
    statement_timeout_ms: int = 600_000
    # On-demand mode: loads (full and per tenant) leave out users, memberships and
    # direct assignments; `sync.user_cache` reads them per user on first use.
    on_demand: bool = False
    # Full loads split over this many processes by user id (`sync.pg_load`) when the
    # user tables hold about parallel_min_rows rows or more: below that a load is quick
    # alone, and a child costs ~1 s of CPU to start.
    load_processes: int = 1
    parallel_min_rows: int = 200_000


@dataclass(frozen=True, slots=True)
class RelayOptions:
    """The relay's Redis stream and its leader election (see `sync.relay`)."""

    stream: str = "pdp:changes"
    maxlen: int = 100_000  # entries kept (MAXLEN ~): about a day of 1 s heartbeats
    snapshot_interval: float = 60.0  # the stored snapshot is rewritten this often
    election_interval: float = 1.0  # a standby tries to take the lock this often
    lock_heartbeat: float = 1.0  # the leader proves its lock connection alive this often
    lock_key: int = 0x7064705F72656C61  # pg advisory lock id ("pdp_rela")
    # The leader verifies its replica against PostgreSQL (`sync.pg_verifier`) and
    # attaches its per-tenant digests to an entry for the followers this often.
    verify_interval: float = 60.0
