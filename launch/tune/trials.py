"""One trial of ``fmtrain tune``: an fmtrain run in ``<sweep>/trials/<trial id>``, reporting its
validation loss to Ray Tune after each evaluation, and stopped when the scheduler stops the trial.

A trial trains as the launcher says: one rank in the trial's Ray process (``launcher=local``), N
ranks through the local launcher in a child process (``launcher.nproc=N``), or a Slurm job of its
own (``launcher=slurm``); the last two are followed through their ``metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

from fmtrain.config import TrainConfig
from launch.tune.space import apply_overrides

log = logging.getLogger("fmtrain.launch")


def _trial(params: dict[str, Any], base_yaml: str, sweep_dir: str, hand_over_checkpoints: bool, code_dir: str = "") -> None:
    """One Ray Tune trial: an fmtrain run in its own directory, reporting after each evaluation.

    One rank (``launcher=local``, the default) trains in this process. N ranks
    (``launcher.nproc=N``) are the local launcher in a child process, and ``launcher=slurm`` is a
    Slurm job submitted from here; either is followed through its ``metrics.jsonl`` and stopped
    (SIGTERM, scancel) when the trial ends first: stopped by the scheduler, or failed."""
    from ray import tune

    from fmtrain.config import to_yaml

    trial_dir = Path(sweep_dir) / "trials" / tune.get_context().get_trial_id()
    trial_dir.mkdir(parents=True, exist_ok=True)  # first: a trial whose values fail validation has its row too
    cfg = _trial_config(params, base_yaml, trial_dir)
    if (evaluations := _completed_evaluations(trial_dir, params, cfg.trainer.max_steps)) is not None:
        # A resumed sweep restarts a trial whose run completed after the sweep's state was last saved
        # (its driver stopped in between): the run's evaluations are reported again, the run is not.
        log.info("trial %s: its run completed before the sweep stopped; reporting its evaluations", trial_dir.name)
        for record in evaluations:
            tune.report({"val_loss": record["val_loss"], "step": record["step"]})
        return
    if hand_over_checkpoints:
        # PBT may hand any reported checkpoint to another trial later: keep them all (Ray keeps
        # only pointers to them, so nothing is stored twice).
        cfg.checkpoint.keep_last = max(cfg.checkpoint.keep_last, math.ceil(cfg.trainer.max_steps / cfg.checkpoint.interval) + 1)
    inherited = tune.get_checkpoint()  # PBT: a better trial's checkpoint to continue from
    if inherited is not None:
        with inherited.as_directory() as folder:
            pointer = json.loads((Path(folder) / "pointer.json").read_text())
        step_dir = trial_dir / "checkpoints" / pointer["name"]
        source = Path(pointer["path"]).resolve()
        if source != step_dir.resolve():
            shutil.rmtree(step_dir, ignore_errors=True)
            shutil.copytree(source, step_dir)
            # PBT's exploit: this trial goes on from another trial's checkpoint with new values (results.csv says so).
            note = {"from_trial": source.parent.parent.name, "checkpoint": pointer["name"], "params": params}
            with open(trial_dir / "exploits.jsonl", "a") as f:
                f.write(json.dumps(note) + "\n")
        cfg.trainer.resume = str(step_dir)
    (trial_dir / "config.yaml").write_text(to_yaml(cfg))
    (trial_dir / "params.json").write_text(json.dumps(params))
    if cfg.launcher.name == "slurm":
        _follow(_SlurmTrialJob.submit(cfg, Path(code_dir) if code_dir else None), trial_dir, cfg.trainer.max_steps)
    elif cfg.launcher.nproc > 1:
        _follow(_LocalTrialJob.start(trial_dir, cfg.tune.cpus_per_trial), trial_dir, cfg.trainer.max_steps)
    else:
        _run_here(cfg, hand_over_checkpoints)


def _completed_evaluations(trial_dir: Path, params: dict[str, Any], max_steps: int) -> list[dict[str, Any]] | None:
    """The evaluations in ``trial_dir``'s metrics, if a run with these values completed there."""
    from fmtrain.metrics import read_jsonl
    from launch.spec import RESULT_FILE, run_outcome

    try:
        same_values = json.loads((trial_dir / "params.json").read_text()) == json.loads(json.dumps(params))
        if not same_values or not (trial_dir / RESULT_FILE).is_file():
            return None
        outcome = run_outcome(trial_dir)
    except (OSError, ValueError):
        return None
    if outcome.get("status") != "completed" or outcome.get("step") != max_steps:
        return None
    return [r for r in read_jsonl(trial_dir / "metrics.jsonl") if "val_loss" in r]


