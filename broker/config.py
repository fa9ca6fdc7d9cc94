"""The broker's configuration: typed, frozen dataclasses loaded from one TOML file and the environment.

One dataclass per TOML section (`ServerConfig` is ``[server]``, ...), gathered in `Config`. Values come,
in rising precedence, from the defaults below (README, Configuration), the TOML file, environment variables
``POLYBROKER_<SECTION>_<KEY>`` (``POLYBROKER_LIMITS_MAX_CONNECTIONS=5000``; text parsed by the field's
type: integers, floats, booleans true/false/1/0/yes/no/on/off, comma-separated lists) and the command
line. ``POLYBROKER_DATA_DIR`` is an alias of ``POLYBROKER_STORE_DATA_DIR`` (the latter wins), and
``POLYBROKER_USERS_<NAME>=scrypt$...`` adds a user (name lower-cased). Environment variables whose
first word is not a section are left alone, so other tools may share the prefix.

Everything is validated at load: a bad value raises `ConfigError` naming where it came from, the key
and the reason ("polybroker.toml: [limits] max_connections: expected an integer, got 'many'"), so the
broker refuses to start instead of failing later. Secrets are never echoed in errors.

Must not import: asyncio, protocols, storage, cluster, broker.core (broker.auth only, for the
password-hash format).
"""

from __future__ import annotations

import enum
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

from broker.auth import parse_password_hash


class ConfigError(Exception):
    """A configuration problem; the message names its origin, the key and the reason, on one line."""


def _addr(default: str) -> Any:
    return field(default=default, metadata={"check": _check_listen_address})


def _checked(check: Callable[[Any], str | None], default: Any, **metadata: Any) -> Any:
    return field(default=default, metadata={"check": check, **metadata})


def _at_least(low: float) -> Callable[[Any], str | None]:
    return lambda value: None if value >= low else f"must be at least {low:g}, got {value!r}"


def _between(low: int, high: int) -> Callable[[Any], str | None]:
    return lambda value: None if low <= value <= high else f"must be between {low} and {high}, got {value!r}"


def _positive(value: float) -> str | None:
    return None if value > 0 else f"must be greater than 0, got {value!r}"


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    shown = ", ".join(repr(choice) for choice in choices)
    return lambda value: None if value in choices else f"expected one of {shown}, got {value!r}"


def _check_listen_address(value: str) -> str | None:
    if value in ("", "off"):
        return None
    return _check_host_port(value)


def _check_optional_host_port(value: str) -> str | None:
    return None if value == "" else _check_host_port(value)


def _check_host_port(value: str) -> str | None:
    try:
        parse_host_port(value)
    except ValueError as exc:
        return str(exc)
    return None


_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)


def parse_host_port(text: str) -> tuple[str, int]:
    """Parse "host:port" ("0.0.0.0:1883", "[::]:1883", "broker.example:1883") into (host, port).

    IPv6 hosts come back without brackets. Port 0 (an ephemeral port, for tests) is allowed.
    Raises ValueError with the reason.
    """
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f'expected "[ipv6]:port", got {text!r}')
        try:
            ipaddress.IPv6Address(host.partition("%")[0])
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address, in {text!r}") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f'expected "host:port", got {text!r}')
        if ":" in host:
            raise ValueError(f'an IPv6 host needs brackets ("[::1]:1883"), got {text!r}')
        if not _HOSTNAME.match(host):
            raise ValueError(f"{host!r} is not a host name or IPv4 address, in {text!r}")
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"port must be a number from 0 to 65535, in {text!r}")
    return host, int(port_text)


# --- Sections ------------------------------------------------------------------------------------
# Field order is the order `to_toml` prints. A field's TOML key is its name unless metadata["key"]
# says otherwise; metadata["check"] returns None or the reason the value is refused; metadata["lower"]
# lower-cases a string before the check; metadata["secret"] keeps the value out of error messages.


@dataclass(frozen=True, slots=True)
class ServerConfig:
    log_level: str = _checked(_one_of("debug", "info", "warning", "error", "critical"), "info", lower=True)
    name: str = "polybroker"
    allow_anonymous: bool = True
    sys_interval: float = _checked(_at_least(0), 10.0)  # seconds between MQTT $SYS publications; 0 = off


@dataclass(frozen=True, slots=True)
class StoreConfig:
    kind: str = _checked(_one_of("sqlite", "memory"), "sqlite")
    data_dir: str = "./data"
    memory_high_watermark_mb: int = _checked(_positive, 1024)
    store_high_watermark_mb: int = _checked(_positive, 256)  # pending bytes (MiB) that pause publishers
    page_out_threshold: int = _checked(_positive, 10000)  # messages a queue keeps in RAM before paging


