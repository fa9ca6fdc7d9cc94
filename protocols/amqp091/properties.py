"""Basic content-header properties (class 60's property list) <-> `broker.message.Properties`.

Layout (AMQP 0-9-1 §4.2.6.1): 16-bit property flags, bit 15 = first property, bit 0 = "another flags
word follows"; then the values of the properties whose bit is set, in order. `timestamp` stays an int
(seconds since the epoch, as `Properties` holds it); `headers` is a field table (fieldtable.py);
`cluster_id` (deprecated, bit 2) is read and dropped. Any value that is not None is encoded, including
'' (pamqp drops empty strings; we keep them so a header survives decode -> encode byte for byte).

Must not import: asyncio, storage, cluster, other protocol packages; from the broker only broker.message.
"""

from __future__ import annotations

import struct
from typing import Any, Final

from broker.message import EMPTY_PROPERTIES, Properties
from protocols.amqp091.fieldtable import decode_table, encode_shortstr, encode_table

_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")

_SHORTSTR, _OCTET, _TABLE, _TIMESTAMP = range(4)

#: (flag bit, Properties attribute or None for cluster_id, wire type), in wire order.
_LAYOUT: Final = (
    (0x8000, "content_type", _SHORTSTR),
    (0x4000, "content_encoding", _SHORTSTR),
    (0x2000, "headers", _TABLE),
    (0x1000, "delivery_mode", _OCTET),
    (0x0800, "priority", _OCTET),
    (0x0400, "correlation_id", _SHORTSTR),
    (0x0200, "reply_to", _SHORTSTR),
    (0x0100, "expiration", _SHORTSTR),
    (0x0080, "message_id", _SHORTSTR),
    (0x0040, "timestamp", _TIMESTAMP),
    (0x0020, "type", _SHORTSTR),
    (0x0010, "user_id", _SHORTSTR),
    (0x0008, "app_id", _SHORTSTR),
    (0x0004, None, _SHORTSTR),
)
#: The (name, kind) of the properties present, indexed by the high / low octet of the flags: one lookup
#: instead of testing fourteen bits per header frame.
_FIELDS_BY_HIGH_OCTET: Final = tuple(
    tuple((name, kind) for bit, name, kind in _LAYOUT if bit >> 8 & octet) for octet in range(256)
)
_FIELDS_BY_LOW_OCTET: Final = tuple(
    tuple((name, kind) for bit, name, kind in _LAYOUT if bit & 0xFF & octet) for octet in range(256)
)
#: Bits 15..2; bit 1 is unused and ignored, bit 0 is the continuation flag.
_KNOWN_FLAGS: Final = 0xFFFC
_EMPTY_FLAGS: Final = b"\x00\x00"


def decode_properties(buf: bytes, pos: int, end: int) -> Properties:
    """The flags and property list in buf[pos:end]; ValueError when they are malformed.

    No flags set gives the shared `EMPTY_PROPERTIES`, which broker.message already uses as the default
    and nobody mutates (the core copies properties before changing them, see `Message.with_route`).
    """
    if pos + 2 > end:
        raise ValueError("property flags truncated")
    flags = _U16.unpack_from(buf, pos)[0]
    pos += 2
    if flags & 1:
        # More flag words follow; class 60 defines no property beyond the first word, so they must be 0.
        more = flags
        while more & 1:
            if pos + 2 > end:
                raise ValueError("property flags truncated")
            more = _U16.unpack_from(buf, pos)[0]
            pos += 2
            if more & 0xFFFE:
                raise ValueError(f"unknown property flags in continuation word {more:#06x}")
    flags &= _KNOWN_FLAGS
    if not flags:
        if pos != end:
            raise ValueError(f"{end - pos} octets after an empty property list")
        return EMPTY_PROPERTIES
    props = Properties()
    value: Any
    for name, kind in _FIELDS_BY_HIGH_OCTET[flags >> 8] + _FIELDS_BY_LOW_OCTET[flags & 0xFF]:
        if kind == _SHORTSTR:
            if pos >= end:
                raise ValueError(f"{name} truncated")
            stop = pos + 1 + buf[pos]
            if stop > end:
                raise ValueError(f"{name} runs past the header frame")
            value = buf[pos + 1 : stop].decode()
            pos = stop
        elif kind == _OCTET:
            if pos >= end:
                raise ValueError(f"{name} truncated")
            value = buf[pos]
            pos += 1
        elif kind == _TABLE:
            try:
                value, pos = decode_table(buf, pos, end)
            except ValueError as exc:
                raise ValueError(f"headers: {exc}") from None
        else:
            if pos + 8 > end:
                raise ValueError(f"{name} truncated")
            value = _U64.unpack_from(buf, pos)[0]
            pos += 8
        if name is not None:
            setattr(props, name, value)
    if pos != end:
        raise ValueError(f"{end - pos} octets after the property list")
    return props


def encode_properties(props: Properties) -> bytes:
    """Flags word + property list for `props` (what follows body-size in a content header frame).

    TypeError/ValueError when a value cannot be encoded (a shortstr over 255 octets, an unencodable
    header value); that is the caller's data, not the peer's fault.
    """
    if props is EMPTY_PROPERTIES:
        return _EMPTY_FLAGS
    # Unrolled: this runs once per delivery and attribute reads are much cheaper than getattr().
    flags = 0
    parts: list[bytes] = [_EMPTY_FLAGS]
    append = parts.append
    if (v := props.content_type) is not None:
        flags |= 0x8000
        append(encode_shortstr(v))
    if (v := props.content_encoding) is not None:
        flags |= 0x4000
        append(encode_shortstr(v))
    if (h := props.headers) is not None:
        flags |= 0x2000
        append(encode_table(h))
    if (n := props.delivery_mode) is not None:
        flags |= 0x1000
        append(bytes((n,)))
    if (n := props.priority) is not None:
        flags |= 0x0800
        append(bytes((n,)))
    if (v := props.correlation_id) is not None:
        flags |= 0x0400
        append(encode_shortstr(v))
    if (v := props.reply_to) is not None:
        flags |= 0x0200
        append(encode_shortstr(v))
    if (v := props.expiration) is not None:
        flags |= 0x0100
        append(encode_shortstr(v))
    if (v := props.message_id) is not None:
        flags |= 0x0080
        append(encode_shortstr(v))
    if (n := props.timestamp) is not None:
        if not 0 <= n <= 0xFFFF_FFFF_FFFF_FFFF:
            raise ValueError(f"timestamp {n} does not fit an unsigned 64-bit integer")
        flags |= 0x0040
        append(_U64.pack(n))
    if (v := props.type) is not None:
        flags |= 0x0020
        append(encode_shortstr(v))
    if (v := props.user_id) is not None:
        flags |= 0x0010
        append(encode_shortstr(v))
    if (v := props.app_id) is not None:
        flags |= 0x0008
        append(encode_shortstr(v))
    parts[0] = _U16.pack(flags)
    return b"".join(parts)
