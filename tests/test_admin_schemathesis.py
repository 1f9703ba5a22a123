"""The admin API's generated OpenAPI document is the truth: schemathesis against the live API.

A platform token with the admin scope drives every operation on a real PostgreSQL.
All checks run but positive_data_acceptance: a schema cannot say which ids exist, so
schema-valid requests naming unknown tenants or roles are 404/422 by design.
"""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from pdp.admin import token_store
from pdp.admin.app import build_admin_app
from pdp.admin.store import AdminStore, create_pool
from tests.schemathesis_run import fuzz

CONFIG = """
checks.positive_data_acceptance.enabled = false
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_admin_api_conforms_to_its_openapi_document(db_url: str, pg: asyncpg.Connection, tmp_path: Path) -> None:
    await pg.execute("INSERT INTO pdp.tenants (id) VALUES ('acme')")
    made = await token_store.create(pg, "fuzzer", ("admin",))
    pool = await create_pool(db_url)
    try:
        code, text = await fuzz(
            build_admin_app(AdminStore(pool)), "/admin/v1/openapi.yaml", CONFIG, tmp_path,
            "-H", f"Authorization: Bearer {made.text}", "--max-examples", "25", timeout=280,
        )  # fmt: skip
    finally:
        await pool.close()
    assert code == 0, text
    operations = text.split("Tested: ", 1)[1].split()[0] if "Tested: " in text else "0"
    assert int(operations) >= 40, text
