"""bench/run.py's summary, written from the committed results: each row says where it was measured."""

from __future__ import annotations

import json

from bench import run


def test_every_row_names_the_machine_and_date_of_its_numbers() -> None:
    text = run.summary()
    lines = text.splitlines()
    header = lines.index("| benchmark | baseline (same run) | fmtrain | ratio | goal | measured on |")
    rows = []
    for line in lines[header + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line)
    assert len(rows) >= 10
    machines = {json.loads(p.read_text())["machine"]["cpu"] for p in run.RESULTS.glob("*.json")}
    footer = next(line for line in lines if line.startswith("Machines: "))
    for row in rows:
        cells = [c.strip() for c in row[1:-1].split("|")]
        assert len(cells) == 6, row
        cpu, date = cells[-1].rsplit(", ", 1)
        assert cpu in machines and cpu in footer, row
        assert len(date) == 10 and date[4] == date[7] == "-", row


def test_each_machine_kinds_mfu_result_has_its_own_rows() -> None:
    """``mfu.json`` and ``mfu@<tag>.json`` (BENCH_TAG): both kinds' rows, each with its own numbers."""
    text = run.summary().splitlines()
    results = [json.loads(p.read_text()) for p in sorted(run.RESULTS.glob("mfu*.json"))]
    assert [p.stem for p in sorted(run.RESULTS.glob("mfu*.json"))] == run.tagged("mfu")
    for mfu in results:
        where = f"| {mfu['machine']['cpu']}, {mfu['date'].split()[0]} |"
        for name, row in mfu["models"].items():
            matching = [line for line in text if line.startswith(f"| MFU, {name} |") and line.endswith(where)]
            assert len(matching) == 1 and f"| {row['mfu']:.1%} |" in matching[0], (name, where)
