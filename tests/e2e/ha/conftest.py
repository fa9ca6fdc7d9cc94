"""Fixtures of the failover tests: the two-zone network (both modes), HA pairs, and the measurements.

`network` runs each test twice: in network namespaces joined by veth pairs ("netns") and on the
loopback addresses 127.0.0.2/127.0.0.3 ("loopback"). Where namespaces cannot be built (not root, no
iproute2, no CAP_SYS_ADMIN) the netns variant is skipped with the reason, unless
POLYBROKER_HA_REQUIRE_NETNS=1 makes that a failure (for CI machines that must exercise both).

Every test's measurements (`ha_report.record(...)`) are printed in the terminal summary, and
written as JSON to $POLYBROKER_HA_REPORT when it is set. Broker logs of a failed test are printed in
its teardown section.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.ha.azs import AzNetwork, HaPair, NetworkMode, make_network, netns_unavailable_reason

_NETNS_REASON = pytest.StashKey[str | None]()
_REPORT = pytest.StashKey[list[dict[str, Any]]]()
_FAILED = pytest.StashKey[bool]()


class HaReport:
    """Collects one test's measurements for the session summary."""

    def __init__(self, rows: list[dict[str, Any]], test: str) -> None:
        self._rows = rows
        self._test = test

    def record(self, **values: Any) -> None:
        self._rows.append({"test": self._test, **values})


@pytest.fixture
def ha_report(request: pytest.FixtureRequest) -> HaReport:
    rows = request.config.stash.setdefault(_REPORT, [])
    return HaReport(rows, request.node.nodeid.split("::")[-1])


@pytest.fixture(params=[NetworkMode.NETNS, NetworkMode.LOOPBACK], ids=lambda mode: mode.value)
def network(request: pytest.FixtureRequest) -> Iterator[AzNetwork]:
    mode: NetworkMode = request.param
    if mode is NetworkMode.NETNS:
        stash = request.config.stash
        if _NETNS_REASON not in stash:
            stash[_NETNS_REASON] = netns_unavailable_reason()
        reason = stash[_NETNS_REASON]
        if reason is not None:
            message = f"network namespaces unavailable ({reason}); the loopback variant covers the scenario"
            if os.environ.get("POLYBROKER_HA_REQUIRE_NETNS") == "1":
                pytest.fail(message)
            pytest.skip(message)
    net = make_network(mode)
    try:
        yield net
    finally:
        net.close()


@pytest.fixture
def make_pair(
    network: AzNetwork, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., HaPair]]:
    """Start HA pairs in `network` (az-a active, az-b in sync); they are killed after the test."""
    pairs: list[HaPair] = []

    def make(**kwargs: Any) -> HaPair:
        pair = HaPair(network, tmp_path / f"pair{len(pairs)}", **kwargs)
        pairs.append(pair)
        return pair.start()

    try:
        yield make
    finally:
        for pair in pairs:
            pair.close()
        if request.node.stash.get(_FAILED, False):
            for pair in pairs:
                print(f"network: {network.describe()}")
                print(pair.logs())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call" and report.failed:
        item.stash[_FAILED] = True
    return report


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    rows = config.stash.get(_REPORT, [])
    if not rows:
        return
    terminalreporter.section("HA failover measurements")
    for row in rows:
        terminalreporter.write_line(json.dumps(row, sort_keys=False))
    path = os.environ.get("POLYBROKER_HA_REPORT")
    if path:
        Path(path).write_text(json.dumps(rows, indent=1) + "\n")
