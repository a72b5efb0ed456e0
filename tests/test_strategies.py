"""Strategies on CPU with gloo: each matches one process, shards really shard, checkpoints cross over."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import SMALL, fmtrain, read_metrics, spawn_ranks, train_losses

from fmtrain.hardware import probe

pytestmark = pytest.mark.slow

STEPS = ["trainer.max_steps=20", "trainer.eval_interval=10", "checkpoint.interval=10", "checkpoint.keep_last=5"]


def train(cache: Path, run_dir: Path, *overrides: str) -> dict[int, float]:
    result = fmtrain(["train", f"run_dir={run_dir}", *SMALL, *STEPS, *overrides], cache)
    assert result.returncode == 0, result.stdout + result.stderr
    return train_losses(run_dir)


@pytest.fixture(scope="module")
def reference(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, plain fp32: what every strategy must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference")
    train(cache_dir, run_dir, "launcher.nproc=1")
    return run_dir


@pytest.fixture(scope="module")
def trained(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``trained(*overrides)``: the run directory of SMALL for 20 steps with these overrides, trained
    once for the module. Each test asserts its own thing of a run (equivalence, partitions held,
    checkpoints that cross strategies) without training the same configuration again."""
    runs: dict[tuple[str, ...], Path] = {}

    def get(*overrides: str) -> Path:
        if overrides not in runs:
            run_dir = tmp_path_factory.mktemp("run")
            train(cache_dir, run_dir, *overrides)
            runs[overrides] = run_dir
        return runs[overrides]

    return get


def assert_close_to(losses: dict[int, float], reference: dict[int, float], rel: float) -> None:
    assert sorted(losses) == sorted(reference)
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, rel=rel), f"step {step}"


@pytest.mark.parametrize(
    ("strategy", "nproc", "extra"),
    [
        ("ddp", 2, []),
        ("fsdp", 2, []),
        # Options of one strategy share a run: each changes what the strategy does, none the numbers.
        ("fsdp", 2, ["strategy.reshard_after_forward=false", "trainer.activation_checkpointing=every_n"]),
        ("tp", 2, []),
        ("ddp", 2, ["trainer.activation_checkpointing=full"]),
        # Sequence parallelism, with activation checkpointing (recomputed blocks re-split and re-gather).
        # fsdp_tp without them: test_a_checkpoint_resumes_under_another_strategy_and_world_size[saved1-resumed1].
        ("tp", 2, ["strategy.sequence_parallel=true", "trainer.activation_checkpointing=full"]),
        ("fsdp_tp", 4, ["strategy.tp=2", "strategy.sequence_parallel=true", "trainer.activation_checkpointing=full"]),
        ("deepspeed", 2, ["strategy.zero_stage=1"]),
        ("deepspeed", 2, ["strategy.zero_stage=2"]),
        ("deepspeed", 2, ["strategy.zero_stage=3"]),  # built partitioned (deepspeed.zero.Init)
        ("deepspeed", 2, ["strategy.zero_stage=3", "strategy.zero_init=false"]),  # built whole, then partitioned
        # 4 micro-steps per step, each block recomputed in backward
        ("deepspeed", 2, ["strategy.zero_stage=3", "trainer.micro_batch_size=1", "trainer.activation_checkpointing=full"]),
        ("deepspeed", 2, ["strategy.zero_stage=2", "strategy.offload_optimizer=true"]),
    ],
)
def test_each_strategy_matches_one_process(strategy, nproc, extra, reference: Path, trained) -> None:
    losses = train_losses(trained(f"strategy={strategy}", f"launcher.nproc={nproc}", *extra))
    # Same samples and the same initial values (each rank copies its shard of the seeded full
    # tensor); only the order of fp32 reductions differs. Measured: <= 2e-7 relative over 20 steps
    # for every strategy here (DeepSpeed's ZeRO stages included), so 1e-5 leaves a 50x margin.
    assert_close_to(losses, train_losses(reference), rel=1e-5)


