"""The lease that decides which node of an active/standby pair is active.

Who is active is decided by a lease held in an existing, trusted arbiter, never by the two nodes
voting. `Lease` is the interface; `FileLease` is the first backend: a lease file in a directory
both nodes share (NFS, SMB, a cloud file share), written under an exclusive `flock`.

Theory of operation
-------------------
The lease is a small record `{holder, epoch, renewed_at, synced}` (`LeaseState`). `renewed_at` is
the holder's wall clock at its last renewal (the heartbeat); `epoch` grows by one at every
acquisition, so each period of activity has its own number; `synced` names the standby that
holds every record the active confirmed ("" while the active runs alone), which tells a standby
whether taking over would lose confirmed messages.

- Acquire: a node may take the lease when it was never held or when `renewed_at` is older than
  `lease_seconds` (the holder died, hung, or released it). Taking it writes epoch + 1.
- Renew: the holder rewrites `renewed_at` every `lease_seconds / 4`; it finds out there that it
  lost the lease (another holder or epoch) and must stop serving at once.
- Self-fencing: a process frozen by SIGSTOP keeps a `flock` but not its heartbeat. So the flock
  is held only for the instant of a read-modify-write, and the holder judges its own lease by
  its monotonic clock: it is valid until `lease_seconds` after the start of its last successful
  renewal (`valid_until`). After a SIGSTOP the monotonic clock has moved on, so a resumed holder
  knows it lost the lease before it handles anything, without reading the file. The standby only
  takes over once the wall-clock `renewed_at` (written after that start) is older than
  `lease_seconds`: with agreeing clocks the holder always gives up first. Clocks of the two
  hosts must agree to well within `lease_seconds` (NTP does).

The monotonic clock is CLOCK_BOOTTIME where the platform has it: unlike CLOCK_MONOTONIC it keeps
counting while the host is suspended, so a suspended-and-resumed VM fences itself too.

The record lives in `polybroker-ha.lease` (JSON, replaced atomically by rename, so a reader
never sees half a record and a crash never leaves one); `polybroker-ha.lock` is the file that is
flocked. Methods do blocking file I/O: call them from a worker thread, not from an event loop.

Must not import: asyncio, protocols, storage, broker.core.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Final

log = logging.getLogger("polybroker.cluster.lease")

LEASE_FILENAME: Final = "polybroker-ha.lease"
LOCK_FILENAME: Final = "polybroker-ha.lock"

#: How often a node retries a flock that is taken (it is held for microseconds at a time).
_LOCK_RETRY_SECONDS: Final = 0.005


_CLOCK_ID: Final = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def monotonic_clock() -> float:
    """Monotonic seconds that keep counting while the host is suspended (CLOCK_BOOTTIME)."""
    return time.clock_gettime(_CLOCK_ID)


@dataclass(frozen=True, slots=True)
class LeaseState:
    """The lease record as the arbiter holds it."""

    holder: str = ""  # node id of the active; "" if the lease was never held
    epoch: int = 0  # +1 at every acquisition
    renewed_at: float = 0.0  # holder's wall clock at its last renewal; 0 once released
    synced: str = ""  # the standby (peer id) holding every confirmed record; "" = active alone

    def expired(self, now: float, lease_seconds: float) -> bool:
        return now - self.renewed_at > lease_seconds


class LeaseError(Exception):
    """The arbiter cannot be read or written (the message says what and where)."""


class LeaseLost(Exception):
    """The lease is no longer ours: another holder or epoch, or our own renewal is too old."""

    def __init__(self, reason: str, state: LeaseState | None = None) -> None:
        super().__init__(reason)
        self.state = state


class Lease(ABC):
    """An exclusive, expiring lease with an epoch, held in a trusted arbiter.

    `acquire`, `renew`, `release` and `read` may block on I/O. `held` and `valid_until` only look
    at the local monotonic clock, so they are cheap enough for a write path.
    """

    def __init__(self, node_id: str, lease_seconds: float, monotonic: Callable[[], float]) -> None:
        if not node_id:
            raise ValueError("a lease needs a node id")
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be positive, got {lease_seconds!r}")
        self.node_id = node_id
        self.lease_seconds = lease_seconds
        self._monotonic = monotonic
        self._epoch = 0  # the epoch we hold, 0 if none
        self._valid_until = -math.inf  # monotonic deadline of our lease

    @property
    def epoch(self) -> int:
        """The epoch this node holds (0 when it holds none)."""
        return self._epoch

    @property
    def valid_until(self) -> float:
        """Monotonic time at which our lease lapses unless renewed (-inf when not held)."""
        return self._valid_until

    def held(self) -> bool:
        return self._monotonic() < self._valid_until

    def _lose(self) -> None:
        self._epoch = 0
        self._valid_until = -math.inf

    @abstractmethod
    def read(self) -> LeaseState:
        """The current lease record (no change)."""

    @abstractmethod
    def acquire(self, may_take: Callable[[LeaseState], bool]) -> LeaseState | None:
        """Take the lease, atomically, if it is expired or was never held and `may_take(current)`
        agrees; the new record has epoch + 1. Returns it, or None when the lease stays as it is."""

    @abstractmethod
    def renew(self, synced: str) -> LeaseState:
        """Extend our lease and record which standby is in sync ("" = none).

        Raises LeaseLost when the lease is no longer ours, including when our previous renewal is
        older than `lease_seconds` by the monotonic clock (we may have been frozen).
        """

    @abstractmethod
    def release(self) -> None:
        """Give the lease up (clean shutdown): the standby may take it at once."""


class FileLease(Lease):
    """A lease in a shared directory: `polybroker-ha.lease` written under a flock on
    `polybroker-ha.lock`. See the module docstring."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        node_id: str,
        lease_seconds: float,
        *,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = monotonic_clock,
    ) -> None:
        super().__init__(node_id, lease_seconds, monotonic)
        self.directory = Path(directory)
        self.path = self.directory / LEASE_FILENAME
        self._lock_path = self.directory / LOCK_FILENAME
        self._wall = wall

    # --- the file ------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LeaseError(f"cannot open the lease lock {self._lock_path}: {exc.strerror or exc}") from None
        try:
            # A holder frozen inside its read-modify-write would keep the flock forever: poll, so
            # that the caller gets an error it can log instead of hanging without a word.
            deadline = self._monotonic() + self.lease_seconds
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if self._monotonic() >= deadline:
                        raise LeaseError(
                            f"{self._lock_path} stayed locked for {self.lease_seconds:g} s "
                            "(is a node frozen while writing the lease?)"
                        ) from None
                    time.sleep(_LOCK_RETRY_SECONDS)  # polling a lock held by another process
            yield
        finally:
            os.close(fd)  # releases the flock

    def _load(self) -> LeaseState:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return LeaseState()
        except OSError as exc:
            raise LeaseError(f"cannot read the lease {self.path}: {exc.strerror or exc}") from None
        try:
            data = json.loads(raw)
            state = LeaseState(
                holder=data["holder"],
                epoch=data["epoch"],
                renewed_at=data["renewed_at"],
                synced=data["synced"],
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise LeaseError(f"{self.path}: not a lease record ({exc})") from None
        if (
            not isinstance(state.holder, str)
            or not isinstance(state.synced, str)
            or type(state.epoch) is not int
            or not isinstance(state.renewed_at, int | float)
        ):
            raise LeaseError(f"{self.path}: not a lease record (wrong field types)")
        return state

    def _store(self, state: LeaseState, new_epoch: bool) -> None:
        tmp = self.path.with_name(f"{LEASE_FILENAME}.{self.node_id}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as file:
                json.dump(asdict(state), file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, self.path)
            if new_epoch:
                # An epoch must never go back, even after a crash of the arbiter's host.
                dir_fd = os.open(self.directory, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except OSError as exc:
            raise LeaseError(f"cannot write the lease {self.path}: {exc.strerror or exc}") from None

    # --- the interface -------------------------------------------------------------------------

    def read(self) -> LeaseState:
        # The record is replaced by rename: a read without the flock sees the old or the new one.
        return self._load()

    def acquire(self, may_take: Callable[[LeaseState], bool]) -> LeaseState | None:
        started = self._monotonic()
        with self._locked():
            current = self._load()
            never_held = current.holder == "" and current.epoch == 0
            if not (never_held or current.expired(self._wall(), self.lease_seconds)):
                return None
            if not may_take(current):
                return None
            state = LeaseState(self.node_id, current.epoch + 1, self._wall(), "")
            self._store(state, new_epoch=True)
        self._epoch = state.epoch
        self._valid_until = started + self.lease_seconds
        log.info("took the lease at epoch %d (previous holder %r)", state.epoch, current.holder)
        return state

    def renew(self, synced: str) -> LeaseState:
        started = self._monotonic()
        if started >= self._valid_until:
            epoch = self._epoch
            self._lose()
            raise LeaseLost(
                f"our lease (epoch {epoch}) was not renewed for {self.lease_seconds:g} s"
                if epoch
                else "we do not hold the lease"
            )
        with self._locked():
            current = self._load()
            if current.holder != self.node_id or current.epoch != self._epoch:
                epoch = self._epoch
                self._lose()
                raise LeaseLost(
                    f"the lease moved to {current.holder!r} at epoch {current.epoch} (ours was {epoch})",
                    current,
                )
            state = replace(current, renewed_at=self._wall(), synced=synced)
            self._store(state, new_epoch=False)
        self._valid_until = started + self.lease_seconds
        return state

    def release(self) -> None:
        epoch = self._epoch
        self._lose()
        if not epoch:
            return
        with self._locked():
            current = self._load()
            if current.holder == self.node_id and current.epoch == epoch:
                # Keep holder, epoch and synced: they tell the standby it may take over now.
                self._store(replace(current, renewed_at=0.0), new_epoch=False)
                log.info("released the lease (epoch %d)", epoch)
