"""`pdp serve --workers 2` as real processes against a real PostgreSQL: both workers on
one port, a change reaching both (revision token honoured on each), a killed worker
forked again, a full reload re-forking the workers, SIGTERM, the owner's death."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from loadtests.run import free_port
from pdp.pg import seed, seed_data

CAROL_WRITES = {
    "subject": {"type": "user", "id": "carol", "properties": {"tenant": "demo"}},
    "action": {"name": "write"},
    "resource": {"type": "document", "id": "roadmap"},
}
DEADLINE = 60.0
TABLE_A = "public: ['GET /a']\n"
TABLE_B = "public: ['GET /a', 'GET /b']\n"


def _env(**pdp: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    return {**clean, **pdp}


def children(pid: int) -> set[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return {int(p) for p in text.split()}


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class Served:
    proc: asyncio.subprocess.Process
    base: str
    log: Path
    session: aiohttp.ClientSession
    routes: Path

    async def ask(
        self, body: object = CAROL_WRITES, headers: dict[str, str] | None = None
    ) -> tuple[str, dict[str, object]]:
        """One evaluation on a new connection: (the answering worker, the answer)."""
        async with self.session.post(
            f"{self.base}/access/v1/evaluation", json=body, headers=headers
        ) as response:
            assert response.status == 200, await response.text()
            return response.headers["X-PDP-Worker"], await response.json()

    async def from_each_worker(
        self, headers: dict[str, str] | None = None
    ) -> dict[str, dict[str, object]]:
        """An answer from each of the two workers (asking until both have answered)."""
        answers: dict[str, dict[str, object]] = {}
        async with asyncio.timeout(DEADLINE):
            while len(answers) < 2:
                worker, answer = await self.ask(headers=headers)
                answers.setdefault(worker, answer)
        return answers

    async def metrics(self) -> str:
        async with self.session.get(f"{self.base}/metrics") as response:
            assert response.status == 200
            return await response.text()

    async def forward_auth(self, path: str) -> dict[str, int]:
        """/forward-auth{path}'s status from each of the two workers."""
        statuses: dict[str, int] = {}
        async with asyncio.timeout(DEADLINE):
            while len(statuses) < 2:
                async with self.session.get(f"{self.base}/forward-auth{path}") as response:
                    statuses.setdefault(response.headers["X-PDP-Worker"], response.status)
        return statuses

    def text(self) -> str:
        return self.log.read_text()[-3000:]


@pytest.fixture
async def served(tmp_path: Path, db_url: str) -> AsyncIterator[Served]:
    await seed.load(db_url, seed_data.demo())
    async with _serving(tmp_path, db_url) as started:
        yield started


