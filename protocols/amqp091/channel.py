"""One AMQP 0-9-1 channel: the class exchange/queue/basic/confirm/tx methods against the broker core.

`AmqpChannel` is driven by its connection's `AmqpSession` (session.py), which parses frames, assembles
content (a `ContentAssembler` per channel, held here) and hands each whole command to `publish` (the
per-message hot path) or `handle` (everything else). A method the peer may not send, or a refusal of
the core, raises `AmqpFrameError` (or the core's `BrokerError`); the session turns it into
Channel.Close for a soft code or Connection.Close for a hard one (AMQP 0-9-1 §1.2 "reply codes").

Theory of operation
-------------------
Deliveries: every `basic.consume` makes a `ChannelConsumer`, whose `deliver` the core calls (from
inside some session's publish). It numbers the delivery with the channel's next delivery tag, keeps
`(queue, entry)` in `unacked` (an insertion-ordered dict, so tags are in increasing order and
`ack multiple` walks only the acknowledged prefix) and writes Basic.Deliver with `encode_delivery`.

Publisher confirms (RabbitMQ's extension, "confirm.select"): each publish on a confirming channel gets
the next sequence number. The session calls `end_batch` once per received chunk: if a message of the
batch was journaled (`PublishResult.needs_sync`, README, Guarantees) or an earlier batch still waits for the
store, ONE `when_durable` callback confirms the whole batch; otherwise it is confirmed at once. The
store runs callbacks in registration order, so confirms go out in order, as one `basic.ack multiple`
per batch, with `basic.nack` for the (rare) messages an `x-overflow=reject-publish` queue refused.

Transactions (AMQP 0-9-1 §1.9 class tx): publishes and acknowledgements are held until tx.commit and
dropped by tx.rollback (acknowledged deliveries become unacknowledged again, as RabbitMQ does);
commit-ok is sent once the committed persistent messages are durable.

Must not import: asyncio, storage, cluster, other protocol packages (mqtt, stomp, transport).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from pamqp import base
from pamqp.commands import Basic, Channel, Confirm, Exchange, Queue, Tx

from broker.message import EMPTY_PROPERTIES, Message, Properties
from broker.queue import ChannelCredit, Consumer, Entry
from broker.queue import Queue as CoreQueue
from broker.routing import EXCHANGE_TYPES
from protocols.amqp091.codec import (
    ContentAssembler,
    encode_basic_ack,
    encode_basic_nack,
    encode_content,
    encode_delivery,
    encode_method,
    encode_properties,
)
from protocols.amqp091.constants import (
    CHANNEL_ERROR,
    COMMAND_INVALID,
    NO_ROUTE,
    NOT_ALLOWED,
    NOT_FOUND,
    NOT_IMPLEMENTED,
    PRECONDITION_FAILED,
)
from protocols.amqp091.errors import AmqpFrameError

if TYPE_CHECKING:
    from broker.core import VHost
    from protocols.amqp091.session import AmqpSession

#: The pseudo-queue of RabbitMQ's direct reply-to (consume from it no-ack, publish with it as reply_to).
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"

_PUBLISH = Basic.Publish


class ChannelState(enum.Enum):
    OPEN = "open"
    #: We sent Channel.Close after an error and wait for Channel.CloseOk (AMQP 0-9-1 §2.2.4 "closing").
    CLOSING = "closing"
    CLOSED = "closed"


class Settlement(enum.Enum):
    """What a transaction does with a delivery at tx.commit."""

    ACK = "ack"
    #: basic.reject / basic.nack with requeue=false: dead-letter or drop.
    REJECT = "reject"
    REQUEUE = "requeue"


class ChannelMode(enum.Enum):
    NORMAL = "normal"
    #: confirm.select was received: every publish is acked or nacked.
    CONFIRM = "confirm"
    #: tx.select was received: publishes and acks wait for tx.commit.
    TX = "tx"


def method_error(code: int, text: str, method: base.Frame | type[base.Frame]) -> AmqpFrameError:
    """An error about `method`, carrying its class and method ids (for Channel/Connection.Close)."""
    index = method.index
    return AmqpFrameError(code, text, index >> 16, index & 0xFFFF)


def method_name(method: base.Frame | type[base.Frame]) -> str:
    """RabbitMQ's spelling of a method's name, as in its reply texts ("basic.consume")."""
    name = method.name
    return f"{name[:-2].lower()}-ok" if name.endswith("Ok") else name.lower()


def raw_method(cls: type[base.Frame], **values: Any) -> base.Frame:
    """A method object made without pamqp's constructor checks (its name patterns are a client's rules;
    a server echoes names clients of other protocols chose). Every non-bit argument must be given."""
    method = cls.__new__(cls)
    for name in cls.attributes():
        setattr(method, name, values.get(name, False))
    return method


class ChannelConsumer:
    """A `basic.consume` of this channel: the core's `Consumer` and the delivery encoder for it."""

    __slots__ = ("channel", "tag", "tag_bytes", "consumer", "no_ack", "out", "pending")

    def __init__(self, channel: AmqpChannel, tag: str, no_ack: bool) -> None:
        self.channel = channel
        self.tag = tag
        self.tag_bytes = tag.encode()
        self.no_ack = no_ack
        self.consumer: Consumer
        # Deliveries made while the core registers the consumer wait here until consume-ok is written
        # (AMQP 0-9-1 §1.8.3.3: consume-ok comes before the first basic.deliver).
        self.pending: list[bytes] = []
        self.out: Callable[[bytes], None] = self.pending.append

    def deliver(self, queue: CoreQueue, entry: Entry) -> None:
        """The core's deliver callback: number the delivery and write Basic.Deliver + content."""
        channel = self.channel
        tag = channel.next_delivery_tag
        channel.next_delivery_tag = tag + 1
        if not self.no_ack:
            channel.unacked[tag] = (queue, entry)
        message = entry.message
        try:
            data = encode_delivery(
                channel.number,
                self.tag_bytes,
                tag,
                entry.redelivered,
                message.exchange,
                message.routing_key,
                message.properties,
                message.body,
                channel.session.frame_max,
            )
        except (TypeError, ValueError):
            data = _encode_delivery_lossy(channel, self.tag_bytes, tag, entry.redelivered, message)
        channel.session.stats.messages_sent += 1
        self.out(data)

    def start(self, write: Callable[[bytes], None]) -> None:
        """consume-ok was written: flush what was delivered meanwhile and write directly from now on."""
        self.out = write
        pending, self.pending = self.pending, []
        for data in pending:
            write(data)

    def cancelled_by_broker(self) -> None:
        """The core cancelled the consumer (its queue was deleted): tell the client (RabbitMQ's
        consumer_cancel_notify capability) and forget the consumer; its unacked deliveries stay."""
        channel = self.channel
        if channel.consumers.get(self.tag) is not self:
            return
        del channel.consumers[self.tag]
        if channel.reply_consumer is self:
            channel.reply_consumer = None
        if channel.state is ChannelState.OPEN and channel.session.cancel_notify:
            channel.write(
                encode_method(channel.number, raw_method(Basic.Cancel, consumer_tag=self.tag, nowait=True))
            )


