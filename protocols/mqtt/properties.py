"""MQTT 5.0 property blocks and Variable Byte Integers: bytes <-> `Properties`.

Responsible for the property table of MQTT 5.0 §2.2.2.2 (Table 2-4): each identifier's type and the
packets it may appear in, the repeat rules (only User Property, and Subscription Identifier in a
PUBLISH, may appear more than once), the value ranges the spec calls Protocol Errors, and the
Variable Byte Integer encoding of §1.5.5 shared with the fixed header's Remaining Length.

Decoding reads from a bytes buffer between an offset and a limit; a read that runs off the end of the
buffer raises IndexError / struct.error / UnicodeDecodeError, which the parser (codec.py) reports as
Malformed Packet. Must not import: asyncio, any socket or transport code, broker, storage, cluster.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

from protocols.mqtt.packets import MqttError, PacketType, Properties, ReasonCode

#: The "packet kind" of the Will Properties block inside a CONNECT payload (§3.1.3.2). Packet types
#: are 1..15, so 0 (the reserved packet type) is free to name it in the allowed-kinds bit masks.
WILL_PROPERTIES: Final = 0

#: A property block with Property Length 0: what every 5.0 packet without properties carries [MQTT-2.2.2-1].
NO_PROPERTIES: Final = b"\x00"

#: Largest value of a Variable Byte Integer (§1.5.5): four bytes of seven bits.
VARINT_MAX: Final = 268_435_455

_MALFORMED: Final = ReasonCode.MALFORMED_PACKET
_PROTOCOL_ERROR: Final = ReasonCode.PROTOCOL_ERROR

_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")


class PropertyId(enum.IntEnum):
    """Property identifiers (5.0 Table 2-4)."""

    PAYLOAD_FORMAT_INDICATOR = 0x01
    MESSAGE_EXPIRY_INTERVAL = 0x02
    CONTENT_TYPE = 0x03
    RESPONSE_TOPIC = 0x08
    CORRELATION_DATA = 0x09
    SUBSCRIPTION_IDENTIFIER = 0x0B
    SESSION_EXPIRY_INTERVAL = 0x11
    ASSIGNED_CLIENT_IDENTIFIER = 0x12
    SERVER_KEEP_ALIVE = 0x13
    AUTHENTICATION_METHOD = 0x15
    AUTHENTICATION_DATA = 0x16
    REQUEST_PROBLEM_INFORMATION = 0x17
    WILL_DELAY_INTERVAL = 0x18
    REQUEST_RESPONSE_INFORMATION = 0x19
    RESPONSE_INFORMATION = 0x1A
    SERVER_REFERENCE = 0x1C
    REASON_STRING = 0x1F
    RECEIVE_MAXIMUM = 0x21
    TOPIC_ALIAS_MAXIMUM = 0x22
    TOPIC_ALIAS = 0x23
    MAXIMUM_QOS = 0x24
    RETAIN_AVAILABLE = 0x25
    USER_PROPERTY = 0x26
    MAXIMUM_PACKET_SIZE = 0x27
    WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
    SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
    SHARED_SUBSCRIPTION_AVAILABLE = 0x2A


class PropertyType(enum.IntEnum):
    """Data types of §1.5 used by properties."""

    BYTE = 0
    TWO_BYTE_INTEGER = 1
    FOUR_BYTE_INTEGER = 2
    VARIABLE_BYTE_INTEGER = 3
    UTF8_STRING = 4
    BINARY_DATA = 5
    UTF8_STRING_PAIR = 6


def _kinds(*kinds: int) -> int:
    mask = 0
    for kind in kinds:
        mask |= 1 << kind
    return mask


_P = PacketType
_T = PropertyType
_ACKS = (_P.PUBACK, _P.PUBREC, _P.PUBREL, _P.PUBCOMP)
_MESSAGE = (WILL_PROPERTIES, _P.PUBLISH)

#: Table 2-4: (identifier, Properties attribute, type, bit mask of the packet kinds allowing it).
PROPERTY_TABLE: Final[tuple[tuple[PropertyId, str, PropertyType, int], ...]] = (
    (PropertyId.PAYLOAD_FORMAT_INDICATOR, "payload_format_indicator", _T.BYTE, _kinds(*_MESSAGE)),
    (PropertyId.MESSAGE_EXPIRY_INTERVAL, "message_expiry_interval", _T.FOUR_BYTE_INTEGER, _kinds(*_MESSAGE)),
    (PropertyId.CONTENT_TYPE, "content_type", _T.UTF8_STRING, _kinds(*_MESSAGE)),
    (PropertyId.RESPONSE_TOPIC, "response_topic", _T.UTF8_STRING, _kinds(*_MESSAGE)),
    (PropertyId.CORRELATION_DATA, "correlation_data", _T.BINARY_DATA, _kinds(*_MESSAGE)),
    (
        PropertyId.SUBSCRIPTION_IDENTIFIER,
        "subscription_identifiers",
        _T.VARIABLE_BYTE_INTEGER,
        _kinds(_P.PUBLISH, _P.SUBSCRIBE),
    ),
    (
        PropertyId.SESSION_EXPIRY_INTERVAL,
        "session_expiry_interval",
        _T.FOUR_BYTE_INTEGER,
        _kinds(_P.CONNECT, _P.CONNACK, _P.DISCONNECT),
    ),
    (PropertyId.ASSIGNED_CLIENT_IDENTIFIER, "assigned_client_identifier", _T.UTF8_STRING, _kinds(_P.CONNACK)),
    (PropertyId.SERVER_KEEP_ALIVE, "server_keep_alive", _T.TWO_BYTE_INTEGER, _kinds(_P.CONNACK)),
    (
        PropertyId.AUTHENTICATION_METHOD,
        "authentication_method",
        _T.UTF8_STRING,
        _kinds(_P.CONNECT, _P.CONNACK, _P.AUTH),
    ),
    (
        PropertyId.AUTHENTICATION_DATA,
        "authentication_data",
        _T.BINARY_DATA,
        _kinds(_P.CONNECT, _P.CONNACK, _P.AUTH),
    ),
    (PropertyId.REQUEST_PROBLEM_INFORMATION, "request_problem_information", _T.BYTE, _kinds(_P.CONNECT)),
    (PropertyId.WILL_DELAY_INTERVAL, "will_delay_interval", _T.FOUR_BYTE_INTEGER, _kinds(WILL_PROPERTIES)),
    (PropertyId.REQUEST_RESPONSE_INFORMATION, "request_response_information", _T.BYTE, _kinds(_P.CONNECT)),
    (PropertyId.RESPONSE_INFORMATION, "response_information", _T.UTF8_STRING, _kinds(_P.CONNACK)),
    (PropertyId.SERVER_REFERENCE, "server_reference", _T.UTF8_STRING, _kinds(_P.CONNACK, _P.DISCONNECT)),
    (
        PropertyId.REASON_STRING,
        "reason_string",
        _T.UTF8_STRING,
        _kinds(_P.CONNACK, *_ACKS, _P.SUBACK, _P.UNSUBACK, _P.DISCONNECT, _P.AUTH),
    ),
    (PropertyId.RECEIVE_MAXIMUM, "receive_maximum", _T.TWO_BYTE_INTEGER, _kinds(_P.CONNECT, _P.CONNACK)),
    (
        PropertyId.TOPIC_ALIAS_MAXIMUM,
        "topic_alias_maximum",
        _T.TWO_BYTE_INTEGER,
        _kinds(_P.CONNECT, _P.CONNACK),
    ),
    (PropertyId.TOPIC_ALIAS, "topic_alias", _T.TWO_BYTE_INTEGER, _kinds(_P.PUBLISH)),
    (PropertyId.MAXIMUM_QOS, "maximum_qos", _T.BYTE, _kinds(_P.CONNACK)),
    (PropertyId.RETAIN_AVAILABLE, "retain_available", _T.BYTE, _kinds(_P.CONNACK)),
    (
        PropertyId.USER_PROPERTY,
        "user_properties",
        _T.UTF8_STRING_PAIR,
        _kinds(
            WILL_PROPERTIES,
            _P.CONNECT,
            _P.CONNACK,
            _P.PUBLISH,
            *_ACKS,
            _P.SUBSCRIBE,
            _P.SUBACK,
            _P.UNSUBSCRIBE,
            _P.UNSUBACK,
            _P.DISCONNECT,
            _P.AUTH,
        ),
    ),
    (
        PropertyId.MAXIMUM_PACKET_SIZE,
        "maximum_packet_size",
        _T.FOUR_BYTE_INTEGER,
        _kinds(_P.CONNECT, _P.CONNACK),
    ),
    (
        PropertyId.WILDCARD_SUBSCRIPTION_AVAILABLE,
        "wildcard_subscription_available",
        _T.BYTE,
        _kinds(_P.CONNACK),
    ),
    (
        PropertyId.SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        "subscription_identifier_available",
        _T.BYTE,
        _kinds(_P.CONNACK),
    ),
    (PropertyId.SHARED_SUBSCRIPTION_AVAILABLE, "shared_subscription_available", _T.BYTE, _kinds(_P.CONNACK)),
)

# Plain int copies of the PropertyType values: the decode loop compares them per property, and an enum
# member is an attribute lookup on every comparison.
_BYTE: Final = int(PropertyType.BYTE)
_TWO: Final = int(PropertyType.TWO_BYTE_INTEGER)
_FOUR: Final = int(PropertyType.FOUR_BYTE_INTEGER)
_UTF8: Final = int(PropertyType.UTF8_STRING)
_BINARY: Final = int(PropertyType.BINARY_DATA)
_PAIR: Final = int(PropertyType.UTF8_STRING_PAIR)
_PUBLISH: Final = int(PacketType.PUBLISH)

# Indexed by identifier byte: (attribute, type, allowed mask), or None for an unassigned identifier.
_BY_ID: Final[tuple[tuple[str, int, int] | None, ...]] = tuple(
    next(((name, int(ptype), mask) for pid, name, ptype, mask in PROPERTY_TABLE if pid == i), None)
    for i in range(256)
)

# Byte properties whose only legal values are 0 and 1; anything else is a Protocol Error
# (§3.1.2.11.6-7 Request Response/Problem Information, §3.2.2.3.4-5 Maximum QoS and Retain Available,
# §3.2.2.3.12-14 the three "... Available" flags, §3.3.2.3.2 Payload Format Indicator).
_ZERO_OR_ONE: Final = (
    PropertyId.PAYLOAD_FORMAT_INDICATOR,
    PropertyId.REQUEST_PROBLEM_INFORMATION,
    PropertyId.REQUEST_RESPONSE_INFORMATION,
    PropertyId.MAXIMUM_QOS,
    PropertyId.RETAIN_AVAILABLE,
    PropertyId.WILDCARD_SUBSCRIPTION_AVAILABLE,
    PropertyId.SUBSCRIPTION_IDENTIFIER_AVAILABLE,
    PropertyId.SHARED_SUBSCRIPTION_AVAILABLE,
)
# Integer properties for which 0 is a Protocol Error: Receive Maximum (§3.1.2.11.3), Maximum Packet
# Size (§3.1.2.11.4), Topic Alias [MQTT-3.3.2-8].
_NONZERO: Final = (PropertyId.RECEIVE_MAXIMUM, PropertyId.MAXIMUM_PACKET_SIZE, PropertyId.TOPIC_ALIAS)
_CHECKED_MASK: Final = _kinds(*_ZERO_OR_ONE, *_NONZERO, PropertyId.RESPONSE_TOPIC)


def decode_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a Variable Byte Integer at `pos`; return (value, offset after it).

    Raises MqttError(Malformed Packet) for a fifth byte or a non-minimal encoding [MQTT-1.5.5-1];
    IndexError when the buffer ends first.
    """
    value = 0
    shift = 0
    for i in range(4):
        byte = buf[pos + i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if byte == 0 and i:
                raise MqttError(_MALFORMED, "Variable Byte Integer not in its shortest form [MQTT-1.5.5-1]")
            return value, pos + i + 1
        shift += 7
    raise MqttError(_MALFORMED, "Variable Byte Integer longer than 4 bytes (§1.5.5)")


def encode_varint(value: int) -> bytes:
    """Encode a Variable Byte Integer in its shortest form (§1.5.5)."""
    if value < 0x80:
        if value < 0:
            raise ValueError(f"Variable Byte Integer cannot be negative: {value}")
        return bytes((value,))
    if value < 0x4000:
        return bytes((value & 0x7F | 0x80, value >> 7))
    if value < 0x200000:
        return bytes((value & 0x7F | 0x80, (value >> 7) & 0x7F | 0x80, value >> 14))
    if value <= VARINT_MAX:
        return bytes(
            (value & 0x7F | 0x80, (value >> 7) & 0x7F | 0x80, (value >> 14) & 0x7F | 0x80, value >> 21)
        )
    raise ValueError(f"Variable Byte Integer too large: {value} > {VARINT_MAX}")


def decode_string(buf: bytes, pos: int) -> tuple[str, int]:
    """Decode a UTF-8 Encoded String (§1.5.4) at `pos`; return (string, offset after it).

    Ill-formed UTF-8, including encoded surrogates U+D800..U+DFFF, raises UnicodeDecodeError (Malformed
    Packet, [MQTT-1.5.4-1]); U+0000 raises MqttError(Malformed Packet) [MQTT-1.5.4-2].
    """
    end = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
    if end > len(buf):
        raise MqttError(_MALFORMED, "UTF-8 string runs past the end of the packet")
    text = buf[pos + 2 : end].decode()
    if "\x00" in text:
        raise MqttError(_MALFORMED, "UTF-8 string contains U+0000 [MQTT-1.5.4-2]")
    return text, end


def decode_binary(buf: bytes, pos: int) -> tuple[bytes, int]:
    """Decode Binary Data (§1.5.6) at `pos`; return (data, offset after it)."""
    end = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
    if end > len(buf):
        raise MqttError(_MALFORMED, "binary data runs past the end of the packet")
    return buf[pos + 2 : end], end


def encode_string(text: str) -> bytes:
    """Encode a UTF-8 Encoded String with its Two Byte length prefix (§1.5.4)."""
    data = text.encode()
    if len(data) > 0xFFFF:
        raise ValueError(f"UTF-8 string longer than 65535 bytes: {len(data)}")
    return _U16.pack(len(data)) + data


def encode_binary(data: bytes) -> bytes:
    """Encode Binary Data with its Two Byte length prefix (§1.5.6)."""
    if len(data) > 0xFFFF:
        raise ValueError(f"binary data longer than 65535 bytes: {len(data)}")
    return _U16.pack(len(data)) + data


def decode_properties(buf: bytes, pos: int, limit: int, kind: int) -> tuple[Properties | None, int]:
    """Decode the property block (Property Length + properties) at `pos` for packet kind `kind`.

    `kind` is the PacketType, or WILL_PROPERTIES. `limit` is the end of the packet. Returns
    (None, offset) for an empty block. Raises MqttError: Malformed Packet for an unknown identifier or
    one not valid in this packet (§2.2.2.2), Protocol Error for a repeated property or a value the spec
    forbids.
    """
    length = buf[pos]
    if length < 0x80:
        if not length:
            return None, pos + 1
        pos += 1
    else:
        length, pos = decode_varint(buf, pos)
    end = pos + length
    if end > limit:
        raise MqttError(_MALFORMED, "Property Length runs past the end of the packet")
    props = Properties()
    kind_bit = 1 << kind
    seen = 0
    while pos < end:
        pid = buf[pos]
        spec = _BY_ID[pid]
        if spec is None:
            raise MqttError(_MALFORMED, f"unknown property identifier 0x{pid:02X} (§2.2.2.2)")
        name, ptype, allowed = spec
        if not allowed & kind_bit:
            where = "Will Properties" if kind == WILL_PROPERTIES else PacketType(kind).name
            raise MqttError(_MALFORMED, f"property {PropertyId(pid).name} is not valid in {where} (§2.2.2.2)")
        pos += 1
        value: int | str | bytes
        if ptype == _UTF8:
            end_value = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
            value = buf[pos + 2 : end_value].decode()
            pos = end_value
            if "\x00" in value:
                raise MqttError(_MALFORMED, "UTF-8 string contains U+0000 [MQTT-1.5.4-2]")
        elif ptype == _PAIR:
            end_value = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
            key = buf[pos + 2 : end_value].decode()
            pos = end_value + 2 + ((buf[end_value] << 8) | buf[end_value + 1])
            text = buf[end_value + 2 : pos].decode()
            if "\x00" in key or "\x00" in text:
                raise MqttError(_MALFORMED, "User Property contains U+0000 [MQTT-1.5.4-2]")
            # The one property that repeats everywhere; order and repeated names are kept [MQTT-3.3.2-18].
            props.user_properties.append((key, text))
            continue
        elif ptype == _FOUR:
            value = _U32.unpack_from(buf, pos)[0]
            pos += 4
        elif ptype == _TWO:
            value = (buf[pos] << 8) | buf[pos + 1]
            pos += 2
        elif ptype == _BYTE:
            value = buf[pos]
            pos += 1
        elif ptype == _BINARY:
            end_value = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
            value = buf[pos + 2 : end_value]
            pos = end_value
        else:  # Subscription Identifier, the only Variable Byte Integer property
            ident, pos = decode_varint(buf, pos)
            if not ident:
                raise MqttError(_PROTOCOL_ERROR, "Subscription Identifier 0 (§3.8.2.1.2)")
            # Several are legitimate only in a PUBLISH from the Server [MQTT-3.3.4-4]; in a SUBSCRIBE
            # "it is a Protocol Error to include the Subscription Identifier more than once" (§3.8.2.1.2).
            if kind != _PUBLISH and props.subscription_identifiers:
                raise MqttError(_PROTOCOL_ERROR, "Subscription Identifier included more than once")
            props.subscription_identifiers.append(ident)
            continue
        bit = 1 << pid
        if seen & bit:
            raise MqttError(_PROTOCOL_ERROR, f"property {PropertyId(pid).name} included more than once")
        seen |= bit
        setattr(props, name, value)
    if pos != end:
        raise MqttError(_MALFORMED, "property runs past the Property Length")
    if seen & _CHECKED_MASK:
        _check_values(props, seen)
    return props, pos


def _check_values(props: Properties, seen: int) -> None:
    for pid in _ZERO_OR_ONE:
        if seen >> pid & 1 and getattr(props, _attr(pid)) not in (0, 1):
            raise MqttError(_PROTOCOL_ERROR, f"property {pid.name} must be 0 or 1")
    for pid in _NONZERO:
        if seen >> pid & 1 and not getattr(props, _attr(pid)):
            raise MqttError(_PROTOCOL_ERROR, f"property {pid.name} must not be 0")
    topic = props.response_topic
    if topic is not None and ("+" in topic or "#" in topic):
        raise MqttError(_PROTOCOL_ERROR, "Response Topic contains a wildcard [MQTT-3.3.2-14]")


def _attr(pid: int) -> str:
    spec = _BY_ID[pid]
    assert spec is not None
    return spec[0]


def encode_properties(props: Properties | None, kind: int) -> bytes:
    """Encode a property block (Property Length + properties) for packet kind `kind`.

    Raises ValueError when a property is not valid in that packet (our misuse, not the peer's).
    """
    if props is None:
        return NO_PROPERTIES
    kind_bit = 1 << kind
    parts: list[bytes] = []
    for pid, name, ptype, allowed in PROPERTY_TABLE:
        value = getattr(props, name)
        if value is None or value == []:
            continue
        if not allowed & kind_bit:
            where = "Will Properties" if kind == WILL_PROPERTIES else PacketType(kind).name
            raise ValueError(f"property {pid.name} is not valid in {where}")
        if ptype == _T.UTF8_STRING_PAIR:
            parts.extend(b"\x26" + encode_string(key) + encode_string(text) for key, text in value)
        elif ptype == _T.VARIABLE_BYTE_INTEGER:
            if len(value) > 1 and kind != PacketType.PUBLISH:
                raise ValueError("several Subscription Identifiers are valid only in a PUBLISH")
            parts.extend(b"\x0b" + encode_varint(ident) for ident in value)
        elif ptype == _T.UTF8_STRING:
            parts.append(bytes((pid,)) + encode_string(value))
        elif ptype == _T.BINARY_DATA:
            parts.append(bytes((pid,)) + encode_binary(value))
        elif ptype == _T.BYTE:
            parts.append(bytes((pid, value)))
        elif ptype == _T.TWO_BYTE_INTEGER:
            parts.append(bytes((pid,)) + _U16.pack(value))
        else:
            parts.append(bytes((pid,)) + _U32.pack(value))
    body = b"".join(parts)
    return encode_varint(len(body)) + body
