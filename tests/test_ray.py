"""launcher=ray against a real local Ray, started by the run itself, inside a loopback-only network
namespace (Ray otherwise binds the machine's external address). Never skipped: a machine that cannot
create the namespace (CI runs as root) fails these tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import FMTRAIN, LAUNCHER_STEPS, SMALL, fmtrain, local_losses, pids_mentioning, ray_env, train_losses

pytestmark = pytest.mark.slow

STEPS = LAUNCHER_STEPS


def ray_train(
    netns: list[str], cache: Path, ray_tmp: Path, run_dir: Path, *overrides: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    args = [*netns, FMTRAIN, "train", "launcher=ray", f"run_dir={run_dir}", *SMALL, *STEPS, "trainer.progress=false", *overrides]
    environ = ray_env(cache, ray_tmp) | (env or {})
    return subprocess.Popen(args, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_ray_workers_equal_the_local_launcher_and_a_killed_one_resumes_from_the_last_checkpoint(
    netns, ray_tmp: Path, cache_dir: Path, tmp_path: Path, reference_run
) -> None:
    """Ray Train's gloo group runs the ranks and data of the local 2-process run, at nice 0: equal numbers,
    also when a worker is killed after the step-10 checkpoint and the group restarts from it. Each step is
    0.5 s longer (FMTRAIN_STEP_DELAY_S, asleep), so that the kill lands before the run ends on any machine."""
    run_dir = tmp_path / "ray"
    job = ray_train(
        netns, cache_dir, ray_tmp, run_dir, "trainer.max_steps=20", "launcher.num_workers=2", "launcher.max_failures=1",
        env={"FMTRAIN_STEP_DELAY_S": "0.5"},
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while not (run_dir / "metrics.jsonl").is_file() or len(train_losses(run_dir)) < 12:
        assert time.monotonic() < deadline and job.poll() is None, "the run did not get past step 12"
        time.sleep(0.2)
    pid = int(re.findall(r"rank1 pid (\d+)", (run_dir / "logs" / "rank1.log").read_text())[-1])
    assert os.getpriority(os.PRIO_PROCESS, pid) == 0, "a rank runs at Ray's worker niceness (15), not at 0"
    assert max(train_losses(run_dir)) < 20, "the run ended before the kill: nothing would be resumed"
    os.kill(pid, signal.SIGKILL)
    reference = local_losses(reference_run, 20)
    output, _ = job.communicate(timeout=400)
    assert job.returncode == 0, output
    assert train_losses(run_dir) == pytest.approx(reference, rel=1e-6)
    assert "resumed from" in (run_dir / "logs" / "rank0.log").read_text()
    assert '"launcher": "ray"' in (run_dir / "job.json").read_text()
    assert "runs at nice" not in (run_dir / "logs" / "rank1.log").read_text()


def test_more_workers_than_the_cluster_has_cpus_is_refused(netns, ray_tmp: Path, cache_dir: Path, tmp_path: Path) -> None:
    job = ray_train(netns, cache_dir, ray_tmp, tmp_path / "ray", "launcher.num_workers=8")
    output, _ = job.communicate(timeout=120)
    assert job.returncode == 2, output
    assert re.search(r"launcher.num_workers=8 is invalid: 8 x 1 CPU = 8 CPU, but the Ray cluster has \d+", output), output


def test_a_two_node_dev_cluster_runs_a_job_on_both_nodes_and_goes_down_by_pid(
    cache_dir: Path, ray_tmp: Path, tmp_path: Path, reference_run
) -> None:
    """ray-cluster/dev-cluster.sh: a head and a node on 127.0.0.2, 1 CPU each, in their own namespace."""
    script = Path(__file__).resolve().parent.parent / "ray-cluster" / "dev-cluster.sh"
    namespace = f"fmtrain-raydev-{os.getpid()}"
    env = ray_env(cache_dir, ray_tmp) | {"FMTRAIN_RAY_HOME": str(tmp_path / "state"), "FMTRAIN_RAY_PORT": "6391"}
    env["RAY"] = str(Path(FMTRAIN).parent / "ray")  # the ray command beside this environment's fmtrain
    up = subprocess.run(
        [str(script), "up", "--nodes", "2", "--cpus", "1", "--netns", namespace], env=env, capture_output=True, text=True
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        run_dir = tmp_path / "run"
        args = ["ip", "netns", "exec", namespace, FMTRAIN, "train", "launcher=ray", "launcher.address=127.0.0.1:6391"]
        args += [f"run_dir={run_dir}", *SMALL, *STEPS, "trainer.max_steps=20", "launcher.num_workers=2"]
        job = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        # One worker per 1-CPU node: ranks on two emulated nodes (each rank logs the node Ray Train placed it
        # on), and still the local run's numbers.
        logs = [(run_dir / "logs" / f"rank{rank}.log").read_text() for rank in (0, 1)]
        nodes = [re.search(rf"rank {rank} of 2: node (\d+) ", log) for rank, log in enumerate(logs)]
        assert sorted(int(node.group(1)) for node in nodes if node) == [0, 1], logs
        assert train_losses(run_dir) == pytest.approx(local_losses(reference_run, 20), rel=1e-6)
    finally:
        down = subprocess.run([str(script), "down"], env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr
    state_tmp = (tmp_path / "state" / "tmp").read_text().strip()
    leftovers = pids_mentioning(state_tmp)
    assert leftovers == [], "processes of the dev cluster are still running"
    assert namespace not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_a_ray_jobs_submission_returns_an_id_that_status_logs_and_cancel_work_on(
    cache_dir: Path, ray_tmp: Path, tmp_path: Path
) -> None:
    """launcher.submit=jobs against a dev cluster with a dashboard: the submission returns at once
    with an id; status and logs follow it to the end; cancel stops a second job and its workers."""
    script = Path(__file__).resolve().parent.parent / "ray-cluster" / "dev-cluster.sh"
    namespace = f"fmtrain-rayjobs-{os.getpid()}"
    dashboard = "http://127.0.0.1:8276"
    env = ray_env(cache_dir, ray_tmp) | {"FMTRAIN_RAY_HOME": str(tmp_path / "state"), "FMTRAIN_RAY_PORT": "6392"}
    env |= {"RAY": str(Path(FMTRAIN).parent / "ray"), "RAY_ADDRESS": dashboard}
    up = subprocess.run(
        [str(script), "up", "--cpus", "2", "--netns", namespace, "--dashboard", "8276"], env=env, capture_output=True, text=True
    )

    def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", namespace, FMTRAIN, *args], env=env, capture_output=True, text=True, timeout=timeout
        )

    def submit(run_dir: Path, steps: int) -> str:
        result = cli("train", "launcher=ray", "launcher.submit=jobs", f"launcher.address={dashboard}", f"run_dir={run_dir}",
                     *SMALL, *STEPS, f"trainer.max_steps={steps}", "trainer.progress=false")  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        job_id, printed_dir = result.stdout.strip().splitlines()[-1].split("\t")
        assert printed_dir == str(run_dir) and re.fullmatch(r"fmtrain-\d{8}-\d{6}-[0-9a-f]{6}", job_id), result.stdout
        # The submission returned before its job ended (Ray Train alone takes ~30 s to start the workers): no clock.
        assert not (run_dir / "result.json").exists(), "the submission waited for the job"
        return job_id

    def status(job_id: str) -> dict:
        result = cli("status", job_id)
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)

    try:
        assert up.returncode == 0, up.stdout + up.stderr
        run_dir = tmp_path / "done"
        job_id = submit(run_dir, 20)
        deadline = time.monotonic() + 300
        while (summary := status(job_id))["scheduler_state"] in ("PENDING", "RUNNING"):
            assert time.monotonic() < deadline, summary
            time.sleep(5)  # each status is a fresh fmtrain process in the namespace (~1.4 CPU-s)
        assert (summary["state"], summary["scheduler_state"], summary["step"]) == ("completed", "SUCCEEDED", 20), summary
        assert summary["run_dir"] == str(run_dir) and summary["job_id"] == job_id
        assert len(train_losses(run_dir)) == 20 and json.loads((run_dir / "result.json").read_text())["status"] == "completed"
        log = cli("logs", job_id)
        assert log.returncode == 0 and f"completed: {run_dir}" in log.stdout, log.stdout + log.stderr
        assert "rank1 pid" in (rank1 := cli("logs", str(run_dir), "--rank", "1").stdout) and "step 20: val_loss" in rank1

        run_dir = tmp_path / "cancelled"
        job_id = submit(run_dir, 5000)
        deadline = time.monotonic() + 180
        while not (run_dir / "metrics.jsonl").is_file() or len(train_losses(run_dir)) < 3:
            assert time.monotonic() < deadline, status(job_id)
            time.sleep(0.5)
        ranks = [int(re.findall(r"rank\d pid (\d+)", (run_dir / "logs" / f"rank{r}.log").read_text())[0]) for r in (0, 1)]
        assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in ranks] == [0, 0], "ranks at Ray's worker niceness"
        cancelled = cli("cancel", job_id)
        assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
        summary = status(job_id)
        assert (summary["state"], summary["scheduler_state"]) == ("stopped", "STOPPED"), summary
        assert summary["step"] < 5000
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() for pid in ranks):
            assert time.monotonic() < deadline, "the cancelled job's workers are still running"
            time.sleep(0.5)

        unknown = cli("status", "fmtrain-20000101-000000-abcdef")
        assert unknown.returncode == 2 and "is neither a run directory (no job.json) nor a Ray job" in unknown.stderr
    finally:
        down = subprocess.run([str(script), "down"], env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr
    assert pids_mentioning((tmp_path / "state" / "tmp").read_text().strip()) == []


def test_a_hugging_face_model_fine_tunes_on_two_ray_workers_as_it_does_locally(
    netns, ray_tmp: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """model=hf (a Llama saved here by transformers, fmtrain's decoder) under fsdp on two Ray workers."""
    from test_pretrained import ARCHS, save_hf

    save_hf(ARCHS["llama-gqa-untied"], tmp_path / "hf")
    model = ["model=hf", f"model.path={tmp_path / 'hf'}", "strategy=fsdp", "trainer.max_steps=10"]
    job = ray_train(netns, cache_dir, ray_tmp, tmp_path / "ray", *model, "launcher.num_workers=2")
    local = fmtrain(["train", f"run_dir={tmp_path / 'local'}", *SMALL, *STEPS, *model, "launcher.nproc=2"], cache_dir)
    assert local.returncode == 0, local.stdout + local.stderr
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 0, output
    assert train_losses(tmp_path / "ray") == pytest.approx(train_losses(tmp_path / "local"), rel=1e-6)
    assert sorted(train_losses(tmp_path / "ray")) == list(range(1, 11))
