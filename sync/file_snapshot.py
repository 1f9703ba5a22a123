"""A local snapshot file of the replica (`PDP_SNAPSHOT_FILE`): restart from it, then catch up.

Layout, version 2 (integers big-endian):

    b"PDPSNAP\\n"  version u32  header-length u32  header  body  sha256(everything before)

- header: UTF-8 JSON `{"epoch", "snapshot", "written_at", "digests": {tenant: digest}}`;
- body: one zlib stream of the engine's image (`pdp.engine.image`): its state as held,
  in pickled pieces that name no class (the reader refuses any that do, so loading
  runs no code), read back without rebuilding anything. Version 1 held the rows
  instead and rebuilt the engine from them: 24 s at 1,000,000 users, as long as a load
  from PostgreSQL; this reads back in 3.6-4.1 s. A file of another version or engine
  layout is refused (`Unusable`), and the sidecar loads from PostgreSQL instead.

Written atomically: a temporary file in the same directory, fsync, rename over the old
one, fsync of the directory; a crash leaves the old file or the new one, never half.
Saving copies the state's containers first (`image.capture`, the only step during
which nothing may be applied), then pickles, compresses and writes in a worker
thread while catch-ups resume. Read: the checksum first, then the image, then every
tenant's digest (kept running in the image) against the header's. A usable file is
still not proof of anything: the caller installs it unproven (`Replica.restore`) and
the first catch-up from its snapshot proves it current, or reloads everything when
the epoch differs or the purge horizon passed it (`sync.pg_read.reload_reason`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import io
import json
import logging
import os
import struct
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pdp.engine import Engine, Snapshot, collector_off
from pdp.engine import image as state_image
from pdp.replica import Replica
from sync.metrics import NullMetrics, SnapshotFileMetrics

log = logging.getLogger(__name__)

MAGIC = b"PDPSNAP\n"
VERSION = 2
_PREFIX = struct.Struct(">II")  # version, header length
_SHA = 32


class Unusable(Exception):
    """The file cannot be used: `kind` is `expired` (too old) or `corrupt` (anything else)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Image:
    """What a file holds, captured from the replica in one consistent moment."""

    epoch: str
    snapshot: Snapshot
    written_at: float  # wall-clock seconds
    digests: dict[str, str]
    held: list[state_image.Held]  # `state_image.capture` of the engine


@dataclass(frozen=True, slots=True)
class Restored:
    engine: Engine
    epoch: str
    written_at: float


