"""Start `polybroker serve` as a subprocess on free loopback ports, for end-to-end tests.

Every listener gets its own free port; the data directory is the test's temp dir, so a test can
stop the broker (SIGTERM or SIGKILL) and start it again on the same data and ports.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

LISTENERS = ("mqtt", "amqp", "stomp", "ws", "mqtt_tls", "amqp_tls", "stomp_tls", "wss")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s") from None
            time.sleep(0.02)  # polling interval of a wait-with-timeout, not a synchronisation sleep


class BrokerProcess:
    """One broker subprocess. `ports[name]` is the port of listener `name` (see LISTENERS)."""

    def __init__(
        self,
        data_dir: Path,
        env: dict[str, str] | None = None,
        tls: dict[str, str] | None = None,
        config_file: Path | None = None,
        store: str = "sqlite",
        soft_file_limit: int | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.ports = {name: free_port() for name in LISTENERS}
        self.extra_env = dict(env or {})
        self.tls = tls
        self.config_file = config_file
        self.store = store
        self.soft_file_limit = soft_file_limit
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}-broker.log"

    @property
    def url_host(self) -> str:
        return "127.0.0.1"

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("POLYBROKER_")}
        for name, port in self.ports.items():
            env[f"POLYBROKER_LISTENERS_{name.upper()}"] = f"127.0.0.1:{port}"
        # POLYBROKER_TEST_PROTOCOLS=stomp,amqp runs only those protocols' listeners (a subset run).
        only = os.environ.get("POLYBROKER_TEST_PROTOCOLS")
        if only:
            wanted = set(only.split(","))
            for name in self.ports:
                protocol = {"ws": "stomp", "wss": "stomp"}.get(name, name.split("_")[0])
                if protocol not in wanted and not (name in ("ws", "wss") and "mqtt" in wanted):
                    env[f"POLYBROKER_LISTENERS_{name.upper()}"] = "off"
        env["POLYBROKER_STORE_KIND"] = self.store
        env["POLYBROKER_SERVER_SYS_INTERVAL"] = env.get("POLYBROKER_SERVER_SYS_INTERVAL", "1")
        if self.tls:
            env["POLYBROKER_TLS_CERT_FILE"] = self.tls["cert_file"]
            env["POLYBROKER_TLS_KEY_FILE"] = self.tls["key_file"]
            if "ca_file" in self.tls:
                env["POLYBROKER_TLS_CA_FILE"] = self.tls["ca_file"]
        env.update(self.extra_env)
        return env

    def start(self, wait: tuple[str, ...] = ("mqtt", "amqp", "stomp", "ws")) -> BrokerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "broker", "serve", "--data-dir", str(self.data_dir)]
        if self.config_file is not None:
            cmd += ["-c", str(self.config_file)]
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            cmd, env=self.environment(), stdout=log, stderr=subprocess.STDOUT, preexec_fn=self._limits
        )
        log.close()
        try:
            env = self.environment()
            for name in wait:
                if self.tls is None and name in ("mqtt_tls", "amqp_tls", "stomp_tls", "wss"):
                    continue
                if env.get(f"POLYBROKER_LISTENERS_{name.upper()}") == "off":
                    continue
                wait_for_port(self.ports[name])
        except TimeoutError:
            self.kill()
            raise RuntimeError(f"broker did not start:\n{self.log()}") from None
        return self

    def _limits(self) -> None:
        """In the child before exec: start it with a lowered soft open-file limit, if asked."""
        if self.soft_file_limit is not None:
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.soft_file_limit, hard))

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, hard: bool = False) -> BrokerProcess:
        if hard:
            self.kill()
        else:
            self.stop()
        return self.start()
