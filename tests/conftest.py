"""Shared helpers: run the real ``fmtrain`` CLI in a subprocess, read what a run wrote."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import budget
import pytest

from bench.netns import loopback_namespace, run_in

FMTRAIN = str(Path(sys.executable).parent / "fmtrain")

# precision=auto (the default) trains in bf16 where the CPU multiplies bf16 natively: the suite's
# reference numbers (1e-5 across strategies and world sizes) are fp32's on every machine. Every run
# it starts inherits this; test_hardware unsets it to test what auto chooses.
os.environ["FMTRAIN_PRECISION_AUTO"] = "fp32"
# trainer.compile=auto compiles a run whose estimated compute is long enough, an estimate that moves
# with the machine: the suite's runs are eager unless a test asks (test_compile unsets it to test auto).
os.environ["FMTRAIN_COMPILE_AUTO"] = "false"

# A model and batch small enough that a multi-process run takes seconds on 2 CPU cores.
SMALL = [
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "data.seq_len=64",
    "data.max_bytes=3000000",
    "trainer.global_batch_size=8",
    "trainer.eval_batches=2",
    "trainer.peak_flops=1e12",
    "trainer.plot=false",
]

# Steps of ~0.1 s (SMALL's take ~0.02 s). A sweep's trial of them: a trial's run that trains outside Ray Tune
# (N local ranks, a Slurm job) is still running when the scheduler stops the trial at its first evaluation
# (step 20: 80 steps, 8 s or more, before it would end by itself).
SLOWER = [
    "model.dim=128",
    "model.n_layers=2",
    "model.n_heads=4",
    "data.seq_len=128",
    "data.max_bytes=3000000",
    "trainer.global_batch_size=16",
]
SLOW_TRIAL = [
    *SLOWER,
    "trainer.eval_batches=2",
    "trainer.plot=false",
    "trainer.max_steps=100",
    "trainer.eval_interval=20",
    "checkpoint.interval=20",
]
# The good learning rate first, one trial at a time: ASHA then stops each worse one at its first evaluation.
ASHA_GRID = ["tune=asha", "tune.search=grid", "tune.num_samples=1", "tune.max_concurrent=1"]


# Markers follow from the fixtures a test uses, so they cannot drift: `make test-fast` deselects them
# (a user without root, Slurm or Ray runs the rest).
MARKERS_OF_FIXTURES = {
    "cluster": ("slurm", "root"),
    "slurm_in_netns": ("slurm", "root"),
    "netns": ("root",),
    "tmpfs": ("root",),
    "ray_tmp": ("ray",),
}


@pytest.hookimpl(tryfirst=True)  # before the mark plugin deselects by them (make test-fast)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture in getattr(item, "fixturenames", ()):
            for marker in MARKERS_OF_FIXTURES.get(fixture, ()):
                item.add_marker(marker)
        path, fixture = item.nodeid.split("::")[0], shared_fixture(item)
        if not waits(item.nodeid) and any(item.get_closest_marker(m) for m in ("slurm", "ray")):
            raise pytest.UsageError(f"{item.nodeid} is marked slurm or ray: add {path} to WAITING_FILES")
        if fixture and path not in WHOLE_FILES and f"{path}::{fixture}" not in MADE_PER_WORKER:
            raise pytest.UsageError(
                f"{item.nodeid} uses the module-scoped fixture {fixture}: add {path} to WHOLE_FILES, or "
                f"{path}::{fixture} to MADE_PER_WORKER if making it once per worker is cheap and safe"
            )


# `make test` runs the suite on pytest-xdist workers, a test at a time to whichever worker is free, except
# these files' tests: they share a module-scoped fixture that must exist once (a Slurm cluster on fixed
# ports) or takes long to make (runs made once and read by many tests), so each file goes whole to one
# worker. (xdist's own --dist loadgroup groups nothing under pytest 9.2: pytest-dev/pytest-xdist#1386.)
WHOLE_FILES = {
    "tests/test_layering.py",
    "tests/test_model_seam.py",
    "tests/test_slurm.py",
    "tests/test_strategies.py",
    "tests/test_tune_slurm.py",
}
# Module-scoped fixtures made in seconds, in folders of their own: a worker that runs a test using one makes it.
MADE_PER_WORKER = {
    "tests/test_compat.py::zero",
    "tests/test_examples.py::folder",
    "tests/test_sources.py::bpe",
    "tests/test_train.py::reference",
}


def shared_fixture(item: pytest.Item) -> str | None:
    """The first module-, class- or package-scoped fixture ``item`` uses, if any."""
    info = getattr(item, "_fixtureinfo", None)
    for name in getattr(item, "fixturenames", ()):
        for fixturedef in info.name2fixturedefs.get(name, ()) if info else ():
            if fixturedef.scope in ("module", "class", "package"):
                return name
    return None


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    workers = int(config.getvalue("numprocesses") or 0)

    class ByTestOrSharedFile(LoadScopeScheduling):
        """Each worker takes the kind of test its role says while there are any (:func:`worker_kinds`): the
        Slurm tests and the Ray tests, which mostly wait, each on a worker of its own, beside workers that
        take the tests that compute; a worker whose kind has run out takes another, so none idles."""

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::")[0]
            return path if path in WHOLE_FILES else nodeid

        def _assign_work_unit(self, node: Any) -> None:
            kinds = worker_kinds(int(node.gateway.id.removeprefix("gw")), workers)
            for scope in self.workqueue:  # the collection's order: the longest first
                if kind_of(scope) in kinds:
                    self.workqueue.move_to_end(scope, last=False)
                    break
            super()._assign_work_unit(node)

    return ByTestOrSharedFile(config, log)


# Files whose tests spend most of their time waiting (on a Slurm cluster's daemons and time limits, on Ray's
# processes), by what they wait on: a worker of their own runs each kind, one test after another, beside workers
# that run the tests that compute. Every test marked slurm or ray must be in one (checked at collection).
WAITING_FILES = {
    "tests/test_slurm.py": "slurm",
    "tests/test_tune_slurm.py": "slurm",
    "tests/test_ray.py": "ray",
    "tests/test_tune.py": "ray",
}


def kind_of(nodeid: str) -> str:
    """What a test (or a scheduler's scope: a test or a whole file) mostly does: wait on slurm or ray, or compute."""
    return WAITING_FILES.get(nodeid.split("::")[0], "compute")


def waits(nodeid: str) -> bool:
    """Whether a test (or a scheduler's scope) is in WAITING_FILES."""
    return kind_of(nodeid) != "compute"


def worker_kinds(index: int, workers: int) -> tuple[str, ...]:
    """The kinds of test worker ``gw<index>`` of ``workers`` takes first: with 4 or more (make test: 4), the
    first waits on Slurm, the second on Ray, the others compute; with 3, the first waits on both; with fewer, any."""
    if workers >= 4:
        return ("slurm",) if index == 0 else ("ray",) if index == 1 else ("compute",)
    if workers == 3:
        return ("slurm", "ray") if index == 0 else ("compute",)
    return ("slurm", "ray", "compute")


class LongestFirst:
    """On pytest-xdist workers, the tests that take longest (Slurm jobs, Ray clusters, multi-process runs)
    come first in the collection, the order the workers take each kind in: the workers then end together,
    not one waiting out a Slurm test that came last. A whole file's tests stay together."""

    RANK: ClassVar[dict[str, int]] = {"slurm": 0, "ray": 1, "slow": 2}

    @pytest.hookimpl(trylast=True)  # after pytest's own ordering by fixture scope
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        def rank(item: pytest.Item) -> tuple[int, bool]:  # of each kind, the tests listed as slow first
            kind = min((self.RANK.get(m.name, 3) for m in item.iter_markers()), default=3)
            return kind, not budget.listed(item.nodeid, budget.SLOW_TESTS)

        items.sort(key=rank)


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        config.pluginmanager.register(LongestFirst())
    else:  # the process that sees every test's report: pytest's own, or xdist's controller
        config.pluginmanager.register(budget.Budget(budget.SLOW_TESTS, budget.machine_limit_s()))
        config.pluginmanager.register(TreeUnchanged())


class TreeUnchanged:
    """The suite leaves the working tree as it found it: a file a test writes into the checkout (a Slurm
    job's output, a run directory under outputs/) fails the run, named. Ignored paths (.venv, .cache) are
    not looked at: ``git status --porcelain``, before and after."""

    def __init__(self) -> None:
        self.before = self.status()

    @staticmethod
    def status() -> set[str]:
        root = Path(__file__).resolve().parent.parent
        found = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all"], cwd=root, capture_output=True, text=True
        )
        return set(found.stdout.splitlines()) if found.returncode == 0 else set()

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        self.changed = sorted(self.status() - self.before)
        if self.changed and exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if getattr(self, "changed", None):
            terminalreporter.section("the suite changed the working tree", red=True)
            for line in self.changed:
                terminalreporter.write_line(f"{line}  (a test must write under its tmp_path, never into the checkout)", red=True)


