"""Compact binary encoding of messages, properties, field tables and journal records.

Used by the SQLite backend (property and argument blobs) and by replication (records streamed to
the standby), so decoding must be safe on untrusted input: no pickle or marshal, every length is
checked against the data actually present, nesting is bounded, and every failure is a
`SerialError` that names the field. Encoding refuses values outside the documented types.

Layout (all integers little-endian):

- record:      u8 FORMAT_VERSION, u8 tag, then the record's fields in declaration order;
- str / bytes: u32 length + UTF-8 (lone surrogates pass through) / raw bytes;
- table:       u32 count + (str key, value)*; a value is a u8 type tag + payload (see `_T_*`):
               the types of AMQP field tables as the AMQP codec decodes them (None, bool, int,
               float, str, bytes, list, dict, decimal.Decimal, datetime.datetime);
- properties:  u16 presence mask (bit i = `Properties.__slots__[i]`), then each present field:
               str fields as str, `delivery_mode`/`priority` as u8 (AMQP octets), `timestamp` as
               u64 (AMQP 0-9-1 §4.2.5.4, POSIX seconds), `headers` as a table;
- message:     fixed head (flags, msg_id, expires_at, lengths) + exchange, routing key,
               properties, body. `Message.origin` is a connection token and is never encoded.

MessageEnqueued and MessageRemoved are on the publish/ack hot path and have hand-written
encoders; the rarer records go through a per-type field schema.

Must not import: asyncio, protocols, cluster, broker.core (only broker.message, broker.journal).
"""

from __future__ import annotations

import datetime
import decimal
import struct
from collections.abc import Callable
from dataclasses import fields
from operator import attrgetter
from types import MappingProxyType
from typing import Any, Final

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

FORMAT_VERSION: Final = 1

#: Deepest nesting of lists/tables accepted, in both directions (bounds recursion on hostile input).
MAX_DEPTH: Final = 64


class SerialError(ValueError):
    """Data cannot be encoded or decoded; the message names the field."""


_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")
_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")
_REC_HEAD = struct.Struct("<BB")
# flags, msg_id, expires_at, len(exchange), len(routing_key), len(properties), len(body)
_MSG_HEAD = struct.Struct("<BqdIIII")
# version, tag, durable, n_queues, len(vhost)
_ENQ_HEAD = struct.Struct("<BBBII")
# version, tag, msg_id, len(vhost), len(queue)
_REM_HEAD = struct.Struct("<BBqII")

_MSG_RETAIN = 1
_MSG_HAS_EXPIRY = 2

_UTF8 = "utf-8"
_SURR = "surrogatepass"


def _bytes_of(data: bytes | bytearray | memoryview) -> bytes:
    return data if type(data) is bytes else bytes(data)


def _enc_str(value: str, field: str) -> bytes:
    if not isinstance(value, str):
        raise SerialError(f"{field}: expected str, got {type(value).__name__}")
    raw = value.encode(_UTF8, _SURR)
    return _U32.pack(len(raw)) + raw


def _dec_str(data: bytes, off: int, field: str) -> tuple[str, int]:
    raw, end = _dec_bytes(data, off, field)
    try:
        return raw.decode(_UTF8, _SURR), end
    except UnicodeDecodeError as exc:
        raise SerialError(f"{field}: invalid UTF-8 ({exc.reason})") from None


def _dec_bytes(data: bytes, off: int, field: str) -> tuple[bytes, int]:
    if off + 4 > len(data):
        raise SerialError(f"{field}: truncated length")
    (n,) = _U32.unpack_from(data, off)
    off += 4
    end = off + n
    if end > len(data):
        raise SerialError(f"{field}: length {n} exceeds the data")
    return data[off:end], end


# --- Field tables (AMQP headers and arguments) -------------------------------------------------

_T_NONE = 0
_T_FALSE = 1
_T_TRUE = 2
_T_INT = 3  # signed 64-bit
_T_BIGINT = 4  # u32 length + signed big-endian two's complement
_T_FLOAT = 5
_T_STR = 6
_T_BYTES = 7
_T_LIST = 8
_T_TABLE = 9
# AMQP 'D' and 'T' field values as the AMQP codec decodes them; stored as text so precision,
# time zone and microseconds survive.
_T_DECIMAL = 10  # str(Decimal)
_T_DATETIME = 11  # datetime.isoformat()

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


