"""Queue depth is not bounded by RAM: fill one queue through the core and report the RSS.

Publishes N messages of SIZE bytes (persistent, durable queue, SQLite store) with no consumer,
then drains them all, printing the process RSS after the fill and after the drain.

    python bench/deep_queue.py [--count 1000000] [--size 1024]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from broker.core import Broker, CoreLimits
from broker.message import Message, Properties
from storage.sqlite import SqliteStore


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--persistent", action="store_true", help="delivery_mode 2 (default: transient)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(Path(tmp) / "deep.db", schedule=lambda cb: cb())
        broker = Broker(store, limits=CoreLimits(page_out_threshold=10000))
        broker.recover(store.open())
        vhost = broker.vhost("/")
        queue = vhost.declare_queue("deep", durable=True)
        props = Properties(delivery_mode=2 if args.persistent else 1)
        body = b"x" * args.size
        start = time.perf_counter()
        for i in range(args.count):
            vhost.publish(Message("", "deep", body, props))
            if i % 50_000 == 0:
                store.flush()
        store.flush()
        fill = time.perf_counter() - start
        print(f"filled {queue.message_count:,} x {args.size} B in {fill:.1f} s; RSS {rss_mb():.0f} MB")
        drained = 0
        start = time.perf_counter()
        while queue.get(no_ack=True) is not None:
            drained += 1
            if drained % 50_000 == 0:
                store.flush()
        print(f"drained {drained:,} in {time.perf_counter() - start:.1f} s; RSS {rss_mb():.0f} MB")
        store.close()


if __name__ == "__main__":
    main()