# A test process computes on one OpenMP thread (make test's 4 workers on 2 cores get that share anyway): the
# commands and ranks forked from it (conftest's cli, launcher.start=auto) inherit its OpenMP runtime, and
# libgomp's thread pool does not survive fork: a rank forked from a process that had computed on 2 threads
# hung in its first parallel region when it used 2 (seen with -p no:xdist, one file run alone).
os.environ.setdefault("OMP_NUM_THREADS", "1")


# Tests whose outcome depends on this machine's hardware say which branch they took; the summary lists them.
HARDWARE_BRANCHES: list[str] = []


@pytest.fixture
def hardware_branch(request: pytest.FixtureRequest) -> Any:
    """``hardware_branch("refused: ...")``: record which behaviour this machine called for (in the test's
    report, which reaches the main process from a pytest-xdist worker)."""
    return lambda branch: request.node.user_properties.append(("hardware_branch", branch))


# Where the suite's time goes, by kind of test: seconds of wall time, and of CPU time in the test's process
# and the processes it waited for (a Slurm or Ray daemon's are not counted). The summary prints them.
TIME_BY_KIND: dict[str, list[float]] = {}
STARTED = pytest.StashKey[tuple[float, float]]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[STARTED] = (time.monotonic(), cpu_seconds())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    if call.when == "setup":  # a shared fixture's making shows here, in the first test that uses it
        item.user_properties.append(("setup_s", round(call.duration, 2)))
    if call.when == "teardown" and STARTED in item.stash:  # the test's last report carries its cost
        wall, cpu = item.stash[STARTED]
        item.user_properties.append(("cost", (time.monotonic() - wall, cpu_seconds() - cpu)))
    return (yield)


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":
        HARDWARE_BRANCHES.extend(f"{report.nodeid}: {v}" for name, v in report.user_properties if name == "hardware_branch")
    for wall, cpu in (value for name, value in report.user_properties if name == "cost"):
        kind = {"slurm": "waiting on Slurm", "ray": "waiting on Ray"}.get(kind_of(report.nodeid), "computing")
        totals = TIME_BY_KIND.setdefault(kind, [0, 0.0, 0.0])
        totals[0], totals[1], totals[2] = totals[0] + 1, totals[1] + wall, totals[2] + cpu


