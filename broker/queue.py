"""Queues and consumers: storage order, credit, acknowledgement, expiry, limits, dead-lettering.

Theory of operation
-------------------
A queue holds `Entry`s (its view of a message: redelivered flag, delivery count, expiry) in
`_ready`, in delivery order. Consumers register with a credit (prefetch: how many unacked
deliveries they may hold, 0 = unlimited) and a `deliver` callback. `_dispatch` hands the head
of `_ready` to the next consumer with credit, round-robin, until one of the two runs out. A
delivery that needs an ack stays in the consumer's `unacked` count until `ack` or `reject`;
a requeued entry goes back to the head so it keeps its place as far as possible.

Queue depth is not bounded by RAM (README, Guarantees): past `page_out_threshold` entries, new
messages are written to the store and only their ids stay in `_paged`; they are read back in
batches as the head drains. Order is kept because nothing joins `_ready` while `_paged` has
ids.

The queue reports side effects to its owner (the vhost) through `QueueOwner`: journal records
for the store, messages to dead-letter, and "I became unused" for auto-delete.

Must not import: asyncio, protocols, storage backends, cluster.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from broker.errors import AccessRefused, PreconditionFailed, ResourceLocked
from broker.message import Message

# Dead-letter reasons, as RabbitMQ writes them in `x-death`.
REJECTED = "rejected"
EXPIRED = "expired"
MAXLEN = "maxlen"
DELIVERY_LIMIT = "delivery_limit"

DROP_HEAD = "drop-head"
REJECT_PUBLISH = "reject-publish"
REJECT_PUBLISH_DLX = "reject-publish-dlx"
OVERFLOW_MODES = (DROP_HEAD, REJECT_PUBLISH, REJECT_PUBLISH_DLX)

_PAGE_IN_BATCH = 2000


class QueueOwner(Protocol):
    """What a queue needs from its vhost."""

    def journal_removed(self, queue: Queue, msg_id: int) -> None: ...

    def dead_letter(self, queue: Queue, message: Message, reason: str) -> None: ...

    def queue_unused(self, queue: Queue) -> None: ...

    def load_messages(self, msg_ids: list[int]) -> list[Message]: ...

    def page_out(self, queue: Queue, message: Message) -> None: ...

    def memory_changed(self, delta: int) -> None: ...


class Entry:
    """A message as one queue holds it."""

    __slots__ = (
        "message",
        "redelivered",
        "delivery_count",
        "expires_at",
        "priority",
        "consumer",
        "held",
        "stored",
    )

    def __init__(
        self, message: Message, expires_at: float | None, priority: int = 0, stored: bool = False
    ) -> None:
        self.message = message
        self.redelivered = False
        self.delivery_count = 0
        self.expires_at = expires_at
        self.priority = priority
        # The consumer holding it unacked (None for basic.get or when not held).
        self.consumer: Consumer | None = None
        # Delivered and waiting for an ack or reject.
        self.held = False
        # The store holds a reference of this message for this queue (journal its removal).
        self.stored = stored


DeliverCallback = Callable[["Queue", Entry], None]


class Consumer:
    """A subscription to one queue, owned by a protocol session.

    `prefetch` is the credit: how many unacked deliveries it may hold (0 = unlimited; ignored
    when `no_ack`). `blocked` is set by the session while its connection cannot take more
    writes; the queue then delivers to others (docs/architecture.md, flow control).
    """

    __slots__ = (
        "tag",
        "deliver",
        "prefetch",
        "no_ack",
        "exclusive",
        "owner",
        "unacked",
        "blocked",
        "queue",
        "arguments",
        "channel_credit",
        "on_cancel",
    )

    def __init__(
        self,
        tag: str,
        deliver: DeliverCallback,
        prefetch: int = 0,
        no_ack: bool = False,
        exclusive: bool = False,
        owner: object = None,
        arguments: dict[str, Any] | None = None,
        channel_credit: ChannelCredit | None = None,
    ) -> None:
        self.tag = tag
        self.deliver = deliver
        self.prefetch = prefetch
        self.no_ack = no_ack
        self.exclusive = exclusive
        self.owner = owner
        self.unacked = 0
        self.blocked = False
        self.queue: Queue | None = None
        self.arguments = arguments or {}
        # A credit shared by several consumers (AMQP basic.qos global=true), else None.
        self.channel_credit = channel_credit
        # Called when the broker cancels the consumer (its queue was deleted).
        self.on_cancel: Callable[[], None] | None = None

    def can_take(self) -> bool:
        if self.blocked:
            return False
        if self.no_ack:
            return True
        if self.prefetch and self.unacked >= self.prefetch:
            return False
        cc = self.channel_credit
        return cc is None or cc.can_take()

    def set_blocked(self, blocked: bool) -> None:
        self.blocked = blocked
        if not blocked and self.queue is not None:
            self.queue.dispatch()


class ChannelCredit:
    """A prefetch limit shared by a group of consumers (AMQP basic.qos with global=true)."""

    __slots__ = ("limit", "unacked")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.unacked = 0

    def can_take(self) -> bool:
        return not self.limit or self.unacked < self.limit


class _PriorityReady:
    """`_ready` for a priority queue: one deque per level, highest served first."""

    __slots__ = ("_levels", "_len")

    def __init__(self, max_priority: int) -> None:
        self._levels: list[deque[Entry]] = [deque() for _ in range(max_priority + 1)]
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def append(self, entry: Entry) -> None:
        self._levels[entry.priority].append(entry)
        self._len += 1

    def appendleft(self, entry: Entry) -> None:
        self._levels[entry.priority].appendleft(entry)
        self._len += 1

    def popleft(self) -> Entry:
        for level in reversed(self._levels):
            if level:
                self._len -= 1
                return level.popleft()
        raise IndexError("pop from an empty queue")

    def __getitem__(self, index: int) -> Entry:
        if index != 0:
            raise IndexError(index)
        for level in reversed(self._levels):
            if level:
                return level[0]
        raise IndexError("empty queue")

    def __iter__(self) -> Iterator[Entry]:
        for level in reversed(self._levels):
            yield from level

    def clear(self) -> None:
        for level in self._levels:
            level.clear()
        self._len = 0


def _int_arg(arguments: dict[str, Any], name: str, minimum: int = 0) -> int | None:
    value = arguments.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise PreconditionFailed(f"invalid arg '{name}': expected an integer, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise PreconditionFailed(f"invalid arg '{name}': expected an integer, got {value!r}") from None
    if number < minimum:
        raise PreconditionFailed(f"invalid arg '{name}': {number} is below {minimum}")
    return number


class Queue:
    """A queue of one vhost. See the module docstring for how it works."""

    def __init__(
        self,
        owner: QueueOwner,
        vhost: str,
        name: str,
        durable: bool = False,
        exclusive_owner: object = None,
        auto_delete: bool = False,
        arguments: dict[str, Any] | None = None,
        clock: Callable[[], float] = lambda: 0.0,
        page_out_threshold: int = 10000,
    ) -> None:
        self._owner = owner
        self.vhost = vhost
        self.name = name
        self.durable = durable
        self.exclusive_owner = exclusive_owner
        self.auto_delete = auto_delete
        self.arguments = dict(arguments or {})
        self._clock = clock
        args = self.arguments
        self.message_ttl = _int_arg(args, "x-message-ttl")
        self.expires = _int_arg(args, "x-expires", 1)
        self.max_length = _int_arg(args, "x-max-length")
        self.max_length_bytes = _int_arg(args, "x-max-length-bytes")
        self.max_priority = _int_arg(args, "x-max-priority")
        self.delivery_limit = _int_arg(args, "x-delivery-limit")
        if self.max_priority is not None and self.max_priority > 255:
            raise PreconditionFailed("invalid arg 'x-max-priority': at most 255")
        overflow = args.get("x-overflow", DROP_HEAD)
        if overflow not in OVERFLOW_MODES:
            raise PreconditionFailed(f"invalid arg 'x-overflow': {overflow!r}")
        self.overflow: str = overflow
        dlx = args.get("x-dead-letter-exchange")
        self.dead_letter_exchange: str | None = dlx if isinstance(dlx, str) else None
        dlk = args.get("x-dead-letter-routing-key")
        self.dead_letter_routing_key: str | None = dlk if isinstance(dlk, str) else None
        self.single_active = bool(args.get("x-single-active-consumer", False))

        self._ready: Any = deque() if self.max_priority is None else _PriorityReady(self.max_priority)
        self._paged: deque[int] = deque()
        # Paged ids at or below this were recovered after a restart: flag them redelivered.
        self._recovered_upto = 0
        self._page_out_threshold = page_out_threshold if self.max_priority is None else 1 << 62
        self.consumers: list[Consumer] = []
        self._next_consumer = 0
        self.ready_bytes = 0
        self.unacked_count = 0
        self.had_consumer = False
        self.last_used = clock()
        self.deleted = False
        # Counters for metrics.
        self.published = 0
        self.delivered = 0
        self.acked = 0
        self.dropped = 0

    # --- inspection ------------------------------------------------------------------------

    @property
    def message_count(self) -> int:
        """Messages ready for delivery (AMQP queue.declare-ok's message-count)."""
        return len(self._ready) + len(self._paged)

    @property
    def consumer_count(self) -> int:
        return len(self.consumers)

    def __repr__(self) -> str:
        return (
            f"Queue({self.vhost!r}, {self.name!r}, ready={self.message_count}, unacked={self.unacked_count})"
        )

    # --- enqueue ---------------------------------------------------------------------------

    def accepts(self, size: int) -> bool:
        """False when `x-overflow=reject-publish*` refuses a new message of `size` bytes."""
        if self.overflow == DROP_HEAD:
            return True
        if self.max_length is not None and self.message_count >= self.max_length:
            return False
        return not (self.max_length_bytes is not None and self.ready_bytes + size > self.max_length_bytes)

    def enqueue(self, message: Message, now: float, stored: bool) -> None:
        """Add a routed message; `stored` if the caller journaled it for this queue."""
        self.published += 1
        expires_at = message.expires_at
        ttl = self.message_ttl
        if ttl is not None:
            queue_expiry = now + ttl / 1000.0
            if expires_at is None or queue_expiry < expires_at:
                expires_at = queue_expiry
        priority = 0
        if self.max_priority is not None:
            p = message.properties.priority or 0
            priority = p if p <= self.max_priority else self.max_priority
        # Fast path: an idle consumer takes it at once (nothing waits ahead of it).
        if not self._ready and not self._paged and self.consumers and expires_at is None:
            consumer = self._pick_consumer()
            if consumer is not None:
                self._deliver(consumer, Entry(message, None, priority, stored))
                return
        if self._paged or len(self._ready) >= self._page_out_threshold:
            if not stored:
                self._owner.page_out(self, message)
            self._paged.append(message.msg_id)
        else:
            self._ready.append(Entry(message, expires_at, priority, stored))
            self._owner.memory_changed(len(message.body))
        self.ready_bytes += len(message.body)
        self._enforce_limits()
        if self.consumers:
            self.dispatch()

    def _enforce_limits(self) -> None:
        """max-length / max-length-bytes with drop-head: drop from the head (dead-letter, count)."""
        if self.overflow != DROP_HEAD:
            return
        max_len = self.max_length
        max_bytes = self.max_length_bytes
        while (max_len is not None and self.message_count > max_len) or (
            max_bytes is not None and self.ready_bytes > max_bytes and self.message_count
        ):
            entry = self._pop_head()
            if entry is None:
                break
            self._discard(entry, MAXLEN)

    def restore(self, msg_ids: list[int], recovered_upto: int) -> None:
        """Recovery: these durable message ids are waiting (bodies paged in as needed)."""
        self._paged.extend(msg_ids)
        self._recovered_upto = recovered_upto

    # --- consumers ---------------------------------------------------------------------------

    def add_consumer(self, consumer: Consumer) -> None:
        if any(c.exclusive for c in self.consumers):
            raise AccessRefused(f"queue '{self.name}' in vhost '{self.vhost}' in exclusive use")
        if consumer.exclusive and self.consumers:
            raise AccessRefused(f"queue '{self.name}' in vhost '{self.vhost}' in exclusive use")
        if self.exclusive_owner is not None and consumer.owner is not self.exclusive_owner:
            raise ResourceLocked(
                f"cannot obtain exclusive access to locked queue '{self.name}' in vhost '{self.vhost}'"
            )
        consumer.queue = self
        self.consumers.append(consumer)
        self.had_consumer = True
        self.last_used = self._clock()
        self.dispatch()

    def remove_consumer(self, consumer: Consumer) -> None:
        """Cancel a consumer. Its unacked entries stay with the session until it settles them."""
        if consumer in self.consumers:
            self.consumers.remove(consumer)
            self._next_consumer = 0
        self.last_used = self._clock()
        if not self.consumers and self.auto_delete and self.had_consumer:
            self._owner.queue_unused(self)
        elif self.consumers:
            self.dispatch()

    def active_consumer(self) -> Consumer | None:
        """With single-active-consumer, the one that receives (the earliest registered)."""
        return self.consumers[0] if self.consumers else None

    def _pick_consumer(self) -> Consumer | None:
        consumers = self.consumers
        n = len(consumers)
        if n == 1 or self.single_active:
            c = consumers[0]
            return c if c.can_take() else None
        start = self._next_consumer
        for k in range(n):
            i = (start + k) % n
            c = consumers[i]
            if c.can_take():
                self._next_consumer = (i + 1) % n
                return c
        return None

    def dispatch(self) -> None:
        """Deliver ready messages to consumers with credit, round-robin."""
        if self.deleted:
            return
        while self.consumers:
            if not self._ready and not self._page_in():
                return
            consumer = self._pick_consumer()
            if consumer is None:
                return
            entry = self._pop_head()
            if entry is None:
                return
            self._deliver(consumer, entry)

    def _deliver(self, consumer: Consumer, entry: Entry) -> None:
        entry.delivery_count += 1
        self.delivered += 1
        if consumer.no_ack:
            self._settled(entry)
        else:
            entry.consumer = consumer
            entry.held = True
            consumer.unacked += 1
            cc = consumer.channel_credit
            if cc is not None:
                cc.unacked += 1
            self.unacked_count += 1
        consumer.deliver(self, entry)

    def _pop_head(self) -> Entry | None:
        """The next live entry (expired heads are dead-lettered on the way), or None."""
        while True:
            ready = self._ready
            if not ready and not self._page_in():
                return None
            entry: Entry = ready.popleft()
            size = len(entry.message.body)
            self.ready_bytes -= size
            self._owner.memory_changed(-size)
            if entry.expires_at is not None and entry.expires_at <= self._clock():
                self._discard(entry, EXPIRED)
                continue
            return entry

    def _page_in(self) -> bool:
        """Load the next batch of paged messages into `_ready`; False if nothing was paged."""
        if not self._paged:
            return False
        ids = [self._paged.popleft() for _ in range(min(_PAGE_IN_BATCH, len(self._paged)))]
        messages = self._owner.load_messages(ids)
        loaded = 0
        # The queue's TTL counts from page-in for these: their enqueue time is not stored.
        ttl_deadline = None if self.message_ttl is None else self._clock() + self.message_ttl / 1000.0
        max_priority = self.max_priority
        for message in messages:
            expires_at = message.expires_at
            if ttl_deadline is not None and (expires_at is None or ttl_deadline < expires_at):
                expires_at = ttl_deadline
            priority = 0
            if max_priority is not None:
                priority = min(message.properties.priority or 0, max_priority)
            entry = Entry(message, expires_at, priority, True)
            if message.msg_id <= self._recovered_upto:
                entry.redelivered = True
            self._ready.append(entry)
            loaded += len(message.body)
        self._owner.memory_changed(loaded)
        return bool(self._ready)

    # --- settlement ------------------------------------------------------------------------

    def _release(self, entry: Entry) -> None:
        if not entry.held:
            return
        entry.held = False
        self.unacked_count -= 1
        consumer = entry.consumer
        if consumer is not None:
            entry.consumer = None
            consumer.unacked -= 1
            cc = consumer.channel_credit
            if cc is not None:
                cc.unacked -= 1

    def _settled(self, entry: Entry) -> None:
        """The entry leaves the queue for good: journal its removal if the store holds it."""
        if entry.stored and not self.deleted:
            entry.stored = False
            self._owner.journal_removed(self, entry.message.msg_id)

    def ack(self, entry: Entry) -> None:
        """The consumer acknowledged the delivery."""
        self._release(entry)
        self.acked += 1
        self._settled(entry)
        if self._ready or self._paged:
            self.dispatch()

    def reject(self, entry: Entry, requeue: bool) -> None:
        """nack/reject: back to the head (flagged redelivered) or dead-lettered."""
        self._release(entry)
        if requeue and not self.deleted:
            if self.delivery_limit is not None and entry.delivery_count > self.delivery_limit:
                self._discard(entry, DELIVERY_LIMIT)
            else:
                self._requeue(entry)
        else:
            self._discard(entry, REJECTED)
        if self._ready:
            self.dispatch()

    def requeue_many(self, entries: list[Entry]) -> None:
        """Return unacked entries (consumer gone, recover): in order, at the head."""
        for entry in reversed(entries):
            self._release(entry)
            if self.deleted:
                continue
            if self.delivery_limit is not None and entry.delivery_count > self.delivery_limit:
                self._discard(entry, DELIVERY_LIMIT)
            else:
                self._requeue(entry)
        self.dispatch()

    def _requeue(self, entry: Entry) -> None:
        entry.redelivered = True
        self._ready.appendleft(entry)
        size = len(entry.message.body)
        self.ready_bytes += size
        self._owner.memory_changed(size)

    def _discard(self, entry: Entry, reason: str) -> None:
        """The entry leaves by a limit or a reject: dead-letter if configured, else count it."""
        self._settled(entry)
        if reason != REJECTED:
            self.dropped += 1
        self._owner.dead_letter(self, entry.message, reason)

    def get(self, no_ack: bool) -> Entry | None:
        """basic.get: the head entry, as a delivery to nobody (the session tracks it)."""
        self.last_used = self._clock()
        entry = self._pop_head()
        if entry is None:
            return None
        entry.delivery_count += 1
        self.delivered += 1
        if no_ack:
            self._settled(entry)
        else:
            entry.held = True
            self.unacked_count += 1
        return entry

    # --- maintenance -----------------------------------------------------------------------

    def expire(self, now: float) -> None:
        """Dead-letter expired messages at the head (as RabbitMQ does: TTL is checked at the head)."""
        ready = self._ready
        if not ready and self._paged:
            self._page_in()  # recovered or paged messages expire too
        while ready:
            head = ready[0]
            if head.expires_at is None or head.expires_at > now:
                return
            ready.popleft()
            size = len(head.message.body)
            self.ready_bytes -= size
            self._owner.memory_changed(-size)
            self._discard(head, EXPIRED)

    def purge(self) -> int:
        """Drop every ready message (not the unacked ones); returns how many."""
        count = self.message_count
        for entry in list(self._ready):
            self._owner.memory_changed(-len(entry.message.body))
        self._ready.clear()
        self._paged.clear()
        self.ready_bytes = 0
        return count

    def drain_for_delete(self) -> list[Entry]:
        """The queue is being deleted: forget ready entries; return them (for counting)."""
        entries = list(self._ready)
        for entry in entries:
            self._owner.memory_changed(-len(entry.message.body))
        self._ready.clear()
        self._paged.clear()
        self.ready_bytes = 0
        self.deleted = True
        return entries
