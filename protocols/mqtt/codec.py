"""MQTT 3.1 / 3.1.1 / 5.0 codec, sans-I/O: bytes -> packets (`MqttParser`), packets -> bytes (`encode`).

Responsible for framing (fixed header, Remaining Length, `max_packet_size`), decoding and validating every
Control Packet in both directions, encoding every packet for 3.1 (level 3, "MQIsdp"), 3.1.1 (level 4)
and 5.0 (level 5), the PUBLISH hot paths (inline decode in `MqttParser.next_packet`, `encode_publish`),
and the pure topic checks of §4.7 / §4.8 (`validate_topic_name`, `validate_topic_filter`, `parse_shared`).
Rules that need session state (packet id bookkeeping, topic alias maps, Receive Maximum, keep-alive,
authentication) belong to the MQTT session, not here.

Theory of operation: the server-side parser does not know the protocol level until it has decoded the
CONNECT; it decodes that CONNECT itself, sets `protocol_level` as soon as name and level are known to be
valid (so a later error in the same CONNECT can be answered in that version's CONNACK format), and from
then on the level decides whether packets carry reason codes and properties. A client-side parser is
told the level it sent. Every violation raises `MqttError(reason_code, message)` and the parser stays
failed (h11's sticky ERROR state); "need more bytes" is the return value `NEED_DATA`, never an exception.

Must not import: asyncio, any socket or transport code, broker, storage, cluster, other protocols.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final

from protocols.mqtt.packets import (
    Auth,
    ConnAck,
    Connect,
    ConnectReturnCode,
    Disconnect,
    MqttError,
    Packet,
    PacketType,
    PingReq,
    PingResp,
    Properties,
    ProtocolLevel,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    ReasonCode,
    SubAck,
    Subscribe,
    SubscriptionOptions,
    UnsubAck,
    Unsubscribe,
    Will,
)
from protocols.mqtt.properties import (
    NO_PROPERTIES,
    VARINT_MAX,
    WILL_PROPERTIES,
    decode_binary,
    decode_properties,
    decode_string,
    decode_varint,
    encode_binary,
    encode_properties,
    encode_string,
    encode_varint,
)

__all__ = [
    "MAX_PACKET_SIZE",
    "NEED_DATA",
    "NO_PROPERTIES",
    "MqttParser",
    "NeedData",
    "connect_return_code",
    "encode",
    "encode_properties",
    "encode_publish",
    "encode_string",
    "parse_shared",
    "validate_topic_filter",
    "validate_topic_name",
]


class NeedData(enum.Enum):
    """The type of the `NEED_DATA` sentinel."""

    NEED_DATA = enum.auto()


#: Returned by `MqttParser.next_packet` when the buffered bytes do not hold a whole packet.
NEED_DATA: Final = NeedData.NEED_DATA

#: The largest packet the wire format can express: 1 type byte + 4 length bytes + 268,435,455 (§2.1.4).
MAX_PACKET_SIZE: Final = 1 + 4 + VARINT_MAX

_MALFORMED: Final = ReasonCode.MALFORMED_PACKET
_PROTOCOL_ERROR: Final = ReasonCode.PROTOCOL_ERROR
_U16: Final = struct.Struct(">H")
_CONNECT_HEADER: Final = struct.Struct(">BBH")  # protocol level, connect flags, keep alive
_ACK_V3: Final = struct.Struct(">BBH")  # fixed header byte, Remaining Length 2, packet id

# Fixed header flags each packet type MUST carry (5.0 Table 2-2, [MQTT-2.1.3-1]; 3.1.1 [MQTT-2.2.2-1]).
# None: reserved type (0 in every version; 15 before 5.0). PUBLISH's flags are checked by its decoder.
_FIXED_FLAGS_V5: Final = (None, 0, 0, None, 0, 0, 2, 0, 2, 0, 2, 0, 0, 0, 0, 0)
_FIXED_FLAGS_V3: Final = (*_FIXED_FLAGS_V5[:15], None)

# Packet types each side may receive (Table 2-1 "Direction of flow").
_FROM_CLIENT: Final = frozenset({1, 3, 4, 5, 6, 7, 8, 10, 12, 14, 15})
_FROM_SERVER_V5: Final = frozenset({2, 3, 4, 5, 6, 7, 9, 11, 13, 14, 15})
_FROM_SERVER_V3: Final = frozenset({2, 3, 4, 5, 6, 7, 9, 11, 13})  # a 3.1.1 Server never sends DISCONNECT

# Reason codes each 5.0 packet may carry (Table 2-6 and the per-packet tables of §3).
_RC_CONNACK: Final = frozenset(
    {0x00, *range(0x80, 0x8B), 0x8C, 0x90, 0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F}
)
_RC_PUBACK: Final = frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99})  # PUBACK, PUBREC
_RC_PUBREL: Final = frozenset({0x00, 0x92})  # PUBREL, PUBCOMP
_RC_SUBACK: Final = frozenset({0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2})
_RC_UNSUBACK: Final = frozenset({0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91})
_RC_DISCONNECT: Final = frozenset(
    {0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8C, 0x8D, 0x8E, 0x8F, *range(0x90, 0xA3)}
    - {0x91, 0x92}
)
_RC_AUTH: Final = frozenset({0x00, 0x18, 0x19})
_RC_ACK_BY_TYPE: Final = MappingProxyType({4: _RC_PUBACK, 5: _RC_PUBACK, 6: _RC_PUBREL, 7: _RC_PUBREL})
_RC_SUBACK_V3: Final = frozenset({0x00, 0x01, 0x02, 0x80})  # 3.1.1 [MQTT-3.9.3-2]
_new: Final = object.__new__


class MqttParser:
    """Reassembles and decodes MQTT packets from a byte stream fed in any chunking.

    Use: `feed(data)`, then call `next_packet()` until it returns `NEED_DATA`. A server-side parser
    (the default) decodes client->server packets and learns `protocol_level` from the CONNECT; a
    client-side parser (`server_side=False`) decodes server->client packets at the level given.
    `max_packet_size` bounds a packet's total size; a larger Remaining Length raises Packet Too Large
    before the body is buffered. It is a plain attribute: a session may keep it small until the
    CONNECT is accepted and raise it after.
    """

    __slots__ = (
        "server_side",
        "protocol_level",
        "max_packet_size",
        "_buf",
        "_pos",
        "_chunks",
        "_pending",
        "_need",
        "_error",
    )

    def __init__(
        self,
        *,
        server_side: bool = True,
        protocol_level: int | None = None,
        max_packet_size: int = MAX_PACKET_SIZE,
    ) -> None:
        if not server_side and protocol_level is None:
            raise ValueError("a client-side parser needs the protocol level its CONNECT asked for")
        if protocol_level is not None and protocol_level not in (3, 4, 5):
            raise ValueError(f"unknown MQTT protocol level {protocol_level}")
        self.server_side = server_side
        self.protocol_level = protocol_level
        self.max_packet_size = max_packet_size
        # Unconsumed input is _buf[_pos:]. After next_packet() returned NEED_DATA, _need is the number
        # of bytes (from _pos) it waits for, and later reads go to _chunks until _pending (all unconsumed
        # bytes) reaches _need: a large packet arriving in many small reads is joined once, not copied
        # once per read. Per packet, next_packet() only loads _buf and _pos and stores _pos.
        self._buf = b""
        self._pos = 0
        self._chunks: list[bytes] = []
        self._pending = 0
        self._need = 0
        self._error: MqttError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes (any chunking). Ignored once the parser has failed."""
        if self._error is not None:
            return
        if type(data) is not bytes:
            data = bytes(data)
        if self._need:
            self._chunks.append(data)
            self._pending += len(data)
            if self._pending < self._need:
                return
            self._buf = b"".join([memoryview(self._buf)[self._pos :], *self._chunks])
            self._chunks.clear()
            self._need = 0
        elif self._pos != len(self._buf):
            self._buf = self._buf[self._pos :] + data
        else:
            self._buf = data
        self._pos = 0

    def next_packet(self) -> Packet | NeedData:
        """Return the next whole packet, or `NEED_DATA`.

        Raises MqttError when the peer broke the protocol, and keeps raising it: the parser is then
        failed and ignores further input (h11's sticky ERROR state).
        """
        buf = self._buf
        pos = self._pos
        try:
            if len(buf) - pos < 2:
                return self._wait(2)
            b0 = buf[pos]
            length = buf[pos + 1]
            if length < 0x80:
                start = pos + 2
            elif len(buf) - pos > 2 and 0 < buf[pos + 2] < 0x80:  # two bytes: packets up to 16 KiB
                length = (length & 0x7F) | buf[pos + 2] << 7
                start = pos + 3
            else:
                header = _remaining_length(buf, pos)
                if header is None:
                    return self._wait(len(buf) - pos + 1)
                length, start = header
            end = start + length
            if end - pos > self.max_packet_size:
                raise MqttError(
                    ReasonCode.PACKET_TOO_LARGE,
                    f"packet of {end - pos} bytes exceeds the maximum packet size {self.max_packet_size}",
                )
            if end > len(buf):
                if self.protocol_level is None and b0 >> 4 != PacketType.CONNECT:
                    # Refuse now rather than buffer the body of what cannot be accepted [MQTT-3.1.0-1].
                    raise MqttError(_PROTOCOL_ERROR, "the first packet must be CONNECT [MQTT-3.1.0-1]")
                return self._wait(end - pos)
            self._pos = end
            level = self.protocol_level
            if b0 >> 4 != 3 or level is None:
                if b0 == 0x40 and length == 2 and level is not None and (buf[start] or buf[start + 1]):
                    # PUBACK without reason code or properties, one per QoS 1 delivery (§3.4).
                    ack: PubAck = _new(PubAck)
                    ack.packet_id = (buf[start] << 8) | buf[start + 1]
                    ack.reason_code = 0
                    ack.properties = None
                    return ack
                return self._decode_other(b0, buf[start:end], level)

            # PUBLISH hot path (§3.3), decoded in place: no body copy, no helper calls when 5.0
            # properties are absent.
            qos = (b0 >> 1) & 3
            tlen = (buf[start] << 8) | buf[start + 1]
            p = start + 2 + tlen
            topic = buf[start + 2 : p].decode()
            if qos:
                if qos == 3:
                    raise MqttError(_MALFORMED, "PUBLISH with QoS 3 [MQTT-3.3.1-4]")
                packet_id = (buf[p] << 8) | buf[p + 1]
                p += 2
                if not packet_id:
                    raise MqttError(
                        _PROTOCOL_ERROR, "PUBLISH QoS > 0 with Packet Identifier 0 [MQTT-2.2.1-3]"
                    )
            else:
                if b0 & 8:
                    raise MqttError(_MALFORMED, "PUBLISH QoS 0 with DUP set [MQTT-3.3.1-2]")
                packet_id = 0
            props: Properties | None = None
            if level == 5:
                if p < end and not buf[p]:
                    p += 1
                else:
                    props, p = decode_properties(buf, p, end, PacketType.PUBLISH)
                    if props is not None and props.subscription_identifiers and self.server_side:
                        raise MqttError(
                            _PROTOCOL_ERROR,
                            "PUBLISH from a Client has a Subscription Identifier [MQTT-3.3.4-6]",
                        )
            if p > end:
                raise MqttError(_MALFORMED, "PUBLISH variable header runs past the Remaining Length")
            if not topic or "+" in topic or "#" in topic or "\x00" in topic:
                _check_publish_topic(topic, props)
            # Slot stores instead of Publish.__init__: a third cheaper, and this runs per message.
            # The tests compare decoded packets with constructed ones, so a field added to Publish
            # and forgotten here fails them.
            publish: Publish = _new(Publish)
            publish.topic = topic
            publish.payload = buf[p:end]
            publish.qos = qos
            publish.retain = b0 & 1 == 1
            publish.dup = b0 & 8 == 8
            publish.packet_id = packet_id
            publish.properties = props
            return publish
        except MqttError as exc:
            self._fail(exc)
            raise
        except (IndexError, struct.error, UnicodeDecodeError) as exc:
            # A field ran past the end of the packet, or a string is not well-formed UTF-8 [MQTT-1.5.4-1].
            error = MqttError(_MALFORMED, f"malformed packet: {exc}")
            self._fail(error)
            raise error from exc

    def _wait(self, need: int) -> NeedData:
        """Record that `need` bytes from _pos are required before the next packet can be decoded."""
        if self._error is not None:
            raise self._error
        # _chunks is not empty only while fewer than _need bytes have arrived (feed joins them as soon
        # as enough are there), so a repeated call while waiting recomputes the same _need.
        self._need = need
        self._pending = len(self._buf) - self._pos + sum(map(len, self._chunks))
        return NEED_DATA

    def _fail(self, error: MqttError) -> None:
        # Sticky: the input is dropped, and every later next_packet() reaches _wait, which raises.
        self._error = error
        self._buf = b""
        self._pos = 0
        self._chunks.clear()

    def _decode_other(self, b0: int, body: bytes, level: int | None) -> Packet:
        ptype = b0 >> 4
        if level is None:
            # The level comes from the CONNECT, which must come first [MQTT-3.1.0-1].
            if ptype != PacketType.CONNECT:
                raise MqttError(_PROTOCOL_ERROR, "the first packet must be CONNECT [MQTT-3.1.0-1]")
            if b0 & 0x0F:
                raise MqttError(_MALFORMED, "CONNECT fixed header flags must be 0 [MQTT-2.1.3-1]")
            return self._decode_connect(body)
        expected = (_FIXED_FLAGS_V5 if level == 5 else _FIXED_FLAGS_V3)[ptype]
        if expected is None:
            raise MqttError(_MALFORMED, f"reserved packet type {ptype}")
        if b0 & 0x0F != expected:
            raise MqttError(
                _MALFORMED,
                f"{PacketType(ptype).name} fixed header flags must be {expected:#06b} "
                "[MQTT-2.2.2-1] (3.1.1), [MQTT-2.1.3-1] (5.0)",
            )
        if self.server_side:
            if ptype not in _FROM_CLIENT:
                raise MqttError(_PROTOCOL_ERROR, f"a Client must not send {PacketType(ptype).name}")
            if ptype == PacketType.CONNECT:
                raise MqttError(_PROTOCOL_ERROR, "second CONNECT [MQTT-3.1.0-2]")
        elif ptype not in (_FROM_SERVER_V5 if level == 5 else _FROM_SERVER_V3):
            raise MqttError(_PROTOCOL_ERROR, f"a Server must not send {PacketType(ptype).name}")
        return _DECODERS[ptype](self, body, level)

    def _decode_connect(self, body: bytes) -> Connect:
        name, p = decode_string(body, 0)
        level = body[p]
        if level not in (3, 4, 5):
            raise MqttError(
                ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
                f"unsupported protocol level {level} [MQTT-3.1.2-2]",
            )
        if name != ("MQIsdp" if level == ProtocolLevel.MQTT_3_1 else "MQTT"):
            raise MqttError(
                ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
                f"protocol name {name!r} does not match protocol level {level} [MQTT-3.1.2-1]",
            )
        # From here on errors are reported in this version's terms (CONNACK format, reason codes).
        self.protocol_level = level
        _, flags, keepalive = _CONNECT_HEADER.unpack_from(body, p)
        p += 4
        if flags & 0x01:
            raise MqttError(_MALFORMED, "CONNECT reserved flag is set [MQTT-3.1.2-3]")
        will_flag = flags & 0x04
        will_qos = (flags >> 3) & 3
        will_retain = flags & 0x20
        username_flag = flags & 0x80
        password_flag = flags & 0x40
        if not will_flag and will_qos:
            raise MqttError(
                _MALFORMED, "Will QoS without Will Flag [MQTT-3.1.2-11] (5.0), [MQTT-3.1.2-13] (3.1.1)"
            )
        if not will_flag and will_retain:
            raise MqttError(
                _MALFORMED, "Will Retain without Will Flag [MQTT-3.1.2-13] (5.0), [MQTT-3.1.2-15] (3.1.1)"
            )
        if will_qos == 3:
            raise MqttError(_MALFORMED, "Will QoS 3 [MQTT-3.1.2-12] (5.0), [MQTT-3.1.2-14] (3.1.1)")
        if password_flag and not username_flag and level < 5:
            raise MqttError(_MALFORMED, "Password Flag without User Name Flag [MQTT-3.1.2-22]")
        props = None
        end = len(body)
        if level == 5:
            props, p = decode_properties(body, p, end, PacketType.CONNECT)
            if (
                props is not None
                and props.authentication_data is not None
                and props.authentication_method is None
            ):
                raise MqttError(
                    _PROTOCOL_ERROR, "Authentication Data without Authentication Method (§3.1.2.11.10)"
                )
        client_id, p = decode_string(body, p)
        will = None
        if will_flag:
            will_props = None
            if level == 5:
                will_props, p = decode_properties(body, p, end, WILL_PROPERTIES)
            will_topic, p = decode_string(body, p)
            validate_topic_name(will_topic)
            will_payload, p = decode_binary(body, p)
            will = Will(will_topic, will_payload, will_qos, bool(will_retain), will_props)
        username = None
        if username_flag:
            username, p = decode_string(body, p)
        password = None
        if password_flag:
            password, p = decode_binary(body, p)
        if p != end:
            raise MqttError(_MALFORMED, "bytes after the last CONNECT payload field [MQTT-3.1.3-1]")
        return Connect(client_id, level, bool(flags & 0x02), keepalive, will, username, password, props)

    def _decode_connack(self, body: bytes, level: int) -> ConnAck:
        flags = body[0]
        code = body[1]
        if flags & 0xFE:
            raise MqttError(_MALFORMED, "CONNACK reserved acknowledge flags are set [MQTT-3.2.2-1]")
        props = None
        p = 2
        if level == 5:
            if code not in _RC_CONNACK:
                raise MqttError(_PROTOCOL_ERROR, f"invalid CONNACK reason code 0x{code:02X}")
            props, p = decode_properties(body, p, len(body), PacketType.CONNACK)
        elif code > ConnectReturnCode.NOT_AUTHORIZED:
            raise MqttError(_PROTOCOL_ERROR, f"reserved CONNACK return code {code}")
        _expect_end(body, p, "CONNACK")
        return ConnAck(flags == 1, code, props)

    def _decode_subscribe(self, body: bytes, level: int) -> Subscribe:
        packet_id = _packet_id(body)
        p = 2
        props = None
        end = len(body)
        if level == 5:
            props, p = decode_properties(body, p, end, PacketType.SUBSCRIBE)
        subscriptions: list[tuple[str, SubscriptionOptions]] = []
        while p < end:
            topic_filter, p = decode_string(body, p)
            options = body[p]
            p += 1
            qos = options & 3
            if level == 5:
                if options & 0xC0:
                    raise MqttError(_MALFORMED, "SUBSCRIBE options reserved bits are set [MQTT-3.8.3-5]")
                if qos == 3:
                    raise MqttError(_PROTOCOL_ERROR, "SUBSCRIBE Maximum QoS 3 (§3.8.3.1)")
                retain_handling = (options >> 4) & 3
                if retain_handling == 3:
                    raise MqttError(_PROTOCOL_ERROR, "SUBSCRIBE Retain Handling 3 (§3.8.3.1)")
                no_local = options & 0x04 == 0x04
                if no_local and topic_filter.startswith("$share/"):
                    raise MqttError(_PROTOCOL_ERROR, "No Local on a Shared Subscription [MQTT-3.8.3-4]")
                opts = SubscriptionOptions(qos, no_local, options & 0x08 == 0x08, retain_handling)
            else:
                if options & 0xFC or qos == 3:
                    raise MqttError(_MALFORMED, "SUBSCRIBE requested QoS byte invalid [MQTT-3-8.3-4]")
                opts = SubscriptionOptions(qos)
            subscriptions.append((topic_filter, opts))
        if not subscriptions:
            raise MqttError(
                _PROTOCOL_ERROR,
                "SUBSCRIBE without Topic Filters [MQTT-3.8.3-3] (3.1.1), [MQTT-3.8.3-2] (5.0)",
            )
        return Subscribe(packet_id, subscriptions, props)

    def _decode_suback(self, body: bytes, level: int) -> SubAck:
        packet_id = _packet_id(body)
        p = 2
        props = None
        if level == 5:
            props, p = decode_properties(body, p, len(body), PacketType.SUBACK)
        codes = list(body[p:])
        if not codes:
            raise MqttError(_PROTOCOL_ERROR, "SUBACK without reason codes [MQTT-3.9.3-1]")
        valid = _RC_SUBACK if level == 5 else _RC_SUBACK_V3
        for code in codes:
            if code not in valid:
                raise MqttError(_PROTOCOL_ERROR, f"invalid SUBACK reason code 0x{code:02X} [MQTT-3.9.3-2]")
        return SubAck(packet_id, codes, props)

    def _decode_unsubscribe(self, body: bytes, level: int) -> Unsubscribe:
        packet_id = _packet_id(body)
        p = 2
        props = None
        end = len(body)
        if level == 5:
            props, p = decode_properties(body, p, end, PacketType.UNSUBSCRIBE)
        filters: list[str] = []
        while p < end:
            topic_filter, p = decode_string(body, p)
            filters.append(topic_filter)
        if not filters:
            raise MqttError(_PROTOCOL_ERROR, "UNSUBSCRIBE without Topic Filters [MQTT-3.10.3-2]")
        return Unsubscribe(packet_id, filters, props)

    def _decode_unsuback(self, body: bytes, level: int) -> UnsubAck:
        packet_id = _packet_id(body)
        if level < 5:
            _expect_end(body, 2, "UNSUBACK")
            return UnsubAck(packet_id)
        props, p = decode_properties(body, 2, len(body), PacketType.UNSUBACK)
        codes = list(body[p:])
        if not codes:
            raise MqttError(_PROTOCOL_ERROR, "UNSUBACK without reason codes (§3.11.3)")
        for code in codes:
            if code not in _RC_UNSUBACK:
                raise MqttError(_PROTOCOL_ERROR, f"invalid UNSUBACK reason code 0x{code:02X} [MQTT-3.11.3-2]")
        return UnsubAck(packet_id, codes, props)

    def _decode_pingreq(self, body: bytes, level: int) -> PingReq:
        _expect_end(body, 0, "PINGREQ")
        return PingReq()

    def _decode_pingresp(self, body: bytes, level: int) -> PingResp:
        _expect_end(body, 0, "PINGRESP")
        return PingResp()

    def _decode_disconnect(self, body: bytes, level: int) -> Disconnect:
        if level < 5 or not body:
            # 5.0 §3.14.2.1: Remaining Length 0 means Normal disconnection without properties.
            _expect_end(body, 0, "DISCONNECT")
            return Disconnect()
        code = body[0]
        if code not in _RC_DISCONNECT:
            raise MqttError(_PROTOCOL_ERROR, f"invalid DISCONNECT reason code 0x{code:02X} [MQTT-3.14.2-1]")
        props, p = (
            (None, 1) if len(body) == 1 else decode_properties(body, 1, len(body), PacketType.DISCONNECT)
        )
        _expect_end(body, p, "DISCONNECT")
        if props is not None and props.session_expiry_interval is not None and not self.server_side:
            raise MqttError(
                _PROTOCOL_ERROR, "Session Expiry Interval in a Server's DISCONNECT [MQTT-3.14.2-2]"
            )
        return Disconnect(code, props)

    def _decode_auth(self, body: bytes, level: int) -> Auth:
        if not body:
            return Auth()  # §3.15.2.1: Remaining Length 0 means Success without properties
        code = body[0]
        if code not in _RC_AUTH:
            raise MqttError(_PROTOCOL_ERROR, f"invalid AUTH reason code 0x{code:02X} [MQTT-3.15.2-1]")
        props, p = (None, 1) if len(body) == 1 else decode_properties(body, 1, len(body), PacketType.AUTH)
        _expect_end(body, p, "AUTH")
        return Auth(code, props)


