"""Which PostgreSQL to use: PDP_DATABASE_URL, else an embedded server started on demand.

The embedded server is the `pgserver` package's PostgreSQL build, with its data
directory at `Settings.data_dir` (PDP_DATA_DIR). It listens on a Unix socket only
and stops when the last process using it exits.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

from pdp.config import Settings, redact_url
from pdp.errors import DependencyError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def database_url(settings: Settings) -> Iterator[str]:
    """Yield the URL to use; start (and afterwards release) the embedded server if needed."""
    if settings.database_url:
        log.info("using PostgreSQL at %s", redact_url(settings.database_url))
        yield settings.database_url
        return
    with _embedded_server(settings.data_dir) as url:
        log.info("using embedded PostgreSQL in %s (%s)", settings.data_dir, redact_url(url))
        yield url


@contextlib.contextmanager
def _embedded_server(data_dir: Path) -> Iterator[str]:
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset; harmless here.
        warnings.simplefilter("ignore")
        # Heavy, and only needed without PDP_DATABASE_URL.
        from pgserver.postgres_server import get_server  # noqa: PLC0415

    try:
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        server = get_server(data_dir, cleanup_mode="stop")
    except Exception as exc:
        raise DependencyError(
            f"could not start the embedded PostgreSQL in {data_dir}: {exc}"
            " (set PDP_DATABASE_URL to use an existing server)"
        ) from exc
    with server:
        yield str(server.get_uri())