def _encode_delivery_lossy(
    channel: AmqpChannel, tag_bytes: bytes, delivery_tag: int, redelivered: bool, message: Message
) -> bytes:
    """A delivery of a message that AMQP cannot carry whole (see `carriable`)."""
    exchange, routing_key, properties = carriable(message)
    return encode_delivery(
        channel.number,
        tag_bytes,
        delivery_tag,
        redelivered,
        exchange,
        routing_key,
        properties,
        message.body,
        channel.session.frame_max,
    )


def carriable(message: Message) -> tuple[str, str, Properties]:
    """Exchange, routing key and properties of `message` with what AMQP cannot carry left out
    (docs/sessions.md): a name past a shortstr's 255 octets (a long MQTT topic) becomes "", a property
    that does not encode (a header value without a field-table type) is dropped."""
    exchange = message.exchange if len(message.exchange.encode()) <= 255 else ""
    routing_key = message.routing_key if len(message.routing_key.encode()) <= 255 else ""
    return exchange, routing_key, _carriable_properties(message.properties)


def _carriable_properties(props: Properties) -> Properties:
    try:
        encode_properties(props)
        return props
    except (TypeError, ValueError):
        pass
    kept = Properties()
    for name, value in props.as_dict().items():
        trial = Properties(**{name: value})
        try:
            encode_properties(trial)
        except (TypeError, ValueError):
            continue
        setattr(kept, name, value)
    return kept


