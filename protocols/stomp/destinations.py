"""STOMP destination names <-> the core's exchanges, queues and routing keys (README, Names across protocols).

A destination header is parsed once into a `Destination` (its kind and names); the session decides what
to declare, bind or check. The forms, as RabbitMQ's STOMP plugin spells them:

    /queue/<name>            queue <name>, declared durable on first use; default exchange, key <name>
    /amq/queue/<name>        queue <name>, which must exist
    /topic/<key>             exchange amq.topic, routing key <key> (levels joined by ".", wildcards * and #)
    /exchange/<x>[/<key>]    exchange <x>, routing key <key> ("" when absent)
    /temp-queue/<name>       a connection-private reply queue (exclusive, server-named)
    /reply-queue/<name>      an existing queue, answered through the default exchange (what RabbitMQ
                             rewrites /temp-queue/ reply-to headers into)

Names are taken verbatim (no percent-decoding): a topic key that crossed from MQTT keeps its `%2E`
escapes (broker/names.py), so the mapping stays reversible.

`reply_to_for_delivery` turns the neutral `reply_to` property back into a destination a STOMP client can
SEND to: the neutral form of a queue destination is the bare queue name (what an AMQP RPC server passes
as routing_key on the default exchange, docs/sessions.md), and a queue the server made (a temp queue of a
STOMP requester, an AMQP exclusive reply queue, RabbitMQ's direct reply-to) becomes `/reply-queue/<name>`,
which is published to without being declared: a reply to a requester that has gone is then dropped as
unroutable instead of failing the responder's SEND.

Must not import: asyncio, the broker core, storage, cluster, other protocol packages.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

#: Prefix of the queue names only the server gives (AMQP 0-9-1 queue.declare: "amq." is reserved):
#: server-named queues (`amq.gen-`, VHost.server_named's default) and direct reply-to queues.
SERVER_NAMED_PREFIX: Final = "amq."
#: Exchange of /topic/ destinations.
TOPIC_EXCHANGE: Final = "amq.topic"


class DestinationKind(enum.Enum):
    """The destination forms, by prefix."""

    QUEUE = "/queue/"
    AMQ_QUEUE = "/amq/queue/"
    TOPIC = "/topic/"
    EXCHANGE = "/exchange/"
    TEMP_QUEUE = "/temp-queue/"
    REPLY_QUEUE = "/reply-queue/"


_KNOWN_FORMS: Final = ", ".join(f"{kind.value}..." for kind in DestinationKind)


class InvalidDestination(ValueError):
    """A destination header the broker does not serve; the text explains why (for the ERROR body)."""


@dataclass(frozen=True, slots=True)
class Destination:
    """A parsed destination. `name` is the queue name, topic key, exchange name or temp-queue name;
    `key` is the routing key of an /exchange/ destination."""

    kind: DestinationKind
    name: str
    key: str = ""


def parse_destination(text: str) -> Destination:
    """Parse a `destination` (or `reply-to`) header; raise `InvalidDestination` for anything else."""
    for kind in DestinationKind:
        if text.startswith(kind.value):
            return _parse_rest(kind, text[len(kind.value) :], text)
    raise InvalidDestination(f"{text!r} is not a destination of this broker (known forms: {_KNOWN_FORMS})")


def _parse_rest(kind: DestinationKind, rest: str, text: str) -> Destination:
    if kind is DestinationKind.EXCHANGE:
        exchange, _, key = rest.partition("/")
        if not exchange:
            raise InvalidDestination(f"{text!r} names no exchange (expected /exchange/<name>/<routing key>)")
        return Destination(kind, exchange, key)
    if not rest:
        raise InvalidDestination(f"{text!r} names no {'topic' if kind is DestinationKind.TOPIC else 'queue'}")
    return Destination(kind, rest)


def destination_for_delivery(exchange: str, routing_key: str) -> str:
    """The `destination` header of a MESSAGE: where the message was published, as a STOMP client would
    have written it (RabbitMQ does the same)."""
    if exchange == "":
        return DestinationKind.QUEUE.value + routing_key
    if exchange == TOPIC_EXCHANGE:
        return DestinationKind.TOPIC.value + routing_key
    return f"{DestinationKind.EXCHANGE.value}{exchange}/{routing_key}"


def reply_to_for_delivery(reply_to: str) -> str:
    """The neutral `reply_to` as a STOMP `reply-to` header (see the module docstring)."""
    if reply_to.startswith("/"):
        return reply_to
    if reply_to.startswith(SERVER_NAMED_PREFIX):
        return DestinationKind.REPLY_QUEUE.value + reply_to
    return DestinationKind.QUEUE.value + reply_to
