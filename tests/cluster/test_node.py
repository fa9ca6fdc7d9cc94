"""HaNode: roles, takeover, fencing, rejoin and status, with two nodes in one event loop.

Each node has its own data directory and SQLite store, both share a lease directory, and they
replicate over real sockets on 127.0.0.1. `FakeServer` stands in for the composition root: it
opens the store it is given on promotion (as `build_context` does) and records promotions and
fencings. Short leases (0.5 s) keep the tests quick; waits are conditions with timeouts.
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from broker.config import Config, load_config
from broker.journal import MessageEnqueued, QueueDeclared, Recovered, Store, StoreError
from broker.message import Message, Properties
from cluster import status as ha_status
from cluster.lease import FileLease, LeaseState
from cluster.node import STATUS_FILENAME, HaError, HaNode, NodeRole
from cluster.replication import SyncState
from storage import SQLITE_FILENAME
from storage.sqlite import SqliteStore
from tests.cluster.ha_pair import (
    HaPairProcess,
    connect_when_serving,
    free_port,
    poll_until,
    request,
    store_state,
    wait_until,
)

LEASE = 0.5
PERSISTENT = Properties(delivery_mode=2)


class FakeServer:
    """What the composition root does on promotion and on fencing, recorded in `events`."""

    def __init__(self, name: str, events: list[tuple[str, str]]) -> None:
        self.name = name
        self.events = events
        self.store: Store | None = None
        self.recovered: Recovered | None = None

    async def promote(self, store: Store) -> None:
        self.recovered = store.open()
        self.store = store
        self.events.append((self.name, "promote"))

    async def fence(self) -> None:
        self.store = None
        self.events.append((self.name, "fence"))


class Cluster:
    """Two node slots, "a" and "b", with fixed replication ports and a shared lease directory."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.lock = tmp / "lock"
        self.ports = {"a": free_port(), "b": free_port()}
        self.events: list[tuple[str, str]] = []
        self.servers: dict[str, FakeServer] = {}
        self.nodes: dict[str, HaNode] = {}

    def config(
        self, name: str, role: str = "auto", secret: str = "s3cret", lease_seconds: float = LEASE
    ) -> Config:
        other = "b" if name == "a" else "a"
        return load_config(
            env={},
            overrides={
                "store": {"data_dir": str(self.tmp / name)},
                "ha": {
                    "role": role,
                    "peer": f"127.0.0.1:{self.ports[other]}",
                    "listen": f"127.0.0.1:{self.ports[name]}",
                    "lock": str(self.lock),
                    "secret": secret,
                    "lease_seconds": lease_seconds,
                    "sync_timeout": 1.0,
                    "node_id": name,
                },
            },
        )

    def node(
        self,
        name: str,
        role: str = "auto",
        *,
        secret: str = "s3cret",
        lease_seconds: float = LEASE,
        **node_options: Any,
    ) -> HaNode:
        """A node (not started); `node_options` go to HaNode (lease=, monotonic=)."""
        config = self.config(name, role, secret, lease_seconds)
        loop = asyncio.get_running_loop()
        path = self.tmp / name / SQLITE_FILENAME
        server = self.servers[name] = FakeServer(name, self.events)
        node = HaNode(
            config,
            lambda: SqliteStore(path, loop.call_soon_threadsafe, "OFF"),
            on_promote=server.promote,
            on_fence=server.fence,
            **node_options,
        )
        self.nodes[name] = node
        return node

    async def start(self, name: str, role: str = "auto", **kwargs: Any) -> HaNode:
        node = self.node(name, role, **kwargs)
        await node.start()
        return node

    async def stop_all(self) -> None:
        for node in self.nodes.values():
            if node.role is not NodeRole.STOPPED:
                await node.stop()

    def lease(self) -> LeaseState:
        return FileLease(self.lock, "reader", LEASE).read()