def _enc_value(value: Any, out: list[bytes], depth: int, canonical: bool, field: str) -> None:
    kind = type(value)
    if kind is str:
        raw = value.encode(_UTF8, _SURR)
        out.append(b"\x06" + _U32.pack(len(raw)))
        out.append(raw)
    elif value is None:
        out.append(b"\x00")
    elif kind is bool:
        out.append(b"\x02" if value else b"\x01")
    elif kind is int:
        if _INT64_MIN <= value <= _INT64_MAX:
            out.append(b"\x03" + _I64.pack(value))
        else:
            raw = value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True)
            out.append(b"\x04" + _U32.pack(len(raw)))
            out.append(raw)
    elif kind is float:
        out.append(b"\x05" + _F64.pack(value))
    elif kind is bytes or kind is bytearray or kind is memoryview:
        raw = bytes(value)
        out.append(b"\x07" + _U32.pack(len(raw)))
        out.append(raw)
    elif kind is list or kind is tuple:
        if depth >= MAX_DEPTH:
            raise SerialError(f"{field}: nested deeper than {MAX_DEPTH}")
        out.append(b"\x08" + _U32.pack(len(value)))
        for item in value:
            _enc_value(item, out, depth + 1, canonical, field)
    elif kind is dict:
        if depth >= MAX_DEPTH:
            raise SerialError(f"{field}: nested deeper than {MAX_DEPTH}")
        out.append(b"\x09")
        _enc_table(value, out, depth + 1, canonical, field)
    elif kind is decimal.Decimal:
        raw = str(value).encode("ascii")
        out.append(b"\x0a" + _U32.pack(len(raw)))
        out.append(raw)
    elif kind is datetime.datetime:
        raw = value.isoformat().encode("ascii")
        out.append(b"\x0b" + _U32.pack(len(raw)))
        out.append(raw)
    # Subclasses (IntEnum, StrEnum, ...) are stored as their base value.
    elif isinstance(value, bool):
        _enc_value(bool(value), out, depth, canonical, field)
    elif isinstance(value, int):
        _enc_value(int(value), out, depth, canonical, field)
    elif isinstance(value, float):
        _enc_value(float(value), out, depth, canonical, field)
    elif isinstance(value, str):
        _enc_value(str(value), out, depth, canonical, field)
    else:
        raise SerialError(f"{field}: unsupported value type {kind.__name__}")


def _enc_table(table: dict[str, Any], out: list[bytes], depth: int, canonical: bool, field: str) -> None:
    out.append(_U32.pack(len(table)))
    items = sorted(table.items()) if canonical else table.items()
    for key, value in items:
        out.append(_enc_str(key, field))
        _enc_value(value, out, depth, canonical, f"{field}[{key!r}]")


def _dec_value(data: bytes, off: int, depth: int, field: str) -> tuple[Any, int]:
    if off >= len(data):
        raise SerialError(f"{field}: truncated value")
    tag = data[off]
    off += 1
    if tag == _T_STR:
        return _dec_str(data, off, field)
    if tag == _T_INT:
        if off + 8 > len(data):
            raise SerialError(f"{field}: truncated int")
        return _I64.unpack_from(data, off)[0], off + 8
    if tag == _T_NONE:
        return None, off
    if tag == _T_TRUE:
        return True, off
    if tag == _T_FALSE:
        return False, off
    if tag == _T_FLOAT:
        if off + 8 > len(data):
            raise SerialError(f"{field}: truncated float")
        return _F64.unpack_from(data, off)[0], off + 8
    if tag == _T_BYTES:
        return _dec_bytes(data, off, field)
    if tag == _T_BIGINT:
        raw, off = _dec_bytes(data, off, field)
        return int.from_bytes(raw, "big", signed=True), off
    if tag == _T_LIST:
        if depth >= MAX_DEPTH:
            raise SerialError(f"{field}: nested deeper than {MAX_DEPTH}")
        if off + 4 > len(data):
            raise SerialError(f"{field}: truncated list length")
        (count,) = _U32.unpack_from(data, off)
        off += 4
        # Each item takes at least one byte: refuse a count the data cannot hold.
        if count > len(data) - off:
            raise SerialError(f"{field}: list of {count} items exceeds the data")
        items = []
        for _ in range(count):
            item, off = _dec_value(data, off, depth + 1, field)
            items.append(item)
        return items, off
    if tag in (_T_DECIMAL, _T_DATETIME):
        text, off = _dec_str(data, off, field)
        try:
            if tag == _T_DECIMAL:
                return decimal.Decimal(text), off
            return datetime.datetime.fromisoformat(text), off
        except (ValueError, ArithmeticError):
            kind = "decimal" if tag == _T_DECIMAL else "datetime"
            raise SerialError(f"{field}: invalid {kind} {text[:40]!r}") from None
    if tag == _T_TABLE:
        if depth >= MAX_DEPTH:
            raise SerialError(f"{field}: nested deeper than {MAX_DEPTH}")
        return _dec_table(data, off, depth + 1, field)
    raise SerialError(f"{field}: unknown value tag {tag}")


