"""The composition root: config -> store -> core -> protocol sessions -> listeners, and shutdown.

The only module that imports protocols, storage backends and cluster together (docs/architecture.md).
`serve(config)` runs the broker until SIGTERM/SIGINT and returns the process exit code; a
start-up problem (port in use, unusable data dir) raises `StartupError` with one clear line.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import time
from pathlib import Path
from typing import Any

from broker.auth import Authenticator
from broker.config import Config, ListenerProtocol
from broker.context import FlowGate, ServerContext
from broker.core import Broker, CoreLimits
from broker.journal import Store, StoreError
from cluster.node import HaError, HaNode
from cluster.replication import LinkTls
from protocols.session import SessionFactory
from protocols.transport import (
    ConnectionRegistry,
    Listener,
    TransportLimits,
    install_uvloop,
    server_ssl_context,
    start_listener,
    stop_listeners,
)
from storage import open_store

log = logging.getLogger("polybroker.server")

TICK_SECONDS = 0.1
SHUTDOWN_GRACE_SECONDS = 5.0


class StartupError(Exception):
    """The broker cannot start; the message is the one line to print."""


def build_context(config: Config, store: Store) -> ServerContext:
    """Recover the store into a new core and wrap it in the context sessions share."""
    recovered = store.open()
    broker = Broker(
        store,
        limits=CoreLimits(
            page_out_threshold=config.store.page_out_threshold,
            memory_high_watermark=config.store.memory_high_watermark_mb << 20,
        ),
        vhosts=config.vhosts.names,
    )
    broker.recover(recovered)
    context = ServerContext(
        broker=broker,
        auth=Authenticator(config),
        config=config,
        flow=FlowGate(broker, config.store.store_high_watermark_mb << 20),
        started_at=time.time(),
        server_name=config.server.name,
    )
    for saved in recovered.sessions:
        context.saved_sessions[(saved.vhost, saved.client_id)] = saved.state
    return context


def session_factory(protocol: str, context: ServerContext) -> SessionFactory:
    """The session factory of one protocol (imported only when a listener serves it)."""
    if protocol == "mqtt":
        from protocols.mqtt.session import MqttSession

        return lambda: MqttSession(context)
    if protocol == "amqp":
        from protocols.amqp091.session import AmqpSession

        return lambda: AmqpSession(context)
    if protocol == "stomp":
        from protocols.stomp.session import StompSession

        return lambda: StompSession(context)
    raise ValueError(f"unknown protocol {protocol!r}")


class Server:
    """A running broker: its store, core, listeners and periodic tasks.

    Single node: `start` opens the store and serves at once. With `[ha]` on, an `HaNode` owns the
    store and calls `_serve` when this node becomes active and `_unserve` when it is fenced, so
    client listeners are open only on the active node (README, "Active/standby (multi-AZ) pairs").
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.listeners: list[Listener] = []
        self.registry = ConnectionRegistry(config.limits.max_connections)
        self.context: ServerContext | None = None
        self._store: Store | None = None
        self._node: HaNode | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        data_dir = Path(self.config.store.data_dir)
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"cannot use data directory {data_dir}: {exc.strerror or exc}") from None

        def make_store() -> Store:
            return open_store(self.config.store.kind, data_dir, loop.call_soon_threadsafe)

        if self.config.ha.enabled:
            ha = self.config.ha
            tls = None
            if ha.tls_cert_file:
                try:
                    tls = LinkTls.from_files(ha.tls_cert_file, ha.tls_key_file, ha.tls_ca_file)
                except (OSError, ValueError) as exc:
                    raise StartupError(f"cannot load the replication link's TLS files: {exc}") from None
            self._node = HaNode(
                self.config, make_store, on_promote=self._serve, on_fence=self._unserve, tls=tls
            )
            try:
                await self._node.start()  # calls _serve now if this node becomes active
            except (HaError, StoreError) as exc:
                raise StartupError(str(exc)) from None
            return
        try:
            self._store = make_store()
        except StoreError as exc:
            raise StartupError(str(exc)) from None
        await self._serve(self._store)

    async def _serve(self, store: Store) -> None:
        """Recover `store` into a new core and open the client listeners."""
        loop = asyncio.get_running_loop()
        try:
            self.context = build_context(self.config, store)
        except StoreError as exc:
            raise StartupError(str(exc)) from None
        await self._start_listeners()
        self._tasks.append(loop.create_task(self._tick()))
        if self.config.server.sys_interval > 0 and self.config.listeners.mqtt not in ("", "off"):
            from protocols.mqtt.session import SysPublisher

            self._tasks.append(loop.create_task(self._sys(SysPublisher(self.context))))

    async def _confirm_stored(self) -> None:
        """Before saying goodbye to clients, stop reading from them, let the store commit what it
        holds and the sessions send the confirms waiting on it: a publisher whose message was
        stored then does not send it again to the next broker (no duplicate)."""
        if self.context is None:
            return
        store = self.context.broker.store
        self.registry.pause_reading_all()
        # Durability callbacks fire in order: once this one runs, every confirm waiting on the
        # store (and, in a pair, on the standby) has been handed to its connection.
        committed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def mark_committed() -> None:
            if not committed.done():
                committed.set_result(None)

        try:
            store.when_durable(mark_committed)
            await asyncio.wait_for(committed, SHUTDOWN_GRACE_SECONDS)
            await asyncio.sleep(0)  # the drivers flush their writes in the next loop turn
        except (TimeoutError, StoreError) as exc:
            log.warning(
                "stopping without confirming everything stored: %s", exc or "the store did not commit in time"
            )
        # Reading resumes only for the protocols' goodbyes (AMQP waits for close-ok): `_unserve`
        # shuts every session down before the loop reads anything again.
        self.registry.resume_reading_all()

    async def _unserve(self, grace: float = 0.0) -> None:
        """Stop serving clients (fenced, or stopping): tasks, listeners, connections."""
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        listeners, self.listeners = self.listeners, []
        await stop_listeners(listeners, self.registry, grace)
        self.context = None

    async def _start_listeners(self) -> None:
        assert self.context is not None
        config = self.config
        context = self.context
        limits = TransportLimits(
            max_pending_write_bytes=config.limits.max_pending_write_bytes,
            max_message_size=config.limits.max_frame_size,
        )
        ssl_context = None
        if config.tls.cert_file:
            try:
                ssl_context = server_ssl_context(
                    config.tls.cert_file,
                    config.tls.key_file or None,
                    cacertfile=config.tls.ca_file or None,
                    fail_if_no_peer_cert=config.tls.verify_client,
                )
            except ValueError as exc:
                raise StartupError(str(exc)) from None
        for spec in config.enabled_listeners():
            if spec.protocol is ListenerProtocol.WEBSOCKET:
                kind = "websocket"
                listener_factories = {p: session_factory(p, context) for p in ("mqtt", "stomp")}
            else:
                kind = "stream"
                listener_factories = {spec.protocol.value: session_factory(spec.protocol.value, context)}
            try:
                listener = await start_listener(
                    spec.name,
                    spec.host,
                    spec.port,
                    listener_factories,
                    registry=self.registry,
                    ssl_context=ssl_context if spec.tls else None,
                    kind=kind,
                    limits=limits,
                )
            except OSError as exc:
                await self._unserve()
                raise StartupError(
                    f"cannot listen on {spec.host}:{spec.port} ({spec.name}): {exc.strerror or exc}"
                ) from None
            self.listeners.append(listener)

    async def _tick(self) -> None:
        assert self.context is not None
        broker, flow = self.context.broker, self.context.flow
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                broker.tick()
                flow.check()
            except Exception:  # a bug in maintenance must not stop the broker
                log.exception("periodic maintenance failed")

    async def _sys(self, publisher: Any) -> None:
        while True:
            await asyncio.sleep(self.config.server.sys_interval)
            try:
                publisher.publish()
            except Exception:
                log.exception("$SYS publication failed")

    async def stop(self) -> None:
        """Confirm what is stored, close clients the protocol's proper way, close the store."""
        await self._confirm_stored()
        await self._unserve(SHUTDOWN_GRACE_SECONDS)
        if self._node is not None:
            node, self._node = self._node, None
            await node.stop()  # the node owns (and closes) the store in HA mode
        if self._store is not None:
            store, self._store = self._store, None
            await asyncio.get_running_loop().run_in_executor(None, store.close)


async def _run(config: Config) -> int:
    # Signal handlers first: a SIGTERM that arrives while listeners are still starting must still
    # stop the broker cleanly (exit 0), not kill it with the default handler.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = Server(config)
    try:
        await server.start()
    except BaseException:
        await server.stop()
        raise
    log.info("polybroker started (store %s in %s)", config.store.kind, config.store.data_dir)
    await stop.wait()
    log.info("stopping")
    await server.stop()
    log.info("stopped")
    return 0


def _raise_file_limit() -> None:
    """Every connection is a file descriptor: lift the soft limit to the hard one (often 1024 vs
    many thousands), as Mosquitto and RabbitMQ do, so `max_connections` is what limits clients."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)


def serve(config: Config) -> int:
    """Run the broker until SIGTERM/SIGINT. Returns the exit code (0 on a clean stop)."""
    _raise_file_limit()
    install_uvloop()
    return asyncio.run(_run(config))
