"""The STOMP 1.0/1.1/1.2 session: one connection's protocol rules against the broker core.

`StompSession(context)` implements `protocols.session.ProtocolSession`. It feeds bytes to the codec
(`StompParser`), turns frames into calls on the core (publish, declare, bind, consume, ack) and core
deliveries into MESSAGE frames, following docs/sessions.md. Names are mapped by destinations.py, headers
by mapping.py.

Decisions a client can observe:

- Version: the highest of `accept-version` we share; no header means 1.0 (STOMP 1.2 "Protocol
  Negotiation"). The parser switches to the version's header escaping right after CONNECT.
- `host` selects the vhost of that name when one exists, else the default vhost `/` (README, Names across protocols).
- Heart-beats: the broker offers `[limits] stomp_heartbeat_ms` in both directions. It sends an EOL every
  negotiated interval (unconditionally: an EOL between frames is always legal and costs the delivery path
  nothing) and closes a connection from which nothing arrived for two of its intervals (the grace STOMP
  1.2 "Heart-beating" asks for).
- Subscriptions: `ack:auto` is a no-ack consumer (no credit limit); `client` and `client-individual`
  take their credit from `prefetch-count` (RabbitMQ) or `activemq.prefetchSize` (ActiveMQ), default
  `DEFAULT_CLIENT_PREFETCH` = 1000 unacked messages per subscription, so one idle subscriber cannot take
  a whole queue and competing consumers share it. 0 means unlimited.
- `message-id` is the delivery id, unique within the connection; the 1.2 `ack` header repeats it. ACK
  and NACK find a delivery by `id` (1.2) or `message-id` (1.0/1.1); in `client` mode they are cumulative
  over the subscription, in `client-individual` mode they settle one message. NACK requeues (flagged
  redelivered), or dead-letters with `requeue:false`.
- /queue/ destinations are declared durable when they do not exist yet, and used as they are when they
  do. /topic/ and /exchange/ subscriptions get an exclusive auto-delete queue bound with their pattern;
  a durable subscription (RabbitMQ: `durable:true` with `id`; ActiveMQ: `client-id` on CONNECT with
  `activemq.subscriptionName`) gets the durable queue `stomp-subscription-[<client-id>.]<name>`, which
  keeps collecting while its subscriber is away; UNSUBSCRIBE with `durable:true` (or `persistent:true`,
  or `activemq.subscriptionName`) deletes it.
- `reply-to:/temp-queue/<n>` creates the connection's private reply queue `<n>` (exclusive, server-named,
  subscribed at once with subscription id `/temp-queue/<n>`); the message carries its bare queue name as
  `reply_to`, which a STOMP receiver sees as `/reply-queue/<queue>` and an AMQP server answers with
  routing_key=reply_to on the default exchange.
- Transactions: SENDs, ACKs and NACKs with a `transaction` header are held until COMMIT (all take effect,
  in order) and dropped by ABORT or a disconnect.
- RECEIPT: a frame's receipt is written once what it did is done; for a SEND of a persistent message
  into a durable queue (or a COMMIT publishing one) only after the store reported it durable (README, Guarantees). Receipts keep the order of their frames; one `when_durable` callback covers every receipt of a
  `data_received` batch.
- Errors (a frame the codec refuses, an unknown command, a missing header, a refused destination, an ACK
  for an unknown id, a login that fails, a core refusal): an ERROR frame with a `message` header and a
  body that explains, then the connection closes (STOMP 1.2 "ERROR"). A queue deleted under a
  subscription ends the connection the same way.

Theory of operation (hot path): `data_received` feeds the parser and handles every complete frame of the
buffer in turn, then does the batch's bookkeeping once (receipts waiting for the store, stats, publisher
flow control). A SEND resolves its destination through a per-connection cache and publishes; a
delivery is encoded by its `Subscription` from three pre-encoded parts: the subscription's
`message_prefix()`, the message's headers (the destination line is cached per connection) and the
per-delivery `message-id`/`redelivered`/`ack` lines; one `conn.write` per MESSAGE (the driver sends a
loop turn's writes in one syscall). Nothing is logged per message.

Must not import: asyncio, storage, cluster, other protocol packages, protocols.transport.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import secrets
from collections import deque
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Final

from broker.context import ServerContext
from broker.core import VHost
from broker.errors import BrokerError
from broker.message import EMPTY_PROPERTIES, Message, Properties
from broker.queue import Consumer, Entry, Queue
from protocols.session import Connection, ProtocolSession, TimerHandle
from protocols.stomp.codec import (
    HEARTBEAT_BYTES,
    NEED_DATA,
    SUPPORTED_VERSIONS,
    Frame,
    StompParser,
    StompProtocolError,
    encode_error,
    encode_frame,
    encode_headers,
    encode_message,
    message_prefix,
)
from protocols.stomp.destinations import (
    TOPIC_EXCHANGE,
    Destination,
    DestinationKind,
    InvalidDestination,
    destination_for_delivery,
    parse_destination,
)
from protocols.stomp.mapping import encode_properties, properties_from_headers, queue_arguments

log = logging.getLogger("polybroker.stomp")

#: Credit of a client / client-individual subscription without a prefetch header.
DEFAULT_CLIENT_PREFETCH: Final = 1000
#: Seconds a connection may take to send CONNECT.
CONNECT_TIMEOUT: Final = 10.0
#: Consecutive heart-beat intervals without input after which the peer is taken for dead.
HEARTBEAT_GRACE_INTERVALS: Final = 2
#: Bound on the per-connection SEND destination cache (a client may publish to many topics).
SEND_CACHE_SIZE: Final = 1024
#: Prefix of the queues behind topic and exchange subscriptions.
SUBSCRIPTION_QUEUE_PREFIX: Final = "stomp-subscription-"
_MAX_QUEUE_NAME: Final = 255

_SUPPORTED_TEXT: Final = ",".join(SUPPORTED_VERSIONS)
# Per-delivery header lines (bytes %-formatting: one C call per MESSAGE).
_DELIVERY_NEW: Final = b"message-id:%d\nredelivered:false\n"
_DELIVERY_REDELIVERED: Final = b"message-id:%d\nredelivered:true\n"
_DELIVERY_NEW_ACK: Final = b"message-id:%d\nredelivered:false\nack:%d\n"
_DELIVERY_REDELIVERED_ACK: Final = b"message-id:%d\nredelivered:true\nack:%d\n"


class SessionState(enum.Enum):
    """Where the connection is in STOMP 1.2 "Connecting" and after."""

    #: Only CONNECT or STOMP is accepted.
    AWAITING_CONNECT = enum.auto()
    CONNECTED = enum.auto()
    #: After ERROR, DISCONNECT or shutdown: input is ignored, the connection is closing.
    CLOSED = enum.auto()


class AckMode(enum.Enum):
    """SUBSCRIBE `ack` header values (STOMP 1.2 "SUBSCRIBE ack Header")."""

    AUTO = "auto"
    CLIENT = "client"
    CLIENT_INDIVIDUAL = "client-individual"


class StompError(Exception):
    """A client request this session refuses: `message` for the ERROR frame's header, `detail` its body."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message, detail)
        self.message = message
        self.detail = detail


