"""`$SYS` topics (Mosquitto's names) and the MQTT housekeeping that runs with them.

`SysPublisher(context).publish()` is called by the composition root every `[server] sys_interval`
seconds. It publishes, as retained QoS 0 messages on amq.topic of every vhost, the broker-wide
counters under Mosquitto's `$SYS/broker/...` names, so that `mosquitto_sub -t '$SYS/#' -v` works as
against Mosquitto. A `$SYS` topic is reached only by filters that start with `$SYS` ([MQTT-4.7.2-1]).

The values are recomputed every interval, so they are kept in the vhost's retained map without
being journaled: a store write per topic and interval would only churn the store.

Housekeeping on the same beat: fired retained Will Messages become retained (retained.py), and
persistent sessions whose Session Expiry Interval passed lose their saved state (their queue is
removed by the core's `x-expires`).

Must not import: asyncio, storage, cluster, other protocol packages, protocols.transport.
"""

from __future__ import annotations

import logging
import time
from typing import Final

from broker.context import ServerContext
from broker.message import Message
from broker.names import mqtt_topic_to_key
from protocols.mqtt.mapping import QOS_PROPERTIES
from protocols.mqtt.retained import SESSION_QUEUE_PREFIX, TOPIC_EXCHANGE, apply_fired_wills, queue_name
from protocols.mqtt.state import SessionState, StateError

log = logging.getLogger("polybroker.mqtt")

SYS_PREFIX: Final = "$SYS/broker/"


class SysPublisher:
    """Publishes the `$SYS/broker/...` topics; one per broker, built by the composition root."""

    def __init__(self, context: ServerContext) -> None:
        self._context = context
        self._keys: dict[str, str] = {}
        # Saved state -> its expiry deadline (wall clock; None: none), so each state is decoded once.
        self._deadlines: dict[tuple[str, str], tuple[bytes, float | None]] = {}

    def values(self) -> dict[str, str]:
        """The `$SYS` topics and their current values (Mosquitto's names and formats)."""
        context = self._context
        stats = context.stats
        broker = context.broker
        uptime = int(time.time() - context.started_at) if context.started_at else 0
        return {
            SYS_PREFIX + "version": f"{context.server_name} version {context.version}",
            SYS_PREFIX + "uptime": f"{uptime} seconds",
            SYS_PREFIX + "clients/connected": str(stats.clients_connected),
            SYS_PREFIX + "clients/total": str(stats.clients_total),
            SYS_PREFIX + "messages/received": str(stats.messages_received),
            SYS_PREFIX + "messages/sent": str(stats.messages_sent),
            SYS_PREFIX + "messages/dropped": str(broker.messages_dropped),
            SYS_PREFIX + "retained messages/count": str(
                sum(len(vh.retained) for vh in broker.vhosts.values())
            ),
            SYS_PREFIX + "store/messages/count": str(
                sum(q.message_count for vh in broker.vhosts.values() for q in vh.queues.values())
            ),
        }

    def publish(self) -> None:
        """Publish every `$SYS` topic once, retained, and run the housekeeping."""
        values = self.values()
        for vhost in self._context.broker.vhosts.values():
            apply_fired_wills(vhost)
            for topic, value in values.items():
                key = self._keys.get(topic)
                if key is None:
                    key = self._keys[topic] = mqtt_topic_to_key(topic)
                message = Message(TOPIC_EXCHANGE, key, value.encode(), QOS_PROPERTIES[0], retain=True)
                vhost.publish(message)
                vhost.retained[key] = message
        self._expire_sessions()

    def _expire_sessions(self) -> None:
        """Forget the saved state of persistent sessions whose Session Expiry Interval passed."""
        context = self._context
        now = context.broker.wall_clock()
        deadlines = self._deadlines
        for key in [k for k in deadlines if k not in context.saved_sessions]:
            del deadlines[key]
        for key, raw in list(context.saved_sessions.items()):
            known = deadlines.get(key)
            if known is None or known[0] is not raw:
                deadline = None
                try:
                    deadline = SessionState.decode(raw).deadline(context.started_at)
                except StateError:
                    pass  # the next CONNECT of that client discards it, with a log line
                known = deadlines[key] = (raw, deadline)
            if known[1] is None or known[1] > now or key in context.mqtt_clients:
                continue
            vhost = context.broker.vhosts.get(key[0])
            del context.saved_sessions[key]
            del deadlines[key]
            if vhost is None:
                continue
            name = queue_name(SESSION_QUEUE_PREFIX, key[1])
            queue = vhost.queues.get(name)
            if queue is not None and not queue.consumers:
                vhost.delete_queue(name)
            vhost.delete_session(key[1])
            log.info("MQTT session of client %r in vhost %r expired", key[1], key[0])
