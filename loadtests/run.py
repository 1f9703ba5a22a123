"""Run one load-test profile end to end: `python -m loadtests.run --profile smoke`.

1. The database: PDP_DATABASE_URL's server (or the embedded one when unset) gets a
   database `pdp_load_u<users>_t<tenants>`, migrated, seeded with the profile's
   synthetic dataset unless `pdp_loadtest_dataset` records the same spec already.
2. A manifest (JSON) of labelled probes, Zipf-weighted subjects, scoped resources
   and writer targets, read by `locustfile.py` (which imports nothing from pdp).
3. The sidecar, `pdp serve` on a free port, awaited on /readyz with a deadline.
4. Locust headless with the profile's mix (--processes for multi-process), then an
   optional unpaced phase; /metrics scraped around each phase.
5. `loadtests/results/<profile>-<timestamp>/`: Locust's CSVs, HTML and JSON, the
   timeline and propagation samples, plots, `summary.json`; a table on stdout.

Exits 1 when a gate fails, 2 on a setup error; everything started is stopped, also
on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from loadtests import report
from loadtests.pg_dataset import build_manifest, ensure_dataset, server_url
from loadtests.profiles import PROFILES, Profile, is_generator

HERE = Path(__file__).resolve().parent
LOCUSTFILE = HERE / "locustfile.py"
RESULTS = HERE / "results"
READY_DEADLINE_S = 300.0
WALL = "_wall_s"  # in run_locust's CPU totals: the seconds they were sampled over


class SetupError(Exception):
    """Something the run needs could not be brought up (exit 2)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the sidecar -----------------------------------------------------------------------


class Sidecar:
    """`pdp serve` as a subprocess on `port`; its log goes to `log_path`.

    `command` runs the sidecar (default: this interpreter's `python -m pdp serve`).
    """

    def __init__(
        self,
        url: str,
        port: int,
        log_path: Path,
        default_tenant: str,
        command: Sequence[str] = (sys.executable, "-m", "pdp", "serve"),
    ) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self._command = list(command)
        self._env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PDP_")},
            "PDP_DATABASE_URL": url,
            "PDP_PORT": str(port),
            "PDP_DEFAULT_TENANT": default_tenant,
            "PDP_LOG_LEVEL": "WARNING",
        }
        self._log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, deadline_s: float = READY_DEADLINE_S) -> float:
        """Start and wait until /readyz answers 200; seconds it took."""
        started = time.monotonic()
        with self._log_path.open("ab") as log:
            self.proc = subprocess.Popen(self._command, env=self._env, stdout=log, stderr=log)
        while not self._ready():
            if self.proc.poll() is not None:
                raise SetupError(
                    f"pdp serve exited with {self.proc.returncode}; see {self._log_path}"
                )
            if time.monotonic() - started > deadline_s:
                raise SetupError(
                    f"pdp serve not ready after {deadline_s:.0f} s; see {self._log_path}"
                )
            time.sleep(0.1)  # polling /readyz with a deadline: the sidecar offers no event
        return time.monotonic() - started

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/readyz", timeout=2) as response:  # noqa: S310
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.base}/metrics", timeout=10) as response:  # noqa: S310
            return str(response.read().decode())

    def cpu_seconds(self) -> float:
        import psutil  # noqa: PLC0415  (a Locust dependency)

        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        times = psutil.Process(self.proc.pid).cpu_times()
        return float(times.user + times.system)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Probe:
    """A second vantage point: one check every `period` seconds from the runner's own
    thread, on one keep-alive connection, timed here (`probe-<phase>.jsonl`). Locust's
    latency includes its own scheduling; this client is nearly idle, so a tail Locust
    sees and this probe does not is the generator's, one both see is the sidecar's or
    the machine's."""

    def __init__(self, base: str, body: bytes, path: Path, period: float = 0.05) -> None:
        self._port = int(base.rsplit(":", 1)[1])
        self._body, self._path, self._period = body, path, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="probe", daemon=True)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=10)
        headers = {"Content-Type": "application/json"}
        with self._path.open("a", encoding="utf-8") as out:
            while not self._stop.wait(self._period):
                started = time.perf_counter()
                try:
                    conn.request("POST", "/access/v1/evaluation", self._body, headers)
                    response = conn.getresponse()
                    response.read()
                    error = None if response.status == 200 else f"HTTP {response.status}"
                except (OSError, http.client.HTTPException) as exc:
                    error = type(exc).__name__
                    conn.close()
                ms = (time.perf_counter() - started) * 1000
                sample: dict[str, Any] = {"t": time.time(), "ms": round(ms, 3)}
                if error:
                    sample["error"] = error
                out.write(json.dumps(sample) + "\n")
        conn.close()


