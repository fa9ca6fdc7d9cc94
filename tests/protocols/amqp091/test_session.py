"""Tests of the AMQP 0-9-1 session (protocols/amqp091/session.py and channel.py) without sockets.

A `FakeConnection` (tests/protocols/fakes.py) stands in for the driver (writes collected, timers on a
hand-driven clock) and the real core runs over `MemoryStore`, whose `when_durable` callbacks a test may
hold back to check that persistent messages are confirmed only once durable (README, Guarantees). A `Client`
encodes what a client sends with the codec's encoders and decodes what the session wrote with the codec's
parser and content assembler, so every assertion is about frames on the wire.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest
from pamqp import base
from pamqp.commands import Basic, Channel, Confirm, Connection, Exchange, Queue, Tx

from broker.auth import Authenticator, hash_password
from broker.config import load_config
from broker.context import FlowGate, ServerContext
from broker.core import Broker
from broker.message import Message, Properties
from protocols.amqp091.codec import (
    HEARTBEAT_FRAME,
    NEED_DATA,
    PROTOCOL_HEADER,
    AmqpParser,
    ContentAssembler,
    Heartbeat,
    encode_basic_ack,
    encode_content,
    encode_method,
)
from protocols.amqp091.fieldtable import encode_table
from protocols.amqp091.session import CAPABILITIES, AmqpSession
from storage.memory import MemoryStore
from tests.protocols.fakes import FakeConnection

FRAME_MAX = 131072
CLIENT_CAPABILITIES: dict[str, Any] = {
    "consumer_cancel_notify": True,
    "connection.blocked": True,
    "authentication_failure_close": True,
    "publisher_confirms": True,
    "basic.nack": True,
}


# --- fakes ----------------------------------------------------------------------------------------


class Durability:
    """The store's schedule: run `when_durable` callbacks at once, or hold them until `release()`."""

    def __init__(self) -> None:
        self.hold = False
        self.held: list[Callable[[], None]] = []

    def __call__(self, callback: Callable[[], None]) -> None:
        if self.hold:
            self.held.append(callback)
        else:
            callback()

    def release(self) -> None:
        held, self.held = self.held, []
        for callback in held:
            callback()


Received = tuple[int, Any]


class Client:
    """One client connection's frames: send with the codec's encoders, read what the session wrote."""

    def __init__(self, session: AmqpSession, conn: FakeConnection) -> None:
        self.session = session
        self.conn = conn
        self._parser = AmqpParser(FRAME_MAX)
        self._parser.feed(PROTOCOL_HEADER)
        self._parser.next_frame()
        self._assemblers: dict[int, ContentAssembler] = {}
        self._read = 0
        #: What came right after the last consume-ok (see `consume`).
        self.pending: list[Any] = []

    def send(self, *chunks: bytes) -> None:
        self.session.data_received(b"".join(chunks))

    def method(self, channel: int, method: base.Frame) -> None:
        self.send(encode_method(channel, method))

    def publish(
        self,
        channel: int,
        body: bytes = b"m",
        routing_key: str = "q",
        exchange: str = "",
        props: Properties | None = None,
        mandatory: bool = False,
    ) -> bytes:
        """The frames of one basic.publish with its content, to send alone or batched into one chunk."""
        frames = encode_content(
            channel,
            Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory),
            props or Properties(),
            body,
            FRAME_MAX,
        )
        return frames

    def received(self) -> list[Received]:
        """Frames written since the last call; content methods come as (method, properties, body)."""
        data = bytes(self.conn.out[self._read :])
        self._read = len(self.conn.out)
        self._parser.feed(data)
        frames: list[Received] = []
        while (item := self._parser.next_frame()) is not NEED_DATA:
            channel, frame = item
            if isinstance(frame, Heartbeat):
                frames.append((channel, frame))
                continue
            command = self._assemblers.setdefault(channel, ContentAssembler()).process(frame)  # type: ignore[arg-type]
            if command is not None:
                method, props, body = command
                frames.append((channel, method if props is None else (method, props, body)))
        return frames

    def methods(self) -> list[Any]:
        return [
            f if isinstance(f, base.Frame) else f[0]
            for _, f in self.received()
            if not isinstance(f, Heartbeat)
        ]

    def expect(self, *types: type) -> list[Any]:
        methods = self.methods()
        assert [type(m) for m in methods] == list(types), methods
        return methods

    def open_channel(self, channel: int = 1) -> None:
        self.method(channel, Channel.Open())
        self.expect(Channel.OpenOk)


def start_ok(
    user: str = "guest", password: str = "guest", capabilities: dict[str, Any] | None = None
) -> Connection.StartOk:
    return Connection.StartOk(
        client_properties={"product": "test", "capabilities": dict(capabilities or CLIENT_CAPABILITIES)},
        mechanism="PLAIN",
        response=f"\x00{user}\x00{password}",
        locale="en_US",
    )


@pytest.fixture
def durability() -> Durability:
    return Durability()


@pytest.fixture
def context(durability: Durability) -> ServerContext:
    config = load_config(env={"POLYBROKER_VHOSTS_NAMES": "/,other"})
    broker = Broker(MemoryStore(durability), vhosts=config.vhosts.names)
    return ServerContext(
        broker=broker, auth=Authenticator(config), config=config, flow=FlowGate(broker, 1 << 30)
    )


Connect = Callable[..., Client]