class Subscription:
    """One SUBSCRIBE: its consumer on one queue, and how its MESSAGE frames are encoded."""

    __slots__ = (
        "session",
        "id",
        "ack_mode",
        "queue",
        "consumer",
        "prefix",
        "headers_of",
        "no_ack",
        "ack_header",
        "order",
        "durable_queue",
    )

    def __init__(
        self,
        session: StompSession,
        sub_id: str,
        ack_mode: AckMode,
        queue: Queue,
        prefix: bytes,
        headers_of: Callable[[Message], bytes],
        durable_queue: str | None,
    ) -> None:
        self.session = session
        self.id = sub_id
        self.ack_mode = ack_mode
        self.queue = queue
        self.prefix = prefix
        self.headers_of = headers_of
        self.no_ack = ack_mode is AckMode.AUTO
        # STOMP 1.2 MESSAGE carries an `ack` header when the subscription needs acknowledgement.
        self.ack_header = not self.no_ack and session.version == "1.2"
        # Delivery ids in delivery order, for cumulative `client` acks.
        self.order: deque[int] | None = deque() if ack_mode is AckMode.CLIENT else None
        self.durable_queue = durable_queue
        self.consumer: Consumer

    def deliver(self, queue: Queue, entry: Entry) -> None:
        """The core hands over a message (maybe inside another connection's publish): encode and write."""
        session = self.session
        message = entry.message
        tag = session.next_tag
        session.next_tag = tag + 1
        if self.no_ack:
            delivery = (_DELIVERY_REDELIVERED if entry.redelivered else _DELIVERY_NEW) % tag
        else:
            session.unacked[tag] = (self, entry)
            if self.order is not None:
                self.order.append(tag)
            if self.ack_header:
                delivery = (_DELIVERY_REDELIVERED_ACK if entry.redelivered else _DELIVERY_NEW_ACK) % (
                    tag,
                    tag,
                )
            else:
                delivery = (_DELIVERY_REDELIVERED if entry.redelivered else _DELIVERY_NEW) % tag
        session.write(encode_message(self.prefix, self.headers_of(message), message.body, delivery))
        session.stats.messages_sent += 1

    def cancelled(self) -> None:
        """The broker cancelled the consumer (its queue was deleted)."""
        self.session.subscription_cancelled(self)


# A pending transactional operation: a message to publish, or (delivery id, nack, requeue).
_TxOp = Message | tuple[int, bool, bool]
# A SEND destination resolved: exchange, routing key, and the queue that must still exist (or None).
_SendTarget = tuple[str, str, str | None]


