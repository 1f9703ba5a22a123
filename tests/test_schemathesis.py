"""The served OpenAPI document is the truth: schemathesis fuzzes the live app against it.

The app runs on this test's event loop on a real socket (port 0); the `st` CLI runs
as a subprocess we await, so the loop keeps serving meanwhile. Every check is on
(the default), all four phases, 30 examples per operation, a fixed seed. One exception, configured per operation:
`positive_data_acceptance` is off for the searches, because a schema cannot say
which `page.token` strings this server issued (a made-up token is a 400 by design).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
from aiohttp import web

from tests.test_web_support import Clock, loaded_replica, make_app, settings

# Every check is enabled by default; naming them with `--checks all` on the command line
# would override the per-operation exception below.
CONFIG = """
[[operations]]
include-path-regex = "^/access/v1/search/"
checks.positive_data_acceptance.enabled = false
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_api_conforms_to_its_openapi_document(tmp_path: Path) -> None:
    app = make_app(loaded_replica(Clock()), settings(max_batch=1000, consistency_wait_ms=5))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        config = tmp_path / "schemathesis.toml"
        config.write_text(CONFIG)
        st = Path(sys.executable).with_name("st")
        process = await asyncio.create_subprocess_exec(
            str(st), "--config-file", str(config), "--no-color",
            "run", f"http://{host}:{port}/openapi.yaml",
            "--max-examples", "30",
            "--seed", "1",
            "--workers", "1",
            "--request-timeout", "10",
            cwd=tmp_path,
            env={**os.environ, "NO_COLOR": "1"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await asyncio.wait_for(process.communicate(), timeout=100)
    finally:
        await runner.cleanup()
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    assert "Tested: 9" in text, text
