"""Helpers for the HA tests, and a stand-in broker to run an HA pair as two real processes.

In-process helpers: `wait_until` (wait on a condition with a timeout), `store_state` (everything a
SQLite store file would recover, in comparable form), `free_port`.

The stand-in broker (`python -m tests.cluster.ha_pair --data-dir D --lock L --listen A --peer B
--serve-port P`) is one `HaNode` over a SqliteStore whose "client listener", opened only while the
node is active, speaks a line protocol: `PUT <n>` journals message n on queue "q" and answers
`OK <n>` once `when_durable` fired (`ERR <reason>` if the store refuses the write); `COUNT`
answers the number of messages on "q". `HaPairProcess` starts, kills, freezes (SIGSTOP) and
resumes such processes. Multi-process failover tests with real broker clients live elsewhere.

Must not import: protocols.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from broker.config import load_config
from broker.journal import MessageEnqueued, QueueDeclared, Store, StoreError
from broker.message import Message, Properties
from cluster.node import STATUS_FILENAME, HaNode
from storage import SQLITE_FILENAME
from storage.serial import encode_message, encode_record
from storage.sqlite import SqliteStore

PERSISTENT = Properties(delivery_mode=2)


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Return once `condition()` holds; fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)  # polling interval of a wait-with-timeout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def store_state(path: Path) -> dict[str, Any]:
    """What the SQLite store at `path` recovers, with message bodies, in a comparable form."""
    store = SqliteStore(path, lambda callback: callback(), "OFF")
    recovered = store.open()
    try:
        ids = sorted({i for held in recovered.queue_messages.values() for i in held})
        messages = {m.msg_id: encode_message(m) for m in store.load_messages(ids)}
    finally:
        store.close()
    return {
        "exchanges": [encode_record(r) for r in recovered.exchanges],
        "queues": [encode_record(r) for r in recovered.queues],
        "bindings": sorted(encode_record(r) for r in recovered.bindings),
        "queue_messages": recovered.queue_messages,
        "messages": messages,
        "retained": [encode_record(r) for r in recovered.retained],
        "sessions": [encode_record(r) for r in recovered.sessions],
        "next_msg_id": recovered.next_msg_id,
    }


# --- the stand-in broker -----------------------------------------------------------------------


class LineService:
    """The stand-in's "client listener": up while the node is active (on_promote / on_fence)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._store: Store | None = None
        self._count = 0

    async def serve(self, store: Store) -> None:
        recovered = store.open()
        self._count = len(recovered.queue_messages.get(("/", "q"), []))
        if not any(q.name == "q" for q in recovered.queues):
            store.append(QueueDeclared("/", "q"))
        self._store = store
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    async def unserve(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._store = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while line := await reader.readline():
                command, _, argument = line.decode().strip().partition(" ")
                store = self._store
                if store is None:
                    writer.write(b"ERR not active\n")
                elif command == "COUNT":
                    writer.write(f"{self._count}\n".encode())
                elif command == "PUT":
                    n = int(argument)
                    try:
                        store.append(
                            MessageEnqueued("/", ("q",), Message("", "q", b"x", PERSISTENT, n), True)
                        )
                        store.when_durable(partial(writer.write, f"OK {n}\n".encode()))
                        self._count += 1
                    except StoreError as exc:
                        writer.write(f"ERR {exc}\n".encode())
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


async def _main(args: argparse.Namespace) -> int:
    config = load_config(
        env={},
        overrides={
            "store": {"data_dir": args.data_dir},
            "ha": {
                "role": args.role,
                "peer": args.peer,
                "listen": args.listen,
                "lock": args.lock,
                "secret": "pair-secret",
                "lease_seconds": args.lease_seconds,
                "sync_timeout": args.sync_timeout,
            },
        },
    )
    loop = asyncio.get_running_loop()
    service = LineService(args.serve_port)
    path = Path(args.data_dir) / SQLITE_FILENAME
    node = HaNode(
        config,
        lambda: SqliteStore(path, loop.call_soon_threadsafe),
        on_promote=service.serve,
        on_fence=service.unserve,
    )
    await node.start()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await service.unserve()
    await node.stop()
    return 0


class HaPairProcess:
    """One stand-in node as a subprocess (see the module docstring)."""

    def __init__(self, data_dir: Path, lock: Path, listen: int, peer: int, role: str = "auto") -> None:
        self.data_dir = data_dir
        self.lock = lock
        self.listen = listen
        self.peer = peer
        self.role = role
        self.serve_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}.log"

    def start(self) -> HaPairProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "tests.cluster.ha_pair",
            "--data-dir",
            str(self.data_dir),
            "--lock",
            str(self.lock),
            "--listen",
            f"127.0.0.1:{self.listen}",
            "--peer",
            f"127.0.0.1:{self.peer}",
            "--role",
            self.role,
            "--serve-port",
            str(self.serve_port),
        ]
        root = Path(__file__).resolve().parents[2]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT)
        return self

    def status(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.data_dir / STATUS_FILENAME).read_text())
        except (OSError, ValueError):
            return {}
        return data if data.get("pid") == (self.proc.pid if self.proc else None) else {}

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signum)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def poll_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Return once `condition()` holds (for tests outside an event loop); fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)  # polling interval of a wait-with-timeout


def connect_when_serving(port: int, timeout: float) -> tuple[socket.socket, float]:
    """A connection to the stand-in's client listener, and when it was accepted (monotonic)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            return sock, time.monotonic()
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing serves on port {port} after {timeout} s") from None
            time.sleep(0.01)  # polling interval of a wait-with-timeout


def request(sock: socket.socket, line: str) -> str:
    """Send one line, return the answer line ("" if the connection closed)."""
    sock.sendall(line.encode() + b"\n")
    answer = b""
    while not answer.endswith(b"\n"):
        try:
            chunk = sock.recv(4096)
        except ConnectionError:
            return ""
        if not chunk:
            return ""
        answer += chunk
    return answer.decode().strip()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--lock", required=True)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--peer", required=True)
    parser.add_argument("--role", default="auto")
    parser.add_argument("--serve-port", type=int, required=True)
    parser.add_argument("--lease-seconds", type=float, default=2.0)
    parser.add_argument("--sync-timeout", type=float, default=5.0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    sys.exit(asyncio.run(_main(parser.parse_args())))
