"""The `pdp` command: help everywhere, one clear line and a non-zero exit for user mistakes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pdp.cli import build_parser


def _pdp(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    return subprocess.run(
        [sys.executable, "-m", "pdp", *args], env={**clean, **env}, capture_output=True,
        text=True, timeout=60, check=False,
    )


def _commands() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sorted(sub.choices)  # type: ignore[arg-type]


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
    missing = db_url.rsplit("/", 1)[0] + "/pdp_no_such_database"
    result = _pdp("migrate", PDP_DATABASE_URL=missing)
    assert result.returncode == 1
    assert 'database "pdp_no_such_database" does not exist' in _one_error_line(result)


def test_migrate_sql_needs_no_server() -> None:
    result = _pdp("migrate", "--sql", PDP_DATABASE_URL="postgresql://postgres@127.0.0.1:1/pdp")
    assert result.returncode == 0
    assert "CREATE FUNCTION pdp.check" in result.stdout


def test_migrate_logs_the_url_without_password(db_url: str) -> None:
    result = _pdp("migrate", PDP_DATABASE_URL=db_url.replace("postgres@", "postgres:pw@", 1))
    assert result.returncode == 0, result.stderr
    assert "using PostgreSQL at" in result.stderr
    assert ":pw@" not in result.stderr
