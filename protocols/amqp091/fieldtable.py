"""AMQP 0-9-1 field tables and arrays (and short strings) <-> Python values.

Types follow RabbitMQ's errata table (https://www.rabbitmq.com/amqp-0-9-1-errata.html), not the 0-9-1
text, whose 's'/'U'/'L' codes nobody implements. Decoding (what a Python value each type becomes):

    't' bool          'b' 'B' 's' 'u' 'I' 'i' 'l' 'L' int (RabbitMQ reads 'L' as signed 64-bit too)
    'f' 'd' float     'D' decimal.Decimal            'S' str, or bytes when not valid UTF-8
    'x' bytes         'T' datetime (UTC, whole seconds), or int when beyond datetime's range
    'A' list          'F' dict                       'V' None

Encoding picks what RabbitMQ and its Java/pika clients pick, so a table survives a round trip with its
values and, for the common types, with its type codes:

    bool 't'   int 'I' when it fits 32 bits, else 'l'   float 'd'   Decimal 'D'   str 'S'
    bytes/bytearray/memoryview 'x'   datetime 'T'   dict 'F'   list/tuple 'A'   None 'V'

Deliberate differences from pamqp's encoder: pamqp picks the smallest integer type ('b' for 5, which a
Java consumer reads as a Byte), encodes float as 32-bit 'f' (losing precision), cannot encode bytes and
sorts keys; we keep insertion order so decode -> encode reproduces the bytes. What still changes in a
round trip: 'b'/'B'/'s'/'u'/'i' come back as 'I' (or 'l'), 'f' as 'd', 'L' as 'l', non-UTF-8 'S' as 'x'.

Decoders take (buffer, start, end) and never read past `end`; a malformed table raises ValueError naming
what was wrong, which the frame decoder turns into 502 SYNTAX_ERROR with the method's ids. Nesting is
bounded (`MAX_DEPTH`) so a hostile frame cannot exhaust the interpreter's stack.

Must not import: asyncio, broker, storage, cluster, other protocol packages.
"""

from __future__ import annotations

import datetime
import decimal
import struct
from collections.abc import Mapping
from typing import Any, Final

#: How deeply 'F'/'A' may nest (x-death is 3 deep). A limit, not a spec rule.
MAX_DEPTH: Final = 32

_U32 = struct.Struct(">I")
_TAG_U32 = struct.Struct(">BI")  # type code + length (S, x, A, F)
_TAG_I32 = struct.Struct(">Bi")
_TAG_I64 = struct.Struct(">Bq")
_TAG_U64 = struct.Struct(">BQ")
_TAG_F64 = struct.Struct(">Bd")
_TAG_DECIMAL = struct.Struct(">BBi")
_DECIMAL = struct.Struct(">Bi")
_U64 = struct.Struct(">Q")
_unpack_i32 = struct.Struct(">i").unpack_from
#: Every octet as a one-octet bytes object (cheaper than bytes((n,)) for length prefixes).
_OCTETS: Final = tuple(bytes((n,)) for n in range(256))

_S, _X, _A, _F, _T, _I, _L, _D_DOUBLE, _D_DECIMAL = b"SxAFTIldD"
_TRUE: Final = b"t\x01"
_FALSE: Final = b"t\x00"
_VOID: Final = b"V"
_EMPTY_TABLE: Final = b"\x00\x00\x00\x00"
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
#: Seconds since the epoch of 9999-12-31T23:59:59Z, datetime's last representable second.
_MAX_DATETIME_SECONDS: Final = 253402300799

#: Fixed-size numeric types: code -> (struct, size).
_NUMBERS: Final = {
    ord("b"): (struct.Struct(">b"), 1),
    ord("B"): (struct.Struct(">B"), 1),
    ord("s"): (struct.Struct(">h"), 2),
    ord("u"): (struct.Struct(">H"), 2),
    ord("I"): (struct.Struct(">i"), 4),
    ord("i"): (struct.Struct(">I"), 4),
    ord("l"): (struct.Struct(">q"), 8),
    ord("L"): (struct.Struct(">q"), 8),
    ord("f"): (struct.Struct(">f"), 4),
    ord("d"): (struct.Struct(">d"), 8),
}


# --- decoding ---------------------------------------------------------------------------------------


def decode_shortstr(buf: bytes, pos: int, end: int) -> tuple[str, int]:
    """A shortstr at `pos` (length octet + UTF-8); returns (value, position after it)."""
    if pos >= end:
        raise ValueError("shortstr truncated")
    stop = pos + 1 + buf[pos]
    if stop > end:
        raise ValueError("shortstr runs past its frame")
    return buf[pos + 1 : stop].decode(), stop


def decode_longstr(buf: bytes, pos: int, end: int) -> tuple[str | bytes, int]:
    """A longstr at `pos`: str when it is UTF-8, else the raw bytes (SASL responses may be binary)."""
    if pos + 4 > end:
        raise ValueError("longstr truncated")
    stop = pos + 4 + _U32.unpack_from(buf, pos)[0]
    if stop > end:
        raise ValueError("longstr runs past its frame")
    raw = buf[pos + 4 : stop]
    try:
        return raw.decode(), stop
    except UnicodeDecodeError:
        return raw, stop


