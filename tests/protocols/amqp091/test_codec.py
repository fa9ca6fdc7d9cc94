"""Tests of the AMQP 0-9-1 frame codec (protocols/amqp091/codec.py and the modules under it).

Byte vectors come from pamqp (generated from the spec) and by hand; each is fed whole, one byte at a
time and followed by the start of another frame. Our encoders must produce pamqp's bytes for the same
values; hypothesis round-trips properties, field tables and arbitrary chunking. Every error names its
reply code (AMQP 0-9-1 §1.2 constants).
"""

from __future__ import annotations

import datetime
import decimal
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import body as pamqp_body
from pamqp import commands
from pamqp import frame as pamqp_frame
from pamqp import header as pamqp_header
from pamqp import heartbeat as pamqp_heartbeat
from pamqp.commands import Basic, Connection, Queue

from broker.message import EMPTY_PROPERTIES, Properties
from protocols.amqp091 import constants, fieldtable
from protocols.amqp091.codec import (
    HEARTBEAT_FRAME,
    NEED_DATA,
    PROTOCOL_HEADER,
    AmqpFrameError,
    AmqpParser,
    AssemblerState,
    ContentAssembler,
    ContentBody,
    ContentHeader,
    Heartbeat,
    ParserState,
    ProtocolHeader,
    ProtocolHeaderError,
    encode_basic_ack,
    encode_basic_nack,
    encode_content,
    encode_delivery,
    encode_method,
    encode_properties,
)
from protocols.amqp091.methods import SPECS_BY_INDEX

#: The start of a following frame: it must stay buffered, never leak into the frame before it.
TRAILING = b"\x01\x00\x01\x00\x00\x00\x0d\x00\x3c"
FRAME_MAX = 131072


# --- helpers ------------------------------------------------------------------------------------------


def drain(parser: AmqpParser) -> list[tuple[int, object]]:
    frames: list[tuple[int, object]] = []
    while (item := parser.next_frame()) is not NEED_DATA:
        frames.append(item)
    return frames


def open_parser(frame_max: int = FRAME_MAX) -> AmqpParser:
    parser = AmqpParser(frame_max)
    parser.feed(PROTOCOL_HEADER)
    assert isinstance(parser.next_frame()[1], ProtocolHeader)  # type: ignore[index]
    return parser


def feed_whole(parser: AmqpParser, data: bytes) -> list[tuple[int, object]]:
    parser.feed(data)
    return drain(parser)


def feed_bytewise(parser: AmqpParser, data: bytes) -> list[tuple[int, object]]:
    frames = []
    for i in range(len(data)):
        parser.feed(data[i : i + 1])
        frames += drain(parser)
    return frames


def feed_with_trailing(parser: AmqpParser, data: bytes) -> list[tuple[int, object]]:
    parser.feed(data + TRAILING)
    frames = drain(parser)
    assert parser.buffered == len(TRAILING)
    return frames


FEEDERS = pytest.mark.parametrize(
    "feed", [feed_whole, feed_bytewise, feed_with_trailing], ids=["whole", "bytewise", "trailing"]
)


def describe(frame: object) -> object:
    """A comparable form of any frame (pamqp command objects have no __eq__)."""
    if isinstance(frame, ContentHeader):
        return ("header", frame.class_id, frame.weight, frame.body_size, frame.properties.as_dict())
    if isinstance(frame, ContentBody):
        return ("body", frame.value)
    if isinstance(frame, Heartbeat):
        return "heartbeat"
    if isinstance(frame, ProtocolHeader):
        return ("protocol header", frame.major_version, frame.minor_version, frame.revision)
    return (type(frame).__name__, {name: getattr(frame, name) for name in frame.__slots__})  # type: ignore[attr-defined]


def decode_one(
    data: bytes, feed: Callable[[AmqpParser, bytes], list[tuple[int, object]]] = feed_whole
) -> object:
    frames = feed(open_parser(), data)
    assert len(frames) == 1
    return frames[0][1]


def expect_error(data: bytes, code: int, *, frame_max: int = FRAME_MAX) -> AmqpFrameError:
    parser = open_parser(frame_max)
    parser.feed(data)
    with pytest.raises(AmqpFrameError) as info:
        drain(parser)
    assert info.value.reply_code == code, info.value
    assert parser.state is ParserState.ERROR
    # Sticky: the same error again, whatever arrives next.
    parser.feed(HEARTBEAT_FRAME)
    with pytest.raises(AmqpFrameError) as again:
        parser.next_frame()
    assert again.value is info.value
    return info.value


def frame(frame_type: int, channel: int, payload: bytes, end: bytes = b"\xce") -> bytes:
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + end


def pamqp_props(props: Properties) -> Basic.Properties:
    values = props.as_dict()
    if "type" in values:
        values["message_type"] = values.pop("type")
    if "timestamp" in values:
        values["timestamp"] = datetime.datetime.fromtimestamp(values["timestamp"], tz=datetime.UTC)
    return Basic.Properties(**values)


def pamqp_content(channel: int, method: Any, props: Properties, body: bytes, frame_max: int) -> bytes:
    parts = [
        pamqp_frame.marshal(method, channel),
        pamqp_frame.marshal(pamqp_header.ContentHeader(0, len(body), pamqp_props(props)), channel),
    ]
    chunk = frame_max - 8
    for offset in range(0, len(body), chunk):
        parts.append(pamqp_frame.marshal(pamqp_body.ContentBody(body[offset : offset + chunk]), channel))
    return b"".join(parts)


