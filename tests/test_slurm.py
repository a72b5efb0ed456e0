"""launcher=slurm against a real Slurm cluster on this machine (slurm/dev-cluster.sh), never a mock.

The session's cluster has 2 emulated nodes with 4 CPUs each and accounting (slurmdbd + MariaDB), on
its own ports and state directory; it is torn down by PID at the end. Nothing here is skipped: a
machine that cannot run the cluster fails these tests.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import LAUNCHER_STEPS, SMALL, fmtrain, local_losses, pids_mentioning, train_losses

from launch.env import PORT_BASE, PORT_SPAN, expand_nodelist, rendezvous_port, torch_env_from_slurm
from launch.slurm import secret_names

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "slurm" / "dev-cluster.sh"
STEPS = LAUNCHER_STEPS


# ----------------------------------------------------------------------------- no cluster needed


def test_slurm_variables_become_the_torch_environment() -> None:
    assert expand_nodelist("gpu[01-03,07],cpu1,node[9-10]") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu1", "node9", "node10"]
    environ = {
        "SLURM_JOB_NODELIST": "node[3-4]",
        "SLURM_NTASKS": "4",
        "SLURM_NNODES": "2",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_JOB_ID": "123456",
    }
    env = torch_env_from_slurm(environ)
    assert env == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "node3",
        "MASTER_PORT": str(PORT_BASE + 123456 % PORT_SPAN),
    }
    assert rendezvous_port("123457") != rendezvous_port("123456")
    ephemeral_start = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert all(20000 <= rendezvous_port(str(job)) < ephemeral_start for job in range(17890, 17890 + PORT_SPAN))


def test_secret_looking_variables_are_found_unless_allowed() -> None:
    environ = {
        "HF_TOKEN": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "DB_PASSWORD": "x",
        "WANDB_API_KEY": "x",
        "PATH": "/bin",
        "HOME": "/",
    }
    assert secret_names(environ, []) == ["AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "HF_TOKEN", "WANDB_API_KEY"]
    assert secret_names(environ, ["WANDB_*", "HF_TOKEN"]) == ["AWS_SECRET_ACCESS_KEY", "DB_PASSWORD"]


def test_the_sbatch_script_of_a_2x8_gpu_profile_matches_the_golden_file() -> None:
    from launch.compose import compose
    from launch.slurm import render_sbatch

    cfg = compose(["launcher=slurm", "cluster=example_h100", "model=8b", "strategy=fsdp", "precision=bf16"], check=False)
    root = Path('/scratch/my runs/it\'s "quoted"')
    script = render_sbatch(cfg.launcher, root / "slurm", root / "code").replace(shlex.quote(sys.executable), "PYTHON")
    golden = Path(__file__).parent / "golden" / "sbatch_example_h100.sh"
    if os.environ.get("FMTRAIN_UPDATE_GOLDEN") == "1":
        golden.write_text(script)
    assert script == golden.read_text()
    # Every path survives the shell: the srun line splits back into the exact arguments.
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    words = shlex.split(srun)
    assert words[words.index("--output") + 1] == f"{root}/slurm/%j/%j_%t_log.out"
    assert words[-1] == f"{root}/slurm/%j"
    output = next(line for line in script.splitlines() if line.startswith("#SBATCH --output="))
    assert shlex.split(output.removeprefix("#SBATCH --output="))[0] == f"{root}/slurm/%j/%j_0_log.out"


# ----------------------------------------------------------------------------- the real cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """A 2-node cluster for this module: its environment for subprocesses (SLURM_CONF, ...)."""
    home = tmp_path_factory.mktemp("slurm")
    port = os.environ.get("FMTRAIN_TEST_SLURM_PORT", "17800")  # another for a second test session on this machine
    env = dict(os.environ, FMTRAIN_SLURM_HOME=str(home), FMTRAIN_SLURM_PORT=port)
    up = subprocess.run([str(CLUSTER), "up", "--nodes", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, f"the dev cluster did not come up:\n{up.stdout}\n{up.stderr}"
    env["SLURM_CONF"] = str(home / "etc" / "slurm.conf")
    try:
        yield env
    finally:
        down = subprocess.run([str(CLUSTER), "down"], env=env, capture_output=True, text=True, timeout=300)
        assert down.returncode == 0, down.stderr


def slurm(cluster: dict[str, str], *args: str) -> str:
    return subprocess.run(list(args), env=cluster, capture_output=True, text=True, timeout=60, check=True).stdout


def submit(
    cluster: dict[str, str],
    cache: Path,
    run_dir: Path,
    *overrides: str,
    multirun: bool = False,
    env: dict[str, str] | None = None,
) -> list[str]:
    args = ["train", *(["-m"] if multirun else []), "launcher=slurm", f"run_dir={run_dir}", *SMALL, *STEPS, *overrides]
    result = fmtrain(args, cache, timeout=120, SLURM_CONF=cluster["SLURM_CONF"], **(env or {}))
    assert result.returncode == 0, result.stdout + result.stderr
    return [m.group(1) for line in result.stdout.splitlines() if (m := re.match(r"^(\d+(?:_\d+)?)\t", line))]


def job_state(cluster: dict[str, str], job_id: str) -> str:
    """The job's state as fmtrain reads it (``launch.slurm.scheduler_state``): the controller's while it holds
    the job, then accounting's. Accounting alone can say FAILED while the controller still has the job
    COMPLETING (its processes being stopped), when fmtrain rightly refuses a new job for the same run directory."""
    from unittest import mock

    from launch.slurm import scheduler_state

    with mock.patch.dict(os.environ, SLURM_CONF=cluster["SLURM_CONF"]):
        return scheduler_state(job_id) or "UNKNOWN"


def wait_state(cluster: dict[str, str], job_id: str, states: tuple[str, ...], timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(cluster, job_id)
        if state in states:
            return state
        time.sleep(1)
    raise AssertionError(f"job {job_id} is {job_state(cluster, job_id)} after {timeout} s, not {states}")


def wait_steps(run_dir: Path, steps: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").is_file() and len(train_losses(run_dir)) >= steps:
            return
        time.sleep(0.5)
    raise AssertionError(f"{run_dir} did not reach {steps} steps in {timeout} s")


def status(cluster: dict[str, str], cache: Path, run_dir: Path) -> dict:
    result = fmtrain(["status", str(run_dir)], cache, **{k: cluster[k] for k in ("SLURM_CONF",)})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_one_and_two_node_jobs_equal_the_local_launcher(cluster, cache_dir: Path, tmp_path: Path, reference_run) -> None:
    secrets = {"FMTRAIN_TEST_TOKEN": "s3cr3t-value", "FMTRAIN_ALLOWED_TOKEN": "passed-on"}
    env_file = tmp_path / "job-env.txt"
    one = submit(
        cluster,
        cache_dir,
        tmp_path / "one node",  # a space in the path: quoted all the way into the job
        "trainer.max_steps=20",
        "launcher.nodes=1",
        "launcher.tasks_per_node=2",
        "launcher.env_allow=[FMTRAIN_ALLOWED_TOKEN]",
        f"launcher.setup=['env > {env_file}']",
        env=secrets,
    )[0]
    two = submit(cluster, cache_dir, tmp_path / "two", "trainer.max_steps=20", "launcher.nodes=2", "launcher.tasks_per_node=1")[0]
    # One task per node, each starting 2 ranks under torch's elastic agent (the GPU-node layout).
    per_node = ("launcher.nodes=2", "launcher.tasks_per_node=1", "launcher.procs_per_task=2")
    four = submit(cluster, cache_dir, tmp_path / "per node", "trainer.max_steps=20", *per_node)[0]
    reference = {2: local_losses(reference_run, 20), 4: local_losses(reference_run, 20, nproc=4)}
    for job_id, run_dir, world in ((one, tmp_path / "one node", 2), (two, tmp_path / "two", 2), (four, tmp_path / "per node", 4)):
        state = wait_state(cluster, job_id, ("COMPLETED", "FAILED", "CANCELLED"))
        assert state == "COMPLETED", (run_dir / "job.json").read_text()
        losses = train_losses(run_dir)
        # The same world size, data and gloo reductions as the local run: equal numbers.
        assert losses == pytest.approx(reference[world], rel=1e-6)
        report = status(cluster, cache_dir, run_dir)
        assert report["scheduler_state"] == "COMPLETED" and report["state"] == "completed" and report["step"] == 20
        assert report["submit_to_first_step_s"] > 0
        assert json.loads((run_dir / "job.json").read_text())["extra"]["code"] == str(run_dir / "code")  # the snapshot ran
    # The 2-node job's ranks ran on both emulated nodes (each task logs where it runs).
    task_logs = sorted((tmp_path / "two" / "slurm").glob(f"**/{two}_*_log.out"))
    assert {line.split()[-1] for log in task_logs for line in log.read_text().splitlines() if "fmtrain task" in line} == {
        "node1",
        "node2",
    }
    # Secrets: not in the job's environment, nor in any file of the run; allowed ones are passed.
    job_env = env_file.read_text()
    assert "FMTRAIN_TEST_TOKEN" not in job_env and "FMTRAIN_ALLOWED_TOKEN=passed-on" in job_env
    for path in (tmp_path / "one node").rglob("*"):
        if path.is_file():
            assert b"s3cr3t-value" not in path.read_bytes(), path


@pytest.mark.slow
def test_a_preempted_job_saves_requeues_and_resumes_exactly(cluster, cache_dir: Path, tmp_path: Path, reference_run) -> None:
    run_dir = tmp_path / "preempted"
    job_id = submit(cluster, cache_dir, run_dir, "trainer.max_steps=200", "launcher.tasks_per_node=2")[0]
    wait_steps(run_dir, 12)
    slurm(cluster, "scancel", "--signal=USR2", job_id)  # what a preempting scheduler sends (--signal=USR2@...)
    reference = local_losses(reference_run, 200)
    assert wait_state(cluster, job_id, ("COMPLETED", "FAILED", "CANCELLED")) == "COMPLETED"
    requeues = [json.loads(line) for line in (run_dir / "requeues.jsonl").read_text().splitlines()]
    assert [(r["reason"], r["requeued"]) for r in requeues] == [("preemption", True)]
    assert 12 <= requeues[0]["step"] < 200
    assert train_losses(run_dir) == pytest.approx(reference, rel=1e-6)
    assert status(cluster, cache_dir, run_dir)["requeues"] == 1


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_job_at_its_time_limit_saves_requeues_and_resumes_exactly(cluster, cache_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "timed"
    # The one test that waits on a real time limit (the others send the signal themselves): Slurm's
    # shortest, 1 minute, warned 50 s ahead; Slurm checks about every 30 s, so USR2 comes 10-40 s in.
    # 200 steps of at least 0.2 s (FMTRAIN_STEP_DELAY_S: however fast the machine): 40 s or more of
    # work, more than one cycle can do, so at least one requeue; the local reference's 200 steps take
    # seconds. A slow machine needs more cycles: each spends 10-20 s of its 10-40 s starting; 40 are allowed.
    overrides = [
        *LONG,
        "launcher.tasks_per_node=1",
        "launcher.time_min=1",
        "launcher.signal_delay_s=50",
        "launcher.max_requeues=40",
    ]
    job_id = submit(cluster, cache_dir, run_dir, *overrides, env={"FMTRAIN_STEP_DELAY_S": "0.2"})[0]
    reference = local_reference_1proc(cache_dir, tmp_path / "local")
    assert wait_state(cluster, job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=1300) == "COMPLETED"
    requeues = [json.loads(line) for line in (run_dir / "requeues.jsonl").read_text().splitlines()]
    assert requeues and all(r["reason"] == "time_limit" and r["requeued"] for r in requeues)
    assert train_losses(run_dir) == pytest.approx(reference, rel=1e-6)


LONG = ["trainer.max_steps=200", "trainer.eval_interval=1000", "checkpoint.interval=1000"]


def local_reference_1proc(cache: Path, run_dir: Path) -> dict[int, float]:
    result = fmtrain(["train", f"run_dir={run_dir}", *SMALL, *STEPS, *LONG], cache, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return train_losses(run_dir)


@pytest.mark.slow
def test_a_sweep_is_one_job_array_with_a_run_directory_per_task(cluster, cache_dir: Path, tmp_path: Path) -> None:
    ids = submit(cluster, cache_dir, tmp_path / "sweep", "optim.lr=1e-3,3e-3,1e-2", "trainer.max_steps=5", multirun=True)
    array = {job_id.split("_")[0] for job_id in ids}
    assert len(ids) == 3 and len(array) == 1, ids  # one array: ARRAY_0, ARRAY_1, ARRAY_2
    assert sorted(job_id.split("_")[1] for job_id in ids) == ["0", "1", "2"]
    for index, job_id in enumerate(ids):
        assert wait_state(cluster, job_id, ("COMPLETED", "FAILED", "CANCELLED")) == "COMPLETED"
        run_dir = tmp_path / "sweep" / str(index)
        assert sorted(train_losses(run_dir)) == [1, 2, 3, 4, 5]
        lr = {0: 1e-3, 1: 3e-3, 2: 1e-2}[index]
        assert f"lr: {lr}" in (run_dir / "config.yaml").read_text()


@pytest.mark.slow
def test_status_logs_and_cancel_work_on_a_running_job(cluster, cache_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "long"
    job_id = submit(cluster, cache_dir, run_dir, "trainer.max_steps=100000", "launcher.tasks_per_node=2")[0]
    try:
        wait_steps(run_dir, 3)
        # The controller's state, not accounting's: slurmdbd can still say PENDING while the ranks step.
        report = status(cluster, cache_dir, run_dir)
        assert report["scheduler_state"] == "RUNNING" and report["state"] == "running" and report["step"] >= 3
        logs = fmtrain(["logs", str(run_dir)], cache_dir, SLURM_CONF=cluster["SLURM_CONF"])
        assert logs.returncode == 0 and "model tiny" in logs.stdout
    except BaseException:
        subprocess.run(["scancel", job_id], env=cluster, timeout=60)  # a failure here leaves no job to the next tests
        raise
    cancelled = fmtrain(["cancel", str(run_dir)], cache_dir, SLURM_CONF=cluster["SLURM_CONF"])
    assert cancelled.returncode == 0, cancelled.stderr
    assert wait_state(cluster, job_id, ("CANCELLED", "COMPLETED", "FAILED"), timeout=60) == "CANCELLED"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and pids_mentioning(run_dir):
        time.sleep(0.5)
    assert pids_mentioning(run_dir) == [], "a process of the cancelled job is still running"


def test_the_scheduler_state_of_queued_jobs_and_array_tasks(cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    from launch.slurm import scheduler_state

    monkeypatch.setenv("SLURM_CONF", cluster["SLURM_CONF"])
    # Its output to /dev/null: sbatch writes slurm-<id>.out into the current directory, the checkout, otherwise.
    held = slurm(cluster, "sbatch", "--parsable", "--hold", "--array=0-2", "--output=/dev/null", "--wrap", "true").strip()
    try:
        # Held tasks are one queue record, ID_[0-2]: each task reads PENDING from it.
        assert [scheduler_state(f"{held}_{task}") for task in range(3)] == ["PENDING"] * 3
        slurm(cluster, "scancel", held)
        assert scheduler_state(f"{held}_1") == "CANCELLED"
    finally:
        subprocess.run(["scancel", held], env=cluster, timeout=60)


def queued(cluster: dict[str, str]) -> set[str]:
    """The ids of the jobs in the queue (an earlier test's cancelled job may still be completing there)."""
    return set(slurm(cluster, "squeue", "-h", "-o", "%i").split())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["launcher.nodes=4"], "launcher.nodes=4 is invalid: partition debug has 2 node(s)"),
        (["launcher.partition=nope"], "launcher.partition='nope' is invalid: the cluster's partitions are debug"),
        (["launcher.tasks_per_node=8"], "only 0 node(s) of partition debug have 8 CPUs"),
        (
            ["launcher.gpus_per_node=1"],
            "only 0 node(s) of partition debug have 1 CPUs (tasks_per_node x cpus_per_task) and 1 GPUs",
        ),
        (["strategy=fsdp_tp", "strategy.tp=2", "launcher.tasks_per_node=2"], "strategy=fsdp_tp needs at least 2 data-parallel"),
    ],
)
def test_impossible_requests_are_refused_before_sbatch(overrides, message, cluster, cache_dir: Path, tmp_path: Path) -> None:
    before = queued(cluster)
    result = fmtrain(
        ["train", "launcher=slurm", f"run_dir={tmp_path}/run", *SMALL, *overrides],
        cache_dir,
        timeout=120,
        SLURM_CONF=cluster["SLURM_CONF"],
    )
    assert result.returncode == 2 and message in result.stderr, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert queued(cluster) <= before  # nothing was submitted


