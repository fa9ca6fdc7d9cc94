"""Active/standby high availability: lease, replication of the store's journal, promotion, fencing.

- `cluster.lease`: the lease deciding which node is active (`Lease`, `FileLease`).
- `cluster.replication`: `ReplicatedStore` (the active's Store wrapper that streams every record
  to the standby) and `ReplicationReceiver` (the standby's side).
- `cluster.node`: `HaNode`, the role state machine the composition root drives.
- `cluster.status`: `polybroker ha status`.

Dependencies point one way (docs/architecture.md): cluster imports storage and broker.config, never
protocols or broker.core.

Must not import: protocols, broker.core.
"""

from __future__ import annotations

from cluster.lease import FileLease, Lease, LeaseError, LeaseLost, LeaseState
from cluster.node import HaError, HaNode, HaStatus, NodeRole
from cluster.replication import (
    LinkTls,
    ReplicatedStore,
    ReplicationReceiver,
    ReplicationSettings,
    SyncState,
)

__all__ = [
    "FileLease",
    "HaError",
    "HaNode",
    "HaStatus",
    "Lease",
    "LeaseError",
    "LeaseLost",
    "LeaseState",
    "LinkTls",
    "NodeRole",
    "ReplicatedStore",
    "ReplicationReceiver",
    "ReplicationSettings",
    "SyncState",
]