def _trial_config(params: dict[str, Any], base_yaml: str, trial_dir: Path) -> TrainConfig:
    from omegaconf import OmegaConf

    from fmtrain.config import to_config

    cfg = apply_overrides(to_config(OmegaConf.create(base_yaml)), params)
    cfg.run_dir = str(trial_dir)
    cfg.trainer.progress = False
    return cfg


def _run_here(cfg: TrainConfig, hand_over_checkpoints: bool) -> None:
    """The trial's run in this process; checkpoints reported as pointers for PBT to hand over."""
    from ray import tune

    from fmtrain.trainer import run

    def report(step: int, val_loss: float, checkpoint: Path | None) -> None:
        metrics = {"val_loss": val_loss, "step": step}
        if checkpoint is None or not hand_over_checkpoints:
            tune.report(metrics)
            return
        # Hand Ray Tune a pointer to fmtrain's checkpoint (not a copy of it): PBT copies it on exploit.
        import tempfile

        from ray.tune import Checkpoint

        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "pointer.json").write_text(json.dumps({"name": checkpoint.name, "path": str(checkpoint)}))
            tune.report(metrics, checkpoint=Checkpoint.from_directory(folder))

    run(cfg, on_eval=report)


def _follow(job: _LocalTrialJob | _SlurmTrialJob, trial_dir: Path, max_steps: int, poll_s: float = 1.0) -> None:
    """Report a run that trains elsewhere from its metrics.jsonl; stop it if the trial ends first
    (and say so in ``cancelled.json``). A run can be quicker than the scheduler: one that finished
    before the trial was stopped is left as it is."""
    import time

    from ray import tune

    from fmtrain.metrics import read_jsonl

    metrics_file, reported, reporting, ended = trial_dir / "metrics.jsonl", 0, 0, False
    try:
        while True:
            done = job.done()  # asked before reading: every evaluation written before the end is reported
            for record in read_jsonl(metrics_file) if metrics_file.is_file() else []:
                if "val_loss" in record and record["step"] > reported:
                    try:
                        reporting = record["step"]
                        tune.report({"val_loss": record["val_loss"], "step": record["step"], **job.ids()})
                    except SystemExit:  # how Ray Tune ends a trial that its scheduler stops
                        if record["step"] >= max_steps:  # the last evaluation: the run is saving its end
                            while not job.done():
                                time.sleep(poll_s)
                        raise
                    reported = record["step"]
            if done:
                ended = True
                break
            time.sleep(poll_s)
        job.check()
    finally:
        if not ended and not job.done():  # the driver's _StopRuns does the same, should this actor be gone first
            log.info("trial stopped at step %d before its run ended: stopping %s", reporting, job)
            job.cancel()