@dataclass(frozen=True, slots=True)
class ListenersConfig:
    """Each "host:port"; "" or "off" switches the listener off. TLS listeners (mqtt_tls, amqp_tls,
    stomp_tls, wss) start only when [tls] cert_file is set."""

    mqtt: str = _addr("0.0.0.0:1883")
    amqp: str = _addr("0.0.0.0:5672")
    stomp: str = _addr("0.0.0.0:61613")
    ws: str = _addr("0.0.0.0:15675")
    mqtt_tls: str = _addr("0.0.0.0:8883")
    amqp_tls: str = _addr("0.0.0.0:5671")
    stomp_tls: str = _addr("0.0.0.0:61614")
    wss: str = _addr("0.0.0.0:15676")


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""  # CA of client certificates; when set, presented client certificates are verified
    verify_client: bool = False  # require a client certificate (needs ca_file)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_connections: int = _checked(_positive, 20000)
    max_frame_size: int = _checked(_positive, 16777216)  # bytes; any protocol's frame/packet/body
    max_pending_write_bytes: int = _checked(_positive, 67108864)
    max_headers: int = _checked(_positive, 1000)  # STOMP header count
    max_header_length: int = _checked(_positive, 10240)
    # AMQP 0-9-1 §4.2.3: frame-min-size is 4096; channel-max and heartbeat are shorts on the wire.
    amqp_frame_max: int = _checked(_between(4096, 2**32 - 1), 131072)
    amqp_channel_max: int = _checked(_between(1, 65535), 2047)
    # MQTT 5 Receive Maximum is a two-byte integer and must not be 0 [MQTT-3.2.2.3.3].
    mqtt_max_inflight: int = _checked(_between(1, 65535), 1000)
    mqtt_max_queued: int = _checked(_at_least(0), 100000)  # per client; beyond it messages are dropped
    max_consumer_prefetch: int = _checked(_between(0, 65535), 65535)  # basic.qos prefetch-count is a short
    heartbeat: int = _checked(_between(0, 65535), 60)  # seconds the AMQP server proposes
    stomp_heartbeat_ms: int = _checked(_at_least(0), 10000)


@dataclass(frozen=True, slots=True)
class DefaultUserConfig:
    """The default user; user = "" disables it. `password` (TOML key "pass") is plain text or a
    scrypt hash. guest/guest is accepted only from loopback (broker.auth)."""

    user: str = "guest"
    password: str = field(default="guest", metadata={"key": "pass", "secret": True})


@dataclass(frozen=True, slots=True)
class UserConfig:
    """One entry of [users]. `vhosts` None means every vhost."""

    name: str
    password_hash: str
    vhosts: tuple[str, ...] | None = None
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class VhostsConfig:
    names: tuple[str, ...] = ("/",)  # "/" always exists


@dataclass(frozen=True, slots=True)
class HaConfig:
    role: str = _checked(_one_of("", "active", "standby", "auto"), "")  # "" = single node
    peer: str = _checked(_check_optional_host_port, "")  # the other node's replication port
    listen: str = _checked(_check_optional_host_port, "")  # where this node's replication listener binds
    lock: str = ""  # shared directory holding the lease lock file
    secret: str = field(default="", metadata={"secret": True})
    lease_seconds: float = _checked(_positive, 2.0)
    sync_timeout: float = _checked(_positive, 5.0)
    node_id: str = ""
    # Mutual TLS on the replication link: this node's certificate and key (usable as server and
    # as client certificate) and the CA that signed both nodes' certificates. All three or none.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""

    @property
    def enabled(self) -> bool:
        return self.role != ""


class ListenerProtocol(enum.Enum):
    MQTT = "mqtt"
    AMQP = "amqp"
    STOMP = "stomp"
    WEBSOCKET = "ws"  # MQTT or STOMP over WebSocket, chosen per connection (README, Configuration)


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    """One listener to start: `name` is its [listeners] key."""

    name: str
    protocol: ListenerProtocol
    tls: bool
    host: str
    port: int


