"""MQTT end to end with paho-mqtt (3.1, 3.1.1 and 5.0 over TCP, TLS, WebSocket and WSS) against a real broker
process; raw packets over a socket (`RawMqtt`) where paho cannot produce or observe what a test needs.

The helpers at the top (`Paho`, `RawMqtt`, the fixtures) are shared with test_mqtt_*.py. Every wait is on a
condition with a timeout, never a sleep standing in for synchronisation. Test names cite the normative
statement they check ([MQTT-x.y.z-n], 3.1.1 numbering unless the name says v5).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from protocols.mqtt.codec import NEED_DATA, MqttParser, encode
from protocols.mqtt.packets import (
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PubAck,
    Publish,
    Subscribe,
    SubscriptionOptions,
    Will,
)
from protocols.mqtt.packets import Properties as MqttProperties
from tests.certs import CertificateSet, make_certificates
from tests.e2e.broker_process import BrokerProcess
from tests.e2e.raw_socket import RawSocket

TIMEOUT = 10.0
#: The listener behind each transport.
TRANSPORT_LISTENER = {"tcp": "mqtt", "tls": "mqtt_tls", "ws": "ws", "wss": "wss"}
PAHO_PROTOCOL = {3: mqtt.MQTTv31, 4: mqtt.MQTTv311, 5: mqtt.MQTTv5}


class Paho:
    """A paho-mqtt client with its network thread, recording what it receives; `wait` blocks on a predicate."""

    def __init__(
        self,
        proc: BrokerProcess,
        transport: str = "tcp",
        level: int = 5,
        client_id: str | None = None,
        certs: CertificateSet | None = None,
        clean: bool = True,
        manual_ack: bool = False,
    ) -> None:
        self.proc = proc
        self.transport = transport
        self.level = level
        self.client_id = client_id or unique("paho")
        self.clean = clean
        self.cond = threading.Condition()
        self.messages: list[mqtt.MQTTMessage] = []
        self.connack: tuple[Any, ...] | None = None
        self.disconnects: list[Any] = []
        self.subacks: dict[int, list[Any]] = {}
        self.published: set[int] = set()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=None if level == 5 else clean,
            protocol=PAHO_PROTOCOL[level],
            transport="websockets" if transport in ("ws", "wss") else "tcp",
            reconnect_on_failure=False,
            manual_ack=manual_ack,
        )
        if transport in ("ws", "wss"):
            self.client.ws_set_options(path="/mqtt")
        if transport in ("tls", "wss"):
            assert certs is not None
            self.client.tls_set(ca_certs=str(certs.ca_cert))
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish

    def _record(self, action: Callable[[], None]) -> None:
        with self.cond:
            action()
            self.cond.notify_all()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._record(lambda: setattr(self, "connack", (flags, reason_code, properties)))

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._record(lambda: self.messages.append(message))

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        self._record(lambda: self.disconnects.append(reason_code))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        self._record(lambda: self.subacks.__setitem__(mid, list(reason_codes)))

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        self._record(lambda: self.published.add(mid))

    def wait(self, predicate: Callable[[], object], what: str, timeout: float = TIMEOUT) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise AssertionError(
                    f"{self.client_id}: timed out waiting for {what}; messages="
                    f"{[(m.topic, m.payload) for m in self.messages]} disconnects={self.disconnects}"
                )

    def never(self, predicate: Callable[[], object], seconds: float) -> bool:
        """True if `predicate` did not become true within `seconds`."""
        with self.cond:
            return not self.cond.wait_for(predicate, seconds)

    def connect(self, keepalive: int = 60, properties: PahoProperties | None = None, **kwargs: Any) -> Any:
        """Connect and wait for the CONNACK; returns (flags, reason code, properties)."""
        port = self.proc.ports[TRANSPORT_LISTENER[self.transport]]
        clean_start = self.clean if self.level == 5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY
        self.client.connect(
            "127.0.0.1", port, keepalive, clean_start=clean_start, properties=properties, **kwargs
        )
        self.client.loop_start()
        self.wait(lambda: self.connack is not None, "CONNACK")
        assert self.connack is not None
        return self.connack

    def subscribe(self, topic: str, qos: int = 0, **kwargs: Any) -> list[Any]:
        if self.level == 5:
            result, mid = self.client.subscribe(topic, options=mqtt.SubscribeOptions(qos=qos, **kwargs))
        else:
            result, mid = self.client.subscribe(topic, qos)
        assert result == mqtt.MQTT_ERR_SUCCESS
        self.wait(lambda: mid in self.subacks, f"SUBACK of {topic}")
        return self.subacks[mid]

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, **kwargs: Any) -> None:
        """Publish and wait until the broker acknowledged it (PUBACK / PUBCOMP; written for QoS 0)."""
        info = self.client.publish(topic, payload, qos, retain, **kwargs)
        info.wait_for_publish(TIMEOUT)
        assert info.is_published(), f"{topic} not acknowledged"

    def wait_messages(self, count: int, timeout: float = TIMEOUT) -> list[mqtt.MQTTMessage]:
        self.wait(lambda: len(self.messages) >= count, f"{count} messages", timeout)
        with self.cond:
            return list(self.messages)

    def payloads(self) -> list[bytes]:
        with self.cond:
            return [m.payload for m in self.messages]

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


class RawMqtt(RawSocket):
    """A plain socket speaking MQTT packets, for what client libraries cannot send or show."""

    def __init__(self, port: int, level: int = 4) -> None:
        super().__init__(port, TIMEOUT)
        self.level = level
        self.parser = MqttParser(server_side=False, protocol_level=level)

    def feed(self, data: bytes) -> None:
        self.parser.feed(data)

    def send(self, *packets: Packet) -> None:
        self.raw(b"".join(encode(p, self.level) for p in packets))

    def raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def packet(self, timeout: float = TIMEOUT) -> Packet:
        """The next packet from the broker; AssertionError if none comes (or the connection closes)."""
        deadline = time.monotonic() + timeout
        while True:
            packet = self.parser.next_packet()
            if packet is not NEED_DATA:
                return packet
            if self.eof or not self.read_once(deadline):
                raise AssertionError("no packet from the broker" + (" (closed)" if self.eof else ""))

    def connect(self, client_id: str, **kwargs: Any) -> ConnAck:
        self.send(Connect(client_id, self.level, **kwargs))
        ack = self.packet()
        assert isinstance(ack, ConnAck), ack
        return ack


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def v5_props(packet_type: int, **values: Any) -> PahoProperties:
    props = PahoProperties(packet_type)
    for name, value in values.items():
        setattr(props, name, value)
    return props


# -- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertificateSet:
    return make_certificates(tmp_path_factory.mktemp("mqtt-certs"))


@pytest.fixture(scope="module")
def mqtt_broker(tmp_path_factory: pytest.TempPathFactory, certs: CertificateSet) -> Iterator[BrokerProcess]:
    """One broker with every MQTT listener (TCP, TLS, WS, WSS), shared by this module's tests."""
    tls = {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key)}
    proc = BrokerProcess(tmp_path_factory.mktemp("mqtt-broker") / "data", tls=tls)
    proc.start(wait=("mqtt", "mqtt_tls", "ws", "wss"))
    yield proc
    proc.kill()
    assert "Traceback" not in proc.log(), proc.log()


