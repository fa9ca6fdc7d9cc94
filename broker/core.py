"""The broker core: virtual hosts, their exchanges, queues and bindings, publishing and recovery.

Synchronous and I/O-free (docs/architecture.md): protocol sessions call it, it calls back consumers'
`deliver`, and it describes every change to durable state as a journal record handed to the
store port. Time comes from an injected clock; `Broker.tick()` runs expiry and is called
periodically by the composition root.

Publishing in short: `VHost.publish` routes the message through the exchange graph to a set of
queues, journals it once (body stored once) if it is persistent and any of those queues is
durable, and enqueues it. The caller learns from the `PublishResult` whether it must wait for
the store (`store.when_durable`) before confirming to the publisher (README, Guarantees).

Must not import: asyncio, protocols, storage backends (only the port, broker.journal), cluster.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from broker.errors import AccessRefused, NotFound, PreconditionFailed, ResourceLocked
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
    Recovered,
    RetainedCleared,
    RetainedSet,
    SessionDeleted,
    SessionSaved,
    Store,
)
from broker.message import Message
from broker.names import key_levels
from broker.queue import DELIVERY_LIMIT, EXPIRED, MAXLEN, REJECT_PUBLISH_DLX, Queue
from broker.routing import EXCHANGE_TYPES, Exchange, make_exchange

log = logging.getLogger("polybroker.core")

#: Seconds between two log lines about one queue's limit-forced drops: a client over its queue
#: limit (an MQTT subscriber that does not read) would otherwise log one line per message.
DROP_LOG_INTERVAL: Final = 1.0

DEFAULT_VHOST = "/"
#: Exchanges every vhost has (README, Names across protocols).
PREDECLARED = (
    ("", "direct"),
    ("amq.direct", "direct"),
    ("amq.fanout", "fanout"),
    ("amq.topic", "topic"),
    ("amq.headers", "headers"),
    ("amq.match", "headers"),
)
MAX_NAME_LENGTH = 255  # AMQP shortstr


@dataclass(slots=True)
class PublishResult:
    """What happened to a published message.

    routed: reached at least one queue. rejected: a queue with `x-overflow=reject-publish`
    refused it (confirm with nack). needs_sync: it was journaled; confirm only after
    `store.when_durable`.
    """

    routed: bool
    rejected: bool = False
    needs_sync: bool = False


NOT_ROUTED = PublishResult(False)
ROUTED = PublishResult(True)
ROUTED_DURABLE = PublishResult(True, False, True)


@dataclass(frozen=True, slots=True)
class CoreLimits:
    page_out_threshold: int = 10000
    memory_high_watermark: int = 1 << 30


class Broker:
    """All virtual hosts, the store port, the clock and broker-wide counters."""

    def __init__(
        self,
        store: Store,
        # Wall-clock seconds: message expiry deadlines are stored with persistent messages and
        # must still mean the same instant after a restart (a monotonic clock restarts at boot).
        clock: Callable[[], float] = time.time,
        wall_clock: Callable[[], float] = time.time,
        limits: CoreLimits | None = None,
        vhosts: Iterable[str] = (DEFAULT_VHOST,),
    ) -> None:
        self.store = store
        self.clock = clock
        self.wall_clock = wall_clock
        self.limits = limits or CoreLimits()
        self.vhosts: dict[str, VHost] = {}
        self._next_msg_id = 1
        self.ram_bytes = 0
        # Broker-wide counters (metrics and MQTT $SYS).
        self.messages_published = 0
        self.messages_dropped = 0
        self.messages_dead_lettered = 0
        for name in vhosts:
            self.add_vhost(name)
        if DEFAULT_VHOST not in self.vhosts:
            self.add_vhost(DEFAULT_VHOST)

    def add_vhost(self, name: str) -> VHost:
        vhost = self.vhosts.get(name)
        if vhost is None:
            vhost = self.vhosts[name] = VHost(self, name)
        return vhost

    def vhost(self, name: str) -> VHost:
        vhost = self.vhosts.get(name)
        if vhost is None:
            raise NotFound(f"no vhost '{name}'")
        return vhost

    def next_msg_id(self) -> int:
        n = self._next_msg_id
        self._next_msg_id = n + 1
        return n

    @property
    def memory_alarm(self) -> bool:
        """Bodies held in RAM are above the high watermark: publishers should be paused."""
        return self.ram_bytes > self.limits.memory_high_watermark

    def when_durable(self, callback: Callable[[], None]) -> None:
        self.store.when_durable(callback)

    def recover(self, recovered: Recovered) -> None:
        """Rebuild durable state found by `Store.open()` (before any client connects)."""
        self._next_msg_id = max(self._next_msg_id, recovered.next_msg_id)
        upto = recovered.next_msg_id - 1
        for ex in recovered.exchanges:
            vh = self.add_vhost(ex.vhost)
            if ex.name not in vh.exchanges:
                vh.exchanges[ex.name] = make_exchange(
                    ex.name, ex.type, True, ex.auto_delete, ex.internal, dict(ex.arguments)
                )
        for q in recovered.queues:
            vh = self.add_vhost(q.vhost)
            queue = vh.make_queue(q.name, True, None, q.auto_delete, dict(q.arguments))
            vh.queues[q.name] = queue
            ids = recovered.queue_messages.get((q.vhost, q.name))
            if ids:
                queue.restore(ids, upto)
        for b in recovered.bindings:
            vh = self.add_vhost(b.vhost)
            source = vh.exchanges.get(b.source)
            dest: Any = (vh.exchanges if b.destination_is_exchange else vh.queues).get(b.destination)
            if source is not None and dest is not None:
                source.add_binding(dest, b.routing_key, dict(b.arguments))
        for r in recovered.retained:
            self.add_vhost(r.vhost).retained[r.topic] = r.message

    def tick(self) -> None:
        """Periodic maintenance: message TTL at queue heads, unused-queue expiry (`x-expires`)."""
        now = self.clock()
        for vhost in self.vhosts.values():
            vhost.tick(now)

    def memory_changed(self, delta: int) -> None:
        self.ram_bytes += delta


class _Drops:
    """One queue's limit-forced drops since its last log line, by reason, and when that line was."""

    __slots__ = ("counts", "logged_at")

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.logged_at = -math.inf


