"""MQTT end to end with the asyncio clients amqtt (3.1.1, TCP and WebSocket) and aiomqtt (3.1.1 and 5.0, TCP,
TLS and WebSocket) against the real broker process: QoS 0/1/2 both ways, retained messages with wildcards,
persistent sessions, Will Messages; and Mosquitto's command-line clients. Each test runs its own event loop (`asyncio.run`) and waits with
timeouts, never with sleeps.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from typing import Any

import aiomqtt
import pytest
from amqtt.client import MQTTClient
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2

from tests.certs import CertificateSet, make_certificates
from tests.e2e.broker_process import BrokerProcess
from tests.e2e.test_mqtt import TIMEOUT, unique


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertificateSet:
    return make_certificates(tmp_path_factory.mktemp("mqtt-clients-certs"))


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, certs: CertificateSet) -> Iterator[BrokerProcess]:
    tls = {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key)}
    proc = BrokerProcess(tmp_path_factory.mktemp("mqtt-clients") / "data", tls=tls)
    proc.start(wait=("mqtt", "mqtt_tls", "ws", "wss"))
    yield proc
    proc.kill()
    assert "Traceback" not in proc.log(), proc.log()


# -- amqtt ----------------------------------------------------------------------------------------------


def amqtt_client(client_id: str | None = None) -> MQTTClient:
    return MQTTClient(
        client_id=client_id or unique("amqtt"), config={"auto_reconnect": False, "keep_alive": 30}
    )


async def amqtt_receive(client: MQTTClient, count: int) -> list[Any]:
    got = []
    for _ in range(count):
        message = await client.deliver_message(timeout_duration=TIMEOUT)
        assert message is not None, f"only {len(got)} of {count} messages"
        got.append(message)
    return got


@pytest.mark.parametrize("scheme", ["mqtt", "ws"])
def test_amqtt_qos_0_1_2_in_both_directions(broker: BrokerProcess, scheme: str) -> None:
    uri = (
        f"mqtt://127.0.0.1:{broker.ports['mqtt']}/"
        if scheme == "mqtt"
        else f"ws://127.0.0.1:{broker.ports['ws']}/mqtt"
    )
    topic = unique("amqtt")

    async def run() -> None:
        sub = amqtt_client()
        await sub.connect(uri)
        assert await sub.subscribe([(topic, QOS_2)]) == [QOS_2]
        pub = amqtt_client()
        await pub.connect(uri)
        for qos in (QOS_0, QOS_1, QOS_2):
            await pub.publish(topic, f"qos{qos}".encode(), qos=qos)
        got = await amqtt_receive(sub, 3)
        assert [(m.data, m.qos) for m in got] == [(b"qos0", 0), (b"qos1", 1), (b"qos2", 2)]
        await pub.disconnect()
        await sub.disconnect()

    asyncio.run(run())


def test_amqtt_retained_messages_reach_wildcards(broker: BrokerProcess) -> None:
    uri = f"mqtt://127.0.0.1:{broker.ports['mqtt']}/"
    base = unique("retain")

    async def run() -> None:
        pub = amqtt_client()
        await pub.connect(uri)
        await pub.publish(f"{base}/a/state", b"A", qos=QOS_1, retain=True)
        await pub.publish(f"{base}/b/state", b"B", qos=QOS_1, retain=True)
        sub = amqtt_client()
        await sub.connect(uri)
        await sub.subscribe([(f"{base}/+/state", QOS_1)])
        got = await amqtt_receive(sub, 2)
        assert sorted(m.data for m in got) == [b"A", b"B"]
        assert all(m.publish_packet.retain_flag for m in got)
        await pub.disconnect()
        await sub.disconnect()

    asyncio.run(run())


def test_amqtt_persistent_session_queues_while_away(broker: BrokerProcess) -> None:
    uri = f"mqtt://127.0.0.1:{broker.ports['mqtt']}/"
    topic = unique("away")
    client_id = unique("amqtt-persist")

    async def run() -> None:
        sub = amqtt_client(client_id)
        await sub.connect(uri, cleansession=False)
        await sub.subscribe([(topic, QOS_1)])
        await sub.disconnect()
        pub = amqtt_client()
        await pub.connect(uri)
        await pub.publish(topic, b"queued", qos=QOS_1)
        await pub.disconnect()
        back = amqtt_client(client_id)
        await back.connect(uri, cleansession=False)
        [message] = await amqtt_receive(back, 1)
        assert message.data == b"queued"
        await back.disconnect()

    asyncio.run(run())


def test_amqtt_will_is_sent_when_the_connection_breaks(broker: BrokerProcess) -> None:
    uri = f"mqtt://127.0.0.1:{broker.ports['mqtt']}/"
    topic = unique("will")

    async def run() -> None:
        watcher = amqtt_client()
        await watcher.connect(uri)
        await watcher.subscribe([(topic, QOS_1)])
        doomed = MQTTClient(
            client_id=unique("doomed"),
            config={"auto_reconnect": False, "will": {"topic": topic, "message": "gone", "qos": QOS_1}},
        )
        await doomed.connect(uri)
        assert doomed.session is not None and doomed._handler is not None
        doomed._handler.writer._writer.transport.abort()  # type: ignore[union-attr]  # no DISCONNECT
        [message] = await amqtt_receive(watcher, 1)
        assert message.data == b"gone"
        await watcher.disconnect()

    asyncio.run(run())


# -- aiomqtt --------------------------------------------------------------------------------------------


def aiomqtt_client(
    broker: BrokerProcess, version: int, transport: str = "tcp", **kwargs: Any
) -> aiomqtt.Client:
    protocol = aiomqtt.ProtocolVersion.V5 if version == 5 else aiomqtt.ProtocolVersion.V311
    port = broker.ports[{"tcp": "mqtt", "tls": "mqtt_tls", "ws": "ws", "wss": "wss"}[transport]]
    options: dict[str, Any] = {
        "hostname": "127.0.0.1",
        "port": port,
        "protocol": protocol,
        "identifier": kwargs.pop("identifier", unique("aio")),
    }
    if transport in ("ws", "wss"):
        options.update(transport="websockets", websocket_path="/mqtt")
    options.update(kwargs)
    return aiomqtt.Client(**options)


async def aiomqtt_receive(client: aiomqtt.Client, count: int) -> list[aiomqtt.Message]:
    got: list[aiomqtt.Message] = []

    async def collect() -> None:
        async for message in client.messages:
            got.append(message)
            if len(got) == count:
                return

    await asyncio.wait_for(collect(), TIMEOUT)
    return got


@pytest.mark.parametrize(
    ("version", "transport"), [(4, "tcp"), (5, "tcp"), (5, "ws"), (4, "tls"), (5, "tls")]
)
def test_aiomqtt_qos_0_1_2_in_both_directions(
    broker: BrokerProcess, certs: CertificateSet, version: int, transport: str
) -> None:
    topic = unique("aio")
    extra: dict[str, Any] = {}
    if transport == "tls":
        context = ssl.create_default_context(cafile=str(certs.ca_cert))
        extra["tls_context"] = context

    async def run() -> None:
        async with (
            aiomqtt_client(broker, version, transport, **extra) as sub,
            aiomqtt_client(broker, version, transport, **extra) as pub,
        ):
            await sub.subscribe(topic, qos=2)
            for qos in (0, 1, 2):
                await pub.publish(topic, f"qos{qos}".encode(), qos=qos)
            got = await aiomqtt_receive(sub, 3)
            assert [(m.payload, m.qos) for m in got] == [(b"qos0", 0), (b"qos1", 1), (b"qos2", 2)]
            assert all(m.topic.matches(topic) for m in got)

    asyncio.run(run())


def test_aiomqtt_persistent_session_across_reconnect(broker: BrokerProcess) -> None:
    topic = unique("aio-persist")
    identifier = unique("aio-persist")

    async def run() -> None:
        async with aiomqtt_client(broker, 4, identifier=identifier, clean_session=False) as sub:
            await sub.subscribe(topic, qos=1)
        async with aiomqtt_client(broker, 4) as pub:
            await pub.publish(topic, b"kept for you", qos=1)
        async with aiomqtt_client(broker, 4, identifier=identifier, clean_session=False) as back:
            [message] = await aiomqtt_receive(back, 1)
            assert message.payload == b"kept for you"

    asyncio.run(run())


def test_aiomqtt_v5_user_properties_and_will(broker: BrokerProcess) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    topic = unique("aio-v5")

    async def run() -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("source", "aiomqtt")]
        async with aiomqtt_client(broker, 5) as sub:
            await sub.subscribe(f"{topic}/#", qos=1)
            async with aiomqtt_client(broker, 5) as pub:
                await pub.publish(f"{topic}/data", b"x", qos=1, properties=props)
            doomed = aiomqtt_client(broker, 5, will=aiomqtt.Will(f"{topic}/will", b"lost", qos=1))
            await doomed.__aenter__()
            doomed._client.socket().close()  # the connection breaks without DISCONNECT
            got = await aiomqtt_receive(sub, 2)
            assert got[0].properties.UserProperty == [("source", "aiomqtt")]  # type: ignore[union-attr]
            assert (str(got[1].topic), got[1].payload) == (f"{topic}/will", b"lost")

    asyncio.run(run())


# -- mosquitto_pub / mosquitto_sub ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_clients_publish_and_subscribe(broker: BrokerProcess, version: str) -> None:
    sub_bin, pub_bin = shutil.which("mosquitto_sub"), shutil.which("mosquitto_pub")
    assert sub_bin and pub_bin, "mosquitto-clients (Debian) is part of the test environment"
    port = str(broker.ports["mqtt"])
    topic = unique("mosq")
    sub = subprocess.Popen(
        [
            sub_bin,
            "-h",
            "127.0.0.1",
            "-p",
            port,
            "-V",
            version,
            "-t",
            f"{topic}/#",
            "-q",
            "2",
            "-C",
            "3",
            "-v",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        # The retained message makes the subscription observable: wait for it, then publish the rest.
        subprocess.run(
            [
                pub_bin,
                "-h",
                "127.0.0.1",
                "-p",
                port,
                "-V",
                version,
                "-t",
                f"{topic}/r",
                "-m",
                "kept",
                "-r",
                "-q",
                "1",
            ],
            check=True,
            timeout=TIMEOUT,
        )
        assert sub.stdout is not None
        assert sub.stdout.readline().strip() == f"{topic}/r kept"
        for qos in ("1", "2"):
            subprocess.run(
                [
                    pub_bin,
                    "-h",
                    "127.0.0.1",
                    "-p",
                    port,
                    "-V",
                    version,
                    "-t",
                    f"{topic}/q",
                    "-m",
                    qos,
                    "-q",
                    qos,
                ],
                check=True,
                timeout=TIMEOUT,
            )
        out, _ = sub.communicate(timeout=TIMEOUT)
        assert out.split("\n")[:2] == [f"{topic}/q 1", f"{topic}/q 2"]
    finally:
        sub.kill()
        sub.wait()


def test_mosquitto_sub_reads_sys_topics(broker: BrokerProcess) -> None:
    sub_bin = shutil.which("mosquitto_sub")
    assert sub_bin
    result = subprocess.run(
        [
            sub_bin,
            "-h",
            "127.0.0.1",
            "-p",
            str(broker.ports["mqtt"]),
            "-t",
            "$SYS/broker/version",
            "-C",
            "1",
            "-v",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    assert result.stdout.startswith("$SYS/broker/version polybroker")
