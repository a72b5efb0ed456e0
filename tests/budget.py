"""The suite's time budget: every test that takes more than a minute is listed here, with why it needs the time.

    make test                      # fails, naming the test and this file, when an unlisted test takes > 60 s

A test's time is its setup, call and teardown together (a module-scoped fixture's setup counts in the first
test that uses it), as the pytest-xdist worker that ran it measured it. The list is what a reviewer reads to
see where CI's minutes go; a new entry needs a reason a reviewer would accept, and a cheaper test is the
better answer. Machines differ about 4x in speed, so a test is listed once it takes over a minute on the
slowest machine CI draws: about 25 s on the AMD EPYC of ``make test-times``'s table in the README.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

LIMIT_S = float(os.environ.get("FMTRAIN_TEST_LIMIT_S", "60"))

# test id (a parametrized test's id without its parameters covers every case) -> why it needs the time
SLOW_TESTS: dict[str, str] = {}


def listed(nodeid: str, table: dict[str, str]) -> bool:
    """Whether ``nodeid`` (or the test it is a case of) has an entry in ``table``."""
    return nodeid in table or nodeid.split("[")[0] in table


def over_budget(seconds: dict[str, float], table: dict[str, str], limit_s: float) -> list[str]:
    """The tests of ``seconds`` (test id -> its time) over ``limit_s`` without an entry in ``table``, slowest first."""
    slow = [nodeid for nodeid, took in seconds.items() if took > limit_s and not listed(nodeid, table)]
    return sorted(slow, key=lambda nodeid: -seconds[nodeid])


class Budget:
    """Adds up each test's phases as their reports arrive (from every worker), and fails the run at its end
    when a test over the limit is not in the table."""

    def __init__(self, table: dict[str, str], limit_s: float) -> None:
        self.table, self.limit_s = table, limit_s
        self.seconds: dict[str, float] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + report.duration

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        self.unlisted = over_budget(self.seconds, self.table, self.limit_s)
        if self.unlisted and exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        unlisted = getattr(self, "unlisted", [])
        if unlisted:
            terminalreporter.section("tests over the time budget", red=True)
            for nodeid in unlisted:
                terminalreporter.write_line(
                    f"{nodeid} took {self.seconds[nodeid]:.0f} s, over {self.limit_s:.0f} s, and is not in SLOW_TESTS "
                    "(tests/budget.py): make it cheaper, or list it there with why it needs the time",
                    red=True,
                )
