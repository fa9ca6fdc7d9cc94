"""In-process benchmark of the core: publish -> route -> enqueue -> deliver -> ack.

Transient: a non-durable queue, delivery_mode 1, memory store. Persistent: a durable queue,
delivery_mode 2, the SQLite store with fsync; a message counts once its publish is durable
(the store's `when_durable` fired) and it was delivered and acked.

    python bench/core_bench.py [--seconds 3] [--size 16]

Figures are messages per second on this machine; compare runs on the same machine only.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from broker.core import Broker
from broker.message import Message, Properties
from broker.queue import Consumer, Entry, Queue
from storage.memory import MemoryStore
from storage.sqlite import SqliteStore


def run_transient(seconds: float, size: int, batch: int = 1000) -> float:
    broker = Broker(MemoryStore(schedule=lambda cb: cb()))
    vhost = broker.vhost("/")
    queue = vhost.declare_queue("bench")
    pending: list[Entry] = []

    def deliver(q: Queue, entry: Entry) -> None:
        pending.append(entry)

    queue.add_consumer(Consumer("c", deliver, prefetch=batch * 2))
    body = b"x" * size
    props = Properties(delivery_mode=1)
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(batch):
            vhost.publish(Message("", "bench", body, props))
        for entry in pending:
            queue.ack(entry)
        count += len(pending)
        pending.clear()
    return count / (time.perf_counter() - start)


def run_persistent(seconds: float, size: int, batch: int = 1000) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        confirmed = [0]
        store = SqliteStore(Path(tmp) / "bench.db", schedule=lambda cb: cb())
        broker = Broker(store)
        broker.recover(store.open())
        vhost = broker.vhost("/")
        queue = vhost.declare_queue("bench", durable=True)
        pending: list[Entry] = []
        queue.add_consumer(Consumer("c", lambda q, e: pending.append(e), prefetch=batch * 2))
        body = b"x" * size
        props = Properties(delivery_mode=2)
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            for _ in range(batch):
                vhost.publish(Message("", "bench", body, props))

            def confirm(n: int = batch) -> None:
                confirmed[0] += n

            store.when_durable(confirm)
            for entry in pending:
                queue.ack(entry)
            pending.clear()
        store.flush()
        elapsed = time.perf_counter() - start
        store.close()
        return confirmed[0] / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--size", type=int, default=16)
    args = parser.parse_args()
    print(f"transient  {run_transient(args.seconds, args.size):>12,.0f} msg/s  ({args.size} B)")
    print(
        f"persistent {run_persistent(args.seconds, args.size):>12,.0f} msg/s confirmed ({args.size} B, fsync)"
    )


if __name__ == "__main__":
    main()