_LISTENER_KINDS: dict[str, tuple[ListenerProtocol, bool]] = {
    "mqtt": (ListenerProtocol.MQTT, False),
    "amqp": (ListenerProtocol.AMQP, False),
    "stomp": (ListenerProtocol.STOMP, False),
    "ws": (ListenerProtocol.WEBSOCKET, False),
    "mqtt_tls": (ListenerProtocol.MQTT, True),
    "amqp_tls": (ListenerProtocol.AMQP, True),
    "stomp_tls": (ListenerProtocol.STOMP, True),
    "wss": (ListenerProtocol.WEBSOCKET, True),
}


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    listeners: ListenersConfig = field(default_factory=ListenersConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    default: DefaultUserConfig = field(default_factory=DefaultUserConfig)
    users: tuple[UserConfig, ...] = ()
    vhosts: VhostsConfig = field(default_factory=VhostsConfig)
    ha: HaConfig = field(default_factory=HaConfig)
    source: str = ""  # the TOML file it was loaded from, "" if none

    def enabled_listeners(self) -> tuple[ListenerSpec, ...]:
        """The listeners to start, in [listeners] order: those not switched off, TLS ones only when
        [tls] cert_file is set."""
        specs = []
        for name, (protocol, tls) in _LISTENER_KINDS.items():
            address = getattr(self.listeners, name)
            if address in ("", "off") or (tls and not self.tls.cert_file):
                continue
            host, port = parse_host_port(address)
            specs.append(ListenerSpec(name, protocol, tls, host, port))
        return tuple(specs)

    def to_dict(self) -> dict[str, Any]:
        """The effective configuration as TOML-shaped data; [default] pass is masked as "***"."""
        data: dict[str, Any] = {}
        for section, cls in _SECTIONS.items():
            values = getattr(self, section)
            table: dict[str, Any] = {}
            for f in fields(cls):
                value = getattr(values, f.name)
                table[f.metadata.get("key", f.name)] = list(value) if isinstance(value, tuple) else value
            data[section] = table
        data["default"]["pass"] = "***"
        if data["ha"]["secret"]:
            data["ha"]["secret"] = "***"
        users: dict[str, Any] = {}
        for user in self.users:
            entry: dict[str, Any] = {"password": user.password_hash, "tags": list(user.tags)}
            if user.vhosts is not None:
                entry["vhosts"] = list(user.vhosts)
            users[user.name] = entry
        data["users"] = users
        return data

    def to_toml(self) -> str:
        """`to_dict` as TOML text (what `polybroker config --print` shows); tomllib reads it back."""
        lines = [f"# polybroker effective configuration (file: {self.source or 'none'}, plus environment)"]
        data = self.to_dict()
        users = data.pop("users")
        for section, table in data.items():
            lines.append(f"\n[{section}]")
            lines.extend(f"{_toml_key(key)} = {_toml_value(value)}" for key, value in table.items())
        lines.append("\n[users]")
        for name, entry in users.items():
            lines.append(f"\n[users.{_toml_key(name)}]")
            lines.extend(f"{key} = {_toml_value(value)}" for key, value in entry.items())
        return "\n".join(lines) + "\n"


_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "store": StoreConfig,
    "listeners": ListenersConfig,
    "tls": TlsConfig,
    "limits": LimitsConfig,
    "default": DefaultUserConfig,
    "vhosts": VhostsConfig,
    "ha": HaConfig,
}
_ALL_SECTIONS = (*_SECTIONS, "users")
_USER_KEYS = ("password", "vhosts", "tags")


# --- TOML output -----------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_string(text: str) -> str:
    # TOML v1.0.0 "Basic strings": escape quote, backslash and control characters (tab may stay).
    out = []
    for char in text:
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif (char < " " and char != "\t") or char == "\x7f":
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_string(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    return "[" + ", ".join(_toml_value(item) for item in value) + "]"


# --- Loading -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Setting:
    """A raw value and where it came from (for error messages)."""

    value: Any
    origin: str  # "polybroker.toml", "environment variable POLYBROKER_X_Y", "command line"
    is_text: bool  # True: text to parse by the field's type (environment); False: a typed value


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "a boolean", str: "a string"}


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, int | float):
        return f"{value!r} (a number)"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _convert(setting: _Setting, kind: Any, secret: bool) -> Any:
    """Turn a raw value into the field's type; raise ValueError with the reason."""
    value = setting.value
    if kind == tuple[str, ...]:
        if setting.is_text:
            return tuple(item.strip() for item in value.split(",") if item.strip())
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return tuple(value)
        raise ValueError(f"expected a list of strings, got {_describe(value)}")
    shown = "a value of another type" if secret else _describe(value)
    if setting.is_text and kind is not str:
        text = value.strip()
        try:
            if kind is bool:
                if text.lower() in _TRUE:
                    return True
                if text.lower() in _FALSE:
                    return False
                raise ValueError
            converted = kind(text)
        except ValueError:
            raise ValueError(f"expected {_TYPE_NAMES[kind]}, got {shown}") from None
    else:
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ValueError(f"expected {_TYPE_NAMES[kind]}, got {shown}")
        converted = value
    if kind is float and not math.isfinite(converted):
        raise ValueError(f"expected a finite number, got {shown}")
    return converted


