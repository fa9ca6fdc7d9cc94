"""Tests of the MQTT 3.1 / 3.1.1 / 5.0 codec (protocols/mqtt/codec.py, packets.py, properties.py).

Byte vectors for every packet type and version, each fed whole, one byte at a time and followed by
trailing bytes, and checked against the canonical encoding; hypothesis round-trips (encode -> decode
under arbitrary chunking) for every packet type with every property; malformed input raising MqttError
with the reason code the spec names. Test names cite normative statements; where 3.1.1 and 5.0 number
a rule differently, the name uses the 3.1.1 number and the docstring gives both.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.mqtt.codec import (
    MAX_PACKET_SIZE,
    NEED_DATA,
    NO_PROPERTIES,
    MqttParser,
    connect_return_code,
    encode,
    encode_properties,
    encode_publish,
    encode_string,
    parse_shared,
    validate_topic_filter,
    validate_topic_name,
)
from protocols.mqtt.packets import (
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    MqttError,
    Packet,
    PacketType,
    PingReq,
    PingResp,
    Properties,
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
from protocols.mqtt.properties import PROPERTY_TABLE, VARINT_MAX, WILL_PROPERTIES, PropertyId, PropertyType

MALFORMED = ReasonCode.MALFORMED_PACKET
PROTOCOL_ERROR = ReasonCode.PROTOCOL_ERROR


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def drain(parser: MqttParser) -> list[Packet]:
    packets: list[Packet] = []
    while (packet := parser.next_packet()) is not NEED_DATA:
        packets.append(packet)
    return packets


def decode_chunks(parser: MqttParser, chunks: list[bytes]) -> list[Packet]:
    packets: list[Packet] = []
    for chunk in chunks:
        parser.feed(chunk)
        packets.extend(drain(parser))
    return packets


def make_parser(level: int, side: str) -> MqttParser:
    """A parser past the CONNECT: `side` is who decodes ("server" reads client->server packets)."""
    if side == "server":
        return MqttParser(protocol_level=level)
    return MqttParser(server_side=False, protocol_level=level)


def decode_error(parser: MqttParser, data: bytes) -> MqttError:
    parser.feed(data)
    with pytest.raises(MqttError) as info:
        drain(parser)
    return info.value


# --- byte vectors ----------------------------------------------------------------------------------

# (id, protocol level, decoding side, wire bytes, packet). "server" decodes client->server packets,
# "client" server->client ones; "both" packets flow either way. Every vector is also the canonical
# encoding: encode(packet, level) must give the same bytes.
VECTORS: list[tuple[str, int, str, bytes, Packet]] = [
    (
        "connect-3.1",
        3,
        "server",
        h("10 10 0006 4d5149736470 03 02 000a 0002 6331"),
        Connect("c1", 3, clean_start=True, keepalive=10),
    ),
    (
        "connect-3.1.1-minimal",
        4,
        "server",
        h("10 0c 0004 4d515454 04 02 003c 0000"),
        Connect("", 4, clean_start=True, keepalive=60),
    ),
    (
        "connect-3.1.1-will-user-password",
        4,
        "server",
        h("10 23 0004 4d515454 04 ee 003c 0003 636964 0003 772f74 0003 627965 0004 75736572 0002 7077"),
        Connect("cid", 4, True, 60, Will("w/t", b"bye", 1, True), "user", b"pw"),
    ),
    (
        "connect-5.0-properties-will-properties",
        5,
        "server",
        h(
            "10 30 0004 4d515454 05 86 001e"
            " 0f 11 00000078 21 0014 26 0001 6b 0001 76"  # Session Expiry 120, Receive Maximum 20, k=v
            " 0001 63"  # client id "c"
            " 09 03 0001 74 18 00000005"  # Will: Content Type "t", Will Delay 5
            " 0001 77 0001 78 0001 75"  # Will Topic "w", Will Payload "x", User Name "u"
        ),
        Connect(
            "c",
            5,
            True,
            30,
            Will("w", b"x", properties=Properties(content_type="t", will_delay_interval=5)),
            "u",
            properties=Properties(
                session_expiry_interval=120, receive_maximum=20, user_properties=[("k", "v")]
            ),
        ),
    ),
    (
        "connect-5.0-password-without-username",
        5,
        "server",
        h("10 11 0004 4d515454 05 40 0000 00 0000 0002 7077"),
        Connect("", 5, clean_start=False, password=b"pw"),
    ),
    ("connack-3.1", 3, "client", h("20 02 00 05"), ConnAck(False, 5)),
    ("connack-3.1.1-session-present", 4, "client", h("20 02 01 00"), ConnAck(True, 0)),
    (
        "connack-5.0-properties",
        5,
        "client",
        h("20 0f 00 00 0c 12 0002 6964 22 000a 24 01 25 00"),
        ConnAck(
            False,
            0,
            Properties(
                assigned_client_identifier="id", topic_alias_maximum=10, maximum_qos=1, retain_available=0
            ),
        ),
    ),
    ("connack-5.0-refused", 5, "client", h("20 03 00 87 00"), ConnAck(False, 0x87)),
    ("publish-3.1.1-qos0", 4, "both", h("30 0a 0003 612f62 68656c6c6f"), Publish("a/b", b"hello")),
    ("publish-3.1-qos0-empty-payload", 3, "both", h("30 05 0003 612f62"), Publish("a/b", b"")),
    (
        "publish-3.1.1-qos1-dup-retain",
        4,
        "both",
        h("3b 0c 0003 612f62 0007 68656c6c6f"),
        Publish("a/b", b"hello", 1, retain=True, dup=True, packet_id=7),
    ),
    (
        "publish-3.1.1-qos2",
        4,
        "both",
        h("34 0c 0003 612f62 ffff 68656c6c6f"),
        Publish("a/b", b"hello", 2, packet_id=0xFFFF),
    ),
    ("publish-5.0-qos0-no-properties", 5, "both", h("30 06 0003 612f62 00"), Publish("a/b", b"")),
    (
        "publish-5.0-qos1-properties",
        5,
        "both",
        h(
            "32 34 0003 612f62 0001 2a"
            " 01 01 02 0000003c 03 0004 74657874 08 0003 722f74 09 0002 abcd 23 0005"
            " 26 0001 61 0001 62 26 0001 61 0001 63"  # the same user property name twice, in order
            " 6869"
        ),
        Publish(
            "a/b",
            b"hi",
            1,
            packet_id=1,
            properties=Properties(
                payload_format_indicator=1,
                message_expiry_interval=60,
                content_type="text",
                response_topic="r/t",
                correlation_data=b"\xab\xcd",
                topic_alias=5,
                user_properties=[("a", "b"), ("a", "c")],
            ),
        ),
    ),
    (
        "publish-5.0-topic-alias-only",
        5,
        "both",
        h("30 07 0000 03 23 0002 78"),
        Publish("", b"x", properties=Properties(topic_alias=2)),
    ),
    (
        "publish-5.0-subscription-identifiers-from-server",
        5,
        "client",
        h("30 0c 0003 612f62 05 0b 01 0b 8001 78"),
        Publish("a/b", b"x", properties=Properties(subscription_identifiers=[1, 128])),
    ),
    ("puback-3.1.1", 4, "both", h("40 02 0007"), PubAck(7)),
    ("puback-5.0-success-short-form", 5, "both", h("40 02 0007"), PubAck(7)),
    ("puback-5.0-reason", 5, "both", h("40 03 0007 10"), PubAck(7, 0x10)),
    (
        "puback-5.0-reason-string",
        5,
        "both",
        h("40 0a 0007 87 06 1f 0003 626164"),
        PubAck(7, 0x87, Properties(reason_string="bad")),
    ),
    ("pubrec-3.1", 3, "both", h("50 02 0001"), PubRec(1)),
    ("pubrec-5.0-reason", 5, "both", h("50 03 0001 91"), PubRec(1, 0x91)),
    ("pubrel-3.1.1", 4, "both", h("62 02 0001"), PubRel(1)),
    ("pubrel-5.0-not-found", 5, "both", h("62 03 0001 92"), PubRel(1, 0x92)),
    ("pubcomp-3.1.1", 4, "both", h("70 02 0001"), PubComp(1)),
    (
        "pubcomp-5.0-user-property",
        5,
        "both",
        h("70 0b 0001 00 07 26 0001 6b 0001 76"),
        PubComp(1, 0, Properties(user_properties=[("k", "v")])),
    ),
    (
        "subscribe-3.1.1",
        4,
        "server",
        h("82 0c 000a 0003 612f62 01 0001 23 02"),
        Subscribe(10, [("a/b", SubscriptionOptions(1)), ("#", SubscriptionOptions(2))]),
    ),
    (
        "subscribe-3.1",
        3,
        "server",
        h("82 08 0001 0003 612f62 00"),
        Subscribe(1, [("a/b", SubscriptionOptions(0))]),
    ),
    (
        "subscribe-5.0-options-identifier",
        5,
        "server",
        h("82 1f 000a 09 0b 2a 26 0001 6b 0001 76 0003 612f2b 2d 000a 247368617265 2f672f78 00"),
        Subscribe(
            10,
            [
                ("a/+", SubscriptionOptions(1, no_local=True, retain_as_published=True, retain_handling=2)),
                ("$share/g/x", SubscriptionOptions(0)),
            ],
            Properties(subscription_identifiers=[42], user_properties=[("k", "v")]),
        ),
    ),
    ("suback-3.1.1", 4, "client", h("90 05 000a 01 02 80"), SubAck(10, [1, 2, 0x80])),
    ("suback-3.1", 3, "client", h("90 04 000a 00 01"), SubAck(10, [0, 1])),
    (
        "suback-5.0",
        5,
        "client",
        h("90 0b 000a 05 1f 0002 6f6b 01 8f a2"),
        SubAck(10, [1, 0x8F, 0xA2], Properties(reason_string="ok")),
    ),
    ("unsubscribe-3.1.1", 4, "server", h("a2 0a 000b 0003 612f62 0001 23"), Unsubscribe(11, ["a/b", "#"])),
    ("unsubscribe-5.0", 5, "server", h("a2 08 000b 00 0003 612f62"), Unsubscribe(11, ["a/b"])),
    ("unsuback-3.1.1", 4, "client", h("b0 02 000b"), UnsubAck(11)),
    ("unsuback-5.0", 5, "client", h("b0 05 000b 00 00 11"), UnsubAck(11, [0x00, 0x11])),
    ("pingreq-3.1.1", 4, "server", h("c0 00"), PingReq()),
    ("pingreq-5.0", 5, "server", h("c0 00"), PingReq()),
    ("pingresp-3.1", 3, "client", h("d0 00"), PingResp()),
    ("pingresp-5.0", 5, "client", h("d0 00"), PingResp()),
    ("disconnect-3.1.1", 4, "server", h("e0 00"), Disconnect()),
    ("disconnect-5.0-normal", 5, "both", h("e0 00"), Disconnect()),
    ("disconnect-5.0-with-will", 5, "server", h("e0 01 04"), Disconnect(0x04)),
    (
        "disconnect-5.0-client-properties",
        5,
        "server",
        h("e0 0d 00 0b 11 0000000a 1f 0003 627965"),
        Disconnect(0, Properties(session_expiry_interval=10, reason_string="bye")),
    ),
    (
        "disconnect-5.0-server-moved",
        5,
        "client",
        h("e0 09 9d 07 1c 0004 686f7374"),
        Disconnect(0x9D, Properties(server_reference="host")),
    ),
    ("auth-5.0-success-short-form", 5, "both", h("f0 00"), Auth()),
    (
        "auth-5.0-continue",
        5,
        "both",
        h("f0 10 18 0e 15 0005 534352414d 16 0003 010203"),
        Auth(0x18, Properties(authentication_method="SCRAM", authentication_data=b"\x01\x02\x03")),
    ),
]


def vector_cases() -> list[tuple[str, int, str, bytes, Packet]]:
    cases: list[tuple[str, int, str, bytes, Packet]] = []
    for name, level, side, wire, packet in VECTORS:
        sides = ("server", "client") if side == "both" else (side,)
        cases.extend((f"{name}-{s}", level, s, wire, packet) for s in sides)
    return cases


def vector_parser(level: int, side: str, packet: Packet) -> MqttParser:
    return MqttParser() if isinstance(packet, Connect) else make_parser(level, side)


# A trailing partial packet: the first byte of the next PINGREQ (to a server) or PINGRESP (to a client).
TRAILER = {"server": (b"\xc0", b"\x00", PingReq()), "client": (b"\xd0", b"\x00", PingResp())}


@pytest.mark.parametrize(("name", "level", "side", "wire", "packet"), vector_cases(), ids=lambda v: v)
class TestByteVectors:
    def test_fed_whole(self, name: str, level: int, side: str, wire: bytes, packet: Packet) -> None:
        assert decode_chunks(vector_parser(level, side, packet), [wire]) == [packet]

    def test_fed_one_byte_at_a_time(
        self, name: str, level: int, side: str, wire: bytes, packet: Packet
    ) -> None:
        parser = vector_parser(level, side, packet)
        chunks = [wire[i : i + 1] for i in range(len(wire))]
        assert decode_chunks(parser, chunks) == [packet]

    def test_with_trailing_bytes(self, name: str, level: int, side: str, wire: bytes, packet: Packet) -> None:
        start, rest, following = TRAILER[side]
        parser = vector_parser(level, side, packet)
        assert decode_chunks(parser, [wire + start]) == [packet]
        assert parser.next_packet() is NEED_DATA
        assert decode_chunks(parser, [rest]) == [following]

    def test_is_the_canonical_encoding(
        self, name: str, level: int, side: str, wire: bytes, packet: Packet
    ) -> None:
        assert encode(packet, level) == wire


def test_connect_sets_the_protocol_level_for_what_follows() -> None:
    parser = MqttParser()
    assert parser.protocol_level is None
    parser.feed(h("10 0c 0004 4d515454 04 02 003c 0000") + h("32 0c 0003 612f62 0007 68656c6c6f"))
    assert isinstance(parser.next_packet(), Connect)
    assert parser.protocol_level == 4
    # The same bytes are a QoS 1 PUBLISH with no property block at level 4.
    assert parser.next_packet() == Publish("a/b", b"hello", 1, packet_id=7)


def test_protocol_name_follows_the_level() -> None:
    assert Connect("c", 3).protocol_name == "MQIsdp"
    assert Connect("c", 4).protocol_name == "MQTT"
    assert Connect("c", 5).protocol_name == "MQTT"


@pytest.mark.parametrize(
    ("wire", "packet"),
    [
        # 5.0 explicit defaults decode to the same packet as the canonical short form.
        (h("40 04 0007 00 00"), PubAck(7)),  # reason code 0 and an empty property block
        (h("e0 02 00 00"), Disconnect()),
        (h("f0 01 00"), Auth()),
    ],
)
def test_non_canonical_5_0_forms_decode(wire: bytes, packet: Packet) -> None:
    assert decode_chunks(make_parser(5, "client"), [wire]) == [packet]


def test_5_0_unsuback_without_reason_codes_is_protocol_error() -> None:
    assert decode_error(make_parser(5, "client"), h("b0 03 000b 00")).reason_code == PROTOCOL_ERROR


@pytest.mark.parametrize("size", [0, 121, 122, 200, 16_375, 16_376, 20_000, 2_097_200])
def test_multi_byte_remaining_length_round_trip(size: int) -> None:
    # Sizes straddle the 1/2, 2/3 and 3/4 byte Remaining Length boundaries (§1.5.5 Table 1-1).
    packet = Publish("a/b", bytes(range(256)) * (size // 256) + bytes(size % 256), 1, packet_id=3)
    wire = encode(packet, 4)
    assert decode_chunks(make_parser(4, "server"), [wire]) == [packet]
    chunks = [wire[i : i + 1000] for i in range(0, len(wire), 1000)]
    assert decode_chunks(make_parser(4, "server"), chunks) == [packet]


def test_large_packet_in_small_reads_is_reassembled() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    wire = encode(Publish("t", payload), 4) * 2
    parser = make_parser(4, "server")
    packets = decode_chunks(parser, [wire[i : i + 1500] for i in range(0, len(wire), 1500)])
    assert packets == [Publish("t", payload), Publish("t", payload)]


def test_a_large_packet_is_joined_once_when_all_of_it_has_arrived() -> None:
    """White-box: reads of an incomplete packet are kept apart, not re-copied on every read."""
    wire = encode(Publish("t", bytes(100_000)), 4)
    chunks = [wire[i : i + 1000] for i in range(0, len(wire), 1000)]
    parser = make_parser(4, "server")
    parser.feed(chunks[0])
    assert parser.next_packet() is NEED_DATA
    first_buffer = parser._buf
    for chunk in chunks[1:-1]:
        parser.feed(chunk)
        assert parser._buf is first_buffer  # kept apart, not joined yet
    parser.feed(chunks[-1])
    assert drain(parser) == [Publish("t", bytes(100_000))]


def test_many_packets_in_one_read() -> None:
    wire = b"".join(encode(Publish(f"t/{i}", bytes([i])), 5) for i in range(200))
    assert decode_chunks(make_parser(5, "server"), [wire]) == [
        Publish(f"t/{i}", bytes([i])) for i in range(200)
    ]


def test_feed_accepts_bytearray_and_memoryview_but_yields_bytes() -> None:
    wire = h("30 0a 0003 612f62 68656c6c6f")
    parser = make_parser(4, "server")
    parser.feed(bytearray(wire[:4]))
    parser.feed(memoryview(wire)[4:])
    (packet,) = drain(parser)
    assert isinstance(packet, Publish)
    assert type(packet.payload) is bytes
    assert packet.payload == b"hello"


# --- encode_publish ---------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [3, 4, 5])
@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize("size", [0, 100, 130, 20_000])
def test_encode_publish_equals_the_generic_encoder(level: int, qos: int, size: int) -> None:
    props = Properties(message_expiry_interval=9, user_properties=[("a", "b")]) if level == 5 else None
    packet = Publish("s/t", b"p" * size, qos, retain=True, dup=qos > 0, packet_id=qos * 100, properties=props)
    props_bytes = encode_properties(props, PacketType.PUBLISH) if level == 5 else b""
    fast = encode_publish(encode_string("s/t"), packet.payload, qos, qos * 100, True, qos > 0, props_bytes)
    assert fast == encode(packet, level)


def test_encode_publish_5_0_without_properties_needs_the_empty_block() -> None:
    wire = encode_publish(encode_string("a/b"), b"", properties=NO_PROPERTIES)
    assert wire == h("30 06 0003 612f62 00")


# --- hypothesis round trips --------------------------------------------------------------------------

# Test-local reason code lists, from MQTT 5.0 Table 2-6 (independent of the codec's own tables).
RC_CONNACK_5 = [
    0x00,
    0x80,
    0x81,
    0x82,
    0x83,
    0x84,
    0x85,
    0x86,
    0x87,
    0x88,
    0x89,
    0x8A,
    0x8C,
    0x90,
    0x95,
    0x97,
]
RC_CONNACK_5 += [0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F]
RC_PUBACK_5 = [0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99]
RC_PUBREL_5 = [0x00, 0x92]
RC_SUBACK_5 = [0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2]
RC_UNSUBACK_5 = [0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91]
RC_DISCONNECT_5 = [0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8C, 0x8D, 0x8E, 0x8F, 0x90, 0x93]
RC_DISCONNECT_5 += [0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2]
RC_AUTH_5 = [0x00, 0x18, 0x19]

# codec="utf-8" leaves out the surrogates U+D800..U+DFFF, which no UTF-8 string can carry [MQTT-1.5.4-1].
texts = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
topic_names = st.text(st.characters(codec="utf-8", exclude_characters="\x00+#"), min_size=1, max_size=12)
topic_filters = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12)
packet_ids = st.integers(1, 0xFFFF)

ZERO_OR_ONE = {
    PropertyId.PAYLOAD_FORMAT_INDICATOR,
    PropertyId.REQUEST_PROBLEM_INFORMATION,
    PropertyId.REQUEST_RESPONSE_INFORMATION,
    PropertyId.MAXIMUM_QOS,
    PropertyId.RETAIN_AVAILABLE,
    PropertyId.WILDCARD_SUBSCRIPTION_AVAILABLE,
    PropertyId.SUBSCRIPTION_IDENTIFIER_AVAILABLE,
    PropertyId.SHARED_SUBSCRIPTION_AVAILABLE,
}
NONZERO = {PropertyId.RECEIVE_MAXIMUM, PropertyId.MAXIMUM_PACKET_SIZE, PropertyId.TOPIC_ALIAS}


def property_value(pid: PropertyId, ptype: PropertyType, kind: int) -> st.SearchStrategy[object]:
    low = 1 if pid in NONZERO else 0
    if ptype == PropertyType.BYTE:
        assert pid in ZERO_OR_ONE  # every Byte property of Table 2-4 is a 0/1 flag
        return st.integers(0, 1)
    if ptype == PropertyType.TWO_BYTE_INTEGER:
        return st.integers(low, 0xFFFF)
    if ptype == PropertyType.FOUR_BYTE_INTEGER:
        return st.integers(low, 0xFFFF_FFFF)
    if ptype == PropertyType.VARIABLE_BYTE_INTEGER:
        return st.lists(
            st.integers(1, VARINT_MAX), min_size=1, max_size=3 if kind == PacketType.PUBLISH else 1
        )
    if ptype == PropertyType.UTF8_STRING:
        return topic_names if pid == PropertyId.RESPONSE_TOPIC else texts
    if ptype == PropertyType.BINARY_DATA:
        return st.binary(max_size=12)
    return st.lists(st.tuples(texts, texts), min_size=1, max_size=3)


def properties(kind: int, exclude: frozenset[str] = frozenset()) -> st.SearchStrategy[Properties | None]:
    """Any valid property set for packet kind `kind` (None when empty, as the decoder returns it)."""
    optional = {
        name: property_value(pid, ptype, kind)
        for pid, name, ptype, allowed in PROPERTY_TABLE
        if allowed >> kind & 1 and name not in exclude
    }

    def build(values: dict[str, object]) -> Properties | None:
        if kind == PacketType.CONNECT and "authentication_data" in values:
            values.setdefault("authentication_method", "m")  # data without a method is a Protocol Error
        return Properties(**values) if values else None  # type: ignore[arg-type]

    return st.fixed_dictionaries({}, optional=optional).map(build)


def props_for(
    level: int, kind: int, exclude: frozenset[str] = frozenset()
) -> st.SearchStrategy[Properties | None]:
    return properties(kind, exclude) if level == 5 else st.none()


@st.composite
def connects(draw: st.DrawFn, level: int) -> Connect:
    will = None
    if draw(st.booleans()):
        will = Will(
            draw(topic_names),
            draw(st.binary(max_size=12)),
            draw(st.integers(0, 2)),
            draw(st.booleans()),
            draw(props_for(level, WILL_PROPERTIES)),
        )
    username = draw(st.none() | texts)
    password = draw(st.none() | st.binary(max_size=12))
    if password is not None and username is None and level < 5:
        username = "u"  # [MQTT-3.1.2-22]
    return Connect(
        draw(texts),
        level,
        draw(st.booleans()),
        draw(st.integers(0, 0xFFFF)),
        will,
        username,
        password,
        draw(props_for(level, PacketType.CONNECT)),
    )


@st.composite
def publishes(draw: st.DrawFn, level: int, from_server: bool) -> Publish:
    qos = draw(st.integers(0, 2))
    exclude = frozenset() if from_server else frozenset({"subscription_identifiers"})  # [MQTT-3.3.4-6]
    return Publish(
        draw(topic_names),
        draw(st.binary(max_size=40)),
        qos,
        draw(st.booleans()),
        qos > 0 and draw(st.booleans()),
        draw(packet_ids) if qos else 0,
        draw(props_for(level, PacketType.PUBLISH, exclude)),
    )


def acks(level: int) -> st.SearchStrategy[Packet]:
    if level < 5:
        return st.one_of([st.builds(cls, packet_ids) for cls in (PubAck, PubRec, PubRel, PubComp)])
    return st.one_of(
        st.builds(PubAck, packet_ids, st.sampled_from(RC_PUBACK_5), properties(PacketType.PUBACK)),
        st.builds(PubRec, packet_ids, st.sampled_from(RC_PUBACK_5), properties(PacketType.PUBREC)),
        st.builds(PubRel, packet_ids, st.sampled_from(RC_PUBREL_5), properties(PacketType.PUBREL)),
        st.builds(PubComp, packet_ids, st.sampled_from(RC_PUBREL_5), properties(PacketType.PUBCOMP)),
    )


@st.composite
def subscription(draw: st.DrawFn, level: int) -> tuple[str, SubscriptionOptions]:
    topic_filter = draw(topic_filters)
    if level < 5:
        return topic_filter, SubscriptionOptions(draw(st.integers(0, 2)))
    no_local = draw(st.booleans()) and not topic_filter.startswith("$share/")  # [MQTT-3.8.3-4]
    return topic_filter, SubscriptionOptions(
        draw(st.integers(0, 2)), no_local, draw(st.booleans()), draw(st.integers(0, 2))
    )


def client_packets(level: int) -> st.SearchStrategy[Packet]:
    """Packets a Client sends, past its CONNECT."""
    strategies: list[st.SearchStrategy[Packet]] = [
        publishes(level, from_server=False),
        acks(level),
        st.builds(
            Subscribe,
            packet_ids,
            st.lists(subscription(level), min_size=1, max_size=4),
            props_for(level, PacketType.SUBSCRIBE),
        ),
        st.builds(
            Unsubscribe,
            packet_ids,
            st.lists(topic_filters, min_size=1, max_size=4),
            props_for(level, PacketType.UNSUBSCRIBE),
        ),
        st.just(PingReq()),
    ]
    if level == 5:
        strategies.append(
            st.builds(Disconnect, st.sampled_from(RC_DISCONNECT_5), properties(PacketType.DISCONNECT))
        )
        strategies.append(st.builds(Auth, st.sampled_from(RC_AUTH_5), properties(PacketType.AUTH)))
    else:
        strategies.append(st.just(Disconnect()))
    return st.one_of(strategies)


def server_packets(level: int) -> st.SearchStrategy[Packet]:
    """Packets a Server sends."""
    if level == 5:
        connacks = st.builds(
            ConnAck, st.booleans(), st.sampled_from(RC_CONNACK_5), properties(PacketType.CONNACK)
        )
        subacks = st.builds(
            SubAck,
            packet_ids,
            st.lists(st.sampled_from(RC_SUBACK_5), min_size=1),
            properties(PacketType.SUBACK),
        )
        unsubacks = st.builds(
            UnsubAck,
            packet_ids,
            st.lists(st.sampled_from(RC_UNSUBACK_5), min_size=1),
            properties(PacketType.UNSUBACK),
        )
    else:
        connacks = st.builds(ConnAck, st.booleans() if level == 4 else st.just(False), st.integers(0, 5))
        subacks = st.builds(SubAck, packet_ids, st.lists(st.sampled_from([0, 1, 2, 0x80]), min_size=1))
        unsubacks = st.builds(UnsubAck, packet_ids)
    strategies: list[st.SearchStrategy[Packet]] = [
        connacks,
        publishes(level, from_server=True),
        acks(level),
        subacks,
        unsubacks,
        st.just(PingResp()),
    ]
    if level == 5:
        # [MQTT-3.14.2-2]: a Server's DISCONNECT carries no Session Expiry Interval.
        disconnect_props = properties(PacketType.DISCONNECT, frozenset({"session_expiry_interval"}))
        strategies.append(st.builds(Disconnect, st.sampled_from(RC_DISCONNECT_5), disconnect_props))
        strategies.append(st.builds(Auth, st.sampled_from(RC_AUTH_5), properties(PacketType.AUTH)))
    return st.one_of(strategies)


def chunked(data: st.DataObject, wire: bytes) -> list[bytes]:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    bounds = [0, *cuts, len(wire)]
    return [wire[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


ROUND_TRIP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("level", [3, 4, 5])
@ROUND_TRIP
@given(data=st.data())
def test_connect_round_trip(level: int, data: st.DataObject) -> None:
    packet = data.draw(connects(level))
    parser = MqttParser()
    assert decode_chunks(parser, chunked(data, encode(packet, level))) == [packet]
    assert parser.protocol_level == level


@pytest.mark.parametrize("level", [3, 4, 5])
@ROUND_TRIP
@given(data=st.data())
def test_client_to_server_round_trip(level: int, data: st.DataObject) -> None:
    packets = data.draw(st.lists(client_packets(level), min_size=1, max_size=4))
    wire = b"".join(encode(packet, level) for packet in packets)
    assert decode_chunks(make_parser(level, "server"), chunked(data, wire)) == packets


@pytest.mark.parametrize("level", [3, 4, 5])
@ROUND_TRIP
@given(data=st.data())
def test_server_to_client_round_trip(level: int, data: st.DataObject) -> None:
    packets = data.draw(st.lists(server_packets(level), min_size=1, max_size=4))
    wire = b"".join(encode(packet, level) for packet in packets)
    assert decode_chunks(make_parser(level, "client"), chunked(data, wire)) == packets


@pytest.mark.parametrize("kind", [WILL_PROPERTIES, *PacketType])
@ROUND_TRIP
@given(data=st.data())
def test_every_property_round_trips(kind: int, data: st.DataObject) -> None:
    """Every property valid in a packet kind survives encode -> decode (Table 2-4)."""
    from protocols.mqtt.properties import decode_properties

    props = data.draw(properties(kind))
    wire = encode_properties(props, kind)
    assert decode_properties(wire, 0, len(wire), kind) == (props, len(wire))


@pytest.mark.parametrize("level", [4, 5])
@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=64))
def test_arbitrary_bytes_raise_only_mqtt_error(level: int, garbage: bytes) -> None:
    """A fuzzed stream either decodes, waits for more, or raises MqttError; nothing else escapes."""
    for side in ("server", "client"):
        parser = make_parser(level, side)
        parser.feed(garbage)
        try:
            drain(parser)
        except MqttError as exc:
            assert exc.reason_code in set(ReasonCode)


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=64))
def test_arbitrary_connect_bytes_raise_only_mqtt_error(garbage: bytes) -> None:
    parser = MqttParser()
    parser.feed(h("10") + bytes([len(garbage)]) + garbage if len(garbage) < 128 else garbage)
    try:
        drain(parser)
    except MqttError as exc:
        assert exc.reason_code in set(ReasonCode)


# --- the property table ------------------------------------------------------------------------------

# MQTT 5.0 Table 2-4, written out independently of the codec: id -> (type, packets allowing it).
P = PacketType
W = WILL_PROPERTIES
T = PropertyType
SPEC_TABLE_2_4 = {
    0x01: (T.BYTE, {P.PUBLISH, W}),
    0x02: (T.FOUR_BYTE_INTEGER, {P.PUBLISH, W}),
    0x03: (T.UTF8_STRING, {P.PUBLISH, W}),
    0x08: (T.UTF8_STRING, {P.PUBLISH, W}),
    0x09: (T.BINARY_DATA, {P.PUBLISH, W}),
    0x0B: (T.VARIABLE_BYTE_INTEGER, {P.PUBLISH, P.SUBSCRIBE}),
    0x11: (T.FOUR_BYTE_INTEGER, {P.CONNECT, P.CONNACK, P.DISCONNECT}),
    0x12: (T.UTF8_STRING, {P.CONNACK}),
    0x13: (T.TWO_BYTE_INTEGER, {P.CONNACK}),
    0x15: (T.UTF8_STRING, {P.CONNECT, P.CONNACK, P.AUTH}),
    0x16: (T.BINARY_DATA, {P.CONNECT, P.CONNACK, P.AUTH}),
    0x17: (T.BYTE, {P.CONNECT}),
    0x18: (T.FOUR_BYTE_INTEGER, {W}),
    0x19: (T.BYTE, {P.CONNECT}),
    0x1A: (T.UTF8_STRING, {P.CONNACK}),
    0x1C: (T.UTF8_STRING, {P.CONNACK, P.DISCONNECT}),
    0x1F: (
        T.UTF8_STRING,
        {P.CONNACK, P.PUBACK, P.PUBREC, P.PUBREL, P.PUBCOMP, P.SUBACK, P.UNSUBACK, P.DISCONNECT, P.AUTH},
    ),
    0x21: (T.TWO_BYTE_INTEGER, {P.CONNECT, P.CONNACK}),
    0x22: (T.TWO_BYTE_INTEGER, {P.CONNECT, P.CONNACK}),
    0x23: (T.TWO_BYTE_INTEGER, {P.PUBLISH}),
    0x24: (T.BYTE, {P.CONNACK}),
    0x25: (T.BYTE, {P.CONNACK}),
    0x26: (T.UTF8_STRING_PAIR, set(P) - {P.PINGREQ, P.PINGRESP} | {W}),
    0x27: (T.FOUR_BYTE_INTEGER, {P.CONNECT, P.CONNACK}),
    0x28: (T.BYTE, {P.CONNACK}),
    0x29: (T.BYTE, {P.CONNACK}),
    0x2A: (T.BYTE, {P.CONNACK}),
}


def test_property_table_matches_table_2_4() -> None:
    table = {
        pid: (ptype, {k for k in range(16) if allowed >> k & 1}) for pid, _, ptype, allowed in PROPERTY_TABLE
    }
    assert table == SPEC_TABLE_2_4
    assert len(table) == 27
    assert {name for _, name, _, _ in PROPERTY_TABLE} == set(Properties.__slots__)


# --- malformed input and protocol errors --------------------------------------------------------------

CONNECT_311 = h("10 0c 0004 4d515454 04 02 003c 0000")


def connect_body(level: int, flags: int, payload: bytes, props: bytes = b"\x00") -> bytes:
    name = h("0006 4d5149736470") if level == 3 else h("0004 4d515454")
    body = name + bytes([level, flags]) + h("003c") + (props if level == 5 else b"") + payload
    return bytes([0x10, len(body)]) + body


@pytest.mark.parametrize(
    ("level", "side", "wire"),
    [
        (4, "server", h("41 02 0007")),  # PUBACK flags 0001
        (4, "server", h("60 02 0007")),  # PUBREL flags 0000, must be 0010 [MQTT-3.6.1-1]
        (5, "server", h("80 06 0001 0001 61 00")),  # SUBSCRIBE flags 0000 [MQTT-3.8.1-1]
        (4, "server", h("a0 05 0001 0001 61")),  # UNSUBSCRIBE flags 0000 [MQTT-3.10.1-1]
        (4, "server", h("c8 00")),  # PINGREQ
        (5, "server", h("e1 00")),  # DISCONNECT
        (5, "server", h("f2 00")),  # AUTH [MQTT-3.15.1-1]
        (4, "client", h("22 02 00 00")),  # CONNACK
        (5, "client", h("92 03 0001 00")),  # SUBACK
    ],
)
def test_reserved_fixed_header_flags_are_malformed_MQTT_2_2_2_1(level: int, side: str, wire: bytes) -> None:
    """3.1.1 [MQTT-2.2.2-1], 5.0 [MQTT-2.1.3-1]: reserved flag bits MUST have their listed values."""
    assert decode_error(make_parser(level, side), wire).reason_code == MALFORMED


def test_connect_fixed_header_flags_are_malformed_MQTT_2_2_2_1() -> None:
    assert decode_error(MqttParser(), b"\x11" + CONNECT_311[1:]).reason_code == MALFORMED


@pytest.mark.parametrize("level", [3, 4, 5])
def test_qos3_is_malformed_MQTT_3_3_1_4(level: int) -> None:
    wire = h("36 0a 0003 612f62 0001") + (b"\x00" if level == 5 else b"") + b"x"
    wire = bytes([wire[0], len(wire) - 2]) + wire[2:]
    assert decode_error(make_parser(level, "server"), wire).reason_code == MALFORMED


@pytest.mark.parametrize("level", [4, 5])
def test_qos0_with_dup_is_malformed_MQTT_3_3_1_2(level: int) -> None:
    wire = h("38 05 0003 612f62") if level == 4 else h("38 06 0003 612f62 00")
    assert decode_error(make_parser(level, "server"), wire).reason_code == MALFORMED


@pytest.mark.parametrize(
    ("level", "wire"),
    [
        (4, h("32 07 0003 612f62 0000")),  # PUBLISH QoS 1
        (5, h("34 08 0003 612f62 0000 00")),  # PUBLISH QoS 2
        (4, h("82 08 0000 0003 612f62 00")),  # SUBSCRIBE
        (4, h("a2 07 0000 0003 612f62")),  # UNSUBSCRIBE
        (4, h("40 02 0000")),  # PUBACK
        (5, h("62 02 0000")),  # PUBREL
    ],
)
def test_packet_id_zero_is_protocol_error_MQTT_2_3_1_1(level: int, wire: bytes) -> None:
    """3.1.1 [MQTT-2.3.1-1], 5.0 [MQTT-2.2.1-3]: Packet Identifiers are non-zero."""
    assert decode_error(make_parser(level, "server"), wire).reason_code == PROTOCOL_ERROR


@pytest.mark.parametrize(("level", "wire"), [(4, h("82 02 0001")), (5, h("82 03 0001 00"))])
def test_subscribe_with_no_filters_is_protocol_error_MQTT_3_8_3_3(level: int, wire: bytes) -> None:
    """3.1.1 [MQTT-3.8.3-3], 5.0 [MQTT-3.8.3-2]: at least one Topic Filter."""
    assert decode_error(make_parser(level, "server"), wire).reason_code == PROTOCOL_ERROR


@pytest.mark.parametrize(("level", "wire"), [(4, h("a2 02 0001")), (5, h("a2 03 0001 00"))])
def test_unsubscribe_with_no_filters_is_protocol_error_MQTT_3_10_3_2(level: int, wire: bytes) -> None:
    assert decode_error(make_parser(level, "server"), wire).reason_code == PROTOCOL_ERROR


BAD_UTF8 = [
    pytest.param(h("ff"), id="invalid-byte"),
    pytest.param(h("eda080"), id="encoded-surrogate-U+D800"),
    pytest.param(h("c0af"), id="overlong"),
    pytest.param(h("e282"), id="truncated-sequence"),
]


@pytest.mark.parametrize("bad", BAD_UTF8)
def test_ill_formed_utf8_topic_is_malformed_MQTT_1_5_4_1(bad: bytes) -> None:
    """5.0 [MQTT-1.5.4-1], 3.1.1 [MQTT-1.5.3-1]: well-formed UTF-8, no surrogates."""
    topic = b"a" + bad
    wire = bytes([0x30, 2 + len(topic)]) + len(topic).to_bytes(2, "big") + topic
    assert decode_error(make_parser(4, "server"), wire).reason_code == MALFORMED


@pytest.mark.parametrize("bad", BAD_UTF8)
def test_ill_formed_utf8_client_id_is_malformed_MQTT_1_5_4_1(bad: bytes) -> None:
    parser = MqttParser()
    error = decode_error(parser, connect_body(4, 0x02, len(bad).to_bytes(2, "big") + bad))
    assert error.reason_code == MALFORMED
    assert parser.protocol_level == 4  # the CONNACK refusal can be sent in the client's version


@pytest.mark.parametrize("bad", BAD_UTF8)
def test_ill_formed_utf8_user_property_is_malformed_MQTT_1_5_4_1(bad: bytes) -> None:
    prop = b"\x26" + len(bad).to_bytes(2, "big") + bad + h("0001 76")
    wire = h("40") + bytes([4 + len(prop)]) + h("0001 00") + bytes([len(prop)]) + prop
    assert decode_error(make_parser(5, "server"), wire).reason_code == MALFORMED


def test_null_character_in_topic_is_malformed_MQTT_1_5_4_2() -> None:
    """5.0 [MQTT-1.5.4-2], 3.1.1 [MQTT-1.5.3-2]: no U+0000 in a UTF-8 Encoded String."""
    assert decode_error(make_parser(4, "server"), h("30 06 0003 61 00 62 78")).reason_code == MALFORMED


def test_null_character_in_client_id_is_malformed_MQTT_1_5_4_2() -> None:
    assert decode_error(MqttParser(), connect_body(5, 0x02, h("0002 6100"))).reason_code == MALFORMED


def test_null_character_in_subscription_filter_is_malformed_MQTT_1_5_4_2() -> None:
    assert decode_error(make_parser(4, "server"), h("82 07 0001 0002 6100 00")).reason_code == MALFORMED


@pytest.mark.parametrize("pair", [h("0002 6100 0001 76"), h("0001 6b 0002 0076")], ids=["name", "value"])
def test_null_character_in_user_property_is_malformed_MQTT_1_5_4_2(pair: bytes) -> None:
    prop = b"\x26" + pair
    wire = h("40") + bytes([4 + len(prop)]) + h("0001 00") + bytes([len(prop)]) + prop
    assert decode_error(make_parser(5, "server"), wire).reason_code == MALFORMED


def test_null_character_in_reason_string_is_malformed_MQTT_1_5_4_2() -> None:
    wire = h("40 09 0001 80 05 1f 0002 6100")
    assert decode_error(make_parser(5, "client"), wire).reason_code == MALFORMED


@pytest.mark.parametrize(
    ("side", "wire"),
    [
        ("server", h("30 10 0003 612f62 0a 02 00000001 02 00000002 78")),  # Message Expiry twice
        ("client", h("20 09 00 00 06 24 00 24 01 25 00")),  # Maximum QoS twice
        ("server", h("82 0b 0001 04 0b 01 0b 02 0001 61 00")),  # Subscription Identifier twice in SUBSCRIBE
        ("client", h("40 0c 0001 00 08 1f 0001 61 1f 0001 62")),  # Reason String twice
    ],
)
def test_duplicate_property_is_protocol_error(side: str, wire: bytes) -> None:
    """5.0 §3: "It is a Protocol Error to include the <property> more than once"."""
    assert decode_error(make_parser(5, side), wire).reason_code == PROTOCOL_ERROR


def test_user_property_may_repeat_with_the_same_name_MQTT_3_3_2_18() -> None:
    wire = h("30 15 0003 612f62 0e 26 0001 61 0001 31 26 0001 61 0001 32 78")
    (packet,) = decode_chunks(make_parser(5, "server"), [wire])
    assert isinstance(packet, Publish)
    assert packet.properties == Properties(user_properties=[("a", "1"), ("a", "2")])


@pytest.mark.parametrize(
    ("side", "wire"),
    [
        ("server", h("30 0c 0003 612f62 05 11 0000000a 78")),  # Session Expiry Interval in PUBLISH
        ("server", h("40 07 0001 00 03 23 0001")),  # Topic Alias in PUBACK
        ("client", h("20 05 00 00 02 17 01")),  # Request Problem Information in CONNACK
        ("server", h("a2 08 0001 02 0b 01 0001 61")),  # Subscription Identifier in UNSUBSCRIBE
    ],
)
def test_property_not_valid_in_packet_is_malformed(side: str, wire: bytes) -> None:
    """5.0 §2.2.2.2: an Identifier not valid for its packet type is a Malformed Packet."""
    assert decode_error(make_parser(5, side), wire).reason_code == MALFORMED


def test_will_delay_interval_outside_will_properties_is_malformed() -> None:
    props = h("05 18 00000001")  # Will Delay Interval among the CONNECT properties
    assert decode_error(MqttParser(), connect_body(5, 0x02, h("0000"), props)).reason_code == MALFORMED


def test_unknown_property_identifier_is_malformed() -> None:
    assert decode_error(make_parser(5, "server"), h("40 06 0001 00 02 04 00")).reason_code == MALFORMED


def test_several_subscription_identifiers_from_the_server_are_valid_MQTT_3_3_4_4() -> None:
    wire = h("30 0b 0003 612f62 04 0b 01 0b 02 78")
    (packet,) = decode_chunks(make_parser(5, "client"), [wire])
    assert isinstance(packet, Publish)
    assert packet.properties == Properties(subscription_identifiers=[1, 2])


def test_subscription_identifier_from_a_client_is_protocol_error_MQTT_3_3_4_6() -> None:
    wire = h("30 09 0003 612f62 02 0b 01 78")
    assert decode_error(make_parser(5, "server"), wire).reason_code == PROTOCOL_ERROR


def test_subscription_identifier_zero_is_protocol_error() -> None:
    assert (
        decode_error(make_parser(5, "server"), h("82 09 0001 02 0b 00 0001 61 00")).reason_code
        == PROTOCOL_ERROR
    )


@pytest.mark.parametrize(
    ("side", "wire"),
    [
        ("server", h("30 09 0003 612f62 02 01 02 78")),  # Payload Format Indicator 2
        ("client", h("20 05 00 00 02 24 02")),  # Maximum QoS 2
        ("client", h("20 05 00 00 02 25 02")),  # Retain Available 2
        ("client", h("20 05 00 00 02 28 02")),  # Wildcard Subscription Available 2
        ("client", h("20 05 00 00 02 29 05")),  # Subscription Identifier Available 5
        ("client", h("20 05 00 00 02 2a ff")),  # Shared Subscription Available 255
        ("client", h("20 06 00 00 03 21 0000")),  # Receive Maximum 0
        ("client", h("20 08 00 00 05 27 00000000")),  # Maximum Packet Size 0
        ("server", h("30 0a 0003 612f62 03 23 0000 78")),  # Topic Alias 0 [MQTT-3.3.2-8]
        ("server", h("30 0b 0003 612f62 04 08 0001 23 78")),  # Response Topic "#" [MQTT-3.3.2-14]
    ],
)
def test_forbidden_property_value_is_protocol_error(side: str, wire: bytes) -> None:
    assert decode_error(make_parser(5, side), wire).reason_code == PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("name", "value"), [("request_problem_information", 2), ("request_response_information", 3)]
)
def test_connect_request_information_flags_are_zero_or_one(name: str, value: int) -> None:
    pid = 0x17 if name == "request_problem_information" else 0x19
    error = decode_error(MqttParser(), connect_body(5, 0x02, h("0000"), bytes([2, pid, value])))
    assert error.reason_code == PROTOCOL_ERROR


def test_topic_alias_zero_is_protocol_error_MQTT_3_3_2_8() -> None:
    assert decode_error(make_parser(5, "server"), h("30 07 0000 03 23 0000 78")).reason_code == PROTOCOL_ERROR


def test_authentication_data_without_method_is_protocol_error() -> None:
    """5.0 §3.1.2.11.10: Authentication Data without an Authentication Method is a Protocol Error."""
    error = decode_error(MqttParser(), connect_body(5, 0x02, h("0000"), h("04 16 0001 01")))
    assert error.reason_code == PROTOCOL_ERROR


def test_connect_reserved_flag_is_malformed_MQTT_3_1_2_3() -> None:
    assert decode_error(MqttParser(), connect_body(4, 0x03, h("0000"))).reason_code == MALFORMED


@pytest.mark.parametrize("level", [3, 4, 5])
def test_will_qos_without_will_flag_is_malformed_MQTT_3_1_2_13(level: int) -> None:
    """3.1.1 [MQTT-3.1.2-13], 5.0 [MQTT-3.1.2-11]: Will QoS is 0 when the Will Flag is 0."""
    assert decode_error(MqttParser(), connect_body(level, 0x02 | 0x08, h("0001 63"))).reason_code == MALFORMED


@pytest.mark.parametrize("level", [3, 4, 5])
def test_will_retain_without_will_flag_is_malformed_MQTT_3_1_2_15(level: int) -> None:
    """3.1.1 [MQTT-3.1.2-15], 5.0 [MQTT-3.1.2-13]: Will Retain is 0 when the Will Flag is 0."""
    assert decode_error(MqttParser(), connect_body(level, 0x02 | 0x20, h("0001 63"))).reason_code == MALFORMED


@pytest.mark.parametrize("level", [3, 4, 5])
def test_will_qos3_is_malformed_MQTT_3_1_2_14(level: int) -> None:
    """3.1.1 [MQTT-3.1.2-14], 5.0 [MQTT-3.1.2-12]: Will QoS MUST NOT be 3."""
    will_props = b"\x00" if level == 5 else b""
    payload = h("0001 63") + will_props + h("0001 74 0001 78")
    assert (
        decode_error(MqttParser(), connect_body(level, 0x02 | 0x04 | 0x18, payload)).reason_code == MALFORMED
    )


def test_will_flag_without_will_fields_is_malformed_MQTT_3_1_2_9() -> None:
    assert decode_error(MqttParser(), connect_body(4, 0x02 | 0x04, h("0001 63"))).reason_code == MALFORMED


def test_will_topic_with_wildcard_is_topic_name_invalid() -> None:
    error = decode_error(MqttParser(), connect_body(4, 0x06, h("0001 63 0001 23 0000")))
    assert error.reason_code == ReasonCode.TOPIC_NAME_INVALID


@pytest.mark.parametrize("level", [3, 4])
def test_password_without_username_is_malformed_MQTT_3_1_2_22(level: int) -> None:
    assert (
        decode_error(MqttParser(), connect_body(level, 0x42, h("0001 63 0002 7077"))).reason_code == MALFORMED
    )


@pytest.mark.parametrize(
    ("flags", "payload"),
    [
        (0x02, h("0001 63 0001 75")),  # a user name without the User Name Flag [MQTT-3.1.2-18]
        (0x82, h("0001 63 0001 75 0002 7077")),  # a password without the Password Flag [MQTT-3.1.2-20]
    ],
)
def test_connect_fields_absent_from_flags_are_malformed_MQTT_3_1_2_18(flags: int, payload: bytes) -> None:
    """3.1.1 [MQTT-3.1.2-18]/[MQTT-3.1.2-20], 5.0 [MQTT-3.1.2-16]/[MQTT-3.1.2-18]."""
    assert decode_error(MqttParser(), connect_body(4, flags, payload)).reason_code == MALFORMED


def test_first_packet_must_be_connect_MQTT_3_1_0_1() -> None:
    assert decode_error(MqttParser(), h("c0 00")).reason_code == PROTOCOL_ERROR


def test_first_packet_not_connect_is_refused_before_its_body_arrives_MQTT_3_1_0_1() -> None:
    parser = MqttParser()
    parser.feed(h("30 ff ff 7f"))  # a 2 MiB PUBLISH announced, none of it sent
    with pytest.raises(MqttError) as info:
        parser.next_packet()
    assert info.value.reason_code == PROTOCOL_ERROR


def test_second_connect_is_protocol_error_MQTT_3_1_0_2() -> None:
    parser = MqttParser()
    assert decode_error(parser, CONNECT_311 + CONNECT_311).reason_code == PROTOCOL_ERROR


@pytest.mark.parametrize(
    "wire",
    [
        h("10 0c 0004 4d515454 06 02 003c 0000"),  # level 6
        h("10 0c 0004 4d515454 03 02 003c 0000"),  # level 3 named "MQTT"
        h("10 0e 0006 4d5149736470 04 02 003c 0000"),  # level 4 named "MQIsdp"
        h("10 0c 0004 4d515458 04 02 003c 0000"),  # name "MQTX"
    ],
)
def test_unsupported_protocol_version_MQTT_3_1_2_2(wire: bytes) -> None:
    """3.1.1 [MQTT-3.1.2-1]/[MQTT-3.1.2-2]: a wrong name or level is refused (CONNACK 0x01 / 0x84)."""
    parser = MqttParser()
    error = decode_error(parser, wire)
    assert error.reason_code == ReasonCode.UNSUPPORTED_PROTOCOL_VERSION
    assert parser.protocol_level is None
    assert connect_return_code(error.reason_code) == 1


def test_error_after_the_level_is_known_keeps_the_level() -> None:
    parser = MqttParser()
    assert decode_error(parser, connect_body(5, 0x03, h("0000"))).reason_code == MALFORMED
    assert parser.protocol_level == 5


def test_remaining_length_over_4_bytes_is_malformed() -> None:
    assert decode_error(make_parser(4, "server"), h("30 ff ff ff ff 01")).reason_code == MALFORMED


def test_remaining_length_not_in_shortest_form_is_malformed_MQTT_1_5_5_1() -> None:
    assert decode_error(make_parser(4, "server"), h("c0 80 00")).reason_code == MALFORMED


def test_incomplete_remaining_length_waits_for_more() -> None:
    parser = make_parser(4, "server")
    parser.feed(h("30 ff"))
    assert parser.next_packet() is NEED_DATA
    parser.feed(h("ff"))
    assert parser.next_packet() is NEED_DATA


def test_packet_too_large_is_refused_before_the_body_arrives() -> None:
    parser = MqttParser(protocol_level=4, max_packet_size=100)
    parser.feed(h("30 e8 07"))  # Remaining Length 1000, nothing of the body yet
    with pytest.raises(MqttError) as info:
        parser.next_packet()
    assert info.value.reason_code == ReasonCode.PACKET_TOO_LARGE


def test_packet_of_exactly_the_maximum_size_is_accepted() -> None:
    packet = Publish("t", bytes(95))
    wire = encode(packet, 4)
    assert len(wire) == 100
    assert decode_chunks(MqttParser(protocol_level=4, max_packet_size=100), [wire]) == [packet]
    assert decode_error(MqttParser(protocol_level=4, max_packet_size=99), wire).reason_code == 0x95


def test_max_packet_size_can_be_raised_after_connect() -> None:
    parser = MqttParser(max_packet_size=64)
    parser.feed(CONNECT_311)
    assert isinstance(parser.next_packet(), Connect)
    parser.max_packet_size = MAX_PACKET_SIZE
    assert decode_chunks(parser, [encode(Publish("t", bytes(1000)), 4)]) == [Publish("t", bytes(1000))]


@pytest.mark.parametrize(
    ("level", "wire"),
    [
        (4, h("30 04 0005 6162")),  # topic length beyond the packet
        (4, h("32 05 0003 612f62")),  # QoS 1 without a packet id
        (5, h("30 05 0003 612f62")),  # 5.0 PUBLISH without its Property Length
        (5, h("30 07 0003 612f62 05 01")),  # Property Length beyond the packet
        (4, h("40 03 0001 00")),  # 3.1.1 PUBACK has Remaining Length 2
        (4, h("c0 01 00")),  # PINGREQ with a body
        (4, h("e0 01 00")),  # 3.1.1 DISCONNECT with a body
        (5, h("82 06 0001 00 0001 61")),  # SUBSCRIBE filter without its options byte
        (4, h("82 05 0001 0002 61")),  # SUBSCRIBE filter shorter than its length
    ],
)
def test_truncated_or_overlong_fields_are_malformed(level: int, wire: bytes) -> None:
    assert decode_error(make_parser(level, "server"), wire).reason_code == MALFORMED


def test_bytes_after_the_last_connect_field_are_malformed() -> None:
    assert decode_error(MqttParser(), connect_body(4, 0x02, h("0001 63 ff"))).reason_code == MALFORMED


@pytest.mark.parametrize("level", [3, 4])
@pytest.mark.parametrize("options", [0x03, 0x04, 0x80])
def test_subscribe_requested_qos_byte_is_checked_MQTT_3_8_3_4(level: int, options: int) -> None:
    """3.1.1 [MQTT-3-8.3-4]: reserved bits zero and QoS 0, 1 or 2."""
    wire = h("82 08 0001 0003 612f62") + bytes([options])
    assert decode_error(make_parser(level, "server"), wire).reason_code == MALFORMED


def test_subscribe_options_reserved_bits_are_malformed_MQTT_3_8_3_5() -> None:
    assert decode_error(make_parser(5, "server"), h("82 07 0001 00 0001 61 40")).reason_code == MALFORMED


@pytest.mark.parametrize("options", [0x03, 0x30])
def test_subscribe_qos3_or_retain_handling_3_is_protocol_error(options: int) -> None:
    """5.0 §3.8.3.1: Maximum QoS 3 and Retain Handling 3 are Protocol Errors."""
    wire = h("82 07 0001 00 0001 61") + bytes([options])
    assert decode_error(make_parser(5, "server"), wire).reason_code == PROTOCOL_ERROR


def test_no_local_on_a_shared_subscription_is_protocol_error_MQTT_3_8_3_4() -> None:
    wire = h("82 10 0001 00 000a 247368617265 2f672f78 04")
    assert decode_error(make_parser(5, "server"), wire).reason_code == PROTOCOL_ERROR


@pytest.mark.parametrize("topic", [b"a/+", b"#", b"a/#"])
def test_publish_topic_with_wildcard_is_topic_name_invalid_MQTT_3_3_2_2(topic: bytes) -> None:
    wire = bytes([0x30, 2 + len(topic)]) + len(topic).to_bytes(2, "big") + topic
    assert decode_error(make_parser(4, "server"), wire).reason_code == ReasonCode.TOPIC_NAME_INVALID


@pytest.mark.parametrize("level", [4, 5])
def test_empty_topic_without_topic_alias_is_protocol_error_MQTT_4_7_3_1(level: int) -> None:
    wire = h("30 03 0000 78") if level == 4 else h("30 04 0000 00 78")
    assert decode_error(make_parser(level, "server"), wire).reason_code == PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("side", "wire"),
    [
        ("server", h("20 02 00 00")),  # CONNACK
        ("server", h("90 03 0001 00")),  # SUBACK
        ("server", h("b0 02 0001")),  # UNSUBACK
        ("server", h("d0 00")),  # PINGRESP
        ("client", h("10 0c 0004 4d515454 04 02 003c 0000")),  # CONNECT
        ("client", h("82 06 0001 0001 61 00")),  # SUBSCRIBE
        ("client", h("a2 05 0001 0001 61")),  # UNSUBSCRIBE
        ("client", h("c0 00")),  # PINGREQ
    ],
)
def test_packet_sent_the_wrong_way_is_protocol_error(side: str, wire: bytes) -> None:
    """Table 2-1 "Direction of flow"."""
    assert decode_error(make_parser(4, side), wire).reason_code == PROTOCOL_ERROR


def test_a_3_1_1_server_never_sends_disconnect() -> None:
    assert decode_error(make_parser(4, "client"), h("e0 00")).reason_code == PROTOCOL_ERROR


@pytest.mark.parametrize("level", [3, 4])
def test_auth_before_5_0_is_a_reserved_packet_type(level: int) -> None:
    assert decode_error(make_parser(level, "server"), h("f0 00")).reason_code == MALFORMED


@pytest.mark.parametrize("level", [4, 5])
def test_packet_type_0_is_reserved(level: int) -> None:
    assert decode_error(make_parser(level, "server"), h("00 00")).reason_code == MALFORMED


@pytest.mark.parametrize(
    ("side", "wire"),
    [
        ("server", h("40 03 0001 92")),  # PUBACK with PUBREL's 0x92 [MQTT-3.4.2-1]
        ("server", h("62 03 0001 10")),  # PUBREL with 0x10 [MQTT-3.6.2-1]
        ("server", h("e0 01 05")),  # DISCONNECT 0x05 [MQTT-3.14.2-1]
        ("server", h("f0 01 01")),  # AUTH 0x01 [MQTT-3.15.2-1]
        ("client", h("90 04 0001 00 03")),  # SUBACK 0x03 [MQTT-3.9.3-2]
        ("client", h("b0 04 0001 00 01")),  # UNSUBACK 0x01
        ("client", h("20 03 00 01 00")),  # CONNACK 0x01 is a 3.1.1 return code, not a 5.0 reason code
    ],
)
def test_invalid_reason_code_is_protocol_error(side: str, wire: bytes) -> None:
    assert decode_error(make_parser(5, side), wire).reason_code == PROTOCOL_ERROR


def test_3_1_1_connack_return_code_above_5_is_protocol_error() -> None:
    assert decode_error(make_parser(4, "client"), h("20 02 00 06")).reason_code == PROTOCOL_ERROR


def test_3_1_1_suback_return_code_is_checked_MQTT_3_9_3_2() -> None:
    assert decode_error(make_parser(4, "client"), h("90 03 0001 03")).reason_code == PROTOCOL_ERROR


def test_connack_reserved_acknowledge_flags_are_malformed_MQTT_3_2_2_1() -> None:
    assert decode_error(make_parser(5, "client"), h("20 03 02 00 00")).reason_code == MALFORMED


def test_session_expiry_in_a_server_disconnect_is_protocol_error_MQTT_3_14_2_2() -> None:
    assert decode_error(make_parser(5, "client"), h("e0 07 00 05 11 00000001")).reason_code == PROTOCOL_ERROR


def test_errors_are_sticky() -> None:
    parser = make_parser(4, "server")
    first = decode_error(parser, h("36 05 0003 612f62"))
    parser.feed(h("c0 00"))
    with pytest.raises(MqttError) as info:
        parser.next_packet()
    assert info.value is first


def test_packets_before_an_error_are_delivered() -> None:
    parser = make_parser(4, "server")
    parser.feed(h("c0 00") + h("36 05 0003 612f62"))
    assert parser.next_packet() == PingReq()
    with pytest.raises(MqttError):
        parser.next_packet()


def test_error_message_and_reason_code() -> None:
    error = MqttError(0x81, "bad")
    assert error.reason_code == 0x81
    assert error.message == "bad"
    assert "0x81" in str(error)


# --- encoding misuse ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("packet", "level"),
    [
        (PubAck(1, 0x10), 4),
        (PubAck(1, properties=Properties(reason_string="x")), 4),
        (Publish("t", b"", properties=Properties(topic_alias=1)), 4),
        (Disconnect(0x04), 4),
        (Auth(), 4),
        (UnsubAck(1, [0]), 4),
        (Subscribe(1, [("t", SubscriptionOptions(1, no_local=True))]), 4),
        (Connect("c", 4, password=b"pw"), 4),
        (Connect("c", 4), 5),
        (Connect("c", 4, will=Will("t", b"", properties=Properties(will_delay_interval=1))), 4),
        (ConnAck(True, 0), 3),
        (Publish("t", b"", 1), 4),
        (Publish("t", b"", 3, packet_id=1), 4),
        (PubAck(1, 0, Properties(topic_alias=3)), 5),
        (Subscribe(1, [("t", SubscriptionOptions())], Properties(subscription_identifiers=[1, 2])), 5),
        (PubAck(70_000), 4),
        (Connect("c", 5, properties=Properties(receive_maximum=70_000)), 5),
        (Publish("t" * 70_000, b""), 4),
    ],
)
def test_encoding_what_the_level_or_packet_cannot_carry_is_a_value_error(packet: Packet, level: int) -> None:
    with pytest.raises(ValueError):
        encode(packet, level)


def test_encode_rejects_unknown_levels_and_objects() -> None:
    with pytest.raises(ValueError):
        encode(PingReq(), 6)
    with pytest.raises(TypeError):
        encode("not a packet", 4)  # type: ignore[arg-type]


def test_parser_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        MqttParser(server_side=False)
    with pytest.raises(ValueError):
        MqttParser(protocol_level=2)


# --- CONNACK return codes below 5.0 ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        (ReasonCode.SUCCESS, 0),
        (ReasonCode.UNSUPPORTED_PROTOCOL_VERSION, 1),
        (ReasonCode.CLIENT_IDENTIFIER_NOT_VALID, 2),
        (ReasonCode.SERVER_UNAVAILABLE, 3),
        (ReasonCode.SERVER_BUSY, 3),
        (ReasonCode.BAD_USER_NAME_OR_PASSWORD, 4),
        (ReasonCode.NOT_AUTHORIZED, 5),
        (ReasonCode.BANNED, 5),
        (ReasonCode.MALFORMED_PACKET, None),
        (ReasonCode.PROTOCOL_ERROR, None),
    ],
)
def test_connect_return_code_MQTT_3_2_2_6(reason: int, code: int | None) -> None:
    """3.1.1 [MQTT-3.2.2-6]: with no applicable return code the Server closes without a CONNACK."""
    assert connect_return_code(reason) == code


# --- topic names, filters, shared subscriptions -------------------------------------------------------


@pytest.mark.parametrize("topic", ["a", "a/b", "/", "a//b", "$SYS/x", "ü/€", " "])
def test_valid_topic_names(topic: str) -> None:
    validate_topic_name(topic)


@pytest.mark.parametrize(
    ("topic", "rule"),
    [
        ("", "MQTT-4.7.3-1"),
        ("a/+", "MQTT-4.7.1-1"),
        ("a/#", "MQTT-4.7.1-1"),
        ("a+b", "MQTT-4.7.1-1"),
        ("a\x00b", "MQTT-4.7.3-2"),
        ("€" * 21_846, "MQTT-4.7.3-3"),
    ],
)
def test_invalid_topic_names_MQTT_4_7_1_1(topic: str, rule: str) -> None:
    with pytest.raises(MqttError) as info:
        validate_topic_name(topic)
    assert info.value.reason_code == ReasonCode.TOPIC_NAME_INVALID
    assert rule in info.value.message


@pytest.mark.parametrize(
    "topic_filter",
    ["a", "#", "+", "a/#", "a/+/b", "+/+", "/#", "a//+", "$share/g/a/#", "$share/g/+", "$share"],
)
def test_valid_topic_filters(topic_filter: str) -> None:
    validate_topic_filter(topic_filter)


@pytest.mark.parametrize(
    ("topic_filter", "rule"),
    [
        ("", "MQTT-4.7.3-1"),
        ("a/#/b", "MQTT-4.7.1-2"),
        ("a#", "MQTT-4.7.1-2"),
        ("#/", "MQTT-4.7.1-2"),
        ("a+", "MQTT-4.7.1-3"),
        ("a/+b/c", "MQTT-4.7.1-3"),
        ("a\x00", "MQTT-4.7.3-2"),
        ("$share//a", "MQTT-4.8.2-1"),
        ("$share/g", "MQTT-4.8.2-2"),
        ("$share/g/", "MQTT-4.8.2-2"),
        ("$share/g+/a", "MQTT-4.8.2-2"),
        ("$share/#/a", "MQTT-4.8.2-2"),
        ("$share/g/a#", "MQTT-4.7.1-2"),
    ],
)
def test_invalid_topic_filters_MQTT_4_7_1_2_and_3(topic_filter: str, rule: str) -> None:
    """3.1.1 [MQTT-4.7.1-2]/[MQTT-4.7.1-3] (5.0 [MQTT-4.7.1-1]/[MQTT-4.7.1-2]); shared: [MQTT-4.8.2-1..2]."""
    with pytest.raises(MqttError) as info:
        validate_topic_filter(topic_filter)
    assert info.value.reason_code == ReasonCode.TOPIC_FILTER_INVALID
    assert rule in info.value.message


@pytest.mark.parametrize(
    ("topic_filter", "expected"),
    [
        ("a/b", (None, "a/b")),
        ("$share/grp/a/+", ("grp", "a/+")),
        ("$share/g/#", ("g", "#")),
        ("$shared/g/a", (None, "$shared/g/a")),
        ("$share", (None, "$share")),
    ],
)
def test_parse_shared_MQTT_4_8_2_1(topic_filter: str, expected: tuple[str | None, str]) -> None:
    assert parse_shared(topic_filter) == expected


@pytest.mark.parametrize("topic_filter", ["$share//a", "$share/g", "$share/g/", "$share/a+b/c"])
def test_parse_shared_rejects_malformed_share_MQTT_4_8_2_2(topic_filter: str) -> None:
    with pytest.raises(MqttError) as info:
        parse_shared(topic_filter)
    assert info.value.reason_code == ReasonCode.TOPIC_FILTER_INVALID


def test_properties_repr_shows_only_present_properties() -> None:
    assert repr(Properties(topic_alias=3, user_properties=[("a", "b")])) == (
        "Properties(topic_alias=3, user_properties=[('a', 'b')])"
    )