@pytest.fixture
def connect(context: ServerContext) -> Connect:
    """A client through the whole handshake, with channel 1 open (unless told otherwise)."""

    def make(
        open_channel: bool = True, heartbeat: int = 0, capabilities: dict[str, Any] | None = None
    ) -> Client:
        conn = FakeConnection()
        session = AmqpSession(context)
        session.connection_made(conn)  # type: ignore[arg-type]
        client = Client(session, conn)
        client.send(PROTOCOL_HEADER)
        client.method(0, start_ok(capabilities=capabilities))
        client.method(0, Connection.TuneOk(channel_max=2047, frame_max=FRAME_MAX, heartbeat=heartbeat))
        client.method(0, Connection.Open(virtual_host="/"))
        client.expect(Connection.Start, Connection.Tune, Connection.OpenOk)
        if open_channel:
            client.open_channel(1)
        return client

    return make


def declare(client: Client, name: str, channel: int = 1, **kwargs: Any) -> Any:
    """queue.declare; returns the declare-ok."""
    client.method(channel, Queue.Declare(queue=name, **kwargs))
    (ok,) = client.expect(Queue.DeclareOk)
    return ok


def consume(client: Client, queue: str, channel: int = 1, prefetch: int = 0, **kwargs: Any) -> str:
    if prefetch:
        client.method(channel, Basic.Qos(prefetch_count=prefetch))
        client.expect(Basic.QosOk)
    client.method(channel, Basic.Consume(queue=queue, **kwargs))
    frames = [f for _, f in client.received()]
    assert isinstance(frames[0], Basic.ConsumeOk), frames
    client.pending = frames[1:]
    return str(frames[0].consumer_tag)


def deliveries(client: Client) -> list[Any]:
    return [f for _, f in client.received() if isinstance(f, tuple) and isinstance(f[0], Basic.Deliver)]


def closed_with(client: Client, code: int, channel: int | None = None) -> Any:
    """The last method is Connection.Close (or Channel.Close on `channel`) with reply code `code`."""
    frames = [(n, f) for n, f in client.received() if isinstance(f, base.Frame)]
    number, close = frames[-1]
    if channel is None:
        assert isinstance(close, Connection.Close), frames
        assert number == 0
    else:
        assert isinstance(close, Channel.Close), frames
        assert number == channel
    assert close.reply_code == code, close
    assert close.reply_text.startswith(_REPLY_PREFIX[code]), close.reply_text
    return close


_REPLY_PREFIX = {
    403: "ACCESS_REFUSED - ",
    404: "NOT_FOUND - ",
    405: "RESOURCE_LOCKED - ",
    406: "PRECONDITION_FAILED - ",
    501: "FRAME_ERROR - ",
    502: "SYNTAX_ERROR - ",
    503: "COMMAND_INVALID - ",
    504: "CHANNEL_ERROR - ",
    505: "UNEXPECTED_FRAME - ",
    530: "NOT_ALLOWED - ",
    540: "NOT_IMPLEMENTED - ",
    541: "INTERNAL_ERROR - ",
    320: "CONNECTION_FORCED - ",
}


# --- connection: handshake ---------------------------------------------------------------------------


def test_handshake_advertises_capabilities_and_limits(context: ServerContext) -> None:
    conn = FakeConnection()
    session = AmqpSession(context)
    session.connection_made(conn)  # type: ignore[arg-type]
    client = Client(session, conn)
    client.send(PROTOCOL_HEADER)
    (start,) = client.expect(Connection.Start)
    assert start.mechanisms.split() == ["PLAIN", "AMQPLAIN"]
    assert (start.version_major, start.version_minor) == (0, 9)
    assert start.server_properties["capabilities"] == CAPABILITIES
    client.method(0, start_ok())
    (tune,) = client.expect(Connection.Tune)
    limits = context.config.limits
    assert (tune.channel_max, tune.frame_max, tune.heartbeat) == (
        limits.amqp_channel_max,
        limits.amqp_frame_max,
        limits.heartbeat,
    )
    client.method(0, Connection.TuneOk(channel_max=10, frame_max=8192, heartbeat=0))
    client.method(0, Connection.Open(virtual_host="/"))
    client.expect(Connection.OpenOk)
    assert context.stats.clients_connected == 1
    session.connection_lost(None)
    assert context.stats.clients_connected == 0


def test_handshake_fed_one_byte_at_a_time(context: ServerContext) -> None:
    conn = FakeConnection()
    session = AmqpSession(context)
    session.connection_made(conn)  # type: ignore[arg-type]
    client = Client(session, conn)
    data = b"".join(
        (
            PROTOCOL_HEADER,
            encode_method(0, start_ok()),
            encode_method(0, Connection.TuneOk(channel_max=10, frame_max=8192, heartbeat=0)),
            encode_method(0, Connection.Open(virtual_host="/")),
            encode_method(1, Channel.Open()),
        )
    )
    for i in range(len(data)):
        session.data_received(data[i : i + 1])
    client.expect(Connection.Start, Connection.Tune, Connection.OpenOk, Channel.OpenOk)


@pytest.mark.parametrize("header", [b"AMQP\x00\x00\x09\x00", b"AMQP\x01\x01\x00\x09", b"GET / HTTP/1.1\r\n"])
def test_wrong_protocol_header_is_answered_with_ours_then_closed(
    context: ServerContext, header: bytes
) -> None:
    conn = FakeConnection()
    session = AmqpSession(context)
    session.connection_made(conn)  # type: ignore[arg-type]
    session.data_received(header)
    assert bytes(conn.out) == PROTOCOL_HEADER
    assert conn.closed


def test_amqplain_login(context: ServerContext) -> None:
    conn = FakeConnection()
    session = AmqpSession(context)
    session.connection_made(conn)  # type: ignore[arg-type]
    client = Client(session, conn)
    client.send(PROTOCOL_HEADER)
    response = encode_table({"LOGIN": "guest", "PASSWORD": "guest"})[4:]
    client.method(
        0,
        Connection.StartOk(client_properties={}, mechanism="AMQPLAIN", response=response, locale="en_US"),  # type: ignore[arg-type]
    )
    client.expect(Connection.Start, Connection.Tune)


