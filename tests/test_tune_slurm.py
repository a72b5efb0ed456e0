"""fmtrain tune launcher=slurm: every trial a Slurm job on a real dev cluster, ASHA-stopped trials
cancelled in Slurm. Ray and Slurm share one loopback-only network namespace (Ray binds the machine's
external address otherwise), entered with nsenter so that slurmd keeps the host's cgroup mount."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ASHA_GRID, FMTRAIN, SLOW_TRIAL, env_with, pids_mentioning, ray_env

from bench.netns import loopback_namespace

pytestmark = pytest.mark.slow

CLUSTER = Path(__file__).resolve().parent.parent / "slurm" / "dev-cluster.sh"


@pytest.fixture(scope="module")
def slurm_in_netns(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path):
    """A 1-node Slurm cluster inside a namespace of its own: (command prefix, environment)."""
    home = tmp_path_factory.mktemp("slurm-tune")
    port = str(int(os.environ.get("FMTRAIN_TEST_SLURM_PORT", "17800")) + 100)
    env = env_with(cache_dir, FMTRAIN_SLURM_HOME=str(home), FMTRAIN_SLURM_PORT=port, SLURM_CONF=str(home / "etc" / "slurm.conf"))
    with loopback_namespace("tune-slurm") as name:
        prefix = ["nsenter", f"--net=/run/netns/{name}"]
        # glibc's getaddrinfo(AI_ADDRCONFIG) finds no IPv4 without an address besides 127.0.0.1, and
        # slurmdbd then cannot listen: a second address, on loopback.
        subprocess.run([*prefix, "ip", "addr", "add", "10.254.0.1/32", "dev", "lo"], check=True)
        try:
            up = subprocess.run(
                [*prefix, str(CLUSTER), "up", "--nodes", "1"], env=env, capture_output=True, text=True, timeout=300
            )
            assert up.returncode == 0, f"the dev cluster did not come up:\n{up.stdout}\n{up.stderr}"
            yield prefix, env
        finally:
            subprocess.run([*prefix, str(CLUSTER), "down"], env=env, capture_output=True, text=True, timeout=300)


def test_a_slurm_sweep_cancels_the_trials_asha_stops_and_completes(slurm_in_netns, ray_tmp: Path, tmp_path: Path) -> None:
    prefix, slurm_env = slurm_in_netns
    env = ray_env(Path(slurm_env["FMTRAIN_CACHE"]), ray_tmp) | {
        k: v for k, v in slurm_env.items() if k.startswith(("SLURM", "FMTRAIN"))
    }
    sweep = tmp_path / "sweep"
    args = [*prefix, FMTRAIN, "tune", f"run_dir={sweep}", "launcher=slurm", *SLOW_TRIAL, *ASHA_GRID]
    args += ['+tune.space.optim.lr="grid([0.003, 0.00001, 0.00002])"']
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    with open(sweep / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and float(rows[0]["optim.lr"]) == 0.003
    assert (rows[0]["status"], rows[0]["steps"]) == ("completed", "100")
    assert [r["status"] for r in rows[1:]] == ["stopped early"] * 2 and {r["steps"] for r in rows[1:]} == {"20"}
    assert "optim.lr: 0.003" in (sweep / "best_overrides.yaml").read_text()

    def accounting(run_dir: str) -> str:
        job_id = json.loads((Path(run_dir) / "job.json").read_text())["job_id"]
        out = subprocess.run(
            [*prefix, "sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"], env=env, capture_output=True, text=True
        )
        return out.stdout.split()[0] if out.stdout.split() else ""

    assert accounting(rows[0]["run_dir"]) == "COMPLETED"
    for row in rows[1:]:
        assert accounting(row["run_dir"]) == "CANCELLED", row  # "CANCELLED by 0" is "CANCELLED" in -P output's first word
        note = json.loads((Path(row["run_dir"]) / "cancelled.json").read_text())
        assert note["stopped_at_step"] == 20
    deadline = time.monotonic() + 60  # a cancelled job saves before it exits
    while pids_mentioning(sweep):
        assert time.monotonic() < deadline, "processes of the sweep's jobs are still running"
        time.sleep(0.5)