class StompSession(ProtocolSession):
    """One STOMP connection. See the module docstring for the rules it follows."""

    def __init__(self, context: ServerContext) -> None:
        self._context = context
        self.stats = context.stats
        limits = context.config.limits
        self._parser = StompParser(
            max_frame_headers=limits.max_headers,
            max_header_length=limits.max_header_length,
            max_body_size=limits.max_frame_size,
        )
        self._heartbeat_ms: int = limits.stomp_heartbeat_ms
        self._conn: Connection
        self.write: Callable[[bytes], None]
        self._state = SessionState.AWAITING_CONNECT
        self.version = "1.0"
        self._vhost: VHost | None = None
        self._queues: dict[str, Queue] = {}
        self._client_id: str | None = None
        # The authenticated user's name: a SEND's `user-id` must be it (as RabbitMQ checks).
        self._username = ""
        self._subs: dict[str, Subscription] = {}
        #: Delivery id -> (subscription, entry) for every delivery that awaits ACK/NACK.
        self.unacked: dict[int, tuple[Subscription, Entry]] = {}
        self.next_tag = 1
        self._transactions: dict[str, list[_TxOp]] = {}
        self._temp_queues: dict[str, Queue] = {}
        self._send_targets: dict[str, _SendTarget] = {}
        # Receipts of this batch waiting for the store, and callbacks registered but not yet run.
        self._deferred: list[bytes] = []
        self._outstanding = 0
        self._close_after_receipts = False
        self._published = 0
        self._write_blocked = False
        self._received = False
        self._silent_intervals = 0
        # CONNECT deadline until CONNECTED, then the heart-beat timers (each re-arms itself).
        self._connect_timer: TimerHandle | None = None
        self._beat_timer: TimerHandle | None = None
        self._watch_timer: TimerHandle | None = None
        self._torn_down = False
        # The destination line of the last delivered (exchange, routing key).
        self._dest_exchange: str | None = None
        self._dest_key: str | None = None
        self._dest_line = b""

    # -- ProtocolSession ---------------------------------------------------------------------------

    def connection_made(self, conn: Connection) -> None:
        self._conn = conn
        self.write = conn.write
        self._write_blocked = not conn.writable
        self._connect_timer = conn.call_later(CONNECT_TIMEOUT, self._connect_timed_out)

    def data_received(self, data: bytes) -> None:
        # After ERROR or DISCONNECT the loop below does not run: what still arrives is ignored.
        self._received = True
        parser = self._parser
        parser.feed(data)
        frame: Frame | None = None
        try:
            while self._state is not SessionState.CLOSED:
                frame = None
                event = parser.next_event()
                if event is NEED_DATA:
                    break
                frame = event
                command = frame.command
                if self._state is SessionState.CONNECTED:
                    if command == "SEND":
                        self._on_send(frame)
                    elif command == "ACK":
                        self._on_ack(frame, nack=False)
                    else:
                        self._dispatch(command, frame)
                else:
                    self._on_first_frame(command, frame)
        except StompProtocolError as exc:
            self._fail(exc.message, exc.detail, frame)
        except StompError as exc:
            self._fail(exc.message, exc.detail, frame)
        except InvalidDestination as exc:
            self._fail("Invalid destination", str(exc), frame)
        except BrokerError as exc:
            self._fail(_broker_error_message(exc), exc.text, frame)
        self._end_batch()

    def writing_paused(self) -> None:
        self._write_blocked = True
        for sub in self._subs.values():
            sub.consumer.set_blocked(True)

    def writing_resumed(self) -> None:
        self._write_blocked = False
        for sub in list(self._subs.values()):
            sub.consumer.set_blocked(False)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._state = SessionState.CLOSED
        self._teardown()

    def shutdown(self) -> None:
        if self._state is SessionState.CLOSED:
            return
        self.write(encode_error("Server shutdown", "The broker is shutting down.", self.version))
        self._close()

    # -- frames ------------------------------------------------------------------------------------

    def _on_first_frame(self, command: str, frame: Frame) -> None:
        if command == "CONNECT" or command == "STOMP":
            self._on_connect(frame)
        elif command in _CLIENT_HANDLERS:
            raise StompError("Not connected", f"{command} before CONNECT: send CONNECT (or STOMP) first.")
        else:
            raise _unknown_command(command)

    def _dispatch(self, command: str, frame: Frame) -> None:
        handler = _CLIENT_HANDLERS.get(command)
        if handler is None:
            raise _unknown_command(command)
        handler(self, frame)

    def _on_connect(self, frame: Frame) -> None:
        context = self._context
        headers = frame.header_map()
        version = _negotiate(headers.get("accept-version"))
        if version is None:
            self.write(
                encode_frame(
                    "ERROR",
                    [
                        ("version", _SUPPORTED_TEXT),
                        ("content-type", "text/plain"),
                        ("message", "Supported protocol versions are " + _SUPPORTED_TEXT),
                    ],
                    f"accept-version {headers.get('accept-version')!r} names no version this broker "
                    f"speaks ({_SUPPORTED_TEXT}).".encode(),
                    "1.0",
                )
            )
            self._close()
            return
        self.version = version
        self._parser.version = version
        host = headers.get("host")
        vhost_name = host if host is not None and host in context.broker.vhosts else "/"
        login = headers.get("login")
        result = context.auth.authenticate(
            login, headers.get("passcode"), is_loopback=self._conn.is_loopback, vhost=vhost_name
        )
        if not result.ok:
            self.stats.connections_refused += 1
            log.info("STOMP login refused: peer=%s user=%r reason=%s", self._conn.peer, login, result.reason)
            raise StompError("Access refused", f"Login failed: {result.reason}.")
        send_ms, receive_ms = self._heartbeats(headers.get("heart-beat"), version)
        self._vhost = context.broker.vhost(vhost_name)
        self._queues = self._vhost.queues
        self._username = result.user.name if result.user is not None else ""
        self._client_id = headers.get("client-id")
        self._state = SessionState.CONNECTED
        if self._connect_timer is not None:
            self._connect_timer.cancel()
            self._connect_timer = None
        self.stats.clients_connected += 1
        self.stats.clients_total += 1
        self.write(
            encode_frame(
                "CONNECTED",
                [
                    ("version", version),
                    ("server", f"{context.server_name}/{context.version}"),
                    ("session", "session-" + secrets.token_urlsafe(12)),
                    ("heart-beat", f"{send_ms},{receive_ms}"),
                ],
                b"",
                version,
            )
        )
        if send_ms:
            self._beat_timer = self._conn.call_later(send_ms / 1000.0, lambda: self._send_beat(send_ms))
        if receive_ms:
            self._received = False
            self._watch_timer = self._conn.call_later(
                receive_ms / 1000.0, lambda: self._check_beats(receive_ms)
            )

    def _heartbeats(self, header: str | None, version: str) -> tuple[int, int]:
        """(broker sends every, broker expects every) in ms (STOMP 1.2 "Heart-beating")."""
        if version == "1.0" or header is None:
            return 0, 0
        client_send, comma, client_receive = header.partition(",")
        client_send, client_receive = client_send.strip(), client_receive.strip()
        if not (comma and _digits(client_send) and _digits(client_receive)):
            raise StompError("Invalid heart-beat", f"heart-beat {header!r}: expected two integers, 'cx,cy'.")
        ours = self._heartbeat_ms
        cx, cy = int(client_send), int(client_receive)
        return (max(ours, cy) if ours and cy else 0), (max(ours, cx) if ours and cx else 0)

    def _on_send(self, frame: Frame) -> None:
        headers = frame.header_map()
        destination = headers.pop("destination", None)
        if destination is None:
            raise StompError("Missing destination", "A SEND frame needs a destination header.")
        receipt = headers.pop("receipt", None)
        transaction = headers.pop("transaction", None)
        headers.pop("content-length", None)
        target = self._send_targets.get(destination)
        if target is None or (target[2] is not None and target[2] not in self._queues):
            target = self._resolve_send(destination, headers)
        props = self._properties(headers) if headers else EMPTY_PROPERTIES
        message = Message(target[0], target[1], frame.body, props, origin=self)
        if transaction is not None:
            self._transaction(transaction).append(message)
            if receipt is not None:
                self._receipt(receipt, False)
            return
        assert self._vhost is not None
        result = self._vhost.publish(message)
        self._published += 1
        if result.rejected:
            raise StompError(
                "Message rejected", f"A queue behind {destination} is full and refuses messages."
            )
        if receipt is not None:
            self._receipt(receipt, result.needs_sync)

    def _on_subscribe(self, frame: Frame) -> None:
        headers = frame.header_map()
        destination = headers.get("destination")
        if destination is None:
            raise StompError("Missing destination", "A SUBSCRIBE frame needs a destination header.")
        # STOMP 1.0 makes `id` optional; RabbitMQ then uses the destination as the id, and so do we.
        sub_id = headers.get("id", destination)
        if sub_id in self._subs:
            raise StompError(
                "Duplicated subscription identifier", f"A subscription {sub_id!r} already exists."
            )
        try:
            ack_mode = AckMode(headers.get("ack", "auto"))
        except ValueError:
            raise StompError(
                "Invalid ack mode", f"ack {headers['ack']!r}: expected auto, client or client-individual."
            ) from None
        prefetch = _prefetch(headers)
        target = parse_destination(destination)
        queue, durable_queue = self._subscription_queue(target, headers, sub_id)
        fixed = destination if target.kind is DestinationKind.TEMP_QUEUE else None
        self._subscribe(sub_id, queue, ack_mode, prefetch, fixed, durable_queue)
        receipt = headers.get("receipt")
        if receipt is not None:
            self._receipt(receipt, False)

    def _on_unsubscribe(self, frame: Frame) -> None:
        headers = frame.header_map()
        sub_id = headers.get("id", headers.get("destination"))
        if sub_id is None:
            raise StompError("Missing id", "An UNSUBSCRIBE frame needs an id header.")
        sub = self._subs.pop(sub_id, None)
        if sub is None:
            raise StompError("No such subscription", f"There is no subscription {sub_id!r}.")
        self._cancel(sub)
        if sub.durable_queue is not None and (
            headers.get("durable") == "true"
            or headers.get("persistent") == "true"
            or "activemq.subscriptionName" in headers
        ):
            assert self._vhost is not None
            if sub.durable_queue in self._queues:
                self._vhost.delete_queue(sub.durable_queue, owner=self)
        receipt = headers.get("receipt")
        if receipt is not None:
            self._receipt(receipt, False)

    def _on_ack(self, frame: Frame, nack: bool) -> None:
        ack_id = frame.header("id")
        if ack_id is None:
            ack_id = frame.header("message-id")  # STOMP 1.0 / 1.1
            if ack_id is None:
                raise StompError(
                    "Missing id", f"An {frame.command} frame needs an id (1.2) or message-id header."
                )
        tag = int(ack_id) if ack_id.isascii() and ack_id.isdigit() else -1
        if tag not in self.unacked:
            raise StompError(
                "Unknown message id",
                f"{frame.command} {ack_id!r}: no delivery awaiting acknowledgement has this id.",
            )
        requeue = not nack or frame.header("requeue") != "false"
        transaction = frame.header("transaction")
        if transaction is not None:
            self._transaction(transaction).append((tag, nack, requeue))
        else:
            self._settle(tag, nack, requeue)
        receipt = frame.header("receipt")
        if receipt is not None:
            self._receipt(receipt, False)

    def _on_nack(self, frame: Frame) -> None:
        self._on_ack(frame, nack=True)

    def _on_plain_ack(self, frame: Frame) -> None:
        self._on_ack(frame, nack=False)

    def _on_begin(self, frame: Frame) -> None:
        name = _required(frame, "transaction")
        if name in self._transactions:
            raise StompError("Transaction already started", f"Transaction {name!r} is already open.")
        self._transactions[name] = []
        self._frame_receipt(frame)

    def _on_commit(self, frame: Frame) -> None:
        name = _required(frame, "transaction")
        operations = self._transactions.pop(name, None)
        if operations is None:
            raise StompError("Unknown transaction", f"No transaction {name!r} is open.")
        assert self._vhost is not None
        needs_sync = False
        for op in operations:
            if isinstance(op, Message):
                result = self._vhost.publish(op)
                self._published += 1
                needs_sync = needs_sync or result.needs_sync
            elif op[0] in self.unacked:  # not settled since (e.g. by a cumulative ack of the same commit)
                self._settle(*op)
        receipt = frame.header("receipt")
        if receipt is not None:
            self._receipt(receipt, needs_sync)

    def _on_abort(self, frame: Frame) -> None:
        name = _required(frame, "transaction")
        if self._transactions.pop(name, None) is None:
            raise StompError("Unknown transaction", f"No transaction {name!r} is open.")
        self._frame_receipt(frame)

    def _on_disconnect(self, frame: Frame) -> None:
        receipt = frame.header("receipt")
        self._state = SessionState.CLOSED
        self._teardown()
        if receipt is None:
            self._conn.close()
            return
        self._receipt(receipt, False)
        if self._deferred or self._outstanding:
            self._close_after_receipts = True
        else:
            self._conn.close()

    def _on_connect_again(self, frame: Frame) -> None:
        raise StompError("Already connected", f"{frame.command} on a connection that is already connected.")

    # -- publishing --------------------------------------------------------------------------------

    def _resolve_send(self, destination: str, headers: dict[str, str]) -> _SendTarget:
        """Where a SEND to `destination` goes; declares a /queue/ on first use. Cached per connection."""
        vhost = self._vhost
        assert vhost is not None
        target = parse_destination(destination)
        kind = target.kind
        resolved: _SendTarget
        if kind is DestinationKind.QUEUE:
            self._queue_for(target.name, headers, consume=False)
            resolved = ("", target.name, target.name)
        elif kind is DestinationKind.TOPIC:
            resolved = (TOPIC_EXCHANGE, target.name, None)
        elif kind is DestinationKind.EXCHANGE:
            vhost.exchange(target.name)
            resolved = (target.name, target.key, None)
        elif kind is DestinationKind.AMQ_QUEUE:
            vhost.queue(target.name)
            resolved = ("", target.name, target.name)
        elif kind is DestinationKind.TEMP_QUEUE:
            resolved = ("", self._temp_queue(target.name, subscribe=False).name, None)
        else:  # REPLY_QUEUE: answered through the default exchange, never declared
            resolved = ("", target.name, None)
        if len(self._send_targets) >= SEND_CACHE_SIZE:
            self._send_targets.clear()
        self._send_targets[destination] = resolved
        return resolved

    def _properties(self, headers: dict[str, str]) -> Properties:
        user_id = headers.get("user-id")
        if user_id is not None and user_id != self._username:
            # Consumers of every protocol trust user_id (AMQP refuses a mismatch with 406): a client
            # may not claim to be someone else.
            raise StompError(
                "User id mismatch",
                f"The user-id header says '{user_id}' but this connection logged in as '{self._username}'.",
            )
        reply_to = headers.get("reply-to")
        neutral = self._neutral_reply_to(reply_to) if reply_to is not None else None
        now_ms = int(self._context.broker.wall_clock() * 1000)
        return properties_from_headers(headers, neutral, now_ms)

    def _neutral_reply_to(self, reply_to: str) -> str:
        """A queue destination becomes its bare queue name (docs/sessions.md); a temp queue is created."""
        try:
            target = parse_destination(reply_to)
        except InvalidDestination:
            return reply_to
        kind = target.kind
        if kind is DestinationKind.TEMP_QUEUE:
            return self._temp_queue(target.name, subscribe=True).name
        if kind in (DestinationKind.QUEUE, DestinationKind.AMQ_QUEUE, DestinationKind.REPLY_QUEUE):
            return target.name
        return reply_to

    def _transaction(self, name: str) -> list[_TxOp]:
        operations = self._transactions.get(name)
        if operations is None:
            raise StompError("Unknown transaction", f"No transaction {name!r} is open (send BEGIN first).")
        return operations

    # -- receipts ----------------------------------------------------------------------------------

    def _receipt(self, receipt_id: str, needs_sync: bool) -> None:
        frame = encode_frame("RECEIPT", [("receipt-id", receipt_id)], b"", self.version)
        if needs_sync or self._deferred or self._outstanding:
            # Behind the store (README, Guarantees), or behind a receipt that is: keep the order.
            self._deferred.append(frame)
        else:
            self.write(frame)

    def _frame_receipt(self, frame: Frame) -> None:
        receipt = frame.header("receipt")
        if receipt is not None:
            self._receipt(receipt, False)

    def _end_batch(self) -> None:
        if self._deferred:
            frames = self._deferred
            self._deferred = []
            self._outstanding += 1
            self._context.broker.when_durable(lambda: self._release_receipts(frames))
        if self._published:
            self.stats.messages_received += self._published
            self._published = 0
            flow = self._context.flow
            if self._state is SessionState.CONNECTED and flow.should_pause():
                self._conn.pause_reading()
                flow.park(self, self._conn.resume_reading)

    def _release_receipts(self, frames: list[bytes]) -> None:
        self._outstanding -= 1
        self.write(b"".join(frames))
        if self._close_after_receipts and not self._outstanding:
            self._conn.close()

    # -- subscriptions -----------------------------------------------------------------------------

    def _subscription_queue(
        self, target: Destination, headers: dict[str, str], sub_id: str
    ) -> tuple[Queue, str | None]:
        """The queue a SUBSCRIBE consumes from, and the name of its durable subscription queue if any."""
        vhost = self._vhost
        assert vhost is not None
        kind = target.kind
        if kind is DestinationKind.QUEUE:
            return self._queue_for(target.name, headers, consume=True), None
        if kind is DestinationKind.AMQ_QUEUE or kind is DestinationKind.REPLY_QUEUE:
            return vhost.queue(target.name, owner=self), None
        if kind is DestinationKind.TEMP_QUEUE:
            return self._temp_queue(target.name, subscribe=False), None
        exchange, key = (
            (TOPIC_EXCHANGE, target.name) if kind is DestinationKind.TOPIC else (target.name, target.key)
        )
        vhost.exchange(exchange)  # NotFound before anything is declared
        arguments = _queue_arguments(headers)
        name = self._durable_subscription_name(headers, sub_id)
        if name is not None:
            queue = vhost.declare_queue(name, durable=True, arguments=arguments, owner=self)
            vhost.bind_queue(name, exchange, key, owner=self)
            return queue, name
        queue = vhost.declare_queue(
            vhost.server_named(SUBSCRIPTION_QUEUE_PREFIX),
            exclusive_owner=self,
            auto_delete=True,
            arguments=arguments,
            owner=self,
        )
        vhost.bind_queue(queue.name, exchange, key, owner=self)
        return queue, None

    def _durable_subscription_name(self, headers: dict[str, str], sub_id: str) -> str | None:
        """RabbitMQ: `durable:true` (or the older `persistent:true`) names it by `id`; ActiveMQ:
        `activemq.subscriptionName`. Either is qualified by the CONNECT `client-id` when there is one."""
        name = headers.get("activemq.subscriptionName")
        if name is None:
            if headers.get("durable") != "true" and headers.get("persistent") != "true":
                return None
            if headers.get("auto-delete") == "true":
                return None
            name = sub_id
        if self._client_id:
            name = f"{self._client_id}.{name}"
        queue_name = SUBSCRIPTION_QUEUE_PREFIX + name
        if len(queue_name.encode()) > _MAX_QUEUE_NAME:
            queue_name = SUBSCRIPTION_QUEUE_PREFIX + hashlib.sha256(name.encode()).hexdigest()
        return queue_name

    def _queue_for(self, name: str, headers: dict[str, str], consume: bool) -> Queue:
        """A /queue/ destination: used as it is when it exists, declared durable when it does not. Queue
        arguments given for an existing queue must match it (AMQP 0-9-1 queue.declare equivalence). Only
        a consumer is refused another connection's exclusive queue; publishing to it is allowed, as in
        AMQP."""
        vhost = self._vhost
        assert vhost is not None
        arguments = _queue_arguments(headers)
        queue = self._queues.get(name)
        if queue is not None:
            if arguments:
                return vhost.declare_queue(
                    name, queue.durable, None, queue.auto_delete, arguments, owner=self
                )
            return vhost.queue(name, owner=self) if consume else queue
        durable = headers.get("durable") != "false"
        auto_delete = headers.get("auto-delete") == "true"
        return vhost.declare_queue(name, durable, None, auto_delete, arguments, owner=self)

    def _temp_queue(self, name: str, subscribe: bool) -> Queue:
        """The connection's private queue for /temp-queue/<name>; `subscribe` starts the reply subscription
        when it is created (for a reply-to header)."""
        queue = self._temp_queues.get(name)
        if queue is not None:
            return queue
        vhost = self._vhost
        assert vhost is not None
        queue = vhost.declare_queue("", exclusive_owner=self, owner=self)
        self._temp_queues[name] = queue
        sub_id = DestinationKind.TEMP_QUEUE.value + name
        if subscribe and sub_id not in self._subs:
            self._subscribe(sub_id, queue, AckMode.AUTO, 0, sub_id, None)
        return queue

    def _subscribe(
        self,
        sub_id: str,
        queue: Queue,
        ack_mode: AckMode,
        prefetch: int | None,
        fixed_destination: str | None,
        durable_queue: str | None,
    ) -> None:
        prefix_headers = [("subscription", sub_id)]
        if fixed_destination is not None:
            prefix_headers.append(("destination", fixed_destination))
        try:
            prefix = message_prefix(prefix_headers, self.version)
        except ValueError:
            raise StompError("Invalid header", f"subscription id {sub_id!r} cannot be sent back") from None
        headers_of = self._property_headers if fixed_destination is not None else self._message_headers
        sub = Subscription(self, sub_id, ack_mode, queue, prefix, headers_of, durable_queue)
        if prefetch is None:
            prefetch = 0 if ack_mode is AckMode.AUTO else DEFAULT_CLIENT_PREFETCH
        consumer = Consumer("stomp-" + sub_id, sub.deliver, prefetch=prefetch, no_ack=sub.no_ack, owner=self)
        consumer.on_cancel = sub.cancelled
        consumer.blocked = self._write_blocked
        sub.consumer = consumer
        self._subs[sub_id] = sub
        try:
            queue.add_consumer(consumer)  # may deliver at once
        except BrokerError:
            del self._subs[sub_id]
            raise

    def _cancel(self, sub: Subscription) -> None:
        """Stop a subscription and return what it holds unacknowledged to its queue."""
        sub.queue.remove_consumer(sub.consumer)
        held = [tag for tag, (owner, _) in self.unacked.items() if owner is sub]
        if held:
            unacked = self.unacked
            sub.queue.requeue_many([unacked.pop(tag)[1] for tag in held])

    def subscription_cancelled(self, sub: Subscription) -> None:
        """Called by the core from inside another connection's call: only write and close here; the
        core is released by `connection_lost` (docs/sessions.md, Consuming)."""
        if self._subs.get(sub.id) is not sub or self._state is SessionState.CLOSED:
            return
        for other in self._subs.values():
            other.consumer.blocked = True  # nothing more is delivered to a closing connection
        self._state = SessionState.CLOSED
        self.write(
            encode_error(
                "Subscription cancelled",
                f"The queue {sub.queue.name!r} of subscription {sub.id!r} was deleted.",
                self.version,
            )
        )
        self._conn.close()

    def _settle(self, tag: int, nack: bool, requeue: bool) -> None:
        sub, entry = self.unacked.pop(tag)
        queue = sub.queue
        order = sub.order
        if order is None:
            if nack:
                queue.reject(entry, requeue)
            else:
                queue.ack(entry)
            return
        # `client` mode: the ACK/NACK covers every earlier delivery of the subscription too.
        settled = []
        while order and order[0] <= tag:
            earlier = order.popleft()
            if earlier == tag:
                settled.append(entry)
            else:
                item = self.unacked.pop(earlier, None)
                if item is not None:
                    settled.append(item[1])
        for held in settled:
            if nack:
                queue.reject(held, requeue)
            else:
                queue.ack(held)

    # -- delivery encoding -------------------------------------------------------------------------

    def _message_headers(self, message: Message) -> bytes:
        """The destination line and property headers of `message` for this connection's version."""
        exchange = message.exchange
        key = message.routing_key
        if key == self._dest_key and exchange == self._dest_exchange:
            line = self._dest_line
        else:
            line = self._destination_line(exchange, key)
        if message.properties is EMPTY_PROPERTIES:
            return line
        return line + self._property_headers(message)

    def _destination_line(self, exchange: str, key: str) -> bytes:
        text = destination_for_delivery(exchange, key)
        if self.version == "1.0" and ("\n" in text or "\r" in text):
            text = text.replace("\r", " ").replace("\n", " ")
        line = encode_headers([("destination", text)], self.version)
        self._dest_exchange = exchange
        self._dest_key = key
        self._dest_line = line
        return line

    def _property_headers(self, message: Message) -> bytes:
        props = message.properties
        if props is EMPTY_PROPERTIES:
            return b""
        expires_ms = None
        if message.expires_at is not None:
            broker = self._context.broker
            expires_ms = int((broker.wall_clock() + message.expires_at - broker.clock()) * 1000)
        return encode_properties(props, self.version, expires_ms)

    # -- heart-beats and timers --------------------------------------------------------------------

    def _send_beat(self, interval_ms: int) -> None:
        if self._state is not SessionState.CONNECTED:
            return
        self.write(HEARTBEAT_BYTES)
        self._beat_timer = self._conn.call_later(interval_ms / 1000.0, lambda: self._send_beat(interval_ms))

    def _check_beats(self, interval_ms: int) -> None:
        if self._state is not SessionState.CONNECTED:
            return
        if self._received:
            self._received = False
            self._silent_intervals = 0
        else:
            self._silent_intervals += 1
            if self._silent_intervals >= HEARTBEAT_GRACE_INTERVALS:
                log.info("STOMP heart-beat timeout: peer=%s interval=%d ms", self._conn.peer, interval_ms)
                self._fail(
                    "Heart-beat timeout",
                    f"Nothing was received for {HEARTBEAT_GRACE_INTERVALS * interval_ms} ms "
                    f"(heart-beat interval {interval_ms} ms).",
                    None,
                )
                return
        self._watch_timer = self._conn.call_later(
            interval_ms / 1000.0, lambda: self._check_beats(interval_ms)
        )

    def _connect_timed_out(self) -> None:
        if self._state is SessionState.AWAITING_CONNECT:
            self._fail("Connect timeout", f"No CONNECT frame within {CONNECT_TIMEOUT:g} s.", None)

    # -- closing -----------------------------------------------------------------------------------

    def _fail(self, message: str, detail: str, frame: Frame | None) -> None:
        """ERROR frame, then close (STOMP 1.2 "ERROR": the server MUST close after sending one)."""
        if self._state is SessionState.CLOSED:
            return
        receipt = frame.header("receipt") if frame is not None else None
        self._deferred.clear()  # receipts still waiting for the store are not sent after an ERROR
        self.write(encode_error(message, detail, self.version, receipt))
        self._close()

    def _close(self) -> None:
        self._state = SessionState.CLOSED
        self._teardown()
        self._conn.close()

    def _teardown(self) -> None:
        """Release everything this connection holds in the core (idempotent)."""
        if self._torn_down:
            return
        self._torn_down = True
        self._state = SessionState.CLOSED
        for timer in (self._connect_timer, self._beat_timer, self._watch_timer):
            if timer is not None:
                timer.cancel()
        self._connect_timer = self._beat_timer = self._watch_timer = None
        subs = list(self._subs.values())
        self._subs.clear()
        for sub in subs:
            sub.queue.remove_consumer(sub.consumer)
        if self.unacked:
            by_sub: dict[Subscription, list[Entry]] = {}
            for sub, entry in self.unacked.values():
                by_sub.setdefault(sub, []).append(entry)
            self.unacked.clear()
            for sub, entries in by_sub.items():
                sub.queue.requeue_many(entries)
        self._transactions.clear()
        if self._vhost is not None:
            self._vhost.release_owner(self)
            self.stats.clients_connected -= 1
        self._context.flow.unpark(self)


