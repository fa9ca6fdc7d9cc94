"""One broker, three protocols: every cross-protocol path end to end with the real clients.

paho-mqtt (3.1.1 and 5.0, TCP and WebSocket), pika (AMQP 0-9-1) and stomp.py (STOMP 1.2, TCP and
WebSocket) talk to one real `polybroker serve` process shared by the module. Everything is generated
from the tables below, so a new endpoint, name, property or lossy case is one line:

- `ENDPOINTS`: the client kinds. `test_topic_matrix` runs every ordered pair of them (nine protocol
  pairs, over TCP and WebSocket) with binary, empty and 1 MiB bodies.
- `NAMES`: one topic in its three spellings (MQTT topic, STOMP destination, AMQP routing key,
  README, Names across protocols), including names that hold the other protocol's separator, non-ASCII and `%`.
- `WILDCARDS`: one filter in its three spellings, and topics it must and must not match.
- `PROPERTIES`: one property in its three spellings (README.md, "Names across protocols" "Properties"); a `None`
  cell is a protocol that cannot carry it.
- `LOSSY`: values a protocol cannot carry, and what the consumer sees instead (never an error).

Then the delivery semantics that cross (QoS 1 session across a reconnect fed by AMQP confirms, STOMP
receipts into a queue an AMQP consumer reads after a broker crash, retained messages and STOMP), and
request/reply across protocols. Every wait is on a condition with a timeout; "was not delivered" is
shown by a later marker message arriving first, never by a sleep.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import paho.mqtt.client as paho
import pika
import pytest
import stomp
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties
from paho.mqtt.reasoncodes import ReasonCode
from stomp.adapter.ws import WSStompConnection

from tests.e2e.broker_process import BrokerProcess

TIMEOUT = 10.0

# -- the tables ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """A client kind: protocol, transport and protocol version."""

    name: str
    protocol: str  # "mqtt" | "amqp" | "stomp"
    transport: str  # "tcp" | "ws"
    version: str


ENDPOINTS = [
    Endpoint("mqtt311-tcp", "mqtt", "tcp", "3.1.1"),
    Endpoint("mqtt5-tcp", "mqtt", "tcp", "5.0"),
    Endpoint("mqtt311-ws", "mqtt", "ws", "3.1.1"),
    Endpoint("mqtt5-ws", "mqtt", "ws", "5.0"),
    Endpoint("amqp-tcp", "amqp", "tcp", "0-9-1"),
    Endpoint("stomp-tcp", "stomp", "tcp", "1.2"),
    Endpoint("stomp-ws", "stomp", "ws", "1.2"),
]
#: Endpoints outside the matrix, for single cases (STOMP 1.0 has no header escaping).
STOMP10 = Endpoint("stomp10-tcp", "stomp", "tcp", "1.0")
BY_NAME = {endpoint.name: endpoint for endpoint in (*ENDPOINTS, STOMP10)}
#: One endpoint per protocol, with the richest property set (MQTT 5): the protocol-pair tests.
PROTOCOL_ENDPOINTS = [BY_NAME["mqtt5-tcp"], BY_NAME["amqp-tcp"], BY_NAME["stomp-tcp"]]
PROTOCOL_PAIRS = list(itertools.product(PROTOCOL_ENDPOINTS, repeat=2))
ENDPOINT_PAIRS = list(itertools.product(ENDPOINTS, repeat=2))


def pair_id(pair: tuple[Endpoint, Endpoint]) -> str:
    return f"{pair[0].name}->{pair[1].name}"


BODIES = [
    ("binary", bytes(range(256)) * 4),
    ("empty", b""),
    ("1MiB", random.Random(6).randbytes(1 << 20)),
]


@dataclass(frozen=True)
class Name:
    """One topic in each protocol's spelling; `{u}` is replaced by a per-test unique first level."""

    case: str
    mqtt: str
    stomp: str
    amqp: str

    def spelled(self, protocol: str, unique_level: str) -> str:
        return str(getattr(self, protocol)).replace("{u}", unique_level)


NAMES = [
    # case                    MQTT topic              STOMP destination               AMQP routing key
    Name("plain", "{u}/a/b", "/topic/{u}.a.b", "{u}.a.b"),
    Name("dot in MQTT level", "{u}/v1.2/status", "/topic/{u}.v1%2E2.status", "{u}.v1%2E2.status"),
    Name("slash in AMQP word", "{u}/a%2Fb/c", "/topic/{u}.a/b.c", "{u}.a/b.c"),
    Name("both separators", "{u}/x.y%2Fz", "/topic/{u}.x%2Ey/z", "{u}.x%2Ey/z"),
    Name("non-ASCII", "{u}/ünïcødé/日本", "/topic/{u}.ünïcødé.日本", "{u}.ünïcødé.日本"),
    Name("percent sign", "{u}/100%/50%25", "/topic/{u}.100%.50%25", "{u}.100%.50%25"),
    Name("escape in MQTT level", "{u}/50%2E", "/topic/{u}.50%252E", "{u}.50%252E"),
    Name("escape in AMQP word", "{u}/x%252Fy", "/topic/{u}.x%2Fy", "{u}.x%2Fy"),
    Name("empty level", "{u}//x", "/topic/{u}..x", "{u}..x"),
    Name("space and colon", "{u}/a b:c/d", "/topic/{u}.a b:c.d", "{u}.a b:c.d"),
]

#: For a name case, the levels of a topic that a naive mapping would confuse with it: an exact
#: subscriber of the decoy must never get the name's messages, in any protocol.
DECOYS = {
    "dot in MQTT level": ("v1", "2", "status"),
    "slash in AMQP word": ("a", "b", "c"),
    "both separators": ("x", "y", "z"),
    "escape in MQTT level": ("50.",),
    "escape in AMQP word": ("x/y",),
}


@dataclass(frozen=True)
class Wildcard:
    """A filter in each protocol's spelling, topics (as level lists) it matches and does not match."""

    case: str
    mqtt: str
    stomp: str
    amqp: str
    matches: tuple[tuple[str, ...], ...]
    misses: tuple[tuple[str, ...], ...] = ()


# fmt: off
WILDCARDS = [
    #        case            MQTT filter     STOMP destination       AMQP binding    matched / not matched levels
    Wildcard("one level",    "{u}/+/temp",   "/topic/{u}.*.temp",    "{u}.*.temp",   (("r1", "temp"),), (("r1", "x", "temp"),)),
    Wildcard("rest",         "{u}/#",        "/topic/{u}.#",         "{u}.#",        (("a",), ("a", "b", "c"))),
    Wildcard("rest below",   "{u}/a/#",      "/topic/{u}.a.#",       "{u}.a.#",      (("a", "b"),), (("b", "a"),)),
    Wildcard("dotted level", "{u}/+/v1.2",   "/topic/{u}.*.v1%2E2",  "{u}.*.v1%2E2", (("r", "v1.2"),), (("r", "v1", "2"),)),
]
# fmt: on