@pytest.hookimpl(trylast=True)  # after the slowest durations, the end of the log that CI shows
def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TIME_BY_KIND:
        terminalreporter.section("test time by kind")
        for kind, (tests, wall, cpu) in sorted(TIME_BY_KIND.items()):
            terminalreporter.write_line(f"{kind}: {tests:.0f} tests, {wall:,.0f} s of wall time, {cpu:,.0f} s of CPU")
    if HARDWARE_BRANCHES:
        from fmtrain.hardware import probe

        terminalreporter.section("hardware-dependent tests: the branch each took")
        terminalreporter.write_line(f"this machine: {probe('cpu').describe()}")
        for line in HARDWARE_BRANCHES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenized-data cache for the session (CI may point FMTRAIN_CACHE at a kept folder)."""
    return Path(os.environ.get("FMTRAIN_CACHE") or tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def made_once(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``made_once(name, make)``: the folder ``make(folder)`` fills, made once for the whole test session, by
    whichever pytest-xdist worker asks first while the others wait for it (a file lock): reference runs and
    model directories that tests in several files compare with or read. Tests only read what it returns."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "made-once"
    root.mkdir(exist_ok=True)

    def get(name: str, make: Any) -> Path:
        folder = root / name
        with open(root / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (root / f"{name}.done").exists():
                shutil.rmtree(folder, ignore_errors=True)  # what a worker that failed half-way left
                folder.mkdir()
                make(folder)
                (root / f"{name}.done").touch()
        return folder

    return get


@pytest.fixture(scope="session")
def reference_run(made_once: Any, cache_dir: Path) -> Any:
    """``reference_run(*overrides)``: the run directory of ``fmtrain train *overrides`` run to its end, once
    for the session whichever tests ask for it (the same overrides in the same order)."""
    import hashlib

    def get(*overrides: str) -> Path:
        def train(run_dir: Path) -> None:
            result = fmtrain(["train", f"run_dir={run_dir}", *overrides], cache_dir)
            assert result.returncode == 0, result.stdout + result.stderr

        return made_once("run-" + hashlib.sha256("\0".join(overrides).encode()).hexdigest()[:16], train)

    return get


# What a run on a Slurm or Ray launcher is compared with: the same SMALL run on the local launcher.
LAUNCHER_STEPS = ["trainer.eval_interval=10", "checkpoint.interval=10", "checkpoint.keep_last=10"]


def local_losses(reference_run: Any, steps: int, nproc: int = 2) -> dict[int, float]:
    """Each step's loss of SMALL trained ``steps`` steps on ``nproc`` local ranks (one run for the session)."""
    return train_losses(reference_run(*SMALL, *LAUNCHER_STEPS, f"trainer.max_steps={steps}", f"launcher.nproc={nproc}"))


