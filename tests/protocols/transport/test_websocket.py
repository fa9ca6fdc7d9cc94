"""WebSocketDriver over real sockets, with the `websockets` client, on asyncio's loop and on uvloop.

Covers the upgrade (each subprotocol, each path, the refusals), frames both ways (text and binary in;
binary for MQTT and text for STOMP out; fragments; one message per turn; max_message_size), the
closing handshake from either side, ping, graceful shutdown and the Connection attributes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK, InvalidStatus

from protocols.transport.driver import ConnectionRegistry, TransportLimits
from protocols.transport.listeners import Listener, start_listener
from protocols.transport.websocket import HandshakeRefusal, WebSocketRoute, select_route
from tests.protocols.transport import LOOPS, LoopFactory, Probe, RecordingSession, run

pytestmark = LOOPS


async def serve_ws(
    mqtt: Probe | None,
    stomp: Probe | None,
    *,
    registry: ConnectionRegistry | None = None,
    limits: TransportLimits = TransportLimits(),
    session_class: type[RecordingSession] | None = None,
) -> tuple[Listener, ConnectionRegistry]:
    registry = registry if registry is not None else ConnectionRegistry()
    factories = {}
    if mqtt is not None:
        factories["mqtt"] = mqtt.factory(session_class)
    if stomp is not None:
        factories["stomp"] = stomp.factory(session_class)
    listener = await start_listener(
        "test-ws", "127.0.0.1", 0, factories, registry=registry, kind="websocket", limits=limits
    )
    return listener, registry


def url(listener: Listener, path: str) -> str:
    return f"ws://127.0.0.1:{listener.port}{path}"


@pytest.mark.parametrize(
    ("subprotocol", "kind"),
    [
        ("mqtt", "mqtt"),
        ("mqttv3.1", "mqtt"),
        ("v10.stomp", "stomp"),
        ("v11.stomp", "stomp"),
        ("v12.stomp", "stomp"),
    ],
)
def test_subprotocol_chooses_the_session_on_ws(
    loop_factory: LoopFactory, subprotocol: str, kind: str
) -> None:
    async def main() -> None:
        probes = {"mqtt": Probe(), "stomp": Probe()}
        listener, _ = await serve_ws(probes["mqtt"], probes["stomp"])
        async with connect(url(listener, "/ws"), subprotocols=[subprotocol]) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == subprotocol
            await ws.send(b"hello")
            reply = await ws.recv()
        # MQTT goes out in binary frames, STOMP in text frames (what stomp.js expects).
        assert reply == (b"HELLO" if kind == "mqtt" else "HELLO")
        chosen, other = probes[kind], probes["stomp" if kind == "mqtt" else "mqtt"]
        assert len(chosen.sessions) == 1 and not other.sessions
        assert chosen.sessions[0].connection.subprotocol == subprotocol
        await chosen.until(lambda: chosen.sessions[0].lost)
        listener.close()

    run(loop_factory, main())


@pytest.mark.parametrize(
    ("path", "offered", "kind", "answered"),
    [
        ("/mqtt", [], "mqtt", None),
        ("/mqtt?clientId=a", [], "mqtt", None),
        ("/mqtt", ["mqtt"], "mqtt", "mqtt"),
        ("/stomp", [], "stomp", None),
        ("/stomp/", ["v11.stomp", "v12.stomp"], "stomp", "v12.stomp"),
        ("/ws", ["foo", "v10.stomp"], "stomp", "v10.stomp"),
    ],
)
def test_path_chooses_the_session(
    loop_factory: LoopFactory, path: str, offered: list[str], kind: str, answered: str | None
) -> None:
    async def main() -> None:
        probes = {"mqtt": Probe(), "stomp": Probe()}
        listener, _ = await serve_ws(probes["mqtt"], probes["stomp"])
        async with connect(url(listener, path), subprotocols=offered or None) as ws:  # type: ignore[arg-type]
            assert ws.subprotocol == answered
            await ws.send("abc")
            assert await ws.recv() == (b"ABC" if kind == "mqtt" else "ABC")
        assert len(probes[kind].sessions) == 1
        listener.close()

    run(loop_factory, main())


@pytest.mark.parametrize(
    ("path", "offered", "status"),
    [
        ("/ws", [], 400),
        ("/ws", ["foo"], 400),
        ("/mqtt", ["v12.stomp"], 400),
        ("/", ["mqtt"], 404),
        ("/nope", ["mqtt"], 404),
    ],
)
def test_an_upgrade_that_cannot_be_mapped_is_refused(
    loop_factory: LoopFactory, caplog: pytest.LogCaptureFixture, path: str, offered: list[str], status: int
) -> None:
    caplog.set_level(logging.INFO, logger="polybroker.connection")

    async def main() -> None:
        probe = Probe()
        listener, registry = await serve_ws(probe, probe)
        with pytest.raises(InvalidStatus) as refused:
            await connect(url(listener, path), subprotocols=offered or None)  # type: ignore[arg-type]
        assert refused.value.response.status_code == status
        assert not probe.sessions
        await registry.wait_empty(5)
        listener.close()

    run(loop_factory, main())
    lines = [r.getMessage() for r in caplog.records if r.name == "polybroker.connection"]
    assert any(line.startswith("connection refused") and f"HTTP {status}" in line for line in lines)
    assert not any(line.startswith("connection opened") for line in lines)


def test_a_protocol_the_listener_does_not_serve_is_refused(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        listener, _ = await serve_ws(Probe(), None)
        for path, offered, status in [("/stomp", None, 404), ("/ws", ["v12.stomp"], 400)]:
            with pytest.raises(InvalidStatus) as refused:
                await connect(url(listener, path), subprotocols=offered)  # type: ignore[arg-type]
            assert refused.value.response.status_code == status
        listener.close()

    run(loop_factory, main())


def test_select_route(loop_factory: LoopFactory) -> None:
    both = {"mqtt", "stomp"}
    assert select_route("/ws", ["v10.stomp", "v12.stomp"], both) == WebSocketRoute("stomp", "v12.stomp")
    assert select_route("/ws", ["MQTT"], both) == WebSocketRoute("mqtt", "MQTT")
    assert select_route("/mqtt", [], both) == WebSocketRoute("mqtt", None)
    refusal = select_route("/ws", [], both)
    assert isinstance(refusal, HandshakeRefusal) and refusal.status == 400
    assert "mqtt" in refusal.reason and "v12.stomp" in refusal.reason


async def raw_http(listener: Listener, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    writer.write(request)
    try:
        return await reader.read()
    finally:
        writer.close()


def test_a_plain_http_request_gets_426_and_garbage_is_closed(
    loop_factory: LoopFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="polybroker.connection")

    async def main() -> None:
        probe = Probe()
        listener, registry = await serve_ws(probe, probe)
        response = await raw_http(listener, b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert response.startswith(b"HTTP/1.1 426 ")
        assert await raw_http(listener, b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00\r\n\r\n") == b""
        await registry.wait_empty(5)
        assert not probe.sessions
        listener.close()

    run(loop_factory, main())
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("connection refused")]
    assert len(refused) == 2


def test_an_upgrade_that_never_comes_times_out(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        probe = Probe()
        listener, registry = await serve_ws(probe, probe, limits=TransportLimits(handshake_timeout=0.1))
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"GET /mqtt HTTP/1.1\r\n")
        try:
            assert await reader.read() == b""
        except ConnectionResetError:
            pass
        await registry.wait_empty(5)
        assert registry.open_connections == 0 and not probe.sessions
        writer.close()
        listener.close()

    run(loop_factory, main())


def test_text_binary_and_fragmented_messages_reach_the_session_as_bytes(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        probe = Probe()
        listener, _ = await serve_ws(probe, None)
        async with connect(url(listener, "/mqtt")) as ws:
            await ws.send("text é")
            assert await ws.recv() == "text é".encode().upper()
            await ws.send(b"\x00\xffbin")
            assert await ws.recv() == b"\x00\xffBIN"
            await ws.send([b"frag", b"men", b"ted"])  # one message in three frames
            echoed = b""
            while echoed != b"FRAGMENTED":  # fragments are fed as they come: one or more echoes
                message = await ws.recv()
                assert isinstance(message, bytes)
                echoed += message
        assert bytes(probe.sessions[0].received) == "text é".encode() + b"\x00\xffbinfragmented"
        listener.close()

    run(loop_factory, main())


class Burst(RecordingSession):
    """On any input, writes the pieces listed in `pieces` in one turn."""

    def __init__(self, probe: Probe, *, pieces: list[bytes]) -> None:
        super().__init__(probe, echo=False)
        self.pieces = pieces

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        for piece in self.pieces:
            self.connection.write(piece)


async def serve_burst(probe: Probe, pieces: list[bytes], limits: TransportLimits) -> Listener:
    return await start_listener(
        "burst",
        "127.0.0.1",
        0,
        {"mqtt": probe.factory(Burst, pieces=pieces), "stomp": probe.factory(Burst, pieces=pieces)},
        registry=ConnectionRegistry(),
        kind="websocket",
        limits=limits,
    )


def test_writes_of_one_turn_go_out_as_one_message(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        probe = Probe()
        pieces = [b"<%d>" % i for i in range(500)]
        listener = await serve_burst(probe, pieces, TransportLimits())
        async with connect(url(listener, "/stomp")) as ws:
            await ws.send(b"go")
            assert await ws.recv() == b"".join(pieces).decode()
            await ws.send(b"again")
            assert await ws.recv() == b"".join(pieces).decode()
        listener.close()

    run(loop_factory, main())


def test_outgoing_messages_stay_under_max_message_size_without_splitting_a_write(
    loop_factory: LoopFactory,
) -> None:
    async def main() -> None:
        probe = Probe()
        pieces = [b"a" * 600, b"b" * 300, b"c" * 200, b"d" * 2000]
        limits = TransportLimits(max_message_size=1024)
        listener = await serve_burst(probe, pieces, limits)
        async with connect(url(listener, "/mqtt")) as ws:
            await ws.send(b"go")
            assert [await ws.recv() for _ in range(3)] == [b"a" * 600 + b"b" * 300, b"c" * 200, b"d" * 2000]
        listener.close()

    run(loop_factory, main())


def test_an_incoming_message_over_max_message_size_closes_with_1009(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        probe = Probe()
        listener, _ = await serve_ws(probe, None, limits=TransportLimits(max_message_size=1024))
        async with connect(url(listener, "/mqtt")) as ws:
            await ws.send(b"x" * 1024)
            assert await ws.recv() == b"X" * 1024
            await ws.send(b"x" * 1025)
            with pytest.raises(ConnectionClosedError):
                await ws.recv()
            assert ws.close_code == 1009
        await probe.until(lambda: probe.sessions[0].lost)
        assert len(probe.sessions[0].received) == 1024
        listener.close()

    run(loop_factory, main())


def test_client_close_handshake(loop_factory: LoopFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="polybroker.connection")

    async def main() -> None:
        probe = Probe()
        listener, _ = await serve_ws(probe, None)
        ws = await connect(url(listener, "/mqtt"))
        pong = await ws.ping(b"are you there")
        await asyncio.wait_for(pong, 5)
        await ws.close()
        assert ws.close_code == 1000
        await probe.until(lambda: probe.sessions[0].lost)
        assert probe.sessions[0].lost == [None]
        listener.close()

    run(loop_factory, main())
    closed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("connection closed")]
    assert len(closed) == 1 and "WebSocket close 1000" in closed[0]


class ClosesOnBye(RecordingSession):
    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if data == b"bye":
            self.connection.close()


def test_server_close_handshake_sends_pending_data_first(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        probe = Probe()
        listener, _ = await serve_ws(probe, None, session_class=ClosesOnBye)
        async with connect(url(listener, "/mqtt")) as ws:
            await ws.send(b"bye")
            assert await ws.recv() == b"BYE"
            with pytest.raises(ConnectionClosedOK):
                await ws.recv()
            assert ws.close_code == 1000
        await probe.until(lambda: probe.sessions[0].lost)
        listener.close()

    run(loop_factory, main())


def test_shutdown_says_bye_and_closes_with_going_away(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        probe = Probe()
        listener, registry = await serve_ws(None, probe)
        ws: ClientConnection
        async with connect(url(listener, "/stomp")) as ws:
            await ws.send(b"hi")
            assert await ws.recv() == "HI"
            listener.close()
            await registry.close_all(grace=1.0)
            assert await ws.recv() == "BYE"
            with pytest.raises(ConnectionClosedOK):
                await ws.recv()
            assert ws.close_code == 1001
        assert probe.sessions[0].shutdowns == 1 and probe.sessions[0].lost == [None]

    run(loop_factory, main())


class FailsOnBoom(RecordingSession):
    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if data == b"boom":
            raise ValueError("session bug")


def test_a_session_exception_closes_only_its_connection(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        probe = Probe()
        listener, registry = await serve_ws(probe, None, session_class=FailsOnBoom)
        async with connect(url(listener, "/mqtt")) as bystander, connect(url(listener, "/mqtt")) as victim:
            await victim.send(b"boom")
            with pytest.raises(ConnectionClosedError):
                await victim.recv()
            await bystander.send(b"fine")
            assert await bystander.recv() == b"FINE"
        assert registry.session_errors == 1
        listener.close()

    run(loop_factory, main())


def test_connection_attributes(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        probe = Probe()
        listener, _ = await serve_ws(None, probe)
        async with connect(url(listener, "/ws"), subprotocols=["v12.stomp"]) as ws:  # type: ignore[list-item]
            await ws.send(b"x")
            await ws.recv()
            conn = probe.sessions[0].connection
            host, port = ws.local_address[:2]
            assert conn.peer == f"{host}:{port}"
            assert conn.is_loopback
            assert conn.transport_name == "ws"
            assert conn.subprotocol == "v12.stomp"
        listener.close()

    run(loop_factory, main())


def test_a_websocket_listener_rejects_protocols_it_cannot_carry(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        factories: dict[str, Any] = {"amqp091": Probe().factory()}
        with pytest.raises(ValueError):
            await start_listener(
                "bad", "127.0.0.1", 0, factories, registry=ConnectionRegistry(), kind="websocket"
            )

    run(loop_factory, main())
