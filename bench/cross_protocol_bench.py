"""Cross-protocol throughput of a real broker process, beside the same-protocol paths (not a test).

Two groups of paths through one topic on amq.topic, each path measured with the same client code:

    fan-in   4 publishers -> 1 consumer:      MQTT -> AMQP (cross), MQTT -> MQTT, AMQP -> AMQP
    fan-out  1 publisher  -> 4 subscribers:   AMQP -> STOMP (cross), AMQP -> AMQP, STOMP -> STOMP

The clients are minimal raw-socket ones, written once here: a publisher of any protocol writes bursts of
one pre-encoded frame (MQTT 3.1.1 PUBLISH QoS 0, AMQP basic.publish without confirms, STOMP SEND
without receipt), and a subscriber of any protocol (MQTT QoS 0, AMQP no-ack consumer, STOMP ack:auto)
counts deliveries by counting a marker in the payload over the raw byte stream (bytes.count, no frame
parsing), so nearly all CPU goes to the broker. Publishers stay at most `--backlog` messages ahead of the
slowest subscriber (the bench harness's backlog cap), so a run measures delivery, not buffering.

Per path: deliveries per second in the window, broker CPU per delivery (µs, from /proc/<pid>/stat) and
the cores the broker and this client used; then each cross-protocol path's cost against the
same-protocol paths of its group (the bar: at most 20% more).

    python bench/cross_protocol_bench.py [--seconds 5] [--warmup 2] [--reps 3] [--size 16]
    python bench/cross_protocol_bench.py --ports MQTT,AMQP,STOMP --pid PID   # a broker already running

Without --ports it starts `python -m broker serve` on free loopback ports with a temporary data dir
(run it from the repository root). Must not import: the broker core, protocols, storage, cluster; it
speaks to the broker over sockets only (pamqp marshals the AMQP handshake, not the measured frames).
"""

from __future__ import annotations

import argparse
import os
import resource
import selectors
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from pamqp import body as amqp_body
from pamqp import commands as amqp
from pamqp import exceptions as amqp_exceptions
from pamqp import frame as amqp_frame
from pamqp import header as amqp_header

#: In every payload; never in a frame header (not valid UTF-8), so counting it counts deliveries.
MARKER = b"\xfe\xedXPB\xfd"
TOPIC_LEVELS = ("bench", "cross")
READ_SIZE = 256 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- blocking handshakes -------------------------------------------------------------------------------------


def _recv_until(sock: socket.socket, buffer: bytearray, done: Callable[[bytearray], int]) -> bytes:
    """Read until done(buffer) returns the length of a complete reply; returns it and keeps the rest."""
    while True:
        length = done(buffer)
        if length:
            reply = bytes(buffer[:length])
            del buffer[:length]
            return reply
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"broker closed the connection during the handshake: {bytes(buffer)!r}")
        buffer += chunk


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | 0x80 if n else digit)
        if not n:
            return bytes(out)


def _mqtt_packet(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + _varint(len(body)) + body


def _mqtt_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">H", len(data)) + data


def _mqtt_topic() -> str:
    return "/".join(TOPIC_LEVELS)


def _amqp_key() -> str:
    return ".".join(TOPIC_LEVELS)


