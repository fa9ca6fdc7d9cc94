"""Two simulated availability zones and an active/standby pair of real `polybroker serve` processes.

`AzNetwork` is the network of two zones, "az-a" and "az-b", in one of two modes:

- `NamespaceNetwork` (root and iproute2): each zone is a network namespace. The test process (in the
  root namespace) reaches each zone through its own veth pair (10.77.S.0/30 to az-a, 10.77.S+1.0/30
  to az-b); the zones are joined by a third veth pair, the replication link (10.77.S+2.0/30), with a
  1 ms netem delay when the kernel has the netem qdisc (without it the link runs undelayed; which one
  is logged and kept in `netem`). Cutting the link is `ip -n az-a link set <if> down`: both nodes
  stay reachable by clients but not by each other, and packets vanish without a reset, as when a
  link between two data centres fails.
- `LoopbackNetwork` (anywhere): the zones are the addresses 127.0.0.2 and 127.0.0.3. Each node dials
  its peer through a `LinkProxy` in the test process; cutting the link black-holes the proxied
  connections (bytes are read and dropped, nothing is closed) and refuses new ones.

`NodeProcess` is one broker in a zone, started as a user would start it (`ip netns exec <ns> python -m
broker serve --ha-role auto --ha-peer ... --ha-listen ... --ha-lock DIR`, the rest from POLYBROKER_*
environment variables); it is killed (SIGKILL), stopped (SIGTERM), frozen (SIGSTOP) and resumed
(SIGCONT) by its pid, and reports its HA status from `ha-status.json` in its data directory.
`HaPair` starts a node in each zone over one shared lock directory and waits until the first is
active with the second in sync. Both nodes use the same port numbers (like two hosts of a real
pair), so the client endpoints differ by host only.

Every name (namespaces, interfaces) carries a token made from the test process's pid and random
bits, so parallel runs do not collide; `close()` undoes everything and is safe to call twice.

Must not import: broker, protocols, storage, cluster (the harness drives the broker from outside,
through its command line, its environment and its status file, like an operator would).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("tests.e2e.ha")

ROOT = Path(__file__).resolve().parents[3]
STATUS_FILENAME = "ha-status.json"  # written by a running HA node in its data directory
USER = "ha-tests"
PASSWORD = "ha-tests-password"  # not guest/guest, which is accepted only from loopback
SECRET = "ha-tests-pair-secret"
DEFAULT_TIMEOUT = 20.0


class NetworkMode(enum.Enum):
    NETNS = "netns"
    LOOPBACK = "loopback"


class NetworkUnavailable(Exception):
    """This machine cannot build the namespace network (the message says why)."""


def wait_for(
    predicate: Callable[[], object], timeout: float = DEFAULT_TIMEOUT, what: str = "condition"
) -> None:
    """Return once `predicate()` is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)  # polling interval of a wait-with-timeout


def mqtt_available() -> bool:
    """Whether this checkout has the MQTT session, so the brokers can serve MQTT."""
    return (ROOT / "protocols" / "mqtt" / "session.py").exists()


