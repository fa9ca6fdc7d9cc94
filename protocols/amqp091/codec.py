"""AMQP 0-9-1 frame codec, server side, sans-I/O: bytes in, frames out; frames in, bytes out.

Decoding: `AmqpParser` is fed bytes in any chunking (`feed`) and hands out one `(channel, frame)` at a
time (`next_frame`) or `NEED_DATA`. A frame is a pamqp `ProtocolHeader` (once, first), a pamqp command
object (`Basic.Publish`, `Queue.Declare`, ...), a `ContentHeader` (properties as `broker.message.Properties`),
a `ContentBody` or a pamqp `Heartbeat`. `ContentAssembler` (one per channel) turns method + header + body
frames into whole commands. What the peer got wrong raises `AmqpFrameError` with the reply code to close
with, or `ProtocolHeaderError` (answer `PROTOCOL_HEADER`, then close); both are sticky.

Encoding: `encode_method`, `encode_content`, and for the per-message hot path `encode_delivery` (Basic.Deliver
+ header + body frames in one bytes.join, without building a pamqp object), `encode_basic_ack` and
`encode_basic_nack` (publisher confirms); `HEARTBEAT_FRAME`; `encode_properties` to encode a message's
properties once and reuse the bytes for every consumer it goes to.

Theory of operation of the parser: fed chunks are kept as they came (`_pending`) and only joined when a
frame needs bytes from more than one chunk, so a large frame that trickles in is copied once, not once per
chunk, and the common case (whole frames per chunk) never joins. The frame header is checked (type, size
against frame_max) before waiting for the payload, so a hostile size cannot make us buffer more than
frame_max.

Must not import: asyncio, storage, cluster, other protocol packages; from the broker only broker.message.
"""

from __future__ import annotations

import enum
import struct
from typing import Final, Literal, NoReturn

from pamqp import base
from pamqp.commands import Basic
from pamqp.header import ProtocolHeader
from pamqp.heartbeat import Heartbeat

from broker.message import Properties
from protocols.amqp091.constants import (
    CLASS_BASIC,
    DEFAULT_FRAME_MAX,
    FRAME_BODY,
    FRAME_END,
    FRAME_ERROR,
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    FRAME_HEARTBEAT,
    FRAME_METHOD,
    FRAME_MIN_SIZE,
    FRAME_OVERHEAD,
    PROTOCOL_HEADER,
    SYNTAX_ERROR,
    UNEXPECTED_FRAME,
)
from protocols.amqp091.errors import AmqpCodecError, AmqpFrameError, ProtocolHeaderError
from protocols.amqp091.methods import CONTENT_METHODS, decode_method_payload, encode_method_payload
from protocols.amqp091.properties import decode_properties, encode_properties

__all__ = [
    "HEARTBEAT_FRAME",
    "MAX_BODY_SIZE",
    "NEED_DATA",
    "PROTOCOL_HEADER",
    "AmqpCodecError",
    "AmqpFrameError",
    "AmqpParser",
    "AssemblerState",
    "Command",
    "ContentAssembler",
    "ContentBody",
    "ContentHeader",
    "Frame",
    "Heartbeat",
    "NeedData",
    "ParserState",
    "ProtocolHeader",
    "ProtocolHeaderError",
    "encode_basic_ack",
    "encode_basic_nack",
    "encode_content",
    "encode_delivery",
    "encode_method",
    "encode_properties",
]

#: A heartbeat frame: type 8, channel 0, empty payload (AMQP 0-9-1 §4.2.7).
HEARTBEAT_FRAME: Final = bytes((FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END))
#: Largest body a ContentAssembler accepts by default (RabbitMQ 3.x's default max_message_size).
MAX_BODY_SIZE: Final = 128 * 1024 * 1024


class NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


#: What `next_frame` returns when the buffered bytes hold no whole frame.
NEED_DATA: Final = NeedData.NEED_DATA


class ParserState(enum.Enum):
    #: Waiting for the 8-octet protocol header (AMQP 0-9-1 §4.2.2).
    PROTOCOL_HEADER = "protocol header"
    FRAMES = "frames"
    #: The peer broke the protocol; the error is raised again on every call.
    ERROR = "error"


