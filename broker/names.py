"""Cross-protocol names: MQTT topics and filters <-> the core's routing keys (DESIGN.md §4).

The core's model is AMQP's, so a topic is held as an AMQP routing key: its levels joined by
`.`. MQTT separates levels with `/`. A level may contain the other protocol's separator, so
when a name crosses protocols that separator is percent-encoded inside the level:

    MQTT  "v1.2/status"  <->  key "v1%2E2.status"
    AMQP  "a/b.c"        <->  MQTT "a%2Fb/c"

Decoding accepts exactly the upper-case escape of the protocol's own foreign separator
(`%2E` from AMQP/STOMP keys is never decoded; `%2F` from MQTT topics is decoded to `/`), so
`to_mqtt(from_mqtt(t)) == t` for every MQTT topic and the mapping is reversible for every name
that does not literally contain the other side's escape sequence (README, "Names").

Must not import: anything outside the standard library.
"""

from __future__ import annotations

from functools import lru_cache

_DOT = "%2E"
_SLASH = "%2F"


@lru_cache(maxsize=8192)
def mqtt_topic_to_key(topic: str) -> str:
    """MQTT topic name (or filter with `+`/`#`) -> routing key (filter with `*`/`#`)."""
    if "." not in topic and _SLASH not in topic and "+" not in topic:
        return topic.replace("/", ".")
    levels = []
    for level in topic.split("/"):
        if level == "+":
            levels.append("*")
            continue
        if "." in level:
            level = level.replace(".", _DOT)
        if _SLASH in level:
            level = level.replace(_SLASH, "/")
        levels.append(level)
    return ".".join(levels)


@lru_cache(maxsize=8192)
def key_to_mqtt_topic(key: str) -> str:
    """Routing key -> MQTT topic name (the inverse of `mqtt_topic_to_key` for names)."""
    if "/" not in key and _DOT not in key:
        return key.replace(".", "/")
    levels = []
    for level in key.split("."):
        if "/" in level:
            level = level.replace("/", _SLASH)
        if _DOT in level:
            level = level.replace(_DOT, ".")
        levels.append(level)
    return "/".join(levels)


def key_levels(key: str) -> list[str]:
    """The levels of a routing key as the topic exchange sees them."""
    return key.split(".")
