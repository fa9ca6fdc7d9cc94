"""AMQP 0-9-1 end to end with pika (blocking and asyncio adapters), aio-pika and kombu, over TCP and TLS.

Each test talks to a real `polybroker serve` process (tests/e2e/broker_process.py) and asserts what a
RabbitMQ user relies on: every method, confirms under load, mandatory returns, prefetch, redelivery,
dead-lettering, TTL, overflow, priorities, single active consumer, exclusive queues, transactions,
direct reply-to, and the reply codes of channel errors. Raw-frame error cases and heartbeats are in
test_amqp_errors.py. Waiting is always on a condition with a timeout, never a bare sleep.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import aio_pika
import kombu
import pika
import pika.exceptions
import pytest
from pika.adapters.asyncio_connection import AsyncioConnection

from tests.certs import CertificateSet, make_certificates
from tests.e2e.broker_process import BrokerProcess

TRANSPORTS = ["tcp", "tls"]


# -- fixtures and helpers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertificateSet:
    return make_certificates(tmp_path_factory.mktemp("amqp-certs"))


@pytest.fixture(scope="module")
def amqp_broker(tmp_path_factory: pytest.TempPathFactory, certs: CertificateSet) -> Iterator[BrokerProcess]:
    """One broker with the AMQP listeners (TCP and TLS), shared by this module's tests."""
    tls = {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key)}
    proc = BrokerProcess(tmp_path_factory.mktemp("amqp-broker") / "data", tls=tls)
    proc.start(wait=("amqp", "amqp_tls"))
    yield proc
    proc.kill()
    assert "Traceback" not in proc.log(), proc.log()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def params(
    broker: BrokerProcess, certs: CertificateSet, transport: str = "tcp", **kwargs: Any
) -> pika.ConnectionParameters:
    if transport == "tls":
        context = certs.client_context(with_client_cert=False)
        return pika.ConnectionParameters(
            "127.0.0.1", broker.ports["amqp_tls"], ssl_options=pika.SSLOptions(context, "localhost"), **kwargs
        )
    return pika.ConnectionParameters("127.0.0.1", broker.ports["amqp"], **kwargs)


@pytest.fixture
def connect(
    amqp_broker: BrokerProcess, certs: CertificateSet
) -> Iterator[Callable[..., pika.BlockingConnection]]:
    """pika BlockingConnections to the broker, closed after the test."""
    made: list[pika.BlockingConnection] = []

    def make(transport: str = "tcp", **kwargs: Any) -> pika.BlockingConnection:
        connection = pika.BlockingConnection(params(amqp_broker, certs, transport, **kwargs))
        made.append(connection)
        return connection

    yield make
    for connection in made:
        if connection.is_open:
            connection.close()


Connect = Callable[..., pika.BlockingConnection]


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)  # polling interval of a wait-with-timeout


def drain(channel: Any, queue: str, expected: int, timeout: float = 10.0) -> list[tuple[Any, Any, bytes]]:
    """basic.get (no-ack) until `expected` messages came, within `timeout`."""
    got: list[tuple[Any, Any, bytes]] = []

    def more() -> bool:
        method, props, body = channel.basic_get(queue, auto_ack=True)
        if method is not None:
            got.append((method, props, body))
        return len(got) >= expected

    wait_for(more, timeout, f"{expected} messages on {queue}")
    return got


def message_count(connection: pika.BlockingConnection, queue: str) -> int:
    channel = connection.channel()
    count = channel.queue_declare(queue, passive=True).method.message_count
    channel.close()
    return int(count)


