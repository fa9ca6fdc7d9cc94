"""Micro-benchmark of the STOMP codec hot paths (not a test): SEND frames parsed/s, MESSAGE frames encoded/s.

Run from the repository root: `PYTHONPATH=. python bench/stomp_codec_bench.py [--frames N] [--body BYTES] [--chunk BYTES]`. SEND frames are fed
in socket-sized chunks so most reads end inside a frame, as they do under load.

Must not import: asyncio, the broker core, storage, cluster.
"""

from __future__ import annotations

import argparse
import time

from protocols.stomp.codec import (
    NEED_DATA,
    StompParser,
    encode_frame,
    encode_headers,
    encode_message,
    message_prefix,
)


def bench_parse(frames: int, body_size: int, chunk: int, crlf: bool) -> float:
    headers = [
        ("destination", "/queue/bench"),
        ("content-type", "text/plain"),
        ("persistent", "true"),
        ("receipt", "r-1"),
    ]
    one = encode_frame("SEND", headers, b"x" * body_size)
    if crlf:
        one = one.replace(b"\n", b"\r\n")
    stream = one * frames
    chunks = [stream[i : i + chunk] for i in range(0, len(stream), chunk)]
    parser = StompParser()
    parsed = 0
    start = time.perf_counter()
    for data in chunks:
        parser.feed(data)
        while parser.next_event() is not NEED_DATA:
            parsed += 1
    elapsed = time.perf_counter() - start
    assert parsed == frames, parsed
    return frames / elapsed


def bench_encode(frames: int, body_size: int) -> float:
    prefix = message_prefix([("subscription", "sub-0")])
    body = b"x" * body_size
    # Per-message header lines are encoded once per message and shared by its subscribers; per-delivery
    # lines (the 1.2 ack id) are built per frame, as a session would.
    message_headers = encode_headers(
        [("destination", "/queue/bench"), ("message-id", "T-1-42"), ("content-type", "text/plain")]
    )
    start = time.perf_counter()
    for tag in range(frames):
        encode_message(prefix, message_headers, body, b"ack:%d\n" % tag)
    elapsed = time.perf_counter() - start
    return frames / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=200_000)
    parser.add_argument("--body", type=int, default=100)
    parser.add_argument("--chunk", type=int, default=65536)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    best_lf = max(bench_parse(args.frames, args.body, args.chunk, crlf=False) for _ in range(args.rounds))
    best_crlf = max(bench_parse(args.frames, args.body, args.chunk, crlf=True) for _ in range(args.rounds))
    best_enc = max(bench_encode(args.frames, args.body) for _ in range(args.rounds))
    print(f"SEND frames parsed/s (LF,   {args.body} B body, {args.chunk} B reads): {best_lf:,.0f}")
    print(f"SEND frames parsed/s (CRLF, {args.body} B body, {args.chunk} B reads): {best_crlf:,.0f}")
    print(f"MESSAGE frames encoded/s ({args.body} B body):                     {best_enc:,.0f}")


if __name__ == "__main__":
    main()
