"""Where the suite's time goes, from the JUnit report of a run: per file, the slowest tests, and setups.

    make test-times                                   # the whole suite, then these tables (markdown)
    python tests/times.py .cache/test-times.xml       # the tables of a report already written

Each test's time is its setup, call and teardown (pytest's JUnit report); its CPU seconds, and those of the
processes it waited for, come from conftest's ``cost`` property. A setup of more than a few seconds is a
fixture being made (a cluster started, a reference run trained): the last table lists those.
"""

from __future__ import annotations

import ast
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path


def read(report: Path) -> list[dict]:
    """One record per test: id, file, seconds, CPU seconds, setup seconds, outcome."""
    tests = []
    for case in ET.parse(report).getroot().iter("testcase"):
        parts = case.get("classname", "").split(".")  # tests.test_x, or tests.test_x.TestClass
        file = "/".join(parts[: next(i for i, part in enumerate(parts) if part.startswith("test_")) + 1]) + ".py"
        properties = {p.get("name"): p.get("value") for p in case.iter("property")}
        cpu = ast.literal_eval(properties["cost"])[1] if "cost" in properties else 0.0  # conftest's (wall, CPU)
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        tests.append(
            {
                "id": f"{file}::{case.get('name')}",
                "file": file,
                "seconds": float(case.get("time", 0)),
                "cpu": float(cpu),
                "setup": float(properties.get("setup_s", 0)),
                "outcome": outcome,
            }
        )
    return tests


def tables(tests: list[dict], slowest: int = 30) -> str:
    by_file: dict[str, list[dict]] = defaultdict(list)
    for test in tests:
        by_file[test["file"]].append(test)
    total = sum(t["seconds"] for t in tests)
    lines = [f"{len(tests)} tests, {total:,.0f} s of test time ({total / 60:.1f} min summed over workers)", ""]
    lines += ["| file | tests | seconds | CPU s | share | slowest test (s) |", "|---|---:|---:|---:|---:|---|"]
    for file, group in sorted(by_file.items(), key=lambda item: -sum(t["seconds"] for t in item[1])):
        seconds = sum(t["seconds"] for t in group)
        top = max(group, key=lambda t: t["seconds"])
        lines.append(
            f"| {file} | {len(group)} | {seconds:,.0f} | {sum(t['cpu'] for t in group):,.0f} | {seconds / total:.0%} "
            f"| {top['id'].split('::', 1)[1]} ({top['seconds']:.0f}) |"
        )
    lines += ["", f"The {slowest} slowest tests:", "", "| test | seconds | CPU s | setup s |", "|---|---:|---:|---:|"]
    for test in sorted(tests, key=lambda t: -t["seconds"])[:slowest]:
        lines.append(f"| {test['id']} | {test['seconds']:.1f} | {test['cpu']:.1f} | {test['setup']:.1f} |")
    setups = sorted((t for t in tests if t["setup"] >= 3), key=lambda t: -t["setup"])
    if setups:
        lines += ["", "Setups of 3 s or more (a shared fixture made for the first test that needs it):", ""]
        lines += ["| first test | setup s |", "|---|---:|"]
        lines += [f"| {t['id']} | {t['setup']:.1f} |" for t in setups]
    failed = [t["id"] for t in tests if t["outcome"] != "passed"]
    if failed:
        lines += ["", f"not passed: {', '.join(failed)}"]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if len(sys.argv) == 2 else 2)
    print(tables(read(Path(sys.argv[1]))))