# --- protocol header (AMQP 0-9-1 §4.2.2) -------------------------------------------------------------


@FEEDERS
def test_protocol_header_is_accepted_then_frames_follow(feed: Callable[..., Any]) -> None:
    parser = AmqpParser()
    assert parser.state is ParserState.PROTOCOL_HEADER
    frames = feed(parser, PROTOCOL_HEADER + HEARTBEAT_FRAME)
    assert [describe(f) for _, f in frames] == [("protocol header", 0, 9, 1), "heartbeat"]
    assert parser.state is ParserState.FRAMES


@pytest.mark.parametrize(
    "header",
    [
        b"AMQP\x01\x01\x00\x09",  # 0-9 as some clients wrote it
        b"AMQP\x01\x01\x00\x0a",  # 0-10
        b"AMQP\x01\x01\x08\x00",  # 0-8
        b"AMQP\x00\x00\x09\x00",  # 0-9
        b"AMQP\x00\x01\x00\x00",  # 1.0
        b"AMQP\x03\x01\x00\x00",  # 1.0 SASL
    ],
)
def test_other_protocol_versions_are_answered_with_ours(header: bytes) -> None:
    parser = AmqpParser()
    parser.feed(header)
    with pytest.raises(ProtocolHeaderError) as info:
        parser.next_frame()
    assert info.value.response == b"AMQP\x00\x00\x09\x01"
    assert info.value.received == header
    assert parser.state is ParserState.ERROR
    with pytest.raises(ProtocolHeaderError):
        parser.next_frame()


def test_not_amqp_at_all_is_rejected_at_the_first_wrong_octet() -> None:
    parser = AmqpParser()
    parser.feed(b"G")
    with pytest.raises(ProtocolHeaderError) as info:
        parser.next_frame()
    assert info.value.received == b"G"


def test_a_partial_protocol_header_needs_data() -> None:
    parser = AmqpParser()
    parser.feed(b"AMQP\x00")
    assert parser.next_frame() is NEED_DATA
    parser.feed(b"\x00\x09\x01")
    assert describe(parser.next_frame()[1]) == ("protocol header", 0, 9, 1)  # type: ignore[index]


# --- method frames ------------------------------------------------------------------------------------

#: Values pamqp's validate() insists on (deprecated or reserved fields).
FIXED_ARGUMENTS = {
    "ticket": 0,
    "capabilities": "",
    "insist": False,
    "out_of_band": "0",
    "channel_id": "0",
    "known_hosts": "",
    "cluster_id": "",
}
SAMPLE_BY_TYPE: dict[str, Any] = {
    "octet": 7,
    "short": 300,
    "long": 70000,
    "longlong": 2**40 + 5,
    "shortstr": "name.1",
    "longstr": "long string ü",
    # Types and key order on which pamqp's encoder agrees with ours (see test_method_tables_keep_...).
    "table": {"flag": True, "nested": {"a": None, "b": ["c"]}, "x-dead-letter-exchange": "dlx"},
}


def sample_method(cls: Any) -> Any:
    method = cls.__new__(cls)
    for index, name in enumerate(cls.__slots__):
        kind = cls.amqp_type(name)
        if name in FIXED_ARGUMENTS:
            value = FIXED_ARGUMENTS[name]
        elif kind == "bit":
            value = index % 2 == 0  # alternate so every bit position is exercised
        else:
            value = SAMPLE_BY_TYPE[kind]
        setattr(method, name, value)
    return method


ALL_METHODS: list[tuple[int, Any]] = sorted(commands.INDEX_MAPPING.items())


@pytest.mark.parametrize("cls", [cls for _, cls in ALL_METHODS], ids=[cls.name for _, cls in ALL_METHODS])
def test_every_method_decodes_pamqp_bytes_and_encodes_them_back(cls: Any) -> None:
    method = sample_method(cls)
    wire = pamqp_frame.marshal(method, 5)
    for feed in (feed_whole, feed_bytewise, feed_with_trailing):
        frames = feed(open_parser(), wire)
        assert [(channel, describe(f)) for channel, f in frames] == [(5, describe(method))]
    assert encode_method(5, frames[0][1]) == wire  # type: ignore[arg-type]
    assert encode_method(5, method) == wire


def test_method_tables_keep_insertion_order_and_rabbitmq_types() -> None:
    # pamqp sorts keys and picks 'b' for 1; we keep order and write 'I', as RabbitMQ's Java client does.
    declare = Queue.Declare(queue="q", arguments={"x-max-length": 1, "x-dead-letter-exchange": "dlx"})
    wire = encode_method(1, declare)
    table = b"\x0cx-max-lengthI\x00\x00\x00\x01\x16x-dead-letter-exchangeS\x00\x00\x00\x03dlx"
    assert wire.endswith(struct.pack(">I", len(table)) + table + b"\xce")
    assert describe(decode_one(wire)) == describe(declare)


