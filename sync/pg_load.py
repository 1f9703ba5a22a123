"""A full load from PostgreSQL: every table streamed into a `Loader`, over several
processes when the user tables are big.

`build_all` reads each table through a cursor CHUNK_ROWS at a time; while a worker
thread adds one piece to the engine, PostgreSQL is already producing the next (another
process, so the two overlap), and each piece is freed once added. So a load takes about
the longer of reading and building rather than their sum, and never holds more than two
pieces of records beside the engine.

Nearly all of a big tenant's rows are users, memberships and direct assignments, and
building them is Python work that holds the GIL: one process builds at most one core's
worth. With several processes (`SyncOptions.load_processes`, PDP_LOAD_PROCESSES) and
at least `SyncOptions.parallel_min_rows` user rows, `build_all` exports its
transaction's snapshot, starts a child per extra part (`python -m sync.pg_load`) and
reads part 0 itself. Each child:

1. reads its request (one JSON line: URL, snapshot id, part, parts, timeouts) from
   stdin, never from its arguments or environment: the URL may hold a password, and
   arguments are visible to every user of the machine;
2. opens a REPEATABLE READ, READ ONLY transaction that imports the parent's snapshot
   (SET TRANSACTION SNAPSHOT), so it reads exactly what the parent reads;
3. builds the rows of its part's users (`sync.pg_queries.PART_ROWS`: the users whose
   id hashes to the part, so the parts' users are disjoint) with a `Loader`;
4. writes that engine's image (`pdp.engine.image`) to stdout and exits; any failure is
   one line on stderr and a non-zero exit.

The parent (`Part`) loads each image in a worker thread (in pieces: the event loop
turns meanwhile) and absorbs it into its own load (`Loader.absorb`) while its
transaction is still open. So a child that fails in any way (cannot start, connect or
import the snapshot; dies; writes a damaged image) makes the parent read that part
itself in the same transaction: a failed part costs time, never a wrong replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
from typing import IO, Any

import asyncpg

from pdp.engine import Engine, Loader, Snapshot, TenantState, collector_off, image
from pdp.engine.bulk import USER_ENTITIES
from sync import pg_queries as q
from sync.options import SyncOptions

log = logging.getLogger(__name__)

# Rows fetched per round trip: small enough that a piece's records cost little memory
# (~15 MB), large enough that round trips do not count.
CHUNK_ROWS = 50_000

# How the parent starts a child (a module-level name, so a test can start another program).
COMMAND: tuple[str, ...] = (sys.executable, "-m", "sync.pg_load")
# pg_export_snapshot()'s ids, e.g. 00000003-0000001B-1: what may go into SET TRANSACTION.
_SNAPSHOT_ID = re.compile(r"[0-9A-F]+(?:-[0-9A-F]+)+")
_PIPE_BUFFER = 1 << 20


async def build_all(
    conn: asyncpg.Connection, options: SyncOptions, snapshot: Snapshot, url: str | None
) -> Engine:
    """The engine of every table, read in the open transaction of `conn` (see the module
    docstring). `url`: where `conn` reads, for the children; None: no children."""
    loader = Loader()
    parts: list[Part] = []
    # The cyclic collector stays off for the whole read, not only while a piece is added:
    # run in the gaps, each collection walks the engine objects made since the last
    # (1-5 s of 31-36 s CPU in two paired loads of 1,000,000 users). `install` collects.
    with collector_off():
        try:
            count = 1 if url is None else await _parts(conn, options)
            results: dict[int, asyncio.Future[Engine] | None] = {}
            if count > 1:
                assert url is not None
                log.info("full load in %d processes (by user id)", count)
                exported = await conn.fetchval("SELECT pg_export_snapshot()")
                for i in range(1, count):
                    asked = request(
                        url, exported, i, count, connect_timeout=options.connect_timeout,
                        statement_timeout_ms=options.statement_timeout_ms,
                    )  # fmt: skip
                    results[i] = _start(asked, snapshot, parts)
            for entity, sql in q.ALL_ROWS.items():
                if options.on_demand and entity in USER_ENTITIES:
                    continue
                if count > 1 and entity in USER_ENTITIES:
                    await stream(conn, q.PART_ROWS[entity], entity, loader, count, 0)
                else:
                    await stream(conn, sql, entity, loader)
            for i, result in results.items():
                await _take(conn, loader, result, i, count)
            return await asyncio.to_thread(loader.engine, snapshot)
        finally:
            for part in parts:
                part.kill()


async def build_tenant(conn: asyncpg.Connection, tenant: str, on_demand: bool) -> TenantState:
    """One tenant's state, its rows streamed in the open transaction of `conn` like
    `build_all`'s (never all held at once), built in worker threads."""
    loader = Loader(only=tenant)
    with collector_off():
        for entity, sql in q.TENANT_ROWS.items():
            if not (on_demand and entity in USER_ENTITIES):
                await stream(conn, sql, entity, loader, tenant)
        states = await asyncio.to_thread(loader.finish)
    return states[tenant]


