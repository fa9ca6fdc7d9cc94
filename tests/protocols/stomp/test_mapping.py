"""Tests of protocols/stomp/mapping.py: STOMP headers <-> neutral properties, one row per case of the
cross-protocol property table (README.md, "Names across protocols"), without a broker or a socket."""

from __future__ import annotations

import datetime
import decimal
from typing import Any

import pytest

from broker.message import EMPTY_PROPERTIES, PERSISTENT, Properties
from protocols.stomp.mapping import encode_properties, headers_from_properties, properties_from_headers

NOW_MS = 1_700_000_000_000


@pytest.mark.parametrize(
    ("header", "value", "attribute", "expected"),
    [
        ("persistent", "true", "delivery_mode", PERSISTENT),
        ("persistent", "false", "delivery_mode", None),
        ("priority", "7", "priority", 7),
        ("content-type", "application/json", "content_type", "application/json"),
        ("content-encoding", "gzip", "content_encoding", "gzip"),
        ("correlation-id", "req-42", "correlation_id", "req-42"),
        ("expiration", "3600000", "expiration", "3600000"),
        ("expires", str(NOW_MS + 60_000), "expiration", "60000"),
        ("expires", str(NOW_MS - 1), "expiration", "0"),
        ("expires", "0", "expiration", None),
        ("amqp-message-id", "m-1", "message_id", "m-1"),
        ("timestamp", "1700000000123", "timestamp", 1_700_000_000),
        ("type", "order.created", "type", "order.created"),
        ("app-id", "billing", "app_id", "billing"),
    ],
)
def test_send_header_becomes_a_property(header: str, value: str, attribute: str, expected: Any) -> None:
    props = properties_from_headers({header: value}, None, NOW_MS)
    assert getattr(props, attribute) == expected
    assert not props.headers


@pytest.mark.parametrize(
    ("header", "value"), [("priority", "high"), ("priority", "256"), ("x-tenant", "acme")]
)
def test_other_send_headers_are_plain_headers(header: str, value: str) -> None:
    props = properties_from_headers({header: value}, None, NOW_MS)
    assert props.headers == {header: value}
    assert props.priority is None


def test_no_headers_give_the_shared_empty_properties() -> None:
    assert properties_from_headers({}, None, NOW_MS) is EMPTY_PROPERTIES


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("acme", "acme"),
        (5, "5"),
        (-(2**40), str(-(2**40))),
        (1.5, "1.5"),
        (decimal.Decimal("1.50"), "1.50"),
        (True, "true"),
        (False, "false"),
        (b"caf\xc3\xa9", "café"),
        (datetime.datetime(2023, 11, 14, 22, 13, 20, tzinfo=datetime.UTC), "2023-11-14 22:13:20+00:00"),
    ],
)
def test_header_values_as_text(value: Any, text: str) -> None:
    """A non-string header value (AMQP field table types) is carried as text; booleans as STOMP spells
    them (lower case, as RabbitMQ's STOMP adapter does), not Python's `True`."""
    assert headers_from_properties(Properties(headers={"h": value})) == [("h", text)]


@pytest.mark.parametrize("value", [None, [1, 2], {"a": 1}, ("t",), b"\xff\x00"])
def test_header_values_without_text_are_left_out(value: Any) -> None:
    """Void, arrays, tables and bytes that are not UTF-8 (STOMP 1.2 "Value Encoding": headers are UTF-8)."""
    assert headers_from_properties(Properties(headers={"h": value, "k": "kept"})) == [("k", "kept")]


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2"])
def test_headers_with_nul_are_left_out(version: str) -> None:
    """A NUL cannot be escaped and would end the frame for clients that look for it first."""
    props = Properties(correlation_id="c\x00", headers={"a\x00b": "v", "z": "x\x00y", "k": "kept"})
    assert encode_properties(props, version) == b"k:kept\n"


def test_frame_headers_are_never_copied_from_neutral_headers() -> None:
    headers = {"message-id": "forged", "destination": "/queue/x", "subscription": "s", "x-k": "v"}
    assert headers_from_properties(Properties(headers=headers)) == [("x-k", "v")]


def test_delivery_headers_in_table_order() -> None:
    props = Properties(
        content_type="text/plain",
        delivery_mode=PERSISTENT,
        priority=3,
        correlation_id="c",
        reply_to="amq.gen-abc",
        expiration="1000",
        message_id="m",
        timestamp=1_700_000_000,
        headers={"x-k": "v"},
    )
    assert headers_from_properties(props, expires_ms=NOW_MS + 1000) == [
        ("content-type", "text/plain"),
        ("persistent", "true"),
        ("priority", "3"),
        ("correlation-id", "c"),
        ("reply-to", "/reply-queue/amq.gen-abc"),
        ("expiration", "1000"),
        ("expires", str(NOW_MS + 1000)),
        ("amqp-message-id", "m"),
        ("timestamp", "1700000000000"),
        ("x-k", "v"),
    ]


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("1.2", b"note\\c1:a\\cb\\\\c\\nd\\re\nk:v\n"),
        ("1.0", b"k:v\n"),
    ],
)
def test_header_escaping_per_version(version: str, expected: bytes) -> None:
    """STOMP 1.2 "Value Encoding" escapes CR, LF, colon and backslash in names and values; 1.0 has no
    escaping, so a header it cannot carry is left out."""
    props = Properties(headers={"note:1": "a:b\\c\nd\re", "k": "v"})
    assert encode_properties(props, version) == expected


@pytest.mark.parametrize(
    ("reply_to", "header"),
    [
        ("rpc-replies", "/queue/rpc-replies"),
        ("amq.gen-Xa2", "/reply-queue/amq.gen-Xa2"),
        ("amq.rabbitmq.reply-to.g1h2", "/reply-queue/amq.rabbitmq.reply-to.g1h2"),
        ("/topic/replies.c1", "/topic/replies.c1"),
        ("/exchange/x/k", "/exchange/x/k"),
    ],
)
def test_reply_to_header(reply_to: str, header: str) -> None:
    """A queue the server made (server-named, direct reply-to) is answered through /reply-queue/, which is
    never declared: a STOMP responder may not declare an `amq.` queue, and a gone requester's reply must
    just be dropped. Another queue name is a /queue/; a destination stays as it was."""
    assert headers_from_properties(Properties(reply_to=reply_to)) == [("reply-to", header)]
