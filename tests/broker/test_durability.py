"""Durable state through the store port: what is journaled, and what a restart brings back."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from broker.core import Broker
from broker.queue import Entry
from storage.sqlite import SqliteStore
from tests.broker.conftest import FakeClock, msg


def open_broker(path: Path, clock: FakeClock) -> tuple[Broker, SqliteStore]:
    store = SqliteStore(path, schedule=lambda callback: callback())
    recovered = store.open()
    broker = Broker(store, clock=clock)
    broker.recover(recovered)
    return broker, store


def test_durable_topology_and_persistent_messages_survive_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    broker, store = open_broker(tmp_path / "db", clock)
    vh = broker.vhost("/")
    vh.declare_exchange("events", "topic", durable=True)
    vh.declare_queue("keep", durable=True, arguments={"x-max-length": 100})
    vh.declare_queue("gone", durable=False)
    vh.bind_queue("keep", "events", "a.#")
    vh.publish(msg("persistent", "events", "a.b", delivery_mode=2))
    vh.publish(msg("transient", "events", "a.b", delivery_mode=1))
    store.close()

    broker, store = open_broker(tmp_path / "db", clock)
    vh = broker.vhost("/")
    assert vh.exchanges["events"].type == "topic"
    assert "gone" not in vh.queues
    keep = vh.queues["keep"]
    assert keep.arguments == {"x-max-length": 100}
    entry = keep.get(no_ack=True)
    assert entry is not None and entry.message.body == b"persistent" and entry.redelivered
    assert keep.get(no_ack=True) is None
    assert vh.publish(msg("again", "events", "a.c")).routed  # the binding came back
    store.close()


def test_acked_message_does_not_come_back(tmp_path: Path) -> None:
    clock = FakeClock()
    broker, store = open_broker(tmp_path / "db", clock)
    vh = broker.vhost("/")
    q = vh.declare_queue("q", durable=True)
    vh.publish(msg("one", "", "q", delivery_mode=2))
    vh.publish(msg("two", "", "q", delivery_mode=2))
    entry = q.get(no_ack=False)
    assert entry is not None
    q.ack(entry)
    store.close()
    broker, store = open_broker(tmp_path / "db", clock)
    q = broker.vhost("/").queues["q"]
    got = q.get(no_ack=True)
    assert got is not None and got.message.body == b"two" and q.message_count == 0
    store.close()


def test_publish_result_asks_for_sync_only_when_journaled(tmp_path: Path) -> None:
    broker, store = open_broker(tmp_path / "db", FakeClock())
    vh = broker.vhost("/")
    vh.declare_queue("durable", durable=True)
    vh.declare_queue("transient")
    assert vh.publish(msg("a", "", "durable", delivery_mode=2)).needs_sync
    assert not vh.publish(msg("a", "", "durable", delivery_mode=1)).needs_sync
    assert not vh.publish(msg("a", "", "transient", delivery_mode=2)).needs_sync
    store.close()


class RestartMachine(RuleBasedStateMachine):
    """Random publish/consume/ack/nack/restart: nothing unacked is lost, nothing acked returns."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name) / "db"
        self.clock = FakeClock()
        self.broker, self.store = open_broker(self.path, self.clock)
        self.broker.vhost("/").declare_queue("q", durable=True)
        self.counter = 0
        self.outstanding: set[bytes] = set()  # published, not acked
        self.acked: set[bytes] = set()
        self.held: list[Entry] = []

    def teardown(self) -> None:
        self.store.close()
        self.dir.cleanup()

    @property
    def queue(self):  # type: ignore[no-untyped-def]
        return self.broker.vhost("/").queues["q"]

    @rule()
    def publish(self) -> None:
        self.counter += 1
        body = b"m%d" % self.counter
        self.broker.vhost("/").publish(msg(body, "", "q", delivery_mode=2))
        self.outstanding.add(body)

    @rule()
    def take(self) -> None:
        entry = self.queue.get(no_ack=False)
        if entry is not None:
            assert entry.message.body not in self.acked, "an acked message was delivered again"
            self.held.append(entry)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(min_value=0))
    def ack(self, i: int) -> None:
        entry = self.held.pop(i % len(self.held))
        self.queue.ack(entry)
        self.outstanding.discard(entry.message.body)
        self.acked.add(entry.message.body)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(min_value=0))
    def nack(self, i: int) -> None:
        entry = self.held.pop(i % len(self.held))
        self.queue.reject(entry, requeue=True)

    @rule()
    def restart(self) -> None:
        self.store.close()
        self.held.clear()  # the connection died with the broker: unacked come back
        self.broker, self.store = open_broker(self.path, self.clock)

    @invariant()
    def nothing_lost(self) -> None:
        in_queue = set()
        for entry in list(self.queue._ready):
            in_queue.add(entry.message.body)
        paged = self.store.load_messages(list(self.queue._paged))
        in_queue.update(m.body for m in paged)
        held = {e.message.body for e in self.held}
        assert in_queue | held == self.outstanding
        assert not (in_queue & self.acked)


TestRestartMachine = RestartMachine.TestCase
TestRestartMachine.settings = settings(max_examples=25, stateful_step_count=25, deadline=None)