def _start(
    asked: dict[str, Any], snapshot: Snapshot, parts: list[Part]
) -> asyncio.Future[Engine] | None:
    """Start a child (added to `parts`); the future of its engine, None if it did not start."""
    try:
        part = Part.start(asked)
    except OSError as exc:
        log.warning("parallel load: part %d did not start (%s)", asked["part"] + 1, exc)
        return None
    parts.append(part)
    return _settled(asyncio.to_thread(part.result, snapshot))


async def _take(
    conn: asyncpg.Connection,
    loader: Loader,
    result: asyncio.Future[Engine] | None,
    part: int,
    count: int,
) -> None:
    """Absorb a child's part into `loader`; read the part here if the child failed."""
    try:
        if result is None:
            raise PartFailed(f"part {part + 1} of {count} did not start")
        built = await result
    except PartFailed as exc:
        log.warning("parallel load: %s; reading that part here", exc)
        for entity in USER_ENTITIES:
            await stream(conn, q.PART_ROWS[entity], entity, loader, count, part)
        return
    await asyncio.to_thread(loader.absorb, built)


async def _parts(conn: asyncpg.Connection, options: SyncOptions) -> int:
    """How many parts to load in: 1 unless there are processes to spare and rows enough."""
    if options.on_demand or options.load_processes < 2:
        return 1
    rows = await conn.fetchval(q.USER_ROWS_ESTIMATE)
    return options.load_processes if rows >= options.parallel_min_rows else 1


def _settled(work: Any) -> asyncio.Future[Engine]:
    """`work` as a future whose failure counts as seen even if nobody awaits it (the
    load failed first: its children were killed, so their results fail too)."""
    future: asyncio.Future[Engine] = asyncio.ensure_future(work)
    future.add_done_callback(lambda done: done.cancelled() or done.exception())
    return future


async def stream(
    conn: asyncpg.Connection, sql: str, entity: str, loader: Loader, *args: object
) -> None:
    """Add the rows of one table's query to `loader`, CHUNK_ROWS at a time in a thread."""
    cursor = await conn.cursor(sql, *args)
    pending = asyncio.ensure_future(cursor.fetch(CHUNK_ROWS))
    try:
        while rows := await pending:
            pending = asyncio.ensure_future(cursor.fetch(CHUNK_ROWS))
            await asyncio.to_thread(loader.add, entity, rows)
            del rows
    finally:  # on failure the caller drops the connection: just settle `pending`
        if not pending.done():
            pending.cancel()
        elif not pending.cancelled():
            pending.exception()  # retrieved, so never logged as unretrieved


class PartFailed(Exception):
    """A child did not deliver its part; the message says how."""


