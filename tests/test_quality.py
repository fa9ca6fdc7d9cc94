"""The codebase's own rules, checked in the normal test run: lint, types, layering.

ruff (style and bugs) over everything, mypy over the core, the store and the codecs, and the
import-linter contracts of pyproject.toml (the layering of docs/architecture.md).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing() -> None:
    result = run(tool("ruff"), "check", "broker", "protocols", "storage", "cluster", "tests", "bench")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean_on_core_store_and_codecs() -> None:
    result = run(
        sys.executable,
        "-m",
        "mypy",
        "broker",
        "storage",
        "protocols/transport",
        "protocols/mqtt/codec.py",
        "protocols/stomp/codec.py",
        "protocols/amqp091/codec.py",
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_layering_contracts_hold() -> None:
    result = run(tool("lint-imports"))
    assert result.returncode == 0, result.stdout + result.stderr