def _remaining_length(buf: bytes, pos: int) -> tuple[int, int] | None:
    """Decode a multi-byte Remaining Length; None while its bytes are still incomplete."""
    for i in range(2, 6):
        if pos + i > len(buf):
            return None
        if buf[pos + i - 1] < 0x80:
            return decode_varint(buf, pos + 1)
    raise MqttError(_MALFORMED, "Remaining Length longer than 4 bytes (§2.1.4)")


def _ack_decoder(
    cls: type[PubAck] | type[PubRec] | type[PubRel] | type[PubComp], ptype: PacketType
) -> Callable[[MqttParser, bytes, int], Packet]:
    """PUBACK, PUBREC, PUBREL and PUBCOMP share one layout (§3.4-§3.7)."""
    valid = _RC_ACK_BY_TYPE[ptype]
    name = ptype.name

    def decode(parser: MqttParser, body: bytes, level: int) -> Packet:
        packet_id = _packet_id(body)
        if len(body) == 2:
            return cls(packet_id)
        if level < 5:
            raise MqttError(_MALFORMED, f"{name} Remaining Length must be 2 before MQTT 5.0")
        code = body[2]
        if code not in valid:
            raise MqttError(_PROTOCOL_ERROR, f"invalid {name} reason code 0x{code:02X}")
        # §3.4.2.1: with Remaining Length 3 there is a reason code and no Property Length.
        props, p = (None, 3) if len(body) == 3 else decode_properties(body, 3, len(body), ptype)
        _expect_end(body, p, name)
        return cls(packet_id, code, props)

    return decode


