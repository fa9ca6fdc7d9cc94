"""Micro-benchmark of the AMQP 0-9-1 codec's per-message paths against pamqp's generic marshal/unmarshal.

Measures, per message: decoding a publish (Basic.Publish + content header + body frames, parsed from a
stream of many messages and assembled), decoding consumer acks, encoding a delivery (Basic.Deliver +
header + body) and encoding publisher confirms. Run: `python bench/amqp_codec_bench.py [--n 20000]`.

Must not import: asyncio, broker internals other than broker.message, storage, cluster.
"""

from __future__ import annotations

import argparse
import functools
import struct
import time
from collections.abc import Callable

from pamqp import body as pamqp_body
from pamqp import frame as pamqp_frame
from pamqp import header as pamqp_header
from pamqp.commands import Basic

from broker.message import Properties
from protocols.amqp091.codec import (
    NEED_DATA,
    PROTOCOL_HEADER,
    AmqpParser,
    ContentAssembler,
    encode_basic_ack,
    encode_delivery,
    encode_properties,
)

BODY = b"x" * 100
HEADERS: dict[str, str | int] = {"x-trace-id": "4bf92f3577b34da6", "x-retries": 3, "x-origin": "billing"}
CHUNK = 65536
_SIZE = struct.Struct(">I")


def _pamqp_properties(with_headers: bool) -> Basic.Properties:
    if with_headers:
        return Basic.Properties(content_type="application/json", delivery_mode=2, headers=dict(HEADERS))
    return Basic.Properties(delivery_mode=2)


def _our_properties(with_headers: bool) -> Properties:
    if with_headers:
        return Properties(content_type="application/json", delivery_mode=2, headers=dict(HEADERS))
    return Properties(delivery_mode=2)


def _publish_stream(n: int, with_headers: bool) -> bytes:
    one = b"".join(
        (
            pamqp_frame.marshal(Basic.Publish(exchange="amq.topic", routing_key="sensors.kitchen.temp"), 1),
            pamqp_frame.marshal(pamqp_header.ContentHeader(0, len(BODY), _pamqp_properties(with_headers)), 1),
            pamqp_frame.marshal(pamqp_body.ContentBody(BODY), 1),
        )
    )
    return one * n


def _chunks(data: bytes) -> list[bytes]:
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]


def pamqp_decode(chunks: list[bytes]) -> int:
    """pamqp's unmarshal on exact frame slices (we find the frame boundaries, so only its decoding counts)."""
    buf = b""
    count = 0
    for chunk in chunks:
        buf = buf + chunk
        pos = 0
        while len(buf) - pos >= 8:
            end = pos + 8 + _SIZE.unpack_from(buf, pos + 3)[0]
            if end > len(buf):
                break
            _consumed, _channel, frame = pamqp_frame.unmarshal(buf[pos:end])
            pos = end
            if isinstance(frame, (pamqp_body.ContentBody, Basic.Ack)):
                count += 1
        buf = buf[pos:]
    return count


def our_decode(chunks: list[bytes]) -> int:
    parser = AmqpParser()
    parser.feed(PROTOCOL_HEADER)
    parser.next_frame()
    assembler = ContentAssembler()
    count = 0
    for chunk in chunks:
        parser.feed(chunk)
        while (item := parser.next_frame()) is not NEED_DATA:
            if assembler.process(item[1]) is not None:  # type: ignore[arg-type]
                count += 1
    return count


def pamqp_encode_delivery(n: int, with_headers: bool) -> None:
    props = _pamqp_properties(with_headers)
    for tag in range(1, n + 1):
        b"".join(
            (
                pamqp_frame.marshal(
                    Basic.Deliver("ctag-1", tag, False, "amq.topic", "sensors.kitchen.temp"), 1
                ),
                pamqp_frame.marshal(pamqp_header.ContentHeader(0, len(BODY), props), 1),
                pamqp_frame.marshal(pamqp_body.ContentBody(BODY), 1),
            )
        )


def our_encode_delivery(n: int, with_headers: bool) -> None:
    props = _our_properties(with_headers)
    for tag in range(1, n + 1):
        encode_delivery(1, "ctag-1", tag, False, "amq.topic", "sensors.kitchen.temp", props, BODY, 131072)


def our_encode_delivery_cached(n: int, with_headers: bool) -> None:
    """Properties encoded once per message (fan-out), consumer tag encoded once per consumer."""
    props = encode_properties(_our_properties(with_headers))
    for tag in range(1, n + 1):
        encode_delivery(1, b"ctag-1", tag, False, "amq.topic", "sensors.kitchen.temp", props, BODY, 131072)


def _timed(fn: Callable[[], object], n: int, repeat: int = 7) -> float:
    """Best of `repeat` runs, in microseconds per message."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="messages per measurement")
    n = parser.parse_args().n

    rows: list[tuple[str, float, float]] = []
    for with_headers in (False, True):
        label = "headers" if with_headers else "minimal"
        chunks = _chunks(_publish_stream(n, with_headers))
        assert pamqp_decode(chunks) == n and our_decode(chunks) == n
        rows.append(
            (
                f"decode publish ({label})",
                _timed(functools.partial(pamqp_decode, chunks), n),
                _timed(functools.partial(our_decode, chunks), n),
            )
        )
        rows.append(
            (
                f"encode delivery ({label})",
                _timed(lambda: pamqp_encode_delivery(n, with_headers), n),  # noqa: B023 - called at once
                _timed(lambda: our_encode_delivery(n, with_headers), n),  # noqa: B023
            )
        )
        rows.append(
            (
                f"encode delivery ({label}, props cached)",
                float("nan"),
                _timed(lambda: our_encode_delivery_cached(n, with_headers), n),  # noqa: B023
            )
        )

    acks = _chunks(b"".join(pamqp_frame.marshal(Basic.Ack(tag, False), 1) for tag in range(1, n + 1)))
    rows.append(
        ("decode basic.ack", _timed(lambda: pamqp_decode(acks), n), _timed(lambda: our_decode(acks), n))
    )
    rows.append(
        (
            "encode basic.ack (confirm)",
            _timed(lambda: [pamqp_frame.marshal(Basic.Ack(t, False), 1) for t in range(n)], n),
            _timed(lambda: [encode_basic_ack(1, t, False) for t in range(n)], n),
        )
    )

    print(f"{'per message':42} {'pamqp µs':>9} {'ours µs':>9} {'speed-up':>9}")
    for name, theirs, ours in rows:
        if theirs != theirs:  # NaN: no pamqp counterpart
            print(f"{name:42} {'-':>9} {ours:9.2f} {'-':>9}")
        else:
            print(f"{name:42} {theirs:9.2f} {ours:9.2f} {theirs / ours:8.1f}x")


if __name__ == "__main__":
    main()
