"""ReplicatedStore and ReplicationReceiver over real sockets on 127.0.0.1, with real stores.

Each test runs one event loop (`asyncio.run`) holding both ends: the active's ReplicatedStore
and the standby's ReplicationReceiver. Waits are conditions with timeouts (`wait_until`).
"""

from __future__ import annotations

import asyncio
import math
import ssl
import struct
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.journal import (
    BindingAdded,
    BindingRemoved,
    ExchangeDeclared,
    MessageEnqueued,
    MessageRemoved,
    QueueDeclared,
    QueuePurged,
    Record,
    RetainedSet,
    Schedule,
    SessionSaved,
    Snapshot,
    Store,
    StoreError,
)
from broker.message import Message, Properties
from cluster.lease import monotonic_clock
from cluster.replication import (
    FrameType,
    LinkCodec,
    LinkError,
    LinkState,
    LinkTls,
    RefuseCode,
    ReplicatedStore,
    ReplicationReceiver,
    ReplicationSettings,
    SyncState,
    decode_records,
    encode_frame,
    snapshot_batch,
)
from storage.memory import MemoryStore
from storage.serial import encode_record
from storage.sqlite import SqliteStore
from tests.certs import make_certificates
from tests.cluster.ha_pair import free_port, store_state, wait_until

SECRET = b"pair secret"
PERSISTENT = Properties(delivery_mode=2, headers={"k": "v"})
LOOPBACK = "127.0.0.1"


def settings(node_id: str, secret: bytes = SECRET, sync_timeout: float = 5.0, tls: LinkTls | None = None):
    return ReplicationSettings(node_id=node_id, secret=secret, sync_timeout=sync_timeout, tls=tls)


def msg(msg_id: int, body: bytes = b"body", retain: bool = False) -> Message:
    return Message("logs", f"key.{msg_id}", body + bytes([msg_id % 256]), PERSISTENT, msg_id, None, retain)


def workload(base: int) -> list[Record]:
    """Every kind of record, in an order where order matters (purge then enqueue, remove)."""
    q1, q2, q3 = f"q1-{base}", f"q2-{base}", f"q3-{base}"
    return [
        ExchangeDeclared("/", f"logs-{base}", "topic", arguments={"alternate-exchange": "ae"}),
        QueueDeclared("/", q1),
        QueueDeclared("/", q2, arguments={"x-max-length": 10}),
        QueueDeclared("/", q3),
        BindingAdded("/", f"logs-{base}", q1, False, "a.#"),
        BindingAdded("/", f"logs-{base}", q2, False, "b.*", {"x-match": "any"}),
        MessageEnqueued("/", (q1, q2), msg(base + 1)),
        MessageEnqueued("/", (q1,), msg(base + 2)),
        MessageEnqueued("/", (q2,), msg(base + 3)),
        MessageRemoved("/", q1, base + 1),
        MessageRemoved("/", q2, base + 3),
        RetainedSet("/", f"a.b.{base}", msg(base + 4, retain=True)),
        SessionSaved("/", f"client-{base}", b"\x00state\xff"),
        BindingRemoved("/", f"logs-{base}", q2, False, "b.*", {"x-match": "any"}),
        MessageEnqueued("/", (q3,), msg(base + 5)),
        QueuePurged("/", q3),
        MessageEnqueued("/", (q3,), msg(base + 6)),
        MessageEnqueued("/", (q1,), msg(base + 7), durable=False),  # a paged-out transient message
    ]


