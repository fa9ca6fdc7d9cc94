"""The WebSocket connection driver (WS and WSS): MQTT and STOMP carried in WebSocket messages.

`WebSocketDriver` is a `BaseDriver` whose bytes are framed by the `websockets` library's sans-I/O
`ServerProtocol` (RFC 6455): it performs the HTTP upgrade itself, picks the session by
`Sec-WebSocket-Protocol` or path (`select_route`, README, Configuration), then feeds every data frame's
payload to the session as plain bytes. The session sees a byte stream, exactly as over TCP: MQTT
says a WebSocket frame may hold several or partial control packets [MQTT-6.0.0-2], and STOMP frames
are parsed the same way. Everything the session wrote in one event-loop turn goes out as one message
(binary for MQTT, text for STOMP because browsers' stomp.js expects text frames, as RabbitMQ's
web-stomp sends by default). Ping/pong and the closing handshake are the protocol object's.

Must not import: the broker core, storage, cluster, any protocol package (mqtt, amqp091, stomp).
"""

from __future__ import annotations

import http
import ipaddress
import logging
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from websockets.exceptions import InvalidHeader
from websockets.frames import OP_BINARY, OP_CLOSE, OP_CONT, OP_TEXT, CloseCode, Frame
from websockets.headers import parse_subprotocol
from websockets.http11 import Request
from websockets.protocol import State as ProtocolState
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from protocols.session import SessionFactory
from protocols.transport.driver import BaseDriver, DriverState, ListenerContext

#: Sec-WebSocket-Protocol values we answer, in our order of preference, and the session kind of each.
SUBPROTOCOLS: Mapping[str, str] = {
    "mqtt": "mqtt",  # MQTT 3.1.1 §6 and MQTT 5.0 §6 [MQTT-6.0.0-3]
    "mqttv3.1": "mqtt",  # MQTT 3.1 clients (Paho JavaScript, mqtt.js with protocolVersion 3)
    "v12.stomp": "stomp",
    "v11.stomp": "stomp",
    "v10.stomp": "stomp",
}
#: Request paths and the session kind each one fixes; None: decided by the subprotocol alone.
PATHS: Mapping[str, str | None] = {"/mqtt": "mqtt", "/stomp": "stomp", "/ws": None}
#: The session kinds a WebSocket listener can serve.
WEBSOCKET_PROTOCOLS = frozenset(SUBPROTOCOLS.values())
#: Session kinds whose output goes out in text frames.
TEXT_FRAME_PROTOCOLS = frozenset({"stomp"})

#: Close code when the broker shuts down, RFC 6455 §7.4.1 "going away".
_GOING_AWAY = CloseCode.GOING_AWAY
_SHUTDOWN_REASON = "broker shutdown"


@dataclass(frozen=True, slots=True)
class WebSocketRoute:
    """The session kind chosen for an upgrade, and the subprotocol to answer (None: answer none)."""

    protocol: str
    subprotocol: str | None


@dataclass(frozen=True, slots=True)
class HandshakeRefusal:
    """Why an upgrade cannot be served, as the HTTP status to answer."""

    status: http.HTTPStatus
    reason: str


def _loopback_origin(origin: str | None) -> bool:
    """True when there is no Origin header or it names a loopback host."""
    if origin is None or origin == "null":
        return origin is None
    host = urlsplit(origin).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def select_route(
    path: str, offered: Sequence[str], available: Container[str]
) -> WebSocketRoute | HandshakeRefusal:
    """Pick the session for an upgrade from its request path and offered subprotocols.

    `/mqtt` and `/stomp` fix the kind; `/ws` leaves it to the subprotocol. Among the offered
    subprotocols that fit, ours are preferred in SUBPROTOCOLS order, and the client's spelling is
    echoed. Without any subprotocol offered a kind-fixing path still works (some MQTT clients send
    none); a client that offered subprotocols of which none fits is refused with 400, since a
    browser fails the connection when its offer is not answered (RFC 6455 §4.1).
    """
    route_path = urlsplit(path).path.rstrip("/") or "/"
    if route_path not in PATHS:
        return HandshakeRefusal(http.HTTPStatus.NOT_FOUND, f"no WebSocket endpoint at {route_path}")
    fixed_kind = PATHS[route_path]
    if fixed_kind is not None and fixed_kind not in available:
        return HandshakeRefusal(http.HTTPStatus.NOT_FOUND, f"{fixed_kind} is not served on this listener")
    by_name = {name.lower(): name for name in offered}
    for name, kind in SUBPROTOCOLS.items():
        if name in by_name and kind in available and fixed_kind in (None, kind):
            return WebSocketRoute(kind, by_name[name])
    if fixed_kind is not None and not offered:
        return WebSocketRoute(fixed_kind, None)
    wanted = ", ".join(name for name, kind in SUBPROTOCOLS.items() if kind in available)
    return HandshakeRefusal(
        http.HTTPStatus.BAD_REQUEST, f"Sec-WebSocket-Protocol must offer one of: {wanted}"
    )


