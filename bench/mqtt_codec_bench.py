"""Micro-benchmark of the MQTT codec's hot paths, side by side with the `mqtt5` package (Rust).

Each row is one operation done the way the broker does it, timed per packet (best of several rounds,
one core): decoding PUBLISH / PUBACK packets fed as a socket delivers them (64 KiB reads, packets
straddling reads), and encoding PUBLISH deliveries and PUBACKs. The `mqtt5` column does the same work
through `mqtt5.read` and `*Packet(...).write()`; it is empty for 3.1.1, which the package does not
speak. Results and the decision they support are in docs/mqtt-codec.md.

Run: /work/venv/bin/python bench/mqtt_codec_bench.py [--packets N] [--payload BYTES] [--rounds R]
Must not import: broker, storage, cluster (it measures the codec alone).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocols.mqtt.codec import (  # noqa: E402  (after the sys.path line, to run from a checkout)
    NEED_DATA,
    NO_PROPERTIES,
    MqttParser,
    encode,
    encode_properties,
    encode_publish,
    encode_string,
)
from protocols.mqtt.packets import PacketType, Properties, PubAck, Publish  # noqa: E402

TOPIC = "sensors/building-7/floor-3/room-12/temperature"
READ_SIZE = 65536
USER_PROPERTIES = [("trace", "abc123")]
EXPIRY = 60

Run = Callable[[], object]


def per_packet_us(count: int, run: Run, rounds: int) -> float:
    """Microseconds per packet of the fastest of `rounds` runs of `run`, which handles `count` packets."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best / count * 1e6


def reads_of(packet: bytes, count: int) -> list[bytes]:
    stream = packet * count
    return [stream[i : i + READ_SIZE] for i in range(0, len(stream), READ_SIZE)]


def decode_ours(reads: list[bytes], level: int) -> Run:
    def run() -> int:
        parser = MqttParser(server_side=False, protocol_level=level)
        feed = parser.feed
        next_packet = parser.next_packet
        count = 0
        for data in reads:
            feed(data)
            while next_packet() is not NEED_DATA:
                count += 1
        return count

    return run


def decode_mqtt5(reads: list[bytes]) -> Run:
    import mqtt5

    read = mqtt5.read

    def run() -> int:
        # The reassembly a driver needs around mqtt5.read: keep the unconsumed tail, append the next
        # read, parse until the package reports a short buffer (it raises IndexError).
        count = 0
        tail = b""
        for data in reads:
            buf = tail + data if tail else data
            view = memoryview(buf)
            pos = 0
            end = len(buf)
            while pos < end:
                try:
                    _, used = read(view[pos:])
                except IndexError:
                    break
                pos += used
                count += 1
            tail = buf[pos:]
        return count

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=200_000)
    parser.add_argument("--payload", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    n: int = args.packets
    payload = bytes(range(256)) * (args.payload // 256) + bytes(args.payload % 256)
    props = Properties(message_expiry_interval=EXPIRY, user_properties=USER_PROPERTIES)
    topic_field = encode_string(TOPIC)  # cached per message by the session
    props_field = encode_properties(props, PacketType.PUBLISH)  # likewise

    mqtt5: Any
    try:
        import mqtt5
    except ImportError:  # the comparison column stays empty
        mqtt5 = None

    def publish_wire(level: int, qos: int, properties: Properties | None = None) -> bytes:
        return encode(Publish(TOPIC, payload, qos, packet_id=qos and 7, properties=properties), level)

    cases: list[tuple[str, Run, Run | None]] = []
    for qos in (0, 1):
        cases.append(
            (f"decode PUBLISH QoS {qos}, 3.1.1", decode_ours(reads_of(publish_wire(4, qos), n), 4), None)
        )
    for qos in (0, 1):
        reads = reads_of(publish_wire(5, qos), n)
        cases.append((f"decode PUBLISH QoS {qos}, 5.0", decode_ours(reads, 5), mqtt5 and decode_mqtt5(reads)))
    reads = reads_of(publish_wire(5, 1, props), n)
    cases.append(
        ("decode PUBLISH QoS 1 + properties, 5.0", decode_ours(reads, 5), mqtt5 and decode_mqtt5(reads))
    )
    reads = reads_of(encode(PubAck(7), 5), n)
    cases.append(("decode PUBACK, 5.0", decode_ours(reads, 5), mqtt5 and decode_mqtt5(reads)))

    def ours_encode(qos: int, properties: bytes) -> Run:
        def run() -> None:
            for i in range(n):
                encode_publish(topic_field, payload, qos, qos and (i & 0xFFFF or 1), False, False, properties)

        return run

    def mqtt5_encode(qos: int, **extra: Any) -> Run:
        def run() -> None:
            level = mqtt5.QoS(qos)
            publish_packet = mqtt5.PublishPacket
            for i in range(n):
                publish_packet(
                    TOPIC, payload, qos=level, packet_id=qos and (i & 0xFFFF or 1) or None, **extra
                ).write()

        return run

    def ours_encode_generic() -> None:
        for i in range(n):
            encode(Publish(TOPIC, payload, 1, packet_id=i & 0xFFFF or 1), 5)

    def ours_encode_puback() -> None:
        for i in range(n):
            encode(PubAck(i & 0xFFFF or 1), 5)

    def mqtt5_encode_puback() -> None:
        for i in range(n):
            mqtt5.PubAckPacket(i & 0xFFFF or 1).write()

    with_props = {"message_expiry_interval": EXPIRY, "user_properties": USER_PROPERTIES}
    for qos in (0, 1):
        cases.append(
            (
                f"encode PUBLISH QoS {qos} delivery, 5.0",
                ours_encode(qos, NO_PROPERTIES),
                mqtt5 and mqtt5_encode(qos),
            )
        )
    cases.append(
        (
            "encode PUBLISH QoS 1 + properties, 5.0",
            ours_encode(1, props_field),
            mqtt5 and mqtt5_encode(1, **with_props),
        )
    )
    cases.append(("encode PUBLISH QoS 1 delivery, 3.1.1", ours_encode(1, b""), None))
    cases.append(("encode(Publish(...)) QoS 1, 5.0, nothing cached", ours_encode_generic, None))
    cases.append(("encode PUBACK, 5.0", ours_encode_puback, mqtt5 and mqtt5_encode_puback))

    print(f"Python {sys.version.split()[0]}; {n} packets per round, best of {args.rounds} rounds;")
    print(f"payload {len(payload)} bytes, topic {len(TOPIC)} bytes; times in microseconds per packet")
    width = max(len(name) for name, _, _ in cases)
    print(f"{'operation':<{width}}  {'ours':>7}  {'mqtt5':>7}  ours/mqtt5")
    for name, ours, theirs in cases:
        ours_us = per_packet_us(n, ours, args.rounds)
        if theirs is None:
            print(f"{name:<{width}}  {ours_us:7.3f}  {'n/a':>7}")
            continue
        theirs_us = per_packet_us(n, theirs, args.rounds)
        print(f"{name:<{width}}  {ours_us:7.3f}  {theirs_us:7.3f}  {ours_us / theirs_us:6.2f}x")


if __name__ == "__main__":
    main()