# Hand vectors for the per-message methods (their decoders are written by hand).
PUBLISH_VECTOR = bytes.fromhex(
    "01000100000017003c0028 0000 09616d712e746f706963 05612e622e63 03 ce".replace(" ", "")
)
ACK_VECTOR = bytes.fromhex("0100020000000d003c0050 000000000000002a 01 ce".replace(" ", ""))
NACK_VECTOR = bytes.fromhex("0100020000000d003c0078 0000000000000007 02 ce".replace(" ", ""))
REJECT_VECTOR = bytes.fromhex("0100020000000d003c005a 7fffffffffffffff 00 ce".replace(" ", ""))


@FEEDERS
@pytest.mark.parametrize(
    ("vector", "expected"),
    [
        (
            PUBLISH_VECTOR,
            Basic.Publish(exchange="amq.topic", routing_key="a.b.c", mandatory=True, immediate=True),
        ),
        (ACK_VECTOR, Basic.Ack(delivery_tag=42, multiple=True)),
        (NACK_VECTOR, Basic.Nack(delivery_tag=7, multiple=False, requeue=True)),
        (REJECT_VECTOR, Basic.Reject(delivery_tag=2**63 - 1, requeue=False)),
    ],
    ids=["publish", "ack", "nack", "reject"],
)
def test_hot_methods_hand_vectors(feed: Callable[..., Any], vector: bytes, expected: Any) -> None:
    assert pamqp_frame.marshal(expected, vector[2]) == vector  # the vector is what pamqp writes too
    assert describe(decode_one(vector, feed)) == describe(expected)
    assert encode_method(vector[2], expected) == vector


exchange_names = st.from_regex(r"[a-zA-Z0-9_.:-]{0,127}", fullmatch=True)
shortstrs = st.text(max_size=60)
# pamqp packs longlong signed, so tags it can write stop at 2**63 - 1 (ours go to 2**64 - 1).
delivery_tags = st.integers(0, 2**63 - 1)


@settings(max_examples=150, deadline=None)
@given(exchange=exchange_names, routing_key=shortstrs, mandatory=st.booleans(), immediate=st.booleans())
def test_publish_fast_path_matches_pamqp(
    exchange: str, routing_key: str, mandatory: bool, immediate: bool
) -> None:
    method = Basic.Publish(
        exchange=exchange, routing_key=routing_key, mandatory=mandatory, immediate=immediate
    )
    wire = pamqp_frame.marshal(method, 1)
    assert describe(decode_one(wire)) == describe(method)
    assert encode_method(1, method) == wire


@settings(max_examples=150, deadline=None)
@given(tag=delivery_tags, multiple=st.booleans(), requeue=st.booleans(), channel=st.integers(0, 65535))
def test_ack_nack_reject_fast_paths_match_pamqp(
    tag: int, multiple: bool, requeue: bool, channel: int
) -> None:
    for method in (Basic.Ack(tag, multiple), Basic.Nack(tag, multiple, requeue), Basic.Reject(tag, requeue)):
        wire = pamqp_frame.marshal(method, channel)
        assert describe(decode_one(wire)) == describe(method)
        assert encode_method(channel, method) == wire
    assert encode_basic_ack(channel, tag, multiple) == pamqp_frame.marshal(Basic.Ack(tag, multiple), channel)
    assert encode_basic_nack(channel, tag, multiple, requeue) == pamqp_frame.marshal(
        Basic.Nack(tag, multiple, requeue), channel
    )


def test_delivery_tags_use_all_64_bits() -> None:
    # longlong is unsigned (AMQP 0-9-1 §4.2.5.1); pamqp packs it signed and cannot write these.
    for wire in (encode_basic_ack(1, 2**64 - 1, True), encode_method(1, Basic.Ack(2**64 - 1, True))):
        assert describe(decode_one(wire)) == describe(Basic.Ack(2**64 - 1, True))
    wire = encode_delivery(1, "c", 2**64 - 1, False, "", "q", EMPTY_PROPERTIES, b"", FRAME_MAX)
    assert describe(feed_whole(open_parser(), wire)[0][1]) == describe(
        Basic.Deliver("c", 2**64 - 1, False, "", "q")
    )


# --- content header and body frames (AMQP 0-9-1 §4.2.6) ---------------------------------------------

# Hand vector: class 60, weight 0, body size 5, content_type + delivery_mode + headers {"k": "v"}.
HEADER_VECTOR = bytes.fromhex(
    "0200010000002c"
    "003c 0000 0000000000000005"
    "b000"
    "106170706c69636174696f6e2f6a736f6e"
    "00000008 016b 53 00000001 76"
    "02"
    "ce".replace(" ", "")
)
#: class 60, weight 0, body size 0: what opens every content header payload below.
HEADER_START = bytes.fromhex("003c00000000000000000000")


@FEEDERS
def test_content_header_hand_vector(feed: Callable[..., Any]) -> None:
    props = Properties(content_type="application/json", delivery_mode=2, headers={"k": "v"})
    assert describe(decode_one(HEADER_VECTOR, feed)) == ("header", 60, 0, 5, props.as_dict())
    assert pamqp_frame.marshal(pamqp_header.ContentHeader(0, 5, pamqp_props(props)), 1) == HEADER_VECTOR


