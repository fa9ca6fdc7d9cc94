"""STOMP end to end: stomp.py 1.0, 1.1 and 1.2 over TCP, TLS, WebSocket (stomp.WSStompConnection) and WSS
against a real broker process; raw frames over a socket where the client library cannot produce them.

The helpers at the top (`Collector`, `StompClients`, `RawStomp`) are shared with test_stomp_*.py. Every
wait is on a condition with a timeout, never a sleep standing in for synchronisation.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import stomp
from stomp.adapter.ws import WSStompConnection

from protocols.stomp.codec import NEED_DATA, Frame, StompParser
from tests.certs import CertificateSet, make_certificates
from tests.e2e.broker_process import BrokerProcess
from tests.e2e.raw_socket import RawSocket

TIMEOUT = 10.0
#: What each transport is called here, and the listener that serves it.
TRANSPORT_LISTENER = {"tcp": "stomp", "tls": "stomp_tls", "ws": "ws", "wss": "wss"}
CONNECTION_CLASSES = {"1.0": stomp.Connection10, "1.1": stomp.Connection11, "1.2": stomp.Connection12}


class Collector(stomp.ConnectionListener):  # type: ignore[misc]
    """Records what a stomp.py connection receives; `wait` blocks until a predicate on it holds."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.messages: list[Any] = []
        self.receipts: list[str] = []
        self.errors: list[Any] = []
        self.connected: dict[str, str] | None = None
        self.disconnected = False
        self.heartbeat_timeouts = 0

    def _record(self, action: Callable[[], None]) -> None:
        with self.cond:
            action()
            self.cond.notify_all()

    def on_connected(self, frame: Any) -> None:
        self._record(lambda: setattr(self, "connected", dict(frame.headers)))

    def on_message(self, frame: Any) -> None:
        self._record(lambda: self.messages.append(frame))

    def on_receipt(self, frame: Any) -> None:
        self._record(lambda: self.receipts.append(frame.headers["receipt-id"]))

    def on_error(self, frame: Any) -> None:
        self._record(lambda: self.errors.append(frame))

    def on_disconnected(self) -> None:
        self._record(lambda: setattr(self, "disconnected", True))

    def on_heartbeat_timeout(self) -> None:
        self._record(lambda: setattr(self, "heartbeat_timeouts", self.heartbeat_timeouts + 1))

    def wait(self, predicate: Callable[[], object], timeout: float = TIMEOUT, what: str = "") -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise AssertionError(
                    f"timed out waiting for {what or 'a condition'}: messages={len(self.messages)} "
                    f"receipts={self.receipts} errors={[e.headers for e in self.errors]}"
                )

    def never(self, predicate: Callable[[], object], seconds: float) -> bool:
        """True if `predicate` did not become true within `seconds`."""
        with self.cond:
            return not self.cond.wait_for(predicate, seconds)

    def wait_messages(self, count: int, timeout: float = TIMEOUT) -> list[Any]:
        self.wait(lambda: len(self.messages) >= count, timeout, f"{count} messages")
        return list(self.messages)

    def wait_receipt(self, receipt: str, timeout: float = TIMEOUT) -> None:
        self.wait(lambda: receipt in self.receipts, timeout, f"receipt {receipt}")

    def bodies(self) -> list[str]:
        with self.cond:
            return [m.body for m in self.messages]


