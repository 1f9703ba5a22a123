"""Bearer JWTs: verify one against a key set and map its claims to (subject, tenant).

Pure: the keys are given (`pdp.web.jwks` fetches and caches them). PyJWT verifies
the signature and the registered claims: `exp` is required, `nbf`/`iat` honoured,
`iss` and `aud` checked when configured, all with a bounded leeway. The algorithm
is taken from the token's header only when it is allowed and fits the key's type
(`HS*` an `oct` key, `RS*` an RSA key, `ES*` an EC key), so an RSA public key can
never be used as an HMAC secret.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from jwt import PyJWK

SUPPORTED_ALGORITHMS = ("HS256", "RS256", "ES256")
MAX_LEEWAY_SECONDS = 300.0
_KEY_TYPES = {"HS": "oct", "RS": "RSA", "ES": "EC"}
_MAX_CLAIM_LENGTH = 256


class InvalidToken(Exception):
    """The token cannot be accepted; the message says why (safe to return: no secret)."""


class UnknownKey(InvalidToken):
    """The token names a key id the key set does not hold (a refresh may find it)."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified token speaks for; `tenant` None when no tenant claim is configured."""

    subject: str
    tenant: str | None
    expires_at: float


@dataclass(frozen=True, slots=True)
class KeySet:
    """Verification keys by key id, and those without one."""

    by_kid: Mapping[str, PyJWK]
    anonymous: tuple[PyJWK, ...]

    def __len__(self) -> int:
        return len(self.by_kid) + len(self.anonymous)


def parse_jwks(raw: bytes) -> KeySet:
    """A JWKS document (`{"keys": [...]}`) as a KeySet; ValueError naming the fault."""
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError('not a JWKS document: expected {"keys": [...]}')
    by_kid: dict[str, PyJWK] = {}
    anonymous: list[PyJWK] = []
    for i, entry in enumerate(document["keys"]):
        if not isinstance(entry, dict):
            raise ValueError(f"keys[{i}] is not an object")
        if entry.get("use", "sig") != "sig":
            continue  # an encryption key: not for signatures
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PyJWT warns on short HMAC keys
                key = PyJWK(entry)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as exc:
            raise ValueError(f"keys[{i}] is not a usable key: {exc}") from None
        kid = entry.get("kid")
        if isinstance(kid, str) and kid:
            by_kid[kid] = key
        else:
            anonymous.append(key)
    if not by_kid and not anonymous:
        raise ValueError("the key set holds no signature key")
    return KeySet(by_kid, tuple(anonymous))


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    """What a token must satisfy and which claims name the subject and tenant."""

    algorithms: tuple[str, ...] = SUPPORTED_ALGORITHMS
    issuer: str | None = None
    audience: str | None = None
    leeway: float = 30.0
    subject_claim: str = "sub"
    tenant_claim: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.leeway <= MAX_LEEWAY_SECONDS:
            raise ValueError(f"leeway must be 0 to {MAX_LEEWAY_SECONDS:g} seconds")
        unknown = set(self.algorithms) - set(SUPPORTED_ALGORITHMS)
        if unknown or not self.algorithms:
            raise ValueError(f"algorithms must be among {', '.join(SUPPORTED_ALGORITHMS)}")


def key_id(token: str) -> tuple[str | None, str]:
    """(kid, alg) from the token's header, unverified; InvalidToken when malformed."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise InvalidToken("malformed token") from None
    kid, alg = header.get("kid"), header.get("alg")
    if not isinstance(alg, str):
        raise InvalidToken("the token header names no algorithm")
    return (kid if isinstance(kid, str) and kid else None), alg


def verify(token: str, keys: KeySet, policy: TokenPolicy) -> Identity:
    """The identity of a valid token; InvalidToken (UnknownKey for a kid not in `keys`)."""
    kid, alg = key_id(token)
    if alg not in policy.algorithms:
        raise InvalidToken(f"algorithm {alg} is not accepted")
    key = _key_for(keys, kid, alg)
    try:
        claims = jwt.decode(
            token,
            key.key,
            algorithms=[alg],
            audience=policy.audience,
            issuer=policy.issuer,
            leeway=policy.leeway,
            options={"require": ["exp"]},
        )
    except jwt.ExpiredSignatureError:
        raise InvalidToken("the token has expired") from None
    except jwt.PyJWTError as exc:
        raise InvalidToken(f"the token is not valid: {exc}") from None
    return identity(claims, policy)


def _key_for(keys: KeySet, kid: str | None, alg: str) -> PyJWK:
    wanted = _KEY_TYPES.get(alg[:2])
    if kid is not None:
        key = keys.by_kid.get(kid)
        if key is None:
            raise UnknownKey(f"unknown key id {kid[:64]!r}")
        candidates: Sequence[PyJWK] = (key,)
    else:
        candidates = [k for k in keys.anonymous if k.key_type == wanted]
        if len(candidates) != 1:
            raise InvalidToken("the token names no key id and no single key fits it")
    if candidates[0].key_type != wanted:
        raise InvalidToken(f"algorithm {alg} does not fit the key's type")
    return candidates[0]


def identity(claims: Mapping[str, Any], policy: TokenPolicy) -> Identity:
    """Subject and tenant from verified `claims`; InvalidToken when one is missing."""
    subject = _claim(claims, policy.subject_claim)
    tenant = None if policy.tenant_claim is None else _claim(claims, policy.tenant_claim)
    exp = claims.get("exp")
    return Identity(subject, tenant, float(exp) if isinstance(exp, int | float) else 0.0)


def _claim(claims: Mapping[str, Any], name: str) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_CLAIM_LENGTH:
        length = f"1 to {_MAX_CLAIM_LENGTH} characters"
        raise InvalidToken(f"claim {name!r} must be a string of {length}")
    return value
