"""Admin tokens: their format, their hashing and what a presented token is allowed.

A token is `pdpa_<id>_<secret>`: `id` (12 hex digits) is public and finds the stored
row; `secret` (32 random bytes, URL-safe base64) is known only to its holder. The
database keeps the SHA-256 of the secret, never the secret: a high-entropy random
secret needs no slow KDF, since no dictionary can guess it. A presented secret is
compared in constant time. Pure: no I/O (token_store.py reads and writes the rows).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

PREFIX = "pdpa_"
SCOPES = ("read", "write", "admin")
_TOKEN = re.compile(r"^pdpa_(?P<id>[0-9a-f]{12})_(?P<secret>[A-Za-z0-9_-]{43})$")
_DURATION = re.compile(r"^(?P<n>[1-9][0-9]{0,5})(?P<unit>[smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


@dataclass(frozen=True, slots=True)
class NewToken:
    """A token as made: the text to hand out once, and what the database keeps."""

    id: str
    text: str
    secret_sha256: bytes


def new_token() -> NewToken:
    token_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return NewToken(token_id, f"{PREFIX}{token_id}_{secret}", digest(secret))


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def split(text: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed token, else None (nothing to look up)."""
    match = _TOKEN.match(text)
    return None if match is None else (match["id"], match["secret"])


def parse_scopes(text: str) -> tuple[str, ...]:
    """`read,write` -> ('read', 'write'); ValueError naming an unknown or missing scope."""
    scopes = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    if not scopes:
        raise ValueError("at least one scope: " + ", ".join(SCOPES))
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise ValueError(f"unknown scope {unknown[0]!r} (scopes: {', '.join(SCOPES)})")
    return scopes


def parse_duration(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `3600s` -> timedelta; ValueError otherwise."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 30d, 12h, 90m or 3600s")
    return timedelta(**{_UNITS[match["unit"]]: int(match["n"])})


@dataclass(frozen=True, slots=True)
class StoredToken:
    """A token's row as the lookup returns it."""

    name: str
    secret_sha256: bytes
    scopes: tuple[str, ...]
    tenant_id: str | None
    expires_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified token speaks for: its name (the actor), scopes and tenant bound."""

    name: str
    scopes: frozenset[str]
    tenant_id: str | None  # None: a platform token (may manage tenants)

    def may(self, scope: str) -> bool:
        # admin implies write implies read.
        order = SCOPES.index(scope)
        return any(SCOPES.index(s) >= order for s in self.scopes)


def verify(stored: StoredToken | None, secret: str, now: datetime) -> Principal | str:
    """The principal, or why not (`unknown_token`, `revoked`, `expired`).

    The digest is compared even when no row was found (against a dummy), so the
    answer takes the same time whether or not the id exists.
    """
    expected = stored.secret_sha256 if stored is not None else _DUMMY
    matches = hmac.compare_digest(digest(secret), expected)
    if stored is None or not matches:
        return "unknown_token"
    if stored.revoked_at is not None:
        return "revoked"
    if stored.expires_at is not None and stored.expires_at <= now:
        return "expired"
    return Principal(stored.name, frozenset(stored.scopes), stored.tenant_id)


_DUMMY = hashlib.sha256(b"no such token").digest()
