"""Queues: credit, ack/nack/requeue order, TTL, dead-lettering, overflow, priorities, consumers."""

from __future__ import annotations

import logging

import pytest

from broker.core import Broker
from broker.errors import AccessRefused, NotFound, PreconditionFailed, ResourceLocked
from tests.broker.conftest import FakeClock, consumer, msg


def publish_n(broker: Broker, queue: str, n: int, **props: object) -> None:
    vh = broker.vhost("/")
    for i in range(n):
        vh.publish(msg(str(i), "", queue, **props))


def test_prefetch_limits_unacked_deliveries(broker: Broker) -> None:
    q = broker.vhost("/").declare_queue("q")
    c, got = consumer(prefetch=2)
    q.add_consumer(c)
    publish_n(broker, "q", 5)
    assert got.bodies == [b"0", b"1"]
    q.ack(got.deliveries[0][1])
    assert got.bodies == [b"0", b"1", b"2"]
    assert q.message_count == 2


def test_no_ack_consumer_is_not_limited_and_settles_at_delivery(broker: Broker) -> None:
    q = broker.vhost("/").declare_queue("q")
    c, got = consumer(prefetch=1, no_ack=True)
    q.add_consumer(c)
    publish_n(broker, "q", 3)
    assert got.bodies == [b"0", b"1", b"2"]
    assert q.unacked_count == 0


def test_round_robin_between_competing_consumers(broker: Broker) -> None:
    q = broker.vhost("/").declare_queue("q")
    c1, got1 = consumer("c1", no_ack=True)
    c2, got2 = consumer("c2", no_ack=True)
    q.add_consumer(c1)
    q.add_consumer(c2)
    publish_n(broker, "q", 4)
    assert got1.bodies == [b"0", b"2"]
    assert got2.bodies == [b"1", b"3"]


def test_blocked_consumer_is_skipped_and_resumes(broker: Broker) -> None:
    q = broker.vhost("/").declare_queue("q")
    c, got = consumer(no_ack=True)
    q.add_consumer(c)
    c.set_blocked(True)
    publish_n(broker, "q", 2)
    assert got.bodies == []
    c.set_blocked(False)
    assert got.bodies == [b"0", b"1"]


def test_requeued_message_keeps_its_place_and_is_flagged(broker: Broker) -> None:
    q = broker.vhost("/").declare_queue("q")
    c, got = consumer(prefetch=1)
    q.add_consumer(c)
    publish_n(broker, "q", 3)
    first = got.take()[0]
    q.reject(first, requeue=True)
    redelivered = got.take()[0]
    assert redelivered.message.body == b"0"
    assert redelivered.redelivered and redelivered.delivery_count == 2


def test_consumer_gone_returns_unacked_in_order(broker: Broker) -> None:
    q = broker.vhost("/").declare_queue("q")
    c1, got1 = consumer("c1", prefetch=2)
    q.add_consumer(c1)
    publish_n(broker, "q", 3)
    held = got1.take()
    q.remove_consumer(c1)
    q.requeue_many(held)
    c2, got2 = consumer("c2", no_ack=True)
    q.add_consumer(c2)
    assert got2.bodies == [b"0", b"1", b"2"]
    assert [e.redelivered for _, e in got2.deliveries] == [True, True, False]


def test_reject_without_requeue_dead_letters_with_x_death(broker: Broker) -> None:
    vh = broker.vhost("/")
    vh.declare_exchange("dlx", "fanout")
    dead = vh.declare_queue("dead")
    vh.bind_queue("dead", "dlx", "")
    q = vh.declare_queue("q", arguments={"x-dead-letter-exchange": "dlx"})
    c, got = consumer()
    q.add_consumer(c)
    vh.publish(msg("m", "", "q"))
    q.reject(got.take()[0], requeue=False)
    entry = dead.get(no_ack=True)
    assert entry is not None
    death = entry.message.properties.headers["x-death"][0]
    assert death["reason"] == "rejected" and death["queue"] == "q" and death["count"] == 1
    assert death["routing-keys"] == ["q"]


def test_dead_letter_routing_key_override(broker: Broker) -> None:
    vh = broker.vhost("/")
    vh.declare_queue("target")
    q = vh.declare_queue("q", arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "target"})
    c, got = consumer()
    q.add_consumer(c)
    vh.publish(msg("m", "", "q"))
    q.reject(got.take()[0], requeue=False)
    assert vh.queues["target"].message_count == 1


def test_per_queue_ttl_expires_with_injected_clock(broker: Broker, clock: FakeClock) -> None:
    vh = broker.vhost("/")
    vh.declare_queue("dead")
    q = vh.declare_queue(
        "q",
        arguments={"x-message-ttl": 1000, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "dead"},
    )
    publish_n(broker, "q", 2)
    clock.advance(0.5)
    broker.tick()
    assert q.message_count == 2
    clock.advance(0.6)
    broker.tick()
    assert q.message_count == 0
    entry = vh.queues["dead"].get(no_ack=True)
    assert entry is not None and entry.message.properties.headers["x-death"][0]["reason"] == "expired"


