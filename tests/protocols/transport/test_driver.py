"""StreamDriver, ConnectionRegistry and the listeners over plain TCP, on asyncio's loop and on uvloop.

The first group drives a StreamDriver through a fake transport (exact calls are visible there); the
rest uses real sockets on 127.0.0.1 with port 0.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from typing import Any

import pytest

import protocols.transport
from protocols.transport.driver import (
    ConnectionRegistry,
    ListenerContext,
    StreamDriver,
    TransportLimits,
    peer_address,
)
from protocols.transport.listeners import Listener, start_listener, stop_listeners
from tests.protocols.transport import LOOPS, LoopFactory, Probe, RecordingSession, run

pytestmark = LOOPS

SMALL_BUFFERS = TransportLimits(
    write_high_water=64 * 1024, write_low_water=16 * 1024, max_pending_write_bytes=64 * 1024
)


# -- A fake transport: every call the driver makes is recorded --------------------------------------


class FakeTransport(asyncio.Transport):
    def __init__(self, protocol: asyncio.Protocol, probe: Probe, peer: object = ("127.0.0.1", 40000)) -> None:
        super().__init__()
        self.protocol = protocol
        self.probe = probe
        self.peer = peer
        self.writes: list[bytes] = []
        self.limits: tuple[int | None, int | None] | None = None
        self.buffer_size = 0
        self.reading = True
        self.closed = False
        self.aborted = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        self.probe.changed()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.limits = (high, low)

    def get_write_buffer_size(self) -> int:
        return self.buffer_size

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        if not self.is_closing():
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        if not self.is_closing():
            self.aborted = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)


def fake_connection(
    probe: Probe,
    limits: TransportLimits = TransportLimits(),
    session_class: type[RecordingSession] | None = None,
    registry: ConnectionRegistry | None = None,
    **kwargs: Any,
) -> tuple[StreamDriver, FakeTransport, ConnectionRegistry]:
    registry = registry if registry is not None else ConnectionRegistry()
    context = ListenerContext("test", "tcp", limits, registry)
    driver = StreamDriver(probe.factory(session_class, **kwargs), context)
    transport = FakeTransport(driver, probe)
    driver.connection_made(transport)
    return driver, transport, registry


def test_writes_in_one_turn_are_one_transport_write(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        probe = Probe()
        _, transport, _ = fake_connection(probe)
        conn = probe.sessions[0].connection
        for i in range(1000):
            conn.write(b"%d," % i)
        assert transport.writes == []  # nothing leaves before the turn ends
        await probe.until(lambda: transport.writes)
        assert transport.writes == [b"".join(b"%d," % i for i in range(1000))]
        conn.write(b"next turn")
        await probe.until(lambda: len(transport.writes) == 2)
        assert transport.writes[1] == b"next turn"

    run(loop_factory, main())


def test_write_buffer_limits_come_from_the_listener_limits(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        _, transport, _ = fake_connection(Probe(), SMALL_BUFFERS)
        assert transport.limits == (64 * 1024, 16 * 1024)

    run(loop_factory, main())


def test_close_flushes_then_closes_and_drops_later_writes(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        probe = Probe()
        _, transport, registry = fake_connection(probe)
        session = probe.sessions[0]
        session.connection.write(b"last words")
        session.connection.close()
        assert transport.writes == [b"last words"]
        assert transport.closed
        session.connection.write(b"too late")
        session.connection.close()  # idempotent
        await probe.until(lambda: session.lost)
        assert transport.writes == [b"last words"]
        assert session.lost == [None]
        assert registry.open_connections == 0

    run(loop_factory, main())


def test_abort_discards_unsent_bytes(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        probe = Probe()
        _, transport, _ = fake_connection(probe)
        session = probe.sessions[0]
        session.connection.write(b"never sent")
        session.connection.abort()
        await probe.until(lambda: session.lost)
        assert transport.aborted
        assert transport.writes == []

    run(loop_factory, main())


def test_connection_lost_reaches_the_session_exactly_once(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        probe = Probe()
        driver, _, _ = fake_connection(probe)
        error = ConnectionResetError("reset by peer")
        driver.connection_lost(error)
        driver.connection_lost(None)
        assert probe.sessions[0].lost == [error]

    run(loop_factory, main())


def test_pause_and_resume_reading_pass_through(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        probe = Probe()
        _, transport, _ = fake_connection(probe)
        conn = probe.sessions[0].connection
        conn.pause_reading()
        conn.pause_reading()
        assert not transport.reading
        conn.resume_reading()
        assert transport.reading

    run(loop_factory, main())


def test_writing_paused_and_resumed_reach_the_session(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        probe = Probe()
        driver, _, _ = fake_connection(probe)
        session = probe.sessions[0]
        assert session.connection.writable
        driver.pause_writing()
        assert (session.paused, session.connection.writable) == (1, False)
        driver.resume_writing()
        assert (session.resumed, session.connection.writable) == (1, True)

    run(loop_factory, main())


def test_backlog_over_the_limit_aborts_a_slow_consumer(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        probe = Probe()
        driver, transport, registry = fake_connection(probe, SMALL_BUFFERS)
        session = probe.sessions[0]
        driver.pause_writing()
        transport.buffer_size = SMALL_BUFFERS.max_pending_write_bytes  # at the limit: still tolerated
        session.connection.write(b"x")
        await probe.until(lambda: transport.writes)
        assert not transport.aborted
        transport.buffer_size += 1
        session.connection.write(b"y")
        await probe.until(lambda: session.lost)
        assert transport.aborted
        assert registry.slow_consumers == 1

    run(loop_factory, main())


def test_timers_fire_through_the_loop_and_stop_with_the_connection(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        probe = Probe()
        driver, _, _ = fake_connection(probe)
        conn = probe.sessions[0].connection
        fired: list[float] = []
        start = conn.now()
        assert start == pytest.approx(asyncio.get_running_loop().time(), abs=0.5)

        def tick() -> None:
            fired.append(conn.now())
            probe.changed()

        conn.call_later(0.01, tick)
        cancelled = conn.call_later(0.01, lambda: fired.append(-1.0))
        cancelled.cancel()
        await probe.until(lambda: fired)
        assert fired[0] >= start
        assert -1.0 not in fired
        conn.call_later(0, lambda: fired.append(-2.0))
        driver.connection_lost(None)
        loop = asyncio.get_running_loop()
        later = loop.create_future()
        loop.call_later(0.01, later.set_result, None)
        await later
        assert -2.0 not in fired

    run(loop_factory, main())


def test_a_timer_that_raises_aborts_only_its_connection(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        probe = Probe()
        registry = ConnectionRegistry()
        _, failing, _ = fake_connection(probe, registry=registry)
        _, healthy, _ = fake_connection(probe, registry=registry)

        def boom() -> None:
            raise RuntimeError("timer bug")

        probe.sessions[0].connection.call_later(0, boom)
        await probe.until(lambda: probe.sessions[0].lost)
        assert failing.aborted and not healthy.is_closing()
        assert registry.session_errors == 1

    run(loop_factory, main())


class FailsOnConnect(RecordingSession):
    def connection_made(self, conn: Any) -> None:
        super().connection_made(conn)
        raise RuntimeError("bug in connection_made")


def test_an_exception_in_connection_made_aborts_the_connection(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        probe = Probe()
        _, transport, registry = fake_connection(probe, session_class=FailsOnConnect)
        await probe.until(lambda: probe.sessions[0].lost)
        assert transport.aborted
        assert registry.session_errors == 1

    run(loop_factory, main())


# -- Peer addresses ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peername", "expected"),
    [
        (("127.0.0.1", 5000), ("127.0.0.1:5000", True)),
        (("127.8.9.10", 5000), ("127.8.9.10:5000", True)),
        (("10.1.2.3", 5000), ("10.1.2.3:5000", False)),
        (("::1", 5000, 0, 0), ("[::1]:5000", True)),
        (("::ffff:127.0.0.1", 5000, 0, 0), ("[::ffff:127.0.0.1]:5000", True)),
        (("::ffff:192.168.1.20", 5000, 0, 0), ("[::ffff:192.168.1.20]:5000", False)),
        (("fe80::1%lo", 5000, 0, 1), ("[fe80::1%lo]:5000", False)),
        (("2001:db8::1", 5000, 0, 0), ("[2001:db8::1]:5000", False)),
        (None, ("unknown", False)),
    ],
)
def test_peer_address(loop_factory: LoopFactory, peername: object, expected: tuple[str, bool]) -> None:
    assert peer_address(peername) == expected


def test_new_event_loop_prefers_uvloop(loop_factory: LoopFactory) -> None:
    import uvloop

    loop = protocols.transport.new_event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


# -- Real sockets --------------------------------------------------------------------------------------


async def serve(
    probe: Probe,
    *,
    registry: ConnectionRegistry | None = None,
    limits: TransportLimits = TransportLimits(),
    session_class: type[RecordingSession] | None = None,
    name: str = "test-tcp",
    host: str = "127.0.0.1",
    **kwargs: Any,
) -> tuple[Listener, ConnectionRegistry]:
    registry = registry if registry is not None else ConnectionRegistry()
    listener = await start_listener(
        name,
        host,
        0,
        {"test": probe.factory(session_class, **kwargs)},
        registry=registry,
        limits=limits,
    )
    return listener, registry


async def echo_roundtrip(port: int, payload: bytes = b"ping", host: str = "127.0.0.1") -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(payload)
        return await reader.readexactly(len(payload))
    finally:
        writer.close()


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sent until it closed (EOF or reset)."""
    data = bytearray()
    try:
        while chunk := await reader.read(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return bytes(data)


def test_bytes_in_any_chunking_reach_the_session(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        probe = Probe()
        listener, _ = await serve(probe)
        payload = random.Random(7).randbytes(300_000)
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        chunks = random.Random(8)
        offset = 0
        while offset < len(payload):
            size = chunks.choice([1, 2, 7, 100, 4096, 65536])
            writer.write(payload[offset : offset + size])
            offset += size
            await writer.drain()
        echoed = await reader.readexactly(len(payload))
        assert echoed == payload.upper()
        assert bytes(probe.sessions[0].received) == payload
        writer.close()
        await probe.until(lambda: probe.sessions[0].lost)
        listener.close()

    run(loop_factory, main())


class Burst(RecordingSession):
    """On any input, writes 2,000 numbered pieces in one turn."""

    def data_received(self, data: bytes) -> None:
        for i in range(2000):
            self.connection.write(b"<%d>" % i)


def test_many_writes_in_one_turn_arrive_complete_and_in_order(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        probe = Probe()
        listener, _ = await serve(probe, session_class=Burst)
        expected = b"".join(b"<%d>" % i for i in range(2000))
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"go")
        assert await reader.readexactly(len(expected)) == expected
        writer.close()
        listener.close()

    run(loop_factory, main())


class Pump(RecordingSession):
    """Echoes, except that "go" starts writing 64 KiB per turn while the connection is writable
    (or regardless, if `rude`)."""

    CHUNK = b"z" * 65536

    def __init__(self, probe: Probe, *, rude: bool = False) -> None:
        super().__init__(probe, echo=False)
        self.rude = rude
        self.written = 0

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.received == b"go":
            self.pump()
        else:
            self.connection.write(data.upper())

    def pump(self) -> None:
        if self.lost or not (self.rude or self.connection.writable):
            return
        self.connection.write(self.CHUNK)
        self.written += len(self.CHUNK)
        self.connection.call_later(0, self.pump)


async def client_with_small_receive_buffer(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    # The StreamReader stops reading the socket once 128 KiB are buffered: a client that does not read.
    return await asyncio.open_connection(sock=sock)


def test_pause_and_resume_writing_reach_the_session(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        probe = Probe()
        limits = TransportLimits(write_high_water=64 * 1024, write_low_water=16 * 1024)
        listener, registry = await serve(probe, limits=limits, session_class=Pump)
        reader, writer = await client_with_small_receive_buffer(listener.port)
        writer.write(b"go")
        await probe.until(lambda: probe.sessions and probe.sessions[0].paused)
        session = probe.sessions[0]
        assert isinstance(session, Pump)
        assert not session.connection.writable
        assert session.resumed == 0
        received = 0
        while received < session.written or not session.resumed:
            received += len(await reader.read(1 << 20))
        assert session.connection.writable
        assert (session.paused, session.resumed) == (1, 1)
        assert not session.lost and registry.slow_consumers == 0
        writer.close()
        listener.close()

    run(loop_factory, main())


def test_a_slow_consumer_is_cut_off_alone(
    loop_factory: LoopFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="polybroker.connection")

    async def main() -> None:
        probe = Probe()
        limits = TransportLimits(
            write_high_water=64 * 1024, write_low_water=16 * 1024, max_pending_write_bytes=512 * 1024
        )
        listener, registry = await serve(probe, limits=limits, session_class=Pump, rude=True)
        bystander_reader, bystander_writer = await asyncio.open_connection("127.0.0.1", listener.port)
        bystander_writer.write(b"hello")
        assert await bystander_reader.readexactly(5) == b"HELLO"
        reader, writer = await client_with_small_receive_buffer(listener.port)
        writer.write(b"go")
        await probe.until(lambda: len(probe.sessions) == 2 and probe.sessions[1].lost)
        victim = probe.sessions[1]
        assert isinstance(victim, Pump)
        assert victim.paused == 1 and victim.written > limits.max_pending_write_bytes
        assert registry.slow_consumers == 1
        # Everyone else carries on: the open connection is served, and the listener still accepts.
        bystander_writer.write(b"still here")
        assert await bystander_reader.readexactly(10) == b"STILL HERE"
        assert await echo_roundtrip(listener.port, b"new") == b"NEW"
        assert not probe.sessions[0].lost
        bystander_writer.close()
        writer.close()
        listener.close()

    run(loop_factory, main())
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and "slow consumer" in r.getMessage()
    ]
    assert warnings and "127.0.0.1:" in warnings[0].getMessage()


class FailsOnBoom(RecordingSession):
    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if b"boom" in self.received:
            raise ValueError("session bug")


def test_a_session_exception_closes_only_its_connection(
    loop_factory: LoopFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="polybroker.connection")
    peers: list[str] = []

    async def main() -> None:
        probe = Probe()
        listener, registry = await serve(probe, session_class=FailsOnBoom)
        bystander_reader, bystander_writer = await asyncio.open_connection("127.0.0.1", listener.port)
        bystander_writer.write(b"hello")
        assert await bystander_reader.readexactly(5) == b"HELLO"
        victim_reader, victim_writer = await asyncio.open_connection("127.0.0.1", listener.port)
        victim_writer.write(b"boom")
        await read_until_closed(victim_reader)
        await probe.until(lambda: probe.sessions[1].lost)
        peers.append(probe.sessions[1].connection.peer)
        assert registry.session_errors == 1
        assert not probe.sessions[0].lost
        bystander_writer.write(b"still here")
        assert await bystander_reader.readexactly(10) == b"STILL HERE"
        assert await echo_roundtrip(listener.port, b"new") == b"NEW"
        bystander_writer.close()
        victim_writer.close()
        listener.close()

    run(loop_factory, main())
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert peers[0] in errors[0].getMessage() and "session bug" in errors[0].getMessage()


def test_the_connection_limit_refuses_the_extra_connection(
    loop_factory: LoopFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="polybroker.connection")

    async def main() -> None:
        probe = Probe()
        registry = ConnectionRegistry(max_connections=2)
        listener, _ = await serve(probe, registry=registry)
        clients = [await asyncio.open_connection("127.0.0.1", listener.port) for _ in range(2)]
        for reader, writer in clients:
            writer.write(b"in")
            assert await reader.readexactly(2) == b"IN"
        extra_reader, extra_writer = await asyncio.open_connection("127.0.0.1", listener.port)
        assert await read_until_closed(extra_reader) == b""
        assert registry.refused == 1
        assert len(probe.sessions) == 2 and registry.open_connections == 2
        # A place frees up: the next connection is admitted.
        clients[0][1].close()
        await probe.until(lambda: probe.sessions[0].lost)
        assert await echo_roundtrip(listener.port, b"again") == b"AGAIN"
        extra_writer.close()
        clients[1][1].close()
        listener.close()

    run(loop_factory, main())
    refused = [r.getMessage() for r in caplog.records if "connection refused" in r.getMessage()]
    assert len(refused) == 1 and "listener=test-tcp" in refused[0] and "connection limit" in refused[0]


def test_peer_and_loopback_are_reported(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        probe = Probe()
        listener, _ = await serve(probe)
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"x")
        await reader.readexactly(1)
        conn = probe.sessions[0].connection
        local_host, local_port = writer.get_extra_info("sockname")[:2]
        assert conn.peer == f"{local_host}:{local_port}"
        assert conn.is_loopback
        assert conn.transport_name == "tcp"
        assert conn.subprotocol is None
        writer.close()
        listener.close()

    run(loop_factory, main())


def test_ipv6_loopback_peer(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        probe = Probe()
        try:
            listener, _ = await serve(probe, host="::1")
        except OSError as exc:  # an environment without IPv6; peer_address covers the formatting
            pytest.skip(f"no IPv6 loopback here: {exc}")
        reader, writer = await asyncio.open_connection("::1", listener.port)
        writer.write(b"x")
        await reader.readexactly(1)
        conn = probe.sessions[0].connection
        assert conn.peer == f"[::1]:{writer.get_extra_info('sockname')[1]}"
        assert conn.is_loopback
        writer.close()
        listener.close()

    run(loop_factory, main())


def test_tcp_nodelay_is_set(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        probe = Probe()
        listener, _ = await serve(probe)
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"x")
        await reader.readexactly(1)
        driver = probe.sessions[0].connection
        assert isinstance(driver, StreamDriver)
        sock = driver._transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        writer.close()
        listener.close()

    run(loop_factory, main())


def test_peer_half_close_gets_the_pending_answer_then_close(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        probe = Probe()
        listener, _ = await serve(probe)
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"last")
        writer.write_eof()
        assert await read_until_closed(reader) == b"LAST"
        await probe.until(lambda: probe.sessions[0].lost)
        writer.close()
        listener.close()

    run(loop_factory, main())


def test_connection_log_lines(loop_factory: LoopFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="polybroker.connection")
    secret = b"payload-that-must-not-be-logged"
    names: list[str] = []

    async def main() -> None:
        probe = Probe()
        listener, _ = await serve(probe, name="mqtt-plain")
        assert await echo_roundtrip(listener.port, secret) == secret.upper()
        await probe.until(lambda: probe.sessions[0].lost)
        names.append(probe.sessions[0].connection.peer)
        listener.close()

    run(loop_factory, main())
    lines = [r.getMessage() for r in caplog.records if r.name == "polybroker.connection"]
    opened = [line for line in lines if line.startswith("connection opened")]
    closed = [line for line in lines if line.startswith("connection closed")]
    assert len(opened) == 1 and len(closed) == 1
    for line in opened + closed:
        assert f"peer={names[0]}" in line and "listener=mqtt-plain" in line
    assert "reason=closed by peer" in closed[0]
    assert not any(secret.decode() in line or secret.upper().decode() in line for line in lines)


class Stubborn(RecordingSession):
    """Ignores the broker's shutdown request."""

    def shutdown(self) -> None:
        self.shutdowns += 1
        self.probe.changed()


def test_graceful_shutdown(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        probe = Probe()
        registry = ConnectionRegistry()
        polite, _ = await serve(probe, registry=registry, name="polite")
        stubborn, _ = await serve(probe, registry=registry, name="stubborn", session_class=Stubborn)
        polite_reader, polite_writer = await asyncio.open_connection("127.0.0.1", polite.port)
        stubborn_reader, stubborn_writer = await asyncio.open_connection("127.0.0.1", stubborn.port)
        for writer in (polite_writer, stubborn_writer):
            writer.write(b"hi")
        assert await polite_reader.readexactly(2) == b"HI"
        assert await stubborn_reader.readexactly(2) == b"HI"
        loop = asyncio.get_running_loop()
        started = loop.time()
        await stop_listeners([polite, stubborn], registry, grace=0.2)
        assert registry.open_connections == 0
        assert loop.time() - started < 1.0
        assert [s.shutdowns for s in probe.sessions] == [1, 1]
        assert all(s.lost == [None] for s in probe.sessions)
        assert await read_until_closed(polite_reader) == b"BYE"
        assert await read_until_closed(stubborn_reader) == b""
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", polite.port)
        polite_writer.close()
        stubborn_writer.close()

    run(loop_factory, main())


def test_a_stream_listener_serves_exactly_one_protocol(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        probe = Probe()
        with pytest.raises(ValueError):
            await start_listener(
                "two",
                "127.0.0.1",
                0,
                {"a": probe.factory(), "b": probe.factory()},
                registry=ConnectionRegistry(),
            )

    run(loop_factory, main())


def test_closing_a_listener_stops_accepting_and_keeps_open_connections(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        probe = Probe()
        listener, registry = await serve(probe)
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"before")
        assert await reader.readexactly(6) == b"BEFORE"
        listener.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"after")
        assert await reader.readexactly(5) == b"AFTER"
        assert registry.open_connections == 1
        writer.close()
        await probe.until(lambda: probe.sessions[0].lost)

    run(loop_factory, main())
