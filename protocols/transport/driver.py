"""The connection driver for byte streams (TCP and TLS), and what every driver shares.

A driver owns one transport and implements `protocols.session.Connection` for the session of that
connection. `BaseDriver` holds everything that does not depend on framing: admission against the
global connection limit, the write batch flushed once per event-loop turn, write-side flow control
and the slow-consumer cut-off, read pausing, timers, close/abort/shutdown and the one-line-per-
connection log. `StreamDriver` feeds received bytes to the session as they come; `WebSocketDriver`
(websocket.py) frames them.

Theory of operation (writes): `write()` appends to a list and, the first time in a turn, schedules
`_flush` with `loop.call_soon`; `_flush` hands `b"".join(batch)` to the transport in one call, so a
turn that produced a thousand deliveries costs one `send()`. The transport calls `pause_writing` when
its buffer passes the high watermark; the session hears `writing_paused()` and should stop producing.
A session that keeps producing anyway is a slow consumer: once more than `max_pending_write_bytes`
wait in the transport, the connection is aborted and counted, as nats-server does, so one stuck
client never holds the broker's memory hostage.

Must not import: the broker core, storage, cluster, any protocol package (mqtt, amqp091, stomp).
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from protocols.session import ProtocolSession, SessionFactory, TimerHandle

log = logging.getLogger("polybroker.connection")


class DriverState(enum.Enum):
    #: Accepted socket, no session yet (a WebSocket driver stays here during the HTTP upgrade).
    CONNECTING = enum.auto()
    #: The session runs; writes are accepted.
    OPEN = enum.auto()
    #: close/abort/refusal started; writes are dropped, the transport is going away.
    CLOSING = enum.auto()
    #: connection_lost ran.
    CLOSED = enum.auto()


@dataclass(frozen=True, slots=True)
class TransportLimits:
    """Per-connection limits of one listener."""

    #: The transport calls pause_writing above this many buffered bytes ...
    write_high_water: int = 1024 * 1024
    #: ... and resume_writing once it drained below this.
    write_low_water: int = 256 * 1024
    #: Above this many bytes waiting in the transport the peer is a slow consumer and is cut off.
    max_pending_write_bytes: int = 64 * 1024 * 1024
    #: Largest WebSocket message accepted; outgoing batches are split at write() boundaries to stay under it.
    max_message_size: int = 16 * 1024 * 1024
    #: Seconds a TLS handshake or a WebSocket upgrade may take.
    handshake_timeout: float = 10.0
    #: Seconds a graceful close may take to flush (and, on WebSocket, to finish the close handshake).
    close_timeout: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.write_low_water <= self.write_high_water:
            raise ValueError("write_low_water must be between 0 and write_high_water")
        if self.max_pending_write_bytes < self.write_high_water:
            raise ValueError("max_pending_write_bytes must be at least write_high_water")
        if self.max_message_size <= 0:
            raise ValueError("max_message_size must be positive")


class ConnectionRegistry:
    """The live connections of all listeners: the global limit, the counters, the graceful shutdown.

    One instance is made by the composition root and passed to every listener.
    """

    def __init__(self, max_connections: int | None = None) -> None:
        #: None means no limit.
        self.max_connections = max_connections
        #: Connections admitted since start.
        self.accepted = 0
        #: Connections closed at once because max_connections was reached.
        self.refused = 0
        #: Connections cut off because their write backlog passed max_pending_write_bytes.
        self.slow_consumers = 0
        #: Connections aborted because their session raised.
        self.session_errors = 0
        self._drivers: set[BaseDriver] = set()
        self._empty_waiters: list[asyncio.Future[None]] = []

    @property
    def open_connections(self) -> int:
        return len(self._drivers)

    def admit(self, driver: BaseDriver) -> bool:
        if self.max_connections is not None and len(self._drivers) >= self.max_connections:
            self.refused += 1
            return False
        self._drivers.add(driver)
        self.accepted += 1
        return True

    def release(self, driver: BaseDriver) -> None:
        self._drivers.discard(driver)
        if not self._drivers and self._empty_waiters:
            for waiter in self._empty_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._empty_waiters.clear()

    async def wait_empty(self, timeout: float | None) -> bool:
        """Wait until no connection is left; False on timeout."""
        if not self._drivers:
            return True
        waiter = asyncio.get_running_loop().create_future()
        self._empty_waiters.append(waiter)
        done, _ = await asyncio.wait({waiter}, timeout=timeout)
        return bool(done)

    def pause_reading_all(self) -> None:
        """Stop reading from every connection (the broker is about to stop: take no new work)."""
        for driver in self._drivers:
            driver.pause_reading()

    def resume_reading_all(self) -> None:
        for driver in self._drivers:
            driver.resume_reading()

    async def close_all(self, grace: float) -> None:
        """Shut every connection down the protocol's way, bounded in time.

        Each session gets `shutdown()` (it says goodbye in its protocol and closes); a connection still
        open `grace` seconds later is closed by its driver. Whatever is left after twice that (a peer
        that does not read) is aborted.
        """
        for driver in list(self._drivers):
            driver.shutdown(grace)
        if await self.wait_empty(2 * grace):
            return
        for driver in list(self._drivers):
            driver.abort()
        await self.wait_empty(grace)


@dataclass(frozen=True, slots=True)
class ListenerContext:
    """What every driver of one listener shares (one object per listener, not per connection)."""

    name: str
    #: "tcp", "tls", "ws" or "wss".
    transport_name: str
    limits: TransportLimits
    registry: ConnectionRegistry


def peer_address(peername: object) -> tuple[str, bool]:
    """("host:port", is_loopback) from a transport's "peername" extra info.

    An IPv4-mapped IPv6 address (::ffff:127.0.0.1, what a dual-stack socket reports for an IPv4
    client) counts as the IPv4 address it maps.
    """
    if not isinstance(peername, tuple) or len(peername) < 2:
        return (str(peername) if peername else "unknown"), False
    host, port = peername[0], peername[1]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"{host}:{port}", False
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        return f"[{host}]:{port}", (mapped or address).is_loopback
    return f"{host}:{port}", address.is_loopback


def _no_session(data: bytes) -> None:
    """Stands in for the session's data_received while there is none (a function, not a method, so
    the driver holds no reference to itself and is freed without the cyclic GC)."""


class BaseDriver(asyncio.Protocol):
    """One connection's owner: implements `Connection` for its session, minus the framing."""

    __slots__ = (
        "peer",
        "is_loopback",
        "transport_name",
        "subprotocol",
        "_context",
        "_loop",
        "_transport",
        "_state",
        "_session",
        "_feed",
        "_batch",
        "_flush_scheduled",
        "_writable",
        "_reading_paused",
        "_close_reason",
        "_deadline",
        "_opened",
        "_refused",
    )

    peer: str
    is_loopback: bool
    transport_name: str
    subprotocol: str | None

    def __init__(self, context: ListenerContext) -> None:
        self.peer = "unknown"
        self.is_loopback = False
        self.transport_name = context.transport_name
        self.subprotocol = None
        self._context = context
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport
        self._state = DriverState.CONNECTING
        self._session: ProtocolSession | None = None
        #: The session's data_received once it runs (a bound method: one lookup less per read).
        self._feed: Callable[[bytes], None] = _no_session
        self._batch: list[bytes] = []
        self._flush_scheduled = False
        self._writable = True
        self._reading_paused = False
        self._close_reason: str | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._opened = False
        self._refused = False

    # -- Connection: what the session calls -------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._state is not DriverState.OPEN:
            return
        self._batch.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def close(self) -> None:
        if self._state is not DriverState.OPEN:
            return
        self._set_reason("closed by server")
        self._state = DriverState.CLOSING
        self._flush()
        self._transport.close()
        self._arm_deadline(self._context.limits.close_timeout, "close timed out")

    def abort(self) -> None:
        self._abort("aborted by server")

    def pause_reading(self) -> None:
        if self._state is DriverState.OPEN and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._state is DriverState.OPEN and self._reading_paused:
            self._reading_paused = False
            self._transport.resume_reading()

    @property
    def writable(self) -> bool:
        return self._writable

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        return self._loop.call_later(delay, self._run_timer, callback)

    def now(self) -> float:
        return self._loop.time()

    # -- What the listener calls ------------------------------------------------------------------

    def shutdown(self, grace: float) -> None:
        """The broker stops: let the session say goodbye, close after `grace` seconds at the latest."""
        if self._state is DriverState.CONNECTING:
            self._abort("broker shutdown")
            return
        if self._state is not DriverState.OPEN:
            return
        self._set_reason("broker shutdown")
        session = self._session
        if session is not None:
            try:
                session.shutdown()
            except Exception:
                self._session_failed()
                return
        if self._state is DriverState.OPEN:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self._loop.call_later(grace, self.close)

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self.peer, self.is_loopback = peer_address(transport.get_extra_info("peername"))
        context = self._context
        if not context.registry.admit(self):
            self._refuse(f"connection limit reached ({context.registry.max_connections})")
            return
        limits = context.limits
        self._transport.set_write_buffer_limits(high=limits.write_high_water, low=limits.write_low_water)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Small deliveries must leave at once: with Nagle on, a subscriber that never writes back
            # (QoS 0, STOMP auto-ack) waits for the peer's 40 ms delayed ACK (bench/notes.md).
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self._accepted()

    def pause_writing(self) -> None:
        self._writable = False
        session = self._session
        if session is not None and self._state is DriverState.OPEN:
            try:
                session.writing_paused()
            except Exception:
                self._session_failed()

    def resume_writing(self) -> None:
        self._writable = True
        session = self._session
        if session is not None and self._state is DriverState.OPEN:
            try:
                session.writing_resumed()
            except Exception:
                self._session_failed()

    def eof_received(self) -> bool | None:
        # The peer half-closed. Push out what the session already answered; returning None lets the
        # transport close once its buffer drained (no protocol we speak continues after EOF).
        self._set_reason("closed by peer")
        if self._state is DriverState.OPEN:
            self._flush()
            self._state = DriverState.CLOSING
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state is DriverState.CLOSED:
            return
        self._state = DriverState.CLOSED
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._batch.clear()
        context = self._context
        context.registry.release(self)
        reason = self._close_reason or (f"connection error: {exc}" if exc is not None else "closed by peer")
        if self._opened:
            log.info("connection closed: peer=%s listener=%s reason=%s", self.peer, context.name, reason)
        elif not self._refused:
            log.info(
                "connection closed before it opened: peer=%s listener=%s reason=%s",
                self.peer,
                context.name,
                reason,
            )
        session = self._session
        if session is None:
            return
        # Drop the driver<->session cycle so both go with reference counting alone.
        self._session = None
        self._feed = _no_session
        try:
            session.connection_lost(exc)
        except Exception as error:
            log.error(
                "session failed in connection_lost: peer=%s listener=%s error=%r",
                self.peer,
                context.name,
                error,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )

    # -- For subclasses ---------------------------------------------------------------------------

    def _accepted(self) -> None:
        """The connection was admitted: start the session (or, for WebSocket, the upgrade)."""
        raise NotImplementedError

    def _start_session(self, factory: SessionFactory) -> None:
        self._state = DriverState.OPEN
        self._opened = True
        log.info(
            "connection opened: peer=%s listener=%s transport=%s%s",
            self.peer,
            self._context.name,
            self.transport_name,
            f" subprotocol={self.subprotocol}" if self.subprotocol else "",
        )
        try:
            session = factory()
            self._session = session
            self._feed = session.data_received
            session.connection_made(self)
        except Exception:
            self._session_failed()

    def _flush(self) -> None:
        """Hand everything written this turn to the transport in one call."""
        self._flush_scheduled = False
        batch = self._batch
        if not batch or self._state is DriverState.CLOSED:
            return
        data = batch[0] if len(batch) == 1 else b"".join(batch)
        batch.clear()
        self._transport.write(data)
        if not self._writable:
            self._check_backlog()

    def _check_backlog(self) -> None:
        # Only reachable above the high watermark, so the common path never pays for this call.
        pending = self._transport.get_write_buffer_size()
        if pending > self._context.limits.max_pending_write_bytes:
            self._context.registry.slow_consumers += 1
            log.warning(
                "slow consumer, closing: peer=%s listener=%s pending=%d bytes",
                self.peer,
                self._context.name,
                pending,
            )
            self._abort(f"slow consumer ({pending} bytes pending)")

    def _session_failed(self) -> None:
        """The session raised: log it with the peer, count it, abort this connection only."""
        error = sys.exc_info()[1]
        self._context.registry.session_errors += 1
        log.error(
            "session error, aborting connection: peer=%s listener=%s error=%r",
            self.peer,
            self._context.name,
            error,
            exc_info=log.isEnabledFor(logging.DEBUG),
        )
        self._abort(f"session error: {type(error).__name__}")

    def _refuse(self, reason: str) -> None:
        """Close a connection that never gets a session, with its one log line."""
        self._refused = True
        self._state = DriverState.CLOSING
        self._set_reason(reason)
        log.info("connection refused: peer=%s listener=%s reason=%s", self.peer, self._context.name, reason)
        self._transport.close()

    def _abort(self, reason: str) -> None:
        if self._state is DriverState.CLOSED:
            return
        self._set_reason(reason)
        self._state = DriverState.CLOSING
        self._batch.clear()
        self._transport.abort()

    def _set_reason(self, reason: str) -> None:
        # The first cause wins: "broker shutdown" stays the reason when the session then closes.
        if self._close_reason is None:
            self._close_reason = reason

    def _arm_deadline(self, delay: float, reason: str) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self._loop.call_later(delay, self._abort, reason)

    def _run_timer(self, callback: Callable[[], None]) -> None:
        # A session's timer must not outlive its connection, nor escape to the loop's handler.
        if self._state is DriverState.CLOSED:
            return
        try:
            callback()
        except Exception:
            self._session_failed()


class StreamDriver(BaseDriver):
    """TCP or TLS: received bytes go to the session unchanged, in whatever chunks they arrive."""

    __slots__ = ("_factory",)

    def __init__(self, factory: SessionFactory, context: ListenerContext) -> None:
        super().__init__(context)
        self._factory = factory

    def _accepted(self) -> None:
        self._start_session(self._factory)

    def data_received(self, data: bytes) -> None:
        try:
            self._feed(data)
        except Exception:
            self._session_failed()
