"""The `pdp` command: help everywhere, one clear line and a non-zero exit for user mistakes."""

from __future__ import annotations

import argparse
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pdp.cli import build_parser, configure_logging
from pdp.config import Settings
from pdp.errors import ConfigError
from tests.pg_url import with_database, with_password


def _pdp(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    return subprocess.run(
        [sys.executable, "-m", "pdp", *args], env={**clean, **env}, capture_output=True,
        text=True, timeout=60, check=False,
    )


def _commands() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert isinstance(sub, argparse._SubParsersAction)
    return sorted(sub.choices)


@pytest.mark.parametrize("args", [["--help"], *[[c, "--help"] for c in _commands()]])
def test_help(args: list[str]) -> None:
    result = _pdp(*args)
    assert result.returncode == 0
    assert "usage: pdp" in result.stdout


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_unknown_option() -> None:
    result = _pdp("migrate", "--frobnicate")
    assert result.returncode == 2
    assert "unrecognized arguments: --frobnicate" in _one_error_line(result)


def test_unknown_command() -> None:
    result = _pdp("frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in _one_error_line(result)


def test_bad_database_url_is_named_and_not_echoed() -> None:
    result = _pdp("migrate", PDP_DATABASE_URL="mysql://root:hunter2@db/x")
    assert result.returncode == 2
    line = _one_error_line(result)
    assert "PDP_DATABASE_URL" in line
    assert "hunter2" not in result.stderr


def test_bad_setting_is_named() -> None:
    result = _pdp("migrate", PDP_PORT="eighty")
    assert result.returncode == 2
    assert "PDP_PORT" in _one_error_line(result)


def test_database_down() -> None:
    # Port 1 on loopback: nothing listens there, the connection is refused at once.
    result = _pdp("migrate", PDP_DATABASE_URL="postgresql://postgres:s3cret@127.0.0.1:1/pdp")
    assert result.returncode == 1
    assert "cannot connect to PostgreSQL" in _one_error_line(result)
    assert "s3cret" not in result.stderr


def test_missing_database(db_url: str) -> None:
    missing = with_database(db_url, "pdp_no_such_database")
    result = _pdp("migrate", PDP_DATABASE_URL=missing)
    assert result.returncode == 1
    assert 'database "pdp_no_such_database" does not exist' in _one_error_line(result)


def test_migrate_sql_needs_no_server() -> None:
    result = _pdp("migrate", "--sql", PDP_DATABASE_URL="postgresql://postgres@127.0.0.1:1/pdp")
    assert result.returncode == 0
    assert "CREATE FUNCTION pdp.check" in result.stdout


def test_migrate_logs_the_url_without_password(db_url: str) -> None:
    url = with_password(db_url, "pw")
    assert ":pw@" in url
    result = _pdp("migrate", PDP_DATABASE_URL=url)
    assert result.returncode == 0, result.stderr
    # The URL is logged, only its password masked.
    assert f"using PostgreSQL at {url.replace(':pw@', ':***@')}" in result.stderr
    assert ":pw@" not in result.stderr


# Every flag of `pdp serve`: a bad value is one `pdp: error:` line naming the flag (the
# same validator as its PDP_* variable), a good one arrives parsed in the settings.
A_FILE = str(Path(__file__).resolve())
SERVE_FLAG_CASES = [
    ("--host", "bad host", "not a host name", "::1", "::1"),
    ("--port", "70000", "not a TCP port", "9000", 9000),
    ("--backlog", "0", "must be a positive integer", "64", 64),
    ("--workers", "0", "must be a positive integer", "2", 2),
    ("--request-read-timeout", "0", "must be a positive number of seconds", "2.5", 2.5),
    ("--keepalive-timeout", "-3", "must be a positive number of seconds", "30", 30.0),
    ("--max-connections", "0", "must be a positive integer", "500", 500),
    ("--drain-seconds", "-1", "must be zero or a positive number of seconds", "0", 0.0),
    ("--base-url", "ftp://x", "must be an http:// or https:// URL", "https://pdp.example", "https://pdp.example"),
    ("--default-tenant", "x" * 257, "1 to 256 characters", "acme", "acme"),
    ("--subject-types", "user,,identity", "comma-separated list of names", "user, principal", ("user", "principal")),
    ("--max-body-bytes", "-5", "must be a positive integer", "2048", 2048),
    ("--max-batch", "many", "not an integer", "10", 10),
    ("--max-staleness", "-1", "must be a positive number of seconds", "2.5", 2.5),
    ("--stale-mode", "maybe", "must be one of deny, serve", "serve", "serve"),
    ("--consistency-wait-ms", "-1", "must be zero or a positive integer", "0", 0),
    ("--poll-interval", "nan", "not a finite number", "0.5", 0.5),
    ("--heartbeat", "0", "must be a positive number of seconds", "3", 3.0),
    ("--verify-interval", "soon", "not a number", "30", 30.0),
    ("--tls-cert-file", "/no/such.pem", "no such file", A_FILE, Path(A_FILE)),
    ("--tls-key-file", "/", "no such file", A_FILE, Path(A_FILE)),
    ("--tls-client-ca-file", "/no/ca.pem", "no such file", A_FILE, Path(A_FILE)),
    ("--api-keys-file", "/", "is a directory", "/etc/pdp/keys", Path("/etc/pdp/keys")),
    ("--routes", "/no/routes.yaml", "no such file", A_FILE, Path(A_FILE)),
    ("--forward-auth-mode", "haproxy", "must be one of nginx, traefik, envoy", "envoy", "envoy"),
    ("--sync-source", "kafka", "must be one of postgres, redis", "redis", "redis"),
    ("--snapshot-file", "/no/such/dir/replica.pdpsnap", "no such directory", A_FILE + ".snap", Path(A_FILE + ".snap")),
]
# Settings that only make sense together: a good value is given with its companions.
COMPANIONS = {
    "tls_cert_file": {"tls_key_file": A_FILE},
    "tls_key_file": {"tls_cert_file": A_FILE},
    "tls_client_ca_file": {"tls_cert_file": A_FILE, "tls_key_file": A_FILE},
    "sync_source": {"redis_url": "redis://127.0.0.1:6379/0"},
}


def test_every_serve_flag_has_a_case() -> None:
    from pdp.config import SERVE_FLAGS

    assert {case[0] for case in SERVE_FLAG_CASES} == {o.flag for o in SERVE_FLAGS}


@pytest.mark.parametrize(("flag", "bad", "message", "good", "parsed"), SERVE_FLAG_CASES)
def test_serve_flag_is_validated_like_its_variable(
    flag: str, bad: str, message: str, good: str, parsed: object, capsys: pytest.CaptureFixture[str]
) -> None:
    from pdp.cli import main
    from pdp.config import SERVE_FLAGS, Settings

    option = next(o for o in SERVE_FLAGS if o.flag == flag)
    assert main(["serve", flag, bad]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"pdp: error: {flag}: ")
    assert message in err[0]
    # The variable is refused by the same check, naming the variable.
    with pytest.raises(ConfigError, match=f"^{option.env}: .*{message}"):
        Settings.from_env({option.env: bad})
    flags: dict[str, str | None] = {option.field: good, **COMPANIONS.get(option.field, {})}
    assert getattr(Settings.from_env({}, flags), option.field) == parsed
    # A flag wins over its variable.
    assert getattr(Settings.from_env({option.env: bad}, flags), option.field) == parsed


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://:hunter2@127.0.0.1/0", "must be a redis://, rediss:// or unix:// URL"),
        ("redis://:hunter2@127.0.0.1:99999/0", "not a TCP port"),
        ("redis://:hunter2@/0", "names no host"),
        ("unix://", "needs the socket's path"),
    ],
)
def test_redis_url_is_checked_and_not_echoed(url: str, message: str) -> None:
    result = _pdp("relay", PDP_REDIS_URL=url)
    assert result.returncode == 2
    line = _one_error_line(result)
    assert "PDP_REDIS_URL" in line
    assert message in line
    assert "hunter2" not in result.stderr