class _HandshakeLogger(logging.LoggerAdapter[logging.Logger]):
    """websockets logs every handshake at info; the driver's own line says it already, so demote those."""

    def info(self, msg: object, *args: Any, **kwargs: Any) -> None:
        self.debug(msg, *args, **kwargs)


@dataclass(frozen=True, slots=True)
class WebSocketEndpoint:
    """What the drivers of one WebSocket listener share."""

    factories: Mapping[str, SessionFactory]
    #: Session kinds answered with text frames (the rest get binary frames).
    text_protocols: frozenset[str] = TEXT_FRAME_PROTOCOLS
    protocol_logger: logging.LoggerAdapter[logging.Logger] = _HandshakeLogger(
        logging.getLogger("polybroker.websocket")
    )


def _split_messages(pieces: list[bytes], limit: int) -> Iterator[bytes]:
    """Group consecutive writes into messages of at most `limit` bytes, never splitting one write.

    Keeping each write() whole matters for STOMP in text frames: a frame (or a UTF-8 sequence) cut in
    two would reach the browser as two invalid messages.
    """
    group: list[bytes] = []
    size = 0
    for piece in pieces:
        if group and size + len(piece) > limit:
            yield b"".join(group)
            group = []
            size = 0
        group.append(piece)
        size += len(piece)
    if group:
        yield b"".join(group)