def run(scenario: Callable[[Cluster], Coroutine[Any, Any, None]], tmp: Path, timeout: float = 60) -> None:
    async def main() -> None:
        cluster = Cluster(tmp)
        try:
            await asyncio.wait_for(scenario(cluster), timeout)
        finally:
            await cluster.stop_all()

    asyncio.run(main())


async def write(store: Store, first: int, count: int, queue: str = "orders") -> None:
    """Journal `count` persistent messages and wait until they are confirmed."""
    confirmed = asyncio.Event()
    store.append(QueueDeclared("/", queue))
    for msg_id in range(first, first + count):
        store.append(MessageEnqueued("/", (queue,), Message("", queue, b"m%d" % msg_id, PERSISTENT, msg_id)))
    store.when_durable(confirmed.set)
    await asyncio.wait_for(confirmed.wait(), 10)


def in_sync_pair(active: HaNode, standby: HaNode) -> Callable[[], bool]:
    def check() -> bool:
        store, receiver = active.store, standby.receiver
        return (
            store is not None
            and store.sync_state is SyncState.IN_SYNC
            and receiver is not None
            and receiver.consistent
        )

    return check


# --- roles at start -----------------------------------------------------------------------------


def test_auto_takes_a_free_lease_and_the_other_node_becomes_its_standby(tmp_path: Path) -> None:
    async def scenario(cluster: Cluster) -> None:
        a = await cluster.start("a", "auto")
        assert a.role is NodeRole.ACTIVE and cluster.events == [("a", "promote")]
        b = await cluster.start("b", "auto")
        assert b.role is NodeRole.STANDBY
        await wait_until(in_sync_pair(a, b), what="b in sync with a")
        # The lease records the in-sync standby at the next renewal.
        receiver = b.receiver
        assert receiver is not None
        await wait_until(lambda: cluster.lease().synced == receiver.peer_id, what="synced in the lease")
        assert cluster.lease().holder == "a" and cluster.lease().epoch == 1
        assert a.status.sync == "in_sync" and b.status.sync == "in_sync"

    run(scenario, tmp_path)


def test_role_standby_does_not_take_a_lease_that_was_never_held(tmp_path: Path) -> None:
    async def scenario(cluster: Cluster) -> None:
        b = await cluster.start("b", "standby")
        assert b.role is NodeRole.STANDBY
        assert cluster.lease() == LeaseState()
        a = await cluster.start("a", "active")
        assert a.role is NodeRole.ACTIVE and cluster.lease().holder == "a"
        await wait_until(in_sync_pair(a, b))
        assert cluster.events == [("a", "promote")]

    run(scenario, tmp_path)


def test_ha_configuration_errors_are_reported_at_construction(tmp_path: Path) -> None:
    def factory() -> Store:
        raise AssertionError("not called")

    async def noop(*_: Any) -> None:
        return None

    good = Cluster(tmp_path).config("a")
    memory = load_config(env={}, overrides={"store": {"kind": "memory"}, "ha": {"role": "auto"}})
    with pytest.raises(HaError, match="persistent store"):
        HaNode(memory, factory, on_promote=noop, on_fence=noop)
    no_listen = load_config(
        env={},
        overrides={
            "store": {"data_dir": str(tmp_path)},
            "ha": {"role": "auto", "peer": "127.0.0.1:1", "lock": "x"},
        },
    )
    with pytest.raises(HaError, match=r"\[ha\] listen is required"):
        HaNode(no_listen, factory, on_promote=noop, on_fence=noop)
    no_lock = load_config(
        env={},
        overrides={
            "store": {"data_dir": str(tmp_path)},
            "ha": {"role": "auto", "peer": "127.0.0.1:1", "listen": "127.0.0.1:2"},
        },
    )
    with pytest.raises(HaError, match=r"\[ha\] lock"):
        HaNode(no_lock, factory, on_promote=noop, on_fence=noop)
    assert good.ha.enabled


# --- takeover ------------------------------------------------------------------------------------