# -- basic flows over TCP and TLS ----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_publish_and_consume_with_properties(connect: Connect, transport: str) -> None:
    connection = connect(transport)
    channel = connection.channel()
    queue = channel.queue_declare(unique("props"), auto_delete=True).method.queue
    props = pika.BasicProperties(
        content_type="application/json",
        content_encoding="utf-8",
        headers={"n": 1, "s": "text", "nested": {"a": [1, "b"]}},
        delivery_mode=2,
        priority=3,
        correlation_id="c-1",
        reply_to="back",
        expiration="60000",
        message_id="m-1",
        timestamp=1_700_000_000,
        type="kind",
        user_id="guest",
        app_id="tests",
    )
    channel.basic_publish("", queue, b'{"x": 1}', props)
    received: list[tuple[Any, Any, bytes]] = []

    def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
        received.append((method, properties, body))
        ch.basic_ack(method.delivery_tag)
        ch.stop_consuming()

    channel.basic_consume(queue, on_message)
    channel.start_consuming()
    ((method, got, body),) = received
    assert body == b'{"x": 1}'
    assert method.routing_key == queue and method.exchange == "" and not method.redelivered
    for name in (
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
    ):
        assert getattr(got, name) == getattr(props, name), name


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_confirms_under_load_persistent(connect: Connect, transport: str) -> None:
    connection = connect(transport)
    channel = connection.channel()
    queue = unique("load")
    channel.queue_declare(queue, durable=True)
    channel.confirm_delivery()
    persistent = pika.BasicProperties(delivery_mode=2)
    for i in range(2000):
        channel.basic_publish("", queue, b"%d" % i, persistent)  # raises unless acked
    assert message_count(connection, queue) == 2000
    channel.queue_delete(queue)


def test_large_message_spans_frames(connect: Connect) -> None:
    channel = connect().channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    body = bytes(range(256)) * 4096  # 1 MiB: many frame_max-sized body frames
    channel.basic_publish("", queue, body)
    ((_, _, got),) = drain(channel, queue, 1)
    assert got == body


def test_mandatory_unroutable_is_returned(connect: Connect) -> None:
    channel = connect().channel()
    channel.confirm_delivery()
    with pytest.raises(pika.exceptions.UnroutableError) as info:
        channel.basic_publish("", unique("nobody"), b"lost", mandatory=True)
    (returned,) = info.value.messages
    assert returned.method.reply_code == 312 and returned.body == b"lost"
    channel.basic_publish("", unique("nobody"), b"dropped quietly")  # not mandatory: acked, no return


def test_prefetch_is_honoured(connect: Connect) -> None:
    connection = connect()
    channel = connection.channel()
    queue = channel.queue_declare(unique("prefetch"), auto_delete=True).method.queue
    for i in range(20):
        channel.basic_publish("", queue, b"%d" % i)
    consumer_channel = connection.channel()
    consumer_channel.basic_qos(prefetch_count=5)
    held: list[int] = []
    consumer_channel.basic_consume(queue, lambda ch, m, p, b: held.append(m.delivery_tag))
    connection.process_data_events(time_limit=0.5)
    assert len(held) == 5
    consumer_channel.basic_ack(held[-1], multiple=True)
    wait_for(lambda: connection.process_data_events(time_limit=0.05) or len(held) == 10, what="5 more")
    connection.process_data_events(time_limit=0.3)
    assert len(held) == 10


def test_redelivery_after_consumer_connection_drops(
    connect: Connect, amqp_broker: BrokerProcess, certs: CertificateSet
) -> None:
    channel = connect().channel()
    queue = unique("redeliver")
    channel.queue_declare(queue)
    channel.basic_publish("", queue, b"work")
    doomed = pika.BlockingConnection(params(amqp_broker, certs))  # not closed by the fixture
    doomed_channel = doomed.channel()
    got: list[Any] = []
    doomed_channel.basic_consume(queue, lambda ch, m, p, b: got.append(m))
    wait_for(lambda: doomed.process_data_events(time_limit=0.05) or got, what="first delivery")
    assert not got[0].redelivered
    doomed._impl._transport._sock.close()  # the connection drops without a close handshake
    ((method, _, body),) = drain(channel, queue, 1)
    assert method.redelivered and body == b"work"
    channel.queue_delete(queue)


# -- queue features ------------------------------------------------------------------------------------------


