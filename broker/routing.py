"""Exchanges: the four routing algorithms of AMQP 0-9-1 (§3.1.3) over bindings.

An exchange maps (routing key, headers) to the set of destinations bound to it. A destination
is a queue or another exchange (exchange-to-exchange bindings); the vhost follows exchange
destinations. Topic routing walks a trie over the key's levels (never a scan of all bindings)
and caches the result per routing key until the bindings change.

Must not import: asyncio, protocols, storage, cluster.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

Destination = Any  # a Queue or an Exchange (both hashable by identity)

DIRECT = "direct"
FANOUT = "fanout"
TOPIC = "topic"
HEADERS = "headers"
EXCHANGE_TYPES = (DIRECT, FANOUT, TOPIC, HEADERS)

_ROUTE_CACHE_MAX = 4096


class Binding:
    """One binding: source exchange -> destination with a key (and arguments for headers)."""

    __slots__ = ("destination", "routing_key", "arguments")

    def __init__(self, destination: Destination, routing_key: str, arguments: dict[str, Any]) -> None:
        self.destination = destination
        self.routing_key = routing_key
        self.arguments = arguments

    def same(self, destination: Destination, routing_key: str, arguments: dict[str, Any]) -> bool:
        return (
            self.destination is destination
            and self.routing_key == routing_key
            and self.arguments == arguments
        )


class Exchange:
    """A named router. Subclasses implement `route`; bindings are kept in `bindings`."""

    __slots__ = ("name", "type", "durable", "auto_delete", "internal", "arguments", "bindings", "alternate")

    def __init__(
        self,
        name: str,
        type: str,  # noqa: A002 - AMQP's name
        durable: bool = True,
        auto_delete: bool = False,
        internal: bool = False,
        arguments: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.type = type
        self.durable = durable
        self.auto_delete = auto_delete
        self.internal = internal
        self.arguments = arguments or {}
        self.bindings: list[Binding] = []
        # Name of the alternate exchange for unroutable messages (RabbitMQ's `alternate-exchange`).
        alt = self.arguments.get("alternate-exchange")
        self.alternate: str | None = alt if isinstance(alt, str) and alt else None

    def add_binding(self, destination: Destination, routing_key: str, arguments: dict[str, Any]) -> bool:
        """Add a binding; False if an identical one exists (binding is idempotent, §3.1.3.1)."""
        for binding in self.bindings:
            if binding.same(destination, routing_key, arguments):
                return False
        self.bindings.append(Binding(destination, routing_key, arguments))
        self._bindings_changed()
        return True

    def remove_binding(self, destination: Destination, routing_key: str, arguments: dict[str, Any]) -> bool:
        for i, binding in enumerate(self.bindings):
            if binding.same(destination, routing_key, arguments):
                del self.bindings[i]
                self._bindings_changed()
                return True
        return False

    def remove_destination(self, destination: Destination) -> list[Binding]:
        """Drop every binding to `destination` (it was deleted); returns what was removed."""
        removed = [b for b in self.bindings if b.destination is destination]
        if removed:
            self.bindings = [b for b in self.bindings if b.destination is not destination]
            self._bindings_changed()
        return removed

    def _bindings_changed(self) -> None:
        """Rebuild lookup structures (subclasses)."""

    def route(self, routing_key: str, headers: dict[str, Any] | None) -> Iterable[Destination]:
        raise NotImplementedError


class DirectExchange(Exchange):
    """Destinations whose binding key equals the routing key (§3.1.3.1)."""

    __slots__ = ("_by_key",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._by_key: dict[str, list[Destination]] = {}
        super().__init__(*args, **kwargs)

    def _bindings_changed(self) -> None:
        by_key: dict[str, list[Destination]] = {}
        for b in self.bindings:
            dests = by_key.setdefault(b.routing_key, [])
            if b.destination not in dests:
                dests.append(b.destination)
        self._by_key = by_key

    def route(self, routing_key: str, headers: dict[str, Any] | None) -> Iterable[Destination]:
        return self._by_key.get(routing_key, ())


class FanoutExchange(Exchange):
    """Every bound destination, key ignored (§3.1.3.2)."""

    __slots__ = ("_all",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._all: list[Destination] = []
        super().__init__(*args, **kwargs)

    def _bindings_changed(self) -> None:
        self._all = list(dict.fromkeys(b.destination for b in self.bindings))

    def route(self, routing_key: str, headers: dict[str, Any] | None) -> Iterable[Destination]:
        return self._all


class _TrieNode:
    __slots__ = ("children", "destinations")

    def __init__(self) -> None:
        self.children: dict[str, _TrieNode] = {}
        self.destinations: list[Destination] = []


class TopicTrie:
    """Binding patterns over levels: `*` matches one level, `#` zero or more (§3.1.3.3).

    A leading wildcard does not match a first level that starts with `$` ([MQTT-4.7.2-1]: topics
    such as `$SYS/...` are only reached by filters that name them).
    """

    __slots__ = ("_root",)

    def __init__(self) -> None:
        self._root = _TrieNode()

    def add(self, pattern: str, destination: Destination) -> None:
        node = self._root
        for word in pattern.split("."):
            node = node.children.setdefault(word, _TrieNode())
        if destination not in node.destinations:
            node.destinations.append(destination)

    def match(self, key: str) -> list[Destination]:
        words = key.split(".")
        found: dict[Destination, None] = {}
        self._walk(self._root, words, 0, found, words[0].startswith("$"))
        return list(found)

    def _walk(
        self, node: _TrieNode, words: list[str], i: int, found: dict[Destination, None], dollar: bool
    ) -> None:
        children = node.children
        wild_ok = not (dollar and i == 0)
        if i == len(words):
            for d in node.destinations:
                found[d] = None
            hash_node = children.get("#")
            if hash_node is not None:  # `#` also matches zero levels
                self._walk(hash_node, words, i, found, dollar)
            return
        exact = children.get(words[i])
        if exact is not None:
            self._walk(exact, words, i + 1, found, dollar)
        if not wild_ok:
            return
        star = children.get("*")
        if star is not None:
            self._walk(star, words, i + 1, found, dollar)
        hash_node = children.get("#")
        if hash_node is not None:
            # `#` swallows levels i..j-1 for every j; try each remaining suffix.
            for j in range(i, len(words) + 1):
                self._walk(hash_node, words, j, found, dollar)


class TopicExchange(Exchange):
    """Destinations whose binding pattern matches the routing key (§3.1.3.3)."""

    __slots__ = ("_trie", "_cache")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._trie = TopicTrie()
        self._cache: dict[str, list[Destination]] = {}
        super().__init__(*args, **kwargs)

    def _bindings_changed(self) -> None:
        trie = TopicTrie()
        for b in self.bindings:
            trie.add(b.routing_key, b.destination)
        self._trie = trie
        self._cache = {}

    def add_binding(self, destination: Destination, routing_key: str, arguments: dict[str, Any]) -> bool:
        # Incremental insert: bindings change often (every MQTT subscribe), rebuilding is O(n).
        for binding in self.bindings:
            if binding.same(destination, routing_key, arguments):
                return False
        self.bindings.append(Binding(destination, routing_key, arguments))
        self._trie.add(routing_key, destination)
        self._cache = {}
        return True

    def route(self, routing_key: str, headers: dict[str, Any] | None) -> Iterable[Destination]:
        cached = self._cache.get(routing_key)
        if cached is None:
            cached = self._trie.match(routing_key)
            if len(self._cache) >= _ROUTE_CACHE_MAX:
                self._cache.clear()
            self._cache[routing_key] = cached
        return cached


class HeadersExchange(Exchange):
    """Destinations whose binding arguments match the message headers (§3.1.3.4).

    `x-match` is `all` (default) or `any`; `all-with-x` / `any-with-x` also compare `x-`
    arguments, as RabbitMQ does. A binding argument with no value (None) matches presence.
    """

    __slots__ = ()

    def route(self, routing_key: str, headers: dict[str, Any] | None) -> Iterable[Destination]:
        headers = headers or {}
        found: dict[Destination, None] = {}
        for b in self.bindings:
            if b.destination not in found and _headers_match(b.arguments, headers):
                found[b.destination] = None
        return list(found)


def _headers_match(arguments: dict[str, Any], headers: dict[str, Any]) -> bool:
    mode = arguments.get("x-match", "all")
    with_x = mode in ("all-with-x", "any-with-x")
    want_all = mode in ("all", "all-with-x")
    matched_any = False
    for name, value in arguments.items():
        if name == "x-match" or (name.startswith("x-") and not with_x):
            continue
        ok = name in headers and (value is None or headers[name] == value)
        if ok:
            matched_any = True
            if not want_all:
                return True
        elif want_all:
            return False
    return want_all or matched_any


_CLASSES: dict[str, type[Exchange]] = {
    DIRECT: DirectExchange,
    FANOUT: FanoutExchange,
    TOPIC: TopicExchange,
    HEADERS: HeadersExchange,
}


def make_exchange(
    name: str,
    type: str,  # noqa: A002
    durable: bool = True,
    auto_delete: bool = False,
    internal: bool = False,
    arguments: dict[str, Any] | None = None,
) -> Exchange:
    """A new exchange of `type` (caller validates the type name)."""
    return _CLASSES[type](name, type, durable, auto_delete, internal, arguments)
