"""Tests of the MQTT session (protocols/mqtt/session.py, state.py, mapping.py, retained.py, sys.py): a fake
Connection, the real core over the memory store, no sockets. Organised by spec chapter; test names cite the
normative statement they check ([MQTT-x.y.z-n], 3.1.1 numbering unless the name says v5).

The store's `when_durable` callbacks are queued (`Harness.durable`) and run by the test, so a test sees what
a client sees before and after the store reported durability. The core's clock is the harness's, so
message expiry and Will Delay can be driven by `Harness.advance`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from broker.auth import Authenticator, hash_password
from broker.config import Config, LimitsConfig, ServerConfig, UserConfig, VhostsConfig
from broker.context import FlowGate, ServerContext
from broker.core import Broker
from broker.message import Message, Properties
from protocols.mqtt.codec import NEED_DATA, MqttParser, encode
from protocols.mqtt.mapping import PUBLISH_QOS_HEADER, core_properties, publish_property_content
from protocols.mqtt.packets import (
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    ReasonCode,
    SubAck,
    Subscribe,
    SubscriptionOptions,
    UnsubAck,
    Unsubscribe,
    Will,
)
from protocols.mqtt.packets import Properties as MqttProperties
from protocols.mqtt.session import MqttSession, SysPublisher
from protocols.mqtt.state import SessionState, StateError, filter_matches, make_subscription
from storage.memory import MemoryStore
from tests.protocols.fakes import FakeConnection

# -- harness ---------------------------------------------------------------------------------------------


class Harness:
    """A broker over the memory store with a hand-driven clock, its context, the queued durability callbacks."""

    def __init__(self, config: Config | None = None) -> None:
        self.durable: list[Callable[[], None]] = []
        self.store = MemoryStore(schedule=self.durable.append)
        self.config = config or Config()
        self.clock = 1000.0
        self.broker = Broker(
            self.store,
            clock=lambda: self.clock,
            wall_clock=lambda: 1_700_000_000.0 + self.clock,
            vhosts=self.config.vhosts.names,
        )
        self.context = ServerContext(
            broker=self.broker,
            auth=Authenticator(self.config),
            config=self.config,
            flow=FlowGate(self.broker, 1 << 30),
        )

    def client(self, level: int = 4, is_loopback: bool = True) -> Client:
        return Client(self, level, is_loopback)

    def connected(self, client_id: str = "c", level: int = 4, **kwargs: Any) -> Client:
        client = self.client(level)
        ack = client.connect(client_id, **kwargs)
        assert ack.reason_code == 0, ack
        return client

    def make_durable(self) -> None:
        while self.durable:
            callbacks, self.durable[:] = list(self.durable), []
            for callback in callbacks:
                callback()

    def advance(self, seconds: float) -> None:
        """Move the core's clock and run its periodic maintenance (TTL, queue expiry)."""
        self.clock += seconds
        self.broker.tick()

    @property
    def vhost(self) -> Any:
        return self.broker.vhost("/")


class Client:
    """One MQTT connection to a session: packets in, decoded packets out."""

    def __init__(self, harness: Harness, level: int, is_loopback: bool) -> None:
        self.harness = harness
        self.level = level
        self.conn = FakeConnection(is_loopback)
        self.session = MqttSession(harness.context)
        self.session.connection_made(self.conn)
        self._read = 0
        self._parser: MqttParser | None = None
        #: Packets that arrived after the CONNACK in the same write (a resumed session's backlog).
        self._backlog: list[Packet] = []

    def send(self, *packets: Packet) -> None:
        self.raw(b"".join(encode(p, self.level) for p in packets))

    def raw(self, data: bytes) -> None:
        self.session.data_received(data)

    def received(self) -> list[Packet]:
        """Packets written since the last call (after the durability callbacks ran)."""
        self.harness.make_durable()
        backlog, self._backlog = self._backlog, []
        return backlog + self.pending()

    def pending(self) -> list[Packet]:
        """Packets written since the last call, without running durability callbacks."""
        if self._parser is None:
            self._parser = MqttParser(server_side=False, protocol_level=self.level)
        data = bytes(self.conn.out[self._read :])
        self._read = len(self.conn.out)
        self._parser.feed(data)
        packets = []
        while (packet := self._parser.next_packet()) is not NEED_DATA:
            packets.append(packet)
        return packets

    def one(self, kind: type) -> Any:
        packets = self.received()
        assert len(packets) == 1 and isinstance(packets[0], kind), packets
        return packets[0]

    def publishes(self) -> list[Publish]:
        packets = self.received()
        assert all(isinstance(p, Publish) for p in packets), packets
        return packets  # type: ignore[return-value]

    def connect(
        self,
        client_id: str = "c",
        clean: bool = True,
        keepalive: int = 0,
        will: Will | None = None,
        username: str | None = None,
        password: bytes | None = None,
        properties: MqttProperties | None = None,
    ) -> ConnAck:
        self.send(Connect(client_id, self.level, clean, keepalive, will, username, password, properties))
        packets = self.received()
        assert packets and isinstance(packets[0], ConnAck), packets
        self._backlog = packets[1:]
        return packets[0]

    def subscribe(
        self,
        topic_filter: str,
        qos: int = 0,
        packet_id: int = 1,
        props: MqttProperties | None = None,
        **opts: Any,
    ) -> SubAck:
        self.send(Subscribe(packet_id, [(topic_filter, SubscriptionOptions(qos, **opts))], props))
        packets = self.received()
        assert isinstance(packets[0], SubAck), packets
        self.after_suback = packets[1:]
        return packets[0]

    def publish(
        self,
        topic: str,
        payload: bytes = b"m",
        qos: int = 0,
        packet_id: int = 0,
        retain: bool = False,
        props: MqttProperties | None = None,
        dup: bool = False,
    ) -> None:
        self.send(Publish(topic, payload, qos, retain, dup, packet_id or (1 if qos else 0), props))

    def disconnect(self, reason: int = 0, props: MqttProperties | None = None) -> None:
        self.send(Disconnect(reason, props))
        assert self.conn.closed

    def drop(self) -> None:
        """The network connection breaks (no DISCONNECT)."""
        self.conn.closed = True
        self.session.connection_lost(None)


@pytest.fixture
def harness() -> Harness:
    return Harness()


def v5(**props: Any) -> MqttProperties:
    return MqttProperties(**props)


# -- 3.1 CONNECT / 3.2 CONNACK ------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [3, 4, 5])
def test_connect_is_accepted_at_every_protocol_level(harness: Harness, level: int) -> None:
    client = harness.client(level)
    ack = client.connect("dev1")
    assert ack.reason_code == 0 and not ack.session_present
    assert harness.context.stats.clients_connected == 1


def test_unsupported_protocol_level_gets_return_code_1_and_close_MQTT_3_1_2_2(harness: Harness) -> None:
    client = harness.client()
    # CONNECT, protocol name "MQTT", level 6.
    client.raw(b"\x10\x0f\x00\x04MQTT\x06\x02\x00\x3c\x00\x03dev")
    assert client.conn.out == bytearray(b"\x20\x02\x00\x01")
    assert client.conn.closed


def test_first_packet_not_connect_closes_without_connack_MQTT_3_1_0_1(harness: Harness) -> None:
    client = harness.client()
    client.raw(encode(PingReq(), 4))
    assert client.conn.out == bytearray()
    assert client.conn.closed


def test_second_connect_is_a_protocol_violation_MQTT_3_1_0_2(harness: Harness) -> None:
    client = harness.connected("c1")
    client.send(Connect("c1", 4))
    assert client.conn.closed
    assert client.received() == []


