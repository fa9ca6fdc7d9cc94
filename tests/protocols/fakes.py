"""Test doubles for the driver side of protocols/session.py: a Connection with a hand-driven clock.

A session under test writes into `out`; timers run when the test advances the clock, in time order,
as the event loop would run them.
"""

from __future__ import annotations

from collections.abc import Callable


class FakeTimer:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeConnection:
    """protocols.session.Connection with a hand-driven clock; records what the session does."""

    def __init__(self, is_loopback: bool = True) -> None:
        self.peer = "127.0.0.1:40000" if is_loopback else "192.0.2.7:40000"
        self.is_loopback = is_loopback
        self.transport_name = "tcp"
        self.subprotocol: str | None = None
        self.out = bytearray()
        self.closed = False
        self.reading_paused = False
        self.writable = True
        self.clock = 0.0
        self.timers: list[FakeTimer] = []

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.out += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.reading_paused = False

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(self.clock + delay, callback)
        self.timers.append(timer)
        return timer

    def now(self) -> float:
        return self.clock

    def advance(self, seconds: float) -> None:
        """Move the clock, running due timers in time order (as the event loop would)."""
        end = self.clock + seconds
        while True:
            due = [t for t in self.timers if not t.cancelled and t.when <= end]
            if not due:
                break
            timer = min(due, key=lambda t: t.when)
            self.timers.remove(timer)
            self.clock = timer.when
            timer.callback()
        self.clock = end
