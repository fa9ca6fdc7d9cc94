"""Method frame payloads (class id, method id, arguments) <-> pamqp command objects.

Every method is a `pamqp.commands` class (`Basic.Publish`, `Queue.Declare`, ...), generated from the
spec. We read each class's argument list and types from pamqp once, at import, and run our own
marshal/unmarshal over it instead of pamqp's, because pamqp's unmarshal accepts truncated strings and
trailing octets, decodes field tables differently from content headers (fieldtable.py is used here for
both) and costs ~2.5 µs per Basic.Ack. Objects are made with `cls.__new__` and filled in, so pamqp's
constructor validation (name patterns, deprecation warnings) does not run on decode: the session
validates what the peer sent. Basic.Publish/Ack/Nack/Reject have hand-written decoders (the per-message
hot path); on any doubt they defer to the generic one, which produces the precise error.

Errors: `decode_method_payload` raises AmqpFrameError (540 for an unknown class/method, 502 for arguments
that do not decode, naming the field); `encode_method_payload` raises TypeError/ValueError for values
that cannot be encoded.

Must not import: asyncio, broker, storage, cluster, other protocol packages.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from types import MappingProxyType
from typing import Any, Final, NamedTuple

from pamqp import base, commands

from protocols.amqp091.constants import NOT_IMPLEMENTED, SYNTAX_ERROR
from protocols.amqp091.errors import AmqpFrameError
from protocols.amqp091.fieldtable import (
    decode_longstr,
    decode_shortstr,
    decode_table,
    encode_longstr,
    encode_shortstr,
    encode_table,
)

Basic = commands.Basic

_BIT, _OCTET, _SHORT, _LONG, _LONGLONG, _SHORTSTR, _LONGSTR, _TABLE = range(8)
_KIND_BY_NAME: Final = MappingProxyType(
    {
        "bit": _BIT,
        "octet": _OCTET,
        "short": _SHORT,
        "long": _LONG,
        "longlong": _LONGLONG,
        "shortstr": _SHORTSTR,
        "longstr": _LONGSTR,
        "table": _TABLE,
    }
)
#: Fixed-size integers: kind -> struct.
_INTEGERS: Final = MappingProxyType(
    {
        _OCTET: struct.Struct(">B"),
        _SHORT: struct.Struct(">H"),
        _LONG: struct.Struct(">I"),
        _LONGLONG: struct.Struct(">Q"),
    }
)
_IDS = struct.Struct(">HH")
_unpack_index = struct.Struct(">I").unpack_from
_U16 = struct.Struct(">H")
_TAG_BITS = struct.Struct(">QB")


class MethodSpec(NamedTuple):
    """What the codec needs to know about one method class, read from pamqp."""

    cls: type[base.Frame]
    class_id: int
    method_id: int
    #: (attribute, wire kind) in wire order.
    fields: tuple[tuple[str, int], ...]
    #: The packed class and method ids that open the payload.
    ids: bytes


def _spec(index: int, cls: type[base.Frame]) -> MethodSpec:
    class_id, method_id = index >> 16, index & 0xFFFF
    fields = tuple((name, _KIND_BY_NAME[cls.amqp_type(name)]) for name in cls.attributes())
    return MethodSpec(cls, class_id, method_id, fields, _IDS.pack(class_id, method_id))


#: (class id << 16 | method id) -> spec, for every method of 0-9-1 plus RabbitMQ's extensions.
SPECS_BY_INDEX: Final = MappingProxyType({i: _spec(i, cls) for i, cls in commands.INDEX_MAPPING.items()})
SPECS_BY_CLASS: Final = MappingProxyType({spec.cls: spec for spec in SPECS_BY_INDEX.values()})

#: Methods followed by a content header and body frames (AMQP 0-9-1 §4.2.6).
CONTENT_METHODS: Final = frozenset({Basic.Publish, Basic.Return, Basic.Deliver, Basic.GetOk})


# --- decoding ---------------------------------------------------------------------------------------


def decode_method_payload(buf: bytes, pos: int, end: int) -> base.Frame:
    """The method in buf[pos:end] (a method frame's payload)."""
    if end - pos < 4:
        raise AmqpFrameError(SYNTAX_ERROR, f"method frame payload of {end - pos} octets has no method ids")
    index = _unpack_index(buf, pos)[0]
    fast = _fast_decoder(index)
    if fast is not None:
        method = fast(buf, pos + 4, end)
        if method is not None:
            return method
    spec = SPECS_BY_INDEX.get(index)
    if spec is None:
        raise AmqpFrameError(
            NOT_IMPLEMENTED,
            f"unknown method class {index >> 16} method {index & 0xFFFF}",
            index >> 16,
            index & 0xFFFF,
        )
    return _decode_fields(spec, buf, pos + 4, end)


def _decode_fields(spec: MethodSpec, buf: bytes, pos: int, end: int) -> base.Frame:
    cls = spec.cls
    method = cls.__new__(cls)
    bits = 0
    bit_index = 8  # 8 = no octet of bits open
    name = ""
    value: Any
    try:
        for name, kind in spec.fields:
            if kind == _BIT:
                # Consecutive bits share octets, low bit first (AMQP 0-9-1 §4.2.5.2).
                if bit_index == 8:
                    if pos >= end:
                        raise ValueError("truncated")
                    bits = buf[pos]
                    pos += 1
                    bit_index = 0
                value = bool(bits >> bit_index & 1)
                bit_index += 1
            else:
                bit_index = 8
                if kind == _SHORTSTR:
                    value, pos = decode_shortstr(buf, pos, end)
                elif kind == _TABLE:
                    value, pos = decode_table(buf, pos, end)
                elif kind == _LONGSTR:
                    value, pos = decode_longstr(buf, pos, end)
                else:
                    unpacker = _INTEGERS[kind]
                    if pos + unpacker.size > end:
                        raise ValueError("truncated")
                    value = unpacker.unpack_from(buf, pos)[0]
                    pos += unpacker.size
            setattr(method, name, value)
        if pos != end:
            name = ""
            raise ValueError(f"{end - pos} octets after the last argument")
    except (ValueError, IndexError, struct.error) as exc:
        where = f"{cls.name}.{name}" if name else cls.name
        raise AmqpFrameError(
            SYNTAX_ERROR, f"cannot decode {where}: {exc}", spec.class_id, spec.method_id
        ) from None
    return method


# Hand-written decoders for the per-message methods. `pos` is past the ids. They return None whenever
# the payload is not exactly well-formed, and the generic decoder then explains what is wrong.


def _decode_publish(buf: bytes, pos: int, end: int) -> base.Frame | None:
    # ticket:short exchange:shortstr routing-key:shortstr mandatory:bit immediate:bit
    try:
        rk_start = pos + 3 + buf[pos + 2]
        bits_at = rk_start + 1 + buf[rk_start]
        if bits_at + 1 != end:
            return None
        exchange = buf[pos + 3 : rk_start].decode()
        routing_key = buf[rk_start + 1 : bits_at].decode()
    except (IndexError, ValueError):
        return None
    bits = buf[bits_at]
    method = _new(_PUBLISH)
    method.ticket = buf[pos] << 8 | buf[pos + 1]
    method.exchange = exchange
    method.routing_key = routing_key
    method.mandatory = bits & 1 == 1
    method.immediate = bits & 2 == 2
    return method


def _decode_ack(buf: bytes, pos: int, end: int) -> base.Frame | None:
    # delivery-tag:longlong multiple:bit
    if end - pos != 9:
        return None
    tag, bits = _TAG_BITS.unpack_from(buf, pos)
    method = _new(_ACK)
    method.delivery_tag = tag
    method.multiple = bits & 1 == 1
    return method


def _decode_nack(buf: bytes, pos: int, end: int) -> base.Frame | None:
    # delivery-tag:longlong multiple:bit requeue:bit
    if end - pos != 9:
        return None
    tag, bits = _TAG_BITS.unpack_from(buf, pos)
    method = _new(_NACK)
    method.delivery_tag = tag
    method.multiple = bits & 1 == 1
    method.requeue = bits & 2 == 2
    return method


def _decode_reject(buf: bytes, pos: int, end: int) -> base.Frame | None:
    # delivery-tag:longlong requeue:bit
    if end - pos != 9:
        return None
    tag, bits = _TAG_BITS.unpack_from(buf, pos)
    method = _new(_REJECT)
    method.delivery_tag = tag
    method.requeue = bits & 1 == 1
    return method


_new = object.__new__
_PUBLISH, _ACK, _NACK, _REJECT = Basic.Publish, Basic.Ack, Basic.Nack, Basic.Reject
_FAST_DECODERS: Final[MappingProxyType[int, Callable[[bytes, int, int], base.Frame | None]]] = (
    MappingProxyType(
        {
            Basic.Publish.index: _decode_publish,
            Basic.Ack.index: _decode_ack,
            Basic.Nack.index: _decode_nack,
            Basic.Reject.index: _decode_reject,
        }
    )
)
_fast_decoder = _FAST_DECODERS.get


# --- encoding ---------------------------------------------------------------------------------------


def encode_method_payload(method: base.Frame) -> bytes:
    """Class and method ids followed by the arguments of `method` (a pamqp command object)."""
    spec = SPECS_BY_CLASS.get(type(method))
    if spec is None:
        raise TypeError(f"not an AMQP 0-9-1 method: {method!r}")
    parts = [spec.ids]
    append = parts.append
    bits = bit_count = 0
    for name, kind in spec.fields:
        value: Any = getattr(method, name, None)
        if kind == _BIT:
            if bit_count == 8:
                append(bytes((bits,)))
                bits = bit_count = 0
            if value:
                bits |= 1 << bit_count
            bit_count += 1
            continue
        if bit_count:
            append(bytes((bits,)))
            bits = bit_count = 0
        try:
            if kind == _SHORTSTR:
                append(encode_shortstr(value))
            elif kind == _TABLE:
                append(encode_table(value))
            elif kind == _LONGSTR:
                append(encode_longstr(value))
            else:
                append(_INTEGERS[kind].pack(value))
        except (TypeError, ValueError, struct.error) as exc:
            raise ValueError(f"cannot encode {spec.cls.name}.{name}={value!r}: {exc}") from None
    if bit_count:
        append(bytes((bits,)))
    return b"".join(parts)
