"""The AMQP 0-9-1 protocol session: one client connection's rules, from protocol header to close.

`AmqpSession(context)` implements `protocols.session.ProtocolSession`. It feeds received bytes to the
codec's `AmqpParser`, runs the connection handshake on channel 0 (AMQP 0-9-1 §2.2.4: header ->
Start/StartOk -> Tune/TuneOk -> Open/OpenOk), heartbeats, Close/CloseOk in both directions and
Connection.Blocked/Unblocked, and hands every other channel's frames to its `AmqpChannel`
(channel.py), which speaks to the broker core.

Theory of operation
-------------------
`data_received` parses ALL whole frames of the chunk and acts on each as it comes (deliveries the core
makes meanwhile are written straight away; the driver sends everything of one loop turn in one
syscall). Only then does it finish the batch: every confirming channel that published sends its
confirms (one `basic.ack multiple`, or one `when_durable` callback for persistent messages; see
channel.py) and, if anything was published, the flow gate is asked whether to pause reading.

Errors (AMQP 0-9-1 §1.2 reply codes): whatever a frame handler raises as `AmqpFrameError` or the core's
`BrokerError` closes the channel (Channel.Close) for a soft code (403, 404, 405, 406) or the connection
(Connection.Close) for a hard one (5xx); a closed channel ignores everything but its close-ok, a closing
connection everything but Close/CloseOk. A bug in a handler closes the connection with 541, never the
broker. A wrong protocol header is answered with the one we speak before closing (§4.2.2).

Heartbeats (§4.2.7): one timer ticks every half interval and sends a heartbeat frame; four ticks (two
intervals) without a received byte close the connection, as RabbitMQ does. Reading paused by flow
control does not count as silence.

Must not import: asyncio, storage, cluster, other protocol packages (mqtt, stomp, transport).
"""

from __future__ import annotations

import enum
import logging
import sys
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from pamqp import base
from pamqp.commands import Basic, Channel, Connection

from broker.auth import AuthFailure, User
from broker.context import ServerContext
from broker.core import VHost
from broker.errors import BrokerError
from protocols.amqp091.channel import AmqpChannel, ChannelState, method_error, method_name
from protocols.amqp091.codec import (
    HEARTBEAT_FRAME,
    NEED_DATA,
    PROTOCOL_HEADER,
    AmqpFrameError,
    AmqpParser,
    Heartbeat,
    ParserState,
    ProtocolHeader,
    ProtocolHeaderError,
    encode_method,
)
from protocols.amqp091.constants import (
    ACCESS_REFUSED,
    CHANNEL_ERROR,
    COMMAND_INVALID,
    CONNECTION_FORCED,
    FRAME_MIN_SIZE,
    INTERNAL_ERROR,
    NOT_ALLOWED,
    UNEXPECTED_FRAME,
)
from protocols.amqp091.fieldtable import decode_table
from protocols.session import Connection as DriverConnection
from protocols.session import ProtocolSession, TimerHandle

log = logging.getLogger("polybroker.amqp")

#: Seconds from accept to connection.open-ok (RabbitMQ's handshake_timeout).
HANDSHAKE_TIMEOUT = 10.0
#: Seconds we wait for the peer's connection.close-ok after our connection.close.
CLOSE_OK_TIMEOUT = 3.0
#: Heartbeat ticks (half intervals) without a received octet before the peer counts as gone.
SILENT_TICKS_LIMIT = 4
#: What we advertise in connection.start: RabbitMQ's capability names, for what we implement.
CAPABILITIES: Mapping[str, bool] = MappingProxyType(
    {
        "publisher_confirms": True,
        "exchange_exchange_bindings": True,
        "basic.nack": True,
        "consumer_cancel_notify": True,
        "connection.blocked": True,
        "authentication_failure_close": True,
        "per_consumer_qos": True,
        "direct_reply_to": True,
    }
)
MECHANISMS = ("PLAIN", "AMQPLAIN")

_PUBLISH = Basic.Publish
_OPEN = ChannelState.OPEN


