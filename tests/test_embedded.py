"""With no PDP_DATABASE_URL the commands start an embedded PostgreSQL in PDP_DATA_DIR."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import asyncpg

from pdp.config import Settings
from pdp.pg import migrate
from pdp.pg.embedded import database_url


def _pdp(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    env["PDP_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [sys.executable, "-m", "pdp", *args], env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )


async def test_migrate_on_the_embedded_default_then_reuse_it(tmp_path: Path) -> None:
    data_dir = tmp_path / "pgdata"
    first = _pdp("migrate", data_dir=data_dir)
    assert first.returncode == 0, first.stderr
    assert "using embedded PostgreSQL in" in first.stderr
    assert (data_dir / "PG_VERSION").exists()

    # The data directory is reused: the schema migrated above is there.
    with database_url(Settings(data_dir=data_dir)) as url:
        conn = await asyncpg.connect(url)
        try:
            version = await conn.fetchval("SELECT version_num FROM pdp.alembic_version")
            allowed = await conn.fetchval("SELECT pdp.check('t', 'u', 'doc', '1', 'read')")
        finally:
            await conn.close()
    assert (version,) == migrate.heads(migrate.alembic_config(url))
    assert allowed is False

    again = _pdp("migrate", data_dir=data_dir)
    assert again.returncode == 0, again.stderr
