"""`polybroker ha status`: print a node's HA role, epoch, sync state and replication lag.

Reads `ha-status.json`, which a running node (cluster/node.py) keeps up to date in its data
directory, and, when `[ha] lock` is set, the lease itself (the arbiter's view, which stays true
when the node is down). Exit status: 0 when the node's status is fresh, 1 when there is none or
it is stale (the node is not running).

Must not import: protocols, broker.core.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from broker.config import Config
from cluster.lease import FileLease, LeaseError, LeaseState
from cluster.node import STATUS_FILENAME

#: A status older than this many lease periods (and at least STALE_MIN_SECONDS) is stale.
STALE_LEASE_PERIODS = 3
STALE_MIN_SECONDS = 5.0


def _read_status(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_lease(config: Config) -> LeaseState | str:
    if not config.ha.lock:
        return "no [ha] lock configured"
    try:
        # node_id only identifies a writer; reading needs none of ours.
        return FileLease(config.ha.lock, "status", config.ha.lease_seconds).read()
    except LeaseError as exc:
        return str(exc)


def main(config: Config, out: TextIO | None = None, now: float | None = None) -> int:
    """Print the HA status of the node whose data directory `config` names."""
    write = (sys.stdout if out is None else out).write
    now = time.time() if now is None else now
    path = Path(config.store.data_dir) / STATUS_FILENAME
    status = _read_status(path)
    lease = _read_lease(config)
    code = 0
    if status is None:
        write(f"no HA status in {path} (is [ha] role set, and has the node run?)\n")
        code = 1
    else:
        age = now - float(status.get("updated_at", 0.0))
        stale = age > max(STALE_MIN_SECONDS, STALE_LEASE_PERIODS * config.ha.lease_seconds)
        lag = f"{status.get('lag_records', 0)} records ({status.get('lag_bytes', 0)} bytes)"
        sync = status.get("sync") or "-"
        if status.get("peer"):
            sync += f" ({'standby' if status.get('role') == 'active' else 'active'} {status['peer']})"
        rows = [
            ("node", str(status.get("node_id", "?"))),
            ("role", str(status.get("role", "?"))),
            ("epoch", str(status.get("epoch", 0))),
            ("sync", sync),
            ("link", str(status.get("link") or "-")),
            ("lag", lag),
        ]
        if status.get("last_error"):
            rows.append(("last error", str(status["last_error"])))
        rows.append(
            ("updated", f"{age:.1f} s ago (pid {status.get('pid', '?')})" + (" STALE" if stale else ""))
        )
        for name, value in rows:
            write(f"{name + ':':<12}{value}\n")
        if stale:
            write("the status is stale: the node does not seem to be running\n")
            code = 1
    if isinstance(lease, LeaseState):
        if lease.holder:
            held = "expired" if lease.expired(now, config.ha.lease_seconds) else "held"
            synced = lease.synced or "none (the active runs alone)"
            write(
                f"{'lease:':<12}{held} by {lease.holder}, epoch {lease.epoch}, "
                f"renewed {now - lease.renewed_at:.1f} s ago; standby in sync: {synced}\n"
            )
        else:
            write(f"{'lease:':<12}never held\n")
    else:
        write(f"{'lease:':<12}{lease}\n")
    return code
