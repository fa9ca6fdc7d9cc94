"""SqliteStore: the Store port on the standard library's sqlite3, with group commit.

Theory of operation
-------------------
`append` (the publish hot path, owner's thread) only puts the record on a deque (no lock) and,
for an enqueue, keeps the message in `_unflushed` so `load_messages` can read it before it is on
disk. One writer thread loops: take everything pending (records, `when_durable`
callbacks, `flush` waiters), apply the records in ONE transaction, COMMIT (WAL mode with
synchronous=FULL: one fsync per commit), then hand the batch's callbacks to `schedule` (one
scheduled call runs them all, in registration order) and release the flush waiters. Records
appended during a commit wait for the next one: that is the group commit, and the batch grows by
itself when the disk (or the GIL) is the bottleneck. A `when_durable` with nothing pending or in
flight is scheduled at once: everything before it is already durable.

Within a batch the writer:
- elides a message enqueued and removed from all its queues in the same batch (a fast consumer
  acked it before it reached the disk): neither INSERT nor DELETE is written, yet the callbacks
  still fire in order, because durability is a property of the batch, not of the row;
- coalesces retained messages and sessions by key (last write wins);
- writes each kind of row with multi-row statements (see `_MultiRow`: few sqlite3 calls per
  batch, because every call gives up the GIL), keeping record order where it matters: pending
  message writes go out before a QueueDeleted/QueuePurged, and topology records apply in order.

A body is stored once in `messages` and referenced per queue from `queue_messages`; a removal
deletes the body when no reference is left. A meta row keeps the high-water mark of message ids
so that ids are never reused, even after every message was acknowledged. `open()` drops what
must not survive a restart: paged-out transient messages (`durable = 0`) and references held by
queues that are not declared durable. A `<database>.lock` file (flock) keeps a second process
from opening the same store. `snapshot()` reads the same tables through a second, read-only
connection in one read transaction, which WAL keeps at its starting point while the writer goes on.

Any error in the writer is logged and makes the store refuse further use (`append`, `flush`,
`when_durable` raise StoreError): callbacks of unwritten records never fire, so no publisher is
confirmed for data that is not on disk.

Must not import: asyncio, protocols, cluster, broker.core (only broker.message, broker.journal).
"""

from __future__ import annotations

import enum
import fcntl
import logging
import os
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Final

from broker.journal import (
    BindingAdded,
    BindingRemoved,
    ExchangeDeclared,
    ExchangeDeleted,
    MessageEnqueued,
    MessageRemoved,
    QueueDeclared,
    QueueDeleted,
    QueuePurged,
    Record,
    Recovered,
    RetainedCleared,
    RetainedSet,
    Schedule,
    SessionDeleted,
    SessionSaved,
    Snapshot,
    Store,
    StoreError,
)
from broker.message import Message
from storage.serial import (
    SerialError,
    decode_properties,
    decode_table,
    encode_properties,
    encode_table,
)

logger = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 1
SYNCHRONOUS_MODES: Final = ("OFF", "NORMAL", "FULL", "EXTRA")

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
    """CREATE TABLE IF NOT EXISTS exchanges (
        vhost TEXT NOT NULL, name TEXT NOT NULL, type TEXT NOT NULL,
        auto_delete INTEGER NOT NULL, internal INTEGER NOT NULL, arguments BLOB NOT NULL,
        PRIMARY KEY (vhost, name))""",
    """CREATE TABLE IF NOT EXISTS queues (
        vhost TEXT NOT NULL, name TEXT NOT NULL, auto_delete INTEGER NOT NULL, arguments BLOB NOT NULL,
        PRIMARY KEY (vhost, name))""",
    # Arguments are part of a binding's identity (headers exchange): stored as canonical bytes.
    """CREATE TABLE IF NOT EXISTS bindings (
        vhost TEXT NOT NULL, source TEXT NOT NULL, destination TEXT NOT NULL,
        destination_is_exchange INTEGER NOT NULL, routing_key TEXT NOT NULL, arguments BLOB NOT NULL,
        UNIQUE (vhost, source, destination, destination_is_exchange, routing_key, arguments))""",
    """CREATE TABLE IF NOT EXISTS messages (
        id INTEGER PRIMARY KEY, exchange TEXT NOT NULL, routing_key TEXT NOT NULL,
        properties BLOB NOT NULL, body BLOB NOT NULL, expires_at REAL,
        retain INTEGER NOT NULL, durable INTEGER NOT NULL)""",
    # Lets open() find paged transient messages without reading every body.
    "CREATE INDEX IF NOT EXISTS messages_transient ON messages (id) WHERE durable = 0",
    # Primary key order is recovery order: per queue, by id (= enqueue order).
    """CREATE TABLE IF NOT EXISTS queue_messages (
        vhost TEXT NOT NULL, queue TEXT NOT NULL, msg_id INTEGER NOT NULL,
        PRIMARY KEY (vhost, queue, msg_id)) WITHOUT ROWID""",
    # Answers "does any queue still hold this body?" on removal.
    "CREATE INDEX IF NOT EXISTS queue_messages_by_id ON queue_messages (msg_id)",
    """CREATE TABLE IF NOT EXISTS retained (
        vhost TEXT NOT NULL, topic TEXT NOT NULL, msg_id INTEGER NOT NULL,
        exchange TEXT NOT NULL, routing_key TEXT NOT NULL, properties BLOB NOT NULL, body BLOB NOT NULL,
        expires_at REAL, retain INTEGER NOT NULL,
        PRIMARY KEY (vhost, topic))""",
    """CREATE TABLE IF NOT EXISTS sessions (
        vhost TEXT NOT NULL, client_id TEXT NOT NULL, state BLOB NOT NULL,
        PRIMARY KEY (vhost, client_id))""",
)

