"""The ledger's write-ahead journal: every row is appended to a file before the response it records sends its
last byte, so that a gateway killed at any moment (SIGKILL, OOM, a crash) loses no completed request.

Rows go to segment files (JSON lines) in `ledger.journal_dir`. The writer thread marks rows committed once
their batch is in the database; a segment whose rows are all committed is deleted as soon as it is full.
Each live process holds an exclusive `flock` on its segments, so a segment that can be locked belongs to a
process that is gone: at start-up its rows (and those of the spill file) are replayed into the database,
skipping rows already there (the id is the primary key), then the file is deleted. The first line of a
segment names the ledger it belongs to (a digest of the database URL), so a gateway never replays another
ledger's rows. See docs/reliability.md.

A row written with write(2) survives the death of the process; it reaches the disk when the OS writes its
page cache (seconds), or at once with `fsync` on.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from gateway.settings import LedgerConfig

log = logging.getLogger("frugal.ledger")

SUFFIX = ".jsonl"
_DUMP_OPTIONS = orjson.OPT_NON_STR_KEYS


def ledger_digest(url: str) -> str:
    """Names a ledger without its secrets (a digest of its URL)."""
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def dump_row(row: dict[str, Any]) -> bytes:
    return orjson.dumps(row, default=str, option=_DUMP_OPTIONS) + b"\n"


def load_row(line: bytes) -> dict[str, Any] | None:
    """A row read back from a journal or spill line; None for a torn or foreign line."""
    try:
        row = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(row, dict) or "id" not in row:
        return None
    created = row.get("created_at")
    if isinstance(created, str):
        row["created_at"] = datetime.fromisoformat(created)
    return row


@dataclass(slots=True)
class _Segment:
    seq: int
    path: Path
    fd: int
    size: int = 0
    appended: int = 0
    committed: int = 0


@dataclass(slots=True)
class Leftover:
    """A file of rows left by a process that is gone (a journal segment, or the spill file), held locked."""

    path: Path
    fd: int
    rows: list[dict[str, Any]]
    torn: int = 0

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.release()

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class Journal:
    """Appends rows before they are written to the database; deletes them once they are."""

    def __init__(self, directory: str | Path, ledger_url: str, *, segment_bytes: int = 4 << 20,
                 fsync: bool = False) -> None:
        self.directory = Path(directory)
        self.ledger = ledger_digest(ledger_url)
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self._lock = threading.Lock()
        self._segments: dict[int, _Segment] = {}
        self._current: _Segment | None = None
        self._seq = 0
        self._stem = f"{os.getpid()}-{time.time_ns()}"

    # -- the request path ------------------------------------------------------------------------
    def append(self, row: dict[str, Any]) -> int:
        """Write `row` through to the OS; returns the segment it went to (for `committed`). Raises OSError
        when the journal cannot be written (the caller logs it and goes on: the row is still queued)."""
        line = dump_row(row)
        with self._lock:
            segment = self._current
            if segment is None or segment.size >= self.segment_bytes:
                segment = self._open_segment()
            os.write(segment.fd, line)
            if self.fsync:
                os.fsync(segment.fd)
            segment.size += len(line)
            segment.appended += 1
            return segment.seq

    # -- the writer thread -----------------------------------------------------------------------
    def committed(self, counts: dict[int, int]) -> None:
        """Rows of these segments are in the database (or the spill file): full segments with nothing left
        uncommitted are deleted."""
        with self._lock:
            for seq, count in counts.items():
                segment = self._segments.get(seq)
                if segment is None:
                    continue
                segment.committed += count
                if segment is not self._current and segment.committed >= segment.appended:
                    self._drop(segment)

    def close(self) -> None:
        """At shutdown: segments whose rows are all committed are deleted; the others stay for replay."""
        with self._lock:
            for segment in list(self._segments.values()):
                if segment.committed >= segment.appended:
                    self._drop(segment)
                else:
                    log.error("ledger journal %s keeps %d rows not yet in the database: replayed at next start",
                              segment.path, segment.appended - segment.committed)
                    os.close(segment.fd)
                    self._segments.pop(segment.seq)
            self._current = None

    def leftovers(self) -> Iterator[Leftover]:
        """Segments of this ledger left by processes that are gone, each locked and read (yielded one at a
        time: the caller replays then removes or releases it)."""
        if not self.directory.is_dir():
            return
        own = {s.path for s in self._segments.values()}
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            if path in own:
                continue
            leftover = read_locked(path, blocking=False, ledger=self.ledger)
            if leftover is not None:
                yield leftover

    # -- segments --------------------------------------------------------------------------------
    def _open_segment(self) -> _Segment:
        """A new segment, locked before it is visible under its final name (so no other process can take a
        live segment for a leftover)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        final = self.directory / f"segment-{self._stem}-{self._seq:06d}{SUFFIX}"
        temporary = final.with_suffix(".open")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        header = orjson.dumps({"journal": 1, "ledger": self.ledger, "pid": os.getpid()}) + b"\n"
        os.write(fd, header)
        os.rename(temporary, final)
        segment = _Segment(self._seq, final, fd, size=len(header))
        previous = self._current
        self._segments[segment.seq] = segment
        self._current = segment
        if previous is not None and previous.committed >= previous.appended:
            self._drop(previous)
        return segment

    def _drop(self, segment: _Segment) -> None:
        with contextlib.suppress(FileNotFoundError):
            segment.path.unlink()
        os.close(segment.fd)
        self._segments.pop(segment.seq, None)
        if self._current is segment:
            self._current = None


def journal_for(config: LedgerConfig) -> Journal | None:
    """The journal `config` asks for (None when `journal_dir` is "off")."""
    directory = config.journal_path()
    if directory is None:
        return None
    return Journal(directory, config.url, segment_bytes=int(config.journal_segment_mib * 1024 * 1024),
                   fsync=config.journal_fsync)


def read_locked(path: Path, *, blocking: bool, ledger: str | None = None) -> Leftover | None:
    """Lock `path` and read its rows; None when another process holds it (not blocking), when it is gone, or
    when its header names another ledger (`ledger`: a journal segment's owner must match)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    if not path.exists():  # removed by its replayer between our open and our lock
        os.close(fd)
        return None
    with os.fdopen(os.dup(fd), "rb") as handle:
        lines = handle.read().splitlines()
    if ledger is not None:
        header = orjson.loads(lines[0]) if lines and lines[0].startswith(b'{"journal"') else {}
        if header.get("ledger") != ledger:
            os.close(fd)
            return None
        lines = lines[1:]
    rows, torn = [], 0
    for line in lines:
        row = load_row(line)
        if row is None:
            torn += 1  # a line cut short by a crash mid-write (never acknowledged to a client)
        else:
            rows.append(row)
    return Leftover(path, fd, rows, torn)