def decode_table(buf: bytes, pos: int, end: int, depth: int = 0) -> tuple[dict[str, Any], int]:
    """A length-prefixed field table at `pos`; returns (dict, position after it)."""
    if pos + 4 > end:
        raise ValueError("field table length truncated")
    stop = pos + 4 + _U32.unpack_from(buf, pos)[0]
    if stop > end:
        raise ValueError("field table runs past its frame")
    pos += 4
    table: dict[str, Any] = {}
    key = ""
    try:
        while pos < stop:
            key_stop = pos + 1 + buf[pos]
            if key_stop >= stop:  # the key must be followed by at least a type octet
                raise ValueError("field name runs past its table")
            key = buf[pos + 1 : key_stop].decode()
            if buf[key_stop] == _S:  # the commonest type, inlined
                pos = key_stop + 5
                if pos > stop:
                    raise ValueError("'S' length truncated")
                value_stop = pos + _U32.unpack_from(buf, key_stop + 1)[0]
                if value_stop > stop:
                    raise ValueError("'S' runs past its table")
                raw = buf[pos:value_stop]
                try:
                    table[key] = raw.decode()
                except UnicodeDecodeError:
                    table[key] = raw
                pos = value_stop
            elif buf[key_stop] == _I:  # next commonest: pika and the Java client write ints as 'I'
                pos = key_stop + 5
                if pos > stop:
                    raise ValueError("'I' value truncated")
                table[key] = _unpack_i32(buf, key_stop + 1)[0]
            else:
                table[key], pos = _decode_value(buf, key_stop, stop, depth)
    except ValueError as exc:
        raise ValueError(f"field {key!r}: {exc}") from None
    return table, stop


def decode_array(buf: bytes, pos: int, end: int, depth: int = 0) -> tuple[list[Any], int]:
    """A length-prefixed field array at `pos`; returns (list, position after it)."""
    if pos + 4 > end:
        raise ValueError("field array length truncated")
    stop = pos + 4 + _U32.unpack_from(buf, pos)[0]
    if stop > end:
        raise ValueError("field array runs past its frame")
    pos += 4
    items: list[Any] = []
    while pos < stop:
        value, pos = _decode_value(buf, pos, stop, depth)
        items.append(value)
    return items, stop


def _decode_value(buf: bytes, pos: int, end: int, depth: int) -> tuple[Any, int]:
    kind = buf[pos]
    pos += 1
    if kind == _S:
        if pos + 4 > end:
            raise ValueError("'S' length truncated")
        stop = pos + 4 + _U32.unpack_from(buf, pos)[0]
        if stop > end:
            raise ValueError("'S' runs past its table")
        raw = buf[pos + 4 : stop]
        try:
            return raw.decode(), stop
        except UnicodeDecodeError:
            return raw, stop
    number = _NUMBERS.get(kind)
    if number is not None:
        unpacker, size = number
        if pos + size > end:
            raise ValueError(f"{chr(kind)!r} value truncated")
        return unpacker.unpack_from(buf, pos)[0], pos + size
    if kind == 0x74:  # 't'
        if pos >= end:
            raise ValueError("'t' value truncated")
        return buf[pos] != 0, pos + 1
    if kind == 0x56:  # 'V'
        return None, pos
    if kind in (_F, _A):
        if depth >= MAX_DEPTH:
            raise ValueError(f"tables nested deeper than {MAX_DEPTH}")
        if kind == _F:
            return decode_table(buf, pos, end, depth + 1)
        return decode_array(buf, pos, end, depth + 1)
    if kind == _X:
        if pos + 4 > end:
            raise ValueError("'x' length truncated")
        stop = pos + 4 + _U32.unpack_from(buf, pos)[0]
        if stop > end:
            raise ValueError("'x' runs past its table")
        return buf[pos + 4 : stop], stop
    if kind == _T:
        if pos + 8 > end:
            raise ValueError("'T' value truncated")
        seconds = _U64.unpack_from(buf, pos)[0]
        if seconds > _MAX_DATETIME_SECONDS:
            return seconds, pos + 8
        return _EPOCH + datetime.timedelta(seconds=seconds), pos + 8
    if kind == _D_DECIMAL:
        if pos + 5 > end:
            raise ValueError("'D' value truncated")
        scale, mantissa = _DECIMAL.unpack_from(buf, pos)
        return decimal.Decimal(mantissa).scaleb(-scale), pos + 5
    raise ValueError(f"unknown field type {chr(kind)!r}")


# --- encoding ---------------------------------------------------------------------------------------


def encode_shortstr(value: str | bytes) -> bytes:
    """Length octet + UTF-8; ValueError beyond 255 octets (AMQP 0-9-1 §4.2.5.3)."""
    raw = value.encode() if isinstance(value, str) else bytes(value)
    if len(raw) > 255:
        raise ValueError(f"shortstr longer than 255 octets: {raw[:40]!r}...")
    return _OCTETS[len(raw)] + raw