def test_the_standby_takes_over_with_the_data_when_the_active_dies(tmp_path: Path) -> None:
    async def scenario(cluster: Cluster) -> None:
        a = await cluster.start("a")
        b = await cluster.start("b")
        await wait_until(in_sync_pair(a, b))
        assert a.store is not None
        await write(a.store, 1, 50)  # confirmed: durable on a and acknowledged by b
        await wait_until(lambda: cluster.lease().synced != "")
        loop = asyncio.get_running_loop()
        await a.stop(release_lease=False)  # as a crash: the lease is left to expire
        died = loop.time()
        await wait_until(lambda: b.role is NodeRole.ACTIVE, what="b to take over")
        assert loop.time() - died < LEASE + 1.0
        assert cluster.lease().holder == "b" and cluster.lease().epoch == 2
        recovered = cluster.servers["b"].recovered
        assert recovered is not None
        assert recovered.queue_messages[("/", "orders")] == list(range(1, 51))
        assert b.status.role == "active" and b.status.epoch == 2

    run(scenario, tmp_path)


def test_the_old_active_rejoins_as_standby_and_resynchronises(tmp_path: Path) -> None:
    async def scenario(cluster: Cluster) -> None:
        a = await cluster.start("a")
        b = await cluster.start("b")
        await wait_until(in_sync_pair(a, b))
        assert a.store is not None
        await write(a.store, 1, 10)
        await wait_until(lambda: cluster.lease().synced != "")
        await a.stop(release_lease=False)
        await wait_until(lambda: b.role is NodeRole.ACTIVE)
        assert b.store is not None
        await write(b.store, 100, 10, "after")  # b goes on alone (a is down)
        a = await cluster.start("a")
        assert a.role is NodeRole.STANDBY  # the lease is b's, alive
        await wait_until(in_sync_pair(b, a), what="a resynchronised from b")
        await write(b.store, 200, 10, "later")
        assert await b.store.drain(5)
        await cluster.stop_all()
        assert store_state(tmp_path / "a" / SQLITE_FILENAME) == store_state(tmp_path / "b" / SQLITE_FILENAME)

    run(scenario, tmp_path)


def test_a_clean_stop_hands_the_lease_over_at_once(tmp_path: Path) -> None:
    async def scenario(cluster: Cluster) -> None:
        a = await cluster.start("a", lease_seconds=4.0)
        b = await cluster.start("b", lease_seconds=4.0)
        await wait_until(in_sync_pair(a, b))
        assert a.store is not None
        await write(a.store, 1, 5)
        await wait_until(lambda: cluster.lease().synced != "")
        loop = asyncio.get_running_loop()
        stopped = loop.time()
        await a.stop()
        await wait_until(lambda: b.role is NodeRole.ACTIVE, what="b to take over")
        assert loop.time() - stopped < 2.0  # well before the 4 s lease would have expired
        recovered = cluster.servers["b"].recovered
        assert recovered is not None and recovered.queue_messages[("/", "orders")] == [1, 2, 3, 4, 5]

    run(scenario, tmp_path)


def test_a_standby_that_was_not_in_sync_does_not_take_over(tmp_path: Path) -> None:
    async def scenario(cluster: Cluster) -> None:
        a = await cluster.start("a")
        b = await cluster.start("b", secret="another secret")  # can never sync
        assert a.store is not None
        await write(a.store, 1, 3)  # confirmed alone after sync_timeout
        assert a.store.sync_state is SyncState.ALONE
        assert cluster.lease().synced == ""
        await a.stop(release_lease=False)
        await wait_until(lambda: "not in sync" in b.status.last_error, what="b to refuse the takeover")
        assert b.role is NodeRole.STANDBY and cluster.lease().holder == "a"
        # The old active comes back: nobody served since, so it takes its lease again.
        a = await cluster.start("a")
        assert a.role is NodeRole.ACTIVE and cluster.lease().epoch == 2
        recovered = cluster.servers["a"].recovered
        assert recovered is not None and recovered.queue_messages[("/", "orders")] == [1, 2, 3]
        assert ("b", "promote") not in cluster.events

    run(scenario, tmp_path)


