"""Routing per exchange type (AMQP 0-9-1 §3.1.3) and the topic trie."""

from __future__ import annotations

import pytest

from broker.core import Broker
from broker.routing import TopicTrie
from tests.broker.conftest import consumer, msg


def bodies_of(broker: Broker, queue: str) -> list[bytes]:
    q = broker.vhost("/").queues[queue]
    got = []
    while (e := q.get(no_ack=True)) is not None:
        got.append(e.message.body)
    return got


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("a.b.c", "a.b.c", True),
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.c", False),
        ("a.#", "a", True),
        ("a.#", "a.b.c", True),
        ("#", "a.b", True),
        ("#.c", "a.b.c", True),
        ("a.#.c", "a.c", True),
        ("a.#.c", "a.x.y.c", True),
        ("a.#.c", "a.x.y.d", False),
        ("*", "a.b", False),
        ("*.*", "a.b", True),
        ("a.b", "a.b.c", False),
        ("", "", True),
        ("#", "$SYS.uptime", False),  # [MQTT-4.7.2-1]
        ("*.uptime", "$SYS.uptime", False),
        ("$SYS.#", "$SYS.uptime", True),
    ],
)
def test_topic_trie_matches_per_amqp_topic_rules(pattern: str, key: str, matches: bool) -> None:
    trie = TopicTrie()
    trie.add(pattern, "dest")
    assert (trie.match(key) == ["dest"]) is matches


def test_topic_trie_returns_each_destination_once() -> None:
    trie = TopicTrie()
    trie.add("a.*", "q1")
    trie.add("a.#", "q1")
    trie.add("#", "q2")
    assert sorted(trie.match("a.b")) == ["q1", "q2"]


def test_default_exchange_routes_by_queue_name(broker: Broker) -> None:
    vh = broker.vhost("/")
    vh.declare_queue("orders")
    assert vh.publish(msg(b"1", "", "orders")).routed
    assert not vh.publish(msg(b"2", "", "nobody")).routed
    assert bodies_of(broker, "orders") == [b"1"]


def test_direct_exchange_routes_on_equal_key(broker: Broker) -> None:
    vh = broker.vhost("/")
    vh.declare_queue("a")
    vh.declare_queue("b")
    vh.bind_queue("a", "amq.direct", "k1")
    vh.bind_queue("b", "amq.direct", "k2")
    vh.publish(msg(b"1", "amq.direct", "k1"))
    vh.publish(msg(b"2", "amq.direct", "k2"))
    vh.publish(msg(b"3", "amq.direct", "k3"))
    assert bodies_of(broker, "a") == [b"1"]
    assert bodies_of(broker, "b") == [b"2"]


def test_fanout_exchange_ignores_key(broker: Broker) -> None:
    vh = broker.vhost("/")
    for name in ("a", "b"):
        vh.declare_queue(name)
        vh.bind_queue(name, "amq.fanout", "")
    vh.publish(msg(b"1", "amq.fanout", "whatever"))
    assert bodies_of(broker, "a") == [b"1"]
    assert bodies_of(broker, "b") == [b"1"]


def test_topic_exchange_routes_once_per_queue_with_overlapping_bindings(broker: Broker) -> None:
    vh = broker.vhost("/")
    vh.declare_queue("q")
    vh.bind_queue("q", "amq.topic", "a.*")
    vh.bind_queue("q", "amq.topic", "a.#")
    vh.publish(msg(b"1", "amq.topic", "a.b"))
    assert bodies_of(broker, "q") == [b"1"]


def test_topic_route_cache_is_invalidated_by_unbind(broker: Broker) -> None:
    vh = broker.vhost("/")
    vh.declare_queue("q")
    vh.bind_queue("q", "amq.topic", "a.b")
    vh.publish(msg(b"1", "amq.topic", "a.b"))
    vh.unbind_queue("q", "amq.topic", "a.b")
    assert not vh.publish(msg(b"2", "amq.topic", "a.b")).routed
    assert bodies_of(broker, "q") == [b"1"]


@pytest.mark.parametrize(
    ("binding", "headers", "matches"),
    [
        ({"x-match": "all", "a": 1, "b": 2}, {"a": 1, "b": 2, "c": 3}, True),
        ({"x-match": "all", "a": 1, "b": 2}, {"a": 1}, False),
        ({"x-match": "any", "a": 1, "b": 2}, {"b": 2}, True),
        ({"x-match": "any", "a": 1}, {"a": 2}, False),
        ({"a": 1}, {"a": 1}, True),  # all is the default
        ({"x-match": "all", "x-k": 1}, {}, True),  # x- arguments ignored
        ({"x-match": "all-with-x", "x-k": 1}, {}, False),
    ],
)
def test_headers_exchange(broker: Broker, binding: dict, headers: dict, matches: bool) -> None:
    vh = broker.vhost("/")
    vh.declare_queue("q")
    vh.bind_queue("q", "amq.headers", "", binding)
    assert vh.publish(msg(b"1", "amq.headers", "", headers=headers)).routed is matches


def test_exchange_to_exchange_binding_and_cycles(broker: Broker) -> None:
    vh = broker.vhost("/")
    vh.declare_exchange("e1", "fanout")
    vh.declare_exchange("e2", "direct")
    vh.bind_exchange("e2", "e1", "")
    vh.bind_exchange("e1", "e2", "k")  # a cycle must not loop forever
    vh.declare_queue("q")
    vh.bind_queue("q", "e2", "k")
    assert vh.publish(msg(b"1", "e1", "k")).routed
    assert bodies_of(broker, "q") == [b"1"]


def test_alternate_exchange_takes_unroutable(broker: Broker) -> None:
    vh = broker.vhost("/")
    vh.declare_exchange("alt", "fanout")
    vh.declare_exchange("main", "direct", arguments={"alternate-exchange": "alt"})
    vh.declare_queue("unrouted")
    vh.bind_queue("unrouted", "alt", "")
    assert vh.publish(msg(b"1", "main", "nokey")).routed
    assert bodies_of(broker, "unrouted") == [b"1"]


def test_internal_exchange_refuses_publish(broker: Broker) -> None:
    from broker.errors import AccessRefused

    vh = broker.vhost("/")
    vh.declare_exchange("int", "fanout", internal=True)
    with pytest.raises(AccessRefused):
        vh.publish(msg(b"1", "int", ""))


def test_consumer_receives_routed_message(broker: Broker) -> None:
    vh = broker.vhost("/")
    q = vh.declare_queue("q")
    c, got = consumer()
    q.add_consumer(c)
    vh.publish(msg(b"hello", "", "q"))
    assert got.bodies == [b"hello"]
