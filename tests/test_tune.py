"""fmtrain tune: real Ray Tune sweeps of real fmtrain runs, inside a loopback-only network namespace."""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import ASHA_GRID, FMTRAIN, SLOW_TRIAL, SMALL, fmtrain, pids_mentioning, ray_env, read_metrics

SWEEP = [*SMALL, "trainer.max_steps=40", "trainer.eval_interval=10", "checkpoint.interval=10", "tune.max_concurrent=2"]


def tune(netns: list[str], cache: Path, ray_tmp: Path, sweep: Path, *overrides: str, timeout: float = 400) -> str:
    args = [*netns, FMTRAIN, "tune", f"run_dir={sweep}", *SWEEP, *overrides]
    result = subprocess.run(args, env=ray_env(cache, ray_tmp), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def results(sweep: Path) -> list[dict[str, str]]:
    with open(sweep / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "choose a search: tune=asha | optuna | pbt | random | grid"),
        (
            ["tune=asha", '+tune.space.model.n_layerz="choice([2, 4])"'],
            "tune.space.model.n_layerz='' is invalid: unknown config key",
        ),
        (["tune=asha", '+tune.space.model="choice([1])"'], "names a section, not a value"),
        (["tune=asha", '+tune.space.model.n_layers="choice([])"'], "choice takes one non-empty list"),
        (["tune=asha", '+tune.space.optim.lr="loguniform(0, 1)"'], "loguniform needs low > 0"),
        (["tune=asha", '+tune.space.optim.lr="normal(0, 1)"'], "must be one of uniform(...), loguniform(...)"),
        (["tune=grid", '+tune.space.optim.lr="loguniform(1e-4, 1e-2)"'], "every tune.space value must be grid([...])"),
        (["tune=asha", "+tune.space.optim.lr=loguniform(1e-4, 1e-2)"], 'quote it: key="loguniform(1e-4, 1e-2)"'),
        (["tune=asha", "tune.scheduler=hyperband"], "tune.scheduler='hyperband' is invalid: valid choices are asha, pbt, fifo"),
        (["tune=asha", "launcher=ray"], "launcher.name='ray' is invalid: the sweep itself runs on Ray; for N ranks per trial"),
        (["tune=pbt", "launcher.nproc=2"], "tune.scheduler='pbt' is invalid: PBT hands checkpoints between trials"),
    ],
)
def test_bad_search_spaces_are_refused_before_ray_starts(overrides, message, cache_dir: Path, tmp_path: Path) -> None:
    result = fmtrain(["tune", f"run_dir={tmp_path}/sweep", *overrides], cache_dir, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_an_asha_sweep_stops_the_worst_trials_early_and_ranks_by_validation_loss(
    netns, ray_tmp: Path, cache_dir: Path, tmp_path: Path
) -> None:
    sweep = tmp_path / "asha"
    # One trial at a time from a seeded search: ASHA's decisions depend on the results, not on which
    # trial happened to report first (two at once once used 260 trial-steps, over the bound).
    tune(netns, cache_dir, ray_tmp, sweep, "tune=asha", "tune.num_samples=8", "tune.max_concurrent=1")
    rows = results(sweep)
    assert len(rows) == 8
    steps = sum(int(r["steps"]) for r in rows)
    assert steps < 0.8 * 8 * 40, f"ASHA used {steps} trial-steps of {8 * 40}"
    assert any(r["status"] == "stopped early" for r in rows)
    # Ranked by each trial's best validation loss, read back from its own run directory.
    for row in rows:
        val = [r["val_loss"] for r in read_metrics(Path(row["run_dir"])) if "val_loss" in r]
        assert float(row["val_loss"]) == pytest.approx(min(val), rel=1e-9)
        assert int(row["steps"]) == max(r["step"] for r in read_metrics(Path(row["run_dir"])) if "loss" in r)
    losses = [float(r["val_loss"]) for r in rows]
    assert losses == sorted(losses)
    best = yaml.safe_load((sweep / "best_overrides.yaml").read_text())
    assert best["optim.lr"] == pytest.approx(float(rows[0]["optim.lr"]))
    assert f"optim.lr={rows[0]['optim.lr']}" in (sweep / "best_command.txt").read_text()
    assert (sweep / "tune.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.parametrize("search", ["optuna", "pbt"])
def test_optuna_and_pbt_sweeps_complete(search: str, netns, ray_tmp: Path, cache_dir: Path, tmp_path: Path) -> None:
    sweep = tmp_path / search
    # All 4 trials at once (half a CPU each). PBT is synchronous (tune.synch, the default): at every
    # evaluation it waits for the whole population, then the worst quarter (one trial) exploits the best.
    together = ["tune.max_concurrent=4", "tune.cpus_per_trial=0.5", "tune.perturbation_interval=1"]
    tune(netns, cache_dir, ray_tmp, sweep, f"tune={search}", "tune.num_samples=4", *together, "seed=7")  # 40 steps, 4 evaluations
    rows = results(sweep)
    assert len(rows) == 4 and len({r["trial"] for r in rows}) == 4
    assert all(float(r["val_loss"]) > 0 and int(r["evaluations"]) >= 1 for r in rows)
    assert all(r["status"] in ("completed", "stopped early") for r in rows)  # Optuna's sweep stops trials by ASHA
    if search == "optuna":
        # The values are Optuna's: its TPE sampler seeded with the run's seed proposes exactly these four
        # (all asked before any result, so from TPE's seeded start-up sampling); random search would not.
        import optuna

        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=7))
        space = {
            "optim.lr": optuna.distributions.FloatDistribution(1e-4, 3e-2, log=True),
            "optim.weight_decay": optuna.distributions.FloatDistribution(0.0, 0.2),
        }
        expected = [study.ask(fixed_distributions=space).params for _ in rows]
        proposed = [json.loads((Path(r["run_dir"]) / "params.json").read_text()) for r in rows]
        assert sorted(sorted(p.items()) for p in proposed) == sorted(sorted(p.items()) for p in expected)
    if search == "pbt":
        assert [(r["status"], r["steps"], r["evaluations"]) for r in rows] == [("completed", "40", "4")] * 4
        # PBT's exploit: a trial continued from another trial's checkpoint, copied into its own run.
        exploited = [r for r in rows if r["continued_from"]]
        assert exploited, "synchronous PBT exploits at every interval"
        for row in exploited:
            log = (Path(row["run_dir"]) / "logs" / "rank0.log").read_text()
            for source in row["continued_from"].split():
                trial, checkpoint = source.split("/")
                assert trial in {r["trial"] for r in rows} and trial != row["trial"]
                assert f"resumed from {row['run_dir']}/checkpoints/{checkpoint}" in log