def test_per_message_ttl_expires_at_head_on_delivery(broker: Broker, clock: FakeClock) -> None:
    q = broker.vhost("/").declare_queue("q")
    broker.vhost("/").publish(msg("short", "", "q", expiration="100"))
    broker.vhost("/").publish(msg("long", "", "q"))
    clock.advance(0.2)
    c, got = consumer(no_ack=True)
    q.add_consumer(c)
    assert got.bodies == [b"long"]
    assert broker.messages_dropped == 1


def test_queue_expires_when_unused(broker: Broker, clock: FakeClock) -> None:
    vh = broker.vhost("/")
    vh.declare_queue("q", arguments={"x-expires": 1000})
    clock.advance(0.9)
    broker.tick()
    assert "q" in vh.queues
    clock.advance(0.2)
    broker.tick()
    assert "q" not in vh.queues


def test_max_length_drop_head_dead_letters_oldest(broker: Broker) -> None:
    vh = broker.vhost("/")
    dead = vh.declare_queue("dead")
    q = vh.declare_queue(
        "q", arguments={"x-max-length": 2, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "dead"}
    )
    publish_n(broker, "q", 3)
    assert q.message_count == 2
    entry = dead.get(no_ack=True)
    assert entry is not None and entry.message.body == b"0"
    assert entry.message.properties.headers["x-death"][0]["reason"] == "maxlen"


def test_max_length_bytes(broker: Broker) -> None:
    vh = broker.vhost("/")
    q = vh.declare_queue("q", arguments={"x-max-length-bytes": 5})
    vh.publish(msg("abc", "", "q"))
    vh.publish(msg("def", "", "q"))
    assert q.message_count == 1
    assert broker.messages_dropped == 1