def _packet_id(body: bytes) -> int:
    packet_id: int = _U16.unpack_from(body)[0]
    if not packet_id:
        raise MqttError(_PROTOCOL_ERROR, "Packet Identifier 0 [MQTT-2.3.1-1] (3.1.1), [MQTT-2.2.1-3] (5.0)")
    return packet_id


def _expect_end(body: bytes, p: int, name: str) -> None:
    if p != len(body):
        raise MqttError(_MALFORMED, f"{name} has {len(body) - p} unexpected bytes at its end")


def _check_publish_topic(topic: str, props: Properties | None) -> None:
    """The slow path of the PUBLISH Topic Name check, reached only when something is wrong or aliased."""
    if not topic:
        # 5.0 §3.3.2.3.4: a zero-length Topic Name is valid only with a Topic Alias.
        if props is not None and props.topic_alias is not None:
            return
        raise MqttError(_PROTOCOL_ERROR, "PUBLISH with an empty Topic Name and no Topic Alias [MQTT-4.7.3-1]")
    if "\x00" in topic:
        raise MqttError(_MALFORMED, "Topic Name contains U+0000 [MQTT-1.5.4-2]")
    validate_topic_name(topic)


# Decoders by packet type, for every type but CONNECT (decoded before the level is known) and PUBLISH
# (decoded inline); reserved and wrong-direction types are refused before the lookup.
_DECODERS: Final[Mapping[int, Callable[[MqttParser, bytes, int], Packet]]] = MappingProxyType(
    {
        PacketType.CONNACK: MqttParser._decode_connack,
        PacketType.PUBACK: _ack_decoder(PubAck, PacketType.PUBACK),
        PacketType.PUBREC: _ack_decoder(PubRec, PacketType.PUBREC),
        PacketType.PUBREL: _ack_decoder(PubRel, PacketType.PUBREL),
        PacketType.PUBCOMP: _ack_decoder(PubComp, PacketType.PUBCOMP),
        PacketType.SUBSCRIBE: MqttParser._decode_subscribe,
        PacketType.SUBACK: MqttParser._decode_suback,
        PacketType.UNSUBSCRIBE: MqttParser._decode_unsubscribe,
        PacketType.UNSUBACK: MqttParser._decode_unsuback,
        PacketType.PINGREQ: MqttParser._decode_pingreq,
        PacketType.PINGRESP: MqttParser._decode_pingresp,
        PacketType.DISCONNECT: MqttParser._decode_disconnect,
        PacketType.AUTH: MqttParser._decode_auth,
    }
)


