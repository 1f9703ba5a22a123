"""Which PostgreSQL to use: PDP_DATABASE_URL, else an embedded server started on demand.

The embedded server is the `pgserver` package's PostgreSQL build, with its data
directory at `Settings.data_dir` (PDP_DATA_DIR). It listens on a Unix socket only
and stops when the last process using it exits.

pgserver counts its users in `.handle_pids.json` in the data directory and stops
the server when the last one leaves. A user killed with SIGKILL never leaves, so
its pid stayed there for good and no later clean exit stopped the server: before
taking a handle we drop the pids of processes that no longer run. A server still
running from a killed process is then found (postmaster.pid) and reused, and the
last process to exit cleanly stops it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

from pdp.config import Settings, redact_url
from pdp.errors import DependencyError

log = logging.getLogger(__name__)


HANDLES_FILE = ".handle_pids.json"  # pgserver's list of the processes using the server


@contextlib.contextmanager
def database_url(settings: Settings, *, keep_running: bool = False) -> Iterator[str]:
    """Yield the URL to use; start (and afterwards release) the embedded server if needed.

    `keep_running`: leave an embedded server running on exit even when this process
    was its last user (`pdp db url`: the URL it prints must keep working).
    """
    if settings.database_url:
        log.info("using PostgreSQL at %s", redact_url(settings.database_url))
        yield settings.database_url
        return
    with _embedded_server(settings.data_dir, keep_running=keep_running) as url:
        log.info("using embedded PostgreSQL in %s (%s)", settings.data_dir, redact_url(url))
        yield url


def forget_dead_handles(data_dir: Path) -> list[int]:
    """Drop from pgserver's handle list the processes that no longer run; the pids dropped.

    Call with pgserver's inter-process lock held. A zombie (killed, not yet reaped)
    counts as gone.
    """
    import psutil  # noqa: PLC0415  (pgserver's dependency: only with the embedded server)

    path = data_dir / HANDLES_FILE
    try:
        pids = [int(p) for p in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError):
        return []

    def alive(pid: int) -> bool:
        try:
            return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return False

    gone = [pid for pid in pids if not alive(pid)]
    if gone:
        path.write_text(json.dumps([pid for pid in pids if pid not in gone]))
    return gone


@contextlib.contextmanager
def _embedded_server(data_dir: Path, *, keep_running: bool) -> Iterator[str]:
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset; harmless here.
        warnings.simplefilter("ignore")
        # Heavy, and only needed without PDP_DATABASE_URL.
        from pgserver.postgres_server import PostgresServer, get_server  # noqa: PLC0415

    try:
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        with PostgresServer._lock:  # the lock pgserver takes around the same file
            gone = forget_dead_handles(data_dir.expanduser().resolve())
        if gone:
            log.warning(
                "embedded PostgreSQL in %s: processes %s held it and are gone (killed?);"
                " reusing the server if it still runs",
                data_dir,
                ",".join(map(str, gone)),
            )
        server = get_server(data_dir, cleanup_mode=None if keep_running else "stop")
    except Exception as exc:
        raise DependencyError(
            f"could not start the embedded PostgreSQL in {data_dir}: {exc}"
            " (set PDP_DATABASE_URL to use an existing server)"
        ) from exc
    with server:
        yield str(server.get_uri())