# --- fencing -------------------------------------------------------------------------------------


class HangingLease(FileLease):
    """A lease whose renewals hang while `hang` is set (a dead shared directory, a stuck thread)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hang = threading.Event()
        self.release_hang = threading.Event()

    def renew(self, synced: str) -> LeaseState:
        if self.hang.is_set():
            self.release_hang.wait(30)
        return super().renew(synced)


def test_an_active_that_cannot_renew_fences_itself_before_the_standby_takes_over(tmp_path: Path) -> None:
    async def scenario(cluster: Cluster) -> None:
        lease = HangingLease(cluster.lock, "a", LEASE)
        a = await cluster.start("a", lease=lease)
        b = await cluster.start("b")
        await wait_until(in_sync_pair(a, b))
        await wait_until(lambda: cluster.lease().synced != "")
        store = a.store
        assert store is not None
        lease.hang.set()
        await wait_until(lambda: b.role is NodeRole.ACTIVE, what="b to take over")
        # a stopped serving before b started, and refuses writes.
        assert cluster.events.index(("a", "fence")) < cluster.events.index(("b", "promote"))
        with pytest.raises(StoreError, match="fenced"):
            store.append(QueueDeclared("/", "late"))
        # a rejoins as standby while its lease thread is still stuck, and b resynchronises it.
        await wait_until(in_sync_pair(b, a), what="a resynchronised as standby")
        lease.release_hang.set()
        await wait_until(lambda: a.status.lease_epoch == 2, what="a to see the new epoch")
        assert a.role is NodeRole.STANDBY

    run(scenario, tmp_path)


def test_a_frozen_active_refuses_the_first_write_after_it_resumes(tmp_path: Path) -> None:
    async def scenario(cluster: Cluster) -> None:
        frozen = {"offset": 0.0}

        def monotonic() -> float:
            return time.monotonic() + frozen["offset"]

        a = await cluster.start("a", monotonic=monotonic)
        store = a.store
        assert store is not None
        await write(store, 1, 1)
        frozen["offset"] = 10.0  # SIGCONT after 10 s: before anything else runs, a write arrives
        with pytest.raises(StoreError, match="lease"):
            store.append(MessageEnqueued("/", ("orders",), Message("", "orders", b"x", PERSISTENT, 2)))
        await wait_until(lambda: ("a", "fence") in cluster.events, what="a to stop serving")
        await wait_until(lambda: a.role is NodeRole.STANDBY)

    run(scenario, tmp_path)


# --- status --------------------------------------------------------------------------------------


def test_status_file_and_ha_status_command(tmp_path: Path) -> None:
    async def scenario(cluster: Cluster) -> None:
        a = await cluster.start("a")
        b = await cluster.start("b")
        await wait_until(in_sync_pair(a, b))
        assert a.store is not None
        await write(a.store, 1, 5)
        await wait_until(lambda: cluster.lease().synced != "")
        await wait_until(
            lambda: (
                json.loads((tmp_path / "a" / STATUS_FILENAME).read_text())["sync"] == "in_sync"
                and json.loads((tmp_path / "b" / STATUS_FILENAME).read_text())["sync"] == "in_sync"
            ),
            what="status files",
        )
        out = io.StringIO()
        assert ha_status.main(cluster.config("a"), out) == 0
        text = out.getvalue()
        assert "role:       active" in text
        assert "epoch:      1" in text
        assert "sync:       in_sync (standby b/" in text
        assert "lag:        0 records" in text
        assert "lease:      held by a, epoch 1" in text
        out = io.StringIO()
        assert ha_status.main(cluster.config("b"), out) == 0
        assert "role:       standby" in out.getvalue() and "sync:       in_sync (active a)" in out.getvalue()

    run(scenario, tmp_path)


def test_ha_status_without_a_status_file_or_with_a_stale_one(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    out = io.StringIO()
    assert ha_status.main(cluster.config("a"), out) == 1
    assert "no HA status" in out.getvalue() and "never held" in out.getvalue()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / STATUS_FILENAME).write_text(
        json.dumps({"node_id": "a", "role": "active", "epoch": 3, "sync": "alone", "updated_at": 1000.0})
    )
    out = io.StringIO()
    assert ha_status.main(cluster.config("a"), out, now=2000.0) == 1
    assert "role:       active" in out.getvalue() and "stale" in out.getvalue()


# --- two processes -------------------------------------------------------------------------------

#: The takeover target: under 3 s from death to accepting connections with lease_seconds = 2.
TAKEOVER_TARGET = 3.0


def test_two_processes_kill_rejoin_freeze_and_fence(tmp_path: Path) -> None:
    ports = free_port(), free_port()
    a = HaPairProcess(tmp_path / "a", tmp_path / "lock", listen=ports[0], peer=ports[1], role="auto")
    b = HaPairProcess(tmp_path / "b", tmp_path / "lock", listen=ports[1], peer=ports[0], role="standby")
    sockets = []
    try:
        a.start()
        poll_until(lambda: a.status().get("role") == "active", 20, "a active")
        b.start()
        poll_until(lambda: b.status().get("sync") == "in_sync", 20, "b in sync")
        b_id = b.status()["node_id"]
        poll_until(
            lambda: a.status().get("lease_synced", "").startswith(b_id + "/"), 10, "the lease to name b"
        )
        client, _ = connect_when_serving(a.serve_port, 10)
        sockets.append(client)
        for n in range(1, 21):
            assert request(client, f"PUT {n}") == f"OK {n}"

        # SIGKILL the active: the standby serves within the target, with every confirmed message.
        a.signal(signal.SIGKILL)
        died = time.monotonic()
        client, accepted = connect_when_serving(b.serve_port, 10)
        sockets.append(client)
        assert accepted - died < TAKEOVER_TARGET, f"took {accepted - died:.2f} s"
        assert request(client, "COUNT") == "20"

        # The old active comes back as the standby and resynchronises.
        assert a.proc is not None
        a.proc.wait(10)
        a.start()
        poll_until(
            lambda: a.status().get("role") == "standby" and a.status().get("sync") == "in_sync", 20, "a"
        )
        a_id = a.status()["node_id"]
        poll_until(
            lambda: b.status().get("lease_synced", "").startswith(a_id + "/"), 10, "the lease to name a"
        )
        for n in range(21, 31):
            assert request(client, f"PUT {n}") == f"OK {n}"

        # SIGSTOP the active: the standby takes over; once resumed, the frozen node fences itself
        # without accepting the write that was waiting for it.
        frozen_client = client
        b.signal(signal.SIGSTOP)
        frozen = time.monotonic()
        client, accepted = connect_when_serving(a.serve_port, 10)
        sockets.append(client)
        assert accepted - frozen < TAKEOVER_TARGET, f"took {accepted - frozen:.2f} s"
        assert request(client, "COUNT") == "30"
        frozen_client.sendall(b"PUT 99\n")
        b.signal(signal.SIGCONT)
        frozen_client.settimeout(10)
        try:
            answer = frozen_client.recv(4096).decode()
        except ConnectionResetError:
            answer = ""  # the fenced node dropped its clients
        assert not answer.startswith("OK"), answer
        poll_until(
            lambda: b.status().get("role") == "standby" and b.status().get("sync") == "in_sync", 20, "b"
        )
        assert request(client, "COUNT") == "30"
    except BaseException:
        print("--- a ---", a.log()[-4000:], "--- b ---", b.log()[-4000:], sep="\n")
        raise
    finally:
        for sock in sockets:
            sock.close()
        a.kill()
        b.kill()
