"""The suite's own checks, run in-process on a suite of their own: the time budget (tests/budget.py) fails a
run whose test over the limit is not listed, and names the test and the rule."""

from __future__ import annotations

import os
from pathlib import Path

import budget
import pytest


def run(tmp_path: Path, capsys: pytest.CaptureFixture[str], table: dict[str, str]) -> tuple[int, str]:
    """A suite of one test that takes 0.3 s and one that takes none, under a 0.2 s limit with ``table``."""
    os.environ.pop("PYTEST_ADDOPTS", None)  # this process's own options (a JUnit report) are not the inner suite's
    (tmp_path / "test_sleepy.py").write_text(
        "import time\n\ndef test_slow():\n    time.sleep(0.3)\n\ndef test_quick():\n    pass\n"
    )
    args = [str(tmp_path), "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "--rootdir", str(tmp_path)]
    args += ["--import-mode=importlib"]  # each call its own test_sleepy module
    code = pytest.main(args, plugins=[budget.Budget(table, limit_s=0.2)])
    return int(code), capsys.readouterr().out


def test_an_unlisted_test_over_the_limit_fails_the_run_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(tmp_path, capsys, {})
    assert code == pytest.ExitCode.TESTS_FAILED, out
    assert "2 passed" in out  # the tests themselves passed: the budget failed the run
    assert "test_sleepy.py::test_slow took 0 s, over this machine's limit of 0 s, and is not in SLOW_TESTS" in out, out
    assert "test_quick took" not in out


@pytest.mark.parametrize("entry", ["test_sleepy.py::test_slow", "test_sleepy.py"])
def test_a_listed_test_or_file_passes(entry: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(tmp_path, capsys, {entry: "sleeps on purpose"})
    assert code == pytest.ExitCode.OK, out
    assert "time budget: 1 test(s) over this machine's 0 s, each listed" in out


def test_cases_of_a_listed_test_are_listed_and_the_slowest_unlisted_come_first() -> None:
    table = {"tests/test_a.py::test_x": "why"}
    seconds = {"tests/test_a.py::test_x[1-2]": 90.0, "tests/test_b.py::test_y": 70.0, "tests/test_b.py::test_z": 80.0}
    seconds["tests/test_b.py::test_quick"] = 10.0
    assert budget.over_budget(seconds, table, 60) == ["tests/test_b.py::test_z", "tests/test_b.py::test_y"]
