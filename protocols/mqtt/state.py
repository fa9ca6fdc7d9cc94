"""The MQTT Session State (3.1.1 §4.1, 5.0 §4.1) as plain data, and its bytes for the store.

A persistent session (3.1.1 Clean Session 0, or 5.0 Session Expiry Interval > 0) outlives its
Network Connection. Its messages wait in a durable queue of the core; everything else the spec puts
in the Server's Session State lives here, as plain data (docs/architecture.md: never on a suspended
coroutine), so that it can be journaled with `VHost.save_session` and recovered after a restart:

- the subscriptions, with their options and Subscription Identifier;
- inbound QoS 2 Packet Identifiers whose PUBREC was sent and whose PUBREL has not arrived yet
  ([MQTT-4.3.3-9]: a re-sent PUBLISH with such an id is not delivered again);
- outbound QoS 2 Packet Identifiers whose PUBREL was sent and whose PUBCOMP has not arrived yet
  ([MQTT-4.4.0-1]: re-sent on reconnect);
- the Packet Identifiers of QoS 1 / QoS 2 deliveries not yet acknowledged when the connection went
  away, by the core's message id, so the redelivery after a reconnect uses the original Packet
  Identifier with DUP set ([MQTT-4.4.0-1], 3.1.1 [MQTT-4.4.0-1]);
- the Session Expiry Interval and when the connection was lost (5.0 §3.1.2.11.2).

Also here: Topic Filter matching over levels (§4.7), which the session needs to find the options of
the subscriptions a delivery matched.

Must not import: asyncio, broker, storage, cluster, other protocol packages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final

#: Session Expiry Interval meaning "never expires" (5.0 §3.1.2.11.2).
NEVER_EXPIRES: Final = 0xFFFFFFFF
#: Version of the encoded state; decode refuses others (a newer broker's state is not guessed at).
STATE_FORMAT: Final = 1


class StateError(ValueError):
    """Saved session bytes that cannot be decoded."""


@dataclass(slots=True)
class Subscription:
    """One subscription of a session: the Topic Filter as the client sent it and its options (5.0 §3.8.3.1)."""

    topic_filter: str
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0
    #: 5.0 Subscription Identifier (§3.8.2.1.2), None when the SUBSCRIBE carried none.
    identifier: int | None = None
    #: `$share/<group>/...`: the ShareName, else None (§4.8.2).
    share_group: str | None = None
    #: The filter without the `$share/<group>/` prefix.
    inner_filter: str = ""

    def __post_init__(self) -> None:
        if not self.inner_filter:
            self.inner_filter = self.topic_filter


@dataclass(slots=True)
class SessionState:
    """What the Server keeps of one client's session between connections."""

    client_id: str
    #: Seconds after the disconnect at which the session ends; None: never (3.1.1 persistent sessions).
    expiry_interval: int | None = None
    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    #: Inbound QoS 2: PUBREC sent, PUBREL not received.
    awaiting_pubrel: set[int] = field(default_factory=set)
    #: Outbound QoS 2: PUBREL sent, PUBCOMP not received.
    awaiting_pubcomp: set[int] = field(default_factory=set)
    #: Unacknowledged QoS > 0 deliveries at disconnect: core message id -> Packet Identifier.
    inflight: dict[int, int] = field(default_factory=dict)
    #: Wall-clock seconds of the disconnect; None while connected.
    disconnected_at: float | None = None

    def deadline(self, unknown_disconnect: float) -> float | None:
        """Wall-clock time at which the session ends, None for never.

        A state saved while connected has no disconnect time: the broker stopped without a clean
        disconnect. Its connection then ended no later than `unknown_disconnect` (the broker's start).
        """
        if self.expiry_interval is None:
            return None
        since = self.disconnected_at if self.disconnected_at is not None else unknown_disconnect
        return since + self.expiry_interval

    def expired(self, wall_now: float, unknown_disconnect: float) -> bool:
        """True once a disconnected session has outlived its Session Expiry Interval."""
        deadline = self.deadline(unknown_disconnect)
        return deadline is not None and wall_now >= deadline

    def encode(self) -> bytes:
        data: dict[str, Any] = {
            "format": STATE_FORMAT,
            "client_id": self.client_id,
            "expiry_interval": self.expiry_interval,
            "subscriptions": [
                [s.topic_filter, s.qos, s.no_local, s.retain_as_published, s.retain_handling, s.identifier]
                for s in self.subscriptions.values()
            ],
            "awaiting_pubrel": sorted(self.awaiting_pubrel),
            "awaiting_pubcomp": sorted(self.awaiting_pubcomp),
            "inflight": [[msg_id, packet_id] for msg_id, packet_id in self.inflight.items()],
            "disconnected_at": self.disconnected_at,
        }
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> SessionState:
        try:
            data = json.loads(raw)
            if data.get("format") != STATE_FORMAT:
                raise StateError(f"unknown session state format {data.get('format')!r}")
            subscriptions: dict[str, Subscription] = {}
            for topic_filter, qos, no_local, rap, retain_handling, identifier in data["subscriptions"]:
                subscriptions[topic_filter] = make_subscription(
                    topic_filter, int(qos), bool(no_local), bool(rap), int(retain_handling), identifier
                )
            expiry = data["expiry_interval"]
            disconnected_at = data["disconnected_at"]
            return cls(
                client_id=str(data["client_id"]),
                expiry_interval=None if expiry is None else int(expiry),
                subscriptions=subscriptions,
                awaiting_pubrel={int(i) for i in data["awaiting_pubrel"]},
                awaiting_pubcomp={int(i) for i in data["awaiting_pubcomp"]},
                inflight={int(m): int(p) for m, p in data["inflight"]},
                disconnected_at=None if disconnected_at is None else float(disconnected_at),
            )
        except StateError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise StateError(f"corrupt session state: {exc!r}") from None


def make_subscription(
    topic_filter: str,
    qos: int,
    no_local: bool = False,
    retain_as_published: bool = False,
    retain_handling: int = 0,
    identifier: int | None = None,
) -> Subscription:
    """A Subscription with its ShareName split off (the filter must already be valid, §4.8.2)."""
    group = None
    inner = topic_filter
    if topic_filter.startswith("$share/"):
        group, _, inner = topic_filter[7:].partition("/")
    return Subscription(
        topic_filter, qos, no_local, retain_as_published, retain_handling, identifier, group, inner
    )


def filter_matches(topic_filter: str, topic: str) -> bool:
    """Whether a (valid, non-shared) Topic Filter matches a Topic Name (§4.7.1, [MQTT-4.7.2-1])."""
    if topic_filter == topic:
        return True
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    # [MQTT-4.7.2-1]: a filter starting with a wildcard does not match a topic starting with "$".
    if topic.startswith("$") and f_levels[0] in ("+", "#"):
        return False
    for i, level in enumerate(f_levels):
        if level == "#":
            return True  # also matches the parent level itself ([MQTT-4.7.1-2] 3.1.1)
        if i >= len(t_levels):
            return False
        if level != "+" and level != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)