def mqtt_connect(port: int, client_id: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(_mqtt_packet(0x10, _mqtt_string("MQTT") + b"\x04\x02\x00\x3c" + _mqtt_string(client_id)))
    connack = _recv_until(sock, bytearray(), lambda b: 4 if len(b) >= 4 else 0)
    if connack != b"\x20\x02\x00\x00":
        raise ConnectionError(f"MQTT CONNECT refused: {connack!r}")
    return sock


def mqtt_subscriber(port: int, n: int) -> tuple[socket.socket, bytes]:
    sock = mqtt_connect(port, f"bench-sub-{n}-{os.getpid()}")
    sock.sendall(_mqtt_packet(0x82, b"\x00\x01" + _mqtt_string(_mqtt_topic()) + b"\x00"))
    buffer = bytearray()
    suback = _recv_until(sock, buffer, lambda b: 5 if len(b) >= 5 else 0)
    if suback != b"\x90\x03\x00\x01\x00":
        raise ConnectionError(f"MQTT SUBSCRIBE refused: {suback!r}")
    return sock, bytes(buffer)


def mqtt_publisher(port: int, n: int, payload: bytes) -> tuple[socket.socket, bytes]:
    sock = mqtt_connect(port, f"bench-pub-{n}-{os.getpid()}")
    return sock, _mqtt_packet(0x30, _mqtt_string(_mqtt_topic()) + payload)


def _amqp_frame_length(buffer: bytearray) -> int:
    if len(buffer) < 7:
        return 0
    size = struct.unpack_from(">I", buffer, 3)[0] + 8
    return size if len(buffer) >= size else 0


class AmqpHandshake:
    """Just enough of an AMQP 0-9-1 client to open channel 1 and wait for replies (pamqp marshals)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = bytearray()
        self.sock.sendall(b"AMQP\x00\x00\x09\x01")
        self.expect(amqp.Connection.Start)
        self.send(
            amqp.Connection.StartOk(
                client_properties={}, mechanism="PLAIN", response="\0guest\0guest", locale="en_US"
            ),
            0,
        )
        tune = self.expect(amqp.Connection.Tune)
        self.send(
            amqp.Connection.TuneOk(channel_max=tune.channel_max, frame_max=tune.frame_max, heartbeat=0), 0
        )
        self.send(amqp.Connection.Open(virtual_host="/"), 0)
        self.expect(amqp.Connection.OpenOk)
        self.send(amqp.Channel.Open(), 1)
        self.expect(amqp.Channel.OpenOk)

    def send(self, method: object, channel: int = 1) -> None:
        self.sock.sendall(amqp_frame.marshal(method, channel))  # type: ignore[arg-type]

    def expect(self, kind: type) -> object:
        data = _recv_until(self.sock, self.buffer, _amqp_frame_length)
        try:
            _, _, value = amqp_frame.unmarshal(data)
        except amqp_exceptions.UnmarshalingException as exc:
            raise ConnectionError(f"AMQP: cannot read {data!r}: {exc}") from None
        if not isinstance(value, kind):
            raise ConnectionError(f"AMQP: expected {kind.__name__}, got {value!r}")
        return value


def amqp_subscriber(port: int, n: int) -> tuple[socket.socket, bytes]:
    client = AmqpHandshake(port)
    client.send(amqp.Queue.Declare(queue="", exclusive=True, auto_delete=True))
    queue = client.expect(amqp.Queue.DeclareOk).queue  # type: ignore[attr-defined]
    client.send(amqp.Queue.Bind(queue=queue, exchange="amq.topic", routing_key=_amqp_key()))
    client.expect(amqp.Queue.BindOk)
    client.send(amqp.Basic.Consume(queue=queue, no_ack=True))
    client.expect(amqp.Basic.ConsumeOk)
    return client.sock, bytes(client.buffer)


def amqp_publisher(port: int, n: int, payload: bytes) -> tuple[socket.socket, bytes]:
    client = AmqpHandshake(port)
    frames = b"".join(
        (
            amqp_frame.marshal(amqp.Basic.Publish(exchange="amq.topic", routing_key=_amqp_key()), 1),
            amqp_frame.marshal(amqp_header.ContentHeader(0, len(payload), amqp.Basic.Properties()), 1),
            amqp_frame.marshal(amqp_body.ContentBody(payload), 1),
        )
    )
    return client.sock, frames


def _stomp_frame_length(buffer: bytearray) -> int:
    end = buffer.find(b"\0")
    return end + 1 if end >= 0 else 0


def stomp_connect(port: int) -> tuple[socket.socket, bytearray]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"CONNECT\naccept-version:1.2\nhost:/\nlogin:guest\npasscode:guest\n\n\0")
    buffer = bytearray()
    reply = _recv_until(sock, buffer, _stomp_frame_length)
    if not reply.startswith(b"CONNECTED"):
        raise ConnectionError(f"STOMP CONNECT refused: {reply!r}")
    return sock, buffer


def stomp_subscriber(port: int, n: int) -> tuple[socket.socket, bytes]:
    sock, buffer = stomp_connect(port)
    destination = "/topic/" + _amqp_key()
    sock.sendall(f"SUBSCRIBE\nid:0\ndestination:{destination}\nack:auto\nreceipt:ready\n\n\0".encode())
    reply = _recv_until(sock, buffer, _stomp_frame_length)
    if not reply.startswith(b"RECEIPT"):
        raise ConnectionError(f"STOMP SUBSCRIBE refused: {reply!r}")
    return sock, bytes(buffer)


def stomp_publisher(port: int, n: int, payload: bytes) -> tuple[socket.socket, bytes]:
    sock, _ = stomp_connect(port)
    head = f"SEND\ndestination:/topic/{_amqp_key()}\ncontent-length:{len(payload)}\n\n".encode()
    return sock, head + payload + b"\0"


SUBSCRIBERS = {"mqtt": mqtt_subscriber, "amqp": amqp_subscriber, "stomp": stomp_subscriber}
PUBLISHERS = {"mqtt": mqtt_publisher, "amqp": amqp_publisher, "stomp": stomp_publisher}


# -- the measured loop ---------------------------------------------------------------------------------------


class Subscriber:
    """Counts MARKERs in everything the socket delivers (a marker may straddle two reads)."""

    def __init__(self, sock: socket.socket, early: bytes) -> None:
        self.sock = sock
        self.received = early.count(MARKER)
        self.tail = early[-(len(MARKER) - 1) :]

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        if not data:
            raise ConnectionError("the broker closed a subscriber")
        data = self.tail + data
        self.received += data.count(MARKER)
        self.tail = data[-(len(MARKER) - 1) :]


class Publisher:
    """Writes bursts of one pre-encoded frame; `sent` counts the whole frames handed to the socket."""

    def __init__(self, sock: socket.socket, frame: bytes, burst: int) -> None:
        self.sock = sock
        self.burst_bytes = frame * burst
        self.frame_size = len(frame)
        self.pending = memoryview(b"")
        self.written = 0
        self.writing = False

    @property
    def sent(self) -> int:
        return self.written // self.frame_size

    def on_writable(self) -> None:
        if not self.pending:
            self.pending = memoryview(self.burst_bytes)
        try:
            n = self.sock.send(self.pending)
        except BlockingIOError:
            return
        self.written += n
        self.pending = self.pending[n:]

    def on_readable(self) -> None:
        try:
            if not self.sock.recv(READ_SIZE):
                raise ConnectionError("the broker closed a publisher")
        except BlockingIOError:
            pass


@dataclass
class Result:
    path: str
    deliveries_per_s: float
    broker_us_per_msg: float
    broker_cores: float
    client_cores: float
    other_cores: float  # every other process on the machine: noise when well above 0


def broker_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def busy_cpu_seconds() -> float:
    """CPU time used by the whole machine (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as stat:
        ticks = [int(t) for t in stat.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK


def client_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_path(
    ports: dict[str, int],
    pid: int,
    publisher: str,
    publishers: int,
    subscriber: str,
    subscribers: int,
    args: argparse.Namespace,
) -> Result:
    payload = MARKER + b"\xaa" * max(0, args.size - len(MARKER))
    subs = [Subscriber(*SUBSCRIBERS[subscriber](ports[subscriber], n)) for n in range(subscribers)]
    burst = max(1, min(args.burst, args.backlog // 4))
    pubs = [
        Publisher(*PUBLISHERS[publisher](ports[publisher], n, payload), burst=burst)
        for n in range(publishers)
    ]
    backlog = args.backlog * publishers
    selector = selectors.DefaultSelector()
    for conn in (*subs, *pubs):
        conn.sock.setblocking(False)
        # Bursts end in a short segment: without this, Nagle + delayed ACK stall it for up to 40 ms.
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        selector.register(conn.sock, selectors.EVENT_READ, conn)
    start = time.monotonic()
    window_start = start + args.warmup
    window_end = window_start + args.seconds
    snapshot: tuple[int, float, float, float] | None = None
    try:
        while True:
            now = time.monotonic()
            if snapshot is None and now >= window_start:
                snapshot = (
                    sum(s.received for s in subs),
                    broker_cpu_seconds(pid),
                    client_cpu_seconds(),
                    busy_cpu_seconds(),
                )
            if now >= window_end:
                break
            slowest = min(s.received for s in subs)
            room = backlog - (sum(p.sent for p in pubs) - slowest)
            for p in pubs:
                want = room > 0
                if want != p.writing:
                    p.writing = want
                    events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
                    selector.modify(p.sock, events, p)
            for key, mask in selector.select(0.05):
                conn = key.data
                if mask & selectors.EVENT_READ:
                    conn.on_readable()
                if mask & selectors.EVENT_WRITE and isinstance(conn, Publisher):
                    conn.on_writable()
        assert snapshot is not None
        received = sum(s.received for s in subs) - snapshot[0]
        broker_cpu = broker_cpu_seconds(pid) - snapshot[1]
        client_cpu = client_cpu_seconds() - snapshot[2]
        other_cpu = busy_cpu_seconds() - snapshot[3] - broker_cpu - client_cpu
    finally:
        selector.close()
        for conn in (*subs, *pubs):
            conn.sock.close()
    name = f"{publisher} x{publishers} -> {subscriber} x{subscribers}"
    return Result(
        name,
        received / args.seconds,
        broker_cpu / received * 1e6 if received else float("inf"),
        broker_cpu / args.seconds,
        client_cpu / args.seconds,
        max(0.0, other_cpu / args.seconds),
    )


# -- broker process and report -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_broker(data_dir: str) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    ports = {"mqtt": free_port(), "amqp": free_port(), "stomp": free_port()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLYBROKER_")}
    for name in ("mqtt", "amqp", "stomp"):
        env[f"POLYBROKER_LISTENERS_{name.upper()}"] = f"127.0.0.1:{ports[name]}"
    env["POLYBROKER_LISTENERS_WS"] = "off"
    env["POLYBROKER_SERVER_SYS_INTERVAL"] = "0"
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve", "--data-dir", data_dir],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    for port in ports.values():
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise SystemExit(f"the broker did not start (exit code {proc.poll()})") from None
                time.sleep(0.05)  # polling for the listener, not synchronisation
    return proc, ports


Path = tuple[str, int, str, int]  # publisher protocol, publishers, subscriber protocol, subscribers


@dataclass(frozen=True)
class Group:
    """A cross-protocol path, its reverse, and the two same-protocol paths with the same shape."""

    name: str
    cross: Path
    reverse: Path
    same_publisher: Path
    same_subscriber: Path

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.cross, self.reverse, self.same_publisher, self.same_subscriber)


GROUPS = [
    Group(
        "fan-in: 4 publishers -> 1 consumer",
        ("mqtt", 4, "amqp", 1),
        ("amqp", 4, "mqtt", 1),
        ("mqtt", 4, "mqtt", 1),
        ("amqp", 4, "amqp", 1),
    ),  # fmt: skip
    Group(
        "fan-out: 1 publisher -> 4 subscribers",
        ("amqp", 1, "stomp", 4),
        ("stomp", 1, "amqp", 4),
        ("amqp", 1, "amqp", 4),
        ("stomp", 1, "stomp", 4),
    ),  # fmt: skip
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="measurement window per run")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--reps", type=int, default=3, help="repetitions (paths interleaved; median shown)")
    parser.add_argument("--size", type=int, default=16, help="payload bytes")
    parser.add_argument("--backlog", type=int, default=1000, help="messages a publisher may be ahead")
    parser.add_argument("--burst", type=int, default=100, help="frames per write")
    parser.add_argument("--ports", help="MQTT,AMQP,STOMP ports of a running broker (with --pid)")
    parser.add_argument("--pid", type=int, help="the running broker's pid (for its CPU)")
    args = parser.parse_args()

    proc = None
    with tempfile.TemporaryDirectory(prefix="cross-bench-") as data_dir:
        if args.ports:
            if args.pid is None:
                parser.error("--ports needs --pid")
            mqtt, amqp_port, stomp = (int(p) for p in args.ports.split(","))
            ports, pid = {"mqtt": mqtt, "amqp": amqp_port, "stomp": stomp}, args.pid
        else:
            proc, ports = start_broker(data_dir)
            pid = proc.pid
        try:
            results: dict[Path, list[Result]] = {}
            for _ in range(args.reps):
                for group in GROUPS:
                    for path in group.paths:
                        results.setdefault(path, []).append(run_path(ports, pid, *path, args))
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(20)
    report(results, args)


def report(results: dict[Path, list[Result]], args: argparse.Namespace) -> None:
    """Markdown tables, then the cost of crossing: a cross path's broker CPU per message against the
    same-protocol paths, and the conversion surcharge, (cross + reverse) / (the two same-protocol paths)
    - 1, in which every protocol's own decode and encode cost appears on both sides and cancels."""

    def cost(path: Path) -> float:
        return statistics.median(r.broker_us_per_msg for r in results[path])

    def median(path: Path, field: str) -> float:
        return statistics.median(getattr(r, field) for r in results[path])

    print(f"payload {args.size} B, window {args.seconds:g} s, {args.reps} reps (median [min - max])\n")
    for group in GROUPS:
        print(f"## {group.name}\n")
        print("| path | deliveries/s | broker µs/msg | broker cores | client cores | other cores |")
        print("|---|---|---|---|---|---|")
        for path in group.paths:
            rates = [r.deliveries_per_s for r in results[path]]
            label = results[path][0].path + (" (cross)" if path in (group.cross, group.reverse) else "")
            print(
                f"| {label} | {statistics.median(rates):,.0f} [{min(rates):,.0f} - {max(rates):,.0f}] "
                f"| {cost(path):.2f} | {median(path, 'broker_cores'):.2f} | {median(path, 'client_cores'):.2f} "
                f"| {median(path, 'other_cores'):.2f} |"
            )
        cross = cost(group.cross)
        print(
            f"\n{results[group.cross][0].path} costs {cross / cost(group.same_publisher) - 1:+.0%} against "
            f"{results[group.same_publisher][0].path} and {cross / cost(group.same_subscriber) - 1:+.0%} against "
            f"{results[group.same_subscriber][0].path}."
        )
        surcharge = (cross + cost(group.reverse)) / (cost(group.same_publisher) + cost(group.same_subscriber))
        print(f"Conversion surcharge of crossing: {surcharge - 1:+.0%} (bar: at most +20%).\n")


if __name__ == "__main__":
    main()
