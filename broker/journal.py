"""The durable store's port, owned by the core: journal records in, durability notifications out.

The core describes every change to durable state as a `Record` and hands it to `Store.append`.
The store writes records in order, in group commits (many records, one fsync), and tells its
owner when everything appended so far is durable (`when_durable`). Publishers are confirmed from
that callback only (README, Guarantees). Replication (cluster/) wraps a Store and forwards the same
records to the standby, so the core never knows it is replicated.

Callbacks run on the owner's thread: the store is given a `schedule` function at construction
(the composition root passes `loop.call_soon_threadsafe`; tests pass something synchronous).

The port lives in the core (storage/ implements it, cluster/ wraps it), so that dependencies
point one way: protocols -> broker <- storage (docs/architecture.md).

Must not import: asyncio, protocols, storage, cluster, broker.core (only broker.message).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.message import Message

# The result is ignored (loop.call_soon_threadsafe returns a Handle).
Schedule = Callable[[Callable[[], None]], object]


# --- Journal records --------------------------------------------------------------------------
# Every record is an immutable value. Topology records are written only for durable objects.


@dataclass(frozen=True, slots=True)
class ExchangeDeclared:
    vhost: str
    name: str
    type: str
    auto_delete: bool = False
    internal: bool = False
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ExchangeDeleted:
    vhost: str
    name: str


@dataclass(frozen=True, slots=True)
class QueueDeclared:
    vhost: str
    name: str
    auto_delete: bool = False
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class QueueDeleted:
    """Deletes the queue and every message reference it holds."""

    vhost: str
    name: str


@dataclass(frozen=True, slots=True)
class QueuePurged:
    """Removes every message reference the queue holds; the queue stays."""

    vhost: str
    name: str


@dataclass(frozen=True, slots=True)
class BindingAdded:
    vhost: str
    source: str
    destination: str
    destination_is_exchange: bool
    routing_key: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BindingRemoved:
    vhost: str
    source: str
    destination: str
    destination_is_exchange: bool
    routing_key: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MessageEnqueued:
    """A message (message.msg_id set, unique) placed on one or more queues of one vhost.

    The body is stored once however many queues hold it. `durable` is False for a transient
    message that was only paged out of RAM: it is readable with `load_messages` but dropped at
    recovery.
    """

    vhost: str
    queues: tuple[str, ...]
    message: Message
    durable: bool = True


@dataclass(frozen=True, slots=True)
class MessageRemoved:
    """The queue no longer holds the message (acknowledged, expired, dropped or dead-lettered).

    The message's body is deleted once no queue holds it.
    """

    vhost: str
    queue: str
    msg_id: int


@dataclass(frozen=True, slots=True)
class RetainedSet:
    """MQTT retained message for a topic (AMQP-form routing key on amq.topic)."""

    vhost: str
    topic: str
    message: Message


@dataclass(frozen=True, slots=True)
class RetainedCleared:
    vhost: str
    topic: str


@dataclass(frozen=True, slots=True)
class SessionSaved:
    """A protocol session's durable state (e.g. an MQTT persistent session), opaque bytes."""

    vhost: str
    client_id: str
    state: bytes


@dataclass(frozen=True, slots=True)
class SessionDeleted:
    vhost: str
    client_id: str


Record = (
    ExchangeDeclared
    | ExchangeDeleted
    | QueueDeclared
    | QueueDeleted
    | QueuePurged
    | BindingAdded
    | BindingRemoved
    | MessageEnqueued
    | MessageRemoved
    | RetainedSet
    | RetainedCleared
    | SessionSaved
    | SessionDeleted
)


@dataclass(slots=True)
class Recovered:
    """Everything durable, as found by `Store.open()`.

    `queue_messages` maps (vhost, queue) to the ids of the durable messages it holds, in
    enqueue order (bodies are loaded on demand with `load_messages`). `next_msg_id` is larger
    than any id ever handed out, so ids stay unique across restarts.
    """

    exchanges: list[ExchangeDeclared] = field(default_factory=list)
    queues: list[QueueDeclared] = field(default_factory=list)
    bindings: list[BindingAdded] = field(default_factory=list)
    queue_messages: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    retained: list[RetainedSet] = field(default_factory=list)
    sessions: list[SessionSaved] = field(default_factory=list)
    next_msg_id: int = 1


class Snapshot:
    """A store's durable state at one point of its journal, as the records that rebuild it.

    `records` rebuild, in an empty store, what `open()` would recover at that point: topology in
    declaration order, then each durable message once per vhost as one MessageEnqueued naming every
    queue that holds it (in id order, which is each queue's enqueue order), then retained messages
    and sessions. `next_msg_id` is the point's Recovered.next_msg_id (the records cannot carry ids
    of messages already removed). When `blocking` is True, iterating `records` does I/O: do it off
    the owner's thread, one thread at a time. `close()` releases what the snapshot holds; call it
    once done with it, read to the end or not.
    """

    __slots__ = ("records", "next_msg_id", "blocking", "_close")

    def __init__(
        self,
        records: Iterator[Record],
        next_msg_id: int,
        *,
        blocking: bool = False,
        close: Callable[[], None] | None = None,
    ) -> None:
        self.records = records
        self.next_msg_id = next_msg_id
        self.blocking = blocking
        self._close = close

    def close(self) -> None:
        if self._close is not None:
            self._close()


class StoreError(Exception):
    """The store cannot be opened or written (message says what and where)."""


class Store(ABC):
    """A durable journal of records with group commit.

    Contract (tests/storage/test_contract.py runs it against every backend):
    - `append` never blocks on I/O; records are applied in append order.
    - `when_durable(cb)` calls `cb` (through `schedule`) once every record appended before the
      call is durable; callbacks fire in registration order.
    - After `close()` or a crash, `open()` on the same location returns the state produced by
      at least every record that was reported durable, applied in order.
    - `load_messages` returns bodies of messages that were enqueued and not yet removed from
      every queue, durable or not yet.
    - A MessageEnqueued for no queue stores nothing but raises the next message id past its id.
    - `snapshot()` is the state at the call (every record appended before it, none after) and
      stays readable while the store goes on being written.
    """

    @abstractmethod
    def open(self) -> Recovered:
        """Open (creating if needed) and return the durable state. Called once, first."""

    @abstractmethod
    def append(self, record: Record) -> None:
        """Queue a record for the next group commit."""

    @abstractmethod
    def when_durable(self, callback: Callable[[], None]) -> None:
        """Call `callback` once everything appended so far is durable."""

    @abstractmethod
    def load_messages(self, msg_ids: Sequence[int]) -> list[Message]:
        """The messages with these ids, in the order asked (ids not found are skipped)."""

    @abstractmethod
    def snapshot(self) -> Snapshot:
        """The state after everything appended so far, as records (replication sends it to a
        standby). Called on the owner's thread; may block until what was appended is durable."""

    @property
    @abstractmethod
    def pending_bytes(self) -> int:
        """Approximate bytes appended but not yet durable (drives publisher flow control)."""

    @abstractmethod
    def flush(self) -> None:
        """Block until everything appended so far is durable (shutdown, tests)."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release the store. No call is valid afterwards."""