class StompClients:
    """Opens stomp.py connections to one broker and disconnects them all at the end of a test."""

    def __init__(self, proc: BrokerProcess, certs: CertificateSet | None) -> None:
        self.proc = proc
        self.certs = certs
        self.opened: list[Any] = []

    def connect(
        self,
        transport: str = "tcp",
        version: str = "1.2",
        *,
        heartbeats: tuple[int, int] = (0, 0),
        auto_decode: bool = True,
        wait: bool = True,
        **headers: str,
    ) -> tuple[Any, Collector]:
        port = self.proc.ports[TRANSPORT_LISTENER[transport]]
        hosts = [("127.0.0.1", port)]
        conn: Any
        if transport in ("ws", "wss"):
            assert version == "1.2", "stomp.py's WebSocket transport speaks STOMP 1.2"
            conn = WSStompConnection(
                hosts,
                ws_path="/ws",
                header={"Sec-WebSocket-Protocol": "v12.stomp"},
                heartbeats=heartbeats,
                auto_decode=auto_decode,
            )
        elif version == "1.0":
            conn = stomp.Connection10(hosts, auto_decode=auto_decode)
        else:
            conn = CONNECTION_CLASSES[version](hosts, heartbeats=heartbeats, auto_decode=auto_decode)
        if transport in ("tls", "wss"):
            assert self.certs is not None
            conn.set_ssl(for_hosts=hosts, ca_certs=str(self.certs.ca_cert))
        collector = Collector()
        conn.set_listener("collector", collector)
        self.opened.append(conn)
        conn.connect(wait=wait, headers=headers or None)
        return conn, collector

    def close_all(self) -> None:
        for conn in self.opened:
            try:
                if conn.is_connected():
                    conn.disconnect()
            except Exception:  # noqa: S110 - a connection the broker already closed
                pass
        self.opened.clear()


def ack(conn: Any, version: str, message: Any) -> None:
    """ACK a received MESSAGE the way each version spells it."""
    headers = message.headers
    if version == "1.2":
        conn.ack(headers["ack"])
    elif version == "1.1":
        conn.ack(headers["message-id"], headers["subscription"])
    else:
        conn.ack(headers["message-id"])


def nack(conn: Any, version: str, message: Any, **extra: str) -> None:
    headers = message.headers
    if version == "1.2":
        conn.nack(headers["ack"], **extra)
    else:
        conn.nack(headers["message-id"], headers["subscription"], **extra)


class RawStomp(RawSocket):
    """A plain socket speaking STOMP byte by byte, for what client libraries cannot send."""

    def __init__(self, port: int, version: str = "1.2") -> None:
        super().__init__(port, TIMEOUT)
        self.parser = StompParser(version=version)

    def feed(self, data: bytes) -> None:
        self.parser.feed(data)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frame(self, timeout: float = TIMEOUT) -> Frame:
        """The next frame from the broker (heart-beat EOLs are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            event = self.parser.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, Frame)
                return event
            if self.eof or not self.read_once(deadline):
                raise AssertionError("no frame from the broker")

    def connect(self, version: str = "1.2", **headers: str) -> Frame:
        lines = [f"accept-version:{version}", "host:/"] + [
            f"{k.replace('_', '-')}:{v}" for k, v in headers.items()
        ]
        self.send(("CONNECT\n" + "\n".join(lines) + "\n\n").encode() + b"\0")
        frame = self.frame()
        assert frame.command == "CONNECTED", frame
        self.parser.version = frame.header("version", "1.0")
        return frame

    def heartbeats_received(self) -> int:
        """EOLs received between frames so far (what was read must hold no frame)."""
        assert self.parser.next_event() is NEED_DATA
        return self.parser.heartbeats


# -- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertificateSet:
    return make_certificates(tmp_path_factory.mktemp("stomp-certs"))


@pytest.fixture(scope="module")
def stomp_broker(tmp_path_factory: pytest.TempPathFactory, certs: CertificateSet) -> Iterator[BrokerProcess]:
    """One broker with every STOMP listener (TCP, TLS, WS, WSS), shared by this module's tests."""
    tls = {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key)}
    proc = BrokerProcess(tmp_path_factory.mktemp("stomp-broker") / "data", tls=tls)
    proc.start(wait=("stomp", "stomp_tls", "ws", "wss"))
    yield proc
    proc.kill()
    assert "Traceback" not in proc.log(), proc.log()


@pytest.fixture
def clients(stomp_broker: BrokerProcess, certs: CertificateSet) -> Iterator[StompClients]:
    made = StompClients(stomp_broker, certs)
    yield made
    made.close_all()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


