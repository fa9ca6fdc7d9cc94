"""Tests of the transport layer, and what its three test modules share.

Shared here: `LOOPS` (every test runs on asyncio's loop and on uvloop), `run`, a `RecordingSession`
that records every driver callback and answers what it receives uppercased, and `Probe`, which
collects a listener's sessions and lets a test wait, with a timeout, until a condition on them holds
(no sleeps standing in for synchronisation).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
import uvloop

from protocols.session import Connection, ProtocolSession, SessionFactory

T = TypeVar("T")

LOOPS = pytest.mark.parametrize(
    "loop_factory",
    [pytest.param(asyncio.new_event_loop, id="asyncio"), pytest.param(uvloop.new_event_loop, id="uvloop")],
)

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def run(loop_factory: LoopFactory, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(asyncio.wait_for(coro, timeout))


class Probe:
    """The sessions made by one test's listeners, and a way to wait on what happens to them."""

    def __init__(self) -> None:
        self.sessions: list[RecordingSession] = []
        self._changed = asyncio.Event()

    def factory(self, session_class: type[RecordingSession] | None = None, **kwargs: Any) -> SessionFactory:
        cls = session_class or RecordingSession
        return lambda: cls(self, **kwargs)

    def changed(self) -> None:
        self._changed.set()

    async def until(self, predicate: Callable[[], object], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()


class RecordingSession(ProtocolSession):
    """Records every callback; answers each chunk uppercased when `echo`."""

    def __init__(self, probe: Probe, *, echo: bool = True) -> None:
        self.probe = probe
        self.echo = echo
        self.conn: Connection | None = None
        self.received = bytearray()
        self.lost: list[BaseException | None] = []
        self.paused = 0
        self.resumed = 0
        self.shutdowns = 0
        probe.sessions.append(self)

    @property
    def connection(self) -> Connection:
        assert self.conn is not None
        return self.conn

    def connection_made(self, conn: Connection) -> None:
        self.conn = conn
        self.probe.changed()

    def data_received(self, data: bytes) -> None:
        self.received += data
        if self.echo:
            self.connection.write(data.upper())
        self.probe.changed()

    def writing_paused(self) -> None:
        self.paused += 1
        self.probe.changed()

    def writing_resumed(self) -> None:
        self.resumed += 1
        self.probe.changed()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.append(exc)
        self.probe.changed()

    def shutdown(self) -> None:
        self.shutdowns += 1
        self.connection.write(b"BYE")
        self.connection.close()
        self.probe.changed()