class Approx:
    """A number within `tolerance` of `value` (a remaining MQTT Message Expiry Interval)."""

    def __init__(self, value: int, tolerance: int) -> None:
        self.value = value
        self.tolerance = tolerance

    def __eq__(self, other: object) -> bool:
        return isinstance(other, int) and self.value - self.tolerance <= other <= self.value

    def __repr__(self) -> str:
        return f"{self.value - self.tolerance}..{self.value}"


Cell = tuple[str, Any] | None


@dataclass(frozen=True)
class Prop:
    """A property in each protocol's spelling: (native key, value) or None when it cannot carry it.

    Keys: MQTT 5 property names (paho's), `qos`, and `UserProperty.<name>`; AMQP `BasicProperties`
    fields and `headers.<name>`; STOMP header names. An `Approx` value is set as its `value`.
    """

    case: str
    mqtt: Cell
    amqp: Cell
    stomp: Cell


# fmt: off
PROPERTIES = [
    #    case                MQTT 5                                     AMQP 0-9-1                                      STOMP 1.2
    Prop("persistence",      ("qos", 1),                                ("delivery_mode", 2),                           ("persistent", "true")),
    Prop("content type",     ("ContentType", "application/json"),       ("content_type", "application/json"),           ("content-type", "application/json")),
    Prop("correlation",      ("CorrelationData", b"req-42"),            ("correlation_id", "req-42"),                   ("correlation-id", "req-42")),
    Prop("expiry",           ("MessageExpiryInterval", Approx(3600, 3)), ("expiration", "3600000"),                     ("expiration", "3600000")),
    Prop("response topic",   ("ResponseTopic", "replies/c1.v2"),        ("headers.x-reply-to-topic", "replies.c1%2Ev2"), ("x-reply-to-topic", "replies.c1%2Ev2")),
    Prop("custom header",    ("UserProperty.x-tenant", "acme"),         ("headers.x-tenant", "acme"),                   ("x-tenant", "acme")),
    Prop("escaped header",   ("UserProperty.note:1", "a:b\\c\nd\re"),    ("headers.note:1", "a:b\\c\nd\re"),              ("note:1", "a:b\\c\nd\re")),
    Prop("non-ASCII header", ("UserProperty.città", "Zürich ✓"),        ("headers.città", "Zürich ✓"),                  ("città", "Zürich ✓")),
    Prop("priority",         None,                                      ("priority", 7),                                ("priority", "7")),
    Prop("message id",       None,                                      ("message_id", "m-1"),                          ("amqp-message-id", "m-1")),
    Prop("timestamp",        None,                                      ("timestamp", 1700000000),                      ("timestamp", "1700000000000")),
    Prop("reply-to queue",   None,                                      ("reply_to", "rpc-replies"),                    ("reply-to", "/queue/rpc-replies")),
    Prop("content encoding", None,                                      ("content_encoding", "gzip"),                   ("content-encoding", "gzip")),
    Prop("type",             None,                                      ("type", "order.created"),                      ("type", "order.created")),
    Prop("app id",           None,                                      ("app_id", "billing"),                          ("app-id", "billing")),
    Prop("user id",          None,                                      ("user_id", "guest"),                           ("user-id", "guest")),
]
# fmt: on


@dataclass(frozen=True)
class Lossy:
    """A value the consumer's protocol cannot carry as published: what it sees instead.

    `sent` is what the publisher sets (native keys as in `Prop`); `seen` maps native keys of the
    consumer to the expected value, `ABSENT` for "left out"; with `only`, nothing else is seen (beyond
    the delivery's own fields).
    """

    case: str
    publisher: str
    consumer: str
    sent: dict[str, Any]
    seen: dict[str, Any]
    only: bool = False


ABSENT = object()

