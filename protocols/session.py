"""The contract between a connection driver and a protocol session.

A driver (protocols/transport/) owns one socket (TCP, TLS or WebSocket) and implements
`Connection`. A protocol session (protocols/<proto>/session.py) implements `ProtocolSession`:
it is fed bytes, speaks to the broker core, and writes bytes back through its `Connection`.
Sessions never touch a socket, a transport or the event loop directly; timers come from
`Connection.call_later` so a session stays testable with a fake connection.

Must not import: asyncio, storage, cluster, any protocol package.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Protocol


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Connection(Protocol):
    """What a driver offers the session of its connection."""

    #: "host:port" of the peer, for logs.
    peer: str
    #: True when the peer is on a loopback address (the default user's rule, README, Configuration).
    is_loopback: bool
    #: "tcp", "tls", "ws" or "wss".
    transport_name: str
    #: The WebSocket subprotocol the client chose (e.g. "v12.stomp"), else None.
    subprotocol: str | None

    def write(self, data: bytes) -> None:
        """Queue bytes; the driver writes everything queued once per event-loop turn."""

    def close(self) -> None:
        """Flush what was written, then close the connection (idempotent)."""

    def abort(self) -> None:
        """Close at once, discarding unsent bytes."""

    def pause_reading(self) -> None:
        """Stop feeding data_received (publisher flow control)."""

    def resume_reading(self) -> None: ...

    @property
    def writable(self) -> bool:
        """False while the transport's write buffer is above its high watermark."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle: ...

    def now(self) -> float:
        """Monotonic seconds (the loop's clock)."""


class ProtocolSession(ABC):
    """One connection's protocol state machine, driven by its driver."""

    @abstractmethod
    def connection_made(self, conn: Connection) -> None: ...

    @abstractmethod
    def data_received(self, data: bytes) -> None:
        """Bytes from the peer (any chunking; the codec reassembles)."""

    def writing_paused(self) -> None:  # noqa: B027 - optional hook
        """The transport's buffer is full: stop producing deliveries."""

    def writing_resumed(self) -> None:  # noqa: B027 - optional hook
        """The buffer drained: deliveries may flow again."""

    @abstractmethod
    def connection_lost(self, exc: BaseException | None) -> None:
        """The socket is gone (either side). Release everything held for this connection."""

    @abstractmethod
    def shutdown(self) -> None:
        """The broker stops: close the protocol's proper way (then the driver closes)."""


SessionFactory = Callable[[], ProtocolSession]