def test_v5_second_connect_gets_disconnect_0x82_MQTT_3_1_0_2(harness: Harness) -> None:
    client = harness.connected("c1", level=5)
    client.send(Connect("c1", 5))
    assert client.one(Disconnect).reason_code == ReasonCode.PROTOCOL_ERROR
    assert client.conn.closed


def test_malformed_connect_on_3_1_1_closes_without_connack_MQTT_3_2_2_6(harness: Harness) -> None:
    client = harness.client()
    data = bytearray(encode(Connect("c", 4), 4))
    data[9] |= 0x01  # the reserved CONNECT flag [MQTT-3.1.2-3]
    client.raw(bytes(data))
    assert client.conn.out == bytearray() and client.conn.closed


def test_v5_malformed_connect_gets_connack_0x81(harness: Harness) -> None:
    client = harness.client(5)
    data = bytearray(encode(Connect("c", 5), 5))
    data[9] |= 0x01
    client.raw(bytes(data))
    assert client.one(ConnAck).reason_code == ReasonCode.MALFORMED_PACKET
    assert client.conn.closed


def test_connection_without_connect_is_closed_after_the_timeout(harness: Harness) -> None:
    client = harness.client()
    client.conn.advance(9)
    assert not client.conn.closed
    client.conn.advance(2)
    assert client.conn.closed


def users_config(**kwargs: Any) -> Config:
    return Config(users=(UserConfig("alice", hash_password("secret")),), **kwargs)


@pytest.mark.parametrize(("level", "code"), [(4, 4), (3, 4), (5, ReasonCode.BAD_USER_NAME_OR_PASSWORD)])
def test_bad_password_is_refused_with_the_return_code_of_the_version(level: int, code: int) -> None:
    harness = Harness(users_config())
    client = harness.client(level)
    ack = client.connect("c", username="alice", password=b"wrong")
    assert ack.reason_code == code
    assert client.conn.closed
    assert harness.context.stats.connections_refused == 1
    assert harness.context.stats.clients_connected == 0
    assert harness.connected("c", level, username="alice", password=b"secret")


@pytest.mark.parametrize(("level", "code"), [(4, 5), (5, ReasonCode.NOT_AUTHORIZED)])
def test_anonymous_login_is_refused_when_anonymous_is_off(level: int, code: int) -> None:
    harness = Harness(Config(server=ServerConfig(allow_anonymous=False)))
    assert harness.client(level).connect("c").reason_code == code


def test_guest_is_refused_from_a_remote_address(harness: Harness) -> None:
    client = harness.client(4, is_loopback=False)
    assert client.connect("c", username="guest", password=b"guest").reason_code == 5


def test_vhost_colon_user_selects_the_vhost() -> None:
    harness = Harness(
        Config(users=(UserConfig("alice", hash_password("secret")),), vhosts=VhostsConfig(("/", "t1")))
    )
    sub = harness.connected("s", username="t1:alice", password=b"secret")
    sub.subscribe("x/y")
    other = harness.connected("p")  # vhost "/"
    other.publish("x/y", b"not for t1")
    assert sub.received() == []
    pub = harness.connected("p", username="t1:alice", password=b"secret")
    pub.publish("x/y", b"for t1")
    assert [p.payload for p in sub.publishes()] == [b"for t1"]
    assert "mqtt-session-s" in harness.broker.vhost("t1").queues


def test_user_name_with_a_colon_and_no_such_vhost_is_the_whole_name() -> None:
    harness = Harness(users_config())
    assert harness.client().connect("c", username="nope:alice", password=b"secret").reason_code == 4


def test_empty_client_id_with_clean_session_0_is_rejected_MQTT_3_1_3_8(harness: Harness) -> None:
    client = harness.client(4)
    assert client.connect("", clean=False).reason_code == 2
    assert client.conn.closed


def test_empty_client_id_with_clean_session_is_accepted_MQTT_3_1_3_6(harness: Harness) -> None:
    assert harness.client(4).connect("", clean=True).reason_code == 0


def test_v5_empty_client_id_gets_an_assigned_client_identifier_MQTT_3_2_2_16(harness: Harness) -> None:
    a = harness.client(5).connect("")
    b = harness.client(5).connect("")
    ids = {a.properties.assigned_client_identifier, b.properties.assigned_client_identifier}
    assert len(ids) == 2 and all(ids)


def test_v5_connack_announces_the_brokers_limits(harness: Harness) -> None:
    props = harness.client(5).connect("c").properties
    assert props.receive_maximum == harness.config.limits.mqtt_max_inflight
    assert props.maximum_packet_size == harness.config.limits.max_frame_size
    assert props.topic_alias_maximum and props.topic_alias_maximum > 0
    assert props.assigned_client_identifier is None


def test_v5_enhanced_authentication_gets_bad_authentication_method(harness: Harness) -> None:
    client = harness.client(5)
    ack = client.connect("c", properties=v5(authentication_method="SCRAM-SHA-1"))
    assert ack.reason_code == ReasonCode.BAD_AUTHENTICATION_METHOD
    assert client.conn.closed


def test_v5_auth_packet_without_an_exchange_is_a_protocol_error(harness: Harness) -> None:
    client = harness.connected("c", level=5)
    client.send(Auth(ReasonCode.CONTINUE_AUTHENTICATION, v5(authentication_method="x")))
    assert client.one(Disconnect).reason_code == ReasonCode.PROTOCOL_ERROR


def test_session_takeover_closes_the_first_connection_MQTT_3_1_4_3(harness: Harness) -> None:
    first = harness.connected("same")
    second = harness.connected("same")
    assert first.conn.closed
    assert not second.conn.closed
    assert harness.context.mqtt_clients[("/", "same")] is second.session
    assert harness.context.stats.clients_connected == 1


def test_v5_session_takeover_sends_disconnect_0x8e_MQTT_3_1_4_3(harness: Harness) -> None:
    first = harness.connected("same", level=5)
    harness.connected("same", level=5)
    assert first.one(Disconnect).reason_code == ReasonCode.SESSION_TAKEN_OVER


def test_takeover_in_another_vhost_is_another_client() -> None:
    harness = Harness(Config(vhosts=VhostsConfig(("/", "t1"))))
    first = harness.connected("same")
    harness.connected("same", username="t1:guest", password=b"guest")
    assert not first.conn.closed


# -- keep alive (3.1.2.10) ------------------------------------------------------------------------------------


def test_keep_alive_closes_after_one_and_a_half_periods_MQTT_3_1_2_24(harness: Harness) -> None:
    client = harness.connected("c", keepalive=10)
    client.conn.advance(14.9)
    assert not client.conn.closed
    client.conn.advance(0.2)
    assert client.conn.closed


def test_keep_alive_counts_from_the_last_packet_MQTT_3_1_2_24(harness: Harness) -> None:
    client = harness.connected("c", keepalive=10)
    client.conn.advance(10)
    client.send(PingReq())
    assert isinstance(client.received()[0], PingResp)
    client.conn.advance(14)
    assert not client.conn.closed
    client.conn.advance(1.1)
    assert client.conn.closed


def test_v5_keep_alive_timeout_sends_disconnect_0x8d_and_the_will(harness: Harness) -> None:
    watcher = harness.connected("w")
    watcher.subscribe("status/#")
    client = harness.connected("c", level=5, keepalive=2, will=Will("status/c", b"gone"))
    client.conn.advance(3.1)
    assert client.one(Disconnect).reason_code == ReasonCode.KEEP_ALIVE_TIMEOUT
    assert [p.payload for p in watcher.publishes()] == [b"gone"]


def test_keep_alive_zero_never_times_out(harness: Harness) -> None:
    client = harness.connected("c", keepalive=0)
    client.conn.advance(100_000)
    assert not client.conn.closed


# -- 3.3 PUBLISH and the QoS flows of chapter 4 ----------------------------------------------------------


