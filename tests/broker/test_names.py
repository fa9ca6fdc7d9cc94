"""Cross-protocol names (DESIGN.md §4): MQTT topics <-> routing keys, reversible."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.names import key_to_mqtt_topic, mqtt_topic_to_key


@pytest.mark.parametrize(
    ("topic", "key"),
    [
        ("a/b/c", "a.b.c"),
        ("v1.2/status", "v1%2E2.status"),
        ("a%2Fb/c", "a/b.c"),
        ("sensors/+/temp", "sensors.*.temp"),
        ("sensors/#", "sensors.#"),
        ("/leading", ".leading"),
        ("50%/x", "50%.x"),
        ("héllo/wörld", "héllo.wörld"),
    ],
)
def test_mqtt_topic_maps_to_key_and_back(topic: str, key: str) -> None:
    assert mqtt_topic_to_key(topic) == key
    if "+" not in topic:
        assert key_to_mqtt_topic(key) == topic


def _no_escape(text: str) -> bool:
    """Names that literally contain an escape sequence are the documented exception."""
    return "%2E" not in text and "%2F" not in text


level = st.text(st.characters(blacklist_characters="/+#\x00"), max_size=8).filter(_no_escape)


@given(st.lists(level, min_size=1, max_size=5))
def test_every_mqtt_topic_round_trips_exactly(levels: list[str]) -> None:
    topic = "/".join(levels)
    assert key_to_mqtt_topic(mqtt_topic_to_key(topic)) == topic


@given(
    st.lists(
        st.text(st.characters(blacklist_characters=".*#\x00"), max_size=8).filter(_no_escape), min_size=1, max_size=5
    )
)
def test_every_amqp_key_round_trips_exactly(words: list[str]) -> None:
    key = ".".join(words)
    assert mqtt_topic_to_key(key_to_mqtt_topic(key)) == key
