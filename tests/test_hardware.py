"""Capability checks: what each device can train is asked, not assumed, and refused in one line."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMALL, env_with, fmtrain, train_losses

from fmtrain import hardware
from fmtrain.config import ConfigError, to_yaml
from fmtrain.hardware import Capabilities, probe
from fmtrain.validation import validate
from launch.cli import main
from launch.compose import compose

INTEL_SPR = Capabilities(
    "cpu",
    "Intel(R) Xeon(R) Platinum 8480+",
    "AVX512",
    ("avx2", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16"),
    native_bf16=True,
    native_fp16=True,
    fp8=False,
    deepspeed_fp16=True,
    deepspeed_bf16=True,
)
AMD_ZEN3 = Capabilities(
    "cpu", "AMD EPYC 7B13 64-Core Processor", "AVX2", ("avx2", "f16c"), False, False, False, deepspeed_fp16=False,
    deepspeed_bf16=True,
)  # fmt: skip
NO_DEEPSPEED = dataclasses.replace(AMD_ZEN3, deepspeed_fp16=None, deepspeed_bf16=None)
H100 = Capabilities("cuda", "NVIDIA H100 80GB HBM3", "sm_90", (), True, True, True, True, True)
A100 = Capabilities("cuda", "NVIDIA A100-SXM4-80GB", "sm_80", (), True, True, False, True, True)
V100 = Capabilities("cuda", "Tesla V100-SXM2-32GB", "sm_70", (), False, True, False, True, False)

STRATEGIES = ("ddp", "fsdp", "deepspeed", "tp", "fsdp_tp")
PRECISIONS = ("fp32", "bf16", "fp16", "fp8")


def expected_refusal(caps: Capabilities, strategy: str, precision: str) -> str | None:
    """The rule, written out per case: which word the refusal must start its reason with."""
    if precision == "fp8" and caps.name not in (H100.name,):
        return "fp8 training needs GPUs with fp8 tensor cores"
    if precision == "bf16" and caps is V100:
        return "bf16 needs compute capability >= 8.0"
    if strategy == "deepspeed" and precision == "fp16" and caps is AMD_ZEN3:
        return "DeepSpeed's cpu accelerator refuses fp16 here (oneDNN has no fp16 kernels"
    return None


@pytest.mark.parametrize("caps", [INTEL_SPR, AMD_ZEN3, NO_DEEPSPEED, H100, A100, V100], ids=lambda c: c.name.split()[1])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_each_device_refuses_exactly_what_it_cannot_train(caps: Capabilities, strategy: str, precision: str) -> None:
    refusal = caps.refusal(strategy, precision)
    expected = expected_refusal(caps, strategy, precision)
    if expected is None:
        assert refusal is None
        return
    assert refusal is not None and refusal.startswith(expected), refusal
    assert f"this run's device is {caps.describe()}" in refusal  # names the device...
    assert ": use precision=" in refusal  # ...and what to use instead


def test_the_amd_refusal_names_the_cpu_and_both_alternatives() -> None:
    assert AMD_ZEN3.refusal("deepspeed", "fp16") == (
        "DeepSpeed's cpu accelerator refuses fp16 here (oneDNN has no fp16 kernels without AVX512-FP16 or AMX-FP16); "
        "this run's device is cpu: AMD EPYC 7B13 64-Core Processor (AVX2; bf16 emulated; fp16 emulated; DeepSpeed fp16 no): "
        "use precision=bf16, or strategy=fsdp precision=fp16 (torch's loss scaling)"
    )


def test_this_cpu_is_described_from_its_own_flags_and_deepspeed_agrees_with_them() -> None:
    """Two independent readings: /proc/cpuinfo's flags, and DeepSpeed's accelerator (through oneDNN)."""
    caps = probe("cpu")
    flags = set(Path("/proc/cpuinfo").read_text().split("flags", 1)[1].splitlines()[0].split())
    if "ONEDNN_MAX_CPU_ISA" not in os.environ:
        assert caps.native_fp16 == bool({"avx512_fp16", "amx_fp16"} & flags)
        assert caps.native_bf16 == bool({"avx512_bf16", "amx_bf16"} & flags)
    assert caps.deepspeed_fp16 == caps.native_fp16, "DeepSpeed's CPU fp16 follows oneDNN's fp16 kernels"
    assert caps.deepspeed_bf16 is True
    assert probe("cpu", engines=False).deepspeed_fp16 is None


@pytest.fixture
def amd_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine seen as an AMD EPYC without fp16 kernels (the CPU that turned main red)."""
    monkeypatch.setattr(hardware, "probe", lambda kind, index=0, engines=True: AMD_ZEN3)