@pytest.mark.slow
def test_a_trial_without_its_metric_says_why_in_the_results(netns, ray_tmp: Path, cache_dir: Path, tmp_path: Path) -> None:
    """A trial whose values fail validation ends before any evaluation: its row says so, with the error."""
    sweep = tmp_path / "failing"
    space = '+tune.space.model.n_heads="grid([4, 3])"'  # beside a seeded optim.lr; 3 heads do not divide dim 64
    tune(netns, cache_dir, ray_tmp, sweep, "tune=random", "tune.num_samples=1", space, "trainer.max_steps=20")
    good, bad = results(sweep)
    assert (good["model.n_heads"], good["status"], good["steps"]) == ("4", "completed", "20") and float(good["val_loss"]) > 0
    assert (bad["model.n_heads"], bad["val_loss"], bad["evaluations"]) == ("3", "", "0")
    assert bad["status"] == "error: fmtrain.config.ConfigError: model.n_heads=3 is invalid: must divide model.dim=64"


COMPLETED = {"status": "completed", "step": 40}
EVALS = [{"step": 20, "val_loss": 3.5}, {"step": 40, "val_loss": 3.0}]


@pytest.mark.parametrize(
    ("result", "params", "evaluations"),
    [
        (COMPLETED, {"optim.lr": 0.001}, EVALS),  # a completed run with the trial's values: reported, not run again
        (COMPLETED, {"optim.lr": 0.002}, None),  # another trial's values
        ({"status": "stopped", "step": 20}, {"optim.lr": 0.001}, None),  # stopped: it resumes
        ({"status": "completed", "step": 20}, {"optim.lr": 0.001}, None),  # ended before max_steps
        (None, {"optim.lr": 0.001}, None),  # no result.json: it never ended
    ],
)
def test_a_restarted_trial_reports_a_completed_run_instead_of_running_it_again(
    result: dict | None, params: dict, evaluations: list | None, tmp_path: Path
) -> None:
    from launch.tune.trials import _completed_evaluations

    (tmp_path / "params.json").write_text(json.dumps({"optim.lr": 0.001}))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [{"step": 10, "loss": 4.0}, *EVALS]))
    if result is not None:
        (tmp_path / "result.json").write_text(json.dumps(result))
    assert _completed_evaluations(tmp_path, params, max_steps=40) == evaluations


