"""storage.serial: round-trips of every record, pinned byte vectors, and hostile input.

The decoder reads records a standby receives from the network, so besides round-trips these
tests feed it every truncation, trailing bytes, corrupted lengths and random bytes, and require
a SerialError (never another exception, never a hang).
"""

from __future__ import annotations

import datetime
import decimal
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.journal import (
    BindingAdded,
    BindingRemoved,
    ExchangeDeclared,
    ExchangeDeleted,
    MessageEnqueued,
    MessageRemoved,
    QueueDeclared,
    QueueDeleted,
    QueuePurged,
    Record,
    RetainedCleared,
    RetainedSet,
    SessionDeleted,
    SessionSaved,
)
from broker.message import Message, Properties
from storage.serial import (
    FORMAT_VERSION,
    MAX_DEPTH,
    SerialError,
    decode_message,
    decode_properties,
    decode_record,
    decode_table,
    encode_message,
    encode_properties,
    encode_record,
    encode_table,
)

# Names may hold any code point, lone surrogates included (they pass through 'surrogatepass').
names = st.text(st.characters(exclude_categories=()), max_size=20)
timezones = st.none() | st.builds(
    datetime.timezone, st.timedeltas(datetime.timedelta(hours=-23), datetime.timedelta(hours=23))
)
scalars = (
    st.decimals(allow_nan=False)
    | st.datetimes(timezones=timezones)
    | st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False)
    | names
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(names, children, max_size=4),
    max_leaves=12,
)
tables = st.dictionaries(names, values, max_size=5)

properties = st.builds(
    Properties,
    content_type=st.none() | names,
    content_encoding=st.none() | names,
    headers=st.none() | tables,
    delivery_mode=st.none() | st.integers(0, 255),
    priority=st.none() | st.integers(0, 255),
    correlation_id=st.none() | names,
    reply_to=st.none() | names,
    expiration=st.none() | names,
    message_id=st.none() | names,
    timestamp=st.none() | st.integers(0, 2**64 - 1),
    type=st.none() | names,
    user_id=st.none() | names,
    app_id=st.none() | names,
)
messages = st.builds(
    Message,
    exchange=names,
    routing_key=names,
    body=st.binary(max_size=300),
    properties=properties,
    msg_id=st.integers(0, 2**63 - 1),
    expires_at=st.none() | st.floats(allow_nan=False),
    retain=st.booleans(),
)
records: st.SearchStrategy[Record] = st.one_of(
    st.builds(ExchangeDeclared, names, names, names, st.booleans(), st.booleans(), tables),
    st.builds(ExchangeDeleted, names, names),
    st.builds(QueueDeclared, names, names, st.booleans(), tables),
    st.builds(QueueDeleted, names, names),
    st.builds(QueuePurged, names, names),
    st.builds(BindingAdded, names, names, names, st.booleans(), names, tables),
    st.builds(BindingRemoved, names, names, names, st.booleans(), names, tables),
    st.builds(
        MessageEnqueued,
        names,
        st.lists(names, max_size=4).map(tuple),
        messages,
        st.booleans(),
    ),
    st.builds(MessageRemoved, names, names, st.integers(-(2**63), 2**63 - 1)),
    st.builds(RetainedSet, names, names, messages),
    st.builds(RetainedCleared, names, names),
    st.builds(SessionSaved, names, names, st.binary(max_size=100)),
    st.builds(SessionDeleted, names, names),
)


def message_fields(message: Message) -> tuple[Any, ...]:
    return (
        message.exchange,
        message.routing_key,
        message.body,
        message.properties,
        message.msg_id,
        message.expires_at,
        message.retain,
    )


def comparable(record: Record) -> tuple[Any, ...]:
    """A record as plain values (Message has no __eq__: compare its stored fields)."""
    return tuple(
        message_fields(value) if isinstance(value, Message) else value
        for value in (getattr(record, name) for name in record.__slots__)
    )


# --- round-trips ----------------------------------------------------------------------------------


@given(records)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_every_record_round_trips(record: Record) -> None:
    data = encode_record(record)
    decoded = decode_record(data)
    assert type(decoded) is type(record)
    assert comparable(decoded) == comparable(record)
    assert decode_record(bytearray(data)) is not None and decode_record(memoryview(data)) is not None


@given(properties)
def test_properties_round_trip(props: Properties) -> None:
    assert decode_properties(encode_properties(props)) == props


@given(messages)
def test_message_round_trips_without_its_origin(message: Message) -> None:
    message.origin = object()
    decoded = decode_message(encode_message(message))
    assert message_fields(decoded) == message_fields(message)
    assert decoded.origin is None


