"""FileLease: acquire, renew, expiry, takeover, epochs and self-fencing, in a real temp directory.

Time is injected: `Clocks` gives each node a wall clock (shared, like NTP-synchronised hosts) and
its own monotonic clock, so a test can freeze one node (its monotonic clock jumps on resume)
without waiting.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path

import pytest

from cluster.lease import LEASE_FILENAME, LOCK_FILENAME, FileLease, LeaseError, LeaseLost, LeaseState

LEASE_SECONDS = 2.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Clocks:
    """One wall clock shared by both nodes, and one monotonic clock per node."""

    def __init__(self) -> None:
        self.wall = Clock(1_700_000_000.0)
        self.mono = {"a": Clock(100.0), "b": Clock(5000.0)}

    def advance(self, seconds: float) -> None:
        self.wall.now += seconds
        for clock in self.mono.values():
            clock.now += seconds

    def lease(self, directory: Path, node: str) -> FileLease:
        return FileLease(directory, node, LEASE_SECONDS, wall=self.wall, monotonic=self.mono[node])


def always(state: LeaseState) -> bool:
    return True


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


def test_a_never_held_lease_is_acquired_at_epoch_1(tmp_path: Path, clocks: Clocks) -> None:
    a = clocks.lease(tmp_path, "a")
    assert a.read() == LeaseState()
    state = a.acquire(always)
    assert state == LeaseState("a", 1, clocks.wall.now, "")
    assert a.read() == state
    assert a.epoch == 1 and a.held()
    assert a.valid_until == clocks.mono["a"].now + LEASE_SECONDS
    assert json.loads((tmp_path / LEASE_FILENAME).read_text())["epoch"] == 1


def test_a_held_lease_is_not_taken(tmp_path: Path, clocks: Clocks) -> None:
    a, b = clocks.lease(tmp_path, "a"), clocks.lease(tmp_path, "b")
    a.acquire(always)
    clocks.advance(LEASE_SECONDS)  # exactly lease_seconds old: not yet expired
    assert b.acquire(always) is None
    assert not b.held() and b.epoch == 0
    assert a.read().holder == "a"


def test_renewal_extends_the_lease_and_records_the_synced_standby(tmp_path: Path, clocks: Clocks) -> None:
    a, b = clocks.lease(tmp_path, "a"), clocks.lease(tmp_path, "b")
    a.acquire(always)
    for _ in range(5):
        clocks.advance(LEASE_SECONDS * 0.75)
        state = a.renew("b/1234")
        assert state.renewed_at == clocks.wall.now and state.synced == "b/1234" and state.epoch == 1
        assert a.held()
    assert b.acquire(always) is None  # 7.5 s after acquisition, still held
    assert a.read().synced == "b/1234"


def test_an_expired_lease_is_taken_over_with_the_next_epoch(tmp_path: Path, clocks: Clocks) -> None:
    a, b = clocks.lease(tmp_path, "a"), clocks.lease(tmp_path, "b")
    a.acquire(always)
    a.renew("b/1")
    seen: list[LeaseState] = []
    clocks.advance(LEASE_SECONDS + 0.01)

    def may_take(current: LeaseState) -> bool:
        seen.append(current)
        return True

    state = b.acquire(may_take)
    assert seen == [LeaseState("a", 1, clocks.wall.now - LEASE_SECONDS - 0.01, "b/1")]
    assert state == LeaseState("b", 2, clocks.wall.now, "")
    assert b.epoch == 2 and b.held()


def test_each_takeover_increments_the_epoch_even_by_the_same_holder(tmp_path: Path, clocks: Clocks) -> None:
    a, b = clocks.lease(tmp_path, "a"), clocks.lease(tmp_path, "b")
    epochs = []
    for lease in (a, b, a, a, b):
        state = lease.acquire(always)
        assert state is not None
        epochs.append(state.epoch)
        clocks.advance(LEASE_SECONDS + 1)
    assert epochs == [1, 2, 3, 4, 5]


def test_the_old_holder_finds_the_higher_epoch_when_it_renews(tmp_path: Path, clocks: Clocks) -> None:
    a, b = clocks.lease(tmp_path, "a"), clocks.lease(tmp_path, "b")
    a.acquire(always)
    clocks.wall.now += LEASE_SECONDS + 1  # a's renewals did not reach the arbiter; a's clock did not see it
    b.acquire(always)
    with pytest.raises(LeaseLost, match="moved to 'b' at epoch 2") as lost:
        a.renew("")
    assert lost.value.state is not None and lost.value.state.epoch == 2
    assert not a.held() and a.epoch == 0
    assert a.read().holder == "b"  # the failed renewal changed nothing


def test_a_holder_whose_renewal_is_stale_fences_itself_without_the_arbiter(
    tmp_path: Path, clocks: Clocks
) -> None:
    a = clocks.lease(tmp_path, "a")
    a.acquire(always)
    assert a.held()
    # SIGSTOP for 10 s: on resume the monotonic clock has moved on. Nobody took over, yet the
    # holder must not serve: a standby may be taking over at this very moment.
    clocks.mono["a"].now += 10
    assert not a.held()
    with pytest.raises(LeaseLost, match="not renewed for 2 s"):
        a.renew("")
    assert a.read() == LeaseState("a", 1, clocks.wall.now, "")  # the file was not touched


def test_a_holder_is_valid_until_lease_seconds_after_its_last_renewal_started(
    tmp_path: Path, clocks: Clocks
) -> None:
    a = clocks.lease(tmp_path, "a")
    a.acquire(always)
    clocks.advance(1.5)
    a.renew("")
    clocks.mono["a"].now += LEASE_SECONDS - 0.001
    assert a.held()
    clocks.mono["a"].now += 0.001
    assert not a.held()


def test_may_take_can_refuse_an_expired_lease(tmp_path: Path, clocks: Clocks) -> None:
    a, b = clocks.lease(tmp_path, "a"), clocks.lease(tmp_path, "b")
    a.acquire(always)
    clocks.advance(LEASE_SECONDS + 1)
    assert b.acquire(lambda current: current.synced == "b/me") is None
    assert a.read().holder == "a" and a.read().epoch == 1


def test_a_released_lease_can_be_taken_at_once(tmp_path: Path, clocks: Clocks) -> None:
    a, b = clocks.lease(tmp_path, "a"), clocks.lease(tmp_path, "b")
    a.acquire(always)
    a.renew("b/1")
    a.release()
    assert not a.held()
    released = a.read()
    assert released == LeaseState("a", 1, 0.0, "b/1")  # holder, epoch and synced stay for the standby
    state = b.acquire(lambda current: current.synced == "b/1")
    assert state is not None and state.epoch == 2


def test_release_does_not_touch_a_lease_taken_by_another(tmp_path: Path, clocks: Clocks) -> None:
    a, b = clocks.lease(tmp_path, "a"), clocks.lease(tmp_path, "b")
    a.acquire(always)
    clocks.wall.now += LEASE_SECONDS + 1
    taken = b.acquire(always)
    a.release()
    assert b.read() == taken


def test_a_corrupt_lease_record_is_an_error_not_a_free_lease(tmp_path: Path, clocks: Clocks) -> None:
    (tmp_path / LEASE_FILENAME).write_text('{"holder": "a", "epoch": "one"}')
    lease = clocks.lease(tmp_path, "b")
    with pytest.raises(LeaseError, match="not a lease record"):
        lease.acquire(always)
    (tmp_path / LEASE_FILENAME).write_text("garbage")
    with pytest.raises(LeaseError, match="not a lease record"):
        lease.read()


def test_a_flock_held_by_a_frozen_process_is_reported_not_waited_for_forever(tmp_path: Path) -> None:
    # A holder frozen inside its read-modify-write keeps the flock; the others get an error.
    fd = os.open(tmp_path / LOCK_FILENAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        lease = FileLease(tmp_path, "b", 0.05)
        with pytest.raises(LeaseError, match="stayed locked"):
            lease.acquire(always)
    finally:
        os.close(fd)
    assert FileLease(tmp_path, "b", 0.05).acquire(always) is not None


def test_concurrent_acquisitions_elect_exactly_one_holder(tmp_path: Path) -> None:
    leases = [FileLease(tmp_path, f"node{i}", 30.0) for i in range(8)]
    results: list[LeaseState | None] = [None] * len(leases)
    barrier = threading.Barrier(len(leases))

    def take(index: int) -> None:
        barrier.wait()
        results[index] = leases[index].acquire(always)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(leases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [state for state in results if state is not None]
    assert len(winners) == 1 and winners[0].epoch == 1
    assert FileLease(tmp_path, "reader", 30.0).read() == winners[0]


def test_a_lease_needs_a_node_id_and_a_positive_period(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        FileLease(tmp_path, "", 2.0)
    with pytest.raises(ValueError):
        FileLease(tmp_path, "a", 0)