#: (transport, version) pairs every basic test runs over.
VARIANTS = [("tcp", "1.0"), ("tcp", "1.1"), ("tcp", "1.2"), ("tls", "1.2"), ("ws", "1.2"), ("wss", "1.2")]
VARIANT_IDS = [f"{t}-{v}" for t, v in VARIANTS]
VERSIONS = ["1.0", "1.1", "1.2"]


# -- send and receive ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("transport", "version"), VARIANTS, ids=VARIANT_IDS)
def test_queue_send_and_receive(clients: StompClients, transport: str, version: str) -> None:
    conn, got = clients.connect(transport, version)
    assert got.connected is not None and got.connected.get("version", "1.0") == version
    queue = "/queue/" + unique("q")
    conn.subscribe(queue, id="1", ack="auto")
    conn.send(queue, "hello", headers={"x-app": "e2e", "content-type": "text/plain"}, receipt="sent")
    got.wait_receipt("sent")
    (message,) = got.wait_messages(1)
    assert message.body == "hello"
    assert message.headers["destination"] == queue
    assert message.headers["x-app"] == "e2e"
    assert message.headers["content-type"] == "text/plain"
    assert message.headers["redelivered"] == "false"


@pytest.mark.parametrize(("transport", "version"), VARIANTS, ids=VARIANT_IDS)
def test_topic_publish_reaches_every_subscriber(clients: StompClients, transport: str, version: str) -> None:
    key = unique("sensors") + ".room1.temp"
    subscribers = [clients.connect(transport, version) for _ in range(2)]
    for conn, _ in subscribers:
        conn.subscribe("/topic/" + key.split(".")[0] + ".*.temp", id="t", ack="auto", receipt="subscribed")
    for _, got in subscribers:
        got.wait_receipt("subscribed")
    publisher, _ = clients.connect(transport, version)
    publisher.send("/topic/" + key, "21.5")
    for _, got in subscribers:
        (message,) = got.wait_messages(1)
        assert message.body == "21.5"
        assert message.headers["destination"] == "/topic/" + key


def test_binary_body_with_nul_octets(clients: StompClients) -> None:
    conn, got = clients.connect(auto_decode=False)
    queue = "/queue/" + unique("bin")
    raw_body = b"\x00\x01zero\x00"
    conn.subscribe(queue, id="1")
    conn.send(queue, raw_body)
    (message,) = got.wait_messages(1)
    assert message.body == raw_body
    assert message.headers["content-length"] == str(len(raw_body))


def test_competing_consumers_share_the_work(clients: StompClients) -> None:
    queue = "/queue/" + unique("work")
    workers = [clients.connect() for _ in range(2)]
    for conn, got in workers:
        conn.subscribe(queue, id="w", ack="auto", receipt="ready")
        got.wait_receipt("ready")
    producer, _ = clients.connect()
    for i in range(20):
        producer.send(queue, str(i))
    first, second = workers[0][1], workers[1][1]
    first.wait(lambda: len(first.messages) + len(second.messages) == 20, what="20 deliveries")
    assert len(first.messages) >= 5 and len(second.messages) >= 5
    assert sorted(int(b) for b in first.bodies() + second.bodies()) == list(range(20))


# -- acknowledgement ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("mode", ["client", "client-individual"])
def test_unacked_messages_are_redelivered_after_disconnect(
    clients: StompClients, version: str, mode: str
) -> None:
    queue = "/queue/" + unique("redeliver")
    first, got = clients.connect("tcp", version)
    first.subscribe(queue, id="s", ack=mode)
    producer, _ = clients.connect("tcp", version)
    for body in ("a", "b", "c"):
        producer.send(queue, body)
    messages = got.wait_messages(3)
    ack(first, version, messages[0])  # settles "a" (in client mode: just "a", the earliest)
    first.disconnect(receipt="bye")
    second, got2 = clients.connect("tcp", version)
    second.subscribe(queue, id="s", ack=mode)
    redelivered = got2.wait_messages(2)
    assert [m.body for m in redelivered] == ["b", "c"]
    assert all(m.headers["redelivered"] == "true" for m in redelivered)


