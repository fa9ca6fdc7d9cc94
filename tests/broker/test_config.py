"""broker.config: defaults (README, Configuration), TOML loading, environment overrides, validation, printing."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from broker.auth import hash_password
from broker.config import (
    Config,
    ConfigError,
    DefaultUserConfig,
    ListenerProtocol,
    UserConfig,
    load_config,
    parse_host_port,
)


@pytest.fixture(scope="module")
def alice_hash() -> str:
    return hash_password("alice-secret")


def write(tmp_path: Path, text: str, name: str = "polybroker.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    return load_config(write(tmp_path, text), env=env or {})


# --- Defaults ------------------------------------------------------------------------------------


def test_defaults_are_the_design_endpoints() -> None:
    config = load_config(env={})
    assert config == Config()
    ports = {(spec.protocol, spec.tls): (spec.host, spec.port) for spec in config.enabled_listeners()}
    assert ports == {
        (ListenerProtocol.MQTT, False): ("0.0.0.0", 1883),
        (ListenerProtocol.AMQP, False): ("0.0.0.0", 5672),
        (ListenerProtocol.STOMP, False): ("0.0.0.0", 61613),
        (ListenerProtocol.WEBSOCKET, False): ("0.0.0.0", 15675),
    }


def test_tls_listeners_use_the_design_ports_once_a_certificate_is_set(tmp_path: Path) -> None:
    cert, key = write(tmp_path, "cert", "cert.pem"), write(tmp_path, "key", "key.pem")
    config = load_config(env={"POLYBROKER_TLS_CERT_FILE": str(cert), "POLYBROKER_TLS_KEY_FILE": str(key)})
    tls_ports = {spec.protocol: spec.port for spec in config.enabled_listeners() if spec.tls}
    assert tls_ports == {
        ListenerProtocol.MQTT: 8883,
        ListenerProtocol.AMQP: 5671,
        ListenerProtocol.STOMP: 61614,
        ListenerProtocol.WEBSOCKET: 15676,
    }


def test_default_values_of_every_section() -> None:
    config = Config()
    assert (config.server.log_level, config.server.name, config.server.allow_anonymous) == (
        "info",
        "polybroker",
        True,
    )
    assert config.server.sys_interval == 10
    assert (config.store.kind, config.store.data_dir) == ("sqlite", "./data")
    assert (config.store.memory_high_watermark_mb, config.store.store_high_watermark_mb) == (1024, 256)
    assert config.store.page_out_threshold == 10000
    assert (config.tls.cert_file, config.tls.key_file, config.tls.ca_file, config.tls.verify_client) == (
        "",
        "",
        "",
        False,
    )
    limits = config.limits
    assert (limits.max_connections, limits.max_frame_size, limits.max_pending_write_bytes) == (
        20000,
        16777216,
        67108864,
    )
    assert (limits.max_headers, limits.max_header_length) == (1000, 10240)
    assert (limits.amqp_frame_max, limits.amqp_channel_max, limits.heartbeat) == (131072, 2047, 60)
    assert (limits.mqtt_max_inflight, limits.mqtt_max_queued) == (1000, 100000)
    assert (limits.max_consumer_prefetch, limits.stomp_heartbeat_ms) == (65535, 10000)
    assert config.default == DefaultUserConfig("guest", "guest")
    assert config.users == ()
    assert config.vhosts.names == ("/",)
    ha = config.ha
    assert (ha.role, ha.peer, ha.listen, ha.lock, ha.secret, ha.node_id) == ("",) * 6
    assert (ha.lease_seconds, ha.sync_timeout, ha.enabled) == (2.0, 5.0, False)


# --- The TOML file -------------------------------------------------------------------------------

FULL = """
[server]
log_level = "DEBUG"
name = "edge-1"
allow_anonymous = false
sys_interval = 0

[store]
kind = "memory"
data_dir = "/var/lib/polybroker"
memory_high_watermark_mb = 512
store_high_watermark_mb = 64
page_out_threshold = 500

[listeners]
mqtt = "127.0.0.1:11883"
amqp = "[::]:15672"
stomp = "off"
ws = ""

[limits]
max_connections = 10
heartbeat = 0
mqtt_max_queued = 0

[default]
user = "admin"
pass = "s3cret"

[vhosts]
names = ["dev", "prod"]

[ha]
role = "auto"
peer = "10.0.0.2:7000"
listen = "0.0.0.0:7000"
lock = "/shared/lock"
secret = "hmac-key"
lease_seconds = 1.5
sync_timeout = 3
node_id = "a"

[users]
bob = "{bob}"

