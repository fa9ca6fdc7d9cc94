"""Listeners: bind a port, make one driver per accepted connection, stop accepting, shut down.

`start_listener` binds one address for one kind of driver: a stream listener (TCP, or TLS with an
SSLContext) serves exactly one protocol; a WebSocket listener serves the protocols it is given a
session factory for and picks one per connection (websocket.py). The composition root owns the
`ConnectionRegistry` shared by all listeners (the global connection limit and the counters) and
stops the broker with `stop_listeners`.

Must not import: the broker core, storage, cluster, any protocol package (mqtt, amqp091, stomp).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import ssl
from collections.abc import Callable, Iterable, Mapping, Sequence

from protocols.session import SessionFactory
from protocols.transport.driver import ConnectionRegistry, ListenerContext, StreamDriver, TransportLimits
from protocols.transport.websocket import (
    TEXT_FRAME_PROTOCOLS,
    WEBSOCKET_PROTOCOLS,
    WebSocketDriver,
    WebSocketEndpoint,
)

log = logging.getLogger("polybroker.connection")


class ListenerKind(enum.StrEnum):
    STREAM = "stream"
    WEBSOCKET = "websocket"


class Listener:
    """One bound listener."""

    def __init__(self, name: str, transport_name: str, server: asyncio.Server) -> None:
        self.name = name
        #: "tcp", "tls", "ws" or "wss".
        self.transport_name = transport_name
        self._server = server
        #: (host, port) of every bound socket (one per address family when binding all interfaces).
        self.addresses: list[tuple[str, int]] = [sock.getsockname()[:2] for sock in server.sockets]

    @property
    def port(self) -> int:
        """The bound port (the one the OS chose when asked for port 0)."""
        return self.addresses[0][1]

    def close(self) -> None:
        """Stop accepting; connections already open are left to ConnectionRegistry.close_all."""
        self._server.close()
        log.info("listener stopped: name=%s", self.name)

    async def wait_closed(self) -> None:
        await self._server.wait_closed()


async def start_listener(
    name: str,
    host: str | Sequence[str] | None,
    port: int,
    factory_by_protocol: Mapping[str, SessionFactory],
    *,
    registry: ConnectionRegistry,
    ssl_context: ssl.SSLContext | None = None,
    kind: ListenerKind | str = ListenerKind.STREAM,
    limits: TransportLimits = TransportLimits(),
    text_protocols: frozenset[str] = TEXT_FRAME_PROTOCOLS,
    backlog: int = 1024,
) -> Listener:
    """Bind `host`:`port` (None: all interfaces) and serve it until `Listener.close()`.

    `factory_by_protocol` maps a session kind ("mqtt", "amqp091", "stomp") to its factory: exactly one
    entry for a stream listener; for a WebSocket listener the kinds it serves ("mqtt", "stomp").
    `text_protocols`: WebSocket session kinds answered with text frames.
    """
    listener_kind = ListenerKind(kind)
    secure = ssl_context is not None
    protocol_factory: Callable[[], asyncio.Protocol]
    if listener_kind is ListenerKind.STREAM:
        if len(factory_by_protocol) != 1:
            raise ValueError(f"listener {name}: a stream listener serves exactly one protocol")
        (factory,) = factory_by_protocol.values()
        context = ListenerContext(name, "tls" if secure else "tcp", limits, registry)
        protocol_factory = functools.partial(StreamDriver, factory, context)
    else:
        unknown = set(factory_by_protocol) - WEBSOCKET_PROTOCOLS
        if unknown or not factory_by_protocol:
            raise ValueError(
                f"listener {name}: a WebSocket listener serves {sorted(WEBSOCKET_PROTOCOLS)}, got {sorted(factory_by_protocol)}"
            )
        endpoint = WebSocketEndpoint(dict(factory_by_protocol), frozenset(text_protocols))
        context = ListenerContext(name, "wss" if secure else "ws", limits, registry)
        protocol_factory = functools.partial(WebSocketDriver, endpoint, context)
    server = await asyncio.get_running_loop().create_server(
        protocol_factory,
        host,
        port,
        ssl=ssl_context,
        backlog=backlog,
        ssl_handshake_timeout=limits.handshake_timeout if secure else None,
    )
    listener = Listener(name, context.transport_name, server)
    log.info(
        "listener started: name=%s transport=%s protocols=%s addresses=%s",
        name,
        context.transport_name,
        ",".join(sorted(factory_by_protocol)),
        " ".join(f"{host}:{port}" for host, port in listener.addresses),
    )
    return listener


async def stop_listeners(listeners: Iterable[Listener], registry: ConnectionRegistry, grace: float) -> None:
    """Stop accepting on every listener, shut the open connections down gracefully, release the ports."""
    listeners = list(listeners)
    for listener in listeners:
        listener.close()
    await registry.close_all(grace)
    for listener in listeners:
        # uvloop's wait_closed also waits for connections still in a TLS handshake; those are bounded
        # by the handshake timeout, the broker's stop is bounded here.
        try:
            await asyncio.wait_for(listener.wait_closed(), grace)
        except TimeoutError:
            log.warning("listener %s: connections still closing after shutdown", listener.name)