@FEEDERS
def test_empty_properties_decode_to_the_shared_empty_properties(feed: Callable[..., Any]) -> None:
    header = decode_one(frame(2, 1, HEADER_START + b"\x00\x00"), feed)
    assert isinstance(header, ContentHeader)
    assert header.properties is EMPTY_PROPERTIES
    assert encode_properties(EMPTY_PROPERTIES) == b"\x00\x00"


@FEEDERS
def test_body_frame(feed: Callable[..., Any]) -> None:
    assert describe(decode_one(frame(3, 9, b"hello"), feed)) == ("body", b"hello")


def test_cluster_id_is_read_and_dropped() -> None:
    # flags: app_id (0x0008) + cluster_id (0x0004)
    header = decode_one(frame(2, 1, HEADER_START + b"\x00\x0c" + b"\x03app" + b"\x02c1"))
    assert isinstance(header, ContentHeader)
    assert header.properties.as_dict() == {"app_id": "app"}


def test_continuation_flag_words_without_properties_are_accepted() -> None:
    # delivery_mode + continuation bit, then an empty second flags word.
    header = decode_one(frame(2, 1, HEADER_START + bytes.fromhex("1001 0000 02".replace(" ", ""))))
    assert isinstance(header, ContentHeader)
    assert header.properties.as_dict() == {"delivery_mode": 2}


shortstr_values = st.text(max_size=40).filter(lambda s: len(s.encode()) <= 255)
octets = st.integers(0, 255)


def table_keys() -> st.SearchStrategy[str]:
    return st.text(max_size=20)


# Field values that decode back to themselves (float NaN excluded: NaN != NaN).
scalars = st.one_of(
    st.text(max_size=30),
    st.binary(max_size=30),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.builds(
        lambda mantissa, scale: decimal.Decimal(mantissa).scaleb(-scale),
        st.integers(-(2**31), 2**31 - 1),
        st.integers(0, 20),
    ),
    st.integers(0, 253402300799).map(
        lambda s: datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(seconds=s)
    ),
    st.none(),
)
field_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(table_keys(), children, max_size=4),
    max_leaves=12,
)
tables = st.dictionaries(table_keys(), field_values, max_size=6)

properties_strategy = st.builds(
    Properties,
    content_type=st.none() | shortstr_values,
    content_encoding=st.none() | shortstr_values,
    headers=st.none() | tables,
    delivery_mode=st.none() | octets,
    priority=st.none() | octets,
    correlation_id=st.none() | shortstr_values,
    reply_to=st.none() | shortstr_values,
    expiration=st.none() | shortstr_values,
    message_id=st.none() | shortstr_values,
    timestamp=st.none() | st.integers(0, 2**64 - 1),
    type=st.none() | shortstr_values,
    user_id=st.none() | shortstr_values,
    app_id=st.none() | shortstr_values,
)


@settings(max_examples=300, deadline=None)
@given(props=properties_strategy, body_size=st.integers(0, 2**64 - 1))
def test_properties_round_trip(props: Properties, body_size: int) -> None:
    encoded = encode_properties(props)
    wire = frame(2, 3, struct.pack(">HHQ", 60, 0, body_size) + encoded)
    header = decode_one(wire)
    assert isinstance(header, ContentHeader)
    assert header.body_size == body_size
    assert header.properties == props
    assert encode_properties(header.properties) == encoded  # decode -> encode keeps the bytes


# Values whose encoding pamqp shares with us: non-empty strings (pamqp drops ''), no ints or floats in
# headers (pamqp picks 'b'/'s'/'f'), keys pre-sorted (pamqp sorts them), keys up to 128 octets.
pamqp_scalars = st.one_of(st.text(max_size=20), st.booleans(), st.none())
pamqp_values = st.recursive(
    pamqp_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3)
    ),
    max_leaves=8,
)