# --- encoding --------------------------------------------------------------------------------------


def encode_publish(
    topic_field: bytes,
    payload: bytes,
    qos: int = 0,
    packet_id: int = 0,
    retain: bool = False,
    dup: bool = False,
    properties: bytes = b"",
) -> bytes:
    """Encode a PUBLISH for delivery, with one bytes.join. The hot path: no validation.

    `topic_field` is the Topic Name already encoded with its two-byte length prefix
    (`encode_string(topic)`), so fan-out encodes it once per message. `properties` is an encoded 5.0
    property block with its length prefix (`encode_properties(props, PacketType.PUBLISH)`, or
    `NO_PROPERTIES`), and b"" for 3.1 / 3.1.1.
    """
    length = len(topic_field) + len(payload) + len(properties)
    first = 0x30 | qos << 1 | retain | dup << 3
    if qos:
        length += 2
        if length < 0x80:
            header = bytes((first, length))
        elif length < 0x4000:
            header = bytes((first, length & 0x7F | 0x80, length >> 7))
        else:
            header = bytes((first,)) + encode_varint(length)
        return b"".join((header, topic_field, _U16.pack(packet_id), properties, payload))
    if length < 0x80:
        header = bytes((first, length))
    elif length < 0x4000:
        header = bytes((first, length & 0x7F | 0x80, length >> 7))
    else:
        header = bytes((first,)) + encode_varint(length)
    return b"".join((header, topic_field, properties, payload))