class GatedStore(MemoryStore):
    """A standby store whose durability the test releases by hand (`gate_open`)."""

    def __init__(self, schedule: Schedule) -> None:
        super().__init__(schedule)
        self.gate_open = True
        self.held: list[Callable[[], None]] = []
        self.appended: list[Record] = []

    def append(self, record: Record) -> None:
        super().append(record)
        self.appended.append(record)

    def when_durable(self, callback: Callable[[], None]) -> None:
        if self.gate_open:
            super().when_durable(callback)
        else:
            self.held.append(callback)

    def open_gate(self) -> None:
        self.gate_open = True
        held, self.held = self.held, []
        for callback in held:
            super().when_durable(callback)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Pair:
    """Both ends in one loop: `standby(...)` starts a receiver, `active(...)` opens a ReplicatedStore."""

    def __init__(self, tmp: Path) -> None:
        self.loop = asyncio.get_running_loop()
        self.tmp = tmp
        self.active_path = tmp / "active.sqlite3"
        self.standby_path = tmp / "standby.sqlite3"
        self.port = free_port()
        self.standby_stores: list[GatedStore] = []
        self.gates_open = True  # the gate of standby stores made from now on
        self.fenced: list[str] = []
        self.events: list[str] = []

    def sqlite(self, path: Path) -> Callable[[], Store]:
        return lambda: SqliteStore(path, self.loop.call_soon_threadsafe, "OFF")

    def memory(self) -> MemoryStore:
        return MemoryStore(self.loop.call_soon_threadsafe)

    def gated(self) -> Store:
        # Called from a worker thread when the receiver reopens its store.
        store = GatedStore(self.loop.call_soon_threadsafe)
        store.gate_open = self.gates_open
        self.standby_stores.append(store)
        return store

    async def standby(
        self,
        factory: Callable[[], Store] | None = None,
        secret: bytes = SECRET,
        known_epoch: int = 0,
        tls: LinkTls | None = None,
    ) -> ReplicationReceiver:
        receiver = ReplicationReceiver(
            factory or self.sqlite(self.standby_path),
            settings("standby", secret, tls=tls),
            (LOOPBACK, self.port),
            known_epoch=known_epoch,
        )
        await receiver.start()
        return receiver

    def active(
        self,
        inner: Store | None = None,
        *,
        secret: bytes = SECRET,
        sync_timeout: float = 5.0,
        epoch: int = 1,
        clock: Callable[[], float] = monotonic_clock,
        lease_deadline: float = math.inf,
        tls: LinkTls | None = None,
    ) -> ReplicatedStore:
        if inner is None:
            inner = SqliteStore(self.active_path, self.loop.call_soon_threadsafe, "OFF")

        async def before_alone() -> None:
            self.events.append("lease: no standby in sync")

        store = ReplicatedStore(
            inner,
            settings("active", secret, sync_timeout, tls),
            epoch=epoch,
            peer=(LOOPBACK, self.port),
            lease_deadline=lease_deadline,
            on_fenced=self.fenced.append,
            before_alone=before_alone,
            clock=clock,
        )
        store.open()
        return store


def run(coro_factory: Callable[[], Coroutine[Any, Any, None]], timeout: float = 60) -> None:
    async def main() -> None:
        await asyncio.wait_for(coro_factory(), timeout)

    asyncio.run(main())


async def append_all(store: Store, records: list[Record]) -> None:
    """Append `records` over several loop turns (several RECORDS frames) and wait until confirmed."""
    done = asyncio.Event()
    for index, record in enumerate(records):
        store.append(record)
        if index % 5 == 4:
            await asyncio.sleep(0)  # let the batch go out: the next records make another frame
    store.when_durable(done.set)
    await asyncio.wait_for(done.wait(), 10)


def in_sync(store: ReplicatedStore) -> Callable[[], bool]:
    return lambda: store.sync_state is SyncState.IN_SYNC


# --- streaming ---------------------------------------------------------------------------------------


def test_records_stream_in_order_and_the_standby_store_ends_up_equal(tmp_path: Path) -> None:
    async def scenario() -> None:
        pair = Pair(tmp_path)
        receiver = await pair.standby()
        active = pair.active()
        await wait_until(in_sync(active), what="the standby in sync")
        for base in (100, 200, 300):
            await append_all(active, workload(base))
        assert await active.drain(5)
        status = active.status()
        assert status.acked == status.seq == 3 * len(workload(0))
        assert status.lag_records == 0 and status.link is LinkState.STREAMING
        assert receiver.status().applied == status.seq
        await receiver.stop()
        await asyncio.get_running_loop().run_in_executor(None, active.close)
        assert store_state(pair.standby_path) == store_state(pair.active_path)
        assert store_state(pair.standby_path)["queue_messages"]  # the comparison is not of two empty stores

    run(scenario)


