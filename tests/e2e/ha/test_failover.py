"""Failover of an active/standby pair in two zones, with real clients that know both endpoints.

Each scenario runs in both network modes (tests/e2e/ha/conftest.py) with the default lease settings
(lease 2 s, sync_timeout 5 s) unless it says otherwise, and checks the guarantee of README, Guarantees:
every message confirmed to a publisher (basic.ack under confirm mode, RECEIPT, PUBACK) is delivered
after the failure; duplicates are allowed and counted; losses must be zero. The publishers (pika,
stomp.py, paho-mqtt; tests/e2e/ha/clients.py) run at full speed with a window of unconfirmed
messages, and fail over on their own.

1. kill -9 of the active under full load: the standby accepts connections in under 3 s, nothing
   confirmed is lost.
2. the replication link cut while the active keeps serving, then the active killed: the standby,
   no longer in sync, does not take over (no split brain); the old active, restarted, has it all.
3. the active frozen (SIGSTOP) beyond its lease: the standby takes over; the frozen node, resumed,
   fences itself without confirming a single write that reached it, and rejoins as standby.
4. the standby killed and restarted under load: the active keeps every connection and keeps
   confirming; the standby catches up and then holds everything (proved by a takeover).
5. durable queues and bindings (AMQP), durable subscriptions (STOMP, RabbitMQ and ActiveMQ styles),
   MQTT persistent sessions and retained messages are all there after a takeover.
6. a rolling restart (SIGTERM of the active, then start it again) hands over in under a second.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pika

from tests.e2e.ha.azs import HaPair, NodeProcess, measure_takeover, wait_for
from tests.e2e.ha.clients import (
    AmqpPublisher,
    MqttClient,
    MqttPublisher,
    Publisher,
    StompClient,
    StompPublisher,
    StompSpy,
    amqp_connect,
    count_outcome,
    drain_amqp,
)

if TYPE_CHECKING:
    from tests.e2e.ha.conftest import HaReport

#: The takeover target with the default lease settings (README, "Tested and measured").
TAKEOVER_TARGET_SECONDS = 3.0
#: Confirmations each publisher collects before a failure is injected, and after it.
BEFORE = 300
AFTER = 300
#: The queue each publisher's messages end up in (MQTT's through amq.topic, key "ha.mqtt").
QUEUES = {"amqp": "ha-amqp", "stomp": "ha-stomp", "mqtt": "ha-mqtt"}


def declare_queues(node: NodeProcess) -> None:
    connection = amqp_connect([node.endpoint("amqp")])
    try:
        channel = connection.channel()
        for queue in QUEUES.values():
            channel.queue_declare(queue, durable=True)
        channel.queue_bind(QUEUES["mqtt"], "amq.topic", "ha.mqtt")
    finally:
        connection.close()


def start_publishers(pair: HaPair, **options: Any) -> list[Publisher]:
    """A pika, a stomp.py and (when the pair serves MQTT) a paho-mqtt publisher, started."""
    declare_queues(pair.a)
    publishers: list[Publisher] = [
        AmqpPublisher(pair.endpoints("amqp"), QUEUES["amqp"], **options),
        StompPublisher(pair.endpoints("stomp"), "/queue/" + QUEUES["stomp"], **options),
    ]
    if pair.mqtt:
        publishers.append(MqttPublisher(pair.endpoints("mqtt"), "ha/mqtt", **options))
    for publisher in publishers:
        pair.add_cleanup(publisher.abort)
        publisher.start()
    return publishers


def wait_all(publishers: list[Publisher], more: int, timeout: float = 30.0) -> None:
    """Until every publisher has `more` confirmations beyond what it has now."""
    targets = [(p, p.confirmed_count + more) for p in publishers]
    for publisher, target in targets:
        publisher.wait_confirmed(target, timeout)


def stop_and_check(
    publishers: list[Publisher], endpoints: list[tuple[str, int]], report: HaReport, **extra: Any
) -> dict[str, list[str]]:
    """Stop the publishers, read every queue to the end at `endpoints` (AMQP), assert that every
    confirmed message came, and record the counts. Returns what each queue delivered."""
    delivered: dict[str, list[str]] = {}
    for publisher in publishers:
        stats = publisher.stop()
        got = delivered[stats.name] = drain_amqp(endpoints, QUEUES[stats.name])
        outcome = count_outcome(stats.confirmed, got, stats.name + "-")
        report.record(
            client=stats.name,
            confirmed=outcome.confirmed,
            delivered=outcome.delivered,
            lost=len(outcome.lost),
            duplicates=outcome.duplicates,
            unconfirmed_delivered=outcome.unconfirmed_delivered,
            reconnects=stats.reconnects,
            max_stall_s=round(stats.max_stall, 3),
            **extra,
        )
        assert stats.confirmed, f"{stats.name} confirmed nothing: {stats.errors[-5:]}"
        assert not outcome.lost, (
            f"{stats.name}: {len(outcome.lost)} confirmed messages lost, e.g. {outcome.lost[:10]}; "
            f"errors {stats.errors[-5:]}"
        )
    return delivered


def mode(pair: HaPair) -> str:
    return pair.network.mode.value


# --- 1. kill -9 of the active ---------------------------------------------------------------------------


def test_kill_9_of_the_active_under_full_load_loses_no_confirmed_message(
    make_pair: Callable[..., HaPair], ha_report: HaReport
) -> None:
    pair = make_pair()
    publishers = start_publishers(pair)
    wait_all(publishers, BEFORE)
    pair.wait_in_sync(pair.a)

    died = time.monotonic()
    pair.a.kill()
    takeover = measure_takeover(pair.b, died)
    wait_all(publishers, AFTER)
    # The new active holds confirmations until a standby is in sync or sync_timeout (5 s) passed.
    # (Confirmations read after the kill but sent by the old active do not count.)
    served = died + takeover
    resumed = {p.stats.name: p.first_confirmation_after(served) for p in publishers}

    assert pair.b.role == "active"
    stop_and_check(publishers, pair.endpoints("amqp"), ha_report, network=mode(pair))
    ha_report.record(
        network=mode(pair),
        link=pair.network.netem,
        takeover_s=round(takeover, 3),
        first_confirm_after_death_s={
            n: None if t is None else round(takeover + t, 3) for n, t in resumed.items()
        },
    )
    assert takeover < TAKEOVER_TARGET_SECONDS, f"takeover took {takeover:.2f} s"


# --- 2. link cut, then the active killed ---------------------------------------------------------------


def test_a_cut_link_then_the_death_of_the_active_loses_nothing_and_never_splits_the_brain(
    make_pair: Callable[..., HaPair], ha_report: HaReport
) -> None:
    # A short sync_timeout: the active stops waiting for its lost standby sooner (the guarantee
    # does not depend on it).
    pair = make_pair(sync_timeout=2.0)
    publishers = start_publishers(pair)
    wait_all(publishers, BEFORE)

    pair.network.cut_link()
    # The active drops the silent standby, records in the lease that it runs alone, and serves on.
    wait_for(lambda: pair.a.status().get("sync") == "alone", 15, "az-a to confirm alone")
    assert pair.a.status().get("lease_synced") == ""
    wait_all(publishers, AFTER)  # confirmed by az-a alone: az-b does not have these
    assert pair.b.role == "standby" and not pair.b.accepts("amqp"), "two actives while the link is cut"

    pair.a.kill()
    # az-b sees the lease expire, but it was not in sync: it must refuse to take over.
    wait_for(
        lambda: "not taking over" in pair.b.status().get("last_error", ""),
        15,
        "az-b to refuse the lease of the dead, out-of-sync active",
    )
    assert pair.b.role == "standby"
    assert not pair.b.accepts("amqp") and not pair.b.accepts("stomp"), "az-b serves without the data"

    # The operator brings az-a back: it takes its own lease again, with everything it confirmed.
    pair.network.restore_link()
    pair.a.start()
    pair.a.wait_serving()
    pair.wait_in_sync(pair.a)
    wait_all(publishers, 100)
    assert pair.a.status().get("epoch") == 2
    stop_and_check(publishers, pair.endpoints("amqp"), ha_report, network=mode(pair))


# --- 3. the active frozen beyond its lease -------------------------------------------------------------


def test_a_frozen_active_is_replaced_and_fences_itself_without_serving_a_write(
    make_pair: Callable[..., HaPair], ha_report: HaReport
) -> None:
    pair = make_pair()
    publishers = start_publishers(pair)
    wait_all(publishers, BEFORE)
    pair.wait_in_sync(pair.a)
    spy = StompSpy(pair.a.endpoint("stomp"))

    frozen = time.monotonic()
    pair.a.freeze()
    try:
        takeover = measure_takeover(pair.b, frozen)
        # Writes that reach the frozen node: they wait in its socket buffer until it resumes.
        for n in range(20):
            spy.send_persistent("/queue/" + QUEUES["stomp"], f"spy-{n}")
        assert pair.b.role == "active"
    finally:
        pair.a.resume()

    # Resumed, az-a knows from its monotonic clock that its lease lapsed: it fences itself before
    # it handles anything, closes its clients, and rejoins as az-b's standby.
    frames = spy.read_until_closed(10)
    spy.close()
    assert spy.closed, "the fenced node kept a client connection open"
    receipts = [f.header("receipt-id") for f in frames if f.command == "RECEIPT"]
    assert not receipts, f"the fenced node confirmed writes: {receipts}"
    pair.wait_in_sync(pair.b)
    log = pair.a.log()
    assert "fenced at epoch 1" in log and "refusing writes" in log, pair.a.log_tail()

    wait_all(publishers, AFTER)
    delivered = stop_and_check(publishers, pair.endpoints("amqp"), ha_report, network=mode(pair))
    assert not [m for m in delivered["stomp"] if m.startswith("spy-")], "a write to the fenced node survived"
    ha_report.record(network=mode(pair), freeze_takeover_s=round(takeover, 3))
    assert takeover < TAKEOVER_TARGET_SECONDS, f"takeover took {takeover:.2f} s"


# --- 4. the standby killed and restarted -----------------------------------------------------------------


def test_the_standby_killed_and_restarted_under_load_catches_up_while_the_active_serves(
    make_pair: Callable[..., HaPair], ha_report: HaReport
) -> None:
    pair = make_pair()
    publishers = start_publishers(pair)
    wait_all(publishers, BEFORE)
    active_pid = pair.a.pid

    pair.b.kill()
    pair.b.start()
    pair.wait_in_sync(pair.a)
    wait_all(publishers, AFTER)

    # The active never stopped serving: same process, same epoch, no client lost its connection,
    # and confirmations waited at most sync_timeout (5 s) for the standby to be back.
    status = pair.a.status()
    assert pair.a.pid == active_pid and status["role"] == "active" and status["epoch"] == 1
    for publisher in publishers:
        assert publisher.stats.reconnects == 0, f"{publisher.stats.name}: {publisher.stats.errors[-5:]}"
        assert publisher.stats.max_stall < 6.0, (
            f"{publisher.stats.name} stalled {publisher.stats.max_stall:.1f} s"
        )

    # The standby caught up: everything confirmed (with it in sync) is there after a takeover.
    stats = [p.stop() for p in publishers]
    pair.wait_in_sync(pair.a)
    pair.a.kill()
    pair.b.wait_serving()
    for stat in stats:
        got = drain_amqp([pair.b.endpoint("amqp")], QUEUES[stat.name])
        outcome = count_outcome(stat.confirmed, got, stat.name + "-")
        ha_report.record(
            network=mode(pair),
            client=stat.name,
            confirmed=outcome.confirmed,
            lost=len(outcome.lost),
            duplicates=outcome.duplicates,
            max_stall_while_standby_restarted_s=round(stat.max_stall, 3),
        )
        assert not outcome.lost, f"{stat.name}: the standby lacks {len(outcome.lost)} confirmed messages"


# --- 5. durable state after a takeover --------------------------------------------------------------------


def test_durable_subscriptions_sessions_and_retained_messages_survive_a_takeover(
    make_pair: Callable[..., HaPair], ha_report: HaReport
) -> None:
    pair = make_pair()
    amqp, stomp_hosts, mqtt = pair.endpoints("amqp"), pair.endpoints("stomp"), pair.endpoints("mqtt")
    persistent = pika.BasicProperties(delivery_mode=2)

    # AMQP: a durable topic exchange, a durable queue bound to it, confirmed messages.
    connection = amqp_connect(amqp)
    channel = connection.channel()
    channel.exchange_declare("ha-orders", "topic", durable=True)
    channel.queue_declare("ha-orders-q", durable=True)
    channel.queue_bind("ha-orders-q", "ha-orders", "order.*")
    channel.confirm_delivery()
    for n in range(10):
        channel.basic_publish("ha-orders", "order.new", b"order-%d" % n, persistent)
    connection.close()

    # STOMP: a RabbitMQ-style durable subscription (one message received, never acked) and an
    # ActiveMQ-style one (client-id + activemq.subscriptionName), then messages while both are away.
    rabbit = StompClient(stomp_hosts)
    rabbit.conn.subscribe(
        "/topic/ha-alerts.#", id="alerts", ack="client", headers={"durable": "true", "auto-delete": "false"}
    )
    activemq = StompClient(stomp_hosts, headers={"client-id": "billing"})
    activemq.conn.subscribe(
        "/topic/ha-invoices", id="inv", ack="auto", headers={"activemq.subscriptionName": "feed"}
    )
    rabbit.conn.send("/topic/ha-alerts.fire", "alert-0", headers={"persistent": "true"}, receipt="r0")
    rabbit.wait_messages(1)
    rabbit.close()
    activemq.close()
    publisher = StompClient(stomp_hosts)
    publisher.conn.send("/topic/ha-alerts.fire", "alert-1", headers={"persistent": "true"}, receipt="r1")
    publisher.conn.send("/topic/ha-invoices", "invoice-1", headers={"persistent": "true"}, receipt="r2")
    publisher.wait_receipt("r2")
    publisher.close()

    # MQTT: a persistent session with a QoS 1 subscription, a retained message, and a message
    # published while the session's client is away.
    if pair.mqtt:
        session = MqttClient(mqtt, "ha-session", clean_session=False)
        session.subscribe("ha/sensors/#", 1)
        session.close()
        mqtt_publisher = MqttClient(mqtt, "ha-mqtt-publisher", clean_session=True)
        mqtt_publisher.publish("ha/config", b"v1", retain=True)
        mqtt_publisher.publish("ha/sensors/t1", b"21.5")
        mqtt_publisher.close()

    pair.wait_in_sync(pair.a)
    died = time.monotonic()
    pair.a.kill()
    takeover = measure_takeover(pair.b, died)
    pair.b.wait_serving()

    # AMQP: the messages, and the binding (a new message is routed by it).
    connection = amqp_connect(amqp)
    channel = connection.channel()
    channel.basic_publish("ha-orders", "order.late", b"order-late", persistent)
    bodies: list[bytes] = []
    wait_for(lambda: _get_into(channel, "ha-orders-q", bodies) and len(bodies) >= 11, 10, "11 orders")
    connection.close()
    assert bodies == [b"order-%d" % n for n in range(10)] + [b"order-late"]

    # STOMP: both durable subscriptions kept what arrived while they were away.
    rabbit = StompClient(stomp_hosts)
    rabbit.conn.subscribe(
        "/topic/ha-alerts.#", id="alerts", ack="client", headers={"durable": "true", "auto-delete": "false"}
    )
    got = rabbit.wait_messages(2)
    assert [m.body for m in got] == ["alert-0", "alert-1"]
    assert got[0].headers.get("redelivered") == "true"
    activemq = StompClient(stomp_hosts, headers={"client-id": "billing"})
    activemq.conn.subscribe(
        "/topic/ha-invoices", id="inv", ack="auto", headers={"activemq.subscriptionName": "feed"}
    )
    assert [m.body for m in activemq.wait_messages(1)] == ["invoice-1"]
    rabbit.close()
    activemq.close()

    # MQTT: the session is present with its queued message; the retained message is there.
    if pair.mqtt:
        session = MqttClient(mqtt, "ha-session", clean_session=False)
        assert session.session_present is True
        assert [m.payload for m in session.wait_messages(1)] == [b"21.5"]
        session.close()
        fresh = MqttClient(mqtt, "ha-fresh", clean_session=True)
        fresh.subscribe("ha/config", 1)
        (retained,) = fresh.wait_messages(1)
        assert retained.payload == b"v1" and retained.retain
        fresh.close()
    ha_report.record(network=mode(pair), takeover_s=round(takeover, 3), mqtt=pair.mqtt)


def _get_into(channel: Any, queue: str, bodies: list[bytes]) -> bool:
    method, _props, body = channel.basic_get(queue, auto_ack=True)
    if method is not None:
        bodies.append(body)
    return True


# --- 6. a rolling restart ------------------------------------------------------------------------------------


def test_a_rolling_restart_hands_over_at_once_and_loses_nothing(
    make_pair: Callable[..., HaPair], ha_report: HaReport
) -> None:
    """SIGTERM of the active (an upgrade): it drains to the standby and releases the lease, so the
    standby takes over at once instead of waiting for the lease to expire; the old active, started
    again, rejoins as standby."""
    pair = make_pair()
    publishers = start_publishers(pair)
    wait_all(publishers, BEFORE)
    pair.wait_in_sync(pair.a)

    stopped = time.monotonic()
    assert pair.a.stop() == 0
    switchover = measure_takeover(pair.b, stopped)
    pair.a.start()
    pair.wait_in_sync(pair.b)
    wait_all(publishers, AFTER)

    stop_and_check(publishers, pair.endpoints("amqp"), ha_report, network=mode(pair))
    ha_report.record(network=mode(pair), switchover_s=round(switchover, 3))
    assert switchover < 1.0, f"a clean stop took {switchover:.2f} s to hand over"
