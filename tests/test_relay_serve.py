"""`pdp relay` and `pdp serve` with PDP_SYNC_SOURCE=redis, as processes: decisions,
read-your-writes with a revision token, readiness, metrics, one PostgreSQL listener."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import aiohttp
import asyncpg

from loadtests.run import free_port
from pdp.pg import seed, seed_data
from tests.redis_server import RedisServer

HEALTHCHECK = Path(__file__).resolve().parent.parent / "deploy" / "image" / "healthcheck.py"

CAROL_WRITES = {
    "subject": {"type": "user", "id": "carol", "properties": {"tenant": "demo"}},
    "action": {"name": "write"},
    "resource": {"type": "document", "id": "roadmap"},
}


def _env(**pdp: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    return {**clean, **pdp}



async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as response:
        return response.status, await response.text()


async def _until_ok(
    session: aiohttp.ClientSession, url: str, proc: asyncio.subprocess.Process, log: Path
) -> None:
    # The processes offer no readiness event: poll with a deadline.
    async with asyncio.timeout(60):
        while True:
            assert proc.returncode is None, f"the process exited: see {log}"
            try:
                if (await _get(session, url))[0] == 200:
                    return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the metrics")


async def test_relay_and_a_sidecar_in_relay_mode(
    tmp_path: Path, db_url: str, pg: asyncpg.Connection, redis_server: RedisServer
) -> None:
    await seed.load(db_url, seed_data.demo())
    relay_port, serve_port = free_port(), free_port()
    common = {
        "PDP_DATABASE_URL": db_url,
        "PDP_REDIS_URL": redis_server.url,
        "PDP_LOG_LEVEL": "INFO",
    }
    procs: list[asyncio.subprocess.Process] = []
    logs = {name: tmp_path / f"{name}.log" for name in ("relay", "serve")}
    try:
        with logs["relay"].open("wb") as out:
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pdp", "relay",
                env=_env(**common, PDP_RELAY_PORT=str(relay_port)), stdout=out, stderr=out,
            ))  # fmt: skip
        async with aiohttp.ClientSession() as session:
            await _until_ok(
                session, f"http://127.0.0.1:{relay_port}/healthz", procs[0], logs["relay"]
            )
            # The image's probe script (Compose's healthcheck of the relay) agrees.
            for port, expected in ((relay_port, 0), (free_port(), 1)):
                probe = await asyncio.create_subprocess_exec(
                    sys.executable, str(HEALTHCHECK), "--relay",
                    env=_env(PDP_RELAY_PORT=str(port)), stderr=asyncio.subprocess.PIPE,
                )  # fmt: skip
                _, err = await asyncio.wait_for(probe.communicate(), 30)
                assert probe.returncode == expected, (port, err)
            with logs["serve"].open("wb") as out:
                procs.append(await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "pdp", "serve",
                    env=_env(**common, PDP_SYNC_SOURCE="redis", PDP_PORT=str(serve_port)),
                    stdout=out, stderr=out,
                ))  # fmt: skip
            base = f"http://127.0.0.1:{serve_port}"
            await _until_ok(session, f"{base}/readyz", procs[1], logs["serve"])
            async with session.post(f"{base}/access/v1/evaluation", json=CAROL_WRITES) as response:
                assert (await response.json())["decision"] is False
            async with pg.transaction():
                xid = await pg.fetchval("SELECT pg_current_xact_id()::text")
                await pg.execute(
                    "INSERT INTO pdp.user_roles (tenant_id, user_id, role_id, scope) "
                    "VALUES ('demo', 'carol', 'editor', 'document:roadmap')"
                )
            headers = {"X-PDP-Min-Revision": xid}
            async with session.post(
                f"{base}/access/v1/evaluation", json=CAROL_WRITES, headers=headers
            ) as response:
                answer = await response.json()
            assert answer["decision"] is True, answer
            _, relay_metrics = await _get(session, f"http://127.0.0.1:{relay_port}/metrics")
            assert _metric(relay_metrics, "pdp_relay_leader") == 1.0
            assert _metric(relay_metrics, 'pdp_relay_entries_published_total{kind="changes"}') >= 1
            _, serve_metrics = await _get(session, f"{base}/metrics")
            assert _metric(serve_metrics, "pdp_ready") == 1.0
            assert _metric(serve_metrics, "pdp_sync_staleness_seconds") < 5
            assert _metric(serve_metrics, "pdp_sync_changes_applied_total") >= 1
        listeners = await pg.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'pdp-listen'"
        )
        assert listeners == 1  # the relay's; the sidecar holds none
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in procs:
            await asyncio.wait_for(proc.wait(), 30)
    assert [p.returncode for p in procs] == [0, 0], {
        n: p.read_text()[-2000:] for n, p in logs.items()
    }