def test_bad_password_is_403_with_authentication_failure_close(context: ServerContext) -> None:
    conn = FakeConnection()
    session = AmqpSession(context)
    session.connection_made(conn)  # type: ignore[arg-type]
    client = Client(session, conn)
    client.send(PROTOCOL_HEADER, encode_method(0, start_ok(password="wrong")))
    close = closed_with(client, 403)
    assert "PLAIN" in close.reply_text
    client.method(0, Connection.CloseOk())
    assert conn.closed


def test_bad_password_without_the_capability_just_closes(context: ServerContext) -> None:
    conn = FakeConnection()
    session = AmqpSession(context)
    session.connection_made(conn)  # type: ignore[arg-type]
    client = Client(session, conn)
    client.send(PROTOCOL_HEADER, encode_method(0, start_ok(password="wrong", capabilities={"x": True})))
    client.expect(Connection.Start)
    assert conn.closed


def test_guest_is_refused_from_a_remote_address(context: ServerContext) -> None:
    conn = FakeConnection(is_loopback=False)
    session = AmqpSession(context)
    session.connection_made(conn)  # type: ignore[arg-type]
    client = Client(session, conn)
    client.send(PROTOCOL_HEADER, encode_method(0, start_ok()))
    assert "loopback" in closed_with(client, 403).reply_text


def test_user_without_access_to_the_vhost_is_530(durability: Durability, tmp_path: Any) -> None:
    config_file = tmp_path / "polybroker.toml"
    config_file.write_text(
        f'[vhosts]\nnames = ["/", "other"]\n[users.alice]\npassword = "{hash_password("secret")}"\n'
        'vhosts = ["other"]\n'
    )
    config = load_config(config_file, env={})
    broker = Broker(MemoryStore(durability), vhosts=config.vhosts.names)
    context = ServerContext(
        broker=broker, auth=Authenticator(config), config=config, flow=FlowGate(broker, 1 << 30)
    )
    for vhost, expected in (("other", Connection.OpenOk), ("/", Connection.Close)):
        conn = FakeConnection()
        session = AmqpSession(context)
        session.connection_made(conn)  # type: ignore[arg-type]
        client = Client(session, conn)
        client.send(
            PROTOCOL_HEADER,
            encode_method(0, start_ok("alice", "secret")),
            encode_method(0, Connection.TuneOk(channel_max=10, frame_max=8192, heartbeat=0)),
            encode_method(0, Connection.Open(virtual_host=vhost)),
        )
        last = client.expect(Connection.Start, Connection.Tune, expected)[-1]
        if expected is Connection.Close:
            assert last.reply_code == 530
            assert "access to vhost '/' refused for user 'alice'" in last.reply_text


def test_unknown_vhost_is_530(connect: Connect, context: ServerContext) -> None:
    conn = FakeConnection()
    session = AmqpSession(context)
    session.connection_made(conn)  # type: ignore[arg-type]
    client = Client(session, conn)
    client.send(
        PROTOCOL_HEADER,
        encode_method(0, start_ok()),
        encode_method(0, Connection.TuneOk(channel_max=10, frame_max=8192, heartbeat=0)),
        encode_method(0, Connection.Open(virtual_host="nope")),
    )
    close = closed_with(client, 530)
    assert "nope" in close.reply_text
    assert (close.class_id, close.method_id) == (10, 40)


@pytest.mark.parametrize(
    ("channel_max", "frame_max"), [(10, FRAME_MAX * 2), (10, 0), (10, 1000), (0, 8192), (5000, 8192)]
)
def test_tune_ok_beyond_our_limits_is_530(context: ServerContext, channel_max: int, frame_max: int) -> None:
    conn = FakeConnection()
    session = AmqpSession(context)
    session.connection_made(conn)  # type: ignore[arg-type]
    client = Client(session, conn)
    client.send(
        PROTOCOL_HEADER,
        encode_method(0, start_ok()),
        encode_method(0, Connection.TuneOk(channel_max=channel_max, frame_max=frame_max, heartbeat=0)),
    )
    closed_with(client, 530)


def test_method_out_of_order_on_channel_0_is_503(context: ServerContext) -> None:
    conn = FakeConnection()
    session = AmqpSession(context)
    session.connection_made(conn)  # type: ignore[arg-type]
    client = Client(session, conn)
    client.send(PROTOCOL_HEADER, encode_method(0, Connection.Open(virtual_host="/")))
    assert "connection.open" in closed_with(client, 503).reply_text


def test_handshake_timeout_closes(context: ServerContext) -> None:
    conn = FakeConnection()
    session = AmqpSession(context)
    session.connection_made(conn)  # type: ignore[arg-type]
    session.data_received(PROTOCOL_HEADER)
    conn.advance(9)
    assert not conn.closed
    conn.advance(2)
    assert conn.closed


# --- connection: frames and limits ---------------------------------------------------------------------


def test_frame_above_negotiated_frame_max_is_501(connect: Connect) -> None:
    client = connect()
    body = b"x" * (FRAME_MAX + 1)
    client.send(struct.pack(">BHI", 3, 1, len(body)) + body + b"\xce")
    closed_with(client, 501)
    # The stream cannot be framed any more: what follows is discarded and the close-ok timer closes.
    client.send(encode_method(0, Connection.CloseOk()))
    assert not client.conn.closed
    client.conn.advance(3)
    assert client.conn.closed


def test_bad_frame_end_is_501(connect: Connect) -> None:
    client = connect()
    frame = bytearray(encode_method(1, Basic.Qos(prefetch_count=1)))
    frame[-1] = 0
    client.send(bytes(frame))
    closed_with(client, 501)