def test_drops_without_dead_letter_exchange_are_all_counted_and_logged_once_per_queue_per_second(
    broker: Broker, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    vh = broker.vhost("/")
    vh.declare_queue("q", arguments={"x-max-length": 1})
    vh.declare_queue("r", arguments={"x-max-length": 1})
    caplog.set_level(logging.INFO, logger="polybroker.core")

    def lines() -> list[str]:
        found = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
        caplog.clear()
        return found

    publish_n(broker, "q", 6)  # drops 5: the first is logged, the other 4 held back
    publish_n(broker, "r", 2)  # another queue has its own line
    assert broker.messages_dropped == 6
    assert lines() == [
        "queue 'q' in vhost '/' dropped 1 message(s) (maxlen: 1)",
        "queue 'r' in vhost '/' dropped 1 message(s) (maxlen: 1)",
    ]
    clock.advance(0.5)
    publish_n(broker, "q", 3)
    assert broker.messages_dropped == 9 and lines() == []
    clock.advance(0.5)  # a second after the last line: the next drop logs everything since
    publish_n(broker, "q", 1)
    assert lines() == ["queue 'q' in vhost '/' dropped 8 message(s) (maxlen: 8)"]

    clock.advance(0.25)
    publish_n(broker, "q", 2)
    broker.tick()
    assert broker.messages_dropped == 12 and lines() == []
    clock.advance(0.75)  # what was held back is logged by the periodic tick, without a new drop
    broker.tick()
    assert lines() == ["queue 'q' in vhost '/' dropped 2 message(s) (maxlen: 2)"]
    clock.advance(5)
    broker.tick()
    assert lines() == []


def test_reject_publish_overflow_refuses_new_messages(broker: Broker) -> None:
    vh = broker.vhost("/")
    q = vh.declare_queue("q", arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    assert not vh.publish(msg("a", "", "q")).rejected
    assert vh.publish(msg("b", "", "q")).rejected
    entry = q.get(no_ack=True)
    assert entry is not None and entry.message.body == b"a" and q.message_count == 0


def test_priorities_deliver_highest_first(broker: Broker) -> None:
    vh = broker.vhost("/")
    q = vh.declare_queue("q", arguments={"x-max-priority": 10})
    for body, prio in (("low", 1), ("high", 9), ("none", None), ("over", 200)):
        vh.publish(msg(body, "", "q", priority=prio))
    c, got = consumer(no_ack=True)
    q.add_consumer(c)
    assert got.bodies == [b"over", b"high", b"low", b"none"]


def test_max_priority_above_255_is_refused(broker: Broker) -> None:
    with pytest.raises(PreconditionFailed):
        broker.vhost("/").declare_queue("q", arguments={"x-max-priority": 256})


def test_single_active_consumer_gets_everything_until_it_leaves(broker: Broker) -> None:
    q = broker.vhost("/").declare_queue("q", arguments={"x-single-active-consumer": True})
    c1, got1 = consumer("c1", no_ack=True)
    c2, got2 = consumer("c2", no_ack=True)
    q.add_consumer(c1)
    q.add_consumer(c2)
    publish_n(broker, "q", 3)
    assert got1.bodies == [b"0", b"1", b"2"] and got2.bodies == []
    q.remove_consumer(c1)
    publish_n(broker, "q", 1)
    assert got2.bodies == [b"0"]


def test_exclusive_consumer_locks_out_others(broker: Broker) -> None:
    q = broker.vhost("/").declare_queue("q")
    c1, _ = consumer("c1", exclusive=True)
    q.add_consumer(c1)
    with pytest.raises(AccessRefused):
        q.add_consumer(consumer("c2")[0])


def test_exclusive_queue_belongs_to_its_connection(broker: Broker) -> None:
    vh = broker.vhost("/")
    conn_a, conn_b = object(), object()
    vh.declare_queue("ex", exclusive_owner=conn_a, owner=conn_a)
    with pytest.raises(ResourceLocked):
        vh.declare_queue("ex", owner=conn_b)
    vh.release_owner(conn_a)
    assert "ex" not in vh.queues


def test_amq_prefix_is_refused_to_clients_and_allowed_for_reserved_queues(broker: Broker) -> None:
    vh = broker.vhost("/")
    with pytest.raises(AccessRefused, match="reserved prefix"):
        vh.declare_queue("amq.rabbitmq.reply-to.g1")
    assert "amq.rabbitmq.reply-to.g1" not in vh.queues
    conn = object()
    q = vh.declare_queue("amq.rabbitmq.reply-to.g1", exclusive_owner=conn, auto_delete=True, reserved=True)
    assert vh.queue("amq.rabbitmq.reply-to.g1", owner=conn) is q
    assert (q.exclusive_owner, q.auto_delete, q.durable) == (conn, True, False)
    with pytest.raises(ResourceLocked):
        vh.declare_queue("amq.rabbitmq.reply-to.g1", passive=True, owner=object())


def test_auto_delete_queue_goes_with_its_last_consumer(broker: Broker) -> None:
    vh = broker.vhost("/")
    q = vh.declare_queue("q", auto_delete=True)
    c, _ = consumer()
    q.add_consumer(c)
    q.remove_consumer(c)
    assert "q" not in vh.queues


def test_delete_if_unused_and_if_empty(broker: Broker) -> None:
    vh = broker.vhost("/")
    q = vh.declare_queue("q")
    q.add_consumer(consumer()[0])
    with pytest.raises(PreconditionFailed):
        vh.delete_queue("q", if_unused=True)
    vh.declare_queue("full")
    publish_n(broker, "full", 1)
    with pytest.raises(PreconditionFailed):
        vh.delete_queue("full", if_empty=True)
    assert vh.delete_queue("full") == 1
    with pytest.raises(NotFound):
        vh.delete_queue("full")


def test_purge_drops_ready_messages_only(broker: Broker) -> None:
    vh = broker.vhost("/")
    q = vh.declare_queue("q")
    c, got = consumer(prefetch=1)
    q.add_consumer(c)
    publish_n(broker, "q", 3)
    assert vh.purge_queue("q") == 2
    assert q.unacked_count == 1


def test_delivery_limit_dead_letters_after_too_many_requeues(broker: Broker) -> None:
    vh = broker.vhost("/")
    dead = vh.declare_queue("dead")
    q = vh.declare_queue(
        "q",
        arguments={"x-delivery-limit": 1, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "dead"},
    )
    c, got = consumer(prefetch=1)
    q.add_consumer(c)
    publish_n(broker, "q", 1)
    q.reject(got.take()[0], requeue=True)  # delivery 1 -> requeued
    q.reject(got.take()[0], requeue=True)  # delivery 2 > limit -> dead-lettered
    assert got.take() == []
    assert dead.message_count == 1


def test_inequivalent_redeclare_is_refused(broker: Broker) -> None:
    vh = broker.vhost("/")
    vh.declare_queue("q", durable=True)
    with pytest.raises(PreconditionFailed):
        vh.declare_queue("q", durable=False)
    with pytest.raises(PreconditionFailed):
        vh.declare_queue("q", durable=True, arguments={"x-max-length": 5})


def test_deleting_a_queue_cancels_its_consumers(broker: Broker) -> None:
    vh = broker.vhost("/")
    q = vh.declare_queue("q")
    c, _ = consumer()
    cancelled = []
    c.on_cancel = lambda: cancelled.append(True)
    q.add_consumer(c)
    vh.delete_queue("q")
    assert cancelled == [True]


def test_deep_queue_pages_bodies_out_of_ram_and_back_in_order(make_broker) -> None:  # type: ignore[no-untyped-def]
    broker = make_broker(page_out_threshold=10)
    vh = broker.vhost("/")
    q = vh.declare_queue("q")
    for i in range(100):
        vh.publish(msg(b"%d" % i + b"." * 100, "", "q"))
    assert broker.ram_bytes < 20 * 110
    c, got = consumer(no_ack=True)
    q.add_consumer(c)
    assert [b.split(b".")[0] for b in got.bodies] == [b"%d" % i for i in range(100)]
