"""Shared fixtures: a real PostgreSQL, a fresh database per test, created from a migrated template.

The server: PDP_TEST_DATABASE_URL when set (an admin connection; CI sets it and a
server that cannot be reached fails the run), else the local PostgreSQL on
127.0.0.1:5432 when it answers, else an embedded server (pgserver) in a temporary
directory, so `make test` works on a machine with no PostgreSQL. Nothing is
skipped for a missing service. Every database this run creates carries the run's
unique prefix and is dropped at the end.
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import threading
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from hypothesis import settings

from pdp.engine import Loader, TenantState
from pdp.pg import migrate
from tests.pg_url import with_database

pytest_plugins = ["tests.loop_guard", "tests.redis_server"]

LOCAL_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
RUN_ID = uuid.uuid4().hex[:8]


def _local_server_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=2):
            return True
    except OSError:
        return False


def _admin_url() -> str:
    explicit = os.environ.get("PDP_TEST_DATABASE_URL", "")
    if explicit and explicit != "embedded":
        return explicit
    if not explicit and _local_server_answers():
        return LOCAL_URL
    data_dir = Path(tempfile.mkdtemp(prefix="pdp-test-pg-"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pgserver.postgres_server import get_server

    server = get_server(data_dir, cleanup_mode="delete")
    return str(server.get_uri())


ADMIN_URL = _admin_url()


def database_url(name: str) -> str:
    """ADMIN_URL pointed at database `name` (query such as ?host=/socket/dir kept)."""
    return with_database(ADMIN_URL, name)


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _create_template() -> str:
    name = f"pdp_test_{RUN_ID}_template"

    async def make() -> None:
        await _admin(f'CREATE DATABASE "{name}"')
        await migrate.upgrade(database_url(name))

    try:
        asyncio.run(make())
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.exit(f"PostgreSQL at {ADMIN_URL} is required for the tests: {exc}", returncode=3)
    return name


@pytest.fixture(scope="session")
def template_db() -> Iterator[str]:
    """Name of a database migrated to head, used as the template of every test database."""
    name = _create_template()
    yield name
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


class DatabaseFactory:
    """Creates databases for one test and drops them afterwards, newest first."""

    def __init__(self, template: str | None) -> None:
        self.template = template
        self.created: list[str] = []

    async def create(self, *, migrated: bool = True) -> str:
        name = f"pdp_test_{RUN_ID}_{uuid.uuid4().hex[:10]}"
        template = f' TEMPLATE "{self.template}"' if migrated and self.template else ""
        await _admin(f'CREATE DATABASE "{name}"{template}')
        self.created.append(name)
        return database_url(name)

    async def drop_all(self) -> None:
        for name in reversed(self.created):
            await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.created.clear()


@pytest.fixture
async def make_db(template_db: str) -> AsyncIterator[DatabaseFactory]:
    factory = DatabaseFactory(template_db)
    yield factory
    await factory.drop_all()


@pytest.fixture
async def db_url(make_db: DatabaseFactory) -> str:
    """URL of a fresh database migrated to head, dropped after the test."""
    return await make_db.create()


@pytest.fixture
async def empty_db_url(make_db: DatabaseFactory) -> str:
    """URL of a fresh empty database (no pdp schema), dropped after the test."""
    return await make_db.create(migrated=False)


@pytest.fixture
async def pg(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    """An asyncpg connection to this test's migrated database."""
    conn = await asyncpg.connect(db_url)
    try:
        yield conn
    finally:
        await conn.close()


# CI runs a fixed set of examples (reproducible); local runs explore new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
def tenant_builds(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each build of a replaced tenant's state (a one-tenant `Loader` finishing)
    ran on the main thread, the event loop's (it must not: seconds for a big tenant)."""
    on_loop: list[bool] = []
    finish = Loader.finish

    def recorded(self: Loader) -> dict[str, TenantState]:
        if self._only is not None:  # a tenant's state, not a full load's
            on_loop.append(threading.current_thread() is threading.main_thread())
        return finish(self)

    monkeypatch.setattr(Loader, "finish", recorded)
    return on_loop