@given(tables)
def test_tables_round_trip_and_canonical_form_ignores_key_order(table: dict[str, Any]) -> None:
    assert decode_table(encode_table(table)) == table
    reordered = dict(reversed(table.items()))
    assert encode_table(reordered, canonical=True) == encode_table(table, canonical=True)
    assert decode_table(encode_table(table, canonical=True)) == table


def test_lone_surrogates_in_names_round_trip() -> None:
    # Names decoded with 'surrogateescape' somewhere upstream must not kill the writer thread.
    record = MessageEnqueued("v\udc80", ("q\ud800",), Message("e\udfff", "k", b"", Properties(type="\ud83d")))
    decoded = decode_record(encode_record(record))
    assert comparable(decoded) == comparable(record)


def test_amqp_decimal_and_timestamp_values_keep_their_type_and_precision() -> None:
    # The AMQP codec decodes field types 'D' and 'T' to these.
    table = {
        "price": decimal.Decimal("-12.3400"),
        "when": datetime.datetime(2024, 5, 1, 12, 0, 1, tzinfo=datetime.UTC),
        "local": datetime.datetime(2024, 5, 1, 12, 0, 1, 250),
    }
    decoded = decode_table(encode_table(table))
    assert decoded == table
    assert str(decoded["price"]) == "-12.3400"
    assert decoded["when"].tzinfo is not None and decoded["local"].tzinfo is None


def test_float_specials_and_big_ints_round_trip() -> None:
    table = {"inf": math.inf, "-0": -0.0, "big": -(2**200), "edge": 2**63 - 1, "over": 2**63}
    decoded = decode_table(encode_table(table))
    assert decoded == table and math.copysign(1, decoded["-0"]) == -1
    assert math.isnan(decode_table(encode_table({"nan": math.nan}))["nan"])


def test_subclasses_of_value_types_are_stored_as_their_base_type() -> None:
    import enum

    class Level(enum.IntEnum):
        HIGH = 3

    class Name(str):
        pass

    decoded = decode_table(encode_table({"level": Level.HIGH, "name": Name("x"), "t": (1, 2)}))
    assert decoded == {"level": 3, "name": "x", "t": [1, 2]}
    assert type(decoded["level"]) is int and type(decoded["name"]) is str


# --- pinned byte vectors (the format is shared with a standby: changes must be deliberate) ---------


def test_message_removed_vector() -> None:
    data = bytes([FORMAT_VERSION, 9]) + (7).to_bytes(8, "little", signed=True)
    data += (1).to_bytes(4, "little") + (2).to_bytes(4, "little") + b"/q1"
    assert encode_record(MessageRemoved("/", "q1", 7)) == data
    assert decode_record(data) == MessageRemoved("/", "q1", 7)


def test_persistent_message_enqueued_vector() -> None:
    record = MessageEnqueued("/", ("q",), Message("", "q", b"hi", Properties(delivery_mode=2), 5))
    data = encode_record(record)
    expected = (
        b"\x01\x08"  # version, tag
        b"\x01"  # durable
        b"\x01\x00\x00\x00"  # one queue
        b"\x01\x00\x00\x00/"  # vhost
        b"\x01\x00\x00\x00q"  # queue
        b"\x00"  # message flags
        b"\x05\x00\x00\x00\x00\x00\x00\x00"  # msg_id
        b"\x00\x00\x00\x00\x00\x00\x00\x00"  # expires_at (absent)
        b"\x00\x00\x00\x00\x01\x00\x00\x00\x03\x00\x00\x00\x02\x00\x00\x00"  # lengths
        b"q"  # routing key
        b"\x08\x00\x02"  # properties: delivery_mode=2
        b"hi"
    )
    assert data == expected


def test_session_saved_vector() -> None:
    data = b"\x01\x0c\x01\x00\x00\x00/\x01\x00\x00\x00c\x02\x00\x00\x00\x00\xff"
    assert encode_record(SessionSaved("/", "c", b"\x00\xff")) == data
    assert decode_record(data) == SessionSaved("/", "c", b"\x00\xff")


# --- hostile input ----------------------------------------------------------------------------------


@given(records)
@settings(max_examples=50, suppress_health_check=[HealthCheck.too_slow])
def test_every_truncation_and_any_trailing_bytes_are_refused(record: Record) -> None:
    data = encode_record(record)
    for end in range(len(data)):
        with pytest.raises(SerialError):
            decode_record(data[:end])
    with pytest.raises(SerialError, match="trailing"):
        decode_record(data + b"\x00")


@given(st.binary(max_size=200))
def test_random_bytes_raise_only_serial_error(data: bytes) -> None:
    try:
        decode_record(data)
    except SerialError:
        pass


