"""Crash safety of SqliteStore: what was reported durable survives SIGKILL at any point.

A child process (crash_child.py) appends enqueues and removals in a loop and prints every
`when_durable` confirmation. The test kills it with SIGKILL at a random moment after enough
confirmations arrived, reopens the store and checks, round after round on the same database:

- every confirmed enqueue that no removal was ever attempted for is present, with its body;
- no confirmed removal comes back;
- message ids are unique: a new round never reuses an id, and the recovered high-water mark is
  above every id in the store.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

from storage.sqlite import SqliteStore

CHILD = Path(__file__).with_name("crash_child.py")
ROUNDS = 6
LINE_TIMEOUT = 15.0

Pair = tuple[int, str]


def parse_pairs(text: str) -> set[Pair]:
    found = set()
    for item in text.split():
        msg_id, queue_name = item.split("/")
        found.add((int(msg_id), queue_name))
    return found


class ChildOutput:
    """Reads the child's stdout on a thread; counts confirmations so the test can wait on them."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.lines: list[str] = []
        self._confirmations = 0
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            if not raw.endswith(b"\n"):
                break  # cut short by the kill: never completed, so never reported
            with self._changed:
                self.lines.append(raw.decode())
                self._confirmations += raw.startswith(b"C ")
                self._changed.notify_all()

    def wait_for_confirmations(self, count: int) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: self._confirmations >= count, timeout=LINE_TIMEOUT):
                raise AssertionError(f"child confirmed {self._confirmations} groups, expected {count}")

    def wait_closed(self) -> None:
        self._thread.join(LINE_TIMEOUT)
        assert not self._thread.is_alive()


def test_confirmed_state_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "crash.sqlite3"
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    confirmed_enqueued: set[Pair] = set()
    attempted_removals: set[Pair] = set()
    confirmed_removals: set[Pair] = set()
    ids_used: set[int] = set()
    next_msg_id = 1

    for round_no in range(ROUNDS):
        proc = subprocess.Popen(
            [sys.executable, str(CHILD), str(path), str(seed + round_no)],
            stdout=subprocess.PIPE,
            cwd=CHILD.parents[2],
        )
        try:
            output = ChildOutput(proc)
            output.wait_for_confirmations(rng.randint(1, 30))
            # Then let it run on for a random while, so the kill lands anywhere in the write cycle.
            threading.Event().wait(rng.uniform(0.05, 0.5))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        output.wait_closed()
        assert proc.returncode == -signal.SIGKILL

        round_ids: set[int] = set()
        for line in output.lines:
            kind, _, rest = line.partition(" ")
            if kind == "A":
                attempted_removals |= parse_pairs(rest)
            else:
                enqueued_text, _, removed_text = rest.partition("|")
                enqueued = parse_pairs(enqueued_text)
                confirmed_enqueued |= enqueued
                confirmed_removals |= parse_pairs(removed_text)
                round_ids |= {msg_id for msg_id, _ in enqueued}
        context = f"seed {seed}, round {round_no}"
        assert round_ids, context
        assert min(round_ids) >= next_msg_id, f"{context}: an id was reused"
        assert not round_ids & ids_used, f"{context}: an id was reused"
        ids_used |= round_ids

        store = SqliteStore(path, lambda callback: None)
        recovered = store.open()
        try:
            present: set[Pair] = set()
            for (vhost, queue_name), ids in recovered.queue_messages.items():
                assert vhost == "/" and queue_name in ("q1", "q2"), context
                assert ids == sorted(set(ids)), f"{context}: {queue_name} ids not unique and ordered"
                present |= {(msg_id, queue_name) for msg_id in ids}
            must_exist = confirmed_enqueued - attempted_removals
            assert not must_exist - present, (
                f"{context}: confirmed messages lost: {sorted(must_exist - present)[:10]}"
            )
            assert not confirmed_removals & present, (
                f"{context}: confirmed removals came back: {sorted(confirmed_removals & present)[:10]}"
            )
            present_ids = sorted({msg_id for msg_id, _ in present})
            assert [m.body for m in store.load_messages(present_ids)] == [b"m%d" % i for i in present_ids], (
                context
            )
            assert recovered.next_msg_id > max(ids_used | set(present_ids)), context
            next_msg_id = recovered.next_msg_id
        finally:
            store.close()