@dataclasses.dataclass
class _LocalTrialJob:
    """N ranks on this node: the local launcher (``python -m launch.local``) in a child process."""

    process: Any
    trial_dir: Path

    @classmethod
    def start(cls, trial_dir: Path, cpus_per_rank: float) -> _LocalTrialJob:
        import subprocess
        import sys

        _end_earlier_job(trial_dir)
        log_file = open(trial_dir / "launcher.log", "ab")  # noqa: SIM115  (the child's; closed with it)
        command = [sys.executable, "-m", "launch.local", str(trial_dir / "config.yaml")]
        # Ray sets the trial's whole CPU count as OMP_NUM_THREADS; each rank gets its share.
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, int(cpus_per_rank))))
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        log_file.close()
        return cls(process, trial_dir)

    def ids(self) -> dict[str, Any]:
        return {"pid": self.process.pid}

    def done(self) -> bool:
        return self.process.poll() is not None

    def check(self) -> None:
        if self.process.returncode != 0:
            tail = (self.trial_dir / "launcher.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the trial's run exited with code {self.process.returncode}:\n{tail}")

    def cancel(self) -> None:
        """SIGTERM: every rank saves and exits; SIGKILL to the process group if it has not after 60 s."""
        import signal
        import subprocess

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@dataclasses.dataclass
class _SlurmTrialJob:
    """The trial as a Slurm job, submitted through the Slurm launcher."""

    job: Any  # launch.slurm.SlurmJob
    job_id: str
    state: str | None = None  # Slurm's, as of the last done()

    @classmethod
    def submit(cls, cfg: TrainConfig, code_dir: Path | None) -> _SlurmTrialJob:
        from launch.slurm import SlurmLauncher
        from launch.spec import RunSpec

        trial_dir = Path(cfg.run_dir)
        _end_earlier_job(trial_dir)
        spec = RunSpec(cfg, trial_dir, argv=["fmtrain", "tune", f"(trial {trial_dir.name})"])
        job = SlurmLauncher().launch_all([spec], root=trial_dir, code_dir=code_dir)[0]
        return cls(job, job.record.job_id)

    def __str__(self) -> str:
        return f"Slurm job {self.job_id}"

    def ids(self) -> dict[str, Any]:
        return {"slurm_job_id": self.job_id}

    def done(self) -> bool:
        from launch.slurm import TERMINAL, scheduler_state

        self.state = scheduler_state(self.job_id)
        return self.state in TERMINAL

    def check(self) -> None:
        if self.state != "COMPLETED" or not (self.job.run_dir / "result.json").is_file():
            raise RuntimeError(f"the trial's Slurm job {self.job_id} ended {self.state}: see fmtrain logs {self.job.run_dir}")

    def cancel(self) -> None:
        self.job.cancel()


def _running_record(trial_dir: Path) -> Any:
    """The trial's job record if its run is still going (a Slurm job not ended, a live local
    launcher), else None."""
    from launch.launchers import handle_for
    from launch.spec import JobRecord

    if not (trial_dir / "job.json").is_file():
        return None
    return JobRecord.read(trial_dir) if handle_for(trial_dir).running() else None


def _stop_run(trial_dir: Path) -> None:
    """scancel a Slurm job; SIGTERM a local launcher (its ranks save)."""
    from launch.launchers import handle_for

    handle_for(trial_dir).cancel()


def stop_trial_run(trial_dir: Path, stopped_at_step: int) -> bool:
    """Stop the run of a trial that has ended (scheduler stop, error) while its run has not. Noted
    in ``cancelled.json``; returns whether there was anything to stop."""
    record = _running_record(trial_dir)
    if record is None:
        return False
    _stop_run(trial_dir)
    note = {"launcher": record.launcher, "job_id": record.job_id, "pid": record.pid, "stopped_at_step": stopped_at_step}
    (trial_dir / "cancelled.json").write_text(json.dumps(note) + "\n")
    log.info("stopped the %s run of trial %s (step %d)", record.launcher, trial_dir.name, stopped_at_step)
    return True


def _stop_runs_callback(sweep_dir: Path, max_steps: int) -> Any:
    """A Ray Tune callback in the driver: a trial that ends before its run's last evaluation has its
    run stopped, even when the trial's actor is gone before it could do that itself."""
    from ray.tune import Callback

    class StopRuns(Callback):  # type: ignore[misc]
        def _stop(self, trial: Any) -> None:
            step = int((trial.last_result or {}).get("step", 0))
            if step < max_steps:  # a trial stopped at the last evaluation leaves its run to save and end
                stop_trial_run(sweep_dir / "trials" / trial.trial_id, step)

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self._stop(trial)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self._stop(trial)

    return StopRuns()


def _end_earlier_job(trial_dir: Path) -> None:
    """A resumed sweep restarts unfinished trials: a run an earlier driver left going in the same
    directory (a Slurm job; a local launcher, should it have outlived its Ray worker) is stopped (it
    saves on SIGTERM) and waited for, and the new run resumes from it."""
    import time

    record = _running_record(trial_dir)
    if record is None:
        return
    log.info("stopping the %s run %s left by an earlier run of this sweep", record.launcher, record.job_id)
    _stop_run(trial_dir)
    deadline = time.monotonic() + 300
    while _running_record(trial_dir) is not None and time.monotonic() < deadline:
        time.sleep(1.0)
