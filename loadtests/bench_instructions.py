"""Instructions per request, counted by callgrind: pdp's `POST /access/v1/evaluation` as
`pdp serve` serves it, against the bare aiohttp handler of `bench_http` (issue 16 item 1).

    python -m loadtests.bench_instructions [--requests 3000] [--users 2000]

Wall-clock ratios on a shared 2-core machine move with the neighbours; instruction
counts do not (the same count twice, whatever else runs). Each contender runs in its own
process under `valgrind --tool=callgrind` with instrumentation off through start-up and
a warm-up; only the measured requests are counted. Requests go through aiohttp's real
connection handler (its HTTP parser, then pdp's edge and app or the bare app, then its
response writer) into an in-memory transport: no sockets, so the kernel's share (the
same for both) is not in the count. pdp is `build_app` over an engine of `--users`
synthetic users (`bench_http`'s dataset and bodies) served by `EdgeRunner` with the
sidecar's arguments. Also counted: pdp's `/access/v1/evaluations` with batches of 100,
per decision.

Needs valgrind with its headers (valgrind/callgrind.h) and a C compiler: a ten-line
helper is built to start and stop the count from Python. Instructions are not time: a
cache miss costs no instruction, so pdp's larger heap makes its wall-clock ratio lower
than this one (README, Benchmarks).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HELPER = r"""
#include <valgrind/callgrind.h>
void count_start(void) {
    CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; CALLGRIND_TOGGLE_COLLECT;
}
void count_stop(void) { CALLGRIND_TOGGLE_COLLECT; CALLGRIND_DUMP_STATS; }
"""
WARM_UP = 500
EVALUATION = "/access/v1/evaluation"
EVALUATIONS = "/access/v1/evaluations"
TOTALS = re.compile(rb"^(?:summary|totals): (\d+)", re.MULTILINE)


# --- the counted process ------------------------------------------------------------


class _Transport(asyncio.Transport):
    """Takes the server's writes; says when an answer's bytes arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.answered: asyncio.Future[None] | None = None
        self._closing = False

    def write(self, data: Any) -> None:
        if self.answered is not None and not self.answered.done():
            self.answered.set_result(None)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8181)}.get(
            name, default
        )

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


async def _runner(kind: str, users: int) -> tuple[Any, list[str], list[str]]:
    """(a set-up runner, single bodies, batch bodies) for `kind` (bare or pdp)."""
    from aiohttp import web  # noqa: PLC0415 -- counted process only

    from loadtests import bare_app  # noqa: PLC0415 -- counted process only
    from loadtests import bench_http as bh  # noqa: PLC0415 -- counted process only

    singles, batches = bh._bodies(users, 2000, 100, 0.0)
    if kind == "bare":
        runner: Any = web.AppRunner(bare_app.build(), access_log=None)
        await runner.setup()
        return runner, singles, batches
    from prometheus_client import CollectorRegistry  # noqa: PLC0415 -- counted process only

    from pdp.config import Settings  # noqa: PLC0415 -- counted process only
    from pdp.engine import Engine, Snapshot  # noqa: PLC0415 -- counted process only
    from pdp.http_edge import EdgeLimits  # noqa: PLC0415 -- counted process only
    from pdp.replica import Replica  # noqa: PLC0415 -- counted process only
    from pdp.sidecar import edge_runner  # noqa: PLC0415 -- counted process only
    from pdp.web.app import build_app  # noqa: PLC0415 -- counted process only

    engine = Engine.build(bh._engine_rows(users), Snapshot(1, 1))
    replica = Replica(clock=time.monotonic)
    replica.install(engine, epoch="bench", synced_at=time.monotonic())
    settings = Settings(default_tenant=bh.TENANT, max_staleness_seconds=1e9, max_batch=100)
    app = build_app(settings, replica=replica, registry=CollectorRegistry())
    runner = edge_runner(app, settings, EdgeLimits(settings.request_read_timeout_seconds, 10_000))
    await runner.setup()
    return runner, singles, batches


def _request(path: str, body: str) -> bytes:
    data = body.encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


async def _count(kind: str, helper: str, requests: int, users: int, path: str) -> None:
    runner, singles, batches = await _runner(kind, users)
    bodies = singles if path == EVALUATION else batches
    raw = [_request(path, b) for b in bodies]
    transport = _Transport()
    connection = runner.server()
    connection.connection_made(transport)
    loop = asyncio.get_running_loop()

    async def ask(data: bytes) -> None:
        transport.answered = loop.create_future()
        connection.data_received(data)
        await transport.answered

    for i in range(WARM_UP):
        await ask(raw[i % len(raw)])
    gc.collect()
    gc.freeze()
    count = ctypes.CDLL(helper)
    count.count_start()
    for i in range(requests):
        await ask(raw[i % len(raw)])
    count.count_stop()
    await runner.cleanup()


# --- the orchestrating parent -------------------------------------------------------


def _build_helper(directory: Path) -> Path:
    source, library = directory / "count.c", directory / "count.so"
    source.write_text(HELPER)
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not Path("/usr/include/valgrind/callgrind.h").exists():
        raise SystemExit("bench_instructions needs a C compiler and valgrind's headers")
    subprocess.run(
        [compiler, "-O2", "-shared", "-fPIC", "-o", str(library), str(source)], check=True
    )
    return library


def _instructions(kind: str, path: str, args: argparse.Namespace, tmp: Path) -> int:
    """Instructions per request of `kind` on `path`, from callgrind's dump."""
    out = tmp / f"{kind}-{path.rsplit('/', 1)[1]}.out"
    command = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no",
        f"--callgrind-out-file={out}", sys.executable, "-m", "loadtests.bench_instructions",
        "--child", kind, "--helper", str(args.helper), "--requests", str(args.requests),
        "--users", str(args.users), "--path", path,
    ]  # fmt: skip
    subprocess.run(
        command,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    totals = [int(m) for f in tmp.glob(out.name + "*") for m in TOTALS.findall(f.read_bytes())]
    if not totals:
        raise RuntimeError(f"callgrind wrote no totals for {kind} {path}")
    return max(totals) // int(args.requests)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--child", choices=("bare", "pdp"), help=argparse.SUPPRESS)
    parser.add_argument("--helper", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=EVALUATION, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        from loadtests.bare_app import run_loop  # noqa: PLC0415 -- counted process only

        run_loop(_count(args.child, str(args.helper), args.requests, args.users, args.path),
                 uvloop=True)  # fmt: skip
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("bench_instructions needs valgrind (Debian: apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="pdp-instructions-") as name:
        tmp = Path(name)
        args.helper = _build_helper(tmp)
        bare = _instructions("bare", EVALUATION, args, tmp)
        pdp = _instructions("pdp", EVALUATION, args, tmp)
        batch = _instructions("pdp", EVALUATIONS, args, tmp)
    print(f"instructions per request ({args.requests} requests, {args.users} users, callgrind):")
    print(f"  bare aiohttp handler        {bare:>9,}")
    print(f"  pdp {EVALUATION}  {pdp:>9,}   bare / pdp = {bare / pdp:.2f}")
    print(f"  pdp {EVALUATIONS}, batches of 100: {batch:,} a batch, {batch // 100:,} a decision")


if __name__ == "__main__":
    main()