class ConnectionState(enum.Enum):
    """Where the connection is in AMQP 0-9-1 §2.2.4's lifecycle."""

    AWAIT_PROTOCOL_HEADER = "awaiting protocol header"
    AWAIT_START_OK = "awaiting connection.start-ok"
    AWAIT_TUNE_OK = "awaiting connection.tune-ok"
    AWAIT_OPEN = "awaiting connection.open"
    OPEN = "open"
    #: We sent connection.close and wait for close-ok; everything else is ignored (§2.2.4).
    CLOSING = "closing"
    CLOSED = "closed"


def _discard(data: bytes) -> None:
    """Stands in for Connection.write before connection_made."""


class AmqpSession(ProtocolSession):
    """One AMQP 0-9-1 client connection. See the module docstring."""

    def __init__(self, context: ServerContext) -> None:
        self.context = context
        self.stats = context.stats
        limits = context.config.limits
        self.max_prefetch: int = limits.max_consumer_prefetch
        self._max_body: int = limits.max_frame_size
        self._server_channel_max: int = limits.amqp_channel_max
        self._server_frame_max: int = limits.amqp_frame_max
        self._server_heartbeat: int = limits.heartbeat
        self.state = ConnectionState.AWAIT_PROTOCOL_HEADER
        # AMQP 0-9-1 §4.2.3: until tuned, frames up to frame-min-size only.
        self._parser = AmqpParser(FRAME_MIN_SIZE)
        self.frame_max = FRAME_MIN_SIZE
        self.channel_max = self._server_channel_max
        self.heartbeat = 0
        self.channels: dict[int, AmqpChannel] = {}
        self.conn: DriverConnection | None = None
        self.write = _discard
        self.vhost: VHost | None = None
        self.user: User | None = None
        self.username = ""
        self.client_properties: dict[str, Any] = {}
        # The client's capabilities (connection.start-ok client-properties).
        self.cancel_notify = False
        self._blocked_notify = False
        self._auth_failure_close = False
        #: The transport's write buffer is full: consumers pause.
        self.write_paused = False
        #: Confirming channels that published in the chunk being handled.
        self.confirm_batch: list[AmqpChannel] = []
        #: Something was published in the chunk being handled (flow control check at its end).
        self.published = False
        self._consumer_tags = 0
        self._received = False
        self._silent_ticks = 0
        self._timer: TimerHandle | None = None
        self._reading_paused = False
        self._counted = False

    # --- ProtocolSession ---------------------------------------------------------------------------

    def connection_made(self, conn: DriverConnection) -> None:
        self.conn = conn
        self.write = conn.write
        self._timer = conn.call_later(HANDSHAKE_TIMEOUT, self._handshake_timeout)

    def data_received(self, data: bytes) -> None:
        if self.state is ConnectionState.CLOSED:
            return
        parser = self._parser
        if parser.state is ParserState.ERROR:
            # The stream cannot be framed any more: discard it until the peer or our close-ok timer closes.
            return
        parser.feed(data)
        self._received = True
        channels = self.channels
        number = 0
        frame: Any = None
        while True:
            try:
                item = parser.next_frame()
                if item is NEED_DATA:
                    break
                number, frame = item
                if number:
                    channel = channels.get(number)
                    if channel is None or channel.state is not _OPEN:
                        self._frame_without_channel(number, frame, channel)
                        continue
                    command = channel.assembler.process(frame)
                    if command is not None:
                        method = command[0]
                        if type(method) is _PUBLISH:
                            channel.publish(method, command[1], command[2])  # type: ignore[arg-type]
                        else:
                            channel.handle(method)
                    # Channel frames never end the connection without raising: no state check here.
                    continue
                self._connection_frame(frame)
            except AmqpFrameError as exc:
                self._error(number, exc)
            except BrokerError as exc:
                # A whole command ends with its method frame or, for basic.publish, a content frame.
                index = frame.index if isinstance(frame, base.Frame) else _PUBLISH.index
                self._error(number, AmqpFrameError(exc.code, exc.text, index >> 16, index & 0xFFFF))
            except ProtocolHeaderError:
                # AMQP 0-9-1 §4.2.2: answer with the protocol header we speak, then close.
                self.write(PROTOCOL_HEADER)
                self._close_now()
                return
            except Exception:
                log.exception("AMQP session error, closing the connection: peer=%s", self._peer())
                self._error(0, AmqpFrameError(INTERNAL_ERROR, "internal error"))
            if self._stopped():
                break
        self._end_batch()

    def _stopped(self) -> bool:
        """Nothing more of the received bytes is to be handled (closed, or unframeable)."""
        return self.state is ConnectionState.CLOSED or self._parser.state is ParserState.ERROR

    def _end_batch(self) -> None:
        batch = self.confirm_batch
        try:
            if batch:
                for channel in batch:
                    if channel.state is _OPEN:
                        channel.end_batch()
                    else:
                        channel.in_batch = False
                batch.clear()
            if self.published:
                self.published = False
                flow = self.context.flow
                if flow.should_pause() and not self._reading_paused and self.conn is not None:
                    self._reading_paused = True
                    self.conn.pause_reading()
                    flow.park(self, self._resume_reading)
        except Exception:
            batch.clear()
            log.exception("AMQP session error, closing the connection: peer=%s", self._peer())
            self._error(0, AmqpFrameError(INTERNAL_ERROR, "internal error"))

    def writing_paused(self) -> None:
        self.write_paused = True
        for channel in list(self.channels.values()):
            channel.update_blocked()

    def writing_resumed(self) -> None:
        self.write_paused = False
        for channel in list(self.channels.values()):
            if channel.state is _OPEN:
                channel.update_blocked()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.state = ConnectionState.CLOSED
        self._release()
        self.write = _discard

    def shutdown(self) -> None:
        """The broker stops: connection.close 320 (RabbitMQ's "broker forced connection closure")."""
        if self.state in (ConnectionState.CLOSING, ConnectionState.CLOSED):
            return
        if self.state is ConnectionState.AWAIT_PROTOCOL_HEADER:
            self._close_now()
            return
        self._send_close(AmqpFrameError(CONNECTION_FORCED, "broker shutdown"))

    # --- channels ------------------------------------------------------------------------------

    def _frame_without_channel(self, number: int, frame: Any, channel: AmqpChannel | None) -> None:
        """A frame for a channel that is not open: channel.open, or what a closing channel ignores."""
        state = self.state
        if state is ConnectionState.CLOSING:
            return
        if channel is not None:
            # We closed this channel (AMQP 0-9-1 §2.2.4): drop everything until its close-ok.
            if isinstance(frame, Channel.CloseOk):
                self.forget_channel(channel)
            elif isinstance(frame, Channel.Close):
                self.forget_channel(channel)
                self.write(encode_method(number, Channel.CloseOk()))
            return
        if state is not ConnectionState.OPEN:
            raise AmqpFrameError(CHANNEL_ERROR, f"frame on channel {number} before the connection is open")
        if type(frame) is not Channel.Open:
            raise AmqpFrameError(CHANNEL_ERROR, "expected 'channel.open'")
        if number > self.channel_max:
            raise method_error(
                NOT_ALLOWED,
                f"channel number {number} is above the negotiated channel_max ({self.channel_max})",
                frame,
            )
        if len(self.channels) >= self.channel_max:
            raise method_error(
                NOT_ALLOWED,
                f"number of channels opened ({len(self.channels)}) has reached the "
                f"negotiated channel_max ({self.channel_max})",
                frame,
            )
        assert self.vhost is not None
        self.channels[number] = AmqpChannel(self, number, self.vhost, self._max_body)
        self.write(encode_method(number, Channel.OpenOk()))

    def forget_channel(self, channel: AmqpChannel) -> None:
        """The channel is closed on both sides: its number may be opened again."""
        if self.channels.get(channel.number) is channel:
            del self.channels[channel.number]
        channel.state = ChannelState.CLOSED

    def new_consumer_tag(self) -> str:
        self._consumer_tags += 1
        return f"amq.ctag-{id(self):x}-{self._consumer_tags}"

    # --- errors and closing ----------------------------------------------------------------------

    def _error(self, number: int, exc: AmqpFrameError) -> None:
        if number and not exc.is_hard:
            self._channel_error(number, exc)
        else:
            self._connection_error(exc)

    def _channel_error(self, number: int, exc: AmqpFrameError) -> None:
        channel = self.channels.get(number)
        if channel is None or channel.state is not _OPEN:
            return
        log.info("AMQP channel error: peer=%s channel=%d %s", self._peer(), number, exc.reply_text)
        channel.release()
        channel.state = ChannelState.CLOSING
        self.write(encode_method(number, close_method(Channel.Close, exc)))

    def _connection_error(self, exc: AmqpFrameError) -> None:
        state = self.state
        if state in (ConnectionState.CLOSING, ConnectionState.CLOSED):
            return
        log.info("AMQP connection error, closing: peer=%s %s", self._peer(), exc.reply_text)
        if state is ConnectionState.AWAIT_PROTOCOL_HEADER:
            self._close_now()
            return
        # After a framing error the peer's close-ok cannot be read: the close-ok timer (or the peer,
        # which closes once it read our close) ends the connection; closing at once could reset it
        # before the peer read why.
        self._send_close(exc)

    def _send_close(self, exc: AmqpFrameError) -> None:
        self._release()
        self.write(encode_method(0, close_method(Connection.Close, exc)))
        self.state = ConnectionState.CLOSING
        self._set_timer(CLOSE_OK_TIMEOUT, self._close_now)
        if self._reading_paused and self.conn is not None:
            # Paused by flow control: read again, or the peer's close-ok would never arrive.
            self._reading_paused = False
            self.conn.resume_reading()

    def _close_now(self) -> None:
        self.state = ConnectionState.CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._release()
        if self.conn is not None:
            self.conn.close()

    def _release(self) -> None:
        """Give back everything the connection holds: consumers, unacked deliveries, exclusive queues."""
        channels = list(self.channels.values())
        self.channels.clear()
        # Consumers first, so requeued messages do not go to another channel of this connection.
        for channel in channels:
            channel.state = ChannelState.CLOSED
            channel.cancel_consumers()
        for channel in channels:
            channel.requeue_unacked()
        if self.vhost is not None:
            self.vhost.release_owner(self)
        flow = self.context.flow
        flow.unpark(self)
        flow.listeners.pop(self, None)
        if self._counted:
            self._counted = False
            self.stats.clients_connected -= 1

    def _set_timer(self, delay: float, callback: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
        assert self.conn is not None
        self._timer = self.conn.call_later(delay, callback)

    def _peer(self) -> str:
        return self.conn.peer if self.conn is not None else "?"

    # --- channel 0: the connection class ---------------------------------------------------------

    def _connection_frame(self, frame: Any) -> None:
        if type(frame) is Heartbeat:
            return
        if type(frame) is ProtocolHeader:
            self._send_start()
            return
        if not isinstance(frame, base.Frame):
            raise AmqpFrameError(UNEXPECTED_FRAME, f"{type(frame).__name__} frame on channel 0")
        state = self.state
        kind = type(frame)
        if state is ConnectionState.CLOSING:
            if kind is Connection.CloseOk:
                self._close_now()
            elif kind is Connection.Close:
                self.write(encode_method(0, Connection.CloseOk()))
                self._close_now()
            return
        if kind is Connection.Close:
            # The client closes (AMQP 0-9-1 §1.4.2.5): release, answer close-ok, let the socket go.
            self._release()
            self.write(encode_method(0, Connection.CloseOk()))
            self._close_now()
            return
        expected = _EXPECTED.get(state)
        if kind is not expected:
            raise method_error(
                COMMAND_INVALID,
                f"{method_name(frame)} is not expected while the connection is {state.value}",
                frame,
            )
        if kind is Connection.StartOk:
            self._start_ok(frame)
        elif kind is Connection.TuneOk:
            self._tune_ok(frame)
        else:
            self._open(frame)

    def _send_start(self) -> None:
        server_properties: dict[str, Any] = {
            "product": self.context.server_name,
            "version": self.context.version,
            "platform": f"Python {sys.version_info.major}.{sys.version_info.minor}",
            "cluster_name": self.context.server_name,
            "information": "polybroker: MQTT, AMQP 0-9-1 and STOMP on one core",
            "capabilities": dict(CAPABILITIES),
        }
        start = Connection.Start(
            version_major=0,
            version_minor=9,
            server_properties=server_properties,
            mechanisms=" ".join(MECHANISMS),
            locales="en_US",
        )
        self.write(encode_method(0, start))
        self.state = ConnectionState.AWAIT_START_OK

    def _start_ok(self, method: Any) -> None:
        props = method.client_properties if isinstance(method.client_properties, dict) else {}
        self.client_properties = props
        capabilities = props.get("capabilities")
        if isinstance(capabilities, dict):
            self.cancel_notify = bool(capabilities.get("consumer_cancel_notify"))
            self._blocked_notify = bool(capabilities.get("connection.blocked"))
            self._auth_failure_close = bool(capabilities.get("authentication_failure_close"))
        mechanism = method.mechanism
        if mechanism not in MECHANISMS:
            raise method_error(COMMAND_INVALID, f"unknown authentication mechanism '{mechanism}'", method)
        response = method.response
        raw = response.encode() if isinstance(response, str) else bytes(response)
        credentials = _parse_plain(raw) if mechanism == "PLAIN" else _parse_amqplain(raw)
        conn = self.conn
        assert conn is not None
        if credentials is None:
            self._refuse_login(mechanism, f"malformed {mechanism} response")
            return
        username, password = credentials
        result = self.context.auth.authenticate(username, password, is_loopback=conn.is_loopback, vhost="/")
        if result.user is None or result.failure in (
            AuthFailure.BAD_CREDENTIALS,
            AuthFailure.ANONYMOUS_DISABLED,
            AuthFailure.LOOPBACK_ONLY,
        ):
            self.stats.connections_refused += 1
            self._refuse_login(mechanism, f"{result.reason} (user '{username}')")
            return
        # Credentials are good; the vhost is checked at connection.open.
        self.user = result.user
        self.username = result.user.name
        tune = Connection.Tune(
            channel_max=self._server_channel_max,
            frame_max=self._server_frame_max,
            heartbeat=self._server_heartbeat,
        )
        self.write(encode_method(0, tune))
        self.state = ConnectionState.AWAIT_TUNE_OK

    def _refuse_login(self, mechanism: str, reason: str) -> None:
        log.info("AMQP login refused: peer=%s %s", self._peer(), reason)
        if self._auth_failure_close:
            # RabbitMQ's authentication_failure_close: say why with connection.close 403.
            self._send_close(
                AmqpFrameError(
                    ACCESS_REFUSED,
                    f"Login was refused using authentication mechanism {mechanism}: {reason}",
                    Connection.StartOk.index >> 16,
                    Connection.StartOk.index & 0xFFFF,
                )
            )
        else:
            # AMQP 0-9-1 §2.2.4: a failed login just closes the socket.
            self._close_now()

    def _tune_ok(self, method: Any) -> None:
        # RabbitMQ's rule: 0 ("no limit") and anything above what we proposed are refused with 530.
        channel_max = method.channel_max
        frame_max = method.frame_max
        if frame_max < FRAME_MIN_SIZE and frame_max != 0:
            raise method_error(
                NOT_ALLOWED,
                f"negotiated frame_max = {frame_max} is lower than the minimum allowed value ({FRAME_MIN_SIZE})",
                method,
            )
        if frame_max == 0 or frame_max > self._server_frame_max:
            raise method_error(
                NOT_ALLOWED,
                f"negotiated frame_max = {frame_max} is higher than the maximum allowed value "
                f"({self._server_frame_max})",
                method,
            )
        if channel_max == 0 or channel_max > self._server_channel_max:
            raise method_error(
                NOT_ALLOWED,
                f"negotiated channel_max = {channel_max} is higher than the maximum allowed value "
                f"({self._server_channel_max})",
                method,
            )
        self.frame_max = frame_max
        self._parser.frame_max = frame_max
        self.channel_max = channel_max
        self.heartbeat = method.heartbeat
        self.state = ConnectionState.AWAIT_OPEN

    def _open(self, method: Any) -> None:
        name = method.virtual_host
        context = self.context
        user = self.user
        assert user is not None
        if name not in context.broker.vhosts or not context.auth.vhost_exists(name):
            raise method_error(NOT_ALLOWED, f"vhost {name} not found", method)
        if not user.may_access(name):
            raise method_error(
                NOT_ALLOWED, f"access to vhost '{name}' refused for user '{user.name}'", method
            )
        self.vhost = context.broker.vhost(name)
        self.write(encode_method(0, Connection.OpenOk()))
        self.state = ConnectionState.OPEN
        self.stats.clients_connected += 1
        self.stats.clients_total += 1
        self._counted = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.heartbeat:
            self._set_timer(self.heartbeat / 2, self._heartbeat_tick)
        if self._blocked_notify:
            context.flow.listeners[self] = self._flow_changed
            if context.flow.blocked:
                self._flow_changed(True)

    # --- timers and flow control -----------------------------------------------------------------

    def _handshake_timeout(self) -> None:
        self._timer = None
        if self.state is not ConnectionState.OPEN and self.state is not ConnectionState.CLOSED:
            log.info("AMQP handshake timed out: peer=%s state=%s", self._peer(), self.state.value)
            self._close_now()

    def _heartbeat_tick(self) -> None:
        self._timer = None
        if self.state is ConnectionState.CLOSED:
            return
        if self._received or self._reading_paused:
            self._received = False
            self._silent_ticks = 0
        else:
            self._silent_ticks += 1
            if self._silent_ticks >= SILENT_TICKS_LIMIT:
                log.info(
                    "AMQP missed heartbeats from client, timeout: %ds: peer=%s", self.heartbeat, self._peer()
                )
                self._close_now()
                return
        self.write(HEARTBEAT_FRAME)
        self._set_timer(self.heartbeat / 2, self._heartbeat_tick)

    def _resume_reading(self) -> None:
        self._reading_paused = False
        self._received = True
        if self.conn is not None and self.state is not ConnectionState.CLOSED:
            self.conn.resume_reading()

    def _flow_changed(self, blocked: bool) -> None:
        """The flow gate closed or opened: connection.blocked / unblocked (RabbitMQ's extension)."""
        if self.state is not ConnectionState.OPEN:
            return
        if blocked:
            reason = "low on memory" if self.context.broker.memory_alarm else "store backlog"
            self.write(encode_method(0, Connection.Blocked(reason=reason)))
        else:
            self.write(encode_method(0, Connection.Unblocked()))


#: The one connection method each handshake state accepts (besides connection.close).
_EXPECTED: Mapping[ConnectionState, type[base.Frame]] = MappingProxyType(
    {
        ConnectionState.AWAIT_START_OK: Connection.StartOk,
        ConnectionState.AWAIT_TUNE_OK: Connection.TuneOk,
        ConnectionState.AWAIT_OPEN: Connection.Open,
    }
)


def close_method(cls: Any, exc: AmqpFrameError) -> base.Frame:
    """Connection.Close or Channel.Close carrying an error's code, text and method ids."""
    method: base.Frame = cls(
        reply_code=exc.reply_code, reply_text=exc.reply_text, class_id=exc.class_id, method_id=exc.method_id
    )
    return method


def _parse_plain(response: bytes) -> tuple[str, str] | None:
    """SASL PLAIN (RFC 4616): [authzid] NUL authcid NUL passwd."""
    parts = response.split(b"\x00")
    if len(parts) != 3:
        return None
    try:
        return parts[1].decode(), parts[2].decode()
    except UnicodeDecodeError:
        return None


def _parse_amqplain(response: bytes) -> tuple[str, str] | None:
    """AMQPLAIN: a field table without its length prefix, with LOGIN and PASSWORD."""
    try:
        table, _ = decode_table(len(response).to_bytes(4, "big") + response, 0, len(response) + 4)
    except ValueError:
        return None
    login, password = table.get("LOGIN"), table.get("PASSWORD")
    if isinstance(login, bytes):
        login = login.decode(errors="replace")
    if isinstance(password, bytes):
        password = password.decode(errors="replace")
    if not isinstance(login, str) or not isinstance(password, str):
        return None
    return login, password
