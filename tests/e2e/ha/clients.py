"""Real clients that know both nodes of a pair: publishers at full speed, and what reads the result.

A publisher is a thread that sends persistent messages named "<publisher name>-<n>" (the body is
the id) with up to `window` of them unconfirmed, and counts one as confirmed only when the broker
confirmed it (AMQP basic.ack under confirm mode, STOMP RECEIPT, MQTT PUBACK). It knows both
endpoints and fails over the way the client library does it:

- `AmqpPublisher`: pika (SelectConnection) with a list of connection parameters, tried in order.
- `StompPublisher`: stomp.py with two hosts, tried in order.
- `MqttPublisher`: paho-mqtt, QoS 1, reconnecting to the other host.

A connection that closes, fails, or leaves messages unconfirmed for `stall_timeout` seconds (a
frozen broker keeps its sockets open) is dropped; the publisher then reconnects, starting with the
other endpoint, and publishes its unconfirmed messages again, so duplicates are possible and
counted, losses are not. `stop()` ends publishing and waits (bounded) for outstanding confirms.

`drain_amqp` reads a queue to the end, `StompSpy` is a raw STOMP connection that records every frame
the broker sends back, and `count_outcome` compares what was confirmed with what was delivered.

Must not import: broker, storage, cluster (only client libraries and the STOMP codec for the spy).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
import pika
import pika.exceptions
import stomp
from pika.adapters.select_connection import IOLoop

from protocols.stomp.codec import NEED_DATA, Frame, StompParser
from tests.e2e.ha.azs import PASSWORD, USER, wait_for

Endpoint = tuple[str, int]

#: Connection attempts give up after this long (a frozen broker accepts TCP but never answers).
HANDSHAKE_TIMEOUT = 2.0
#: How long `stop()` waits for the last confirms.
DRAIN_TIMEOUT = 20.0
#: Unconfirmed this long, a connection is taken for dead. Longer than [ha] sync_timeout (5 s), for
#: which an active legitimately holds confirmations while it has no standby in sync.
STALL_TIMEOUT = 10.0


def rotated(endpoints: list[Endpoint], first: int) -> list[Endpoint]:
    return endpoints[first:] + endpoints[:first]


@dataclass
class PublishStats:
    """What one publisher did."""

    name: str
    sent: int = 0  # distinct messages sent at least once
    resent: int = 0  # publications of a message already sent (after a reconnection)
    reconnects: int = 0  # connections lost or dropped after the first one was up
    max_stall: float = 0.0  # longest time with messages unconfirmed and no confirmation
    confirmed: set[str] = field(default_factory=set)
    confirm_times: list[float] = field(default_factory=list)  # time.monotonic() of each confirmation
    errors: list[str] = field(default_factory=list)


class Publisher(threading.Thread):
    """The bookkeeping every publisher shares (see the module docstring)."""

    def __init__(
        self,
        name: str,
        endpoints: list[Endpoint],
        *,
        window: int,
        max_count: int,
        stall_timeout: float,
    ) -> None:
        super().__init__(name=f"publisher-{name}", daemon=True)
        self.endpoints = endpoints
        self.window = window
        self.max_count = max_count
        self.stall_timeout = stall_timeout
        self.stats = PublishStats(name)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._next = 0
        self._resend: deque[str] = deque()
        self._last_progress = time.monotonic()
        self._current = 0  # index of the endpoint of the current (or last) connection
        self._drain_timeout = DRAIN_TIMEOUT
        self._stop_at = float("inf")  # when stop() gives up on outstanding confirmations

    # --- for the test ------------------------------------------------------------------------------

    @property
    def confirmed_count(self) -> int:
        with self._lock:
            return len(self.stats.confirmed)

    def confirmed(self) -> set[str]:
        with self._lock:
            return set(self.stats.confirmed)

    def wait_confirmed(self, count: int, timeout: float = 30.0) -> None:
        wait_for(
            lambda: self.confirmed_count >= count or not self.is_alive(),
            timeout,
            f"{self.stats.name} to have {count} confirmed (has {self.confirmed_count}; {self.stats.errors[-3:]})",
        )
        assert self.confirmed_count >= count, f"{self.stats.name} ended early: {self.stats.errors[-5:]}"

    def stop(self, timeout: float = DRAIN_TIMEOUT + 10) -> PublishStats:
        """Stop publishing, wait for the outstanding confirmations (bounded), return the stats."""
        self._stop_at = min(self._stop_at, time.monotonic() + self._drain_timeout)
        self._stopping.set()
        self._wake()
        self.join(timeout)
        assert not self.is_alive(), f"{self.stats.name} did not stop"
        return self.stats

    def abort(self) -> None:
        """Stop now, without waiting for confirmations (the clean-up of a failed test)."""
        if self.is_alive():
            self._drain_timeout = 0.0
            self.stop(timeout=10)

    # --- for subclasses ----------------------------------------------------------------------------

    def _wake(self) -> None:
        """Let the publishing thread notice `_stopping` (subclasses that block override it)."""

    def _past_stop(self) -> bool:
        """Stopping, and the time to wait for outstanding confirmations is over."""
        return self._stopping.is_set() and time.monotonic() > self._stop_at

    def _take(self) -> str | None:
        """The next message to (re)publish, or None."""
        if self._resend:
            self.stats.resent += 1
            return self._resend.popleft()
        if self._stopping.is_set() or self._next >= self.max_count:
            return None
        self._next += 1
        self.stats.sent += 1
        return f"{self.stats.name}-{self._next}"

    def _has_more(self) -> bool:
        return bool(self._resend) or (not self._stopping.is_set() and self._next < self.max_count)

    def _confirm(self, ids: Iterable[str]) -> None:
        now = time.monotonic()
        with self._lock:
            self.stats.confirmed.update(ids)
            self.stats.confirm_times.append(now)
        self._last_progress = now

    def first_confirmation_after(self, moment: float) -> float | None:
        """Seconds from `moment` (time.monotonic()) to the first confirmation after it."""
        with self._lock:
            later = [t for t in self.stats.confirm_times if t > moment]
        return min(later) - moment if later else None

    def _progress(self) -> None:
        self._last_progress = time.monotonic()

    def _stalled(self, outstanding: int) -> bool:
        """Track the longest stall; True once it exceeds `stall_timeout`."""
        if not outstanding:
            return False
        stall = time.monotonic() - self._last_progress
        self.stats.max_stall = max(self.stats.max_stall, stall)
        return stall > self.stall_timeout

    def _publish_with_failover(self, one_connection: Callable[[float], bool], waiting_for: str) -> None:
        """The thread body of a publisher that reconnects itself: `one_connection(deadline)` connects
        to an endpoint, publishes until that connection fails, stalls or all is confirmed, and puts
        what was left unconfirmed back to be sent again (False: no endpoint accepted)."""
        connections = 0
        while self._has_more() or self._inflight:
            if not one_connection(time.monotonic() + 60):
                self.stats.errors.append("no endpoint accepted a connection")
                return
            connections += 1
            if connections > 1:
                self.stats.reconnects += 1
            if self._past_stop():
                self.stats.errors.append(f"gave up waiting for the last {waiting_for}")
                return

    def _requeue(self, ids: Iterable[str]) -> None:
        # Unconfirmed messages go out again first, in their order.
        self._resend.extendleft(reversed(list(ids)))


# --- AMQP 0-9-1 (pika) ----------------------------------------------------------------------------------


class AmqpPublisher(Publisher):
    """Persistent messages to `queue` (default exchange) under confirm mode; pika SelectConnection
    with both endpoints as a list of connection parameters (module docstring)."""

    def __init__(
        self,
        endpoints: list[Endpoint],
        queue: str,
        *,
        name: str = "amqp",
        window: int = 200,
        max_count: int = 20000,
        stall_timeout: float = STALL_TIMEOUT,
    ) -> None:
        super().__init__(name, endpoints, window=window, max_count=max_count, stall_timeout=stall_timeout)
        self.queue = queue
        self._ioloop = IOLoop()
        self._connection: pika.SelectConnection | None = None
        self._channel: Any = None
        self._inflight: dict[int, str] = {}  # delivery tag -> id
        self._tag = 0
        self._ever_connected = False
        self._properties = pika.BasicProperties(delivery_mode=2)

    def _params(self) -> list[pika.ConnectionParameters]:
        credentials = pika.PlainCredentials(USER, PASSWORD)
        return [
            pika.ConnectionParameters(
                host,
                port,
                credentials=credentials,
                connection_attempts=1,
                socket_timeout=HANDSHAKE_TIMEOUT,
                stack_timeout=HANDSHAKE_TIMEOUT,
                heartbeat=10,
            )
            for host, port in rotated(self.endpoints, self._current)
        ]

    def run(self) -> None:
        self._connect()
        self._ioloop.call_later(0.05, self._tick)
        self._ioloop.start()
        self._ioloop.close()

    def _wake(self) -> None:
        with contextlib.suppress(Exception):
            self._ioloop.add_callback_threadsafe(self._on_stop_requested)

    def _on_stop_requested(self) -> None:
        self._finish_if_done()

    def _connect(self) -> None:
        pika.SelectConnection.create_connection(
            self._params(), self._on_connected, custom_ioloop=self._ioloop
        )

    def _on_connected(self, result: Any) -> None:
        if not isinstance(result, pika.SelectConnection):
            self.stats.errors.append(f"connect: {result!r}")
            if self._past_stop():
                self._ioloop.stop()
                return
            self._current = (self._current + 1) % len(self.endpoints)
            self._ioloop.call_later(0.05, self._connect)  # reconnection back-off
            return
        self._connection = result
        host_port = (result.params.host, result.params.port)
        self._current = self.endpoints.index(host_port)
        if self._ever_connected:
            self.stats.reconnects += 1
        self._ever_connected = True
        result.add_on_close_callback(self._on_closed)
        result.channel(on_open_callback=self._on_channel)

    def _on_channel(self, channel: Any) -> None:
        self._channel = channel
        self._tag = 0
        channel.confirm_delivery(self._on_confirmation, callback=lambda _frame: self._pump())

    def _pump(self) -> None:
        channel = self._channel
        if channel is None or not channel.is_open:
            return
        inflight = self._inflight
        while len(inflight) < self.window:
            message_id = self._take()
            if message_id is None:
                break
            if not inflight:
                self._progress()  # the wait for a confirmation starts now
            channel.basic_publish("", self.queue, message_id.encode(), self._properties)
            self._tag += 1
            inflight[self._tag] = message_id
        self._finish_if_done()

    def _on_confirmation(self, frame: Any) -> None:
        method = frame.method
        tag = method.delivery_tag
        tags = [t for t in self._inflight if t <= tag] if method.multiple else [tag]
        ids = [self._inflight.pop(t) for t in tags if t in self._inflight]
        if isinstance(method, pika.spec.Basic.Ack):
            self._confirm(ids)
        else:  # basic.nack: the broker could not take them; they go out again
            self.stats.errors.append(f"nack of {len(ids)} messages")
            self._requeue(ids)
        self._pump()

    def _on_closed(self, connection: Any, reason: Exception) -> None:
        self._connection = None
        self._channel = None
        if self._inflight:
            self._requeue(self._inflight[t] for t in sorted(self._inflight))
            self._inflight.clear()
        self.stats.errors.append(f"closed: {reason!r}")
        if self._stopping.is_set() and (not self._has_more() or self._past_stop()):
            self._ioloop.stop()
            return
        self._current = (self._current + 1) % len(self.endpoints)
        self._ioloop.call_later(0.05, self._connect)  # reconnection back-off

    def _finish_if_done(self) -> None:
        if not self._stopping.is_set() or self._inflight or self._has_more():
            return
        if self._connection is not None and self._connection.is_open:
            self._connection.close()  # _on_closed stops the loop
        elif self._connection is None:
            self._ioloop.stop()

    def _tick(self) -> None:
        connection = self._connection
        if self._past_stop():
            self.stats.errors.append("gave up waiting for the last confirmations")
            self._ioloop.stop()
            return
        if self._stalled(len(self._inflight)) and connection is not None:
            self.stats.errors.append(f"no confirmation for {self.stall_timeout:g} s: dropping the connection")
            # pika has no public abort; this is what its own heartbeat checker does on a dead peer.
            connection._terminate_stream(pika.exceptions.AMQPHeartbeatTimeout("confirmations stalled"))
        self._ioloop.call_later(0.05, self._tick)


def amqp_params(endpoints: list[Endpoint]) -> list[pika.ConnectionParameters]:
    credentials = pika.PlainCredentials(USER, PASSWORD)
    return [
        pika.ConnectionParameters(
            host, port, credentials=credentials, connection_attempts=1, stack_timeout=HANDSHAKE_TIMEOUT
        )
        for host, port in endpoints
    ]


def amqp_connect(endpoints: list[Endpoint], timeout: float = 20.0) -> pika.BlockingConnection:
    """A BlockingConnection to whichever endpoint serves (the list is tried in order, until `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return pika.BlockingConnection(amqp_params(endpoints))
        except pika.exceptions.AMQPConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # reconnection back-off


def drain_amqp(endpoints: list[Endpoint], queue: str, timeout: float = 60.0) -> list[str]:
    """Every message on `queue`, consumed to the end (the queue is empty afterwards)."""
    connection = amqp_connect(endpoints)
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=1000)
        got: list[str] = []
        last_tag = acked_tag = 0
        deadline = time.monotonic() + timeout
        for method, _props, body in channel.consume(queue, inactivity_timeout=0.5):
            if method is None:
                # Nothing for a while: done if the queue holds nothing more.
                if channel.queue_declare(queue, passive=True).method.message_count == 0:
                    break
            else:
                got.append(body.decode())
                last_tag = method.delivery_tag
                if last_tag - acked_tag >= 500:
                    channel.basic_ack(last_tag, multiple=True)
                    acked_tag = last_tag
            assert time.monotonic() < deadline, f"draining {queue} took over {timeout} s"
        if last_tag > acked_tag:
            channel.basic_ack(last_tag, multiple=True)
        channel.cancel()
        return got
    finally:
        connection.close()


# --- STOMP (stomp.py) -------------------------------------------------------------------------------------


class _StompListener(stomp.ConnectionListener):
    def __init__(self, owner: StompPublisher) -> None:
        self.owner = owner
        self.connected = threading.Event()
        self.disconnected = threading.Event()

    def on_connected(self, frame: Any) -> None:
        self.connected.set()

    def on_receipt(self, frame: Any) -> None:
        self.owner._on_receipt(frame.headers["receipt-id"])

    def on_error(self, frame: Any) -> None:
        self.owner.stats.errors.append(f"ERROR {frame.headers.get('message')}")

    def on_disconnected(self) -> None:
        self.disconnected.set()
        self.owner._wake()


class StompPublisher(Publisher):
    """SEND persistent:true with a receipt; stomp.py with two hosts (module docstring)."""

    def __init__(
        self,
        endpoints: list[Endpoint],
        destination: str,
        *,
        name: str = "stomp",
        window: int = 200,
        max_count: int = 20000,
        stall_timeout: float = STALL_TIMEOUT,
    ) -> None:
        super().__init__(name, endpoints, window=window, max_count=max_count, stall_timeout=stall_timeout)
        self.destination = destination
        self._cond = threading.Condition()
        self._inflight: dict[str, str] = {}  # receipt id -> message id (the same string)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _on_receipt(self, receipt: str) -> None:
        with self._cond:
            message_id = self._inflight.pop(receipt, None)
            self._cond.notify_all()
        if message_id is not None:
            self._confirm((message_id,))

    def _connect(self, deadline: float) -> tuple[Any, _StompListener] | None:
        while time.monotonic() < deadline and not self._past_stop():
            hosts = rotated(self.endpoints, self._current)
            conn = stomp.Connection12(
                hosts,
                prefer_localhost=False,
                try_loopback_connect=False,
                reconnect_attempts_max=1,
                timeout=HANDSHAKE_TIMEOUT,
            )
            listener = _StompListener(self)
            conn.set_listener("publisher", listener)
            try:
                conn.connect(USER, PASSWORD, wait=False)
                if listener.connected.wait(HANDSHAKE_TIMEOUT) and conn.is_connected():
                    host_port = conn.transport.current_host_and_port
                    self._current = self.endpoints.index(tuple(host_port))
                    # No read timeout from here on: liveness is judged by confirmations.
                    conn.transport.socket.settimeout(None)
                    return conn, listener
                self.stats.errors.append(f"no CONNECTED from {conn.transport.current_host_and_port}")
            except stomp.exception.StompException as exc:
                self.stats.errors.append(f"connect: {exc!r}")
            except OSError as exc:
                self.stats.errors.append(f"connect: {exc!r}")
            _stomp_close(conn)
            self._current = (self._current + 1) % len(self.endpoints)
            time.sleep(0.05)  # reconnection back-off
        return None

    def run(self) -> None:
        self._publish_with_failover(self._one_connection, "receipts")

    def _one_connection(self, deadline: float) -> bool:
        connected = self._connect(deadline)
        if connected is None:
            return False
        conn, listener = connected
        self._publish(conn, listener)
        _stomp_close(conn)
        with self._cond:
            lost = list(self._inflight.values())
            self._inflight.clear()
        self._requeue(lost)
        return True

    def _publish(self, conn: Any, listener: _StompListener) -> None:
        """Publish on one connection until it fails, stalls, or everything is confirmed.

        stomp.py's receiver thread takes `_cond` to record a receipt, so SENDs go out without it
        held; a message is registered as in flight before its SEND, so its receipt always finds it.
        """
        headers = {"persistent": "true"}
        while True:
            batch: list[str] = []
            with self._cond:
                while len(self._inflight) < self.window:
                    message_id = self._take()
                    if message_id is None:
                        break
                    if not self._inflight:
                        self._progress()  # the wait for a receipt starts now
                    self._inflight[message_id] = message_id
                    batch.append(message_id)
            for message_id in batch:
                try:
                    conn.send(self.destination, message_id, headers=headers, receipt=message_id)
                except (stomp.exception.StompException, OSError) as exc:
                    self.stats.errors.append(f"send: {exc!r}")
                    return
            with self._cond:
                if not self._inflight and not self._has_more():
                    return
                if listener.disconnected.is_set():
                    self.stats.errors.append("disconnected")
                    return
                if self._stalled(len(self._inflight)):
                    self.stats.errors.append(
                        f"no receipt for {self.stall_timeout:g} s: dropping the connection"
                    )
                    return
                if self._past_stop():
                    return
                if len(self._inflight) >= self.window or not self._has_more():
                    self._cond.wait(0.05)


def _stomp_close(conn: Any) -> None:
    """Drop a stomp.py connection without a DISCONNECT handshake (its peer may be frozen or gone)."""
    with contextlib.suppress(Exception):
        sock = conn.transport.socket
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(Exception):
        conn.transport.stop()


class StompSpy:
    """A raw STOMP connection to one node that records every frame the broker sends back."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.sock = socket.create_connection(endpoint, timeout=5)
        self.parser = StompParser(version="1.2")
        self.frames: list[Frame] = []
        self.closed = False
        self.send(
            f"CONNECT\naccept-version:1.2\nhost:/\nlogin:{USER}\npasscode:{PASSWORD}\n\n".encode() + b"\0"
        )
        frame = self.next_frame(5.0)
        assert frame is not None and frame.command == "CONNECTED", frame

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_persistent(self, destination: str, message_id: str) -> None:
        """SEND persistent:true asking for a receipt named after the message."""
        self.send(
            f"SEND\ndestination:{destination}\npersistent:true\nreceipt:{message_id}\n\n{message_id}".encode()
            + b"\0"
        )

    def next_frame(self, timeout: float) -> Frame | None:
        """The next frame, or None on EOF or when none came within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            event = self.parser.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, Frame)
                self.frames.append(event)
                return event
            remaining = deadline - time.monotonic()
            if self.closed or remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return None
            except OSError:
                data = b""
            if not data:
                self.closed = True
            else:
                self.parser.feed(data)

    def read_until_closed(self, timeout: float) -> list[Frame]:
        """Every frame until the broker closes the connection (or `timeout`)."""
        deadline = time.monotonic() + timeout
        while not self.closed and time.monotonic() < deadline:
            self.next_frame(deadline - time.monotonic())
        return self.frames

    def close(self) -> None:
        self.sock.close()


# --- MQTT (paho-mqtt) -------------------------------------------------------------------------------------


class MqttPublisher(Publisher):
    """QoS 1 PUBLISHes to `topic`; paho-mqtt (3.1.1) that reconnects to the other host (module docstring)."""

    def __init__(
        self,
        endpoints: list[Endpoint],
        topic: str,
        *,
        name: str = "mqtt",
        window: int = 200,
        max_count: int = 20000,
        stall_timeout: float = STALL_TIMEOUT,
    ) -> None:
        super().__init__(name, endpoints, window=window, max_count=max_count, stall_timeout=stall_timeout)
        self.topic = topic
        self._cond = threading.Condition()
        self._inflight: dict[str, paho.MQTTMessageInfo] = {}  # id -> its PUBLISH
        self._acked = False  # a PUBACK came since the publishing thread last looked
        self._connected = threading.Event()
        self._disconnected = threading.Event()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        # paho calls this holding its own locks, which client.publish() takes too: only flag it here.
        with self._cond:
            self._acked = True
            self._cond.notify_all()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if not reason.is_failure:
            self._connected.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._disconnected.set()
        self._wake()

    def _connect(self, deadline: float) -> paho.Client | None:
        while time.monotonic() < deadline and not self._past_stop():
            host, port = self.endpoints[self._current]
            client = paho.Client(
                paho.CallbackAPIVersion.VERSION2,
                client_id=f"ha-{self.stats.name}",
                clean_session=True,
                protocol=paho.MQTTv311,
            )
            client.username_pw_set(USER, PASSWORD)
            client.max_inflight_messages_set(self.window)
            client.max_queued_messages_set(0)
            client.on_publish = self._on_publish
            client.on_disconnect = self._on_disconnect
            client.on_connect = self._on_connect
            self._connected.clear()
            self._disconnected.clear()
            try:
                client.connect(host, port, keepalive=10)
                client.loop_start()
                if self._connected.wait(HANDSHAKE_TIMEOUT):
                    return client
                self.stats.errors.append(f"no CONNACK from {host}:{port}")
            except OSError as exc:
                self.stats.errors.append(f"connect {host}:{port}: {exc!r}")
            _mqtt_close(client)
            self._current = (self._current + 1) % len(self.endpoints)
            time.sleep(0.05)  # reconnection back-off
        return None

    def run(self) -> None:
        self._publish_with_failover(self._one_connection, "PUBACKs")

    def _one_connection(self, deadline: float) -> bool:
        client = self._connect(deadline)
        if client is None:
            return False
        self._publish(client)
        _mqtt_close(client)
        lost = [m for m, info in self._inflight.items() if not info.is_published()]
        self._confirm(m for m, info in self._inflight.items() if info.is_published())
        self._inflight.clear()
        self._requeue(lost)
        self._current = (self._current + 1) % len(self.endpoints)
        return True

    def _publish(self, client: paho.Client) -> None:
        """Publish on one connection until it fails, stalls, or everything is confirmed. PUBACKs
        are read from each message's MQTTMessageInfo; no lock of ours is held around paho calls."""
        inflight = self._inflight
        while True:
            done = [acked for acked, info in inflight.items() if info.is_published()]
            for acked in done:
                del inflight[acked]
            if done:
                self._confirm(done)
            while len(inflight) < self.window and not self._disconnected.is_set():
                message_id = self._take()
                if message_id is None:
                    break
                if not inflight:
                    self._progress()  # the wait for a PUBACK starts now
                info = client.publish(self.topic, message_id.encode(), qos=1)
                if info.rc != paho.MQTT_ERR_SUCCESS:
                    self._requeue((message_id,))
                    self.stats.errors.append(f"publish: {paho.error_string(info.rc)}")
                    return
                inflight[message_id] = info
            if not inflight and not self._has_more():
                return
            if self._disconnected.is_set():
                self.stats.errors.append("disconnected")
                return
            if self._stalled(len(inflight)):
                self.stats.errors.append(f"no PUBACK for {self.stall_timeout:g} s: dropping the connection")
                return
            if self._past_stop():
                return
            with self._cond:
                self._cond.wait_for(lambda: self._acked, 0.05)
                self._acked = False


def _mqtt_close(client: paho.Client) -> None:
    """Drop a paho connection without DISCONNECT (its peer may be frozen or gone)."""
    with contextlib.suppress(Exception):
        sock = client.socket()
        if isinstance(sock, socket.socket):
            sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(Exception):
        client.loop_stop()


# --- outcome -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    confirmed: int
    delivered: int  # deliveries, duplicates included
    lost: tuple[str, ...]  # confirmed, never delivered
    duplicates: int  # deliveries beyond the first of a message
    unconfirmed_delivered: int  # delivered though never confirmed (published as the node died)


def count_outcome(confirmed: set[str], delivered: list[str], prefix: str = "") -> Outcome:
    mine = [d for d in delivered if d.startswith(prefix)]
    unique = set(mine)
    lost = tuple(sorted(confirmed - unique, key=lambda i: int(i.rsplit("-", 1)[1])))
    return Outcome(
        confirmed=len(confirmed),
        delivered=len(mine),
        lost=lost,
        duplicates=len(mine) - len(unique),
        unconfirmed_delivered=len(unique - confirmed),
    )


class MqttClient:
    """A paho-mqtt (3.1.1) client connected to the first endpoint that serves; records messages."""

    def __init__(
        self, endpoints: list[Endpoint], client_id: str, *, clean_session: bool, timeout: float = 20.0
    ) -> None:
        self.messages: list[paho.MQTTMessage] = []
        self.session_present: bool | None = None
        self._cond = threading.Condition()
        deadline = time.monotonic() + timeout
        index = 0
        while True:
            host, port = endpoints[index % len(endpoints)]
            index += 1
            client = paho.Client(
                paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session
            )
            client.username_pw_set(USER, PASSWORD)
            client.on_connect = self._on_connect
            client.on_message = self._on_message
            try:
                client.connect(host, port, keepalive=10)
                client.loop_start()
                with self._cond:
                    if self._cond.wait_for(lambda: self.session_present is not None, HANDSHAKE_TIMEOUT):
                        self.client = client
                        return
            except OSError:
                pass
            _mqtt_close(client)
            if time.monotonic() > deadline:
                raise AssertionError(f"no MQTT endpoint of {endpoints} accepted {client_id}")
            time.sleep(0.05)  # reconnection back-off

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        with self._cond:
            if not reason.is_failure:
                self.session_present = bool(flags.session_present)
            self._cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *args: done.set()
        self.client.subscribe(topic, qos)
        assert done.wait(10), f"no SUBACK for {topic}"

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """QoS 1; returns once the broker sent PUBACK."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)
        assert info.is_published(), f"no PUBACK for {topic}"

    def wait_messages(self, count: int, timeout: float = 10.0) -> list[paho.MQTTMessage]:
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.messages) >= count, timeout)
            assert ok, f"{len(self.messages)} MQTT messages, expected {count}"
            return list(self.messages)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        _mqtt_close(self.client)


class StompClient(stomp.ConnectionListener):
    """A stomp.py 1.2 connection given both hosts (tried in order); records messages and receipts."""

    def __init__(
        self, endpoints: list[Endpoint], *, headers: dict[str, str] | None = None, timeout: float = 20.0
    ) -> None:
        self.messages: list[Any] = []
        self.receipts: list[str] = []
        self._cond = threading.Condition()
        deadline = time.monotonic() + timeout
        while True:
            conn = stomp.Connection12(
                endpoints,
                prefer_localhost=False,
                try_loopback_connect=False,
                reconnect_attempts_max=1,
                timeout=HANDSHAKE_TIMEOUT,
            )
            conn.set_listener("client", self)
            try:
                conn.connect(USER, PASSWORD, wait=True, headers=headers or None)
                conn.transport.socket.settimeout(None)
                self.conn = conn
                return
            except (stomp.exception.StompException, OSError):
                _stomp_close(conn)
            if time.monotonic() > deadline:
                raise AssertionError(f"no STOMP endpoint of {endpoints} accepted a connection")
            time.sleep(0.05)  # reconnection back-off

    def on_message(self, frame: Any) -> None:
        with self._cond:
            self.messages.append(frame)
            self._cond.notify_all()

    def on_receipt(self, frame: Any) -> None:
        with self._cond:
            self.receipts.append(frame.headers["receipt-id"])
            self._cond.notify_all()

    def wait_messages(self, count: int, timeout: float = 10.0) -> list[Any]:
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.messages) >= count, timeout)
            assert ok, f"{len(self.messages)} STOMP messages, expected {count}"
            return list(self.messages)

    def wait_receipt(self, receipt: str, timeout: float = 10.0) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: receipt in self.receipts, timeout), f"no RECEIPT {receipt}"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.disconnect()
        _stomp_close(self.conn)