def encode_longstr(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else bytes(value)
    return _U32.pack(len(raw)) + raw


def encode_table(table: Mapping[str, Any] | None) -> bytes:
    """A length-prefixed field table (None and {} both encode as the empty table)."""
    if not table:
        return _EMPTY_TABLE
    parts: list[bytes] = [_EMPTY_TABLE]
    append = parts.append
    for key, value in table.items():
        raw_key = key.encode()
        if len(raw_key) > 255:
            raise ValueError(f"field name longer than 255 octets: {raw_key[:40]!r}...")
        append(_OCTETS[len(raw_key)] + raw_key)
        kind = type(value)
        if kind is str:  # the commonest types, inlined
            raw = value.encode()
            append(_TAG_U32.pack(_S, len(raw)))
            append(raw)
            continue
        if kind is int and _INT32_MIN <= value <= _INT32_MAX:
            append(_TAG_I32.pack(_I, value))
            continue
        try:
            _encode_value(parts, value)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"field {key!r}: {exc}") from None
    parts[0] = _U32.pack(sum(map(len, parts)) - 4)
    return b"".join(parts)


def encode_array(items: list[Any] | tuple[Any, ...]) -> bytes:
    parts: list[bytes] = [_EMPTY_TABLE]
    for item in items:
        _encode_value(parts, item)
    parts[0] = _U32.pack(sum(map(len, parts)) - 4)
    return b"".join(parts)


def _encode_value(parts: list[bytes], value: Any) -> None:
    kind = type(value)
    # Exact type checks first (the common case, and bool must not pass as int); subclasses below.
    if kind is str:
        raw = value.encode()
        parts.append(_TAG_U32.pack(_S, len(raw)))
        parts.append(raw)
    elif kind is int:
        parts.append(_encode_int(value))
    elif kind is bool:
        parts.append(_TRUE if value else _FALSE)
    elif value is None:
        parts.append(_VOID)
    elif kind is dict:
        parts.append(b"F")
        parts.append(encode_table(value))
    elif kind is list or kind is tuple:
        parts.append(b"A")
        parts.append(encode_array(value))
    elif kind is float:
        parts.append(_TAG_F64.pack(_D_DOUBLE, value))
    elif kind is bytes or kind is bytearray or kind is memoryview:
        parts.append(_TAG_U32.pack(_X, len(value)))
        parts.append(bytes(value))
    else:
        _encode_other(parts, value)


def _encode_int(value: int) -> bytes:
    if _INT32_MIN <= value <= _INT32_MAX:
        return _TAG_I32.pack(_I, value)
    if _INT64_MIN <= value <= _INT64_MAX:
        return _TAG_I64.pack(_L, value)
    raise ValueError(f"integer {value} does not fit a signed 64-bit 'l'")


def _encode_other(parts: list[bytes], value: Any) -> None:
    if isinstance(value, bool):
        parts.append(_TRUE if value else _FALSE)
    elif isinstance(value, int):
        parts.append(_encode_int(int(value)))
    elif isinstance(value, str):
        _encode_value(parts, str(value))
    elif isinstance(value, decimal.Decimal):
        parts.append(_encode_decimal(value))
    elif isinstance(value, datetime.datetime):
        if value.tzinfo is None:  # naive datetimes are taken as UTC, as pamqp and pika do
            value = value.replace(tzinfo=datetime.UTC)
        seconds = int(value.timestamp())
        if seconds < 0:
            raise ValueError(f"timestamp before 1970 cannot be encoded: {value}")
        parts.append(_TAG_U64.pack(_T, seconds))
    elif isinstance(value, float):
        parts.append(_TAG_F64.pack(_D_DOUBLE, value))
    elif isinstance(value, Mapping):
        parts.append(b"F")
        parts.append(encode_table(value))
    elif isinstance(value, (list, tuple)):
        parts.append(b"A")
        parts.append(encode_array(value))
    elif isinstance(value, (bytes, bytearray, memoryview)):
        _encode_value(parts, bytes(value))
    else:
        raise TypeError(f"no AMQP field type for {type(value).__name__} {value!r}")


def _encode_decimal(value: decimal.Decimal) -> bytes:
    """'D': scale octet + signed 32-bit mantissa, value = mantissa / 10**scale (AMQP 0-9-1 §4.2.5.5)."""
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int):
        raise ValueError(f"cannot encode {value} as a decimal")
    if exponent > 0:
        scale, mantissa = 0, int(value)
    else:
        scale, mantissa = -exponent, int(value.scaleb(-exponent))
    if scale > 255 or not _INT32_MIN <= mantissa <= _INT32_MAX:
        raise ValueError(f"decimal {value} does not fit scale 0..255 and a 32-bit mantissa")
    return _TAG_DECIMAL.pack(_D_DECIMAL, scale, mantissa)