def test_validation_refuses_deepspeed_fp16_where_deepspeed_would_and_allows_the_alternatives(amd_cpu: None) -> None:
    with pytest.raises(ConfigError, match=r"^precision.name='fp16' is invalid: DeepSpeed's cpu accelerator refuses fp16"):
        validate(compose(["strategy=deepspeed", "precision=fp16", "launcher.nproc=2"], check=False))
    for alternative in (["strategy=deepspeed", "precision=bf16"], ["strategy=fsdp", "precision=fp16"]):
        validate(compose([*alternative, "launcher.nproc=2"], check=False))
    # Slurm's nodes are not this machine: each rank asks its own device when it starts.
    validate(compose(["strategy=deepspeed", "precision=fp16", "launcher=slurm"], check=False))


def test_the_command_exits_2_with_one_line_and_writes_nothing(amd_cpu: None, capsys, tmp_path: Path) -> None:
    code = main(["train", "strategy=deepspeed", "precision=fp16", "launcher.nproc=2", f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines() == [f"fmtrain: error: precision.name='fp16' is invalid: {AMD_ZEN3.refusal('deepspeed', 'fp16')}"]
    assert not (tmp_path / "run").exists()


def test_plan_and_dry_run_show_the_device_and_its_verdict(amd_cpu: None, capsys) -> None:
    assert main(["plan", "strategy=deepspeed", "precision=fp16", "world_size=2"]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith(f"this device  {AMD_ZEN3.describe()} -> deepspeed fp16: refused: DeepSpeed's cpu accelerator")
    assert main(["train", "strategy=fsdp", "precision=fp16", "launcher.nproc=2", "--dry-run"]) == 0
    assert f"this device  {AMD_ZEN3.describe()} -> fsdp fp16: supported" in capsys.readouterr().out
    # A Slurm job runs on its nodes, not here: the plan says so instead of probing this machine.
    assert main(["plan", "strategy=deepspeed", "precision=fp16", "launcher=slurm", "world_size=2"]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    assert row == "this device  the slurm job's nodes -> deepspeed fp16: checked by each rank on its own device"


@pytest.mark.slow
def test_a_cpu_whose_onednn_has_no_fp16_kernels_is_refused_deepspeed_fp16_for_real(cache_dir: Path, tmp_path: Path) -> None:
    """No mock: oneDNN capped at AVX2 (``ONEDNN_MAX_CPU_ISA``) has no fp16 kernels, as on an AMD EPYC,
    so DeepSpeed's CPU accelerator itself says no, and fmtrain refuses before launch; fsdp's fp16 runs."""
    amd_like = {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    command = ["train", f"run_dir={tmp_path / 'run'}", *SMALL, "strategy=deepspeed", "precision=fp16", "launcher.nproc=2"]
    result = fmtrain(command, cache_dir, timeout=120, **amd_like)
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("fmtrain: error: precision.name='fp16' is invalid: DeepSpeed's cpu accelerator refuses fp16 here")
    assert "fp16 emulated; DeepSpeed fp16 no): use precision=bf16, or strategy=fsdp precision=fp16" in line
    assert not (tmp_path / "run").exists()
    fsdp = [*SMALL, "strategy=fsdp", "precision=fp16", "launcher.nproc=2", "trainer.max_steps=4", "trainer.eval_interval=4"]
    result = fmtrain(["train", f"run_dir={tmp_path / 'fsdp'}", *fsdp], cache_dir, timeout=300, **amd_like)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(train_losses(tmp_path / "fsdp")) == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_rank_refuses_what_its_own_device_cannot_train_in_one_line(cache_dir: Path, tmp_path: Path) -> None:
    """A Slurm or Ray node is not the machine that validated the run: the rank asks its own device.
    fp8 on this CPU, written straight into a config the local launcher runs (no validation before)."""
    cfg = compose([*SMALL, f"run_dir={tmp_path}", "precision=fp8", "launcher=slurm"], check=False)
    cfg.launcher.name = "local"
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    result = subprocess.run(
        [sys.executable, "-m", "launch.local", str(tmp_path / "config.yaml")],
        env=env_with(cache_dir),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    refusal = probe("cpu", engines=False).refusal("ddp", "fp8")
    assert f"rank 0: precision.name='fp8' is invalid: {refusal}" in result.stdout.splitlines()[-1]
    assert f"fmtrain: error: precision.name='fp8' is invalid: {refusal}" in result.stderr.splitlines()
    assert "Traceback" not in result.stdout + result.stderr


NO_DEEPSPEED_BF16 = dataclasses.replace(INTEL_SPR, deepspeed_bf16=False)


@pytest.mark.parametrize(
    ("caps", "expected"),
    [(INTEL_SPR, "bf16"), (AMD_ZEN3, "fp32"), (NO_DEEPSPEED, "fp32"), (H100, "bf16"), (A100, "bf16"), (V100, "fp32")],
    ids=lambda c: c.name.split()[1] if isinstance(c, Capabilities) else c,
)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_auto_precision_is_bf16_exactly_where_the_device_multiplies_bf16_natively(
    caps: Capabilities, expected: str, strategy: str
) -> None:
    name, why = caps.auto_precision(strategy)
    assert name == expected
    assert caps.refusal(strategy, name) is None  # what auto picks is never refused
    assert ("multiplies bf16 natively" in why) == (expected == "bf16"), why
    if caps is INTEL_SPR:
        assert why.endswith("(AMX-BF16 and AVX512-BF16)")
    # A DeepSpeed that refuses bf16 keeps auto at fp32 for deepspeed only.
    assert NO_DEEPSPEED_BF16.auto_precision(strategy)[0] == ("fp32" if strategy == "deepspeed" else "bf16")


def test_a_named_precision_is_kept_and_the_pin_decides_auto(monkeypatch) -> None:
    for pinned in ("fp32", "bf16"):
        monkeypatch.setenv(hardware.AUTO_PIN, pinned)
        assert hardware.resolve_precision("cpu", "ddp", "auto") == (pinned, f"$FMTRAIN_PRECISION_AUTO={pinned}")
        assert hardware.resolve_precision("cpu", "ddp", "fp32") == ("fp32", "asked for")
    monkeypatch.setenv(hardware.AUTO_PIN, "fp16")
    with pytest.raises(ConfigError, match=r"\$FMTRAIN_PRECISION_AUTO='fp16' is invalid: pins what precision=auto means"):
        hardware.resolve_precision("cpu", "ddp", "auto")
    monkeypatch.delenv(hardware.AUTO_PIN)
    assert hardware.resolve_precision("cpu", "ddp", "auto") == probe("cpu", engines=False).auto_precision("ddp")


@pytest.mark.slow
def test_the_default_run_trains_in_what_auto_chooses_here_and_says_so(cache_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """No pin: 2 ranks agree on this CPU's choice (bf16 where it has AMX/AVX512-BF16, else fp32), log
    it, and their losses equal those of the same run with that precision named."""
    monkeypatch.delenv(hardware.AUTO_PIN)
    chosen, why = probe("cpu", engines=False).auto_precision("ddp")
    steps = [*SMALL, "launcher.nproc=2", "trainer.max_steps=3", "trainer.eval_interval=3"]
    auto = fmtrain(["train", f"run_dir={tmp_path / 'auto'}", *steps], cache_dir, FMTRAIN_COMPILE_AUTO="")
    assert auto.returncode == 0, auto.stdout + auto.stderr
    log = (tmp_path / "auto" / "logs" / "rank0.log").read_text()
    assert f"precision=auto -> {chosen}: {why}" in log
    assert f"| {chosen} on cpu" in log
    for rank in (0, 1):  # and trainer.compile=auto, on each rank
        rank_log = (tmp_path / "auto" / "logs" / f"rank{rank}.log").read_text()
        assert "not compiling each block (trainer.compile=auto: 3 steps estimated at 0.0 min eager" in rank_log, rank
    named = fmtrain(["train", f"run_dir={tmp_path / 'named'}", *steps, f"precision={chosen}"], cache_dir)
    assert named.returncode == 0, named.stdout + named.stderr
    assert "precision=auto" not in (tmp_path / "named" / "logs" / "rank0.log").read_text()
    assert train_losses(tmp_path / "auto") == train_losses(tmp_path / "named")
