"""Cross-protocol names (README, Names across protocols): MQTT topics <-> routing keys, reversible."""

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
        ("a/50%2E", "a.50%252E"),  # a literal escape gains a 25 ...
        ("a/50.", "a.50%2E"),  # ... so it never meets the escaped separator
        ("b%252F", "b%2F"),
    ],
)
def test_mqtt_topic_maps_to_key_and_back(topic: str, key: str) -> None:
    assert mqtt_topic_to_key(topic) == key
    if "+" not in topic:
        assert key_to_mqtt_topic(key) == topic


level = st.text(st.sampled_from(list("ab.%25EF/+#é")).filter(lambda c: c not in "/+#"), max_size=10)


@given(st.lists(level, min_size=1, max_size=5))
def test_every_mqtt_topic_round_trips_exactly(levels: list[str]) -> None:
    topic = "/".join(levels)
    assert key_to_mqtt_topic(mqtt_topic_to_key(topic)) == topic


@given(
    st.lists(
        st.text(st.sampled_from(list("ab/%25EF.é")).filter(lambda c: c != "."), max_size=10),
        min_size=1,
        max_size=5,
    )
)
def test_every_amqp_key_round_trips_exactly(words: list[str]) -> None:
    key = ".".join(words)
    assert mqtt_topic_to_key(key_to_mqtt_topic(key)) == key


@given(st.lists(level, min_size=1, max_size=4), st.lists(level, min_size=1, max_size=4))
def test_different_topics_never_share_a_key(a: list[str], b: list[str]) -> None:
    if "/".join(a) != "/".join(b):
        assert mqtt_topic_to_key("/".join(a)) != mqtt_topic_to_key("/".join(b))