[users.alice]
password = "{alice}"
vhosts = ["dev"]
tags = ["administrator", "monitoring"]
"""


def test_a_full_file_is_read_into_typed_sections(tmp_path: Path, alice_hash: str) -> None:
    bob_hash = hash_password("bob")
    config = load_text(tmp_path, FULL.format(alice=alice_hash, bob=bob_hash))
    assert config.source == str(tmp_path / "polybroker.toml")
    assert config.server.log_level == "debug"  # level names are case-insensitive
    assert (config.server.name, config.server.allow_anonymous, config.server.sys_interval) == (
        "edge-1",
        False,
        0,
    )
    assert isinstance(config.server.sys_interval, float)
    assert config.store.kind == "memory" and config.store.data_dir == "/var/lib/polybroker"
    assert (config.store.memory_high_watermark_mb, config.store.store_high_watermark_mb) == (512, 64)
    assert config.store.page_out_threshold == 500
    specs = config.enabled_listeners()
    assert [(s.name, s.host, s.port) for s in specs] == [("mqtt", "127.0.0.1", 11883), ("amqp", "::", 15672)]
    assert (config.limits.max_connections, config.limits.heartbeat, config.limits.mqtt_max_queued) == (
        10,
        0,
        0,
    )
    assert config.limits.max_frame_size == 16777216  # keys not in the file keep their defaults
    assert config.default == DefaultUserConfig("admin", "s3cret")
    assert config.vhosts.names == ("/", "dev", "prod")  # "/" always exists
    assert config.ha.enabled and config.ha.role == "auto" and config.ha.peer == "10.0.0.2:7000"
    assert (config.ha.lease_seconds, config.ha.sync_timeout, config.ha.node_id) == (1.5, 3.0, "a")
    assert config.users == (
        UserConfig("bob", bob_hash),
        UserConfig("alice", alice_hash, ("dev",), ("administrator", "monitoring")),
    )


def test_off_and_empty_switch_listeners_off(tmp_path: Path) -> None:
    config = load_text(tmp_path, '[listeners]\nmqtt = "off"\namqp = ""\nstomp = "off"\nws = "127.0.0.1:0"\n')
    assert [(s.name, s.port) for s in config.enabled_listeners()] == [("ws", 0)]


def test_listeners_may_share_port_zero(tmp_path: Path) -> None:
    text = "[listeners]\n" + "".join(f'{name} = "127.0.0.1:0"\n' for name in ("mqtt", "amqp", "stomp", "ws"))
    config = load_text(tmp_path, text)
    assert [s.port for s in config.enabled_listeners()] == [0, 0, 0, 0]


# --- Environment overrides -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "text", "section", "attribute", "expected"),
    [
        ("POLYBROKER_LIMITS_MAX_CONNECTIONS", "5000", "limits", "max_connections", 5000),
        ("POLYBROKER_LIMITS_MAX_CONNECTIONS", " 7 ", "limits", "max_connections", 7),
        ("POLYBROKER_HA_LEASE_SECONDS", "0.25", "ha", "lease_seconds", 0.25),
        ("POLYBROKER_SERVER_SYS_INTERVAL", "3", "server", "sys_interval", 3.0),
        ("POLYBROKER_LISTENERS_MQTT", "127.0.0.1:1884", "listeners", "mqtt", "127.0.0.1:1884"),
        ("POLYBROKER_LISTENERS_MQTT_TLS", "off", "listeners", "mqtt_tls", "off"),
        ("POLYBROKER_STORE_DATA_DIR", "/data", "store", "data_dir", "/data"),
        ("POLYBROKER_DATA_DIR", "/alias", "store", "data_dir", "/alias"),
        ("POLYBROKER_DEFAULT_USER", "admin", "default", "user", "admin"),
        ("POLYBROKER_DEFAULT_PASS", "pw with spaces ", "default", "password", "pw with spaces "),
        ("POLYBROKER_VHOSTS_NAMES", "/, dev ,prod,", "vhosts", "names", ("/", "dev", "prod")),
        ("POLYBROKER_HA_NODE_ID", "node-b", "ha", "node_id", "node-b"),
    ],
)
def test_environment_overrides_each_type(
    variable: str, text: str, section: str, attribute: str, expected: object
) -> None:
    config = load_config(env={variable: text})
    value = getattr(getattr(config, section), attribute)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("TRUE", True), ("1", True), ("yes", True), ("on", True)]
    + [("false", False), ("False", False), ("0", False), ("no", False), ("off", False)],
)
def test_environment_booleans(text: str, expected: bool) -> None:
    assert load_config(env={"POLYBROKER_SERVER_ALLOW_ANONYMOUS": text}).server.allow_anonymous is expected


def test_environment_beats_the_file_and_the_command_line_beats_both(tmp_path: Path) -> None:
    path = write(tmp_path, '[store]\ndata_dir = "/from-file"\n[limits]\nheartbeat = 5\n')
    env = {"POLYBROKER_STORE_DATA_DIR": "/from-env", "POLYBROKER_LIMITS_HEARTBEAT": "6"}
    assert load_config(path, env={}).store.data_dir == "/from-file"
    config = load_config(path, env=env)
    assert (config.store.data_dir, config.limits.heartbeat) == ("/from-env", 6)
    config = load_config(path, env=env, overrides={"store": {"data_dir": "/from-cli"}})
    assert (config.store.data_dir, config.limits.heartbeat) == ("/from-cli", 6)


def test_the_specific_data_dir_variable_beats_the_alias() -> None:
    env = {"POLYBROKER_DATA_DIR": "/alias", "POLYBROKER_STORE_DATA_DIR": "/specific"}
    assert load_config(env=env).store.data_dir == "/specific"


def test_users_from_the_environment(alice_hash: str) -> None:
    config = load_config(env={"POLYBROKER_USERS_ALICE": alice_hash})
    assert config.users == (UserConfig("alice", alice_hash),)


def test_variables_of_other_tools_sharing_the_prefix_are_ignored() -> None:
    assert load_config(env={"POLYBROKER_BENCH_RATE": "x", "POLYBROKER_CONFIG": "y", "HOME": "/"}) == Config()


# --- Validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        (
            "[limits]\nmax_connections = 'many'\n",
            "[limits] max_connections",
            "expected an integer, got 'many'",
        ),
        ("[limits]\nmax_connections = true\n", "[limits] max_connections", "expected an integer, got true"),
        ("[limits]\nmax_connections = 1.5\n", "[limits] max_connections", "expected an integer, got 1.5"),
        ("[limits]\nmax_connections = 0\n", "[limits] max_connections", "must be greater than 0"),
        ("[limits]\namqp_frame_max = 1024\n", "[limits] amqp_frame_max", "between 4096 and"),
        ("[limits]\nmqtt_max_inflight = 0\n", "[limits] mqtt_max_inflight", "between 1 and 65535"),
        ("[limits]\nheartbeat = 70000\n", "[limits] heartbeat", "between 0 and 65535"),
        ("[limits]\nmqtt_max_queued = -1\n", "[limits] mqtt_max_queued", "must be at least 0"),
        ("[limits]\nmax_conections = 5\n", "[limits] max_conections", "unknown key"),
        ("[server]\nallow_anonymous = 'yes'\n", "[server] allow_anonymous", "expected a boolean, got 'yes'"),
        ("[server]\nlog_level = 'loud'\n", "[server] log_level", "expected one of 'debug'"),
        ("[server]\nname = 5\n", "[server] name", "expected a string, got 5"),
        ("[server]\nsys_interval = -1\n", "[server] sys_interval", "must be at least 0"),
        ("[store]\nkind = 'redis'\n", "[store] kind", "expected one of 'sqlite', 'memory', got 'redis'"),
        ("[listeners]\nmqtt = '1883'\n", "[listeners] mqtt", 'expected "host:port"'),
        (
            "[listeners]\nmqtt = 'localhost:99999'\n",
            "[listeners] mqtt",
            "port must be a number from 0 to 65535",
        ),
        ("[listeners]\nmqtt = 'localhost:x'\n", "[listeners] mqtt", "port must be a number"),
        ("[listeners]\nmqtt = '::1:1883'\n", "[listeners] mqtt", "an IPv6 host needs brackets"),
        ("[listeners]\nmqtt = '[nope]:1883'\n", "[listeners] mqtt", "is not an IPv6 address"),
        ("[listeners]\nmqtt = 'bad host:1883'\n", "[listeners] mqtt", "is not a host name"),
        (
            "[listeners]\namqp = '0.0.0.0:1883'\n",
            "[listeners] amqp",
            "is also the address of listener 'mqtt'",
        ),
        ("[vhosts]\nnames = '/'\n", "[vhosts] names", "expected a list of strings, got '/'"),
        ("[vhosts]\nnames = ['/', 3]\n", "[vhosts] names", "expected a list of strings, got a list"),
        ("[vhosts]\nnames = ['']\n", "[vhosts] names", "a vhost name is empty"),
        ("[ha]\nrole = 'primary'\n", "[ha] role", "expected one of '', 'active', 'standby', 'auto'"),
        ("[ha]\npeer = 'nowhere'\n", "[ha] peer", 'expected "host:port"'),
        ("[ha]\nlease_seconds = 0\n", "[ha] lease_seconds", "must be greater than 0"),
        ("[ha]\nsync_timeout = nan\n", "[ha] sync_timeout", "expected a finite number"),
        ("[default]\npass = ''\n", "[default] pass", "needs a password"),
        ("[tls]\nkey_file = '/k.pem'\n", "[tls] key_file", "cert_file is empty"),
        ("[tls]\nca_file = '/ca.pem'\n", "[tls] ca_file", "cert_file is empty"),
        ("[tls]\nverify_client = true\n", "[tls] verify_client", "needs ca_file"),
        ("[users]\nalice = 5\n", "[users] alice", "expected a password hash"),
        ("[users.alice]\nvhosts = ['/']\n", "[users.alice] password", "expected a password hash string"),
        ("[users]\nguest = 'scrypt$16384$8$1$AAAA$' \n", "[users] guest", "scrypt"),
    ],
)
def test_every_error_names_the_file_the_key_and_the_reason(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'polybroker.toml'}: {key}: "), message
    assert reason in message
    assert "\n" not in message


def test_the_message_is_exactly_file_key_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "[limits]\nmax_connections = 'many'\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_config("polybroker.toml", env={})
    assert str(caught.value) == "polybroker.toml: [limits] max_connections: expected an integer, got 'many'"


def test_unknown_sections_and_non_tables_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"polybroker\.toml: \[listener\]: unknown section"):
        load_text(tmp_path, "[listener]\nmqtt = '0.0.0.0:1883'\n")
    with pytest.raises(ConfigError, match=r"polybroker\.toml: server: expected a table \[server\], got 5"):
        load_text(tmp_path, "server = 5\n")


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.toml: cannot read the file: No such file"):
        load_config(tmp_path / "missing.toml", env={})
    with pytest.raises(ConfigError, match=r"polybroker\.toml: not valid TOML: .*line 2"):
        load_text(tmp_path, "[server]\nname = \n")


def test_tls_certificate_without_key_and_unreadable_files(tmp_path: Path) -> None:
    cert = write(tmp_path, "cert", "cert.pem")
    with pytest.raises(
        ConfigError, match=r"polybroker\.toml: \[tls\] key_file: required when cert_file is set"
    ):
        load_text(tmp_path, f"[tls]\ncert_file = '{cert}'\n")
    with pytest.raises(ConfigError, match=r"\[tls\] key_file: cannot read the file '.*nokey\.pem'"):
        load_text(tmp_path, f"[tls]\ncert_file = '{cert}'\nkey_file = '{tmp_path / 'nokey.pem'}'\n")
    # No TLS listener on: a certificate without a key is harmless.
    off = "".join(f"{name} = 'off'\n" for name in ("mqtt_tls", "amqp_tls", "stomp_tls", "wss"))
    config = load_text(tmp_path, f"[tls]\ncert_file = '{cert}'\n[listeners]\n{off}")
    assert not any(spec.tls for spec in config.enabled_listeners())


def test_the_replication_links_tls_needs_all_three_readable_files(tmp_path: Path) -> None:
    cert = write(tmp_path, "cert", "node.pem")
    with pytest.raises(ConfigError, match=r"\[ha\] tls_key_file: the link's TLS needs all three files"):
        load_text(tmp_path, f"[ha]\ntls_cert_file = '{cert}'\n")
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError, match=r"\[ha\] tls_ca_file: cannot read the file"):
        load_text(
            tmp_path, f"[ha]\ntls_cert_file = '{cert}'\ntls_key_file = '{cert}'\ntls_ca_file = '{missing}'\n"
        )
    config = load_text(
        tmp_path, f"[ha]\ntls_cert_file = '{cert}'\ntls_key_file = '{cert}'\ntls_ca_file = '{cert}'\n"
    )
    assert config.ha.tls_ca_file == str(cert)


def test_user_entries_are_checked(tmp_path: Path, alice_hash: str) -> None:
    cases = [
        (
            f"[users.alice]\npassword = '{alice_hash}'\ncolour = 'red'\n",
            r"\[users\.alice\] colour: unknown key",
        ),
        (
            f"[users.alice]\npassword = '{alice_hash}'\nvhosts = ['qa']\n",
            r"\[users\.alice\] vhosts: vhost 'qa' is not",
        ),
        (
            f"[users.alice]\npassword = '{alice_hash}'\ntags = 'admin'\n",
            r"\[users\.alice\] tags: expected a list",
        ),
        (f"[users]\nguest = '{alice_hash}'\n", r"\[users\] guest: is also the \[default\] user"),
    ]
    for text, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            load_text(tmp_path, text)
    # With the default user disabled, a "guest" entry is an ordinary user.
    config = load_text(tmp_path, f"[default]\nuser = ''\n[users]\nguest = '{alice_hash}'\n")
    assert [user.name for user in config.users] == ["guest"]


def test_secrets_are_not_echoed_in_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, "[users]\nalice = 'hunter2'\n")
    assert "hunter2" not in str(caught.value) and "hash-password" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, "[default]\npass = 12345\n")
    assert "12345" not in str(caught.value) and "expected a string" in str(caught.value)


@pytest.mark.parametrize(
    ("variable", "text", "reason"),
    [
        (
            "POLYBROKER_LIMITS_MAX_CONNECTIONS",
            "many",
            "[limits] max_connections: expected an integer, got 'many'",
        ),
        ("POLYBROKER_HA_LEASE_SECONDS", "soon", "[ha] lease_seconds: expected a number, got 'soon'"),
        ("POLYBROKER_HA_LEASE_SECONDS", "inf", "[ha] lease_seconds: expected a finite number"),
        (
            "POLYBROKER_SERVER_ALLOW_ANONYMOUS",
            "maybe",
            "[server] allow_anonymous: expected a boolean, got 'maybe'",
        ),
        ("POLYBROKER_LIMITS_MAX_CONECTIONS", "5", "[limits] max_conections: unknown key"),
        ("POLYBROKER_LISTENERS_AMQP", "localhost", '[listeners] amqp: expected "host:port"'),
        ("POLYBROKER_USERS_ALICE", "plain", "[users] alice: expected"),
    ],
)
def test_environment_errors_name_the_variable(variable: str, text: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(env={variable: text})
    assert str(caught.value).startswith(f"environment variable {variable}: {reason}")


def test_command_line_errors_name_the_command_line() -> None:
    with pytest.raises(ConfigError, match=r"^command line: \[ha\] peer: "):
        load_config(env={}, overrides={"ha": {"peer": "nowhere"}})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:1883", ("0.0.0.0", 1883)),
        ("[::]:1883", ("::", 1883)),
        ("[::1]:0", ("::1", 0)),
        ("broker.example.com:65535", ("broker.example.com", 65535)),
        ("localhost:5672", ("localhost", 5672)),
    ],
)
def test_parse_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize(
    "text", ["", ":1883", "host", "host:", "host:-1", "host:65536", "[::1]1883", "a b:1"]
)
def test_parse_host_port_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host_port(text)


# --- Printing ------------------------------------------------------------------------------------


def test_to_toml_parses_back_to_the_same_configuration(tmp_path: Path, alice_hash: str) -> None:
    cert, key = write(tmp_path, "cert", "cert.pem"), write(tmp_path, "key", "key.pem")
    text = (
        FULL.format(alice=alice_hash, bob=alice_hash) + f"[tls]\ncert_file = '{cert}'\nkey_file = '{key}'\n"
    )
    original = load_text(tmp_path, text)
    printed = original.to_toml()
    data = tomllib.loads(printed)
    assert data["default"] == {"user": "admin", "pass": "***"}  # the plain password is masked
    assert data["ha"]["secret"] == "***"
    assert data["users"]["alice"] == {
        "password": alice_hash,  # users' passwords are shown hashed
        "vhosts": ["dev"],
        "tags": ["administrator", "monitoring"],
    }
    assert "s3cret" not in printed and "hmac-key" not in printed
    reloaded = load_config(write(tmp_path, printed, "printed.toml"), env={})
    assert reloaded == dataclasses.replace(
        original,
        default=DefaultUserConfig("admin", "***"),
        ha=dataclasses.replace(original.ha, secret="***"),
        source=str(tmp_path / "printed.toml"),
    )


def test_to_toml_escapes_strings_and_quotes_odd_keys(tmp_path: Path, alice_hash: str) -> None:
    name = 'odd "name"\\\x01\x7f\té'
    config = dataclasses.replace(
        Config(),
        server=dataclasses.replace(Config().server, name=name),
        users=(UserConfig("a.b c", alice_hash),),
    )
    data = tomllib.loads(config.to_toml())
    assert data["server"]["name"] == name
    assert data["users"]["a.b c"]["password"] == alice_hash
    assert "vhosts" not in data["users"]["a.b c"]  # no list = every vhost