@pytest.mark.parametrize("level", [3, 4, 5])
def test_qos0_is_delivered_once_without_acknowledgement(harness: Harness, level: int) -> None:
    sub = harness.connected("s", level)
    sub.subscribe("a/b")
    pub = harness.connected("p", level)
    pub.publish("a/b", b"hello")
    assert pub.received() == []
    [msg] = sub.publishes()
    assert (msg.topic, msg.payload, msg.qos, msg.retain, msg.dup) == ("a/b", b"hello", 0, False, False)


@pytest.mark.parametrize("level", [4, 5])
def test_qos1_publish_gets_puback_and_delivery_needs_one_MQTT_4_3_2_2(harness: Harness, level: int) -> None:
    sub = harness.connected("s", level)
    sub.subscribe("a/b", qos=1)
    pub = harness.connected("p", level)
    pub.publish("a/b", b"one", qos=1, packet_id=7)
    assert pub.one(PubAck).packet_id == 7
    [msg] = sub.publishes()
    assert msg.qos == 1 and msg.packet_id
    assert harness.vhost.queues["mqtt-session-s"].unacked_count == 1
    sub.send(PubAck(msg.packet_id))
    assert harness.vhost.queues["mqtt-session-s"].unacked_count == 0


@pytest.mark.parametrize("level", [4, 5])
def test_qos2_inbound_flow_pubrec_pubrel_pubcomp_MQTT_4_3_3_2(harness: Harness, level: int) -> None:
    sub = harness.connected("s", level)
    sub.subscribe("a/b", qos=2)
    pub = harness.connected("p", level)
    pub.publish("a/b", b"two", qos=2, packet_id=9)
    assert pub.one(PubRec).packet_id == 9
    [msg] = sub.publishes()
    assert msg.qos == 2
    pub.send(PubRel(9))
    assert pub.one(PubComp).packet_id == 9


def test_qos2_resent_publish_before_pubrel_is_not_delivered_twice_MQTT_4_3_3_2(harness: Harness) -> None:
    sub = harness.connected("s")
    sub.subscribe("a/b", qos=2)
    pub = harness.connected("p")
    pub.publish("a/b", b"once", qos=2, packet_id=3)
    assert isinstance(pub.one(PubRec), PubRec)
    pub.publish("a/b", b"once", qos=2, packet_id=3, dup=True)
    assert pub.one(PubRec).packet_id == 3
    assert len(sub.publishes()) == 1
    pub.send(PubRel(3))
    pub.received()
    # After PUBCOMP the id is free: the same id is a new message.
    pub.publish("a/b", b"again", qos=2, packet_id=3)
    assert [p.payload for p in sub.publishes()] == [b"again"]


def test_v5_pubrel_for_an_unknown_packet_id_gets_pubcomp_0x92(harness: Harness) -> None:
    pub = harness.connected("p", level=5)
    pub.send(PubRel(44))
    comp = pub.one(PubComp)
    assert (comp.packet_id, comp.reason_code) == (44, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND)


def test_qos2_outbound_flow_settles_at_pubrec_and_completes_at_pubcomp_MQTT_4_3_3_1(harness: Harness) -> None:
    sub = harness.connected("s", level=5)
    sub.subscribe("a/b", qos=2)
    harness.connected("p").publish("a/b", b"x", qos=2, packet_id=1)
    [msg] = sub.publishes()
    queue = harness.vhost.queues["mqtt-session-s"]
    assert queue.unacked_count == 1
    sub.send(PubRec(msg.packet_id))
    assert sub.one(PubRel).packet_id == msg.packet_id
    assert queue.unacked_count == 0
    sub.send(PubComp(msg.packet_id))
    assert sub.received() == []
    assert msg.packet_id not in sub.session._state.awaiting_pubcomp


@pytest.mark.parametrize(
    ("sub_qos", "pub_qos", "delivered"), [(0, 2, 0), (1, 2, 1), (2, 1, 1), (2, 0, 0), (1, 1, 1)]
)
def test_delivery_qos_is_the_minimum_of_subscription_and_publish_MQTT_3_8_4_6(
    harness: Harness, sub_qos: int, pub_qos: int, delivered: int
) -> None:
    sub = harness.connected("s")
    sub.subscribe("q", qos=sub_qos)
    harness.connected("p").publish("q", qos=pub_qos)
    [msg] = sub.publishes()
    assert msg.qos == delivered


def test_v5_publish_without_subscribers_gets_puback_0x10(harness: Harness) -> None:
    pub = harness.connected("p", level=5)
    pub.publish("nobody/listens", qos=1, packet_id=2)
    ack = pub.one(PubAck)
    assert (ack.packet_id, ack.reason_code) == (2, ReasonCode.NO_MATCHING_SUBSCRIBERS)


def test_puback_waits_for_the_store_when_the_message_went_to_a_durable_session(harness: Harness) -> None:
    sub = harness.connected("s", clean=False)
    sub.subscribe("d/t", qos=1)
    pub = harness.connected("p")
    pub.publish("d/t", qos=1, packet_id=5)
    assert pub.pending() == []  # not durable yet: no PUBACK
    harness.make_durable()
    assert isinstance(pub.pending()[0], PubAck)


def test_puback_is_immediate_when_no_durable_queue_is_involved(harness: Harness) -> None:
    sub = harness.connected("s")
    sub.subscribe("t", qos=1)
    pub = harness.connected("p")
    pub.publish("t", qos=1, packet_id=5)
    assert isinstance(pub.pending()[0], PubAck)


def test_pubacks_keep_the_order_of_their_publishes_MQTT_4_6_0_2(harness: Harness) -> None:
    durable = harness.connected("s", clean=False)
    durable.subscribe("durable/t", qos=1)
    pub = harness.connected("p")
    pub.send(Publish("durable/t", b"1", 1, packet_id=1), Publish("other/t", b"2", 1, packet_id=2))
    pub.send(Publish("other/t", b"3", 1, packet_id=3))
    harness.make_durable()
    assert [p.packet_id for p in pub.pending()] == [1, 2, 3]


def test_same_protocol_routing_is_exact_with_dots_in_levels(harness: Harness) -> None:
    sub = harness.connected("s")
    sub.subscribe("v1.2/status")
    wild = harness.connected("w")
    wild.subscribe("v1/+/status")
    pub = harness.connected("p")
    pub.publish("v1.2/status", b"dot")
    pub.publish("v1/2/status", b"slash")
    assert [(p.topic, p.payload) for p in sub.publishes()] == [("v1.2/status", b"dot")]
    assert [(p.topic, p.payload) for p in wild.publishes()] == [("v1/2/status", b"slash")]


def test_topics_meet_amqp_on_amq_topic(harness: Harness) -> None:
    sub = harness.connected("s")
    sub.subscribe("sensors/+/temp", qos=1)
    harness.vhost.publish(Message("amq.topic", "sensors.k1.temp", b"21", Properties(delivery_mode=2)))
    [msg] = sub.publishes()
    assert (msg.topic, msg.payload, msg.qos) == ("sensors/k1/temp", b"21", 1)
    queue = harness.vhost.declare_queue("amqp-side")
    harness.vhost.bind_queue("amqp-side", "amq.topic", "sensors.#")
    harness.connected("p").publish("sensors/k2/temp", b"22", qos=1)
    assert queue.message_count == 1
    assert queue.get(True).message.properties.headers[PUBLISH_QOS_HEADER] == 1


def test_an_amqp_routing_key_mqtt_cannot_carry_is_dropped_and_counted(harness: Harness) -> None:
    sub = harness.connected("s")
    sub.subscribe("#", qos=1)
    harness.vhost.publish(Message("amq.topic", "a.#", b"x", Properties(delivery_mode=2)))
    assert sub.received() == []
    assert harness.broker.messages_dropped == 1
    sub.conn.advance(0)  # settled after the core's delivery loop
    queue = harness.vhost.queues["mqtt-session-s"]
    assert (queue.unacked_count, queue.message_count) == (0, 0)


