"""The spend ledger: one row per API request (answered, failed or rejected), in SQL, and the labels of
answers (client feedback, shadow audits) beside them.

Rows are handed to a writer thread and inserted in batches, so the request path never waits on the
database. With a journal (gateway/ledger_journal.py), each row is first appended to a write-ahead file, so a
process killed before its batch was written loses nothing: the next start replays it. If the database is
unreachable the writer keeps the rows and retries; rows it still holds at shutdown are appended to a
JSON-lines spill file, replayed at the next start. Labels are written at once (`upsert_label`): their writer
waits for the answer. See docs/ledger.md and docs/reliability.md.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Connection,
    DateTime,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from gateway.ledger_journal import Journal, Leftover, dump_row, read_locked

log = logging.getLogger("frugal.ledger")

metadata = MetaData()

requests_table = Table(
    "frugal_requests",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    Column("key_id", String(128), index=True),
    Column("endpoint", String(32), nullable=False),
    #: The `model` the client asked for (a model or a route name).
    Column("route", String(256)),
    #: The model that answered, if any.
    Column("model", String(256)),
    Column("models_tried", JSON, nullable=False),
    Column("status", Integer, nullable=False, index=True),
    Column("error_code", String(64)),
    Column("stream", Boolean, nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("tokens_estimated", Boolean, nullable=False),
    Column("cost_usd", Float, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("ttft_ms", Float),
    #: Response cache: "none" (not consulted), "bypass" (not cacheable), "miss", "hit", "semantic-hit".
    Column("cache", String(16), nullable=False),
    Column("client_disconnected", Boolean, nullable=False),
    Column("user", String(256)),
    Column("trace", JSON),
    Column("prompt", JSON),
    Column("response", Text),
    #: "client" (a client's request, billed to its key) or "audit" (a shadow audit of `parent_id`: the
    #: operator's spend, never a client's).
    Column("purpose", String(16), nullable=False, server_default="client", index=True),
    #: Audit rows: the request whose answer was audited.
    Column("parent_id", String(64), index=True),
    #: The version of the route's artifacts (judges, thresholds) that answered (cascade routes).
    Column("route_version", String(64)),
)

COLUMNS = tuple(str(c.name) for c in requests_table.columns)  # plain str: orjson refuses subclasses

#: Labels of answers: whether the answer a request got (or one a cascade tier gave and rejected) was good.
labels_table = Table(
    "frugal_labels",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False, index=True),
    #: "client" (POST /v1/feedback), "audit" (the route's top model asked after the answer) or "escalation"
    #: (a rejected tier's answer compared with the higher tier's answer the client got).
    Column("source", String(16), nullable=False),
    #: The model whose answer is labelled.
    Column("model", String(256), nullable=False),
    Column("route", String(256)),
    Column("key_id", String(128)),
    #: "good" or "bad".
    Column("label", String(8), nullable=False),
    #: 0..1: the client's score, or the strength of the audit's agreement.
    Column("score", Float),
    Column("comment", Text),
    #: The client's corrected answer, or the audit's reference answer (only with `ledger.store_content`).
    Column("correction", Text),
    #: Audits: how the answers were compared ("choice", "yes_no", "number", "exact", "minilm").
    Column("method", String(32)),
    #: The probability that this answer was sampled for labelling (audits: the route's audit rate), so that
    #: estimates can weight it back (1 for client labels and escalations).
    Column("sample_rate", Float, nullable=False, server_default="1"),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("request_id", "source", "model", name="uq_frugal_labels_request_source_model"),
)

LABEL_FIELDS = ("request_id", "source", "model", "route", "key_id", "label", "score", "comment", "correction",
                "method", "sample_rate")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers (dashboard, reports) never block the writer
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str) -> Engine:
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


class BatchCounters(Protocol):
    """Counters kept beside the rows (gateway/rollups.py): added to in the transaction that writes a batch."""

    def ensure_schema(self, engine: Engine) -> None: ...

    def write(self, connection: Connection, rows: Sequence[dict[str, Any]]) -> None: ...


class _Flush:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class Ledger:
    """Asynchronous, batched, loss-averse writer of ledger rows."""

    def __init__(self, url: str, spill_path: str | Path, *, batch_size: int = 500, linger_s: float = 0.05,
                 retry_interval_s: float = 1.0, rollups: BatchCounters | None = None,
                 journal: Journal | None = None) -> None:
        self.url = url
        #: The write-ahead journal (None: rows live only in memory until written; a killed process loses them).
        self.journal = journal
        #: Counters written with each batch, in its transaction (gateway/rollups.py `Rollups`).
        self.rollups = rollups
        self.engine = make_engine(url)
        self.spill_path = Path(spill_path)
        self.batch_size = batch_size
        #: After the first row of a batch arrives, wait this long for more: one commit per batch, not per row.
        self.linger_s = linger_s
        self.retry_interval_s = retry_interval_s
        self._queue: queue.SimpleQueue[tuple[int, dict[str, Any]] | _Flush | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._schema_ready = False
        self.written = 0
        self.failures = 0
        #: Rows found at start in the spill file or a dead process's journal and written (not there before).
        self.replayed = 0
        self._leftovers: list[Leftover] = []
        self._spill_pending = True
        self._journal_scanned = False
        self._next_replay = 0.0

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._ensure_schema()
        self._thread = threading.Thread(target=self._run, name="frugal-ledger", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Write everything queued (or spill it), then stop the writer."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout_s)
        self._thread = None
        if self.journal is not None:
            self.journal.close()
        for leftover in self._leftovers:
            leftover.release()  # still in its file: the next start replays it
        self._leftovers.clear()
        self.engine.dispose()

    # -- the request path -------------------------------------------------------------------------
    def record(self, row: dict[str, Any]) -> None:
        """Append one row to the journal (a write to the OS, no waiting on the disk or the database), then
        queue it for the database. Never raises."""
        segment = 0
        if self.journal is not None:
            try:
                segment = self.journal.append(row)
            except Exception as exc:  # a full disk must not fail the request: the row is still queued
                self.failures += 1
                log.error("ledger journal append failed (row %s kept in memory only): %s", row.get("id"), exc)
        self._queue.put((segment, row))

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every row queued before this call is written; False on timeout."""
        marker = _Flush()
        self._queue.put(marker)
        return marker.done.wait(timeout_s)

    # -- health and reads ---------------------------------------------------------------------------
    def ping(self) -> bool:
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            return True
        except Exception:  # any driver error means "not ready"
            return False

    def rows(self, limit: int = 100) -> list[dict[str, Any]]:
        query = select(requests_table).order_by(requests_table.c.created_at.desc()).limit(limit)
        with self.engine.connect() as connection:
            return [dict(r._mapping) for r in connection.execute(query)]

    def request(self, request_id: str) -> dict[str, Any] | None:
        """The row of a client request (not an audit), or None when none is written."""
        query = select(requests_table).where(requests_table.c.id == request_id,
                                             requests_table.c.purpose == "client")
        with self.engine.connect() as connection:
            row = connection.execute(query).first()
        return dict(row._mapping) if row is not None else None

    # -- labels -------------------------------------------------------------------------------------
    def upsert_label(self, **fields: Any) -> dict[str, Any]:
        """Write a label, replacing the one with the same (request_id, source, model): a client that sends
        its feedback twice, or changes its mind, leaves one label. Returns the stored row."""
        self._ensure_schema()
        now = datetime.now(UTC)
        values = {name: fields.get(name) for name in LABEL_FIELDS}
        values["sample_rate"] = fields.get("sample_rate", 1.0)
        values.update(created_at=now, updated_at=now)
        dialect = {"sqlite": sqlite, "postgresql": postgresql}.get(self.engine.dialect.name)
        key = labels_table.c.request_id, labels_table.c.source, labels_table.c.model
        with self.engine.begin() as connection:
            if dialect is not None:
                statement = dialect.insert(labels_table).values(**values)
                changes = {k: v for k, v in values.items() if k not in ("request_id", "source", "model", "created_at")}
                connection.execute(statement.on_conflict_do_update(index_elements=list(key), set_=changes))
            else:  # another database: a transaction that deletes and inserts
                connection.execute(labels_table.delete().where(*(c == values[c.name] for c in key)))
                connection.execute(insert(labels_table).values(**values))
            row = connection.execute(select(labels_table).where(*(c == values[c.name] for c in key))).one()
        return dict(row._mapping)

    def labels(self, request_id: str) -> list[dict[str, Any]]:
        query = select(labels_table).where(labels_table.c.request_id == request_id).order_by(labels_table.c.id)
        with self.engine.connect() as connection:
            return [dict(r._mapping) for r in connection.execute(query)]

    # -- the writer thread ------------------------------------------------------------------------
    def _ensure_schema(self) -> bool:
        if not self._schema_ready:
            try:
                metadata.create_all(self.engine)
                add_missing_columns(self.engine)
                if self.rollups is not None:
                    self.rollups.ensure_schema(self.engine)
                self._schema_ready = True
            except Exception as exc:
                self.failures += 1
                log.error("ledger database %s not usable yet: %s", self.engine.url.render_as_string(), exc)
        return self._schema_ready

    def _write(self, rows: Sequence[dict[str, Any]], *, skip_existing: bool = False) -> bool:
        """Insert `rows` (and count them in the rollups) in one transaction. `skip_existing`: rows replayed
        from a file may be in the table already (written before their process died): those are skipped."""
        if not rows:
            return True
        if not self._ensure_schema():
            return False
        try:
            with self.engine.begin() as connection:
                if skip_existing:
                    rows = self._not_written(connection, rows)
                if rows:
                    connection.execute(insert(requests_table), list(rows))
                    if self.rollups is not None:
                        self.rollups.write(connection, rows)  # the same transaction: counted once, with the rows
        except IntegrityError as exc:
            if not skip_existing:
                # a row already written (replayed from a file first): write the others rather than retry for ever
                log.warning("ledger batch holds rows already written; writing the others: %s", exc.orig)
                return self._write(rows, skip_existing=True)
            self.failures += 1
            log.error("ledger write of %d rows failed (will retry): %s", len(rows), exc)
            return False
        except Exception as exc:
            self.failures += 1
            log.error("ledger write of %d rows failed (will retry): %s", len(rows), exc)
            return False
        self.written += len(rows)
        if skip_existing:
            self.replayed += len(rows)
        return True

    @staticmethod
    def _not_written(connection: Connection, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rows whose ids are neither in the table nor earlier in `rows`."""
        seen: set[str] = set()
        ids = list({row["id"] for row in rows})
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            seen.update(connection.execute(select(requests_table.c.id).where(requests_table.c.id.in_(chunk))).scalars())
        fresh = []
        for row in rows:
            if row["id"] not in seen:
                seen.add(row["id"])
                fresh.append(row)
        return fresh

    def _spill(self, rows: Sequence[dict[str, Any]]) -> None:
        with self.spill_path.open("ab") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # another replica may be replaying or appending
            if os.fstat(handle.fileno()).st_ino != _inode(self.spill_path):  # replaced while we waited
                return self._spill(rows)
            handle.write(b"".join(dump_row(row) for row in rows))
        log.error("ledger database unreachable: %d rows spilled to %s", len(rows), self.spill_path)

    def _replay(self) -> None:
        self._next_replay = time.monotonic() + self.retry_interval_s
        self._replay_files()

    def _replay_files(self) -> None:
        """Write the rows left by processes that are gone: the spill file (once, at start) and journal
        segments no live process holds. What cannot be written yet stays (locked, for segments) for the next
        try; the spill file is emptied only once its rows are in."""
        if self._spill_pending:
            spill = read_locked(self.spill_path, blocking=True) if self.spill_path.exists() else None
            if spill is None:
                self._spill_pending = False
            else:
                if self._write(_as_rows(spill.rows), skip_existing=True):
                    os.ftruncate(spill.fd, 0)
                    self._spill_pending = False
                    log.warning("ledger: %d spilled rows from %s replayed", len(spill.rows), self.spill_path)
                spill.release()
        if self.journal is not None and not self._journal_scanned:
            self._journal_scanned = True
            self._leftovers = list(self.journal.leftovers())
        for leftover in list(self._leftovers):
            if not self._write(_as_rows(leftover.rows), skip_existing=True):
                return
            log.warning("ledger: %d rows of %s (a process that stopped before writing them) replayed%s",
                        len(leftover.rows), leftover.path.name,
                        f"; {leftover.torn} torn lines skipped" if leftover.torn else "")
            leftover.remove()
            self._leftovers.remove(leftover)

    def _replay_waiting(self) -> bool:
        return self._spill_pending or bool(self._leftovers)

    def _replay_due(self) -> bool:
        return self._replay_waiting() and time.monotonic() >= self._next_replay

    def _run(self) -> None:
        pending: list[dict[str, Any]] = []
        segments: dict[int, int] = {}  # journal segment -> rows of `pending` in it
        markers: list[_Flush] = []
        stopping = False
        failed = False
        self._replay()
        while True:
            timeout = self.retry_interval_s if pending or self._replay_waiting() else None
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None if stopping else _Flush()  # time to retry the pending rows
                if item is None:
                    break
            linger_until = time.monotonic() + self.linger_s
            while True:
                if item is None:
                    stopping = True
                elif isinstance(item, _Flush):
                    markers.append(item)
                else:
                    segment, row = item
                    pending.append(row)
                    segments[segment] = segments.get(segment, 0) + 1
                if len(pending) >= self.batch_size:
                    break
                # Someone waits (flush, shutdown): take what is queued now; otherwise linger for more rows.
                wait = 0.0 if stopping or markers else linger_until - time.monotonic()
                try:
                    item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
            if self._replay_due():
                self._replay()
            failed = not self._write(pending)
            if not failed:
                self._committed(segments)
                pending.clear()
                for marker in markers:
                    marker.done.set()
                markers.clear()
            elif stopping:
                break
            if stopping and self._queue.empty():
                break
        late = False
        while True:  # rows queued after the stop (a request that ended during shutdown)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, tuple):
                late = True
                pending.append(item[1])
                segments[item[0]] = segments.get(item[0], 0) + 1
            elif isinstance(item, _Flush):
                markers.append(item)
        if pending and (failed or not late or not self._write(pending)):
            self._spill(pending)
        self._committed(segments)
        for marker in markers:
            marker.done.set()

    def _committed(self, segments: dict[int, int]) -> None:
        if self.journal is not None and segments:
            self.journal.committed(segments)
        segments.clear()


def _as_rows(stored: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows read back from a file, made complete for this schema (a row written by an older Frugal lacks the
    columns added since; ones it has that were dropped since are left out)."""
    return [ledger_row(**{name: row[name] for name in COLUMNS if name in row}) for row in stored]


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def add_missing_columns(engine: Engine) -> list[str]:
    """Bring a ledger written by an older Frugal up to this schema: columns added since are added (each
    nullable or with a default, so old rows stay valid). Returns what was added."""
    added = []
    inspector = inspect(engine)
    for table in metadata.sorted_tables:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            kind = column.type.compile(dialect=engine.dialect)
            default = f" DEFAULT {column.server_default.arg!r}".replace('"', "'") if column.server_default else ""
            not_null = " NOT NULL" if not column.nullable and default else ""
            statement = f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}{default}{not_null}'
            with engine.begin() as connection:
                connection.execute(text(statement))
            added.append(f"{table.name}.{column.name}")
    if added:
        log.warning("ledger schema brought up to date: added %s", ", ".join(added))
    return added


def ledger_row(**fields: Any) -> dict[str, Any]:
    """A complete row: every column present, timestamps in UTC."""
    row = dict.fromkeys(COLUMNS)
    row.update(fields)
    if row["created_at"] is None:
        row["created_at"] = datetime.now(UTC)
    if row["purpose"] is None:
        row["purpose"] = "client"
    return row