def probe_body(dataset: dict[str, Any]) -> bytes:
    """One labelled probe of the manifest as an evaluation body."""
    pools = dataset["probes"]
    row = next(rows[0] for kind in pools.values() for rows in kind.values() if rows)
    tenant, user, rtype, rid, action = row
    return json.dumps({
        "subject": {"type": "user", "id": user, "properties": {"tenant": tenant}},
        "resource": {"type": rtype, "id": rid}, "action": {"name": action},
    }).encode()  # fmt: skip


# --- Locust ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Phase:
    """One Locust run: `main` (the profile's mix) or `unpaced`."""

    name: str
    duration_s: int
    users: int
    spawn_rate: float
    processes: int
    classes: tuple[str, ...]
    workers: int = 0  # > 0: distributed mode, a master and this many worker processes


def locust_command(phase: Phase, host: str, out: Path, master_port: int | None = None) -> list[str]:
    """The Locust command of a phase: one process, `--processes N` (forked workers), or
    with `phase.workers` the master of distributed mode (`--master --expect-workers`),
    listening on 127.0.0.1:`master_port` for the workers of `worker_command`."""
    prefix = str(out / phase.name)
    if phase.workers > 0:
        if master_port is None:
            raise ValueError("distributed mode needs the master's port")
        processes = [
            "--master", "--expect-workers", str(phase.workers),
            "--expect-workers-max-wait", "60",
            "--master-bind-host", "127.0.0.1", "--master-bind-port", str(master_port),
        ]  # fmt: skip
        # INFO: the master then logs workers that go missing and come back.
        loglevel = "INFO"
    elif phase.processes > 1:
        processes, loglevel = ["--processes", str(phase.processes)], "WARNING"
    else:
        processes, loglevel = [], "WARNING"
    return [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "--host", host, "-u", str(phase.users), "-r", f"{phase.spawn_rate:g}",
        "-t", f"{phase.duration_s}s", "--stop-timeout", "5",
        # Measure the steady state: statistics restart once every user is spawned.
        "--reset-stats",
        "--csv", prefix, "--csv-full-history", "--html", f"{prefix}.html",
        "--json-file", prefix, "--only-summary", "--loglevel", loglevel,
        "--exit-code-on-error", "0", *processes, *phase.classes,
    ]  # fmt: skip


def worker_command(master_port: int) -> list[str]:
    """One worker of distributed mode; the master hands it users, host and duration."""
    return [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--worker",
        "--master-host", "127.0.0.1", "--master-port", str(master_port),
        "--loglevel", "WARNING",
    ]  # fmt: skip