class Clients:
    """Makes paho clients for one broker and closes them all at the end of a test."""

    def __init__(self, proc: BrokerProcess, certs: CertificateSet | None) -> None:
        self.proc = proc
        self.certs = certs
        self.made: list[Paho] = []
        self.raws: list[RawMqtt] = []

    def paho(self, transport: str = "tcp", level: int = 5, **kwargs: Any) -> Paho:
        client = Paho(self.proc, transport, level, certs=self.certs, **kwargs)
        self.made.append(client)
        return client

    def connected(self, transport: str = "tcp", level: int = 5, **kwargs: Any) -> Paho:
        client = self.paho(transport, level, **kwargs)
        _, reason_code, _ = client.connect()
        assert reason_code == 0
        return client

    def raw(self, level: int = 4, listener: str = "mqtt") -> RawMqtt:
        client = RawMqtt(self.proc.ports[listener], level)
        self.raws.append(client)
        return client

    def close_all(self) -> None:
        for client in self.made:
            try:
                client.close()
            except Exception:  # noqa: S110 - a connection the broker already closed
                pass
        for raw in self.raws:
            raw.close()


@pytest.fixture
def clients(mqtt_broker: BrokerProcess, certs: CertificateSet) -> Iterator[Clients]:
    made = Clients(mqtt_broker, certs)
    yield made
    made.close_all()


