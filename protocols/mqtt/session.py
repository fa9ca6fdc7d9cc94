"""The MQTT 3.1 / 3.1.1 / 5.0 session: one connection's protocol rules against the broker core.

`MqttSession(context)` implements `protocols.session.ProtocolSession` (docs/sessions.md). It feeds
bytes to the codec (`MqttParser`), turns packets into calls on the core and core deliveries into
PUBLISH packets. `SysPublisher` (sys.py, re-exported here) publishes the `$SYS` topics.

Decisions a client can observe:

- CONNECT: `vhost:user` user names select a vhost when `vhost` exists (as RabbitMQ does), otherwise
  the whole name is the user and the vhost is `/`. A refused login gets CONNACK 0x86 / return code 4
  (bad user name or password) or 0x87 / 5 (not authorized). An empty Client Identifier gets one
  assigned (5.0 Assigned Client Identifier); below 5.0 only with Clean Session 1, else return code 2
  [MQTT-3.1.3-8]. 5.0 enhanced authentication is not offered: a CONNECT with an Authentication Method
  gets CONNACK 0x8C. A second connection with the same Client Identifier (in the same vhost) takes
  the session over: the first is closed, with DISCONNECT 0x8E on 5.0 [MQTT-3.1.4-3].
- Sessions: each client's subscriptions feed one queue of the core, `mqtt-session-<client id>`, bound
  to amq.topic with each filter converted by broker.names (README, Names across protocols). A persistent session (3.1.1
  Clean Session 0, 5.0 Session Expiry Interval > 0) has a durable queue, which keeps collecting QoS >= 1
  messages while the client is away and across broker restarts; its Session State (state.py) is
  journaled with `VHost.save_session`. A 5.0 session expires through the queue's `x-expires` and the
  saved state's disconnect time. A clean session has an exclusive queue deleted with the connection.
  Shared Subscriptions `$share/<group>/<filter>` consume competitively from one queue per (group,
  filter), `mqtt-shared-<group>/<filter>`.
- Delivery QoS is min(subscription QoS, publish QoS) [MQTT-3.8.4-6]; the publish QoS travels in the
  header `x-mqtt-publish-qos`. Overlapping subscriptions give one delivery at the highest QoS, with
  every matching Subscription Identifier (5.0 §3.3.4). Receive Maximum (5.0) or `[limits]
  mqtt_max_inflight` bounds the unacknowledged QoS 1 / QoS 2 deliveries (the consumers' credit).
  QoS 0 deliveries are settled at once; QoS 1 on PUBACK; QoS 2 at PUBREC, after which the Packet
  Identifier waits for PUBCOMP in the Session State. Unacknowledged deliveries return to the queue when
  the connection goes away and are sent again on reconnect with DUP set and, when known, their original
  Packet Identifier [MQTT-4.4.0-1].
- PUBACK / PUBREC to a publisher are sent only after the message is durable when it went to a durable
  queue (README, Guarantees). An inbound QoS 2 message is published on first receipt and its Packet
  Identifier is remembered until PUBREL, so a re-sent PUBLISH is not delivered twice.
- Retained messages (also delayed retained Will Messages, retained.py) are delivered on SUBSCRIBE per
  Retain Handling, also to wildcard filters; an empty retained PUBLISH clears the topic.
- The Will Message is published when the connection ends without a DISCONNECT 0x00 (keep-alive
  timeout, protocol error, takeover, network failure), after its Will Delay Interval (retained.py),
  and not when the broker shuts down.
- Errors: what the codec refuses and the session rules below end the connection, with DISCONNECT and
  the spec's Reason Code on 5.0 and a plain close below. Keep-alive: no packet for 1.5 x Keep Alive
  closes the connection (5.0: 0x8D) [MQTT-3.1.2-24].
- Outbound packets larger than the client's 5.0 Maximum Packet Size are dropped, counted
  (`messages_dropped`) and logged, and settled as if sent [MQTT-3.1.2-25]. Topic Aliases are assigned
  to outbound topics up to the client's Topic Alias Maximum, first come first served.

Theory of operation (hot path): `data_received` parses every whole packet of the read and acts on
each in turn; a PUBLISH without properties or retain flag, and a PUBACK, are handled inline in that
loop. Everything the session answers during a read (PUBACK, PUBREC, SUBACK, ...) is appended to
`_out` and written once at the end of it, or, when anything of the read went to the store, from ONE
`when_durable` callback (callbacks run in order, so answers keep their order). A delivery looks up its
`_Route` by routing key: the encoded topic field, the QoS cap and the property block, computed once per
topic, so that the per-message work is one `encode_publish` and one write. Nothing is logged per
message.

Must not import: asyncio, storage, cluster, other protocol packages, protocols.transport.
"""

from __future__ import annotations

import enum
import logging
import secrets
import struct
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final

from broker.context import ServerContext
from broker.core import PublishResult, VHost
from broker.errors import AccessRefused, BrokerError
from broker.message import Message
from broker.names import key_to_mqtt_topic, mqtt_topic_to_key
from broker.queue import ChannelCredit, Consumer, Entry, Queue
from protocols.mqtt.codec import (
    MAX_PACKET_SIZE,
    NEED_DATA,
    NO_PROPERTIES,
    MqttParser,
    connect_return_code,
    encode,
    encode_publish,
    encode_string,
    validate_topic_filter,
    validate_topic_name,
)
from protocols.mqtt.mapping import (
    QOS_PROPERTIES,
    core_properties,
    publish_property_content,
    publish_qos,
)
from protocols.mqtt.packets import (
    Auth,
    ConnAck,
    Connect,
    ConnectReturnCode,
    Disconnect,
    MqttError,
    PingReq,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    ReasonCode,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    Will,
)
from protocols.mqtt.packets import (
    Properties as MqttProperties,
)
from protocols.mqtt.properties import encode_varint
from protocols.mqtt.retained import (
    SESSION_QUEUE_PREFIX,
    SHARED_QUEUE_PREFIX,
    TOPIC_EXCHANGE,
    apply_fired_wills,
    hold_will,
    queue_name,
    take_pending_will,
)
from protocols.mqtt.state import (
    NEVER_EXPIRES,
    SessionState,
    StateError,
    Subscription,
    filter_matches,
    make_subscription,
)
from protocols.mqtt.sys import SysPublisher
from protocols.session import Connection, ProtocolSession, TimerHandle

__all__ = ["MqttSession", "SessionPhase", "SysPublisher"]

log = logging.getLogger("polybroker.mqtt")

#: Seconds a connection may take to send its CONNECT.
CONNECT_TIMEOUT: Final = 10.0
#: Largest packet accepted before the CONNECT is accepted (RabbitMQ: 64 KiB for unauthenticated peers).
PRE_CONNECT_MAX_PACKET: Final = 65_536
#: Topic Alias Maximum the broker offers to 5.0 clients (aliases the client may set, §3.2.2.3.8).
TOPIC_ALIAS_MAXIMUM: Final = 1024
#: Routes (per-topic delivery plans) a connection keeps before it starts over.
ROUTE_CACHE_SIZE: Final = 4096

_PUBACK: Final = struct.Struct(">BBH").pack  # PUBACK / PUBREC / PUBREL / PUBCOMP with reason 0
_ACK_REASON: Final = struct.Struct(">BBHB").pack  # 5.0 ack with a reason code, no properties
_PINGRESP: Final = b"\xd0\x00"
_NO_ROUTE: Final = ReasonCode.NO_MATCHING_SUBSCRIBERS
_TOPIC_ALIAS: Final = struct.Struct(">BH").pack
_QOS0, _QOS1, _QOS2 = QOS_PROPERTIES


class SessionPhase(enum.Enum):
    """Where the connection is (3.1.1 §3.1 / 5.0 §3.1: the CONNECT comes first)."""

    AWAITING_CONNECT = enum.auto()
    CONNECTED = enum.auto()
    #: After DISCONNECT, an error, a takeover or shutdown: input is ignored, the connection is closing.
    CLOSED = enum.auto()