_CLIENT_HANDLERS: Final[Mapping[str, Callable[[StompSession, Frame], None]]] = MappingProxyType(
    {
        "SEND": StompSession._on_send,
        "SUBSCRIBE": StompSession._on_subscribe,
        "UNSUBSCRIBE": StompSession._on_unsubscribe,
        "ACK": StompSession._on_plain_ack,
        "NACK": StompSession._on_nack,
        "BEGIN": StompSession._on_begin,
        "COMMIT": StompSession._on_commit,
        "ABORT": StompSession._on_abort,
        "DISCONNECT": StompSession._on_disconnect,
        "CONNECT": StompSession._on_connect_again,
        "STOMP": StompSession._on_connect_again,
    }
)


def _negotiate(accept_version: str | None) -> str | None:
    """The highest version both sides speak; None when there is none (STOMP 1.2 "Protocol Negotiation")."""
    if accept_version is None:
        return "1.0"
    offered = {v.strip() for v in accept_version.split(",")}
    for version in reversed(SUPPORTED_VERSIONS):
        if version in offered:
            return version
    return None


def _digits(value: str) -> bool:
    return value.isascii() and value.isdigit()


def _required(frame: Frame, name: str) -> str:
    value = frame.header(name)
    if value is None:
        raise StompError(f"Missing {name}", f"A {frame.command} frame needs a {name} header.")
    return value


def _prefetch(headers: dict[str, str]) -> int | None:
    value = headers.get("prefetch-count", headers.get("activemq.prefetchSize"))
    if value is None:
        return None
    if not _digits(value):
        raise StompError("Invalid prefetch", f"prefetch {value!r}: expected a non-negative integer.")
    return int(value)


def _queue_arguments(headers: dict[str, str]) -> dict[str, object]:
    try:
        return queue_arguments(headers)
    except ValueError as exc:
        raise StompError("Invalid queue argument", str(exc)) from None


def _unknown_command(command: str) -> StompError:
    return StompError(
        "Unknown command", f'{command!r} is not a STOMP client frame (STOMP 1.2 "Client Frames").'
    )


def _broker_error_message(exc: BrokerError) -> str:
    """ERROR `message` header for a core refusal (the AMQP reply code's meaning)."""
    return {
        404: "Not found",
        403: "Access refused",
        405: "Resource locked",
        406: "Precondition failed",
        530: "Not allowed",
    }.get(exc.code, "Internal error")
