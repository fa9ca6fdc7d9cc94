"""Tests of the STOMP session (protocols/stomp/session.py): a fake Connection, the real core over the memory
store, no sockets. Organised by STOMP 1.2 spec section, then the broker's own rules (README, Names across protocols; README, Guarantees).

The store's `when_durable` callbacks are queued (`Harness.durable`) and run by the test, so a test sees
what a client would see before and after the store reported durability.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from broker.auth import Authenticator, hash_password
from broker.config import Config, LimitsConfig, UserConfig, VhostsConfig
from broker.context import FlowGate, ServerContext
from broker.core import Broker
from broker.message import Message, Properties
from protocols.stomp.codec import NEED_DATA, Frame, StompParser, encode_frame
from protocols.stomp.session import DEFAULT_CLIENT_PREFETCH, StompSession
from storage.memory import MemoryStore
from tests.protocols.fakes import FakeConnection

# -- harness ---------------------------------------------------------------------------------------------


class Client:
    """One connection: a session, its fake connection, and a parser of what the broker wrote."""

    def __init__(self, harness: Harness, *, is_loopback: bool = True) -> None:
        self.harness = harness
        self.conn = FakeConnection(is_loopback)
        self.session = StompSession(harness.context)
        self.session.connection_made(self.conn)
        self.parser = StompParser()
        self.version = "1.2"
        self.frames: list[Frame] = []
        self.heartbeats = 0

    def raw(self, data: bytes) -> None:
        self.session.data_received(data)

    def send_frame(self, command: str, headers: Any = (), body: bytes = b"") -> None:
        self.raw(
            encode_frame(
                command,
                list(headers.items()) if isinstance(headers, dict) else list(headers),
                body,
                self.version,
            )
        )

    def received(self) -> list[Frame]:
        """Frames written since the last call."""
        self.parser.version = self.version
        self.parser.feed(bytes(self.conn.out))
        self.conn.out.clear()
        frames = []
        while (event := self.parser.next_event()) is not NEED_DATA:
            assert isinstance(event, Frame)
            frames.append(event)
        self.heartbeats = self.parser.heartbeats
        return frames

    def one(self, command: str | None = None) -> Frame:
        frames = self.received()
        assert len(frames) == 1, frames
        if command is not None:
            assert frames[0].command == command, frames[0]
        return frames[0]

    def connect(self, version: str = "1.2", **headers: str) -> Frame:
        self.version = version
        connect_headers = {"accept-version": version, "host": "/"}
        connect_headers.update({k.replace("_", "-"): v for k, v in headers.items()})
        self.raw(encode_frame("CONNECT", list(connect_headers.items()), b"", "1.2"))
        return self.one("CONNECTED")

    def subscribe(self, destination: str, sub_id: str = "s1", ack: str = "auto", **headers: str) -> None:
        h = {"destination": destination, "id": sub_id, "ack": ack}
        h.update({k.replace("_", "-"): v for k, v in headers.items()})
        self.send_frame("SUBSCRIBE", h)

    def send(self, destination: str, body: bytes = b"hello", **headers: str) -> None:
        h = {"destination": destination}
        h.update({k.replace("_", "-"): v for k, v in headers.items()})
        self.send_frame("SEND", h, body)

    def messages(self) -> list[Frame]:
        frames = self.received()
        assert all(f.command == "MESSAGE" for f in frames), frames
        return frames

    def error(self) -> Frame:
        frames = self.received()
        assert frames and frames[-1].command == "ERROR", frames
        assert self.conn.closed
        return frames[-1]


class Harness:
    """A broker over the memory store, its context, and the queued durability callbacks."""

    def __init__(self, config: Config | None = None) -> None:
        self.durable: list[Callable[[], None]] = []
        self.store = MemoryStore(schedule=self.durable.append)
        self.config = config or Config()
        self.broker = Broker(self.store, vhosts=self.config.vhosts.names)
        self.context = ServerContext(
            broker=self.broker,
            auth=Authenticator(self.config),
            config=self.config,
            flow=FlowGate(self.broker, 1 << 30),
        )

    def client(self, **kwargs: Any) -> Client:
        return Client(self, **kwargs)

    def connected(self, version: str = "1.2", **headers: str) -> Client:
        client = self.client()
        client.connect(version, **headers)
        return client

    def make_durable(self) -> None:
        callbacks, self.durable[:] = list(self.durable), []
        for callback in callbacks:
            callback()

    @property
    def vhost(self) -> Any:
        return self.broker.vhost("/")


@pytest.fixture
def harness() -> Harness:
    return Harness()


# -- STOMP 1.2 "Connecting" / "Protocol Negotiation" ----------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "expected"),
    [(None, "1.0"), ("1.0", "1.0"), ("1.1", "1.1"), ("1.0,1.1", "1.1"), ("1.2,1.1", "1.2")],
)
def test_version_is_the_highest_shared_and_absent_header_means_1_0(
    harness: Harness, accept: str | None, expected: str
) -> None:
    client = harness.client()
    headers = [("host", "/")] + ([("accept-version", accept)] if accept else [])
    client.raw(encode_frame("CONNECT", headers))
    connected = client.one("CONNECTED")
    assert connected.header("version") == expected
    assert connected.header("server", "").startswith("polybroker/")
    assert connected.header("session")


def test_stomp_command_is_an_alias_of_connect(harness: Harness) -> None:
    client = harness.client()
    client.raw(encode_frame("STOMP", [("accept-version", "1.2"), ("host", "/")]))
    assert client.one("CONNECTED").header("version") == "1.2"


def test_no_shared_version_is_an_error_naming_the_supported_ones(harness: Harness) -> None:
    client = harness.client()
    client.raw(encode_frame("CONNECT", [("accept-version", "2.0,3.1"), ("host", "/")]))
    error = client.error()
    assert error.header("version") == "1.0,1.1,1.2"
    assert b"2.0,3.1" in error.body


def test_bad_password_is_refused_with_error_and_close(tmp_path: Any) -> None:
    config = Config(users=(UserConfig("alice", hash_password("secret")),))
    harness = Harness(config)
    client = harness.client()
    client.raw(
        encode_frame("CONNECT", [("accept-version", "1.2"), ("login", "alice"), ("passcode", "wrong")])
    )
    error = client.error()
    assert error.header("message") == "Access refused"
    assert harness.context.stats.connections_refused == 1
    good = harness.client()
    good.raw(encode_frame("CONNECT", [("accept-version", "1.2"), ("login", "alice"), ("passcode", "secret")]))
    assert good.one("CONNECTED")


def test_guest_is_refused_from_a_remote_address(harness: Harness) -> None:
    client = harness.client(is_loopback=False)
    client.raw(
        encode_frame("CONNECT", [("accept-version", "1.2"), ("login", "guest"), ("passcode", "guest")])
    )
    assert client.error().header("message") == "Access refused"


def test_host_selects_an_existing_vhost_else_the_default() -> None:
    harness = Harness(Config(vhosts=VhostsConfig(("/", "tenant"))))
    tenant = harness.connected(host="tenant")
    tenant.send("/queue/in-tenant")
    other = harness.connected(host="broker.example.com")
    other.send("/queue/in-default")
    assert "in-tenant" in harness.broker.vhost("tenant").queues
    assert "in-default" in harness.broker.vhost("/").queues
    assert "in-tenant" not in harness.broker.vhost("/").queues


def test_frames_before_connect_are_refused(harness: Harness) -> None:
    client = harness.client()
    client.send_frame("SEND", {"destination": "/queue/x"}, b"x")
    assert client.error().header("message") == "Not connected"
    assert "x" not in harness.vhost.queues


def test_second_connect_is_an_error(harness: Harness) -> None:
    client = harness.connected()
    client.raw(encode_frame("CONNECT", [("accept-version", "1.2")]))
    assert client.error().header("message") == "Already connected"


def test_no_connect_within_the_timeout_closes(harness: Harness) -> None:
    client = harness.client()
    client.conn.advance(11)
    assert client.error().header("message") == "Connect timeout"


# -- STOMP 1.2 "Heart-beating" ----------------------------------------------------------------------------


def test_heartbeats_are_negotiated_from_both_sides() -> None:
    harness = Harness(Config(limits=LimitsConfig(stomp_heartbeat_ms=1000)))
    # "<broker sends every>,<broker expects every>": max of both sides, 0 when either side says 0.
    assert harness.client().connect(heart_beat="500,3000").header("heart-beat") == "3000,1000"
    assert harness.client().connect(heart_beat="0,0").header("heart-beat") == "0,0"
    assert harness.client().connect(heart_beat="0,200").header("heart-beat") == "1000,0"
    assert harness.client().connect().header("heart-beat") == "0,0"


def test_broker_sends_an_eol_every_negotiated_interval() -> None:
    harness = Harness(Config(limits=LimitsConfig(stomp_heartbeat_ms=1000)))
    client = harness.client()
    client.connect(heart_beat="0,1000")
    client.conn.advance(0.99)
    assert client.received() == [] and client.heartbeats == 0
    client.conn.advance(0.02)
    assert client.received() == [] and client.heartbeats == 1
    client.conn.advance(1.0)
    assert client.received() == [] and client.heartbeats == 2


def test_stomp_1_0_has_no_heartbeats() -> None:
    harness = Harness(Config(limits=LimitsConfig(stomp_heartbeat_ms=1000)))
    client = harness.client()
    client.raw(encode_frame("CONNECT", [("heart-beat", "1000,1000")]))
    assert client.one("CONNECTED").header("heart-beat") == "0,0"


def test_silent_peer_is_closed_after_two_intervals_and_beats_keep_it_alive() -> None:
    harness = Harness(Config(limits=LimitsConfig(stomp_heartbeat_ms=100)))
    alive = harness.connected(heart_beat="100,0")
    silent = harness.connected(heart_beat="100,0")
    for _ in range(10):
        alive.raw(b"\n")
        alive.conn.advance(0.1)
    assert not alive.conn.closed
    silent.conn.advance(0.15)
    assert not silent.conn.closed  # one silent interval is within the grace
    silent.conn.advance(0.1)
    assert silent.error().header("message") == "Heart-beat timeout"


def test_invalid_heartbeat_header_is_an_error(harness: Harness) -> None:
    client = harness.client()
    client.raw(encode_frame("CONNECT", [("accept-version", "1.2"), ("heart-beat", "soon")]))
    assert client.error().header("message") == "Invalid heart-beat"


# -- SEND, SUBSCRIBE, MESSAGE ------------------------------------------------------------------------------


def test_send_to_queue_declares_it_durable_and_a_subscriber_gets_message(harness: Harness) -> None:
    sender = harness.connected()
    sender.send("/queue/orders", b"one", content_type="text/plain", x_custom="v")
    queue = harness.vhost.queues["orders"]
    assert queue.durable and not queue.auto_delete
    receiver = harness.connected()
    receiver.subscribe("/queue/orders", "sub-0")
    (message,) = receiver.messages()
    assert message.body == b"one"
    assert message.header("destination") == "/queue/orders"
    assert message.header("subscription") == "sub-0"
    assert message.header("content-type") == "text/plain"
    assert message.header("x-custom") == "v"
    assert message.header("redelivered") == "false"
    assert message.header("content-length") == "3"
    assert message.header("message-id")
    assert message.header("ack") is None  # ack:auto needs no acknowledgement


def test_body_with_nul_octets_and_content_length(harness: Harness) -> None:
    client = harness.connected()
    client.subscribe("/queue/bin")
    client.send("/queue/bin", b"a\0b\0")
    assert client.messages()[0].body == b"a\0b\0"


def test_properties_map_to_and_from_neutral(harness: Harness) -> None:
    client = harness.connected()
    client.send(
        "/queue/props",
        persistent="true",
        priority="7",
        correlation_id="c-1",
        reply_to="/queue/answers",
        expiration="60000",
        amqp_message_id="m-1",
        timestamp="1700000000000",
        type="order",
        app_id="shop",
    )
    (entry,) = list(harness.vhost.queues["props"]._ready)
    props = entry.message.properties
    assert props.delivery_mode == 2
    assert props.priority == 7
    assert props.correlation_id == "c-1"
    assert props.reply_to == "answers"
    assert props.expiration == "60000"
    assert props.message_id == "m-1"
    assert props.timestamp == 1_700_000_000
    assert props.type == "order" and props.app_id == "shop"
    assert props.headers is None
    client.subscribe("/queue/props")
    (message,) = client.messages()
    assert message.header("persistent") == "true"
    assert message.header("priority") == "7"
    assert message.header("correlation-id") == "c-1"
    assert message.header("reply-to") == "/queue/answers"
    assert message.header("expiration") == "60000"
    assert message.header("expires") is not None
    assert message.header("amqp-message-id") == "m-1"
    assert message.header("timestamp") == "1700000000000"


def test_activemq_expires_is_absolute_epoch_ms(harness: Harness) -> None:
    client = harness.connected()
    now_ms = int(harness.broker.wall_clock() * 1000)
    client.send("/queue/ttl", expires=str(now_ms + 30_000))
    (entry,) = list(harness.vhost.queues["ttl"]._ready)
    assert 29_000 <= int(entry.message.properties.expiration) <= 30_000


def test_headers_from_another_protocol_are_escaped_and_sanitised(harness: Harness) -> None:
    harness.vhost.declare_queue("amqp-made", durable=True)
    props = Properties(
        headers={"colon:name": "a:b\nc", "n": 5, "raw": b"bytes", "table": {"x": 1}, "message-id": "spoof"}
    )
    harness.vhost.publish(Message("", "amqp-made", b"x", props))
    v12 = harness.connected()
    v12.subscribe("/queue/amqp-made")
    (message,) = v12.messages()
    assert message.header("colon:name") == "a:b\nc"  # escaped on the wire, unescaped by the parser
    assert message.header("n") == "5"
    assert message.header("raw") == "bytes"
    assert message.header("table") is None
    assert message.header("message-id") != "spoof"
    v12.session.connection_lost(None)
    harness.vhost.publish(Message("", "amqp-made", b"x", props))
    v10 = harness.connected("1.0")
    v10.subscribe("/queue/amqp-made")
    (message,) = v10.messages()
    assert message.header("colon:name") is None  # STOMP 1.0 cannot carry it
    assert message.header("n") == "5"


def test_first_of_repeated_headers_wins(harness: Harness) -> None:
    client = harness.connected()
    client.raw(b"SEND\ndestination:/queue/first\ndestination:/queue/second\n\nx\0")
    assert "first" in harness.vhost.queues and "second" not in harness.vhost.queues


def test_crlf_lines_and_eols_between_frames(harness: Harness) -> None:
    client = harness.connected()
    client.raw(
        b"\r\n\nSUBSCRIBE\r\nid:0\r\ndestination:/queue/crlf\r\n\r\n\0\n\r\nSEND\r\ndestination:/queue/crlf\r\n\r\nhi\0\n"
    )
    (message,) = client.messages()
    assert message.body == b"hi"


def test_1_1_header_escaping_in_send(harness: Harness) -> None:
    client = harness.connected("1.1")
    client.subscribe("/queue/esc")
    client.raw(b"SEND\ndestination:/queue/esc\nk\\cey:v\\\\al\\nue\n\nx\0")
    assert client.messages()[0].header("k:ey") == "v\\al\nue"


def test_topic_subscriber_gets_exclusive_auto_delete_queue(harness: Harness) -> None:
    client = harness.connected()
    client.subscribe("/topic/stocks.*", "t")
    (queue,) = [q for q in harness.vhost.queues.values() if q.name.startswith("stomp-subscription-")]
    assert queue.exclusive_owner is client.session and queue.auto_delete and not queue.durable
    publisher = harness.connected()
    publisher.send("/topic/stocks.acme", b"42")
    publisher.send("/topic/bonds.acme", b"no")
    (message,) = client.messages()
    assert message.header("destination") == "/topic/stocks.acme"
    assert message.body == b"42"
    client.send_frame("UNSUBSCRIBE", {"id": "t", "receipt": "u"})
    assert client.one("RECEIPT").header("receipt-id") == "u"
    assert queue.name not in harness.vhost.queues


def test_topic_fan_out_to_every_subscriber(harness: Harness) -> None:
    subscribers = [harness.connected() for _ in range(3)]
    for sub in subscribers:
        sub.subscribe("/topic/news.#")
    harness.connected().send("/topic/news.world.today", b"n")
    assert all(len(sub.messages()) == 1 for sub in subscribers)


def test_exchange_destination_publishes_with_routing_key(harness: Harness) -> None:
    client = harness.connected()
    client.subscribe("/exchange/amq.direct/rk")
    client.send("/exchange/amq.direct/rk", b"d")
    client.send("/exchange/amq.direct/other", b"no")
    (message,) = client.messages()
    assert message.header("destination") == "/exchange/amq.direct/rk"


def test_amq_queue_must_exist(harness: Harness) -> None:
    client = harness.connected()
    client.subscribe("/amq/queue/missing")
    error = client.error()
    assert error.header("message") == "Not found"
    assert b"missing" in error.body
    harness.vhost.declare_queue("present")
    ok = harness.connected()
    ok.send("/amq/queue/present", b"p")
    ok.subscribe("/amq/queue/present")
    assert ok.messages()[0].body == b"p"


@pytest.mark.parametrize("destination", ["/unknown/x", "orders", "/queue/", "/exchange//k", "/topic/"])
def test_destination_not_allowed_is_an_error(harness: Harness, destination: str) -> None:
    client = harness.connected()
    client.send(destination, receipt="r-1")
    error = client.error()
    assert error.header("message") == "Invalid destination"
    assert error.header("receipt-id") == "r-1"


def test_a_send_may_not_claim_another_user_id(harness: Harness) -> None:
    honest = harness.connected(login="guest", passcode="guest")
    honest.send("/queue/uid", **{"user-id": "guest", "receipt": "r-1"})
    assert honest.one("RECEIPT").header("receipt-id") == "r-1"
    liar = harness.connected(login="guest", passcode="guest")
    liar.send("/queue/uid", **{"user-id": "admin"})
    assert liar.error().header("message") == "User id mismatch"
    assert harness.vhost.queues["uid"].message_count == 1


def test_reserved_queue_name_is_refused(harness: Harness) -> None:
    client = harness.connected()
    client.send("/queue/amq.special")
    assert client.error().header("message") == "Access refused"


def test_missing_exchange_is_an_error(harness: Harness) -> None:
    client = harness.connected()
    client.send("/exchange/nope/k")
    assert client.error().header("message") == "Not found"


def test_queue_arguments_by_header(harness: Harness) -> None:
    client = harness.connected()
    client.subscribe(
        "/queue/limited", x_max_length="2", x_message_ttl="5000", x_dead_letter_exchange="amq.fanout"
    )
    queue = harness.vhost.queues["limited"]
    assert queue.arguments == {
        "x-max-length": 2,
        "x-message-ttl": 5000,
        "x-dead-letter-exchange": "amq.fanout",
    }
    other = harness.connected()
    other.send("/queue/limited", x_max_length="3")
    assert other.error().header("message") == "Precondition failed"


def test_invalid_queue_argument_is_an_error(harness: Harness) -> None:
    client = harness.connected()
    client.subscribe("/queue/bad-args", x_max_length="many")
    assert client.error().header("message") == "Invalid queue argument"


def test_duplicate_subscription_id_is_an_error(harness: Harness) -> None:
    client = harness.connected()
    client.subscribe("/queue/a", "same")
    client.subscribe("/queue/b", "same")
    assert client.error().header("message") == "Duplicated subscription identifier"


def test_unsubscribe_unknown_id_is_an_error(harness: Harness) -> None:
    client = harness.connected()
    client.send_frame("UNSUBSCRIBE", {"id": "nope"})
    assert client.error().header("message") == "No such subscription"


def test_competing_consumers_share_a_queue(harness: Harness) -> None:
    a, b = harness.connected(), harness.connected()
    a.subscribe("/queue/work")
    b.subscribe("/queue/work")
    sender = harness.connected()
    for i in range(10):
        sender.send("/queue/work", str(i).encode())
    got_a, got_b = a.messages(), b.messages()
    assert len(got_a) == len(got_b) == 5
    assert sorted(int(m.body) for m in got_a + got_b) == list(range(10))


# -- ACK / NACK ---------------------------------------------------------------------------------------------


def test_client_individual_ack_settles_one(harness: Harness) -> None:
    client = harness.connected()
    client.subscribe("/queue/ci", ack="client-individual")
    for body in (b"1", b"2", b"3"):
        client.send("/queue/ci", body)
    messages = client.messages()
    assert [m.header("ack") for m in messages] == [m.header("message-id") for m in messages]
    queue = harness.vhost.queues["ci"]
    client.send_frame("ACK", {"id": messages[1].header("ack")})
    assert queue.unacked_count == 2
    client.send_frame("ACK", {"id": messages[1].header("ack")})
    assert client.error().header("message") == "Unknown message id"


def test_client_ack_is_cumulative(harness: Harness) -> None:
    client = harness.connected()
    client.subscribe("/queue/cum", ack="client")
    for body in (b"1", b"2", b"3"):
        client.send("/queue/cum", body)
    messages = client.messages()
    queue = harness.vhost.queues["cum"]
    client.send_frame("ACK", {"id": messages[1].header("ack"), "receipt": "r"})
    assert client.one("RECEIPT")
    assert queue.unacked_count == 1


def test_1_1_ack_uses_message_id_and_subscription(harness: Harness) -> None:
    client = harness.connected("1.1")
    client.subscribe("/queue/v11", ack="client-individual")
    client.send("/queue/v11")
    (message,) = client.messages()
    assert message.header("ack") is None
    client.send_frame("ACK", {"message-id": message.header("message-id"), "subscription": "s1"})
    assert harness.vhost.queues["v11"].unacked_count == 0


def test_1_0_ack_uses_message_id(harness: Harness) -> None:
    client = harness.connected("1.0")
    client.send_frame("SUBSCRIBE", {"destination": "/queue/v10", "ack": "client"})
    client.send("/queue/v10")
    (message,) = client.messages()
    assert message.header("subscription") == "/queue/v10"  # no id in 1.0: the destination is the id
    client.send_frame("ACK", {"message-id": message.header("message-id")})
    assert harness.vhost.queues["v10"].unacked_count == 0


def test_nack_requeues_flagged_redelivered(harness: Harness) -> None:
    client = harness.connected()
    client.subscribe("/queue/nack", ack="client-individual")
    client.send("/queue/nack", b"again")
    (first,) = client.messages()
    client.send_frame("NACK", {"id": first.header("ack")})
    (second,) = client.messages()
    assert second.body == b"again" and second.header("redelivered") == "true"
    assert second.header("message-id") != first.header("message-id")


def test_nack_requeue_false_dead_letters(harness: Harness) -> None:
    vhost = harness.vhost
    vhost.declare_exchange("dlx", "fanout")
    vhost.declare_queue("dead")
    vhost.bind_queue("dead", "dlx", "")
    client = harness.connected()
    client.subscribe("/queue/nack-dl", ack="client", x_dead_letter_exchange="dlx")
    client.send("/queue/nack-dl", b"bad")
    (message,) = client.messages()
    client.send_frame("NACK", {"id": message.header("ack"), "requeue": "false"})
    assert vhost.queues["nack-dl"].message_count == 0
    assert vhost.queues["dead"].message_count == 1


def test_prefetch_count_limits_unacked_deliveries(harness: Harness) -> None:
    client = harness.connected()
    client.subscribe("/queue/pf", ack="client-individual", prefetch_count="2")
    for i in range(5):
        client.send("/queue/pf", str(i).encode())
    messages = client.messages()
    assert len(messages) == 2
    client.send_frame("ACK", {"id": messages[0].header("ack")})
    assert [m.body for m in client.messages()] == [b"2"]


def test_activemq_prefetch_size_and_default_client_prefetch(harness: Harness) -> None:
    client = harness.connected()
    client.subscribe("/queue/amq-pf", ack="client", **{"activemq.prefetchSize": "1"})
    other = harness.connected()
    other.subscribe("/queue/default-pf", ack="client")
    sender = harness.connected()
    for _ in range(3):
        sender.send("/queue/amq-pf")
    for _ in range(DEFAULT_CLIENT_PREFETCH + 5):
        sender.send("/queue/default-pf")
    assert len(client.messages()) == 1
    assert len(other.messages()) == DEFAULT_CLIENT_PREFETCH


def test_disconnect_requeues_unacked_to_another_consumer(harness: Harness) -> None:
    first = harness.connected()
    first.subscribe("/queue/redeliver", ack="client")
    harness.connected().send("/queue/redeliver", b"r")
    assert len(first.messages()) == 1
    first.session.connection_lost(None)
    second = harness.connected()
    second.subscribe("/queue/redeliver", ack="client")
    (message,) = second.messages()
    assert message.header("redelivered") == "true"


def test_auto_ack_settles_at_delivery(harness: Harness) -> None:
    client = harness.connected()
    client.subscribe("/queue/auto")
    client.send("/queue/auto")
    assert len(client.messages()) == 1
    client.session.connection_lost(None)
    assert harness.vhost.queues["auto"].message_count == 0


# -- transactions ----------------------------------------------------------------------------------------


def test_transaction_commit_applies_sends_and_acks_together(harness: Harness) -> None:
    client = harness.connected()
    client.subscribe("/queue/tx-in", ack="client-individual")
    harness.connected().send("/queue/tx-in", b"in")
    (incoming,) = client.messages()
    observer = harness.connected()
    observer.subscribe("/queue/tx-out")
    client.send_frame("BEGIN", {"transaction": "t1"})
    client.send("/queue/tx-out", b"a", transaction="t1")
    client.send("/queue/tx-out", b"b", transaction="t1", receipt="in-tx")
    client.send_frame("ACK", {"id": incoming.header("ack"), "transaction": "t1"})
    assert client.one("RECEIPT").header("receipt-id") == "in-tx"
    assert observer.received() == []
    assert harness.vhost.queues["tx-in"].unacked_count == 1
    client.send_frame("COMMIT", {"transaction": "t1", "receipt": "c"})
    assert client.one("RECEIPT").header("receipt-id") == "c"
    assert [m.body for m in observer.messages()] == [b"a", b"b"]
    assert harness.vhost.queues["tx-in"].unacked_count == 0


def test_transaction_abort_and_disconnect_discard(harness: Harness) -> None:
    client = harness.connected()
    observer = harness.connected()
    observer.subscribe("/queue/tx-abort")
    client.send_frame("BEGIN", {"transaction": "t"})
    client.send("/queue/tx-abort", b"x", transaction="t")
    client.send_frame("ABORT", {"transaction": "t"})
    client.send_frame("BEGIN", {"transaction": "u"})
    client.send("/queue/tx-abort", b"y", transaction="u")
    client.session.connection_lost(None)
    assert observer.received() == []


def test_unknown_transaction_is_an_error(harness: Harness) -> None:
    client = harness.connected()
    client.send("/queue/x", transaction="never-begun")
    assert client.error().header("message") == "Unknown transaction"


def test_begin_twice_is_an_error(harness: Harness) -> None:
    client = harness.connected()
    client.send_frame("BEGIN", {"transaction": "t"})
    client.send_frame("BEGIN", {"transaction": "t"})
    assert client.error().header("message") == "Transaction already started"


# -- RECEIPT and durability (README, Guarantees) -----------------------------------------------------------------


def test_receipt_for_persistent_send_waits_for_the_store(harness: Harness) -> None:
    client = harness.connected()
    client.send("/queue/durable", persistent="true", receipt="p1")
    assert client.received() == []
    harness.make_durable()
    assert client.one("RECEIPT").header("receipt-id") == "p1"


def test_receipt_for_transient_send_is_immediate(harness: Harness) -> None:
    client = harness.connected()
    client.send("/queue/transient", receipt="t1")
    assert client.one("RECEIPT").header("receipt-id") == "t1"
    assert harness.durable == []


def test_one_durability_callback_per_batch_and_receipts_keep_order(harness: Harness) -> None:
    client = harness.connected()
    batch = b"".join(
        encode_frame("SEND", [("destination", "/queue/batch"), ("persistent", p), ("receipt", r)], b"x")
        for p, r in (("true", "a"), ("false", "b"), ("true", "c"))
    )
    client.raw(batch)
    assert len(harness.durable) == 1
    client.send("/queue/batch", receipt="d")  # a later transient receipt must not overtake
    assert client.received() == []
    harness.make_durable()
    assert [f.header("receipt-id") for f in client.received()] == ["a", "b", "c", "d"]


def test_commit_receipt_waits_for_persistent_messages(harness: Harness) -> None:
    client = harness.connected()
    client.send_frame("BEGIN", {"transaction": "t"})
    client.send("/queue/tx-durable", persistent="true", transaction="t")
    client.send_frame("COMMIT", {"transaction": "t", "receipt": "done"})
    assert client.received() == []
    harness.make_durable()
    assert client.one("RECEIPT").header("receipt-id") == "done"


def test_disconnect_with_receipt_closes_after_it(harness: Harness) -> None:
    client = harness.connected()
    client.subscribe("/queue/bye", ack="client")
    harness.connected().send("/queue/bye")
    client.messages()
    client.send_frame("DISCONNECT", {"receipt": "bye"})
    assert client.one("RECEIPT").header("receipt-id") == "bye"
    assert client.conn.closed
    assert harness.vhost.queues["bye"].message_count == 1  # unacked went back


def test_disconnect_receipt_after_pending_durable_receipt(harness: Harness) -> None:
    client = harness.connected()
    client.raw(
        encode_frame("SEND", [("destination", "/queue/d2"), ("persistent", "true"), ("receipt", "s")], b"x")
        + encode_frame("DISCONNECT", [("receipt", "bye")])
    )
    assert not client.conn.closed and client.received() == []
    harness.make_durable()
    assert [f.header("receipt-id") for f in client.received()] == ["s", "bye"]
    assert client.conn.closed


# -- errors (STOMP 1.2 "ERROR", "Size Limits") --------------------------------------------------------------


def test_malformed_frame_is_an_error_and_other_connections_carry_on(harness: Harness) -> None:
    bystander = harness.connected()
    bystander.subscribe("/queue/bystander")
    client = harness.connected()
    client.raw(b"SEND\nno-colon-here\n\nx\0")
    error = client.error()
    assert error.header("message") == "Invalid header"
    assert error.body
    client.raw(b"SEND\ndestination:/queue/bystander\n\nignored\0")
    harness.connected().send("/queue/bystander", b"ok")
    assert [m.body for m in bystander.messages()] == [b"ok"]


def test_unknown_command_is_an_error(harness: Harness) -> None:
    client = harness.connected()
    client.raw(b"FLY\n\n\0")
    assert client.error().header("message") == "Unknown command"


def test_server_command_from_a_client_is_an_error(harness: Harness) -> None:
    client = harness.connected()
    client.raw(b"MESSAGE\ndestination:/queue/x\n\n\0")
    assert client.error().header("message") == "Unknown command"


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"SEND\ndestination:/queue/x\na:1\nb:2\nc:3\n\n\0", "Too many headers"),
        (b"SEND\ndestination:/queue/" + b"x" * 100 + b"\n\n\0", "Header too long"),
        (b"SEND\ndestination:/queue/x\n\n" + b"x" * 300 + b"\0", "Body too large"),
    ],
)
def test_frames_over_the_configured_limits_are_errors(frame: bytes, message: str) -> None:
    harness = Harness(Config(limits=LimitsConfig(max_headers=3, max_header_length=64, max_frame_size=256)))
    client = harness.connected()
    client.raw(frame)
    assert client.error().header("message") == message


def test_error_carries_receipt_id_of_the_failing_frame(harness: Harness) -> None:
    client = harness.connected()
    client.send_frame("SUBSCRIBE", {"id": "x", "receipt": "r-9"})
    error = client.error()
    assert error.header("message") == "Missing destination"
    assert error.header("receipt-id") == "r-9"


def test_queue_deleted_under_a_subscription_ends_the_connection(harness: Harness) -> None:
    client = harness.connected()
    client.subscribe("/queue/doomed")
    harness.vhost.delete_queue("doomed")
    assert client.error().header("message") == "Subscription cancelled"
    client.session.connection_lost(None)


def test_shutdown_sends_error_and_closes(harness: Harness) -> None:
    client = harness.connected()
    client.subscribe("/queue/s", ack="client")
    client.session.shutdown()
    assert client.error().header("message") == "Server shutdown"
    assert harness.vhost.queues["s"].consumer_count == 0


# -- temporary reply queues and durable subscriptions (README, Names across protocols) ---------------------------------------


def test_temp_queue_request_reply(harness: Harness) -> None:
    requester = harness.connected()
    server = harness.connected()
    server.subscribe("/queue/rpc")
    requester.send("/queue/rpc", b"ping", reply_to="/temp-queue/answers", correlation_id="42")
    (request,) = server.messages()
    reply_to = request.header("reply-to")
    assert reply_to is not None and reply_to.startswith("/reply-queue/amq.gen-")
    reply_queue = harness.vhost.queues[reply_to.removeprefix("/reply-queue/")]
    assert reply_queue.exclusive_owner is requester.session
    server.send(reply_to, b"pong", correlation_id="42")
    (reply,) = requester.messages()
    assert reply.body == b"pong"
    assert reply.header("subscription") == "/temp-queue/answers"
    assert reply.header("destination") == "/temp-queue/answers"
    assert reply.header("correlation-id") == "42"
    # An AMQP server answers with routing_key = reply_to on the default exchange.
    harness.vhost.publish(Message("", reply_queue.name, b"amqp-pong"))
    assert requester.messages()[0].body == b"amqp-pong"
    requester.session.connection_lost(None)
    assert reply_queue.name not in harness.vhost.queues


def test_rabbitmq_style_durable_subscription_keeps_messages_while_away(harness: Harness) -> None:
    subscriber = harness.connected()
    subscriber.subscribe("/topic/alerts.#", "alerts", durable="true", auto_delete="false")
    queue = harness.vhost.queues["stomp-subscription-alerts"]
    assert queue.durable and not queue.auto_delete and queue.exclusive_owner is None
    subscriber.session.connection_lost(None)
    harness.connected().send("/topic/alerts.fire", b"while away", persistent="true")
    back = harness.connected()
    back.subscribe("/topic/alerts.#", "alerts", durable="true", auto_delete="false")
    assert [m.body for m in back.messages()] == [b"while away"]
    back.send_frame("UNSUBSCRIBE", {"id": "alerts", "durable": "true"})
    assert "stomp-subscription-alerts" not in harness.vhost.queues


def test_activemq_style_durable_subscription(harness: Harness) -> None:
    subscriber = harness.connected(client_id="app-1")
    subscriber.subscribe("/topic/prices", "p", **{"activemq.subscriptionName": "feed"})
    assert "stomp-subscription-app-1.feed" in harness.vhost.queues
    subscriber.send_frame("UNSUBSCRIBE", {"id": "p"})  # a plain UNSUBSCRIBE keeps the subscription
    harness.connected().send("/topic/prices", b"1.23")
    assert harness.vhost.queues["stomp-subscription-app-1.feed"].message_count == 1


# -- flow control ------------------------------------------------------------------------------------------


def test_writing_paused_holds_deliveries_until_resumed(harness: Harness) -> None:
    client = harness.connected()
    client.subscribe("/queue/slow")
    client.session.writing_paused()
    harness.connected().send("/queue/slow", b"held")
    assert client.received() == []
    client.session.writing_resumed()
    assert [m.body for m in client.messages()] == [b"held"]


def test_publishers_pause_while_the_broker_is_over_its_watermark(harness: Harness) -> None:
    client = harness.connected()
    harness.context.flow.blocked = True  # as if RAM or the store backlog were over the high watermark
    client.send("/queue/flow")
    assert client.conn.reading_paused
    harness.context.flow.check()  # both below the low watermarks: parked publishers resume
    assert not client.conn.reading_paused


def test_stats_count_messages_and_clients(harness: Harness) -> None:
    client = harness.connected()
    client.subscribe("/queue/stats")
    client.send("/queue/stats")
    stats = harness.context.stats
    assert (stats.messages_received, stats.messages_sent, stats.clients_connected) == (1, 1, 1)
    client.session.connection_lost(None)
    assert stats.clients_connected == 0
