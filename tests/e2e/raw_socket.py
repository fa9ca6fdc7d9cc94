"""A plain client socket for end-to-end tests that send what client libraries cannot.

Subclasses (`RawMqtt`, `RawStomp`) own a protocol parser and feed it what `read_once` receives;
every read is bounded by a deadline, so a test never waits longer than it says.
"""

from __future__ import annotations

import socket
import time


class RawSocket:
    def __init__(self, port: int, timeout: float) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.timeout = timeout
        self.eof = False

    def feed(self, data: bytes) -> None:
        """Hand received bytes to the protocol parser (subclasses)."""
        raise NotImplementedError

    def read_once(self, deadline: float) -> bool:
        """One read into the parser; False when the deadline passed with nothing read."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            data = b""
        if data:
            self.feed(data)
        else:
            self.eof = True
        return True

    def closed_by_broker(self, timeout: float | None = None) -> bool:
        """Wait for the broker to close the connection; True if it did within `timeout`
        (what it sent before is read and dropped)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self.eof:
            if not self.read_once(deadline):
                return False
        return True

    def close(self) -> None:
        self.sock.close()