# fmt: off
LOSSY = [
    #     case                                                   publisher      consumer       sent -> seen
    Lossy("AMQP number/bool header -> STOMP text",               "amqp-tcp",    "stomp-tcp",   {"headers.n": 5, "headers.b": True, "headers.d": Decimal("1.5")}, {"n": "5", "b": "true", "d": "1.5"}),
    Lossy("AMQP bytes header -> STOMP UTF-8 text",               "amqp-tcp",    "stomp-tcp",   {"headers.raw": b"caf\xc3\xa9"}, {"raw": "café"}),
    Lossy("AMQP bytes, not UTF-8 -> STOMP left out",             "amqp-tcp",    "stomp-tcp",   {"headers.raw": b"\xff\xfe", "headers.k": "kept"}, {"raw": ABSENT, "k": "kept"}),
    Lossy("AMQP header with NUL -> STOMP left out",              "amqp-tcp",    "stomp-tcp",   {"headers.z": "a\x00b", "headers.k": "kept"}, {"z": ABSENT, "k": "kept"}),
    Lossy("AMQP table/array/void header -> STOMP left out",      "amqp-tcp",    "stomp-tcp",   {"headers.t": {"a": 1}, "headers.l": [1, 2], "headers.v": None, "headers.k": "kept"}, {"t": ABSENT, "l": ABSENT, "v": ABSENT, "k": "kept"}),
    Lossy("AMQP number/bool/bytes header -> MQTT text",          "amqp-tcp",    "mqtt5-tcp",   {"headers.n": 5, "headers.b": False, "headers.raw": b"caf\xc3\xa9"}, {"UserProperty.n": "5", "UserProperty.b": "false", "UserProperty.raw": "café"}),
    Lossy("AMQP table/void header -> MQTT left out",             "amqp-tcp",    "mqtt5-tcp",   {"headers.t": {"a": 1}, "headers.v": None, "headers.k": "kept"}, {"UserProperty.t": ABSENT, "UserProperty.v": ABSENT, "UserProperty.k": "kept"}),
    Lossy("AMQP array header -> repeated MQTT user property",    "amqp-tcp",    "mqtt5-tcp",   {"headers.l": ["a", 2]}, {"UserProperty.l": ["a", "2"]}),
    Lossy("AMQP header with NUL -> MQTT left out",               "amqp-tcp",    "mqtt5-tcp",   {"headers.z": "a\x00b", "headers.k": "kept"}, {"UserProperty.z": ABSENT, "UserProperty.k": "kept"}),
    Lossy("AMQP bytes, not UTF-8 -> MQTT left out",              "amqp-tcp",    "mqtt5-tcp",   {"headers.raw": b"\xff\xfe", "headers.k": "kept"}, {"UserProperty.raw": ABSENT, "UserProperty.k": "kept"}),
    Lossy("AMQP priority/id/timestamp/reply-to -> MQTT left out", "amqp-tcp",   "mqtt5-tcp",   {"priority": 9, "message_id": "m", "timestamp": 1, "reply_to": "q"}, {"qos": 0}, only=True),
    Lossy("AMQP x-reply-to-topic with # -> no response topic",   "amqp-tcp",    "mqtt5-tcp",   {"headers.x-reply-to-topic": "replies.#"}, {"ResponseTopic": ABSENT}),
    Lossy("AMQP properties -> MQTT 3.1.1: payload and QoS only", "amqp-tcp",    "mqtt311-tcp", {"delivery_mode": 2, "content_type": "text/plain", "headers.k": "v"}, {"qos": 1}, only=True),
    Lossy("AMQP transient -> MQTT QoS 0 on a QoS 1 subscription", "amqp-tcp",   "mqtt5-tcp",   {"delivery_mode": 1}, {"qos": 0}),
    Lossy("MQTT 3.1.1 QoS 1 -> AMQP persistent, QoS in header",  "mqtt311-tcp", "amqp-tcp",    {"qos": 1}, {"delivery_mode": 2, "headers.x-mqtt-publish-qos": 1}, only=True),
    Lossy("MQTT QoS 0 -> AMQP transient",                        "mqtt5-tcp",   "amqp-tcp",    {"qos": 0}, {"delivery_mode": 1, "headers.x-mqtt-publish-qos": 0}),
    Lossy("MQTT binary correlation data -> AMQP header",         "mqtt5-tcp",   "amqp-tcp",    {"CorrelationData": b"\xff\x00\x01"}, {"correlation_id": ABSENT, "headers.x-correlation-data": b"\xff\x00\x01"}),
    Lossy("MQTT binary correlation data -> MQTT 5 intact",       "mqtt5-tcp",   "mqtt5-tcp",   {"CorrelationData": b"\xff\x00\x01"}, {"CorrelationData": b"\xff\x00\x01"}),
    Lossy("MQTT binary correlation data -> STOMP left out",      "mqtt5-tcp",   "stomp-tcp",   {"CorrelationData": b"\xff\x00\x01", "qos": 0}, {"x-mqtt-publish-qos": "0"}, only=True),
    Lossy("MQTT repeated user property -> AMQP array",           "mqtt5-tcp",   "amqp-tcp",    {"UserProperty.k": ["1", "2"]}, {"headers.k": ["1", "2"]}),
    Lossy("MQTT repeated user property -> STOMP left out",       "mqtt5-tcp",   "stomp-tcp",   {"UserProperty.k": ["1", "2"], "UserProperty.one": "x"}, {"k": ABSENT, "one": "x"}),
    Lossy("MQTT payload format indicator -> AMQP header",        "mqtt5-tcp",   "amqp-tcp",    {"PayloadFormatIndicator": 1}, {"headers.x-mqtt-payload-format-indicator": 1}),
    Lossy("MQTT payload format indicator -> MQTT 5 intact",      "mqtt5-tcp",   "mqtt5-tcp",   {"PayloadFormatIndicator": 1}, {"PayloadFormatIndicator": 1}),
    Lossy("STOMP without persistent -> AMQP no delivery mode",   "stomp-tcp",   "amqp-tcp",    {"x-k": "v"}, {"delivery_mode": ABSENT, "headers.x-k": "v"}, only=True),
    Lossy("STOMP non-numeric priority -> AMQP header",           "stomp-tcp",   "amqp-tcp",    {"priority": "high"}, {"priority": ABSENT, "headers.priority": "high"}),
    Lossy("STOMP expires (absolute ms) -> AMQP expiration",      "stomp-tcp",   "amqp-tcp",    {"expires": "+3600000"}, {"expiration": Approx(3600000, 5000)}),
    Lossy("STOMP expires (absolute ms) -> MQTT expiry (s)",      "stomp-tcp",   "mqtt5-tcp",   {"expires": "+3600000"}, {"MessageExpiryInterval": Approx(3600, 6)}),
    Lossy("STOMP 256-char correlation-id -> AMQP left out",      "stomp-tcp",   "amqp-tcp",    {"correlation-id": "c" * 256, "x-k": "kept"}, {"correlation_id": ABSENT, "headers.x-k": "kept"}),
    Lossy("STOMP header with LF -> STOMP 1.0 left out",          "stomp-tcp",   "stomp10-tcp", {"x-multi": "a\nb", "x-k": "kept"}, {"x-multi": ABSENT, "x-k": "kept"}),
]
# fmt: on


# -- clients -------------------------------------------------------------------------------------------------


@dataclass
class Delivery:
    """One received message: body, where it says it came from (the consumer's native spelling), and its
    properties as a flat dict of native keys (see `Prop`)."""

    body: bytes
    destination: str
    props: dict[str, Any] = field(default_factory=dict)


class Inbox:
    """The deliveries of one subscription, in order. `wait` blocks on a condition (or pumps a
    single-threaded client's I/O) until enough arrived or the timeout passes."""

    def __init__(self, pump: Callable[[float], None] | None = None) -> None:
        self.cond = threading.Condition()
        self.items: list[Delivery] = []
        self._pump = pump

    def add(self, delivery: Delivery) -> None:
        with self.cond:
            self.items.append(delivery)
            self.cond.notify_all()

    def wait(self, count: int, timeout: float = TIMEOUT) -> list[Delivery]:
        """At least `count` deliveries (all received so far)."""
        return self.wait_until(lambda items: len(items) >= count, f"{count} deliveries", timeout)

    def wait_until(
        self, predicate: Callable[[list[Delivery]], bool], what: str, timeout: float = TIMEOUT
    ) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while True:
            with self.cond:
                if predicate(self.items):
                    return list(self.items)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"timed out waiting for {what}, got {len(self.items)}: "
                        f"{[(d.destination, d.body[:40]) for d in self.items][:20]}"
                    )
                if self._pump is None:
                    self.cond.wait(remaining)
                    continue
            self._pump(min(remaining, 0.05))