#: (transport, protocol level) pairs the basic tests run over.
VARIANTS = [("tcp", 3), ("tcp", 4), ("tcp", 5), ("tls", 4), ("tls", 5), ("ws", 4), ("ws", 5), ("wss", 5)]
LEVEL_NAMES = {3: "3.1", 4: "3.1.1", 5: "5.0"}
VARIANT_IDS = [f"{transport}-{LEVEL_NAMES[level]}" for transport, level in VARIANTS]


# -- QoS 0, 1 and 2 in both directions -------------------------------------------------------------------


@pytest.mark.parametrize(("transport", "level"), VARIANTS, ids=VARIANT_IDS)
def test_qos_0_1_2_in_both_directions(clients: Clients, transport: str, level: int) -> None:
    topic = unique("qos") + "/t"
    sub = clients.connected(transport, level)
    assert [getattr(rc, "value", rc) for rc in sub.subscribe(topic, qos=2)] == [2]
    pub = clients.connected(transport, level)
    for qos in (0, 1, 2):
        pub.publish(topic, f"qos{qos}".encode(), qos=qos)
    got = sub.wait_messages(3)
    assert [(m.payload, m.qos) for m in got] == [(b"qos0", 0), (b"qos1", 1), (b"qos2", 2)]
    assert all(m.topic == topic for m in got)


@pytest.mark.parametrize("level", [4, 5])
def test_qos2_is_delivered_exactly_once_to_the_subscriber(clients: Clients, level: int) -> None:
    topic = unique("once")
    sub = clients.connected("tcp", level)
    sub.subscribe(topic, qos=2)
    pub = clients.connected("tcp", level)
    for i in range(50):
        pub.client.publish(topic, str(i).encode(), qos=2)
    sub.wait_messages(50)
    assert sub.never(lambda: len(sub.messages) > 50, 0.5)
    assert sub.payloads() == [str(i).encode() for i in range(50)]


def test_one_qos0_message_reaches_subscribers_of_every_version_and_option(clients: Clients) -> None:
    """A QoS 0 fan-out encodes once per distinct encoding; each subscriber still gets its own."""
    topic = unique("fanout")
    v3 = clients.connected("tcp", 4)
    v3.subscribe(topic)
    v5 = clients.connected("tcp", 5)
    v5.subscribe(topic)
    keep_retain = clients.connected("tcp", 5)
    keep_retain.subscribe(topic, retainAsPublished=True)
    pub = clients.connected("tcp", 5)
    pub.publish(topic, b"payload", qos=0, retain=True)
    for sub, retained in ((v3, False), (v5, False), (keep_retain, True)):
        [message] = sub.wait_messages(1)
        assert (message.topic, message.payload, bool(message.retain)) == (topic, b"payload", retained)


def test_topic_with_a_dot_routes_exactly(clients: Clients) -> None:
    base = unique("dots")
    dotted = clients.connected()
    dotted.subscribe(f"{base}/v1.2/status")
    slashed = clients.connected()
    slashed.subscribe(f"{base}/v1/2/status")
    pub = clients.connected()
    pub.publish(f"{base}/v1/2/status", b"slash", qos=1)
    pub.publish(f"{base}/v1.2/status", b"dot", qos=1)
    assert [m.payload for m in dotted.wait_messages(1)] == [b"dot"]
    assert [m.payload for m in slashed.wait_messages(1)] == [b"slash"]
    assert dotted.never(lambda: len(dotted.messages) > 1, 0.3)