def test_v5_receive_maximum_exceeded_by_the_client_gets_0x93_MQTT_3_3_4_9() -> None:
    harness = Harness(Config(limits=LimitsConfig(mqtt_max_inflight=2)))
    pub = harness.connected("p", level=5)
    pub.send(*(Publish("t", b"x", 2, packet_id=i) for i in (1, 2, 3)))
    packets = pub.received()
    assert (
        isinstance(packets[-1], Disconnect) and packets[-1].reason_code == ReasonCode.RECEIVE_MAXIMUM_EXCEEDED
    )


def test_v5_receive_maximum_of_the_client_bounds_unacknowledged_deliveries_MQTT_3_3_4_7(
    harness: Harness,
) -> None:
    sub = harness.connected("s", level=5, properties=v5(receive_maximum=2))
    sub.subscribe("t", qos=1)
    pub = harness.connected("p")
    for i in range(5):
        pub.publish("t", str(i).encode(), qos=1, packet_id=i + 1)
    first = sub.publishes()
    assert [p.payload for p in first] == [b"0", b"1"]
    sub.send(PubAck(first[0].packet_id))
    assert [p.payload for p in sub.publishes()] == [b"2"]


def test_v5_qos2_deliveries_count_against_receive_maximum_until_pubcomp(harness: Harness) -> None:
    sub = harness.connected("s", level=5, properties=v5(receive_maximum=1))
    sub.subscribe("t", qos=2)
    pub = harness.connected("p")
    pub.publish("t", b"1", qos=2, packet_id=1)
    pub.publish("t", b"2", qos=2, packet_id=2)
    [first] = sub.publishes()
    sub.send(PubRec(first.packet_id))
    assert isinstance(sub.one(PubRel), PubRel)  # the second is still held back
    sub.send(PubComp(first.packet_id))
    assert [p.payload for p in sub.publishes()] == [b"2"]


def test_puback_for_a_qos2_delivery_is_a_protocol_error(harness: Harness) -> None:
    sub = harness.connected("s", level=5)
    sub.subscribe("t", qos=2)
    harness.connected("p").publish("t", qos=2, packet_id=1)
    [msg] = sub.publishes()
    sub.send(PubAck(msg.packet_id))
    assert sub.one(Disconnect).reason_code == ReasonCode.PROTOCOL_ERROR


def test_publish_to_a_topic_with_a_wildcard_closes_3_1_1_MQTT_3_3_2_2(harness: Harness) -> None:
    pub = harness.connected("p")
    pub.raw(b"\x30\x05\x00\x03a/#")
    assert pub.conn.closed and pub.received() == []


def test_v5_publish_to_a_topic_with_a_wildcard_gets_disconnect_0x90_MQTT_3_3_2_2(harness: Harness) -> None:
    pub = harness.connected("p", level=5)
    pub.raw(b"\x30\x06\x00\x03a/+\x00")
    assert pub.one(Disconnect).reason_code == ReasonCode.TOPIC_NAME_INVALID


def test_v5_malformed_packet_gets_disconnect_0x81(harness: Harness) -> None:
    pub = harness.connected("p", level=5)
    pub.raw(b"\x36\x05\x00\x01a\x00\x01")  # QoS 3 [MQTT-3.3.1-4]
    assert pub.one(Disconnect).reason_code == ReasonCode.MALFORMED_PACKET


def test_v5_packet_larger_than_the_maximum_gets_disconnect_0x95() -> None:
    harness = Harness(Config(limits=LimitsConfig(max_frame_size=1000)))
    pub = harness.connected("p", level=5)
    pub.publish("t", b"x" * 2000)
    assert pub.one(Disconnect).reason_code == ReasonCode.PACKET_TOO_LARGE


def test_packet_id_zero_closes_3_1_1_MQTT_2_3_1_1(harness: Harness) -> None:
    pub = harness.connected("p")
    pub.raw(b"\x32\x05\x00\x01t\x00\x00")
    assert pub.conn.closed


def test_v5_client_maximum_packet_size_drops_larger_deliveries_MQTT_3_1_2_25(harness: Harness) -> None:
    sub = harness.connected("s", level=5, properties=v5(maximum_packet_size=64))
    sub.subscribe("t", qos=1)
    pub = harness.connected("p")
    pub.publish("t", b"x" * 100, qos=1, packet_id=1)
    pub.publish("t", b"small", qos=1, packet_id=2)
    assert [p.payload for p in sub.publishes()] == [b"small"]
    assert harness.broker.messages_dropped == 1
    sub.conn.advance(0)  # the dropped one is settled as if it had been sent
    assert harness.vhost.queues["mqtt-session-s"].unacked_count == 1


# -- 3.3.2.3.4 Topic Alias ------------------------------------------------------------------------------------


def test_v5_inbound_topic_alias_is_set_then_used(harness: Harness) -> None:
    sub = harness.connected("s")
    sub.subscribe("long/topic/name")
    pub = harness.connected("p", level=5)
    pub.publish("long/topic/name", b"1", props=v5(topic_alias=3))
    pub.publish("", b"2", props=v5(topic_alias=3))
    assert [(p.topic, p.payload) for p in sub.publishes()] == [
        ("long/topic/name", b"1"),
        ("long/topic/name", b"2"),
    ]


def test_v5_unknown_inbound_topic_alias_is_a_protocol_error(harness: Harness) -> None:
    pub = harness.connected("p", level=5)
    pub.publish("", b"x", props=v5(topic_alias=5))
    assert pub.one(Disconnect).reason_code == ReasonCode.PROTOCOL_ERROR


def test_v5_topic_alias_above_the_maximum_gets_0x94_MQTT_3_3_2_9(harness: Harness) -> None:
    pub = harness.connected("p", level=5)
    pub.publish("t", b"x", props=v5(topic_alias=60000))
    assert pub.one(Disconnect).reason_code == ReasonCode.TOPIC_ALIAS_INVALID


def test_v5_outbound_topic_aliases_up_to_the_clients_maximum_MQTT_3_3_2_10(harness: Harness) -> None:
    sub = harness.connected("s", level=5, properties=v5(topic_alias_maximum=1))
    sub.subscribe("t/#")
    pub = harness.connected("p")
    for topic in ("t/a", "t/a", "t/b", "t/a"):
        pub.publish(topic)
    got = sub.publishes()
    assert [(p.topic, p.properties.topic_alias if p.properties else None) for p in got] == [
        ("t/a", 1),
        ("", 1),
        ("t/b", None),
        ("", 1),
    ]


# -- 3.3 properties across protocols (README, Names across protocols) ------------------------------------------------------


def test_v5_message_properties_reach_a_v5_subscriber(harness: Harness) -> None:
    sub = harness.connected("s", level=5)
    sub.subscribe("req")
    pub = harness.connected("p", level=5)
    props = v5(
        payload_format_indicator=1,
        content_type="application/json",
        response_topic="reply/p",
        correlation_data=b"\x00\xffid",
        user_properties=[("k", "v1"), ("k", "v2"), ("other", "x")],
    )
    pub.publish("req", b"{}", props=props)
    [msg] = sub.publishes()
    got = msg.properties
    assert got.payload_format_indicator == 1
    assert got.content_type == "application/json"
    assert got.response_topic == "reply/p"
    assert got.correlation_data == b"\x00\xffid"
    assert got.user_properties == [("k", "v1"), ("k", "v2"), ("other", "x")]


