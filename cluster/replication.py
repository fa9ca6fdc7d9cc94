"""Replication of the store's journal from the active node to the standby.

`ReplicatedStore` wraps the active node's `Store` and implements the same port, so the core never
knows it is replicated (like Artemis's ReplicatedJournal, docs/architecture.md): every record goes to the
inner store and, in order, to the standby. `ReplicationReceiver` is the standby's side: it
applies the records to the standby's own store and acknowledges them once they are durable there.

Theory of operation
-------------------
Sequence numbers. The active numbers the records it appends 1, 2, 3, ... (per period of activity,
i.e. per lease epoch). A standby that connects first receives a snapshot of the store taken at
the current number S (the records that rebuild exactly what `open()` would recover at S), then
the records S+1, S+2, ... in RECORDS frames that carry the epoch and the first number. The
standby acknowledges a number once everything up to it is durable in its store.

Confirmation (`when_durable`). A callback registered after record S fires once the inner store
has S durable and, unless the active runs alone, the standby acknowledged S. The sync state:

    WAITING --standby caught up and acked S--> IN_SYNC --link lost / silent--> WAITING
    WAITING --no standby in sync for sync_timeout--> ALONE --standby caught up--> IN_SYNC
    any --lease lapsed / higher epoch seen--> FENCED (refuses writes, never confirms again)

A node starts WAITING: confirmations are held until a standby is in sync or `sync_timeout`
passes. A standby counts as gone when its link closes, when it is silent for `sync_timeout`
(the active pings it), or when it acknowledges nothing for `sync_timeout` while behind (its disk
hangs); a gone standby is dropped and reconnected with a new snapshot. Before going ALONE the
active calls `before_alone` (the node records in the lease that no standby is in sync), so a
standby never takes over from an active that confirmed without it.

Fencing. The active's lease is valid until a monotonic deadline (`extend_lease`). `append`,
`when_durable` and every confirmation check it first, so a node resumed after SIGSTOP refuses the
first write it sees and confirms nothing, before its lease task even runs. A standby that knows
a higher epoch refuses the link (REFUSE stale-epoch), which fences the active too.

Wire format (one TCP or TLS connection, opened by the active to the standby's listener):
frame = u32 payload length, u8 type, payload (big-endian integers). Handshake: HELLO (version,
epoch, nonce_a, active id) -> CHALLENGE (nonce_b, HMAC-SHA256(secret, "standby" + transcript),
standby id) -> AUTH (HMAC-SHA256(secret, "active" + transcript)) -> ACCEPT or REFUSE (code,
epoch, reason). Each side proves it knows the shared secret before the other acts on anything,
so a stranger can neither receive records nor fence the active with a forged REFUSE. Then:
SNAPSHOT_BEGIN(S), SNAPSHOT(records)*, SNAPSHOT_END(S, next_msg_id), RECORDS(epoch, first seq,
records)*, PING(epoch, last seq) from the active; ACK(seq) (first S, once the snapshot is durable)
and PONG from the standby. A record is `storage.serial.encode_record`'s bytes, length-prefixed
(u32).

Snapshots need the store's state at one exact point of the journal while it keeps being
written: the Store port's `snapshot()` gives it, whatever the backend.

Must not import: protocols, broker.core.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import logging
import math
import secrets
import ssl
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, NoReturn, cast

from broker.journal import (
    BindingRemoved,
    ExchangeDeleted,
    MessageEnqueued,
    QueueDeleted,
    Record,
    Recovered,
    RetainedCleared,
    SessionDeleted,
    Snapshot,
    Store,
    StoreError,
)
from broker.message import Message
from cluster.lease import monotonic_clock
from storage.serial import SerialError, decode_record, encode_record

log = logging.getLogger("polybroker.cluster.replication")

PROTOCOL_VERSION: Final = 1
NONCE_SIZE: Final = 32
MAC_SIZE: Final = 32

#: Soft size of a RECORDS or SNAPSHOT frame (a bigger record goes alone in its frame).
FRAME_TARGET_BYTES: Final = 1 << 20
#: The standby pauses reading while its store has this many bytes not yet durable.
STANDBY_HIGH_WATER_BYTES: Final = 64 << 20
#: Frames a standby buffers while it resets its store before it stops reading.
STANDBY_INBOX_FRAMES: Final = 64

_HEAD = struct.Struct("!IB")  # payload length, frame type
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_HELLO = struct.Struct(f"!BQ{NONCE_SIZE}s")  # version, epoch, nonce_a (+ active id)
_CHALLENGE = struct.Struct(f"!{NONCE_SIZE}s{MAC_SIZE}s")  # nonce_b, mac (+ standby id)
_REFUSE = struct.Struct("!BQ")  # code, epoch (+ reason)
_RECORDS = struct.Struct("!QQI")  # epoch, first seq, count (+ records)
_SNAPSHOT_END = struct.Struct("!QQ")  # seq, next msg id
_PING = struct.Struct("!QQ")  # epoch, active's last seq
_TRANSCRIPT_TAG: Final = b"polybroker-ha/1\0"


class FrameType(enum.IntEnum):
    HELLO = 1
    CHALLENGE = 2
    AUTH = 3
    ACCEPT = 4
    REFUSE = 5
    SNAPSHOT_BEGIN = 6
    SNAPSHOT = 7
    SNAPSHOT_END = 8
    RECORDS = 9
    ACK = 10
    PING = 11
    PONG = 12


class RefuseCode(enum.IntEnum):
    AUTHENTICATION = 1
    STALE_EPOCH = 2
    NOT_STANDBY = 3
    PROTOCOL = 4


class LinkError(Exception):
    """The peer broke the replication protocol (the message says how)."""


# --- Frames (sans-I/O) ----------------------------------------------------------------------------


class LinkCodec:
    """Bytes -> frames of the replication link: `feed(data)` returns the frames completed so far.

    A frame longer than `max_frame` or of an unknown type raises LinkError (the link is closed).
    """

    def __init__(self, max_frame: int) -> None:
        self._buffer = bytearray()
        self._max_frame = max_frame

    def feed(self, data: bytes) -> list[tuple[FrameType, bytes]]:
        buffer = self._buffer
        buffer += data
        frames: list[tuple[FrameType, bytes]] = []
        off = 0
        size = len(buffer)
        while size - off >= _HEAD.size:
            length, kind = _HEAD.unpack_from(buffer, off)
            if length > self._max_frame:
                raise LinkError(f"frame of {length} bytes exceeds the limit of {self._max_frame}")
            end = off + _HEAD.size + length
            if end > size:
                break
            try:
                frame_type = FrameType(kind)
            except ValueError:
                raise LinkError(f"unknown frame type {kind}") from None
            frames.append((frame_type, bytes(buffer[off + _HEAD.size : end])))
            off = end
        if off:
            del buffer[:off]
        return frames


def encode_frame(frame_type: FrameType, payload: bytes = b"") -> bytes:
    return _HEAD.pack(len(payload), frame_type) + payload


def _records_frame(head: bytes, records: Sequence[bytes], frame_type: FrameType) -> list[bytes]:
    """One frame: `head`, then each encoded record length-prefixed (bytes.join'ed by the caller)."""
    parts = [b"", head]
    size = len(head)
    for data in records:
        parts += (_U32.pack(len(data)), data)
        size += 4 + len(data)
    parts[0] = _HEAD.pack(size, frame_type)
    return parts


def decode_records(payload: bytes, off: int, count: int) -> list[Record]:
    """`count` length-prefixed records from payload[off:], which they must fill exactly."""
    records: list[Record] = []
    size = len(payload)
    for index in range(count):
        if off + 4 > size:
            raise LinkError(f"record {index}: truncated length")
        (length,) = _U32.unpack_from(payload, off)
        off += 4
        end = off + length
        if end > size:
            raise LinkError(f"record {index}: {length} bytes exceed the frame")
        try:
            records.append(decode_record(payload[off:end]))
        except SerialError as exc:
            raise LinkError(f"record {index}: {exc}") from None
        off = end
    if off != size:
        raise LinkError(f"{size - off} bytes after the last record")
    return records


def _transcript(epoch: int, nonce_a: bytes, nonce_b: bytes, active_id: str, standby_id: str) -> bytes:
    a = active_id.encode()
    b = standby_id.encode()
    return b"".join(
        (_TRANSCRIPT_TAG, _U64.pack(epoch), nonce_a, nonce_b, _U32.pack(len(a)), a, _U32.pack(len(b)), b)
    )


def _mac(secret: bytes, role: bytes, transcript: bytes) -> bytes:
    return hmac.new(secret, role + transcript, hashlib.sha256).digest()


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise LinkError(f"{what}: invalid UTF-8") from None


# --- Settings -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkTls:
    """TLS for the replication link: the standby listens with `server`, the active dials with
    `client`. Both sides should present a certificate and verify the other's against the pair's
    CA (mutual TLS); the HMAC handshake runs inside it either way."""

    server: ssl.SSLContext
    client: ssl.SSLContext

    @classmethod
    def from_files(cls, cert_file: str, key_file: str, ca_file: str) -> LinkTls:
        """Mutual TLS with one certificate per node, both signed by `ca_file`. Each node's
        certificate serves as server and as client certificate, so its extended key usage must
        allow both (or be absent). Host names are not checked: the pair's own CA is the trust
        anchor (the peer is reached by address)."""
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(cert_file, key_file)
        server.load_verify_locations(ca_file)
        server.verify_mode = ssl.CERT_REQUIRED
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.load_cert_chain(cert_file, key_file)
        client.load_verify_locations(ca_file)
        client.check_hostname = False
        client.verify_mode = ssl.CERT_REQUIRED
        return cls(server, client)


@dataclass(frozen=True, slots=True)
class ReplicationSettings:
    """What both ends of the link need. `secret` is the shared secret of the HMAC handshake."""

    node_id: str
    secret: bytes
    sync_timeout: float = 5.0
    tls: LinkTls | None = None
    max_frame: int = 64 << 20  # must exceed the largest record (a message body plus its metadata)
    max_backlog_bytes: int = 256 << 20  # records buffered for a catching-up standby before giving up
    ping_interval: float = 0.0  # 0: derived from sync_timeout

    @property
    def ping_every(self) -> float:
        return self.ping_interval or min(1.0, self.sync_timeout / 4)


# --- Snapshots ------------------------------------------------------------------------------------


def snapshot_batch(snapshot: Snapshot, max_bytes: int = FRAME_TARGET_BYTES) -> list[bytes] | None:
    """The snapshot's next records, encoded (about `max_bytes`), or None at the end.

    When `snapshot.blocking` is True this does I/O: call it from a worker thread (one call at a time).
    """
    batch: list[bytes] = []
    size = 0
    for record in snapshot.records:
        data = encode_record(record)
        batch.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    return batch or None


def clear_records(recovered: Recovered) -> list[Record]:
    """Records that empty a store whose state is `recovered` (a standby's, before a snapshot)."""
    records: list[Record] = [SessionDeleted(s.vhost, s.client_id) for s in recovered.sessions]
    records += [RetainedCleared(r.vhost, r.topic) for r in recovered.retained]
    records += [
        BindingRemoved(
            b.vhost, b.source, b.destination, b.destination_is_exchange, b.routing_key, b.arguments
        )
        for b in recovered.bindings
    ]
    queues = {(q.vhost, q.name): None for q in recovered.queues}
    queues.update(dict.fromkeys(recovered.queue_messages))
    records += [QueueDeleted(vhost, name) for vhost, name in queues]
    records += [ExchangeDeleted(e.vhost, e.name) for e in recovered.exchanges]
    return records


def high_water_record(next_msg_id: int) -> MessageEnqueued:
    """A MessageEnqueued for no queue that raises a store's next_msg_id to `next_msg_id`.

    The snapshot cannot carry ids of messages that were acknowledged and deleted, yet ids must
    never be reused (Recovered.next_msg_id). A store records the high-water mark of every enqueue,
    even of one with no queue, and keeps nothing else for it.
    """
    return MessageEnqueued("", (), Message("", "", b"", msg_id=next_msg_id - 1), True)


# --- The active's side ----------------------------------------------------------------------------


class SyncState(enum.Enum):
    WAITING = "waiting"  # no standby in sync: confirmations wait for one, up to sync_timeout
    IN_SYNC = "in_sync"  # the standby has every record up to its last ack
    ALONE = "alone"  # no standby in sync for sync_timeout: confirming on local durability
    FENCED = "fenced"  # the lease is lost: writes are refused, nothing is confirmed any more


class LinkState(enum.Enum):
    DOWN = "down"
    CONNECTING = "connecting"
    HANDSHAKE = "handshake"
    CATCHING_UP = "catching_up"  # the snapshot is on its way
    STREAMING = "streaming"


@dataclass(frozen=True, slots=True)
class ReplicationStatus:
    """The active's view of replication (for `polybroker ha status` and metrics)."""

    sync: SyncState
    link: LinkState
    epoch: int
    standby: str  # peer id of the connected standby, "" if none
    seq: int  # records appended in this epoch
    acked: int  # highest sequence number the standby has durable
    lag_records: int  # appended but not acknowledged by the standby
    lag_bytes: int  # buffered or in flight towards the standby
    last_error: str


class ReplicatedStore(Store):
    """A Store that also streams every record to the standby; see the module docstring.

    Use on one event loop: `open()` must run on the loop's thread while it runs (it starts the
    link). Callbacks of the inner store must be scheduled on that loop too.
    """

    def __init__(
        self,
        inner: Store,
        settings: ReplicationSettings,
        *,
        epoch: int,
        peer: tuple[str, int],
        lease_deadline: float,
        clock: Callable[[], float] = monotonic_clock,
        on_fenced: Callable[[str], None] | None = None,
        before_alone: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._inner = inner
        self._settings = settings
        self.epoch = epoch
        self._peer = peer
        self._lease_deadline = lease_deadline
        self._clock = clock
        self._on_fenced = on_fenced
        self._before_alone = before_alone
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._lease_timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._state = SyncState.WAITING
        self._wait_deadline = 0.0
        self._going_alone = False
        self._fence_reason = ""
        self._synced_standby = ""
        self._last_error = ""
        # Sequence numbers: appended, handed to the link, acknowledged, durable in the inner store.
        self._seq = 0
        self._sent_seq = 0
        self._acked = 0
        self._inner_durable = 0
        # (seq, callback) waiting for confirmation; the seq of each inner when_durable in order.
        self._waiting: deque[tuple[int, Callable[[], None]]] = deque()
        self._inner_marks: deque[int] = deque()
        self._acked_event = asyncio.Event()
        # The link and what it has not yet sent / not yet seen acknowledged.
        self._link: _ActiveLink | None = None
        self._collecting = False  # a standby is connected: records go to the outbox
        self._outbox: list[bytes] = []
        self._outbox_bytes = 0
        self._flush_scheduled = False
        self._inflight: deque[tuple[int, int]] = deque()  # (last seq of a write, its bytes)
        self._inflight_bytes = 0

    # --- the Store port ---------------------------------------------------------------------------

    def open(self) -> Recovered:
        recovered = self._inner.open()
        self._loop = asyncio.get_running_loop()
        self._wait_deadline = self._clock() + self._settings.sync_timeout
        self._spawn(self._connect_loop())
        self._spawn(self._watchdog())
        self._arm_lease_timer()
        return recovered

    def append(self, record: Record) -> None:
        if self._clock() >= self._lease_deadline or self._state is SyncState.FENCED:
            self._refuse()
        if self._collecting:
            data = encode_record(record)
            self._inner.append(record)
            self._outbox.append(data)
            self._outbox_bytes += len(data)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                assert self._loop is not None
                self._loop.call_soon(self._flush)
        else:
            self._inner.append(record)
        self._seq += 1

    def when_durable(self, callback: Callable[[], None]) -> None:
        if self._clock() >= self._lease_deadline or self._state is SyncState.FENCED:
            self._refuse()
        seq = self._seq
        self._inner_marks.append(seq)
        self._waiting.append((seq, callback))
        try:
            self._inner.when_durable(self._on_inner_durable)
        except BaseException:
            self._inner_marks.pop()
            self._waiting.pop()
            raise

    def load_messages(self, msg_ids: Sequence[int]) -> list[Message]:
        return self._inner.load_messages(msg_ids)

    def snapshot(self) -> Snapshot:
        return self._inner.snapshot()

    @property
    def pending_bytes(self) -> int:
        # A slow standby pushes back on publishers like a slow disk does.
        return self._inner.pending_bytes + self._outbox_bytes + self._inflight_bytes

    def flush(self) -> None:
        """Block until everything appended is durable in the inner store (the standby's acks
        arrive on the event loop, which a blocking call would stall; see `drain`)."""
        self._inner.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                self._teardown()
            else:
                loop.call_soon_threadsafe(self._teardown)
        self._inner.close()

    # --- control and status (event loop thread) --------------------------------------------------

    @property
    def sync_state(self) -> SyncState:
        return self._state

    @property
    def synced_standby(self) -> str:
        """The peer id of the standby that has every confirmed record, "" when there is none (to be
        written in the lease at each renewal)."""
        return self._synced_standby

    @property
    def fence_reason(self) -> str:
        return self._fence_reason

    def extend_lease(self, deadline: float) -> None:
        """The lease was renewed: it is valid until `deadline` (monotonic clock)."""
        if deadline > self._lease_deadline:
            self._lease_deadline = deadline
            self._arm_lease_timer()

    def fence(self, reason: str) -> None:
        """Stop at once: refuse every write from now on and never confirm anything again."""
        if self._state is SyncState.FENCED:
            return
        self._state = SyncState.FENCED
        self._fence_reason = reason
        self._synced_standby = ""
        log.error("fenced at epoch %d: %s; refusing writes", self.epoch, reason)
        self._waiting.clear()
        if self._lease_timer is not None:
            self._lease_timer.cancel()
            self._lease_timer = None
        self._collecting = False
        self._outbox = []
        self._outbox_bytes = 0
        link = self._link
        if link is not None:
            link.abort("fenced")
        if self._on_fenced is not None:
            self._on_fenced(reason)

    async def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` s until the standby acknowledged every record appended so far
        (a clean switchover). Returns False if it did not, or if no standby is in sync."""
        loop = asyncio.get_running_loop()
        target = self._seq
        deadline = loop.time() + timeout
        while self._acked < target:
            remaining = deadline - loop.time()
            if self._state is not SyncState.IN_SYNC or remaining <= 0:
                return False
            self._acked_event.clear()
            try:
                await asyncio.wait_for(self._acked_event.wait(), remaining)
            except TimeoutError:
                return False
        return True

    def status(self) -> ReplicationStatus:
        link = self._link
        return ReplicationStatus(
            sync=self._state,
            link=link.state if link is not None else LinkState.DOWN,
            epoch=self.epoch,
            standby=link.standby if link is not None else "",
            seq=self._seq,
            acked=self._acked,
            lag_records=self._seq - self._acked,
            lag_bytes=self._outbox_bytes + self._inflight_bytes,
            last_error=self._last_error,
        )

    # --- confirmations ----------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _arm_lease_timer(self) -> None:
        # Fence at the deadline itself, even with no write to notice it (the watchdog is coarser).
        if self._lease_timer is not None:
            self._lease_timer.cancel()
            self._lease_timer = None
        loop = self._loop
        if (
            loop is None
            or self._closed
            or self._state is SyncState.FENCED
            or math.isinf(self._lease_deadline)
        ):
            return
        self._lease_timer = loop.call_later(max(0.0, self._lease_deadline - self._clock()), self._lease_check)

    def _lease_check(self) -> None:
        self._lease_timer = None
        if self._closed or self._state is SyncState.FENCED:
            return
        if self._clock() >= self._lease_deadline:
            self.fence(f"the lease of epoch {self.epoch} lapsed (not renewed in time)")
        else:
            self._arm_lease_timer()

    def _refuse(self) -> NoReturn:
        if self._state is not SyncState.FENCED:
            self.fence(f"the lease of epoch {self.epoch} lapsed (not renewed in time)")
        raise StoreError(f"this node is fenced ({self._fence_reason}): it accepts no writes")

    def _on_inner_durable(self) -> None:
        self._inner_durable = self._inner_marks.popleft()
        self._release()

    def _release(self) -> None:
        if self._state is SyncState.FENCED:
            return
        if self._clock() >= self._lease_deadline:
            self.fence(f"the lease of epoch {self.epoch} lapsed (not renewed in time)")
            return
        limit = self._inner_durable
        if self._state is not SyncState.ALONE and self._acked < limit:
            limit = self._acked
        waiting = self._waiting
        while waiting and waiting[0][0] <= limit:
            callback = waiting.popleft()[1]
            try:
                callback()
            except Exception:
                log.exception("when_durable callback %r failed", callback)

    # --- the link ---------------------------------------------------------------------------------

    async def _connect_loop(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self._peer
        tls = self._settings.tls
        backoff = 0.05
        while not self._closed and self._state is not SyncState.FENCED:
            try:
                _, link = await asyncio.wait_for(
                    loop.create_connection(
                        partial(_ActiveLink, self), host, port, ssl=tls.client if tls else None
                    ),
                    self._settings.sync_timeout,
                )
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                self._note_error(
                    f"cannot connect to the standby at {host}:{port}: {exc or type(exc).__name__}"
                )
                await asyncio.sleep(backoff)  # reconnection back-off
                backoff = min(backoff * 2, self._settings.ping_every)
                continue
            await link.closed
            if link.accepted:
                backoff = 0.05
            else:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._settings.ping_every)

    def _note_error(self, error: str) -> None:
        if error != self._last_error:
            log.warning("%s", error)
        self._last_error = error

    async def _watchdog(self) -> None:
        tick = min(0.1, self._settings.sync_timeout / 10)
        ping_every = self._settings.ping_every
        sync_timeout = self._settings.sync_timeout
        while not self._closed and self._state is not SyncState.FENCED:
            await asyncio.sleep(tick)  # periodic check
            now = self._clock()
            if now >= self._lease_deadline:
                self.fence(f"the lease of epoch {self.epoch} lapsed (not renewed in time)")
                return
            link = self._link
            if link is not None:
                if link.accepted and now - link.last_ping >= ping_every:
                    link.last_ping = now
                    link.write(encode_frame(FrameType.PING, _PING.pack(self.epoch, self._seq)))
                # A standby busy applying a snapshot may be silent for a while; a streaming one not.
                limit = sync_timeout if link.state is not LinkState.CATCHING_UP else 10 * sync_timeout
                if now - link.last_heard > limit:
                    link.abort(f"no answer from the standby for {limit:g} s")
                elif (
                    link.state is LinkState.STREAMING
                    and self._acked < self._sent_seq
                    and now - link.last_progress > sync_timeout
                ):
                    # Alive but not acknowledging (its disk hangs): as good as gone.
                    link.abort(f"the standby acknowledged nothing for {sync_timeout:g} s")
            if self._state is SyncState.WAITING and now >= self._wait_deadline and not self._going_alone:
                self._going_alone = True
                self._spawn(self._go_alone())

    async def _go_alone(self) -> None:
        # Record in the lease that no standby is in sync *before* confirming anything without one.
        self._synced_standby = ""
        try:
            if self._before_alone is not None:
                await self._before_alone()
        except Exception as exc:
            self.fence(f"cannot record that the standby is out of sync: {exc}")
            return
        finally:
            self._going_alone = False
        if self._state is SyncState.WAITING:
            self._state = SyncState.ALONE
            log.warning(
                "no standby in sync for %g s: confirming without it (not in sync)",
                self._settings.sync_timeout,
            )
            self._release()

    def _teardown(self) -> None:
        if self._lease_timer is not None:
            self._lease_timer.cancel()
            self._lease_timer = None
        for task in list(self._tasks):
            task.cancel()
        link = self._link
        if link is not None:
            link.abort("closing")

    def _link_made(self, link: _ActiveLink) -> None:
        self._link = link

    def _link_accepted(self, link: _ActiveLink) -> None:
        seq = self._seq
        try:
            snapshot = self._inner.snapshot()
        except StoreError as exc:
            link.abort(f"cannot snapshot the store: {exc}")
            return
        link.state = LinkState.CATCHING_UP
        link.snapshot_seq = seq
        self._collecting = True
        self._outbox = []
        self._outbox_bytes = 0
        self._sent_seq = seq
        self._inflight.clear()
        self._inflight_bytes = 0
        log.info("standby %s connected: sending a snapshot at seq %d", link.standby, seq)
        link.write(encode_frame(FrameType.SNAPSHOT_BEGIN, _U64.pack(seq)))
        self._spawn(self._send_snapshot(link, snapshot, seq))

    async def _send_snapshot(self, link: _ActiveLink, snapshot: Snapshot, seq: int) -> None:
        loop = asyncio.get_running_loop()
        pending: asyncio.Future[list[bytes] | None] | None = None
        try:
            while link is self._link:
                if snapshot.blocking:
                    pending = loop.run_in_executor(None, snapshot_batch, snapshot)
                    # shield: if this task is cancelled the read goes on; `finally` closes after it.
                    batch = await asyncio.shield(pending)
                    pending = None
                else:
                    batch = snapshot_batch(snapshot)
                if batch is None:
                    break
                link.write(b"".join(_records_frame(_U32.pack(len(batch)), batch, FrameType.SNAPSHOT)))
                await link.drain()
            else:
                return
            link.write(encode_frame(FrameType.SNAPSHOT_END, _SNAPSHOT_END.pack(seq, snapshot.next_msg_id)))
            link.state = LinkState.STREAMING
            self._flush()
        except StoreError as exc:
            link.abort(f"cannot snapshot the store: {exc}")
        finally:
            if pending is not None and not pending.done():
                pending.add_done_callback(lambda _: snapshot.close())
            else:
                snapshot.close()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._outbox_bytes > self._settings.max_backlog_bytes and self._link is not None:
            self._link.abort(
                f"the standby is {self._outbox_bytes >> 20} MiB behind (max_backlog_bytes): resynchronising"
            )
            return
        link = self._link
        outbox = self._outbox
        if link is None or link.state is not LinkState.STREAMING or link.paused or not outbox:
            return
        self._outbox = []
        nbytes = self._outbox_bytes
        self._outbox_bytes = 0
        if self._acked >= self._sent_seq:
            link.last_progress = self._clock()  # the standby was up to date: time its ack from now
        first = self._sent_seq + 1
        parts: list[bytes] = []
        start = 0
        count = len(outbox)
        epoch = self.epoch
        while start < count:
            end = start + 1
            size = len(outbox[start])
            while end < count and size + len(outbox[end]) <= FRAME_TARGET_BYTES:
                size += len(outbox[end])
                end += 1
            head = _RECORDS.pack(epoch, first + start, end - start)
            parts += _records_frame(head, outbox[start:end], FrameType.RECORDS)
            start = end
        link.write(b"".join(parts))
        self._sent_seq += count
        self._inflight.append((self._sent_seq, nbytes))
        self._inflight_bytes += nbytes

    def _link_resumed(self) -> None:
        self._flush()

    def _on_ack(self, link: _ActiveLink, seq: int) -> None:
        # The standby's first ack is the snapshot's seq, sent once the snapshot is durable there.
        if not link.snapshot_seq <= seq <= self._sent_seq or link.state is not LinkState.STREAMING:
            raise LinkError(f"ack of seq {seq} (snapshot at {link.snapshot_seq}, last sent {self._sent_seq})")
        if seq > self._acked:
            self._acked = seq
            link.last_progress = link.last_heard
            inflight = self._inflight
            while inflight and inflight[0][0] <= seq:
                self._inflight_bytes -= inflight.popleft()[1]
        if self._state is SyncState.WAITING or self._state is SyncState.ALONE:
            self._state = SyncState.IN_SYNC
            self._synced_standby = link.standby
            log.info("standby %s is in sync (seq %d, epoch %d)", link.standby, seq, self.epoch)
        self._acked_event.set()
        self._release()

    def _on_refuse(self, link: _ActiveLink, code: int, epoch: int, reason: str) -> None:
        # Only an authenticated standby's refusal gets here (see _ActiveLink._handle).
        if code == RefuseCode.STALE_EPOCH and epoch > self.epoch:
            link.abort(f"refused: {reason}")
            self.fence(f"the standby knows a newer epoch ({epoch} > {self.epoch})")
        else:
            link.abort(f"the standby refused the link: {reason}")

    def _link_lost(self, link: _ActiveLink, reason: str) -> None:
        if link is not self._link:
            return
        self._link = None
        # Since when the standby has been of no use: silent, or (if behind) not acknowledging.
        useless_since = link.last_heard
        if self._acked < self._sent_seq:
            useless_since = min(useless_since, link.last_progress)
        self._collecting = False
        self._outbox = []
        self._outbox_bytes = 0
        self._inflight.clear()
        self._inflight_bytes = 0
        if link.accepted and not self._closed:
            self._note_error(f"replication link to {link.standby or 'the standby'} lost: {reason}")
        if self._state is SyncState.IN_SYNC:
            # Confirmations wait for the standby to come back until sync_timeout after it was last
            # of use; a silent or stuck standby was already waited for.
            self._state = SyncState.WAITING
            self._wait_deadline = useless_since + self._settings.sync_timeout


class _ActiveLink(asyncio.Protocol):
    """The active's end of one connection to the standby (owns the transport)."""

    def __init__(self, owner: ReplicatedStore) -> None:
        self._owner = owner
        self._codec = LinkCodec(owner._settings.max_frame)
        self._secret = owner._settings.secret
        self._node_id = owner._settings.node_id
        self._nonce = secrets.token_bytes(NONCE_SIZE)
        self._transport: asyncio.Transport | None = None
        self._peer_verified = False  # the standby proved it knows the secret
        self._resumed: asyncio.Future[None] | None = None
        self.state = LinkState.HANDSHAKE
        self.accepted = False
        self.standby = ""
        self.snapshot_seq = 0
        self.paused = False
        self.last_heard = owner._clock()
        self.last_ping = self.last_progress = self.last_heard
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports (the server installs uvloop) are not asyncio.Transport subclasses.
        self._transport = cast(asyncio.Transport, transport)
        self._owner._link_made(self)
        hello = _HELLO.pack(PROTOCOL_VERSION, self._owner.epoch, self._nonce) + self._node_id.encode()
        self._transport.write(encode_frame(FrameType.HELLO, hello))

    def data_received(self, data: bytes) -> None:
        try:
            for frame_type, payload in self._codec.feed(data):
                self.last_heard = self._owner._clock()
                self._handle(frame_type, payload)
                if self._transport is None or self._transport.is_closing():
                    return
        except (LinkError, struct.error) as exc:
            self.abort(f"protocol error from the standby: {exc}")

    def _handle(self, frame_type: FrameType, payload: bytes) -> None:
        if frame_type is FrameType.ACK:
            (seq,) = _U64.unpack(payload)
            self._owner._on_ack(self, seq)
        elif frame_type is FrameType.PONG and self.accepted:
            pass  # liveness only: last_heard is updated for every frame
        elif frame_type is FrameType.CHALLENGE and not self._peer_verified:
            nonce_b, mac = _CHALLENGE.unpack_from(payload)
            standby = _text(payload[_CHALLENGE.size :], "standby id")
            transcript = _transcript(self._owner.epoch, self._nonce, nonce_b, self._node_id, standby)
            if not hmac.compare_digest(mac, _mac(self._secret, b"standby", transcript)):
                raise LinkError("the standby failed authentication (is the shared secret the same?)")
            self._peer_verified = True
            self.standby = standby
            self.write(encode_frame(FrameType.AUTH, _mac(self._secret, b"active", transcript)))
        elif frame_type is FrameType.ACCEPT and self._peer_verified and not self.accepted:
            self.accepted = True
            self._owner._last_error = ""
            self._owner._link_accepted(self)
        elif frame_type is FrameType.REFUSE:
            code, epoch = _REFUSE.unpack_from(payload)
            reason = _text(payload[_REFUSE.size :], "reason")
            if self._peer_verified:
                self._owner._on_refuse(self, code, epoch, reason)
            else:
                self.abort(f"refused by an unauthenticated peer: {reason}")
        else:
            raise LinkError(f"unexpected {frame_type.name} frame in state {self.state.value}")

    def write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    def abort(self, reason: str) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            if not self._owner._closed:
                self._owner._note_error(f"replication link to {self.standby or 'the standby'}: {reason}")
            transport.abort()

    async def drain(self) -> None:
        if self.paused and not self.closed.done():
            self._resumed = asyncio.get_running_loop().create_future()
            await self._resumed

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._resumed is not None and not self._resumed.done():
            self._resumed.set_result(None)
        self._owner._link_resumed()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self.paused = False
        if self._resumed is not None and not self._resumed.done():
            self._resumed.set_result(None)
        self._owner._link_lost(self, str(exc) if exc else "closed")
        self.state = LinkState.DOWN
        if not self.closed.done():
            self.closed.set_result(None)


# --- The standby's side ---------------------------------------------------------------------------


class _Stage(enum.Enum):
    HELLO = "hello"
    AUTH = "auth"
    AWAIT_SNAPSHOT = "await_snapshot"
    SNAPSHOT = "snapshot"
    STREAMING = "streaming"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ReceiverStatus:
    """The standby's view of replication."""

    connected: bool  # an authenticated active is streaming to us
    active: str  # its node id
    epoch: int  # the epoch of its stream
    known_epoch: int  # the highest epoch this node has seen (links below it are refused)
    applied: int  # last sequence number applied to our store
    acked: int  # last sequence number durable and acknowledged
    active_seq: int  # the active's last sequence number (from its last ping)
    consistent: bool  # our store holds a complete snapshot plus a prefix of the stream
    last_error: str


class ReplicationReceiver:
    """Accepts the active's link on `listen`, applies its records to this node's store and
    acknowledges each batch once it is durable here.

    The store comes from `store_factory` (a new, unopened Store each time): it is opened at
    `start()` and reopened at each snapshot, whose first records empty it. `consistent` is False
    from the start of a snapshot until the snapshot is durable: a standby must not take over
    while it is False. `peer_id` (node id + a token of this process) is what the active records
    in the lease as its in-sync standby.
    """

    def __init__(
        self,
        store_factory: Callable[[], Store],
        settings: ReplicationSettings,
        listen: tuple[str, int],
        *,
        known_epoch: int = 0,
    ) -> None:
        self._store_factory = store_factory
        self._settings = settings
        self._listen = listen
        self.peer_id = f"{settings.node_id}/{secrets.token_hex(4)}"
        self.known_epoch = known_epoch
        self.consistent = False
        self.synced_epoch = 0  # epoch of the stream that made the store consistent
        self.last_error = ""
        self.store: Store | None = None
        self._store_lock = asyncio.Lock()
        self._server: asyncio.Server | None = None
        self._session: _ReceiverLink | None = None
        self._stopping = False
        self._resets: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        store = self._store_factory()
        await loop.run_in_executor(None, store.open)
        self.store = store
        host, port = self._listen
        tls = self._settings.tls
        try:
            self._server = await loop.create_server(
                lambda: _ReceiverLink(self), host, port, ssl=tls.server if tls else None
            )
        except OSError:
            self.store = None
            await loop.run_in_executor(None, store.close)
            raise

    async def stop(self) -> None:
        """Close the listener and the link, and close the store once everything received is
        durable in it (what a standby does before it takes over)."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
            self._server = None
        session = self._session
        if session is not None:
            session.close("this node stops being the standby")
        async with self._store_lock:
            store, self.store = self.store, None
            if store is not None:
                await asyncio.get_running_loop().run_in_executor(None, store.close)

    def observe_epoch(self, epoch: int) -> None:
        """The node saw `epoch` in the lease: refuse any link from an older epoch from now on."""
        if epoch <= self.known_epoch:
            return
        self.known_epoch = epoch
        session = self._session
        if session is not None and session.epoch < epoch:
            session.refuse(
                RefuseCode.STALE_EPOCH, f"epoch {session.epoch} is stale (the lease is at {epoch})"
            )

    def status(self) -> ReceiverStatus:
        session = self._session
        live = session is not None and session.stage is not _Stage.CLOSED
        return ReceiverStatus(
            connected=live,
            active=session.active if session is not None and live else "",
            epoch=session.epoch if session is not None and live else 0,
            known_epoch=self.known_epoch,
            applied=session.applied if session is not None else 0,
            acked=session.acked if session is not None else 0,
            active_seq=session.active_seq if session is not None else 0,
            consistent=self.consistent,
            last_error=self.last_error,
        )

    def _note_error(self, error: str) -> None:
        if error != self.last_error:
            log.warning("%s", error)
        self.last_error = error

    def _adopt(self, session: _ReceiverLink) -> bool:
        if self._stopping or self.store is None:
            return False
        old = self._session
        self._session = session
        if old is not None and old is not session:
            old.close("replaced by a new link from the active")
        return True

    def _is_current(self, session: _ReceiverLink) -> bool:
        return session is self._session and session.stage is not _Stage.CLOSED

    def _start_reset(self, session: _ReceiverLink) -> None:
        task = asyncio.get_running_loop().create_task(self._reset(session))
        self._resets.add(task)
        task.add_done_callback(self._resets.discard)

    async def _reset(self, session: _ReceiverLink) -> None:
        """Reopen the store and empty it, for the snapshot `session` is about to send."""
        loop = asyncio.get_running_loop()
        async with self._store_lock:
            if not self._is_current(session) or self.store is None:
                return
            old, self.store = self.store, None
            try:
                store, recovered = await loop.run_in_executor(None, self._reopen, old)
            except StoreError as exc:
                self._note_error(f"cannot reopen the standby's store: {exc}")
                session.close("store failure")
                return
            self.store = store
            for record in clear_records(recovered):
                store.append(record)
        session.reset_done()

    def _reopen(self, old: Store) -> tuple[Store, Recovered]:
        old.close()
        store = self._store_factory()
        return store, store.open()


class _ReceiverLink(asyncio.Protocol):
    """The standby's end of one connection from the active (owns the transport)."""

    def __init__(self, receiver: ReplicationReceiver) -> None:
        self._receiver = receiver
        settings = receiver._settings
        self._codec = LinkCodec(settings.max_frame)
        self._secret = settings.secret
        self._transport: asyncio.Transport | None = None
        self._nonce_a = b""
        self._transcript = b""
        self.stage = _Stage.HELLO
        self.active = ""
        self.epoch = 0
        self.snapshot_seq = 0
        self.applied = 0
        self.acked = 0
        self.active_seq = 0
        # Frames that arrive while the store is being reset wait here (reading pauses when full).
        self._blocked = False
        self._inbox: deque[tuple[FrameType, bytes]] = deque()
        self._reading_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports (the server installs uvloop) are not asyncio.Transport subclasses.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self.stage is not _Stage.CLOSED:
            if self._receiver._is_current(self):
                self._receiver._note_error(f"link from the active {self.active} lost: {exc or 'closed'}")
            self.stage = _Stage.CLOSED

    def data_received(self, data: bytes) -> None:
        try:
            for frame_type, payload in self._codec.feed(data):
                if self.stage is _Stage.CLOSED:
                    return
                self._on_frame(frame_type, payload)
        except (LinkError, struct.error) as exc:
            self.refuse(RefuseCode.PROTOCOL, f"protocol error: {exc}")

    def close(self, reason: str) -> None:
        if self.stage is _Stage.CLOSED:
            return
        self.stage = _Stage.CLOSED
        self._inbox.clear()
        log.info("closing the link from %s: %s", self.active or "the active", reason)
        if self._transport is not None:
            self._transport.close()

    def refuse(self, code: RefuseCode, reason: str) -> None:
        if self.stage is _Stage.CLOSED:
            return
        self._receiver._note_error(f"refused the link from {self.active or 'a peer'}: {reason}")
        payload = _REFUSE.pack(code, self._receiver.known_epoch) + reason.encode()
        if self._transport is not None:
            self._transport.write(encode_frame(FrameType.REFUSE, payload))
        self.close(reason)

    # --- frames -----------------------------------------------------------------------------------

    def _on_frame(self, frame_type: FrameType, payload: bytes) -> None:
        stage = self.stage
        if stage is _Stage.HELLO:
            if frame_type is not FrameType.HELLO:
                raise LinkError(f"expected HELLO, got {frame_type.name}")
            self._hello(payload)
        elif stage is _Stage.AUTH:
            if frame_type is not FrameType.AUTH:
                raise LinkError(f"expected AUTH, got {frame_type.name}")
            self._auth(payload)
        elif frame_type is FrameType.PING:
            epoch, self.active_seq = _PING.unpack(payload)
            self._check_epoch(epoch)
            if self.stage is not _Stage.CLOSED:
                self._write(encode_frame(FrameType.PONG))
        elif self._blocked:
            self._inbox.append((frame_type, payload))
            if len(self._inbox) >= STANDBY_INBOX_FRAMES:
                self._pause_reading()
        else:
            self._apply(frame_type, payload)

    def _hello(self, payload: bytes) -> None:
        version, self.epoch, self._nonce_a = _HELLO.unpack_from(payload)
        self.active = _text(payload[_HELLO.size :], "active id")
        if version != PROTOCOL_VERSION:
            self.refuse(
                RefuseCode.PROTOCOL, f"protocol version {version} (this node speaks {PROTOCOL_VERSION})"
            )
            return
        nonce_b = secrets.token_bytes(NONCE_SIZE)
        peer_id = self._receiver.peer_id
        self._transcript = _transcript(self.epoch, self._nonce_a, nonce_b, self.active, peer_id)
        mac = _mac(self._secret, b"standby", self._transcript)
        self._write(encode_frame(FrameType.CHALLENGE, _CHALLENGE.pack(nonce_b, mac) + peer_id.encode()))
        self.stage = _Stage.AUTH

    def _auth(self, payload: bytes) -> None:
        receiver = self._receiver
        if not hmac.compare_digest(payload, _mac(self._secret, b"active", self._transcript)):
            self.refuse(RefuseCode.AUTHENTICATION, "authentication failed (is the shared secret the same?)")
            return
        if self.epoch < receiver.known_epoch:
            self.refuse(
                RefuseCode.STALE_EPOCH,
                f"epoch {self.epoch} is stale (this node has seen {receiver.known_epoch})",
            )
            return
        if not receiver._adopt(self):
            self.refuse(RefuseCode.NOT_STANDBY, "this node is not a standby")
            return
        receiver.known_epoch = self.epoch
        receiver.last_error = ""
        self.stage = _Stage.AWAIT_SNAPSHOT
        self._write(encode_frame(FrameType.ACCEPT))
        log.info("the active %s (epoch %d) is connected", self.active, self.epoch)

    def _check_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            raise LinkError(f"epoch {epoch} in a link opened at epoch {self.epoch}")
        if epoch < self._receiver.known_epoch:
            self.refuse(
                RefuseCode.STALE_EPOCH,
                f"epoch {epoch} is stale (this node has seen {self._receiver.known_epoch})",
            )

    def _apply(self, frame_type: FrameType, payload: bytes) -> None:
        receiver = self._receiver
        store = receiver.store
        if store is None:
            self.close("the store is closed")
            return
        stage = self.stage
        try:
            if frame_type is FrameType.RECORDS and stage is _Stage.STREAMING:
                epoch, first, count = _RECORDS.unpack_from(payload)
                self._check_epoch(epoch)
                if self.stage is _Stage.CLOSED:
                    return
                if first != self.applied + 1:
                    raise LinkError(f"records from seq {first}, expected {self.applied + 1}")
                for record in decode_records(payload, _RECORDS.size, count):
                    store.append(record)
                self.applied += count
                store.when_durable(partial(self._durable, self.applied, False))
                if store.pending_bytes > STANDBY_HIGH_WATER_BYTES:
                    self._pause_reading()
            elif frame_type is FrameType.SNAPSHOT and stage is _Stage.SNAPSHOT:
                (count,) = _U32.unpack_from(payload)
                for record in decode_records(payload, _U32.size, count):
                    store.append(record)
            elif frame_type is FrameType.SNAPSHOT_BEGIN and stage is _Stage.AWAIT_SNAPSHOT:
                (self.snapshot_seq,) = _U64.unpack(payload)
                receiver.consistent = False
                self._blocked = True
                receiver._start_reset(self)
            elif frame_type is FrameType.SNAPSHOT_END and stage is _Stage.SNAPSHOT:
                seq, next_msg_id = _SNAPSHOT_END.unpack(payload)
                if seq != self.snapshot_seq:
                    raise LinkError(f"snapshot ends at seq {seq}, began at {self.snapshot_seq}")
                if next_msg_id > 1:
                    store.append(high_water_record(next_msg_id))
                self.applied = seq
                self.stage = _Stage.STREAMING
                store.when_durable(partial(self._durable, seq, True))
            else:
                raise LinkError(f"unexpected {frame_type.name} frame in stage {stage.value}")
        except StoreError as exc:
            receiver._note_error(f"the standby's store failed: {exc}")
            self.close("store failure")

    def reset_done(self) -> None:
        """The store is empty and ready for the snapshot: apply what arrived meanwhile."""
        if self.stage is _Stage.CLOSED:
            return
        self.stage = _Stage.SNAPSHOT
        self._blocked = False
        inbox = self._inbox
        try:
            while inbox and self.stage is not _Stage.CLOSED:
                self._apply(*inbox.popleft())
        except (LinkError, struct.error) as exc:
            self.refuse(RefuseCode.PROTOCOL, f"protocol error: {exc}")
            return
        self._resume_reading()

    def _durable(self, seq: int, snapshot_end: bool) -> None:
        receiver = self._receiver
        if not receiver._is_current(self):
            return
        if snapshot_end:
            receiver.consistent = True
            receiver.synced_epoch = self.epoch
            log.info("snapshot at seq %d from %s is durable: this standby is consistent", seq, self.active)
        if seq > self.acked or snapshot_end:
            self.acked = seq
            self._write(encode_frame(FrameType.ACK, _U64.pack(seq)))
        store = receiver.store
        if (
            self._reading_paused
            and not self._blocked
            and (store is None or store.pending_bytes <= STANDBY_HIGH_WATER_BYTES // 2)
        ):
            self._resume_reading()

    def _write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()