class AmqpChannel:
    """One open channel of an AMQP connection. See the module docstring."""

    __slots__ = (
        "session",
        "number",
        "state",
        "assembler",
        "vhost",
        "write",
        "consumers",
        "unacked",
        "next_delivery_tag",
        "prefetch",
        "credit",
        "mode",
        "flow_active",
        "publish_seq",
        "confirmed_upto",
        "nacks",
        "batch_sync",
        "in_batch",
        "durable_waits",
        "tx_publishes",
        "tx_settles",
        "last_queue",
        "reply_consumer",
    )

    def __init__(self, session: AmqpSession, number: int, vhost: VHost, max_body_size: int) -> None:
        self.session = session
        self.number = number
        self.state = ChannelState.OPEN
        self.assembler = ContentAssembler(max_body_size)
        self.vhost = vhost
        self.write = session.write
        self.consumers: dict[str, ChannelConsumer] = {}
        #: delivery tag -> (queue, entry), in tag order.
        self.unacked: dict[int, tuple[CoreQueue, Entry]] = {}
        self.next_delivery_tag = 1
        #: basic.qos global=false: the prefetch of consumers created from now on.
        self.prefetch = 0
        #: basic.qos global=true: the limit shared by the channel's consumers.
        self.credit: ChannelCredit | None = None
        self.mode = ChannelMode.NORMAL
        self.flow_active = True
        # Publisher confirms: last sequence number given, last one confirmed on the wire, refused ones.
        self.publish_seq = 0
        self.confirmed_upto = 0
        self.nacks: list[int] = []
        self.batch_sync = False
        self.in_batch = False
        self.durable_waits = 0
        # Transactions: (message, mandatory) and (queue, entry, delivery tag, settlement) until commit.
        self.tx_publishes: list[tuple[Message, bool]] = []
        self.tx_settles: list[tuple[CoreQueue, Entry, int, Settlement]] = []
        #: The queue this channel declared last (AMQP 0-9-1 §1.7.2: an empty queue name means it).
        self.last_queue = ""
        self.reply_consumer: ChannelConsumer | None = None

    # --- the per-message path --------------------------------------------------------------------

    def publish(self, method: Any, props: Properties, body: bytes) -> None:
        """basic.publish with its content (AMQP 0-9-1 §1.8.3.7)."""
        if method.immediate:
            # RabbitMQ dropped `immediate` in 3.0; a hard error, as there.
            raise method_error(NOT_IMPLEMENTED, "immediate=true", _PUBLISH)
        session = self.session
        if props is not EMPTY_PROPERTIES:
            if props.reply_to == DIRECT_REPLY_TO:
                reply = self.reply_consumer
                if reply is None:
                    raise method_error(PRECONDITION_FAILED, "fast reply consumer does not exist", _PUBLISH)
                props.reply_to = reply.consumer.queue.name  # type: ignore[union-attr]
            user_id = props.user_id
            if user_id is not None and user_id != session.username:
                raise method_error(
                    PRECONDITION_FAILED,
                    f"user_id property set to '{user_id}' but authenticated user was '{session.username}'",
                    _PUBLISH,
                )
        message = Message(method.exchange, method.routing_key, body, props, origin=session)
        session.stats.messages_received += 1
        mode = self.mode
        if mode is ChannelMode.TX:
            self.vhost.exchange(method.exchange)  # 404 now, as RabbitMQ does, not at commit
            self.tx_publishes.append((message, method.mandatory))
            return
        result = self.vhost.publish(message, method.mandatory)
        if not result.routed and method.mandatory:
            self._return(message)
        session.published = True
        if mode is ChannelMode.CONFIRM:
            seq = self.publish_seq = self.publish_seq + 1
            if result.rejected:
                self.nacks.append(seq)
            if result.needs_sync:
                self.batch_sync = True
            if not self.in_batch:
                self.in_batch = True
                session.confirm_batch.append(self)

    def _return(self, message: Message) -> None:
        """basic.return of an unroutable mandatory message (AMQP 0-9-1 §1.8.3.8), before its confirm."""
        method = raw_method(
            Basic.Return,
            reply_code=NO_ROUTE,
            reply_text="NO_ROUTE",
            exchange=message.exchange,
            routing_key=message.routing_key,
        )
        self.write(
            encode_content(self.number, method, message.properties, message.body, self.session.frame_max)
        )

    def end_batch(self) -> None:
        """The session handled a received chunk: confirm this channel's publishes of it (see module doc)."""
        self.in_batch = False
        upto = self.publish_seq
        if self.batch_sync or self.durable_waits:
            self.batch_sync = False
            self.durable_waits += 1
            self.session.context.broker.when_durable(lambda: self._durable(upto))
        else:
            self._confirm(upto)

    def _durable(self, upto: int) -> None:
        self.durable_waits -= 1
        if self.state is ChannelState.OPEN:
            self._confirm(upto)

    def _confirm(self, upto: int) -> None:
        done = self.confirmed_upto
        if upto <= done:
            return
        number = self.number
        nacks = self.nacks
        if not nacks or nacks[0] > upto:
            self.write(encode_basic_ack(number, upto, upto > done + 1))
        else:
            parts = []
            while nacks and nacks[0] <= upto:
                tag = nacks.pop(0)
                if tag - 1 > done:
                    parts.append(encode_basic_ack(number, tag - 1, tag - 1 > done + 1))
                parts.append(encode_basic_nack(number, tag))
                done = tag
            if upto > done:
                parts.append(encode_basic_ack(number, upto, upto > done + 1))
            self.write(b"".join(parts))
        self.confirmed_upto = upto

    def ack(self, method: Any) -> None:
        """basic.ack from the consumer (AMQP 0-9-1 §1.8.3.13); multiple acks every tag up to it."""
        taken = self._take(method, method.delivery_tag, method.multiple)
        if self.mode is ChannelMode.TX:
            self.tx_settles.extend((queue, entry, tag, Settlement.ACK) for tag, queue, entry in taken)
            return
        for _, queue, entry in taken:
            queue.ack(entry)

    def _take(self, method: Any, tag: int, multiple: bool) -> list[tuple[int, CoreQueue, Entry]]:
        """Remove and return the deliveries a basic.ack/nack/reject settles, in tag order."""
        unacked = self.unacked
        if multiple and tag == 0:
            # AMQP 0-9-1 §1.8.3.13: multiple with tag 0 means "everything outstanding".
            taken = [(t, q, e) for t, (q, e) in unacked.items()]
            unacked.clear()
            return taken
        if tag not in unacked:
            raise method_error(PRECONDITION_FAILED, f"unknown delivery tag {tag}", method)
        if not multiple:
            queue, entry = unacked.pop(tag)
            return [(tag, queue, entry)]
        tags = []
        for t in unacked:  # in tag order: stops at the acknowledged prefix's end
            tags.append(t)
            if t >= tag:
                break
        pop = unacked.pop
        return [(t, *pop(t)) for t in tags]

    def reject(self, method: Any, tag: int, multiple: bool, requeue: bool) -> None:
        """basic.reject / basic.nack: requeue (to the head, in order) or dead-letter/drop."""
        taken = self._take(method, tag, multiple)
        if self.mode is ChannelMode.TX:
            op = Settlement.REQUEUE if requeue else Settlement.REJECT
            self.tx_settles.extend((queue, entry, t, op) for t, queue, entry in taken)
            return
        if requeue:
            _requeue_in_order([(queue, entry) for _, queue, entry in taken])
        else:
            for _, queue, entry in taken:
                queue.reject(entry, False)

    # --- everything else ---------------------------------------------------------------------------

    def handle(self, method: Any) -> None:
        """A whole command other than basic.publish."""
        handler = _HANDLERS.get(type(method))
        if handler is None:
            # RabbitMQ's answer to a method a client may not send (basic.deliver, channel.open-ok, ...).
            raise method_error(COMMAND_INVALID, f"unimplemented method {method_name(method)}", method)
        handler(self, method)

    def _reply(self, method: Any) -> None:
        self.write(encode_method(self.number, method))

    # channel

    def _channel_open(self, method: Any) -> None:
        raise method_error(CHANNEL_ERROR, "second 'channel.open' seen", method)

    def _channel_flow(self, method: Any) -> None:
        # AMQP 0-9-1 §1.5.2.3: active=false asks us to stop sending content; consumers pause.
        self.flow_active = bool(method.active)
        self.update_blocked()
        self._reply(Channel.FlowOk(active=method.active))

    def _channel_flow_ok(self, method: Any) -> None:
        """We never send channel.flow, so an answer to it carries nothing to act on."""

    def _channel_close(self, method: Any) -> None:
        self.release()
        self.session.forget_channel(self)
        self._reply(Channel.CloseOk())

    def _channel_close_ok(self, method: Any) -> None:
        """A close-ok without our close: nothing to do (RabbitMQ ignores it as well)."""

    # exchange

    def _exchange_declare(self, method: Any) -> None:
        if not method.passive and method.exchange_type not in EXCHANGE_TYPES:
            # RabbitMQ answers an unknown type with a hard 503.
            raise method_error(COMMAND_INVALID, f"unknown exchange type '{method.exchange_type}'", method)
        self.vhost.declare_exchange(
            method.exchange,
            method.exchange_type,
            durable=method.durable,
            auto_delete=method.auto_delete,
            internal=method.internal,
            arguments=method.arguments,
            passive=method.passive,
        )
        if not method.nowait:
            self._reply(Exchange.DeclareOk())

    def _exchange_delete(self, method: Any) -> None:
        self.vhost.delete_exchange(method.exchange, if_unused=method.if_unused)
        if not method.nowait:
            self._reply(Exchange.DeleteOk())

    def _exchange_bind(self, method: Any) -> None:
        self.vhost.bind_exchange(method.destination, method.source, method.routing_key, method.arguments)
        if not method.nowait:
            self._reply(Exchange.BindOk())

    def _exchange_unbind(self, method: Any) -> None:
        self.vhost.unbind_exchange(method.destination, method.source, method.routing_key, method.arguments)
        if not method.nowait:
            self._reply(Exchange.UnbindOk())

    # queue

    def _queue_name(self, name: str, method: Any) -> str:
        """An empty queue name means the channel's last declared queue (AMQP 0-9-1 §1.7.2.3)."""
        if name:
            return name
        if not self.last_queue:
            raise method_error(NOT_FOUND, "no previously declared queue", method)
        return self.last_queue

    def _queue_declare(self, method: Any) -> None:
        session = self.session
        name = method.queue
        if name == DIRECT_REPLY_TO or name.startswith(DIRECT_REPLY_TO + "."):
            # RabbitMQ lets clients check for direct reply-to support with a declare of the pseudo-queue.
            if not method.nowait:
                self._reply(raw_method(Queue.DeclareOk, queue=name, message_count=0, consumer_count=0))
            return
        queue = self.vhost.declare_queue(
            name,
            durable=method.durable,
            exclusive_owner=session if method.exclusive else None,
            auto_delete=method.auto_delete,
            arguments=method.arguments,
            passive=method.passive,
            owner=session,
        )
        self.last_queue = queue.name
        if not method.nowait:
            self._reply(
                raw_method(
                    Queue.DeclareOk,
                    queue=queue.name,
                    message_count=queue.message_count,
                    consumer_count=queue.consumer_count,
                )
            )

    def _queue_bind(self, method: Any) -> None:
        queue = self._queue_name(method.queue, method)
        routing_key = method.routing_key
        if not method.queue and not routing_key:
            routing_key = queue  # AMQP 0-9-1 §1.7.2.3.3: both empty -> the queue's own name
        self.vhost.bind_queue(queue, method.exchange, routing_key, method.arguments, owner=self.session)
        if not method.nowait:
            self._reply(Queue.BindOk())

    def _queue_unbind(self, method: Any) -> None:
        queue = self._queue_name(method.queue, method)
        self.vhost.unbind_queue(
            queue, method.exchange, method.routing_key, method.arguments, owner=self.session
        )
        self._reply(Queue.UnbindOk())

    def _queue_purge(self, method: Any) -> None:
        count = self.vhost.purge_queue(self._queue_name(method.queue, method), owner=self.session)
        if not method.nowait:
            self._reply(Queue.PurgeOk(message_count=count))

    def _queue_delete(self, method: Any) -> None:
        count = self.vhost.delete_queue(
            self._queue_name(method.queue, method),
            if_unused=method.if_unused,
            if_empty=method.if_empty,
            owner=self.session,
        )
        if not method.nowait:
            self._reply(Queue.DeleteOk(message_count=count))

    # basic

    def _basic_qos(self, method: Any) -> None:
        if method.prefetch_size:
            raise method_error(NOT_IMPLEMENTED, f"prefetch_size!=0 ({method.prefetch_size})", method)
        count = min(method.prefetch_count, self.session.max_prefetch)
        if method.global_:
            # RabbitMQ's per_consumer_qos: global=true limits the channel's consumers together.
            credit = self.credit
            if credit is None:
                credit = self.credit = ChannelCredit(count)
                for cc in self.consumers.values():
                    consumer = cc.consumer
                    if consumer.channel_credit is None and not consumer.no_ack:
                        consumer.channel_credit = credit
                        credit.unacked += consumer.unacked
            else:
                credit.limit = count
            self._redispatch()
        else:
            self.prefetch = count
        self._reply(Basic.QosOk())

    def _redispatch(self) -> None:
        """A limit was raised: let the queues of this channel's consumers deliver what now fits."""
        for cc in list(self.consumers.values()):
            queue = cc.consumer.queue
            if queue is not None:
                queue.dispatch()

    def _basic_consume(self, method: Any) -> None:
        session = self.session
        tag = method.consumer_tag or session.new_consumer_tag()
        if tag in self.consumers:
            raise method_error(NOT_ALLOWED, f"attempt to reuse consumer tag '{tag}'", method)
        name = method.queue
        if name == DIRECT_REPLY_TO:
            self._consume_direct_reply(method, tag)
            return
        queue = self.vhost.queue(self._queue_name(name, method), owner=session)
        cc = ChannelConsumer(self, tag, method.no_ack)
        consumer = Consumer(
            tag,
            cc.deliver,
            prefetch=self.prefetch,
            no_ack=method.no_ack,
            exclusive=method.exclusive,
            owner=session,
            arguments=method.arguments,
            channel_credit=None if method.no_ack else self.credit,
        )
        consumer.on_cancel = cc.cancelled_by_broker
        consumer.blocked = session.write_paused or not self.flow_active
        cc.consumer = consumer
        queue.add_consumer(consumer)  # may deliver at once: into cc.pending, see ChannelConsumer
        self.consumers[tag] = cc
        if not method.nowait:
            self._reply(raw_method(Basic.ConsumeOk, consumer_tag=tag))
        cc.start(self.write)

    def _consume_direct_reply(self, method: Any, tag: str) -> None:
        """RabbitMQ's direct reply-to: a private, auto-deleted queue that replies are routed to by name."""
        if not method.no_ack:
            raise method_error(PRECONDITION_FAILED, "reply consumer cannot acknowledge", method)
        if self.reply_consumer is not None:
            raise method_error(PRECONDITION_FAILED, "reply consumer already set", method)
        session = self.session
        vhost = self.vhost
        # A reserved amq. name: clients can neither declare nor guess into it.
        name = vhost.server_named(DIRECT_REPLY_TO + ".g")
        queue = vhost.declare_queue(name, exclusive_owner=session, auto_delete=True, reserved=True)
        cc = ChannelConsumer(self, tag, True)
        consumer = Consumer(tag, cc.deliver, no_ack=True, owner=session)
        consumer.on_cancel = cc.cancelled_by_broker
        consumer.blocked = session.write_paused or not self.flow_active
        cc.consumer = consumer
        queue.add_consumer(consumer)
        self.consumers[tag] = cc
        self.reply_consumer = cc
        if not method.nowait:
            self._reply(raw_method(Basic.ConsumeOk, consumer_tag=tag))
        cc.start(self.write)

    def _basic_cancel(self, method: Any) -> None:
        tag = method.consumer_tag
        cc = self.consumers.pop(tag, None)
        if cc is not None:
            if cc is self.reply_consumer:
                self.reply_consumer = None
            queue = cc.consumer.queue
            if queue is not None:
                queue.remove_consumer(cc.consumer)
        # Cancelling an unknown tag is not an error (RabbitMQ answers cancel-ok too).
        if not method.nowait:
            self._reply(raw_method(Basic.CancelOk, consumer_tag=tag))

    def _basic_get(self, method: Any) -> None:
        queue = self.vhost.queue(self._queue_name(method.queue, method), owner=self.session)
        entry = queue.get(method.no_ack)
        if entry is None:
            self._reply(Basic.GetEmpty())
            return
        tag = self.next_delivery_tag
        self.next_delivery_tag = tag + 1
        if not method.no_ack:
            self.unacked[tag] = (queue, entry)
        message = entry.message
        exchange, routing_key, properties = carriable(message)
        reply = raw_method(
            Basic.GetOk,
            delivery_tag=tag,
            redelivered=entry.redelivered,
            exchange=exchange,
            routing_key=routing_key,
            message_count=queue.message_count,
        )
        self.session.stats.messages_sent += 1
        self.write(encode_content(self.number, reply, properties, message.body, self.session.frame_max))

    def _basic_ack(self, method: Any) -> None:
        self.ack(method)

    def _basic_reject(self, method: Any) -> None:
        self.reject(method, method.delivery_tag, False, method.requeue)

    def _basic_nack(self, method: Any) -> None:
        self.reject(method, method.delivery_tag, method.multiple, method.requeue)

    def _basic_recover_async(self, method: Any) -> None:
        if not method.requeue:
            raise method_error(NOT_IMPLEMENTED, "requeue=false", method)
        entries = list(self.unacked.values())
        self.unacked.clear()
        _requeue_in_order(entries)

    def _basic_recover(self, method: Any) -> None:
        self._basic_recover_async(method)
        self._reply(Basic.RecoverOk())

    # confirm / tx

    def _confirm_select(self, method: Any) -> None:
        if self.mode is ChannelMode.TX:
            raise method_error(PRECONDITION_FAILED, "cannot switch from tx to confirm mode", method)
        self.mode = ChannelMode.CONFIRM
        if not method.nowait:
            self._reply(Confirm.SelectOk())

    def _tx_select(self, method: Any) -> None:
        if self.mode is ChannelMode.CONFIRM:
            raise method_error(PRECONDITION_FAILED, "cannot switch from confirm to tx mode", method)
        self.mode = ChannelMode.TX
        self._reply(Tx.SelectOk())

    def _tx_commit(self, method: Any) -> None:
        if self.mode is not ChannelMode.TX:
            raise method_error(PRECONDITION_FAILED, "channel is not transactional", method)
        publishes, self.tx_publishes = self.tx_publishes, []
        settles, self.tx_settles = self.tx_settles, []
        needs_sync = False
        vhost = self.vhost
        for message, mandatory in publishes:
            result = vhost.publish(message, mandatory)
            if not result.routed and mandatory:
                self._return(message)
            needs_sync = needs_sync or result.needs_sync
        requeues: list[tuple[CoreQueue, Entry]] = []
        for queue, entry, _, op in settles:
            if op is Settlement.ACK:
                queue.ack(entry)
            elif op is Settlement.REJECT:
                queue.reject(entry, False)
            else:
                requeues.append((queue, entry))
        _requeue_in_order(requeues)
        if publishes:
            self.session.published = True
        if needs_sync:
            # README, Guarantees: a committed persistent message is on disk before commit-ok.
            self.durable_waits += 1
            self.session.context.broker.when_durable(self._commit_durable)
        else:
            self._reply(Tx.CommitOk())

    def _commit_durable(self) -> None:
        self.durable_waits -= 1
        if self.state is ChannelState.OPEN:
            self._reply(Tx.CommitOk())

    def _tx_rollback(self, method: Any) -> None:
        if self.mode is not ChannelMode.TX:
            raise method_error(PRECONDITION_FAILED, "channel is not transactional", method)
        self.tx_publishes = []
        settles, self.tx_settles = self.tx_settles, []
        if settles:
            # The acknowledged deliveries are outstanding again (RabbitMQ does the same).
            restored = dict(self.unacked)
            restored.update((tag, (queue, entry)) for queue, entry, tag, _ in settles)
            self.unacked = dict(sorted(restored.items()))
        self._reply(Tx.RollbackOk())

    # --- flow, close ---------------------------------------------------------------------------

    def update_blocked(self) -> None:
        """Pause or resume this channel's consumers (connection write buffer full, channel.flow)."""
        blocked = self.session.write_paused or not self.flow_active
        for cc in list(self.consumers.values()):
            if cc.consumer.blocked != blocked:
                cc.consumer.set_blocked(blocked)

    def cancel_consumers(self) -> None:
        """The channel is going away: unregister its consumers (their queues may auto-delete)."""
        consumers = list(self.consumers.values())
        self.consumers.clear()
        self.reply_consumer = None
        for cc in consumers:
            queue = cc.consumer.queue
            if queue is not None:
                queue.remove_consumer(cc.consumer)

    def requeue_unacked(self) -> None:
        """Return every unsettled delivery to its queue, flagged redelivered (README, Guarantees)."""
        entries = list(self.unacked.values())
        entries.extend((queue, entry) for queue, entry, _, _ in self.tx_settles)
        self.unacked.clear()
        self.tx_settles = []
        self.tx_publishes = []
        _requeue_in_order(entries)

    def release(self) -> None:
        """Channel close (either side) or connection loss: give back everything the channel holds."""
        self.state = ChannelState.CLOSED
        self.cancel_consumers()
        self.requeue_unacked()
        self.nacks = []


