"""Settings, read once from PDP_* environment variables into frozen dataclasses.

Every entry point calls `Settings.from_env(os.environ)` (command-line flags are
applied on top by the CLI) and passes the result down; nothing reads the
environment elsewhere. Errors name the variable. Secrets have `repr=False`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pdp.errors import ConfigError

T = TypeVar("T")

DEFAULT_PORT = 8282
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """'7d', '90s', '250ms', '1.5' (seconds) -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 250ms, 5s, 10m, 7d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(f"must be a positive integer, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"not a TCP port: {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError(f"must be positive, got {value}")
    return value


def _postgres_url(text: str) -> str:
    scheme, sep, _ = text.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        # Never echo the value: it may hold a password.
        raise ValueError("must be a postgresql://user:password@host:port/database URL")
    return text


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"must be one of {', '.join(options)}; got {text!r}")
        return text

    return parse


def _read(env: Mapping[str, str], name: str, parse: Callable[[str], T], default: T) -> T:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def default_data_dir(env: Mapping[str, str]) -> Path:
    """Where the embedded PostgreSQL keeps its data, under the user's data dir."""
    base = env.get("XDG_DATA_HOME") or str(Path(env.get("HOME", ".")) / ".local" / "share")
    return Path(base) / "pdp" / "pgdata"


def redact_url(url: str) -> str:
    """The URL with any password replaced by '***', safe to log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = (parts.username or "") + ":***"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[-1]}"))


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything configurable. Field docs are the README's configuration table."""

    database_url: str | None = field(default=None, repr=False)
    data_dir: Path = Path(".pdp-data")
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    backlog: int = 1024
    base_url: str | None = None
    default_tenant: str | None = None
    max_body_bytes: int = 1024 * 1024
    max_batch: int = 1000
    max_staleness_seconds: float = 5.0
    stale_mode: str = "deny"
    consistency_wait_ms: int = 200
    poll_interval_seconds: float = 1.0
    heartbeat_seconds: float = 5.0
    verify_interval_seconds: float = 60.0
    change_retention_seconds: float = 7 * 86400.0
    redis_url: str | None = field(default=None, repr=False)
    log_level: str = "INFO"
    log_format: str = "text"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        return cls(
            database_url=_read(env, "PDP_DATABASE_URL", _postgres_url, None),
            data_dir=_read(env, "PDP_DATA_DIR", Path, default_data_dir(env)),
            host=_read(env, "PDP_HOST", str, "127.0.0.1"),
            port=_read(env, "PDP_PORT", _port, DEFAULT_PORT),
            backlog=_read(env, "PDP_BACKLOG", _positive_int, 1024),
            base_url=env.get("PDP_BASE_URL") or None,
            default_tenant=env.get("PDP_DEFAULT_TENANT") or None,
            max_body_bytes=_read(env, "PDP_MAX_BODY_BYTES", _positive_int, 1024 * 1024),
            max_batch=_read(env, "PDP_MAX_BATCH", _positive_int, 1000),
            max_staleness_seconds=_read(env, "PDP_MAX_STALENESS_SECONDS", _positive_float, 5.0),
            stale_mode=_read(env, "PDP_STALE_MODE", _choice("deny", "serve"), "deny"),
            consistency_wait_ms=_read(env, "PDP_CONSISTENCY_WAIT_MS", int, 200),
            poll_interval_seconds=_read(env, "PDP_POLL_INTERVAL_SECONDS", _positive_float, 1.0),
            heartbeat_seconds=_read(env, "PDP_HEARTBEAT_SECONDS", _positive_float, 5.0),
            verify_interval_seconds=_read(
                env, "PDP_VERIFY_INTERVAL_SECONDS", _positive_float, 60.0
            ),
            change_retention_seconds=_read(
                env, "PDP_CHANGE_RETENTION", parse_duration, 7 * 86400.0
            ),
            redis_url=env.get("PDP_REDIS_URL") or None,
            log_level=_read(
                env, "PDP_LOG_LEVEL", _choice("DEBUG", "INFO", "WARNING", "ERROR"), "INFO"
            ),
            log_format=_read(env, "PDP_LOG_FORMAT", _choice("text", "json"), "text"),
        )

    def replace(self, **changes: Any) -> Settings:
        """A copy with `changes` applied (None values are ignored: flag not given)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def from_environment() -> Settings:
    """Settings from this process's environment; for entry points only."""
    return Settings.from_env(os.environ)
