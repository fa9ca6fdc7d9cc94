"""MQTT PUBLISH <-> the core's protocol-neutral `Properties` (README, Names across protocols, docs/sessions.md table).

Ingress (`core_properties`): QoS 0 / QoS >= 1 become delivery_mode 1 / 2 and the QoS is kept in the
header `x-mqtt-publish-qos` (as RabbitMQ does); the 5.0 properties map to content_type, correlation_id
(Correlation Data that is not UTF-8 goes to the header `x-correlation-data`), expiration (Message
Expiry Interval in ms), the header `x-reply-to-topic` (Response Topic as an AMQP-form key, so that an
AMQP or STOMP replier can publish to it on amq.topic) and headers (User Properties; a name that
repeats keeps all its values, as a list). A PUBLISH without properties, the hot path, gets one of three
shared `Properties` objects (`QOS_PROPERTIES`), so it allocates nothing here.

Egress (`publish_property_content`): the inverse, as the bytes of a 5.0 PUBLISH property block
without its Property Length, so the session can append the per-subscriber Topic Alias and
Subscription Identifiers. What MQTT cannot carry is left out, never an error: numbers and booleans become
text, UTF-8 bytes their text, an array one User Property per element; tables, void values, and strings
MQTT would refuse (U+0000, lone surrogates, over 65535 bytes) are dropped; the broker's own
bookkeeping headers (`x-death`, ...) are not shown as User Properties.

Must not import: asyncio, storage, cluster, other protocol packages, protocols.transport.
"""

from __future__ import annotations

import math
import struct
from typing import Any, Final

from broker.message import Message, Properties, header_text
from broker.names import key_to_mqtt_topic, mqtt_topic_to_key
from protocols.mqtt.packets import Properties as MqttProperties

PUBLISH_QOS_HEADER: Final = "x-mqtt-publish-qos"
REPLY_TO_TOPIC_HEADER: Final = "x-reply-to-topic"
CORRELATION_DATA_HEADER: Final = "x-correlation-data"
PAYLOAD_FORMAT_HEADER: Final = "x-mqtt-payload-format-indicator"

#: Headers that carry something else than a User Property, and the core's dead-letter history.
_NOT_USER_PROPERTIES: Final = frozenset(
    {
        PUBLISH_QOS_HEADER,
        REPLY_TO_TOPIC_HEADER,
        CORRELATION_DATA_HEADER,
        PAYLOAD_FORMAT_HEADER,
        "x-death",
        "x-first-death-reason",
        "x-first-death-queue",
        "x-first-death-exchange",
    }
)

#: The neutral properties of a PUBLISH without 5.0 properties, by QoS. Shared by every such message:
#: nothing may modify them (the core copies properties before changing any, e.g. when dead-lettering).
QOS_PROPERTIES: Final = (
    Properties(delivery_mode=1, headers={PUBLISH_QOS_HEADER: 0}),
    Properties(delivery_mode=2, headers={PUBLISH_QOS_HEADER: 1}),
    Properties(delivery_mode=2, headers={PUBLISH_QOS_HEADER: 2}),
)

_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")


def core_properties(props: MqttProperties | None, qos: int) -> Properties:
    """The neutral properties of a PUBLISH (or Will Message) of `qos` with 5.0 properties `props`."""
    if props is None:
        return QOS_PROPERTIES[qos]
    headers: dict[str, Any] = {}
    for name, value in props.user_properties:
        existing = headers.get(name)
        if existing is None:
            headers[name] = value
        elif isinstance(existing, list):
            existing.append(value)
        else:
            headers[name] = [existing, value]
    headers[PUBLISH_QOS_HEADER] = qos
    if props.payload_format_indicator is not None:
        headers[PAYLOAD_FORMAT_HEADER] = props.payload_format_indicator
    if props.response_topic is not None:
        headers[REPLY_TO_TOPIC_HEADER] = mqtt_topic_to_key(props.response_topic)
    correlation_id = None
    data = props.correlation_data
    if data is not None:
        try:
            correlation_id = data.decode()
        except UnicodeDecodeError:
            headers[CORRELATION_DATA_HEADER] = data
    expiry = props.message_expiry_interval
    return Properties(
        content_type=props.content_type,
        headers=headers,
        delivery_mode=2 if qos else 1,
        correlation_id=correlation_id,
        expiration=None if expiry is None else str(expiry * 1000),
    )


def publish_qos(props: Properties) -> int:
    """The QoS a message was published with: the MQTT header, else from delivery_mode (AMQP, STOMP)."""
    headers = props.headers
    if headers:
        qos = headers.get(PUBLISH_QOS_HEADER)
        if type(qos) is int and 0 <= qos <= 2:
            return qos
    return 1 if props.delivery_mode == 2 else 0


def publish_property_content(message: Message, now: float) -> bytes:
    """The 5.0 PUBLISH properties of `message`, without the Property Length prefix.

    `now` is the core's clock: the Message Expiry Interval sent is what is left of it [MQTT-3.3.2-6].
    """
    props = message.properties
    headers = props.headers or {}
    parts: list[bytes] = []
    indicator = headers.get(PAYLOAD_FORMAT_HEADER)
    if indicator == 0 or indicator == 1:
        parts.append(bytes((0x01, indicator)))
    if message.expires_at is not None:
        left = max(1, math.ceil(message.expires_at - now))
        parts.append(b"\x02" + _U32.pack(min(left, 0xFFFFFFFF)))
    if props.content_type is not None:
        field = _string(props.content_type)
        if field is not None:
            parts.append(b"\x03" + field)
    reply_key = headers.get(REPLY_TO_TOPIC_HEADER)
    if isinstance(reply_key, str) and reply_key:
        topic = key_to_mqtt_topic(reply_key)
        field = _string(topic) if "+" not in topic and "#" not in topic else None
        if field is not None:
            parts.append(b"\x08" + field)
    data = headers.get(CORRELATION_DATA_HEADER)
    if not isinstance(data, bytes):
        data = None if props.correlation_id is None else _utf8(props.correlation_id)
    if data is not None and len(data) <= 0xFFFF:
        parts.append(b"\x09" + _U16.pack(len(data)) + data)
    for name, value in headers.items():
        if name in _NOT_USER_PROPERTIES:
            continue
        key = _string(name)
        if key is None:
            continue
        for item in value if isinstance(value, list | tuple) else (value,):
            text = header_text(item)
            field = None if text is None else _string(text)
            if field is not None:
                parts.append(b"\x26" + key + field)
    return b"".join(parts)


def _utf8(text: str) -> bytes | None:
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate from a foreign protocol [MQTT-1.5.4-1]
        return None


def _string(text: str) -> bytes | None:
    """A UTF-8 Encoded String field (§1.5.4), or None when MQTT would call it malformed."""
    if "\x00" in text:  # [MQTT-1.5.4-2]
        return None
    data = _utf8(text)
    if data is None or len(data) > 0xFFFF:
        return None
    return _U16.pack(len(data)) + data
