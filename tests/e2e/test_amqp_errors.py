"""AMQP 0-9-1 connection errors, limits and heartbeats over a raw socket against a real broker process.

Client libraries do not send broken frames, so these tests speak the wire themselves (encoding with the
codec's encoders, decoding with its parser) and check each hard error's reply code and scope (AMQP
0-9-1 §1.2: Connection.Close, then the socket closes after our close-ok), the wrong protocol header,
frame-size and channel-count limits, and that a silent peer is dropped after two heartbeat intervals.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pamqp import base
from pamqp.commands import Basic, Channel, Connection, Queue

from broker.message import Properties
from protocols.amqp091.codec import (
    HEARTBEAT_FRAME,
    NEED_DATA,
    PROTOCOL_HEADER,
    AmqpParser,
    Heartbeat,
    encode_content,
    encode_method,
)
from tests.e2e.broker_process import BrokerProcess

CHANNEL_MAX = 4
MAX_BODY = 65536
FRAME_MAX = 131072


@pytest.fixture(scope="module")
def amqp_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    env = {
        "POLYBROKER_LIMITS_AMQP_CHANNEL_MAX": str(CHANNEL_MAX),
        "POLYBROKER_LIMITS_MAX_FRAME_SIZE": str(MAX_BODY),
        "POLYBROKER_LIMITS_HEARTBEAT": "1",
    }
    proc = BrokerProcess(tmp_path_factory.mktemp("amqp-errors") / "data", env=env)
    proc.start(wait=("amqp",))
    yield proc
    proc.kill()
    assert "Traceback" not in proc.log(), proc.log()


class RawClient:
    """A blocking socket speaking AMQP frames, for what no client library sends."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.parser = AmqpParser(FRAME_MAX)
        self.parser.feed(PROTOCOL_HEADER)  # the parser is a server's: let it skip the header it expects
        self.parser.next_frame()
        self.frames: list[tuple[int, Any]] = []

    def send(self, *chunks: bytes) -> None:
        self.sock.sendall(b"".join(chunks))

    def method(self, channel: int, method: base.Frame) -> None:
        self.send(encode_method(channel, method))

    def next(self, timeout: float = 10.0) -> tuple[int, Any]:
        """The next frame from the broker (heartbeats included)."""
        deadline = time.monotonic() + timeout
        while not self.frames:
            item = self.parser.next_frame()
            if item is not NEED_DATA:
                self.frames.append(item)
                break
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the broker closed the connection")
            self.parser.feed(data)
        return self.frames.pop(0)

    def expect(self, kind: type, timeout: float = 10.0) -> Any:
        """Skip heartbeats; the next method must be a `kind`."""
        while True:
            channel, frame = self.next(timeout)
            if not isinstance(frame, Heartbeat):
                assert isinstance(frame, kind), frame
                return frame

    def handshake(self, heartbeat: int = 0, vhost: str = "/", channel_max: int = CHANNEL_MAX) -> None:
        self.send(PROTOCOL_HEADER)
        self.expect(Connection.Start)
        self.method(
            0,
            Connection.StartOk(
                client_properties={"capabilities": {"authentication_failure_close": True}},
                mechanism="PLAIN",
                response="\x00guest\x00guest",
                locale="en_US",
            ),
        )
        tune = self.expect(Connection.Tune)
        self.method(
            0,
            Connection.TuneOk(
                channel_max=channel_max, frame_max=min(FRAME_MAX, tune.frame_max), heartbeat=heartbeat
            ),
        )
        self.method(0, Connection.Open(virtual_host=vhost))

    def open(self, heartbeat: int = 0) -> RawClient:
        self.handshake(heartbeat)
        self.expect(Connection.OpenOk)
        self.method(1, Channel.Open())
        self.expect(Channel.OpenOk)
        return self

    def closed_by_broker(self, code: int) -> Any:
        """Connection.Close with `code`; after our close-ok the broker closes the socket."""
        close = self.expect(Connection.Close)
        assert close.reply_code == code, close
        self.method(0, Connection.CloseOk())
        self.sock.settimeout(10)
        assert self.sock.recv(65536) == b""
        return close

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(amqp_broker: BrokerProcess) -> Iterator[RawClient]:
    client = RawClient(amqp_broker.ports["amqp"])
    yield client
    client.close()


def test_wrong_protocol_header_is_answered_with_ours(raw: RawClient) -> None:
    raw.send(b"AMQP\x00\x00\x08\x00")
    raw.sock.settimeout(10)
    received = b""
    while chunk := raw.sock.recv(100):
        received += chunk
    assert received == PROTOCOL_HEADER


def test_501_frame_above_frame_max(raw: RawClient) -> None:
    raw.open()
    body = b"x" * (FRAME_MAX + 8)
    raw.send(struct.pack(">BHI", 3, 1, len(body)), body, b"\xce")
    assert "frame_max" in raw.closed_by_broker(501).reply_text