class Client:
    """The operations the tables need, over one protocol's real client library."""

    protocol = ""

    def subscribe(self, name: str) -> Inbox:
        """Subscribe to a topic (or filter) spelled natively; returns once the broker confirmed it."""
        raise NotImplementedError

    def publish(self, name: str, body: bytes, props: dict[str, Any] | None = None) -> None:
        """Publish to a topic spelled natively; returns once the broker took it (QoS 1 / confirm /
        receipt), or at once for MQTT QoS 0 (`props={"qos": 0}`)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def _paho_properties(props: dict[str, Any]) -> PahoProperties | None:
    if not props:
        return None
    out = PahoProperties(PacketTypes.PUBLISH)
    users: list[tuple[str, str]] = []
    for key, value in props.items():
        if key.startswith("UserProperty."):
            name = key.removeprefix("UserProperty.")
            users.extend((name, item) for item in (value if isinstance(value, list) else [value]))
        else:
            setattr(out, key, value.value if isinstance(value, Approx) else value)
    if users:
        out.UserProperty = users
    return out


_PAHO_NAMES = (
    "PayloadFormatIndicator",
    "MessageExpiryInterval",
    "ContentType",
    "ResponseTopic",
    "CorrelationData",
    "SubscriptionIdentifier",
    "TopicAlias",
)


class MqttClient(Client):
    """paho-mqtt 2 (MQTT 3.1.1 or 5.0 over TCP or WebSocket), network loop in paho's thread."""

    protocol = "mqtt"

    def __init__(
        self,
        proc: BrokerProcess,
        endpoint: Endpoint,
        client_id: str = "",
        persistent: bool = False,
    ) -> None:
        v5 = endpoint.version == "5.0"
        self.client_id = client_id or f"xp-{uuid.uuid4().hex[:10]}"
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            transport="websockets" if endpoint.transport == "ws" else "tcp",
            clean_session=None if v5 else not persistent,
        )
        if endpoint.transport == "ws":
            self.client.ws_set_options(path="/ws")
        self.client.max_inflight_messages_set(1000)
        self.cond = threading.Condition()
        self.connected: ReasonCode | None = None
        self.session_present = False
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.inboxes: list[tuple[str, Inbox]] = []
        self.all = Inbox()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        port = proc.ports["ws" if endpoint.transport == "ws" else "mqtt"]
        connect_props = None
        if v5 and persistent:
            connect_props = PahoProperties(PacketTypes.CONNECT)
            connect_props.SessionExpiryInterval = 3600
        self.client.connect(
            "127.0.0.1", port, keepalive=60, clean_start=not persistent if v5 else 3, properties=connect_props
        )
        self.client.loop_start()
        self._wait(lambda: self.connected is not None, "CONNACK")
        assert self.connected is not None and not self.connected.is_failure, self.connected

    def _wait(self, predicate: Callable[[], object], what: str) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, TIMEOUT):
                raise AssertionError(f"MQTT: timed out waiting for {what}")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        with self.cond:
            self.connected = reason
            self.session_present = bool(flags.session_present)
            self.cond.notify_all()

    def _on_subscribe(
        self, client: Any, userdata: Any, mid: int, reasons: list[ReasonCode], props: Any
    ) -> None:
        with self.cond:
            self.subacks[mid] = reasons
            self.cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        props: dict[str, Any] = {"qos": message.qos, "retain": bool(message.retain), "dup": bool(message.dup)}
        if message.properties is not None:
            for name in _PAHO_NAMES:
                if hasattr(message.properties, name):
                    props[name] = getattr(message.properties, name)
            for key, value in getattr(message.properties, "UserProperty", []):
                existing = props.get("UserProperty." + key)
                if existing is None:
                    props["UserProperty." + key] = value
                elif isinstance(existing, list):
                    existing.append(value)
                else:
                    props["UserProperty." + key] = [existing, value]
        delivery = Delivery(message.payload, message.topic, props)
        self.all.add(delivery)
        for topic_filter, inbox in self.inboxes:
            if paho.topic_matches_sub(topic_filter, message.topic):
                inbox.add(delivery)

    def subscribe(self, name: str, qos: int = 1) -> Inbox:
        inbox = Inbox()
        self.inboxes.append((name, inbox))
        result, mid = self.client.subscribe(name, qos=qos)
        assert result == paho.MQTT_ERR_SUCCESS
        self._wait(lambda: mid in self.subacks, f"SUBACK of {name!r}")
        granted = self.subacks[mid][0]
        assert not granted.is_failure, f"subscribe {name!r} refused: {granted}"
        return inbox

    def publish(
        self, name: str, body: bytes, props: dict[str, Any] | None = None, retain: bool = False
    ) -> None:
        props = dict(props or {})
        qos = props.pop("qos", 1)
        info = self.client.publish(name, body, qos=qos, retain=retain, properties=_paho_properties(props))
        assert info.rc == paho.MQTT_ERR_SUCCESS, info.rc
        if qos:
            info.wait_for_publish(TIMEOUT)
            assert info.is_published(), f"no PUBACK for {name!r}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def abort(self) -> None:
        """Drop the TCP connection without DISCONNECT (a network failure); PUBACKs not yet sent are lost."""
        self.client.loop_stop()  # first, or paho's loop would reconnect
        sock = self.client.socket()
        if sock is not None:
            sock.close()


class AmqpClient(Client):
    """pika BlockingConnection; a subscription's inbox pumps the connection while it waits."""

    protocol = "amqp"

    def __init__(self, proc: BrokerProcess) -> None:
        self.connection = pika.BlockingConnection(
            pika.ConnectionParameters("127.0.0.1", proc.ports["amqp"], frame_max=131072)
        )
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()

    def pump(self, seconds: float) -> None:
        self.connection.process_data_events(time_limit=seconds)

    def consume(self, queue: str, no_ack: bool = True) -> Inbox:
        inbox = Inbox(self.pump)

        def on_message(channel: Any, method: Any, properties: pika.BasicProperties, body: bytes) -> None:
            props: dict[str, Any] = {"redelivered": method.redelivered, "exchange": method.exchange}
            for key in (
                "content_type",
                "content_encoding",
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
            ):
                value = getattr(properties, key)
                if value is not None:
                    props[key] = value
            for key, value in (properties.headers or {}).items():
                props["headers." + key] = value
            inbox.add(Delivery(body, method.routing_key, props))
            if not no_ack:
                channel.basic_ack(method.delivery_tag)

        self.channel.basic_consume(queue, on_message, auto_ack=no_ack)
        return inbox

    def subscribe(self, name: str, exchange: str = "amq.topic") -> Inbox:
        queue = self.channel.queue_declare("", exclusive=True).method.queue
        self.channel.queue_bind(queue, exchange, routing_key=name)
        return self.consume(queue)

    def publish(
        self, name: str, body: bytes, props: dict[str, Any] | None = None, exchange: str = "amq.topic"
    ) -> None:
        fields: dict[str, Any] = {}
        headers: dict[str, Any] = {}
        for key, value in (props or {}).items():
            if key.startswith("headers."):
                headers[key.removeprefix("headers.")] = value
            else:
                fields[key] = value
        if headers:
            fields["headers"] = headers
        self.channel.basic_publish(exchange, name, body, pika.BasicProperties(**fields))

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


