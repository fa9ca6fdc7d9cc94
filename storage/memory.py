"""MemoryStore: the Store port held in dictionaries, for tests and `store = "memory"`.

Every record is "durable" as soon as it is appended; nothing survives the process, so `open()`
always returns an empty `Recovered`. It applies records with exactly the semantics of the SQLite
backend, so paged-out bodies can be loaded back and are deleted with their last queue reference,
and `recoverable()` returns what a persistent backend would recover at this point (the contract
tests in tests/storage/test_contract.py compare both backends through it).

Must not import: asyncio, protocols, cluster, broker.core (only broker.message, broker.journal).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

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
from storage.serial import encode_table

logger = logging.getLogger(__name__)

_BindingKey = tuple[str, str, str, bool, str, bytes]


def _binding_key(record: BindingAdded | BindingRemoved) -> _BindingKey:
    # Arguments are part of a binding's identity (AMQP 0-9-1 §3.1.3.3, headers exchange);
    # canonical bytes make equal tables equal keys, as in the SQLite backend.
    return (
        record.vhost,
        record.source,
        record.destination,
        record.destination_is_exchange,
        record.routing_key,
        encode_table(record.arguments, canonical=True),
    )


class MemoryStore(Store):
    """Records applied to dicts on `append`; `when_durable` callbacks go through `schedule`.

    Single-threaded: append and when_durable come from the owner's thread.
    """

    def __init__(self, schedule: Schedule) -> None:
        self._schedule = schedule
        self._closed = False
        self._callbacks: list[Callable[[], None]] = []  # registered, their run not yet started
        self._exchanges: dict[tuple[str, str], ExchangeDeclared] = {}
        self._queues: dict[tuple[str, str], QueueDeclared] = {}
        self._bindings: dict[_BindingKey, BindingAdded] = {}
        self._messages: dict[int, Message] = {}
        self._transient: set[int] = set()  # paged-out transient messages: not recovered
        self._next_msg_id = 1
        # Which queues still hold each message; the body goes with the last one.
        self._holders: dict[int, set[tuple[str, str]]] = {}
        # Per queue, the ids it holds in enqueue order (a dict is an ordered set).
        self._queue_messages: dict[tuple[str, str], dict[int, None]] = {}
        self._retained: dict[tuple[str, str], RetainedSet] = {}
        self._sessions: dict[tuple[str, str], SessionSaved] = {}

    def open(self) -> Recovered:
        return Recovered()

    def append(self, record: Record) -> None:
        if self._closed:
            raise StoreError("memory store: closed")
        if type(record) is MessageEnqueued:
            self._enqueue(record)
        elif type(record) is MessageRemoved:
            self._unref(record.vhost, record.queue, record.msg_id)
        else:
            self._apply_rare(record)

    def _enqueue(self, record: MessageEnqueued) -> None:
        msg_id = record.message.msg_id
        if msg_id >= self._next_msg_id:
            self._next_msg_id = msg_id + 1
        if not record.queues:
            return
        if msg_id not in self._messages:
            self._messages[msg_id] = record.message
            if not record.durable:
                self._transient.add(msg_id)
        elif record.durable:
            # Stored again (a transient queue's paged copy of a persistent message, or the other
            # way round): durable if either enqueue was.
            self._transient.discard(msg_id)
        holders = self._holders.get(msg_id)
        if holders is None:
            holders = self._holders[msg_id] = set()
        vhost = record.vhost
        queue_messages = self._queue_messages
        for queue in record.queues:
            key = (vhost, queue)
            holders.add(key)
            held = queue_messages.get(key)
            if held is None:
                queue_messages[key] = {msg_id: None}
            else:
                held[msg_id] = None

    def _unref(self, vhost: str, queue: str, msg_id: int) -> None:
        key = (vhost, queue)
        held = self._queue_messages.get(key)
        if held is None or msg_id not in held:
            return
        del held[msg_id]
        if not held:
            del self._queue_messages[key]
        holders = self._holders[msg_id]
        holders.discard(key)
        if not holders:
            del self._holders[msg_id]
            del self._messages[msg_id]
            self._transient.discard(msg_id)

    def _drop_queue_messages(self, vhost: str, queue: str) -> None:
        for msg_id in list(self._queue_messages.get((vhost, queue), ())):
            self._unref(vhost, queue, msg_id)

    def _apply_rare(self, record: Record) -> None:
        # A redeclaration moves to the end, as a replaced row does in SQLite.
        if isinstance(record, ExchangeDeclared):
            self._exchanges.pop((record.vhost, record.name), None)
            self._exchanges[(record.vhost, record.name)] = record
        elif isinstance(record, ExchangeDeleted):
            self._exchanges.pop((record.vhost, record.name), None)
            # An exchange takes its bindings with it, as source and as destination.
            for key in [
                k
                for k in self._bindings
                if k[0] == record.vhost and (k[1] == record.name or (k[2] == record.name and k[3]))
            ]:
                del self._bindings[key]
        elif isinstance(record, QueueDeclared):
            self._queues.pop((record.vhost, record.name), None)
            self._queues[(record.vhost, record.name)] = record
        elif isinstance(record, QueueDeleted):
            self._queues.pop((record.vhost, record.name), None)
            self._drop_queue_messages(record.vhost, record.name)
            for key in [
                k for k in self._bindings if k[0] == record.vhost and k[2] == record.name and not k[3]
            ]:
                del self._bindings[key]
        elif isinstance(record, QueuePurged):
            self._drop_queue_messages(record.vhost, record.name)
        elif isinstance(record, BindingAdded):
            self._bindings.setdefault(_binding_key(record), record)
        elif isinstance(record, BindingRemoved):
            self._bindings.pop(_binding_key(record), None)
        elif isinstance(record, RetainedSet):
            if record.message.msg_id >= self._next_msg_id:
                self._next_msg_id = record.message.msg_id + 1
            self._retained.pop((record.vhost, record.topic), None)
            self._retained[(record.vhost, record.topic)] = record
        elif isinstance(record, RetainedCleared):
            self._retained.pop((record.vhost, record.topic), None)
        elif isinstance(record, SessionSaved):
            self._sessions.pop((record.vhost, record.client_id), None)
            self._sessions[(record.vhost, record.client_id)] = record
        elif isinstance(record, SessionDeleted):
            self._sessions.pop((record.vhost, record.client_id), None)
        else:
            raise StoreError(f"memory store: not a record: {record!r}")

    def recoverable(self) -> Recovered:
        """What a persistent backend would recover now (after a clean shutdown): durable topology,
        ids of durable messages per declared queue in enqueue order, retained messages, sessions."""
        transient = self._transient
        queue_messages = {}
        for key, held in self._queue_messages.items():
            if key not in self._queues:
                continue  # a queue that is not durable does not come back
            ids = [msg_id for msg_id in held if msg_id not in transient]
            if ids:
                queue_messages[key] = sorted(ids)
        return Recovered(
            exchanges=list(self._exchanges.values()),
            queues=list(self._queues.values()),
            bindings=list(self._bindings.values()),
            queue_messages=queue_messages,
            retained=list(self._retained.values()),
            sessions=list(self._sessions.values()),
            next_msg_id=self._next_msg_id,
        )

    def snapshot(self) -> Snapshot:
        # Built whole now, since the dicts change with the next append; the Message objects are
        # shared, as load_messages shares them.
        recovered = self.recoverable()
        records: list[Record] = [*recovered.exchanges, *recovered.queues, *recovered.bindings]
        holders: dict[int, dict[str, list[str]]] = {}
        for (vhost, queue), ids in recovered.queue_messages.items():
            for msg_id in ids:
                holders.setdefault(msg_id, {}).setdefault(vhost, []).append(queue)
        messages = self._messages
        for msg_id in sorted(holders):
            for vhost, queues in sorted(holders[msg_id].items()):
                records.append(MessageEnqueued(vhost, tuple(sorted(queues)), messages[msg_id]))
        records += recovered.retained
        records += recovered.sessions
        return Snapshot(iter(records), recovered.next_msg_id)

    def when_durable(self, callback: Callable[[], None]) -> None:
        if self._closed:
            raise StoreError("memory store: closed")
        # Everything is durable already; callbacks registered before the scheduled run goes share
        # it (one `schedule` per loop iteration, not per published message).
        self._callbacks.append(callback)
        if len(self._callbacks) == 1:
            try:
                self._schedule(self._run_callbacks)
            except BaseException:
                self._callbacks.clear()  # never scheduled: the next call must schedule again
                raise

    def _run_callbacks(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                logger.exception("when_durable callback %r failed", callback)

    def load_messages(self, msg_ids: Sequence[int]) -> list[Message]:
        messages = self._messages
        return [messages[msg_id] for msg_id in msg_ids if msg_id in messages]

    @property
    def pending_bytes(self) -> int:
        return 0

    def flush(self) -> None:
        if self._closed:
            raise StoreError("memory store: closed")

    def close(self) -> None:
        self._closed = True
