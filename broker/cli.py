"""The `polybroker` command line (also `python -m broker`): serve, config, hash-password, ha status.

Parses arguments, loads the configuration (broker.config), sets up logging (one line per record,
"time level logger message", on stderr) and hands over to the composition root
(`broker.server.serve(config) -> int`, which may raise `broker.server.StartupError` or OSError) or
to `cluster.status.main(config) -> int`, both imported lazily so that `config` and `hash-password`
work without them. Start-up failures are one line "polybroker: error: ..." with no traceback:
exit 2 for configuration (and usage) errors, 1 for runtime errors (port in use, unusable data
directory).

Must not import at module level: asyncio, protocols, storage, cluster, broker.server.
"""

from __future__ import annotations

import argparse
import getpass
import importlib
import importlib.metadata
import logging
import os
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from broker.auth import hash_password
from broker.config import ConfigError, load_config

PROG = "polybroker"
EXIT_RUNTIME_ERROR = 1
EXIT_CONFIG_ERROR = 2
EXIT_INTERRUPTED = 130

log = logging.getLogger("broker.cli")


class LogFormatter(logging.Formatter):
    """ "2024-05-01T12:00:00.123Z INFO broker.server message", exactly one line per record.

    Container log collectors treat each line as a record, so newlines inside a message or a
    traceback are written as the two characters "\\n" instead of breaking the record apart.
    """

    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self.converter = time.gmtime  # UTC: nodes in different zones log comparable times

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", "\\n")


def configure_logging(level: str, stream: TextIO | None = None) -> None:
    """Send every logger's records at `level` ("debug".."critical") or above to `stream` (stderr)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(LogFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def _version() -> str:
    try:
        return importlib.metadata.version("polybroker")
    except importlib.metadata.PackageNotFoundError:
        # Running from a source checkout that was never installed: read the version it declares.
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            return str(tomllib.loads(pyproject.read_text("utf-8"))["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def _error(message: str) -> None:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)


def _cmd_serve(args: argparse.Namespace) -> int:
    overrides: dict[str, dict[str, Any]] = {}
    if args.data_dir is not None:
        overrides["store"] = {"data_dir": args.data_dir}
    if args.log_level is not None:
        overrides["server"] = {"log_level": args.log_level}
    ha = {
        key: value
        for key, value in (
            ("role", args.ha_role),
            ("peer", args.ha_peer),
            ("listen", args.ha_listen),
            ("lock", args.ha_lock),
        )
        if value is not None
    }
    if ha:
        overrides["ha"] = ha
    config = load_config(args.config, overrides=overrides)
    configure_logging(config.server.log_level)
    from broker import server  # lazily: the composition root pulls in asyncio and protocols

    try:
        exit_code: int = server.serve(config)
    except server.StartupError as exc:  # the composition root's own one-line start-up failures
        _error(str(exc))
        return EXIT_RUNTIME_ERROR
    return exit_code


def _cmd_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.print:
        sys.stdout.write(config.to_toml())
    else:
        print(f"{config.source or 'defaults and environment'}: configuration OK")
    return 0


def _cmd_hash_password(args: argparse.Namespace) -> int:
    password: str | None = args.password
    if password is None:
        if sys.stdin.isatty():
            password = getpass.getpass("Password: ")
            if getpass.getpass("Again: ") != password:
                _error("the passwords differ")
                return EXIT_CONFIG_ERROR
        else:
            # One line from a pipe (`echo secret | polybroker hash-password`); only the line end
            # is stripped, spaces are part of the password.
            password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        _error("the password is empty")
        return EXIT_CONFIG_ERROR
    print(hash_password(password))
    return 0


def _cmd_ha_status(args: argparse.Namespace) -> int:
    overrides = {"store": {"data_dir": args.data_dir}} if args.data_dir is not None else None
    config = load_config(args.config, overrides=overrides)
    try:
        # Lazily: the cluster package is optional for this command.
        status = importlib.import_module("cluster.status")
    except ModuleNotFoundError as exc:
        if exc.name not in ("cluster", "cluster.status"):
            raise
        print("HA is not configured on this node")
        return EXIT_RUNTIME_ERROR
    result: int = status.main(config)
    return result


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        default=os.environ.get("POLYBROKER_CONFIG") or None,
        help="the TOML configuration file (default: $POLYBROKER_CONFIG, else built-in defaults)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A message broker for MQTT, AMQP 0-9-1 and STOMP. Every config key can also be "
        "set as POLYBROKER_<SECTION>_<KEY> in the environment.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the broker")
    _add_config_option(serve)
    serve.add_argument("--data-dir", metavar="DIR", help="where the store keeps its files ([store] data_dir)")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error", "critical"))
    serve.add_argument("--ha-role", choices=("active", "standby", "auto"), help="[ha] role")
    serve.add_argument("--ha-peer", metavar="HOST:PORT", help="the other node's replication address")
    serve.add_argument("--ha-listen", metavar="HOST:PORT", help="this node's replication listener")
    serve.add_argument("--ha-lock", metavar="DIR", help="shared directory for the lease lock file")
    serve.set_defaults(handler=_cmd_serve)

    config = commands.add_parser("config", help="check the configuration, or print the effective one")
    _add_config_option(config)
    config.add_argument("--print", action="store_true", help="print the effective configuration as TOML")
    config.set_defaults(handler=_cmd_config)

    hasher = commands.add_parser("hash-password", help="print a password hash for [users]")
    hasher.add_argument(
        "password", nargs="?", metavar="PASSWORD", help="(default: read from the terminal or stdin)"
    )
    hasher.set_defaults(handler=_cmd_hash_password)

    ha = commands.add_parser("ha", help="high availability")
    ha_commands = ha.add_subparsers(dest="ha_command", required=True, metavar="COMMAND")
    ha_status = ha_commands.add_parser("status", help="show this node's role and replication state")
    _add_config_option(ha_status)
    ha_status.add_argument("--data-dir", metavar="DIR", help="the node's data directory ([store] data_dir)")
    ha_status.set_defaults(handler=_cmd_ha_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.handler(args)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_CONFIG_ERROR
    except OSError as exc:
        # Port in use, unreadable data directory...: the message says it all; the traceback is
        # kept for `--log-level debug`.
        log.debug("start-up failed", exc_info=True)
        _error(str(exc))
        return EXIT_RUNTIME_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return result