class _Route:
    """How messages with one routing key are sent to this connection (computed once per topic).

    `fast` is False when a delivery needs the general path: an invalid MQTT topic (dropped), a
    pending Topic Alias announcement, or No Local subscriptions among the matching ones.
    """

    __slots__ = (
        "qos",
        "topic_field",
        "props",
        "extra",
        "retain",
        "no_local",
        "fast",
        "alias",
        "announce",
        "topic",
        "subs",
    )

    def __init__(self) -> None:
        self.qos = 0
        #: The Topic Name field (length-prefixed), empty when a Topic Alias stands for it.
        self.topic_field = b""
        #: The whole property block of a message without properties of its own (5.0), else b"".
        self.props = b""
        #: Per-subscriber property content (Subscription Identifiers, Topic Alias), without the length.
        self.extra = b""
        #: Retain As Published on a matching subscription (5.0 §3.3.1.3).
        self.retain = False
        self.no_local = False
        self.fast = True
        #: Outbound Topic Alias, 0 when none; `announce`: its first use, which carries the Topic Name too.
        self.alias = 0
        self.announce = False
        self.topic = ""
        #: The matching subscriptions (for the general path).
        self.subs: list[Subscription] = []


class _SharedSource:
    """This session's membership of one Shared Subscription: a consumer of the group's queue."""

    __slots__ = ("session", "sub", "queue", "consumer", "routes")

    def __init__(self, session: MqttSession, sub: Subscription, queue: Queue) -> None:
        self.session = session
        self.sub = sub
        self.queue = queue
        self.consumer: Consumer | None = None
        self.routes: dict[str, _Route] = {}

    def deliver(self, queue: Queue, entry: Entry) -> None:
        try:
            self.session._deliver_from(queue, entry, self.routes, [self.sub], True)
        except Exception:
            self.session._delivery_failed(queue, entry)

    def cancelled(self) -> None:
        self.session._queue_deleted(self.queue)