def test_v3_subscriber_gets_payload_and_topic_only(harness: Harness) -> None:
    sub = harness.connected("s", level=4)
    sub.subscribe("req")
    harness.connected("p", level=5).publish("req", b"x", props=v5(content_type="text/plain"))
    [msg] = sub.publishes()
    assert (msg.topic, msg.payload, msg.properties) == ("req", b"x", None)


def test_property_mapping_to_the_neutral_message() -> None:
    props = core_properties(
        v5(
            content_type="text/plain",
            correlation_data=b"abc",
            response_topic="a.b/c",
            message_expiry_interval=30,
            user_properties=[("x", "1")],
        ),
        1,
    )
    assert props.delivery_mode == 2
    assert props.content_type == "text/plain"
    assert props.correlation_id == "abc"
    assert props.expiration == "30000"
    assert props.headers == {"x": "1", PUBLISH_QOS_HEADER: 1, "x-reply-to-topic": "a%2Eb.c"}


def test_amqp_properties_reach_a_v5_subscriber_as_mqtt_properties() -> None:
    message = Message(
        "amq.topic",
        "a.b",
        b"x",
        Properties(
            content_type="text/plain",
            correlation_id="c-1",
            headers={
                "n": 5,
                "s": "t",
                "b": False,
                "raw": b"caf\xc3\xa9",
                "l": ["1", 2],
                "tab": {"a": 1},
                "void": None,
                "x-death": [{"count": 1}],
                "bad\x00": "v",
            },
            delivery_mode=2,
        ),
    )
    content = publish_property_content(message, 0.0)
    assert b"\x03\x00\x0atext/plain" in content
    assert b"\x09\x00\x03c-1" in content
    assert b"\x26\x00\x01n\x00\x015" in content and b"\x26\x00\x01s\x00\x01t" in content
    assert b"\x26\x00\x01b\x00\x05false" in content
    assert b"\x26\x00\x03raw\x00\x05caf\xc3\xa9" in content
    assert b"\x26\x00\x01l\x00\x011\x26\x00\x01l\x00\x012" in content
    assert b"tab" not in content and b"void" not in content
    assert b"x-death" not in content and b"bad" not in content


def test_v5_message_expiry_interval_is_decremented_by_the_waiting_time_MQTT_3_3_2_6(harness: Harness) -> None:
    sub = harness.connected("s", level=5, clean=False, properties=v5(session_expiry_interval=600))
    sub.subscribe("t", qos=1)
    sub.disconnect()
    harness.connected("p", level=5).publish("t", qos=1, packet_id=1, props=v5(message_expiry_interval=60))
    harness.advance(20)
    back = harness.client(5)
    back.connect("s", clean=False, properties=v5(session_expiry_interval=600))
    [msg] = back.publishes()
    assert msg.properties.message_expiry_interval == 40


def test_v5_expired_message_is_not_delivered_MQTT_3_3_2_5(harness: Harness) -> None:
    sub = harness.connected("s", level=5, clean=False, properties=v5(session_expiry_interval=600))
    sub.subscribe("t", qos=1)
    sub.disconnect()
    harness.connected("p", level=5).publish("t", qos=1, packet_id=1, props=v5(message_expiry_interval=5))
    harness.advance(6)
    back = harness.client(5)
    back.connect("s", clean=False, properties=v5(session_expiry_interval=600))
    assert back.received() == []


# -- 3.8 SUBSCRIBE / 3.10 UNSUBSCRIBE / 4.7 Topic Names and Filters / 4.8 Shared Subscriptions ---------------


@pytest.mark.parametrize(
    ("topic_filter", "matches", "misses"),
    [
        ("sport/tennis/+", ["sport/tennis/p1"], ["sport/tennis", "sport/tennis/p1/r"]),
        ("sport/#", ["sport", "sport/tennis", "sport/tennis/p1"], ["sports"]),
        ("+/+", ["/finance", "a/b"], ["a", "a/b/c"]),
        ("#", ["a", "a/b", "/"], ["$SYS/x"]),
    ],
)
def test_wildcards_match_per_4_7_1(
    harness: Harness, topic_filter: str, matches: list[str], misses: list[str]
) -> None:
    sub = harness.connected("s")
    assert sub.subscribe(topic_filter).reason_codes == [0]
    pub = harness.connected("p")
    for topic in matches + misses:
        pub.publish(topic, topic.encode())
    assert [p.topic for p in sub.publishes()] == matches
    for topic in matches:
        assert filter_matches(topic_filter, topic)
    for topic in misses:
        assert not filter_matches(topic_filter, topic)


def test_leading_wildcards_do_not_match_dollar_topics_MQTT_4_7_2_1(harness: Harness) -> None:
    plus = harness.connected("plus")
    plus.subscribe("+/broker/x")
    hash_sub = harness.connected("hash")
    hash_sub.subscribe("#")
    named = harness.connected("named")
    named.subscribe("$SYS/#")
    harness.connected("p").publish("$SYS/broker/x", b"v")
    assert plus.received() == [] and hash_sub.received() == []
    assert [p.topic for p in named.publishes()] == ["$SYS/broker/x"]


@pytest.mark.parametrize("bad", ["a/#/b", "a+", "#/", "$share/g", "$share//a", "$share/g+/a"])
def test_invalid_filter_gets_0x80_and_the_others_are_granted_MQTT_3_9_3_2(harness: Harness, bad: str) -> None:
    sub = harness.connected("s")
    sub.send(Subscribe(1, [("ok/1", SubscriptionOptions(1)), (bad, SubscriptionOptions(1))]))
    ack = sub.one(SubAck)
    assert ack.reason_codes == [1, 0x80]
    assert not sub.conn.closed


def test_v5_invalid_filter_gets_topic_filter_invalid(harness: Harness) -> None:
    sub = harness.connected("s", level=5)
    assert sub.subscribe("a/#/b").reason_codes == [ReasonCode.TOPIC_FILTER_INVALID]


def test_granted_qos_is_the_requested_one_up_to_2_MQTT_3_9_3_1(harness: Harness) -> None:
    sub = harness.connected("s")
    sub.send(
        Subscribe(
            4, [("a", SubscriptionOptions(0)), ("b", SubscriptionOptions(1)), ("c", SubscriptionOptions(2))]
        )
    )
    ack = sub.one(SubAck)
    assert (ack.packet_id, ack.reason_codes) == (4, [0, 1, 2])


def test_resubscribing_replaces_the_subscription_MQTT_3_8_4_3(harness: Harness) -> None:
    sub = harness.connected("s")
    sub.subscribe("t", qos=0)
    sub.subscribe("t", qos=1)
    harness.connected("p").publish("t", qos=1, packet_id=1)
    [msg] = sub.publishes()
    assert msg.qos == 1


def test_overlapping_subscriptions_deliver_once_at_the_highest_qos_MQTT_3_3_5_1(harness: Harness) -> None:
    sub = harness.connected("s", level=5)
    sub.subscribe("a/+", qos=0, props=v5(subscription_identifiers=[1]))
    sub.subscribe("a/#", qos=2, packet_id=2, props=v5(subscription_identifiers=[2]))
    harness.connected("p").publish("a/b", qos=2, packet_id=1)
    [msg] = sub.publishes()
    assert msg.qos == 2
    assert msg.properties.subscription_identifiers == [1, 2]


def test_unsubscribe_stops_delivery_MQTT_3_10_4_2(harness: Harness) -> None:
    sub = harness.connected("s")
    sub.subscribe("t")
    sub.send(Unsubscribe(3, ["t", "never"]))
    assert sub.one(UnsubAck).packet_id == 3
    harness.connected("p").publish("t")
    assert sub.received() == []