#: Most rows one multi-row statement carries (see _MultiRow).
_MAX_ROWS_PER_STATEMENT: Final = 1024

# A message stored again (a transient queue pages out its copy of a persistent message) keeps
# its first row, but becomes durable if either enqueue was.
_INSERT_MESSAGES: Final = (
    "INSERT INTO messages (id, exchange, routing_key, properties, body, expires_at, retain, durable)"
    " VALUES {rows} ON CONFLICT (id) DO UPDATE SET durable = max(durable, excluded.durable)"
)
# The common case (durable, no expiry, not retained) binds five values instead of eight: binding
# is the writer's main cost under the GIL, and a bool binds through sqlite3's slow adapter path.
_INSERT_PLAIN_MESSAGES: Final = (
    "INSERT INTO messages (id, exchange, routing_key, properties, body, expires_at, retain, durable)"
    " VALUES {rows} ON CONFLICT (id) DO UPDATE SET durable = 1"
)
_INSERT_REFS: Final = "INSERT OR IGNORE INTO queue_messages (vhost, queue, msg_id) VALUES {rows}"
# Row values as a CTE, not `(vhost, queue, msg_id) IN (VALUES ...)`: SQLite plans the latter as a
# full scan; this form searches the msg_id index for each removed row.
_DELETE_REFS: Final = (
    "WITH removed (vhost, queue, msg_id) AS (VALUES {rows})"
    " DELETE FROM queue_messages WHERE msg_id IN (SELECT msg_id FROM removed)"
    " AND (vhost, queue, msg_id) IN (SELECT vhost, queue, msg_id FROM removed)"
)
# Run after _DELETE_REFS with the removed ids: a body goes with its last reference.
_DELETE_UNREFERENCED: Final = (
    "DELETE FROM messages WHERE id IN ({rows})"
    " AND NOT EXISTS (SELECT 1 FROM queue_messages WHERE msg_id = messages.id)"
)
_UPSERT_RETAINED: Final = (
    "INSERT OR REPLACE INTO retained"
    " (vhost, topic, msg_id, exchange, routing_key, properties, body, expires_at, retain) VALUES {rows}"
)
_DELETE_RETAINED: Final = (
    "WITH gone (vhost, topic) AS (VALUES {rows})"
    " DELETE FROM retained WHERE (vhost, topic) IN (SELECT vhost, topic FROM gone)"
)
_UPSERT_SESSIONS: Final = "INSERT OR REPLACE INTO sessions (vhost, client_id, state) VALUES {rows}"
_DELETE_SESSIONS: Final = (
    "WITH gone (vhost, client_id) AS (VALUES {rows})"
    " DELETE FROM sessions WHERE (vhost, client_id) IN (SELECT vhost, client_id FROM gone)"
)
# A purged queue's bodies that no other queue holds, then the queue's references.
_DELETE_QUEUE_BODIES: Final = (
    "DELETE FROM messages WHERE id IN (SELECT msg_id FROM queue_messages WHERE vhost = ?1 AND queue = ?2)"
    " AND NOT EXISTS (SELECT 1 FROM queue_messages AS q"
    " WHERE q.msg_id = messages.id AND NOT (q.vhost = ?1 AND q.queue = ?2))"
)
_DELETE_QUEUE_REFS: Final = "DELETE FROM queue_messages WHERE vhost = ? AND queue = ?"
_SELECT_MESSAGES: Final = (
    "SELECT id, exchange, routing_key, properties, body, expires_at, retain FROM messages WHERE id IN ({})"
)
# What recovery and snapshots read, in the order `open()` returns it (rowid: a redeclaration is a
# replaced row, so it moves to the end, as it does in the memory backend).
_SELECT_EXCHANGES: Final = (
    "SELECT vhost, name, type, auto_delete, internal, arguments FROM exchanges ORDER BY rowid"
)
_SELECT_QUEUES: Final = "SELECT vhost, name, auto_delete, arguments FROM queues ORDER BY rowid"
_SELECT_BINDINGS: Final = (
    "SELECT vhost, source, destination, destination_is_exchange, routing_key, arguments"
    " FROM bindings ORDER BY rowid"
)
_SELECT_RETAINED: Final = (
    "SELECT vhost, topic, msg_id, exchange, routing_key, properties, body, expires_at, retain"
    " FROM retained ORDER BY rowid"
)
_SELECT_SESSIONS: Final = "SELECT vhost, client_id, state FROM sessions ORDER BY rowid"
_SELECT_NEXT_MSG_ID: Final = (
    "SELECT max((SELECT value FROM meta WHERE key = 'next_msg_id'),"
    " (SELECT coalesce(max(id), 0) + 1 FROM messages),"
    " (SELECT coalesce(max(msg_id), 0) + 1 FROM retained), 1)"
)
# A snapshot holds what open() would recover: durable messages held by declared queues, each with
# the queues that hold it, by id (= enqueue order).
_SELECT_SNAPSHOT_MESSAGES: Final = (
    "SELECT q.vhost, q.queue, m.id, m.exchange, m.routing_key, m.properties, m.body, m.expires_at, m.retain"
    " FROM messages AS m JOIN queue_messages AS q ON q.msg_id = m.id"
    " JOIN queues AS d ON d.vhost = q.vhost AND d.name = q.queue"
    " WHERE m.durable = 1 ORDER BY m.id, q.vhost, q.queue"
)
#: Seconds between flush()'s checks that the writer has not failed meanwhile.
_FLUSH_RECHECK: Final = 1.0
#: Ids per SELECT in load_messages (SQLite's historic bound on host parameters is 999).
_LOAD_CHUNK: Final = 500


