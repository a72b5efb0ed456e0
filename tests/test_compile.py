"""trainer.compile: true and false as asked; auto compiles only a GPU run long enough to pay for it.

The GPU cases are decided from numbers alone (a set ``trainer.peak_flops``): nothing runs on the GPU."""

from __future__ import annotations

import math

import pytest
import torch

from fmtrain import models
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


def test_auto_compiles_from_the_estimated_compute_on(unpinned) -> None:
    at = steps_to_pay()
    below, above = math.floor(at), math.ceil(at) + 1
    assert below > 120, "at 1 TFLOP/s, the default run's 120 steps stay eager"
    compiled, why = decide(f"trainer.max_steps={below}")
    assert not compiled
    assert why.startswith(f"trainer.compile=auto: {below} steps estimated at ") and "under the 10 min" in why, why
    compiled, why = decide(f"trainer.max_steps={above}")
    assert compiled and why.endswith("long enough for compiling to pay"), why
    assert "of 1e+12 FLOP/s" in why, why


def test_auto_stays_eager_on_a_cpu_however_long_the_run(unpinned) -> None:
    for steps in (1, 10**9):
        compiled, why = decide(f"trainer.max_steps={steps}", device="cpu")
        assert not compiled
        assert why == "trainer.compile=auto: eager on cpu, where compiling is no sure win; trainer.compile=true compiles"
    assert decide("trainer.compile=true", device="cpu") == (True, "trainer.compile=true")


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