def test_v5_unsuback_says_no_subscription_existed(harness: Harness) -> None:
    sub = harness.connected("s", level=5)
    sub.subscribe("t")
    sub.send(Unsubscribe(3, ["t", "never"]))
    assert sub.one(UnsubAck).reason_codes == [0, ReasonCode.NO_SUBSCRIPTION_EXISTED]


def test_v5_no_local_is_not_sent_back_to_the_publisher_MQTT_3_8_3_3(harness: Harness) -> None:
    client = harness.connected("me", level=5)
    client.subscribe("chat", no_local=True)
    client.subscribe("chat/#", packet_id=2)  # overlaps, without No Local
    other = harness.connected("other", level=5)
    other.subscribe("chat")
    client.publish("chat", b"mine")
    assert [p.payload for p in other.publishes()] == [b"mine"]
    [echo] = client.publishes()  # only because of "chat/#"
    assert echo.payload == b"mine"
    client.send(Unsubscribe(9, ["chat/#"]))
    client.received()
    client.publish("chat", b"again")
    assert client.received() == []
    harness.connected("third").publish("chat", b"from third")
    assert [p.payload for p in client.publishes()] == [b"from third"]


def test_v5_subscription_identifier_is_sent_with_matching_messages_MQTT_3_3_4_3(harness: Harness) -> None:
    sub = harness.connected("s", level=5)
    sub.subscribe("x/#", props=v5(subscription_identifiers=[77]))
    harness.connected("p").publish("x/y")
    [msg] = sub.publishes()
    assert msg.properties.subscription_identifiers == [77]


def test_shared_subscription_members_compete_for_messages_MQTT_4_8_2(harness: Harness) -> None:
    members = [harness.connected(f"m{i}") for i in range(2)]
    for member in members:
        assert member.subscribe("$share/g/jobs/+", qos=1).reason_codes == [1]
    loner = harness.connected("loner")
    loner.subscribe("jobs/+")
    pub = harness.connected("p")
    for i in range(6):
        pub.publish("jobs/x", str(i).encode(), qos=1, packet_id=i + 1)
    got = [sorted(p.payload for p in m.publishes()) for m in members]
    assert len(got[0]) == 3 and len(got[1]) == 3
    assert sorted(got[0] + got[1]) == [str(i).encode() for i in range(6)]
    assert len(loner.publishes()) == 6


def test_shared_subscription_unacked_messages_go_to_another_member(harness: Harness) -> None:
    a = harness.connected("a")
    a.subscribe("$share/g/t", qos=1)
    b = harness.connected("b")
    b.subscribe("$share/g/t", qos=1)
    pub = harness.connected("p")
    pub.publish("t", b"1", qos=1, packet_id=1)
    pub.publish("t", b"2", qos=1, packet_id=2)
    [held] = a.publishes()
    b.publishes()
    a.drop()
    [again] = b.publishes()
    assert again.payload == held.payload and again.dup


def test_shared_subscription_gets_no_retained_messages(harness: Harness) -> None:
    harness.connected("p").publish("r/t", b"kept", retain=True)
    sub = harness.connected("s")
    sub.subscribe("$share/g/r/#")
    assert sub.after_suback == []


def test_v5_no_local_on_a_shared_subscription_is_a_protocol_error_MQTT_3_8_3_4(harness: Harness) -> None:
    sub = harness.connected("s", level=5)
    sub.send(Subscribe(1, [("$share/g/t", SubscriptionOptions(0, no_local=True))]))
    assert sub.one(Disconnect).reason_code == ReasonCode.PROTOCOL_ERROR


# -- 3.3.1.3 RETAIN -------------------------------------------------------------------------------------------


def test_retained_message_is_sent_on_subscribe_with_retain_set_MQTT_3_3_1_6(harness: Harness) -> None:
    harness.connected("p").publish("home/kitchen/temp", b"21", retain=True, qos=1, packet_id=1)
    sub = harness.connected("s")
    sub.subscribe("home/+/temp", qos=1)
    [msg] = sub.after_suback
    assert (msg.topic, msg.payload, msg.retain, msg.qos) == ("home/kitchen/temp", b"21", True, 1)


def test_retained_messages_reach_wildcard_filters(harness: Harness) -> None:
    pub = harness.connected("p")
    for topic in ("h/a/t", "h/b/t", "h/b/u", "other"):
        pub.publish(topic, topic.encode(), retain=True)
    sub = harness.connected("s")
    sub.subscribe("h/#")
    assert sorted(p.topic for p in sub.after_suback) == ["h/a/t", "h/b/t", "h/b/u"]


def test_live_delivery_of_a_retained_publish_has_retain_0_MQTT_3_3_1_9(harness: Harness) -> None:
    sub = harness.connected("s")
    sub.subscribe("t")
    harness.connected("p").publish("t", b"x", retain=True)
    [msg] = sub.publishes()
    assert not msg.retain


def test_v5_retain_as_published_keeps_the_flag_MQTT_3_3_1_12(harness: Harness) -> None:
    sub = harness.connected("s", level=5)
    sub.subscribe("t", retain_as_published=True)
    harness.connected("p").publish("t", b"x", retain=True)
    [msg] = sub.publishes()
    assert msg.retain


def test_empty_retained_publish_clears_the_retained_message_MQTT_3_3_1_10(harness: Harness) -> None:
    pub = harness.connected("p")
    pub.publish("t", b"v", retain=True)
    pub.publish("t", b"", retain=True)
    sub = harness.connected("s")
    sub.subscribe("t")
    assert sub.after_suback == []
    assert "t" not in harness.vhost.retained


@pytest.mark.parametrize(("handling", "first", "again"), [(0, 1, 1), (1, 1, 0), (2, 0, 0)])
def test_v5_retain_handling_options_MQTT_3_3_1_9(
    harness: Harness, handling: int, first: int, again: int
) -> None:
    harness.connected("p").publish("t", b"v", retain=True)
    sub = harness.connected("s", level=5)
    sub.subscribe("t", retain_handling=handling)
    assert len(sub.after_suback) == first
    sub.subscribe("t", retain_handling=handling, packet_id=2)
    assert len(sub.after_suback) == again


def test_v5_retained_message_expiry_is_honoured(harness: Harness) -> None:
    harness.connected("p", level=5).publish("t", b"v", retain=True, props=v5(message_expiry_interval=10))
    harness.advance(11)
    sub = harness.connected("s")
    sub.subscribe("t")
    assert sub.after_suback == []


def test_retained_qos1_message_needs_durability_before_puback(harness: Harness) -> None:
    pub = harness.connected("p")
    pub.publish("t", b"v", retain=True, qos=1, packet_id=1)
    assert pub.pending() == []
    harness.make_durable()
    assert isinstance(pub.pending()[0], PubAck)


# -- 3.1.2.5 Will ------------------------------------------------------------------------------------------------


def test_will_is_published_on_abnormal_disconnect_MQTT_3_1_2_8(harness: Harness) -> None:
    watcher = harness.connected("w")
    watcher.subscribe("status/+", qos=1)
    client = harness.connected("c", will=Will("status/c", b"offline", 1))
    client.drop()
    [msg] = watcher.publishes()
    assert (msg.topic, msg.payload, msg.qos) == ("status/c", b"offline", 1)


def test_will_is_not_published_after_disconnect_MQTT_3_1_2_10(harness: Harness) -> None:
    watcher = harness.connected("w")
    watcher.subscribe("status/+")
    client = harness.connected("c", will=Will("status/c", b"offline"))
    client.disconnect()
    client.session.connection_lost(None)
    assert watcher.received() == []


def test_will_is_published_after_a_protocol_error(harness: Harness) -> None:
    watcher = harness.connected("w")
    watcher.subscribe("status/+")
    client = harness.connected("c", will=Will("status/c", b"offline"))
    client.raw(b"\x00\x00")  # reserved packet type 0
    assert client.conn.closed
    assert [p.payload for p in watcher.publishes()] == [b"offline"]