def test_the_standby_receives_exactly_the_appended_records_in_order(tmp_path: Path) -> None:
    async def scenario() -> None:
        pair = Pair(tmp_path)
        receiver = await pair.standby(pair.gated)
        active = pair.active(pair.memory())
        await wait_until(in_sync(active))
        records = workload(10) + workload(20)
        await append_all(active, records)
        assert await active.drain(5)
        standby_store = pair.standby_stores[-1]
        # After the (empty) snapshot's high-water marker nothing else: the stream, in order.
        streamed = [
            encode_record(r) for r in standby_store.appended if not isinstance(r, MessageEnqueued) or r.queues
        ]
        assert streamed == [encode_record(r) for r in records]
        await receiver.stop()
        active.close()

    run(scenario)


def test_when_durable_waits_for_the_standby_ack_in_sync_mode(tmp_path: Path) -> None:
    async def scenario() -> None:
        pair = Pair(tmp_path)
        receiver = await pair.standby(pair.gated)
        inner = pair.memory()
        active = pair.active(inner)
        await wait_until(in_sync(active))
        gate = pair.standby_stores[-1]
        gate.gate_open = False
        confirmed: list[int] = []
        active.append(QueueDeclared("/", "orders"))
        active.append(MessageEnqueued("/", ("orders",), msg(1, b"x" * 1000)))
        active.when_durable(lambda: confirmed.append(1))
        # The standby has the records but not durable yet; the active's own store is durable
        # (the memory store's callback ran long before the records crossed the socket).
        await wait_until(lambda: receiver.status().applied == 2, what="the standby to apply the records")
        assert confirmed == []
        assert active.status().lag_records == 2
        assert active.pending_bytes > 1000  # in flight towards the standby: publishers feel it
        gate.open_gate()
        await wait_until(lambda: confirmed == [1], what="the confirmation after the standby's ack")
        assert active.status().lag_records == 0
        assert active.pending_bytes == inner.pending_bytes == 0
        assert active.sync_state is SyncState.IN_SYNC
        await receiver.stop()
        active.close()

    run(scenario)


def test_confirmations_wait_for_a_standby_until_sync_timeout_at_start(tmp_path: Path) -> None:
    async def scenario() -> None:
        pair = Pair(tmp_path)
        loop = asyncio.get_running_loop()
        active = pair.active(pair.memory(), sync_timeout=0.3)
        confirmed: list[float] = []
        started = loop.time()
        active.append(QueueDeclared("/", "orders"))
        active.when_durable(lambda: confirmed.append(loop.time()))
        await wait_until(lambda: bool(confirmed), what="the confirmation once alone")
        assert confirmed[0] - started >= 0.25  # it waited for a standby first
        assert active.sync_state is SyncState.ALONE
        assert pair.events == ["lease: no standby in sync"]
        active.close()

    run(scenario)


# --- standby gone and back ---------------------------------------------------------------------------


