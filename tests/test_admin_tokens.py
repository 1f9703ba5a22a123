"""Admin tokens: the format, constant-time verification, and `pdp admin token` against PostgreSQL."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from pdp.admin import token_store, tokens
from pdp.admin.tokens import Principal, StoredToken

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
TOKEN_LINE = re.compile(r"^pdpa_[0-9a-f]{12}_[A-Za-z0-9_-]{43}$")


def _pdp(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
    return subprocess.run(
        [sys.executable, "-m", "pdp", *args], env={**clean, "PDP_DATABASE_URL": url},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def _stored(secret: str, **changes: object) -> StoredToken:
    fields: dict[str, object] = {
        "name": "ops", "secret_sha256": tokens.digest(secret), "scopes": ("read",),
        "tenant_id": "acme", "expires_at": None, "revoked_at": None,
    }  # fmt: skip
    fields.update(changes)
    return StoredToken(**fields)  # type: ignore[arg-type]


def test_a_new_token_splits_back_into_its_id_and_secret() -> None:
    made = tokens.new_token()
    assert TOKEN_LINE.match(made.text)
    parts = tokens.split(made.text)
    assert parts is not None
    token_id, secret = parts
    assert token_id == made.id
    assert made.secret_sha256 == hashlib.sha256(secret.encode()).digest()
    assert tokens.new_token().text != made.text


@pytest.mark.parametrize(
    "text",
    ["", "pdpa_", "pdpa_0123456789ab", "pdpa_0123456789ab_short", "Bearer pdpa_x", "pdpk_0123456789ab_" + "a" * 43,
     "pdpa_0123456789AB_" + "a" * 43, "pdpa_0123456789ab_" + "a" * 44],
)  # fmt: skip
def test_malformed_tokens_have_nothing_to_look_up(text: str) -> None:
    assert tokens.split(text) is None


def test_verify() -> None:
    secret = "s" * 43
    principal = tokens.verify(_stored(secret), secret, NOW)
    assert principal == Principal("ops", frozenset({"read"}), "acme")
    assert tokens.verify(_stored(secret), "t" * 43, NOW) == "unknown_token"
    assert tokens.verify(None, secret, NOW) == "unknown_token"
    assert tokens.verify(_stored(secret, revoked_at=NOW), secret, NOW) == "revoked"
    assert tokens.verify(_stored(secret, expires_at=NOW), secret, NOW) == "expired"
    later = _stored(secret, expires_at=NOW + timedelta(seconds=1))
    assert isinstance(tokens.verify(later, secret, NOW), Principal)


def test_scopes_imply_the_lesser_ones() -> None:
    admin = Principal("a", frozenset({"admin"}), None)
    reader = Principal("r", frozenset({"read"}), None)
    assert [admin.may(s) for s in tokens.SCOPES] == [True, True, True]
    assert [reader.may(s) for s in tokens.SCOPES] == [True, False, False]
    assert Principal("w", frozenset({"write"}), None).may("read")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", timedelta(days=30)),
        ("12h", timedelta(hours=12)),
        ("90m", timedelta(minutes=90)),
        ("3600s", timedelta(hours=1)),
    ],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert tokens.parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "0d", "30", "d", "-1d", "1.5h", "30 days", "1w"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        tokens.parse_duration(text)


def test_scopes_parse() -> None:
    assert tokens.parse_scopes("read, write,read") == ("read", "write")
    with pytest.raises(ValueError, match="unknown scope 'delete'"):
        tokens.parse_scopes("read,delete")
    with pytest.raises(ValueError, match="at least one scope"):
        tokens.parse_scopes(" , ")


async def _tenant(pg: asyncpg.Connection, tenant: str = "acme") -> None:
    await pg.execute("INSERT INTO pdp.tenants (id) VALUES ($1)", tenant)


async def test_create_prints_the_token_once_and_stores_only_its_digest(
    db_url: str, pg: asyncpg.Connection
) -> None:
    await _tenant(pg)
    result = _pdp(
        db_url,
        "admin",
        "token",
        "create",
        "--name",
        "ci",
        "--scopes",
        "read,write",
        "--tenant",
        "acme",
        "--expires",
        "30d",
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout.strip()
    assert TOKEN_LINE.match(text)
    assert result.stdout.count("\n") == 1
    token_id, secret = tokens.split(text) or ("", "")
    assert secret not in result.stderr  # never in a log line
    row = await pg.fetchrow("SELECT * FROM pdp.admin_tokens WHERE name = 'ci'")
    assert row["id"] == token_id
    assert bytes(row["secret_sha256"]) == hashlib.sha256(secret.encode()).digest()
    assert (row["scopes"], row["tenant_id"]) == (["read", "write"], "acme")
    assert (
        timedelta(days=29, hours=23) < row["expires_at"] - row["created_at"] <= timedelta(days=30)
    )
    dumped = await pg.fetchval("SELECT string_agg(t::text, '') FROM pdp.admin_tokens t")
    assert secret not in dumped  # the secret itself is nowhere in the table


async def test_list_shows_no_secret_and_revoke_takes_effect(
    db_url: str, pg: asyncpg.Connection
) -> None:
    made = _pdp(db_url, "admin", "token", "create", "--name", "platform", "--scopes", "admin")
    assert made.returncode == 0, made.stderr
    token_id, secret = tokens.split(made.stdout.strip()) or ("", "")
    listed = _pdp(db_url, "admin", "token", "list")
    assert listed.returncode == 0, listed.stderr
    assert re.search(
        rf"^platform\tid={token_id}\tscopes=admin\ttenant=\*\t.*\tactive$", listed.stdout, re.M
    )
    assert secret not in listed.stdout

    stored = await token_store.lookup(pg, token_id)
    assert isinstance(tokens.verify(stored, secret, datetime.now(UTC)), Principal)
    revoked = _pdp(db_url, "admin", "token", "revoke", "--name", "platform")
    assert revoked.returncode == 0, revoked.stderr
    assert (
        tokens.verify(await token_store.lookup(pg, token_id), secret, datetime.now(UTC))
        == "revoked"
    )
    assert _pdp(db_url, "admin", "token", "list").stdout.rstrip().endswith("revoked")
    again = _pdp(db_url, "admin", "token", "revoke", "--name", "platform")
    assert again.returncode == 2
    assert "no active admin token named 'platform'" in again.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scopes", "read,delete"], "--scopes: unknown scope 'delete'"),
        (["--scopes", "read", "--expires", "forever"], "--expires: 'forever' is not a duration"),
        (["--scopes", "read", "--tenant", "nowhere"], "unknown tenant 'nowhere'"),
    ],
)
def test_create_refuses_bad_input_in_one_line(db_url: str, args: list[str], message: str) -> None:
    result = _pdp(db_url, "admin", "token", "create", "--name", "x", *args)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"pdp: error: {message}")
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


async def test_a_name_is_taken_once(db_url: str) -> None:
    assert (
        _pdp(db_url, "admin", "token", "create", "--name", "dup", "--scopes", "read").returncode
        == 0
    )
    again = _pdp(db_url, "admin", "token", "create", "--name", "dup", "--scopes", "read")
    assert again.returncode == 2
    assert "an admin token named 'dup' exists" in again.stderr


async def test_the_admin_role_looks_up_through_the_function_only(
    db_url: str, pg: asyncpg.Connection
) -> None:
    made = await token_store.create(pg, "looked-up", ("read",))
    async with pg.transaction():
        await pg.execute("SET LOCAL ROLE pdp_admin")
        stored = await token_store.lookup(pg, made.id)
        assert stored is not None
        assert stored.name == "looked-up"
        assert await token_store.lookup(pg, "000000000000") is None
    # The lookup recorded the use (at most once a minute).
    assert await pg.fetchval(
        "SELECT last_used_at IS NOT NULL FROM pdp.admin_tokens WHERE id = $1", made.id
    )
    assert await token_store.any_active(pg)
    await token_store.revoke(pg, "looked-up")
    assert not await token_store.any_active(pg)