def encode(packet: Packet, protocol_level: int) -> bytes:
    """Encode any packet for the given protocol level (3, 4 or 5).

    Raises ValueError when the packet cannot be expressed at that level (a 5.0-only field below 5.0,
    a property not valid in that packet, a value out of its field's range): that is our misuse.
    """
    if protocol_level not in (3, 4, 5):
        raise ValueError(f"unknown MQTT protocol level {protocol_level}")
    encoder = _ENCODERS.get(type(packet))
    if encoder is None:
        raise TypeError(f"not an MQTT packet: {packet!r}")
    try:
        return encoder(packet, protocol_level)
    except struct.error as exc:
        raise ValueError(f"{type(packet).__name__}: {exc}") from exc


def _frame(first: int, body: bytes) -> bytes:
    return bytes((first,)) + encode_varint(len(body)) + body


def _no_properties_below_5(packet: Any, level: int) -> None:
    if level < 5 and packet.properties is not None:
        raise ValueError(f"{type(packet).__name__} properties need MQTT 5.0")


def _encode_connect(packet: Connect, level: int) -> bytes:
    if packet.protocol_level != level:
        raise ValueError(f"Connect.protocol_level {packet.protocol_level} differs from the level {level}")
    _no_properties_below_5(packet, level)
    will = packet.will
    flags = 0x02 if packet.clean_start else 0
    parts = [encode_string(packet.protocol_name), b""]  # parts[1]: level, flags, keep alive (below)
    if level == 5:
        parts.append(encode_properties(packet.properties, PacketType.CONNECT))
    parts.append(encode_string(packet.client_id))
    if will is not None:
        flags |= 0x04 | will.qos << 3 | (0x20 if will.retain else 0)
        if level == 5:
            parts.append(encode_properties(will.properties, WILL_PROPERTIES))
        elif will.properties is not None:
            raise ValueError("Will properties need MQTT 5.0")
        parts.append(encode_string(will.topic))
        parts.append(encode_binary(will.payload))
    if packet.username is not None:
        flags |= 0x80
        parts.append(encode_string(packet.username))
    if packet.password is not None:
        if packet.username is None and level < 5:
            raise ValueError("a password without a user name needs MQTT 5.0 [MQTT-3.1.2-22]")
        flags |= 0x40
        parts.append(encode_binary(packet.password))
    parts[1] = _CONNECT_HEADER.pack(level, flags, packet.keepalive)
    return _frame(0x10, b"".join(parts))