def accepts(endpoint: tuple[str, int], timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections at `endpoint` now."""
    try:
        socket.create_connection(endpoint, timeout=timeout).close()
    except OSError:
        return False
    return True


def _free_port(hosts: tuple[str, ...]) -> int:
    """A port free on every one of `hosts` (checked by binding it on each)."""
    for _ in range(100):
        with socket.socket() as first:
            first.bind((hosts[0], 0))
            port = int(first.getsockname()[1])
            try:
                for host in hosts[1:]:
                    with socket.socket() as other:
                        other.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no port free on all of {hosts}")


@dataclass(frozen=True, slots=True)
class Zone:
    """One availability zone: where clients reach its node, and its end of the replication link."""

    name: str  # "az-a", "az-b"
    client_host: str  # the node's client address, as the test process reaches it
    link_host: str  # the node's address on the replication link
    namespace: str | None  # its network namespace (None: the root namespace)


@dataclass(frozen=True, slots=True)
class Ports:
    """Port numbers shared by both nodes (each binds them on its own address)."""

    amqp: int
    stomp: int
    mqtt: int
    replication: int

    def client(self, protocol: str) -> int:
        port: int = getattr(self, protocol)
        return port


# --- the networks -----------------------------------------------------------------------------------


class AzNetwork(ABC):
    """Two zones and the replication link between them (see the module docstring)."""

    mode: NetworkMode
    zones: tuple[Zone, Zone]
    ports: Ports
    netem: str  # what delays the replication link ("netem delay 1ms", or why nothing does)

    @abstractmethod
    def exec_prefix(self, zone: Zone) -> list[str]:
        """The command prefix that runs a program in `zone`."""

    @abstractmethod
    def peer_of(self, zone: Zone) -> tuple[str, int]:
        """The address `zone`'s node dials to reach the other node's replication listener."""

    @abstractmethod
    def cut_link(self) -> None:
        """Cut the replication link; clients still reach both zones."""

    @abstractmethod
    def restore_link(self) -> None:
        """Put the replication link back."""

    @abstractmethod
    def close(self) -> None:
        """Undo everything (idempotent)."""

    def describe(self) -> str:
        return f"{self.mode.value} ({', '.join(z.client_host for z in self.zones)}; link: {self.netem})"


def _token() -> str:
    """A name suffix unique to this process and call: the pid and 12 random bits (names of network
    interfaces are at most 15 bytes)."""
    return f"{os.getpid()}{secrets.token_hex(2)[:3]}"


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise NetworkUnavailable(
            f"`ip {' '.join(args)}` failed: {result.stderr.strip() or result.returncode}"
        )


def netns_unavailable_reason() -> str | None:
    """Why this machine cannot build a NamespaceNetwork, or None if it can (it tries one)."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"pb-probe-{_token()}"
    try:
        _ip("netns", "add", probe)
    except NetworkUnavailable as exc:
        return str(exc)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


class NamespaceNetwork(AzNetwork):
    """The zones as network namespaces joined by veth pairs (module docstring)."""

    mode = NetworkMode.NETNS

    def __init__(self) -> None:
        token = _token()
        self.namespaces = (f"az-a-{token}", f"az-b-{token}")
        # Interface names are at most 15 bytes (IFNAMSIZ - 1).
        self._root_ifs = (f"pa{token}r", f"pb{token}r")
        self._zone_ifs = (f"pa{token}z", f"pb{token}z")
        self.link_ifs = (f"pl{token}a", f"pl{token}b")
        self.netem = "not set up"
        self._closed = False
        subnet = self._pick_subnet()
        self.zones = (
            Zone("az-a", f"10.77.{subnet}.2", f"10.77.{subnet + 2}.1", self.namespaces[0]),
            Zone("az-b", f"10.77.{subnet + 1}.2", f"10.77.{subnet + 2}.2", self.namespaces[1]),
        )
        try:
            self._build(subnet)
        except BaseException:
            self.close()
            raise
        # A fresh namespace has every port free; ports free here too keep the numbers unsurprising.
        self.ports = Ports(*(_free_port(("127.0.0.1",)) for _ in range(4)))

    @staticmethod
    def _pick_subnet() -> int:
        used = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
        start = os.getpid() % 64
        for step in range(64):
            subnet = 4 * ((start + step) % 64)
            if not any(f" 10.77.{subnet + i}." in used for i in range(3)):
                return subnet
        raise NetworkUnavailable("every 10.77.x.0/22 block is in use")

    def _build(self, subnet: int) -> None:
        for namespace in self.namespaces:
            _ip("netns", "add", namespace)
            _ip("-n", namespace, "link", "set", "lo", "up")
        for index, namespace in enumerate(self.namespaces):
            root_if, zone_if = self._root_ifs[index], self._zone_ifs[index]
            net = f"10.77.{subnet + index}"
            _ip("link", "add", root_if, "type", "veth", "peer", "name", zone_if, "netns", namespace)
            _ip("addr", "add", f"{net}.1/30", "dev", root_if)
            _ip("link", "set", root_if, "up")
            _ip("-n", namespace, "addr", "add", f"{net}.2/30", "dev", zone_if)
            _ip("-n", namespace, "link", "set", zone_if, "up")
        (ns_a, ns_b), (link_a, link_b) = self.namespaces, self.link_ifs
        net = f"10.77.{subnet + 2}"
        _ip("-n", ns_a, "link", "add", link_a, "type", "veth", "peer", "name", link_b, "netns", ns_b)
        _ip("-n", ns_a, "addr", "add", f"{net}.1/30", "dev", link_a)
        _ip("-n", ns_b, "addr", "add", f"{net}.2/30", "dev", link_b)
        _ip("-n", ns_a, "link", "set", link_a, "up")
        _ip("-n", ns_b, "link", "set", link_b, "up")
        self.netem = self._add_delay()
        log.info("namespace network %s", self.describe())

    def _add_delay(self) -> str:
        for namespace, interface in zip(self.namespaces, self.link_ifs, strict=True):
            result = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    namespace,
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    interface,
                    "root",
                    "netem",
                    "delay",
                    "1ms",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if result.returncode != 0:
                reason = (result.stderr.strip() or f"exit {result.returncode}").splitlines()[0]
                log.warning("no netem delay on the replication link (%s): running it undelayed", reason)
                return f"undelayed, netem unavailable: {reason}"
        return "netem delay 1ms each way"

    def exec_prefix(self, zone: Zone) -> list[str]:
        assert zone.namespace is not None
        return ["ip", "netns", "exec", zone.namespace]

    def peer_of(self, zone: Zone) -> tuple[str, int]:
        other = self.zones[1] if zone is self.zones[0] else self.zones[0]
        return other.link_host, self.ports.replication

    def cut_link(self) -> None:
        _ip("-n", self.namespaces[0], "link", "set", self.link_ifs[0], "down")

    def restore_link(self) -> None:
        _ip("-n", self.namespaces[0], "link", "set", self.link_ifs[0], "up")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Deleting a namespace deletes the veth ends in it, and with them their peers.
        for namespace in self.namespaces:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)
        for interface in self._root_ifs:
            subprocess.run(["ip", "link", "del", interface], capture_output=True, timeout=30)


