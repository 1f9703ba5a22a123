"""Turn driver exceptions into one readable line (for the CLI and dependency errors)."""

from __future__ import annotations

import asyncpg
import sqlalchemy.exc

# What talking to PostgreSQL can raise when the server or the link misbehaves
# (InternalClientError: asyncpg caught mid-operation by a killed connection).
DRIVER_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        orig = getattr(current, "orig", None)
        current = (
            orig if isinstance(orig, BaseException) else (current.__cause__ or current.__context__)
        )
    return seen


def is_database_error(exc: BaseException) -> bool:
    """True when `exc` came from talking to PostgreSQL (or failing to reach it)."""
    return any(
        isinstance(
            e,
            OSError
            | TimeoutError
            | asyncpg.PostgresError
            | asyncpg.InterfaceError
            | sqlalchemy.exc.SQLAlchemyError,
        )
        for e in _chain(exc)
    )


def describe_database_error(exc: BaseException) -> str:
    """One line naming what went wrong, never the DSN or a password."""
    chain = _chain(exc)
    for e in chain:
        if isinstance(e, asyncpg.PostgresError):
            return f"PostgreSQL error: {e}"
    for e in chain:
        if isinstance(e, ConnectionRefusedError):
            return "cannot connect to PostgreSQL: connection refused (is the server running?)"
        if isinstance(e, TimeoutError):
            return "cannot connect to PostgreSQL: timed out"
        if isinstance(e, OSError):
            # A file the URL names (sslrootcert=, sslcert=) is part of the answer.
            where = f": {e.filename}" if e.filename else ""
            return f"cannot connect to PostgreSQL: {e.strerror or e}{where}"
        if isinstance(e, asyncpg.InterfaceError):
            return f"PostgreSQL client error: {e}"
    return f"database error: {type(chain[-1]).__name__}: {chain[-1]}"
