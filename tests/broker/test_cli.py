"""broker.cli: the `polybroker` command, as a subprocess (`python -m broker`) and in-process with
stand-ins for the modules it imports lazily (broker.server, cluster.status)."""

from __future__ import annotations

import io
import logging
import os
import re
import socket
import subprocess
import sys
import tomllib
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import broker.cli
from broker.auth import verify_password
from broker.cli import configure_logging, main
from broker.config import Config

REPO = Path(__file__).resolve().parents[2]


def clean_env(**extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("POLYBROKER_")}
    env["PYTHONPATH"] = str(REPO)
    return {**env, **extra}


def polybroker(*args: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=clean_env(**env),
        timeout=60,
    )


# --- As a subprocess -----------------------------------------------------------------------------


def test_config_print_shows_the_effective_configuration_as_toml() -> None:
    result = polybroker("config", "--print", POLYBROKER_LIMITS_MAX_CONNECTIONS="5")
    assert result.returncode == 0, result.stderr
    data = tomllib.loads(result.stdout)
    assert data["listeners"]["mqtt"] == "0.0.0.0:1883"
    assert data["limits"]["max_connections"] == 5
    assert data["default"] == {"user": "guest", "pass": "***"}


def test_config_print_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "polybroker.toml"
    path.write_text('[listeners]\nstomp = "off"\n')
    result = polybroker("config", "--print", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert tomllib.loads(result.stdout)["listeners"]["stomp"] == "off"
    # POLYBROKER_CONFIG names the file when -c is not given (containers).
    result = polybroker("config", "--print", POLYBROKER_CONFIG=str(path))
    assert tomllib.loads(result.stdout)["listeners"]["stomp"] == "off"


def test_a_bad_config_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    path = tmp_path / "polybroker.toml"
    path.write_text("[limits]\nmax_connections = 'many'\n")
    for command in ("config", "serve"):
        result = polybroker(command, "-c", str(path))
        assert result.returncode == 2
        assert result.stdout == ""
        assert result.stderr == (
            f"polybroker: error: {path}: [limits] max_connections: expected an integer, got 'many'\n"
        )


def test_a_bad_environment_variable_is_one_line_and_exit_code_2() -> None:
    result = polybroker("serve", POLYBROKER_LISTENERS_MQTT="nowhere")
    assert result.returncode == 2
    assert result.stderr.startswith("polybroker: error: environment variable POLYBROKER_LISTENERS_MQTT: ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_a_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    result = polybroker("serve", "-c", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert re.fullmatch(r"polybroker: error: .*nope\.toml: cannot read the file: .*\n", result.stderr)


def test_hash_password_from_the_argument_and_from_stdin() -> None:
    result = polybroker("hash-password", "s3cret")
    assert result.returncode == 0, result.stderr
    assert verify_password("s3cret", result.stdout.strip())
    result = polybroker("hash-password", stdin=" with spaces \n")
    assert result.returncode == 0, result.stderr
    assert verify_password(" with spaces ", result.stdout.strip())


def test_hash_password_refuses_an_empty_password() -> None:
    result = polybroker("hash-password", stdin="\n")
    assert result.returncode == 2
    assert result.stderr == "polybroker: error: the password is empty\n"


def test_version_and_usage_errors() -> None:
    result = polybroker("--version")
    assert result.returncode == 0
    assert re.fullmatch(r"polybroker \d+\.\d+\.\d+\S*\n", result.stdout)
    result = polybroker("serve", "--log-level", "loud")
    assert result.returncode == 2 and "invalid choice" in result.stderr
    result = polybroker()
    assert result.returncode == 2 and "usage: polybroker" in result.stderr


def only_mqtt_on(address: str, data_dir: Path) -> dict[str, str]:
    off = {f"POLYBROKER_LISTENERS_{name}": "off" for name in ("AMQP", "STOMP", "WS")}
    return {**off, "POLYBROKER_LISTENERS_MQTT": address, "POLYBROKER_DATA_DIR": str(data_dir)}


def test_serve_with_the_port_in_use_is_one_line_and_exit_code_1(tmp_path: Path) -> None:
    """End to end with the real composition root (broker.server)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = polybroker("serve", **only_mqtt_on(f"127.0.0.1:{port}", tmp_path))
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("polybroker: error: ") and str(port) in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_serve_with_an_unusable_data_dir_is_one_line_and_exit_code_1(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    result = polybroker("serve", **only_mqtt_on("127.0.0.1:0", tmp_path / "file" / "data"))
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("polybroker: error: ") and "file" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


# --- In-process, with stand-ins for the lazily imported modules ----------------------------------


@pytest.fixture
def no_polybroker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("POLYBROKER_"):
            monkeypatch.delenv(name)


class StartupError(Exception):
    """Stands in for broker.server.StartupError."""


def server_module(serve: Callable[[Config], int]) -> types.ModuleType:
    """A stand-in for broker.server with its two public names."""
    module = types.ModuleType("broker.server")
    module.serve = serve  # type: ignore[attr-defined]
    module.StartupError = StartupError  # type: ignore[attr-defined]
    return module


@pytest.fixture
def fake_server(monkeypatch: pytest.MonkeyPatch, no_polybroker_env: None) -> Iterator[list[Config]]:
    served: list[Config] = []

    def serve(config: Config) -> int:
        served.append(config)
        return 7

    monkeypatch.setitem(sys.modules, "broker.server", server_module(serve))
    levels: list[str] = []
    monkeypatch.setattr(broker.cli, "configure_logging", levels.append)
    yield served
    assert len(levels) == len(served)
    assert all(level == config.server.log_level for level, config in zip(levels, served, strict=True))


def test_serve_hands_the_configuration_to_the_server(fake_server: list[Config]) -> None:
    assert main(["serve"]) == 7
    assert fake_server == [Config()]


def test_serve_options_override_the_configuration(fake_server: list[Config], tmp_path: Path) -> None:
    argv = ["serve", "--data-dir", str(tmp_path), "--log-level", "debug", "--ha-role", "standby"]
    argv += ["--ha-peer", "10.0.0.1:7000", "--ha-listen", "0.0.0.0:7001", "--ha-lock", "/shared"]
    assert main(argv) == 7
    (config,) = fake_server
    assert config.store.data_dir == str(tmp_path) and config.server.log_level == "debug"
    assert (config.ha.role, config.ha.peer, config.ha.listen, config.ha.lock) == (
        "standby",
        "10.0.0.1:7000",
        "0.0.0.0:7001",
        "/shared",
    )


def test_serve_data_dir_from_the_environment(
    fake_server: list[Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POLYBROKER_DATA_DIR", "/from-env")
    assert main(["serve"]) == 7
    assert main(["serve", "--data-dir", "/from-cli"]) == 7
    assert [config.store.data_dir for config in fake_server] == ["/from-env", "/from-cli"]


def test_serve_bad_ha_peer_is_a_config_error(
    fake_server: list[Config], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--ha-peer", "nowhere"]) == 2
    assert capsys.readouterr().err.startswith("polybroker: error: command line: [ha] peer: ")
    assert fake_server == []


@pytest.mark.parametrize(
    "failure",
    [
        OSError(98, "error while attempting to bind on address ('0.0.0.0', 1883): address already in use"),
        StartupError("cannot use data directory /root/data: Permission denied"),
    ],
)
def test_a_start_up_failure_is_one_line_and_exit_code_1(
    failure: Exception,
    monkeypatch: pytest.MonkeyPatch,
    no_polybroker_env: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def serve(config: Config) -> int:
        raise failure

    monkeypatch.setitem(sys.modules, "broker.server", server_module(serve))
    monkeypatch.setattr(broker.cli, "configure_logging", lambda level: None)
    assert main(["serve"]) == 1
    assert capsys.readouterr().err == f"polybroker: error: {failure}\n"


def test_ha_status_without_the_cluster_module(
    monkeypatch: pytest.MonkeyPatch, no_polybroker_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "cluster.status", None)  # makes the import fail
    assert main(["ha", "status"]) == 1
    assert capsys.readouterr().out == "HA is not configured on this node\n"


def test_ha_status_delegates_to_the_cluster_module(
    monkeypatch: pytest.MonkeyPatch, no_polybroker_env: None
) -> None:
    seen: list[Config] = []
    module = types.ModuleType("cluster.status")

    def status_main(config: Config) -> int:
        seen.append(config)
        return 0

    module.main = status_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cluster.status", module)
    assert main(["ha", "status", "--data-dir", "/node-a"]) == 0
    assert [config.store.data_dir for config in seen] == ["/node-a"]


def test_config_without_print_only_checks(
    no_polybroker_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config"]) == 0
    assert capsys.readouterr().out == "defaults and environment: configuration OK\n"


# --- Logging -------------------------------------------------------------------------------------


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_log_records_are_one_line_time_level_logger_message(restore_root_logger: None) -> None:
    stream = io.StringIO()
    configure_logging("info", stream)
    logger = logging.getLogger("broker.test")
    logger.debug("hidden")
    logger.info("listening on %s", "0.0.0.0:1883")
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("two\nlines")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    time_pattern = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    assert re.fullmatch(rf"{time_pattern} INFO broker\.test listening on 0\.0\.0\.0:1883", lines[0])
    assert re.fullmatch(
        rf"{time_pattern} ERROR broker\.test two\\nlines\\nTraceback .*ValueError: boom", lines[1]
    )


def test_log_level_debug_shows_debug(restore_root_logger: None) -> None:
    stream = io.StringIO()
    configure_logging("debug", stream)
    logging.getLogger("broker.test").debug("shown")
    assert stream.getvalue().endswith(" DEBUG broker.test shown\n")
