"""AMQP 0-9-1 wire constants: frame types and sizes, the protocol header, class ids and reply codes.

Values come from the spec's XML (amqp0-9-1.extended.xml, as RabbitMQ publishes it) and RabbitMQ's additions
(312 NO_ROUTE). Nothing here computes anything.

Must not import: anything outside the standard library.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final

#: What a 0-9-1 client sends first and what we answer with when it sent anything else (AMQP 0-9-1 §4.2.2).
PROTOCOL_HEADER: Final = b"AMQP\x00\x00\x09\x01"

# Frame types (AMQP 0-9-1 §4.2.3).
FRAME_METHOD: Final = 1
FRAME_HEADER: Final = 2
FRAME_BODY: Final = 3
FRAME_HEARTBEAT: Final = 8
FRAME_END: Final = 0xCE
#: type (1) + channel (2) + size (4).
FRAME_HEADER_SIZE: Final = 7
#: Header plus the frame-end octet: what a frame costs on top of its payload.
FRAME_OVERHEAD: Final = 8
#: Every peer must accept frames up to this size before tuning (AMQP 0-9-1 §4.2.3 "frame-min-size").
FRAME_MIN_SIZE: Final = 4096
#: The frame_max we propose in Connection.Tune, as RabbitMQ does.
DEFAULT_FRAME_MAX: Final = 131072

# Class ids.
CLASS_CONNECTION: Final = 10
CLASS_CHANNEL: Final = 20
CLASS_EXCHANGE: Final = 40
CLASS_QUEUE: Final = 50
CLASS_BASIC: Final = 60
CLASS_CONFIRM: Final = 85
CLASS_TX: Final = 90

# Reply codes (the spec's "constant" elements). 3xx/4xx are channel ("soft") errors, 5xx connection
# ("hard") errors; 320 and 402 are hard too.
REPLY_SUCCESS: Final = 200
CONTENT_TOO_LARGE: Final = 311
NO_ROUTE: Final = 312
NO_CONSUMERS: Final = 313
CONNECTION_FORCED: Final = 320
INVALID_PATH: Final = 402
ACCESS_REFUSED: Final = 403
NOT_FOUND: Final = 404
RESOURCE_LOCKED: Final = 405
PRECONDITION_FAILED: Final = 406
FRAME_ERROR: Final = 501
SYNTAX_ERROR: Final = 502
COMMAND_INVALID: Final = 503
CHANNEL_ERROR: Final = 504
UNEXPECTED_FRAME: Final = 505
RESOURCE_ERROR: Final = 506
NOT_ALLOWED: Final = 530
NOT_IMPLEMENTED: Final = 540
INTERNAL_ERROR: Final = 541

#: The spec's name of each reply code, as RabbitMQ prefixes reply texts ("NOT_FOUND - no queue 'q'").
REPLY_NAMES: Final = MappingProxyType(
    {
        REPLY_SUCCESS: "REPLY_SUCCESS",
        CONTENT_TOO_LARGE: "CONTENT_TOO_LARGE",
        NO_ROUTE: "NO_ROUTE",
        NO_CONSUMERS: "NO_CONSUMERS",
        CONNECTION_FORCED: "CONNECTION_FORCED",
        INVALID_PATH: "INVALID_PATH",
        ACCESS_REFUSED: "ACCESS_REFUSED",
        NOT_FOUND: "NOT_FOUND",
        RESOURCE_LOCKED: "RESOURCE_LOCKED",
        PRECONDITION_FAILED: "PRECONDITION_FAILED",
        FRAME_ERROR: "FRAME_ERROR",
        SYNTAX_ERROR: "SYNTAX_ERROR",
        COMMAND_INVALID: "COMMAND_INVALID",
        CHANNEL_ERROR: "CHANNEL_ERROR",
        UNEXPECTED_FRAME: "UNEXPECTED_FRAME",
        RESOURCE_ERROR: "RESOURCE_ERROR",
        NOT_ALLOWED: "NOT_ALLOWED",
        NOT_IMPLEMENTED: "NOT_IMPLEMENTED",
        INTERNAL_ERROR: "INTERNAL_ERROR",
    }
)

#: Codes that close the connection (Connection.Close) rather than the channel (Channel.Close).
HARD_ERRORS: Final = frozenset(
    {
        CONNECTION_FORCED,
        INVALID_PATH,
        FRAME_ERROR,
        SYNTAX_ERROR,
        COMMAND_INVALID,
        CHANNEL_ERROR,
        UNEXPECTED_FRAME,
        RESOURCE_ERROR,
        NOT_ALLOWED,
        NOT_IMPLEMENTED,
        INTERNAL_ERROR,
    }
)
