"""With no PDP_DATABASE_URL the commands start an embedded PostgreSQL in PDP_DATA_DIR,
reuse it while it runs, and the last one to exit stops it, even after a `kill -9`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import asyncpg
import psutil

from loadtests.gateway_harness import Proc, free_port, poll, request
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


def _postmaster(data_dir: Path) -> int:
    """The embedded server's pid (first line of postmaster.pid)."""
    return int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])


def _running(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _serve(data_dir: Path, log: Path) -> tuple[Proc, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    port = free_port()
    env |= {"PDP_DATA_DIR": str(data_dir), "PDP_PORT": str(port)}
    proc = Proc("serve", [sys.executable, "-m", "pdp", "serve"], log, env)
    poll(lambda: request(port, "GET", "/readyz", timeout=2).status == 200, 90, "serve", proc)
    return proc, port


def test_a_server_left_by_a_killed_sidecar_is_reused_and_then_stopped(tmp_path: Path) -> None:
    data_dir = tmp_path / "pgdata"
    assert _pdp("migrate", data_dir=data_dir).returncode == 0
    first, _ = _serve(data_dir, tmp_path / "first.log")
    postmaster = _postmaster(data_dir)
    try:
        _kill_restart_stop(data_dir, tmp_path, first, postmaster)
    finally:
        if _running(postmaster):  # never leave a server behind, even when failing
            psutil.Process(postmaster).terminate()


def _kill_restart_stop(data_dir: Path, tmp_path: Path, first: Proc, postmaster: int) -> None:
    first.popen.send_signal(signal.SIGKILL)
    first.popen.wait(10)  # reaped: its pid is gone, not a zombie
    assert _running(postmaster), "the embedded server went with the sidecar"

    # A restart finds the server the killed one left and uses it (no second server).
    second, _ = _serve(data_dir, tmp_path / "second.log")
    assert _postmaster(data_dir) == postmaster
    # A clean exit of the last user stops it, though the killed one never let go.
    assert second.stop() == 0, second.tail()
    poll(lambda: not _running(postmaster), 30, "the embedded server to stop")
    assert "are gone (killed?)" in second.tail()
