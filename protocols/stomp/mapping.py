"""STOMP frame headers <-> the neutral `broker.message.Properties`, and queue arguments from headers.

The table is README, Names across protocols / docs/sessions.md "Names and properties across protocols":

    STOMP header                         neutral
    content-type, content-encoding       content_type, content_encoding
    persistent:true                      delivery_mode 2
    priority                             priority (0-255; another value stays a plain header)
    expires (absolute epoch ms, ActiveMQ) expiration (relative ms) on SEND; sent back on MESSAGE
    expiration (relative ms, RabbitMQ)   expiration
    correlation-id                       correlation_id
    reply-to                             reply_to (resolved by the session, see destinations.py)
    amqp-message-id                      message_id (STOMP's own message-id is the delivery id)
    timestamp (ms)                       timestamp (s)
    type, app-id, user-id                type, app_id, user_id
    any other header                     headers[name] (a string)

On delivery a header value that is not a string becomes its `str()` (bytes are decoded as UTF-8, booleans
are `true` / `false`); lists and tables (AMQP arrays and field tables, such as `x-death`) cannot be
carried in a STOMP header and are left out, as RabbitMQ does, and so are bytes that are not UTF-8 and
any header with a NUL in it. STOMP 1.0 cannot carry CR or LF in a header at all: such headers are left
out too (never an error). Headers that would shadow the MESSAGE frame's own
(`message-id`, `subscription`, `ack`, `destination`, `content-length`, `redelivered`) are never copied
from or to the neutral headers, because "only the first header entry SHOULD be used" (STOMP 1.2
"Repeated Header Entries") would let them win.

Queue arguments (`x-message-ttl`, `x-max-length`, `x-dead-letter-exchange`, ...) given as SUBSCRIBE or SEND
headers declare the queue (RabbitMQ's STOMP plugin does the same) and are not message headers.

Must not import: asyncio, the broker core beyond broker.message, storage, cluster, other protocol packages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from broker.message import EMPTY_PROPERTIES, PERSISTENT, Properties, header_text
from protocols.stomp.codec import Headers, encode_headers
from protocols.stomp.destinations import reply_to_for_delivery

#: Queue arguments accepted as headers, and the type of each value.
QUEUE_ARGUMENTS: Final[Mapping[str, type]] = {
    "x-message-ttl": int,
    "x-expires": int,
    "x-max-length": int,
    "x-max-length-bytes": int,
    "x-max-priority": int,
    "x-delivery-limit": int,
    "x-dead-letter-exchange": str,
    "x-dead-letter-routing-key": str,
    "x-overflow": str,
    "x-queue-type": str,
    "x-queue-mode": str,
    "x-single-active-consumer": bool,
}

#: Headers of the frames themselves: never neutral headers, in either direction.
FRAME_HEADERS: Final = frozenset(
    {
        "destination",
        "message-id",
        "subscription",
        "ack",
        "redelivered",
        "content-length",
        "receipt",
        "transaction",
        "reply-to",
    }
)


def queue_arguments(headers: Mapping[str, str]) -> dict[str, Any]:
    """The queue arguments among `headers`, typed; ValueError names a bad one."""
    arguments: dict[str, Any] = {}
    for name, kind in QUEUE_ARGUMENTS.items():
        value = headers.get(name)
        if value is None:
            continue
        if kind is int:
            if not (value.isascii() and value.isdigit()):
                raise ValueError(f"header {name}: expected a non-negative integer, got {value!r}")
            arguments[name] = int(value)
        elif kind is bool:
            if value not in ("true", "false"):
                raise ValueError(f"header {name}: expected true or false, got {value!r}")
            arguments[name] = value == "true"
        else:
            arguments[name] = value
    return arguments


def _digits(value: str) -> bool:
    return value.isascii() and value.isdigit()


def properties_from_headers(headers: Mapping[str, str], reply_to: str | None, now_ms: int) -> Properties:
    """The neutral properties of a SEND frame. `headers` are the frame's headers (first occurrence of
    each), `reply_to` the already resolved neutral reply-to, `now_ms` the wall clock for `expires`."""
    props = Properties(reply_to=reply_to)
    custom: dict[str, Any] = {}
    nothing = reply_to is None
    for name, value in headers.items():
        if name in FRAME_HEADERS or name in QUEUE_ARGUMENTS:
            continue
        nothing = False
        if name == "content-type":
            props.content_type = value
        elif name == "persistent":
            if value == "true":
                props.delivery_mode = PERSISTENT
        elif name == "priority" and _digits(value) and int(value) <= 255:
            props.priority = int(value)
        elif name == "correlation-id":
            props.correlation_id = value
        elif name == "expiration" and _digits(value):
            props.expiration = value
        elif name == "expires" and _digits(value):
            # ActiveMQ: absolute time in epoch ms, 0 = never. Already past: expire at once.
            if value != "0":
                props.expiration = str(max(0, int(value) - now_ms))
        elif name == "amqp-message-id":
            props.message_id = value
        elif name == "timestamp" and _digits(value):
            props.timestamp = int(value) // 1000
        elif name == "content-encoding":
            props.content_encoding = value
        elif name == "type":
            props.type = value
        elif name == "app-id":
            props.app_id = value
        elif name == "user-id":
            props.user_id = value
        else:
            custom[name] = value
    if nothing:
        return EMPTY_PROPERTIES
    if custom:
        props.headers = custom
    return props


def headers_from_properties(props: Properties, expires_ms: int | None = None) -> Headers:
    """MESSAGE header entries for `props` (see the module docstring). `expires_ms`: the absolute expiry
    time (epoch ms) to send as ActiveMQ's `expires`, when the message has one."""
    items: Headers = []
    if props.content_type is not None:
        items.append(("content-type", props.content_type))
    if props.content_encoding is not None:
        items.append(("content-encoding", props.content_encoding))
    if props.delivery_mode == PERSISTENT:
        items.append(("persistent", "true"))
    if props.priority is not None:
        items.append(("priority", str(props.priority)))
    if props.correlation_id is not None:
        items.append(("correlation-id", props.correlation_id))
    if props.reply_to is not None:
        items.append(("reply-to", reply_to_for_delivery(props.reply_to)))
    if props.expiration is not None:
        items.append(("expiration", props.expiration))
        if expires_ms is not None:
            items.append(("expires", str(expires_ms)))
    if props.message_id is not None:
        items.append(("amqp-message-id", props.message_id))
    if props.timestamp is not None:
        items.append(("timestamp", str(props.timestamp * 1000)))
    if props.type is not None:
        items.append(("type", props.type))
    if props.app_id is not None:
        items.append(("app-id", props.app_id))
    if props.user_id is not None:
        items.append(("user-id", props.user_id))
    if props.headers:
        for name, value in props.headers.items():
            text = header_text(value)
            if text is not None and name and name not in FRAME_HEADERS:
                items.append((name, text))
    return items


def encode_properties(props: Properties, version: str, expires_ms: int | None = None) -> bytes:
    """`headers_from_properties` as escaped header lines for a MESSAGE frame of STOMP `version`."""
    if props is EMPTY_PROPERTIES:
        return b""
    items = headers_from_properties(props, expires_ms)
    if version == "1.0":
        # STOMP 1.0 has no escaping: a header that contains CR, LF (or a colon in its name) cannot be sent.
        items = [
            (name, value)
            for name, value in items
            if not ("\n" in value or "\r" in value or ":" in name or "\n" in name or "\r" in name)
        ]
    encoded = encode_headers(items, version)
    if b"\0" in encoded:
        # No escaping can carry a NUL, and clients (stomp.py, stomp.js) take the first NUL for the end of the
        # frame before they read content-length: such a header is left out.
        encoded = encode_headers([(n, v) for n, v in items if "\0" not in n and "\0" not in v], version)
    return encoded