def test_relay_mode_and_the_relay_need_a_redis_url() -> None:
    result = _pdp("serve", PDP_SYNC_SOURCE="redis")
    assert result.returncode == 2
    assert "PDP_SYNC_SOURCE=redis needs PDP_REDIS_URL" in _one_error_line(result)
    result = _pdp("relay")
    assert result.returncode == 2
    assert "pdp relay needs PDP_REDIS_URL" in _one_error_line(result)


def test_the_relay_does_not_read_a_standby() -> None:
    standby = "postgresql://reader:hunter2@127.0.0.1:1/pdp"
    result = _pdp("relay", PDP_REDIS_URL="redis://127.0.0.1:1/0", PDP_READ_DATABASE_URL=standby)
    assert result.returncode == 2
    assert "unset PDP_READ_DATABASE_URL" in _one_error_line(result)
    assert "hunter2" not in result.stderr


def test_the_snapshot_file_is_for_direct_mode_only(tmp_path: Path) -> None:
    result = _pdp(
        "serve", PDP_SYNC_SOURCE="redis", PDP_REDIS_URL="redis://127.0.0.1:1/0",
        PDP_SNAPSHOT_FILE=str(tmp_path / "replica.pdpsnap"),
    )  # fmt: skip
    assert result.returncode == 2
    assert "PDP_SNAPSHOT_FILE works with PDP_SYNC_SOURCE=postgres only" in _one_error_line(result)


def test_relay_with_redis_down_is_one_line(db_url: str) -> None:
    # Port 1 on loopback: nothing listens there, the connection is refused at once.
    result = _pdp(
        "relay", PDP_DATABASE_URL=db_url, PDP_REDIS_URL="redis://:s3cret@127.0.0.1:1/0",
        PDP_RELAY_PORT="0",
    )  # fmt: skip
    assert result.returncode == 1
    assert "cannot reach Redis (PDP_REDIS_URL)" in _one_error_line(result)
    assert "s3cret" not in result.stderr


def test_relay_mode_sidecar_with_redis_down_is_one_line(db_url: str) -> None:
    result = _pdp(
        "serve", PDP_DATABASE_URL=db_url, PDP_SYNC_SOURCE="redis", PDP_PORT="0",
        PDP_REDIS_URL="redis://:s3cret@127.0.0.1:1/0",
    )  # fmt: skip
    assert result.returncode == 1
    assert "cannot reach Redis (PDP_REDIS_URL)" in _one_error_line(result)
    assert "s3cret" not in result.stderr


def test_logging_follows_stderr_after_a_captured_stream_closed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    captured = io.StringIO()
    monkeypatch.setattr(sys, "stderr", captured)
    configure_logging(Settings())
    logging.getLogger("pdp.test").warning("first")
    monkeypatch.undo()  # the stream the handler started with goes away, as after a test
    captured.close()
    logging.getLogger("pdp.test").warning("second")
    err = capsys.readouterr().err
    assert "second" in err
    assert "Logging error" not in err