class Part:
    """The parent's handle on one child building part `part` of `parts`."""

    def __init__(self, part: int, parts: int, proc: subprocess.Popen[bytes], errors: IO[bytes]):
        self.part = part
        self.parts = parts
        self._proc = proc
        self._errors = errors

    @classmethod
    def start(cls, request: dict[str, Any]) -> Part:
        """Start the child of `request` (see `request`); quick (fork and exec)."""
        errors = tempfile.TemporaryFile()  # noqa: SIM115  (the child's stderr, read on failure)
        try:
            proc = subprocess.Popen(  # noqa: S603  (our own program, no shell)
                COMMAND, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors,
                bufsize=_PIPE_BUFFER,
            )  # fmt: skip
        except BaseException:
            errors.close()
            raise
        assert proc.stdin is not None
        with contextlib.suppress(OSError):  # it died already: `result` says how
            proc.stdin.write(json.dumps(request).encode() + b"\n")
        with contextlib.suppress(OSError):
            proc.stdin.close()
        return cls(request["part"], request["parts"], proc, errors)

    def result(self, revision: Snapshot) -> Engine:
        """The engine of the part's rows, once the child wrote it. Blocking and CPU-heavy
        (the image is loaded as it arrives): call it in a thread. PartFailed otherwise."""
        assert self._proc.stdout is not None
        try:
            engine = image.load(self._proc.stdout, revision)
        except image.BadImage as exc:
            raise PartFailed(self._why(f"its image {exc}")) from None
        finally:
            self._proc.stdout.close()
        code = self._proc.wait()
        if code != 0:
            raise PartFailed(self._why("it wrote its image"))
        return engine

    def _why(self, what: str) -> str:
        try:
            code = self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self._proc.wait()
        self._errors.seek(0)
        said = self._errors.read()[-1000:].decode(errors="replace").strip().splitlines()
        return f"part {self.part + 1} of {self.parts}: {what}, exit status {code}" + (
            f" ({said[-1]})" if said else ""
        )

    def kill(self) -> None:
        """Stop the child if it still runs (idempotent)."""
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            self._proc.wait()
        self._errors.close()


def request(url: str, snapshot: str, part: int, parts: int, **timeouts: float) -> dict[str, Any]:
    """What a child is sent: where to read, which snapshot, which part."""
    return {"url": url, "snapshot": snapshot, "part": part, "parts": parts, **timeouts}


async def build(asked: dict[str, Any]) -> Engine:
    """The engine of the rows of part `asked["part"]`, read at the exported snapshot."""
    snapshot = str(asked["snapshot"])
    if not _SNAPSHOT_ID.fullmatch(snapshot):
        raise ValueError(f"not a snapshot id: {snapshot[:40]!r}")
    part, parts = int(asked["part"]), int(asked["parts"])
    if not 0 <= part < parts:
        raise ValueError(f"part {part} of {parts}")
    conn = await asyncpg.connect(
        asked["url"],
        timeout=float(asked.get("connect_timeout", 5.0)),
        server_settings={
            "application_name": "pdp-load-part",
            "statement_timeout": str(int(asked.get("statement_timeout_ms", 600_000))),
        },
    )
    try:
        tx = conn.transaction(isolation="repeatable_read", readonly=True)
        await tx.start()
        await conn.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
        revision = Snapshot.parse(await conn.fetchval("SELECT pg_current_snapshot()::text"))
        loader = Loader()
        for entity in USER_ENTITIES:
            await stream(conn, q.PART_ROWS[entity], entity, loader, parts, part)
        await tx.commit()
    finally:
        await conn.close()
    return await asyncio.to_thread(loader.engine, revision)


def main() -> None:
    """The child: a request on stdin, the image on stdout (see the module docstring)."""
    _die_with_parent()
    gc.disable()  # a short-lived build: nothing to collect that exiting does not free
    try:
        asked = json.loads(sys.stdin.readline())
        engine = asyncio.run(build(asked))
        out = sys.stdout.buffer
        image.dump(image.capture(engine, copy=False), out)
        out.flush()
    except BaseException as exc:  # one line for the parent's log, never a traceback
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        os._exit(1)
    os._exit(0)  # not the teardown of every object built (seconds at 1,000,000 users)


def _die_with_parent() -> None:
    """Ask Linux to kill this child when its parent dies (the parent's load is gone)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes  # noqa: PLC0415  (only the child needs it)

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    # A parent that died before this point closed its end of stdin: the request read
    # then fails and the child exits.


if __name__ == "__main__":
    main()