def test_sharding_is_real(reference: Path, trained) -> None:
    state = {}
    for strategy in ("ddp", "fsdp", "tp"):
        state[strategy] = read_metrics(trained(f"strategy={strategy}", "launcher.nproc=2"))[0]["state_bytes"]
    assert state["fsdp"] <= 0.55 * state["ddp"]
    assert state["tp"] < 0.75 * state["ddp"]  # embeddings and norms stay replicated under TP
    assert state["ddp"] == next(r for r in read_metrics(reference) if "state_bytes" in r)["state_bytes"]


def test_deepspeed_partitions_what_its_stage_says(reference: Path, trained) -> None:
    """ZeRO-1/2 partition the optimizer state, ZeRO-3 parameters and gradients as well."""
    runs = {
        "ddp": trained("strategy=ddp", "launcher.nproc=2"),
        "zero1": trained("strategy=deepspeed", "launcher.nproc=2", "strategy.zero_stage=1"),
        "zero2": trained("strategy=deepspeed", "launcher.nproc=2", "strategy.zero_stage=2"),
        "zero3": trained("strategy=deepspeed", "launcher.nproc=2", "strategy.zero_stage=3"),
        "zero3_bf16": trained("strategy=deepspeed", "launcher.nproc=2", "precision=bf16", "strategy.zero_stage=3"),
    }
    last = {name: [r for r in read_metrics(run_dir) if "state_bytes" in r][-1] for name, run_dir in runs.items()}
    ddp = last["ddp"]
    for stage in ("zero1", "zero2", "zero3"):
        assert last[stage]["optim_state_bytes"] <= 0.55 * ddp["optim_state_bytes"], stage
    # ZeRO-3 holds half of DDP's: in bf16, 16-bit parameter and gradient partitions with fp32 master
    # and moments; in fp32, the parameter partition is the master (DeepSpeed 0.19 alone would keep
    # a second copy: 0.625x) with fp32 gradient partition and moments.
    for name in ("zero3", "zero3_bf16"):
        assert last[name]["state_bytes"] <= 0.55 * ddp["state_bytes"], name
    generated = json.loads((runs["zero3"] / "deepspeed_config.json").read_text())
    assert generated["zero_optimization"]["stage"] == 3
    assert generated["train_micro_batch_size_per_gpu"] * generated["gradient_accumulation_steps"] * 2 == 8


