"""The process test_crash.py kills: appends to a SqliteStore until SIGKILL, reporting on stdout.

    python tests/storage/crash_child.py <database path> <seed>

It recovers the store, declares queues q1 and q2, then loops: enqueue persistent messages (some on two queues), remove some
of them before they are durable (the store's elided path) and some recovered or older ones, and
register a `when_durable` callback per group. Every line is flushed as it is written:

    A <id>/<queue> ...            removals about to be appended (written before appending them)
    C <id>/<queue> ... | <id>/<queue> ...
                                  a callback fired: these enqueues | these removals are durable

Callbacks are scheduled onto a queue and run by the main loop, as the event loop would.

Must not import: asyncio, protocols, cluster, broker.core.
"""

from __future__ import annotations

import queue
import random
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from broker.journal import MessageEnqueued, MessageRemoved, QueueDeclared  # noqa: E402
from broker.message import Message, Properties  # noqa: E402
from storage.sqlite import SqliteStore  # noqa: E402

PERSISTENT = Properties(delivery_mode=2)
MAX_IN_FLIGHT = 8  # groups awaiting their callback before the producer waits (publisher window)


def body_of(msg_id: int) -> bytes:
    return b"m%d" % msg_id


def pairs(items: list[tuple[int, str]]) -> str:
    return " ".join(f"{msg_id}/{queue_name}" for msg_id, queue_name in items)


def main() -> None:
    path, seed = Path(sys.argv[1]), int(sys.argv[2])
    rng = random.Random(seed)
    scheduled: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
    store = SqliteStore(path, scheduled.put)
    recovered = store.open()
    for name in ("q1", "q2"):
        store.append(QueueDeclared("/", name))
    next_id = recovered.next_msg_id
    live = [(msg_id, q) for (_, q), ids in recovered.queue_messages.items() for msg_id in ids]
    out = sys.stdout
    in_flight = 0

    def confirmed(enqueued: list[tuple[int, str]], removed: list[tuple[int, str]]) -> None:
        nonlocal in_flight
        in_flight -= 1
        out.write(f"C {pairs(enqueued)} | {pairs(removed)}\n")
        out.flush()

    while True:
        enqueued: list[tuple[int, str]] = []
        removed: list[tuple[int, str]] = []
        records: list[MessageEnqueued | MessageRemoved] = []
        for _ in range(rng.randint(1, 60)):
            msg_id = next_id
            next_id += 1
            queues = ("q1", "q2") if msg_id % 3 == 0 else ("q1",)
            records.append(
                MessageEnqueued("/", queues, Message("", "q1", body_of(msg_id), PERSISTENT, msg_id))
            )
            enqueued += [(msg_id, q) for q in queues]
            for q in queues:
                if rng.random() < 0.3:  # acknowledged before it is durable
                    records.append(MessageRemoved("/", q, msg_id))
                    removed.append((msg_id, q))
                else:
                    live.append((msg_id, q))
        for _ in range(min(len(live), rng.randint(0, 40))):
            index = rng.randrange(len(live))
            live[index], live[-1] = live[-1], live[index]
            msg_id, q = live.pop()
            records.append(MessageRemoved("/", q, msg_id))
            removed.append((msg_id, q))
        # The parent must know of a removal before it can possibly reach the disk.
        out.write(f"A {pairs(removed)}\n")
        out.flush()
        for record in records:
            store.append(record)
        store.when_durable(partial(confirmed, enqueued, removed))
        in_flight += 1
        while True:
            try:
                callback = scheduled.get(block=in_flight >= MAX_IN_FLIGHT)
            except queue.Empty:
                break
            callback()


if __name__ == "__main__":
    main()