def _requeue_in_order(entries: list[tuple[CoreQueue, Entry]]) -> None:
    """Requeue deliveries to their queues, each queue's in the order they were delivered."""
    if not entries:
        return
    by_queue: dict[CoreQueue, list[Entry]] = {}
    for queue, entry in entries:
        by_queue.setdefault(queue, []).append(entry)
    for queue, queued in by_queue.items():
        queue.requeue_many(queued)


#: The methods a client may send on a channel, and their handlers.
_HANDLERS: MappingProxyType[type[base.Frame], Callable[[AmqpChannel, Any], None]] = MappingProxyType(
    {
        Channel.Open: AmqpChannel._channel_open,
        Channel.Flow: AmqpChannel._channel_flow,
        Channel.FlowOk: AmqpChannel._channel_flow_ok,
        Channel.Close: AmqpChannel._channel_close,
        Channel.CloseOk: AmqpChannel._channel_close_ok,
        Exchange.Declare: AmqpChannel._exchange_declare,
        Exchange.Delete: AmqpChannel._exchange_delete,
        Exchange.Bind: AmqpChannel._exchange_bind,
        Exchange.Unbind: AmqpChannel._exchange_unbind,
        Queue.Declare: AmqpChannel._queue_declare,
        Queue.Bind: AmqpChannel._queue_bind,
        Queue.Unbind: AmqpChannel._queue_unbind,
        Queue.Purge: AmqpChannel._queue_purge,
        Queue.Delete: AmqpChannel._queue_delete,
        Basic.Qos: AmqpChannel._basic_qos,
        Basic.Consume: AmqpChannel._basic_consume,
        Basic.Cancel: AmqpChannel._basic_cancel,
        Basic.Get: AmqpChannel._basic_get,
        Basic.Ack: AmqpChannel._basic_ack,
        Basic.Reject: AmqpChannel._basic_reject,
        Basic.Nack: AmqpChannel._basic_nack,
        Basic.RecoverAsync: AmqpChannel._basic_recover_async,
        Basic.Recover: AmqpChannel._basic_recover,
        Confirm.Select: AmqpChannel._confirm_select,
        Tx.Select: AmqpChannel._tx_select,
        Tx.Commit: AmqpChannel._tx_commit,
        Tx.Rollback: AmqpChannel._tx_rollback,
    }
)
