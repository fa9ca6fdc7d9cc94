"""The cost and the speed of active/standby HA, measured with real broker processes and real clients.

Two measurements, in one run, on the two-zone harness of the failover tests (tests/e2e/ha/azs.py:
network namespaces joined by a veth pair when the machine allows it, else 127.0.0.2/127.0.0.3):

- throughput: confirmed persistent publishes per second (AMQP basic.publish under confirm mode with
  pika, STOMP SEND with receipts with stomp.py, MQTT QoS 1 with paho-mqtt; one client at a time,
  each with a window of unconfirmed messages) against a single node (no [ha]) and against a
  synchronous pair (a message is confirmed once it is durable on both nodes), alternating the two
  setups round after round so that both see the same machine; a fresh broker (or pair) per
  measurement;
- takeover: kill -9 of the active while the three clients publish; the time until the standby
  accepts connections, the time until each client has its first confirmation from the new active,
  and the confirmed messages lost (must be 0) and delivered twice.

    /work/venv/bin/python bench/ha_bench.py [--mode netns|loopback] [--seconds 5] [--rounds 2]
        [--takeovers 3] [--window 200] [--json results.json]

The clients run on the same machine as the brokers, and are Python too: on a small machine they
take a good share of the CPU, in both setups alike.

Must not import: broker.core, protocols (beyond what the test clients use), storage, cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e.ha.azs import (  # noqa: E402
    AzNetwork,
    HaPair,
    NetworkMode,
    NodeProcess,
    make_network,
    measure_takeover,
    mqtt_available,
    netns_unavailable_reason,
)
from tests.e2e.ha.clients import (  # noqa: E402
    AmqpPublisher,
    MqttPublisher,
    Publisher,
    StompPublisher,
    amqp_connect,
    count_outcome,
    drain_amqp,
)

QUEUES = {"amqp": "bench-amqp", "stomp": "bench-stomp", "mqtt": "bench-mqtt"}
WARMUP_SECONDS = 1.0
MAX_COUNT = 10**8  # publishers run until stopped


def declare(node: NodeProcess) -> None:
    connection = amqp_connect([node.endpoint("amqp")])
    try:
        channel = connection.channel()
        for queue in QUEUES.values():
            channel.queue_declare(queue, durable=True)
        channel.queue_bind(QUEUES["mqtt"], "amq.topic", "bench.mqtt")
    finally:
        connection.close()


def publisher(protocol: str, endpoints: list[tuple[str, int]], window: int) -> Publisher:
    options: dict[str, Any] = {"window": window, "max_count": MAX_COUNT}
    if protocol == "amqp":
        return AmqpPublisher(endpoints, QUEUES["amqp"], **options)
    if protocol == "stomp":
        return StompPublisher(endpoints, "/queue/" + QUEUES["stomp"], **options)
    return MqttPublisher(endpoints, "bench/mqtt", **options)


def rate(pub: Publisher, seconds: float) -> float:
    """Confirmations per second over `seconds`, after a warm-up."""
    pub.start()
    time.sleep(WARMUP_SECONDS)  # benchmark timing, not synchronisation
    start_count, start = pub.confirmed_count, time.monotonic()
    time.sleep(seconds)  # the measurement window
    end_count, end = pub.confirmed_count, time.monotonic()
    pub.stop()
    if pub.stats.reconnects or not end_count:
        raise RuntimeError(f"{pub.stats.name}: the measurement was disturbed: {pub.stats.errors[-5:]}")
    return (end_count - start_count) / (end - start)


def single_node(network: AzNetwork, directory: Path, mqtt: bool) -> NodeProcess:
    zone = network.zones[0]
    node = NodeProcess(network, zone, directory / zone.name, directory / "unused-lock", mqtt=mqtt, ha=False)
    node.start()
    node.wait_serving()
    return node


def throughput(network: AzNetwork, args: argparse.Namespace, protocols: list[str]) -> dict[str, Any]:
    results: dict[str, dict[str, list[float]]] = {p: {"single": [], "pair": []} for p in protocols}
    mqtt = "mqtt" in protocols
    for round_ in range(args.rounds):
        for protocol in protocols:
            for setup in ("single", "pair"):
                with tempfile.TemporaryDirectory(prefix="ha-bench-") as tmp:
                    directory = Path(tmp)
                    if setup == "single":
                        node = single_node(network, directory, mqtt)
                        stop: Callable[[], None] = node.kill
                        endpoints = [node.endpoint(protocol)]
                        declare(node)
                    else:
                        pair = HaPair(network, directory, mqtt=mqtt).start()
                        stop = pair.close
                        endpoints = pair.endpoints(protocol)
                        declare(pair.a)
                        pair.wait_in_sync(pair.a)
                    try:
                        value = rate(publisher(protocol, endpoints, args.window), args.seconds)
                    finally:
                        stop()
                results[protocol][setup].append(value)
                print(f"round {round_ + 1} {protocol:5} {setup:6} {value:9.0f} confirmed msg/s", flush=True)
    summary: dict[str, Any] = {}
    for protocol, by_setup in results.items():
        alone, paired = statistics.median(by_setup["single"]), statistics.median(by_setup["pair"])
        summary[protocol] = {
            "single_msg_per_s": round(alone),
            "pair_msg_per_s": round(paired),
            "pair_over_single": round(paired / alone, 3),
            "runs": by_setup,
        }
    return summary


def takeover(network: AzNetwork, args: argparse.Namespace, protocols: list[str]) -> list[dict[str, Any]]:
    runs = []
    for run in range(args.takeovers):
        with tempfile.TemporaryDirectory(prefix="ha-bench-") as tmp:
            pair = HaPair(network, Path(tmp), mqtt="mqtt" in protocols).start()
            try:
                declare(pair.a)
                pair.wait_in_sync(pair.a)
                pubs = [publisher(p, pair.endpoints(p), args.window) for p in protocols]
                for pub in pubs:
                    pair.add_cleanup(pub.abort)
                    pub.start()
                time.sleep(WARMUP_SECONDS)  # let the publishers reach full speed
                died = time.monotonic()
                pair.a.kill()
                accepting = measure_takeover(pair.b, died)
                served = died + accepting
                for pub in pubs:
                    pub.wait_confirmed(pub.confirmed_count + 100, 60)
                result: dict[str, Any] = {"run": run + 1, "accepting_s": round(accepting, 3)}
                for pub in pubs:
                    stats = pub.stop()
                    delivered = drain_amqp(pair.endpoints("amqp"), QUEUES[stats.name])
                    outcome = count_outcome(stats.confirmed, delivered)
                    # Confirmations read after the death but sent by the old active do not count.
                    first = pub.first_confirmation_after(served)
                    result[stats.name] = {
                        "first_confirm_after_death_s": None if first is None else round(accepting + first, 3),
                        "confirmed": outcome.confirmed,
                        "lost": len(outcome.lost),
                        "duplicates": outcome.duplicates,
                    }
            finally:
                pair.close()
        print(f"takeover {run + 1}: {json.dumps(result)}", flush=True)
        runs.append(result)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=[m.value for m in NetworkMode], default=None)
    parser.add_argument("--seconds", type=float, default=5.0, help="measurement window per run")
    parser.add_argument("--rounds", type=int, default=2, help="single/pair alternations per protocol")
    parser.add_argument("--takeovers", type=int, default=3, help="kill -9 takeovers to time")
    parser.add_argument("--window", type=int, default=200, help="unconfirmed messages per client")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    # The clients log every refused connection attempt during a takeover; the results say enough.
    for name in ("pika", "stomp.py", "paho"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if args.mode is None:
        reason = netns_unavailable_reason()
        mode = NetworkMode.NETNS if reason is None else NetworkMode.LOOPBACK
        if reason is not None:
            print(f"network namespaces unavailable ({reason}): using loopback addresses")
    else:
        mode = NetworkMode(args.mode)
    protocols = ["amqp", "stomp", "mqtt"] if mqtt_available() else ["amqp", "stomp"]
    network = make_network(mode, cuttable=False)
    try:
        print(f"network: {network.describe()}; protocols: {', '.join(protocols)}", flush=True)
        results = {
            "network": network.describe(),
            "throughput": throughput(network, args, protocols),
            "takeover": takeover(network, args, protocols),
        }
    finally:
        network.close()
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