class WebSocketDriver(BaseDriver):
    """One WebSocket connection: HTTP upgrade, then each data frame's payload to the session."""

    __slots__ = ("_endpoint", "_ws", "_send_message")

    def __init__(self, endpoint: WebSocketEndpoint, context: ListenerContext) -> None:
        super().__init__(context)
        self._endpoint = endpoint
        self._ws = ServerProtocol(
            max_size=context.limits.max_message_size,
            logger=endpoint.protocol_logger,
        )
        self._send_message: Callable[[bytes], None] = self._ws.send_binary

    # -- Connection -------------------------------------------------------------------------------

    def close(self) -> None:
        if self._state is not DriverState.OPEN:
            return
        self._set_reason("closed by server")
        self._flush()
        self._state = DriverState.CLOSING
        ws = self._ws
        if ws.state is ProtocolState.OPEN:
            # RFC 6455 §7.1.2: send Close, then wait for the peer's Close; the protocol object then
            # asks for the TCP close (SEND_EOF). The deadline covers a peer that never answers.
            ws.send_close(_GOING_AWAY if self._close_reason == _SHUTDOWN_REASON else CloseCode.NORMAL_CLOSURE)
        self._send_protocol_output()
        self._arm_deadline(self._context.limits.close_timeout, "WebSocket close timed out")

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        ws = self._ws
        ws.receive_data(data)
        try:
            for event in ws.events_received():
                if type(event) is Frame:
                    opcode = event.opcode
                    if opcode is OP_BINARY or opcode is OP_TEXT or opcode is OP_CONT:
                        # Fragments are fed as they come: the session reassembles its own frames.
                        if self._state is DriverState.OPEN:
                            # Frame.parse reads with read_exact: always bytes, never a view.
                            self._feed(event.data)  # type: ignore[arg-type]
                    elif opcode is OP_CLOSE:
                        close = ws.close_rcvd
                        self._set_reason(f"closed by peer (WebSocket close {close.code if close else ''})")
                elif type(event) is Request:
                    self._upgrade(event)
        except Exception:
            self._session_failed()
            return
        if ws.parser_exc is not None:
            self._set_reason(f"WebSocket error: {ws.parser_exc}")
        self._send_protocol_output()
        if self._state is DriverState.CONNECTING and ws.handshake_exc is not None:
            # Not even an HTTP request: websockets closes without an answer.
            self._refuse(f"invalid WebSocket handshake: {ws.handshake_exc}")

    # -- Internals --------------------------------------------------------------------------------

    def _accepted(self) -> None:
        self._arm_deadline(self._context.limits.handshake_timeout, "WebSocket handshake timed out")

    def _upgrade(self, request: Request) -> None:
        ws = self._ws
        response = ws.accept(request)  # validates the upgrade headers, answers 400/426 if they are wrong
        route: WebSocketRoute | HandshakeRefusal | None = None
        if response.status_code == http.HTTPStatus.SWITCHING_PROTOCOLS:
            try:
                offered = [
                    name
                    for value in request.headers.get_all("Sec-WebSocket-Protocol")
                    for name in parse_subprotocol(value)
                ]
            except InvalidHeader as exc:
                route = HandshakeRefusal(http.HTTPStatus.BAD_REQUEST, str(exc))
            else:
                route = select_route(request.path, offered, self._endpoint.factories)
            if isinstance(route, HandshakeRefusal):
                response = ws.reject(
                    route.status, f"Failed to open a WebSocket connection: {route.reason}.\n"
                )
            elif route.subprotocol is not None:
                response.headers["Sec-WebSocket-Protocol"] = route.subprotocol
                ws.subprotocol = Subprotocol(route.subprotocol)
        ws.send_response(response)
        self._send_protocol_output()
        if not isinstance(route, WebSocketRoute):
            # The response went out and the protocol object asked for the TCP close already.
            self._refuse(f"WebSocket upgrade refused: HTTP {response.status_code} {response.reason_phrase}")
            return
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.subprotocol = route.subprotocol
        if self.is_loopback and not _loopback_origin(request.headers.get("Origin")):
            # A page from another site, opened in a browser on the broker's host, connects from
            # loopback too; it must not get the loopback-only default user (cross-site WebSocket
            # hijacking). Browsers always send Origin; other clients usually send none.
            self.is_loopback = False
        if route.protocol in self._endpoint.text_protocols:
            self._send_message = self._send_text_or_binary
        self._start_session(self._endpoint.factories[route.protocol])

    def _send_text_or_binary(self, payload: bytes) -> None:
        # RFC 6455 §5.6: a text frame must hold UTF-8; a binary STOMP body goes in a binary frame.
        if not payload.isascii():
            try:
                payload.decode()
            except UnicodeDecodeError:
                self._ws.send_binary(payload)
                return
        self._ws.send_text(payload)

    def _flush(self) -> None:
        """Send everything written this turn as one WebSocket message (more only above max_message_size)."""
        self._flush_scheduled = False
        batch = self._batch
        if not batch or self._state is DriverState.CLOSED:
            return
        if self._ws.state is not ProtocolState.OPEN:
            batch.clear()  # the peer started the closing handshake: data may no longer be sent
            return
        payload = batch[0] if len(batch) == 1 else b"".join(batch)
        limit = self._context.limits.max_message_size
        if len(payload) <= limit:
            self._send_message(payload)
        else:
            for message in _split_messages(batch, limit):
                self._send_message(message)
        batch.clear()
        self._send_protocol_output()
        if not self._writable:
            self._check_backlog()

    def _send_protocol_output(self) -> None:
        transport = self._transport
        for chunk in self._ws.data_to_send():
            if chunk:
                transport.write(chunk)
            else:
                # SEND_EOF: after the closing handshake (or a refused upgrade, or a protocol error) the
                # server closes the TCP connection first, RFC 6455 §7.1.1.
                if self._state is DriverState.OPEN:
                    self._state = DriverState.CLOSING
                transport.close()