def test_client_mode_ack_is_cumulative(clients: StompClients) -> None:
    queue = "/queue/" + unique("cumulative")
    conn, got = clients.connect()
    conn.subscribe(queue, id="s", ack="client")
    for body in ("1", "2", "3"):
        conn.send(queue, body)
    messages = got.wait_messages(3)
    conn.ack(messages[1].headers["ack"], receipt="acked")
    got.wait_receipt("acked")
    conn.disconnect(receipt="bye")
    again, got2 = clients.connect()
    again.subscribe(queue, id="s", ack="client")
    assert [m.body for m in got2.wait_messages(1)] == ["3"]


def test_auto_ack_messages_are_not_redelivered(clients: StompClients) -> None:
    queue = "/queue/" + unique("auto")
    conn, got = clients.connect()
    conn.subscribe(queue, id="s", ack="auto")
    conn.send(queue, "once")
    got.wait_messages(1)
    conn.disconnect(receipt="bye")
    again, got2 = clients.connect()
    again.subscribe(queue, id="s", ack="auto")
    again.send(queue, "marker")
    assert [m.body for m in got2.wait_messages(1)] == ["marker"]


@pytest.mark.parametrize("version", ["1.1", "1.2"])
def test_nack_requeues_and_requeue_false_dead_letters(clients: StompClients, version: str) -> None:
    name = unique("nack")
    dead = "/queue/" + name + "-dead"
    conn, got = clients.connect("tcp", version)
    conn.subscribe(dead, id="dead", ack="auto", receipt="dead-ready")
    got.wait_receipt("dead-ready")
    conn.subscribe(
        "/queue/" + name,
        id="s",
        ack="client-individual",
        headers={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": name + "-dead"},
    )
    conn.send("/queue/" + name, "poison")
    (first,) = got.wait_messages(1)
    nack(conn, version, first)
    got.wait_messages(2)
    second = got.messages[1]
    assert second.body == "poison" and second.headers["redelivered"] == "true"
    nack(conn, version, second, requeue="false")
    got.wait_messages(3)
    dead_lettered = got.messages[2]
    assert dead_lettered.headers["subscription"] == "dead"
    assert dead_lettered.body == "poison"


def test_ack_with_an_unknown_id_is_an_error(clients: StompClients) -> None:
    conn, got = clients.connect()
    conn.ack("no-such-delivery")
    got.wait(lambda: got.errors, what="ERROR")
    assert got.errors[0].headers["message"] == "Unknown message id"
    got.wait(lambda: got.disconnected, what="close")


# -- transactions and receipts -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_transaction_commit_and_abort(clients: StompClients, version: str) -> None:
    queue = "/queue/" + unique("tx")
    observer, seen = clients.connect("tcp", version)
    observer.subscribe(queue, id="o", ack="auto")
    conn, got = clients.connect("tcp", version)
    conn.begin("t1")
    conn.send(queue, "aborted", transaction="t1")
    conn.abort("t1")
    conn.begin("t2")
    conn.send(queue, "one", transaction="t2")
    conn.send(queue, "two", transaction="t2")
    conn.send(queue, "outside", receipt="outside")
    got.wait_receipt("outside")
    seen.wait_messages(1)
    assert seen.bodies() == ["outside"]
    conn.commit("t2", receipt="committed")
    got.wait_receipt("committed")
    seen.wait_messages(3)
    assert seen.bodies() == ["outside", "one", "two"]


def test_transactional_acks_take_effect_on_commit_only(clients: StompClients) -> None:
    queue = "/queue/" + unique("txack")
    conn, got = clients.connect()
    conn.subscribe(queue, id="s", ack="client-individual")
    conn.send(queue, "m")
    (message,) = got.wait_messages(1)
    conn.begin("t")
    conn.ack(message.headers["ack"], transaction="t")
    conn.disconnect(receipt="bye")  # the transaction is dropped: the ACK never happened
    again, got2 = clients.connect()
    again.subscribe(queue, id="s", ack="client-individual")
    (redelivered,) = got2.wait_messages(1)
    assert redelivered.headers["redelivered"] == "true"
    again.begin("t")
    again.ack(redelivered.headers["ack"], transaction="t")
    again.commit("t", receipt="done")
    got2.wait_receipt("done")
    again.disconnect(receipt="bye")
    third, got3 = clients.connect()
    third.subscribe(queue, id="s", ack="client-individual")
    third.send(queue, "marker")
    assert [m.body for m in got3.wait_messages(1)] == ["marker"]


def test_persistent_send_receipt_and_disconnect_receipt(clients: StompClients) -> None:
    queue = "/queue/" + unique("persist")
    conn, got = clients.connect()
    for i in range(50):
        conn.send(queue, str(i), headers={"persistent": "true"}, receipt=f"r{i}")
    got.wait(lambda: len(got.receipts) == 50, what="50 receipts")
    assert got.receipts == [f"r{i}" for i in range(50)]  # in the order of the SEND frames
    conn.disconnect(receipt="last")
    assert "last" in got.receipts


# -- temporary queues and durable subscriptions ----------------------------------------------------------------


def test_temp_queue_request_reply(clients: StompClients) -> None:
    service = "/queue/" + unique("rpc")
    server, requests = clients.connect()
    server.subscribe(service, id="svc", ack="auto", receipt="serving")
    requests.wait_receipt("serving")
    client, replies = clients.connect()
    client.send(service, "2+2", headers={"reply-to": "/temp-queue/answers", "correlation-id": "c1"})
    (request,) = requests.wait_messages(1)
    reply_to = request.headers["reply-to"]
    assert reply_to.startswith("/reply-queue/")
    server.send(reply_to, "4", headers={"correlation-id": request.headers["correlation-id"]})
    (reply,) = replies.wait_messages(1)
    assert reply.body == "4"
    assert reply.headers["correlation-id"] == "c1"
    assert reply.headers["subscription"] == "/temp-queue/answers"


def test_rabbitmq_and_activemq_durable_subscriptions_survive_a_restart(make_broker_proc: Any) -> None:
    proc: BrokerProcess = make_broker_proc()
    proc.start(wait=("stomp",))
    made = StompClients(proc, None)
    try:
        rabbit, got = made.connect()
        rabbit.subscribe(
            "/topic/alerts.#", id="alerts", ack="client", headers={"durable": "true", "auto-delete": "false"}
        )
        amq, got2 = made.connect(**{"client-id": "billing"})
        amq.subscribe(
            "/topic/invoices",
            id="inv",
            ack="auto",
            headers={"activemq.subscriptionName": "feed", "receipt": "sub"},
        )
        # The subscription must exist before the publisher (another connection) sends to it.
        got2.wait_receipt("sub")
        rabbit.send("/topic/alerts.fire", "while-connected", headers={"persistent": "true"}, receipt="r0")
        got.wait_messages(1)
        made.close_all()
        publisher, pub = made.connect()
        publisher.send("/topic/alerts.fire", "while-away", headers={"persistent": "true"}, receipt="r1")
        publisher.send("/topic/invoices", "invoice-7", headers={"persistent": "true"}, receipt="r2")
        pub.wait_receipt("r2")
        made.close_all()
        proc.restart(hard=True)  # receipts were sent: the messages are on disk
        rabbit, got = made.connect()
        rabbit.subscribe(
            "/topic/alerts.#", id="alerts", ack="client", headers={"durable": "true", "auto-delete": "false"}
        )
        # "while-connected" was never acked: it comes back too, flagged redelivered.
        assert [m.body for m in got.wait_messages(2)] == ["while-connected", "while-away"]
        assert got.messages[0].headers["redelivered"] == "true"
        amq, got2 = made.connect(**{"client-id": "billing"})
        amq.subscribe("/topic/invoices", id="inv", ack="auto", headers={"activemq.subscriptionName": "feed"})
        assert [m.body for m in got2.wait_messages(1)] == ["invoice-7"]
        amq.unsubscribe("inv", headers={"activemq.subscriptionName": "feed"})
        rabbit.unsubscribe("alerts", headers={"durable": "true"}, receipt="gone")
        got.wait_receipt("gone")
    finally:
        made.close_all()