def test_websocket_subprotocol_mqttv3_1_serves_mqtt_3_1(mqtt_broker: BrokerProcess) -> None:
    from websockets.sync.client import connect as ws_connect

    uri = f"ws://127.0.0.1:{mqtt_broker.ports['ws']}/ws"
    with ws_connect(uri, subprotocols=["mqttv3.1"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "mqttv3.1"
        ws.send(encode(Connect(unique("ws31"), 3), 3))
        parser = MqttParser(server_side=False, protocol_level=3)
        parser.feed(ws.recv(TIMEOUT))
        ack = parser.next_packet()
        assert isinstance(ack, ConnAck) and ack.reason_code == 0


# -- Sessions ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [4, 5])
def test_persistent_session_across_reconnect_MQTT_3_1_2_4(clients: Clients, level: int) -> None:
    client_id = unique("persist")
    topic = unique("cmd")
    props = v5_props(PacketTypes.CONNECT, SessionExpiryInterval=300) if level == 5 else None
    first = clients.paho("tcp", level, client_id=client_id, clean=False)
    first.connect(properties=props)
    first.subscribe(topic, qos=1)
    first.close()
    pub = clients.connected()
    pub.publish(topic, b"while away 1", qos=1)
    pub.publish(topic, b"while away 2", qos=2)
    back = clients.paho("tcp", level, client_id=client_id, clean=False)
    flags, reason_code, _ = back.connect(properties=props)
    assert flags.session_present
    assert [m.payload for m in back.wait_messages(2)] == [b"while away 1", b"while away 2"]


def test_clean_session_starts_empty_MQTT_3_1_2_6(clients: Clients) -> None:
    client_id = unique("clean")
    topic = unique("cmd")
    first = clients.paho("tcp", 4, client_id=client_id, clean=False)
    first.connect()
    first.subscribe(topic, qos=1)
    first.close()
    clients.connected().publish(topic, b"old", qos=1)
    fresh = clients.paho("tcp", 4, client_id=client_id, clean=True)
    flags, _, _ = fresh.connect()
    assert not flags.session_present
    assert fresh.never(lambda: fresh.messages, 0.5)


def test_session_takeover_closes_the_first_connection_MQTT_3_1_4_3(clients: Clients) -> None:
    client_id = unique("take")
    first = clients.paho("tcp", 5, client_id=client_id)
    first.connect()
    second = clients.paho("tcp", 5, client_id=client_id)
    second.connect()
    first.wait(lambda: first.disconnects, "the takeover DISCONNECT")
    assert first.disconnects[0] == 0x8E  # Session taken over
    topic = unique("t")
    second.subscribe(topic)
    clients.connected().publish(topic, b"to the second", qos=1)
    assert second.wait_messages(1)[0].payload == b"to the second"


def test_v3_session_takeover_closes_the_first_connection_MQTT_3_1_4_3(clients: Clients) -> None:
    client_id = unique("take3")
    first = clients.raw(4)
    first.connect(client_id)
    second = clients.raw(4)
    assert second.connect(client_id).reason_code == 0
    assert first.closed_by_broker()


# -- Keep alive -----------------------------------------------------------------------------------------


def test_keep_alive_is_enforced_at_one_and_a_half_times_MQTT_3_1_2_24(clients: Clients) -> None:
    silent = clients.raw(5)
    started = time.monotonic()
    silent.connect(unique("silent"), keepalive=2)
    packet = silent.packet(timeout=8)
    elapsed = time.monotonic() - started
    assert isinstance(packet, Disconnect) and packet.reason_code == 0x8D
    assert 2.9 <= elapsed < 6, elapsed
    assert silent.closed_by_broker()


def test_pings_keep_the_connection_alive(clients: Clients) -> None:
    client = clients.paho("tcp", 4)
    client.connect(keepalive=1)
    assert client.never(lambda: client.disconnects, 3.5)


# -- Retained messages ----------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [4, 5])
def test_retained_messages_reach_wildcard_subscriptions(clients: Clients, level: int) -> None:
    base = unique("home")
    pub = clients.connected("tcp", level)
    pub.publish(f"{base}/kitchen/temp", b"21", qos=1, retain=True)
    pub.publish(f"{base}/hall/temp", b"19", qos=1, retain=True)
    pub.publish(f"{base}/hall/light", b"on", qos=1, retain=True)
    sub = clients.connected("tcp", level)
    sub.subscribe(f"{base}/+/temp", qos=1)
    got = sub.wait_messages(2)
    assert sorted((m.topic, m.payload) for m in got) == [
        (f"{base}/hall/temp", b"19"),
        (f"{base}/kitchen/temp", b"21"),
    ]
    assert all(m.retain for m in got)
    every = clients.connected("tcp", level)
    every.subscribe(f"{base}/#")
    assert len(every.wait_messages(3)) == 3
    pub.publish(f"{base}/hall/light", b"", qos=1, retain=True)  # clears it [MQTT-3.3.1-10]
    after = clients.connected("tcp", level)
    after.subscribe(f"{base}/hall/light")
    assert after.never(lambda: after.messages, 0.5)


def test_v5_retained_message_expiry_is_honoured(clients: Clients) -> None:
    topic = unique("exp")
    pub = clients.connected()
    pub.publish(
        topic,
        b"soon gone",
        qos=1,
        retain=True,
        properties=v5_props(PacketTypes.PUBLISH, MessageExpiryInterval=1),
    )
    first = clients.connected()
    first.subscribe(topic)
    assert first.wait_messages(1)[0].payload == b"soon gone"
    deadline = time.monotonic() + 1.2
    later = clients.paho()
    later.connect()
    later.wait(lambda: time.monotonic() >= deadline, "the expiry", timeout=3)
    later.subscribe(topic)
    assert later.never(lambda: later.messages, 0.5)


# -- Will --------------------------------------------------------------------------------------------------


def test_will_is_sent_on_abnormal_disconnect_only_MQTT_3_1_2_8(clients: Clients) -> None:
    topic = unique("status")
    watcher = clients.connected()
    watcher.subscribe(f"{topic}/#", qos=1)
    polite = clients.raw(4)
    polite.connect(unique("polite"), will=Will(f"{topic}/polite", b"polite gone", 1))
    polite.send(Disconnect())
    assert polite.closed_by_broker()
    crash = clients.raw(4)
    crash.connect(unique("crash"), will=Will(f"{topic}/crash", b"crash gone", 1))
    crash.close()  # no DISCONNECT
    assert [m.payload for m in watcher.wait_messages(1)] == [b"crash gone"]
    assert watcher.never(lambda: len(watcher.messages) > 1, 0.5)


def test_v5_will_delay_and_will_properties(clients: Clients) -> None:
    topic = unique("status")
    watcher = clients.connected()
    watcher.subscribe(topic, qos=1)
    client = clients.raw(5)
    will = Will(topic, b"late", 1, False, MqttProperties(will_delay_interval=2, content_type="text/plain"))
    client.connect(
        unique("delayed"), clean_start=False, will=will, properties=MqttProperties(session_expiry_interval=60)
    )
    client.close()
    closed_at = time.monotonic()
    got = watcher.wait_messages(1, timeout=8)
    assert time.monotonic() - closed_at >= 1.8
    assert got[0].payload == b"late"
    assert got[0].properties.ContentType == "text/plain"


def test_v5_reconnect_within_will_delay_cancels_the_will(clients: Clients) -> None:
    topic = unique("status")
    client_id = unique("back")
    watcher = clients.connected()
    watcher.subscribe(topic, qos=1)
    session = MqttProperties(session_expiry_interval=60)
    will = Will(topic, b"should not come", 1, False, MqttProperties(will_delay_interval=2))
    first = clients.raw(5)
    first.connect(client_id, clean_start=False, will=will, properties=session)
    first.close()
    again = clients.raw(5)
    assert again.connect(client_id, clean_start=False, properties=session).session_present
    assert watcher.never(lambda: watcher.messages, 3.5)


# -- Shared subscriptions ------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [4, 5])
def test_shared_subscription_members_share_the_load(clients: Clients, level: int) -> None:
    topic = unique("jobs")
    members = [clients.connected("tcp", level) for _ in range(3)]
    for member in members:
        member.subscribe(f"$share/workers/{topic}", qos=1)
    pub = clients.connected()
    for i in range(60):
        pub.client.publish(topic, str(i).encode(), qos=1)
    for member in members:
        member.wait(lambda m=member: len(m.messages) >= 5, "a share of the messages")
    total = sum(len(m.payloads()) for m in members)
    members[0].wait(lambda: sum(len(m.messages) for m in members) >= 60, "every message", timeout=TIMEOUT)
    assert total <= 60
    assert sorted(p for m in members for p in m.payloads()) == sorted(str(i).encode() for i in range(60))


# -- MQTT 5 features ---------------------------------------------------------------------------------------


def test_v5_properties_travel_end_to_end(clients: Clients) -> None:
    topic = unique("req")
    sub = clients.connected()
    sub.subscribe(topic, qos=1)
    props = v5_props(
        PacketTypes.PUBLISH,
        ContentType="application/json",
        ResponseTopic=f"{topic}/reply",
        CorrelationData=b"\x01\x02",
        PayloadFormatIndicator=1,
        MessageExpiryInterval=60,
        UserProperty=[("a", "1"), ("a", "2")],
    )
    clients.connected().publish(topic, b"{}", qos=1, properties=props)
    got = sub.wait_messages(1)[0].properties
    assert got.ContentType == "application/json"
    assert got.ResponseTopic == f"{topic}/reply"
    assert got.CorrelationData == b"\x01\x02"
    assert got.PayloadFormatIndicator == 1
    assert 0 < got.MessageExpiryInterval <= 60
    assert got.UserProperty == [("a", "1"), ("a", "2")]


def test_v5_inbound_topic_alias(clients: Clients) -> None:
    topic = unique("alias")
    sub = clients.connected()
    sub.subscribe(topic)
    pub = clients.connected()
    pub.publish(topic, b"1", qos=1, properties=v5_props(PacketTypes.PUBLISH, TopicAlias=1))
    pub.publish("", b"2", qos=1, properties=v5_props(PacketTypes.PUBLISH, TopicAlias=1))
    assert [(m.topic, m.payload) for m in sub.wait_messages(2)] == [(topic, b"1"), (topic, b"2")]


def test_v5_outbound_topic_alias_MQTT_3_3_2_10(clients: Clients) -> None:
    topic = unique("alias-out")
    sub = clients.raw(5)
    sub.connect(unique("raw"), properties=MqttProperties(topic_alias_maximum=2))
    sub.send(Subscribe(1, [(topic, SubscriptionOptions(0))]))
    sub.packet()  # SUBACK
    pub = clients.connected()
    pub.publish(topic, b"1", qos=1)
    pub.publish(topic, b"2", qos=1)
    first, second = sub.packet(), sub.packet()
    assert isinstance(first, Publish) and isinstance(second, Publish)
    assert (first.topic, first.properties.topic_alias) == (topic, 1)  # type: ignore[union-attr]
    assert (second.topic, second.properties.topic_alias) == ("", 1)  # type: ignore[union-attr]


def test_v5_receive_maximum_limits_unacknowledged_deliveries(clients: Clients) -> None:
    topic = unique("recvmax")
    sub = clients.paho(manual_ack=True)
    sub.connect(properties=v5_props(PacketTypes.CONNECT, ReceiveMaximum=2))
    sub.subscribe(topic, qos=1)
    pub = clients.connected()
    for i in range(5):
        pub.publish(topic, str(i).encode(), qos=1)
    sub.wait_messages(2)
    assert sub.never(lambda: len(sub.messages) > 2, 0.5)
    first = sub.messages[0]
    sub.client.ack(first.mid, first.qos)
    sub.wait_messages(3)
    assert sub.never(lambda: len(sub.messages) > 3, 0.3)


def test_v5_subscription_options_and_identifiers(clients: Clients) -> None:
    topic = unique("opts")
    client = clients.connected()
    client.subscribe(topic, qos=1, noLocal=True)
    other = clients.connected()
    other.subscribe(topic, qos=1, retainAsPublished=True)
    props = v5_props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=42)
    result, mid = other.client.subscribe(f"{topic}/#", options=mqtt.SubscribeOptions(qos=0), properties=props)
    other.wait(lambda: mid in other.subacks, "SUBACK")
    client.publish(topic, b"mine", qos=1, retain=True)
    got = other.wait_messages(1)[0]
    assert got.retain  # Retain As Published
    assert got.properties.SubscriptionIdentifier == [42]
    assert client.never(lambda: client.messages, 0.5)  # No Local


def test_v5_oversize_delivery_is_dropped_for_the_client_MQTT_3_1_2_25(clients: Clients) -> None:
    topic = unique("big")
    small = clients.paho()
    small.connect(properties=v5_props(PacketTypes.CONNECT, MaximumPacketSize=100))
    small.subscribe(topic, qos=1)
    pub = clients.connected()
    pub.publish(topic, b"x" * 500, qos=1)
    pub.publish(topic, b"fits", qos=1)
    assert [m.payload for m in small.wait_messages(1)] == [b"fits"]
    assert small.never(lambda: len(small.messages) > 1, 0.3)


# -- $SYS ---------------------------------------------------------------------------------------------------


def test_sys_topics_are_published_periodically(clients: Clients) -> None:
    sub = clients.connected()
    sub.subscribe("$SYS/broker/#")
    sub.wait(
        lambda: (
            {"$SYS/broker/uptime", "$SYS/broker/clients/connected", "$SYS/broker/messages/sent"}
            <= {m.topic for m in sub.messages}
        ),
        "$SYS topics",
    )
    version = next(m for m in sub.messages if m.topic == "$SYS/broker/version")
    assert version.payload.startswith(b"polybroker")
    every = clients.connected()
    every.subscribe("#")
    assert every.never(lambda: any(m.topic.startswith("$SYS") for m in every.messages), 1.5)  # [MQTT-4.7.2-1]


# -- QoS 1 publisher acknowledgement after durability --------------------------------------------------


def test_qos1_messages_of_an_acknowledged_publish_survive_a_crash(make_broker_proc: Any) -> None:
    proc: BrokerProcess = make_broker_proc()
    proc.start(wait=("mqtt",))
    made = Clients(proc, None)
    try:
        client_id = unique("durable")
        topic = unique("t")
        sub = made.paho("tcp", 4, client_id=client_id, clean=False)
        sub.connect()
        sub.subscribe(topic, qos=2)
        sub.close()
        pub = made.connected("tcp", 4)
        for i in range(20):
            pub.publish(topic, f"q1-{i}".encode(), qos=1)
        pub.publish(topic, b"q2", qos=2)
        made.close_all()
        proc.restart(hard=True)  # PUBACK/PUBCOMP came: the messages are on disk
        back = Paho(proc, "tcp", 4, client_id=client_id, clean=False)
        made.made.append(back)
        flags, _, _ = back.connect()
        assert flags.session_present
        assert [m.payload for m in back.wait_messages(21)] == [f"q1-{i}".encode() for i in range(20)] + [
            b"q2"
        ]
    finally:
        made.close_all()


def test_v5_persistent_session_and_inflight_state_survive_a_restart(make_broker_proc: Any) -> None:
    proc: BrokerProcess = make_broker_proc()
    proc.start(wait=("mqtt",))
    made = Clients(proc, None)
    try:
        client_id = unique("v5durable")
        topic = unique("t")
        session = MqttProperties(session_expiry_interval=3600)
        sub = made.raw(5)
        sub.connect(client_id, clean_start=False, properties=session)
        sub.send(Subscribe(1, [(topic, SubscriptionOptions(1))]))
        sub.packet()
        pub = made.raw(5)
        pub.connect(unique("pub"))
        pub.send(Publish(topic, b"unacked", 1, packet_id=1))
        delivered = sub.packet()
        assert isinstance(delivered, Publish) and isinstance(pub.packet(), PubAck)
        sub.close()  # never acknowledged
        made.close_all()
        proc.stop()  # clean stop: the disconnect's session state is flushed
        proc.start(wait=("mqtt",))
        back = RawMqtt(proc.ports["mqtt"], 5)
        made.raws.append(back)
        assert back.connect(client_id, clean_start=False, properties=session).session_present
        again = back.packet()
        assert isinstance(again, Publish)
        assert (again.payload, again.dup, again.packet_id) == (b"unacked", True, delivered.packet_id)
    finally:
        made.close_all()