def _fail(origin: str, section: str, key: str, reason: str) -> ConfigError:
    return ConfigError(f"{origin}: [{section}] {key}: {reason}")


def _build_section(section: str, cls: type, raw: Mapping[str, _Setting]) -> Any:
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in fields(cls):
        key = f.metadata.get("key", f.name)
        setting = raw.get(key)
        if setting is None:
            continue
        try:
            value = _convert(setting, hints[f.name], f.metadata.get("secret", False))
            if f.metadata.get("lower", False):
                value = value.lower()
            check = f.metadata.get("check")
            reason = check(value) if check is not None else None
            if reason is not None:
                raise ValueError(reason)
        except ValueError as exc:
            raise _fail(setting.origin, section, key, str(exc)) from None
        values[f.name] = value
    return cls(**values)


def _keys_of(cls: type) -> dict[str, str]:
    return {f.metadata.get("key", f.name): f.name for f in fields(cls)}


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the file: {exc.strerror or exc}") from None


def _layer_file(
    path: str, document: Mapping[str, Any], raw: dict[str, dict[str, _Setting]], users: dict[str, _Setting]
) -> None:
    for section, table in document.items():
        if section not in _ALL_SECTIONS:
            raise ConfigError(f"{path}: [{section}]: unknown section (known: {', '.join(_ALL_SECTIONS)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {section}: expected a table [{section}], got {_describe(table)}")
        if section == "users":
            for name, entry in table.items():
                users[name] = _Setting(entry, path, False)
            continue
        known = _keys_of(_SECTIONS[section])
        for key, value in table.items():
            if key not in known:
                raise _fail(path, section, key, f"unknown key (known: {', '.join(known)})")
            raw[section][key] = _Setting(value, path, False)


def _layer_env(
    env: Mapping[str, str], raw: dict[str, dict[str, _Setting]], users: dict[str, _Setting]
) -> None:
    # The alias first, so that POLYBROKER_STORE_DATA_DIR (visited below) wins over it.
    if "POLYBROKER_DATA_DIR" in env:
        raw["store"]["data_dir"] = _Setting(
            env["POLYBROKER_DATA_DIR"], "environment variable POLYBROKER_DATA_DIR", True
        )
    for name in sorted(env):
        if not name.startswith("POLYBROKER_"):
            continue
        section, _, key = name[len("POLYBROKER_") :].partition("_")
        section, key = section.lower(), key.lower()
        origin = f"environment variable {name}"
        if section == "users":
            if not key:
                raise ConfigError(f"{origin}: expected POLYBROKER_USERS_<NAME>=<password hash>")
            users[key] = _Setting(env[name], origin, True)
        elif section in _SECTIONS:
            known = _keys_of(_SECTIONS[section])
            if key not in known:
                raise _fail(origin, section, key or "(none)", f"unknown key (known: {', '.join(known)})")
            raw[section][key] = _Setting(env[name], origin, True)


def _build_users(users: Mapping[str, _Setting], vhost_names: Iterable[str]) -> tuple[UserConfig, ...]:
    existing = set(vhost_names)
    built = []
    for name, setting in users.items():
        entry = setting.value
        if isinstance(entry, str):
            entry = {"password": entry}
        if not isinstance(entry, dict):
            raise _fail(setting.origin, "users", name, "expected a password hash or a table [users.NAME]")
        where = f"users.{_toml_key(name)}" if isinstance(setting.value, dict) else "users"
        for key in entry:
            if key not in _USER_KEYS:
                raise _fail(setting.origin, where, key, f"unknown key (known: {', '.join(_USER_KEYS)})")
        password = entry.get("password")
        key = "password" if isinstance(setting.value, dict) else name
        if not isinstance(password, str):
            raise _fail(setting.origin, where, key, "expected a password hash string")
        try:
            parse_password_hash(password)
        except ValueError as exc:
            raise _fail(setting.origin, where, key, str(exc)) from None
        lists: dict[str, tuple[str, ...]] = {}
        for list_key in ("vhosts", "tags"):
            if list_key in entry:
                try:
                    lists[list_key] = _convert(
                        _Setting(entry[list_key], setting.origin, False), tuple[str, ...], False
                    )
                except ValueError as exc:
                    raise _fail(setting.origin, where, list_key, str(exc)) from None
        vhosts = lists.get("vhosts")
        for vhost in vhosts or ():
            if vhost not in existing:
                raise _fail(setting.origin, where, "vhosts", f"vhost {vhost!r} is not in [vhosts] names")
        built.append(UserConfig(name, password, vhosts, lists.get("tags", ())))
    return tuple(built)