def test_undecodable_arguments_are_502(connect: Connect) -> None:
    client = connect()
    payload = struct.pack(">HH", 50, 10) + b"\x00\x00\xff"  # queue.declare: a shortstr longer than the frame
    client.send(struct.pack(">BHI", 1, 1, len(payload)) + payload + b"\xce")
    close = closed_with(client, 502)
    assert (close.class_id, close.method_id) == (50, 10)


def test_server_only_method_is_503(connect: Connect) -> None:
    client = connect()
    client.method(1, Basic.ConsumeOk(consumer_tag="x"))
    closed_with(client, 503)


def test_frame_on_unopened_channel_is_504(connect: Connect) -> None:
    client = connect()
    client.method(7, Queue.Declare(queue="q"))
    assert "channel.open" in closed_with(client, 504).reply_text


def test_second_channel_open_is_504(connect: Connect) -> None:
    client = connect()
    client.method(1, Channel.Open())
    closed_with(client, 504)


def test_content_header_without_method_is_505(connect: Connect) -> None:
    client = connect()
    publish = client.publish(1, b"abc")
    method_frame_size = 7 + struct.unpack_from(">I", publish, 3)[0] + 1
    client.send(publish[method_frame_size:])  # header + body, no basic.publish before them
    closed_with(client, 505)


def test_channel_number_above_channel_max_is_530(context: ServerContext) -> None:
    conn = FakeConnection()
    session = AmqpSession(context)
    session.connection_made(conn)  # type: ignore[arg-type]
    client = Client(session, conn)
    client.send(
        PROTOCOL_HEADER,
        encode_method(0, start_ok()),
        encode_method(0, Connection.TuneOk(channel_max=2, frame_max=8192, heartbeat=0)),
        encode_method(0, Connection.Open(virtual_host="/")),
        encode_method(1, Channel.Open()),
        encode_method(2, Channel.Open()),
        encode_method(3, Channel.Open()),
    )
    closed_with(client, 530)


def test_unknown_method_is_540(connect: Connect) -> None:
    client = connect()
    payload = struct.pack(">HH", 60, 99)
    client.send(struct.pack(">BHI", 1, 1, len(payload)) + payload + b"\xce")
    closed_with(client, 540)


def test_qos_prefetch_size_is_540(connect: Connect) -> None:
    client = connect()
    client.method(1, Basic.Qos(prefetch_size=1000, prefetch_count=1))
    assert "prefetch_size" in closed_with(client, 540).reply_text


def test_publish_immediate_is_540(connect: Connect) -> None:
    client = connect()
    frames = encode_content(1, Basic.Publish(routing_key="q", immediate=True), Properties(), b"x", FRAME_MAX)
    client.send(frames)
    closed_with(client, 540)


def test_a_bug_in_a_handler_is_541_and_the_connection_closes(
    connect: Connect, context: ServerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = connect()

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(context.broker.vhost("/"), "publish", broken)
    client.send(client.publish(1))
    closed_with(client, 541)
    client.method(0, Connection.CloseOk())
    assert client.conn.closed


def test_after_a_hard_error_only_close_ok_counts(connect: Connect) -> None:
    client = connect()
    client.method(9, Queue.Declare(queue="q"))
    closed_with(client, 504)
    client.method(1, Queue.Declare(queue="q2"))
    client.method(0, Connection.Open(virtual_host="/"))
    assert client.methods() == []
    assert not client.conn.closed
    client.method(0, Connection.CloseOk())
    assert client.conn.closed


def test_close_ok_timeout_closes(connect: Connect) -> None:
    client = connect()
    client.method(9, Queue.Declare(queue="q"))
    closed_with(client, 504)
    client.conn.advance(5)
    assert client.conn.closed


# --- connection: close, heartbeats, blocked ------------------------------------------------------------


def test_client_close_is_answered_and_releases_everything(connect: Connect, context: ServerContext) -> None:
    client = connect()
    declare(client, "excl", exclusive=True)
    client.method(0, Connection.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0))
    client.expect(Connection.CloseOk)
    assert client.conn.closed
    assert "excl" not in context.broker.vhost("/").queues


def test_shutdown_sends_320_and_closes_on_close_ok(connect: Connect) -> None:
    client = connect()
    client.session.shutdown()
    closed_with(client, 320)
    assert not client.conn.closed
    client.method(0, Connection.CloseOk())
    assert client.conn.closed


def test_heartbeats_are_sent_and_a_silent_peer_is_closed(connect: Connect) -> None:
    client = connect(heartbeat=2)
    client.conn.advance(1)
    assert bytes(client.conn.out).endswith(HEARTBEAT_FRAME)
    for _ in range(3):
        client.conn.advance(1)
        client.send(HEARTBEAT_FRAME)  # the peer's heartbeat keeps it alive
    assert not client.conn.closed
    # Two intervals (4 s) of silence close it, give or take the half-interval tick.
    client.conn.advance(3.9)
    assert not client.conn.closed
    client.conn.advance(1.2)
    assert client.conn.closed


def test_connection_blocked_and_unblocked(connect: Connect, context: ServerContext) -> None:
    client = connect()
    broker = context.broker
    declare(client, "big")
    broker.limits = type(broker.limits)(memory_high_watermark=1000)
    client.send(client.publish(1, b"x" * 2000, "big"))
    (blocked,) = client.expect(Connection.Blocked)
    assert blocked.reason == "low on memory"
    assert client.conn.reading_paused
    client.method(1, Queue.Purge(queue="big"))
    client.expect(Queue.PurgeOk)
    context.flow.check()
    client.expect(Connection.Unblocked)
    assert not client.conn.reading_paused