class MqttSession(ProtocolSession):
    """One MQTT connection. See the module docstring for the rules it follows."""

    __slots__ = (
        "_context",
        "_broker",
        "_stats",
        "_limits",
        "_parser",
        "_phase",
        "_level",
        "_conn",
        "_write",
        "_now",
        "_vh",
        "_key",
        "_client_id",
        "_state",
        "_persistent",
        "_queue",
        "_consumer",
        "_credit",
        "_shared",
        "_routes",
        "_inflight",
        "_inflight_other",
        "_qos2_out",
        "_resend",
        "_next_pid",
        "_out",
        "_sync",
        "_outstanding",
        "_pending_in",
        "_deferred_acks",
        "_dirty",
        "_after_save",
        "_settle_later",
        "_settle_timer",
        "_will",
        "_keepalive",
        "_last_rx",
        "_timer",
        "_recv_max_in",
        "_recv_max_out",
        "_max_out",
        "_alias_max_out",
        "_aliases_out",
        "_aliases_announced",
        "_aliases_in",
        "_write_paused",
        "_credit_exhausted",
        "_drops",
        "_session_started",
        "_will_on_close",
        "_torn_down",
    )

    def __init__(self, context: ServerContext) -> None:
        self._context = context
        self._broker = context.broker
        self._stats = context.stats
        self._limits = context.config.limits
        self._parser = MqttParser(max_packet_size=PRE_CONNECT_MAX_PACKET)
        self._phase = SessionPhase.AWAITING_CONNECT
        self._level = 4
        self._conn: Connection
        self._write: Callable[[bytes], None]
        self._now: Callable[[], float]
        self._vh: VHost
        self._key: tuple[str, str] = ("", "")
        self._client_id = ""
        self._state = SessionState("")
        self._persistent = False
        self._queue: Queue | None = None
        self._consumer: Consumer | None = None
        self._credit: ChannelCredit | None = None
        self._shared: dict[str, _SharedSource] = {}
        self._routes: dict[str, _Route] = {}
        #: Packet Identifier -> unacknowledged delivery from the session queue (QoS 1 and 2 before PUBREC).
        self._inflight: dict[int, Entry] = {}
        #: The same for deliveries from elsewhere: shared queues, retained messages (queue, entry None).
        self._inflight_other: dict[int, tuple[Queue | None, Entry | None]] = {}
        #: Packet Identifiers of outbound QoS 2 deliveries awaiting PUBREC.
        self._qos2_out: set[int] = set()
        #: Original Packet Identifiers of deliveries unacknowledged at the last disconnect, by message id.
        self._resend: dict[int, int] = {}
        self._next_pid = 1
        # The answers of the current read, in order; `_sync`: one of them must wait for the store.
        self._out: list[bytes] = []
        self._sync = False
        self._outstanding = 0
        #: QoS 1 PUBACKs not yet written (5.0 Receive Maximum of the broker side).
        self._pending_in = 0
        #: Of those, the ones waiting in `when_durable` callbacks.
        self._deferred_acks = 0
        self._dirty = False
        #: Queue entries to settle once the Session State of this read is saved (QoS 2 PUBREC).
        self._after_save: list[tuple[Queue | None, Entry | None]] = []
        #: QoS 0 deliveries from an acknowledging consumer, settled just after the delivery loop.
        self._settle_later: list[tuple[Queue, Entry]] = []
        self._settle_timer: TimerHandle | None = None
        self._will: Will | None = None
        self._keepalive = 0
        self._last_rx = 0.0
        self._timer: TimerHandle | None = None
        self._recv_max_in: int = self._limits.mqtt_max_inflight
        self._recv_max_out: int = self._limits.mqtt_max_inflight
        self._max_out = MAX_PACKET_SIZE
        self._alias_max_out = 0
        self._aliases_out: dict[str, int] = {}
        self._aliases_announced: set[int] = set()
        self._aliases_in: dict[int, str] = {}
        self._write_paused = False
        self._credit_exhausted = False
        self._drops = 0
        #: The CONNECT was accepted: there is a session to save or end at the close.
        self._session_started = False
        #: The broker closed the connection (not the client's DISCONNECT): the Will goes out [MQTT-3.1.2-8].
        self._will_on_close = False
        self._torn_down = False

    # -- ProtocolSession ---------------------------------------------------------------------------

    def connection_made(self, conn: Connection) -> None:
        self._conn = conn
        self._write = conn.write
        self._now = conn.now
        self._write_paused = not conn.writable
        self._timer = conn.call_later(CONNECT_TIMEOUT, self._connect_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._phase is SessionPhase.CLOSED:
            return
        self._last_rx = self._now()
        parser = self._parser
        parser.feed(data)
        out = self._out
        received = 0
        # Hot-path names as locals; `publish` is bound once the CONNECT is accepted (maybe in this read).
        publish: Callable[[Message], PublishResult] | None = (
            self._vh.publish if self._phase is SessionPhase.CONNECTED else None
        )
        origin = self._key
        topic_key = mqtt_topic_to_key
        properties_of = QOS_PROPERTIES
        inflight = self._inflight
        try:
            while True:
                packet: Any = parser.next_packet()
                if packet is NEED_DATA:
                    break
                kind = type(packet)
                if kind is Publish:
                    received += 1
                    qos = packet.qos
                    if qos == 2 or packet.retain or packet.properties is not None or publish is None:
                        self._on_publish(packet)
                        continue
                    # The hot path (§3.3): QoS 0 / 1 without properties or retain flag.
                    result = publish(
                        Message(
                            TOPIC_EXCHANGE,
                            topic_key(packet.topic),
                            packet.payload,
                            properties_of[qos],
                            0,
                            None,
                            False,
                            origin,
                        )
                    )
                    if qos:
                        self._pending_in += 1
                        if self._pending_in + len(self._state.awaiting_pubrel) > self._recv_max_in:
                            raise _receive_maximum_exceeded()
                        if result.needs_sync:
                            self._sync = True
                        if result.routed and not result.rejected:
                            out.append(_PUBACK(0x40, 2, packet.packet_id))
                        else:
                            self._refused_ack(0x40, packet.packet_id, result)
                elif kind is PubAck:
                    entry = inflight.pop(packet.packet_id, None)
                    if entry is not None and not self._qos2_out:
                        self._queue.ack(entry)  # type: ignore[union-attr]
                    else:
                        self._on_puback(packet, entry)
                else:
                    _HANDLERS[kind](self, packet)
                    if self._phase is not SessionPhase.CONNECTED:
                        break
                    if publish is None:
                        publish = self._vh.publish
                        origin = self._key
                        inflight = self._inflight
        except MqttError as exc:
            self._protocol_error(exc)
        except BrokerError as exc:
            log.warning("MQTT session error: client=%r error=%s", self._client_id, exc)
            self._protocol_error(MqttError(ReasonCode.UNSPECIFIED_ERROR, exc.text))
        if received:
            self._stats.messages_received += received
        self._end_batch()
        if received and self._context.flow.should_pause() and self._phase is SessionPhase.CONNECTED:
            self._conn.pause_reading()
            self._context.flow.park(self, self._conn.resume_reading)

    def writing_paused(self) -> None:
        self._write_paused = True
        self._refresh_blocked()

    def writing_resumed(self) -> None:
        self._write_paused = False
        self._refresh_blocked()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._phase is SessionPhase.CLOSED:
            self._teardown(publish_will=self._will_on_close)
            return
        connected = self._phase is SessionPhase.CONNECTED
        self._phase = SessionPhase.CLOSED
        self._teardown(publish_will=connected)

    def shutdown(self) -> None:
        if self._phase is SessionPhase.CLOSED:
            return
        if self._phase is SessionPhase.CONNECTED and self._level == 5:
            self._write(
                self._control(Disconnect(ReasonCode.SERVER_SHUTTING_DOWN, _reason("broker shutdown")))
            )
        self._phase = SessionPhase.CLOSED
        self._teardown(publish_will=False)
        self._conn.close()

    # -- CONNECT -----------------------------------------------------------------------------------

    def _on_connect(self, packet: Connect) -> None:
        context = self._context
        level = packet.protocol_level
        self._level = level
        props = packet.properties
        expiry = 0
        if props is not None:
            if props.authentication_method is not None:
                self._refuse(
                    ReasonCode.BAD_AUTHENTICATION_METHOD,
                    f"authentication method {props.authentication_method!r} is not supported",
                )
                return
            expiry = props.session_expiry_interval or 0
            if props.receive_maximum is not None:
                self._recv_max_out = min(props.receive_maximum, self._recv_max_out)
            if props.maximum_packet_size is not None:
                self._max_out = props.maximum_packet_size
            self._alias_max_out = props.topic_alias_maximum or 0
        client_id = packet.client_id
        assigned = False
        if not client_id:
            if level < 5 and (not packet.clean_start or level == 3):
                # [MQTT-3.1.3-8]; 3.1 requires 1 to 23 characters.
                self._refuse(
                    ReasonCode.CLIENT_IDENTIFIER_NOT_VALID, "an empty Client Identifier needs Clean Session 1"
                )
                return
            client_id = "auto-" + secrets.token_hex(12)
            assigned = True
        vhost_name, username = self._vhost_and_user(packet.username)
        result = context.auth.authenticate(
            username, packet.password, is_loopback=self._conn.is_loopback, vhost=vhost_name
        )
        if not result.ok:
            self._stats.connections_refused += 1
            log.info(
                "MQTT login refused: peer=%s user=%r reason=%s", self._conn.peer, username, result.reason
            )
            failure = getattr(result.failure, "value", "")
            self._refuse(
                ReasonCode.BAD_USER_NAME_OR_PASSWORD
                if failure == "bad_credentials"
                else ReasonCode.NOT_AUTHORIZED,
                result.reason,
            )
            return
        vh = context.broker.vhost(vhost_name)
        self._vh = vh
        self._client_id = client_id
        key = (vhost_name, client_id)
        # From here on the connection counts as connected: _teardown undoes what follows.
        self._key = key
        self._stats.clients_connected += 1
        self._stats.clients_total += 1
        existing = context.mqtt_clients.get(key)
        if existing is not None and existing is not self:
            existing.take_over()
        context.mqtt_clients[key] = self
        if level == 5:
            self._persistent = expiry > 0
            expiry_interval: int | None = None if expiry == NEVER_EXPIRES else expiry
        else:
            self._persistent = not packet.clean_start
            expiry_interval = None
            # 3.1.1 has no Receive Maximum: the client cannot know ours, so it is not enforced.
            self._recv_max_in = 1 << 30
        # A parked Will of an earlier connection: a new connection cancels it, a clean one ends the old
        # session, which publishes it (5.0 §3.1.2.5: delay over or session ended, whichever first).
        pending = take_pending_will(vh, client_id)
        if pending is not None and packet.clean_start:
            self._publish_message(pending)
        state = None if packet.clean_start else self._saved_state(vh, key)
        session_present = state is not None
        if state is None:
            self._discard_session()
            state = SessionState(client_id)
        state.expiry_interval = expiry_interval
        state.disconnected_at = None
        self._state = state
        self._resend = state.inflight
        state.inflight = {}
        if self._resend or state.awaiting_pubcomp:
            self._next_pid = max([0, *self._resend.values(), *state.awaiting_pubcomp]) % 0xFFFF + 1
        self._will = packet.will
        self._keepalive = packet.keepalive
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = SessionPhase.CONNECTED
        self._parser.max_packet_size = self._limits.max_frame_size
        self._credit = ChannelCredit(self._recv_max_out)
        self._session_started = True
        connack = ConnAck(session_present and level > 3, ConnectReturnCode.ACCEPTED)
        if level == 5:
            connack.properties = self._connack_properties(client_id if assigned else None)
        self._write(self._control(connack))
        if self._keepalive:
            self._timer = self._conn.call_later(self._keepalive * 1.5, self._check_keepalive)
        for packet_id in sorted(state.awaiting_pubcomp):
            # [MQTT-4.4.0-1]: PUBREL again for every QoS 2 delivery that had reached PUBREC.
            self._write(_PUBACK(0x62, 2, packet_id))
        self._refresh_credit()
        self._restore_subscriptions()
        if self._persistent:
            self._save_state()

    def _vhost_and_user(self, username: str | None) -> tuple[str, str | None]:
        """RabbitMQ's `vhost:user` user names: the vhost part counts only when that vhost exists."""
        if username and ":" in username:
            vhost, _, user = username.partition(":")
            if vhost in self._context.broker.vhosts:
                return vhost, user
        return "/", username

    def _connack_properties(self, assigned_client_id: str | None) -> MqttProperties:
        props = MqttProperties(
            assigned_client_identifier=assigned_client_id, topic_alias_maximum=TOPIC_ALIAS_MAXIMUM
        )
        if self._recv_max_in < 0xFFFF:
            props.receive_maximum = self._recv_max_in
        if self._limits.max_frame_size < MAX_PACKET_SIZE:
            props.maximum_packet_size = self._limits.max_frame_size
        return props

    def _refuse(self, reason_code: int, reason: str) -> None:
        """Refuse the CONNECT: CONNACK with the reason (5.0) or return code (3.1, 3.1.1), then close."""
        level = self._parser.protocol_level
        if level == 5:
            self._write(encode(ConnAck(False, reason_code, _reason(reason)), 5))
        else:
            code = connect_return_code(reason_code)
            if level is None:
                # No CONNECT was understood. An unsupported protocol level is answered in 3.1.1's
                # format, as Mosquitto does; anything else is closed without a CONNACK [MQTT-3.1.0-1].
                level = 4
                if reason_code != ReasonCode.UNSUPPORTED_PROTOCOL_VERSION:
                    code = None
            if code is not None:  # else [MQTT-3.2.2-6]: close without a CONNACK
                self._write(encode(ConnAck(False, code), level))
        self._phase = SessionPhase.CLOSED
        self._teardown(publish_will=False)
        self._conn.close()

    def _saved_state(self, vh: VHost, key: tuple[str, str]) -> SessionState | None:
        raw = self._context.saved_sessions.get(key)
        if raw is None:
            return None
        try:
            state = SessionState.decode(raw)
        except StateError as exc:
            log.warning("MQTT session state of client %r discarded: %s", key[1], exc)
            return None
        if state.expired(self._broker.wall_clock(), self._context.started_at):
            return None
        return state

    def _discard_session(self) -> None:
        """End whatever is left of an earlier session of this client: its queue (with the bindings of
        its subscriptions) and its saved state (Clean Start, or an expired session, 5.0 §4.1)."""
        vh = self._vh
        name = queue_name(SESSION_QUEUE_PREFIX, self._client_id)
        queue = vh.queues.get(name)
        if queue is not None and not queue.consumers:
            vh.delete_queue(name, owner=queue.exclusive_owner)
        if self._context.saved_sessions.pop(self._key, None) is not None:
            vh.delete_session(self._client_id)

    def take_over(self) -> None:
        """Another connection took this Client Identifier: close this one [MQTT-3.1.4-3]."""
        if self._phase is not SessionPhase.CONNECTED:
            return
        if self._level == 5:
            self._write(
                self._control(Disconnect(ReasonCode.SESSION_TAKEN_OVER, _reason("session taken over")))
            )
        self._phase = SessionPhase.CLOSED
        self._teardown(publish_will=True)
        self._conn.close()

    # -- PUBLISH (general path) ---------------------------------------------------------------------

    def _on_publish(self, packet: Publish) -> None:
        """A PUBLISH with QoS 2, the retain flag or 5.0 properties (the others are handled inline)."""
        props = packet.properties
        topic = packet.topic
        if props is not None and props.topic_alias is not None:
            topic = self._resolve_alias(topic, props.topic_alias)
            props.topic_alias = None
        qos = packet.qos
        packet_id = packet.packet_id
        if qos == 2:
            awaiting = self._state.awaiting_pubrel
            if packet_id in awaiting:
                # A re-sent PUBLISH whose PUBREC was sent: not delivered again (5.0 [MQTT-4.3.3-9]).
                self._out.append(_PUBACK(0x50, 2, packet_id))
                return
            if self._pending_in + len(awaiting) >= self._recv_max_in:
                raise _receive_maximum_exceeded()
        elif qos == 1:
            self._pending_in += 1
            if self._pending_in + len(self._state.awaiting_pubrel) > self._recv_max_in:
                raise _receive_maximum_exceeded()
        message = Message(
            TOPIC_EXCHANGE,
            mqtt_topic_to_key(topic),
            packet.payload,
            core_properties(props if _has_message_properties(props) else None, qos),
            0,
            None,
            packet.retain,
            self._key,
        )
        result = self._publish_message(message)
        if not qos:
            return
        first = 0x40 if qos == 1 else 0x50
        if result.needs_sync:
            self._sync = True
        if result.rejected or not result.routed:
            if self._refused_ack(first, packet_id, result):
                return
        else:
            self._out.append(_PUBACK(first, 2, packet_id))
        if qos == 2:
            self._state.awaiting_pubrel.add(packet_id)
            self._mark_dirty()

    def _refused_ack(self, first: int, packet_id: int, result: PublishResult) -> bool:
        """The PUBACK / PUBREC of a message not routed or refused; True when the flow ends here."""
        if self._level < 5:
            if result.rejected:
                # 3.1.1 cannot say no: leave it unacknowledged; the client sends it again later.
                return True
            self._out.append(_PUBACK(first, 2, packet_id))
            return False
        if result.rejected:
            self._out.append(_ACK_REASON(first, 3, packet_id, ReasonCode.QUOTA_EXCEEDED))
            return True
        self._out.append(_ACK_REASON(first, 3, packet_id, _NO_ROUTE))
        return False

    def _publish_message(self, message: Message) -> PublishResult:
        """Publish a PUBLISH or Will Message; a retained one also sets (or clears) the retained message."""
        vh = self._vh
        result = vh.publish(message)
        if message.retain:
            apply_fired_wills(vh)
            key = message.routing_key
            if message.body:
                retained = Message(
                    TOPIC_EXCHANGE, key, message.body, message.properties, 0, message.expires_at, True
                )
                vh.set_retained(key, retained)
            else:
                # [MQTT-3.3.1-10] (3.1.1), [MQTT-3.3.1-6] (5.0): an empty retained message clears the topic.
                vh.set_retained(key, None)
            if message.properties.delivery_mode == 2:
                return PublishResult(result.routed, result.rejected, True)
        return result

    def _resolve_alias(self, topic: str, alias: int) -> str:
        """5.0 §3.3.2.3.4: set or use an inbound Topic Alias."""
        if not 0 < alias <= TOPIC_ALIAS_MAXIMUM:
            raise MqttError(
                ReasonCode.TOPIC_ALIAS_INVALID, f"Topic Alias {alias} is out of range [MQTT-3.3.2-9]"
            )
        if topic:
            self._aliases_in[alias] = topic
            return topic
        known = self._aliases_in.get(alias)
        if known is None:
            raise MqttError(ReasonCode.PROTOCOL_ERROR, f"Topic Alias {alias} was never set (§3.3.2.3.4)")
        return known

    # -- acknowledgements ----------------------------------------------------------------------------

    def _on_puback(self, packet: PubAck, entry: Entry | None) -> None:
        packet_id = packet.packet_id
        if packet_id in self._qos2_out:
            raise MqttError(ReasonCode.PROTOCOL_ERROR, f"PUBACK for the QoS 2 delivery {packet_id} (§4.3.3)")
        if entry is not None:
            self._queue.ack(entry)  # type: ignore[union-attr]
            return
        queue, held = self._inflight_other.pop(packet_id, (None, None))
        if queue is not None and held is not None:
            queue.ack(held)
        # A PUBACK for an unknown Packet Identifier is ignored (as Mosquitto does).

    def _on_pubrec(self, packet: PubRec) -> None:
        packet_id = packet.packet_id
        if packet_id not in self._qos2_out:
            if packet_id in self._inflight or packet_id in self._inflight_other:
                raise MqttError(
                    ReasonCode.PROTOCOL_ERROR, f"PUBREC for the QoS 1 delivery {packet_id} (§4.3.2)"
                )
            if packet_id in self._state.awaiting_pubcomp:
                self._out.append(_PUBACK(0x62, 2, packet_id))  # a repeated PUBREC: PUBREL again
                return
            # 5.0 §3.6.2.1: PUBREL with Packet Identifier not found.
            if self._level == 5:
                self._out.append(_ACK_REASON(0x62, 3, packet_id, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND))
            else:
                self._out.append(_PUBACK(0x62, 2, packet_id))
            return
        self._qos2_out.discard(packet_id)
        entry = self._inflight.pop(packet_id, None)
        if entry is not None:
            held: tuple[Queue | None, Entry | None] = (self._queue, entry)
        else:
            held = self._inflight_other.pop(packet_id, (None, None))
        if packet.reason_code >= 0x80:
            # 5.0 §4.3.3: a refusing PUBREC ends the flow; the message counts as delivered.
            self._after_save.append(held)
            return
        self._state.awaiting_pubcomp.add(packet_id)
        self._out.append(_PUBACK(0x62, 2, packet_id))
        # The queue entry is settled only after the PUBREL-pending id is saved (ordered in the journal).
        self._after_save.append(held)
        self._mark_dirty()
        self._refresh_credit()

    def _on_pubrel(self, packet: PubRel) -> None:
        packet_id = packet.packet_id
        awaiting = self._state.awaiting_pubrel
        if packet_id in awaiting:
            awaiting.discard(packet_id)
            self._mark_dirty()
            self._out.append(_PUBACK(0x70, 2, packet_id))
        elif self._level == 5:
            self._out.append(_ACK_REASON(0x70, 3, packet_id, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND))
        else:
            self._out.append(_PUBACK(0x70, 2, packet_id))

    def _on_pubcomp(self, packet: PubComp) -> None:
        awaiting = self._state.awaiting_pubcomp
        if packet.packet_id in awaiting:
            awaiting.discard(packet.packet_id)
            self._mark_dirty()
            self._refresh_credit()

    # -- SUBSCRIBE / UNSUBSCRIBE ---------------------------------------------------------------------

    def _on_subscribe(self, packet: Subscribe) -> None:
        props = packet.properties
        identifier = (
            props.subscription_identifiers[0]
            if props is not None and props.subscription_identifiers
            else None
        )
        level = self._level
        codes: list[int] = []
        retained_for: list[Subscription] = []
        for topic_filter, options in packet.subscriptions:
            try:
                validate_topic_filter(topic_filter)
            except MqttError:
                codes.append(ReasonCode.TOPIC_FILTER_INVALID if level == 5 else 0x80)
                continue
            existed = topic_filter in self._state.subscriptions
            sub = make_subscription(
                topic_filter,
                options.qos,
                options.no_local,
                options.retain_as_published,
                options.retain_handling,
                identifier,
            )
            try:
                self._add_subscription(sub)
            except BrokerError as exc:
                log.warning(
                    "MQTT subscribe refused: client=%r filter=%r error=%s", self._client_id, topic_filter, exc
                )
                codes.append(
                    ReasonCode.NOT_AUTHORIZED if isinstance(exc, AccessRefused) and level == 5 else 0x80
                )
                continue
            codes.append(sub.qos)
            # 5.0 §3.8.3.1 Retain Handling. A Shared Subscription gets no retained messages (5.0 §4.8.2).
            if sub.share_group is None and (
                sub.retain_handling == 0 or (sub.retain_handling == 1 and not existed)
            ):
                retained_for.append(sub)
        self._routes.clear()
        self._out.append(encode(SubAck(packet.packet_id, codes), level))
        if self._persistent:
            self._mark_dirty()
        if retained_for:
            apply_fired_wills(self._vh)
            for sub in retained_for:
                for message in self._vh.retained_matching(mqtt_topic_to_key(sub.inner_filter)):
                    self._send_retained(sub, message)

    def _on_unsubscribe(self, packet: Unsubscribe) -> None:
        codes: list[int] = []
        for topic_filter in packet.topic_filters:
            sub = self._state.subscriptions.pop(topic_filter, None)
            if sub is None:
                codes.append(ReasonCode.NO_SUBSCRIPTION_EXISTED)
                continue
            self._remove_subscription(sub)
            codes.append(ReasonCode.SUCCESS)
        self._routes.clear()
        if self._level == 5:
            self._out.append(encode(UnsubAck(packet.packet_id, codes), 5))
        else:
            self._out.append(_PUBACK(0xB0, 2, packet.packet_id))
        if self._persistent:
            self._mark_dirty()

    def _add_subscription(self, sub: Subscription) -> None:
        vh = self._vh
        if sub.share_group is None:
            queue = self._session_queue()
            vh.bind_queue(queue.name, TOPIC_EXCHANGE, mqtt_topic_to_key(sub.inner_filter), owner=self)
            self._state.subscriptions[sub.topic_filter] = sub
            self._update_consumer()
            return
        source = self._shared.get(sub.topic_filter)
        if source is None:
            name = queue_name(SHARED_QUEUE_PREFIX, f"{sub.share_group}/{sub.inner_filter}")
            shared = vh.queues.get(name)
            if shared is None:
                shared = vh.declare_queue(
                    name,
                    durable=self._persistent,
                    auto_delete=not self._persistent,
                    arguments=self._queue_arguments(),
                )
            vh.bind_queue(name, TOPIC_EXCHANGE, mqtt_topic_to_key(sub.inner_filter))
            source = _SharedSource(self, sub, shared)
            self._shared[sub.topic_filter] = source
        source.sub = sub
        source.routes.clear()
        self._state.subscriptions[sub.topic_filter] = sub
        no_ack = sub.qos == 0
        if source.consumer is None or source.consumer.no_ack != no_ack:
            if source.consumer is not None:
                source.queue.remove_consumer(source.consumer)
            consumer = self._make_consumer(source.deliver, no_ack)
            consumer.on_cancel = source.cancelled
            source.consumer = consumer
            source.queue.add_consumer(consumer)

    def _remove_subscription(self, sub: Subscription) -> None:
        vh = self._vh
        if sub.share_group is None:
            queue = self._queue
            if queue is not None and not queue.deleted:
                vh.unbind_queue(queue.name, TOPIC_EXCHANGE, mqtt_topic_to_key(sub.inner_filter), owner=self)
            self._update_consumer()
            return
        source = self._shared.pop(sub.topic_filter, None)
        if source is None or source.consumer is None:
            return
        queue = source.queue
        queue.remove_consumer(source.consumer)
        # The last member leaving a durable group queue ends the Shared Subscription.
        if not queue.consumers and not queue.deleted and queue.durable and vh.queues.get(queue.name) is queue:
            vh.delete_queue(queue.name)

    def _session_queue(self) -> Queue:
        queue = self._queue
        if queue is not None and not queue.deleted:
            return queue
        vh = self._vh
        name = queue_name(SESSION_QUEUE_PREFIX, self._client_id)
        queue = vh.queues.get(name)
        if queue is None:
            arguments = self._queue_arguments()
            if self._persistent:
                expiry = self._state.expiry_interval
                if expiry is not None:
                    arguments["x-expires"] = max(1, expiry * 1000)
                queue = vh.declare_queue(name, durable=True, arguments=arguments)
            else:
                queue = vh.declare_queue(name, exclusive_owner=self, arguments=arguments, owner=self)
        elif self._persistent:
            # The Session Expiry Interval of this connection replaces the earlier one (5.0 §3.1.2.11.2).
            expiry = self._state.expiry_interval
            queue.expires = None if expiry is None else max(1, expiry * 1000)
        self._queue = queue
        self._consumer = None
        return queue

    def _queue_arguments(self) -> dict[str, Any]:
        # [limits] mqtt_max_queued: beyond it the oldest message is dropped (counted, dead-lettered if
        # configured) by the core's max-length rule.
        limit = self._limits.mqtt_max_queued
        return {"x-max-length": limit} if limit else {}

    def _update_consumer(self) -> None:
        """Consume the session queue when it has subscriptions: without acks when they are all QoS 0."""
        queue = self._queue
        if queue is None or queue.deleted:
            return
        subs = [s for s in self._state.subscriptions.values() if s.share_group is None]
        old = self._consumer
        if not subs:
            if old is not None:
                queue.remove_consumer(old)
                self._consumer = None
            return
        no_ack = all(s.qos == 0 for s in subs)
        if old is not None and old.no_ack == no_ack:
            return
        if old is not None:
            queue.remove_consumer(old)
        consumer = self._make_consumer(self._deliver, no_ack)
        consumer.on_cancel = self._session_queue_deleted
        self._consumer = consumer
        queue.add_consumer(consumer)  # may deliver at once

    def _make_consumer(self, deliver: Callable[[Queue, Entry], None], no_ack: bool) -> Consumer:
        consumer = Consumer(
            "mqtt",
            deliver,
            prefetch=0,
            no_ack=no_ack,
            owner=self,
            channel_credit=None if no_ack else self._credit,
        )
        consumer.blocked = self._write_paused or self._credit_exhausted
        return consumer

    def _restore_subscriptions(self) -> None:
        """A resumed session: its queue, bindings and consumers as the saved subscriptions say."""
        subs = list(self._state.subscriptions.values())
        if not subs:
            return
        vh = self._vh
        plain = [s for s in subs if s.share_group is None]
        if plain:
            queue = self._session_queue()
            for sub in plain:
                vh.bind_queue(queue.name, TOPIC_EXCHANGE, mqtt_topic_to_key(sub.inner_filter), owner=self)
        for sub in subs:
            if sub.share_group is not None:
                self._add_subscription(sub)
        self._update_consumer()

    # -- deliveries ----------------------------------------------------------------------------------

    def _deliver(self, queue: Queue, entry: Entry) -> None:
        """The core hands over a message of the session queue (maybe inside another connection's call):
        encode and write only; anything that calls back into the core is deferred."""
        try:
            message = entry.message
            route = self._routes.get(message.routing_key)
            if route is None or not route.fast:
                self._deliver_from(queue, entry, self._routes, None, False)
                return
            props = message.properties
            if props is _QOS0:
                qos = 0
            elif props is _QOS1:
                qos = 1 if route.qos else 0
            elif props is _QOS2:
                qos = route.qos
            else:
                self._deliver_from(queue, entry, self._routes, None, False)
                return
            if qos:
                packet_id = self._next_pid
                if (
                    entry.redelivered
                    or packet_id in self._inflight
                    or self._inflight_other
                    or self._resend
                    or self._state.awaiting_pubcomp
                ):
                    packet_id = self._take_packet_id(entry)
                else:
                    self._next_pid = packet_id % 0xFFFF + 1
                data = encode_publish(
                    route.topic_field,
                    message.body,
                    qos,
                    packet_id,
                    route.retain and message.retain,
                    entry.redelivered,
                    route.props,
                )
                if len(data) > self._max_out:
                    self._drop_oversize(queue, entry, len(data))
                    return
                self._inflight[packet_id] = entry
                if qos == 2:
                    self._qos2_out.add(packet_id)
            else:
                # A QoS 0 PUBLISH is the same bytes for every subscriber with the same topic field,
                # properties and retain flag: encode once per fan-out.
                retain = route.retain and message.retain
                key = (route.topic_field, route.props, retain)
                cached = message.encoded
                if cached is not None and cached[0] == key:
                    data = cached[1]
                else:
                    data = encode_publish(route.topic_field, message.body, 0, 0, retain, False, route.props)
                    message.encoded = (key, data)
                if len(data) > self._max_out:
                    self._drop_oversize(queue, entry, len(data))
                    return
                if entry.held:
                    self._defer_settle(queue, entry)
            self._write(data)
            self._stats.messages_sent += 1
        except Exception:
            # A bug here must not fail the publisher whose publish call this runs in: this connection goes.
            self._delivery_failed(queue, entry)

    def _deliver_from(
        self,
        queue: Queue,
        entry: Entry,
        routes: dict[str, _Route],
        subs: list[Subscription] | None,
        other: bool,
    ) -> None:
        """The general delivery path: message properties, No Local, Topic Alias announcements, topics
        that MQTT cannot carry. `other`: the entry is not from the session queue (a shared one)."""
        message = entry.message
        route = routes.get(message.routing_key)
        if route is None:
            if len(routes) >= ROUTE_CACHE_SIZE:
                routes.clear()
            route = routes[message.routing_key] = self._make_route(message.routing_key, subs)
        held = entry.held
        if not route.topic:
            # The routing key is no valid MQTT Topic Name (e.g. an AMQP key with "#", or empty).
            self._count_drop("routing key %r is not a valid MQTT Topic Name", message.routing_key)
            if held:
                self._defer_settle(queue, entry)
            return
        cap = route.qos
        extra = route.extra
        if route.no_local and message.origin == self._key:
            matching = [s for s in route.subs if not s.no_local]
            if not matching:
                # [MQTT-3.8.3-3]: No Local: not sent back to the client that published it.
                if held:
                    self._defer_settle(queue, entry)
                return
            cap = max(s.qos for s in matching)
            extra = _identifiers(matching)
        qos = min(cap, publish_qos(message.properties))
        topic_field = route.topic_field
        announce = route.announce
        props_block = b""
        if self._level == 5:
            if route.alias:
                if announce:
                    topic_field = encode_string(route.topic)
                extra += _TOPIC_ALIAS(0x23, route.alias)
            body = publish_property_content(message, self._broker.clock()) + extra
            props_block = encode_varint(len(body)) + body if body else NO_PROPERTIES
        retain = route.retain and message.retain
        packet_id = 0
        if qos:
            packet_id = self._take_packet_id(entry)
        data = encode_publish(
            topic_field, message.body, qos, packet_id, retain, qos > 0 and entry.redelivered, props_block
        )
        if len(data) > self._max_out:
            self._drop_oversize(queue, entry, len(data))
            return
        if qos:
            if other:
                self._inflight_other[packet_id] = (queue, entry)
            else:
                self._inflight[packet_id] = entry
            if qos == 2:
                self._qos2_out.add(packet_id)
        elif held:
            self._defer_settle(queue, entry)
        if announce:
            # The alias is known to the client from now on: later deliveries send it alone.
            self._aliases_announced.add(route.alias)
            route.announce = False
            route.fast = not route.no_local
        self._write(data)
        self._stats.messages_sent += 1

    def _make_route(self, routing_key: str, subs: list[Subscription] | None) -> _Route:
        """The delivery plan of one routing key: matching subscriptions, QoS cap, encoded fields."""
        route = _Route()
        topic = key_to_mqtt_topic(routing_key)
        try:
            validate_topic_name(topic)
        except MqttError:
            route.fast = False
            return route
        route.topic = topic
        if subs is None:
            candidates = [s for s in self._state.subscriptions.values() if s.share_group is None]
            # A message that reached the queue otherwise (an AMQP publish to it) takes all of them.
            subs = [s for s in candidates if filter_matches(s.inner_filter, topic)] or candidates
        route.subs = subs
        route.qos = max((s.qos for s in subs), default=0)
        route.no_local = any(s.no_local for s in subs)
        route.topic_field = encode_string(topic)
        if self._level == 5:
            route.retain = any(s.retain_as_published for s in subs)
            route.extra = _identifiers(subs)
            alias = self._aliases_out.get(topic)
            if alias is None and len(self._aliases_out) < self._alias_max_out:
                alias = len(self._aliases_out) + 1
                self._aliases_out[topic] = alias
            if alias is not None:
                # Until a PUBLISH carried the Topic Name with it, the client does not know the alias.
                route.announce = alias not in self._aliases_announced
                route.alias = alias
                route.topic_field = b"\x00\x00"
            body = route.extra + (_TOPIC_ALIAS(0x23, alias) if alias else b"")
            route.props = encode_varint(len(body)) + body if body else NO_PROPERTIES
        route.fast = not (route.no_local or route.announce)
        return route

    def _send_retained(self, sub: Subscription, message: Message) -> None:
        """A retained message for a new subscription: RETAIN set [MQTT-3.3.1-8], QoS capped by the sub."""
        qos = min(sub.qos, publish_qos(message.properties))
        topic = key_to_mqtt_topic(message.routing_key)
        try:
            validate_topic_name(topic)
        except MqttError:
            return
        props_block = b""
        if self._level == 5:
            body = publish_property_content(message, self._broker.clock()) + _identifiers([sub])
            props_block = encode_varint(len(body)) + body
        packet_id = 0
        if qos:
            if len(self._inflight) + len(self._inflight_other) + len(self._state.awaiting_pubcomp) >= 0xFFFF:
                return
            packet_id = self._take_packet_id(None)
            self._inflight_other[packet_id] = (None, None)
            if qos == 2:
                self._qos2_out.add(packet_id)
        data = encode_publish(encode_string(topic), message.body, qos, packet_id, True, False, props_block)
        if len(data) > self._max_out:
            self._count_drop(
                "retained message of %d bytes exceeds the client's Maximum Packet Size", len(data)
            )
            self._inflight_other.pop(packet_id, None)
            self._qos2_out.discard(packet_id)
            return
        self._out.append(data)
        self._stats.messages_sent += 1

    def _take_packet_id(self, entry: Entry | None) -> int:
        """A free Packet Identifier; a redelivery gets its original one when known [MQTT-4.4.0-1]."""
        if entry is not None and entry.redelivered and self._resend:
            original = self._resend.pop(entry.message.msg_id, 0)
            if original and original not in self._inflight and original not in self._inflight_other:
                return original
        packet_id = self._next_pid
        inflight = self._inflight
        other = self._inflight_other
        pubcomp = self._state.awaiting_pubcomp
        while packet_id in inflight or packet_id in other or packet_id in pubcomp:
            packet_id = packet_id % 0xFFFF + 1
        self._next_pid = packet_id % 0xFFFF + 1
        return packet_id

    def _defer_settle(self, queue: Queue, entry: Entry) -> None:
        """Settle a delivery that needs no acknowledgement, once the core's delivery loop is done."""
        self._settle_later.append((queue, entry))
        if self._settle_timer is None:
            self._settle_timer = self._conn.call_later(0, self._settle_deferred)

    def _settle_deferred(self) -> None:
        self._settle_timer = None
        pending, self._settle_later = self._settle_later, []
        for queue, entry in pending:
            queue.ack(entry)

    def _drop_oversize(self, queue: Queue, entry: Entry, size: int) -> None:
        """[MQTT-3.1.2-25]: too large for the client: drop it and behave as if it had been sent."""
        self._count_drop("PUBLISH of %d bytes exceeds the client's Maximum Packet Size", size)
        if entry.held:
            self._defer_settle(queue, entry)

    def _count_drop(self, what: str, arg: object) -> None:
        self._broker.messages_dropped += 1
        self._drops += 1
        if self._drops == 1:  # once per connection: a stream of them must not flood the log
            log.warning("MQTT delivery dropped: client=%r " + what, self._client_id, arg)

    def _delivery_failed(self, queue: Queue, entry: Entry) -> None:
        """A delivery raised (a bug): log it, abort this connection, give the message back at teardown."""
        log.error("MQTT delivery failed, closing: client=%r", self._client_id, exc_info=True)
        if entry.held:
            self._inflight_other[-len(self._inflight_other) - 1] = (queue, entry)  # requeued by _teardown
        for consumer in self._consumers():
            consumer.blocked = True
        if self._phase is SessionPhase.CONNECTED:
            self._phase = SessionPhase.CLOSED
            self._will_on_close = True
            self._conn.abort()

    # -- other packets -------------------------------------------------------------------------------

    def _on_pingreq(self, packet: PingReq) -> None:
        self._out.append(_PINGRESP)

    def _on_disconnect(self, packet: Disconnect) -> None:
        props = packet.properties
        if props is not None and props.session_expiry_interval is not None:
            if self._level == 5 and not self._persistent and props.session_expiry_interval:
                # 5.0 §3.14.2.2.2: zero at CONNECT cannot become non-zero at DISCONNECT.
                raise MqttError(
                    ReasonCode.PROTOCOL_ERROR, "Session Expiry Interval set by DISCONNECT after 0 at CONNECT"
                )
            expiry = props.session_expiry_interval
            self._state.expiry_interval = None if expiry == NEVER_EXPIRES else expiry
            if not expiry:
                self._persistent = False
            elif self._queue is not None and self._queue.durable:
                self._queue.expires = None if expiry == NEVER_EXPIRES else max(1, expiry * 1000)
        # [MQTT-3.14.4-3]: DISCONNECT 0x00 discards the Will Message; any other reason publishes it.
        will = packet.reason_code != ReasonCode.NORMAL_DISCONNECTION
        self._phase = SessionPhase.CLOSED
        self._end_batch()
        self._teardown(publish_will=will)
        self._conn.close()

    def _on_auth(self, packet: Auth) -> None:
        # 5.0 §4.12: AUTH is only valid after a CONNECT with an Authentication Method, which we refuse.
        raise MqttError(ReasonCode.PROTOCOL_ERROR, "AUTH without an authentication exchange (§4.12)")

    # -- the end of a read -------------------------------------------------------------------------

    def _end_batch(self) -> None:
        if self._dirty:
            self._dirty = False
            if not self._torn_down:  # else _teardown saved it already
                self._save_state()
                self._sync = True
        if self._after_save:
            held, self._after_save = self._after_save, []
            for queue, entry in held:
                if queue is not None and entry is not None:
                    queue.ack(entry)
        out = self._out
        if not out:
            return
        self._out = []
        acks = self._pending_in - self._deferred_acks
        if self._sync or self._outstanding:
            self._sync = False
            self._outstanding += 1
            self._deferred_acks += acks
            self._broker.when_durable(lambda: self._write_durable(out, acks))
        else:
            self._pending_in -= acks
            self._write(out[0] if len(out) == 1 else b"".join(out))

    def _write_durable(self, out: list[bytes], acks: int) -> None:
        self._outstanding -= 1
        self._deferred_acks -= acks
        self._pending_in -= acks
        if not self._torn_down:
            self._write(b"".join(out))

    def _mark_dirty(self) -> None:
        if self._persistent:
            self._dirty = True

    def _save_state(self) -> None:
        raw = self._state.encode()
        self._context.saved_sessions[self._key] = raw
        self._vh.save_session(self._client_id, raw)

    # -- credit and flow control -------------------------------------------------------------------

    def _refresh_credit(self) -> None:
        """Receive Maximum counts QoS 2 deliveries until PUBCOMP, after their queue entry is settled."""
        credit = self._credit
        if credit is None:
            return
        room = self._recv_max_out - len(self._state.awaiting_pubcomp)
        credit.limit = max(room, 1)
        exhausted = room <= 0
        if exhausted != self._credit_exhausted:
            self._credit_exhausted = exhausted
            self._refresh_blocked()
        elif not exhausted:
            self._dispatch_all()

    def _refresh_blocked(self) -> None:
        blocked = self._write_paused or self._credit_exhausted
        for consumer in self._consumers():
            consumer.set_blocked(blocked)

    def _dispatch_all(self) -> None:
        queue = self._queue
        if queue is not None and self._consumer is not None:
            queue.dispatch()
        for source in self._shared.values():
            if source.consumer is not None:
                source.queue.dispatch()

    def _consumers(self) -> list[Consumer]:
        consumers = [self._consumer] if self._consumer is not None else []
        consumers.extend(s.consumer for s in self._shared.values() if s.consumer is not None)
        return consumers

    # -- timers ------------------------------------------------------------------------------------

    def _connect_timed_out(self) -> None:
        self._timer = None
        if self._phase is SessionPhase.AWAITING_CONNECT:
            log.info("MQTT connection without CONNECT closed: peer=%s", self._conn.peer)
            self._phase = SessionPhase.CLOSED
            self._teardown(publish_will=False)
            self._conn.close()

    def _check_keepalive(self) -> None:
        """[MQTT-3.1.2-24]: nothing received for 1.5 x Keep Alive: close (5.0: DISCONNECT 0x8D)."""
        self._timer = None
        if self._phase is not SessionPhase.CONNECTED:
            return
        limit = self._keepalive * 1.5
        idle = self._now() - self._last_rx
        if idle < limit:
            self._timer = self._conn.call_later(limit - idle, self._check_keepalive)
            return
        log.info("MQTT keep-alive timeout: client=%r keepalive=%ds", self._client_id, self._keepalive)
        self._close_with(ReasonCode.KEEP_ALIVE_TIMEOUT, "keep alive timeout", publish_will=True)

    # -- closing -----------------------------------------------------------------------------------

    def _protocol_error(self, exc: MqttError) -> None:
        """The peer broke the protocol: CONNACK refusal during CONNECT, else DISCONNECT (5.0) and close."""
        if self._phase is SessionPhase.CLOSED:
            return
        if self._phase is SessionPhase.AWAITING_CONNECT:
            log.info("MQTT CONNECT refused: peer=%s error=%s", self._conn.peer, exc)
            self._refuse(exc.reason_code, exc.message)
            return
        log.info("MQTT protocol error: client=%r error=%s", self._client_id, exc)
        # The answers to the packets before the bad one go out first, unless they wait for the store.
        if self._out and not (self._sync or self._outstanding):
            self._write(b"".join(self._out))
        self._out.clear()
        self._close_with(exc.reason_code, exc.message, publish_will=True)

    def _close_with(self, reason_code: int, reason: str, publish_will: bool) -> None:
        if self._level == 5:
            self._write(self._control(Disconnect(reason_code, _reason(reason))))
        self._phase = SessionPhase.CLOSED
        self._teardown(publish_will=publish_will)
        self._conn.close()

    def _session_queue_deleted(self) -> None:
        queue = self._queue
        if queue is not None:
            self._queue_deleted(queue)

    def _queue_deleted(self, queue: Queue) -> None:
        """The core deleted a queue under a consumer of ours (an administrator): end the connection.
        Called from inside another connection's call: only write and close here."""
        if self._phase is not SessionPhase.CONNECTED:
            return
        self._phase = SessionPhase.CLOSED
        self._will_on_close = True
        if self._level == 5:
            self._write(
                self._control(
                    Disconnect(ReasonCode.ADMINISTRATIVE_ACTION, _reason(f"queue {queue.name} deleted"))
                )
            )
        self._conn.close()

    def _control(self, packet: Any) -> bytes:
        """Encode a packet other than PUBLISH, without its Reason String if the client's Maximum Packet
        Size is too small for it (5.0 [MQTT-3.1.2-25] allows dropping those)."""
        data = encode(packet, self._level)
        props = packet.properties
        if len(data) > self._max_out and props is not None and props.reason_string is not None:
            props.reason_string = None
            data = encode(packet, self._level)
        return data

    def _teardown(self, publish_will: bool) -> None:
        """Release everything this connection holds in the core (idempotent)."""
        if self._torn_down:
            return
        self._torn_down = True
        self._phase = SessionPhase.CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._settle_timer is not None:
            self._settle_timer.cancel()
            self._settle_timer = None
        context = self._context
        context.flow.unpark(self)
        if not self._key[1]:
            return  # no CONNECT got far enough to count
        self._stats.clients_connected -= 1
        if context.mqtt_clients.get(self._key) is self:
            del context.mqtt_clients[self._key]
        if not self._session_started:
            return
        vh = self._vh
        state = self._state
        for queue, entry in self._settle_later:
            queue.ack(entry)
        self._settle_later.clear()
        for held_queue, held_entry in self._after_save:
            if held_queue is not None and held_entry is not None:
                held_queue.ack(held_entry)
        self._after_save.clear()
        # Consumers go first, so that what is requeued below waits for the next connection.
        session_queue = self._queue
        if session_queue is not None and self._consumer is not None:
            session_queue.remove_consumer(self._consumer)
            self._consumer = None
        for source in self._shared.values():
            if source.consumer is not None:
                source.queue.remove_consumer(source.consumer)
                source.consumer = None
        # No reference cycle through the sources: the session goes with reference counting alone.
        self._shared.clear()
        inflight_ids: dict[int, int] = {}
        if self._inflight and session_queue is not None:
            for packet_id, entry in self._inflight.items():
                inflight_ids[entry.message.msg_id] = packet_id
            session_queue.requeue_many(list(self._inflight.values()))
        by_queue: dict[Queue, list[Entry]] = {}
        for packet_id, (other_queue, other_entry) in self._inflight_other.items():
            if other_queue is not None and other_entry is not None:
                if packet_id > 0:  # negative: a delivery that failed before it got one
                    inflight_ids[other_entry.message.msg_id] = packet_id
                by_queue.setdefault(other_queue, []).append(other_entry)
        for other_queue, entries in by_queue.items():
            other_queue.requeue_many(entries)
        self._inflight.clear()
        self._inflight_other.clear()
        self._qos2_out.clear()
        if self._persistent:
            state.inflight = inflight_ids
            state.disconnected_at = self._broker.wall_clock()
            self._save_state()
        else:
            self._end_session(vh)
        vh.release_owner(self)
        if publish_will and self._will is not None:
            self._send_will(self._will)
        self._will = None

    def _end_session(self, vh: VHost) -> None:
        """A session that ends with its connection: its durable leftovers go too."""
        name = queue_name(SESSION_QUEUE_PREFIX, self._client_id)
        queue = vh.queues.get(name)
        if queue is not None and queue.exclusive_owner is None and not queue.consumers:
            vh.delete_queue(name)
        if self._context.saved_sessions.pop(self._key, None) is not None:
            vh.delete_session(self._client_id)

    def _send_will(self, will: Will) -> None:
        """Publish the Will Message now, or park it for its Will Delay Interval (retained.py)."""
        props = will.properties
        message = Message(
            TOPIC_EXCHANGE,
            mqtt_topic_to_key(will.topic),
            will.payload,
            core_properties(props if _has_message_properties(props) else None, will.qos),
            retain=will.retain,
            origin=self._key,
        )
        delay = props.will_delay_interval if props is not None and props.will_delay_interval else 0
        try:
            if delay and self._persistent:
                expiry = self._state.expiry_interval
                # The Will is sent when the delay ends or the session does, whichever comes first.
                hold_will(self._vh, self._client_id, message, delay if expiry is None else min(delay, expiry))
            else:
                self._publish_message(message)
        except BrokerError as exc:
            log.warning("MQTT Will Message of client %r not published: %s", self._client_id, exc)


_MESSAGE_PROPERTY_NAMES: Final = (
    "payload_format_indicator",
    "message_expiry_interval",
    "content_type",
    "response_topic",
    "correlation_data",
)


def _has_message_properties(props: MqttProperties | None) -> bool:
    """Whether a PUBLISH / Will carries properties that travel with the message (5.0 §3.3.2.3)."""
    if props is None:
        return False
    if props.user_properties:
        return True
    return any(getattr(props, name) is not None for name in _MESSAGE_PROPERTY_NAMES)


def _identifiers(subs: list[Subscription]) -> bytes:
    """Subscription Identifier properties of the matching subscriptions (5.0 §3.3.4, [MQTT-3.3.4-3])."""
    ids = sorted({s.identifier for s in subs if s.identifier})
    return b"".join(b"\x0b" + encode_varint(i) for i in ids)


def _reason(text: str) -> MqttProperties:
    return MqttProperties(reason_string=text)


def _receive_maximum_exceeded() -> MqttError:
    return MqttError(
        ReasonCode.RECEIVE_MAXIMUM_EXCEEDED, "more unacknowledged QoS > 0 PUBLISH than Receive Maximum (§4.9)"
    )


# Handlers of the packets a Client may send (the codec refuses the others), except PUBLISH and PUBACK,
# which `data_received` handles inline.
_HANDLERS: Final[Mapping[type, Callable[[MqttSession, Any], None]]] = MappingProxyType(
    {
        Connect: MqttSession._on_connect,
        PubRec: MqttSession._on_pubrec,
        PubRel: MqttSession._on_pubrel,
        PubComp: MqttSession._on_pubcomp,
        Subscribe: MqttSession._on_subscribe,
        Unsubscribe: MqttSession._on_unsubscribe,
        PingReq: MqttSession._on_pingreq,
        Disconnect: MqttSession._on_disconnect,
        Auth: MqttSession._on_auth,
    }
)
