"""Cross-protocol names: MQTT topics and filters <-> the core's routing keys (README, Names across protocols).

The core's model is AMQP's, so a topic is held as an AMQP routing key: its levels joined by
`.`. MQTT separates levels with `/`. A level may contain the other protocol's separator, so
when a name crosses protocols that separator is percent-encoded inside the level:

    MQTT  "v1.2/status"  <->  key "v1%2E2.status"
    AMQP  "a/b.c"        <->  MQTT "a%2Fb/c"

To keep the mapping a bijection, a name that already contains an escape sequence literally
(`%2E`, `%252E`, ... and the same for `%2F`) gains one `25` when it crosses in the direction
that encodes that separator and loses one in the other, so `to_mqtt(from_mqtt(t)) == t` for
every topic, `from_mqtt(to_mqtt(k)) == k` for every key, and two different names never meet.

Must not import: anything outside the standard library.
"""

from __future__ import annotations

import re
from functools import lru_cache

# A literal escape of either separator (with any number of `25`s), or a separator itself.
_MQTT_SPECIAL = re.compile(r"%(?:25)*2[EF]|\.")
_KEY_SPECIAL = re.compile(r"%(?:25)*2[EF]|/")


def _mqtt_level_to_key(match: re.Match[str]) -> str:
    text = match.group()
    if text == ".":
        return "%2E"
    if text.endswith("E"):  # literal %..2E: one more 25 on the key side
        return "%25" + text[1:]
    return "/" if text == "%2F" else "%" + text[3:]  # %..2F: one 25 fewer


def _key_level_to_mqtt(match: re.Match[str]) -> str:
    text = match.group()
    if text == "/":
        return "%2F"
    if text.endswith("F"):  # literal %..2F: one more 25 on the MQTT side
        return "%25" + text[1:]
    return "." if text == "%2E" else "%" + text[3:]  # %..2E: one 25 fewer


@lru_cache(maxsize=8192)
def mqtt_topic_to_key(topic: str) -> str:
    """MQTT topic name (or filter with `+`/`#`) -> routing key (filter with `*`/`#`)."""
    if "." not in topic and "%" not in topic and "+" not in topic:
        return topic.replace("/", ".")
    levels = []
    for level in topic.split("/"):
        if level == "+":
            levels.append("*")
        else:
            levels.append(_MQTT_SPECIAL.sub(_mqtt_level_to_key, level))
    return ".".join(levels)


@lru_cache(maxsize=8192)
def key_to_mqtt_topic(key: str) -> str:
    """Routing key -> MQTT topic name (the inverse of `mqtt_topic_to_key` for names)."""
    if "/" not in key and "%" not in key:
        return key.replace(".", "/")
    return "/".join(_KEY_SPECIAL.sub(_key_level_to_mqtt, level) for level in key.split("."))


def key_levels(key: str) -> list[str]:
    """The levels of a routing key as the topic exchange sees them."""
    return key.split(".")