def test_retained_will_becomes_the_retained_message(harness: Harness) -> None:
    client = harness.connected("c", will=Will("status/c", b"offline", 0, True))
    client.drop()
    sub = harness.connected("s")
    sub.subscribe("status/#")
    assert [(p.payload, p.retain) for p in sub.after_suback] == [(b"offline", True)]


def test_v5_disconnect_with_will_message_publishes_it(harness: Harness) -> None:
    watcher = harness.connected("w")
    watcher.subscribe("status/+")
    client = harness.connected("c", level=5, will=Will("status/c", b"bye"))
    client.disconnect(ReasonCode.DISCONNECT_WITH_WILL_MESSAGE)
    assert [p.payload for p in watcher.publishes()] == [b"bye"]


def test_v5_will_properties_travel_with_the_will(harness: Harness) -> None:
    watcher = harness.connected("w", level=5)
    watcher.subscribe("status/+")
    will = Will(
        "status/c", b"{}", 0, False, v5(content_type="application/json", user_properties=[("why", "lost")])
    )
    harness.connected("c", level=5, will=will).drop()
    [msg] = watcher.publishes()
    assert msg.properties.content_type == "application/json"
    assert msg.properties.user_properties == [("why", "lost")]


def delayed_will_client(harness: Harness, delay: int, retain: bool = False, expiry: int = 3600) -> Client:
    return harness.connected(
        "c",
        level=5,
        clean=False,
        properties=v5(session_expiry_interval=expiry),
        will=Will("status/c", b"late", 1, retain, v5(will_delay_interval=delay)),
    )


def test_v5_will_delay_publishes_the_will_when_the_delay_ends(harness: Harness) -> None:
    watcher = harness.connected("w")
    watcher.subscribe("status/+", qos=1)
    delayed_will_client(harness, 30).drop()
    harness.advance(29)
    assert watcher.received() == []
    harness.advance(2)
    [msg] = watcher.publishes()
    assert (msg.topic, msg.payload) == ("status/c", b"late")


def test_v5_reconnect_within_the_will_delay_cancels_the_will_MQTT_3_1_3_9(harness: Harness) -> None:
    watcher = harness.connected("w")
    watcher.subscribe("status/+")
    delayed_will_client(harness, 30).drop()
    harness.advance(10)
    harness.connected("c", level=5, clean=False, properties=v5(session_expiry_interval=3600))
    harness.advance(60)
    assert watcher.received() == []


def test_v5_session_ending_before_the_will_delay_publishes_the_will(harness: Harness) -> None:
    watcher = harness.connected("w")
    watcher.subscribe("status/+")
    delayed_will_client(harness, 300, expiry=5).drop()
    harness.advance(6)
    assert [p.payload for p in watcher.publishes()] == [b"late"]


def test_v5_delayed_retained_will_becomes_the_retained_message(harness: Harness) -> None:
    delayed_will_client(harness, 5, retain=True).drop()
    harness.advance(6)
    sub = harness.connected("s")
    sub.subscribe("status/c")
    assert [(p.payload, p.retain) for p in sub.after_suback] == [(b"late", True)]


# -- 4.1 Sessions -----------------------------------------------------------------------------------------------


def test_clean_session_leaves_nothing_behind_MQTT_3_1_2_6(harness: Harness) -> None:
    client = harness.connected("c")
    client.subscribe("t", qos=1)
    assert "mqtt-session-c" in harness.vhost.queues
    client.disconnect()
    assert "mqtt-session-c" not in harness.vhost.queues
    assert harness.client().connect("c", clean=False).session_present is False


def test_persistent_session_keeps_subscriptions_and_queues_messages_MQTT_3_1_2_4(harness: Harness) -> None:
    client = harness.connected("dev", clean=False)
    client.subscribe("cmd/#", qos=1)
    client.disconnect()
    pub = harness.connected("p")
    pub.publish("cmd/a", b"while away", qos=1, packet_id=1)
    pub.publish("cmd/b", b"qos0 too", qos=0)
    back = harness.client()
    ack = back.connect("dev", clean=False)
    assert ack.session_present
    assert [p.payload for p in back.publishes()] == [b"while away", b"qos0 too"]
    pub.publish("cmd/c", b"live")
    assert [p.payload for p in back.publishes()] == [b"live"]


def test_persistent_session_state_is_saved_with_the_store(harness: Harness) -> None:
    client = harness.connected("dev", clean=False)
    client.subscribe("cmd/#", qos=1)
    client.disconnect()
    raw = harness.context.saved_sessions[("/", "dev")]
    state = SessionState.decode(raw)
    assert list(state.subscriptions) == ["cmd/#"]
    assert state.disconnected_at is not None
    assert harness.store.recoverable().sessions[0].state == raw


def test_clean_start_discards_the_earlier_session_MQTT_3_1_2_4(harness: Harness) -> None:
    client = harness.connected("dev", clean=False)
    client.subscribe("cmd/#", qos=1)
    client.disconnect()
    harness.connected("p").publish("cmd/a", qos=1, packet_id=1)
    clean = harness.client()
    assert clean.connect("dev", clean=True).session_present is False
    assert clean.received() == []
    assert ("/", "dev") not in harness.context.saved_sessions
    harness.connected("p").publish("cmd/a", qos=1, packet_id=1)
    assert clean.received() == []


def test_unacknowledged_qos1_is_resent_with_dup_and_the_same_packet_id_MQTT_4_4_0_1(harness: Harness) -> None:
    client = harness.connected("dev", clean=False)
    client.subscribe("t", qos=1)
    harness.connected("p").publish("t", b"x", qos=1, packet_id=1)
    [first] = client.publishes()
    assert not first.dup
    client.drop()
    back = harness.client()
    back.connect("dev", clean=False)
    [again] = back.publishes()
    assert (again.payload, again.dup, again.packet_id) == (b"x", True, first.packet_id)
    back.send(PubAck(again.packet_id))
    assert harness.vhost.queues["mqtt-session-dev"].message_count == 0


def test_pubrel_is_resent_on_reconnect_MQTT_4_4_0_1(harness: Harness) -> None:
    client = harness.connected("dev", clean=False)
    client.subscribe("t", qos=2)
    harness.connected("p").publish("t", b"x", qos=2, packet_id=1)
    [msg] = client.publishes()
    client.send(PubRec(msg.packet_id))
    assert isinstance(client.one(PubRel), PubRel)
    client.drop()
    back = harness.client()
    back.connect("dev", clean=False)
    assert back.one(PubRel).packet_id == msg.packet_id
    back.send(PubComp(msg.packet_id))
    assert back.received() == []


def test_inbound_qos2_ids_survive_a_reconnect_MQTT_4_3_3_2(harness: Harness) -> None:
    sub = harness.connected("s")
    sub.subscribe("t", qos=2)
    pub = harness.connected("pub", clean=False)
    pub.publish("t", b"x", qos=2, packet_id=12)
    assert isinstance(pub.one(PubRec), PubRec)
    pub.drop()
    back = harness.client()
    back.connect("pub", clean=False)
    back.publish("t", b"x", qos=2, packet_id=12, dup=True)
    assert isinstance(back.one(PubRec), PubRec)
    back.send(PubRel(12))
    assert isinstance(back.one(PubComp), PubComp)
    assert len(sub.publishes()) == 1


def test_pubrec_of_a_persistent_session_waits_for_its_state_to_be_durable(harness: Harness) -> None:
    pub = harness.connected("pub", clean=False)
    pub.publish("t", b"x", qos=2, packet_id=1)
    assert pub.pending() == []
    harness.make_durable()
    assert isinstance(pub.pending()[0], PubRec)


