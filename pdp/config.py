"""Settings, read once from PDP_* environment variables (and flags) into a frozen dataclass.

Every setting is one `Option` in `OPTIONS`: its field, its variable, its parser and,
for the ones `pdp serve` takes on its command line, its flag. Environment variables
and flags go through the same parser, so a value is valid or invalid the same way
whichever way it came; an error names what the user typed (`PDP_PORT: ...` or
`--port: ...`), never echoes a secret. Entry points call `Settings.from_env(...)`
and pass the result down; nothing reads the environment elsewhere. Secrets have
`repr=False`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from pdp.errors import ConfigError

DEFAULT_PORT = 8282
DEFAULT_ADMIN_PORT = 8283
DEFAULT_RELAY_PORT = 8284
MAX_ID_LENGTH = 256  # as pdp.pg.schema.MAX_ID_LENGTH (the database's CHECK constraints)
JWT_ALGORITHMS = ("HS256", "RS256", "ES256")  # as pdp.gateway.tokens.SUPPORTED_ALGORITHMS
MAX_JWT_LEEWAY_SECONDS = 300.0  # as pdp.gateway.tokens.MAX_LEEWAY_SECONDS
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


# --- parsers: text -> value, ValueError with a message that never echoes a secret ----


def parse_duration(text: str) -> float:
    """'7d', '90s', '250ms', '1.5' (seconds) -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 250ms, 5s, 10m, 7d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"not an integer: {text!r}") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = _integer(text)
    if value <= 0:
        raise ValueError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise ValueError(f"must be zero or a positive integer, got {value}")
    return value


def _port(text: str) -> int:
    value = _integer(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"not a TCP port (0-65535): {value}")
    return value


def _positive_seconds(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise ValueError(f"must be a positive number of seconds, got {value:g}")
    return value


def _non_negative_seconds(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise ValueError(f"must be zero or a positive number of seconds, got {value:g}")
    return value


def _postgres_url(text: str) -> str:
    scheme, sep, _ = text.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        # Never echo the value: it may hold a password.
        raise ValueError("must be a postgresql://user:password@host:port/database URL")
    _check_ports(text)
    return text


def _check_ports(url: str) -> None:
    """Every port of a (multi-host) PostgreSQL URL is 1-65535 (never echoed: a URL
    without `@` would put a password where the port goes)."""
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2].split(",")
    ports = [h.rpartition("]")[2].rpartition(":")[2] if ":" in h else "" for h in hosts]
    ports += [p for k, v in parse_qsl(parts.query) if k == "port" for p in v.split(",")]
    for port in filter(None, ports):
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError("the URL's port is not a TCP port (1-65535)")


def _redis_url(text: str) -> str:
    parts = urlsplit(text)
    # Never echo the value: it may hold a password.
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    if parts.scheme == "unix" and not parts.path:
        raise ValueError("a unix:// URL needs the socket's path (unix:///run/redis.sock)")
    if parts.scheme != "unix":
        if not parts.hostname:
            raise ValueError("the URL names no host (redis://host:6379/0)")
        try:
            port = parts.port
        except ValueError:
            raise ValueError("the URL's port is not a TCP port (1-65535)") from None
        if port is not None and not 1 <= port <= 65535:
            raise ValueError("the URL's port is not a TCP port (1-65535)")
    return text


def _stream_name(text: str) -> str:
    if not 0 < len(text) <= 200 or any(c.isspace() for c in text):
        raise ValueError(f"must be a Redis key of 1 to 200 characters without spaces, got {text!r}")
    return text


def _http_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"must be an http:// or https:// URL, got {text!r}")
    return text


def _identifier(text: str) -> str:
    if not 0 < len(text) <= MAX_ID_LENGTH:
        raise ValueError(f"must be 1 to {MAX_ID_LENGTH} characters long")
    return text


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(","))
    if not all(0 < len(n) <= MAX_ID_LENGTH for n in names):
        raise ValueError(f"must be a comma-separated list of names, got {text!r}")
    return names


def _readable_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"no such file: {text}")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read {text}: {exc.strerror}") from None
    return path


