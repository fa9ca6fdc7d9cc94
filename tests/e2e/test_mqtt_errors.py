"""MQTT refusals and errors end to end, with raw packets (client libraries do not send broken ones): CONNACK
return/reason codes for every refusal, and the Reason Code (5.0) or close (3.1.1) for malformed packets,
protocol violations, oversize packets, invalid Topic Names and Filters and Packet Identifier misuse. Each
test also checks that a bystander client is untouched (README, Guarantees).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.auth import hash_password
from protocols.mqtt.codec import NEED_DATA
from protocols.mqtt.packets import (
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    PubAck,
    PubComp,
    Publish,
    PubRel,
    ReasonCode,
    SubAck,
    Subscribe,
    SubscriptionOptions,
)
from protocols.mqtt.packets import Properties as MqttProperties
from tests.e2e.broker_process import BrokerProcess
from tests.e2e.test_mqtt import TIMEOUT, RawMqtt, unique

CONFIG = """
[server]
allow_anonymous = true

[vhosts]
names = ["/", "tenant"]

[limits]
max_frame_size = 4096
mqtt_max_inflight = 4

[users.alice]
password = "{alice}"

[users.bob]
password = "{bob}"
vhosts = ["/"]
"""


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """A broker with users, a second vhost and small limits (4 KiB packets, Receive Maximum 4)."""
    directory: Path = tmp_path_factory.mktemp("mqtt-errors")
    config = directory / "polybroker.toml"
    config.write_text(CONFIG.format(alice=hash_password("secret"), bob=hash_password("builder")))
    proc = BrokerProcess(directory / "data", config_file=config)
    proc.start(wait=("mqtt",))
    yield proc
    proc.kill()
    assert "Traceback" not in proc.log(), proc.log()


class Bystander:
    """A subscriber that must keep working whatever the other connections do."""

    def __init__(self, proc: BrokerProcess) -> None:
        self.proc = proc
        self.topic = unique("bystander")
        self.sub = RawMqtt(proc.ports["mqtt"], 4)
        self.sub.connect(unique("bystander"))
        self.sub.send(Subscribe(1, [(self.topic, SubscriptionOptions(1))]))
        assert isinstance(self.sub.packet(), SubAck)

    def check(self) -> None:
        pub = RawMqtt(self.proc.ports["mqtt"], 4)
        pub.connect(unique("check"))
        pub.send(Publish(self.topic, b"still here", 1, packet_id=1))
        assert isinstance(pub.packet(), PubAck)
        got = self.sub.packet()
        assert isinstance(got, Publish) and got.payload == b"still here"
        self.sub.send(PubAck(got.packet_id))
        pub.close()

    def close(self) -> None:
        self.sub.close()


@pytest.fixture
def bystander(broker: BrokerProcess) -> Iterator[Bystander]:
    made = Bystander(broker)
    yield made
    made.check()
    made.close()


def raw(broker: BrokerProcess, level: int) -> RawMqtt:
    return RawMqtt(broker.ports["mqtt"], level)


# -- CONNACK refusals (3.1.1 Table 3.1, 5.0 §3.2.2.2) -----------------------------------------------------


@pytest.mark.parametrize(
    ("level", "username", "password", "code"),
    [
        (4, "alice", b"wrong", 4),
        (5, "alice", b"wrong", ReasonCode.BAD_USER_NAME_OR_PASSWORD),
        (4, "nobody", b"x", 4),
        (3, "alice", b"wrong", 4),
        (4, "tenant:bob", b"builder", 5),  # bob may not open vhost "tenant"
        (5, "tenant:bob", b"builder", ReasonCode.NOT_AUTHORIZED),
    ],
)
def test_refused_logins_get_the_connack_code_of_their_version(
    broker: BrokerProcess, bystander: Bystander, level: int, username: str, password: bytes, code: int
) -> None:
    client = raw(broker, level)
    ack = client.connect(unique("login"), username=username, password=password)
    assert ack.reason_code == code
    assert client.closed_by_broker()


def test_good_logins_are_accepted_in_their_vhost(broker: BrokerProcess) -> None:
    alice = raw(broker, 4)
    assert alice.connect(unique("a"), username="tenant:alice", password=b"secret").reason_code == 0
    bob = raw(broker, 5)
    assert bob.connect(unique("b"), username="bob", password=b"builder").reason_code == 0


def test_unsupported_protocol_level_gets_return_code_1_MQTT_3_1_2_2(
    broker: BrokerProcess, bystander: Bystander
) -> None:
    client = raw(broker, 4)
    client.raw(b"\x10\x0f\x00\x04MQTT\x07\x02\x00\x3c\x00\x03dev")
    ack = client.packet()
    assert isinstance(ack, ConnAck) and ack.reason_code == 1
    assert client.closed_by_broker()


def test_empty_client_id_with_clean_session_0_gets_return_code_2_MQTT_3_1_3_8(
    broker: BrokerProcess, bystander: Bystander
) -> None:
    client = raw(broker, 4)
    assert client.connect("", clean_start=False).reason_code == 2
    assert client.closed_by_broker()


def test_v5_empty_client_id_gets_an_assigned_one_MQTT_3_2_2_16(broker: BrokerProcess) -> None:
    client = raw(broker, 5)
    ack = client.connect("")
    assert ack.reason_code == 0 and ack.properties is not None and ack.properties.assigned_client_identifier


def test_v5_enhanced_authentication_gets_0x8c(broker: BrokerProcess, bystander: Bystander) -> None:
    client = raw(broker, 5)
    ack = client.connect(unique("scram"), properties=MqttProperties(authentication_method="SCRAM-SHA-256"))
    assert ack.reason_code == ReasonCode.BAD_AUTHENTICATION_METHOD
    assert client.closed_by_broker()


def test_first_packet_not_connect_is_closed_without_connack_MQTT_3_1_0_1(
    broker: BrokerProcess, bystander: Bystander
) -> None:
    client = raw(broker, 4)
    client.raw(b"\xc0\x00")  # PINGREQ
    assert client.closed_by_broker()
    assert client.parser.next_packet() is NEED_DATA  # nothing was sent back


# -- malformed packets and protocol violations -------------------------------------------------------------


#: Malformed input after the CONNECT: (3.1.1 bytes, 5.0 bytes), 5.0 PUBLISH and SUBSCRIBE having a Property Length.
MALFORMED = {
    "qos3-MQTT-3.3.1-4": (b"\x36\x06\x00\x01t\x00\x01x", b"\x36\x07\x00\x01t\x00\x01\x00x"),
    "qos0-dup-MQTT-3.3.1-2": (b"\x38\x04\x00\x01tx", b"\x38\x05\x00\x01t\x00x"),
    "subscribe-flags-MQTT-3.8.1-1": (b"\x80\x06\x00\x01\x00\x01t\x00", b"\x80\x07\x00\x01\x00\x00\x01t\x00"),
    "remaining-length-5-bytes": (b"\x30\xff\xff\xff\xff\x7f", b"\x30\xff\xff\xff\xff\x7f"),
    "topic-not-utf8-MQTT-1.5.3-1": (b"\x30\x04\x00\x01\xffx", b"\x30\x05\x00\x01\xff\x00x"),
    "reserved-type-0": (b"\x00\x00", b"\x00\x00"),
}


@pytest.mark.parametrize("data", [v3 for v3, _ in MALFORMED.values()], ids=list(MALFORMED))
def test_malformed_packet_closes_3_1_1(broker: BrokerProcess, bystander: Bystander, data: bytes) -> None:
    client = raw(broker, 4)
    client.connect(unique("bad"))
    client.raw(data)
    assert client.closed_by_broker()


@pytest.mark.parametrize("data", [v5 for _, v5 in MALFORMED.values()], ids=list(MALFORMED))
def test_v5_malformed_packet_gets_disconnect_0x81(
    broker: BrokerProcess, bystander: Bystander, data: bytes
) -> None:
    client = raw(broker, 5)
    client.connect(unique("bad"))
    client.raw(data)
    packet = client.packet()
    assert isinstance(packet, Disconnect) and packet.reason_code == ReasonCode.MALFORMED_PACKET, packet
    assert client.closed_by_broker()


def test_second_connect_is_a_protocol_violation_MQTT_3_1_0_2(
    broker: BrokerProcess, bystander: Bystander
) -> None:
    v3 = raw(broker, 4)
    v3.connect(unique("twice"))
    v3.send(Connect(unique("twice"), 4))
    assert v3.closed_by_broker()
    v5 = raw(broker, 5)
    v5.connect(unique("twice"))
    v5.send(Connect(unique("twice"), 5))
    packet = v5.packet()
    assert isinstance(packet, Disconnect) and packet.reason_code == ReasonCode.PROTOCOL_ERROR


def test_v5_auth_without_an_exchange_is_a_protocol_error(broker: BrokerProcess, bystander: Bystander) -> None:
    client = raw(broker, 5)
    client.connect(unique("auth"))
    client.send(Auth(ReasonCode.RE_AUTHENTICATE, MqttProperties(authentication_method="x")))
    packet = client.packet()
    assert isinstance(packet, Disconnect) and packet.reason_code == ReasonCode.PROTOCOL_ERROR


def test_oversize_packet_closes_3_1_1(broker: BrokerProcess, bystander: Bystander) -> None:
    client = raw(broker, 4)
    client.connect(unique("big"))
    client.send(Publish("t", b"x" * 5000))
    assert client.closed_by_broker()


def test_v5_oversize_packet_gets_disconnect_0x95(broker: BrokerProcess, bystander: Bystander) -> None:
    client = raw(broker, 5)
    ack = client.connect(unique("big"))
    assert ack.properties is not None and ack.properties.maximum_packet_size == 4096
    client.send(Publish("t", b"x" * 5000))
    packet = client.packet()
    assert isinstance(packet, Disconnect) and packet.reason_code == ReasonCode.PACKET_TOO_LARGE


def test_v5_receive_maximum_exceeded_gets_disconnect_0x93(
    broker: BrokerProcess, bystander: Bystander
) -> None:
    client = raw(broker, 5)
    ack = client.connect(unique("flood"))
    assert ack.properties is not None and ack.properties.receive_maximum == 4
    client.send(*(Publish("flood", b"x", 2, packet_id=i) for i in range(1, 7)))
    packets = []
    while not isinstance(packet := client.packet(), Disconnect):
        packets.append(packet)
    assert packet.reason_code == ReasonCode.RECEIVE_MAXIMUM_EXCEEDED
    assert len(packets) == 4


# -- Topic Names and Filters (§4.7) ------------------------------------------------------------------------


def test_publish_to_a_wildcard_topic_closes_3_1_1_MQTT_3_3_2_2(
    broker: BrokerProcess, bystander: Bystander
) -> None:
    client = raw(broker, 4)
    client.connect(unique("wild"))
    client.send(Publish("a/+/b", b"x"))
    assert client.closed_by_broker()


def test_v5_publish_to_a_wildcard_topic_gets_disconnect_0x90(
    broker: BrokerProcess, bystander: Bystander
) -> None:
    client = raw(broker, 5)
    client.connect(unique("wild"))
    client.raw(b"\x30\x07\x00\x03a/#\x00x")
    packet = client.packet()
    assert isinstance(packet, Disconnect) and packet.reason_code == ReasonCode.TOPIC_NAME_INVALID


@pytest.mark.parametrize(("level", "refused"), [(4, 0x80), (5, ReasonCode.TOPIC_FILTER_INVALID)])
def test_invalid_topic_filters_are_refused_in_the_suback_MQTT_3_9_3_2(
    broker: BrokerProcess, bystander: Bystander, level: int, refused: int
) -> None:
    client = raw(broker, level)
    client.connect(unique("filters"))
    filters = ["ok/+", "a/#/b", "a+", "$share/g+/x", "ok/#"]
    client.send(Subscribe(1, [(f, SubscriptionOptions(1)) for f in filters]))
    ack = client.packet()
    assert isinstance(ack, SubAck)
    assert ack.reason_codes == [1, refused, refused, refused, 1]
    assert not client.closed_by_broker(timeout=0.3)


# -- Packet Identifiers ------------------------------------------------------------------------------------


def test_packet_id_zero_closes_3_1_1_MQTT_2_3_1_1(broker: BrokerProcess, bystander: Bystander) -> None:
    client = raw(broker, 4)
    client.connect(unique("pid0"))
    client.raw(b"\x32\x06\x00\x01t\x00\x00x")
    assert client.closed_by_broker()


def test_v5_packet_id_zero_gets_disconnect_0x82_MQTT_2_2_1_3(
    broker: BrokerProcess, bystander: Bystander
) -> None:
    client = raw(broker, 5)
    client.connect(unique("pid0"))
    client.raw(b"\x32\x07\x00\x01t\x00\x00\x00x")
    packet = client.packet()
    assert isinstance(packet, Disconnect) and packet.reason_code == ReasonCode.PROTOCOL_ERROR


def test_v5_pubrel_for_an_unknown_id_gets_pubcomp_0x92(broker: BrokerProcess, bystander: Bystander) -> None:
    client = raw(broker, 5)
    client.connect(unique("pubrel"))
    client.send(PubRel(77))
    comp = client.packet()
    assert isinstance(comp, PubComp)
    assert (comp.packet_id, comp.reason_code) == (77, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND)
    assert not client.closed_by_broker(timeout=0.3)


def test_puback_for_a_qos2_delivery_is_a_protocol_error(broker: BrokerProcess, bystander: Bystander) -> None:
    topic = unique("q2")
    client = raw(broker, 5)
    client.connect(unique("misuse"))
    client.send(Subscribe(1, [(topic, SubscriptionOptions(2))]))
    assert isinstance(client.packet(), SubAck)
    pub = raw(broker, 4)
    pub.connect(unique("p"))
    pub.send(Publish(topic, b"x", 2, packet_id=1))
    delivery = client.packet()
    assert isinstance(delivery, Publish) and delivery.qos == 2
    client.send(PubAck(delivery.packet_id))
    packet = client.packet()
    assert isinstance(packet, Disconnect) and packet.reason_code == ReasonCode.PROTOCOL_ERROR
    pub.close()


def test_a_broken_client_does_not_disturb_a_busy_one(broker: BrokerProcess) -> None:
    """README, Guarantees: at worst that connection closes; every other client carries on."""
    topic = unique("busy")
    sub = raw(broker, 4)
    sub.connect(unique("busy-sub"))
    sub.send(Subscribe(1, [(topic, SubscriptionOptions(0))]))
    assert isinstance(sub.packet(), SubAck)
    pub = raw(broker, 4)
    pub.connect(unique("busy-pub"))
    for i in range(20):
        level = 4 + i % 2
        bad = raw(broker, level)
        bad.connect(unique("bad"))
        bad.raw(list(MALFORMED.values())[i % len(MALFORMED)][level - 4])
        pub.send(Publish(topic, str(i).encode()))
        got = sub.packet(TIMEOUT)
        assert isinstance(got, Publish) and got.payload == str(i).encode()
        bad.close()