def test_takeover_hands_the_persistent_session_over(harness: Harness) -> None:
    first = harness.connected("dev", clean=False)
    first.subscribe("t", qos=1)
    harness.connected("p").publish("t", b"x", qos=1, packet_id=1)
    [msg] = first.publishes()
    second = harness.client()
    assert second.connect("dev", clean=False).session_present
    [again] = second.publishes()
    assert (again.payload, again.dup, again.packet_id) == (b"x", True, msg.packet_id)


def test_v5_session_expiry_zero_ends_the_session_with_the_connection(harness: Harness) -> None:
    client = harness.connected("c", level=5, clean=False)
    client.subscribe("t", qos=1)
    client.drop()
    assert harness.client(5).connect("c", clean=False).session_present is False


def test_v5_session_expires_after_its_interval_MQTT_3_1_2_23(harness: Harness) -> None:
    client = harness.connected("c", level=5, clean=False, properties=v5(session_expiry_interval=60))
    client.subscribe("t", qos=1)
    client.drop()
    harness.advance(30)
    again = harness.client(5)
    assert again.connect("c", clean=False, properties=v5(session_expiry_interval=60)).session_present
    again.drop()
    harness.advance(61)
    assert "mqtt-session-c" not in harness.vhost.queues  # the core's x-expires
    last = harness.client(5)
    assert last.connect("c", clean=False, properties=v5(session_expiry_interval=60)).session_present is False


def test_v5_disconnect_can_change_the_session_expiry(harness: Harness) -> None:
    client = harness.connected("c", level=5, clean=False, properties=v5(session_expiry_interval=60))
    client.subscribe("t", qos=1)
    client.disconnect(0, v5(session_expiry_interval=0))
    assert "mqtt-session-c" not in harness.vhost.queues
    assert harness.client(5).connect("c", clean=False).session_present is False


def test_v5_disconnect_setting_expiry_after_zero_is_a_protocol_error_MQTT_3_14_2_2(harness: Harness) -> None:
    client = harness.connected("c", level=5)
    client.send(Disconnect(0, v5(session_expiry_interval=30)))
    assert client.one(Disconnect).reason_code == ReasonCode.PROTOCOL_ERROR


def test_per_client_queue_limit_drops_the_oldest_and_counts() -> None:
    harness = Harness(Config(limits=LimitsConfig(mqtt_max_queued=2)))
    client = harness.connected("dev", clean=False)
    client.subscribe("t", qos=1)
    client.disconnect()
    pub = harness.connected("p")
    for i in range(4):
        pub.publish("t", str(i).encode(), qos=1, packet_id=i + 1)
    back = harness.client()
    back.connect("dev", clean=False)
    assert [p.payload for p in back.publishes()] == [b"2", b"3"]
    assert harness.broker.messages_dropped == 2


def test_session_state_round_trips_and_refuses_garbage() -> None:
    state = SessionState(
        "c", 60, {"a/#": make_subscription("a/#", 1, identifier=3)}, {1, 2}, {7}, {100: 5}, 12.5
    )
    assert SessionState.decode(state.encode()) == state
    with pytest.raises(StateError):
        SessionState.decode(b"{not json")
    with pytest.raises(StateError):
        SessionState.decode(b'{"format": 99}')


def test_corrupt_saved_state_starts_a_new_session(harness: Harness) -> None:
    harness.context.saved_sessions[("/", "c")] = b"garbage"
    assert harness.client().connect("c", clean=False).session_present is False


# -- flow control -------------------------------------------------------------------------------------------


def test_paused_writing_holds_deliveries_back_until_resumed(harness: Harness) -> None:
    sub = harness.connected("s")
    sub.subscribe("t", qos=1)
    sub.session.writing_paused()
    harness.connected("p").publish("t", qos=1, packet_id=1)
    assert sub.received() == []
    sub.session.writing_resumed()
    assert len(sub.publishes()) == 1


# -- $SYS --------------------------------------------------------------------------------------------------------


def test_sys_topics_are_published_retained(harness: Harness) -> None:
    harness.context.started_at = 1.0
    sub = harness.connected("s")
    sub.subscribe("$SYS/broker/#")
    harness.connected("p").publish("x", b"1")
    SysPublisher(harness.context).publish()
    got = {p.topic: p.payload for p in sub.publishes()}
    assert got["$SYS/broker/clients/connected"] == b"2"
    assert got["$SYS/broker/messages/received"] == b"1"
    assert got["$SYS/broker/version"].startswith(b"polybroker")
    assert got["$SYS/broker/uptime"].endswith(b" seconds")
    late = harness.connected("late")
    late.subscribe("$SYS/broker/clients/+")
    assert all(p.retain for p in late.after_suback) and late.after_suback


def test_sys_publisher_forgets_expired_sessions(harness: Harness) -> None:
    client = harness.connected("c", level=5, clean=False, properties=v5(session_expiry_interval=10))
    client.drop()
    harness.advance(11)
    SysPublisher(harness.context).publish()
    assert ("/", "c") not in harness.context.saved_sessions


@pytest.mark.parametrize(("started_ago", "present"), [(30, True), (100, False)])
def test_v5_session_saved_while_connected_expires_from_the_broker_start(
    harness: Harness, started_ago: float, present: bool
) -> None:
    """A crash leaves a state without a disconnect time: the connection ended no later than the restart."""
    state = SessionState("c", 60, {"t": make_subscription("t", 1)})
    harness.context.saved_sessions[("/", "c")] = state.encode()
    harness.context.started_at = harness.broker.wall_clock() - started_ago
    client = harness.client(5)
    assert (
        client.connect("c", clean=False, properties=v5(session_expiry_interval=60)).session_present is present
    )


def test_repeated_pubrec_gets_pubrel_again_MQTT_4_3_3_1(harness: Harness) -> None:
    sub = harness.connected("s", level=5)
    sub.subscribe("t", qos=2)
    harness.connected("p").publish("t", qos=2, packet_id=1)
    [msg] = sub.publishes()
    sub.send(PubRec(msg.packet_id))
    sub.send(PubRec(msg.packet_id))
    packets = sub.received()
    assert [(type(p), p.packet_id, p.reason_code) for p in packets] == [(PubRel, msg.packet_id, 0)] * 2


def test_v5_topic_alias_is_announced_again_when_its_first_use_was_dropped(harness: Harness) -> None:
    sub = harness.connected("s", level=5, properties=v5(topic_alias_maximum=4, maximum_packet_size=60))
    sub.subscribe("t/a")
    pub = harness.connected("p")
    pub.publish("t/a", b"x" * 80)  # too large for the client: dropped
    sub.subscribe("t/#", packet_id=2)  # a new subscription rebuilds the routes
    pub.publish("t/a", b"small")
    [msg] = sub.publishes()
    assert (msg.topic, msg.properties.topic_alias) == ("t/a", 1)


def test_a_failing_delivery_closes_the_subscriber_only(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README, Guarantees: a bug in one subscriber's delivery must not fail the publisher it runs under."""
    import protocols.mqtt.session as session_module

    sub = harness.connected("s", clean=False)
    sub.subscribe("t", qos=1)
    pub = harness.connected("p")

    def broken(*args: Any) -> bytes:
        raise RuntimeError("bug")

    monkeypatch.setattr(session_module, "encode_publish", broken)
    pub.publish("t", b"kept", qos=1, packet_id=1)
    assert isinstance(pub.one(PubAck), PubAck) and not pub.conn.closed
    assert sub.conn.closed
    monkeypatch.undo()
    sub.session.connection_lost(None)
    back = harness.client()
    back.connect("s", clean=False)
    [msg] = back.publishes()
    assert (msg.payload, msg.dup) == (b"kept", True)
