"""trainer.compile: true and false as asked; auto compiles a GPU or CPU run long enough to pay for it.

The cases are decided from numbers alone (a set ``trainer.peak_flops``): nothing runs on a GPU."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import spawn_ranks

from fmtrain import hardware, models
from fmtrain.distributed import DistEnv
from fmtrain.hardware import COMPILE_PIN
from fmtrain.models.custom import CustomSpec
from fmtrain.models.hf_auto import HFAutoSpec
from fmtrain.step import COMPILE_PAYS_AFTER_S, EAGER_MFU, resolve_compile
from launch.compose import UsageError, compose

PEAK = 1e12


def decide(*overrides: str, spec=None, device: str = "cuda") -> tuple[bool, str]:
    cfg = compose([f"trainer.peak_flops={PEAK}", *overrides])
    recipe = models.recipe(cfg)
    flops_per_token = recipe.sizes(cfg.data.seq_len)[1]
    return resolve_compile(cfg, spec or recipe.spec, DistEnv(), torch.device(device), flops_per_token)


def steps_to_pay() -> float:
    """The max_steps at which the default model's estimate reaches COMPILE_PAYS_AFTER_S."""
    cfg = compose([])
    flops_per_token = models.recipe(cfg).sizes(cfg.data.seq_len)[1]
    tokens = cfg.trainer.global_batch_size * cfg.data.seq_len
    return COMPILE_PAYS_AFTER_S * EAGER_MFU * PEAK / (tokens * flops_per_token)


@pytest.fixture
def unpinned(monkeypatch):
    monkeypatch.delenv(COMPILE_PIN, raising=False)


@pytest.mark.parametrize("asked", ["true", "false"])
@pytest.mark.parametrize("steps", [1, 10**9])
def test_an_explicit_choice_is_kept_whatever_the_length(asked, steps, unpinned, monkeypatch) -> None:
    assert decide(f"trainer.compile={asked}", f"trainer.max_steps={steps}") == (asked == "true", f"trainer.compile={asked}")
    monkeypatch.setenv(COMPILE_PIN, "false" if asked == "true" else "true")  # the pin is for auto only
    assert decide(f"trainer.compile={asked}", f"trainer.max_steps={steps}")[0] == (asked == "true")


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_auto_compiles_from_the_estimated_compute_on(device, unpinned) -> None:
    at = steps_to_pay()
    below, above = math.floor(at), math.ceil(at) + 1
    assert below > 120, "at 1 TFLOP/s, the default run's 120 steps stay eager"
    compiled, why = decide(f"trainer.max_steps={below}", device=device)
    assert not compiled
    assert why.startswith(f"trainer.compile=auto: {below} steps estimated at ") and "under the 10 min" in why, why
    compiled, why = decide(f"trainer.max_steps={above}", device=device)
    assert compiled and why.endswith("long enough for compiling to pay"), why
    assert "of 1e+12 FLOP/s" in why, why


def test_auto_stays_eager_on_a_cpu_where_torch_compile_fails(unpinned, monkeypatch) -> None:
    """inductor builds a CPU graph's kernels with a C++ compiler: this machine compiles the probe (the
    suite's compiled tests need it too); where it fails, a run long enough to pay stays eager and says why."""
    import torch._dynamo
    import torch._inductor.config

    assert hardware.cpu_compile_problem() is None
    torch._dynamo.reset()  # compile the probe again, not from this process's cache or the disk's, and with no compiler
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, "/nonexistent/c++"))
    problem = hardware.cpu_compile_problem()
    torch._dynamo.reset()
    assert problem and problem.startswith("InductorError: InvalidCxxCompiler: No working C++ compiler found"), problem
    monkeypatch.setattr(hardware, "cpu_compile_problem", lambda: problem)
    compiled, why = decide(f"trainer.max_steps={math.ceil(steps_to_pay()) + 1}", device="cpu")
    assert not compiled
    assert why.endswith(f"long enough to pay, but torch.compile fails on CPU (this rank cannot: {problem}): eager"), why
    assert decide("trainer.max_steps=1000000000", device="cuda")[0], "a GPU's kernels need no C++ compiler"
    assert decide("trainer.compile=true", device="cpu") == (True, "trainer.compile=true")


def test_auto_stays_eager_on_other_devices(unpinned) -> None:
    compiled, why = decide("trainer.max_steps=1000000000", device="meta")
    assert not compiled
    assert why == "trainer.compile=auto: eager on meta, where compiling is not measured; trainer.compile=true compiles"


@pytest.mark.parametrize("spec", [HFAutoSpec(), CustomSpec()], ids=["hf_auto", "custom"])
def test_auto_leaves_architectures_that_do_not_declare_clean_compiles_eager(spec, unpinned) -> None:
    assert not spec.compiles
    compiled, why = decide("trainer.max_steps=1000000000", spec=spec)
    assert not compiled and why == "trainer.compile=auto: model.arch=llama compiles only with trainer.compile=true"
    assert decide("trainer.max_steps=1000000000", "trainer.compile=true", spec=spec)[0]


@pytest.mark.parametrize("pinned", ["true", "false"])
def test_the_pin_decides_auto(pinned, monkeypatch) -> None:
    monkeypatch.setenv(COMPILE_PIN, pinned)
    assert decide("trainer.max_steps=1") == (pinned == "true", "trainer.compile=auto, pinned by $FMTRAIN_COMPILE_AUTO")


def test_a_bad_pin_or_value_is_refused_naming_it(monkeypatch) -> None:
    monkeypatch.setenv(COMPILE_PIN, "yes")
    with pytest.raises(UsageError, match=r"\$FMTRAIN_COMPILE_AUTO='yes' is invalid: pins what trainer.compile=auto means"):
        compose([])  # before launch
    monkeypatch.delenv(COMPILE_PIN)
    with pytest.raises(UsageError, match=r"trainer.compile='sometimes' is invalid: valid choices are auto, true, false"):
        compose(["trainer.compile=sometimes"])


@pytest.mark.parametrize(("given", "kept"), [("true", "true"), ("True", "true"), ("false", "false"), ("auto", "auto")])
def test_one_spelling(given, kept) -> None:
    assert compose([f"trainer.compile={given}"]).trainer.compile == kept


def _decide_as_rank(rank: int, result: Any) -> None:
    """One of 2 CPU ranks deciding trainer.compile=auto for a run long enough to pay, where only rank 1
    cannot compile (and rank 0 is not made to try)."""
    import os

    from fmtrain import hardware

    os.environ.pop(COMPILE_PIN, None)
    env = DistEnv.from_environ()
    device = env.init("cpu")
    hardware.cpu_compile_problem = lambda: None if rank == 0 else "InductorError: ..."  # type: ignore[assignment]
    cfg = compose([f"trainer.peak_flops={PEAK}", f"trainer.max_steps={math.ceil(steps_to_pay()) + 1}", "launcher.nproc=2"])
    recipe = models.recipe(cfg)
    compiled, why = resolve_compile(cfg, recipe.spec, env, device, recipe.sizes(cfg.data.seq_len)[1])
    result[rank] = (compiled, why[why.rindex("(") + 1 : why.rindex(")")])
    torch.distributed.barrier()
    env.close()


def test_cpu_ranks_compile_only_if_every_one_can() -> None:
    """A rank that cannot compile leaves every rank eager (none leaves the agreement's all-reduce early)."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        result = manager.dict()
        spawn_ranks(_decide_as_rank, 2, result)
        assert dict(result) == {0: (False, "another rank cannot"), 1: (False, "this rank cannot: InductorError: ...")}
