"""Faults and findings of the bad-input round (issue 13), each with its own regression test."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FMTRAIN, SMALL, clis_at_once, env_with, fmtrain, one_line_error, pids_mentioning, read_metrics, train_losses

from fmtrain.config import ConfigError
from fmtrain.watchdog import sidecar_grace

pytestmark = pytest.mark.slow


def test_a_process_asking_for_the_world_peak_again_gets_its_first_answer(tmp_path: Path, monkeypatch) -> None:
    """trainer.compile=auto and the MFU both ask: one probe (or cache read), with no second collective."""
    import torch

    from fmtrain import metrics
    from fmtrain.distributed import DistEnv

    probes: list[torch.dtype] = []
    monkeypatch.setenv("FMTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(metrics, "measure_peak_flops", lambda dtype, device: probes.append(dtype) or 1e9 * len(probes))
    cpu = torch.device("cpu")
    assert [metrics.world_peak_flops(DistEnv(), cpu, torch.float32) for _ in range(3)] == [1e9, 1e9, 1e9]
    assert metrics.world_peak_flops(DistEnv(), cpu, torch.bfloat16) == 2e9  # another dtype: its own probe
    assert probes == [torch.float32, torch.bfloat16]
    monkeypatch.setenv("FMTRAIN_CACHE", str(tmp_path / "another"))  # another cache: asked afresh
    assert metrics.world_peak_flops(DistEnv(), cpu, torch.float32) == 3e9


def test_mfu_is_never_above_one_and_a_probe_that_proved_low_is_measured_again(cache_dir: Path, tmp_path: Path) -> None:
    # A peak set below what the CPU does (1 MFLOP/s): every step beats it.
    run = fmtrain(["train", f"run_dir={tmp_path / 'set'}", *SMALL, "trainer.max_steps=4", "trainer.peak_flops=1e6"], cache_dir)
    assert run.returncode == 0, run.stdout + run.stderr
    mfus = [r["mfu"] for r in read_metrics(tmp_path / "set") if "mfu" in r]
    assert len(mfus) == 4 and all(0 < m <= 1.0 for m in mfus) and 1.0 in mfus, mfus
    assert "above trainer.peak_flops" in run.stdout + run.stderr

    # A probed peak cached far too low (the probe ran on a busy CPU): capped, then forgotten.
    # A cache of this test's own: another test worker's run must not read, or forget, the planted peaks.
    own_cache = tmp_path / "cache"
    probed = [*SMALL, "trainer.max_steps=4", "trainer.peak_flops=null"]
    peaks = own_cache / "peak_flops.json"
    for attempt in range(3):  # a probe that a step then beats (a busy CPU) is forgotten as designed: probe again
        first = fmtrain(["train", f"run_dir={tmp_path / f'probe{attempt}'}", *probed], own_cache)
        assert first.returncode == 0, first.stdout + first.stderr
        probed_peaks = json.loads(peaks.read_text())
        if probed_peaks:
            break
    assert len(probed_peaks) == 1, probed_peaks
    peaks.write_text(json.dumps({**dict.fromkeys(probed_peaks, 1.0), "another machine|threads=8": 1.0}))
    low = fmtrain(["train", f"run_dir={tmp_path / 'low'}", *probed], own_cache)
    assert low.returncode == 0, low.stdout + low.stderr
    mfus = [r["mfu"] for r in read_metrics(tmp_path / "low") if "mfu" in r]
    assert all(0 < m <= 1.0 for m in mfus), mfus
    left = json.loads(peaks.read_text())
    assert left == {"another machine|threads=8": 1.0}, left  # this machine's entry: to be measured again


CKPT = [*SMALL, "trainer.eval_interval=5", "checkpoint.interval=5", "checkpoint.keep_last=5"]


def test_a_garbage_best_json_is_warned_about_and_written_anew(cache_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert fmtrain(["train", f"run_dir={run_dir}", *CKPT, "trainer.max_steps=5"], cache_dir).returncode == 0
    (run_dir / "checkpoints" / "best.json").write_text("{not json")
    again = fmtrain(["train", f"run_dir={run_dir}", *CKPT, "trainer.max_steps=10"], cache_dir)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "best.json: unreadable" in again.stdout + again.stderr
    assert json.loads((run_dir / "checkpoints" / "best.json").read_text())["name"].startswith("step_")


def test_checkpoints_that_are_all_invalid_are_refused_not_overwritten(cache_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert fmtrain(["train", f"run_dir={run_dir}", *CKPT, "trainer.max_steps=10"], cache_dir).returncode == 0
    for shard in (run_dir / "checkpoints").glob("step_*/model_optim/*.distcp"):
        shard.write_bytes(shard.read_bytes()[:-7] + b"garbage")
    line = one_line_error(fmtrain(["train", f"run_dir={run_dir}", *CKPT, "trainer.max_steps=20"], cache_dir))
    assert "trainer.resume='auto' is invalid: every checkpoint of this run is invalid" in line, line
    assert "step_000010" in line and "sha256" in line and "trainer.resume=never" in line, line
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_000005", "step_000010"]

    # Named explicitly, a corrupt checkpoint is refused before launch too.
    corrupt = run_dir / "checkpoints" / "step_000005"
    line = one_line_error(fmtrain(["train", f"run_dir={tmp_path / 'other'}", *CKPT, f"trainer.resume={corrupt}"], cache_dir))
    assert line.startswith(f"fmtrain: error: trainer.resume='{corrupt}' is invalid: ") and "sha256" in line, line
    assert not (tmp_path / "other").exists()


def test_a_second_job_for_a_run_directory_in_use_is_refused(cache_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["train", f"run_dir={run_dir}", *CKPT, "trainer.max_steps=100000"]
    first = subprocess.Popen([FMTRAIN, *args], env=env_with(cache_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").is_file():
            assert time.monotonic() < deadline and first.poll() is None, "the first run did not start"
            time.sleep(0.2)
        line = one_line_error(fmtrain(args, cache_dir))
        assert f"run_dir='{run_dir}' is invalid: job fmtrain-" in line and "(local) is still running in it" in line, line
        assert json.loads((run_dir / "job.json").read_text())["pid"] == first.pid  # the record is the first run's still
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert json.loads((run_dir / "job.json").read_text())["state"] == "stopped"


def test_of_two_runs_started_at_once_into_one_run_directory_one_runs_and_the_other_is_refused(
    cache_dir: Path, tmp_path: Path
) -> None:
    """Issue 30 #2: both were admitted (the check and the claim were two steps), then wrote the same
    checkpoints and steps. Twenty races, each of two commands started within a millisecond."""
    args = [*SMALL, "trainer.max_steps=3", "trainer.eval_interval=3", "checkpoint.interval=3"]
    alone = fmtrain(["train", f"run_dir={tmp_path / 'alone'}", *args], cache_dir)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    for race in range(20):
        run_dir = tmp_path / f"race{race}" / "run"  # its parent new too: made and claimed in one step
        results = clis_at_once([["train", f"run_dir={run_dir}", *args]] * 2, env_with(cache_dir))
        assert sorted(result.returncode for result in results) == [0, 2], [r.stdout + r.stderr for r in results]
        line = one_line_error(next(result for result in results if result.returncode == 2))
        assert f"run_dir='{run_dir}' is invalid: " in line and " in it; wait for it" in line, line
        steps = [record["step"] for record in read_metrics(run_dir) if "loss" in record]
        assert steps == [1, 2, 3], f"race {race}: {steps}"
        assert train_losses(run_dir) == train_losses(tmp_path / "alone")


def test_a_read_only_run_directory_is_refused_before_training(cache_dir: Path, tmpfs) -> None:
    run_dir = tmpfs.mount(64) / "run"
    assert fmtrain(["train", f"run_dir={run_dir}", *CKPT, "trainer.max_steps=10"], cache_dir).returncode == 0
    tmpfs.remount("ro")  # a read-only mount: chmod would not stop root
    line = one_line_error(fmtrain(["train", f"run_dir={run_dir}", *CKPT, "trainer.max_steps=20"], cache_dir))
    assert f"run_dir='{run_dir}' is invalid: cannot write in {run_dir}: Read-only file system" in line, line
    assert (run_dir / "checkpoints" / "step_000010" / "manifest.json").is_file()
    assert json.loads((run_dir / "job.json").read_text())["state"] == "completed"  # what ran last, still true
    deeper = run_dir / "new" / "run"  # a run directory under folders still to be made there
    line = one_line_error(fmtrain(["train", f"run_dir={deeper}", *CKPT, "trainer.max_steps=20"], cache_dir))
    assert f"run_dir='{deeper}' is invalid: cannot make it: Read-only file system" in line, line

    # The library call refuses it too, on the rank, before anything is written.
    from fmtrain import run
    from fmtrain.config import load

    cfg = load(run_dir / "config.yaml")
    with pytest.raises(ConfigError, match=r"^run_dir=.* is invalid: cannot write in .*: Read-only file system$"):
        run(cfg)


def test_a_full_disk_during_a_checkpoint_is_named_cleaned_up_and_resumable(cache_dir: Path, tmpfs) -> None:
    # The tiny model's checkpoint is ~40 MB: the first fits in 64 MB, the second does not.
    run_dir = tmpfs.mount(64) / "run"
    args = ["train", f"run_dir={run_dir}", "data.seq_len=64", "data.max_bytes=3000000", "trainer.global_batch_size=4"]
    args += ["trainer.eval_batches=1", "trainer.plot=false", "trainer.eval_interval=3", "checkpoint.interval=3"]
    full = fmtrain([*args, "trainer.max_steps=6"], cache_dir)
    assert full.returncode == 1, full.stdout + full.stderr
    record = json.loads((run_dir / "job.json").read_text())
    assert record["state"] == "failed", record
    path = re.escape(f"{run_dir}/checkpoints/step_000006")
    expected = rf"rank 0: no space left on device while writing checkpoint step 6 to {path}: "
    assert re.match(expected + r"about \d+ MB needed, \d+ MB free", record["message"]), record["message"]
    assert "Traceback" not in record["message"] and "MB free" in record["message"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith((".", "step"))) == ["step_000003"]
    status = json.loads(fmtrain(["status", str(run_dir)], cache_dir).stdout)
    assert status["state"] == "failed" and "no space left" in status["message"], status

    tmpfs.remount("size=256m")  # room again: the run resumes from its last good checkpoint
    again = fmtrain([*args, "trainer.max_steps=6"], cache_dir)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed from" in (run_dir / "logs" / "rank0.log").read_text() and "step_000003" in again.stdout + again.stderr


def test_a_hanging_rank_ends_the_job_named_with_every_stack_and_no_process_left(cache_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["train", f"run_dir={run_dir}", *CKPT, "trainer.max_steps=100", "launcher.nproc=2", "trainer.hang_timeout_s=10"]
    result = fmtrain(args, cache_dir, FMTRAIN_FAULT="1:7:hang")  # rank 1 never returns from step 7's start
    assert result.returncode == 1, result.stdout + result.stderr
    record = json.loads((run_dir / "job.json").read_text())
    # The watchdog's own record of the stall: past the timeout it was given, within a margin a loaded 2-core
    # machine holds (it looks once a second; its thread may wait seconds for a core).
    stalled = re.search(r"made no progress for (\d+) s \(trainer.hang_timeout_s=10\)", record["message"])
    assert record["state"] == "failed" and stalled and 10 <= int(stalled.group(1)) <= 10 + 30, record
    assert "did not arrive at step 7 (train): rank 1 at step 7 (start)" in record["message"], record["message"]
    stacks = {rank: (run_dir / "logs" / f"rank{rank}.stack.txt").read_text() for rank in range(2)}
    assert "in fault" in stacks[1] and "in fault" not in stacks[0], stacks  # rank 1 sleeps in the fault hook
    assert "train_step" in stacks[0], stacks[0]  # rank 0 waits in step 7's collectives
    assert pids_mentioning(run_dir) == []


def test_a_rank_that_holds_the_gil_is_stopped_by_its_sidecar_with_its_stack(cache_dir: Path, tmp_path: Path) -> None:
    # No thread of rank 0 runs again (its own watchdog neither): the sidecar process ends it.
    run_dir = tmp_path / "run"
    args = ["train", f"run_dir={run_dir}", *CKPT, "trainer.max_steps=100", "trainer.hang_timeout_s=5"]
    result = fmtrain(args, cache_dir, FMTRAIN_FAULT="0:4:gil")
    assert result.returncode == 1, result.stdout + result.stderr
    record = json.loads((run_dir / "job.json").read_text())
    assert record["state"] == "failed" and "rank 0 (pid" in record["message"], record
    # The sidecar's record: it waits the timeout and its grace (5 s + 5 polls of 1 s), within a loaded machine's margin.
    waited = re.search(r"stopped running Python for (\d+) s", record["message"])
    assert waited and 5 + sidecar_grace(1.0) <= int(waited.group(1)) <= 5 + sidecar_grace(1.0) + 30, record["message"]
    assert "killed" in record["message"], record["message"]
    stack = (run_dir / "logs" / "rank0.stack.txt").read_text()
    assert "in fullmatch" in stack and "in fault" in stack, stack  # written while the regex held the GIL
    assert pids_mentioning(run_dir) == []


def test_a_stopped_process_is_killed_by_its_sidecar_and_its_error_recorded(cache_dir: Path, tmp_path: Path) -> None:
    error_file = tmp_path / "error.json"
    script = (
        "import os, signal, sys, time\n"
        "from pathlib import Path\n"
        "from fmtrain.watchdog import Watchdog\n"
        "dog = Watchdog(Path(sys.argv[1]), 0, 1, timeout_s=1, poll_s=0.2)\n"
        "time.sleep(0.5)\n"
        "os.kill(os.getpid(), signal.SIGSTOP)\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "logs")],
        env=env_with(cache_dir, TORCHELASTIC_ERROR_FILE=str(error_file)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    message = json.loads(error_file.read_text())["message"]["message"]
    assert message.startswith("HangError: rank 0 (pid ") and "stopped running Python" in message, message
    # What the sidecar recorded: the timeout and its grace (5 s + 5 polls of 0.2 s), within a loaded machine's margin.
    waited = re.search(r"stopped running Python for (\d+) s", message)
    assert waited and 1 + sidecar_grace(0.2) <= int(waited.group(1)) <= 1 + sidecar_grace(0.2) + 30, message
    assert "fmtrain watchdog: rank 0" in child.stderr
    assert pids_mentioning(tmp_path / "logs") == []


TINY = ["data.seq_len=64", "data.max_bytes=3000000", "trainer.global_batch_size=4", "trainer.eval_batches=1"]
TINY += ["trainer.plot=false", "trainer.eval_interval=5", "checkpoint.interval=5", "checkpoint.keep_last=5"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_asynchronous_checkpoints_equal_synchronous_ones(strategy: str, cache_dir: Path, tmp_path: Path) -> None:
    runs = {}
    for mode in ("sync", "async"):
        run_dir = tmp_path / mode
        args = ["train", f"run_dir={run_dir}", *SMALL, *TINY[4:], "trainer.max_steps=15", "launcher.nproc=2"]
        result = fmtrain([*args, f"strategy={strategy}", f"checkpoint.async={'true' if mode == 'async' else 'false'}"], cache_dir)
        assert result.returncode == 0, result.stdout + result.stderr
        runs[mode] = read_metrics(run_dir)
        steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
        assert steps == ["step_000005", "step_000010", "step_000015"], steps
        assert not list((run_dir / "checkpoints").glob(".*.tmp"))
    assert "written in the background: training waited" in (tmp_path / "async" / "logs" / "rank0.log").read_text()
    losses = {mode: [r["loss"] for r in records if "loss" in r] for mode, records in runs.items()}
    assert losses["async"] == losses["sync"]
    # The checkpoint written in the background holds exactly the state of its step.
    import torch
    from conftest import final_state

    def flat(tree: object, prefix: str = "") -> dict[str, object]:
        if isinstance(tree, dict):
            return {k: v for key, value in tree.items() for k, v in flat(value, f"{prefix}{key}.").items()}
        return {prefix: tree}

    sync, written = (flat(final_state(tmp_path / mode / "checkpoints" / "step_000010")) for mode in ("sync", "async"))
    assert sync.keys() == written.keys() and len(sync) > 10
    for key, value in sync.items():
        assert torch.equal(value, written[key]) if isinstance(value, torch.Tensor) else value == written[key], key


def test_a_kill_during_an_asynchronous_write_resumes_from_the_checkpoint_before(cache_dir: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    assert fmtrain(["train", f"run_dir={reference}", *TINY, "trainer.max_steps=15"], cache_dir).returncode == 0
    run_dir = tmp_path / "run"
    args = ["train", f"run_dir={run_dir}", *TINY, "trainer.max_steps=15", "checkpoint.async=true"]
    # Step 10's checkpoint (~40 MB) is being written when the rank is killed at the start of step 10.
    killed = fmtrain(args, cache_dir, FMTRAIN_FAULT="0:10:kill")
    assert killed.returncode != 0, killed.stdout + killed.stderr
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "step_000005" / "manifest.json").is_file() and not (checkpoints / "step_000010").exists()
    assert (checkpoints / ".step_000010.tmp").is_dir()  # the interrupted write: no manifest, never trusted
    resumed = fmtrain(args, cache_dir)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout + resumed.stderr and "step_000005 at step 5" in resumed.stdout + resumed.stderr
    assert train_losses(run_dir) == train_losses(reference)
