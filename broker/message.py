"""The protocol-neutral message: body, properties, and where it was published.

Every protocol adapter converts its wire message into a `Message` once at ingress and converts
back once at egress (README, Names across protocols). The property names are AMQP 0-9-1's basic properties,
because AMQP's model is the core's model.

Must not import: asyncio, protocols, storage, cluster.
"""

from __future__ import annotations

from typing import Any

#: AMQP delivery_mode values.
TRANSIENT = 1
PERSISTENT = 2


class Properties:
    """AMQP 0-9-1 basic properties (§4.2.6 of the spec's class `basic`).

    Every field is optional (None = absent). `headers` is a plain dict whose values are
    str, bytes, int, float, bool, None, lists or nested dicts (AMQP field tables).
    """

    __slots__ = (
        "content_type",
        "content_encoding",
        "headers",
        "delivery_mode",
        "priority",
        "correlation_id",
        "reply_to",
        "expiration",
        "message_id",
        "timestamp",
        "type",
        "user_id",
        "app_id",
    )

    def __init__(
        self,
        content_type: str | None = None,
        content_encoding: str | None = None,
        headers: dict[str, Any] | None = None,
        delivery_mode: int | None = None,
        priority: int | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        expiration: str | None = None,
        message_id: str | None = None,
        timestamp: int | None = None,
        type: str | None = None,  # noqa: A002 - the spec's name
        user_id: str | None = None,
        app_id: str | None = None,
    ) -> None:
        self.content_type = content_type
        self.content_encoding = content_encoding
        self.headers = headers
        self.delivery_mode = delivery_mode
        self.priority = priority
        self.correlation_id = correlation_id
        self.reply_to = reply_to
        self.expiration = expiration
        self.message_id = message_id
        self.timestamp = timestamp
        self.type = type
        self.user_id = user_id
        self.app_id = app_id

    def as_dict(self) -> dict[str, Any]:
        """The properties that are set, by name (for storage and tests)."""
        return {name: value for name in self.__slots__ if (value := getattr(self, name)) is not None}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Properties:
        return cls(**values)

    def copy(self) -> Properties:
        clone = Properties.__new__(Properties)
        for name in self.__slots__:
            setattr(clone, name, getattr(self, name))
        if self.headers is not None:
            clone.headers = dict(self.headers)
        return clone

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Properties) and self.as_dict() == other.as_dict()

    def __repr__(self) -> str:
        return f"Properties({self.as_dict()!r})"


EMPTY_PROPERTIES = Properties()


def header_text(value: Any) -> str | None:
    """A header value as the text of a protocol whose headers are text (STOMP headers, MQTT 5 User
    Properties), by README.md "Values that do not cross": strings as they are, numbers as their
    text, booleans as `true`/`false` (AMQP's and JSON's spelling, as in `persistent:true`), bytes
    when they are UTF-8 (STOMP 1.2 "Value Encoding", [MQTT-1.5.4-1]); None, to leave it out, for
    what has no text form: void, tables, arrays (MQTT sends an array element by element) and
    bytes that are not UTF-8."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return None
    if value is None or isinstance(value, list | tuple | dict):
        return None
    return str(value)


class Message:
    """A published message as the core holds it.

    `exchange` and `routing_key` are where it was published (AMQP form: topic levels joined by
    `.`, see broker/names.py). `msg_id` is assigned by the core when the message is first stored
    in a queue and is unique for the life of the store. `expires_at` (clock seconds) is derived
    from `properties.expiration` at publish time. `retain` is MQTT's retain flag as published;
    it is carried so that retain-as-published can be honoured.
    """

    __slots__ = (
        "exchange",
        "routing_key",
        "body",
        "properties",
        "msg_id",
        "expires_at",
        "retain",
        "origin",
        "encoded",
    )

    def __init__(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Properties = EMPTY_PROPERTIES,
        msg_id: int = 0,
        expires_at: float | None = None,
        retain: bool = False,
        origin: object = None,
    ) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        self.body = body
        self.properties = properties
        self.msg_id = msg_id
        self.expires_at = expires_at
        self.retain = retain
        # The publishing connection (any hashable token), for MQTT 5 no-local. Not stored.
        self.origin = origin
        # The last wire encoding a protocol made of this message, as (key, bytes), so that a
        # fan-out to many subscribers of one protocol encodes once (RabbitMQ's mc does the same).
        # The key is the protocol's own; not stored.
        self.encoded: tuple[object, bytes] | None = None

    @property
    def persistent(self) -> bool:
        return self.properties.delivery_mode == PERSISTENT

    @property
    def size(self) -> int:
        return len(self.body)

    def with_route(self, exchange: str, routing_key: str) -> Message:
        """A copy published elsewhere (dead-lettering, alternate exchange); body is shared."""
        return Message(
            exchange, routing_key, self.body, self.properties.copy(), 0, self.expires_at, self.retain
        )

    def __repr__(self) -> str:
        return (
            f"Message(exchange={self.exchange!r}, routing_key={self.routing_key!r}, "
            f"body={len(self.body)}B, id={self.msg_id}, {self.properties!r})"
        )