def test_501_bad_frame_end(raw: RawClient) -> None:
    raw.open()
    frame = bytearray(encode_method(1, Queue.Declare(queue="q")))
    frame[-1] = 0x00
    raw.send(bytes(frame))
    raw.closed_by_broker(501)


def test_501_body_above_max_message_size(raw: RawClient) -> None:
    raw.open()
    raw.send(
        encode_content(1, Basic.Publish(routing_key="q"), Properties(), b"x" * (MAX_BODY + 1), FRAME_MAX)
    )
    raw.closed_by_broker(501)


def test_502_syntax_error(raw: RawClient) -> None:
    raw.open()
    payload = struct.pack(">HH", 50, 10) + b"\x00\x00\xff"
    raw.send(struct.pack(">BHI", 1, 1, len(payload)), payload, b"\xce")
    close = raw.closed_by_broker(502)
    assert (close.class_id, close.method_id) == (50, 10)


def test_503_command_invalid(raw: RawClient) -> None:
    raw.open()
    deliver = Basic.Deliver(consumer_tag="c", delivery_tag=1, exchange="", routing_key="q")
    raw.send(encode_content(1, deliver, Properties(), b"a server's method", FRAME_MAX))
    assert "basic.deliver" in raw.closed_by_broker(503).reply_text


def test_503_connection_method_out_of_order(raw: RawClient) -> None:
    raw.open()
    raw.method(0, Connection.Open(virtual_host="/"))
    raw.closed_by_broker(503)


def test_504_channel_not_open(raw: RawClient) -> None:
    raw.open()
    raw.method(3, Queue.Declare(queue="q"))
    assert "channel.open" in raw.closed_by_broker(504).reply_text


def test_505_unexpected_frame(raw: RawClient) -> None:
    raw.open()
    content = encode_content(1, Basic.Publish(routing_key="q"), Properties(), b"abc", FRAME_MAX)
    method_frame = 7 + struct.unpack_from(">I", content, 3)[0] + 1
    raw.send(content[method_frame:])
    raw.closed_by_broker(505)


def test_530_unknown_vhost(raw: RawClient) -> None:
    raw.handshake(vhost="no-such-vhost")
    assert "no-such-vhost" in raw.closed_by_broker(530).reply_text


def test_530_channel_count_limit(raw: RawClient) -> None:
    raw.open()
    for number in range(2, CHANNEL_MAX + 1):
        raw.method(number, Channel.Open())
        raw.expect(Channel.OpenOk)
    raw.method(CHANNEL_MAX + 1, Channel.Open())
    assert "channel_max" in raw.closed_by_broker(530).reply_text


def test_530_tune_ok_above_our_channel_max(raw: RawClient) -> None:
    raw.handshake(channel_max=CHANNEL_MAX + 1)
    raw.closed_by_broker(530)


def test_540_not_implemented(raw: RawClient) -> None:
    raw.open()
    payload = struct.pack(">HH", 60, 250)
    raw.send(struct.pack(">BHI", 1, 1, len(payload)), payload, b"\xce")
    raw.closed_by_broker(540)


def test_bad_credentials_403(raw: RawClient) -> None:
    raw.send(PROTOCOL_HEADER)
    raw.expect(Connection.Start)
    raw.method(
        0,
        Connection.StartOk(
            client_properties={"capabilities": {"authentication_failure_close": True}},
            mechanism="PLAIN",
            response="\x00guest\x00nope",
            locale="en_US",
        ),
    )
    raw.closed_by_broker(403)


def test_channel_error_keeps_the_connection(raw: RawClient) -> None:
    raw.open()
    raw.method(1, Queue.Declare(queue="missing", passive=True))
    close = raw.expect(Channel.Close)
    assert close.reply_code == 404 and close.reply_text.startswith("NOT_FOUND - ")
    raw.method(1, Channel.CloseOk())
    raw.method(1, Channel.Open())
    raw.expect(Channel.OpenOk)


def test_heartbeats_keep_a_live_peer_and_drop_a_silent_one(raw: RawClient) -> None:
    raw.open(heartbeat=1)
    # A peer that answers heartbeats stays connected well past two intervals.
    start = time.monotonic()
    beats = 0
    while time.monotonic() - start < 3:
        channel, frame = raw.next(timeout=5)
        if isinstance(frame, Heartbeat):
            beats += 1
            raw.send(HEARTBEAT_FRAME)
    assert beats >= 3
    # Then it falls silent: the broker closes the socket after about two intervals.
    silent_since = time.monotonic()
    with pytest.raises(ConnectionError):
        while True:
            raw.next(timeout=10)
    assert 1.5 < time.monotonic() - silent_since < 6
