"""The bearer-JWT verification keys: fetched from a JWKS URL or file, cached with a TTL.

No request ever waits on a routine fetch: once the TTL has passed, the next request
starts one refresh in the background and is verified with the keys at hand (they
stay in use until a fetch succeeds). A token naming an unknown `kid` (a key rotated
in at the issuer) starts a refresh too, at most once per `min_refresh_interval`, and
waits for it at most `timeout` seconds; the event loop keeps serving meanwhile,
since the fetch is an aiohttp request and parsing runs in a worker thread. Refreshes
are single-flight; a failed one is logged and leaves the old keys in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp

from pdp.errors import ConfigError
from pdp.gateway import KeySet, parse_jwks

log = logging.getLogger(__name__)

MAX_JWKS_BYTES = 1 << 20


def load_jwks_file(path: Path) -> KeySet:
    """The key set in `path`, read now (at start); ConfigError naming the file."""
    try:
        return parse_jwks(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"PDP_JWT_JWKS_FILE: cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"PDP_JWT_JWKS_FILE: {path}: {exc}") from None


class JwksKeys:
    """The current KeySet of one source (an http(s) URL or a file path)."""

    def __init__(
        self,
        source: str | Path,
        *,
        ttl: float,
        timeout: float,
        initial: KeySet | None = None,
        min_refresh_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._ttl = ttl
        self._timeout = timeout
        self._min_interval = min(min_refresh_interval, ttl)
        self._clock = clock
        self._keys = initial
        self._fetched_at = clock() if initial is not None else float("-inf")
        self._attempted_at = self._fetched_at
        self._refresh: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.fetches = 0  # completed fetches (tests and logs)

    @property
    def keys(self) -> KeySet | None:
        return self._keys

    async def running(self, _app: object = None) -> AsyncIterator[None]:
        """Cleanup context: the HTTP session, a first fetch when nothing is loaded yet."""
        if isinstance(self._source, str):
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout)
            )
        try:
            if self._keys is None:
                self._start_refresh()
            yield
        finally:
            task, self._refresh = self._refresh, None
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if self._session is not None:
                await self._session.close()
                self._session = None

    def current(self) -> KeySet | None:
        """The keys to verify with now; starts a background refresh once the TTL passed."""
        if self._clock() - self._fetched_at >= self._ttl:
            self._start_refresh()
        return self._keys

    async def after_unknown_kid(self) -> KeySet | None:
        """The keys after a refresh for a `kid` not held (rate-limited, bounded wait)."""
        if self._clock() - self._attempted_at >= self._min_interval:
            self._start_refresh()
        task = self._refresh
        if task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), self._timeout)
        return self._keys

    async def refreshed(self) -> None:
        """Wait for the refresh in flight, if any (requests never need to)."""
        task = self._refresh
        if task is not None:
            await asyncio.shield(task)

    def _start_refresh(self) -> None:
        if self._refresh is None or self._refresh.done():
            self._attempted_at = self._clock()
            self._refresh = asyncio.get_running_loop().create_task(self._fetch())

    async def _fetch(self) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                raw = await self._read()
                keys = await asyncio.to_thread(parse_jwks, raw)
        except (OSError, ValueError, aiohttp.ClientError, TimeoutError) as exc:
            log.warning("JWKS fetch from %s failed, keeping the keys at hand: %s", self._where, exc)
            return
        if self._keys is None or len(keys) != len(self._keys):
            log.info("JWKS from %s: %d keys", self._where, len(keys))
        self._keys = keys
        self._fetched_at = self._clock()
        self.fetches += 1

    async def _read(self) -> bytes:
        if isinstance(self._source, Path):
            return await asyncio.to_thread(self._source.read_bytes)
        if self._session is None:
            raise OSError("the JWKS session is not running")
        async with self._session.get(self._source) as response:
            response.raise_for_status()
            raw = await response.content.read(MAX_JWKS_BYTES + 1)
        if len(raw) > MAX_JWKS_BYTES:
            raise ValueError(f"the JWKS document is larger than {MAX_JWKS_BYTES} bytes")
        return raw

    @property
    def _where(self) -> str:
        return str(self._source)