def env_with(cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, FMTRAIN_CACHE=str(cache), PYTHONUNBUFFERED="1")
    # FMTRAIN_INVOKED_AT: the CLI's start, set by main(); a test that called main() here must not pass its own on.
    for name in ("FMTRAIN_FAULT", "FMTRAIN_STEP_DELAY_S", "FMTRAIN_INVOKED_AT"):
        env.pop(name, None)
    env.update(extra)
    return env


def fmtrain(args: list[str], cache: Path, timeout: float = 300, **extra_env: str) -> subprocess.CompletedProcess[str]:
    """``fmtrain ARGS`` to its end: its exit code, stdout and stderr, run as :func:`cli` runs it."""
    return cli(args, env_with(cache, **extra_env), timeout)


def cli(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The ``fmtrain`` command's entry point (``launch.cli.entry``) with ``args`` and ``env``, in a fork of
    this process: a process of its own (its exit code, its output on fds 1 and 2, its environment, signals
    and globals; the ranks it launches are the real processes), without the 2 s a fresh interpreter spends
    importing torch and fmtrain. The tests of the command's own process boundary (signals to its process
    group, a closed pipe, ``nice``, the installed script) start the real ``fmtrain`` with :data:`FMTRAIN`."""
    return clis_at_once([args], env, timeout)[0]


@functools.cache
def preload_commands() -> None:
    """Once a test process: what the launcher imports before forking ranks (``fmtrain.worker`` and its
    :func:`~fmtrain.worker.preload`), and what rank 0 imports to write its metrics (TensorBoard's writer,
    matplotlib for loss.png, ~0.3 CPU-s): every command and rank forked from this process has them."""
    import matplotlib

    matplotlib.use("Agg")  # as fmtrain.metrics.plot_losses sets it
    import matplotlib.pyplot
    import torch.utils.tensorboard  # noqa: F401

    import fmtrain.worker
    from launch.compose import compose

    fmtrain.worker.preload()
    compose(["trainer.max_steps=1"])  # Hydra's override parser and config repository, warmed: ~0.2 CPU-s a command


def clis_at_once(commands: list[list[str]], env: dict[str, str], timeout: float = 300) -> list[subprocess.CompletedProcess[str]]:
    """:func:`cli` for each of ``commands``, all forked first (from this thread: a fork from another thread of a
    test process is not one a user's command starts as), each starting its command at the same moment (0.5 s
    from now, within a millisecond of the others), and each one's result."""
    preload_commands()
    start = time.monotonic() + (0.5 if len(commands) > 1 else 0.0)  # time for every fork to be made
    pids: list[int] = []
    results = []
    with contextlib.ExitStack() as files:
        outputs = [[files.enter_context(tempfile.TemporaryFile()) for _ in "oe"] for _ in commands]
        try:
            for args, (out, err) in zip(commands, outputs, strict=True):
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:  # the child: never returns into pytest
                    _run_cli(args, env, out.fileno(), err.fileno(), start)
                pids.append(pid)
            for index, (args, (out, err)) in enumerate(zip(commands, outputs, strict=True)):
                status = _wait(pids[index], max(1.0, start + timeout - time.monotonic()))
                pids[index] = 0
                out.seek(0)
                err.seek(0)
                code = os.waitstatus_to_exitcode(status)
                results.append(subprocess.CompletedProcess(["fmtrain", *args], code, out.read().decode(), err.read().decode()))
        finally:
            for pid in filter(None, pids):  # timed out: killed and reaped
                os.kill(pid, 9)
                os.waitpid(pid, 0)
    return results