def _dec_table(data: bytes, off: int, depth: int, field: str) -> tuple[dict[str, Any], int]:
    if off + 4 > len(data):
        raise SerialError(f"{field}: truncated table length")
    (count,) = _U32.unpack_from(data, off)
    off += 4
    # Each entry takes at least five bytes (key length + value tag).
    if count * 5 > len(data) - off:
        raise SerialError(f"{field}: table of {count} entries exceeds the data")
    table: dict[str, Any] = {}
    for _ in range(count):
        key, off = _dec_str(data, off, field)
        table[key], off = _dec_value(data, off, depth, f"{field}[{key!r}]")
    return table, off


def encode_table(table: dict[str, Any], canonical: bool = False) -> bytes:
    """An AMQP field table (headers, arguments). `canonical` sorts keys at every level, so that
    equal tables give equal bytes (the SQLite store keys bindings on their arguments)."""
    if type(table) is not dict:
        raise SerialError(f"table: expected dict, got {type(table).__name__}")
    out: list[bytes] = []
    _enc_table(table, out, 0, canonical, "table")
    return b"".join(out)


def decode_table(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    data = _bytes_of(data)
    table, off = _dec_table(data, 0, 0, "table")
    if off != len(data):
        raise SerialError(f"table: {len(data) - off} trailing bytes")
    return table


# --- Properties ---------------------------------------------------------------------------------

_PROP_NAMES: Final = Properties.__slots__
_PROP_VALUES = attrgetter(*_PROP_NAMES)
_PROP_STR = 0
_PROP_OCTET = 1
_PROP_TIMESTAMP = 2
_PROP_TABLE = 3
_PROP_KINDS: Final = tuple(
    _PROP_TABLE
    if name == "headers"
    else _PROP_OCTET
    if name in ("delivery_mode", "priority")
    else _PROP_TIMESTAMP
    if name == "timestamp"
    else _PROP_STR
    for name in _PROP_NAMES
)
_PROP_SPEC: Final = tuple(
    (bit, name, kind, f"properties.{name}")
    for bit, (name, kind) in enumerate(zip(_PROP_NAMES, _PROP_KINDS, strict=True))
)
_PROP_FIELDS: Final = tuple((name, kind, field) for _, name, kind, field in _PROP_SPEC)
_DELIVERY_MODE_BIT: Final = 1 << _PROP_NAMES.index("delivery_mode")
_NO_PROPS = b"\x00\x00"
# The properties almost every message carries (none, or only delivery_mode), pre-encoded.
_COMMON_PROPS: Final = MappingProxyType(
    {
        _PROP_VALUES(Properties()): _NO_PROPS,
        _PROP_VALUES(Properties(delivery_mode=1)): _U16.pack(_DELIVERY_MODE_BIT) + b"\x01",
        _PROP_VALUES(Properties(delivery_mode=2)): _U16.pack(_DELIVERY_MODE_BIT) + b"\x02",
    }
)
_HEADERS_INDEX: Final = _PROP_NAMES.index("headers")


def encode_properties(properties: Properties) -> bytes:
    values = _PROP_VALUES(properties)
    if values[_HEADERS_INDEX] is None:
        common = _COMMON_PROPS.get(values)
        if common is not None:
            return common
    mask = 0
    out: list[bytes] = [b""]
    for bit, _, kind, field in _PROP_SPEC:
        value = values[bit]
        if value is None:
            continue
        mask |= 1 << bit
        if kind == _PROP_STR:
            out.append(_enc_str(value, field))
        elif kind == _PROP_OCTET:
            if not isinstance(value, int) or not 0 <= value <= 255:
                raise SerialError(f"{field}: expected an octet (0..255), got {value!r}")
            out.append(_U8.pack(value))
        elif kind == _PROP_TIMESTAMP:
            if not isinstance(value, int) or not 0 <= value < 2**64:
                raise SerialError(f"{field}: expected a 64-bit POSIX time, got {value!r}")
            out.append(_U64.pack(value))
        else:
            if type(value) is not dict:
                raise SerialError(f"{field}: expected dict, got {type(value).__name__}")
            _enc_table(value, out, 0, False, field)
    if not mask:
        return _NO_PROPS
    out[0] = _U16.pack(mask)
    return b"".join(out)


def _dec_properties(data: bytes, off: int, end: int) -> Properties:
    """Properties from data[off:end] (exactly)."""
    if off + 2 > end:
        raise SerialError("properties: truncated mask")
    (mask,) = _U16.unpack_from(data, off)
    off += 2
    props = Properties()
    if mask == _DELIVERY_MODE_BIT and end - off == 1:
        props.delivery_mode = data[off]
        return props
    if mask >> len(_PROP_NAMES):
        raise SerialError(f"properties: unknown fields in mask {mask:#06x}")
    view = data if end == len(data) else data[:end]
    while mask:
        low = mask & -mask
        mask ^= low
        name, kind, field = _PROP_FIELDS[low.bit_length() - 1]
        value: Any
        if kind == _PROP_STR:
            value, off = _dec_str(view, off, field)
        elif kind == _PROP_OCTET:
            if off + 1 > end:
                raise SerialError(f"{field}: truncated")
            value = view[off]
            off += 1
        elif kind == _PROP_TIMESTAMP:
            if off + 8 > end:
                raise SerialError(f"{field}: truncated")
            (value,) = _U64.unpack_from(view, off)
            off += 8
        else:
            value, off = _dec_table(view, off, 1, field)
        setattr(props, name, value)
    if off != end:
        raise SerialError(f"properties: {end - off} trailing bytes")
    return props


def decode_properties(data: bytes | bytearray | memoryview) -> Properties:
    data = _bytes_of(data)
    return _dec_properties(data, 0, len(data))


# --- Messages -----------------------------------------------------------------------------------


def _enc_message(message: Message, out: list[bytes]) -> None:
    ex = message.exchange.encode(_UTF8, _SURR)
    rk = message.routing_key.encode(_UTF8, _SURR)
    props = encode_properties(message.properties)
    body = message.body
    if type(body) is not bytes:
        body = bytes(body)
    expires_at = message.expires_at
    flags = (_MSG_RETAIN if message.retain else 0) | (_MSG_HAS_EXPIRY if expires_at is not None else 0)
    try:
        head = _MSG_HEAD.pack(
            flags, message.msg_id, expires_at or 0.0, len(ex), len(rk), len(props), len(body)
        )
    except struct.error as exc:
        raise SerialError(f"message: {exc} (msg_id={message.msg_id!r}, expires_at={expires_at!r})") from None
    out += (head, ex, rk, props, body)


def _dec_message(data: bytes, off: int) -> tuple[Message, int]:
    if off + _MSG_HEAD.size > len(data):
        raise SerialError("message: truncated head")
    flags, msg_id, expires_at, n_ex, n_rk, n_props, n_body = _MSG_HEAD.unpack_from(data, off)
    off += _MSG_HEAD.size
    end = off + n_ex + n_rk + n_props + n_body
    if end > len(data):
        raise SerialError("message: lengths exceed the data")
    if flags & ~(_MSG_RETAIN | _MSG_HAS_EXPIRY):
        raise SerialError(f"message: unknown flags {flags:#04x}")
    try:
        exchange = data[off : off + n_ex].decode(_UTF8, _SURR)
        off += n_ex
        routing_key = data[off : off + n_rk].decode(_UTF8, _SURR)
        off += n_rk
    except UnicodeDecodeError as exc:
        raise SerialError(f"message: invalid UTF-8 in exchange or routing key ({exc.reason})") from None
    props = _dec_properties(data, off, off + n_props)
    off += n_props
    message = Message(
        exchange,
        routing_key,
        data[off:end],
        props,
        msg_id,
        expires_at if flags & _MSG_HAS_EXPIRY else None,
        bool(flags & _MSG_RETAIN),
    )
    return message, end


def encode_message(message: Message) -> bytes:
    out: list[bytes] = []
    _enc_message(message, out)
    return b"".join(out)


def decode_message(data: bytes | bytearray | memoryview) -> Message:
    data = _bytes_of(data)
    message, off = _dec_message(data, 0)
    if off != len(data):
        raise SerialError(f"message: {len(data) - off} trailing bytes")
    return message


# --- Records ------------------------------------------------------------------------------------
# Tags are part of the wire format shared with a standby: append new ones, never renumber.

_TAGS: Final[dict[type, int]] = {
    ExchangeDeclared: 1,
    ExchangeDeleted: 2,
    QueueDeclared: 3,
    QueueDeleted: 4,
    QueuePurged: 5,
    BindingAdded: 6,
    BindingRemoved: 7,
    MessageEnqueued: 8,
    MessageRemoved: 9,
    RetainedSet: 10,
    RetainedCleared: 11,
    SessionSaved: 12,
    SessionDeleted: 13,
}
_TAG_ENQUEUED: Final = _TAGS[MessageEnqueued]
_TAG_REMOVED: Final = _TAGS[MessageRemoved]


def _field_codecs(
    cls: type,
) -> tuple[
    tuple[str, Callable[[Any, list[bytes], str], None], Callable[[bytes, int, str], tuple[Any, int]]], ...
]:
    """(name, encoder, decoder) for each field of a rare record type, from its annotations."""
    specs = []
    for f in fields(cls):
        ann = str(f.type)
        enc: Callable[[Any, list[bytes], str], None]
        dec: Callable[[bytes, int, str], tuple[Any, int]]
        if ann == "str":
            enc, dec = _enc_str_field, _dec_str
        elif ann == "bool":
            enc, dec = _enc_bool_field, _dec_bool
        elif ann == "bytes":
            enc, dec = _enc_bytes_field, _dec_bytes
        elif ann == "dict[str, Any]":
            enc, dec = _enc_table_field, _dec_table_field
        elif ann == "Message":
            enc, dec = _enc_message_field, _dec_message_field
        else:  # pragma: no cover - a new record field type needs a codec here
            raise TypeError(f"{cls.__name__}.{f.name}: no codec for {ann}")
        specs.append((f.name, enc, dec))
    return tuple(specs)


def _enc_str_field(value: Any, out: list[bytes], field: str) -> None:
    out.append(_enc_str(value, field))


def _enc_bool_field(value: Any, out: list[bytes], field: str) -> None:
    out.append(b"\x01" if value else b"\x00")


def _dec_bool(data: bytes, off: int, field: str) -> tuple[bool, int]:
    if off >= len(data):
        raise SerialError(f"{field}: truncated")
    value = data[off]
    if value > 1:
        raise SerialError(f"{field}: invalid bool {value}")
    return value == 1, off + 1


def _enc_bytes_field(value: Any, out: list[bytes], field: str) -> None:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise SerialError(f"{field}: expected bytes, got {type(value).__name__}")
    raw = bytes(value)
    out += (_U32.pack(len(raw)), raw)


def _enc_table_field(value: Any, out: list[bytes], field: str) -> None:
    if type(value) is not dict:
        raise SerialError(f"{field}: expected dict, got {type(value).__name__}")
    _enc_table(value, out, 0, False, field)


def _dec_table_field(data: bytes, off: int, field: str) -> tuple[dict[str, Any], int]:
    return _dec_table(data, off, 0, field)


def _enc_message_field(value: Any, out: list[bytes], field: str) -> None:
    if not isinstance(value, Message):
        raise SerialError(f"{field}: expected Message, got {type(value).__name__}")
    _enc_message(value, out)


def _dec_message_field(data: bytes, off: int, field: str) -> tuple[Message, int]:
    return _dec_message(data, off)


_SCHEMAS: Final = {cls: _field_codecs(cls) for cls in _TAGS if cls not in (MessageEnqueued, MessageRemoved)}
_BY_TAG: Final = {tag: (cls, _SCHEMAS.get(cls, ())) for cls, tag in _TAGS.items()}


def encode_record(record: Record) -> bytes:
    """The record as bytes (FORMAT_VERSION, tag, fields). Raises SerialError for values that
    the format cannot carry (wrong types, header values outside the AMQP field-table types)."""
    if isinstance(record, MessageEnqueued):
        return _encode_enqueued(record)
    if isinstance(record, MessageRemoved):
        vhost = record.vhost.encode(_UTF8, _SURR)
        queue = record.queue.encode(_UTF8, _SURR)
        try:
            head = _REM_HEAD.pack(FORMAT_VERSION, _TAG_REMOVED, record.msg_id, len(vhost), len(queue))
        except struct.error as exc:
            raise SerialError(f"MessageRemoved.msg_id: {exc}") from None
        return b"".join((head, vhost, queue))
    cls = type(record)
    schema = _SCHEMAS.get(cls)
    if schema is None:
        raise SerialError(f"not a record: {cls.__name__}")
    out: list[bytes] = [_REC_HEAD.pack(FORMAT_VERSION, _TAGS[cls])]
    name_prefix = cls.__name__ + "."
    for name, enc, _ in schema:
        enc(getattr(record, name), out, name_prefix + name)
    return b"".join(out)


def _encode_enqueued(record: MessageEnqueued) -> bytes:
    vhost = record.vhost.encode(_UTF8, _SURR)
    queues = record.queues
    out: list[bytes] = [
        _ENQ_HEAD.pack(FORMAT_VERSION, _TAG_ENQUEUED, bool(record.durable), len(queues), len(vhost)),
        vhost,
    ]
    for queue in queues:
        out.append(_enc_str(queue, "MessageEnqueued.queues"))
    _enc_message(record.message, out)
    return b"".join(out)


def decode_record(data: bytes | bytearray | memoryview) -> Record:
    """The record encoded in `data` (exactly: trailing bytes are an error)."""
    data = _bytes_of(data)
    if len(data) < 2:
        raise SerialError("record: truncated head")
    version, tag = _REC_HEAD.unpack_from(data, 0)
    if version != FORMAT_VERSION:
        raise SerialError(f"record: unsupported format version {version}")
    record: Record
    if tag == _TAG_ENQUEUED:
        record, off = _decode_enqueued(data)
    elif tag == _TAG_REMOVED:
        if len(data) < _REM_HEAD.size:
            raise SerialError("MessageRemoved: truncated head")
        _, _, msg_id, n_vhost, n_queue = _REM_HEAD.unpack_from(data, 0)
        off = _REM_HEAD.size
        end = off + n_vhost + n_queue
        if end > len(data):
            raise SerialError("MessageRemoved: lengths exceed the data")
        try:
            vhost = data[off : off + n_vhost].decode(_UTF8, _SURR)
            queue = data[off + n_vhost : end].decode(_UTF8, _SURR)
        except UnicodeDecodeError as exc:
            raise SerialError(f"MessageRemoved: invalid UTF-8 ({exc.reason})") from None
        record, off = MessageRemoved(vhost, queue, msg_id), end
    else:
        entry = _BY_TAG.get(tag)
        if entry is None:
            raise SerialError(f"record: unknown tag {tag}")
        cls, schema = entry
        off = 2
        values = []
        name_prefix = cls.__name__ + "."
        for name, _, dec in schema:
            value, off = dec(data, off, name_prefix + name)
            values.append(value)
        record = cls(*values)
    if off != len(data):
        raise SerialError(f"{type(record).__name__}: {len(data) - off} trailing bytes")
    return record


def _decode_enqueued(data: bytes) -> tuple[MessageEnqueued, int]:
    if len(data) < _ENQ_HEAD.size:
        raise SerialError("MessageEnqueued: truncated head")
    _, _, durable, n_queues, n_vhost = _ENQ_HEAD.unpack_from(data, 0)
    if durable > 1:
        raise SerialError(f"MessageEnqueued.durable: invalid bool {durable}")
    off = _ENQ_HEAD.size
    end = off + n_vhost
    if end > len(data):
        raise SerialError("MessageEnqueued.vhost: length exceeds the data")
    try:
        vhost = data[off:end].decode(_UTF8, _SURR)
    except UnicodeDecodeError as exc:
        raise SerialError(f"MessageEnqueued.vhost: invalid UTF-8 ({exc.reason})") from None
    off = end
    # Each queue name takes at least its 4-byte length.
    if n_queues * 4 > len(data) - off:
        raise SerialError(f"MessageEnqueued.queues: {n_queues} names exceed the data")
    queues = []
    for _ in range(n_queues):
        queue, off = _dec_str(data, off, "MessageEnqueued.queues")
        queues.append(queue)
    message, off = _dec_message(data, off)
    return MessageEnqueued(vhost, tuple(queues), message, durable == 1), off