@given(records, st.data())
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_corrupted_records_raise_only_serial_error(record: Record, data: st.DataObject) -> None:
    encoded = bytearray(encode_record(record))
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(encoded) - 1))
        encoded[index] = data.draw(st.integers(0, 255))
    try:
        decode_record(bytes(encoded))
    except SerialError:
        pass


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated head"),
        (b"\x02\x09", "unsupported format version 2"),
        (b"\x01\xee", "unknown tag 238"),
        # SessionSaved whose vhost length claims 4 GiB.
        (b"\x01\x0c\xff\xff\xff\xff/", r"SessionSaved\.vhost: length 4294967295 exceeds the data"),
        # ExchangeDeleted with invalid UTF-8 in its name.
        (b"\x01\x02\x01\x00\x00\x00/\x01\x00\x00\x00\xc3", r"ExchangeDeleted\.name: invalid UTF-8"),
        # QueueDeclared whose auto_delete byte is not a bool.
        (b"\x01\x03\x00\x00\x00\x00\x00\x00\x00\x00\x07", r"QueueDeclared\.auto_delete: invalid bool 7"),
        # QueueDeclared whose arguments table claims a billion entries.
        (
            b"\x01\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x40",
            r"QueueDeclared\.arguments: table of 1073741824 entries exceeds the data",
        ),
        # MessageEnqueued claiming a billion queue names.
        (b"\x01\x08\x01\x00\x00\x00\x40\x00\x00\x00\x00", r"MessageEnqueued\.queues: 1073741824 names"),
    ],
)
def test_malformed_records_name_the_field(data: bytes, message: str) -> None:
    with pytest.raises(SerialError, match=message):
        decode_record(data)


def test_invalid_decimal_and_datetime_text_is_refused() -> None:
    with pytest.raises(SerialError, match=r"table\['k'\]: invalid decimal 'x1'"):
        decode_table(b"\x01\x00\x00\x00\x01\x00\x00\x00k\x0a\x02\x00\x00\x00x1")
    with pytest.raises(SerialError, match=r"table\['k'\]: invalid datetime '2024-13'"):
        decode_table(b"\x01\x00\x00\x00\x01\x00\x00\x00k\x0b\x07\x00\x00\x002024-13")


def test_unknown_value_tag_and_property_bits_are_refused() -> None:
    with pytest.raises(SerialError, match=r"table\['k'\]: unknown value tag 99"):
        decode_table(b"\x01\x00\x00\x00\x01\x00\x00\x00k\x63")
    with pytest.raises(SerialError, match="unknown fields in mask"):
        decode_properties(b"\x00\x80")
    with pytest.raises(SerialError, match="trailing"):
        decode_properties(b"\x08\x00\x02\x00")


def test_nesting_is_bounded_both_ways() -> None:
    deep: Any = []
    for _ in range(MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(SerialError, match="nested deeper"):
        encode_table({"deep": deep})
    # A hand-made stream of nested list headers, deeper than any encoder would produce.
    hostile = b"\x01\x00\x00\x00\x01\x00\x00\x00k" + b"\x08\x01\x00\x00\x00" * 10_000 + b"\x00"
    with pytest.raises(SerialError, match="nested deeper"):
        decode_table(hostile)
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    with pytest.raises(SerialError, match="nested deeper"):
        encode_table(cyclic)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({1, 2}, "unsupported value type set"),
        (object(), "unsupported value type object"),
    ],
)
def test_unsupported_header_values_are_refused(value: object, message: str) -> None:
    with pytest.raises(SerialError, match=message):
        encode_properties(Properties(headers={"h": value}))


@pytest.mark.parametrize(
    ("props", "message"),
    [
        (Properties(delivery_mode=256), r"properties\.delivery_mode: expected an octet"),
        (Properties(priority=-1), r"properties\.priority: expected an octet"),
        (Properties(timestamp=2**64), r"properties\.timestamp: expected a 64-bit"),
        (Properties(content_type=5), r"properties\.content_type: expected str"),  # type: ignore[arg-type]
        (Properties(headers=[("a", 1)]), r"properties\.headers: expected dict"),  # type: ignore[arg-type]
    ],
)
def test_out_of_range_properties_are_refused(props: Properties, message: str) -> None:
    with pytest.raises(SerialError, match=message):
        encode_properties(props)


def test_message_ids_outside_64_bits_are_refused() -> None:
    with pytest.raises(SerialError, match="msg_id"):
        encode_record(MessageRemoved("/", "q", 2**63))
    with pytest.raises(SerialError, match="message"):
        encode_message(Message("", "q", b"", msg_id=2**64))