def test_dead_lettering_with_x_death(connect: Connect) -> None:
    channel = connect().channel()
    dlx, dead, work = unique("dlx"), unique("dead"), unique("work")
    channel.exchange_declare(dlx, "direct", auto_delete=True)
    channel.queue_declare(dead, auto_delete=True)
    channel.queue_bind(dead, dlx, "failed")
    channel.queue_declare(
        work,
        auto_delete=True,
        arguments={"x-dead-letter-exchange": dlx, "x-dead-letter-routing-key": "failed"},
    )
    channel.basic_publish("", work, b"poison")
    method, _, _ = channel.basic_get(work)
    channel.basic_reject(method.delivery_tag, requeue=False)
    ((_, props, body),) = drain(channel, dead, 1)
    assert body == b"poison"
    death = props.headers["x-death"][0]
    assert death["reason"] == "rejected" and death["queue"] == work and death["count"] == 1
    assert death["exchange"] == "" and death["routing-keys"] == [work]
    assert props.headers["x-first-death-reason"] == "rejected"


def test_message_ttl_expires_to_the_dead_letter_exchange(connect: Connect) -> None:
    channel = connect().channel()
    dead, work = unique("expired"), unique("ttl")
    channel.queue_declare(dead, auto_delete=True)
    channel.queue_declare(
        work,
        arguments={"x-message-ttl": 100, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": dead},
    )
    channel.basic_publish("", work, b"queue ttl")
    channel.basic_publish("", work, b"message ttl", pika.BasicProperties(expiration="50"))
    got = drain(channel, dead, 2)
    assert sorted(body for _, _, body in got) == [b"message ttl", b"queue ttl"]
    assert all(props.headers["x-death"][0]["reason"] == "expired" for _, props, _ in got)
    channel.queue_delete(work)


def test_queue_expires_when_unused(connect: Connect) -> None:
    channel = connect().channel()
    queue = unique("expires")
    channel.queue_declare(queue, arguments={"x-expires": 200})
    channel.confirm_delivery()

    def gone() -> bool:
        # A mandatory publish does not count as use (a redeclare or basic.get would renew the lease).
        try:
            channel.basic_publish("", queue, b"probe", mandatory=True)
        except pika.exceptions.UnroutableError:
            return True
        return False

    wait_for(gone, what="x-expires")


def test_max_length_drop_head_and_reject_publish(connect: Connect) -> None:
    connection = connect()
    channel = connection.channel()
    head = unique("drop-head")
    channel.queue_declare(head, auto_delete=True, arguments={"x-max-length": 2})
    for i in range(5):
        channel.basic_publish("", head, b"%d" % i)
    assert [body for _, _, body in drain(channel, head, 2)] == [b"3", b"4"]
    refuse = unique("reject")
    channel.queue_declare(
        refuse, auto_delete=True, arguments={"x-max-length-bytes": 10, "x-overflow": "reject-publish"}
    )
    channel.confirm_delivery()
    channel.basic_publish("", refuse, b"0123456789")
    with pytest.raises(pika.exceptions.NackError):
        channel.basic_publish("", refuse, b"one too many")
    assert message_count(connection, refuse) == 1
    channel.queue_delete(head)
    channel.queue_delete(refuse)


def test_delivery_limit_drops_a_poison_message(connect: Connect) -> None:
    channel = connect().channel()
    dead, queue = unique("limit-dead"), unique("limit")
    channel.queue_declare(dead, auto_delete=True)
    channel.queue_declare(
        queue,
        arguments={"x-delivery-limit": 1, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": dead},
    )
    channel.basic_publish("", queue, b"poison")
    for _ in range(2):
        method, _, _ = channel.basic_get(queue)
        channel.basic_nack(method.delivery_tag, requeue=True)
    assert channel.basic_get(queue)[0] is None
    ((_, props, body),) = drain(channel, dead, 1)
    assert body == b"poison" and props.headers["x-death"][0]["reason"] == "delivery_limit"
    channel.queue_delete(queue)


def test_priorities(connect: Connect) -> None:
    channel = connect().channel()
    queue = channel.queue_declare(
        unique("prio"), auto_delete=True, arguments={"x-max-priority": 9}
    ).method.queue
    for priority in (1, 9, 5, 0, 7):
        channel.basic_publish("", queue, b"%d" % priority, pika.BasicProperties(priority=priority))
    assert [body for _, _, body in drain(channel, queue, 5)] == [b"9", b"7", b"5", b"1", b"0"]


def test_single_active_consumer(connect: Connect) -> None:
    connection = connect()
    channel = connection.channel()
    queue = channel.queue_declare(unique("sac"), arguments={"x-single-active-consumer": True}).method.queue
    first: list[bytes] = []
    second: list[bytes] = []
    tag = channel.basic_consume(queue, lambda ch, m, p, b: first.append(b), auto_ack=True)
    channel.basic_consume(queue, lambda ch, m, p, b: second.append(b), auto_ack=True)
    for i in range(6):
        channel.basic_publish("", queue, b"%d" % i)
    wait_for(
        lambda: connection.process_data_events(time_limit=0.05) or len(first) == 6, what="6 to the first"
    )
    assert second == []
    channel.basic_cancel(tag)
    channel.basic_publish("", queue, b"after")
    wait_for(lambda: connection.process_data_events(time_limit=0.05) or second == [b"after"], what="failover")
    channel.queue_delete(queue)


def test_exclusive_queue_vanishes_with_its_connection(connect: Connect) -> None:
    owner = connect()
    queue = owner.channel().queue_declare("", exclusive=True).method.queue
    other = connect()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        other.channel().queue_declare(queue, passive=True)
    assert info.value.reply_code == 405
    owner.close()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        other.channel().queue_declare(queue, passive=True)
    assert info.value.reply_code == 404


def test_exchange_to_exchange_alternate_and_headers(connect: Connect) -> None:
    channel = connect().channel()
    source, dest, alt, headers = unique("src"), unique("dst"), unique("alt"), unique("hdr")
    channel.exchange_declare(alt, "fanout", auto_delete=False)
    channel.exchange_declare(source, "topic", arguments={"alternate-exchange": alt})
    channel.exchange_declare(dest, "direct")
    channel.exchange_declare(headers, "headers")
    channel.exchange_bind(dest, source, "orders.*")
    routed, unrouted, matched = unique("routed"), unique("unrouted"), unique("matched")
    for queue in (routed, unrouted, matched):
        channel.queue_declare(queue, auto_delete=True)
    channel.queue_bind(routed, dest, "orders.new")
    channel.queue_bind(unrouted, alt)
    channel.queue_bind(matched, headers, arguments={"x-match": "all", "kind": "a", "v": 1})
    channel.basic_publish(source, "orders.new", b"to dest")
    channel.basic_publish(source, "invoices.new", b"to alternate")
    channel.basic_publish(headers, "", b"match", pika.BasicProperties(headers={"kind": "a", "v": 1}))
    channel.basic_publish(headers, "", b"no match", pika.BasicProperties(headers={"kind": "a"}))
    assert [b for _, _, b in drain(channel, routed, 1)] == [b"to dest"]
    assert [b for _, _, b in drain(channel, unrouted, 1)] == [b"to alternate"]
    assert [b for _, _, b in drain(channel, matched, 1)] == [b"match"]
    channel.exchange_unbind(dest, source, "orders.*")
    channel.queue_unbind(routed, dest, "orders.new")
    channel.exchange_declare(source, passive=True)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        channel.exchange_delete(alt, if_unused=True)
    assert info.value.reply_code == 406
    channel = connect().channel()
    for exchange in (source, dest, headers):
        channel.exchange_delete(exchange)
    channel.queue_unbind(unrouted, alt)
    channel.exchange_delete(alt, if_unused=True)


def test_internal_exchange_refuses_publishes_with_403(connect: Connect) -> None:
    channel = connect().channel()
    internal = unique("internal")
    channel.exchange_declare(internal, "fanout", internal=True, auto_delete=True)
    channel.basic_publish(internal, "", b"x")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        channel.queue_declare("", exclusive=True)  # the next round trip sees the channel closed
    assert info.value.reply_code == 403


def test_queue_purge_delete_if_unused_if_empty(connect: Connect) -> None:
    connection = connect()
    channel = connection.channel()
    queue = unique("purge")
    channel.queue_declare(queue)
    for _ in range(3):
        channel.basic_publish("", queue, b"x")
    assert channel.queue_purge(queue).method.message_count == 3
    channel.basic_publish("", queue, b"x")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        channel.queue_delete(queue, if_empty=True)
    assert info.value.reply_code == 406
    channel = connection.channel()
    tag = channel.basic_consume(queue, lambda *a: None)
    other = connection.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        other.queue_delete(queue, if_unused=True)
    assert info.value.reply_code == 406
    channel.basic_cancel(tag)
    assert connection.channel().queue_delete(queue).method.message_count == 1


def test_get_nack_reject_recover(connect: Connect) -> None:
    connection = connect()
    channel = connection.channel()
    queue = channel.queue_declare(unique("settle"), auto_delete=False).method.queue
    assert channel.basic_get(queue) == (None, None, None)
    for body in (b"a", b"b", b"c"):
        channel.basic_publish("", queue, body)
    tags = [channel.basic_get(queue)[0].delivery_tag for _ in range(3)]
    channel.basic_reject(tags[2], requeue=True)  # requeued messages go back to the head
    channel.basic_nack(tags[1], multiple=True, requeue=True)  # a and b, in their order
    got = drain(channel, queue, 3)
    assert [(b, m.redelivered) for m, _, b in got] == [(b"a", True), (b"b", True), (b"c", True)]
    channel.basic_publish("", queue, b"d")
    held: list[Any] = []
    channel.basic_consume(queue, lambda ch, m, p, b: held.append(m))
    wait_for(lambda: connection.process_data_events(time_limit=0.05) or held, what="delivery")
    channel.basic_recover(requeue=True)
    wait_for(lambda: connection.process_data_events(time_limit=0.05) or len(held) == 2, what="redelivery")
    assert held[1].redelivered
    channel.basic_ack(held[1].delivery_tag)
    channel.queue_delete(queue)


def test_consumer_cancel_notify_when_the_queue_is_deleted(connect: Connect) -> None:
    connection = connect()
    channel = connection.channel()
    queue = channel.queue_declare(unique("cancelled")).method.queue
    cancelled: list[Any] = []
    channel.add_on_cancel_callback(lambda frame: cancelled.append(frame.method.consumer_tag))
    tag = channel.basic_consume(queue, lambda *a: None)
    connection.channel().queue_delete(queue)
    wait_for(lambda: connection.process_data_events(time_limit=0.05) or cancelled, what="basic.cancel")
    assert cancelled == [tag]


def test_transactions(connect: Connect) -> None:
    connection = connect()
    channel = connection.channel()
    queue = unique("tx")
    channel.queue_declare(queue, durable=True)
    channel.tx_select()
    channel.basic_publish("", queue, b"1", pika.BasicProperties(delivery_mode=2))
    assert message_count(connection, queue) == 0
    channel.tx_commit()
    assert message_count(connection, queue) == 1
    channel.basic_publish("", queue, b"2")
    channel.tx_rollback()
    channel.tx_commit()
    assert message_count(connection, queue) == 1
    method, _, _ = channel.basic_get(queue)
    channel.basic_ack(method.delivery_tag)
    channel.tx_rollback()  # the ack is undone: the message is outstanding again
    channel.basic_ack(method.delivery_tag)
    channel.tx_commit()
    channel.queue_delete(queue)


def test_direct_reply_to_rpc(connect: Connect) -> None:
    server = connect()
    server_channel = server.channel()
    rpc = server_channel.queue_declare(unique("rpc"), auto_delete=True).method.queue

    def serve(ch: Any, method: Any, props: Any, body: bytes) -> None:
        ch.basic_publish(
            "", props.reply_to, body.upper(), pika.BasicProperties(correlation_id=props.correlation_id)
        )
        ch.basic_ack(method.delivery_tag)

    server_channel.basic_consume(rpc, serve)
    client = connect()
    client_channel = client.channel()
    answers: list[tuple[str, bytes]] = []
    client_channel.basic_consume(
        "amq.rabbitmq.reply-to", lambda ch, m, p, b: answers.append((p.correlation_id, b)), auto_ack=True
    )
    client_channel.basic_publish(
        "", rpc, b"ping", pika.BasicProperties(reply_to="amq.rabbitmq.reply-to", correlation_id="42")
    )

    def answered() -> bool:
        server.process_data_events(time_limit=0.02)
        client.process_data_events(time_limit=0.02)
        return bool(answers)

    wait_for(answered, what="the RPC answer")
    assert answers == [("42", b"PING")]


# -- channel errors and their reply codes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "code"),
    [
        (
            lambda ch: (
                ch.basic_publish(unique("no-such-exchange"), "k", b"x")
                or ch.queue_declare("", exclusive=True)
            ),
            404,
        ),
        (lambda ch: ch.queue_declare(unique("missing"), passive=True), 404),
        (lambda ch: ch.exchange_declare("amq.reserved", "direct"), 403),
        (lambda ch: ch.queue_declare("amq.reserved"), 403),
        (lambda ch: ch.basic_ack(999) or ch.queue_declare("", exclusive=True), 406),
        (lambda ch: ch.exchange_declare("amq.direct", "fanout"), 406),
        (lambda ch: ch.queue_declare(unique("bad-arg"), arguments={"x-max-length": "lots"}), 406),
    ],
    ids=[
        "publish-404",
        "passive-404",
        "exchange-403",
        "queue-403",
        "ack-406",
        "redeclare-406",
        "argument-406",
    ],
)
def test_channel_errors_close_the_channel_with_reply_code(
    connect: Connect, action: Callable[[Any], Any], code: int
) -> None:
    connection = connect()
    channel = connection.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        action(channel)
    assert info.value.reply_code == code
    assert info.value.reply_text.split(" - ")[0] in ("NOT_FOUND", "ACCESS_REFUSED", "PRECONDITION_FAILED")
    assert connection.is_open  # soft errors leave the connection and its other channels alone
    connection.channel().queue_declare("", exclusive=True)


def test_resource_locked_405(connect: Connect) -> None:
    owner = connect()
    queue = owner.channel().queue_declare("", exclusive=True).method.queue
    channel = connect().channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        channel.basic_consume(queue, lambda *a: None)
    assert info.value.reply_code == 405


def test_connection_errors_from_pika(connect: Connect) -> None:
    connection = connect()
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as info:
        connection.channel().exchange_declare(unique("e"), "no-such-type")
    assert info.value.reply_code == 503
    connection = connect()
    channel = connection.channel()
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as info:
        channel.basic_qos(prefetch_size=1024)
    assert info.value.reply_code == 540


def test_bad_credentials_and_unknown_vhost(amqp_broker: BrokerProcess, certs: CertificateSet) -> None:
    bad = params(amqp_broker, certs, credentials=pika.PlainCredentials("guest", "wrong"))
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(bad)
    with pytest.raises(pika.exceptions.ProbableAccessDeniedError):
        pika.BlockingConnection(params(amqp_broker, certs, virtual_host="no-such-vhost"))


# -- pika's asyncio adapter --------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_pika_asyncio_adapter_confirms_and_consumes(
    amqp_broker: BrokerProcess, certs: CertificateSet, transport: str
) -> None:
    queue = unique("async")
    count = 500

    async def scenario() -> list[bytes]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[bytes]] = loop.create_future()
        received: list[bytes] = []
        acks: list[int] = []

        def on_open(connection: AsyncioConnection) -> None:
            connection.channel(on_open_callback=on_channel)

        def on_channel(channel: Any) -> None:
            channel.confirm_delivery(lambda frame: acks.append(frame.method.delivery_tag))
            channel.queue_declare(queue, auto_delete=True, callback=lambda _: on_declared(channel))

        def on_declared(channel: Any) -> None:
            for i in range(count):
                channel.basic_publish("", queue, b"%d" % i)
            channel.basic_qos(prefetch_count=100, callback=lambda _: channel.basic_consume(queue, on_message))

        def on_message(channel: Any, method: Any, props: Any, body: bytes) -> None:
            received.append(body)
            channel.basic_ack(method.delivery_tag)
            if len(received) == count and acks and acks[-1] == count and not done.done():
                done.set_result(received)

        def on_error(connection: Any, exc: BaseException) -> None:
            if not done.done():
                done.set_exception(exc)

        connection = AsyncioConnection(
            params(amqp_broker, certs, transport),
            on_open_callback=on_open,
            on_open_error_callback=on_error,
            custom_ioloop=loop,
        )
        try:
            return await asyncio.wait_for(done, 30)
        finally:
            connection.close()

    assert asyncio.run(scenario()) == [b"%d" % i for i in range(count)]