class LinkProxy:
    """A TCP forwarder standing in for the replication link on loopback.

    `cut()` turns every open connection into a black hole (bytes read and dropped both ways, nothing
    closed, as when packets vanish) and refuses new connections; `restore()` forwards new
    connections again and closes the black-holed ones (their ends gave up on them meanwhile).
    """

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.listen = listen
        self.target = target
        self._cut = False
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._pipes: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._dead: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"link-proxy-{listen}", daemon=True
        )

    def start(self) -> LinkProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accepted, *self.listen)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pipe = (writer, up_writer)
        self._pipes.add(pipe)
        try:
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        finally:
            self._pipes.discard(pipe)
            for end in pipe:
                self._dead.discard(end)
                end.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                if writer in self._dead:
                    continue  # black hole
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if writer not in self._dead:
                writer.transport.abort()

    def _set_cut(self, cut: bool) -> None:
        self._cut = cut
        if cut:
            for pipe in self._pipes:
                self._dead.update(pipe)
        else:
            for end in list(self._dead):
                end.transport.abort()
            self._dead.clear()

    def cut(self) -> None:
        self._loop.call_soon_threadsafe(self._set_cut, True)

    def restore(self) -> None:
        self._loop.call_soon_threadsafe(self._set_cut, False)

    def close(self) -> None:
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for pipe in list(self._pipes):
                for end in pipe:
                    end.transport.abort()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


class LoopbackNetwork(AzNetwork):
    """The zones as the loopback addresses 127.0.0.2 and 127.0.0.3 (module docstring).

    With `cuttable` (the default) each node reaches its peer through a LinkProxy, so the link can be
    cut; without it the nodes dial each other directly (for benchmarks: no proxy in the path).
    """

    mode = NetworkMode.LOOPBACK

    def __init__(self, *, cuttable: bool = True) -> None:
        hosts = ("127.0.0.2", "127.0.0.3")
        self.zones = (Zone("az-a", hosts[0], hosts[0], None), Zone("az-b", hosts[1], hosts[1], None))
        self.ports = Ports(*(_free_port(hosts) for _ in range(4)))
        self.netem = "undelayed (loopback addresses)"
        self._proxies: list[LinkProxy] = []
        self._peers: dict[str, tuple[str, int]] = {}
        if cuttable:
            self.netem += " through a cuttable proxy"
            proxy_port = _free_port(hosts)
            try:
                for zone, other in ((self.zones[0], self.zones[1]), (self.zones[1], self.zones[0])):
                    proxy = LinkProxy(
                        (zone.client_host, proxy_port), (other.link_host, self.ports.replication)
                    )
                    self._proxies.append(proxy.start())
                    self._peers[zone.name] = proxy.listen
            except BaseException:
                self.close()
                raise
        else:
            for zone, other in ((self.zones[0], self.zones[1]), (self.zones[1], self.zones[0])):
                self._peers[zone.name] = (other.link_host, self.ports.replication)
        log.info("loopback network %s", self.describe())

    def exec_prefix(self, zone: Zone) -> list[str]:
        return []

    def peer_of(self, zone: Zone) -> tuple[str, int]:
        return self._peers[zone.name]

    def cut_link(self) -> None:
        if not self._proxies:
            raise RuntimeError("this LoopbackNetwork was built without cuttable=True")
        for proxy in self._proxies:
            proxy.cut()

    def restore_link(self) -> None:
        for proxy in self._proxies:
            proxy.restore()

    def close(self) -> None:
        proxies, self._proxies = self._proxies, []
        for proxy in proxies:
            proxy.close()


