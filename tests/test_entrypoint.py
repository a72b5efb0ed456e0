"""A launcher runs any entry point, not only fmtrain's training run: a user's program (a module with
``main(argv)``) gets the same processes, environment, logs and job record."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from launch.compose import compose
from launch.local import LocalLauncher
from launch.spec import Entrypoint, JobRecord, RunSpec

TESTS = Path(__file__).resolve().parent


def launch_program(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[JobRecord, Path]:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "out"
    out.mkdir()
    cfg = compose(["launcher.nproc=2", f"run_dir={tmp_path / 'run'}"])
    spec = RunSpec(cfg, tmp_path / "run", argv=["test"], entrypoint=Entrypoint("entry_program", (str(out), *args)))
    spec.write()
    handle = LocalLauncher().launch(spec)
    return JobRecord.read(handle.run_dir), out


def test_a_users_program_runs_on_every_rank_of_the_local_launcher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record, out = launch_program(tmp_path, monkeypatch)
    assert (record.state, record.exit_code, record.world_size) == ("completed", 0, 2), record
    seen = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert seen == [{"rank": r, "world": 2, "sum": 3.0, "local_rank": r} for r in range(2)]


def test_a_users_program_that_fails_on_one_rank_fails_the_job_with_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record, _ = launch_program(tmp_path, monkeypatch, "fail-on-rank", "1")
    assert (record.state, record.exit_code) == ("failed", 1), record
    assert record.message.startswith("rank 1 failed") and "the user's program failed on rank 1" in record.message, record.message


def test_an_entry_point_called_in_process_raises_on_a_nonzero_return(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = tmp_path / "returns_three.py"
    module.write_text("def main(argv):\n    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError, match=r"python -m returns_three a b ended with exit code 3"):
        Entrypoint("returns_three", ("a", "b")).call()
    assert Entrypoint.training(Path("r/config.yaml")).process_args() == ["-u", "-m", "fmtrain.worker", "r/config.yaml"]
    assert Entrypoint("pkg.job", ("x",)).process_args() == ["-u", "-m", "fmtrain.worker", "-m", "pkg.job", "x"]


# (rank: (exit code, seconds after the first error file that its own is written; None: no file)) -> the report's first line
FAILURES = [
    ({0: (1, 0.5), 1: (1, 0.0)}, "rank 1 failed (exit code 1, pid 101):"),
    # rank 1 raised; rank 0 saw its peer go and exited first, so the agent stopped rank 1 as it exited
    ({0: (1, 0.5), 1: (-15, 0.0)}, "rank 1 failed (raised, then stopped by SIGTERM as the job ended, pid 101):"),
    ({0: (-9, None), 1: (-15, None)}, "rank 0 failed (exit code -9, pid 100):"),  # killed, no error file: the lower rank
]


@pytest.mark.parametrize(("ranks", "first_line"), FAILURES)
def test_a_failed_jobs_report_names_the_rank_that_failed_first_and_how(ranks: dict, first_line: str, tmp_path: Path) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from launch.local import failure_report

    failures = {}
    for rank, (exit_code, written_after) in ranks.items():
        error_file = tmp_path / f"rank{rank}.error.json"
        if written_after is not None:
            trace = {"py_callstack": f"Traceback: rank {rank}", "timestamp": "0"}
            message = {"message": f"RuntimeError: on rank {rank}", "extraInfo": trace}
            error_file.write_text(json.dumps({"message": message}))
            os.utime(error_file, ns=(0, 10**18 + int(written_after * 1e9)))
        failures[rank] = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=exit_code, error_file=str(error_file))
    report = failure_report(ChildFailedError("fmtrain.worker", failures))
    assert report.splitlines()[0] == first_line, report
    rank = int(first_line.split()[1])
    detail = f"Traceback: rank {rank}" if ranks[rank][1] is not None else "Signal 9 (SIGKILL) received by PID 100"
    assert report.splitlines()[1:] == [detail], report


def test_a_forked_ranks_error_file_names_it_where_torch_reported_its_peer(tmp_path: Path) -> None:
    """launcher.start=fork: torch's agent reports one ended process, here rank 0, which only saw rank 1 go;
    rank 1's error file, older and carrying its pid, names it (fmtrain.worker.forked writes the pid)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from launch.local import failure_report

    for rank, pid, written in ((0, None, 2), (1, "4242", 1)):
        trace = {"py_callstack": f"Traceback: rank {rank}", "timestamp": "0", **({"pid": pid} if pid else {})}
        error_file = tmp_path / f"rank{rank}.error.json"
        error_file.write_text(json.dumps({"message": {"message": f"RuntimeError: on rank {rank}", "extraInfo": trace}}))
        os.utime(error_file, ns=(0, 10**18 + written * 10**9))
    reported = {0: ProcessFailure(local_rank=0, pid=100, exitcode=1, error_file=str(tmp_path / "rank0.error.json"))}
    report = failure_report(ChildFailedError("fmtrain.worker", reported), tmp_path)
    assert report.splitlines() == ["rank 1 failed (exit code 1, pid 4242):", "Traceback: rank 1"], report
    assert failure_report(ChildFailedError("fmtrain.worker", reported)).startswith("rank 0 failed (exit code 1, pid 100)")