def write(path: Path, image: Image) -> int:
    """Replace `path` with the image atomically and durably; returns the file's size.

    Blocking: call it in a worker thread. The image is pickled a piece at a time (and
    zlib and the hash release the GIL), so the event loop keeps running meanwhile.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            size = _write_body(out, image)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power loss
    finally:
        os.close(dir_fd)
    return size


def _write_body(out: BinaryIO, image: Image) -> int:
    header = json.dumps(
        {"epoch": image.epoch, "snapshot": str(image.snapshot),
         "written_at": image.written_at, "digests": image.digests},
        separators=(",", ":"),
    ).encode()  # fmt: skip
    sha = hashlib.sha256()
    size = 0

    def put(data: bytes) -> None:
        nonlocal size
        out.write(data)
        sha.update(data)
        size += len(data)

    put(MAGIC + _PREFIX.pack(VERSION, len(header)) + header)
    packer = zlib.compressobj(1)
    state_image.dump(image.held, _Packed(lambda data: put(packer.compress(data))))
    put(packer.flush())
    out.write(sha.digest())
    return size + _SHA


class _Packed(io.RawIOBase):
    """A writable stream handing what is written (pickle frames of ~64 KiB) to `put`."""

    def __init__(self, put: Callable[[bytes], None]) -> None:
        super().__init__()
        self._put = put

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._put(bytes(data))
        return len(data)


def read(path: Path, max_age: float, now: float) -> Restored | None:
    """The engine the file at `path` holds; None when there is no file.

    Raises Unusable (`expired`: written more than `max_age` seconds before `now`;
    `corrupt`: anything else wrong). Blocking and CPU-heavy: call it in a thread.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise Unusable("corrupt", f"cannot read it: {exc.strerror}") from None
    header, body = _split(data)
    try:
        epoch, snapshot = str(header["epoch"]), Snapshot.parse(str(header["snapshot"]))
        written_at = float(header["written_at"])
        digests = {str(t): str(d) for t, d in dict(header["digests"]).items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise Unusable("corrupt", f"its header is not one pdp writes ({exc})") from None
    age = now - written_at
    if age > max_age:
        raise Unusable("expired", f"it was written {age:.0f} s ago, more than {max_age:g} s")
    # Millions of acyclic tuples and dicts: the cyclic collector would walk them again
    # and again while they are made.
    with collector_off():
        engine = _load(body, snapshot)
    held = {t: engine.digest(t) for t in engine.tenants()}
    if held != digests:
        raise Unusable("corrupt", "its state does not hold the digests it was written with")
    return Restored(engine, epoch, written_at)


def _split(data: bytes) -> tuple[dict[str, Any], memoryview]:
    """The header and the body of a file's bytes, after checking magic, version and sum."""
    fixed = len(MAGIC) + _PREFIX.size
    if len(data) < fixed + _SHA or not data.startswith(MAGIC):
        raise Unusable("corrupt", "it is not a pdp snapshot file")
    version, header_len = _PREFIX.unpack_from(data, len(MAGIC))
    if version != VERSION:
        raise Unusable("corrupt", f"its format version is {version}, this pdp reads {VERSION}")
    if hashlib.sha256(memoryview(data)[:-_SHA]).digest() != data[-_SHA:]:
        raise Unusable("corrupt", "its checksum does not match (truncated or damaged)")
    if fixed + header_len > len(data) - _SHA:
        raise Unusable("corrupt", "its header length is wrong")
    try:
        header = json.loads(data[fixed : fixed + header_len])
    except ValueError:
        raise Unusable("corrupt", "its header is not JSON") from None
    if not isinstance(header, dict):
        raise Unusable("corrupt", "its header is not a JSON object")
    return header, memoryview(data)[fixed + header_len : -_SHA]


def _load(body: memoryview, snapshot: Snapshot) -> Engine:
    """The engine of the image in the compressed body."""
    try:
        raw = zlib.decompress(body)
    except zlib.error:
        raise Unusable("corrupt", "its body cannot be decompressed") from None
    try:
        return state_image.load(io.BytesIO(raw), snapshot)
    except state_image.BadImage as exc:
        raise Unusable("corrupt", f"its engine image cannot be used: {exc}") from None


class SnapshotFile:
    """Restores a replica from the file at start and rewrites the file now and then.

    The sync loop is the replica's only writer and calls `save` between catch-ups, so
    the rows read in a worker thread are those of one revision; encoding and writing
    then go on in the background while catch-ups resume.
    """

    def __init__(
        self,
        path: Path,
        interval: float,
        max_age: float,
        metrics: SnapshotFileMetrics | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._interval = interval
        self._max_age = max_age
        self._metrics = metrics or NullMetrics()
        self._clock = clock
        self._wall = wall
        self._last = clock()
        self._saved: Snapshot | None = None  # revision last written (or restored)
        self._writing: asyncio.Task[None] | None = None
        self.writes = 0  # files written, for tests
        self.attempted = asyncio.Event()  # set (and replaced) after every write attempt

    async def restore(self, replica: Replica) -> bool:
        """Install the file's engine, unproven, when it is usable; else log why not."""
        started = self._clock()
        try:
            restored = await asyncio.to_thread(read, self.path, self._max_age, self._wall())
        except Unusable as exc:
            self._metrics.snapshot_file_loaded(exc.kind)
            if exc.kind == "expired":
                log.info("snapshot file %s not used: %s; loading from PostgreSQL", self.path, exc)
            else:
                log.warning("snapshot file %s ignored: %s; loading from PostgreSQL", self.path, exc)
            return False
        if restored is None:
            self._metrics.snapshot_file_loaded("missing")
            log.info("no snapshot file at %s yet; loading from PostgreSQL", self.path)
            return False
        replica.restore(restored.engine, restored.epoch)
        gc.collect()
        gc.freeze()  # as after a full load (`sync.apply.install`)
        self._saved = restored.engine.revision
        self._metrics.snapshot_file_loaded("loaded")
        log.info(
            "restored snapshot %s from %s (written %.0f s ago) in %.0f ms; catching up",
            restored.engine.revision, self.path, self._wall() - restored.written_at,
            (self._clock() - started) * 1000,
        )  # fmt: skip
        return True

    def due(self) -> bool:
        return self._clock() - self._last >= self._interval

    async def save(self, replica: Replica) -> None:
        """Capture the replica (caller: apply nothing until this returns), then write
        the file in the background. Nothing when the revision is the one last written."""
        engine, epoch = replica.engine, replica.epoch
        self._last = self._clock()
        if engine is None or epoch is None or engine.revision == self._saved:
            return
        await self.flush()  # one write at a time
        digests = {tenant: engine.digest(tenant) for tenant in engine.tenants()}
        revision = engine.revision
        held = await asyncio.to_thread(state_image.capture, engine)
        image = Image(epoch, revision, self._wall(), digests, held)
        self._saved = revision
        self._writing = asyncio.ensure_future(self._write(image))

    async def flush(self) -> None:
        """Wait for the write in progress, if any."""
        if self._writing is not None:
            writing, self._writing = self._writing, None
            await writing

    async def _write(self, image: Image) -> None:
        try:
            await self._write_file(image)
        finally:
            attempted, self.attempted = self.attempted, asyncio.Event()
            attempted.set()

    async def _write_file(self, image: Image) -> None:
        started = self._clock()
        try:
            size = await asyncio.to_thread(write, self.path, image)
        except OSError as exc:
            self._saved = None
            self._metrics.snapshot_file_written(False, self._clock() - started, 0)
            log.warning("snapshot file %s not written: %s", self.path, exc)
            return
        self.writes += 1
        seconds = self._clock() - started
        self._metrics.snapshot_file_written(True, seconds, size)
        log.info(
            "wrote snapshot %s to %s: %d bytes in %.0f ms",
            image.snapshot, self.path, size, seconds * 1000,
        )  # fmt: skip
