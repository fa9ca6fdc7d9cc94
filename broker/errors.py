"""Errors the core raises when a client asks for something it may not have.

The codes are AMQP 0-9-1's reply codes (the core's model is AMQP's, README, Names across protocols); each protocol
session maps them to its own error (AMQP channel close, STOMP ERROR frame, MQTT reason code).

Must not import: anything outside the standard library.
"""

from __future__ import annotations

NOT_FOUND = 404
ACCESS_REFUSED = 403
RESOURCE_LOCKED = 405
PRECONDITION_FAILED = 406
NOT_ALLOWED = 530
NOT_IMPLEMENTED = 540
INTERNAL_ERROR = 541


class BrokerError(Exception):
    """A refused operation: `code` is the AMQP reply code, `text` says what was wrong."""

    code = INTERNAL_ERROR

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code}, {self.text!r})"


class NotFound(BrokerError):
    code = NOT_FOUND


class AccessRefused(BrokerError):
    code = ACCESS_REFUSED


class ResourceLocked(BrokerError):
    code = RESOURCE_LOCKED


class PreconditionFailed(BrokerError):
    code = PRECONDITION_FAILED


class NotAllowed(BrokerError):
    code = NOT_ALLOWED


class NotImplementedByBroker(BrokerError):
    code = NOT_IMPLEMENTED
