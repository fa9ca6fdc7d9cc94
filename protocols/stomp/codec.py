"""STOMP 1.0/1.1/1.2 frame codec, sans-I/O: bytes -> `Frame` events (`StompParser`), frames -> bytes (`encode_*`).

Responsible for framing only: commands, header lines, header value escaping per version, `content-length`
and NUL-terminated bodies, heart-beat EOLs between frames, and the size limits the spec lets a server impose
(STOMP 1.2 "Size Limits"). Which commands are allowed when, negotiation, receipts and subscriptions belong
to the session. The peer breaking the framing rules raises `StompProtocolError` (text for the ERROR frame);
misusing this API (a header that cannot be encoded) raises `ValueError`.

Must not import: asyncio or any I/O, the broker core, storage, cluster, other protocol packages.

Theory of operation of `StompParser`
------------------------------------
`feed()` appends to one buffer; `next_event()` parses at most one frame from `_pos` and returns it, or
returns `NEED_DATA` and leaves `_pos` at the start of the incomplete frame. A frame that arrives whole
costs one regex search for the end of the header block, one decode, one split, and one slice for the body.
A frame that arrives in pieces keeps its progress (`_scanned` bytes already searched, completed line
count, start of the current line, or the parsed command and headers while waiting for the body) relative
to the frame start, so each byte is searched once and limits trip as soon as they are exceeded, never
after buffering an unbounded line. `feed()` drops consumed bytes: the buffer is the fed `bytes` object
itself when nothing is left over (no copy), otherwise leftover + data; a leftover too large to copy on
every feed moves into a `bytearray` that grows in place.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, overload

__all__ = [
    "CLIENT_COMMANDS",
    "HEARTBEAT_BYTES",
    "NEED_DATA",
    "SERVER_COMMANDS",
    "SUPPORTED_VERSIONS",
    "Frame",
    "Headers",
    "NeedData",
    "StompParser",
    "StompProtocolError",
    "encode_error",
    "encode_frame",
    "encode_headers",
    "encode_message",
    "message_prefix",
]

SUPPORTED_VERSIONS: Final = ("1.0", "1.1", "1.2")

#: STOMP 1.2 "Client Frames" (STOMP is the 1.1+ alias of CONNECT).
CLIENT_COMMANDS: Final = frozenset(
    {
        "CONNECT",
        "STOMP",
        "SEND",
        "SUBSCRIBE",
        "UNSUBSCRIBE",
        "ACK",
        "NACK",
        "BEGIN",
        "COMMIT",
        "ABORT",
        "DISCONNECT",
    }
)
#: STOMP 1.2 "Server Frames" plus CONNECTED.
SERVER_COMMANDS: Final = frozenset({"CONNECTED", "MESSAGE", "RECEIPT", "ERROR"})
_KNOWN_COMMANDS: Final = CLIENT_COMMANDS | SERVER_COMMANDS

# STOMP 1.2 "Value Encoding": "The CONNECT and CONNECTED frames do not escape the carriage return, line feed
# or colon octets in order to remain backward compatible with STOMP 1.0"; STOMP is CONNECT's alias.
_VERBATIM_COMMANDS: Final = frozenset({"CONNECT", "STOMP", "CONNECTED"})

#: One EOL: what a heart-beat is on the wire (STOMP 1.2 "Heart-beating").
HEARTBEAT_BYTES: Final = b"\n"

Headers = list[tuple[str, str]]

# End of the header block: the EOL ending the last header line (or the command line) followed by an empty
# line. EOL = [CR] LF (STOMP 1.2 "Augmented BNF"). One C-level search per frame; it stops at the first match
# whichever EOL style the client uses, so parsing a buffer of many frames stays linear.
_HEADER_END: Final = re.compile(rb"\n\r?\n")
_COMMAND: Final = re.compile(r"[A-Z]+")
# What may precede the command line's LF: letters, then at most a CR.
_COMMAND_PREFIX: Final = re.compile(rb"[A-Z]*\r?")
_ESCAPE_SEQUENCE: Final = re.compile(r"\\(.?)", re.DOTALL)

# STOMP 1.1 "Value Encoding" defines \n \c \\; 1.2 adds \r. Anything else is "a fatal protocol error".
_UNESCAPE_11: Final[Mapping[str, str]] = {"n": "\n", "c": ":", "\\": "\\"}
_UNESCAPE_12: Final[Mapping[str, str]] = {"n": "\n", "c": ":", "\\": "\\", "r": "\r"}
_ESCAPE_11: Final = str.maketrans({"\\": "\\\\", "\n": "\\n", ":": "\\c"})
_ESCAPE_12: Final = str.maketrans({"\\": "\\\\", "\n": "\\n", ":": "\\c", "\r": "\\r"})

# Leftovers up to this size are copied into a fresh bytes object on feed (cheapest for the usual partial
# frame at the end of a read, and bytes slice faster than a bytearray); beyond it the buffer is a bytearray
# that grows in place, so a large frame fed in small pieces is not copied again on every feed.
_COPY_LEFTOVER_MAX: Final = 4096
_DETAIL_CHARS: Final = 80


class NeedData(enum.Enum):
    """Sentinel type of `NEED_DATA` (h11 style): the buffer holds no complete frame."""

    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


class StompProtocolError(Exception):
    """The peer broke STOMP framing. `message` is for the ERROR frame's `message` header, `detail` its body.

    STOMP 1.2 "Size Limits" and "Value Encoding": the server SHOULD send an ERROR frame and close.
    """

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message, detail)
        self.message = message
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.message}: {self.detail}" if self.detail else self.message


@dataclass(slots=True)
class Frame:
    """One STOMP frame. `headers` keeps wire order and repeated entries; `header()` returns the first,
    because "only the first header entry SHOULD be used" (STOMP 1.2 "Repeated Header Entries")."""

    command: str
    headers: Headers
    body: bytes = b""

    @overload
    def header(self, name: str) -> str | None: ...

    @overload
    def header(self, name: str, default: str) -> str: ...

    def header(self, name: str, default: str | None = None) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return default

    def header_map(self) -> dict[str, str]:
        """All headers as a dict, first occurrence winning (reversed so earlier entries overwrite later)."""
        return dict(reversed(self.headers))


def _clip(data: str | bytes | bytearray) -> str:
    text = data if isinstance(data, str) else data.decode("utf-8", "replace")
    return repr(text[:_DETAIL_CHARS] + ("..." if len(text) > _DETAIL_CHARS else ""))


class StompParser:
    """Bytes -> `Frame` events for one connection (either direction: it also parses server frames).

    `version` is set by the session once negotiated; until then "1.2" rules apply, which parse any
    version's CONNECT/STOMP/CONNECTED since those are never escaped. Bare EOLs between frames are
    heart-beats: they are skipped and counted in `heartbeats` (the session learns that bytes arrived
    from the driver anyway). After a `StompProtocolError` the parser stays broken: `next_event()` raises
    the same error again and `feed()` discards data.
    """

    __slots__ = (
        "_buf",
        "_error",
        "_line_start",
        "_lines",
        "_max_lines",
        "_pending",
        "_pos",
        "_scanned",
        "_unescape",
        "_version",
        "heartbeats",
        "max_body_size",
        "max_command_length",
        "max_frame_headers",
        "max_header_length",
    )

    def __init__(
        self,
        *,
        version: str = "1.2",
        max_frame_headers: int = 1000,
        max_header_length: int = 10240,
        max_body_size: int = 16 * 1024 * 1024,
        max_command_length: int = 64,
    ) -> None:
        self.max_frame_headers = max_frame_headers
        self.max_header_length = max_header_length
        self.max_body_size = max_body_size
        self.max_command_length = max_command_length
        # Lines in a header block: the command line plus the headers.
        self._max_lines = max_frame_headers + 1
        self.heartbeats = 0
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._error: StompProtocolError | None = None
        # Progress through an incomplete header block, relative to the frame start (see module docstring).
        self._scanned = 0
        self._lines = 0
        self._line_start = 0
        # (command, headers, content-length or -1, body offset from frame start) while the body is short.
        self._pending: tuple[str, Headers, int, int] | None = None
        self._version = "1.2"
        self._unescape: Mapping[str, str] | None = _UNESCAPE_12
        self.version = version

    @property
    def version(self) -> str:
        return self._version

    @version.setter
    def version(self, value: str) -> None:
        if value not in SUPPORTED_VERSIONS:
            raise ValueError(f"unsupported STOMP version {value!r}")
        self._version = value
        # STOMP 1.0 has no escaping: a backslash is an ordinary octet.
        self._unescape = None if value == "1.0" else _UNESCAPE_11 if value == "1.1" else _UNESCAPE_12

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as (part of) a frame."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        if self._error is not None or not data:
            return
        buf = self._buf
        pos = self._pos
        leftover = len(buf) - pos
        if leftover <= 0:
            self._buf = data
        elif leftover <= _COPY_LEFTOVER_MAX:
            self._buf = b"".join((memoryview(buf)[pos:], data))
        elif type(buf) is bytearray:
            del buf[:pos]  # O(1): CPython advances the start of a bytearray instead of moving it
            buf += data
        else:
            grown = bytearray(memoryview(buf)[pos:])
            grown += data
            self._buf = grown
        self._pos = 0

    def next_event(self) -> Frame | NeedData:
        """The next complete frame, or `NEED_DATA`. Raises `StompProtocolError` (sticky)."""
        if self._error is not None:
            raise self._error
        pending = self._pending
        if pending is not None:
            return self._resume_body(pending)
        buf = self._buf
        p = self._pos
        n = len(buf)
        if p >= n:
            return NEED_DATA
        c = buf[p]
        if c == 10 or c == 13:
            p = self._skip_heartbeats(buf, p, n)
            if p < 0:
                return NEED_DATA
        scanned = self._scanned
        match = _HEADER_END.search(buf, p + scanned - 2 if scanned > 2 else p)
        if match is None:
            return self._await_header_block(buf, p, n)
        if scanned:
            self._scanned = self._lines = self._line_start = 0
        header_end = match.start()
        body_start = match.end()

        if header_end - p > self.max_header_length:
            self._check_line_lengths(buf[p:header_end])
        try:
            text = buf[p:header_end].decode()
        except UnicodeDecodeError as exc:
            raise self._fail("Invalid frame encoding", f"header block is not UTF-8: {exc.reason}") from None
        if "\r" in text:
            # EOL = [CR] LF. RabbitMQ's parser drops the CR in every version; so do we, so 1.0/1.1 clients
            # that end lines with CRLF work too. The block stops before the last LF, hence the tail CR.
            text = text.replace("\r\n", "\n")
            if text[-1:] == "\r":
                text = text[:-1]
        lines = text.split("\n")
        command = lines[0]
        if command not in _KNOWN_COMMANDS:
            self._check_command(command)
        headers: Headers = []
        content_length = -1
        if len(lines) > 1:
            if len(lines) > self._max_lines:
                raise self._fail(
                    "Too many headers",
                    f"{command} frame has {len(lines) - 1} headers, limit {self.max_frame_headers}",
                )
            length_value: str | None = None
            append = headers.append
            for line in lines[1:]:
                name, colon, value = line.partition(":")
                if not (colon and name):
                    # header-name = 1*<any OCTET except CR or LF or ":"> (STOMP 1.2 "Augmented BNF")
                    raise self._fail(
                        "Invalid header", f"{command} frame: malformed header line {_clip(line)}"
                    )
                if name == "content-length" and length_value is None:
                    length_value = value
                append((name, value))
            unescape = self._unescape
            if unescape is not None and "\\" in text and command not in _VERBATIM_COMMANDS:
                headers = self._unescape_headers(headers, unescape, command)
            if length_value is not None:
                if length_value.isascii() and length_value.isdigit():
                    content_length = int(length_value)
                    if content_length > self.max_body_size:
                        raise self._body_too_large(command)
                else:
                    content_length = self._content_length(length_value, command)

        if content_length < 0:
            end = buf.find(b"\0", body_start)
            if end < 0:
                return self._await_body(command, headers, content_length, buf, p, body_start, n)
            if end - body_start > self.max_body_size:
                raise self._body_too_large(command)
        else:
            # STOMP 1.2 "Header content-length": read that many octets whatever they are, then a NULL.
            end = body_start + content_length
            if end >= n:
                return self._await_body(command, headers, content_length, buf, p, body_start, n)
            if buf[end]:
                raise self._unterminated(command, content_length)
        self._pos = end + 1
        body = buf[body_start:end]
        return Frame(command, headers, body if type(body) is bytes else bytes(body))

    # -- slow paths ----------------------------------------------------------------------------------------

    def _fail(self, message: str, detail: str) -> StompProtocolError:
        self._error = StompProtocolError(message, detail)
        self._buf = b""
        self._pos = 0
        return self._error

    def _skip_heartbeats(self, buf: bytes | bytearray, p: int, n: int) -> int:
        """Skip EOLs before a command (STOMP 1.2 "Heart-beating"); -1 and `_pos` set when the buffer ends."""
        beats = 0
        while p < n:
            c = buf[p]
            if c == 10:
                p += 1
            elif c == 13 and p + 1 < n and buf[p + 1] == 10:
                p += 2
            elif c == 13 and p + 1 == n:
                break  # a CR that may be half of a CRLF heart-beat
            else:
                self.heartbeats += beats
                return p  # a command starts here (a lone CR fails as an invalid command)
            beats += 1
        self.heartbeats += beats
        self._pos = p
        return -1

    def _await_header_block(self, buf: bytes | bytearray, p: int, n: int) -> NeedData:
        """No complete header block yet: enforce the limits on what has arrived, remember progress."""
        start = p + self._scanned
        if self._lines == 0:
            eol = buf.find(b"\n", start, n)
            if eol < 0:
                if not _COMMAND_PREFIX.fullmatch(buf, p, n):
                    # Fail on the first byte that cannot be part of a command (an HTTP request, a TLS hello).
                    raise self._fail("Invalid command", f"{_clip(buf[p:n])} is not a STOMP command")
                if n - p > self.max_command_length + 1:
                    raise self._fail("Command too long", f"no EOL within {self.max_command_length} bytes")
            else:
                command = buf[p:eol].decode("latin-1")
                self._check_command(command[:-1] if command[-1:] == "\r" else command)
        count = buf.count(b"\n", start, n)
        if count:
            self._lines += count
            self._line_start = buf.rfind(b"\n", start, n) + 1 - p
            if self._lines > self._max_lines:
                raise self._fail("Too many headers", f"more than {self.max_frame_headers} headers")
        if self._lines and n - p - self._line_start > self.max_header_length + 1:
            raise self._fail("Header too long", f"a header line exceeds {self.max_header_length} bytes")
        self._scanned = n - p
        self._pos = p
        return NEED_DATA

    def _check_command(self, command: str) -> None:
        if len(command) > self.max_command_length:
            raise self._fail(
                "Command too long", f"command line {_clip(command)} exceeds {self.max_command_length} bytes"
            )
        if not _COMMAND.fullmatch(command):
            raise self._fail("Invalid command", f"{_clip(command)} is not a STOMP command")

    def _check_line_lengths(self, block: bytes | bytearray) -> None:
        limit = self.max_header_length
        for line in block.split(b"\n")[1:]:
            if len(line) - line.endswith(b"\r") > limit:
                raise self._fail("Header too long", f"header line {_clip(line)} exceeds {limit} bytes")

    def _unescape_headers(self, headers: Headers, table: Mapping[str, str], command: str) -> Headers:
        try:
            return [
                (
                    _ESCAPE_SEQUENCE.sub(lambda m: table[m.group(1)], name) if "\\" in name else name,
                    _ESCAPE_SEQUENCE.sub(lambda m: table[m.group(1)], value) if "\\" in value else value,
                )
                for name, value in headers
            ]
        except KeyError as exc:
            sequence = "\\" + str(exc.args[0])
            raise self._fail(
                "Invalid header escape",
                f"{command} frame: undefined escape sequence {sequence!r} in STOMP {self._version}",
            ) from None

    def _content_length(self, value: str, command: str) -> int:
        """A content-length that is not plain digits: tolerate surrounding whitespace (as RabbitMQ does)."""
        digits = value.strip()
        if not (digits.isascii() and digits.isdigit()):
            raise self._fail("Invalid content-length", f"{command} frame: content-length {_clip(value)}")
        length = int(digits)
        if length > self.max_body_size:
            raise self._body_too_large(command)
        return length

    def _body_too_large(self, command: str) -> StompProtocolError:
        return self._fail("Body too large", f"{command} frame body exceeds {self.max_body_size} bytes")

    def _unterminated(self, command: str, length: int) -> StompProtocolError:
        return self._fail(
            "Frame not terminated", f"{command} frame: no NULL octet after content-length {length}"
        )

    def _await_body(
        self,
        command: str,
        headers: Headers,
        content_length: int,
        buf: bytes | bytearray,
        p: int,
        body_start: int,
        n: int,
    ) -> NeedData:
        if content_length < 0 and n - body_start > self.max_body_size:
            raise self._body_too_large(command)
        self._pending = (command, headers, content_length, body_start - p)
        self._scanned = n - p
        self._pos = p
        return NEED_DATA

    def _resume_body(self, pending: tuple[str, Headers, int, int]) -> Frame | NeedData:
        command, headers, content_length, body_offset = pending
        buf = self._buf
        p = self._pos
        n = len(buf)
        body_start = p + body_offset
        if content_length < 0:
            end = buf.find(b"\0", p + self._scanned, n)
            if end < 0:
                if n - body_start > self.max_body_size:
                    raise self._body_too_large(command)
                self._scanned = n - p
                return NEED_DATA
            if end - body_start > self.max_body_size:
                raise self._body_too_large(command)
        else:
            end = body_start + content_length
            if end >= n:
                return NEED_DATA
            if buf[end]:
                raise self._unterminated(command, content_length)
        self._pending = None
        self._scanned = 0
        self._pos = end + 1
        return Frame(command, headers, bytes(buf[body_start:end]))


# -- encoding ------------------------------------------------------------------------------------------------


def _escape(text: str, table: dict[int, str]) -> str:
    if "\\" in text or "\n" in text or ":" in text or "\r" in text:
        return text.translate(table)
    return text


def _check_verbatim(name: str, value: str) -> None:
    """CONNECT/CONNECTED and all of STOMP 1.0 carry headers unescaped: refuse what would break the frame."""
    if not name or ":" in name or "\n" in name or "\r" in name:
        raise ValueError(f"header name {name!r} cannot be sent unescaped")
    if "\n" in value or "\r" in value:
        raise ValueError(f"header {name!r}: value {value!r} cannot be sent unescaped")


def _header_lines(headers: Headers | Mapping[str, str], version: str, verbatim: bool) -> list[str]:
    items: Iterable[tuple[str, str]] = headers.items() if isinstance(headers, Mapping) else headers
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"unsupported STOMP version {version!r}")
    parts: list[str] = []
    if verbatim or version == "1.0":
        for name, value in items:
            _check_verbatim(name, value)
            parts += (name, ":", value, "\n")
        return parts
    # STOMP 1.1 cannot express CR: it stays a raw octet (legal inside a 1.1 value).
    table = _ESCAPE_12 if version == "1.2" else _ESCAPE_11
    for name, value in items:
        if not name:
            raise ValueError("empty header name")
        parts += (_escape(name, table), ":", _escape(value, table), "\n")
    return parts


def encode_headers(headers: Headers | Mapping[str, str], version: str = "1.2") -> bytes:
    """Escaped `name:value\\n` lines for any frame but CONNECT/STOMP/CONNECTED (for `encode_message`)."""
    return "".join(_header_lines(headers, version, verbatim=False)).encode()


def encode_frame(
    command: str,
    headers: Headers | Mapping[str, str],
    body: bytes = b"",
    version: str = "1.2",
) -> bytes:
    """One frame. Adds `content-length` when there is a body and the caller gave none (STOMP 1.2 "Header
    content-length": frames SHOULD carry it; a body containing NUL needs it); a given one must match."""
    parts = _header_lines(headers, version, verbatim=command in _VERBATIM_COMMANDS)
    length = str(len(body))
    for i in range(0, len(parts), 4):
        if parts[i] == "content-length":
            if parts[i + 2] != length:
                raise ValueError(f"content-length {parts[i + 2]!r} does not match a body of {length} bytes")
            break
    else:
        if body:
            parts += ("content-length:", length, "\n")
    return b"".join((command.encode(), b"\n", "".join(parts).encode(), b"\n", body, b"\0"))


def message_prefix(headers: Headers | Mapping[str, str], version: str = "1.2") -> bytes:
    """`MESSAGE\\n` + escaped header lines constant for a subscription (e.g. `subscription`), built once."""
    return b"MESSAGE\n" + encode_headers(headers, version)


def encode_message(prefix: bytes, headers: bytes, body: bytes, delivery_headers: bytes = b"") -> bytes:
    """The delivery hot path: one MESSAGE frame from pre-encoded parts with a single join.

    `prefix` from `message_prefix()` (per subscription), `headers` from `encode_headers()` (per message,
    shareable by every subscriber: destination, message-id, properties), `delivery_headers` for lines that
    differ per delivery (the 1.2 `ack` id). `content-length` is always sent, so bodies may contain NUL;
    the header blocks must therefore not contain one.
    """
    return b"".join((prefix, headers, delivery_headers, b"content-length:%d\n\n" % len(body), body, b"\0"))


def encode_error(
    message: str, detail: str = "", version: str = "1.2", receipt_id: str | None = None
) -> bytes:
    """An ERROR frame for `StompProtocolError(message, detail)` (STOMP 1.2 "ERROR")."""
    if version == "1.0":
        message = message.replace("\r", " ").replace("\n", " ")
    headers: Headers = [("message", message)]
    if receipt_id is not None:
        headers.append(("receipt-id", receipt_id))
    if detail:
        headers.append(("content-type", "text/plain"))
    return encode_frame("ERROR", headers, detail.encode(), version)
