"""The admin API's generated OpenAPI document is the truth: schemathesis against the live API.

A platform token with the admin scope drives every operation on a real PostgreSQL.
All checks run but positive_data_acceptance: a schema cannot say which ids exist, so
schema-valid requests naming unknown tenants or roles are 404/422 by design.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import asyncpg
import pytest
from aiohttp import web

from pdp.admin import token_store
from pdp.admin.app import build_admin_app
from pdp.admin.store import AdminStore, create_pool

CONFIG = """
checks.positive_data_acceptance.enabled = false
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_admin_api_conforms_to_its_openapi_document(db_url: str, pg: asyncpg.Connection, tmp_path: Path) -> None:
    await pg.execute("INSERT INTO pdp.tenants (id) VALUES ('acme')")
    made = await token_store.create(pg, "fuzzer", ("admin",))
    pool = await create_pool(db_url)
    runner = web.AppRunner(build_admin_app(AdminStore(pool)), access_log=None)
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
            "run", f"http://{host}:{port}/admin/v1/openapi.yaml",
            "-H", f"Authorization: Bearer {made.text}",
            "--max-examples", "25",
            "--seed", "1",
            "--workers", "1",
            "--request-timeout", "10",
            cwd=tmp_path,
            env={**os.environ, "NO_COLOR": "1"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await asyncio.wait_for(process.communicate(), timeout=280)
    finally:
        await runner.cleanup()
        await pool.close()
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    operations = text.split("Tested: ", 1)[1].split()[0] if "Tested: " in text else "0"
    assert int(operations) >= 40, text
