"""What every protocol session is given: the core, authentication, limits, flow control, stats.

One `ServerContext` is built by the composition root (broker/server.py) and passed to every
session factory; there is no module-level state. Sessions of different protocols meet only
through the core (`broker`), except for the client-id registry that MQTT needs for session
takeover and the flow-control gate that pauses publishers.

Must not import: asyncio, protocols, storage backends, cluster.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from broker.core import Broker

log = logging.getLogger("polybroker.flow")

VERSION = "0.1.0"
PRODUCT = "polybroker"


@dataclass(slots=True)
class Stats:
    """Broker-wide counters (MQTT $SYS, logs)."""

    clients_connected: int = 0
    clients_total: int = 0
    messages_received: int = 0
    messages_sent: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    connections_refused: int = 0


class FlowGate:
    """Publisher flow control: pause reading from publishers while the broker is over a watermark.

    A session calls `should_pause()` after handling a batch of publishes; when True it pauses
    its connection's reading and registers a resume callback with `park`. `check()` (run by the
    composition root's periodic tick and when the store reports progress) resumes every parked
    publisher once both the store backlog and RAM are below their low watermarks (half the
    high ones), so publishers are not flapped on and off.
    """

    def __init__(self, broker: Broker, store_high_watermark: int) -> None:
        self._broker = broker
        self._store_high = store_high_watermark
        self._parked: dict[object, Callable[[], None]] = {}
        self.blocked = False
        #: Called with True/False when the gate closes/opens (AMQP connection.blocked).
        self.listeners: dict[object, Callable[[bool], None]] = {}

    def should_pause(self) -> bool:
        if self.blocked:
            return True
        if self._broker.memory_alarm or self._broker.store.pending_bytes > self._store_high:
            self._set_blocked(True)
        return self.blocked

    def park(self, key: object, resume: Callable[[], None]) -> None:
        self._parked[key] = resume

    def unpark(self, key: object) -> None:
        self._parked.pop(key, None)

    def check(self) -> None:
        if not self.blocked:
            return
        broker = self._broker
        if (
            broker.ram_bytes <= broker.limits.memory_high_watermark // 2
            and broker.store.pending_bytes <= self._store_high // 2
        ):
            self._set_blocked(False)
            parked, self._parked = self._parked, {}
            for resume in parked.values():
                resume()

    def _set_blocked(self, blocked: bool) -> None:
        if blocked == self.blocked:
            return
        self.blocked = blocked
        log.warning(
            "publishers %s (RAM %d MB, store backlog %d MB)",
            "paused" if blocked else "resumed",
            self._broker.ram_bytes >> 20,
            self._broker.store.pending_bytes >> 20,
        )
        for listener in list(self.listeners.values()):
            listener(blocked)


@dataclass
class ServerContext:
    """Everything a protocol session may use. Built once by the composition root."""

    broker: Broker
    #: broker.auth.Authenticator (typed loosely to keep this module free of config imports).
    auth: Any
    #: broker.config.Config
    config: Any
    flow: FlowGate
    stats: Stats = field(default_factory=Stats)
    #: MQTT: (vhost, client id) -> the live session holding it (session takeover, [MQTT-3.1.4-3]).
    mqtt_clients: dict[tuple[str, str], Any] = field(default_factory=dict)
    #: Durable protocol session state recovered from the store: (vhost, client id) -> bytes.
    saved_sessions: dict[tuple[str, str], bytes] = field(default_factory=dict)
    started_at: float = 0.0
    server_name: str = PRODUCT
    version: str = VERSION