def sort_tables(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: sort_tables(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [sort_tables(item) for item in value]
    return value


nonempty_shortstrs = st.text(min_size=1, max_size=40).filter(lambda s: len(s.encode()) <= 255)
pamqp_properties = st.builds(
    Properties,
    content_type=st.none() | nonempty_shortstrs,
    content_encoding=st.none() | nonempty_shortstrs,
    headers=st.none() | st.dictionaries(st.text(max_size=10), pamqp_values, max_size=4).map(sort_tables),
    delivery_mode=st.none() | st.sampled_from([1, 2]),
    priority=st.none() | octets,
    correlation_id=st.none() | nonempty_shortstrs,
    reply_to=st.none() | nonempty_shortstrs,
    expiration=st.none() | nonempty_shortstrs,
    message_id=st.none() | nonempty_shortstrs,
    timestamp=st.none() | st.integers(0, 2**32),
    type=st.none() | nonempty_shortstrs,
    user_id=st.none() | nonempty_shortstrs,
    app_id=st.none() | nonempty_shortstrs,
)


@settings(max_examples=200, deadline=None)
@given(
    props=pamqp_properties,
    consumer_tag=st.text(min_size=1, max_size=30),
    tag=delivery_tags,
    redelivered=st.booleans(),
    exchange=exchange_names,
    routing_key=shortstrs,
    body=st.binary(max_size=9000),
    frame_max=st.sampled_from([4096, 5000, FRAME_MAX]),
    channel=st.integers(1, 65535),
)
def test_delivery_fast_path_is_byte_identical_to_pamqp(
    props: Properties,
    consumer_tag: str,
    tag: int,
    redelivered: bool,
    exchange: str,
    routing_key: str,
    body: bytes,
    frame_max: int,
    channel: int,
) -> None:
    deliver = Basic.Deliver(consumer_tag, tag, redelivered, exchange, routing_key)
    expected = pamqp_content(channel, deliver, props, body, frame_max)
    assert encode_content(channel, deliver, props, body, frame_max) == expected
    assert (
        encode_delivery(
            channel,
            consumer_tag.encode(),
            tag,
            redelivered,
            exchange,
            routing_key.encode(),
            encode_properties(props),
            body,
            frame_max,
        )
        == expected
    )
    # And our parser and assembler read it back.
    parser = open_parser(frame_max)
    assembler = ContentAssembler()
    commands_out = [cmd for _, f in feed_whole(parser, expected) if (cmd := assembler.process(f)) is not None]  # type: ignore[arg-type]
    assert len(commands_out) == 1
    method, got_props, got_body = commands_out[0]
    assert describe(method) == describe(deliver)
    assert got_props == props
    assert got_body == body


@pytest.mark.parametrize(
    "method",
    [
        Basic.GetOk(delivery_tag=9, redelivered=True, exchange="ex", routing_key="rk", message_count=3),
        Basic.Return(reply_code=312, reply_text="NO_ROUTE", exchange="ex", routing_key="rk"),
        Basic.Publish(exchange="ex", routing_key="rk"),
    ],
    ids=lambda m: m.name,
)
def test_other_content_methods_match_pamqp(method: Any) -> None:
    props = Properties(content_type="text/plain", delivery_mode=2, timestamp=1700000000)
    body = b"b" * 10000
    assert encode_content(4, method, props, body, 4096) == pamqp_content(4, method, props, body, 4096)


def test_body_is_cut_at_frame_max_and_not_at_all_with_frame_max_0() -> None:
    body = bytes(range(256)) * 40  # 10240 octets
    wire = encode_content(1, Basic.Deliver("c", 1, False, "", "q"), EMPTY_PROPERTIES, body, 4096)
    frames = feed_whole(open_parser(4096), wire)
    bodies = [f.value for _, f in frames if isinstance(f, ContentBody)]
    assert [len(b) for b in bodies] == [4088, 4088, 2064]
    assert b"".join(bodies) == body
    unlimited = encode_content(1, Basic.Deliver("c", 1, False, "", "q"), EMPTY_PROPERTIES, body, 0)
    assert (
        len([f for _, f in feed_whole(open_parser(FRAME_MAX), unlimited) if isinstance(f, ContentBody)]) == 1
    )


def test_empty_body_sends_no_body_frame() -> None:
    wire = encode_content(1, Basic.Deliver("c", 1, False, "", "q"), EMPTY_PROPERTIES, b"", FRAME_MAX)
    kinds = [type(f).__name__ for _, f in feed_whole(open_parser(), wire)]
    assert kinds == ["Deliver", "ContentHeader"]


def test_delivery_names_longer_than_a_shortstr_are_refused() -> None:
    with pytest.raises(ValueError):
        encode_delivery(1, "c", 1, False, "", "a" * 256, EMPTY_PROPERTIES, b"", FRAME_MAX)


def test_heartbeat_frame_is_pamqps() -> None:
    assert pamqp_heartbeat.Heartbeat.marshal() == HEARTBEAT_FRAME


# --- field tables (RabbitMQ's errata types) ----------------------------------------------------------


def table_bytes(*entries: bytes) -> bytes:
    body = b"".join(entries)
    return struct.pack(">I", len(body)) + body


def entry(key: bytes, value: bytes) -> bytes:
    return bytes((len(key),)) + key + value


def test_every_errata_type_decodes() -> None:
    wire = table_bytes(
        entry(b"t", b"t\x01"),
        entry(b"b", b"b\xff"),
        entry(b"B", b"B\xff"),
        entry(b"s", b"s\xff\xfe"),
        entry(b"u", b"u\xff\xfe"),
        entry(b"I", b"I\xff\xff\xff\xfe"),
        entry(b"i", b"i\xff\xff\xff\xfe"),
        entry(b"l", b"l" + struct.pack(">q", -(2**40))),
        entry(b"L", b"L" + struct.pack(">q", 2**40)),
        entry(b"f", b"f" + struct.pack(">f", 1.5)),
        entry(b"d", b"d" + struct.pack(">d", 0.1)),
        entry(b"D", b"D\x02" + struct.pack(">i", -12345)),
        entry(b"S", b"S\x00\x00\x00\x03abc"),
        entry(b"S-binary", b"S\x00\x00\x00\x02\xff\xfe"),
        entry(b"x", b"x\x00\x00\x00\x02\x00\x01"),
        entry(b"T", b"T" + struct.pack(">Q", 1700000000)),
        entry(b"T-far", b"T" + struct.pack(">Q", 2**62)),
        entry(b"V", b"V"),
        entry(b"A", b"A" + table_bytes(b"I\x00\x00\x00\x01", b"S\x00\x00\x00\x01a")),
        entry(b"F", b"F" + table_bytes(entry(b"k", b"V"))),
    )
    table, end = fieldtable.decode_table(wire, 0, len(wire))
    assert end == len(wire)
    assert table == {
        "t": True,
        "b": -1,
        "B": 255,
        "s": -2,
        "u": 65534,
        "I": -2,
        "i": 4294967294,
        "l": -(2**40),
        "L": 2**40,
        "f": 1.5,
        "d": 0.1,
        "D": decimal.Decimal("-123.45"),
        "S": "abc",
        "S-binary": b"\xff\xfe",
        "x": b"\x00\x01",
        "T": datetime.datetime(2023, 11, 14, 22, 13, 20, tzinfo=datetime.UTC),
        "T-far": 2**62,
        "V": None,
        "A": [1, "a"],
        "F": {"k": None},
    }
    assert str(table["D"]) == "-123.45"


def x_death_bytes() -> bytes:
    """An x-death header as a broker writes it: an array of tables ('l' for the count, 'T', 'S', 'A')."""
    death = table_bytes(
        entry(b"count", b"l" + struct.pack(">q", 2**33)),
        entry(b"reason", b"S\x00\x00\x00\x08rejected"),
        entry(b"queue", b"S\x00\x00\x00\x06orders"),
        entry(b"time", b"T" + struct.pack(">Q", 1700000000)),
        entry(b"exchange", b"S\x00\x00\x00\x00"),
        entry(b"routing-keys", b"A" + table_bytes(b"S\x00\x00\x00\x06orders")),
        entry(b"retries", b"I\x00\x00\x00\x03"),
        entry(b"trace", b"x\x00\x00\x00\x02\xca\xfe"),
    )
    return table_bytes(entry(b"x-death", b"A" + table_bytes(b"F" + death)))


def test_x_death_round_trips_byte_for_byte() -> None:
    wire = x_death_bytes()
    table, _ = fieldtable.decode_table(wire, 0, len(wire))
    assert table == {
        "x-death": [
            {
                "count": 2**33,
                "reason": "rejected",
                "queue": "orders",
                "time": datetime.datetime(2023, 11, 14, 22, 13, 20, tzinfo=datetime.UTC),
                "exchange": "",
                "routing-keys": ["orders"],
                "retries": 3,
                "trace": b"\xca\xfe",
            }
        ]
    }
    assert fieldtable.encode_table(table) == wire


@settings(max_examples=300, deadline=None)
@given(table=tables)
def test_field_tables_round_trip(table: dict[str, Any]) -> None:
    wire = fieldtable.encode_table(table)
    decoded, end = fieldtable.decode_table(wire, 0, len(wire))
    assert end == len(wire)
    assert decoded == table
    assert fieldtable.encode_table(decoded) == wire


@settings(max_examples=100, deadline=None)
@given(table=st.dictionaries(st.text(max_size=10), pamqp_values, max_size=5).map(sort_tables))
def test_field_tables_match_pamqp_where_types_agree(table: dict[str, Any]) -> None:
    from pamqp import encode as pamqp_encode

    assert fieldtable.encode_table(table) == pamqp_encode.field_table(table)


def test_encoding_picks_rabbitmq_types() -> None:
    wire = fieldtable.encode_table(
        {
            "small": 5,
            "big": 2**40,
            "float": 0.5,
            "bytes": b"\x00",
            "tuple": (1,),
            "naive": datetime.datetime(2020, 1, 1),
        }
    )
    assert wire == table_bytes(
        entry(b"small", b"I\x00\x00\x00\x05"),
        entry(b"big", b"l" + struct.pack(">q", 2**40)),
        entry(b"float", b"d" + struct.pack(">d", 0.5)),
        entry(b"bytes", b"x\x00\x00\x00\x01\x00"),
        entry(b"tuple", b"A" + table_bytes(b"I\x00\x00\x00\x01")),
        entry(b"naive", b"T" + struct.pack(">Q", 1577836800)),
    )


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ({"n": 2**64}, ValueError),
        ({"o": object()}, TypeError),
        ({"k" * 256: 1}, ValueError),
        ({"d": decimal.Decimal("NaN")}, ValueError),
        ({"d": decimal.Decimal(2**40)}, ValueError),
        ({"t": datetime.datetime(1960, 1, 1, tzinfo=datetime.UTC)}, ValueError),
    ],
)
def test_unencodable_values_are_our_error(table: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        fieldtable.encode_table(table)


# --- errors: frames (501), syntax (502), unknown methods (540) ---------------------------------------


def test_wrong_frame_end_is_a_frame_error() -> None:
    error = expect_error(frame(1, 1, ACK_VECTOR[7:-1], end=b"\x00"), constants.FRAME_ERROR)
    assert error.reply_text.startswith("FRAME_ERROR - frame-end")
    assert error.is_hard


def test_frame_above_frame_max_is_refused_before_its_payload_arrives() -> None:
    header_only = struct.pack(">BHI", 3, 1, 4096 - 8 + 1)
    expect_error(header_only, constants.FRAME_ERROR, frame_max=4096)
    # Exactly frame_max is fine.
    parser = open_parser(4096)
    assert describe(feed_whole(parser, frame(3, 1, b"x" * (4096 - 8)))[0][1]) == ("body", b"x" * 4088)


def test_frame_max_can_be_renegotiated_but_not_below_the_minimum() -> None:
    parser = AmqpParser()
    assert parser.frame_max == FRAME_MAX
    parser.frame_max = 8192
    assert parser.frame_max == 8192
    with pytest.raises(ValueError):
        parser.frame_max = 4095


def test_unknown_frame_type_is_a_frame_error_without_waiting_for_its_payload() -> None:
    expect_error(struct.pack(">BHI", 4, 1, 100), constants.FRAME_ERROR)
    expect_error(frame(0, 1, b""), constants.FRAME_ERROR)


@pytest.mark.parametrize("bad", [frame(8, 1, b""), frame(8, 0, b"x")], ids=["channel-1", "payload"])
def test_malformed_heartbeat_is_a_frame_error(bad: bytes) -> None:
    expect_error(bad, constants.FRAME_ERROR)


def test_unknown_method_is_not_implemented_with_its_ids() -> None:
    error = expect_error(frame(1, 1, struct.pack(">HH", 60, 999)), constants.NOT_IMPLEMENTED)
    assert (error.class_id, error.method_id) == (60, 999)
    assert "class 60 method 999" in error.text


@pytest.mark.parametrize(
    ("payload", "ids", "detail"),
    [
        (b"\x00\x3c", (0, 0), "no method ids"),
        (Queue.Declare.index.to_bytes(4, "big") + b"\x00\x00\x01q", (50, 10), "Queue.Declare.passive"),
        (pamqp_frame.marshal(Basic.Ack(1), 1)[7:-1] + b"\x00", (60, 80), "octets after the last argument"),
        (PUBLISH_VECTOR[7:-1].replace(b"a.b.c", b"a.\xff.c"), (60, 40), "Basic.Publish.routing_key"),
        (PUBLISH_VECTOR[7:-1][:-1], (60, 40), "Basic.Publish"),
        (
            Connection.StartOk.index.to_bytes(4, "big") + b"\x00\x00\x00\x03\x01aZ",
            (10, 11),
            "unknown field type 'Z'",
        ),
        (Connection.StartOk.index.to_bytes(4, "big") + b"\x00\x00\x00\x09", (10, 11), "runs past"),
    ],
    ids=["no-ids", "truncated", "trailing", "bad-utf8", "publish-truncated", "table-type", "table-length"],
)
def test_undecodable_methods_are_syntax_errors_with_ids(
    payload: bytes, ids: tuple[int, int], detail: str
) -> None:
    error = expect_error(frame(1, 1, payload), constants.SYNTAX_ERROR)
    assert (error.class_id, error.method_id) == ids
    assert detail in error.text


def test_deeply_nested_tables_are_a_syntax_error_not_a_crash() -> None:
    nested = b"V"
    for _ in range(fieldtable.MAX_DEPTH + 2):
        nested = b"A" + table_bytes(nested)
    payload = Connection.StartOk.index.to_bytes(4, "big") + table_bytes(entry(b"k", nested))
    error = expect_error(frame(1, 0, payload + b"\x05PLAIN\x00\x00\x00\x00\x05en_US"), constants.SYNTAX_ERROR)
    assert "nested deeper" in error.text


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (HEADER_START[:-1] + b"\x00", constants.FRAME_ERROR),  # no room for the property flags
        (b"\x00\x32" + HEADER_START[2:] + b"\x00\x00", constants.UNEXPECTED_FRAME),  # class 50 (queue)
        (HEADER_START + b"\x80\x00\x05ab", constants.SYNTAX_ERROR),  # content_type truncated
        (HEADER_START + b"\x10\x00\x02\x00", constants.SYNTAX_ERROR),  # an octet after the last property
        (HEADER_START + b"\x00\x00\x00", constants.SYNTAX_ERROR),  # an octet after no properties
        (HEADER_START + b"\x00\x01\x80\x00\x00", constants.SYNTAX_ERROR),  # a property in flags word 2
        (HEADER_START + b"\x20\x00\x00\x00\x00\x03\x01kZ", constants.SYNTAX_ERROR),  # headers: type 'Z'
    ],
    ids=["short", "class-50", "truncated", "trailing", "trailing-empty", "unknown-flags", "bad-headers"],
)
def test_malformed_content_headers(payload: bytes, code: int) -> None:
    expect_error(frame(2, 1, payload), code)