def _encode_connack(packet: ConnAck, level: int) -> bytes:
    _no_properties_below_5(packet, level)
    if level == ProtocolLevel.MQTT_3_1 and packet.session_present:
        raise ValueError("MQTT 3.1 CONNACK has no Session Present flag")
    head = bytes((1 if packet.session_present else 0, packet.reason_code))
    if level < 5:
        return b"\x20\x02" + head
    return _frame(0x20, head + encode_properties(packet.properties, PacketType.CONNACK))


def _encode_publish_packet(packet: Publish, level: int) -> bytes:
    _no_properties_below_5(packet, level)
    if packet.qos not in (0, 1, 2):
        raise ValueError(f"PUBLISH QoS {packet.qos}")
    if packet.qos and not packet.packet_id:
        raise ValueError("PUBLISH QoS > 0 needs a Packet Identifier [MQTT-2.2.1-3]")
    props = encode_properties(packet.properties, PacketType.PUBLISH) if level == 5 else b""
    return encode_publish(
        encode_string(packet.topic),
        packet.payload,
        packet.qos,
        packet.packet_id,
        packet.retain,
        packet.dup,
        props,
    )


def _ack_encoder(first: int, ptype: PacketType) -> Callable[[Any, int], bytes]:
    def encode_ack(packet: PubAck | PubRec | PubRel | PubComp, level: int) -> bytes:
        if packet.properties is None and not packet.reason_code:
            return _ACK_V3.pack(first, 2, packet.packet_id)
        if level < 5:
            raise ValueError(f"{ptype.name} reason code and properties need MQTT 5.0")
        body = _U16.pack(packet.packet_id) + bytes((packet.reason_code,))
        if packet.properties is not None:
            body += encode_properties(packet.properties, ptype)
        return _frame(first, body)

    return encode_ack


