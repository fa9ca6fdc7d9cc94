"""Confirmed persistent writes per second through a Store, as the broker drives it.

An asyncio loop plays the broker's event loop: many producers each keep a window of unconfirmed
persistent messages, `append` a MessageEnqueued and register a `when_durable` callback per
message; a callback confirms one message (the broker would send basic.ack / PUBACK / RECEIPT).
The store's `schedule` is `loop.call_soon_threadsafe`, as in the composition root. Scenarios:

- publish:        nobody consumes; the queues grow (every message is inserted);
- ack-after:      a consumer acknowledges each message once it is confirmed (MessageRemoved in a
                  later group commit: an INSERT now, a DELETE later);
- ack-before:     a fast consumer acknowledges each message before its group commit (the store
                  elides both writes; only the fsync and the callbacks remain).

    /work/venv/bin/python bench/store_bench.py [--seconds 3] [--producers 50] [--window 200]
        [--store sqlite|memory] [--synchronous FULL]

Must not import: protocols, cluster, broker.core.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.journal import MessageEnqueued, MessageRemoved, Store  # noqa: E402
from broker.message import Message, Properties  # noqa: E402
from storage.memory import MemoryStore  # noqa: E402
from storage.sqlite import SqliteStore  # noqa: E402

PERSISTENT = Properties(delivery_mode=2)


SCENARIOS = ("publish", "ack-after", "ack-before")


async def run_scenario(
    store: Store, body_size: int, producers: int, window: int, seconds: float, scenario: str
) -> tuple[int, float]:
    """Returns (confirmed messages, elapsed seconds)."""
    body = b"x" * body_size
    next_id = store.open().next_msg_id
    confirmed = 0
    stop_at = time.perf_counter() + seconds
    loop = asyncio.get_running_loop()

    async def producer(index: int) -> None:
        nonlocal next_id, confirmed
        queue = f"bench-{index}"
        outstanding = 0
        resume: asyncio.Future[None] | None = None

        def on_durable(msg_id: int) -> None:
            nonlocal outstanding, confirmed, resume
            outstanding -= 1
            confirmed += 1
            if scenario == "ack-after":
                store.append(MessageRemoved("/", queue, msg_id))
            if resume is not None and outstanding <= window // 2 and not resume.done():
                resume.set_result(None)

        while time.perf_counter() < stop_at:
            # Publish up to the window, then wait until half of it is confirmed.
            while outstanding < window:
                msg_id = next_id
                next_id += 1
                store.append(MessageEnqueued("/", (queue,), Message("", queue, body, PERSISTENT, msg_id)))
                if scenario == "ack-before":
                    store.append(MessageRemoved("/", queue, msg_id))
                store.when_durable(partial(on_durable, msg_id))
                outstanding += 1
            resume = loop.create_future()
            await resume
        while outstanding:
            resume = loop.create_future()
            await resume

    started = time.perf_counter()
    await asyncio.gather(*(producer(i) for i in range(producers)))
    elapsed = time.perf_counter() - started
    await asyncio.to_thread(store.close)
    return confirmed, elapsed


def make_store(kind: str, directory: Path, loop: asyncio.AbstractEventLoop, synchronous: str) -> Store:
    if kind == "memory":
        return MemoryStore(loop.call_soon_threadsafe)
    return SqliteStore(directory / "bench.sqlite3", loop.call_soon_threadsafe, synchronous=synchronous)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--producers", type=int, default=50)
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--store", choices=("sqlite", "memory"), default="sqlite")
    parser.add_argument("--synchronous", default="FULL")
    args = parser.parse_args()
    loop = asyncio.get_running_loop()
    print(
        f"store={args.store} synchronous={args.synchronous} producers={args.producers} "
        f"window={args.window} seconds={args.seconds}"
    )
    for scenario in SCENARIOS:
        for body_size in (16, 1024):
            with tempfile.TemporaryDirectory(prefix="store-bench-") as tmp:
                store = make_store(args.store, Path(tmp), loop, args.synchronous)
                confirmed, elapsed = await run_scenario(
                    store, body_size, args.producers, args.window, args.seconds, scenario
                )
            print(
                f"{scenario:<10} {body_size:>5} B  {confirmed / elapsed:>10,.0f} confirmed msgs/s"
                f"  ({confirmed} in {elapsed:.2f} s)"
            )


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())