def test_dry_run_prints_the_script_and_config_and_submits_nothing(cluster, cache_dir: Path, tmp_path: Path) -> None:
    before = queued(cluster)
    result = fmtrain(
        ["train", "launcher=slurm", "launcher.nodes=2", f"run_dir={tmp_path}/run", *SMALL, "--dry-run"],
        cache_dir,
        SLURM_CONF=cluster["SLURM_CONF"],
    )
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --nodes=2" in result.stdout and "#SBATCH --signal=USR2@120" in result.stdout
    assert "name: slurm" in result.stdout and "not submittable" not in result.stdout
    assert not (tmp_path / "run").exists()
    assert queued(cluster) <= before


@pytest.mark.slow
def test_a_hanging_rank_fails_the_job_with_its_name_and_every_stack(cluster, cache_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "hang"
    hang = ["trainer.max_steps=100", "launcher.nodes=2", "launcher.tasks_per_node=1", "trainer.hang_timeout_s=10"]
    job_id = submit(cluster, cache_dir, run_dir, *hang, env={"FMTRAIN_FAULT": "1:7:hang"})[0]
    assert wait_state(cluster, job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=180) == "FAILED"
    record = json.loads((run_dir / "job.json").read_text())
    assert record["state"] == "failed" and "did not arrive at step 7 (train): rank 1 at step 7 (start)" in record["message"]
    assert "in fault" in (run_dir / "logs" / "rank1.stack.txt").read_text()
    assert "train_step" in (run_dir / "logs" / "rank0.stack.txt").read_text()
    assert status(cluster, cache_dir, run_dir)["state"] == "failed"
    # Submitted again for the same run directory: attempts count on, as a local rerun's do.
    again = submit(cluster, cache_dir, run_dir, "trainer.max_steps=10", "launcher.nodes=2", "launcher.tasks_per_node=1")[0]
    assert wait_state(cluster, again, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=180) == "COMPLETED"
    assert json.loads((run_dir / "job.json").read_text())["attempts"] == 2


@pytest.mark.slow
def test_a_hugging_face_model_fine_tunes_on_two_nodes_as_it_does_locally(cluster, cache_dir: Path, tmp_path: Path) -> None:
    """model=hf_auto (a GPT-2 saved here by transformers) under fsdp, one rank on each node: the
    job reads the model directory from the shared filesystem and computes the local run's losses."""
    from test_hf_auto import save

    save("gpt2", tmp_path / "hf")
    model = ["model=hf_auto", f"model.path={tmp_path / 'hf'}", "strategy=fsdp", "trainer.max_steps=10"]
    job = submit(cluster, cache_dir, tmp_path / "slurm", *model, "launcher.nodes=2", "launcher.tasks_per_node=1")[0]
    local = fmtrain(["train", f"run_dir={tmp_path / 'local'}", *SMALL, *STEPS, *model, "launcher.nproc=2"], cache_dir)
    assert local.returncode == 0, local.stdout + local.stderr
    state = wait_state(cluster, job, ("COMPLETED", "FAILED", "CANCELLED"))
    assert state == "COMPLETED", (tmp_path / "slurm" / "job.json").read_text()
    assert train_losses(tmp_path / "slurm") == pytest.approx(train_losses(tmp_path / "local"), rel=1e-6)
    assert sorted(train_losses(tmp_path / "slurm")) == list(range(1, 11))