def test_no_blocked_notification_without_the_capability(connect: Connect, context: ServerContext) -> None:
    client = connect(capabilities={"publisher_confirms": True})
    declare(client, "big")
    context.broker.limits = type(context.broker.limits)(memory_high_watermark=1000)
    client.send(client.publish(1, b"x" * 2000, "big"))
    assert client.methods() == []
    assert client.conn.reading_paused


def test_a_flow_paused_connection_reads_again_to_see_close_ok(
    connect: Connect, context: ServerContext
) -> None:
    client = connect()
    declare(client, "big")
    context.broker.limits = type(context.broker.limits)(memory_high_watermark=1000)
    client.send(client.publish(1, b"x" * 2000, "big"))
    assert client.conn.reading_paused
    client.session.shutdown()
    assert not client.conn.reading_paused
    client.method(0, Connection.CloseOk())
    assert client.conn.closed


# --- channels -----------------------------------------------------------------------------------------


def test_channel_error_closes_only_the_channel_until_close_ok(connect: Connect) -> None:
    client = connect()
    client.open_channel(2)
    client.send(client.publish(1, exchange="missing"))
    close = closed_with(client, 404, channel=1)
    assert "missing" in close.reply_text
    assert (close.class_id, close.method_id) == (60, 40)
    client.method(1, Queue.Declare(queue="ignored"))
    assert client.methods() == []
    declare(client, "on-two", channel=2)  # the other channel carries on
    client.method(1, Channel.CloseOk())
    client.open_channel(1)  # the number is free again


def test_client_channel_close(connect: Connect) -> None:
    client = connect()
    client.method(1, Channel.Close(reply_code=200, reply_text="", class_id=0, method_id=0))
    client.expect(Channel.CloseOk)
    client.open_channel(1)


def test_declare_reserved_exchange_name_is_403(connect: Connect) -> None:
    client = connect()
    client.method(1, Exchange.Declare(exchange="amq.mine", exchange_type="direct"))
    closed_with(client, 403, channel=1)


def test_unknown_exchange_type_is_503(connect: Connect) -> None:
    client = connect()
    client.method(1, Exchange.Declare(exchange="e", exchange_type="nope"))
    closed_with(client, 503)


def test_exclusive_queue_of_another_connection_is_405(connect: Connect) -> None:
    owner = connect()
    declare(owner, "mine", exclusive=True)
    other = connect()
    other.method(1, Queue.Declare(queue="mine", passive=True))
    closed_with(other, 405, channel=1)


def test_inequivalent_redeclare_is_406(connect: Connect) -> None:
    client = connect()
    declare(client, "q", durable=True)
    client.method(1, Queue.Declare(queue="q", durable=False))
    closed_with(client, 406, channel=1)


def test_passive_declare_of_missing_queue_is_404(connect: Connect) -> None:
    client = connect()
    client.method(1, Queue.Declare(queue="none", passive=True))
    closed_with(client, 404, channel=1)


def test_exchange_methods(connect: Connect, context: ServerContext) -> None:
    client = connect()
    client.method(1, Exchange.Declare(exchange="src", exchange_type="topic", durable=False))
    client.method(1, Exchange.Declare(exchange="dst", exchange_type="fanout", durable=False))
    client.method(1, Exchange.Bind(destination="dst", source="src", routing_key="a.*"))
    client.method(1, Exchange.Declare(exchange="src", passive=True))
    client.expect(Exchange.DeclareOk, Exchange.DeclareOk, Exchange.BindOk, Exchange.DeclareOk)
    declare(client, "fan")
    client.method(1, Queue.Bind(queue="fan", exchange="dst", routing_key=""))
    client.expect(Queue.BindOk)
    client.send(client.publish(1, b"routed", "a.b", exchange="src"))
    assert context.broker.vhost("/").queues["fan"].message_count == 1
    client.method(1, Exchange.Delete(exchange="dst", if_unused=True))
    closed_with(client, 406, channel=1)
    client.method(1, Channel.CloseOk())
    client.open_channel(1)
    client.method(1, Exchange.Unbind(destination="dst", source="src", routing_key="a.*"))
    client.method(1, Queue.Unbind(queue="fan", exchange="dst", routing_key=""))
    client.method(1, Exchange.Delete(exchange="dst", if_unused=True))
    client.expect(Exchange.UnbindOk, Queue.UnbindOk, Exchange.DeleteOk)


def test_queue_methods_and_last_declared_queue(connect: Connect) -> None:
    client = connect()
    ok = declare(client, "")
    assert ok.queue.startswith("amq.gen-")
    client.method(1, Queue.Bind(queue="", exchange="amq.direct", routing_key=""))  # both default to it
    client.expect(Queue.BindOk)
    client.send(client.publish(1, b"1", ok.queue, exchange="amq.direct"))
    client.send(client.publish(1, b"2", ok.queue))
    ok2 = declare(client, ok.queue, passive=True)
    assert ok2.message_count == 2
    client.method(1, Queue.Purge(queue=""))
    (purged,) = client.expect(Queue.PurgeOk)
    assert purged.message_count == 2
    client.send(client.publish(1, b"3", ok.queue))
    client.method(1, Queue.Delete(queue=ok.queue, if_empty=True))
    closed_with(client, 406, channel=1)
    client.method(1, Channel.CloseOk())
    client.open_channel(1)
    client.method(1, Queue.Delete(queue=ok.queue))
    (deleted,) = client.expect(Queue.DeleteOk)
    assert deleted.message_count == 1


def test_empty_queue_name_without_a_declared_queue_is_404(connect: Connect) -> None:
    client = connect()
    client.method(1, Queue.Purge(queue=""))
    closed_with(client, 404, channel=1)


# --- publishing and confirms ------------------------------------------------------------------------------


