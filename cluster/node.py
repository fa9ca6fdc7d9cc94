"""An HA node: the role state machine of one broker of an active/standby pair.

The composition root builds one `HaNode` when `[ha] role` is set and hands it two callbacks:
`on_promote(store)` (build the core over `store`, open the client listeners) and `on_fence()`
(close the listeners and client connections at once). The node owns the lease, the replication
link and the store it hands over; the server never opens or closes that store itself.

Theory of operation
-------------------
    start --lease free/expired and ours to take--> ACTIVE
    start --otherwise--> STANDBY --the active's lease lapsed, ours to take--> ACTIVE
    ACTIVE --lease lost, lapsed (frozen) or a newer epoch seen--> FENCED --> STANDBY

Taking the lease: roles `active` and `auto` take a lease that was never held; `standby` waits
for an active to appear. An expired lease is taken by its previous holder (nobody served since,
so its store is the newest), or by the standby the holder recorded as in sync (`synced` names
this process's receiver, whose store is consistent for that very epoch). Any other expired lease
is left alone, loudly: its holder may have confirmed messages this node does not have.

ACTIVE: the store handed to `on_promote` is a `ReplicatedStore` around a fresh store from
`store_factory`. The lease is renewed every `lease_seconds / 4`, recording which standby is in
sync; the store checks the lease's monotonic deadline on every write, so a node frozen past its
lease refuses the first write after it resumes, before this loop runs again.

STANDBY: a `ReplicationReceiver` listens on `[ha] listen` and applies the active's records to
this node's store. The lease is read every `lease_seconds / 8` (or right at its expiry). To take
over, the receiver is stopped (its store flushed and closed: everything received is applied),
then the node promotes itself.

FENCED: the server is told to stop serving (`on_fence`), the store is closed, and the node
rejoins as a standby; the active's snapshot then resynchronises it. The step-down starts the
moment the store fences, in its own task: a lease write hanging on a dead shared directory must
not keep the client listeners open. Transitions (promote, step down, rejoin) are serialised by
one lock.

Every state change and every loop turn writes `ha-status.json` in the data directory, which
`polybroker ha status` (cluster/status.py) prints.

Must not import: protocols, broker.core.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final, TypeVar

from broker.config import Config, parse_host_port
from broker.journal import Store
from cluster.lease import FileLease, Lease, LeaseError, LeaseLost, LeaseState, monotonic_clock
from cluster.replication import (
    LinkTls,
    ReplicatedStore,
    ReplicationReceiver,
    ReplicationSettings,
    SyncState,
)

log = logging.getLogger("polybroker.cluster")

STATUS_FILENAME: Final = "ha-status.json"
NODE_ID_FILENAME: Final = "ha-node-id"
HA_ROLES: Final = ("active", "standby", "auto")

_T = TypeVar("_T")


class HaError(Exception):
    """HA cannot run with this configuration or environment (one line, for the operator)."""


class NodeRole(enum.Enum):
    STARTING = "starting"
    STANDBY = "standby"
    ACTIVE = "active"
    FENCED = "fenced"  # stopped serving; about to rejoin as standby
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class HaStatus:
    """What `polybroker ha status` shows and what metrics export.

    `sync` is, on the active, the `SyncState` (in_sync, waiting, alone, fenced); on a standby,
    in_sync (linked, store consistent), catching_up (linked, snapshot not complete) or
    not_in_sync (no link). `lag_records` counts records the active appended and the standby has
    not acknowledged as durable.
    """

    node_id: str
    role: str
    epoch: int
    sync: str
    link: str
    peer: str  # on the active: the standby's peer id; on a standby: the active's node id
    lag_records: int
    lag_bytes: int
    lease_holder: str
    lease_epoch: int
    lease_synced: str
    last_error: str
    updated_at: float
    pid: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_node_id(data_dir: Path, configured: str) -> str:
    """The configured node id, else the one stored in the data directory (created once)."""
    if configured:
        return configured
    path = data_dir / NODE_ID_FILENAME
    try:
        stored = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        stored = ""
    except OSError as exc:
        raise HaError(f"cannot read {path}: {exc.strerror or exc}") from None
    if stored:
        return stored
    node_id = secrets.token_hex(6)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(node_id + "\n", encoding="utf-8")
    except OSError as exc:
        raise HaError(f"cannot write {path}: {exc.strerror or exc}") from None
    return node_id


def _address(value: str, key: str) -> tuple[str, int]:
    if not value:
        raise HaError(f"[ha] {key} is required when [ha] role is set")
    try:
        return parse_host_port(value)
    except ValueError as exc:
        raise HaError(f"[ha] {key}: {exc}") from None


class HaNode:
    """One node of an active/standby pair (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        store_factory: Callable[[], Store],
        *,
        on_promote: Callable[[Store], Awaitable[None]],
        on_fence: Callable[[], Awaitable[None]],
        lease: Lease | None = None,
        tls: LinkTls | None = None,
        monotonic: Callable[[], float] = monotonic_clock,
        wall: Callable[[], float] = time.time,
    ) -> None:
        ha = config.ha
        if ha.role not in HA_ROLES:
            raise HaError(f"[ha] role must be one of {', '.join(HA_ROLES)}, got {ha.role!r}")
        if config.store.kind != "sqlite":
            raise HaError('HA needs a persistent store: set [store] kind = "sqlite"')
        if lease is None and not ha.lock:
            raise HaError(
                "[ha] lock (the shared directory holding the lease) is required when [ha] role is set"
            )
        self._config = config
        self._role_config = ha.role
        self._peer = _address(ha.peer, "peer")
        self._listen = _address(ha.listen, "listen")
        self._data_dir = Path(config.store.data_dir)
        self._store_factory = store_factory
        self._on_promote = on_promote
        self._on_fence = on_fence
        self._tls = tls
        self._monotonic = monotonic
        self._wall = wall
        self._lease_seconds = ha.lease_seconds
        self._sync_timeout = ha.sync_timeout
        self.node_id = ha.node_id
        self._lease: Lease | None = lease
        self._settings: ReplicationSettings | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._step_downs: set[asyncio.Task[None]] = set()
        self._transition = asyncio.Lock()
        self._wake = asyncio.Event()
        self._stopping = False
        self.role = NodeRole.STARTING
        self._lease_state = LeaseState()
        self._replicated: ReplicatedStore | None = None
        self._receiver: ReplicationReceiver | None = None
        self._last_error = ""
        self._refusal_logged: tuple[str, int] | None = None
        self._status_written: dict[str, Any] = {}
        self._status_written_at = 0.0

    # --- public API -------------------------------------------------------------------------------

    @property
    def store(self) -> ReplicatedStore | None:
        """The store handed to `on_promote`, while this node is active."""
        return self._replicated

    @property
    def receiver(self) -> ReplicationReceiver | None:
        """The replication receiver, while this node is a standby."""
        return self._receiver

    async def start(self) -> None:
        """Decide the first role and take it: promote (calling `on_promote`) or start as standby.

        Raises HaError when HA cannot run (unreadable lease, port in use); exceptions of
        `on_promote` propagate (the lease is released first).
        """
        self._data_dir.mkdir(parents=True, exist_ok=True)
        self.node_id = load_node_id(self._data_dir, self.node_id)
        ha = self._config.ha
        if not ha.secret:
            log.warning("[ha] secret is empty: the replication link is not protected by a shared secret")
        self._settings = ReplicationSettings(
            node_id=self.node_id,
            secret=ha.secret.encode(),
            sync_timeout=ha.sync_timeout,
            tls=self._tls,
            max_frame=max(64 << 20, 2 * self._config.limits.max_frame_size + (1 << 20)),
        )
        if self._lease is None:
            self._lease = FileLease(
                ha.lock, self.node_id, ha.lease_seconds, wall=self._wall, monotonic=self._monotonic
            )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ha-lease")
        try:
            state = await self._lease_call(self._lease.read)
            self._lease_state = state
            if self._takeable(state):
                acquired = await self._lease_call(self._lease.acquire, self._take_rule())
                if acquired is not None:
                    await self._promote(acquired)
            if self.role is not NodeRole.ACTIVE:
                async with self._transition:
                    await self._become_standby()
        except LeaseError as exc:
            self._executor.shutdown(wait=False)
            raise HaError(str(exc)) from None
        except BaseException:
            self._executor.shutdown(wait=False)
            raise
        self._write_status(force=True)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self, *, release_lease: bool = True) -> None:
        """Leave the pair. With `release_lease` (a clean shutdown) an active first waits up to
        `sync_timeout` for the standby to have everything, then hands the lease over at once;
        without it, the peer takes over only when the lease expires (as after a crash)."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self._step_downs:
            await asyncio.gather(*self._step_downs)
        loop = asyncio.get_running_loop()
        replicated, self._replicated = self._replicated, None
        if replicated is not None:
            if release_lease:
                await replicated.drain(self._sync_timeout)
            await loop.run_in_executor(None, replicated.close)
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            await receiver.stop()
        if release_lease and self._lease is not None and self._lease.epoch:
            try:
                await self._lease_call(self._lease.release)
            except LeaseError as exc:
                log.warning("cannot release the lease: %s", exc)
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        self.role = NodeRole.STOPPED
        self._write_status(force=True)

    @property
    def status(self) -> HaStatus:
        sync = link = peer = ""
        lag_records = lag_bytes = 0
        epoch = self._lease_state.epoch
        last_error = self._last_error
        replicated = self._replicated
        receiver = self._receiver
        if replicated is not None:
            replication = replicated.status()
            epoch = replication.epoch
            sync, link, peer = replication.sync.value, replication.link.value, replication.standby
            lag_records, lag_bytes = replication.lag_records, replication.lag_bytes
            last_error = last_error or replication.last_error
        elif receiver is not None:
            received = receiver.status()
            epoch = max(epoch, received.known_epoch)
            if received.connected:
                sync = "in_sync" if received.consistent else "catching_up"
                link = "streaming" if received.consistent else "catching_up"
                peer = received.active
                lag_records = max(0, received.active_seq - received.acked)
            else:
                sync, link = "not_in_sync", "down"
            last_error = last_error or received.last_error
        lease = self._lease_state
        return HaStatus(
            node_id=self.node_id,
            role=self.role.value,
            epoch=epoch,
            sync=sync,
            link=link,
            peer=peer,
            lag_records=lag_records,
            lag_bytes=lag_bytes,
            lease_holder=lease.holder,
            lease_epoch=lease.epoch,
            lease_synced=lease.synced,
            last_error=last_error,
            updated_at=self._wall(),
            pid=os.getpid(),
        )

    # --- the loop ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            delay = self._lease_seconds / 8
            try:
                if self.role is NodeRole.ACTIVE:
                    delay = await self._active_turn()
                elif self.role is NodeRole.STANDBY:
                    delay = await self._standby_turn()
                else:
                    # A failed promotion, or a step-down that could not rejoin: rejoin now.
                    async with self._transition:
                        if self._replicated is None and self._receiver is None:
                            await self._become_standby()
            except LeaseError as exc:
                self._note_error(f"lease: {exc}")
            except Exception as exc:
                log.exception("HA node: unexpected failure")
                self._note_error(f"{type(exc).__name__}: {exc}")
                if self.role is NodeRole.ACTIVE:
                    await self._step_down(f"unexpected failure: {exc}")
            self._write_status()
            if self._stopping:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass

    async def _active_turn(self) -> float:
        replicated = self._replicated
        lease = self._lease
        assert replicated is not None and lease is not None
        if replicated.sync_state is SyncState.FENCED:
            await self._step_down(replicated.fence_reason)
            return 0.0
        try:
            state = await self._lease_call(lease.renew, replicated.synced_standby)
        except LeaseLost as exc:
            if exc.state is not None:
                self._lease_state = exc.state
            replicated.fence(str(exc))
            await self._step_down(str(exc))
            return 0.0
        if self._replicated is replicated:  # not fenced while the renewal was on its way
            self._lease_state = state
            replicated.extend_lease(lease.valid_until)
        return self._lease_seconds / 4

    async def _standby_turn(self) -> float:
        receiver = self._receiver
        lease = self._lease
        assert receiver is not None and lease is not None
        state = self._lease_state = await self._lease_call(lease.read)
        receiver.observe_epoch(state.epoch)
        poll = self._lease_seconds / 8
        if not self._expired(state):
            # Look again right after it would expire, if that is sooner than the next poll.
            return max(0.0, min(poll, state.renewed_at + self._lease_seconds - self._wall() + 0.01))
        if not self._takeable(state):
            return poll
        acquired = await self._lease_call(lease.acquire, self._take_rule())
        if acquired is not None:
            await self._promote(acquired)
        return 0.0

    def _expired(self, state: LeaseState) -> bool:
        never_held = state.holder == "" and state.epoch == 0
        return never_held or state.expired(self._wall(), self._lease_seconds)

    def _takeable(self, state: LeaseState) -> bool:
        """Whether this node may take `state` if it is expired (logs why not, once per epoch)."""
        if not self._expired(state):
            return False
        if self._take_rule()(state):
            return True
        if self._refusal_logged != (state.holder, state.epoch):
            self._refusal_logged = (state.holder, state.epoch)
            if state.holder == "":
                log.info("no node is active yet; this node (role standby) waits for one")
            else:
                self._last_error = (
                    f"the lease of {state.holder} (epoch {state.epoch}) expired, but this node was not in sync "
                    f"with it: not taking over, as that would lose messages it confirmed (start {state.holder} again)"
                )
                log.error("%s", self._last_error)
        return False

    def _take_rule(self) -> Callable[[LeaseState], bool]:
        """The takeover rule, evaluated again under the lease's lock (module docstring)."""
        role, me = self._role_config, self.node_id
        receiver = self._receiver
        peer_id = receiver.peer_id if receiver is not None else None
        consistent = receiver is not None and receiver.consistent
        synced_epoch = receiver.synced_epoch if receiver is not None else 0

        def may_take(state: LeaseState) -> bool:
            if state.holder == "":
                return role != "standby"
            if state.holder == me:
                return True
            return consistent and state.synced == peer_id and state.epoch == synced_epoch

        return may_take

    # --- transitions ------------------------------------------------------------------------------

    async def _promote(self, state: LeaseState) -> None:
        async with self._transition:
            await self._promote_locked(state)

    async def _promote_locked(self, state: LeaseState) -> None:
        lease, settings = self._lease, self._settings
        assert lease is not None and settings is not None
        started = self._monotonic()
        self._lease_state = state
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            await receiver.stop()
        inner = self._store_factory()
        replicated = ReplicatedStore(
            inner,
            settings,
            epoch=state.epoch,
            peer=self._peer,
            lease_deadline=lease.valid_until,
            clock=self._monotonic,
            on_fenced=self._fenced,
            before_alone=self._record_alone,
        )
        self._replicated = replicated
        self.role = NodeRole.ACTIVE
        self._write_status(force=True)
        try:
            await self._on_promote(replicated)
        except BaseException:
            log.exception("could not start serving as the active node; giving the lease up")
            replicated.fence("could not start serving")
            self._replicated = None
            self.role = NodeRole.FENCED
            await asyncio.get_running_loop().run_in_executor(None, replicated.close)
            try:
                await self._lease_call(lease.release)
            except LeaseError as exc:
                log.warning("cannot release the lease: %s", exc)
            raise
        self._last_error = ""
        log.info(
            "active at epoch %d, serving %.3f s after taking the lease",
            state.epoch,
            self._monotonic() - started,
        )
        self._write_status(force=True)

    async def _step_down(self, reason: str) -> None:
        async with self._transition:
            replicated = self._replicated
            if replicated is None:  # already stepped down
                return
            log.warning("stepping down from active (epoch %d): %s", replicated.epoch, reason)
            replicated.fence(reason)
            self._replicated = None
            self.role = NodeRole.FENCED
            self._write_status(force=True)
            try:
                await self._on_fence()
            except Exception:
                log.exception("on_fence failed")
            await asyncio.get_running_loop().run_in_executor(None, replicated.close)
            if not self._stopping:
                await self._become_standby()

    async def _become_standby(self) -> None:
        settings = self._settings
        assert settings is not None
        receiver = ReplicationReceiver(
            self._store_factory, settings, self._listen, known_epoch=self._lease_state.epoch
        )
        try:
            await receiver.start()
        except OSError as exc:
            host, port = self._listen
            raise HaError(f"cannot listen for replication on {host}:{port}: {exc.strerror or exc}") from None
        self._receiver = receiver
        self.role = NodeRole.STANDBY
        self._last_error = ""
        log.info("standby: waiting for the active's records on %s:%d", *self._listen)
        self._write_status(force=True)

    def _fenced(self, reason: str) -> None:
        # Called by the ReplicatedStore (on the loop) the moment it fences.
        task = asyncio.get_running_loop().create_task(self._step_down(reason))
        self._step_downs.add(task)
        task.add_done_callback(self._step_downs.discard)
        self._wake.set()

    async def _record_alone(self) -> None:
        """Before the active confirms without a standby: record it in the lease (module docstring)."""
        lease, replicated = self._lease, self._replicated
        assert lease is not None
        self._lease_state = await self._lease_call(lease.renew, "")
        if replicated is not None:
            replicated.extend_lease(lease.valid_until)

    # --- helpers ----------------------------------------------------------------------------------

    async def _lease_call(self, function: Callable[..., _T], *args: Any) -> _T:
        # One thread for every lease operation: they run in order and never block the loop
        # (a shared directory may hang).
        return await asyncio.get_running_loop().run_in_executor(self._executor, partial(function, *args))

    def _note_error(self, error: str) -> None:
        if error != self._last_error:
            log.warning("%s", error)
        self._last_error = error

    def _write_status(self, force: bool = False) -> None:
        status = self.status.as_dict()
        comparable = {k: v for k, v in status.items() if k != "updated_at"}
        now = self._monotonic()
        if not force and comparable == self._status_written and now - self._status_written_at < 1.0:
            return
        path = self._data_dir / STATUS_FILENAME
        tmp = path.with_name(STATUS_FILENAME + ".tmp")
        try:
            tmp.write_text(json.dumps(status, indent=1) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            self._note_error(f"cannot write {path}: {exc.strerror or exc}")
            return
        self._status_written = comparable
        self._status_written_at = now
