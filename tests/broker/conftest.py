"""Fixtures for core tests: a broker over the memory store with a hand-driven clock."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from broker.core import Broker, CoreLimits
from broker.message import Message, Properties
from broker.queue import Consumer, Entry, Queue
from storage.memory import MemoryStore


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Collector:
    """A consumer's deliver callback that records (queue, entry) pairs."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[Queue, Entry]] = []

    def __call__(self, queue: Queue, entry: Entry) -> None:
        self.deliveries.append((queue, entry))

    @property
    def bodies(self) -> list[bytes]:
        return [e.message.body for _, e in self.deliveries]

    def take(self) -> list[Entry]:
        entries = [e for _, e in self.deliveries]
        self.deliveries.clear()
        return entries


def msg(body: bytes | str = b"x", exchange: str = "", key: str = "q", **props: object) -> Message:
    if isinstance(body, str):
        body = body.encode()
    return Message(exchange, key, body, Properties(**props))  # type: ignore[arg-type]


def consumer(
    tag: str = "c", prefetch: int = 0, no_ack: bool = False, **kw: object
) -> tuple[Consumer, Collector]:
    collector = Collector()
    return Consumer(tag, collector, prefetch=prefetch, no_ack=no_ack, **kw), collector  # type: ignore[arg-type]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore(schedule=lambda callback: callback())


@pytest.fixture
def make_broker(store: MemoryStore, clock: FakeClock) -> Callable[..., Broker]:
    def make(**limits: int) -> Broker:
        return Broker(store, clock=clock, wall_clock=lambda: 1_700_000_000.0, limits=CoreLimits(**limits))

    return make


@pytest.fixture
def broker(make_broker: Callable[..., Broker]) -> Broker:
    return make_broker()