def test_confirms_of_one_chunk_are_one_ack_multiple(connect: Connect) -> None:
    client = connect()
    declare(client, "q")
    client.method(1, Confirm.Select())
    client.expect(Confirm.SelectOk)
    client.send(*(client.publish(1, b"%d" % i) for i in range(50)))
    (ack,) = client.expect(Basic.Ack)
    assert (ack.delivery_tag, ack.multiple) == (50, True)
    client.send(client.publish(1))
    (ack,) = client.expect(Basic.Ack)
    assert (ack.delivery_tag, ack.multiple) == (51, False)


def test_persistent_to_durable_queue_is_confirmed_only_when_durable(
    connect: Connect, durability: Durability, context: ServerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = connect()
    registered: list[Callable[[], None]] = []
    when_durable = context.broker.when_durable

    def spy(callback: Callable[[], None]) -> None:
        registered.append(callback)
        when_durable(callback)

    monkeypatch.setattr(context.broker, "when_durable", spy)
    declare(client, "dq", durable=True)
    client.method(1, Confirm.Select())
    client.expect(Confirm.SelectOk)
    durability.hold = True
    persistent = Properties(delivery_mode=2)
    client.send(*(client.publish(1, b"p", "dq", props=persistent) for _ in range(10)))
    client.send(client.publish(1, b"transient", "dq"))  # after a durable wait: waits its turn
    assert client.methods() == []
    assert len(registered) == 2  # one callback per chunk, not per message
    durability.release()
    acks = client.expect(Basic.Ack, Basic.Ack)
    assert [(a.delivery_tag, a.multiple) for a in acks] == [(10, True), (11, False)]


def test_reject_publish_overflow_is_nacked_in_order(connect: Connect) -> None:
    client = connect()
    declare(client, "small", arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    client.method(1, Confirm.Select())
    client.expect(Confirm.SelectOk)
    client.send(*(client.publish(1, b"%d" % i, "small") for i in range(3)))
    frames = client.methods()
    assert [(type(f).__name__, f.delivery_tag, f.multiple) for f in frames] == [
        ("Ack", 1, False),
        ("Nack", 2, False),
        ("Nack", 3, False),
    ]


def test_mandatory_unroutable_is_returned_before_its_confirm(connect: Connect) -> None:
    client = connect()
    client.method(1, Confirm.Select())
    client.expect(Confirm.SelectOk)
    client.send(client.publish(1, b"lost", "nobody", mandatory=True, props=Properties(message_id="m1")))
    frames = [f for _, f in client.received()]
    ret, props, body = frames[0]
    assert isinstance(ret, Basic.Return)
    assert (ret.reply_code, ret.reply_text, ret.routing_key) == (312, "NO_ROUTE", "nobody")
    assert (props.message_id, body) == ("m1", b"lost")
    assert isinstance(frames[1], Basic.Ack)


def test_user_id_must_be_the_authenticated_user(connect: Connect) -> None:
    client = connect()
    declare(client, "q")
    client.send(client.publish(1, props=Properties(user_id="guest")))
    assert client.methods() == []
    client.send(client.publish(1, props=Properties(user_id="mallory")))
    closed_with(client, 406, channel=1)


def test_large_body_is_split_into_frame_max_frames(connect: Connect) -> None:
    client = connect()
    declare(client, "big")
    body = bytes(range(256)) * 2000  # 512000 octets: several body frames each way
    client.send(client.publish(1, body, "big"))
    consume(client, "big", no_ack=True)
    (delivery,) = client.pending
    assert delivery[2] == body


def test_what_amqp_cannot_carry_is_left_out(connect: Connect, context: ServerContext) -> None:
    """A message from another protocol with a routing key past 255 octets and a header value
    without a field-table type is still delivered (and got), without those."""
    client = connect()
    client.method(1, Exchange.Declare(exchange="wide", exchange_type="fanout", durable=False))
    client.expect(Exchange.DeclareOk)
    declare(client, "wide-q")
    client.method(1, Queue.Bind(queue="wide-q", exchange="wide", routing_key=""))
    client.expect(Queue.BindOk)
    long_key = "level." * 60
    vhost = context.broker.vhost("/")
    for body in (b"deliver", b"get"):
        props = Properties(content_type="text/plain", headers={"odd": object()})
        vhost.publish(Message("wide", long_key, body, props))
    client.method(1, Basic.Get(queue="wide-q", no_ack=True))
    ((_, (ok, props, body)),) = client.received()
    assert (ok.routing_key, ok.exchange, body) == ("", "wide", b"deliver")
    assert (props.content_type, props.headers) == ("text/plain", None)
    consume(client, "wide-q", no_ack=True)
    ((deliver, props, body),) = client.pending
    assert (deliver.routing_key, body, props.content_type) == ("", b"get", "text/plain")


# --- consuming ----------------------------------------------------------------------------------------


def test_consume_ok_comes_before_deliveries_and_prefetch_is_honoured(connect: Connect) -> None:
    client = connect()
    declare(client, "q")
    client.send(*(client.publish(1, b"%d" % i) for i in range(10)))
    tag = consume(client, "q", prefetch=3)
    pending = client.pending
    assert [d[2] for d in pending] == [b"0", b"1", b"2"]
    assert [d[0].delivery_tag for d in pending] == [1, 2, 3]
    assert all(d[0].consumer_tag == tag for d in pending)
    client.send(encode_basic_ack(1, 2, multiple=True))
    assert [d[2] for d in deliveries(client)] == [b"3", b"4"]
    client.send(encode_basic_ack(1, 3))
    assert [d[2] for d in deliveries(client)] == [b"5"]


def test_ack_of_unknown_tag_is_406(connect: Connect) -> None:
    client = connect()
    client.send(encode_basic_ack(1, 42))
    assert "unknown delivery tag 42" in closed_with(client, 406, channel=1).reply_text


def test_ack_multiple_zero_acks_everything(connect: Connect, context: ServerContext) -> None:
    client = connect()
    declare(client, "q")
    client.send(*(client.publish(1, b"%d" % i) for i in range(5)))
    consume(client, "q")
    client.send(encode_basic_ack(1, 0, multiple=True))
    assert context.broker.vhost("/").queues["q"].unacked_count == 0


def test_global_qos_limits_the_channel(connect: Connect) -> None:
    client = connect()
    declare(client, "a")
    declare(client, "b")
    client.send(*(client.publish(1, b"a%d" % i, "a") for i in range(5)))
    client.send(*(client.publish(1, b"b%d" % i, "b") for i in range(5)))
    client.method(1, Basic.Qos(prefetch_count=3, global_=True))
    client.expect(Basic.QosOk)
    consume(client, "a")
    first = len(client.pending)
    consume(client, "b")
    assert first + len(client.pending) == 3


def test_get_get_empty_and_redelivery_after_channel_close(connect: Connect) -> None:
    client = connect()
    declare(client, "q")
    client.method(1, Basic.Get(queue="q"))
    client.expect(Basic.GetEmpty)
    client.send(client.publish(1, b"one"), client.publish(1, b"two"))
    client.method(1, Basic.Get(queue="q"))
    ((_, (ok, _, body)),) = client.received()
    assert isinstance(ok, Basic.GetOk)
    assert (ok.delivery_tag, ok.message_count, ok.redelivered, body) == (1, 1, False, b"one")
    client.method(1, Channel.Close(reply_code=200, reply_text="", class_id=0, method_id=0))
    client.expect(Channel.CloseOk)
    client.open_channel(1)
    client.method(1, Basic.Get(queue="q", no_ack=True))
    ((_, (ok, _, body)),) = client.received()
    assert (ok.redelivered, body) == (True, b"one")


def test_nack_requeue_multiple_keeps_order(connect: Connect) -> None:
    client = connect()
    declare(client, "q")
    client.send(*(client.publish(1, b"%d" % i) for i in range(3)))
    consume(client, "q", prefetch=3)
    client.method(1, Basic.Nack(delivery_tag=3, multiple=True, requeue=True))
    # The consumer has credit again, so the requeued messages come back to it, in order.
    redelivered = deliveries(client)
    assert [(d[2], d[0].redelivered, d[0].delivery_tag) for d in redelivered] == [
        (b"0", True, 4),
        (b"1", True, 5),
        (b"2", True, 6),
    ]


def test_reject_without_requeue_dead_letters_with_x_death(connect: Connect, context: ServerContext) -> None:
    client = connect()
    client.method(1, Exchange.Declare(exchange="dlx", exchange_type="fanout", durable=False))
    client.expect(Exchange.DeclareOk)
    declare(client, "dead")
    client.method(1, Queue.Bind(queue="dead", exchange="dlx", routing_key=""))
    client.expect(Queue.BindOk)
    declare(client, "work", arguments={"x-dead-letter-exchange": "dlx"})
    client.send(client.publish(1, b"bad", "work"))
    client.method(1, Basic.Get(queue="work"))
    client.received()
    client.method(1, Basic.Reject(delivery_tag=1, requeue=False))
    client.method(1, Basic.Get(queue="dead", no_ack=True))
    ((_, (_, props, body)),) = client.received()
    assert body == b"bad"
    (death,) = props.headers["x-death"]
    assert (death["reason"], death["queue"], death["count"]) == ("rejected", "work", 1)


def test_recover_requeues_unacked(connect: Connect) -> None:
    client = connect()
    declare(client, "q")
    client.send(client.publish(1, b"r"))
    consume(client, "q")
    client.method(1, Basic.Recover(requeue=True))
    frames = [f for _, f in client.received()]
    assert isinstance(frames[0], Basic.RecoverOk) or isinstance(frames[-1], Basic.RecoverOk)
    (redelivery,) = [f for f in frames if isinstance(f, tuple)]
    assert (redelivery[0].redelivered, redelivery[0].delivery_tag) == (True, 2)
    client.method(1, Basic.Recover(requeue=False))
    closed_with(client, 540)


def test_consumer_tag_reuse_is_530(connect: Connect) -> None:
    client = connect()
    declare(client, "q")
    consume(client, "q", consumer_tag="t")
    client.method(1, Basic.Consume(queue="q", consumer_tag="t"))
    closed_with(client, 530)


def test_exclusive_consumer_refuses_others_with_403(connect: Connect) -> None:
    client = connect()
    declare(client, "q")
    consume(client, "q", exclusive=True)
    client.method(1, Basic.Consume(queue="q"))
    closed_with(client, 403, channel=1)


def test_broker_cancels_consumers_of_a_deleted_queue(connect: Connect) -> None:
    consumer = connect()
    declare(consumer, "doomed")
    tag = consume(consumer, "doomed")
    admin = connect()
    admin.method(1, Queue.Delete(queue="doomed"))
    admin.expect(Queue.DeleteOk)
    (cancel,) = consumer.expect(Basic.Cancel)
    assert cancel.consumer_tag == tag


def test_client_cancel_stops_deliveries(connect: Connect) -> None:
    client = connect()
    declare(client, "q")
    tag = consume(client, "q", no_ack=True)
    client.method(1, Basic.Cancel(consumer_tag=tag))
    (ok,) = client.expect(Basic.CancelOk)
    assert ok.consumer_tag == tag
    client.send(client.publish(1))
    assert client.methods() == []


def test_connection_loss_requeues_and_deletes_exclusive_queues(
    connect: Connect, context: ServerContext
) -> None:
    first = connect()
    declare(first, "shared")
    declare(first, "private", exclusive=True)
    first.send(first.publish(1, b"held", "shared"))
    consume(first, "shared")
    first.session.connection_lost(None)
    vhost = context.broker.vhost("/")
    assert "private" not in vhost.queues
    second = connect()
    second.method(1, Basic.Get(queue="shared", no_ack=True))
    ((_, (ok, _, body)),) = second.received()
    assert (ok.redelivered, body) == (True, b"held")


def test_channel_flow_pauses_deliveries(connect: Connect) -> None:
    client = connect()
    declare(client, "q")
    consume(client, "q", no_ack=True)
    client.method(1, Channel.Flow(active=False))
    client.expect(Channel.FlowOk)
    client.send(client.publish(1, b"held back"))
    assert deliveries(client) == []
    client.method(1, Channel.Flow(active=True))
    frames = [f for _, f in client.received()]
    assert isinstance(frames[0], Channel.FlowOk) or isinstance(frames[-1], Channel.FlowOk)
    assert [f[2] for f in frames if isinstance(f, tuple)] == [b"held back"]


def test_write_backpressure_pauses_consumers(connect: Connect) -> None:
    client = connect()
    declare(client, "q")
    consume(client, "q", no_ack=True)
    client.session.writing_paused()
    client.send(client.publish(1, b"wait"))
    assert deliveries(client) == []
    client.session.writing_resumed()
    assert [d[2] for d in deliveries(client)] == [b"wait"]


def test_single_active_consumer(connect: Connect) -> None:
    client = connect()
    declare(client, "sac", arguments={"x-single-active-consumer": True})
    first = consume(client, "sac", no_ack=True)
    consume(client, "sac", no_ack=True)
    client.send(*(client.publish(1, b"%d" % i, "sac") for i in range(3)))
    assert {d[0].consumer_tag for d in deliveries(client)} == {first}


def test_priority_queue_delivers_highest_first(connect: Connect) -> None:
    client = connect()
    declare(client, "prio", arguments={"x-max-priority": 5})
    for priority in (1, 5, 3):
        client.send(client.publish(1, b"p%d" % priority, "prio", props=Properties(priority=priority)))
    consume(client, "prio", no_ack=True)
    assert [d[2] for d in client.pending] == [b"p5", b"p3", b"p1"]


# --- transactions ------------------------------------------------------------------------------------------


def test_tx_commit_and_rollback(connect: Connect, context: ServerContext) -> None:
    client = connect()
    declare(client, "q")
    queue = context.broker.vhost("/").queues["q"]
    client.method(1, Tx.Select())
    client.expect(Tx.SelectOk)
    client.send(client.publish(1, b"a"))
    assert queue.message_count == 0
    client.method(1, Tx.Commit())
    client.expect(Tx.CommitOk)
    assert queue.message_count == 1
    client.send(client.publish(1, b"b"))
    client.method(1, Tx.Rollback())
    client.expect(Tx.RollbackOk)
    client.method(1, Tx.Commit())
    client.expect(Tx.CommitOk)
    assert queue.message_count == 1
    client.method(1, Basic.Get(queue="q"))
    client.received()
    client.send(encode_basic_ack(1, 1))
    client.method(1, Tx.Rollback())
    client.expect(Tx.RollbackOk)
    assert queue.unacked_count == 1
    client.send(encode_basic_ack(1, 1))  # the tag is outstanding again after the rollback
    client.method(1, Tx.Commit())
    client.expect(Tx.CommitOk)
    assert queue.unacked_count == 0


def test_tx_commit_waits_for_durability(connect: Connect, durability: Durability) -> None:
    client = connect()
    declare(client, "dq", durable=True)
    client.method(1, Tx.Select())
    client.expect(Tx.SelectOk)
    durability.hold = True
    client.send(client.publish(1, b"p", "dq", props=Properties(delivery_mode=2)))
    client.method(1, Tx.Commit())
    assert client.methods() == []
    durability.release()
    client.expect(Tx.CommitOk)


def test_tx_and_confirm_do_not_mix(connect: Connect) -> None:
    client = connect()
    client.method(1, Tx.Select())
    client.expect(Tx.SelectOk)
    client.method(1, Confirm.Select())
    closed_with(client, 406, channel=1)


def test_commit_outside_a_transaction_is_406(connect: Connect) -> None:
    client = connect()
    client.method(1, Tx.Commit())
    closed_with(client, 406, channel=1)


# --- direct reply-to --------------------------------------------------------------------------------------


def test_direct_reply_to_round_trip(connect: Connect) -> None:
    requester = connect()
    responder = connect()
    declare(responder, "rpc")
    consume(responder, "rpc", no_ack=True)
    consume(requester, "amq.rabbitmq.reply-to", no_ack=True)
    requester.send(requester.publish(1, b"ping", "rpc", props=Properties(reply_to="amq.rabbitmq.reply-to")))
    ((_, props, body),) = deliveries(responder)
    assert body == b"ping"
    assert props.reply_to.startswith("amq.rabbitmq.reply-to.")
    responder.send(responder.publish(1, b"pong", props.reply_to))
    ((_, _, answer),) = deliveries(requester)
    assert answer == b"pong"


def test_direct_reply_to_needs_no_ack_and_a_consumer(connect: Connect) -> None:
    client = connect()
    client.method(1, Basic.Consume(queue="amq.rabbitmq.reply-to"))
    closed_with(client, 406, channel=1)
    client.method(1, Channel.CloseOk())
    client.open_channel(1)
    client.send(client.publish(1, props=Properties(reply_to="amq.rabbitmq.reply-to")))
    assert "fast reply consumer" in closed_with(client, 406, channel=1).reply_text
