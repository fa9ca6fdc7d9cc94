"""The transport layer: connection drivers for TCP, TLS and WebSocket, listeners, TLS settings.

Every driver implements `protocols.session.Connection` for one protocol session, so the protocol
packages never see a socket, and the same session runs over any transport:

- driver.py: `StreamDriver` (TCP, TLS) and what all drivers share (`BaseDriver`, `TransportLimits`,
  `ConnectionRegistry`);
- websocket.py: `WebSocketDriver` (WS, WSS) over the `websockets` library's sans-I/O protocol;
- listeners.py: `start_listener`, `stop_listeners`;
- tls.py: `server_ssl_context`.

This module also picks the event loop: uvloop when installed (README, Runtime dependencies), else asyncio's own.

Must not import: the broker core, storage, cluster, any protocol package (mqtt, amqp091, stomp).
"""

from __future__ import annotations

import asyncio

from protocols.transport.driver import (
    BaseDriver,
    ConnectionRegistry,
    DriverState,
    ListenerContext,
    StreamDriver,
    TransportLimits,
)
from protocols.transport.listeners import Listener, ListenerKind, start_listener, stop_listeners
from protocols.transport.tls import server_ssl_context
from protocols.transport.websocket import WebSocketDriver, select_route

__all__ = [
    "BaseDriver",
    "ConnectionRegistry",
    "DriverState",
    "Listener",
    "ListenerContext",
    "ListenerKind",
    "StreamDriver",
    "TransportLimits",
    "WebSocketDriver",
    "install_uvloop",
    "new_event_loop",
    "select_route",
    "server_ssl_context",
    "start_listener",
    "stop_listeners",
]


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is installed, else asyncio's. Use as `asyncio.Runner(loop_factory=...)`."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def install_uvloop() -> bool:
    """Make uvloop the process's event loop policy, when installed; True if it is now in use."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True