def make_network(mode: NetworkMode, *, cuttable: bool = True) -> AzNetwork:
    if mode is NetworkMode.NETNS:
        return NamespaceNetwork()
    return LoopbackNetwork(cuttable=cuttable)


# --- the broker processes ---------------------------------------------------------------------------


class NodeProcess:
    """One `polybroker serve` with [ha] on, in one zone (see the module docstring); with `ha=False`,
    a single node with no [ha] at all (the baseline of bench/ha_bench.py)."""

    def __init__(
        self,
        network: AzNetwork,
        zone: Zone,
        data_dir: Path,
        lock_dir: Path,
        *,
        mqtt: bool,
        ha_env: dict[str, str] | None = None,
        ha: bool = True,
    ) -> None:
        self.network = network
        self.zone = zone
        self.name = zone.name
        self.data_dir = data_dir
        self.lock_dir = lock_dir
        self.mqtt = mqtt
        self.ha_env = dict(ha_env or {})
        self.ha = ha
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{zone.name}.log"
        self.starts = 0

    def endpoint(self, protocol: str) -> tuple[str, int]:
        return self.zone.client_host, self.network.ports.client(protocol)

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("POLYBROKER_")}
        host, ports = self.zone.client_host, self.network.ports
        for listener in ("mqtt_tls", "amqp_tls", "stomp_tls", "ws", "wss"):
            env[f"POLYBROKER_LISTENERS_{listener.upper()}"] = "off"
        env["POLYBROKER_LISTENERS_AMQP"] = f"{host}:{ports.amqp}"
        env["POLYBROKER_LISTENERS_STOMP"] = f"{host}:{ports.stomp}"
        env["POLYBROKER_LISTENERS_MQTT"] = f"{host}:{ports.mqtt}" if self.mqtt else "off"
        env["POLYBROKER_STORE_KIND"] = "sqlite"
        env["POLYBROKER_SERVER_SYS_INTERVAL"] = "0"
        env["POLYBROKER_DEFAULT_USER"] = USER
        env["POLYBROKER_DEFAULT_PASS"] = PASSWORD
        if self.ha:
            env["POLYBROKER_HA_SECRET"] = SECRET
            env["POLYBROKER_HA_NODE_ID"] = self.name
            env.update(self.ha_env)
        return env

    def command(self) -> list[str]:
        serve = [*self.network.exec_prefix(self.zone), sys.executable, "-m", "broker", "serve"]
        serve += ["--data-dir", str(self.data_dir)]
        if not self.ha:
            return serve
        listen = f"{self.zone.link_host}:{self.network.ports.replication}"
        peer_host, peer_port = self.network.peer_of(self.zone)
        return [
            *serve,
            "--ha-role",
            "auto",
            "--ha-peer",
            f"{peer_host}:{peer_port}",
            "--ha-listen",
            listen,
            "--ha-lock",
            str(self.lock_dir),
        ]

    def start(self) -> NodeProcess:
        if self.alive:
            raise RuntimeError(f"{self.name} is already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with open(self.log_path, "ab") as log_file:
            log_file.write(f"--- start #{self.starts}: {' '.join(self.command())}\n".encode())
            log_file.flush()
            # `ip netns exec` execs the command, so the pid is the broker's own.
            self.proc = subprocess.Popen(
                self.command(), cwd=ROOT, env=self.environment(), stdout=log_file, stderr=subprocess.STDOUT
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (a crash); waits until the process is gone."""
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (a clean stop); returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def status(self) -> dict[str, Any]:
        """This process's `ha-status.json` ({} if it wrote none yet, or it is another process's)."""
        try:
            data: dict[str, Any] = json.loads((self.data_dir / STATUS_FILENAME).read_text())
        except (OSError, ValueError):
            return {}
        return data if self.proc is not None and data.get("pid") == self.proc.pid else {}

    @property
    def role(self) -> str:
        return str(self.status().get("role", ""))

    def accepts(self, protocol: str = "amqp") -> bool:
        return accepts(self.endpoint(protocol))

    def wait_role(self, role: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        try:
            wait_for(lambda: self.role == role, timeout, f"{self.name} to be {role}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; status {self.status()}\n{self.log_tail()}") from None

    def wait_serving(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Until this node is active (with HA) and its client listeners accept connections."""
        if self.ha:
            self.wait_role("active", timeout)
        protocols = ("amqp", "stomp", "mqtt") if self.mqtt else ("amqp", "stomp")
        wait_for(lambda: all(self.accepts(p) for p in protocols), timeout, f"{self.name}'s listeners")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return f"--- {self.name} log (last {lines} lines):\n" + "\n".join(self.log().splitlines()[-lines:])


class HaPair:
    """A node in each zone over one lock directory; `start()` makes az-a active, az-b its standby."""

    def __init__(
        self,
        network: AzNetwork,
        directory: Path,
        *,
        mqtt: bool | None = None,
        lease_seconds: float | None = None,
        sync_timeout: float | None = None,
    ) -> None:
        self.network = network
        self.lock_dir = directory / "lock"
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        self.mqtt = mqtt_available() if mqtt is None else mqtt
        ha_env = {}
        if lease_seconds is not None:
            ha_env["POLYBROKER_HA_LEASE_SECONDS"] = str(lease_seconds)
        if sync_timeout is not None:
            ha_env["POLYBROKER_HA_SYNC_TIMEOUT"] = str(sync_timeout)
        self.a, self.b = (
            NodeProcess(network, zone, directory / zone.name, self.lock_dir, mqtt=self.mqtt, ha_env=ha_env)
            for zone in network.zones
        )
        self._cleanups: list[Callable[[], None]] = []

    @property
    def nodes(self) -> tuple[NodeProcess, NodeProcess]:
        return self.a, self.b

    def endpoints(self, protocol: str) -> list[tuple[str, int]]:
        """Both nodes' endpoints for `protocol`, az-a first (what a client is configured with)."""
        return [node.endpoint(protocol) for node in self.nodes]

    def other(self, node: NodeProcess) -> NodeProcess:
        return self.b if node is self.a else self.a

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> HaPair:
        """Start az-a, wait until it serves, then az-b, and wait until az-b is in sync."""
        self.a.start()
        self.a.wait_serving(timeout)
        self.b.start()
        self.wait_in_sync(self.a, timeout)
        return self

    def wait_in_sync(self, active: NodeProcess, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Until `active` is active with the other node as its in-sync standby, recorded in the lease."""
        standby = self.other(active)

        def in_sync() -> bool:
            mine, theirs = active.status(), standby.status()
            # The lease must name the standby too: only then may it take over (cluster/lease.py).
            return (
                mine.get("role") == "active"
                and mine.get("sync") == "in_sync"
                and mine.get("lease_synced") == mine.get("peer") != ""
                and theirs.get("role") == "standby"
                and theirs.get("sync") == "in_sync"
            )

        try:
            wait_for(in_sync, timeout, f"{standby.name} to be in sync with {active.name}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    def logs(self) -> str:
        return "\n".join(node.log_tail() for node in self.nodes)

    def add_cleanup(self, cleanup: Callable[[], None]) -> None:
        """Have `close()` call `cleanup` first (for the clients of a test that may fail midway)."""
        self._cleanups.append(cleanup)

    def close(self) -> None:
        """Run the clean-ups, then kill both nodes (idempotent)."""
        cleanups, self._cleanups = self._cleanups, []
        for cleanup in cleanups:
            try:
                cleanup()
            except Exception:
                log.exception("a clean-up of the pair failed")
        for node in self.nodes:
            with contextlib.suppress(ProcessLookupError):
                if node.alive:
                    node.resume()
            node.kill()


def measure_takeover(node: NodeProcess, since: float, timeout: float = DEFAULT_TIMEOUT) -> float:
    """Seconds from `since` (time.monotonic()) until `node` accepts client connections (AMQP)."""
    endpoint = node.endpoint("amqp")
    deadline = since + timeout
    while not accepts(endpoint, timeout=0.2):
        if time.monotonic() > deadline:
            raise AssertionError(f"{node.name} did not accept connections {timeout:g} s after the failure")
        time.sleep(0.005)  # polling interval of a wait-with-timeout
    return time.monotonic() - since
