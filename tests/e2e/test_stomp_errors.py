"""STOMP end to end, the rules a client library will not break for us: version negotiation, login refusal,
every ERROR case (malformed frame, unknown command, the three size limits, a refused destination, an ACK
for an unknown id) and heart-beats, with raw frames over a socket against a real broker process.

After every error case a bystander connection (stomp.py) must still send and receive: an ERROR closes
the offending connection only (README, Guarantees).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.e2e.broker_process import BrokerProcess
from tests.e2e.test_stomp import RawStomp, StompClients

MAX_HEADERS = 10
MAX_HEADER_LENGTH = 512
MAX_FRAME_SIZE = 4096
HEARTBEAT_MS = 200


@pytest.fixture(scope="module")
def limited_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    env = {
        "POLYBROKER_LIMITS_MAX_HEADERS": str(MAX_HEADERS),
        "POLYBROKER_LIMITS_MAX_HEADER_LENGTH": str(MAX_HEADER_LENGTH),
        "POLYBROKER_LIMITS_MAX_FRAME_SIZE": str(MAX_FRAME_SIZE),
        "POLYBROKER_LIMITS_STOMP_HEARTBEAT_MS": str(HEARTBEAT_MS),
    }
    proc = BrokerProcess(tmp_path_factory.mktemp("stomp-limits") / "data", env=env)
    proc.start(wait=("stomp",))
    yield proc
    proc.kill()
    assert "Traceback" not in proc.log(), proc.log()


@pytest.fixture
def clients(limited_broker: BrokerProcess) -> Iterator[StompClients]:
    made = StompClients(limited_broker, None)
    yield made
    made.close_all()


@pytest.fixture
def bystander(clients: StompClients) -> Iterator[None]:
    """A connection open during the test that must still work after it."""
    conn, got = clients.connect()
    conn.subscribe("/queue/bystander", id="b", ack="auto", receipt="ready")
    got.wait_receipt("ready")
    yield
    conn.send("/queue/bystander", "still here")
    assert [m.body for m in got.wait_messages(1)] == ["still here"]


def raw(proc: BrokerProcess) -> RawStomp:
    return RawStomp(proc.ports["stomp"])


def assert_error_then_close(client: RawStomp, message: str) -> None:
    """STOMP 1.2 "ERROR": a message header, a body that explains, then the server closes."""
    frame = client.frame()
    assert frame.command == "ERROR", frame
    assert frame.header("message") == message, frame
    assert frame.body, "the ERROR body explains"
    assert client.closed_by_broker()


# -- negotiation and login -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("accept", "expected"), [(None, "1.0"), ("1.0,1.1", "1.1"), ("1.1,1.2", "1.2")])
def test_version_negotiation(limited_broker: BrokerProcess, accept: str | None, expected: str) -> None:
    client = raw(limited_broker)
    header = f"accept-version:{accept}\n" if accept else ""
    client.send(f"CONNECT\n{header}host:/\n\n".encode() + b"\0")
    frame = client.frame()
    assert frame.command == "CONNECTED"
    assert frame.header("version") == expected
    client.close()


def test_no_common_version_is_refused(limited_broker: BrokerProcess, bystander: None) -> None:
    client = raw(limited_broker)
    client.send(b"CONNECT\naccept-version:3.0\nhost:/\n\n\0")
    frame = client.frame()
    assert frame.command == "ERROR" and frame.header("version") == "1.0,1.1,1.2"
    assert client.closed_by_broker()


def test_bad_login_is_refused(limited_broker: BrokerProcess, bystander: None) -> None:
    client = raw(limited_broker)
    client.send(b"CONNECT\naccept-version:1.2\nhost:/\nlogin:guest\npasscode:not-guest\n\n\0")
    assert_error_then_close(client, "Access refused")


def test_crlf_line_endings_and_eols_between_frames(limited_broker: BrokerProcess) -> None:
    client = raw(limited_broker)
    client.connect()
    client.send(
        b"\r\n\nSUBSCRIBE\r\nid:1\r\ndestination:/queue/crlf\r\nreceipt:s\r\n\r\n\0\n\n"
        b"SEND\r\ndestination:/queue/crlf\r\ncontent-length:4\r\n\r\na\0b\n\0\r\n"
    )
    receipt = client.frame()
    assert receipt.command == "RECEIPT" and receipt.header("receipt-id") == "s"
    message = client.frame()
    assert message.command == "MESSAGE" and message.body == b"a\0b\n"
    client.close()


@pytest.mark.parametrize("version", ["1.1", "1.2"])
def test_header_escaping_round_trip(clients: StompClients, version: str) -> None:
    conn, got = clients.connect("tcp", version)
    conn.subscribe("/queue/escape-" + version, id="e", ack="auto")
    conn.send("/queue/escape-" + version, "x", headers={"weird": "a:b\nc\\d"})
    (message,) = got.wait_messages(1)
    assert message.headers["weird"] == "a:b\nc\\d"


# -- errors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"SEND\ndestination:/queue/x\nthis line has no colon\n\nbody\0", "Invalid header"),
        (b"PUBLISH\ndestination:/queue/x\n\n\0", "Unknown command"),
        (b"SEND\n" + b"".join(b"h%d:v\n" % i for i in range(MAX_HEADERS + 1)) + b"\n\0", "Too many headers"),
        (b"SEND\ndestination:/queue/" + b"x" * MAX_HEADER_LENGTH + b"\n\n\0", "Header too long"),
        (b"SEND\ndestination:/queue/x\n\n" + b"x" * (MAX_FRAME_SIZE + 1) + b"\0", "Body too large"),
        (
            b"SEND\ndestination:/queue/x\ncontent-length:%d\n\n" % (MAX_FRAME_SIZE + 1)
            + b"x" * (MAX_FRAME_SIZE + 1)
            + b"\0",
            "Body too large",
        ),
        (b"SEND\ndestination:/bogus/x\n\nbody\0", "Invalid destination"),
        (b"SUBSCRIBE\nid:1\ndestination:/amq/queue/does-not-exist\n\n\0", "Not found"),
        (b"ACK\nid:12345\n\n\0", "Unknown message id"),
        (b"SEND\ndestination:/queue/x\ncontent-length:2\n\nabc\0", "Frame not terminated"),
    ],
    ids=[
        "malformed",
        "unknown-command",
        "too-many-headers",
        "header-too-long",
        "body-too-large",
        "content-length-too-large",
        "destination-not-allowed",
        "amq-queue-missing",
        "ack-unknown-id",
        "content-length-mismatch",
    ],
)
def test_error_frame_then_close(
    limited_broker: BrokerProcess, bystander: None, frame: bytes, message: str
) -> None:
    client = raw(limited_broker)
    client.connect()
    client.send(frame)
    assert_error_then_close(client, message)


def test_frame_before_connect_is_refused(limited_broker: BrokerProcess, bystander: None) -> None:
    client = raw(limited_broker)
    client.send(b"SEND\ndestination:/queue/x\n\nbody\0")
    assert_error_then_close(client, "Not connected")


def test_error_names_the_receipt_of_the_failing_frame(limited_broker: BrokerProcess) -> None:
    client = raw(limited_broker)
    client.connect()
    client.send(b"SEND\ndestination:/nowhere\nreceipt:r-17\n\nx\0")
    frame = client.frame()
    assert frame.command == "ERROR" and frame.header("receipt-id") == "r-17"
    assert client.closed_by_broker()


# -- heart-beats ----------------------------------------------------------------------------------------------


def test_silent_client_is_closed_after_its_heartbeats_stop(
    limited_broker: BrokerProcess, bystander: None
) -> None:
    client = raw(limited_broker)
    connected = client.connect(heart_beat=f"{HEARTBEAT_MS},0")
    assert connected.header("heart-beat") == f"0,{HEARTBEAT_MS}"
    started = time.monotonic()
    frame = client.frame(timeout=5.0)
    elapsed = time.monotonic() - started
    assert frame.command == "ERROR" and frame.header("message") == "Heart-beat timeout"
    # Grace: at least two intervals of silence, detected within three.
    assert 2 * HEARTBEAT_MS / 1000 * 0.9 <= elapsed <= 3 * HEARTBEAT_MS / 1000 + 1.0
    assert client.closed_by_broker()


def test_client_heartbeats_keep_the_connection_and_the_broker_sends_its_own(
    limited_broker: BrokerProcess,
) -> None:
    client = raw(limited_broker)
    connected = client.connect(heart_beat=f"{HEARTBEAT_MS},{HEARTBEAT_MS}")
    assert connected.header("heart-beat") == f"{HEARTBEAT_MS},{HEARTBEAT_MS}"
    deadline = time.monotonic() + 6 * HEARTBEAT_MS / 1000
    while time.monotonic() < deadline:
        client.send(b"\n")  # our beat, every half interval (pacing the beats is the behaviour under test)
        assert not client.closed_by_broker(timeout=HEARTBEAT_MS / 2000)
    assert client.heartbeats_received() >= 3
    client.send(b"SEND\ndestination:/queue/beats\nreceipt:alive\n\nx\0")
    frame = client.frame()
    assert frame.command == "RECEIPT" and frame.header("receipt-id") == "alive"
    client.close()


def test_stomp_py_with_heartbeats_stays_connected(clients: StompClients) -> None:
    conn, got = clients.connect("tcp", "1.2", heartbeats=(HEARTBEAT_MS, HEARTBEAT_MS))
    assert got.connected is not None and got.connected["heart-beat"] == f"{HEARTBEAT_MS},{HEARTBEAT_MS}"
    conn.subscribe("/queue/hb", id="h", ack="auto")
    # Long enough for several beats each way; stomp.py reports a missed beat through on_heartbeat_timeout.
    assert got.never(
        lambda: got.heartbeat_timeouts or got.disconnected or got.errors, 8 * HEARTBEAT_MS / 1000
    )
    conn.send("/queue/hb", "after beats")
    assert [m.body for m in got.wait_messages(1)] == ["after beats"]