@pytest.mark.slow
def test_a_sweep_whose_driver_is_stopped_resumes_without_rerunning_finished_trials(
    netns, ray_tmp: Path, cache_dir: Path, tmp_path: Path
) -> None:
    sweep = tmp_path / "resumed"
    overrides = ["tune=random", "tune.num_samples=3", "tune.max_concurrent=1", "trainer.max_steps=60"]
    args = [*netns, FMTRAIN, "tune", f"run_dir={sweep}", *SWEEP, *overrides]
    driver = subprocess.Popen(args, env=ray_env(cache_dir, ray_tmp), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(list((sweep / "trials").glob("*/result.json"))) < 2:
        assert time.monotonic() < deadline and driver.poll() is None, "two trials did not finish"
        time.sleep(0.5)
    driver.send_signal(signal.SIGINT)  # like Ctrl-C: Ray Tune saves its state and stops
    driver.wait(timeout=120)
    finished = {p.parent.name: p.stat().st_mtime for p in (sweep / "trials").glob("*/result.json")}
    tune(netns, cache_dir, ray_tmp, sweep, *overrides, "tune.resume=true")
    rows = results(sweep)
    assert len(rows) == 3 and all(r["status"] == "completed" for r in rows)
    for trial, mtime in finished.items():
        assert (sweep / "trials" / trial / "result.json").stat().st_mtime == mtime, f"{trial} ran again"
    leftovers = pids_mentioning(ray_tmp)
    assert leftovers == [], "Ray processes of the sweep are still running"


@pytest.mark.slow
def test_distributed_trials_train_on_two_ranks_and_stopped_ones_are_stopped(
    netns, ray_tmp: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """launcher.nproc=2: every trial is a 2-rank local-launcher run; ASHA's stops reach its processes."""
    sweep = tmp_path / "two_ranks"
    args = [*netns, FMTRAIN, "tune", f"run_dir={sweep}", *SLOW_TRIAL, *ASHA_GRID, "launcher.nproc=2"]
    args += ['+tune.space.optim.lr="grid([0.003, 0.00001, 0.00002])"']
    result = subprocess.run(args, env=ray_env(cache_dir, ray_tmp), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = results(sweep)
    # What ASHA guarantees, not one sweep's details: the best learning rate (the grid's first) trains to the end;
    # the trials it stops, at least one of two 150-300x worse, end at an evaluation (every 20 steps) before it.
    assert len(rows) == 3 and (float(rows[0]["optim.lr"]), rows[0]["status"], rows[0]["steps"]) == (0.003, "completed", "100")
    stopped = [row for row in rows[1:] if row["status"] == "stopped early"]
    assert stopped and all(int(row["steps"]) < 100 and int(row["steps"]) % 20 == 0 for row in stopped), rows
    assert all(row["status"] == "completed" for row in rows[1:] if row not in stopped), rows
    for row in rows:
        run_dir = Path(row["run_dir"])
        assert "world 2 (dp 2" in (run_dir / "logs" / "rank0.log").read_text()
        rank1 = (run_dir / "logs" / "rank1.log").read_text()
        assert "rank1 pid" in rank1 and "runs at nice" not in rank1, rank1  # a trial's ranks: nice 0, not Ray's 15
    for row in stopped:
        note = json.loads((Path(row["run_dir"]) / "cancelled.json").read_text())
        assert note["launcher"] == "local" and note["stopped_at_step"] == int(row["steps"])
        assert max(r["step"] for r in read_metrics(Path(row["run_dir"])) if "loss" in r) < 100
    deadline = time.monotonic() + 60
    while pids_mentioning(sweep):
        assert time.monotonic() < deadline, "processes of stopped trials are still running"
        time.sleep(0.5)


@pytest.mark.slow
def test_trials_bigger_than_the_ray_cluster_are_refused_before_any_trial(
    netns, ray_tmp: Path, cache_dir: Path, tmp_path: Path
) -> None:
    args = [*netns, FMTRAIN, "tune", f"run_dir={tmp_path / 'sweep'}", *SWEEP, "tune=asha", "launcher.nproc=2"]
    args += ["tune.cpus_per_trial=8"]
    result = subprocess.run(args, env=ray_env(cache_dir, ray_tmp), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "tune.cpus_per_trial=8.0 is invalid: a trial of launcher.nproc=2 rank(s) x 8 CPU needs 16 CPUs" in result.stderr
    assert not (tmp_path / "sweep" / "trials").exists()
    assert pids_mentioning(ray_tmp) == []


@pytest.mark.slow
def test_a_killed_driver_leaves_no_trial_run_behind_and_the_sweep_resumes(
    netns, ray_tmp: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """SIGKILL to the sweep's driver (a kill -9, the OOM killer): the N-rank trial's launcher does not
    train on unattended; tune.resume=true resumes the trial from its last checkpoint and finishes."""
    sweep = tmp_path / "killed"
    overrides = [*SLOW_TRIAL, "tune=grid", '+tune.space.optim.lr="grid([0.003])"', "launcher.nproc=2"]
    args = [*netns, FMTRAIN, "tune", f"run_dir={sweep}", *overrides]
    driver = subprocess.Popen(args, env=ray_env(cache_dir, ray_tmp), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not any(r.get("step", 0) >= 25 for m in (sweep / "trials").glob("*/metrics.jsonl") for r in read_metrics(m.parent)):
        assert time.monotonic() < deadline and driver.poll() is None, "the trial did not get past its first checkpoint"
        time.sleep(0.5)
    driver.kill()
    driver.wait()
    deadline = time.monotonic() + 60
    while pids_mentioning(sweep):
        assert time.monotonic() < deadline, "the trial's run outlived the sweep's driver"
        time.sleep(0.5)
    (trial,) = [p.parent for p in (sweep / "trials").glob("*/job.json")]
    status = subprocess.run([FMTRAIN, "status", str(trial)], capture_output=True, text=True, check=True)
    assert json.loads(status.stdout)["state"] == "failed", "its launcher was killed: status must not say running"

    tune(netns, cache_dir, ray_tmp, sweep, *overrides, "tune.resume=true", timeout=600)
    (row,) = results(sweep)
    assert (row["status"], row["steps"]) == ("completed", "100")
    resumed = re.search(r"resumed from \S+ at step (\d+)", (trial / "logs" / "rank0.log").read_text())
    assert resumed and int(resumed.group(1)) >= 20, "the resumed trial starts from its checkpoint, not from scratch"
    assert [r["step"] for r in read_metrics(trial) if "loss" in r] == list(range(1, 101))
    assert pids_mentioning(sweep) == [] and pids_mentioning(ray_tmp) == []
