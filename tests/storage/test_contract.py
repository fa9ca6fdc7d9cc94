"""The Store contract (broker/journal.py), one test body run against every backend.

As in nats-server's store tests, each test takes a `harness` parametrized over the backends.
`harness.restart()` is "the broker stops and starts again": the SQLite store is closed and
reopened on the same file; the memory store cannot survive a restart, so it returns the
`recoverable()` state a persistent backend would recover at that point, which compares the two
backends' semantics record for record.

Callbacks are scheduled onto a queue and run on the test thread (`harness.run_callbacks`),
as the composition root runs them on the event loop.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

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
    SessionDeleted,
    SessionSaved,
    Store,
    StoreError,
)
from broker.message import Message, Properties
from storage.memory import MemoryStore
from storage.sqlite import SqliteStore

CALLBACK_TIMEOUT = 10.0
PERSISTENT = Properties(delivery_mode=2)


class Harness:
    """A store of one backend, its scheduled callbacks, and a way to restart it."""

    def __init__(self, kind: str, directory: Path) -> None:
        self.kind = kind
        self._path = directory / "store.sqlite3"
        self._scheduled: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.store: Store = self._make()
        self.recovered = self.store.open()

    def _make(self) -> Store:
        if self.kind == "memory":
            return MemoryStore(self._scheduled.put)
        return SqliteStore(self._path, self._scheduled.put)

    def restart(self) -> Recovered:
        if isinstance(self.store, MemoryStore):
            self.store.flush()
            return self.store.recoverable()
        self.store.close()
        self.store = self._make()
        self.recovered = self.store.open()
        return self.recovered

    def run_callbacks_until(self, done: Callable[[], bool]) -> None:
        """Run what the store scheduled, on this thread, until `done()` (a store may schedule one
        callable per batch of callbacks)."""
        while not done():
            self._scheduled.get(timeout=CALLBACK_TIMEOUT)()

    def no_callback_waiting(self) -> bool:
        return self._scheduled.empty()

    def close(self) -> None:
        self.store.close()


@pytest.fixture(params=["memory", "sqlite"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(request.param, tmp_path)
    yield h
    h.close()


def msg(msg_id: int, body: bytes | None = None, **kwargs: object) -> Message:
    return Message(
        "amq.topic",
        f"sensors.{msg_id}",
        body if body is not None else f"body-{msg_id}".encode(),
        kwargs.pop("properties", PERSISTENT),  # type: ignore[arg-type]
        msg_id,
        **kwargs,  # type: ignore[arg-type]
    )


def assert_same_message(actual: Message, expected: Message) -> None:
    assert (actual.msg_id, actual.exchange, actual.routing_key, bytes(actual.body)) == (
        expected.msg_id,
        expected.exchange,
        expected.routing_key,
        bytes(expected.body),
    )
    assert actual.properties == expected.properties
    assert (actual.expires_at, actual.retain) == (expected.expires_at, expected.retain)


def declare(store: Store, vhost: str, *names: str) -> None:
    """Durable queues: only their message references are recovered."""
    for name in names:
        store.append(QueueDeclared(vhost, name))


def loaded_ids(store: Store, ids: list[int]) -> list[int]:
    return [m.msg_id for m in store.load_messages(ids)]


# --- topology ---------------------------------------------------------------------------------


def test_topology_records_apply_in_order_and_recover(harness: Harness) -> None:
    s = harness.store
    s.append(ExchangeDeclared("/", "logs", "topic", arguments={"alternate-exchange": "ae"}))
    s.append(ExchangeDeclared("/", "gone", "fanout"))
    s.append(ExchangeDeclared("/", "ae", "fanout", internal=True))
    s.append(ExchangeDeclared("vh2", "logs", "direct", auto_delete=True))
    s.append(QueueDeclared("/", "q1", arguments={"x-max-length": 10, "x-dead-letter-exchange": "ae"}))
    s.append(QueueDeclared("/", "q2"))
    s.append(QueueDeclared("/", "q3"))
    s.append(BindingAdded("/", "logs", "q1", False, "a.*"))
    s.append(BindingAdded("/", "logs", "q1", False, "a.*"))  # a duplicate is one binding
    s.append(BindingAdded("/", "logs", "q2", False, "a.*", {"x-match": "all", "k": 1}))
    s.append(BindingAdded("/", "logs", "q2", False, "a.*", {"k": 1, "x-match": "any"}))
    s.append(BindingAdded("/", "logs", "ae", True, "#"))
    s.append(BindingAdded("/", "gone", "q1", False, ""))  # goes with its source exchange
    s.append(BindingAdded("/", "logs", "gone", True, "x"))  # goes with its destination exchange
    s.append(BindingAdded("/", "logs", "q3", False, "z"))  # goes with its queue
    s.append(ExchangeDeleted("/", "gone"))
    s.append(QueueDeleted("/", "q3"))
    # Arguments are part of the binding's identity, in any key order.
    s.append(BindingRemoved("/", "logs", "q2", False, "a.*", {"k": 1, "x-match": "all"}))
    s.append(ExchangeDeclared("/", "ae", "fanout", internal=True))  # redeclaration: still one

    recovered = harness.restart()

    assert recovered.exchanges == [
        ExchangeDeclared("/", "logs", "topic", arguments={"alternate-exchange": "ae"}),
        ExchangeDeclared("vh2", "logs", "direct", auto_delete=True),
        ExchangeDeclared("/", "ae", "fanout", internal=True),
    ]
    assert recovered.queues == [
        QueueDeclared("/", "q1", arguments={"x-max-length": 10, "x-dead-letter-exchange": "ae"}),
        QueueDeclared("/", "q2"),
    ]
    assert recovered.bindings == [
        BindingAdded("/", "logs", "q1", False, "a.*"),
        BindingAdded("/", "logs", "q2", False, "a.*", {"k": 1, "x-match": "any"}),
        BindingAdded("/", "logs", "ae", True, "#"),
    ]


def test_empty_store_recovers_nothing(harness: Harness) -> None:
    assert harness.recovered == Recovered()
    assert harness.restart() == Recovered()


# --- messages ---------------------------------------------------------------------------------


def test_enqueued_messages_recover_per_queue_in_enqueue_order(harness: Harness) -> None:
    s = harness.store
    declare(s, "/", "q1", "q2")
    declare(s, "vh2", "q1")
    for msg_id in (3, 4, 7, 8):
        s.append(MessageEnqueued("/", ("q1",), msg(msg_id)))
    s.append(MessageEnqueued("/", ("q1", "q2"), msg(9)))
    s.append(MessageEnqueued("vh2", ("q1",), msg(10)))

    recovered = harness.restart()

    assert recovered.queue_messages == {("/", "q1"): [3, 4, 7, 8, 9], ("/", "q2"): [9], ("vh2", "q1"): [10]}
    for loaded, msg_id in zip(
        harness.store.load_messages([3, 4, 7, 8, 9, 10]), [3, 4, 7, 8, 9, 10], strict=True
    ):
        assert_same_message(loaded, msg(msg_id))


def test_removed_message_is_gone(harness: Harness) -> None:
    s = harness.store
    declare(s, "/", "q1")
    s.append(MessageEnqueued("/", ("q1",), msg(1)))
    s.append(MessageEnqueued("/", ("q1",), msg(2)))
    s.flush()
    s.append(MessageRemoved("/", "q1", 1))
    s.append(MessageRemoved("/", "q1", 99))  # not held: ignored
    s.append(MessageRemoved("/", "other", 2))  # held by another queue only: ignored
    s.flush()

    assert loaded_ids(s, [1, 2]) == [2]
    recovered = harness.restart()
    assert recovered.queue_messages == {("/", "q1"): [2]}
    assert loaded_ids(harness.store, [1, 2]) == [2]


def test_message_enqueued_and_removed_before_commit_leaves_nothing(harness: Harness) -> None:
    # A fast consumer acknowledges before the group commit: both writes may be elided, but the
    # outcome and the callbacks are those of applying both records in order.
    s = harness.store
    declare(s, "/", "q1", "q2")
    fired: list[str] = []
    s.append(MessageEnqueued("/", ("q1", "q2"), msg(1)))
    s.append(MessageEnqueued("/", ("q1",), msg(2)))
    s.when_durable(lambda: fired.append("enqueued"))
    s.append(MessageRemoved("/", "q1", 1))
    s.append(MessageRemoved("/", "q1", 2))
    s.when_durable(lambda: fired.append("removed"))
    harness.run_callbacks_until(lambda: len(fired) == 2)

    assert fired == ["enqueued", "removed"]
    assert loaded_ids(s, [1, 2]) == [1]  # still held by q2
    assert harness.restart().queue_messages == {("/", "q2"): [1]}


def test_removal_from_a_queue_that_does_not_hold_the_message_changes_nothing(harness: Harness) -> None:
    s = harness.store
    declare(s, "/", "q1")
    declare(s, "vh2", "q1")
    s.append(MessageEnqueued("/", ("q1",), msg(1)))
    s.append(MessageRemoved("/", "q2", 1))  # other queue, same batch
    s.append(MessageRemoved("vh2", "q1", 1))  # same queue name, other vhost
    s.flush()
    assert loaded_ids(s, [1]) == [1]
    assert harness.restart().queue_messages == {("/", "q1"): [1]}


def test_body_shared_by_queues_is_deleted_with_the_last_reference(harness: Harness) -> None:
    s = harness.store
    declare(s, "/", "q1", "q2", "q3")
    s.append(MessageEnqueued("/", ("q1", "q2", "q3"), msg(5, b"shared body")))
    s.flush()
    s.append(MessageRemoved("/", "q1", 5))
    s.append(MessageRemoved("/", "q2", 5))
    s.flush()
    assert [m.body for m in s.load_messages([5])] == [b"shared body"]
    assert harness.restart().queue_messages == {("/", "q3"): [5]}

    harness.store.append(MessageRemoved("/", "q3", 5))
    harness.store.flush()
    assert loaded_ids(harness.store, [5]) == []
    assert harness.restart().queue_messages == {}


def test_purge_and_queue_delete_drop_only_that_queues_references(harness: Harness) -> None:
    s = harness.store
    s.append(QueueDeclared("/", "q1"))
    s.append(QueueDeclared("/", "q2"))
    s.append(MessageEnqueued("/", ("q1",), msg(1)))
    s.append(MessageEnqueued("/", ("q1", "q2"), msg(2)))
    s.append(MessageEnqueued("/", ("q2",), msg(3)))
    s.append(QueuePurged("/", "q1"))
    # Enqueued after the purge, in the same batch: kept.
    s.append(MessageEnqueued("/", ("q1",), msg(4)))
    s.flush()
    assert loaded_ids(s, [1, 2, 3, 4]) == [2, 3, 4]
    recovered = harness.restart()
    assert recovered.queue_messages == {("/", "q1"): [4], ("/", "q2"): [2, 3]}
    assert [q.name for q in recovered.queues] == ["q1", "q2"]

    s = harness.store
    s.append(QueueDeleted("/", "q2"))
    s.append(QueueDeclared("/", "q2"))
    s.append(MessageEnqueued("/", ("q2",), msg(6)))  # the new q2's message
    s.flush()
    assert loaded_ids(s, [2, 3, 4, 6]) == [4, 6]
    recovered = harness.restart()
    assert recovered.queue_messages == {("/", "q1"): [4], ("/", "q2"): [6]}
    assert [q.name for q in recovered.queues] == ["q1", "q2"]

    harness.store.append(QueueDeleted("/", "q2"))
    recovered = harness.restart()
    assert recovered.queue_messages == {("/", "q1"): [4]}
    assert [q.name for q in recovered.queues] == ["q1"]


def test_properties_and_message_fields_survive(harness: Harness) -> None:
    props = Properties(
        content_type="application/json",
        content_encoding="gzip",
        headers={"x-trace": "abc", "n": 2**70, "nested": {"list": [1, 2.5, None, True, b"\x00"]}},
        delivery_mode=2,
        priority=7,
        correlation_id="corr",
        reply_to="replies",
        expiration="60000",
        message_id="mid-1",
        timestamp=1_700_000_000,
        type="order.created",
        user_id="guest",
        app_id="app",
    )
    original = Message("ex", "rk.\u00e9", b"\x00\xff" * 100, props, 12, expires_at=1234.5, retain=True)
    declare(harness.store, "/", "q")
    harness.store.append(MessageEnqueued("/", ("q",), original))
    assert_same_message(harness.store.load_messages([12])[0], original)  # before the commit
    harness.store.flush()
    assert_same_message(harness.store.load_messages([12])[0], original)
    harness.restart()
    assert_same_message(harness.store.load_messages([12])[0], original)


def test_load_messages_keeps_the_order_asked_and_skips_unknown_ids(harness: Harness) -> None:
    s = harness.store
    for msg_id in range(1, 6):
        s.append(MessageEnqueued("/", ("q",), msg(msg_id)))
    s.flush()
    for msg_id in range(6, 9):  # possibly not yet committed
        s.append(MessageEnqueued("/", ("q",), msg(msg_id)))
    assert loaded_ids(s, [7, 2, 42, 5, 1, 8, 6]) == [7, 2, 5, 1, 8, 6]
    assert s.load_messages([]) == []
    many = list(range(1, 1200))  # more ids than one SELECT carries
    s.flush()
    assert loaded_ids(s, many) == list(range(1, 9))


def test_transient_paged_messages_are_readable_but_not_recovered(harness: Harness) -> None:
    s = harness.store
    declare(s, "/", "q", "q2")
    s.append(MessageEnqueued("/", ("q",), msg(1, properties=Properties(delivery_mode=1)), durable=False))
    s.append(MessageEnqueued("/", ("q",), msg(2)))
    s.append(MessageEnqueued("/", ("q", "q2"), msg(3, properties=Properties()), durable=False))
    s.flush()
    assert loaded_ids(s, [1, 2, 3]) == [1, 2, 3]

    recovered = harness.restart()

    assert recovered.queue_messages == {("/", "q"): [2]}
    if harness.kind == "sqlite":  # a snapshot of the memory store still holds the pages
        assert loaded_ids(harness.store, [1, 2, 3]) == [2]
    assert recovered.next_msg_id == 4  # transient ids are not reused either


def test_references_of_queues_that_are_not_durable_are_not_recovered(harness: Harness) -> None:
    # A persistent message routed to a durable queue and to a transient one: the transient queue
    # pages its copy out under the same id.
    s = harness.store
    declare(s, "/", "durable")
    s.append(MessageEnqueued("/", ("durable",), msg(1)))
    s.append(MessageEnqueued("/", ("transient",), msg(1), durable=False))
    # The other way round: paged out by the transient queue first, then stored durably.
    s.append(MessageEnqueued("/", ("transient",), msg(2), durable=False))
    s.append(MessageEnqueued("/", ("durable",), msg(2)))
    s.flush()
    # Both orders again, the two records in separate commits.
    s.append(MessageEnqueued("/", ("durable",), msg(3)))
    s.flush()
    s.append(MessageEnqueued("/", ("transient",), msg(3), durable=False))
    s.flush()
    s.append(MessageEnqueued("/", ("transient",), msg(4), durable=False))
    s.flush()
    s.append(MessageEnqueued("/", ("durable",), msg(4)))
    s.flush()

    recovered = harness.restart()

    assert recovered.queue_messages == {("/", "durable"): [1, 2, 3, 4]}
    assert loaded_ids(harness.store, [1, 2, 3, 4]) == [1, 2, 3, 4]
    if harness.kind == "sqlite":  # a snapshot of the memory store still holds the transient copy
        harness.store.append(MessageRemoved("/", "durable", 1))
        harness.store.flush()
        assert loaded_ids(harness.store, [1]) == []  # the transient reference did not survive


def test_next_msg_id_is_never_reused(harness: Harness) -> None:
    assert harness.recovered.next_msg_id == 1
    s = harness.store
    s.append(MessageEnqueued("/", ("q",), msg(5)))
    s.append(MessageEnqueued("/", ("q",), msg(9)))
    s.append(MessageRemoved("/", "q", 9))
    s.append(MessageRemoved("/", "q", 5))
    s.flush()
    assert harness.restart().next_msg_id == 10  # every message acked, ids still not reused

    harness.store.append(RetainedSet("/", "t", msg(20)))
    harness.store.append(RetainedCleared("/", "t"))
    assert harness.restart().next_msg_id == 21
    assert harness.restart().next_msg_id == 21

    harness.store.append(MessageEnqueued("/", (), msg(30)))  # routed nowhere durable: nothing stored
    recovered = harness.restart()
    assert recovered.next_msg_id == 31 and recovered.queue_messages == {}


# --- retained messages and sessions -------------------------------------------------------------


def test_retained_set_replace_and_clear(harness: Harness) -> None:
    s = harness.store
    s.append(RetainedSet("/", "a.b", msg(1, b"first", retain=True)))
    s.append(RetainedSet("/", "a.c", msg(2, b"other")))
    s.append(RetainedSet("vh", "a.b", msg(3, b"vhost")))
    s.append(RetainedSet("/", "a.b", msg(4, b"second", expires_at=99.0)))
    s.append(RetainedCleared("/", "a.c"))
    s.append(RetainedCleared("/", "never.set"))

    recovered = harness.restart()

    assert [(r.vhost, r.topic) for r in recovered.retained] == [("vh", "a.b"), ("/", "a.b")]
    assert_same_message(recovered.retained[0].message, msg(3, b"vhost"))
    assert_same_message(recovered.retained[1].message, msg(4, b"second", expires_at=99.0))

    harness.store.append(RetainedCleared("/", "a.b"))
    harness.store.append(RetainedSet("/", "a.c", msg(5, b"again")))
    recovered = harness.restart()
    assert [(r.vhost, r.topic, r.message.body) for r in recovered.retained] == [
        ("vh", "a.b", b"vhost"),
        ("/", "a.c", b"again"),
    ]


def test_sessions_saved_replaced_and_deleted(harness: Harness) -> None:
    s = harness.store
    s.append(SessionSaved("/", "client-1", b"v1"))
    s.append(SessionSaved("/", "client-2", b"\x00state"))
    s.append(SessionSaved("vh", "client-1", b"other vhost"))
    s.append(SessionSaved("/", "client-1", b"v2"))
    s.append(SessionDeleted("/", "client-2"))
    s.append(SessionDeleted("/", "unknown"))

    recovered = harness.restart()

    assert recovered.sessions == [
        SessionSaved("vh", "client-1", b"other vhost"),
        SessionSaved("/", "client-1", b"v2"),
    ]
    harness.store.append(SessionDeleted("/", "client-1"))
    harness.store.append(SessionSaved("/", "client-2", b"back"))
    assert harness.restart().sessions == [
        SessionSaved("vh", "client-1", b"other vhost"),
        SessionSaved("/", "client-2", b"back"),
    ]


# --- snapshots ------------------------------------------------------------------------------------


def comparable(record: Record) -> object:
    """A record with its message as field values (Message has no equality)."""
    if isinstance(record, (MessageEnqueued, RetainedSet)):
        m = record.message
        fields = (m.msg_id, m.exchange, m.routing_key, bytes(m.body), m.properties, m.expires_at, m.retain)
        if isinstance(record, RetainedSet):
            return ("retained", record.vhost, record.topic, fields)
        return ("enqueued", record.vhost, record.queues, fields, record.durable)
    return record


def test_snapshot_is_the_state_at_the_call_and_stays_readable_while_the_store_goes_on(
    harness: Harness,
) -> None:
    s = harness.store
    s.append(ExchangeDeclared("/", "logs", "topic"))
    declare(s, "/", "q1", "q2")
    declare(s, "vh", "q1")
    s.append(BindingAdded("/", "logs", "q1", False, "a.*", {"k": 1}))
    s.append(MessageEnqueued("/", ("q1", "q2"), msg(1)))
    s.append(MessageEnqueued("/", ("transient",), msg(1), durable=False))  # not a durable queue's
    s.append(MessageEnqueued("vh", ("q1",), msg(2)))
    s.append(MessageEnqueued("/", ("q2",), msg(3)))
    s.append(MessageRemoved("/", "q2", 3))
    s.append(MessageEnqueued("/", ("q2",), msg(4, properties=Properties()), durable=False))  # paged out
    s.append(RetainedSet("/", "a.b", msg(5, retain=True)))
    s.append(SessionSaved("/", "c1", b"state"))
    s.append(MessageEnqueued("/", (), msg(9)))  # routed nowhere durable: only the next id moves

    snapshot = s.snapshot()
    # The store goes on; nothing of this is in the snapshot, read only afterwards.
    s.append(MessageRemoved("/", "q1", 1))
    s.append(QueueDeleted("/", "q2"))
    s.append(MessageEnqueued("/", ("q1",), msg(10)))
    s.append(RetainedCleared("/", "a.b"))
    s.append(SessionDeleted("/", "c1"))
    s.append(ExchangeDeleted("/", "logs"))
    s.flush()
    try:
        records = [comparable(record) for record in snapshot.records]
    finally:
        snapshot.close()

    assert snapshot.next_msg_id == 10
    assert records == [
        comparable(record)
        for record in (
            ExchangeDeclared("/", "logs", "topic"),
            QueueDeclared("/", "q1"),
            QueueDeclared("/", "q2"),
            QueueDeclared("vh", "q1"),
            BindingAdded("/", "logs", "q1", False, "a.*", {"k": 1}),
            MessageEnqueued("/", ("q1", "q2"), msg(1)),  # one record, its body once
            MessageEnqueued("vh", ("q1",), msg(2)),
            RetainedSet("/", "a.b", msg(5, retain=True)),
            SessionSaved("/", "c1", b"state"),
        )
    ]


# --- durability notifications ---------------------------------------------------------------------


def test_when_durable_goes_through_schedule_in_registration_order(harness: Harness) -> None:
    s = harness.store
    fired: list[int] = []
    s.when_durable(lambda: fired.append(0))  # nothing appended yet
    for i in range(1, 200):
        s.append(MessageEnqueued("/", ("q",), msg(i)))
        if i % 3 == 0:
            s.append(MessageRemoved("/", "q", i - 1))
        s.when_durable(partial(fired.append, i))
        if i % 50 == 0:
            s.when_durable(partial(fired.append, -i))  # two in a row, nothing appended between
    assert fired == []  # never called inside when_durable: only through `schedule`
    harness.run_callbacks_until(lambda: len(fired) >= 1 + 199 + 3)
    assert fired == [0] + [x for i in range(1, 200) for x in ((i, -i) if i % 50 == 0 else (i,))]
    assert harness.no_callback_waiting()


def test_when_durable_reports_records_durable(harness: Harness) -> None:
    s = harness.store
    declare(s, "/", "q")
    seen: list[list[int]] = []
    s.append(MessageEnqueued("/", ("q",), msg(1)))
    s.append(SessionSaved("/", "c", b"s"))
    s.when_durable(lambda: seen.append(loaded_ids(s, [1])))
    harness.run_callbacks_until(lambda: bool(seen))
    assert seen == [[1]]
    assert s.pending_bytes == 0


# --- SQLite backend specifics -----------------------------------------------------------------------


def open_sqlite(path: Path) -> tuple[SqliteStore, queue.SimpleQueue[Callable[[], None]]]:
    scheduled: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
    store = SqliteStore(path, scheduled.put)
    store.open()
    return store, scheduled


def test_sqlite_serves_unflushed_messages_and_counts_pending_bytes(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store, _ = open_sqlite(path)
    store.append(MessageEnqueued("/", ("q",), msg(1, b"committed")))
    store.flush()
    # Another connection holds the write lock: the writer cannot commit what follows yet.
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        store.append(MessageEnqueued("/", ("q",), msg(2, b"x" * 1000)))
        store.append(RetainedSet("/", "t", msg(3, b"y" * 24)))
        assert store.pending_bytes == 1024
        assert [m.body for m in store.load_messages([2, 1])] == [b"x" * 1000, b"committed"]
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    store.flush()
    assert store.pending_bytes == 0
    assert [m.body for m in store.load_messages([2, 1])] == [b"x" * 1000, b"committed"]
    store.close()


def test_sqlite_writer_failure_is_logged_and_refuses_further_use(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, scheduled = open_sqlite(tmp_path / "s.sqlite3")
    fired: list[str] = []
    bad = msg(1, properties=Properties(headers={"x": {1, 2}}))  # a set is not a field-table value
    store.append(MessageEnqueued("/", ("q",), bad))
    store.when_durable(lambda: fired.append("never"))
    with pytest.raises(StoreError, match=r"s\.sqlite3.*unsupported value type set"):
        store.flush()
    with pytest.raises(StoreError, match="store write failed"):
        store.append(MessageEnqueued("/", ("q",), msg(2)))
    with pytest.raises(StoreError, match="store write failed"):
        store.when_durable(lambda: fired.append("never"))
    assert "store write failed" in caplog.text
    with pytest.raises(StoreError, match="store write failed"):
        store.close()
    assert scheduled.empty() and fired == []  # nothing unwritten is ever confirmed


def test_sqlite_open_errors_name_the_path_and_reason(tmp_path: Path) -> None:
    directory = tmp_path / "is-a-directory"
    directory.mkdir()
    with pytest.raises(StoreError, match=r"is-a-directory.*unable to open"):
        SqliteStore(directory, lambda cb: None).open()

    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=r"garbage\.sqlite3.*not a database"):
        SqliteStore(garbage, lambda cb: None).open()

    with pytest.raises(ValueError, match="synchronous"):
        SqliteStore(tmp_path / "x", lambda cb: None, synchronous="SOMETIMES")


def test_sqlite_refuses_a_second_store_on_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    first, _ = open_sqlite(path)
    with pytest.raises(StoreError, match="in use by another store"):
        SqliteStore(path, lambda cb: None).open()
    first.close()
    second, _ = open_sqlite(path)  # released by close()
    second.close()


def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    open_sqlite(path)[0].close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="schema version 99"):
        SqliteStore(path, lambda cb: None).open()


def test_sqlite_closed_store_refuses_calls(tmp_path: Path) -> None:
    store, _ = open_sqlite(tmp_path / "s.sqlite3")
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        store.append(MessageRemoved("/", "q", 1))
    with pytest.raises(StoreError, match="closed"):
        store.flush()
    with pytest.raises(StoreError, match="closed"):
        store.load_messages([1])


def test_sqlite_large_batches_span_several_statements(tmp_path: Path) -> None:
    # More rows than one multi-row statement carries, and an odd tail that gets padded.
    store, _ = open_sqlite(tmp_path / "s.sqlite3")
    declare(store, "/", "a", "b")
    count = 5000 + 37
    for msg_id in range(1, count + 1):
        store.append(MessageEnqueued("/", ("a", "b") if msg_id % 2 else ("a",), msg(msg_id)))
    store.flush()
    for msg_id in range(1, count + 1, 3):
        store.append(MessageRemoved("/", "a", msg_id))
    store.flush()
    store.close()

    reopened = SqliteStore(tmp_path / "s.sqlite3", lambda cb: None)
    recovered = reopened.open()
    removed = set(range(1, count + 1, 3))
    assert recovered.queue_messages == {
        ("/", "a"): [i for i in range(1, count + 1) if i not in removed],
        ("/", "b"): list(range(1, count + 1, 2)),
    }
    # Bodies held by neither queue are gone; those still held by "b" are kept.
    gone = [i for i in removed if i % 2 == 0]
    assert reopened.load_messages(gone) == []
    assert len(reopened.load_messages(list(range(1, count + 1)))) == count - len(gone)
    reopened.close()


def test_sqlite_flush_waits_for_everything_appended_from_any_thread(tmp_path: Path) -> None:
    s, _ = open_sqlite(tmp_path / "s.sqlite3")

    def produce(base: int) -> None:
        declare(s, "/", f"q{base}")
        for i in range(base, base + 300):
            s.append(MessageEnqueued("/", (f"q{base}",), msg(i)))

    threads = [threading.Thread(target=produce, args=(base,)) for base in (1000, 2000, 3000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s.flush()
    assert s.pending_bytes == 0
    s.close()
    reopened = SqliteStore(tmp_path / "s.sqlite3", lambda cb: None)
    assert reopened.open().queue_messages == {
        ("/", f"q{base}"): list(range(base, base + 300)) for base in (1000, 2000, 3000)
    }
    reopened.close()
