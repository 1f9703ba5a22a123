"""Shared API keys for the check API (PEP authentication, AuthZEN's SHOULD).

Off unless `PDP_API_KEYS_FILE` names a file. The file holds one key per line as
`NAME sha256:HEX` (the SHA-256 of a high-entropy random key; never the key itself);
blank lines and `#` comments are ignored. `pdp api-key create` makes a key, appends
its line and prints the key once. A caller presents its key in `X-PDP-API-Key` or as
`Authorization: Bearer KEY`; it is hashed and compared with every stored digest in
constant time (no early exit), so timing says nothing about which or how much matched.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pdp.errors import ConfigError

KEY_HEADER = "X-PDP-API-Key"
_LINE = re.compile(r"^(?P<name>[A-Za-z0-9_.@:-]{1,128})\s+sha256:(?P<hex>[0-9a-f]{64})$")


@dataclass(frozen=True, slots=True)
class ApiKeys:
    """The accepted keys: (name, SHA-256 digest) pairs."""

    entries: tuple[tuple[str, bytes], ...]

    @classmethod
    def load(cls, path: Path) -> ApiKeys:
        """Read a keys file; ConfigError naming the line of anything malformed."""
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"PDP_API_KEYS_FILE: cannot read {path}: {exc}") from None
        entries: list[tuple[str, bytes]] = []
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            match = _LINE.match(line)
            if match is None:
                raise ConfigError(
                    f"PDP_API_KEYS_FILE: {path} line {number}: expected 'NAME sha256:HEX' "
                    "(64 lowercase hex digits; see pdp api-key create)"
                )
            entries.append((match["name"], bytes.fromhex(match["hex"])))
        if not entries:
            raise ConfigError(f"PDP_API_KEYS_FILE: {path} holds no key")
        return cls(tuple(entries))

    def identify(self, presented: str) -> str | None:
        """The name of the key `presented` is, or None; compares against every entry."""
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for name, stored in self.entries:
            if hmac.compare_digest(digest, stored):
                found = name
        return found


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request presents: `X-PDP-API-Key`, else an `Authorization: Bearer` token."""
    key = headers.get(KEY_HEADER)
    if key:
        return key
    auth = headers.get("Authorization")
    if auth and auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return None


def new_key() -> str:
    """A fresh key: 256 random bits, URL-safe."""
    return "pdp_" + secrets.token_urlsafe(32)


def key_line(name: str, key: str) -> str:
    """The keys-file line that accepts `key` under `name`."""
    if not re.fullmatch(r"[A-Za-z0-9_.@:-]{1,128}", name):
        raise ConfigError(f"--name: {name!r} is not a key name (letters, digits, _ . @ : -)")
    return f"{name} sha256:{hashlib.sha256(key.encode()).hexdigest()}"