def test_errors_render_with_their_reply_code() -> None:
    error = AmqpFrameError(constants.SYNTAX_ERROR, "bad", 60, 40)
    assert error.reply_text == "SYNTAX_ERROR - bad"
    assert str(error) == "502 SYNTAX_ERROR - bad (class 60, method 40)"
    assert not AmqpFrameError(constants.NOT_FOUND, "no queue").is_hard


def test_feed_after_an_error_is_ignored() -> None:
    parser = open_parser()
    parser.feed(frame(4, 1, b""))
    with pytest.raises(AmqpFrameError):
        parser.next_frame()
    parser.feed(HEARTBEAT_FRAME)
    assert parser.buffered == 0


# --- chunking ------------------------------------------------------------------------------------------


def mixed_stream() -> bytes:
    props = Properties(content_type="text/plain", headers={"k": [1, "v", {"n": None}]}, delivery_mode=2)
    return b"".join(
        (
            HEARTBEAT_FRAME,
            pamqp_frame.marshal(Basic.Publish(exchange="amq.topic", routing_key="a.b"), 1),
            pamqp_frame.marshal(pamqp_header.ContentHeader(0, 10, pamqp_props(props)), 1),
            pamqp_frame.marshal(pamqp_body.ContentBody(b"0123456789"), 1),
            pamqp_frame.marshal(Queue.Declare(queue="q", durable=True, arguments={"x-max-length": 1}), 2),
            pamqp_frame.marshal(Basic.Ack(12, True), 1),
            pamqp_frame.marshal(pamqp_body.ContentBody(b""), 3),
        )
    )


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(0, len(mixed_stream())), max_size=12))
def test_arbitrary_chunking_gives_the_same_frames(cuts: list[int]) -> None:
    stream = mixed_stream()
    expected = [(channel, describe(f)) for channel, f in feed_whole(open_parser(), stream)]
    assert len(expected) == 7
    parser = open_parser()
    got = []
    edges = [0, *sorted(cuts), len(stream)]
    for start, stop in zip(edges, edges[1:], strict=False):
        got += [(channel, describe(f)) for channel, f in feed_whole(parser, stream[start:stop])]
    assert got == expected
    assert parser.buffered == 0