def _run_cli(args: list[str], env: dict[str, str], out: int, err: int, start: float) -> None:
    """In the forked child: become the command, run it from ``start`` (monotonic) on, and exit with its code."""
    code = 1
    try:
        _become_cli(env, out, err)
        from launch.cli import importable_here, main

        importable_here()
        time.sleep(max(0.0, start - time.monotonic()))
        code = main(list(args))
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _become_cli(env: dict[str, str], out: int, err: int) -> None:
    """In a fork of a test process: what a fresh ``fmtrain`` process starts with: its own stdin, stdout and
    stderr and environment, then what a forked rank resets too (:func:`fmtrain.worker.fresh_process_state`:
    signal and log handlers, here pytest's, and unbuffered output), and pytest-timeout's alarm undone."""
    import signal

    import torch

    from fmtrain.worker import fresh_process_state

    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.environ.clear()
    os.environ.update(env)
    fresh_process_state()
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    torch.set_num_threads(1)  # this process's OpenMP threads are not the fork's: the command computes on one


def _wait(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(["fmtrain"], timeout)
        time.sleep(0.02)


def pids_mentioning(text: str | Path) -> list[int]:
    """PIDs of processes whose command line contains ``text`` (a run or Ray session folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(text).encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def write_source(kind: str, folder: Path, documents: list[str], tokenizer: Any = None) -> Path:
    """``documents`` as data=``kind`` reads them (one document each): a folder of text files, a jsonl,
    a parquet file, a saved ``datasets`` folder, or (tokens) nanoGPT's uint16 ``.bin`` of the ids
    ``tokenizer`` (fmtrain's, bytes by default) makes. Returns what data.paths names."""
    import json

    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    if kind == "text_files":
        for i, document in enumerate(documents):
            (folder / "text" / f"doc_{i:04d}.txt").parent.mkdir(exist_ok=True)
            (folder / "text" / f"doc_{i:04d}.txt").write_text(document)
        return folder / "text"
    if kind == "jsonl":
        path = folder / "docs.jsonl"
        path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(documents)))
        return path
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / "docs.parquet"
        pq.write_table(pa.table({"id": list(range(len(documents))), "text": documents}), path, row_group_size=7)
        return path
    if kind == "hf_disk":
        import datasets

        path = folder / "saved"
        datasets.Dataset.from_dict({"text": documents}).save_to_disk(str(path))
        return path
    if kind == "hf_files":  # data=hf_disk over a folder of data files, as the Hub lays them out, two splits
        half = len(documents) // 2
        for name, part in (("train-00000", documents[:half]), ("train-00001", documents[half:]), ("test", ["held out"])):
            (folder / "files" / f"{name}.jsonl").parent.mkdir(exist_ok=True)
            (folder / "files" / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
        return folder / "files"
    if kind == "hf_csv":  # data=hf_disk over one data file
        import csv

        path = folder / "docs.csv"
        with open(path, "w", newline="") as out:
            csv.writer(out).writerows([["text", "id"], *([d, i] for i, d in enumerate(documents))])
        return path
    if kind == "tokens":
        from fmtrain.tokenizer import Tokenizer

        ids = (tokenizer or Tokenizer()).encode([d.encode() for d in documents])
        path = folder / "train.bin"
        ids.astype(np.uint16).tofile(path)  # as nanoGPT's prepare.py writes them
        return path
    raise AssertionError(kind)


def killed_on_two_resumed_on_one(args: list[str], run_dir: Path, reference_dir: Path, cache: Path, steps: int, at: int) -> None:
    """``fmtrain train *args`` on 2 ranks to the end (``reference_dir``), and again (``run_dir``) SIGKILLed
    once step ``at``'s checkpoint is written, then resumed on 1 rank: every step's loss equals the reference's."""
    import signal
    import time

    from pytest import approx

    reference = fmtrain(["train", f"run_dir={reference_dir}", "launcher.nproc=2", *args], cache)
    assert reference.returncode == 0, reference.stderr
    process = subprocess.Popen(
        [FMTRAIN, "train", f"run_dir={run_dir}", "launcher.nproc=2", *args],
        env=env_with(cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    checkpoint, deadline = run_dir / "checkpoints" / f"step_{at:06d}", time.monotonic() + 120
    while not checkpoint.exists():
        assert process.poll() is None, f"the run ended before {checkpoint} appeared:\n{process.stdout.read()}"  # type: ignore[union-attr]
        assert time.monotonic() < deadline, f"{checkpoint} did not appear"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert max(train_losses(run_dir)) < steps, "the kill must land mid-run"
    resumed = fmtrain(["train", f"run_dir={run_dir}", "launcher.nproc=1", *args], cache)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout + resumed.stderr, resumed.stderr
    want, got = train_losses(reference_dir), train_losses(run_dir)
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    for step, loss in want.items():
        assert got[step] == approx(loss, rel=1e-5), step


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The command's refusal: exit 2, one line on stderr, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stdout + result.stderr
    return lines[0]


@pytest.fixture
def tmpfs(tmp_path: Path):
    """A small file system of its own (root): ``mount(size_mb)`` mounts it, ``remount(options)``
    changes it; unmounted afterwards."""
    point = tmp_path / "fs"
    point.mkdir()

    class Mount:
        def mount(self, size_mb: int) -> Path:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(point)], check=True)
            return point

        def remount(self, options: str) -> None:
            subprocess.run(["mount", "-o", f"remount,{options}", str(point)], check=True)

    yield Mount()
    subprocess.run(["umount", "-l", str(point)], check=False)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def final_state(checkpoint: Path) -> dict:
    """A DCP checkpoint's model and optimizer state, loaded into one plain process."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = checkpoint.parent / f"{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint / "model_optim", out)
    return torch.load(out, weights_only=True)


# ----------------------------------------------------------------------------- Ray


@pytest.fixture(scope="session")
def netns():
    """A network namespace with only loopback, deleted afterwards: the command prefix to run in it."""
    with loopback_namespace("test") as name:
        yield run_in(name)


@pytest.fixture
def ray_tmp():
    """Ray's session folder: short (its socket paths must stay under 108 bytes), removed afterwards."""
    path = tempfile.mkdtemp(prefix="fmray-", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def ray_env(cache: Path, ray_tmp: Path) -> dict[str, str]:
    return env_with(
        cache,
        RAY_TMPDIR=str(ray_tmp),
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="30",
    )


def _as_rank(rank: int, world: int, port: int, fn: Any, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    fn(rank, *args)


def spawn_ranks(fn: Any, world: int, *args: Any) -> None:
    """Run ``fn(rank, *args)`` in ``world`` fresh processes with the environment a launcher gives its
    ranks (rendezvous on a free loopback port); raises if any of them fails."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_as_rank, args=(world, port, fn, args), nprocs=world, join=True)
