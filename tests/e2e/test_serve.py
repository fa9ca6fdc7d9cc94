"""`polybroker serve` as a process: listeners, WebSocket upgrade, clean stop, start-up errors."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from websockets.sync.client import connect as ws_connect

from tests.e2e.broker_process import BrokerProcess, free_port


def test_every_listener_accepts_and_sigterm_exits_zero(make_broker_proc) -> None:  # type: ignore[no-untyped-def]
    proc: BrokerProcess = make_broker_proc().start()
    for name in ("mqtt", "amqp", "stomp", "ws"):
        socket.create_connection(("127.0.0.1", proc.ports[name]), timeout=5).close()
    for subprotocol in ("mqtt", "v12.stomp"):
        with ws_connect(f"ws://127.0.0.1:{proc.ports['ws']}/ws", subprotocols=[subprotocol]) as ws:
            assert ws.subprotocol == subprotocol
    assert proc.stop() == 0
    log = proc.log()
    assert "Traceback" not in log


def test_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = BrokerProcess(tmp_path / "data")
        proc.ports["amqp"] = port
        env = proc.environment()
        result = subprocess.run(
            [sys.executable, "-m", "broker", "serve", "--data-dir", str(tmp_path / "data")],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert any(str(port) in line for line in error_lines), result.stderr


def test_unwritable_data_dir_is_one_clear_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = BrokerProcess(tmp_path / "data")
    result = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--data-dir", str(blocker / "sub")],
        env=proc.environment(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert str(blocker) in result.stderr


def test_listener_can_be_switched_off(tmp_path: Path) -> None:
    proc = BrokerProcess(tmp_path / "data", env={"POLYBROKER_LISTENERS_STOMP": "off"})
    proc.start(wait=("mqtt", "amqp"))
    try:
        port = proc.ports["stomp"]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            refused = False
        except OSError:
            refused = True
        assert refused
    finally:
        assert proc.stop() == 0
    assert free_port()


def test_the_open_file_limit_is_lifted_to_the_hard_limit(make_broker_proc) -> None:  # type: ignore[no-untyped-def]
    """Every connection is a file: a soft limit of 1024 would cap clients long before max_connections."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    proc: BrokerProcess = make_broker_proc(soft_file_limit=256).start()
    assert proc.proc is not None
    limits = Path(f"/proc/{proc.proc.pid}/limits").read_text()
    [line] = [line for line in limits.splitlines() if line.startswith("Max open files")]
    soft = line.split()[3]
    assert soft == ("unlimited" if hard == resource.RLIM_INFINITY else str(hard))
    assert proc.stop() == 0
