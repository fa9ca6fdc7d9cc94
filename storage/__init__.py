"""The durable store: the `Store` port (broker.journal), its backends and the record encoding.

Backends: `MemoryStore` (nothing survives the process; tests and `store = "memory"`) and
`SqliteStore` (one SQLite file in WAL mode, group commit with fsync). `storage.serial` encodes
records for the SQLite tables and for replication to a standby.

The composition root builds a store with `open_store(kind, data_dir, schedule)` and then calls
`store.open()` once to get the `Recovered` state.

Must not import: asyncio, protocols, cluster, broker.core (only broker.message).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from broker.journal import (
    BindingAdded,
    BindingRemoved,
    ExchangeDeclared,
    ExchangeDeleted,
    MessageEnqueued,
    MessageRemoved,
    QueueDeclared,
    QueueDeleted,
    QueuePurged,
    Record,
    Recovered,
    RetainedCleared,
    RetainedSet,
    Schedule,
    SessionDeleted,
    SessionSaved,
    Store,
    StoreError,
)
from storage.memory import MemoryStore
from storage.serial import SerialError, decode_record, encode_record
from storage.sqlite import SqliteStore

#: The `store` config values `open_store` accepts.
STORE_KINDS: Final = ("sqlite", "memory")

#: The SQLite database's file name inside the data directory.
SQLITE_FILENAME: Final = "polybroker.sqlite3"


def open_store(kind: str, data_dir: Path, schedule: Schedule) -> Store:
    """A store of `kind` ("sqlite" or "memory") for `data_dir`, not yet opened: the caller calls
    `open()` once and gets the recovered state. Raises ValueError for an unknown kind."""
    if kind == "sqlite":
        return SqliteStore(Path(data_dir) / SQLITE_FILENAME, schedule)
    if kind == "memory":
        return MemoryStore(schedule)
    raise ValueError(f"unknown store {kind!r} (expected one of: {', '.join(STORE_KINDS)})")


__all__ = [
    "STORE_KINDS",
    "SQLITE_FILENAME",
    "BindingAdded",
    "BindingRemoved",
    "ExchangeDeclared",
    "ExchangeDeleted",
    "MemoryStore",
    "MessageEnqueued",
    "MessageRemoved",
    "QueueDeclared",
    "QueueDeleted",
    "QueuePurged",
    "Record",
    "Recovered",
    "RetainedCleared",
    "RetainedSet",
    "Schedule",
    "SerialError",
    "SessionDeleted",
    "SessionSaved",
    "SqliteStore",
    "Store",
    "StoreError",
    "decode_record",
    "encode_record",
    "open_store",
]
