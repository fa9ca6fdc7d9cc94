"""MQTT 3.1 / 3.1.1 / 5.0 wire objects: packet classes, properties, reason codes, the codec error.

Responsible for the plain data the codec produces and consumes, named after the specifications
(OASIS MQTT 3.1.1 §3, MQTT 5.0 §3 and Table 2-4): one slots dataclass per Control Packet type,
`Properties` with one field per MQTT 5 property, `ReasonCode` (5.0 Table 2-6) and `MqttError`.
Nothing here parses or encodes bytes; that is protocols/mqtt/codec.py and properties.py.

Must not import: asyncio, any socket or transport code, broker, storage, cluster, other protocols.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TypeAlias


class ProtocolLevel(enum.IntEnum):
    """The CONNECT Protocol Level byte (3.1.1 §3.1.2.2, 5.0 §3.1.2.2) and the name that goes with it."""

    MQTT_3_1 = 3  # protocol name "MQIsdp"
    MQTT_3_1_1 = 4  # protocol name "MQTT"
    MQTT_5 = 5  # protocol name "MQTT"


class PacketType(enum.IntEnum):
    """MQTT Control Packet type, bits 7-4 of the fixed header (5.0 Table 2-1)."""

    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15


class ReasonCode(enum.IntEnum):
    """MQTT 5.0 Reason Codes (Table 2-6). Several names share a value, as in the spec."""

    SUCCESS = 0x00
    NORMAL_DISCONNECTION = 0x00
    GRANTED_QOS_0 = 0x00
    GRANTED_QOS_1 = 0x01
    GRANTED_QOS_2 = 0x02
    DISCONNECT_WITH_WILL_MESSAGE = 0x04
    NO_MATCHING_SUBSCRIBERS = 0x10
    NO_SUBSCRIPTION_EXISTED = 0x11
    CONTINUE_AUTHENTICATION = 0x18
    RE_AUTHENTICATE = 0x19
    UNSPECIFIED_ERROR = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83
    UNSUPPORTED_PROTOCOL_VERSION = 0x84
    CLIENT_IDENTIFIER_NOT_VALID = 0x85
    BAD_USER_NAME_OR_PASSWORD = 0x86
    NOT_AUTHORIZED = 0x87
    SERVER_UNAVAILABLE = 0x88
    SERVER_BUSY = 0x89
    BANNED = 0x8A
    SERVER_SHUTTING_DOWN = 0x8B
    BAD_AUTHENTICATION_METHOD = 0x8C
    KEEP_ALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_FILTER_INVALID = 0x8F
    TOPIC_NAME_INVALID = 0x90
    PACKET_IDENTIFIER_IN_USE = 0x91
    PACKET_IDENTIFIER_NOT_FOUND = 0x92
    RECEIVE_MAXIMUM_EXCEEDED = 0x93
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    MESSAGE_RATE_TOO_HIGH = 0x96
    QUOTA_EXCEEDED = 0x97
    ADMINISTRATIVE_ACTION = 0x98
    PAYLOAD_FORMAT_INVALID = 0x99
    RETAIN_NOT_SUPPORTED = 0x9A
    QOS_NOT_SUPPORTED = 0x9B
    USE_ANOTHER_SERVER = 0x9C
    SERVER_MOVED = 0x9D
    SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
    CONNECTION_RATE_EXCEEDED = 0x9F
    MAXIMUM_CONNECT_TIME = 0xA0
    SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
    WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2


class ConnectReturnCode(enum.IntEnum):
    """MQTT 3.1 / 3.1.1 CONNACK return codes (3.1.1 Table 3.1)."""

    ACCEPTED = 0
    UNACCEPTABLE_PROTOCOL_VERSION = 1
    IDENTIFIER_REJECTED = 2
    SERVER_UNAVAILABLE = 3
    BAD_USER_NAME_OR_PASSWORD = 4
    NOT_AUTHORIZED = 5


class MqttError(Exception):
    """The peer broke the protocol. `reason_code` is the 5.0 Reason Code the connection ends with.

    The session turns it into DISCONNECT(reason_code) for 5.0, a plain close for 3.1/3.1.1, or, while
    the CONNECT is being decoded, a CONNACK refusal (see `connect_return_code` for 3.1/3.1.1).
    Misuse of the encoding API by our own code raises ValueError instead (h11's two error kinds).
    """

    def __init__(self, reason_code: int, message: str) -> None:
        super().__init__(f"{message} (reason code 0x{reason_code:02X})")
        self.reason_code = reason_code
        self.message = message


@dataclass(slots=True, repr=False)
class Properties:
    """MQTT 5.0 properties (§2.2.2.2, Table 2-4), one field per property identifier.

    A field is None when the property is absent. The two properties that may repeat are lists:
    User Property (0x26, ordered name/value pairs, names may repeat, [MQTT-3.3.2-18]) and
    Subscription Identifier (0x0B, several only in a PUBLISH from the Server, [MQTT-3.3.4-4]).
    Byte-valued flags (Retain Available, ...) stay ints so that any received value round-trips.
    """

    payload_format_indicator: int | None = None  # 0x01 Byte
    message_expiry_interval: int | None = None  # 0x02 Four Byte Integer
    content_type: str | None = None  # 0x03 UTF-8 String
    response_topic: str | None = None  # 0x08 UTF-8 String
    correlation_data: bytes | None = None  # 0x09 Binary Data
    subscription_identifiers: list[int] = field(default_factory=list)  # 0x0B Variable Byte Integer
    session_expiry_interval: int | None = None  # 0x11 Four Byte Integer
    assigned_client_identifier: str | None = None  # 0x12 UTF-8 String
    server_keep_alive: int | None = None  # 0x13 Two Byte Integer
    authentication_method: str | None = None  # 0x15 UTF-8 String
    authentication_data: bytes | None = None  # 0x16 Binary Data
    request_problem_information: int | None = None  # 0x17 Byte
    will_delay_interval: int | None = None  # 0x18 Four Byte Integer
    request_response_information: int | None = None  # 0x19 Byte
    response_information: str | None = None  # 0x1A UTF-8 String
    server_reference: str | None = None  # 0x1C UTF-8 String
    reason_string: str | None = None  # 0x1F UTF-8 String
    receive_maximum: int | None = None  # 0x21 Two Byte Integer
    topic_alias_maximum: int | None = None  # 0x22 Two Byte Integer
    topic_alias: int | None = None  # 0x23 Two Byte Integer
    maximum_qos: int | None = None  # 0x24 Byte
    retain_available: int | None = None  # 0x25 Byte
    user_properties: list[tuple[str, str]] = field(default_factory=list)  # 0x26 UTF-8 String Pair
    maximum_packet_size: int | None = None  # 0x27 Four Byte Integer
    wildcard_subscription_available: int | None = None  # 0x28 Byte
    subscription_identifier_available: int | None = None  # 0x29 Byte
    shared_subscription_available: int | None = None  # 0x2A Byte

    def __repr__(self) -> str:
        # Only the properties present: 27 fields of None would drown a log line.
        present = (f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"Properties({', '.join(item for item in present if not item.endswith(('=None', '=[]')))})"


# Packets carry `properties: Properties | None`: None means "no properties" (always so before 5.0),
# which keeps the PUBLISH hot path free of an empty Properties object per message.


@dataclass(slots=True)
class Will:
    """The Will Message of a CONNECT (3.1.1 §3.1.2.5, 5.0 §3.1.3.2-3.1.3.4)."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties | None = None


@dataclass(slots=True)
class Connect:
    """CONNECT (§3.1). `clean_start` is 3.1.1's Clean Session flag; `password` is bytes in every version."""

    client_id: str
    protocol_level: int = ProtocolLevel.MQTT_3_1_1
    clean_start: bool = True
    keepalive: int = 0
    will: Will | None = None
    username: str | None = None
    password: bytes | None = None
    properties: Properties | None = None

    @property
    def protocol_name(self) -> str:
        """The CONNECT Protocol Name: "MQIsdp" for 3.1, "MQTT" for 3.1.1 and 5.0."""
        return "MQIsdp" if self.protocol_level == ProtocolLevel.MQTT_3_1 else "MQTT"


@dataclass(slots=True)
class ConnAck:
    """CONNACK (§3.2). `reason_code` is the 3.1/3.1.1 return code (ConnectReturnCode) below 5.0."""

    session_present: bool = False
    reason_code: int = 0
    properties: Properties | None = None


@dataclass(slots=True)
class Publish:
    """PUBLISH (§3.3). `packet_id` is 0 for QoS 0 (a QoS 0 PUBLISH has none, [MQTT-2.2.1-2])."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int = 0
    properties: Properties | None = None


@dataclass(slots=True)
class PubAck:
    """PUBACK (§3.4)."""

    packet_id: int
    reason_code: int = 0
    properties: Properties | None = None


@dataclass(slots=True)
class PubRec:
    """PUBREC (§3.5)."""

    packet_id: int
    reason_code: int = 0
    properties: Properties | None = None


@dataclass(slots=True)
class PubRel:
    """PUBREL (§3.6)."""

    packet_id: int
    reason_code: int = 0
    properties: Properties | None = None


@dataclass(slots=True)
class PubComp:
    """PUBCOMP (§3.7)."""

    packet_id: int
    reason_code: int = 0
    properties: Properties | None = None


@dataclass(frozen=True, slots=True)
class SubscriptionOptions:
    """The Subscription Options byte of a SUBSCRIBE (5.0 §3.8.3.1); below 5.0 only `qos` exists."""

    qos: int = 0
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


@dataclass(slots=True)
class Subscribe:
    """SUBSCRIBE (§3.8): (Topic Filter, options) pairs; the Subscription Identifier is in `properties`."""

    packet_id: int
    subscriptions: list[tuple[str, SubscriptionOptions]]
    properties: Properties | None = None


@dataclass(slots=True)
class SubAck:
    """SUBACK (§3.9): one reason code (3.1.1: return code) per requested filter, in order."""

    packet_id: int
    reason_codes: list[int]
    properties: Properties | None = None


@dataclass(slots=True)
class Unsubscribe:
    """UNSUBSCRIBE (§3.10)."""

    packet_id: int
    topic_filters: list[str]
    properties: Properties | None = None


@dataclass(slots=True)
class UnsubAck:
    """UNSUBACK (§3.11). `reason_codes` exists only in 5.0; it is empty below."""

    packet_id: int
    reason_codes: list[int] = field(default_factory=list)
    properties: Properties | None = None


@dataclass(slots=True)
class PingReq:
    """PINGREQ (§3.12)."""


@dataclass(slots=True)
class PingResp:
    """PINGRESP (§3.13)."""


@dataclass(slots=True)
class Disconnect:
    """DISCONNECT (§3.14). Reason code and properties exist only in 5.0."""

    reason_code: int = 0
    properties: Properties | None = None


@dataclass(slots=True)
class Auth:
    """AUTH (5.0 §3.15)."""

    reason_code: int = 0
    properties: Properties | None = None


Packet: TypeAlias = (
    Connect
    | ConnAck
    | Publish
    | PubAck
    | PubRec
    | PubRel
    | PubComp
    | Subscribe
    | SubAck
    | Unsubscribe
    | UnsubAck
    | PingReq
    | PingResp
    | Disconnect
    | Auth
)
