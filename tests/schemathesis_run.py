"""Run the `st` CLI against an aiohttp app served on this test's loop (a real socket, port 0).

The CLI is a subprocess we await, so the loop keeps serving meanwhile. Every run is
single-worker with a fixed seed; `extra` adds the caller's own options.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from aiohttp import web


async def fuzz(
    app: web.Application, document: str, config: str, tmp_path: Path, *extra: str, timeout: float
) -> tuple[int, str]:
    """(exit code, output) of `st run` on `document` (a path on the app) with `config`."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        toml = tmp_path / "schemathesis.toml"
        toml.write_text(config)
        st = Path(sys.executable).with_name("st")
        process = await asyncio.create_subprocess_exec(
            str(st), "--config-file", str(toml), "--no-color",
            "run", f"http://{host}:{port}{document}", *extra,
            "--seed", "1", "--workers", "1", "--request-timeout", "10",
            cwd=tmp_path,
            env={**os.environ, "NO_COLOR": "1"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await asyncio.wait_for(process.communicate(), timeout=timeout)
    finally:
        await runner.cleanup()
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")