# -- aio-pika -----------------------------------------------------------------------------------------------


def aio_url(broker: BrokerProcess, transport: str) -> str:
    if transport == "tls":
        return f"amqps://guest:guest@localhost:{broker.ports['amqp_tls']}/"
    return f"amqp://guest:guest@127.0.0.1:{broker.ports['amqp']}/"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_aio_pika_publish_consume_with_confirms(
    amqp_broker: BrokerProcess, certs: CertificateSet, transport: str
) -> None:
    async def scenario() -> None:
        context = certs.client_context(with_client_cert=False) if transport == "tls" else None
        connection = await aio_pika.connect(aio_url(amqp_broker, transport), ssl_context=context)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=50)
            queue = await channel.declare_queue(unique("aio"), durable=True)
            for i in range(300):
                await channel.default_exchange.publish(
                    aio_pika.Message(b"%d" % i, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=queue.name,
                )
            bodies = []
            async with queue.iterator() as messages:
                async for message in messages:
                    async with message.process():
                        bodies.append(message.body)
                    if len(bodies) == 300:
                        break
            assert bodies == [b"%d" % i for i in range(300)]
            await queue.delete()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_aio_pika_rpc_over_direct_reply_to_and_transactions(amqp_broker: BrokerProcess) -> None:
    async def scenario() -> None:
        connection = await aio_pika.connect(aio_url(amqp_broker, "tcp"))
        async with connection:
            server = await connection.channel()
            rpc = await server.declare_queue(unique("aio-rpc"), auto_delete=True)

            async def serve(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                async with message.process():
                    await server.default_exchange.publish(
                        aio_pika.Message(message.body[::-1], correlation_id=message.correlation_id),
                        routing_key=message.reply_to or "",
                    )

            await rpc.consume(serve)
            client = await connection.channel()
            reply_queue = await client.get_queue("amq.rabbitmq.reply-to", ensure=False)
            answers: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
            await reply_queue.consume(answers.put, no_ack=True)
            await client.default_exchange.publish(
                aio_pika.Message(b"abc", reply_to="amq.rabbitmq.reply-to", correlation_id="7"),
                routing_key=rpc.name,
            )
            answer = await asyncio.wait_for(answers.get(), 10)
            assert (answer.body, answer.correlation_id) == (b"cba", "7")

            tx_channel = await connection.channel(publisher_confirms=False)
            target = await tx_channel.declare_queue(unique("aio-tx"), auto_delete=True)
            async with tx_channel.transaction():
                await tx_channel.default_exchange.publish(aio_pika.Message(b"in tx"), routing_key=target.name)
            message = await target.get(timeout=5)
            assert message is not None and message.body == b"in tx"
            await message.ack()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_aio_pika_channel_error_reply_code(amqp_broker: BrokerProcess) -> None:
    async def scenario() -> None:
        connection = await aio_pika.connect(aio_url(amqp_broker, "tcp"))
        async with connection:
            channel = await connection.channel()
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await channel.declare_queue(unique("absent"), passive=True)

    asyncio.run(asyncio.wait_for(scenario(), 30))


# -- kombu (py-amqp) ---------------------------------------------------------------------------------------


def kombu_connection(
    broker: BrokerProcess, certs: CertificateSet, transport: str, **kwargs: Any
) -> kombu.Connection:
    if transport == "tls":
        tls = {"ca_certs": str(certs.ca_cert), "cert_reqs": ssl.CERT_REQUIRED, "server_hostname": "localhost"}
        return kombu.Connection(
            f"pyamqp://guest:guest@localhost:{broker.ports['amqp_tls']}//", ssl=tls, **kwargs
        )
    return kombu.Connection(f"pyamqp://guest:guest@127.0.0.1:{broker.ports['amqp']}//", **kwargs)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_kombu_producer_and_consumer(
    amqp_broker: BrokerProcess, certs: CertificateSet, transport: str
) -> None:
    exchange = kombu.Exchange(unique("kombu"), type="direct", durable=False, auto_delete=True)
    queue = kombu.Queue(unique("kombu-q"), exchange, routing_key="task", auto_delete=True)
    with kombu_connection(amqp_broker, certs, transport) as connection:
        producer = connection.Producer(serializer="json")
        for i in range(20):
            producer.publish({"n": i}, exchange=exchange, routing_key="task", declare=[queue], retry=False)
        received: list[int] = []

        def on_message(body: Any, message: Any) -> None:
            received.append(body["n"])
            message.ack()

        with connection.Consumer(queue, callbacks=[on_message], prefetch_count=5):
            deadline = time.monotonic() + 10
            while len(received) < 20 and time.monotonic() < deadline:
                connection.drain_events(timeout=1)
        assert received == list(range(20))


def test_kombu_simple_queue_with_amqplain(amqp_broker: BrokerProcess, certs: CertificateSet) -> None:
    with kombu_connection(amqp_broker, certs, "tcp", login_method="AMQPLAIN") as connection:
        simple = connection.SimpleQueue(unique("simple"))
        simple.put({"hello": "world"})
        message = simple.get(block=True, timeout=5)
        assert message.payload == {"hello": "world"}
        message.ack()
        simple.close()
        connection.default_channel.queue_delete(simple.queue.name)


# -- flow control: connection.blocked ----------------------------------------------------------------------


def test_connection_blocked_and_unblocked(make_broker_proc: Callable[..., BrokerProcess]) -> None:
    broker = make_broker_proc(env={"POLYBROKER_STORE_MEMORY_HIGH_WATERMARK_MB": "1"})
    broker.start(wait=("amqp",))
    connection = pika.BlockingConnection(
        pika.ConnectionParameters("127.0.0.1", broker.ports["amqp"], blocked_connection_timeout=20)
    )
    events: list[str] = []
    connection.add_on_connection_blocked_callback(lambda *a: events.append("blocked"))
    connection.add_on_connection_unblocked_callback(lambda *a: events.append("unblocked"))
    channel = connection.channel()
    queue = channel.queue_declare("hog").method.queue
    chunk = b"x" * 65536
    for _ in range(20):  # 1.25 MiB held in RAM: above the 1 MiB watermark
        channel.basic_publish("", queue, chunk)
    wait_for(lambda: connection.process_data_events(time_limit=0.05) or "blocked" in events, what="blocked")
    drainer = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", broker.ports["amqp"]))
    drainer.channel().queue_purge(queue)
    wait_for(
        lambda: connection.process_data_events(time_limit=0.05) or "unblocked" in events, what="unblocked"
    )
    assert events == ["blocked", "unblocked"]
    drainer.close()
    connection.close()
    assert "Traceback" not in broker.log()


# -- durability: confirmed persistent messages survive a crash -------------------------------------------


def test_confirmed_persistent_messages_survive_a_crash(
    make_broker_proc: Callable[..., BrokerProcess],
) -> None:
    broker = make_broker_proc()
    broker.start(wait=("amqp",))
    port = broker.ports["amqp"]
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port))
    channel = connection.channel()
    channel.queue_declare("kept", durable=True)
    channel.exchange_declare("kept-ex", "direct", durable=True)
    channel.queue_bind("kept", "kept-ex", "k")
    channel.confirm_delivery()
    for i in range(200):
        channel.basic_publish("kept-ex", "k", b"%d" % i, pika.BasicProperties(delivery_mode=2))
    broker.restart(hard=True)  # SIGKILL right after the last confirm: everything confirmed is on disk
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port))
    channel = connection.channel()
    channel.basic_publish("kept-ex", "k", b"after restart", pika.BasicProperties(delivery_mode=2))
    got = drain(channel, "kept", 201)
    assert [body for _, _, body in got] == [b"%d" % i for i in range(200)] + [b"after restart"]
    connection.close()