def _origin(raw: Mapping[str, Mapping[str, _Setting]], section: str, key: str, fallback: str) -> str:
    setting = raw[section].get(key)
    return setting.origin if setting is not None else fallback


def _validate(
    config: Config, raw: Mapping[str, Mapping[str, _Setting]], users: Mapping[str, _Setting]
) -> None:
    """Checks that involve more than one key."""
    fallback = config.source or "defaults"
    tls = config.tls
    tls_listeners = [
        name
        for name, (_, is_tls) in _LISTENER_KINDS.items()
        if is_tls and getattr(config.listeners, name) not in ("", "off")
    ]
    if tls.cert_file:
        if tls_listeners and not tls.key_file:
            raise _fail(
                _origin(raw, "tls", "cert_file", fallback),
                "tls",
                "key_file",
                f"required when cert_file is set and TLS listeners are on ({', '.join(tls_listeners)})",
            )
        for key in ("cert_file", "key_file", "ca_file"):
            path = getattr(tls, key)
            if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
                raise _fail(_origin(raw, "tls", key, fallback), "tls", key, f"cannot read the file {path!r}")
    else:
        for key in ("key_file", "ca_file"):
            if getattr(tls, key):
                raise _fail(
                    _origin(raw, "tls", key, fallback),
                    "tls",
                    key,
                    "set, but cert_file is empty, so no TLS listener would start",
                )
    if tls.verify_client and not tls.ca_file:
        raise _fail(
            _origin(raw, "tls", "verify_client", fallback),
            "tls",
            "verify_client",
            "needs ca_file (the CA that signs client certificates)",
        )
    seen: dict[tuple[str, int], str] = {}
    for spec in config.enabled_listeners():
        other = seen.setdefault((spec.host, spec.port), spec.name)
        if spec.port != 0 and other != spec.name:
            raise _fail(
                _origin(raw, "listeners", spec.name, fallback),
                "listeners",
                spec.name,
                f"{getattr(config.listeners, spec.name)} is also the address of listener {other!r}",
            )
    default = config.default
    if default.user and not default.password:
        raise _fail(
            _origin(raw, "default", "pass", fallback),
            "default",
            "pass",
            f'the default user {default.user!r} needs a password (or set user = "" to disable it)',
        )
    if default.password.startswith("scrypt$"):
        try:
            parse_password_hash(default.password)
        except ValueError as exc:
            raise _fail(_origin(raw, "default", "pass", fallback), "default", "pass", str(exc)) from None
    if default.user and default.user in users:
        raise _fail(
            users[default.user].origin,
            "users",
            default.user,
            'is also the [default] user; remove one, or set [default] user = ""',
        )
    ha_tls = {key: getattr(config.ha, key) for key in ("tls_cert_file", "tls_key_file", "tls_ca_file")}
    if any(ha_tls.values()):
        for key, path in ha_tls.items():
            if not path:
                raise _fail(
                    _origin(raw, "ha", key, fallback), "ha", key, "the link's TLS needs all three files"
                )
            if not (os.path.isfile(path) and os.access(path, os.R_OK)):
                raise _fail(_origin(raw, "ha", key, fallback), "ha", key, f"cannot read the file {path!r}")
    for name in config.vhosts.names:
        if not name:
            raise _fail(_origin(raw, "vhosts", "names", fallback), "vhosts", "names", "a vhost name is empty")


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Load the configuration: defaults < the TOML file at `path` < `env` (os.environ if None) <
    `overrides` ({"store": {"data_dir": "/x"}}, typed values, reported as from the command line).

    Raises ConfigError on any unknown section or key, wrong type, or invalid value.
    """
    source = "" if path is None else os.fspath(path)
    raw: dict[str, dict[str, _Setting]] = {section: {} for section in _SECTIONS}
    users: dict[str, _Setting] = {}
    if source:
        _layer_file(source, _read_file(source), raw, users)
    _layer_env(os.environ if env is None else env, raw, users)
    for section, table in (overrides or {}).items():
        known = _keys_of(_SECTIONS[section])
        for key, value in table.items():
            if key not in known:
                raise _fail("command line", section, key, "unknown key")
            raw[section][key] = _Setting(value, "command line", False)
    sections = {name: _build_section(name, cls, raw[name]) for name, cls in _SECTIONS.items()}
    vhosts: VhostsConfig = sections["vhosts"]
    if "/" not in vhosts.names:
        sections["vhosts"] = VhostsConfig(("/", *vhosts.names))
    config = Config(**sections, users=_build_users(users, sections["vhosts"].names), source=source)
    _validate(config, raw, users)
    return config