class VHost:
    """A namespace of exchanges, queues and bindings (README, Names across protocols). Implements QueueOwner."""

    def __init__(self, broker: Broker, name: str) -> None:
        self.broker = broker
        self.name = name
        self.exchanges: dict[str, Exchange] = {}
        self.queues: dict[str, Queue] = {}
        # MQTT retained messages by routing key (topic in AMQP form).
        self.retained: dict[str, Message] = {}
        self._store = broker.store
        self._server_named = 0
        # Queues that dropped a message (no dead-letter exchange) within DROP_LOG_INTERVAL.
        self._drops: dict[str, _Drops] = {}
        for ex_name, ex_type in PREDECLARED:
            self.exchanges[ex_name] = make_exchange(ex_name, ex_type, True)

    # --- QueueOwner ----------------------------------------------------------------------

    def journal_removed(self, queue: Queue, msg_id: int) -> None:
        self._store.append(MessageRemoved(self.name, queue.name, msg_id))

    def page_out(self, queue: Queue, message: Message) -> None:
        self._store.append(MessageEnqueued(self.name, (queue.name,), message, False))

    def load_messages(self, msg_ids: list[int]) -> list[Message]:
        return self._store.load_messages(msg_ids)

    def memory_changed(self, delta: int) -> None:
        self.broker.ram_bytes += delta

    def queue_unused(self, queue: Queue) -> None:
        """Auto-delete: the last consumer went away."""
        if self.queues.get(queue.name) is queue:
            self._remove_queue(queue)

    def dead_letter(self, queue: Queue, message: Message, reason: str) -> None:
        """Republish a message that left `queue` by `reason` to its dead-letter exchange.

        Adds RabbitMQ's `x-death` history and drops the per-message TTL, as RabbitMQ does, so
        an expired message does not expire again at once. Without a dead-letter exchange a
        limit-forced drop is counted and logged (README, Guarantees), at most one line per queue per
        DROP_LOG_INTERVAL.
        """
        broker = self.broker
        dlx = queue.dead_letter_exchange
        if dlx is None or dlx not in self.exchanges:
            if reason in (MAXLEN, EXPIRED, DELIVERY_LIMIT):
                broker.messages_dropped += 1
                self._note_drop(queue.name, reason)
            return
        broker.messages_dead_lettered += 1
        routing_key = queue.dead_letter_routing_key or message.routing_key
        props = message.properties.copy()
        headers = props.headers if props.headers is not None else {}
        props.headers = headers
        deaths = list(headers.get("x-death") or [])
        for death in deaths:
            if isinstance(death, dict) and death.get("queue") == queue.name and death.get("reason") == reason:
                death["count"] = int(death.get("count", 1)) + 1
                deaths.remove(death)
                deaths.insert(0, death)
                break
        else:
            death = {
                "count": 1,
                "reason": reason,
                "queue": queue.name,
                "time": int(broker.wall_clock()),
                "exchange": message.exchange,
                "routing-keys": [message.routing_key],
            }
            if props.expiration is not None:
                death["original-expiration"] = props.expiration
            deaths.insert(0, death)
        headers["x-death"] = deaths
        if "x-first-death-reason" not in headers:
            headers["x-first-death-reason"] = reason
            headers["x-first-death-queue"] = queue.name
            headers["x-first-death-exchange"] = message.exchange
        props.expiration = None
        dead = Message(dlx, routing_key, message.body, props)
        self._publish(dead, mandatory=False, skip=queue)

    def _note_drop(self, queue: str, reason: str) -> None:
        drops = self._drops.get(queue)
        if drops is None:
            drops = self._drops[queue] = _Drops()
        drops.counts[reason] = drops.counts.get(reason, 0) + 1
        now = self.broker.clock()
        if now - drops.logged_at >= DROP_LOG_INTERVAL:
            self._log_drops(queue, drops, now)

    def _log_drops(self, queue: str, drops: _Drops, now: float) -> None:
        counts = drops.counts
        log.info(
            "queue '%s' in vhost '%s' dropped %d message(s) (%s)",
            queue,
            self.name,
            sum(counts.values()),
            ", ".join(f"{reason}: {count}" for reason, count in counts.items()),
        )
        drops.counts = {}
        drops.logged_at = now

    # --- exchanges -----------------------------------------------------------------------

    def declare_exchange(
        self,
        name: str,
        type: str,  # noqa: A002 - AMQP's name
        durable: bool = True,
        auto_delete: bool = False,
        internal: bool = False,
        arguments: dict[str, Any] | None = None,
        passive: bool = False,
    ) -> Exchange:
        existing = self.exchanges.get(name)
        if passive:
            if existing is None:
                raise NotFound(f"no exchange '{name}' in vhost '{self.name}'")
            return existing
        if name.startswith("amq.") and existing is None:
            raise AccessRefused(f"exchange name '{name}' contains reserved prefix 'amq.*'")
        if type not in EXCHANGE_TYPES:
            raise PreconditionFailed(f"unknown exchange type '{type}'")  # RabbitMQ: 503; see README
        if existing is not None:
            if existing.type != type or existing.durable != durable or existing.auto_delete != auto_delete:
                raise PreconditionFailed(
                    f"inequivalent arg for exchange '{name}' in vhost '{self.name}': "
                    f"received type '{type}' durable {durable} auto_delete {auto_delete} but current is "
                    f"type '{existing.type}' durable {existing.durable} auto_delete {existing.auto_delete}"
                )
            return existing
        _check_name(name, "exchange")
        exchange = make_exchange(name, type, durable, auto_delete, internal, dict(arguments or {}))
        self.exchanges[name] = exchange
        if durable:
            self._store.append(
                ExchangeDeclared(self.name, name, type, auto_delete, internal, dict(arguments or {}))
            )
        return exchange

    def delete_exchange(self, name: str, if_unused: bool = False) -> None:
        exchange = self.exchanges.get(name)
        if exchange is None:
            raise NotFound(f"no exchange '{name}' in vhost '{self.name}'")
        if name == "" or name.startswith("amq."):
            raise AccessRefused(f"operation not permitted on exchange '{name}'")
        if if_unused and (exchange.bindings or self._exchange_is_destination(exchange)):
            raise PreconditionFailed(f"exchange '{name}' in vhost '{self.name}' in use")
        self._remove_exchange(exchange)

    def _exchange_is_destination(self, exchange: Exchange) -> bool:
        return any(b.destination is exchange for ex in self.exchanges.values() for b in ex.bindings)

    def _remove_exchange(self, exchange: Exchange) -> None:
        del self.exchanges[exchange.name]
        for binding in exchange.bindings:
            self._journal_binding(
                exchange, binding.destination, binding.routing_key, binding.arguments, False
            )
        exchange.bindings = []
        for other in list(self.exchanges.values()):
            for b in other.remove_destination(exchange):
                self._journal_binding(other, exchange, b.routing_key, b.arguments, False)
            self._maybe_auto_delete(other)
        if exchange.durable:
            self._store.append(ExchangeDeleted(self.name, exchange.name))

    def _maybe_auto_delete(self, exchange: Exchange) -> None:
        if exchange.auto_delete and not exchange.bindings and exchange.name in self.exchanges:
            self._remove_exchange(exchange)

    def exchange(self, name: str) -> Exchange:
        exchange = self.exchanges.get(name)
        if exchange is None:
            raise NotFound(f"no exchange '{name}' in vhost '{self.name}'")
        return exchange

    # --- queues --------------------------------------------------------------------------

    def make_queue(
        self,
        name: str,
        durable: bool,
        exclusive_owner: object,
        auto_delete: bool,
        arguments: dict[str, Any],
    ) -> Queue:
        return Queue(
            self,
            self.name,
            name,
            durable,
            exclusive_owner,
            auto_delete,
            arguments,
            self.broker.clock,
            self.broker.limits.page_out_threshold,
        )

    def server_named(self, prefix: str = "amq.gen-") -> str:
        self._server_named += 1
        return f"{prefix}{self._server_named:x}-{id(self) & 0xFFFF:x}{int(self.broker.wall_clock() * 1000):x}"

    def declare_queue(
        self,
        name: str,
        durable: bool = False,
        exclusive_owner: object = None,
        auto_delete: bool = False,
        arguments: dict[str, Any] | None = None,
        passive: bool = False,
        owner: object = None,
        reserved: bool = False,
    ) -> Queue:
        """Declare (or find, when `passive`) a queue. An empty name gets a server-chosen one.

        `exclusive_owner` makes the queue exclusive to that connection token (deleted by
        `release_owner`); `owner` is the declaring connection, checked against an existing
        exclusive queue. `reserved` is for queues the broker makes for itself (direct reply-to):
        only they may take a name with the `amq.` prefix, which clients may not declare.
        """
        if not name:
            if passive:
                raise NotFound(f"no queue '' in vhost '{self.name}'")
            name = self.server_named()
        existing = self.queues.get(name)
        if existing is not None:
            if existing.exclusive_owner is not None and existing.exclusive_owner is not owner:
                raise ResourceLocked(
                    f"cannot obtain exclusive access to locked queue '{name}' in vhost '{self.name}'"
                )
            if passive:
                existing.last_used = self.broker.clock()
                return existing
            args = dict(arguments or {})
            if existing.durable != durable or existing.auto_delete != auto_delete:
                raise PreconditionFailed(
                    f"inequivalent arg 'durable' for queue '{name}' in vhost '{self.name}': received "
                    f"durable {durable} auto_delete {auto_delete} but current is durable {existing.durable} "
                    f"auto_delete {existing.auto_delete}"
                )
            for key in set(args) | set(existing.arguments):
                if key.startswith("x-") and args.get(key) != existing.arguments.get(key) and key in args:
                    raise PreconditionFailed(
                        f"inequivalent arg '{key}' for queue '{name}' in vhost '{self.name}': received "
                        f"{args.get(key)!r} but current is {existing.arguments.get(key)!r}"
                    )
            existing.last_used = self.broker.clock()
            return existing
        if passive:
            raise NotFound(f"no queue '{name}' in vhost '{self.name}'")
        # AMQP 0-9-1 queue.declare, rule "amq": the prefix is reserved for the server.
        if name.startswith("amq.") and not reserved and not name.startswith("amq.gen-"):
            raise AccessRefused(f"queue name '{name}' contains reserved prefix 'amq.*'")
        _check_name(name, "queue")
        queue = self.make_queue(name, durable, exclusive_owner, auto_delete, dict(arguments or {}))
        self.queues[name] = queue
        # Every queue is bound to the default exchange by its name (AMQP 0-9-1 §3.1.3.1):
        # `_route` resolves that without a binding object.
        if durable and exclusive_owner is None:
            self._store.append(QueueDeclared(self.name, name, auto_delete, dict(queue.arguments)))
        return queue

    def queue(self, name: str, owner: object = None) -> Queue:
        queue = self.queues.get(name)
        if queue is None:
            raise NotFound(f"no queue '{name}' in vhost '{self.name}'")
        if queue.exclusive_owner is not None and owner is not None and queue.exclusive_owner is not owner:
            raise ResourceLocked(
                f"cannot obtain exclusive access to locked queue '{name}' in vhost '{self.name}'"
            )
        return queue

    def delete_queue(
        self, name: str, if_unused: bool = False, if_empty: bool = False, owner: object = None
    ) -> int:
        """Delete a queue; returns the number of ready messages it held."""
        queue = self.queue(name, owner)
        if if_unused and queue.consumers:
            raise PreconditionFailed(f"queue '{name}' in vhost '{self.name}' in use")
        if if_empty and queue.message_count:
            raise PreconditionFailed(f"queue '{name}' in vhost '{self.name}' not empty")
        count = queue.message_count
        self._remove_queue(queue)
        return count

    def _remove_queue(self, queue: Queue) -> None:
        del self.queues[queue.name]
        queue.drain_for_delete()
        for exchange in list(self.exchanges.values()):
            for b in exchange.remove_destination(queue):
                self._journal_binding(exchange, queue, b.routing_key, b.arguments, False)
            self._maybe_auto_delete(exchange)
        if queue.durable and queue.exclusive_owner is None:
            self._store.append(QueueDeleted(self.name, queue.name))
        # Consumers of a deleted queue are cancelled (AMQP basic.cancel from the server,
        # `consumer_cancel_notify`); their sessions learn it through `cancelled`.
        for consumer in list(queue.consumers):
            queue.consumers.remove(consumer)
            if consumer.on_cancel is not None:
                consumer.on_cancel()

    def purge_queue(self, name: str, owner: object = None) -> int:
        queue = self.queue(name, owner)
        count = queue.purge()
        if queue.durable and queue.exclusive_owner is None:
            self._store.append(QueuePurged(self.name, name))
        return count

    def release_owner(self, owner: object) -> None:
        """A connection closed: delete the exclusive queues it owned."""
        for queue in [q for q in self.queues.values() if q.exclusive_owner is owner]:
            self._remove_queue(queue)

    # --- bindings ------------------------------------------------------------------------

    def _journal_binding(
        self, source: Exchange, dest: Any, key: str, arguments: dict[str, Any], added: bool
    ) -> None:
        is_exchange = isinstance(dest, Exchange)
        if not (source.durable and dest.durable) or (not is_exchange and dest.exclusive_owner is not None):
            return
        record_type = BindingAdded if added else BindingRemoved
        self._store.append(record_type(self.name, source.name, dest.name, is_exchange, key, dict(arguments)))

    def bind_queue(
        self,
        queue_name: str,
        exchange_name: str,
        routing_key: str,
        arguments: dict[str, Any] | None = None,
        owner: object = None,
    ) -> None:
        queue = self.queue(queue_name, owner)
        exchange = self.exchange(exchange_name)
        if exchange_name == "":
            raise AccessRefused("operation not permitted on the default exchange")
        if exchange.add_binding(queue, routing_key, dict(arguments or {})):
            self._journal_binding(exchange, queue, routing_key, arguments or {}, True)

    def unbind_queue(
        self,
        queue_name: str,
        exchange_name: str,
        routing_key: str,
        arguments: dict[str, Any] | None = None,
        owner: object = None,
    ) -> None:
        queue = self.queue(queue_name, owner)
        exchange = self.exchange(exchange_name)
        if exchange_name == "":
            raise AccessRefused("operation not permitted on the default exchange")
        if exchange.remove_binding(queue, routing_key, dict(arguments or {})):
            self._journal_binding(exchange, queue, routing_key, arguments or {}, False)
            self._maybe_auto_delete(exchange)

    def bind_exchange(
        self, destination: str, source: str, routing_key: str, arguments: dict[str, Any] | None = None
    ) -> None:
        dest = self.exchange(destination)
        src = self.exchange(source)
        if source == "" or destination == "":
            raise AccessRefused("operation not permitted on the default exchange")
        if src.add_binding(dest, routing_key, dict(arguments or {})):
            self._journal_binding(src, dest, routing_key, arguments or {}, True)

    def unbind_exchange(
        self, destination: str, source: str, routing_key: str, arguments: dict[str, Any] | None = None
    ) -> None:
        dest = self.exchange(destination)
        src = self.exchange(source)
        if src.remove_binding(dest, routing_key, dict(arguments or {})):
            self._journal_binding(src, dest, routing_key, arguments or {}, False)
            self._maybe_auto_delete(src)

    # --- publishing ----------------------------------------------------------------------

    def publish(self, message: Message, mandatory: bool = False) -> PublishResult:
        """Route `message` (its exchange and routing key) and enqueue it.

        Raises NotFound when the exchange does not exist. An internal exchange refuses direct
        publishes (AccessRefused), as AMQP 0-9-1 §3.1.3 says.
        """
        self.broker.messages_published += 1
        exchange = self.exchanges.get(message.exchange)
        if exchange is None:
            raise NotFound(f"no exchange '{message.exchange}' in vhost '{self.name}'")
        if exchange.internal:
            raise AccessRefused(
                f"cannot publish to internal exchange '{message.exchange}' in vhost '{self.name}'"
            )
        expiration = message.properties.expiration
        if expiration is not None and message.expires_at is None:
            message.expires_at = _expiry(expiration, self.broker.clock())
        return self._publish(message, mandatory, None, exchange)

    def _publish(
        self, message: Message, mandatory: bool, skip: Queue | None, exchange: Exchange | None = None
    ) -> PublishResult:
        if exchange is None:
            exchange = self.exchanges.get(message.exchange)
            if exchange is None:
                return NOT_ROUTED
        queues = self._route(exchange, message)
        if skip is not None and skip in queues:
            # A dead-letter cycle back to the same queue: RabbitMQ drops it (cycle detection).
            queues = [q for q in queues if q is not skip]
        if not queues:
            return NOT_ROUTED
        now = self.broker.clock()
        size = len(message.body)
        rejected = False
        for queue in queues:
            if not queue.accepts(size):
                rejected = True
        if rejected:
            # x-overflow=reject-publish: the publisher gets a nack (RabbitMQ does the same
            # when any target queue refuses); reject-publish-dlx also dead-letters it.
            for queue in queues:
                if not queue.accepts(size) and queue.overflow == REJECT_PUBLISH_DLX:
                    self.dead_letter(queue, message, MAXLEN)
            queues = [q for q in queues if q.accepts(size)]
            if not queues:
                return PublishResult(True, True, False)
        message.msg_id = self.broker.next_msg_id()
        durable_names: tuple[str, ...] = ()
        if message.properties.delivery_mode == 2:
            durable_names = tuple(q.name for q in queues if q.durable and q.exclusive_owner is None)
            if durable_names:
                self._store.append(MessageEnqueued(self.name, durable_names, message, True))
        if len(queues) == 1:
            queues[0].enqueue(message, now, bool(durable_names))
        else:
            for queue in queues:
                queue.enqueue(message, now, queue.name in durable_names)
        if rejected:
            return PublishResult(True, True, bool(durable_names))
        return ROUTED_DURABLE if durable_names else ROUTED

    def _route(self, exchange: Exchange, message: Message) -> list[Queue]:
        """The queues `message` reaches from `exchange`, following exchange bindings and alternates."""
        if exchange.name == "":
            queue = self.queues.get(message.routing_key)
            return [queue] if queue is not None else []
        headers = message.properties.headers
        dests = exchange.route(message.routing_key, headers)
        if dests:
            for dest in dests:
                if not isinstance(dest, Queue):
                    break
            else:  # the common case: only queues are bound, no graph to walk
                return dests if isinstance(dests, list) else list(dests)
        found: dict[Queue, None] = {}
        seen: set[int] = set()
        pending = [exchange]
        while pending:
            ex = pending.pop()
            if id(ex) in seen:
                continue
            seen.add(id(ex))
            hit = False
            for dest in ex.route(message.routing_key, headers):
                hit = True
                if isinstance(dest, Queue):
                    found[dest] = None
                else:
                    pending.append(dest)
            if not hit and ex.alternate is not None:
                alt = self.exchanges.get(ex.alternate)
                if alt is not None:
                    pending.append(alt)
        return list(found)

    # --- retained messages (MQTT) ----------------------------------------------------------

    def set_retained(self, topic_key: str, message: Message | None) -> None:
        """Store (or with None / an empty body, clear) the retained message of a topic."""
        if message is None or not message.body:
            if self.retained.pop(topic_key, None) is not None:
                self._store.append(RetainedCleared(self.name, topic_key))
            return
        self.retained[topic_key] = message
        self._store.append(RetainedSet(self.name, topic_key, message))

    def retained_matching(self, filter_key: str) -> list[Message]:
        """Retained messages whose topic matches a topic-exchange pattern (AMQP form)."""
        now = self.broker.clock()
        pattern = key_levels(filter_key)
        found = []
        for topic, message in list(self.retained.items()):
            if message.expires_at is not None and message.expires_at <= now:
                self.set_retained(topic, None)
                continue
            if _pattern_matches(pattern, key_levels(topic)):
                found.append(message)
        return found

    # --- protocol sessions' durable state -------------------------------------------------

    def save_session(self, client_id: str, state: bytes) -> None:
        self._store.append(SessionSaved(self.name, client_id, state))

    def delete_session(self, client_id: str) -> None:
        self._store.append(SessionDeleted(self.name, client_id))

    # --- maintenance ---------------------------------------------------------------------

    def tick(self, now: float) -> None:
        # Drops held back by the log interval are logged once it has passed; a queue quiet for
        # a whole interval is forgotten.
        for name, drops in list(self._drops.items()):
            if now - drops.logged_at >= DROP_LOG_INTERVAL:
                if drops.counts:
                    self._log_drops(name, drops, now)
                else:
                    del self._drops[name]
        for queue in list(self.queues.values()):
            if queue.message_ttl is not None or queue.message_count:
                queue.expire(now)
            if (
                queue.expires is not None
                and not queue.consumers
                and now - queue.last_used >= queue.expires / 1000.0
                and self.queues.get(queue.name) is queue
            ):
                log.info("queue '%s' in vhost '%s' expired (unused)", queue.name, self.name)
                self._remove_queue(queue)


def _check_name(name: str, what: str) -> None:
    if len(name.encode()) > MAX_NAME_LENGTH:
        raise PreconditionFailed(f"{what} name is longer than {MAX_NAME_LENGTH} bytes")


def _expiry(expiration: str, now: float) -> float:
    """AMQP `expiration` (milliseconds as a string) -> clock deadline."""
    try:
        ms = int(expiration)
    except ValueError:
        raise PreconditionFailed(f"invalid expiration '{expiration}'") from None
    if ms < 0:
        raise PreconditionFailed(f"invalid expiration '{expiration}'")
    return now + ms / 1000.0


def _pattern_matches(pattern: list[str], words: list[str]) -> bool:
    """Topic pattern match over levels (for retained lookups; routing uses the trie)."""
    if words and words[0].startswith("$") and pattern and pattern[0] in ("*", "#"):
        return False

    def match(p: int, w: int) -> bool:
        while p < len(pattern):
            token = pattern[p]
            if token == "#":
                if p == len(pattern) - 1:
                    return True
                return any(match(p + 1, k) for k in range(w, len(words) + 1))
            if w >= len(words) or (token != "*" and token != words[w]):
                return False
            p += 1
            w += 1
        return w == len(words)

    return match(0, 0)