def run_locust(
    phase: Phase,
    out: Path,
    env: dict[str, str],
    sidecar: Sidecar,
    *,
    restart_at: float | None = None,
) -> dict[str, float]:
    """Run one phase to its end (restarting the sidecar `restart_at` s in, if given).

    Distributed mode (`phase.workers`): the master, then each worker, as separate
    processes. Returns CPU seconds by process role (`master` or `locust`, `worker-N`,
    `sidecar`, `runner`) and the wall seconds sampled (`WALL`), sampled every second
    while it runs (forked workers are not reaped in a way rusage would count), and
    writes the samples to `cpu-<phase>.jsonl`.
    """
    master_port = free_port() if phase.workers else None
    procs: list[subprocess.Popen[bytes]] = []
    with (out / f"locust-{phase.name}.log").open("wb") as log:
        command = locust_command(phase, sidecar.base, out, master_port)
        procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
        if master_port is not None:
            for n in range(1, phase.workers + 1):
                with (out / f"locust-{phase.name}-worker-{n}.log").open("wb") as wlog:
                    procs.append(subprocess.Popen(
                        worker_command(master_port), env=env, stdout=wlog,
                        stderr=subprocess.STDOUT,
                    ))  # fmt: skip
    master = procs[0]
    sampler = CpuSampler(out / f"cpu-{phase.name}.jsonl")
    started = time.monotonic()
    try:
        while master.poll() is None:
            elapsed = time.monotonic() - started
            if elapsed > phase.duration_s + 120:
                raise SetupError(f"locust still running {elapsed:.0f} s after its start")
            if restart_at is not None and elapsed >= restart_at:
                restart_at = None
                sidecar.stop()
                took = sidecar.start()
                print(f"  sidecar restarted at {elapsed:.0f} s, ready again in {took:.1f} s")
            sampler.sample(_roles(procs, phase, sidecar))
            with contextlib.suppress(subprocess.TimeoutExpired):
                master.wait(timeout=1)
    finally:
        sampler.close()
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if master.returncode != 0:
        raise SetupError(
            f"locust exited with {master.returncode}; see {out / f'locust-{phase.name}.log'}"
        )
    return {**sampler.totals(), WALL: sampler.wall_s}