def _encode_subscribe(packet: Subscribe, level: int) -> bytes:
    _no_properties_below_5(packet, level)
    parts = [_U16.pack(packet.packet_id)]
    if level == 5:
        parts.append(encode_properties(packet.properties, PacketType.SUBSCRIBE))
    for topic_filter, opts in packet.subscriptions:
        options = opts.qos
        if level == 5:
            options |= (
                (0x04 if opts.no_local else 0)
                | (0x08 if opts.retain_as_published else 0)
                | opts.retain_handling << 4
            )
        elif opts.no_local or opts.retain_as_published or opts.retain_handling:
            raise ValueError("subscription options other than QoS need MQTT 5.0")
        parts.append(encode_string(topic_filter) + bytes((options,)))
    return _frame(0x82, b"".join(parts))


def _encode_suback(packet: SubAck, level: int) -> bytes:
    _no_properties_below_5(packet, level)
    props = encode_properties(packet.properties, PacketType.SUBACK) if level == 5 else b""
    return _frame(0x90, _U16.pack(packet.packet_id) + props + bytes(packet.reason_codes))


def _encode_unsubscribe(packet: Unsubscribe, level: int) -> bytes:
    _no_properties_below_5(packet, level)
    parts = [_U16.pack(packet.packet_id)]
    if level == 5:
        parts.append(encode_properties(packet.properties, PacketType.UNSUBSCRIBE))
    parts.extend(encode_string(topic_filter) for topic_filter in packet.topic_filters)
    return _frame(0xA2, b"".join(parts))


def _encode_unsuback(packet: UnsubAck, level: int) -> bytes:
    _no_properties_below_5(packet, level)
    if level < 5:
        if packet.reason_codes:
            raise ValueError("UNSUBACK reason codes need MQTT 5.0")
        return _ACK_V3.pack(0xB0, 2, packet.packet_id)
    props = encode_properties(packet.properties, PacketType.UNSUBACK)
    return _frame(0xB0, _U16.pack(packet.packet_id) + props + bytes(packet.reason_codes))


def _encode_pingreq(packet: PingReq, level: int) -> bytes:
    return b"\xc0\x00"


def _encode_pingresp(packet: PingResp, level: int) -> bytes:
    return b"\xd0\x00"


def _encode_disconnect(packet: Disconnect, level: int) -> bytes:
    if level < 5:
        if packet.reason_code or packet.properties is not None:
            raise ValueError("DISCONNECT reason code and properties need MQTT 5.0")
        return b"\xe0\x00"
    return _encode_reason_and_properties(0xE0, packet, PacketType.DISCONNECT)


def _encode_auth(packet: Auth, level: int) -> bytes:
    if level < 5:
        raise ValueError("AUTH needs MQTT 5.0")
    return _encode_reason_and_properties(0xF0, packet, PacketType.AUTH)


def _encode_reason_and_properties(first: int, packet: Disconnect | Auth, ptype: PacketType) -> bytes:
    # §3.14.2.1 / §3.15.2.1: the shortest form omits what is defaulted.
    if packet.properties is None:
        if not packet.reason_code:
            return bytes((first, 0))
        return bytes((first, 1, packet.reason_code))
    return _frame(first, bytes((packet.reason_code,)) + encode_properties(packet.properties, ptype))


_ENCODERS: Final[Mapping[type, Callable[[Any, int], bytes]]] = MappingProxyType(
    {
        Connect: _encode_connect,
        ConnAck: _encode_connack,
        Publish: _encode_publish_packet,
        PubAck: _ack_encoder(0x40, PacketType.PUBACK),
        PubRec: _ack_encoder(0x50, PacketType.PUBREC),
        PubRel: _ack_encoder(0x62, PacketType.PUBREL),
        PubComp: _ack_encoder(0x70, PacketType.PUBCOMP),
        Subscribe: _encode_subscribe,
        SubAck: _encode_suback,
        Unsubscribe: _encode_unsubscribe,
        UnsubAck: _encode_unsuback,
        PingReq: _encode_pingreq,
        PingResp: _encode_pingresp,
        Disconnect: _encode_disconnect,
        Auth: _encode_auth,
    }
)


# --- CONNACK refusals below 5.0 --------------------------------------------------------------------

