"""Subject searches that cannot starve checks: sliced, few at a time, and cached.

"Who may do A on R?" over a tenant-wide grant is most of a large tenant: 17,000 of
100,000 users took about 30 ms of CPU, and checks waiting behind a few looping
searches saw that as latency (p99 6.8 ms -> 119 ms with four). Checks are what a
sidecar is for, so a search:

- computes in pieces of `PIECE` candidates (about 0.1 ms each at 100,000 users),
  yielding to the event loop once `SLICE_SECONDS` of CPU ran (0: after every piece),
  so checks waiting in the loop run in between. A yield is `YIELDS` turns of the
  loop, not one: a check takes a few (its bytes read, its handler started, its
  answer written), and asyncio runs ready callbacks in order, so with one turn a
  check would wait a piece at each of its steps; with `YIELDS` it waits at most one;
- is one of at most `concurrency` searches at once (PDP_SEARCH_CONCURRENCY); the
  others wait for a turn, checks never do;
- pays for its CPU: a turn is held, after the answer is ready, for
  `(1 / SEARCH_SHARE - 1)` times the CPU the search took (parsing, computing,
  rendering, plus `REQUEST_COST` for the HTTP work before and after the
  handler that no meter inside it sees), so searches together take at most about
  `SEARCH_SHARE` (PDP_SEARCH_SHARE) of the event loop, however hard clients loop them
  (even on cached answers: the rendering of a page is work too). A search waits
  longer; a check does not;
- is answered from a small cache when the same question was answered at the same
  engine state within `CACHE_SECONDS` (a client paging through 17,000 ids asks
  170 times). The key holds the engine's identity, version and revision, so a
  change invalidates it; the time bound keeps an assignment that expired meanwhile
  from being listed for longer than that.

An answer is always of one engine state: a computation that sees the engine change
between slices starts over, and after a few tries runs in one go.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from cachetools import TTLCache

from pdp.engine import Engine

SLICE_SECONDS = 0.0  # yield after every piece: measured best (1 ms slices 3x, 0.4 ms 1.4-2.8x)
PIECE = 50  # candidates per piece: ~0.1 ms each at 100,000 users (250: up to 0.7 ms)
ATTEMPTS = 3
CACHE_SECONDS = 1.0
CACHE_ENTRIES = 64  # at most ~1 MB each for a 100,000-user answer (shared id strings)
SEARCH_SHARE = 0.1  # quiet box: 0.25 left cached-page loops at 2.05x checks p99, 0.1 at 1.57-1.64x
YIELDS = 3  # loop turns per yield: a check's steps (read, handle, write) between two pieces
# aiohttp's own work per request (parse, dispatch, write): a bare handler's whole cost
# in loadtests/bench_http.py is ~60 us on this 2-core box; a turn is charged that too.
REQUEST_COST = 60e-6

Question = tuple[str, str, str, str]  # tenant, resource type, resource id, action
_Key = tuple[Question, int, int, object]


@dataclass(slots=True)
class Meter:
    """CPU time a search spent in its synchronous steps (seconds, by `clock`)."""

    clock: Callable[[], float]
    spent: float = field(default=0.0)

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        started = self.clock()
        try:
            yield
        finally:
            self.spent += self.clock() - started


class SubjectSearcher:
    """Sorted ids of the users the engine allows, computed fairly (see the module)."""

    def __init__(
        self,
        concurrency: int = 1,
        *,
        slice_seconds: float = SLICE_SECONDS,
        share: float = SEARCH_SHARE,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._turns = asyncio.Semaphore(concurrency)
        self._slice = slice_seconds
        self._share = share
        self._clock = clock
        self._wall = wall
        self._cache: TTLCache[_Key, tuple[str, ...]] = TTLCache(
            CACHE_ENTRIES, CACHE_SECONDS, timer=clock
        )
        self.computed = 0  # searches computed (not from the cache): for tests and metrics

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[Meter]:
        """Wait for a turn; hold it while the search runs, then for its cool-down."""
        async with self._turns:
            meter = Meter(self._clock)
            yield meter
            rest = (meter.spent + REQUEST_COST) * (1 / self._share - 1)
            if rest > 0:
                await asyncio.sleep(rest)

    async def subjects(self, engine: Engine, question: Question, meter: Meter) -> tuple[str, ...]:
        """The sorted user ids `engine.check` allows for `question`, in a turn (`meter`)."""
        key = _key(engine, question)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        ids = await self._compute(engine, question, meter)
        self.computed += 1
        self._cache[_key(engine, question)] = ids
        return ids

    async def _compute(self, engine: Engine, question: Question, meter: Meter) -> tuple[str, ...]:
        now = self._wall()
        clock, budget = self._clock, self._slice
        for _ in range(ATTEMPTS):
            version = engine.version
            runs: list[list[str]] = []
            started = clock()
            for piece in engine.subject_chunks(*question, now, size=PIECE):
                piece.sort()  # a short run now; the runs are merged below, in turns too
                runs.append(piece)
                if clock() - started >= budget:
                    meter.spent += clock() - started
                    await yield_turns()
                    if engine.version != version:
                        break  # the pieces left would read the changed engine
                    started = clock()
            else:
                meter.spent += clock() - started
                return tuple(await self._merge(runs, meter))
        with meter.timing():
            return engine.subjects(*question, now)

    async def _merge(self, runs: list[list[str]], meter: Meter) -> list[str]:
        """The sorted runs merged into one, pairwise: timsort merges two sorted runs in C,
        so the longest step is one merge of the answer's two halves."""
        clock, budget = self._clock, self._slice
        started = clock()
        while len(runs) > 1:
            merged: list[list[str]] = []
            for i in range(0, len(runs) - 1, 2):
                first = runs[i]
                first.extend(runs[i + 1])
                first.sort()
                merged.append(first)
                if clock() - started >= budget:
                    meter.spent += clock() - started
                    await yield_turns()
                    started = clock()
            if len(runs) % 2:
                merged.append(runs[-1])
            runs = merged
        meter.spent += clock() - started
        return runs[0] if runs else []


async def yield_turns() -> None:
    """Let the loop run `YIELDS` times: what became ready meanwhile, and its next steps."""
    for _ in range(YIELDS):
        await asyncio.sleep(0)


def _key(engine: Engine, question: Question) -> _Key:
    # id() alone could be reused by a later engine; with its version and revision a
    # stale hit would need the same address, counter and snapshot.
    return (question, id(engine), engine.version, engine.revision)
