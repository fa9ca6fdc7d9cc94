"""Retained messages and delayed Will Messages of MQTT, held by the core (no timers of our own).

Retained messages (3.1.1 §3.3.1.3, 5.0 §3.3.1.3) are kept by the vhost (`VHost.set_retained`,
`retained_matching`), by AMQP-form topic key, and journaled there.

A Will Message with a Will Delay Interval (5.0 §3.1.3.2) must be published after the connection is
gone, when no session timer can run any more. It is parked in the core instead, the way RabbitMQ
does it: in a durable queue `mqtt-will-<client id>` of its own, with a message TTL of the delay and
amq.topic as its dead-letter exchange (dead-letter routing key = the Will Topic). The core's periodic
expiry dead-letters it into amq.topic when the delay is over, so subscribers of every protocol get it
without any MQTT code running. A reconnect before that deletes the queue: the Will Message is then not
sent (5.0 §3.1.3.2.2, [MQTT-3.1.3-9]).

A retained Will Message must also become the retained message of its topic, which routing alone
does not do. Its holding queue dead-letters into the fanout exchange `mqtt.retained-will` instead,
bound to amq.topic (so subscribers get it at once) and to the durable queue `mqtt.retained-will`,
which `apply_fired_wills` empties into the retained store. Retained messages are read only by MQTT
sessions (on SUBSCRIBE) and written only by them (on a retained PUBLISH), so applying the fired
wills just before either of those is exactly as if it had happened when the delay ended.

Must not import: asyncio, storage, cluster, other protocol packages, protocols.transport.
"""

from __future__ import annotations

import hashlib
from typing import Final

from broker.core import VHost
from broker.message import Message

#: The exchange MQTT topics live on (README, Names across protocols).
TOPIC_EXCHANGE: Final = "amq.topic"
SESSION_QUEUE_PREFIX: Final = "mqtt-session-"
SHARED_QUEUE_PREFIX: Final = "mqtt-shared-"
WILL_QUEUE_PREFIX: Final = "mqtt-will-"
RETAINED_WILL_EXCHANGE: Final = "mqtt.retained-will"
RETAINED_WILL_QUEUE: Final = "mqtt.retained-will"
#: How long (ms) a fired will's empty holding queue stays before the core deletes it (`x-expires`).
_WILL_QUEUE_LINGER_MS: Final = 60_000
_MAX_QUEUE_NAME: Final = 255
_DEAD_LETTER_HEADERS: Final = (
    "x-death",
    "x-first-death-reason",
    "x-first-death-queue",
    "x-first-death-exchange",
)


def queue_name(prefix: str, name: str) -> str:
    """`prefix + name`, or `prefix` + a digest of `name` when that would exceed an AMQP shortstr."""
    full = prefix + name
    if len(full.encode()) <= _MAX_QUEUE_NAME:
        return full
    return prefix + hashlib.sha256(name.encode()).hexdigest()


def hold_will(vhost: VHost, client_id: str, will: Message, delay_s: int) -> None:
    """Park `will` (its routing key is the Will Topic's) for `delay_s` seconds, then publish it."""
    name = queue_name(WILL_QUEUE_PREFIX, client_id)
    if name in vhost.queues:
        vhost.delete_queue(name)
    dead_letter_exchange = TOPIC_EXCHANGE
    if will.retain:
        _declare_retained_will_route(vhost)
        dead_letter_exchange = RETAINED_WILL_EXCHANGE
    delay_ms = max(1, delay_s * 1000)
    vhost.declare_queue(
        name,
        durable=True,
        arguments={
            "x-dead-letter-exchange": dead_letter_exchange,
            "x-dead-letter-routing-key": will.routing_key,
            "x-message-ttl": delay_ms,
            "x-expires": delay_ms + _WILL_QUEUE_LINGER_MS,
        },
    )
    props = will.properties.copy()
    # The delay is the queue's TTL; a Message Expiry Interval of the will must not fire it earlier.
    props.expiration = None
    vhost.publish(Message("", name, will.body, props, retain=will.retain))


def take_pending_will(vhost: VHost, client_id: str) -> Message | None:
    """Cancel a parked will of `client_id`; return it (to publish now) or None when there is none."""
    name = queue_name(WILL_QUEUE_PREFIX, client_id)
    queue = vhost.queues.get(name)
    if queue is None:
        return None
    entry = queue.get(True)
    vhost.delete_queue(name)
    if entry is None:
        return None
    held = entry.message
    routing_key = queue.dead_letter_routing_key or held.routing_key
    return Message(TOPIC_EXCHANGE, routing_key, held.body, held.properties, retain=held.retain)


def apply_fired_wills(vhost: VHost) -> None:
    """Make every retained will that fired since the last call the retained message of its topic."""
    queue = vhost.queues.get(RETAINED_WILL_QUEUE)
    if queue is None or not queue.message_count:
        return
    while (entry := queue.get(True)) is not None:
        message = entry.message
        props = message.properties.copy()
        if props.headers:
            for name in _DEAD_LETTER_HEADERS:
                props.headers.pop(name, None)
        vhost.set_retained(
            message.routing_key,
            Message(TOPIC_EXCHANGE, message.routing_key, message.body, props, retain=True),
        )


def _declare_retained_will_route(vhost: VHost) -> None:
    vhost.declare_exchange(RETAINED_WILL_EXCHANGE, "fanout", durable=True)
    vhost.declare_queue(RETAINED_WILL_QUEUE, durable=True)
    vhost.bind_queue(RETAINED_WILL_QUEUE, RETAINED_WILL_EXCHANGE, "")
    vhost.bind_exchange(TOPIC_EXCHANGE, RETAINED_WILL_EXCHANGE, "")
