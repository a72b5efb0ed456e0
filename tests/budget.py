"""The suite's time budget: every test that takes more than a minute is listed here, with why it needs the time.

    make test            # fails, naming the test and this file, when an unlisted test takes more than its limit

A test's time is its setup, call and teardown together (a module-scoped fixture's setup counts in the first
test that uses it), as the pytest-xdist worker that ran it measured it. The list is what a reviewer reads to
see where CI's minutes go; a new entry needs a reason a reviewer would accept, and a cheaper test is the
better answer. An entry names a test (a parametrized test's name covers its cases) or a whole file.

The limit is 60 s on the machine the list was measured on, an AMD EPYC with 2 cores (the README's table),
and on any machine at least as fast; CI draws machines up to ~3x slower, where every test takes longer
alike, so there the limit grows by how much slower this machine starts ``python -c "import torch"``, the
suite's commonest cost (the best of two tries at the start of the run; ``FMTRAIN_TEST_LIMIT_S`` sets it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import pytest

LIMIT_S = 60.0
REFERENCE_IMPORT_S = 1.5  # python -c "import torch" on the machine the list was measured on

# test id, or a whole file -> why it needs the time
SLOW_TESTS: dict[str, str] = {
    "tests/test_slurm.py": "jobs on a real Slurm cluster: submission, scheduling, requeues; one waits out a real 1-minute "
    "time limit and its requeue (the only test that waits on one)",
    "tests/test_tune_slurm.py": "a Ray Tune sweep whose trials are Slurm jobs, on a cluster of its own in a network namespace",
    "tests/test_ray.py": "Ray clusters and Ray Train: each fit starts ~7 helper processes and its workers (~30 s on 2 cores)",
    "tests/test_tune.py": "Ray Tune sweeps of real runs, each trial a run; a driver killed and resumed",
    "tests/test_train.py::test_default_run_learns_and_fills_its_run_directory": "the README's main job at its real size "
    "(120 steps of the default model, about a minute alone), tested once",
    "tests/test_train.py::test_sigterm_saves_and_the_same_command_resumes_exactly": "makes test_train's 2-rank reference "
    "run (its fixture), then a run stopped between checkpoints and resumed",
    "tests/test_model_seam.py::test_a_registered_model_trains_under_ddp_and_fsdp_like_one_process": "its fixture trains "
    "the test's own GPT-2 for 40 steps on 1 process, 2 ddp ranks and 2 fsdp ranks (fp32 drift needs the 40 steps)",
    "tests/test_export.py::test_an_fsdp_checkpoint_exports_to_a_plain_model_with_equal_logits": "a 2-rank fsdp run, then "
    "exports in both formats, each loaded back by transformers or fmtrain and compared on logits",
    "tests/test_strategies.py::test_compiled_blocks_train_like_eager": "inductor compiles each block with g++ "
    "(a CI run's cache starts cold: ~30 s)",
    "tests/test_custom_model.py::test_the_example_trains_under_ddp_fsdp_and_tp_alike_and_resumes_exactly": "six runs of "
    "the example model: one process, ddp, fsdp killed and resumed, tp, then its export",
    "tests/test_faults.py::test_of_two_runs_started_at_once_into_one_run_directory_one_runs_and_the_other_is_refused": "20 "
    "races of two commands into one run directory (issue 30 asks for 20), each won by a 3-step run: ~40 CPU-s",
}


def listed(nodeid: str, table: dict[str, str]) -> bool:
    """Whether ``nodeid`` (or the test it is a case of, or its file) has an entry in ``table``."""
    return nodeid in table or nodeid.split("[")[0] in table or nodeid.split("::")[0] in table


def over_budget(seconds: dict[str, float], table: dict[str, str], limit_s: float) -> list[str]:
    """The tests of ``seconds`` (test id -> its time) over ``limit_s`` without an entry in ``table``, slowest first."""
    slow = [nodeid for nodeid, took in seconds.items() if took > limit_s and not listed(nodeid, table)]
    return sorted(slow, key=lambda nodeid: -seconds[nodeid])


def machine_limit_s() -> float:
    """The limit on this machine: ``LIMIT_S``, grown by how much slower than the reference it imports torch."""
    if os.environ.get("FMTRAIN_TEST_LIMIT_S"):
        return float(os.environ["FMTRAIN_TEST_LIMIT_S"])

    def import_torch_s() -> float:
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        return time.monotonic() - started

    return LIMIT_S * max(1.0, min(import_torch_s() for _ in range(2)) / REFERENCE_IMPORT_S)


class Budget:
    """Adds up each test's phases as their reports arrive (from every worker), and fails the run at its end
    when a test over the limit is not in the table."""

    def __init__(self, table: dict[str, str], limit_s: float) -> None:
        self.table, self.limit_s = table, limit_s
        self.seconds: dict[str, float] = {}
        self.unlisted: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + report.duration

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        self.unlisted = over_budget(self.seconds, self.table, self.limit_s)
        if self.unlisted and exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        over = sum(took > self.limit_s for took in self.seconds.values())
        terminalreporter.write_line(f"time budget: {over} test(s) over this machine's {self.limit_s:.0f} s, each listed")
        if self.unlisted:
            terminalreporter.section("tests over the time budget", red=True)
            for nodeid in self.unlisted:
                terminalreporter.write_line(
                    f"{nodeid} took {self.seconds[nodeid]:.0f} s, over this machine's limit of {self.limit_s:.0f} s, "
                    "and is not in SLOW_TESTS (tests/budget.py): make it cheaper, or list it there with why it needs "
                    "the time",
                    red=True,
                )