def _roles(
    procs: list[subprocess.Popen[bytes]], phase: Phase, sidecar: Sidecar
) -> dict[str, list[int]]:
    """Process role -> pids whose CPU counts for it (the sidecar's too, for comparison)."""
    import psutil  # noqa: PLC0415  (a Locust dependency)

    roles: dict[str, list[int]] = {"runner": [os.getpid()]}  # with the probe thread
    if sidecar.proc is not None and sidecar.proc.poll() is None:
        roles["sidecar"] = [sidecar.proc.pid]
    master = procs[0]
    if phase.workers:
        roles["master"] = [master.pid]
        for n, proc in enumerate(procs[1:], start=1):
            roles[f"worker-{n}"] = [proc.pid]
        return roles
    try:
        children = [c.pid for c in psutil.Process(master.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        children = []
    if phase.processes > 1:  # --processes: the parent is the master, its forks the workers
        roles["master"] = [master.pid]
        for n, pid in enumerate(sorted(children), start=1):
            roles[f"worker-{n}"] = [pid]
    else:
        roles["locust"] = [master.pid, *children]
    return roles


class CpuSampler:
    """CPU use by process role, one JSON line per sample: the cores each role used
    since the previous sample (`<role>`), the seconds per second its threads waited
    runnable for a CPU (`<role>.wait`), the whole machine's busy cores (`machine`) and
    what everything else used (`others`: PostgreSQL and the neighbours). A process that
    existed before the sampler (the sidecar) counts from then on."""

    def __init__(self, path: Path) -> None:
        import psutil  # noqa: PLC0415  (a Locust dependency)

        self._psutil = psutil
        self._file = path.open("a", encoding="utf-8")
        self._base: dict[int, float] = {}  # pid -> CPU seconds when first seen (or 0)
        self._seen: dict[int, float] = {}  # pid -> CPU seconds at the last sample
        self._role_of: dict[int, str] = {}
        self._wait: dict[int, float] = {}  # pid -> run-queue wait seconds at the last sample
        self._started = time.time()
        self._first = self._last = time.monotonic()
        self._machine = self._busy()

    def _busy(self) -> float:
        times = self._psutil.cpu_times()
        return float(times.user + times.nice + times.system + times.irq + times.softirq)

    def _cpu(self, pid: int) -> float | None:
        try:
            process = self._psutil.Process(pid)
            times = process.cpu_times()
        except self._psutil.NoSuchProcess:
            return None
        total = float(times.user + times.system)
        if pid not in self._base:
            self._base[pid] = total if process.create_time() < self._started else 0.0
            self._seen[pid] = self._base[pid]
        return total

    @staticmethod
    def _waited(pid: int) -> float:
        """Seconds the process's threads spent runnable but waiting for a CPU, so far
        (`/proc/PID/task/*/schedstat`, second field, ns); 0 where not available."""
        waited = 0
        for path in Path(f"/proc/{pid}/task").glob("*/schedstat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                waited += int(path.read_text().split()[1])
        return waited / 1e9

    def sample(self, roles: dict[str, list[int]]) -> None:
        now, machine = time.monotonic(), self._busy()
        window = max(now - self._last, 1e-6)
        used: dict[str, float] = {}
        waits: dict[str, float] = {}
        for role, pids in roles.items():
            for pid in pids:
                total = self._cpu(pid)
                if total is None:
                    continue
                used[role] = used.get(role, 0.0) + total - self._seen[pid]
                self._seen[pid], self._role_of[pid] = total, role
                waited = self._waited(pid)
                waits[role] = waits.get(role, 0.0) + waited - self._wait.get(pid, waited)
                self._wait[pid] = waited
        busy = (machine - self._machine) / window
        line = {
            "t": time.time(),
            "machine": round(busy, 3),
            # Everything else on the machine: PostgreSQL, and the neighbours' work.
            "others": round(max(0.0, busy - sum(used.values()) / window), 3),
            **{role: round(seconds / window, 3) for role, seconds in used.items()},
            # Runnable but waiting for a CPU (seconds per second): starved, not busy.
            **{f"{role}.wait": round(seconds / window, 3) for role, seconds in waits.items()},
        }
        self._last, self._machine = now, machine
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    @property
    def wall_s(self) -> float:
        """Seconds from the sampler's start to its last sample."""
        return self._last - self._first

    def totals(self) -> dict[str, float]:
        """CPU seconds by role over the samples (a restarted sidecar counts both)."""
        out: dict[str, float] = {}
        for pid, seconds in self._seen.items():
            role = self._role_of.get(pid)
            if role is not None:
                out[role] = out.get(role, 0.0) + seconds - self._base[pid]
        return out

    def close(self) -> None:
        self._file.close()


# --- one run ---------------------------------------------------------------------------


def result_dir(profile: str, root: Path = RESULTS, now: datetime | None = None) -> Path:
    """`root/<profile>-<UTC timestamp>/`, created (a suffix keeps concurrent runs apart)."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    for n in range(100):
        path = root / (f"{profile}-{stamp}" + (f"-{n}" if n else ""))
        try:
            path.mkdir(parents=True)
        except FileExistsError:
            continue
        return path
    raise SetupError(f"cannot create a result directory under {root}")


def write_manifest(out: Path, dataset: dict[str, Any], phase: str, mix: dict[str, Any]) -> Path:
    path = out / f"manifest-{phase}.json"
    path.write_text(json.dumps({**dataset, "phase": phase, "mix": mix, "samples_dir": str(out)}))
    return path


def phases(profile: Profile) -> list[tuple[Phase, dict[str, Any]]]:
    mix = profile.mix
    classes = mix.user_classes()
    main = Phase("main", profile.duration_s, sum(classes.values()), profile.spawn_rate,
                 profile.processes, tuple(classes), profile.workers)  # fmt: skip
    result = [(main, mix.to_json())]
    if profile.unpaced_s:
        unpaced = profile.unpaced_mix()
        result.append((
            Phase("unpaced", profile.unpaced_s, unpaced.eval_users, 1000.0, 1, ("Evaluator",)),
            unpaced.to_json(),
        ))  # fmt: skip
    return result


def run(profile: Profile, out: Path, *, drop_db: bool = False) -> dict[str, Any]:
    """Everything of one run; returns the summary (also written to `summary.json`)."""
    loadavg = [round(x, 2) for x in os.getloadavg()]
    with server_url() as admin_url:
        started = time.monotonic()
        url, seeded = asyncio.run(ensure_dataset(admin_url, profile))
        print(f"  dataset {profile.database}: {'seeded' if seeded else 'reused'}"
              f" in {time.monotonic() - started:.1f} s")  # fmt: skip
        try:
            dataset = asyncio.run(build_manifest(url, profile))
            sidecar = Sidecar(url, free_port(), out / "sidecar.log", dataset["tenants"][0])
            try:
                ready_s = sidecar.start()
                print(f"  sidecar ready in {ready_s:.1f} s on {sidecar.base}")
                measured = _measure(profile, out, url, dataset, sidecar)
            finally:
                sidecar.stop()
        finally:
            if drop_db:
                asyncio.run(_drop(admin_url, profile.database))
    summary = report.summarize(profile, out, measured, ready_s=ready_s, seeded=seeded)
    summary["machine"]["loadavg_at_start"] = loadavg
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    report.plot(out)
    return summary


def _measure(
    profile: Profile, out: Path, url: str, dataset: dict[str, Any], sidecar: Sidecar
) -> dict[str, Any]:
    measured: dict[str, Any] = {"dataset": {k: len(dataset[k]) for k in ("subjects", "writer")}}
    for phase, mix in phases(profile):
        env = {
            **os.environ,
            "PDP_LOADTEST_MANIFEST": str(write_manifest(out, dataset, phase.name, mix)),
            "PDP_LOADTEST_DATABASE_URL": url,
        }
        restart = (
            profile.duration_s * profile.restart_at
            if profile.restart_at and phase.name == "main"
            else None
        )
        mode = (
            f"distributed: a master and {phase.workers} workers" if phase.workers
            else f"{phase.processes} process(es)"
        )  # fmt: skip
        print(f"  locust {phase.name}: {phase.users} users, {phase.duration_s} s, {mode}")
        before, cpu_before = sidecar.metrics(), sidecar.cpu_seconds()
        with Probe(sidecar.base, probe_body(dataset), out / f"probe-{phase.name}.jsonl"):
            cpu = run_locust(phase, out, env, sidecar, restart_at=restart)
        command = " ".join(locust_command(phase, sidecar.base, out, 0 if phase.workers else None))
        if phase.workers:
            command += f"  (+ {phase.workers} x: {' '.join(worker_command(0))})"
        measured[phase.name] = {
            "metrics_before": before,
            "metrics_after": sidecar.metrics(),
            "sidecar_cpu_s": sidecar.cpu_seconds() - cpu_before,
            "locust_cpu_s": sum(v for k, v in cpu.items() if is_generator(k)),
            "cpu_s_by_process": {k: v for k, v in cpu.items() if k != WALL},
            "cpu_wall_s": cpu[WALL],
            "command": command,
        }
    return measured


async def _drop(admin_url: str, name: str) -> None:
    import asyncpg  # noqa: PLC0415

    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


# --- entry point -------------------------------------------------------------------------


def _raise_interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default="smoke")
    parser.add_argument("--duration", type=int, metavar="S", help="override the run time")
    parser.add_argument("--processes", type=int, metavar="N", help="override Locust processes")
    parser.add_argument(
        "--workers", type=int, metavar="N",
        help="distributed mode: a Locust master and N worker processes (0: off)",
    )  # fmt: skip
    parser.add_argument("--no-unpaced", action="store_true", help="skip the unpaced phase")
    parser.add_argument(
        "--report-timing", action="store_true",
        help="report latency and propagation against their limits without failing on them"
        " (failures still fail the run); for CI on a shared machine",
    )  # fmt: skip
    parser.add_argument("--drop-db", action="store_true", help="drop the dataset database after")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results root")
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    profile = replace(
        profile,
        duration_s=args.duration or profile.duration_s,
        processes=args.processes or profile.processes,
        workers=profile.workers if args.workers is None else args.workers,
        unpaced_s=0 if args.no_unpaced else profile.unpaced_s,
        gates=replace(profile.gates, timing_gated=not args.report_timing),
    )
    signal.signal(signal.SIGTERM, _raise_interrupt)
    out = result_dir(profile.name, args.out)
    print(f"pdp load test '{profile.name}': {profile.description}\n  results in {out}")
    try:
        summary = run(profile, out, drop_db=args.drop_db)
    except SetupError as exc:
        print(f"loadtest: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loadtest: interrupted; everything started was stopped", file=sys.stderr)
        return 130
    print(report.table(summary))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