@contextlib.asynccontextmanager
async def _serving(tmp_path: Path, db_url: str, **extra: str) -> AsyncIterator[Served]:
    """`pdp serve --workers 2` on the demo tenant, until ready; killed if still running."""
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    routes = tmp_path / "routes.yaml"
    routes.write_text(TABLE_A)
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pdp", "serve", "--workers", "2",
            env=_env(
                PDP_DATABASE_URL=db_url, PDP_PORT=str(port), PDP_LOG_LEVEL="INFO",
                PDP_DRAIN_SECONDS="0.5", PDP_POLL_INTERVAL_SECONDS="0.2",
                PDP_ROUTES=str(routes), PDP_FORWARD_AUTH_MODE="envoy", PDP_DEFAULT_TENANT="demo",
                **extra,
            ),
            stdout=out, stderr=out,
        )  # fmt: skip
    # Every request on its own connection, so the kernel spreads them over the workers.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        served = Served(proc, f"http://127.0.0.1:{port}", log, session, routes)
        try:
            await _until_ready(served)
            yield served
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def _until_ready(served: Served) -> None:
    # The process offers no readiness event: poll /readyz with a deadline.
    async with asyncio.timeout(DEADLINE):
        while True:
            assert served.proc.returncode is None, served.text()
            try:
                async with served.session.get(f"{served.base}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)


async def _until(condition: object, what: str, served: Served) -> None:
    assert callable(condition)
    async with asyncio.timeout(DEADLINE):
        while not condition():
            assert served.proc.returncode is None, served.text()
            await asyncio.sleep(0.05)


async def _grant_carol(pg: asyncpg.Connection) -> str:
    async with pg.transaction():
        xid: str = await pg.fetchval("SELECT pg_current_xact_id()::text")
        await pg.execute(
            "INSERT INTO pdp.user_roles (tenant_id, user_id, role_id, scope) "
            "VALUES ('demo', 'carol', 'editor', 'document:roadmap')"
        )
    return xid


def _samples(text: str, name: str) -> dict[str, float]:
    """{process: value} of an unlabelled metric, as the workers' merged scrape shows it."""
    found = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            process = labels.split('process="', 1)[1].split('"', 1)[0]
            found[process] = float(value)
    return found


async def test_two_workers_serve_one_port_and_both_follow_a_change(
    served: Served, pg: asyncpg.Connection
) -> None:
    before = await served.from_each_worker()
    assert set(before) == {"1", "2"}
    assert all(a["decision"] is False for a in before.values())
    xid = await _grant_carol(pg)
    after = await served.from_each_worker({"X-PDP-Min-Revision": xid})
    assert all(a["decision"] is True for a in after.values()), after
    # Answered from each worker's own replica once it held the change (not by the SQL
    # fallback, which answers when the wait for the revision runs out).
    revisions = [a["context"]["revision"] for a in after.values()]  # type: ignore[index]
    assert "sql" not in revisions, after
    # Each worker applied the change itself (not only the SQL fallback answering).
    text = await served.metrics()
    assert set(_samples(text, "pdp_ready")) == {"owner", "1", "2"}
    applied = _samples(text, "pdp_sync_changes_applied_total")
    assert applied["1"] >= 1
    assert applied["2"] >= 1
    assert applied["owner"] >= 1
    assert all(v < 5 for v in _samples(text, "pdp_sync_staleness_seconds").values())
    # Any worker's scrape reports every process: the other one's decisions too.
    decisions = [
        line for line in text.splitlines()
        if line.startswith("pdp_decisions_total{") and 'endpoint="evaluation"' in line
    ]  # fmt: skip
    assert {'process="1"' in d for d in decisions} == {True, False}
    # SIGHUP (reload the route table) is each worker's: the owner forwards it, and lives.
    workers = children(served.proc.pid)
    assert await served.forward_auth("/b") == {"1": 403, "2": 403}
    served.routes.write_text(TABLE_B)
    served.proc.send_signal(signal.SIGHUP)
    await _until(lambda: served.text().count("route table reloaded") == 2, "reloads", served)
    assert await served.forward_auth("/b") == {"1": 200, "2": 200}
    assert children(served.proc.pid) == workers
    served.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(served.proc.wait(), DEADLINE) == 0, served.text()


async def test_workers_restart_from_the_snapshot_file_and_catch_up(
    tmp_path: Path, db_url: str, pg: asyncpg.Connection
) -> None:
    """The owner restores the file (format version 2, the state as held), forks the
    workers, and the catch-up from the file's snapshot brings what changed while down."""
    await seed.load(db_url, seed_data.demo())
    path = tmp_path / "replica.pdpsnap"
    async with _serving(tmp_path, db_url, PDP_SNAPSHOT_FILE=str(path)) as first:
        assert all(a["decision"] is False for a in (await first.from_each_worker()).values())
        first.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(first.proc.wait(), DEADLINE) == 0, first.text()
    assert "wrote snapshot" in first.text()
    assert path.read_bytes().startswith(b"PDPSNAP\n\x00\x00\x00\x02")
    xid = await _grant_carol(pg)  # while no sidecar runs
    async with _serving(tmp_path, db_url, PDP_SNAPSHOT_FILE=str(path)) as again:
        answers = await again.from_each_worker({"X-PDP-Min-Revision": xid})
        assert all(a["decision"] is True for a in answers.values()), answers
        assert "sql" not in [a["context"]["revision"] for a in answers.values()]  # type: ignore[index]
        assert "restored snapshot" in again.text()
        assert "(bootstrap)" not in again.text()  # no load from PostgreSQL
        again.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(again.proc.wait(), DEADLINE) == 0, again.text()


async def test_a_killed_worker_is_forked_again(served: Served) -> None:
    owner = served.proc.pid
    first = children(owner)
    assert len(first) == 2
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    await _until(lambda: len(children(owner) - first) == 1, "a new worker", served)
    assert set(await served.from_each_worker()) == {"1", "2"}
    restarts = _samples(await served.metrics(), "pdp_worker_restarts_total")
    assert restarts == {"owner": 1.0}
    assert "exited (signal 9); forking it again" in served.text()
    workers = children(owner)
    served.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(served.proc.wait(), DEADLINE) == 0, served.text()
    assert not any(alive(pid) for pid in workers)


async def test_a_full_reload_forks_a_new_generation(served: Served, pg: asyncpg.Connection) -> None:
    owner = served.proc.pid
    first = children(owner)
    await pg.execute("UPDATE pdp.sync_meta SET epoch = gen_random_uuid()")
    await _until(lambda: not children(owner) & first, "the old workers gone", served)
    await _until(lambda: len(children(owner)) == 2, "two new workers", served)
    xid = await _grant_carol(pg)
    after = await served.from_each_worker({"X-PDP-Min-Revision": xid})
    assert all(a["decision"] is True for a in after.values()), after
    reloads = [
        line for line in (await served.metrics()).splitlines()
        if line.startswith("pdp_sync_full_reloads_total{")
        and 'process="owner"' in line and 'reason="epoch"' in line
    ]  # fmt: skip
    assert reloads, "no epoch reload counted"
    assert _samples(await served.metrics(), "pdp_worker_restarts_total") == {}


async def test_the_workers_die_with_the_owner(served: Served) -> None:
    workers = children(served.proc.pid)
    served.proc.kill()
    await served.proc.wait()
    async with asyncio.timeout(DEADLINE):  # processes signal no event: poll /proc
        while any(alive(pid) for pid in workers):  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_a_bad_route_table_fails_the_start_before_any_fork(
    tmp_path: Path, db_url: str
) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(TABLE_A)  # no tenant source: a configuration error
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pdp", "serve", "--workers", "2",
        env=_env(PDP_DATABASE_URL=db_url, PDP_ROUTES=str(routes), PDP_PORT="0"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), DEADLINE)
    assert proc.returncode == 2, out
    assert b"PDP_ROUTES needs a tenant" in out


async def test_workers_refuse_on_demand_mode(db_url: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pdp", "serve", "--workers", "2",
        env=_env(PDP_DATABASE_URL=db_url, PDP_CACHE_MODE="on_demand", PDP_PORT="0"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), DEADLINE)
    assert proc.returncode != 0
    assert b"PDP_WORKERS" in out