def test_zero2_partitions_the_gradients_that_zero1_accumulates_whole(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the micro-steps of a step (4 here), ZeRO-1 accumulates the whole model's gradients on each
    rank and reduces them at the step; ZeRO-2 hands each micro-step's to its partitioned reduction.
    Measured by the test in each rank (the forked ranks inherit its wrapper): the gradient bytes the
    parameters hold after each backward that is not the step's last."""
    import torch

    from fmtrain.strategies.zero import DeepSpeedStrategy

    backward = DeepSpeedStrategy.backward

    def measured(self, wrapped, loss, *, boundary: bool) -> None:
        backward(self, wrapped, loss, boundary=boundary)
        params = list(wrapped.module.parameters())
        held = {p.grad.untyped_storage().data_ptr(): p.grad.untyped_storage().nbytes() for p in params if p.grad is not None}
        whole = sum(p.numel() * p.element_size() for p in params)
        with open(tmp_path / f"rank{torch.distributed.get_rank()}", "a") as f:
            f.write(json.dumps({"boundary": boundary, "held": sum(held.values()), "whole": whole}) + "\n")

    monkeypatch.setattr(DeepSpeedStrategy, "backward", measured)
    held = {}
    for stage in (1, 2):
        overrides = [f"strategy.zero_stage={stage}", "trainer.micro_batch_size=1", "trainer.max_steps=2"]
        train(cache_dir, tmp_path / f"zero{stage}", "strategy=deepspeed", "launcher.nproc=2", *overrides)
        for rank in (0, 1):
            records = [json.loads(line) for line in (tmp_path / f"rank{rank}").read_text().splitlines()]
            (tmp_path / f"rank{rank}").unlink()
            assert [r["boundary"] for r in records] == [False, False, False, True] * 2
            assert all(r["held"] == 0 for r in records if r["boundary"])  # reduced at the step, by both
            held[stage, rank] = {(r["held"], r["whole"]) for r in records if not r["boundary"]}
    whole = 492_800  # SMALL's fp32 parameters
    assert held == {(1, 0): {(whole, whole)}, (1, 1): {(whole, whole)}, (2, 0): {(0, whole)}, (2, 1): {(0, whole)}}


def test_deepspeed_zero3_checkpoint_resumes_under_fsdp_and_ddp(reference: Path, trained, cache_dir: Path, tmp_path: Path) -> None:
    """Saved by ZeRO-3 on 2 ranks, continued by FSDP2 on 1 rank and by DDP on 2: the same losses."""
    checkpoint = trained("strategy=deepspeed", "launcher.nproc=2", "strategy.zero_stage=3") / "checkpoints" / "step_000010"
    expected = {step: loss for step, loss in train_losses(reference).items() if step > 10}
    for name, resumed in {"fsdp1": ["strategy=fsdp", "launcher.nproc=1"], "ddp2": ["strategy=ddp", "launcher.nproc=2"]}.items():
        losses = train(cache_dir, tmp_path / name, *resumed, f"trainer.resume={checkpoint}")
        assert sorted(losses) == list(range(11, 21)), name
        assert_close_to(losses, expected, rel=1e-5)


@pytest.mark.parametrize(("strategy", "extra"), [("fsdp", []), ("tp", []), ("deepspeed", ["strategy.zero_stage=3"])])
def test_bf16_learns_and_stays_near_fp32(strategy: str, extra: list[str], reference: Path, trained) -> None:
    losses = train_losses(trained(f"strategy={strategy}", "launcher.nproc=2", "precision=bf16", *extra))
    fp32 = train_losses(reference)
    assert losses[20] < losses[1] - 0.5
    # bf16 matmuls carry 8 mantissa bits; after 20 steps the loss stays within 3% of fp32's.
    assert losses[20] == pytest.approx(fp32[20], rel=0.03)


@pytest.mark.parametrize(
    ("saved", "resumed"),
    [
        (["strategy=fsdp", "launcher.nproc=2"], ["strategy=ddp", "launcher.nproc=1"]),
        (["strategy=tp", "launcher.nproc=2"], ["strategy=fsdp_tp", "launcher.nproc=4", "strategy.tp=2"]),
        # Saved with the fused AdamW kernel, resumed where torch picks the kernel (DTensors beside tensors).
        (["strategy=ddp", "launcher.nproc=2"], ["strategy=tp", "launcher.nproc=2"]),
        (["strategy=fsdp", "launcher.nproc=2"], ["strategy=deepspeed", "strategy.zero_stage=3", "launcher.nproc=2"]),
        (["strategy=ddp", "launcher.nproc=2"], ["strategy=deepspeed", "strategy.zero_stage=1", "launcher.nproc=1"]),
    ],
)
def test_a_checkpoint_resumes_under_another_strategy_and_world_size(
    saved, resumed, reference: Path, trained, cache_dir: Path, tmp_path: Path
) -> None:
    checkpoint = trained(*saved) / "checkpoints" / "step_000010"
    losses = train(cache_dir, tmp_path / "resumed", *resumed, f"trainer.resume={checkpoint}")
    assert sorted(losses) == list(range(11, 21)), "the resumed run starts after step 10"
    expected = {step: loss for step, loss in train_losses(reference).items() if step > 10}
    assert_close_to(losses, expected, rel=1e-5)


def test_compiled_blocks_train_like_eager(reference: Path, cache_dir: Path, tmp_path: Path) -> None:
    """torch.compile (inductor, C++ on CPU) fuses elementwise ops: fp32 results move a little."""
    result = fmtrain(
        ["train", f"run_dir={tmp_path}", *SMALL, *STEPS, "trainer.compile=true"],
        cache_dir,
        timeout=600,
        TORCHINDUCTOR_CACHE_DIR=str(cache_dir / "inductor"),  # a warm cache turns ~30 s into ~5 s
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "compiling each block (trainer.compile=true)" in result.stdout, result.stdout
    timing = r"trainer.compile: the first step took [\d.]+ s, the second [\d.]+ s: about -?[\d.]+ s compiling"
    assert re.search(timing, result.stdout), result.stdout
    assert_close_to(train_losses(tmp_path), train_losses(reference), rel=1e-4)


@pytest.mark.parametrize(
    ("strategy", "nproc", "extra"),
    [
        ("ddp", 2, []),
        ("fsdp", 2, []),
        ("tp", 2, []),
        ("fsdp_tp", 4, ["strategy.tp=2"]),
        ("deepspeed", 2, ["strategy.zero_stage=2"]),
    ],
)
def test_fp16_with_loss_scaling_learns_and_keeps_its_scale(
    strategy, nproc, extra, cache_dir: Path, tmp_path: Path, hardware_branch
) -> None:
    """Where this CPU runs fp16 under the strategy, it learns; where not (DeepSpeed's CPU accelerator
    without AVX512-FP16/AMX-FP16, e.g. an AMD EPYC), the command is refused before launch, one line, and
    the engine's 16-bit path trains in bf16 instead, so that no CPU kind leaves it untested."""
    overrides = [f"strategy={strategy}", f"launcher.nproc={nproc}", "precision=fp16", *extra]
    refusal = probe("cpu", engines=strategy == "deepspeed").refusal(strategy, "fp16")
    if refusal:
        hardware_branch(f"refused before launch ({refusal}); trained in bf16")
        result = fmtrain(["train", f"run_dir={tmp_path / 'run'}", *SMALL, *STEPS, *overrides], cache_dir)
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.splitlines() == [f"fmtrain: error: precision.name='fp16' is invalid: {refusal}"]
        assert not (tmp_path / "run").exists()
        losses = train(cache_dir, tmp_path / "bf16", *overrides[:2], "precision=bf16", *extra)
        assert losses[20] < losses[1] - 0.5
        assert json.loads((tmp_path / "bf16" / "deepspeed_config.json").read_text())["bf16"]["enabled"] is True
        return
    hardware_branch("trained")
    losses = train(cache_dir, tmp_path, *overrides)
    assert losses[20] < losses[1] - 0.5
    records = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert all(r["loss_scale"] > 0 for r in records)

    saved = json.loads((tmp_path / "checkpoints" / "step_000020" / "trainer_state.json").read_text())
    scaler = saved["engine_loss_scaler"] if strategy == "deepspeed" else saved["grad_scaler"]  # DeepSpeed's own
    assert scaler["scale"] == records[-1]["loss_scale"]


def _residual_length(rank: int, sequence_parallel: bool, result: Any) -> None:
    """One of 2 ranks of a tp model: the sequence length of blocks.1's input on this rank (the
    residual stream between blocks) and the logits' shape, as rank 0 saw them."""
    import torch

    from fmtrain.distributed import DistEnv
    from fmtrain.models import recipe
    from fmtrain.strategies import make_strategy
    from launch.compose import compose

    env = DistEnv.from_environ()
    device = env.init("cpu")
    cfg = compose([*SMALL, "strategy=tp", f"strategy.sequence_parallel={sequence_parallel}", "launcher.nproc=2"])
    strategy = make_strategy(cfg.strategy, "fp32", cfg.trainer, env, device)
    built = strategy.build(recipe(cfg), cfg.seed)
    seen: list[int] = []
    built.blocks[1].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    logits = built(torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len)))
    if rank == 0:
        result[sequence_parallel] = (seen[0], tuple(logits.shape))
    torch.distributed.barrier()  # neither rank tears gloo down while the other still talks to it
    env.close()


def test_sequence_parallel_splits_the_residual_stream_along_the_sequence() -> None:
    """The equivalence runs above show sequence parallelism computes the same; this shows it is on:
    between blocks each rank holds half the sequence, and the logits come out whole."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        result = manager.dict()
        for sequence_parallel in (False, True):  # one model per process group, as in a run
            spawn_ranks(_residual_length, 2, sequence_parallel, result)
        lengths = dict(result)
    seq = 64  # SMALL's data.seq_len
    assert lengths == {False: (seq, (2, seq, 256)), True: (seq // 2, (2, seq, 256))}