# --- content assembly (AMQP 0-9-1 §4.2.6) ------------------------------------------------------------

PUBLISH = Basic.Publish(exchange="ex", routing_key="rk")
PROPS = Properties(delivery_mode=2)


def header(body_size: int) -> ContentHeader:
    return ContentHeader(60, 0, body_size, PROPS)


def test_publish_header_and_body_frames_assemble_into_one_command() -> None:
    assembler = ContentAssembler()
    assert assembler.process(PUBLISH) is None
    assert assembler.state is AssemblerState.EXPECT_HEADER
    assert assembler.process(header(10)) is None
    assert assembler.state is AssemblerState.EXPECT_BODY
    assert assembler.process(ContentBody(b"01234")) is None
    assert assembler.process(ContentBody(b"")) is None
    assert assembler.process(ContentBody(b"56789")) == (PUBLISH, PROPS, b"0123456789")
    assert assembler.state is AssemblerState.EXPECT_METHOD


def test_a_single_body_frame_is_passed_through_without_copying() -> None:
    body = b"x" * 100
    assembler = ContentAssembler()
    assembler.process(PUBLISH)
    assembler.process(header(100))
    command = assembler.process(ContentBody(body))
    assert command is not None and command[2] is body


def test_body_size_zero_completes_at_the_header() -> None:
    assembler = ContentAssembler()
    assembler.process(PUBLISH)
    assert assembler.process(header(0)) == (PUBLISH, PROPS, b"")
    assert assembler.state is AssemblerState.EXPECT_METHOD