class ContentHeader:
    """A content header frame (AMQP 0-9-1 §4.2.6.1); pamqp's attribute names, our Properties."""

    __slots__ = ("class_id", "weight", "body_size", "properties")

    def __init__(self, class_id: int, weight: int, body_size: int, properties: Properties) -> None:
        self.class_id = class_id
        self.weight = weight
        self.body_size = body_size
        self.properties = properties

    def __repr__(self) -> str:
        return f"ContentHeader(class_id={self.class_id}, body_size={self.body_size}, {self.properties!r})"


class ContentBody:
    """A content body frame: a fragment of the message body (AMQP 0-9-1 §4.2.6.2)."""

    __slots__ = ("value",)

    def __init__(self, value: bytes) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"ContentBody({len(self.value)}B)"


Frame = base.Frame | ContentHeader | ContentBody | Heartbeat | ProtocolHeader

_unpack_frame_start = struct.Struct(">BHI").unpack_from
_HEADER_START = struct.Struct(">HHQ")
_FRAME_TYPES = frozenset((FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT))


class AmqpParser:
    """Bytes from one client connection -> (channel, frame). See the module docstring."""

    __slots__ = ("_state", "_framing", "_error", "_max_payload", "_buf", "_pos", "_pending", "_pending_len")

    def __init__(self, frame_max: int = DEFAULT_FRAME_MAX) -> None:
        self._state = ParserState.PROTOCOL_HEADER
        # `_state is FRAMES`, kept as a plain bool for the per-frame check.
        self._framing = False
        self._error: AmqpCodecError | None = None
        self._max_payload = 0
        self.frame_max = frame_max
        self._buf = b""
        self._pos = 0
        self._pending: list[bytes] = []
        self._pending_len = 0

    @property
    def state(self) -> ParserState:
        return self._state

    @property
    def frame_max(self) -> int:
        """Largest frame accepted, header and frame-end included (Connection.Tune's frame-max)."""
        return self._max_payload + FRAME_OVERHEAD

    @frame_max.setter
    def frame_max(self, value: int) -> None:
        # 0 means "no limit" on the wire; the session must turn it into a real bound before setting it.
        if value < FRAME_MIN_SIZE:
            raise ValueError(f"frame_max {value} is below frame-min-size {FRAME_MIN_SIZE}")
        self._max_payload = value - FRAME_OVERHEAD

    @property
    def buffered(self) -> int:
        """Octets received and not yet handed out as frames."""
        return len(self._buf) - self._pos + self._pending_len

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes received from the peer (any chunking)."""
        if self._state is ParserState.ERROR or not data:
            return
        if self._pos >= len(self._buf) and not self._pending:
            self._buf = bytes(data)  # no copy when it already is bytes
            self._pos = 0
        else:
            self._pending.append(bytes(data))
            self._pending_len += len(data)

    def next_frame(self) -> tuple[int, Frame] | Literal[NeedData.NEED_DATA]:
        """The next whole frame as (channel, frame), or NEED_DATA.

        Raises AmqpFrameError / ProtocolHeaderError when the peer broke the protocol.
        """
        if not self._framing:
            return self._next_special()
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < FRAME_HEADER_SIZE:
            if not self._fill(FRAME_HEADER_SIZE):
                return NEED_DATA
            buf, pos = self._buf, 0
        frame_type, channel, size = _unpack_frame_start(buf, pos)
        if size > self._max_payload:
            self._fail(
                AmqpFrameError(
                    FRAME_ERROR,
                    f"frame of {size + FRAME_OVERHEAD} octets exceeds frame_max {self._max_payload + FRAME_OVERHEAD}",
                )
            )
        start = pos + FRAME_HEADER_SIZE
        stop = start + size
        if stop >= len(buf):
            if frame_type not in _FRAME_TYPES:  # don't wait for the payload of garbage
                self._fail(AmqpFrameError(FRAME_ERROR, f"unknown frame type {frame_type}"))
            if not self._fill(FRAME_OVERHEAD + size):
                return NEED_DATA
            buf, start = self._buf, FRAME_HEADER_SIZE
            stop = start + size
        if buf[stop] != FRAME_END:
            self._fail(AmqpFrameError(FRAME_ERROR, f"frame-end octet {buf[stop]:#04x}, expected 0xce"))
        self._pos = stop + 1
        if frame_type == FRAME_BODY:
            return channel, ContentBody(buf[start:stop])
        frame: Frame
        try:
            if frame_type == FRAME_METHOD:
                frame = decode_method_payload(buf, start, stop)
            elif frame_type == FRAME_HEADER:
                frame = _decode_content_header(buf, start, stop)
            elif frame_type == FRAME_HEARTBEAT:
                # AMQP 0-9-1 §4.2.7: heartbeats are channel 0 and empty; anything else is a frame error.
                if channel != 0 or size != 0:
                    raise AmqpFrameError(
                        FRAME_ERROR, f"heartbeat frame on channel {channel} with {size} octets"
                    )
                frame = Heartbeat()
            else:
                raise AmqpFrameError(FRAME_ERROR, f"unknown frame type {frame_type}")
        except AmqpFrameError as exc:
            self._fail(exc)
        return channel, frame

    def _fill(self, needed: int) -> bool:
        """Make `needed` octets contiguous at self._buf[0:], joining pending chunks; False if not received yet."""
        have = len(self._buf) - self._pos
        if have + self._pending_len < needed:
            return False
        self._pending.insert(0, self._buf[self._pos :])
        self._buf = b"".join(self._pending)
        self._pos = 0
        self._pending = []
        self._pending_len = 0
        return True

    def _next_special(self) -> tuple[int, Frame] | Literal[NeedData.NEED_DATA]:
        if self._state is ParserState.ERROR:
            assert self._error is not None
            raise self._error
        # AMQP 0-9-1 §4.2.2: anything but our header (another version, another protocol) is answered with
        # the header we speak, then the connection closes. Reject as soon as the prefix is wrong.
        self._fill(min(len(PROTOCOL_HEADER), self.buffered))
        received = self._buf[self._pos : self._pos + len(PROTOCOL_HEADER)]
        if received != PROTOCOL_HEADER[: len(received)]:
            self._fail(ProtocolHeaderError(received))
        if len(received) < len(PROTOCOL_HEADER):
            return NEED_DATA
        self._pos += len(PROTOCOL_HEADER)
        self._state = ParserState.FRAMES
        self._framing = True
        return 0, ProtocolHeader()

    def _fail(self, error: AmqpCodecError) -> NoReturn:
        self._state = ParserState.ERROR
        self._framing = False
        self._error = error
        self._buf = b""
        self._pos = 0
        self._pending = []
        self._pending_len = 0
        raise error


def _decode_content_header(buf: bytes, start: int, stop: int) -> ContentHeader:
    if stop - start < 14:
        raise AmqpFrameError(FRAME_ERROR, f"content header frame of {stop - start} octets is too short")
    class_id, weight, body_size = _HEADER_START.unpack_from(buf, start)
    if class_id != CLASS_BASIC:
        # Only class basic carries content; RabbitMQ's command assembler says 505 for a header of another class.
        raise AmqpFrameError(
            UNEXPECTED_FRAME, f"expected content header for class {CLASS_BASIC}, got one for class {class_id}"
        )
    try:
        properties = decode_properties(buf, start + 12, stop)
    except (ValueError, IndexError, struct.error) as exc:
        raise AmqpFrameError(
            SYNTAX_ERROR, f"cannot decode content header properties: {exc}", CLASS_BASIC
        ) from None
    return ContentHeader(class_id, weight, body_size, properties)


# --- content assembly -----------------------------------------------------------------------------------

#: A whole command: the method, and for content methods its properties and body (else None, None).
Command = tuple[base.Frame, Properties | None, bytes | None]


class AssemblerState(enum.Enum):
    EXPECT_METHOD = "method"
    EXPECT_HEADER = "content header"
    EXPECT_BODY = "content body"


# Module-level aliases: looking up an Enum member on its class costs ~70 ns in Python 3.11.
_EXPECT_METHOD: Final = AssemblerState.EXPECT_METHOD
_EXPECT_HEADER: Final = AssemblerState.EXPECT_HEADER
_EXPECT_BODY: Final = AssemblerState.EXPECT_BODY


class ContentAssembler:
    """Method + content header + body frames of one channel -> whole commands (AMQP 0-9-1 §4.2.6).

    `process(frame)` returns None while a content method is incomplete, else the `Command`. A content
    method waits for exactly one header; the header's body_size says how many body octets follow (none for
    0); any other frame meanwhile, or a header/body with no content method before it, is 505
    UNEXPECTED_FRAME; a body frame beyond body_size is 501 (as RabbitMQ's rabbit_command_assembler).
    Heartbeats and the protocol header never reach an assembler (they are not channel frames).
    """

    __slots__ = ("state", "max_body_size", "_method", "_properties", "_remaining", "_fragments")

    def __init__(self, max_body_size: int = MAX_BODY_SIZE) -> None:
        self.state = _EXPECT_METHOD
        self.max_body_size = max_body_size
        self._method: base.Frame | None = None
        self._properties: Properties | None = None
        self._remaining = 0
        self._fragments: list[bytes] = []

    def process(self, frame: base.Frame | ContentHeader | ContentBody) -> Command | None:
        state = self.state
        if state is _EXPECT_METHOD:
            if isinstance(frame, base.Frame):
                if type(frame) in CONTENT_METHODS:
                    self._method = frame
                    self.state = _EXPECT_HEADER
                    return None
                return frame, None, None
            self._unexpected("expected method frame, got non method frame instead", frame)
        method = self._method
        assert method is not None
        if state is _EXPECT_HEADER:
            if type(frame) is not ContentHeader:
                self._unexpected(
                    "expected content header for class 60, got non content header frame instead", frame
                )
            body_size = frame.body_size
            if body_size > self.max_body_size:
                self._reset()
                raise AmqpFrameError(
                    FRAME_ERROR,
                    f"content body size {body_size} exceeds maximum allowed size {self.max_body_size}",
                    CLASS_BASIC,
                    method.frame_id,
                )
            if body_size == 0:
                self._reset()
                return method, frame.properties, b""
            self._properties = frame.properties
            self._remaining = body_size
            self.state = _EXPECT_BODY
            return None
        if type(frame) is not ContentBody:
            self._unexpected("expected content body, got non content body frame instead", frame)
        value = frame.value
        remaining = self._remaining - len(value)
        if remaining < 0:
            self._reset()
            raise AmqpFrameError(
                FRAME_ERROR, "content body frame exceeds remaining content size", CLASS_BASIC, method.frame_id
            )
        fragments = self._fragments
        if remaining == 0:
            properties = self._properties
            body = b"".join((*fragments, value)) if fragments else value
            self._reset()
            return method, properties, body
        fragments.append(value)
        self._remaining = remaining
        return None

    def _unexpected(self, text: str, frame: object) -> NoReturn:
        method = self._method
        self._reset()
        if isinstance(frame, (Heartbeat, ProtocolHeader)):
            raise TypeError(f"{type(frame).__name__} is not a channel frame; the session handles it")
        if method is None:
            raise AmqpFrameError(UNEXPECTED_FRAME, text)
        raise AmqpFrameError(UNEXPECTED_FRAME, text, CLASS_BASIC, method.frame_id)

    def _reset(self) -> None:
        self.state = _EXPECT_METHOD
        self._method = None
        self._properties = None
        self._remaining = 0
        self._fragments = []


# --- encoding --------------------------------------------------------------------------------------------

_END = bytes((FRAME_END,))
_METHOD_FRAME_START = struct.Struct(">BHI")
_ACK_FRAME = struct.Struct(">BHIHHQBB")
_DELIVER_START = struct.Struct(">BHIHHB")  # frame start, class, method, consumer-tag length
_TAG_BIT_LEN = struct.Struct(">QBB")  # delivery-tag, redelivered, exchange length
#: frame-end of the previous frame + start of a content header frame + class, weight, body size.
_END_HEADER_START = struct.Struct(">BBHIHHQ")
#: frame-end of the previous frame + start of a body frame.
_END_BODY_START = struct.Struct(">BBHI")
_ACK_SIZE = 4 + 8 + 1
_ACK_ID = Basic.Ack.frame_id
_NACK_ID = Basic.Nack.frame_id
_DELIVER_ID = Basic.Deliver.frame_id


def encode_method(channel: int, method: base.Frame) -> bytes:
    """One method frame. Content methods also need `encode_content`'s header and body frames."""
    if isinstance(method, Basic.Ack):
        return encode_basic_ack(channel, method.delivery_tag, method.multiple)
    if isinstance(method, Basic.Nack):
        return encode_basic_nack(channel, method.delivery_tag, method.multiple, method.requeue)
    payload = encode_method_payload(method)
    return b"".join((_METHOD_FRAME_START.pack(FRAME_METHOD, channel, len(payload)), payload, _END))


def encode_basic_ack(channel: int, delivery_tag: int, multiple: bool = False) -> bytes:
    """Basic.Ack frame (the server's publisher confirm)."""
    return _ACK_FRAME.pack(
        FRAME_METHOD, channel, _ACK_SIZE, CLASS_BASIC, _ACK_ID, delivery_tag, 1 if multiple else 0, FRAME_END
    )


def encode_basic_nack(
    channel: int, delivery_tag: int, multiple: bool = False, requeue: bool = False
) -> bytes:
    """Basic.Nack frame (the server's negative publisher confirm; requeue means nothing to a publisher)."""
    bits = (1 if multiple else 0) | (2 if requeue else 0)
    return _ACK_FRAME.pack(
        FRAME_METHOD, channel, _ACK_SIZE, CLASS_BASIC, _NACK_ID, delivery_tag, bits, FRAME_END
    )


def encode_content(
    channel: int, method: base.Frame, properties: Properties | bytes, body: bytes, frame_max: int
) -> bytes:
    """Method frame + content header + body frames (body cut into frame_max - 8 octet pieces; 0 = no limit).

    `properties` may be a `Properties` or what `encode_properties` made of one.
    """
    if (
        isinstance(method, Basic.Deliver)
        and method.consumer_tag is not None
        and method.delivery_tag is not None
        and method.routing_key is not None
    ):
        return encode_delivery(
            channel,
            method.consumer_tag,
            method.delivery_tag,
            method.redelivered,
            method.exchange,
            method.routing_key,
            properties,
            body,
            frame_max,
        )
    payload = encode_method_payload(method)
    parts: list[bytes | memoryview] = [_METHOD_FRAME_START.pack(FRAME_METHOD, channel, len(payload)), payload]
    _append_content(parts, channel, properties, body, frame_max)
    return b"".join(parts)


def encode_delivery(
    channel: int,
    consumer_tag: str | bytes,
    delivery_tag: int,
    redelivered: bool,
    exchange: str | bytes,
    routing_key: str | bytes,
    properties: Properties | bytes,
    body: bytes,
    frame_max: int,
) -> bytes:
    """Basic.Deliver + content header + body frames, byte for byte what pamqp makes, in one join.

    Names may be given pre-encoded (UTF-8 bytes) so a session can encode its consumer tags once.
    ValueError when a name is longer than a shortstr allows (e.g. a long MQTT topic as routing key).
    """
    tag = consumer_tag.encode() if isinstance(consumer_tag, str) else consumer_tag
    ex = exchange.encode() if isinstance(exchange, str) else exchange
    rk = routing_key.encode() if isinstance(routing_key, str) else routing_key
    if len(tag) > 255 or len(ex) > 255 or len(rk) > 255:
        raise ValueError("consumer tag, exchange and routing key must each fit a shortstr (255 octets)")
    size = 16 + len(tag) + len(ex) + len(rk)  # ids 4 + 3 length octets + delivery-tag 8 + bits 1
    parts: list[bytes | memoryview] = [
        _DELIVER_START.pack(FRAME_METHOD, channel, size, CLASS_BASIC, _DELIVER_ID, len(tag)),
        tag,
        _TAG_BIT_LEN.pack(delivery_tag, 1 if redelivered else 0, len(ex)),
        ex,
        bytes((len(rk),)),
        rk,
    ]
    _append_content(parts, channel, properties, body, frame_max)
    return b"".join(parts)


def _append_content(
    parts: list[bytes | memoryview], channel: int, properties: Properties | bytes, body: bytes, frame_max: int
) -> None:
    """Close the method frame in `parts`, then add the header frame and the body frames (AMQP 0-9-1 §4.2.6)."""
    encoded = properties if isinstance(properties, bytes) else encode_properties(properties)
    size = len(body)
    parts.append(
        _END_HEADER_START.pack(FRAME_END, FRAME_HEADER, channel, 12 + len(encoded), CLASS_BASIC, 0, size)
    )
    parts.append(encoded)
    chunk = frame_max - FRAME_OVERHEAD if frame_max else size
    if size <= chunk:
        if size:
            parts.append(_END_BODY_START.pack(FRAME_END, FRAME_BODY, channel, size))
            parts.append(body)
    else:
        view = memoryview(body)
        for offset in range(0, size, chunk):
            piece = view[offset : offset + chunk]
            parts.append(_END_BODY_START.pack(FRAME_END, FRAME_BODY, channel, len(piece)))
            parts.append(piece)
    parts.append(_END)
