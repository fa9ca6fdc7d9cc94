"""Errors the AMQP 0-9-1 codec raises when the peer breaks the protocol, each carrying its wire consequence.

`AmqpFrameError` carries the reply code and text for Connection.Close (or Channel.Close for a soft code);
`ProtocolHeaderError` tells the session to write `PROTOCOL_HEADER` and close (AMQP 0-9-1 §4.2.2).
Encoding our own values wrongly (a str where a table belongs, a 300-byte shortstr) is our bug, not the
peer's: encoders raise TypeError/ValueError for that (the h11 split between the two error kinds).

Must not import: asyncio, broker, storage, cluster, other protocol packages.
"""

from __future__ import annotations

from protocols.amqp091.constants import HARD_ERRORS, PROTOCOL_HEADER, REPLY_NAMES


class AmqpCodecError(Exception):
    """Base of everything the codec raises because of what the peer sent."""


class AmqpFrameError(AmqpCodecError):
    """The peer sent something the spec forbids; close with `reply_code` and `reply_text`.

    `class_id`/`method_id` name the method being decoded or assembled when there was one (they go into
    Connection.Close's class-id/method-id fields), else 0.
    """

    def __init__(self, reply_code: int, text: str, class_id: int = 0, method_id: int = 0) -> None:
        super().__init__(reply_code, text, class_id, method_id)
        self.reply_code = reply_code
        self.text = text
        self.class_id = class_id
        self.method_id = method_id

    @property
    def reply_text(self) -> str:
        """RabbitMQ's form: the code's spec name, then the detail ("FRAME_ERROR - bad frame end")."""
        return f"{REPLY_NAMES.get(self.reply_code, str(self.reply_code))} - {self.text}"

    @property
    def is_hard(self) -> bool:
        """True when the connection must close, False when closing the channel is enough."""
        return self.reply_code in HARD_ERRORS

    def __str__(self) -> str:
        where = f" (class {self.class_id}, method {self.method_id})" if self.class_id else ""
        return f"{self.reply_code} {self.reply_text}{where}"


class ProtocolHeaderError(AmqpCodecError):
    """The peer did not open with AMQP 0-9-1's header: write `response`, then close (AMQP 0-9-1 §4.2.2)."""

    #: The header of the one protocol version we speak.
    response = PROTOCOL_HEADER

    def __init__(self, received: bytes) -> None:
        super().__init__(received)
        self.received = received

    def __str__(self) -> str:
        return f"unsupported protocol header {self.received!r}; we speak {PROTOCOL_HEADER!r}"
