"""Fixtures for end-to-end tests: a real broker process on free ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.broker_process import BrokerProcess


@pytest.fixture(scope="module")
def broker_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """One broker shared by the tests of a module (tests use distinct names)."""
    proc = BrokerProcess(tmp_path_factory.mktemp("broker") / "data").start()
    yield proc
    proc.kill()


@pytest.fixture
def make_broker_proc(tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    """A factory of fresh brokers for tests that restart or kill them."""
    started: list[BrokerProcess] = []

    def make(**kwargs: object) -> BrokerProcess:
        proc = BrokerProcess(tmp_path / f"data{len(started)}", **kwargs)  # type: ignore[arg-type]
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.kill()