def test_methods_without_content_pass_straight_through() -> None:
    ack = Basic.Ack(1)
    assert ContentAssembler().process(ack) == (ack, None, None)


def assemble_error(frames: list[Any], code: int) -> AmqpFrameError:
    assembler = ContentAssembler(max_body_size=1000)
    with pytest.raises(AmqpFrameError) as info:
        for f in frames:
            assembler.process(f)
    assert info.value.reply_code == code
    return info.value


def test_body_frame_without_a_content_method_is_unexpected() -> None:
    error = assemble_error([ContentBody(b"x")], constants.UNEXPECTED_FRAME)
    assert error.text == "expected method frame, got non method frame instead"
    assemble_error([header(1)], constants.UNEXPECTED_FRAME)


def test_method_before_the_header_is_unexpected() -> None:
    error = assemble_error([PUBLISH, Basic.Ack(1)], constants.UNEXPECTED_FRAME)
    assert (error.class_id, error.method_id) == (60, 40)
    assert "expected content header" in error.text


def test_method_while_body_is_incomplete_is_unexpected() -> None:
    error = assemble_error([PUBLISH, header(10), ContentBody(b"x"), PUBLISH], constants.UNEXPECTED_FRAME)
    assert (error.class_id, error.method_id) == (60, 40)
    assert "expected content body" in error.text
    assemble_error([PUBLISH, header(10), header(10)], constants.UNEXPECTED_FRAME)


def test_body_beyond_body_size_is_a_frame_error() -> None:
    assemble_error([PUBLISH, header(3), ContentBody(b"x"), ContentBody(b"xxx")], constants.FRAME_ERROR)


def test_body_size_above_the_limit_is_a_frame_error() -> None:
    error = assemble_error([PUBLISH, header(1001)], constants.FRAME_ERROR)
    assert "exceeds maximum allowed size 1000" in error.text


def test_connection_level_frames_are_not_for_the_assembler() -> None:
    with pytest.raises(TypeError):
        ContentAssembler().process(Heartbeat())  # type: ignore[arg-type]


def test_assembler_recovers_after_an_error() -> None:
    assembler = ContentAssembler()
    with pytest.raises(AmqpFrameError):
        assembler.process(ContentBody(b"x"))
    assert assembler.state is AssemblerState.EXPECT_METHOD
    assert assembler.process(Basic.Ack(1)) is not None


def test_specs_cover_rabbitmq_extensions() -> None:
    names = {spec.cls.name for spec in SPECS_BY_INDEX.values()}
    assert {"Confirm.Select", "Basic.Nack", "Exchange.Bind", "Connection.Blocked"} <= names
