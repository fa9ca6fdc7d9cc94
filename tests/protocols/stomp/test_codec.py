"""Tests of the STOMP frame codec (protocols/stomp/codec.py), organised by STOMP 1.2 spec section.

Every byte vector is fed whole, one byte at a time, and followed by the start of the next frame.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from protocols.stomp.codec import (
    CLIENT_COMMANDS,
    HEARTBEAT_BYTES,
    NEED_DATA,
    SERVER_COMMANDS,
    Frame,
    StompParser,
    StompProtocolError,
    encode_error,
    encode_frame,
    encode_headers,
    encode_message,
    message_prefix,
)

# The start of a following frame: it must stay buffered, never leak into the frame before it.
TRAILING = b"SEND\ndestination:/queue/next\ncontent-le"


def drain(parser: StompParser) -> list[Frame]:
    frames = []
    while (event := parser.next_event()) is not NEED_DATA:
        assert isinstance(event, Frame)
        frames.append(event)
    return frames


def feed_whole(parser: StompParser, data: bytes) -> list[Frame]:
    parser.feed(data)
    return drain(parser)


def feed_bytewise(parser: StompParser, data: bytes) -> list[Frame]:
    frames = []
    for i in range(len(data)):
        parser.feed(data[i : i + 1])
        frames += drain(parser)
    return frames


def feed_with_trailing(parser: StompParser, data: bytes) -> list[Frame]:
    parser.feed(data + TRAILING)
    frames = drain(parser)
    assert parser.buffered == len(TRAILING)
    return frames


FEEDERS: dict[str, Callable[[StompParser, bytes], list[Frame]]] = {
    "whole": feed_whole,
    "bytewise": feed_bytewise,
    "trailing": feed_with_trailing,
}


@pytest.fixture(params=sorted(FEEDERS))
def feed(request: pytest.FixtureRequest) -> Callable[[StompParser, bytes], list[Frame]]:
    return FEEDERS[request.param]


def parse_one(feed: Callable[[StompParser, bytes], list[Frame]], data: bytes, version: str = "1.2") -> Frame:
    parser = StompParser(version=version)
    frames = feed(parser, data)
    assert len(frames) == 1, frames
    return frames[0]


def parse_error(
    data: bytes, version: str = "1.2", bytewise: bool = False, **limits: int
) -> StompProtocolError:
    parser = StompParser(version=version, **limits)
    with pytest.raises(StompProtocolError) as info:
        if bytewise:
            feed_bytewise(parser, data)
        else:
            feed_whole(parser, data)
    error = info.value
    assert error.message and error.detail
    # Sticky: the parser stays in its error state, and drops what it is fed afterwards.
    parser.feed(b"DISCONNECT\n\n\x00")
    with pytest.raises(StompProtocolError) as again:
        parser.next_event()
    assert again.value is error
    assert parser.buffered == 0
    return error


# -- STOMP 1.2 "Client Frames" / "Server Frames": one vector per command ------------------------------------

CLIENT_VECTORS = [
    (
        b"CONNECT\naccept-version:1.0,1.1,1.2\nhost:broker.example\nlogin:guest\npasscode:pa\\ss:w\n"
        b"heart-beat:10000,10000\n\n\x00",
        Frame(
            "CONNECT",
            [
                ("accept-version", "1.0,1.1,1.2"),
                ("host", "broker.example"),
                ("login", "guest"),
                ("passcode", "pa\\ss:w"),  # CONNECT is never escaped: backslash and colon are literal
                ("heart-beat", "10000,10000"),
            ],
        ),
    ),
    (
        b"STOMP\naccept-version:1.2\nhost:/\n\n\x00",
        Frame("STOMP", [("accept-version", "1.2"), ("host", "/")]),
    ),
    (
        b"SEND\ndestination:/queue/orders\ncontent-type:text/plain\ncontent-length:5\nreceipt:r-1\n\nhello\x00",
        Frame(
            "SEND",
            [
                ("destination", "/queue/orders"),
                ("content-type", "text/plain"),
                ("content-length", "5"),
                ("receipt", "r-1"),
            ],
            b"hello",
        ),
    ),
    (
        b"SEND\ndestination:/topic/a.b\n\nno length, ends at NUL\x00",
        Frame("SEND", [("destination", "/topic/a.b")], b"no length, ends at NUL"),
    ),
    (
        b"SUBSCRIBE\nid:0\ndestination:/queue/orders\nack:client-individual\n\n\x00",
        Frame("SUBSCRIBE", [("id", "0"), ("destination", "/queue/orders"), ("ack", "client-individual")]),
    ),
    (b"UNSUBSCRIBE\nid:0\n\n\x00", Frame("UNSUBSCRIBE", [("id", "0")])),
    (b"ACK\nid:12345\ntransaction:tx1\n\n\x00", Frame("ACK", [("id", "12345"), ("transaction", "tx1")])),
    (b"NACK\nid:12345\n\n\x00", Frame("NACK", [("id", "12345")])),
    (b"BEGIN\ntransaction:tx1\n\n\x00", Frame("BEGIN", [("transaction", "tx1")])),
    (b"COMMIT\ntransaction:tx1\n\n\x00", Frame("COMMIT", [("transaction", "tx1")])),
    (b"ABORT\ntransaction:tx1\n\n\x00", Frame("ABORT", [("transaction", "tx1")])),
    (b"DISCONNECT\nreceipt:77\n\n\x00", Frame("DISCONNECT", [("receipt", "77")])),
    (b"DISCONNECT\n\n\x00", Frame("DISCONNECT", [])),
]

SERVER_VECTORS = [
    (
        b"CONNECTED\nversion:1.2\nheart-beat:0,0\nsession:s-1\nserver:polybroker/0.1 (a:b)\n\n\x00",
        Frame(
            "CONNECTED",
            [
                ("version", "1.2"),
                ("heart-beat", "0,0"),
                ("session", "s-1"),
                ("server", "polybroker/0.1 (a:b)"),
            ],
        ),
    ),
    (
        b"MESSAGE\nsubscription:0\nmessage-id:007\ndestination:/queue/a\\cb\nack:1\ncontent-length:3\n\na\x00b\x00",
        Frame(
            "MESSAGE",
            [
                ("subscription", "0"),
                ("message-id", "007"),
                ("destination", "/queue/a:b"),
                ("ack", "1"),
                ("content-length", "3"),
            ],
            b"a\x00b",
        ),
    ),
    (b"RECEIPT\nreceipt-id:77\n\n\x00", Frame("RECEIPT", [("receipt-id", "77")])),
    (
        b"ERROR\nreceipt-id:77\nmessage:malformed frame received\ncontent-type:text/plain\ncontent-length:9\n\n"
        b"bad frame\x00",
        Frame(
            "ERROR",
            [
                ("receipt-id", "77"),
                ("message", "malformed frame received"),
                ("content-type", "text/plain"),
                ("content-length", "9"),
            ],
            b"bad frame",
        ),
    ),
]


def test_vectors_cover_every_command() -> None:
    assert {frame.command for _, frame in CLIENT_VECTORS} == CLIENT_COMMANDS
    assert {frame.command for _, frame in SERVER_VECTORS} == SERVER_COMMANDS


@pytest.mark.parametrize(
    ("wire", "expected"),
    CLIENT_VECTORS + SERVER_VECTORS,
    ids=[f.command for _, f in CLIENT_VECTORS + SERVER_VECTORS],
)
def test_frame_vectors(
    feed: Callable[[StompParser, bytes], list[Frame]], wire: bytes, expected: Frame
) -> None:
    assert parse_one(feed, wire) == expected


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2"])
def test_all_vectors_back_to_back(version: str) -> None:
    stream = b"".join(wire for wire, _ in CLIENT_VECTORS + SERVER_VECTORS if b"\\" not in wire)
    expected = [frame for wire, frame in CLIENT_VECTORS + SERVER_VECTORS if b"\\" not in wire]
    assert feed_whole(StompParser(version=version), stream) == expected
    assert feed_bytewise(StompParser(version=version), stream) == expected


def test_frame_stays_buffered_until_its_nul() -> None:
    parser = StompParser()
    parser.feed(b"SEND\ndestination:/queue/a\n\nbody")
    assert parser.next_event() is NEED_DATA
    assert parser.next_event() is NEED_DATA  # asking again changes nothing
    parser.feed(b"\x00")
    assert parser.next_event() == Frame("SEND", [("destination", "/queue/a")], b"body")
    assert parser.buffered == 0


def test_unknown_uppercase_command_is_left_to_the_session(
    feed: Callable[[StompParser, bytes], list[Frame]],
) -> None:
    frame = parse_one(feed, b"FOO\nx:y\n\n\x00")
    assert frame == Frame("FOO", [("x", "y")])
    assert frame.command not in CLIENT_COMMANDS | SERVER_COMMANDS


# -- STOMP 1.2 "Value Encoding" ------------------------------------------------------------------------------

ESCAPED_SEND = b"SEND\ndestination:/queue/a\\cb\nna\\nme:v\\\\x\\c\n\n\x00"


def test_unescape_1_2(feed: Callable[[StompParser, bytes], list[Frame]]) -> None:
    frame = parse_one(feed, b"SEND\nk\\ry:line\\r\\nnext\n\n\x00", version="1.2")
    assert frame.headers == [("k\ry", "line\r\nnext")]


@pytest.mark.parametrize("version", ["1.1", "1.2"])
def test_unescape_1_1_and_1_2(feed: Callable[[StompParser, bytes], list[Frame]], version: str) -> None:
    frame = parse_one(feed, ESCAPED_SEND, version=version)
    assert frame.headers == [("destination", "/queue/a:b"), ("na\nme", "v\\x:")]


def test_unescape_double_backslash_then_letter() -> None:
    frame = parse_one(feed_whole, b"SEND\nk:\\\\n\n\n\x00")
    assert frame.headers == [("k", "\\n")]


def test_no_escaping_in_1_0(feed: Callable[[StompParser, bytes], list[Frame]]) -> None:
    frame = parse_one(feed, ESCAPED_SEND, version="1.0")
    assert frame.headers == [("destination", "/queue/a\\cb"), ("na\\nme", "v\\\\x\\c")]
    assert parse_one(feed, b"SEND\nk:\\t\n\n\x00", version="1.0").headers == [("k", "\\t")]


@pytest.mark.parametrize("version", ["1.1", "1.2"])
@pytest.mark.parametrize("command", [b"CONNECT", b"STOMP", b"CONNECTED"])
def test_connect_frames_are_never_unescaped(
    feed: Callable[[StompParser, bytes], list[Frame]], version: str, command: bytes
) -> None:
    # STOMP 1.2 "Value Encoding": CONNECT and CONNECTED frames do not escape, for STOMP 1.0 compatibility.
    frame = parse_one(feed, command + b"\nlogin:a\\cb\npasscode:\\t\n\n\x00", version=version)
    assert frame.headers == [("login", "a\\cb"), ("passcode", "\\t")]


@pytest.mark.parametrize(
    ("version", "header"),
    [
        ("1.2", b"k:\\t"),  # undefined sequence
        ("1.2", b"k:ab\\"),  # a lone backslash at the end of the value
        ("1.2", b"k\\x:v"),  # in a name too
        ("1.1", b"k:\\r"),  # \r only exists since 1.2
        ("1.1", b"k:\\t"),
    ],
)
@pytest.mark.parametrize("bytewise", [False, True])
def test_invalid_escape_is_fatal(version: str, header: bytes, bytewise: bool) -> None:
    error = parse_error(b"SEND\n" + header + b"\n\n\x00", version=version, bytewise=bytewise)
    assert error.message == "Invalid header escape"


def test_version_applies_from_the_next_frame() -> None:
    parser = StompParser()
    parser.feed(b"CONNECT\naccept-version:1.0\n\n\x00SEND\nk:a\\cb\n\n\x00")
    assert parser.next_event() == Frame("CONNECT", [("accept-version", "1.0")])
    parser.version = "1.0"  # the session negotiated 1.0 before asking for the next frame
    assert parser.next_event() == Frame("SEND", [("k", "a\\cb")])


def test_unsupported_version_is_refused() -> None:
    with pytest.raises(ValueError):
        StompParser(version="2.0")
    parser = StompParser()
    with pytest.raises(ValueError):
        parser.version = "1.3"
    assert parser.version == "1.2"


# -- STOMP 1.2 "Repeated Header Entries" --------------------------------------------------------------------


def test_repeated_headers_keep_order_and_first_wins(
    feed: Callable[[StompParser, bytes], list[Frame]],
) -> None:
    frame = parse_one(feed, b"MESSAGE\nfoo:World\nfoo:Hello\nbar:1\n\n\x00")
    assert frame.headers == [("foo", "World"), ("foo", "Hello"), ("bar", "1")]
    assert frame.header("foo") == "World"
    assert frame.header_map() == {"foo": "World", "bar": "1"}
    assert frame.header("missing") is None
    assert frame.header("missing", "default") == "default"


def test_first_content_length_wins(feed: Callable[[StompParser, bytes], list[Frame]]) -> None:
    frame = parse_one(feed, b"SEND\ncontent-length:3\ncontent-length:1\n\na\x00b\x00")
    assert frame.body == b"a\x00b"


def test_value_may_contain_colons_and_be_empty(feed: Callable[[StompParser, bytes], list[Frame]]) -> None:
    # Tolerated although 1.2 wants ':' escaped in values: the name ends at the first colon.
    frame = parse_one(feed, b"SEND\ndestination:/queue/a:b\nempty:\n\n\x00")
    assert frame.headers == [("destination", "/queue/a:b"), ("empty", "")]


# -- STOMP 1.2 "Header content-length" and "Body" ------------------------------------------------------------


def test_content_length_body_contains_nul(feed: Callable[[StompParser, bytes], list[Frame]]) -> None:
    frame = parse_one(feed, b"SEND\ncontent-length:5\n\n\x00\x00\n\x00\x00\x00")
    assert frame.body == b"\x00\x00\n\x00\x00"


def test_content_length_zero(feed: Callable[[StompParser, bytes], list[Frame]]) -> None:
    assert parse_one(feed, b"SEND\ncontent-length:0\n\n\x00").body == b""


def test_content_length_whitespace_tolerated(feed: Callable[[StompParser, bytes], list[Frame]]) -> None:
    assert parse_one(feed, b"SEND\ncontent-length: 2 \n\nab\x00").body == b"ab"


def test_binary_body_without_content_length_ends_at_first_nul() -> None:
    parser = StompParser()
    frames = feed_whole(parser, b"SEND\n\n\xff\xfe\n\n\x00X")
    assert frames == [Frame("SEND", [], b"\xff\xfe\n\n")]
    assert parser.buffered == 1


@pytest.mark.parametrize("value", [b"abc", b"-1", b"1_0", b"", b"+3", b"\xc2\xb2"])
def test_invalid_content_length(value: bytes) -> None:
    error = parse_error(b"SEND\ncontent-length:" + value + b"\n\nabc\x00")
    assert error.message == "Invalid content-length"


@pytest.mark.parametrize("bytewise", [False, True])
def test_content_length_not_followed_by_nul(bytewise: bool) -> None:
    error = parse_error(b"SEND\ncontent-length:2\n\nabc\x00", bytewise=bytewise)
    assert error.message == "Frame not terminated"


def test_large_body_in_small_chunks() -> None:
    body = bytes(range(256)) * 8192  # 2 MiB with NULs: needs content-length
    wire = (
        encode_frame("SEND", [("destination", "/queue/big")], body) + b"\n" + encode_frame("SEND", {}, b"x")
    )
    parser = StompParser()
    frames: list[Frame] = []
    for i in range(0, len(wire), 1000):
        parser.feed(wire[i : i + 1000])
        frames += drain(parser)
    assert [f.body for f in frames] == [body, b"x"]
    assert parser.buffered == 0


def test_large_nul_terminated_body_in_small_chunks() -> None:
    body = b"y" * 300_000
    wire = b"SEND\n\n" + body + b"\x00"
    parser = StompParser()
    frames: list[Frame] = []
    for i in range(0, len(wire), 777):
        parser.feed(wire[i : i + 777])
        frames += drain(parser)
    assert frames == [Frame("SEND", [], body)]


@pytest.mark.parametrize("with_length", [True, False])
def test_parsing_a_frame_fed_in_small_pieces_stays_linear(with_length: bool) -> None:
    # A complexity check, not a benchmark: 32 MiB in 1 KiB reads takes well under a second when each fed
    # byte is copied and searched once, and tens of seconds when every feed re-copies the buffered frame
    # or searches it again from the start.
    body = b"z" * (32 << 20)
    head = b"SEND\ncontent-length:%d\n\n" % len(body) if with_length else b"SEND\n\n"
    wire = head + body + b"\x00"
    parser = StompParser(max_body_size=len(body))
    frames: list[Frame] = []
    started = time.perf_counter()
    for i in range(0, len(wire), 1024):
        parser.feed(wire[i : i + 1024])
        frames += drain(parser)
    elapsed = time.perf_counter() - started
    assert [len(frame.body) for frame in frames] == [len(body)]
    assert elapsed < 3.0, f"{elapsed:.2f} s: parsing is not linear in the bytes fed"


# -- EOL: CRLF (STOMP 1.2 "Augmented BNF") and heart-beats ("Heart-beating") -------------------------------


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2"])
def test_crlf_line_endings(feed: Callable[[StompParser, bytes], list[Frame]], version: str) -> None:
    frame = parse_one(
        feed, b"SEND\r\ndestination:/queue/a\r\ncontent-length:2\r\n\r\nhi\x00", version=version
    )
    assert frame == Frame("SEND", [("destination", "/queue/a"), ("content-length", "2")], b"hi")


def test_crlf_without_headers(feed: Callable[[StompParser, bytes], list[Frame]]) -> None:
    assert parse_one(feed, b"DISCONNECT\r\n\r\n\x00") == Frame("DISCONNECT", [])


def test_mixed_eols_and_inner_cr(feed: Callable[[StompParser, bytes], list[Frame]]) -> None:
    # Only a CR right before LF is part of the EOL; 1.2 escapes others, 1.0/1.1 may send them raw.
    frame = parse_one(feed, b"SEND\na:1\r\nb:x\ry\nc:z\r\r\n\n\x00", version="1.1")
    assert frame.headers == [("a", "1"), ("b", "x\ry"), ("c", "z\r")]


def test_heartbeats_between_frames_are_counted(feed: Callable[[StompParser, bytes], list[Frame]]) -> None:
    parser = StompParser()
    frames = feed(parser, b"\n\r\n\nRECEIPT\nreceipt-id:1\n\n\x00\n\r\nRECEIPT\nreceipt-id:2\n\n\x00\n")
    assert [f.header("receipt-id") for f in frames] == ["1", "2"]
    assert parser.heartbeats == 6


def test_heartbeats_alone() -> None:
    parser = StompParser()
    parser.feed(HEARTBEAT_BYTES * 3 + b"\r")
    assert parser.next_event() is NEED_DATA
    assert parser.heartbeats == 3
    assert parser.buffered == 1  # a CR that may be half of a CRLF
    parser.feed(b"\n")
    assert parser.next_event() is NEED_DATA
    assert (parser.heartbeats, parser.buffered) == (4, 0)
    assert HEARTBEAT_BYTES == b"\n"


# -- malformed frames ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bytewise", [False, True])
@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"SEND\ndestination/queue/a\n\n\x00", "Invalid header"),  # no ':'
        (b"SEND\n:value\n\n\x00", "Invalid header"),  # empty name
        (b"SEND\nk:\xff\xfe\n\n\x00", "Invalid frame encoding"),  # not UTF-8
        (b"send\n\n\x00", "Invalid command"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "Invalid command"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "Invalid command"),  # a TLS ClientHello
        (b"\rSEND\n\n\x00", "Invalid command"),  # a CR that is not part of an EOL
        (b"\x00\n", "Invalid command"),
    ],
)
def test_malformed(wire: bytes, message: str, bytewise: bool) -> None:
    assert parse_error(wire, bytewise=bytewise).message == message


def test_invalid_command_fails_before_its_line_ends() -> None:
    parser = StompParser()
    parser.feed(b"GET ")
    with pytest.raises(StompProtocolError, match="Invalid command"):
        parser.next_event()


# -- STOMP 1.2 "Size Limits" ----------------------------------------------------------------------------------


def frame_with_headers(count: int) -> bytes:
    return b"SEND\n" + b"".join(b"h%d:v\n" % i for i in range(count)) + b"\n\x00"


@pytest.mark.parametrize("bytewise", [False, True])
def test_max_frame_headers(bytewise: bool) -> None:
    parser = StompParser(max_frame_headers=5)
    frames = (
        feed_bytewise(parser, frame_with_headers(5))
        if bytewise
        else feed_whole(parser, frame_with_headers(5))
    )
    assert len(frames[0].headers) == 5
    error = parse_error(frame_with_headers(6), bytewise=bytewise, max_frame_headers=5)
    assert error.message == "Too many headers"


def test_too_many_headers_fail_before_the_block_ends() -> None:
    parser = StompParser(max_frame_headers=5)
    parser.feed(frame_with_headers(6)[:-2])  # no empty line yet
    with pytest.raises(StompProtocolError, match="Too many headers"):
        parser.next_event()


@pytest.mark.parametrize("bytewise", [False, True])
def test_max_header_length(bytewise: bool) -> None:
    ok = b"SEND\nk:" + b"v" * 18 + b"\r\n\n\x00"  # 20 bytes without the EOL
    parser = StompParser(max_header_length=20)
    frames = feed_bytewise(parser, ok) if bytewise else feed_whole(parser, ok)
    assert frames[0].headers == [("k", "v" * 18)]
    error = parse_error(b"SEND\nk:" + b"v" * 19 + b"\n\n\x00", bytewise=bytewise, max_header_length=20)
    assert error.message == "Header too long"


def test_endless_header_line_fails_quickly() -> None:
    parser = StompParser(max_header_length=1024)
    parser.feed(b"SEND\ndestination:")
    assert parser.next_event() is NEED_DATA
    fed = 0
    with pytest.raises(StompProtocolError, match="Header too long"):
        for _ in range(1000):
            parser.feed(b"x" * 100)
            fed += 100
            parser.next_event()
    assert fed <= 1024 + 100
    assert parser.buffered == 0  # nothing kept after the error


@pytest.mark.parametrize("bytewise", [False, True])
def test_max_body_size_with_content_length(bytewise: bool) -> None:
    parser = StompParser(max_body_size=4)
    assert feed_whole(parser, b"SEND\ncontent-length:4\n\nabcd\x00")[0].body == b"abcd"
    error = parse_error(b"SEND\ncontent-length:5\n\nabcde\x00", bytewise=bytewise, max_body_size=4)
    assert error.message == "Body too large"


def test_content_length_over_limit_fails_before_the_body_arrives() -> None:
    parser = StompParser(max_body_size=1000)
    parser.feed(b"SEND\ncontent-length:1001\n\n")
    with pytest.raises(StompProtocolError, match="Body too large"):
        parser.next_event()


@pytest.mark.parametrize("bytewise", [False, True])
def test_max_body_size_without_content_length(bytewise: bool) -> None:
    parser = StompParser(max_body_size=4)
    assert feed_whole(parser, b"SEND\n\nabcd\x00")[0].body == b"abcd"
    error = parse_error(b"SEND\n\nabcde\x00", bytewise=bytewise, max_body_size=4)
    assert error.message == "Body too large"


def test_endless_body_fails_once_over_the_limit() -> None:
    parser = StompParser(max_body_size=1000)
    parser.feed(b"SEND\n\n")
    assert parser.next_event() is NEED_DATA
    fed = 0
    with pytest.raises(StompProtocolError, match="Body too large"):
        for _ in range(100):
            parser.feed(b"x" * 100)
            fed += 100
            parser.next_event()
    assert fed == 1100


@pytest.mark.parametrize("bytewise", [False, True])
def test_max_command_length(bytewise: bool) -> None:
    assert feed_whole(StompParser(max_command_length=8), b"ABCDEFGH\n\n\x00")[0].command == "ABCDEFGH"
    error = parse_error(b"ABCDEFGHI\n\n\x00", bytewise=bytewise, max_command_length=8)
    assert error.message == "Command too long"


def test_endless_command_line_fails_quickly() -> None:
    parser = StompParser()
    parser.feed(b"A" * 65)
    assert parser.next_event() is NEED_DATA  # 64 letters and a CR could still follow
    parser.feed(b"A" * 1_000_000)
    with pytest.raises(StompProtocolError, match="Command too long"):
        parser.next_event()


# -- encoding ------------------------------------------------------------------------------------------------


def test_encode_escapes_per_version() -> None:
    headers = [("dest:ination", "a\\b\nc:d\re")]
    assert encode_frame("SEND", headers, version="1.2") == b"SEND\ndest\\cination:a\\\\b\\nc\\cd\\re\n\n\x00"
    # STOMP 1.1 has no \r escape: CR stays a raw octet.
    assert encode_frame("SEND", headers, version="1.1") == b"SEND\ndest\\cination:a\\\\b\\nc\\cd\re\n\n\x00"
    assert encode_frame("SEND", [("k", "a\\b:c")], version="1.0") == b"SEND\nk:a\\b:c\n\n\x00"


@pytest.mark.parametrize("command", ["CONNECT", "STOMP", "CONNECTED"])
def test_encode_connect_frames_verbatim(command: str) -> None:
    wire = encode_frame(command, [("server", "polybroker/0.1 (a:b\\c)")])
    assert wire == command.encode() + b"\nserver:polybroker/0.1 (a:b\\c)\n\n\x00"


@pytest.mark.parametrize(
    ("command", "version", "headers"),
    [
        ("CONNECTED", "1.2", [("k", "a\nb")]),
        ("CONNECT", "1.2", [("k:x", "v")]),
        ("SEND", "1.0", [("k", "a\rb")]),
        ("SEND", "1.0", [("", "v")]),
        ("SEND", "1.2", [("", "v")]),
    ],
)
def test_encode_refuses_what_cannot_be_represented(
    command: str, version: str, headers: list[tuple[str, str]]
) -> None:
    with pytest.raises(ValueError):
        encode_frame(command, headers, version=version)


def test_encode_refuses_unknown_version() -> None:
    with pytest.raises(ValueError):
        encode_frame("SEND", [], version="1.3")


def test_encode_content_length() -> None:
    assert encode_frame("SEND", {"destination": "/queue/a"}, b"a\x00b") == (
        b"SEND\ndestination:/queue/a\ncontent-length:3\n\na\x00b\x00"
    )
    assert encode_frame("RECEIPT", {"receipt-id": "1"}) == b"RECEIPT\nreceipt-id:1\n\n\x00"
    # A matching content-length given by the caller is kept where it is, not repeated.
    assert encode_frame("SEND", [("content-length", "2"), ("x", "y")], b"ab") == (
        b"SEND\ncontent-length:2\nx:y\n\nab\x00"
    )
    with pytest.raises(ValueError):
        encode_frame("SEND", [("content-length", "3")], b"ab")


def test_encode_message_hot_path() -> None:
    prefix = message_prefix([("subscription", "sub:1")])
    headers = encode_headers([("destination", "/topic/a.b"), ("message-id", "m-1")])
    wire = encode_message(prefix, headers, b"x\x00y", b"ack:9\n")
    assert wire == (
        b"MESSAGE\nsubscription:sub\\c1\ndestination:/topic/a.b\nmessage-id:m-1\nack:9\ncontent-length:3\n\nx\x00y\x00"
    )
    assert parse_one(feed_whole, wire) == Frame(
        "MESSAGE",
        [
            ("subscription", "sub:1"),
            ("destination", "/topic/a.b"),
            ("message-id", "m-1"),
            ("ack", "9"),
            ("content-length", "3"),
        ],
        b"x\x00y",
    )
    # content-length is always present, even for an empty body.
    assert encode_message(prefix, b"", b"") == b"MESSAGE\nsubscription:sub\\c1\ncontent-length:0\n\n\x00"


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2"])
def test_encode_error_frame(version: str) -> None:
    error = parse_error(b"SEND\nno colon\n\n\x00")
    wire = encode_error(error.message, error.detail + "\nmore", version, receipt_id="r:1")
    frame = parse_one(feed_whole, wire, version=version)
    assert frame.command == "ERROR"
    assert frame.header("message") == "Invalid header"
    assert frame.header("receipt-id") == "r:1"
    assert frame.body == (error.detail + "\nmore").encode()


def test_encode_error_frame_1_0_flattens_newlines() -> None:
    frame = parse_one(feed_whole, encode_error("two\nlines", version="1.0"), version="1.0")
    assert frame == Frame("ERROR", [("message", "two lines")])


# -- properties: round trip and chunking ---------------------------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8"), max_size=20)
NAMES = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)
PLAIN_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=20)
PLAIN_NAMES = st.text(st.characters(codec="utf-8", exclude_characters="\r\n:"), min_size=1, max_size=12)
COMMANDS = st.sampled_from(sorted(CLIENT_COMMANDS | SERVER_COMMANDS))
BODIES = st.binary(max_size=64)


@st.composite
def frames(draw: st.DrawFn, version: str | None = None) -> tuple[str, Frame]:
    """(version, frame) whose headers the version can represent; content-length excluded (encode adds it)."""
    version = version or draw(st.sampled_from(["1.0", "1.1", "1.2"]))
    command = draw(COMMANDS)
    verbatim = version == "1.0" or command in {"CONNECT", "STOMP", "CONNECTED"}
    names, values = (PLAIN_NAMES, PLAIN_TEXT) if verbatim else (NAMES, TEXT)
    headers = draw(st.lists(st.tuples(names, values), max_size=6))
    assume(all(name != "content-length" for name, _ in headers))
    if version == "1.1" and not verbatim:
        # 1.1 cannot escape CR, and a CR before LF ends the line.
        assume(not any(name.endswith("\r") or value.endswith("\r") for name, value in headers))
    return version, Frame(command, headers, draw(BODIES))


def with_length(frame: Frame) -> Frame:
    extra = [("content-length", str(len(frame.body)))] if frame.body else []
    return Frame(frame.command, frame.headers + extra, frame.body)


@given(frames())
@settings(max_examples=300, suppress_health_check=[HealthCheck.filter_too_much])
def test_round_trip(case: tuple[str, Frame]) -> None:
    version, frame = case
    wire = encode_frame(frame.command, frame.headers, frame.body, version)
    parser = StompParser(version=version)
    assert feed_whole(parser, wire) == [with_length(frame)]
    assert parser.buffered == 0


def chunked(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    for start, end in zip(points, points[1:], strict=False):
        yield data[start:end]


@given(
    st.sampled_from(["1.0", "1.1", "1.2"]).flatmap(
        lambda v: st.tuples(st.just(v), st.lists(frames(v), max_size=5))
    ),
    st.lists(st.sampled_from([b"", b"\n", b"\r\n", b"\n\n"]), min_size=6, max_size=6),
    st.lists(st.integers(min_value=0), max_size=30),
)
@settings(max_examples=200, suppress_health_check=[HealthCheck.filter_too_much])
def test_arbitrary_chunking(
    case: tuple[str, list[tuple[str, Frame]]], eols: list[bytes], cuts: list[int]
) -> None:
    version, cases = case
    expected = [with_length(frame) for _, frame in cases]
    stream = eols[0] + b"".join(
        encode_frame(f.command, f.headers, f.body, version) + eol
        for (_, f), eol in zip(cases, eols[1:], strict=False)
    )
    parser = StompParser(version=version)
    got: list[Frame] = []
    for piece in chunked(stream, cuts):
        parser.feed(piece)
        got += drain(parser)
    assert got == expected
    assert parser.buffered == 0
    assert feed_whole(StompParser(version=version), stream) == expected