class StompListener(stomp.ConnectionListener):  # type: ignore[misc]
    """Routes MESSAGE frames to the inbox of their subscription; records receipts and errors."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.inboxes: dict[str, Inbox] = {}
        self.receipts: set[str] = set()
        self.errors: list[Any] = []

    def on_message(self, frame: Any) -> None:
        headers = dict(frame.headers)
        inbox = self.inboxes.get(headers.get("subscription", ""))
        if inbox is not None:
            inbox.add(Delivery(frame.body, headers.get("destination", ""), headers))

    def on_receipt(self, frame: Any) -> None:
        with self.cond:
            self.receipts.add(frame.headers["receipt-id"])
            self.cond.notify_all()

    def on_error(self, frame: Any) -> None:
        with self.cond:
            self.errors.append(frame)
            self.cond.notify_all()


def _escape_name(name: str) -> str:
    return name.replace("\\", "\\\\").replace("\n", "\\n").replace(":", "\\c").replace("\r", "\\r")


class StompClient(Client):
    """stomp.py (1.2 over TCP or WebSocket in binary frames; 1.0 over TCP), bodies as bytes."""

    protocol = "stomp"

    def __init__(self, proc: BrokerProcess, endpoint: Endpoint) -> None:
        hosts = [("127.0.0.1", proc.ports["ws" if endpoint.transport == "ws" else "stomp"])]
        conn: Any
        if endpoint.transport == "ws":
            conn = WSStompConnection(
                hosts,
                ws_path="/ws",
                header={"Sec-WebSocket-Protocol": "v12.stomp"},
                auto_decode=False,
                binary_mode=True,  # binary bodies cannot go in text frames (RFC 6455 §5.6)
            )
        elif endpoint.version == "1.0":
            conn = stomp.Connection10(hosts, auto_decode=False)
        else:
            conn = stomp.Connection12(hosts, auto_decode=False)
        self.conn = conn
        self.version = endpoint.version
        self.listener = StompListener()
        conn.set_listener("xp", self.listener)
        conn.connect(wait=True)
        self.next_id = 0

    def _receipt(self) -> str:
        self.next_id += 1
        return f"r{self.next_id}"

    def wait_receipt(self, receipt: str) -> None:
        listener = self.listener
        with listener.cond:
            if not listener.cond.wait_for(lambda: receipt in listener.receipts or listener.errors, TIMEOUT):
                raise AssertionError(f"STOMP: no receipt {receipt}")
            assert not listener.errors, [(e.headers, e.body) for e in listener.errors]

    def subscribe(self, name: str) -> Inbox:
        self.next_id += 1
        sub_id = f"s{self.next_id}"
        inbox = Inbox()
        self.listener.inboxes[sub_id] = inbox
        receipt = self._receipt()
        self.conn.subscribe(name, id=sub_id, ack="auto", receipt=receipt)
        self.wait_receipt(receipt)
        return inbox

    def inbox_for(self, sub_id: str) -> Inbox:
        """The inbox of a subscription the broker made (a /temp-queue/ reply subscription)."""
        return self.listener.inboxes.setdefault(sub_id, Inbox())

    def publish(self, name: str, body: bytes, props: dict[str, Any] | None = None) -> None:
        receipt = self._receipt()
        headers = dict(props or {})
        if self.version == "1.2":
            # stomp.py escapes header values but not names (STOMP 1.2 "Value Encoding" covers both).
            headers = {_escape_name(key): value for key, value in headers.items()}
        self.conn.send(name, body, headers=headers, receipt=receipt)
        self.wait_receipt(receipt)

    def close(self) -> None:
        if self.conn.is_connected():
            self.conn.disconnect()


# -- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """One broker for the module (every test uses its own names)."""
    proc = BrokerProcess(tmp_path_factory.mktemp("cross") / "data").start()
    yield proc
    proc.kill()
    assert "Traceback" not in proc.log(), proc.log()


class Clients:
    """Opens clients of any endpoint kind and closes them all at the end of a test."""

    def __init__(self, proc: BrokerProcess) -> None:
        self.proc = proc
        self.opened: list[Client] = []

    def open(self, endpoint: Endpoint | str, **kwargs: Any) -> Any:
        if isinstance(endpoint, str):
            endpoint = BY_NAME[endpoint]
        client: Client
        if endpoint.protocol == "mqtt":
            client = MqttClient(self.proc, endpoint, **kwargs)
        elif endpoint.protocol == "amqp":
            client = AmqpClient(self.proc)
        else:
            client = StompClient(self.proc, endpoint)
        self.opened.append(client)
        return client

    def close_all(self) -> None:
        for client in self.opened:
            client.close()


@pytest.fixture
def clients(broker: BrokerProcess) -> Iterator[Clients]:
    made = Clients(broker)
    yield made
    made.close_all()


def unique(prefix: str = "xp") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def spell_levels(protocol: str, levels: tuple[str, ...]) -> str:
    """Topic levels in a protocol's spelling, the other protocol's separator escaped inside a level as
    README, Names across protocols says (`.` as `%2E` in AMQP/STOMP, `/` as `%2F` in MQTT)."""
    if protocol == "mqtt":
        return "/".join(level.replace("/", "%2F") for level in levels)
    key = ".".join(level.replace(".", "%2E") for level in levels)
    return "/topic/" + key if protocol == "stomp" else key


def observed(props: dict[str, Any], key: str) -> Any:
    return props.get(key, ABSENT)


# -- topics: bodies, names, wildcards ------------------------------------------------------------------------


@pytest.mark.parametrize("pair", ENDPOINT_PAIRS, ids=pair_id)
def test_topic_matrix(clients: Clients, pair: tuple[Endpoint, Endpoint]) -> None:
    """Binary, empty and 1 MiB bodies cross byte for byte, on the topic as the consumer spells it."""
    publisher_kind, consumer_kind = pair
    name = NAMES[0]
    level = unique()
    consumer = clients.open(consumer_kind)
    inbox = consumer.subscribe(name.spelled(consumer_kind.protocol, level))
    publisher = clients.open(publisher_kind)
    for _, body in BODIES:
        publisher.publish(name.spelled(publisher_kind.protocol, level), body)
    got = inbox.wait(len(BODIES))
    assert len(got) == len(BODIES)
    for (case, body), delivery in zip(BODIES, got, strict=True):
        assert delivery.body == body, f"{case} body changed ({len(delivery.body)} of {len(body)} bytes)"
        assert delivery.destination == name.spelled(consumer_kind.protocol, level)


@pytest.mark.parametrize("pair", PROTOCOL_PAIRS, ids=pair_id)
@pytest.mark.parametrize("name", NAMES, ids=lambda n: n.case)
def test_names_cross_exactly(clients: Clients, name: Name, pair: tuple[Endpoint, Endpoint]) -> None:
    """A name holding the other protocol's separator, non-ASCII or `%` arrives as the consumer spells it,
    and never reaches a subscriber of a topic a naive mapping would confuse it with."""
    publisher_kind, consumer_kind = pair
    level = unique()
    consumer = clients.open(consumer_kind)
    inbox = consumer.subscribe(name.spelled(consumer_kind.protocol, level))
    decoy = DECOYS.get(name.case)
    decoy_inbox = None
    if decoy is not None:
        decoy_levels = (level, *decoy)
        decoy_inbox = consumer.subscribe(spell_levels(consumer_kind.protocol, decoy_levels))
    publisher = clients.open(publisher_kind)
    publisher.publish(name.spelled(publisher_kind.protocol, level), b"named")
    (delivery,) = inbox.wait(1)
    assert delivery.body == b"named"
    assert delivery.destination == name.spelled(consumer_kind.protocol, level)
    if decoy_inbox is not None:
        publisher.publish(spell_levels(publisher_kind.protocol, decoy_levels), b"decoy marker")
        first = decoy_inbox.wait(1)[0]
        assert first.body == b"decoy marker", f"{decoy_levels!r} got the message of {name.mqtt!r}"
        assert [d.body for d in inbox.wait(1)] == [b"named"]


@pytest.mark.parametrize("pair", PROTOCOL_PAIRS, ids=pair_id)
@pytest.mark.parametrize("wildcard", WILDCARDS, ids=lambda w: w.case)
def test_wildcards_cross(clients: Clients, wildcard: Wildcard, pair: tuple[Endpoint, Endpoint]) -> None:
    """`+`/`#` and `*`/`#` filters match the same topics whoever published them."""
    publisher_kind, consumer_kind = pair
    level = unique()
    consumer = clients.open(consumer_kind)
    inbox = consumer.subscribe(getattr(wildcard, consumer_kind.protocol).replace("{u}", level))
    publisher = clients.open(publisher_kind)
    for levels in wildcard.misses + wildcard.matches:
        publisher.publish(spell_levels(publisher_kind.protocol, (level, *levels)), "/".join(levels).encode())
    got = inbox.wait(len(wildcard.matches))
    assert [d.body for d in got] == ["/".join(levels).encode() for levels in wildcard.matches]
    expected = [spell_levels(consumer_kind.protocol, (level, *levels)) for levels in wildcard.matches]
    assert [d.destination for d in got] == expected


# -- queues and exchanges (AMQP <-> STOMP) -------------------------------------------------------------------


@pytest.mark.parametrize("form", ["/queue/", "/amq/queue/"])
def test_stomp_queue_destinations_are_amqp_queues(clients: Clients, form: str) -> None:
    """/queue/x and /amq/queue/x are queue x: SEND reaches an AMQP consumer, basic.publish on the
    default exchange reaches a STOMP subscriber."""
    amqp: AmqpClient = clients.open("amqp-tcp")
    queue = unique("q")
    amqp.channel.queue_declare(queue, durable=True)
    stomp_client: StompClient = clients.open("stomp-tcp")
    stomp_client.publish(form + queue, b"from stomp", {"persistent": "true"})
    inbox = amqp.consume(queue, no_ack=False)
    (delivery,) = inbox.wait(1)
    assert (delivery.body, delivery.destination, delivery.props["exchange"]) == (b"from stomp", queue, "")
    amqp.channel.basic_cancel(amqp.channel.consumer_tags[0])

    stomp_inbox = stomp_client.subscribe(form + queue)
    amqp.publish(queue, b"from amqp", exchange="")
    (delivery,) = stomp_inbox.wait(1)
    assert delivery.body == b"from amqp"
    assert delivery.destination == "/queue/" + queue


def test_stomp_queue_is_declared_durable_for_amqp(clients: Clients) -> None:
    """A /queue/ SEND declares the queue durable (README, Names across protocols), so AMQP finds it with a passive declare
    and an equivalent durable declare succeeds."""
    stomp_client: StompClient = clients.open("stomp-tcp")
    queue = unique("q")
    stomp_client.publish("/queue/" + queue, b"x")
    amqp: AmqpClient = clients.open("amqp-tcp")
    assert amqp.channel.queue_declare(queue, passive=True).method.message_count == 1
    assert amqp.channel.queue_declare(queue, durable=True).method.message_count == 1


@pytest.mark.parametrize("direction", ["amqp->stomp", "stomp->amqp"])
def test_exchange_destinations(clients: Clients, direction: str) -> None:
    """/exchange/x/k is exchange x, routing key k, both ways."""
    amqp: AmqpClient = clients.open("amqp-tcp")
    exchange = unique("ex")
    amqp.channel.exchange_declare(exchange, "direct")
    stomp_client: StompClient = clients.open("stomp-tcp")
    if direction == "amqp->stomp":
        inbox = stomp_client.subscribe(f"/exchange/{exchange}/k1")
        amqp.publish("k2", b"other key", exchange=exchange)
        amqp.publish("k1", b"to k1", exchange=exchange)
        (delivery,) = inbox.wait(1)
        assert (delivery.body, delivery.destination) == (b"to k1", f"/exchange/{exchange}/k1")
    else:
        inbox = amqp.subscribe("k1", exchange=exchange)
        stomp_client.publish(f"/exchange/{exchange}/k2", b"other key")
        stomp_client.publish(f"/exchange/{exchange}/k1", b"to k1")
        (delivery,) = inbox.wait(1)
        assert (delivery.body, delivery.destination, delivery.props["exchange"]) == (b"to k1", "k1", exchange)


# -- properties ----------------------------------------------------------------------------------------------


#: Properties a consumer sees that no row sets: the QoS header of an MQTT publish, STOMP's absolute
#: `expires` beside `expiration`, and the delivery's own fields.
_INFRASTRUCTURE = {
    "mqtt": {"qos", "retain", "dup", "SubscriptionIdentifier", "TopicAlias"},
    "amqp": {"redelivered", "exchange"},
    "stomp": {"subscription", "destination", "message-id", "redelivered", "content-length", "ack", "expires"},
}


def _extra_seen(publisher: str, consumer: str) -> set[str]:
    if publisher == "mqtt" and consumer == "amqp":
        return {"headers.x-mqtt-publish-qos"}
    if publisher == "mqtt" and consumer == "stomp":
        return {"x-mqtt-publish-qos"}
    return set()


@pytest.mark.parametrize("pair", PROTOCOL_PAIRS, ids=pair_id)
def test_properties_cross(clients: Clients, pair: tuple[Endpoint, Endpoint]) -> None:
    """Every row of PROPERTIES the publisher can set arrives as the consumer's spelling of it; a row the
    consumer cannot carry is left out; nothing else appears."""
    publisher_kind, consumer_kind = pair
    sender, receiver = publisher_kind.protocol, consumer_kind.protocol
    rows = [row for row in PROPERTIES if getattr(row, sender) is not None]
    sent = dict(getattr(row, sender) for row in rows)
    level = unique()
    consumer = clients.open(consumer_kind)
    inbox = consumer.subscribe(NAMES[0].spelled(receiver, level))
    clients.open(publisher_kind).publish(NAMES[0].spelled(sender, level), b"props", sent)
    (delivery,) = inbox.wait(1)
    wrong = []
    expected_keys = set()
    for row in rows:
        cell = getattr(row, receiver)
        if cell is None:
            continue
        key, value = cell
        expected_keys.add(key)
        if observed(delivery.props, key) != value:
            wrong.append(f"{row.case}: {key}={observed(delivery.props, key)!r}, expected {value!r}")
    assert not wrong, wrong
    unexpected = (
        set(delivery.props) - expected_keys - _INFRASTRUCTURE[receiver] - _extra_seen(sender, receiver)
    )
    assert not unexpected, {key: delivery.props[key] for key in unexpected}


@pytest.mark.parametrize("case", LOSSY, ids=lambda c: c.case)
def test_values_that_do_not_cross(clients: Clients, case: Lossy) -> None:
    """A value the consumer's protocol cannot carry is left out or converted as documented; the message
    itself always arrives and no connection is closed."""
    publisher_kind = BY_NAME[case.publisher]
    consumer = clients.open(case.consumer)
    level = unique()
    inbox = consumer.subscribe(NAMES[0].spelled(consumer.protocol, level))
    sent = dict(case.sent)
    if sent.get("expires", "").startswith("+"):
        sent["expires"] = str(int(time.time() * 1000) + int(sent["expires"][1:]))
    publisher = clients.open(publisher_kind)
    publisher.publish(NAMES[0].spelled(publisher.protocol, level), b"lossy", sent)
    (delivery,) = inbox.wait(1)
    assert delivery.body == b"lossy"
    for key, value in case.seen.items():
        seen = observed(delivery.props, key)
        if key == "expiration" and seen is not ABSENT:
            seen = int(seen)
        assert seen == value, f"{key}: {'absent' if seen is ABSENT else repr(seen)}, expected " + (
            "absent" if value is ABSENT else repr(value)
        )
    if case.only:
        expected = {key for key, value in case.seen.items() if value is not ABSENT}
        assert (
            set(delivery.props) - _INFRASTRUCTURE[consumer.protocol]
            == expected - _INFRASTRUCTURE[consumer.protocol]
        ), delivery.props
    # Both connections still work.
    publisher.publish(NAMES[0].spelled(publisher.protocol, level), b"after")
    assert [d.body for d in inbox.wait(2)] == [b"lossy", b"after"]


@pytest.mark.parametrize("publisher_kind", ["amqp-tcp", "stomp-tcp"])
def test_routing_key_that_is_no_mqtt_topic_name_is_not_delivered_to_mqtt(
    clients: Clients, publisher_kind: str
) -> None:
    """A routing key with `+` or `#` in it is a legal AMQP/STOMP name but no MQTT Topic Name
    [MQTT-4.7.1-1]: an MQTT subscriber whose filter matches it does not get it (the broker logs and
    counts the drop), and keeps getting everything else."""
    level = unique()
    mqtt: MqttClient = clients.open("mqtt5-tcp")
    mqtt.subscribe(f"{level}/#")
    publisher = clients.open(publisher_kind)
    for key in (f"{level}.#", f"{level}.a+b", f"{level}.ok"):
        publisher.publish(spell_levels(publisher.protocol, tuple(key.split("."))), key.encode())
    first = mqtt.all.wait(1)[0]
    assert (first.destination, first.body) == (f"{level}/ok", f"{level}.ok".encode())


def test_mqtt_topic_too_long_for_amqp(clients: Clients) -> None:
    """An MQTT topic over AMQP's 255-octet shortstr is delivered to an AMQP consumer with an empty
    routing key instead of breaking the delivery (README.md, "Names across protocols")."""
    amqp: AmqpClient = clients.open("amqp-tcp")
    level = unique()
    inbox = amqp.subscribe(level + ".#")
    long_topic = level + "/" + "x" * 300
    clients.open("mqtt5-tcp").publish(long_topic, b"long")
    (delivery,) = inbox.wait(1)
    assert (delivery.body, delivery.destination) == (b"long", "")


# -- delivery semantics --------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["mqtt311-tcp", "mqtt5-tcp", "mqtt5-ws"])
@pytest.mark.parametrize("leave", ["disconnect", "network failure"])
def test_mqtt_qos1_session_gets_every_amqp_confirmed_message_after_reconnect(
    clients: Clients, endpoint: str, leave: str
) -> None:
    """An AMQP publisher with confirms writes to the topic of a persistent MQTT QoS 1 subscriber, which
    goes away (DISCONNECT, or the connection just drops with deliveries in flight) and comes back: it
    then has every confirmed message, the ones it never acknowledged again with DUP set, in order."""
    client_id = unique("sess")
    topic = unique() + "/orders"
    subscriber: MqttClient = clients.open(endpoint, client_id=client_id, persistent=True)
    subscriber.subscribe(topic, qos=1)
    amqp: AmqpClient = clients.open("amqp-tcp")
    key = topic.replace("/", ".")
    for i in range(300):
        amqp.publish(key, b"%d" % i, {"delivery_mode": 2})
        if i == 49:
            subscriber.all.wait(20)  # some arrived, more are on the way
            if leave == "disconnect":
                subscriber.close()
            else:
                subscriber.abort()
    seen_before = {int(d.body) for d in subscriber.all.items}
    again: MqttClient = clients.open(endpoint, client_id=client_id, persistent=True)
    assert again.session_present
    got = again.all.wait_until(lambda items: any(d.body == b"299" for d in items), "message 299")
    after = [int(d.body) for d in got]
    assert seen_before | set(after) == set(range(300)), "a confirmed message was lost"
    new = [n for n in after if n not in seen_before]
    assert new == sorted(new), "messages out of order"
    assert all(d.props["dup"] for d in got if int(d.body) in seen_before), "a redelivery without DUP"
    assert {d.props["qos"] for d in got} == {1}


def test_stomp_receipted_sends_are_persistent_for_amqp_after_crash(
    make_broker_proc: Callable[..., BrokerProcess],
) -> None:
    """STOMP SENDs with `persistent:true` into a /queue/, each RECEIPTed, survive a SIGKILL of the
    broker and reach an AMQP consumer as persistent (delivery_mode 2) messages, in order."""
    proc = make_broker_proc().start()
    crashed = Clients(proc)
    sender: StompClient = crashed.open("stomp-tcp")
    queue = unique("orders")
    for i in range(20):
        sender.publish("/queue/" + queue, b"order %d" % i, {"persistent": "true", "x-n": str(i)})
    proc.kill()  # no orderly shutdown: only what was on disk at RECEIPT time remains
    proc.start()
    restarted = Clients(proc)
    try:
        amqp: AmqpClient = restarted.open("amqp-tcp")
        got = amqp.consume(queue, no_ack=False).wait(20)
        assert [d.body for d in got] == [b"order %d" % i for i in range(20)]
        assert {d.props["delivery_mode"] for d in got} == {2}
        assert [d.props["headers.x-n"] for d in got] == [str(i) for i in range(20)]
    finally:
        restarted.close_all()


@pytest.mark.parametrize("consumer_kind", ["stomp-tcp", "amqp-tcp"])
def test_retained_message_is_for_mqtt_subscribers_only(clients: Clients, consumer_kind: str) -> None:
    """A retained MQTT message is sent to MQTT subscribers that subscribe later, not to STOMP or AMQP
    subscriptions (the documented rule: retained messages are MQTT state); a live retained publish
    reaches every protocol like any other."""
    level = unique()
    topic = NAMES[0].spelled("mqtt", level)
    mqtt: MqttClient = clients.open("mqtt5-tcp")
    mqtt.publish(topic, b"retained", retain=True)
    consumer = clients.open(consumer_kind)
    inbox = consumer.subscribe(NAMES[0].spelled(consumer.protocol, level))
    late_inbox = clients.open("mqtt5-tcp").subscribe(topic)
    assert [(d.body, d.props["retain"]) for d in late_inbox.wait(1)] == [(b"retained", True)]
    mqtt.publish(topic, b"live", retain=True)
    assert [d.body for d in inbox.wait(1)] == [b"live"]
    assert [d.body for d in inbox.items] == [b"live"]


# -- request / reply -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rpc:
    """A request/reply path: how the requester names where replies go, and who answers."""

    requester: str  # endpoint name
    reply_via: str  # "topic" (MQTT Response Topic / header x-reply-to-topic), "queue", "temp-queue", "direct"
    responder: str  # endpoint name


# fmt: off
RPCS = [
    # a topic for the replies works with every responder
    Rpc("mqtt5-tcp", "topic", "amqp-tcp"),  Rpc("mqtt5-tcp", "topic", "stomp-tcp"),  Rpc("mqtt5-tcp", "topic", "mqtt5-tcp"),
    Rpc("amqp-tcp", "topic", "mqtt5-tcp"),  Rpc("amqp-tcp", "topic", "stomp-tcp"),   Rpc("amqp-tcp", "topic", "amqp-tcp"),
    Rpc("stomp-tcp", "topic", "mqtt5-tcp"), Rpc("stomp-tcp", "topic", "amqp-tcp"),   Rpc("stomp-tcp", "topic", "stomp-tcp"),
    # a reply queue (MQTT cannot publish to a queue)
    Rpc("stomp-tcp", "temp-queue", "amqp-tcp"), Rpc("stomp-tcp", "temp-queue", "stomp-tcp"),
    Rpc("amqp-tcp", "queue", "stomp-tcp"),      Rpc("amqp-tcp", "queue", "amqp-tcp"),
    Rpc("amqp-tcp", "direct", "stomp-tcp"),     Rpc("amqp-tcp", "direct", "amqp-tcp"),
    Rpc("stomp-ws", "temp-queue", "amqp-tcp"),
]
# fmt: on


def _listen_for_replies(requester: Any, rpc: Rpc, level: str) -> tuple[Inbox, dict[str, Any], str]:
    """Start receiving replies: the inbox, the request properties that say where replies go, and the
    destination spelling the replies will arrive with."""
    if rpc.reply_via == "topic":
        levels = (level, "replies", "c1.v2")  # a dot inside a level, so the escape crosses too
        spelled = spell_levels(requester.protocol, levels)
        inbox = requester.subscribe(spelled)
        if requester.protocol == "mqtt":
            return inbox, {"ResponseTopic": spelled}, spelled
        key = spell_levels("amqp", levels)
        return (
            inbox,
            {("headers.x-reply-to-topic" if requester.protocol == "amqp" else "x-reply-to-topic"): key},
            spelled,
        )
    if rpc.reply_via == "temp-queue":
        return (
            requester.inbox_for("/temp-queue/replies"),
            {"reply-to": "/temp-queue/replies"},
            "/temp-queue/replies",
        )
    if rpc.reply_via == "queue":
        queue = requester.channel.queue_declare("", exclusive=True).method.queue
        return requester.consume(queue), {"reply_to": queue}, queue
    inbox = requester.consume("amq.rabbitmq.reply-to")  # direct reply-to (RabbitMQ's pseudo-queue)
    return inbox, {"reply_to": "amq.rabbitmq.reply-to"}, ""


def _answer(responder: Any, request: Delivery, body: bytes) -> None:
    """Answer as a responder of that protocol does: to the reply address it was given, correlated."""
    props = request.props
    if responder.protocol == "mqtt":
        responder.publish(props["ResponseTopic"], body, {"CorrelationData": props["CorrelationData"]})
    elif responder.protocol == "amqp":
        answer = {"correlation_id": props["correlation_id"]}
        if "reply_to" in props:
            responder.publish(props["reply_to"], body, answer, exchange="")
        else:
            responder.publish(props["headers.x-reply-to-topic"], body, answer)
    else:
        answer = {"correlation-id": props["correlation-id"]}
        reply_to = props.get("reply-to") or "/topic/" + props["x-reply-to-topic"]
        responder.publish(reply_to, body, answer)


_CORRELATION = {
    "mqtt": ("CorrelationData", b"c-7"),
    "amqp": ("correlation_id", "c-7"),
    "stomp": ("correlation-id", "c-7"),
}


@pytest.mark.parametrize("rpc", RPCS, ids=lambda r: f"{r.requester}-{r.reply_via}->{r.responder}")
def test_request_reply(clients: Clients, rpc: Rpc) -> None:
    """A requester names where replies go in its protocol's way (MQTT 5 Response Topic, header
    x-reply-to-topic, AMQP reply_to, STOMP reply-to with /temp-queue/, direct reply-to) and sets a
    correlation; a responder of another protocol answers there, correlated, and the requester gets it."""
    level = unique()
    responder = clients.open(rpc.responder)
    requests = responder.subscribe(spell_levels(responder.protocol, (level, "rpc")))
    requester = clients.open(rpc.requester)
    replies, reply_props, reply_destination = _listen_for_replies(requester, rpc, level)
    key, correlation = _CORRELATION[requester.protocol]
    requester.publish(
        spell_levels(requester.protocol, (level, "rpc")), b"2+2", {**reply_props, key: correlation}
    )
    (request,) = requests.wait(1)
    _answer(responder, request, b"4")
    (reply,) = replies.wait(1)
    assert reply.body == b"4"
    assert reply.props[key] == correlation
    if reply_destination:
        assert reply.destination == reply_destination


def test_amqp_rpc_server_sees_stomp_temp_queue_as_server_named_queue(clients: Clients) -> None:
    """The reply-to of a STOMP /temp-queue/ is, for AMQP, the bare name of an exclusive server-named queue
    (what an RPC server passes as routing key on the default exchange)."""
    server: AmqpClient = clients.open("amqp-tcp")
    queue = unique("rpc")
    server.channel.queue_declare(queue, exclusive=True)
    requests = server.consume(queue)
    requester: StompClient = clients.open("stomp-tcp")
    requester.publish("/queue/" + queue, b"?", {"reply-to": "/temp-queue/replies"})
    (request,) = requests.wait(1)
    assert request.props["reply_to"].startswith("amq.gen-")


@pytest.mark.parametrize(
    "rpc",
    [r for r in RPCS if r.reply_via != "topic"],
    ids=lambda r: f"{r.requester}-{r.reply_via}->{r.responder}",
)
def test_reply_to_a_requester_that_is_gone_is_dropped(clients: Clients, rpc: Rpc) -> None:
    """The requester's reply queue is gone (its connection closed) when the answer comes: the reply is
    dropped as unroutable and the responder's connection carries on (a STOMP responder is not refused
    for sending to a queue it may not declare)."""
    level = unique()
    responder = clients.open(rpc.responder)
    requests = responder.subscribe(spell_levels(responder.protocol, (level, "rpc")))
    requester = clients.open(rpc.requester)
    _, reply_props, _ = _listen_for_replies(requester, rpc, level)
    key, correlation = _CORRELATION[requester.protocol]
    requester.publish(
        spell_levels(requester.protocol, (level, "rpc")), b"2+2", {**reply_props, key: correlation}
    )
    (request,) = requests.wait(1)
    requester.close()
    _answer(responder, request, b"4")
    # Still connected and working: the next request arrives.
    clients.open("amqp-tcp").publish(f"{level}.rpc", b"next")
    assert [d.body for d in requests.wait(2)] == [b"2+2", b"next"]