def test_standby_gone_active_confirms_alone_after_sync_timeout_then_standby_catches_up(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        pair = Pair(tmp_path)
        loop = asyncio.get_running_loop()
        receiver = await pair.standby()
        active = pair.active(sync_timeout=0.5)
        await wait_until(in_sync(active))
        await append_all(active, workload(100))
        await receiver.stop()
        lost_at = loop.time()
        # The standby is gone: a confirmation waits for it, then the active goes on alone,
        # after recording that in the lease.
        confirmed = asyncio.Event()

        def confirm() -> None:
            pair.events.append("confirmed")
            confirmed.set()

        active.append(MessageEnqueued("/", ("q1-100",), msg(50)))
        active.when_durable(confirm)
        await asyncio.wait_for(confirmed.wait(), 10)
        assert loop.time() - lost_at >= 0.2  # waited for the standby (sync_timeout after last heard)
        assert pair.events == ["lease: no standby in sync", "confirmed"]
        status = active.status()
        assert status.sync is SyncState.ALONE and status.link is not LinkState.STREAMING
        assert active.synced_standby == ""
        assert status.lag_records > 0
        # Alone, writes go on and are confirmed on local durability.
        await append_all(active, workload(200))
        # The standby comes back: snapshot, then stream, then in sync; writes go on meanwhile.
        receiver = await pair.standby()
        base = 1000
        deadline = loop.time() + 10
        while active.sync_state is not SyncState.IN_SYNC:
            assert loop.time() < deadline, "the standby did not catch up"
            active.append(MessageEnqueued("/", ("q1-200",), msg(base)))
            base += 1
            await asyncio.sleep(0.002)  # a publisher's pace
        assert active.synced_standby == receiver.peer_id
        assert receiver.consistent
        await append_all(active, workload(300))
        assert await active.drain(5)
        await receiver.stop()
        await loop.run_in_executor(None, active.close)
        assert store_state(pair.standby_path) == store_state(pair.active_path)

    run(scenario)


def test_a_connected_standby_that_stops_acknowledging_counts_as_gone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        pair = Pair(tmp_path)
        loop = asyncio.get_running_loop()
        receiver = await pair.standby(pair.gated)
        active = pair.active(pair.memory(), sync_timeout=0.5)
        await wait_until(in_sync(active))
        # Its disk hangs (also after the store is reopened); the link stays up and answers pings.
        pair.standby_stores[-1].gate_open = pair.gates_open = False
        confirmed: list[float] = []
        stuck_at = loop.time()
        active.append(QueueDeclared("/", "orders"))
        active.when_durable(lambda: confirmed.append(loop.time()))
        await wait_until(lambda: bool(confirmed), what="the confirmation without the stuck standby")
        assert 0.4 <= confirmed[0] - stuck_at < 3.0
        assert pair.events == ["lease: no standby in sync"]
        assert "the standby acknowledged nothing for 0.5 s" in caplog.text  # (it reconnected since)
        await receiver.stop()
        active.close()

    run(scenario)


def test_snapshot_replaces_whatever_the_standby_store_held(tmp_path: Path) -> None:
    # The standby's store holds stale state from an earlier life; the active's store has data
    # written before any standby was there.
    stale = SqliteStore(tmp_path / "standby.sqlite3", lambda callback: callback(), "OFF")
    stale.open()
    for record in workload(900) + [ExchangeDeclared("/", "junk", "fanout"), QueueDeclared("/", "junk")]:
        stale.append(record)
    stale.append(MessageEnqueued("/", ("junk",), msg(5000)))
    stale.close()

    async def scenario() -> None:
        pair = Pair(tmp_path)
        active = pair.active(sync_timeout=30)
        for base in (100, 200):
            for record in workload(base):
                active.append(record)
        receiver = await pair.standby()
        await wait_until(in_sync(active))
        assert await active.drain(5)
        await receiver.stop()
        await asyncio.get_running_loop().run_in_executor(None, active.close)
        standby = store_state(pair.standby_path)
        primary = store_state(pair.active_path)
        assert ("/", "junk") not in standby["queue_messages"]
        assert standby["queue_messages"]
        # Ids are never reused: the standby keeps the higher of both high-water marks.
        assert standby.pop("next_msg_id") == 5001 and primary.pop("next_msg_id") == 208
        assert standby == primary

    run(scenario)


def test_the_standby_gets_the_active_high_water_mark_of_message_ids(tmp_path: Path) -> None:
    async def scenario() -> None:
        pair = Pair(tmp_path)
        active = pair.active(sync_timeout=30)
        active.append(QueueDeclared("/", "q"))
        for msg_id in range(1, 11):  # enqueued and acknowledged before any standby was there
            active.append(MessageEnqueued("/", ("q",), msg(msg_id)))
            active.append(MessageRemoved("/", "q", msg_id))
        receiver = await pair.standby()
        await wait_until(in_sync(active))
        await receiver.stop()
        await asyncio.get_running_loop().run_in_executor(None, active.close)
        standby = store_state(pair.standby_path)
        assert standby["next_msg_id"] == 11  # ids 1..10 are never handed out again
        assert standby == store_state(pair.active_path)

    run(scenario)


# --- authentication and epochs -----------------------------------------------------------------------


def test_a_standby_with_another_secret_is_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        pair = Pair(tmp_path)
        receiver = await pair.standby(pair.gated, secret=b"another secret")
        active = pair.active(pair.memory(), sync_timeout=0.3)
        await wait_until(
            lambda: "authentication" in active.status().last_error, what="an authentication failure"
        )
        active.append(QueueDeclared("/", "orders"))
        await wait_until(lambda: active.sync_state is SyncState.ALONE)
        assert not receiver.status().connected
        assert pair.standby_stores[-1].appended == []  # nothing reached the standby's store
        assert not receiver.consistent
        await receiver.stop()
        active.close()

    run(scenario)


async def _handshake(port: int, epoch: int, auth: bytes) -> tuple[FrameType, bytes]:
    """A raw active: HELLO, then `auth` as the AUTH frame; returns the standby's answer."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    codec = LinkCodec(1 << 20)
    writer.write(encode_frame(FrameType.HELLO, struct.pack("!BQ32s", 1, epoch, b"n" * 32) + b"intruder"))
    frames: list[tuple[FrameType, bytes]] = []
    while len(frames) < 2:
        data = await reader.read(4096)
        if not data:
            break
        frames += codec.feed(data)
        if frames and frames[0][0] is FrameType.CHALLENGE and len(frames) == 1:
            writer.write(encode_frame(FrameType.AUTH, auth))
    writer.close()
    assert frames[0][0] is FrameType.CHALLENGE
    return frames[1]


def test_a_rogue_standby_that_fails_the_hmac_handshake_gets_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        pair = Pair(tmp_path)
        received: list[tuple[FrameType, bytes]] = []
        closed = asyncio.Event()

        async def rogue(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            codec = LinkCodec(1 << 20)
            writer.write(encode_frame(FrameType.CHALLENGE, b"n" * 32 + b"\x00" * 32 + b"rogue"))
            while data := await reader.read(4096):
                received.extend(codec.feed(data))
            closed.set()

        server = await asyncio.start_server(rogue, LOOPBACK, pair.port)
        active = pair.active(pair.memory())
        active.append(QueueDeclared("/", "secret-queue"))
        await asyncio.wait_for(closed.wait(), 10)
        assert [kind for kind, _ in received] == [FrameType.HELLO]  # no AUTH, no records
        assert "authentication" in active.status().last_error
        assert active.sync_state is SyncState.WAITING
        server.close()
        active.close()

    run(scenario)


def test_a_peer_that_fails_the_hmac_handshake_is_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        pair = Pair(tmp_path)
        receiver = await pair.standby(pair.gated)
        frame_type, payload = await _handshake(pair.port, 1, b"\x00" * 32)
        assert frame_type is FrameType.REFUSE
        assert payload[0] == RefuseCode.AUTHENTICATION
        assert "authentication" in receiver.status().last_error
        assert not receiver.status().connected
        await receiver.stop()

    run(scenario)


def test_a_stale_epoch_active_is_refused_and_fences_itself(tmp_path: Path) -> None:
    async def scenario() -> None:
        pair = Pair(tmp_path)
        receiver = await pair.standby(pair.gated, known_epoch=3)
        active = pair.active(pair.memory(), epoch=2)
        await wait_until(lambda: bool(pair.fenced), what="the active to fence itself")
        assert "epoch" in pair.fenced[0]
        assert active.sync_state is SyncState.FENCED
        with pytest.raises(StoreError, match="fenced"):
            active.append(QueueDeclared("/", "orders"))
        assert pair.standby_stores[-1].appended == []
        assert "stale" in receiver.status().last_error
        await receiver.stop()
        active.close()

    run(scenario)


def test_records_of_an_active_whose_epoch_became_stale_are_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        pair = Pair(tmp_path)
        receiver = await pair.standby(pair.gated)
        active = pair.active(pair.memory(), epoch=1)
        await wait_until(in_sync(active))
        gate = pair.standby_stores[-1]
        gate.gate_open = False
        confirmed: list[int] = []
        active.append(QueueDeclared("/", "before"))
        active.when_durable(lambda: confirmed.append(1))
        await wait_until(lambda: receiver.status().applied == 1)
        # The standby learns (from the lease) that a newer epoch exists: the old active's link
        # is refused, and the active stops at once.
        receiver.observe_epoch(2)
        await wait_until(lambda: bool(pair.fenced), what="the active to fence itself")
        with pytest.raises(StoreError):
            active.append(QueueDeclared("/", "after"))
        gate.open_gate()
        await wait_until(lambda: not gate.held)
        await asyncio.sleep(0)  # let any ack that could still come be processed
        assert confirmed == []  # never confirmed by a fenced node
        assert [type(r).__name__ for r in gate.appended if not isinstance(r, MessageEnqueued)] == [
            "QueueDeclared"
        ]
        await receiver.stop()
        active.close()

    run(scenario)


def test_an_active_whose_lease_lapsed_refuses_the_first_write_and_confirms_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        pair = Pair(tmp_path)
        clock = FakeClock()
        receiver = await pair.standby(pair.gated)
        active = pair.active(pair.memory(), clock=clock, lease_deadline=clock.now + 2)
        await wait_until(in_sync(active))
        gate = pair.standby_stores[-1]
        gate.gate_open = False
        confirmed: list[int] = []
        active.append(QueueDeclared("/", "orders"))
        active.when_durable(lambda: confirmed.append(1))
        await wait_until(lambda: receiver.status().applied == 1)
        # SIGSTOP for longer than the lease: on resume the monotonic clock has moved on.
        clock.now += 5
        with pytest.raises(StoreError, match="fenced"):
            active.append(QueueDeclared("/", "during"))
        assert pair.fenced and "lease" in pair.fenced[0]
        gate.open_gate()
        await wait_until(lambda: not gate.held)
        assert confirmed == []
        with pytest.raises(StoreError):
            active.when_durable(lambda: confirmed.append(2))
        await receiver.stop()
        active.close()

    run(scenario)


def test_a_lapsed_lease_fences_even_without_writes(tmp_path: Path) -> None:
    async def scenario() -> None:
        pair = Pair(tmp_path)
        clock = FakeClock()
        active = pair.active(pair.memory(), clock=clock, lease_deadline=clock.now + 2)
        active.extend_lease(clock.now + 3)
        clock.now += 2.5
        active.append(QueueDeclared("/", "orders"))  # still valid: the lease was extended
        clock.now += 1
        await wait_until(lambda: active.sync_state is SyncState.FENCED, what="the watchdog to fence")
        active.close()

    run(scenario)


# --- TLS ----------------------------------------------------------------------------------------------


def _tls(tmp_path: Path) -> LinkTls:
    certs = make_certificates(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certs.server_cert, certs.server_key)
    server.load_verify_locations(certs.ca_cert)
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_cert_chain(certs.client_cert, certs.client_key)
    client.load_verify_locations(certs.ca_cert)
    client.check_hostname = False
    return LinkTls(server, client)


def test_replication_over_mutual_tls(tmp_path: Path) -> None:
    tls = _tls(tmp_path)

    async def scenario() -> None:
        pair = Pair(tmp_path)
        receiver = await pair.standby(pair.gated, tls=tls)
        active = pair.active(pair.memory(), tls=tls)
        await wait_until(in_sync(active))
        await append_all(active, workload(1))
        assert await active.drain(5)
        assert len(
            [r for r in pair.standby_stores[-1].appended if not isinstance(r, MessageEnqueued) or r.queues]
        ) == len(workload(1))
        await receiver.stop()
        active.close()

    run(scenario)


def test_a_plain_active_cannot_talk_to_a_tls_standby(tmp_path: Path) -> None:
    tls = _tls(tmp_path)

    async def scenario() -> None:
        pair = Pair(tmp_path)
        receiver = await pair.standby(pair.gated, tls=tls)
        active = pair.active(pair.memory(), sync_timeout=0.3)
        active.append(QueueDeclared("/", "orders"))
        await wait_until(lambda: active.sync_state is SyncState.ALONE)
        assert pair.standby_stores[-1].appended == []
        await receiver.stop()
        active.close()

    run(scenario)


def test_link_tls_from_files_requires_peer_certificates(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    tls = LinkTls.from_files(str(certs.server_cert), str(certs.server_key), str(certs.ca_cert))
    assert tls.server.verify_mode is ssl.CERT_REQUIRED
    assert tls.client.verify_mode is ssl.CERT_REQUIRED


# --- the frame codec ----------------------------------------------------------------------------------

FRAMES = [
    (FrameType.HELLO, b"\x01" + b"\x00" * 8 + b"n" * 32 + b"node"),
    (FrameType.ACCEPT, b""),
    (FrameType.ACK, struct.pack("!Q", 7)),
    (FrameType.RECORDS, b"r" * 300),
]
WIRE = b"".join(encode_frame(kind, payload) for kind, payload in FRAMES)


def test_codec_frames_fed_whole() -> None:
    assert LinkCodec(1024).feed(WIRE) == FRAMES


def test_codec_frames_fed_one_byte_at_a_time() -> None:
    codec = LinkCodec(1024)
    frames = []
    for index in range(len(WIRE)):
        frames += codec.feed(WIRE[index : index + 1])
    assert frames == FRAMES


def test_codec_keeps_trailing_bytes_for_the_next_feed() -> None:
    codec = LinkCodec(1024)
    tail = encode_frame(FrameType.PING, b"p" * 16)
    assert codec.feed(WIRE + tail[:7]) == FRAMES
    assert codec.feed(tail[7:]) == [(FrameType.PING, b"p" * 16)]


@given(st.lists(st.integers(min_value=1, max_value=len(WIRE)), max_size=20))
def test_codec_arbitrary_chunking(cuts: list[int]) -> None:
    codec = LinkCodec(1024)
    frames = []
    points = sorted(set(cuts)) + [len(WIRE)]
    start = 0
    for point in points:
        frames += codec.feed(WIRE[start:point])
        start = point
    assert frames == FRAMES


def test_codec_refuses_an_oversized_frame_before_it_arrives() -> None:
    with pytest.raises(LinkError, match="exceeds the limit"):
        LinkCodec(100).feed(struct.pack("!IB", 101, FrameType.RECORDS))


def test_codec_refuses_an_unknown_frame_type() -> None:
    with pytest.raises(LinkError, match="unknown frame type 99"):
        LinkCodec(100).feed(struct.pack("!IB", 0, 99))


def _records_payload(records: list[bytes]) -> bytes:
    return b"".join(struct.pack("!I", len(data)) + data for data in records)


def test_decode_records_round_trip_and_errors() -> None:
    records = workload(1)
    payload = _records_payload([encode_record(r) for r in records])
    assert [encode_record(r) for r in decode_records(payload, 0, len(records))] == [
        encode_record(r) for r in records
    ]
    with pytest.raises(LinkError, match="bytes after the last record"):
        decode_records(payload + b"x", 0, len(records))
    with pytest.raises(LinkError, match="exceed the frame"):
        decode_records(payload[:-1], 0, len(records))
    with pytest.raises(LinkError, match="truncated length"):
        decode_records(payload, 0, len(records) + 1)
    with pytest.raises(LinkError, match="record 0"):
        decode_records(_records_payload([b"\x01\xff"]), 0, 1)


def test_snapshots_of_both_backends_hold_the_same_records(tmp_path: Path) -> None:
    memory = MemoryStore(lambda callback: callback())
    sqlite = SqliteStore(tmp_path / "s.sqlite3", lambda callback: callback(), "OFF")
    memory.open()
    sqlite.open()
    for record in workload(1) + workload(50):
        memory.append(record)
        sqlite.append(record)

    def drain(snapshot: Snapshot) -> Iterator[bytes]:
        while (batch := snapshot_batch(snapshot, 256)) is not None:
            yield from batch
        snapshot.close()

    from_memory = memory.snapshot()
    from_sqlite = sqlite.snapshot()
    assert from_memory.next_msg_id == from_sqlite.next_msg_id == 58
    assert sorted(drain(from_memory)) == sorted(drain(from_sqlite))
    sqlite.close()
