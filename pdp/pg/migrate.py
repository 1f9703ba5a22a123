"""Schema migrations: run the Alembic revisions shipped in `pdp.migrations`."""

from __future__ import annotations

import asyncio
from importlib.resources import files

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from pdp.pg.schema import SCHEMA


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """Alembic filter: only the pdp schema, not alembic's own version table, and not the
    decision log's daily partitions (created at run time, not by migrations)."""
    if type_ == "schema":
        return name == SCHEMA
    if type_ == "table" and name is not None and name.startswith("decision_log_p"):
        return False
    return not (type_ == "table" and name == "alembic_version")


def alembic_config(url: str) -> Config:
    """An Alembic config for our revisions and `url` (no alembic.ini needed)."""
    config = Config()
    config.set_main_option("script_location", str(files("pdp.migrations")))
    config.attributes["url"] = url
    return config


def heads(config: Config) -> tuple[str, ...]:
    return tuple(ScriptDirectory.from_config(config).get_heads())


async def upgrade(url: str, revision: str = "head") -> None:
    """Upgrade the database at `url` to `revision`, in a worker thread.

    Alembic's async env.py runs its own event loop, so it must not run on ours.
    """
    await asyncio.to_thread(command.upgrade, alembic_config(url), revision)


async def downgrade(url: str, revision: str = "base") -> None:
    await asyncio.to_thread(command.downgrade, alembic_config(url), revision)


def upgrade_sql(url: str, revision: str = "head") -> None:
    """Print the SQL of the upgrade to stdout instead of running it (offline mode)."""
    command.upgrade(alembic_config(url), revision, sql=True)