class _MultiRow:
    """One statement applied to many rows in a few sqlite3 calls.

    Why not executemany: sqlite3 releases the GIL around every step, i.e. once per row, and
    getting it back from a busy event-loop thread can take a whole switch interval (5 ms). With
    one row per step the writer crawls exactly when the broker is loaded; with up to
    _MAX_ROWS_PER_STATEMENT rows per statement it makes a handful of calls per batch.

    `template` has a `{rows}` slot that receives `group` (`(?, ...)` by default) per row. Statements exist only for
    power-of-two row counts, so they stay in sqlite3's statement cache; a short tail is padded
    by repeating its last row, which every statement here treats as a no-op (INSERT OR IGNORE/
    REPLACE/upsert of an identical row, DELETE of a key already named).
    """

    __slots__ = ("_width", "_max_rows", "_sql")

    def __init__(self, template: str, width: int, max_params: int, group: str = "") -> None:
        self._width = width
        max_rows = min(_MAX_ROWS_PER_STATEMENT, max_params // width)
        self._max_rows = 1 << (max_rows.bit_length() - 1)
        group = group or "(" + ", ".join("?" * width) + ")"
        self._sql = tuple(
            template.format(rows=", ".join([group] * (1 << exp)))
            for exp in range(self._max_rows.bit_length())
        )

    def run(self, conn: sqlite3.Connection, params: list[Any]) -> None:
        """`params` holds the rows' values back to back (width values per row)."""
        width = self._width
        rows = len(params) // width
        max_rows = self._max_rows
        step = max_rows * width
        off = 0
        while rows > max_rows:
            conn.execute(self._sql[-1], params[off : off + step])
            off += step
            rows -= max_rows
        if rows:
            size = 1 << (rows - 1).bit_length()
            tail = params[off:] if off else params
            if size > rows:
                tail = tail + tail[-width:] * (size - rows)
            conn.execute(self._sql[size.bit_length() - 1], tail)


class _Statements:
    """The writer's multi-row statements, sized for the connection's host-parameter limit."""

    __slots__ = (
        "insert_messages",
        "insert_plain_messages",
        "insert_refs",
        "delete_refs",
        "delete_unreferenced",
        "upsert_retained",
        "delete_retained",
        "upsert_sessions",
        "delete_sessions",
    )

    def __init__(self, conn: sqlite3.Connection) -> None:
        limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        self.insert_messages = _MultiRow(_INSERT_MESSAGES, 8, limit)
        self.insert_plain_messages = _MultiRow(
            _INSERT_PLAIN_MESSAGES, 5, limit, "(?, ?, ?, ?, ?, NULL, 0, 1)"
        )
        self.insert_refs = _MultiRow(_INSERT_REFS, 3, limit)
        self.delete_refs = _MultiRow(_DELETE_REFS, 3, limit)
        self.delete_unreferenced = _MultiRow(_DELETE_UNREFERENCED, 1, limit, "?")
        self.upsert_retained = _MultiRow(_UPSERT_RETAINED, 9, limit)
        self.delete_retained = _MultiRow(_DELETE_RETAINED, 2, limit)
        self.upsert_sessions = _MultiRow(_UPSERT_SESSIONS, 3, limit)
        self.delete_sessions = _MultiRow(_DELETE_SESSIONS, 2, limit)


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    FAILED = "failed"
    CLOSED = "closed"


def _run_callbacks(callbacks: list[Callable[[], None]]) -> None:
    """Runs on the owner's thread: one batch's `when_durable` callbacks, in order."""
    for callback in callbacks:
        try:
            callback()
        except Exception:
            logger.exception("when_durable callback %r failed", callback)


def _message_from_row(row: tuple[Any, ...]) -> Message:
    msg_id, exchange, routing_key, properties, body, expires_at, retain = row
    return Message(
        exchange, routing_key, body, decode_properties(properties), msg_id, expires_at, bool(retain)
    )


def _exchanges(conn: sqlite3.Connection) -> Iterator[ExchangeDeclared]:
    for vhost, name, type_, auto_delete, internal, arguments in conn.execute(_SELECT_EXCHANGES):
        yield ExchangeDeclared(vhost, name, type_, bool(auto_delete), bool(internal), decode_table(arguments))


def _queues(conn: sqlite3.Connection) -> Iterator[QueueDeclared]:
    for vhost, name, auto_delete, arguments in conn.execute(_SELECT_QUEUES):
        yield QueueDeclared(vhost, name, bool(auto_delete), decode_table(arguments))


def _bindings(conn: sqlite3.Connection) -> Iterator[BindingAdded]:
    for vhost, source, destination, to_exchange, routing_key, arguments in conn.execute(_SELECT_BINDINGS):
        yield BindingAdded(
            vhost, source, destination, bool(to_exchange), routing_key, decode_table(arguments)
        )


def _retained(conn: sqlite3.Connection) -> Iterator[RetainedSet]:
    for vhost, topic, *row in conn.execute(_SELECT_RETAINED):
        yield RetainedSet(vhost, topic, _message_from_row(row))


def _sessions(conn: sqlite3.Connection) -> Iterator[SessionSaved]:
    for vhost, client_id, state in conn.execute(_SELECT_SESSIONS):
        yield SessionSaved(vhost, client_id, state)


def _snapshot_messages(conn: sqlite3.Connection) -> Iterator[MessageEnqueued]:
    """One MessageEnqueued per message and vhost, naming every queue of the vhost that holds it."""
    message: Message | None = None
    vhost_of = ""
    held_by: list[str] = []
    for vhost, queue, *row in conn.execute(_SELECT_SNAPSHOT_MESSAGES):
        if message is None or message.msg_id != row[0] or vhost != vhost_of:
            if message is not None:
                yield MessageEnqueued(vhost_of, tuple(held_by), message)
            if message is None or message.msg_id != row[0]:
                message = _message_from_row(row)
            vhost_of = vhost
            held_by = []
        held_by.append(queue)
    if message is not None:
        yield MessageEnqueued(vhost_of, tuple(held_by), message)


class SqliteStore(Store):
    """A Store in one SQLite database file (WAL mode), written by one group-committing thread.

    `synchronous` is SQLite's PRAGMA synchronous: FULL (the default) fsyncs the WAL on every
    commit, which is what "confirmed = on disk" (README, Guarantees) needs; NORMAL and OFF exist for
    benchmarks and tests that measure something else.
    """

    def __init__(self, path: Path, schedule: Schedule, synchronous: str = "FULL") -> None:
        if synchronous.upper() not in SYNCHRONOUS_MODES:
            raise ValueError(
                f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, not {synchronous!r}"
            )
        self._path = Path(path)
        self._schedule = schedule
        self._synchronous = synchronous.upper()
        self._state = _State.NEW
        self._accepting = False  # append/when_durable/flush allowed (OPEN and the writer healthy)
        self._failure = ""  # why they are refused once FAILED or CLOSED
        self._stopping = False
        # What the next batch takes (appended by the owner, popped by the writer only).
        self._records: deque[Record] = deque()
        self._callbacks: deque[Callable[[], None]] = deque()
        self._waiters: deque[threading.Event] = deque()
        self._work = threading.Event()  # set when any of the three deques may hold something
        # True from the writer's first take until the batch's callbacks are scheduled.
        self._busy = False
        # pending_bytes = appended - committed (each counter written by one thread).
        self._appended_bytes = 0
        self._committed_bytes = 0
        # Enqueued messages not yet committed (added by append, popped by the writer after the
        # commit; single dict operations are atomic, so load_messages reads it unlocked).
        self._unflushed: dict[int, Message] = {}
        self._next_msg_id = 1  # writer's high-water mark, persisted in meta
        self._writer: threading.Thread | None = None
        self._write_conn: sqlite3.Connection | None = None
        self._read_conn: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        self._lock_fd = -1
        self._sql: _Statements

    # --- opening and recovery --------------------------------------------------------------------

    def open(self) -> Recovered:
        if self._state is not _State.NEW:
            raise StoreError(f"{self._path}: open() called on a {self._state.value} store")
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._take_lock_file()
            self._write_conn = self._connect()
            self._write_conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            self._write_conn.execute("PRAGMA cache_size = -16384")  # 16 MiB
            self._migrate(self._write_conn)
            self._sql = _Statements(self._write_conn)
            recovered = self._recover(self._write_conn)
            self._read_conn = self._connect()
            self._read_conn.execute("PRAGMA query_only = ON")
        except (sqlite3.Error, OSError, SerialError) as exc:
            self._release()
            raise StoreError(f"cannot open store {self._path}: {exc}") from exc
        self._next_msg_id = recovered.next_msg_id
        self._state = _State.OPEN
        self._accepting = True
        self._writer = threading.Thread(target=self._run, name=f"store-writer:{self._path.name}", daemon=True)
        self._writer.start()
        return recovered

    def _take_lock_file(self) -> None:
        # Two brokers on one data directory would reuse message ids and undo each other's
        # removals: the second one is refused. The kernel drops the lock when the process dies.
        fd = os.open(f"{self._path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OSError(f"in use by another store ({self._path}.lock is locked)") from None
        self._lock_fd = fd

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: autocommit, the writer issues BEGIN/COMMIT itself.
        # check_same_thread=False: opened here, used by the writer thread (and by load_messages).
        conn = sqlite3.connect(
            self._path, isolation_level=None, check_same_thread=False, cached_statements=256
        )
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            conn.close()
            raise sqlite3.OperationalError(f"cannot use WAL journal mode (got {mode!r})")
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                conn.execute(statement)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
                conn.execute("INSERT INTO meta (key, value) VALUES ('next_msg_id', 1)")
            elif row[0] != SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"schema version {row[0]} is not supported (this broker reads version {SCHEMA_VERSION})"
                )
            # Paged-out transient messages do not survive a restart, nor do references held by
            # queues that are not durable (a transient queue's paged copy of a persistent message).
            conn.execute(
                "DELETE FROM queue_messages WHERE msg_id IN (SELECT id FROM messages WHERE durable = 0)"
            )
            conn.execute("DELETE FROM messages WHERE durable = 0")
            conn.execute(
                "CREATE TEMP TABLE undeclared AS SELECT msg_id FROM queue_messages"
                " WHERE (vhost, queue) NOT IN (SELECT vhost, name FROM queues)"
            )
            conn.execute(
                "DELETE FROM queue_messages WHERE (vhost, queue) NOT IN (SELECT vhost, name FROM queues)"
            )
            conn.execute(
                "DELETE FROM messages WHERE id IN (SELECT msg_id FROM temp.undeclared)"
                " AND NOT EXISTS (SELECT 1 FROM queue_messages WHERE msg_id = messages.id)"
            )
            conn.execute("DROP TABLE temp.undeclared")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _recover(self, conn: sqlite3.Connection) -> Recovered:
        recovered = Recovered()
        recovered.exchanges = list(_exchanges(conn))
        recovered.queues = list(_queues(conn))
        recovered.bindings = list(_bindings(conn))
        queue_messages: dict[tuple[str, str], list[int]] = {}
        ids: list[int] = []
        current: tuple[str, str] | None = None
        for vhost, queue, msg_id in conn.execute(
            "SELECT vhost, queue, msg_id FROM queue_messages ORDER BY vhost, queue, msg_id"
        ):
            if current is None or current[0] != vhost or current[1] != queue:
                current = (vhost, queue)
                ids = queue_messages[current] = []
            ids.append(msg_id)
        recovered.queue_messages = queue_messages
        recovered.retained = list(_retained(conn))
        recovered.sessions = list(_sessions(conn))
        (recovered.next_msg_id,) = conn.execute(_SELECT_NEXT_MSG_ID).fetchone()
        return recovered

    # --- the owner's side --------------------------------------------------------------------------
    # No lock on this path (it runs once per published message): records, callbacks and flush
    # waiters go into deques, whose append and popleft are atomic. Only the writer pops.

    def append(self, record: Record) -> None:
        if not self._accepting:
            raise StoreError(self._refused())
        if type(record) is MessageEnqueued:
            message = record.message
            # Before the record is visible to the writer, which pops it once committed.
            self._unflushed[message.msg_id] = message
            self._appended_bytes += len(message.body)
        elif type(record) is RetainedSet:
            self._appended_bytes += len(record.message.body)
        self._records.append(record)
        if not self._work.is_set():
            self._work.set()

    def when_durable(self, callback: Callable[[], None]) -> None:
        if not self._accepting:
            raise StoreError(self._refused())
        if self._idle():
            # Everything appended so far is durable and every earlier callback was scheduled.
            self._schedule(callback)
            return
        self._callbacks.append(callback)
        if not self._work.is_set():
            self._work.set()

    def _idle(self) -> bool:
        """Nothing pending and no batch in flight. The order of the checks matters: a record seen
        taken from the deque was taken by a batch that is either still busy or done."""
        return not self._records and not self._callbacks and not self._busy

    def load_messages(self, msg_ids: Sequence[int]) -> list[Message]:
        unflushed = self._unflushed
        found: dict[int, Message] = {}
        missing: list[int] = []
        for msg_id in msg_ids:
            message = unflushed.get(msg_id)
            if message is None:
                missing.append(msg_id)
            else:
                found[msg_id] = message
        if missing:
            if self._read_conn is None:
                raise StoreError(self._refused())
            try:
                with self._read_lock:
                    for start in range(0, len(missing), _LOAD_CHUNK):
                        chunk = missing[start : start + _LOAD_CHUNK]
                        sql = _SELECT_MESSAGES.format(",".join("?" * len(chunk)))
                        for row in self._read_conn.execute(sql, chunk):
                            found[row[0]] = _message_from_row(row)
            except (sqlite3.Error, SerialError) as exc:
                raise StoreError(f"{self._path}: cannot read messages: {exc}") from exc
        return [found[msg_id] for msg_id in msg_ids if msg_id in found]

    def snapshot(self) -> Snapshot:
        # flush() makes everything appended durable, and the read transaction begun right after
        # sees exactly that and keeps that view while the writer goes on (WAL readers do), so the
        # snapshot sits at this call however late its rows are read (from a worker thread).
        self.flush()
        try:
            conn = sqlite3.connect(
                f"{self._path.resolve().as_uri()}?mode=ro",
                uri=True,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read {self._path} for a snapshot: {exc}") from exc
        try:
            conn.execute("BEGIN")
            (next_msg_id,) = conn.execute(_SELECT_NEXT_MSG_ID).fetchone()
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"cannot read {self._path} for a snapshot: {exc}") from exc
        return Snapshot(self._snapshot_records(conn), next_msg_id, blocking=True, close=conn.close)

    def _snapshot_records(self, conn: sqlite3.Connection) -> Iterator[Record]:
        try:
            yield from _exchanges(conn)
            yield from _queues(conn)
            yield from _bindings(conn)
            yield from _snapshot_messages(conn)
            yield from _retained(conn)
            yield from _sessions(conn)
        except (sqlite3.Error, SerialError) as exc:
            raise StoreError(f"cannot read {self._path} for a snapshot: {exc}") from exc

    @property
    def pending_bytes(self) -> int:
        # Each counter has one writing thread when appends come from one thread (the event loop);
        # appends racing from several threads can lose an increment, hence "approximate".
        return max(0, self._appended_bytes - self._committed_bytes)

    def flush(self) -> None:
        if not self._accepting:
            raise StoreError(self._refused())
        if self._idle():
            return
        done = threading.Event()
        self._waiters.append(done)
        self._work.set()
        # The writer sets `done` after the batch that holds everything appended so far, or when it
        # fails; re-checking covers a failure that raced with adding `done`.
        while not done.wait(_FLUSH_RECHECK):
            if self._failure:
                break
        if self._failure:
            raise StoreError(self._failure)

    def close(self) -> None:
        if self._state is _State.CLOSED:
            return
        failure = ""
        if self._state is _State.OPEN:
            try:
                self.flush()
            except StoreError as exc:
                failure = str(exc)
        elif self._state is _State.FAILED:
            failure = self._failure
        self._accepting = False
        self._failure = self._failure or f"{self._path}: store is closed"
        self._state = _State.CLOSED
        self._stopping = True
        self._work.set()
        if self._writer is not None:
            self._writer.join()
        self._release()
        if failure:
            raise StoreError(failure)

    def _refused(self) -> str:
        return self._failure or f"{self._path}: store is {self._state.value}"

    def _release(self) -> None:
        for conn in (self._write_conn, self._read_conn):
            if conn is not None:
                conn.close()
        self._write_conn = self._read_conn = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    # --- the writer thread -------------------------------------------------------------------------

    def _run(self) -> None:
        conn = self._write_conn
        assert conn is not None
        records, callbacks, waiters, work = self._records, self._callbacks, self._waiters, self._work
        while True:
            work.wait()
            # Cleared before taking: anything added after the takes below sets it again.
            work.clear()
            if self._stopping:
                return  # close() flushed first
            self._busy = True
            # Callbacks before records: a callback was registered after the records it waits for
            # were appended, so all of them are in `records` now and go into this batch.
            batch_callbacks = [callbacks.popleft() for _ in range(len(callbacks))]
            batch_waiters = [waiters.popleft() for _ in range(len(waiters))]
            batch = [records.popleft() for _ in range(len(records))]
            if batch:
                try:
                    written = self._commit(conn, batch)
                except BaseException as exc:
                    self._fail(exc, batch_waiters)
                    return
                unflushed = self._unflushed
                for record in batch:
                    if type(record) is MessageEnqueued:
                        unflushed.pop(record.message.msg_id, None)
                self._committed_bytes += written
            if batch_callbacks:
                try:
                    self._schedule(
                        batch_callbacks[0]
                        if len(batch_callbacks) == 1
                        else partial(_run_callbacks, batch_callbacks)
                    )
                except Exception:
                    # The owner's loop is gone (shutdown): nobody is left to confirm to.
                    logger.exception("%s: cannot schedule when_durable callbacks", self._path)
            for done in batch_waiters:
                done.set()
            self._busy = False

    def _fail(self, exc: BaseException, batch_waiters: list[threading.Event]) -> None:
        logger.error("%s: store write failed, refusing further writes", self._path, exc_info=exc)
        try:
            assert self._write_conn is not None
            if self._write_conn.in_transaction:
                self._write_conn.execute("ROLLBACK")
        except sqlite3.Error:
            logger.exception("%s: rollback after a failed write failed too", self._path)
        self._failure = f"{self._path}: store write failed: {type(exc).__name__}: {exc}"
        self._accepting = False
        self._state = _State.FAILED
        for done in batch_waiters:
            done.set()
        while self._waiters:
            self._waiters.popleft().set()

    def _commit(self, conn: sqlite3.Connection, batch: list[Record]) -> int:
        """Apply `batch` in one transaction and commit; returns the body bytes it carried."""
        written = 0
        high_water = self._next_msg_id
        # Enqueues of this segment by id, the queues still holding those partly removed already,
        # and the removals not matched in this segment ((vhost, queue, msg_id) back to back).
        enqueued: dict[int, MessageEnqueued] = {}
        remaining: dict[int, list[str]] = {}
        removals: list[Any] = []
        retained: dict[tuple[str, str], RetainedSet | None] = {}
        sessions: dict[tuple[str, str], bytes | None] = {}
        conn.execute("BEGIN")
        for record in batch:
            if isinstance(record, MessageEnqueued):
                message = record.message
                msg_id = message.msg_id
                written += len(message.body)
                if msg_id >= high_water:
                    high_water = msg_id + 1
                if record.queues:
                    if msg_id in enqueued:
                        # Stored twice in one segment (see _INSERT_MESSAGES): rows keep one record
                        # per id, so the first goes out on its own.
                        self._write_messages(enqueued, remaining, removals)
                        enqueued = {}
                        remaining = {}
                        removals = []
                    enqueued[msg_id] = record
            elif isinstance(record, MessageRemoved):
                msg_id = record.msg_id
                held = enqueued.get(msg_id)
                queues = (
                    None if held is None or held.vhost != record.vhost else remaining.get(msg_id, held.queues)
                )
                if queues is not None and record.queue in queues:
                    # Enqueued in this very segment: the reference never needs to reach the disk.
                    if len(queues) == 1:
                        del enqueued[msg_id]
                        remaining.pop(msg_id, None)
                    else:
                        remaining[msg_id] = [q for q in queues if q != record.queue]
                else:
                    removals += (record.vhost, record.queue, msg_id)
            elif isinstance(record, RetainedSet):
                written += len(record.message.body)
                if record.message.msg_id >= high_water:
                    high_water = record.message.msg_id + 1
                retained.pop((record.vhost, record.topic), None)
                retained[(record.vhost, record.topic)] = record
            elif isinstance(record, RetainedCleared):
                retained.pop((record.vhost, record.topic), None)
                retained[(record.vhost, record.topic)] = None
            elif isinstance(record, SessionSaved):
                sessions.pop((record.vhost, record.client_id), None)
                sessions[(record.vhost, record.client_id)] = record.state
            elif isinstance(record, SessionDeleted):
                sessions.pop((record.vhost, record.client_id), None)
                sessions[(record.vhost, record.client_id)] = None
            else:
                if isinstance(record, (QueueDeleted, QueuePurged)) and (enqueued or removals):
                    # The purge must see every enqueue before it and none after it.
                    self._write_messages(enqueued, remaining, removals)
                    enqueued = {}
                    remaining = {}
                    removals = []
                self._apply_topology(conn, record)
        if enqueued or removals:
            self._write_messages(enqueued, remaining, removals)
        if retained:
            self._write_retained(retained)
        if sessions:
            saved: list[Any] = []
            deleted: list[Any] = []
            for (vhost, client_id), state in sessions.items():
                if state is None:
                    deleted += (vhost, client_id)
                else:
                    saved += (vhost, client_id, state)
            if saved:
                self._sql.upsert_sessions.run(conn, saved)
            if deleted:
                self._sql.delete_sessions.run(conn, deleted)
        if high_water != self._next_msg_id:
            conn.execute("UPDATE meta SET value = ? WHERE key = 'next_msg_id'", (high_water,))
        conn.execute("COMMIT")
        self._next_msg_id = high_water
        return written

    def _write_messages(
        self, enqueued: dict[int, MessageEnqueued], remaining: dict[int, list[str]], removals: list[Any]
    ) -> None:
        conn = self._write_conn
        assert conn is not None
        if enqueued:
            plain: list[Any] = []
            rows: list[Any] = []
            refs: list[Any] = []
            for msg_id, record in enqueued.items():
                message = record.message
                if record.durable and message.expires_at is None and not message.retain:
                    plain += (
                        msg_id,
                        message.exchange,
                        message.routing_key,
                        encode_properties(message.properties),
                        message.body,
                    )
                else:
                    rows += (
                        msg_id,
                        message.exchange,
                        message.routing_key,
                        encode_properties(message.properties),
                        message.body,
                        message.expires_at,
                        1 if message.retain else 0,
                        1 if record.durable else 0,
                    )
                vhost = record.vhost
                for queue in remaining.get(msg_id, record.queues) if remaining else record.queues:
                    refs += (vhost, queue, msg_id)
            if plain:
                self._sql.insert_plain_messages.run(conn, plain)
            if rows:
                self._sql.insert_messages.run(conn, rows)
            self._sql.insert_refs.run(conn, refs)
        if removals:
            self._sql.delete_refs.run(conn, removals)
            self._sql.delete_unreferenced.run(conn, removals[2::3])

    def _write_retained(self, retained: dict[tuple[str, str], RetainedSet | None]) -> None:
        conn = self._write_conn
        assert conn is not None
        rows: list[Any] = []
        cleared: list[Any] = []
        for (vhost, topic), record in retained.items():
            if record is None:
                cleared += (vhost, topic)
                continue
            message = record.message
            rows += (
                vhost,
                topic,
                message.msg_id,
                message.exchange,
                message.routing_key,
                encode_properties(message.properties),
                message.body,
                message.expires_at,
                1 if message.retain else 0,
            )
        if rows:
            self._sql.upsert_retained.run(conn, rows)
        if cleared:
            self._sql.delete_retained.run(conn, cleared)

    @staticmethod
    def _drop_queue_messages(conn: sqlite3.Connection, vhost: str, queue: str) -> None:
        conn.execute(_DELETE_QUEUE_BODIES, (vhost, queue))
        conn.execute(_DELETE_QUEUE_REFS, (vhost, queue))

    def _apply_topology(self, conn: sqlite3.Connection, record: Record) -> None:
        if isinstance(record, ExchangeDeclared):
            conn.execute(
                "INSERT OR REPLACE INTO exchanges (vhost, name, type, auto_delete, internal, arguments)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    record.vhost,
                    record.name,
                    record.type,
                    record.auto_delete,
                    record.internal,
                    encode_table(record.arguments),
                ),
            )
        elif isinstance(record, ExchangeDeleted):
            conn.execute("DELETE FROM exchanges WHERE vhost = ? AND name = ?", (record.vhost, record.name))
            # An exchange takes its bindings with it, as source and as destination.
            conn.execute(
                "DELETE FROM bindings WHERE vhost = ?1 AND (source = ?2 OR (destination = ?2 AND destination_is_exchange))",
                (record.vhost, record.name),
            )
        elif isinstance(record, QueueDeclared):
            conn.execute(
                "INSERT OR REPLACE INTO queues (vhost, name, auto_delete, arguments) VALUES (?, ?, ?, ?)",
                (record.vhost, record.name, record.auto_delete, encode_table(record.arguments)),
            )
        elif isinstance(record, QueueDeleted):
            conn.execute("DELETE FROM queues WHERE vhost = ? AND name = ?", (record.vhost, record.name))
            conn.execute(
                "DELETE FROM bindings WHERE vhost = ? AND destination = ? AND NOT destination_is_exchange",
                (record.vhost, record.name),
            )
            self._drop_queue_messages(conn, record.vhost, record.name)
        elif isinstance(record, QueuePurged):
            self._drop_queue_messages(conn, record.vhost, record.name)
        elif isinstance(record, BindingAdded):
            conn.execute(
                "INSERT OR IGNORE INTO bindings"
                " (vhost, source, destination, destination_is_exchange, routing_key, arguments)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                self._binding_row(record),
            )
        elif isinstance(record, BindingRemoved):
            conn.execute(
                "DELETE FROM bindings WHERE vhost = ? AND source = ? AND destination = ?"
                " AND destination_is_exchange = ? AND routing_key = ? AND arguments = ?",
                self._binding_row(record),
            )
        else:
            raise StoreError(f"{self._path}: not a record: {record!r}")

    @staticmethod
    def _binding_row(record: BindingAdded | BindingRemoved) -> tuple[Any, ...]:
        return (
            record.vhost,
            record.source,
            record.destination,
            record.destination_is_exchange,
            record.routing_key,
            encode_table(record.arguments, canonical=True),
        )