def _file_path(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise ValueError(f"{text} is a directory, not a file")
    return path


def _snapshot_path(text: str) -> Path:
    path = _file_path(text)
    if not path.parent.is_dir():
        raise ValueError(f"no such directory: {path.parent}")
    return path


def _positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError(f"must be a positive duration, got {text!r}")
    return value


def _host(text: str) -> str:
    if not text.strip() or any(c.isspace() for c in text):
        raise ValueError(f"not a host name or address: {text!r}")
    return text


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be true or false, got {text!r}")


_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$")


def _header_name(text: str) -> str:
    if not _HEADER_NAME.match(text):
        raise ValueError(f"not an HTTP header name: {text!r}")
    return text


def _header_names(text: str) -> tuple[str, ...]:
    return tuple(_header_name(name.strip()) for name in text.split(",") if name.strip())


def _claim_name(text: str) -> str:
    if not 0 < len(text) <= 256 or text != text.strip():
        raise ValueError(f"not a claim name: {text!r}")
    return text


def _jwt_algorithms(text: str) -> tuple[str, ...]:
    names = tuple(name.strip().upper() for name in text.split(",") if name.strip())
    unknown = [n for n in names if n not in JWT_ALGORITHMS]
    if unknown or not names:
        raise ValueError(f"must be a comma list of {', '.join(JWT_ALGORITHMS)}, got {text!r}")
    return names


def _leeway(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= MAX_JWT_LEEWAY_SECONDS:
        raise ValueError(f"must be 0 to {MAX_JWT_LEEWAY_SECONDS:g} seconds, got {value:g}")
    return value


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= 1:
        raise ValueError(f"must be a number from 0 to 1, got {value:g}")
    return value


def _share(text: str) -> float:
    value = _number(text)
    if not 0 < value <= 1:
        raise ValueError(f"must be a number above 0 and at most 1, got {value:g}")
    return value


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"must be one of {', '.join(options)}; got {text!r}")
        return text

    return parse


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


# --- the settings ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: the `Settings` field it fills, its variable, parser and flag."""

    field: str
    env: str
    parse: Callable[[str], Any]
    help: str
    flag: str | None = None  # a `pdp serve` flag, when it has one
    metavar: str | None = None


OPTIONS: tuple[Option, ...] = (
    Option("database_url", "PDP_DATABASE_URL", _postgres_url, "PostgreSQL URL"),
    Option(
        "read_database_url", "PDP_READ_DATABASE_URL", _postgres_url,
        "PostgreSQL URL of a hot standby the sync worker reads (default PDP_DATABASE_URL)",
    ),
    Option("data_dir", "PDP_DATA_DIR", Path, "data directory of the embedded PostgreSQL"),
    Option("host", "PDP_HOST", _host, "address to bind", "--host", "ADDRESS"),
    Option("port", "PDP_PORT", _port, "port to bind", "--port", "PORT"),
    Option("backlog", "PDP_BACKLOG", _positive_int, "accept queue length", "--backlog", "N"),
    Option(
        "workers", "PDP_WORKERS", _positive_int,
        "processes answering checks on the one port (SO_REUSEPORT), sharing the snapshot "
        "copy-on-write; one owner process syncs and ships each batch to all",
        "--workers", "N",
    ),
    # --- the HTTP edge (pdp.http_edge) ---
    Option(
        "request_read_timeout_seconds", "PDP_REQUEST_READ_TIMEOUT_SECONDS", _positive_seconds,
        "a request (line, headers, body) not read within this gets 408 and is closed",
        "--request-read-timeout", "SECONDS",
    ),
    Option(
        "keepalive_timeout_seconds", "PDP_KEEPALIVE_TIMEOUT_SECONDS", _positive_seconds,
        "idle keep-alive connections are closed after this", "--keepalive-timeout", "SECONDS",
    ),
    Option(
        "max_connections", "PDP_MAX_CONNECTIONS", _positive_int,
        "open connections at most (default: derived from the file limit)",
        "--max-connections", "N",
    ),
    Option(
        "drain_seconds", "PDP_DRAIN_SECONDS", _non_negative_seconds,
        "on SIGTERM, /readyz answers 503 and requests are served this long before stopping",
        "--drain-seconds", "SECONDS",
    ),
    Option(
        "base_url", "PDP_BASE_URL", _http_url, "base URL advertised in the AuthZEN metadata",
        "--base-url", "URL",
    ),
    Option(
        "default_tenant", "PDP_DEFAULT_TENANT", _identifier,
        "tenant of requests that name none", "--default-tenant", "TENANT",
    ),
    Option(
        "tls_cert_file", "PDP_TLS_CERT_FILE", _readable_file,
        "serve HTTPS with this PEM certificate chain (with PDP_TLS_KEY_FILE)",
        "--tls-cert-file", "PEM",
    ),
    Option(
        "tls_key_file", "PDP_TLS_KEY_FILE", _readable_file, "its PEM private key",
        "--tls-key-file", "PEM",
    ),
    Option(
        "tls_client_ca_file", "PDP_TLS_CLIENT_CA_FILE", _readable_file,
        "require client certificates signed by these PEM CAs (mutual TLS)",
        "--tls-client-ca-file", "PEM",
    ),
    Option(
        "api_keys_file", "PDP_API_KEYS_FILE", _file_path,
        "require an API key from this file on the check API (see pdp api-key create)",
        "--api-keys-file", "FILE",
    ),
    Option(
        "subject_types", "PDP_SUBJECT_TYPES", _names,
        "subject types that name pdp users (others are denied)", "--subject-types", "T1,T2",
    ),
    Option(
        "max_body_bytes", "PDP_MAX_BODY_BYTES", _positive_int, "larger request bodies get 413",
        "--max-body-bytes", "BYTES",
    ),
    Option(
        "max_batch", "PDP_MAX_BATCH", _positive_int, "larger batches get 400",
        "--max-batch", "N",
    ),
    Option(
        "max_staleness_seconds", "PDP_MAX_STALENESS_SECONDS", _positive_seconds,
        "data not proven current for longer is stale", "--max-staleness", "SECONDS",
    ),
    Option(
        "stale_mode", "PDP_STALE_MODE", _choice("deny", "serve"),
        "when stale: deny (reason 'stale') or keep answering", "--stale-mode", "deny|serve",
    ),
    Option(
        "consistency_wait_ms", "PDP_CONSISTENCY_WAIT_MS", _non_negative_int,
        "how long X-PDP-Min-Revision waits before asking PostgreSQL",
        "--consistency-wait-ms", "MS",
    ),
    Option(
        "search_concurrency", "PDP_SEARCH_CONCURRENCY", _positive_int,
        "subject searches computing at once (the others wait; checks never do)",
    ),
    Option(
        "search_share", "PDP_SEARCH_SHARE", _share,
        "the share of the event loop subject searches may take together (0 < x <= 1)",
    ),
    Option(
        "poll_interval_seconds", "PDP_POLL_INTERVAL_SECONDS", _positive_seconds,
        "catch-up safety net when no notification arrives", "--poll-interval", "SECONDS",
    ),
    Option(
        "heartbeat_seconds", "PDP_HEARTBEAT_SECONDS", _positive_seconds,
        "listener liveness probe period", "--heartbeat", "SECONDS",
    ),
    Option(
        "verify_interval_seconds", "PDP_VERIFY_INTERVAL_SECONDS", _positive_seconds,
        "consistency verifier period", "--verify-interval", "SECONDS",
    ),
    Option(
        "snapshot_file", "PDP_SNAPSHOT_FILE", _snapshot_path,
        "keep the replica in this local file: a restart loads it, then catches up",
        "--snapshot-file", "FILE",
    ),
    Option(
        "snapshot_file_interval_seconds", "PDP_SNAPSHOT_FILE_INTERVAL", _positive_duration,
        "how often the snapshot file is rewritten (and once at a clean shutdown)",
    ),
    Option(
        "snapshot_file_max_age_seconds", "PDP_SNAPSHOT_FILE_MAX_AGE", _positive_duration,
        "an older snapshot file is not used at start (a normal load instead)",
    ),
    Option(
        "load_processes", "PDP_LOAD_PROCESSES", _positive_int,
        "processes a full load from PostgreSQL of 200,000 user rows or more is split "
        "over (default: the CPUs available, at most 4; 1: one process)",
    ),
    Option(
        "cache_mode", "PDP_CACHE_MODE", _choice("full", "on_demand"),
        "full: every row in memory; on_demand: users' rows loaded on first use (huge tenants)",
    ),
    Option(
        "cache_users", "PDP_CACHE_USERS", _positive_int,
        "on_demand: users kept loaded at most (least recently used evicted)",
    ),
    Option(
        "cache_ttl_seconds", "PDP_CACHE_TTL_SECONDS", _positive_duration,
        "on_demand: a loaded user is dropped this long after its load",
    ),
    # --- the relay (pdp relay) and sidecars that follow it ---
    Option(
        "sync_source", "PDP_SYNC_SOURCE", _choice("postgres", "redis"),
        "where the sidecar's replica comes from: PostgreSQL directly, or the relay's stream",
        "--sync-source", "postgres|redis",
    ),
    Option("redis_url", "PDP_REDIS_URL", _redis_url, "Redis URL of the relay's stream"),
    Option("redis_stream", "PDP_REDIS_STREAM", _stream_name, "the relay's stream key"),
    Option(
        "relay_stream_maxlen", "PDP_RELAY_STREAM_MAXLEN", _positive_int,
        "entries the relay keeps in the stream (XADD MAXLEN ~)",
    ),
    Option(
        "relay_snapshot_interval_seconds", "PDP_RELAY_SNAPSHOT_INTERVAL_SECONDS",
        _positive_seconds, "how often the relay rewrites the snapshot it stores in Redis",
    ),
    Option("relay_port", "PDP_RELAY_PORT", _port, "port of the relay's /metrics and /healthz"),
    Option(
        "change_retention_seconds", "PDP_CHANGE_RETENTION", parse_duration,
        "change-log retention of pdp prune",
    ),
    Option(
        "audit_retention_seconds", "PDP_AUDIT_RETENTION", parse_duration,
        "how long pdp prune keeps audit rows (the archive)",
    ),
    Option(
        "pseudonym_key_file", "PDP_PSEUDONYM_KEY_FILE", _readable_file,
        "secret key of pdp erase-subject's pseudonyms (HMAC-SHA256)",
    ),
    # --- decision logs (pdp.decision_log) ---
    Option(
        "decision_log", "PDP_DECISION_LOG", _choice("off", "stdout", "postgres"),
        "where decisions are logged: off, stdout (JSON lines) or postgres (pdp.decision_log)",
    ),
    Option(
        "decision_log_sample", "PDP_DECISION_LOG_SAMPLE", _fraction,
        "share of decisions logged, 0 to 1 (denies: see PDP_DECISION_LOG_DENIES)",
    ),
    Option(
        "decision_log_denies", "PDP_DECISION_LOG_DENIES", _choice("always", "sampled"),
        "denies logged always, or sampled like allows",
    ),
    Option(
        "decision_log_queue_size", "PDP_DECISION_LOG_QUEUE_SIZE", _positive_int,
        "entries waiting to be written at most (more are dropped and counted)",
    ),
    Option(
        "decision_log_batch_size", "PDP_DECISION_LOG_BATCH_SIZE", _positive_int,
        "entries written per COPY or per write at most",
    ),
    Option(
        "decision_log_retention_seconds", "PDP_DECISION_LOG_RETENTION", parse_duration,
        "daily partitions of pdp.decision_log older than this are dropped",
    ),
    # --- forward-auth for API gateways (pdp.web.forward_auth) ---
    Option(
        "routes_path", "PDP_ROUTES", _readable_file, "route table (YAML) of /forward-auth",
        "--routes", "FILE",
    ),
    Option(
        "forward_auth_mode", "PDP_FORWARD_AUTH_MODE", _choice("nginx", "traefik", "envoy"),
        "which gateway calls /forward-auth (where the original method and URI are read)",
        "--forward-auth-mode", "nginx|traefik|envoy",
    ),
    Option(
        "subject_header", "PDP_FORWARD_AUTH_SUBJECT_HEADER", _header_name,
        "trusted header naming the subject (when no JWT is configured)",
    ),
    Option(
        "tenant_header", "PDP_FORWARD_AUTH_TENANT_HEADER", _header_name,
        "header naming the tenant (else the JWT's tenant claim, else the default tenant)",
    ),
    Option(
        "send_subject", "PDP_FORWARD_AUTH_SEND_SUBJECT", _boolean,
        "answer an allow with X-PDP-Subject for the upstream",
    ),
    Option(
        "condition_headers", "PDP_FORWARD_AUTH_HEADERS", _header_names,
        "request headers conditions may read (comma list)",
    ),
    Option("jwt_jwks_url", "PDP_JWT_JWKS_URL", _http_url, "JWKS URL of the bearer-JWT keys"),
    Option(
        "jwt_jwks_file", "PDP_JWT_JWKS_FILE", _readable_file, "JWKS file of the bearer-JWT keys"
    ),
    Option(
        "jwt_jwks_ttl_seconds", "PDP_JWT_JWKS_TTL_SECONDS", _positive_seconds,
        "how long fetched keys are used before they are fetched again",
    ),
    Option(
        "jwt_jwks_timeout_seconds", "PDP_JWT_JWKS_TIMEOUT_SECONDS", _positive_seconds,
        "bound of one JWKS fetch",
    ),
    Option("jwt_issuer", "PDP_JWT_ISSUER", _claim_name, "required iss claim"),
    Option("jwt_audience", "PDP_JWT_AUDIENCE", _claim_name, "required aud claim"),
    Option(
        "jwt_algorithms", "PDP_JWT_ALGORITHMS", _jwt_algorithms,
        "accepted JWT algorithms (comma list)",
    ),
    Option(
        "jwt_leeway_seconds", "PDP_JWT_LEEWAY_SECONDS", _leeway,
        "clock skew allowed on exp/nbf/iat",
    ),
    Option("jwt_subject_claim", "PDP_JWT_SUBJECT_CLAIM", _claim_name, "claim naming the subject"),
    Option("jwt_tenant_claim", "PDP_JWT_TENANT_CLAIM", _claim_name, "claim naming the tenant"),
    Option(
        "log_level", "PDP_LOG_LEVEL", _choice("DEBUG", "INFO", "WARNING", "ERROR"),
        "log level",
    ),
    Option("log_format", "PDP_LOG_FORMAT", _choice("text", "json"), "text or json lines"),
    Option("admin_host", "PDP_ADMIN_HOST", _host, "address the admin API binds"),
    Option("admin_port", "PDP_ADMIN_PORT", _port, "port of the admin API"),
    Option(
        "admin_database_url", "PDP_ADMIN_DATABASE_URL", _postgres_url,
        "PostgreSQL URL of the admin API (a pdp_admin member; default PDP_DATABASE_URL)",
    ),
)  # fmt: skip

SERVE_FLAGS: tuple[Option, ...] = tuple(o for o in OPTIONS if o.flag is not None)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything configurable. The README's configuration table documents each field."""

    database_url: str | None = field(default=None, repr=False)
    read_database_url: str | None = field(default=None, repr=False)
    data_dir: Path = Path(".pdp-data")
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    backlog: int = 1024
    workers: int = 1
    request_read_timeout_seconds: float = 5.0
    keepalive_timeout_seconds: float = 75.0
    max_connections: int | None = None  # None: derived from RLIMIT_NOFILE at start
    drain_seconds: float = 5.0
    base_url: str | None = None
    default_tenant: str | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    api_keys_file: Path | None = None
    subject_types: tuple[str, ...] = ("user", "identity")
    max_body_bytes: int = 1024 * 1024
    max_batch: int = 1000
    max_staleness_seconds: float = 5.0
    stale_mode: str = "deny"
    consistency_wait_ms: int = 200
    search_concurrency: int = 1
    search_share: float = 0.1
    poll_interval_seconds: float = 1.0
    heartbeat_seconds: float = 5.0
    verify_interval_seconds: float = 60.0
    snapshot_file: Path | None = None
    snapshot_file_interval_seconds: float = 300.0
    snapshot_file_max_age_seconds: float = 86400.0
    load_processes: int | None = None  # None: default_load_processes() at start
    cache_mode: str = "full"
    cache_users: int = 100_000
    cache_ttl_seconds: float = 600.0
    sync_source: str = "postgres"
    redis_url: str | None = field(default=None, repr=False)
    redis_stream: str = "pdp:changes"
    relay_stream_maxlen: int = 100_000
    relay_snapshot_interval_seconds: float = 60.0
    relay_port: int = DEFAULT_RELAY_PORT
    change_retention_seconds: float = 7 * 86400.0
    audit_retention_seconds: float = 400 * 86400.0
    pseudonym_key_file: Path | None = None
    decision_log: str = "off"
    decision_log_sample: float = 1.0
    decision_log_denies: str = "always"
    decision_log_queue_size: int = 10_000
    decision_log_batch_size: int = 1000
    decision_log_retention_seconds: float = 30 * 86400.0
    routes_path: Path | None = None
    forward_auth_mode: str = "nginx"
    subject_header: str = "X-User-Id"
    tenant_header: str | None = None
    send_subject: bool = True
    condition_headers: tuple[str, ...] = ()
    jwt_jwks_url: str | None = None
    jwt_jwks_file: Path | None = None
    jwt_jwks_ttl_seconds: float = 300.0
    jwt_jwks_timeout_seconds: float = 2.0
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_algorithms: tuple[str, ...] = JWT_ALGORITHMS
    jwt_leeway_seconds: float = 30.0
    jwt_subject_claim: str = "sub"
    jwt_tenant_claim: str | None = None
    log_level: str = "INFO"
    log_format: str = "text"
    admin_host: str = "127.0.0.1"
    admin_port: int = DEFAULT_ADMIN_PORT
    admin_database_url: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(
        cls, env: Mapping[str, str], flags: Mapping[str, str | None] | None = None
    ) -> Settings:
        """Settings from `env`, then `flags` ({field: raw text}, None = not given) on top.

        Raises ConfigError naming the variable or the flag of the first invalid value.
        """
        values: dict[str, Any] = {"data_dir": default_data_dir(env)}
        for option in OPTIONS:
            flag = (flags or {}).get(option.field)
            if flag is not None:  # the flag wins; its variable is not even read
                values[option.field] = _parse(option, flag, option.flag or option.env)
            elif raw := env.get(option.env):
                values[option.field] = _parse(option, raw, option.env)
        return cls(**values)

    @property
    def jwt_enabled(self) -> bool:
        """Forward-auth takes the subject from a bearer JWT (else from `subject_header`)."""
        return self.jwt_jwks_url is not None or self.jwt_jwks_file is not None

    def __post_init__(self) -> None:
        """Settings that only make sense together (ConfigError names both)."""
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("PDP_TLS_CERT_FILE and PDP_TLS_KEY_FILE must be set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ConfigError("PDP_TLS_CLIENT_CA_FILE needs PDP_TLS_CERT_FILE and PDP_TLS_KEY_FILE")
        if self.jwt_jwks_url is not None and self.jwt_jwks_file is not None:
            raise ConfigError("PDP_JWT_JWKS_URL and PDP_JWT_JWKS_FILE: set one, not both")
        if self.sync_source == "redis" and self.redis_url is None:
            raise ConfigError("PDP_SYNC_SOURCE=redis needs PDP_REDIS_URL (the relay's Redis)")
        if self.snapshot_file is not None and self.sync_source != "postgres":
            raise ConfigError(
                "PDP_SNAPSHOT_FILE works with PDP_SYNC_SOURCE=postgres only (not yet with "
                "the relay's stream)"
            )
        if self.read_database_url is not None and self.sync_source != "postgres":
            raise ConfigError(
                "PDP_READ_DATABASE_URL works with PDP_SYNC_SOURCE=postgres only (not yet with "
                "the relay's stream)"
            )
        if self.cache_mode == "on_demand" and (
            self.sync_source != "postgres" or self.snapshot_file is not None
        ):
            raise ConfigError(
                "PDP_CACHE_MODE=on_demand works with PDP_SYNC_SOURCE=postgres and without "
                "PDP_SNAPSHOT_FILE only (not yet with the relay's stream or a snapshot file)"
            )
        if self.workers > 1 and (self.cache_mode != "full" or self.sync_source != "postgres"):
            raise ConfigError(
                "PDP_WORKERS above 1 works with PDP_CACHE_MODE=full and "
                "PDP_SYNC_SOURCE=postgres only (each on-demand cache or stream follower "
                "would be its own: run one process per core instead)"
            )
        if self.decision_log_retention_seconds < 86400.0:
            raise ConfigError(
                "PDP_DECISION_LOG_RETENTION: must be at least 1d (partitions are days)"
            )

    @property
    def tls(self) -> bool:
        """Whether the check API serves HTTPS."""
        return self.tls_cert_file is not None

    @property
    def public_base_url(self) -> str:
        """The base URL the discovery document advertises."""
        if self.base_url:
            return self.base_url
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def replace(self, **changes: Any) -> Settings:
        """A copy with `changes` applied (None values are ignored: not given)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def _parse(option: Option, raw: str, source: str) -> Any:
    try:
        return option.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def from_environment(flags: Mapping[str, str | None] | None = None) -> Settings:
    """Settings from this process's environment (and `flags`); for entry points only."""
    return Settings.from_env(os.environ, flags)
