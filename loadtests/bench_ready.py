"""Start -> /readyz 200 and memory of `pdp serve` on an already seeded database (issue 16).

Runs a real `pdp serve` against PDP_DATABASE_URL (seed it first: `pdp seed --users
1000000`) `--runs` times and prints, per run and as medians: seconds from process start
to the first /readyz 200, the sidecar's own "loaded snapshot ... in N ms" (read + build),
the process's CPU seconds once ready (less sensitive to other load than the wall
times), VmRSS once ready and VmHWM (peak RSS). With `--snapshot-file` each run first starts
without the file and stops (SIGTERM writes the file), then the timed start restores
from it.

    PDP_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/pdp_loadfast \
        python -m loadtests.bench_ready --runs 3 [--snapshot-file]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from loadtests.bench_snapshot_file import _ready
from loadtests.bench_sync import _free_port

LOADED = re.compile(rb"(?:loaded snapshot|restored).*? in (\d+) ms")


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU the process used so far (robust to a shared machine's load)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _lines(stream: asyncio.StreamReader, seen: list[bytes]) -> None:
    seen.extend([line async for line in stream])


async def serve(url: str, snapshot_file: Path | None) -> dict[str, float]:
    """One start of `pdp serve`: ready seconds, load ms (its log line), RSS and peak (MiB)."""
    port = _free_port()
    env = {
        **os.environ,
        "PDP_DATABASE_URL": url,
        "PDP_PORT": str(port),
        "PDP_DEFAULT_TENANT": "tenant-1",
        "PDP_DRAIN_SECONDS": "0",
        "PDP_LOG_LEVEL": "INFO",
    }
    if snapshot_file is not None:
        env["PDP_SNAPSHOT_FILE"] = str(snapshot_file)
    seen: list[bytes] = []
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pdp", "serve", env=env, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    reader = asyncio.create_task(_lines(proc.stderr, seen))
    try:
        ready = await _ready(f"http://127.0.0.1:{port}", proc, started)
        await asyncio.sleep(1)  # the post-install gc.collect/freeze settles
        cpu = _cpu_seconds(proc.pid)
        rss = _status_kib(proc.pid, "VmRSS") / 1024
        peak = _status_kib(proc.pid, "VmHWM") / 1024
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 300)
        await reader
    loads = [int(m.group(1)) for line in seen if (m := LOADED.search(line))]
    return {"ready_s": ready, "load_ms": loads[0] if loads else -1, "cpu_s": cpu, "rss_mib": rss,
            "peak_mib": peak}  # fmt: skip


async def main(args: argparse.Namespace) -> None:
    url = os.environ.get("PDP_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/pdp_loadfast")
    results = []
    with tempfile.TemporaryDirectory(prefix="pdp-bench-ready-") as tmp:
        path = Path(tmp) / "replica.pdpsnap" if args.snapshot_file else None
        for run in range(args.runs):
            if path is not None:
                path.unlink(missing_ok=True)
                await serve(url, path)  # writes the file at SIGTERM
            result = await serve(url, path)
            results.append(result)
            print(f"run {run + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()),
                  flush=True)  # fmt: skip
    print("median: " + ", ".join(
        f"{k} {statistics.median(r[k] for r in results):.2f}" for k in results[0]
    ))  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--snapshot-file", action="store_true")
    asyncio.run(main(parser.parse_args()))