# 5.0 reason codes that have a 3.1/3.1.1 CONNACK return code (3.1.1 Table 3.1).
_RETURN_CODE_V3: Final[Mapping[int, int]] = MappingProxyType(
    {
        ReasonCode.UNSUPPORTED_PROTOCOL_VERSION: ConnectReturnCode.UNACCEPTABLE_PROTOCOL_VERSION,
        ReasonCode.CLIENT_IDENTIFIER_NOT_VALID: ConnectReturnCode.IDENTIFIER_REJECTED,
        ReasonCode.SERVER_UNAVAILABLE: ConnectReturnCode.SERVER_UNAVAILABLE,
        ReasonCode.SERVER_BUSY: ConnectReturnCode.SERVER_UNAVAILABLE,
        ReasonCode.USE_ANOTHER_SERVER: ConnectReturnCode.SERVER_UNAVAILABLE,
        ReasonCode.SERVER_MOVED: ConnectReturnCode.SERVER_UNAVAILABLE,
        ReasonCode.CONNECTION_RATE_EXCEEDED: ConnectReturnCode.SERVER_UNAVAILABLE,
        ReasonCode.BAD_USER_NAME_OR_PASSWORD: ConnectReturnCode.BAD_USER_NAME_OR_PASSWORD,
        ReasonCode.NOT_AUTHORIZED: ConnectReturnCode.NOT_AUTHORIZED,
        ReasonCode.BANNED: ConnectReturnCode.NOT_AUTHORIZED,
        ReasonCode.BAD_AUTHENTICATION_METHOD: ConnectReturnCode.NOT_AUTHORIZED,
    }
)


def connect_return_code(reason_code: int) -> int | None:
    """The 3.1/3.1.1 CONNACK return code for a 5.0 CONNACK reason code, or None.

    None means no return code fits, and the Server MUST close without a CONNACK [MQTT-3.2.2-6]
    (e.g. Malformed Packet, Protocol Error).
    """
    if reason_code == ReasonCode.SUCCESS:
        return ConnectReturnCode.ACCEPTED
    return _RETURN_CODE_V3.get(reason_code)


# --- topic names and filters (§4.7, §4.8) ----------------------------------------------------------


def validate_topic_name(topic: str) -> None:
    """Raise MqttError(Topic Name invalid) unless `topic` is a valid Topic Name.

    Numbering: 3.1.1 [MQTT-4.7.1-1] is 5.0 [MQTT-4.7.0-1] (no wildcards in a Topic Name).
    """
    if not topic:
        raise MqttError(ReasonCode.TOPIC_NAME_INVALID, "Topic Name is empty [MQTT-4.7.3-1]")
    if "+" in topic or "#" in topic:
        raise MqttError(
            ReasonCode.TOPIC_NAME_INVALID,
            f"Topic Name {topic!r} contains a wildcard [MQTT-4.7.1-1] (3.1.1), [MQTT-4.7.0-1] (5.0)",
        )
    if "\x00" in topic:
        raise MqttError(ReasonCode.TOPIC_NAME_INVALID, "Topic Name contains U+0000 [MQTT-4.7.3-2]")
    if len(topic) > 0x3FFF and len(topic.encode()) > 0xFFFF:
        raise MqttError(ReasonCode.TOPIC_NAME_INVALID, "Topic Name longer than 65535 bytes [MQTT-4.7.3-3]")


def validate_topic_filter(topic_filter: str) -> None:
    """Raise MqttError(Topic Filter invalid) unless `topic_filter` is a valid Topic Filter.

    Accepts Shared Subscriptions (`$share/<group>/<filter>`, §4.8.2). Numbering: the 3.1.1 rules
    [MQTT-4.7.1-2] ("#" last, alone in its level) and [MQTT-4.7.1-3] ("+" alone in its level) are
    5.0's [MQTT-4.7.1-1] and [MQTT-4.7.1-2].
    """
    if not topic_filter:
        raise MqttError(ReasonCode.TOPIC_FILTER_INVALID, "Topic Filter is empty [MQTT-4.7.3-1]")
    if "\x00" in topic_filter:
        raise MqttError(ReasonCode.TOPIC_FILTER_INVALID, "Topic Filter contains U+0000 [MQTT-4.7.3-2]")
    if len(topic_filter) > 0x3FFF and len(topic_filter.encode()) > 0xFFFF:
        raise MqttError(
            ReasonCode.TOPIC_FILTER_INVALID, "Topic Filter longer than 65535 bytes [MQTT-4.7.3-3]"
        )
    _, inner = parse_shared(topic_filter)
    if "+" not in inner and "#" not in inner:
        return
    levels = inner.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != last):
            raise MqttError(
                ReasonCode.TOPIC_FILTER_INVALID,
                f"'#' must be the last level, alone [MQTT-4.7.1-2] (3.1.1), [MQTT-4.7.1-1] (5.0): {topic_filter!r}",
            )
        if "+" in level and level != "+":
            raise MqttError(
                ReasonCode.TOPIC_FILTER_INVALID,
                f"'+' must fill a whole level [MQTT-4.7.1-3] (3.1.1), [MQTT-4.7.1-2] (5.0): {topic_filter!r}",
            )


def parse_shared(topic_filter: str) -> tuple[str | None, str]:
    """Split `$share/<group>/<filter>` into (group, filter); a non-shared filter gives (None, filter).

    Raises MqttError(Topic Filter invalid) for a malformed Shared Subscription ([MQTT-4.8.2-1],
    [MQTT-4.8.2-2]). The inner filter is not validated here (validate_topic_filter does).
    """
    if not topic_filter.startswith("$share/"):
        return None, topic_filter
    group, slash, inner = topic_filter[7:].partition("/")
    if not group:
        raise MqttError(
            ReasonCode.TOPIC_FILTER_INVALID, "Shared Subscription with an empty ShareName [MQTT-4.8.2-1]"
        )
    if "+" in group or "#" in group:
        raise MqttError(
            ReasonCode.TOPIC_FILTER_INVALID, f"ShareName {group!r} contains a wildcard [MQTT-4.8.2-2]"
        )
    if not slash or not inner:
        raise MqttError(
            ReasonCode.TOPIC_FILTER_INVALID,
            "ShareName must be followed by '/' and a Topic Filter [MQTT-4.8.2-2]",
        )
    return group, inner
