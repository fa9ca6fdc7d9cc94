"""In-process benchmark of the STOMP session path (not a test): SEND -> publish -> deliver -> MESSAGE, no sockets.

One publisher session and one subscriber session over the real core and the memory store, each with a
connection that only collects bytes. SEND frames are fed in 64 KiB reads, as a busy socket delivers them;
with `--ack client-individual` the subscriber's ACK frames are fed back after every read, as the bench
harness's load generator does. Prints messages per second; compare runs on the same machine only.

    PYTHONPATH=. python bench/stomp_session_bench.py [--seconds 3] [--size 16] [--ack auto|client-individual]

Must not import: asyncio, storage backends other than the memory store, cluster.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable

from broker.auth import Authenticator
from broker.config import Config
from broker.context import FlowGate, ServerContext
from broker.core import Broker
from protocols.stomp.codec import encode_frame
from protocols.stomp.session import StompSession
from storage.memory import MemoryStore

_ACK_ID = re.compile(rb"\nack:(\d+)\n")


class SinkConnection:
    """protocols.session.Connection that keeps what is written until the benchmark takes it."""

    peer = "127.0.0.1:1"
    is_loopback = True
    transport_name = "tcp"
    subprotocol = None
    writable = True

    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> object:
        return _NoTimer()

    def now(self) -> float:
        return time.monotonic()


class _NoTimer:
    def cancel(self) -> None: ...


def run(seconds: float, size: int, ack: str, chunk: int = 65536) -> float:
    config = Config()
    broker = Broker(MemoryStore(schedule=lambda callback: callback()))
    context = ServerContext(
        broker=broker, auth=Authenticator(config), config=config, flow=FlowGate(broker, 1 << 30)
    )
    sessions = []
    for _ in range(2):
        conn = SinkConnection()
        session = StompSession(context)
        session.connection_made(conn)
        session.data_received(encode_frame("CONNECT", [("accept-version", "1.2"), ("host", "/")]))
        conn.out.clear()
        sessions.append((session, conn))
    (publisher, _), (subscriber, sub_conn) = sessions
    headers = [("destination", "/queue/bench"), ("ack", ack)]
    if ack != "auto":
        headers.append(("prefetch-count", "1000"))
    subscriber.data_received(encode_frame("SUBSCRIBE", [("id", "0"), *headers]))
    frame = encode_frame(
        "SEND", [("destination", "/queue/bench"), ("content-length", str(size))], b"x" * size
    )
    stream = frame * max(1, chunk // len(frame))
    per_read = stream.count(b"SEND")
    received = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        publisher.data_received(stream)
        out = sub_conn.out
        received += len(out)
        if ack != "auto":
            acks = b"".join(b"ACK\nid:%s\n\n\0" % m.group(1) for m in _ACK_ID.finditer(b"".join(out)))
            out.clear()
            subscriber.data_received(acks)
            received += len(out)
        out.clear()
    elapsed = time.perf_counter() - start
    assert received >= per_read, "the subscriber received nothing"
    return received / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--ack", choices=("auto", "client-individual"), default="auto")
    args = parser.parse_args()
    rate = run(args.seconds, args.size, args.ack)
    print(f"STOMP session SEND->MESSAGE ({args.ack}, {args.size} B): {rate:>12,.0f} msg/s")


if __name__ == "__main__":
    main()
