"""fmtrain plan: per-rank memory from the meta device, checked against a hand calculation."""

from __future__ import annotations

import json
import subprocess

from conftest import FMTRAIN

from fmtrain.plan import make_plan
from launch.compose import compose


def test_8b_on_4096_ranks_fsdp_x_tp_matches_the_hand_calculation() -> None:
    cfg = compose(
        ["model=8b", "strategy=fsdp_tp", "strategy.tp=8", "trainer.global_batch_size=1024", "data.seq_len=8192"], check=False
    )
    plan = make_plan(cfg, world_size=4096)
    assert (plan.dp, plan.tp) == (512, 8)
    # Per layer, TP splits dim 0 (colwise) or dim 1 (rowwise) by 8, then FSDP2 splits dim 0 by 512,
    # padded up: wq 4096/8/512 -> 1 row x 4096; wk, wv 1024/8=128 rows -> 1 row x 4096;
    # wo 4096/512=8 rows x 4096/8=512; w1, w3 14336/8=1792 rows -> 4 rows x 4096; w2 8 rows x 1792;
    # two norms 4096/512=8 each.
    per_layer = 4096 + 2 * 4096 + 8 * 512 + 2 * 4 * 4096 + 8 * 1792 + 2 * 8
    # Embeddings and the untied head, 128256/512 -> 251 rows x 4096 each; the final norm 8.
    root = 2 * 251 * 4096 + 8
    assert plan.params_per_rank == 32 * per_layer + root == 4_088_328
    assert plan.total_params == 8_030_261_248
    assert (plan.param_bytes, plan.grad_bytes, plan.optimizer_bytes) == (4 * 4_088_328, 4 * 4_088_328, 8 * 4_088_328)
    # Activations (Korthikanti et al., no attention matrix): 32 layers x s*b*h*(10 + 24/8) x 2 bytes
    # x 2 (fp32 compute), micro-batch 1024/512 = 2, plus fp32 logits and their gradient.
    assert plan.micro_batch == 2
    assert plan.activation_bytes == 32 * 8192 * 2 * 4096 * 13 * 2 + 2 * 8192 * 2 * 128256 * 4


def test_data_parallel_plans_hold_everything_or_a_shard() -> None:
    ddp = make_plan(compose(["strategy=ddp", "launcher.nproc=2"]), world_size=2)
    fsdp = make_plan(compose(["strategy=fsdp", "launcher.nproc=2"]), world_size=2)
    assert ddp.params_per_rank == ddp.total_params
    assert fsdp.params_per_rank == ddp.total_params // 2  # every dim 0 of the tiny model is even


def test_deepspeed_zero_stages_partition_what_they_say() -> None:
    n = 8_030_261_248  # the 8b model; 64 ranks divide it exactly: 125,472,832 each
    part = n // 64
    plans = {
        stage: make_plan(
            compose(["model=8b", "strategy=deepspeed", f"strategy.zero_stage={stage}", "precision=bf16"], check=False),
            world_size=64,
        )
        for stage in (1, 2, 3)
    }
    # bf16 parameters (2 bytes) beside an fp32 master partition; bf16 gradients; two fp32 moments.
    assert (plans[1].param_bytes, plans[1].grad_bytes, plans[1].optimizer_bytes) == (2 * n + 4 * part, 2 * n, 8 * part)
    assert (plans[2].param_bytes, plans[2].grad_bytes) == (2 * n + 4 * part, 2 * part)
    assert (plans[3].param_bytes, plans[3].grad_bytes, plans[3].optimizer_bytes) == (6 * part, 2 * part, 8 * part)
    assert plans[3].params_per_rank == part
    # fp32 ZeRO-3: the fp32 parameter partition is the master (one copy), as state_bytes measures.
    fp32 = make_plan(compose(["model=8b", "strategy=deepspeed", "strategy.zero_stage=3"], check=False), world_size=64)
    assert (fp32.param_bytes, fp32.grad_bytes, fp32.optimizer_bytes) == (4 * part, 4 * part, 8 * part)


def test_sequence_parallelism_splits_the_rest_of_the_activations() -> None:
    """Korthikanti et al.: per layer s*b*h*(10 + 24/t) bytes (16-bit) under TP, s*b*h*34/t with SP."""
    overrides = ["model=8b", "strategy=tp", "precision=bf16", "trainer.global_batch_size=1", "data.seq_len=4096"]
    tp = make_plan(compose([*overrides], check=False), world_size=8)
    sp = make_plan(compose([*overrides, "strategy.sequence_parallel=true"], check=False), world_size=8)
    logits = 2 * 4096 * 128256 * 4
    assert tp.activation_bytes == 32 * 4096 * 4096 * (10 + 3) + logits
    assert sp.activation_bytes == 32 * 4096 * 4096 * 34 // 8 + logits


def test_cli_prints_the_plan_and_refuses_impossible_ones() -> None:
    args = [
        "plan",
        "model=8b",
        "strategy=fsdp_tp",
        "strategy.tp=8",
        "world_size=4096",
        "trainer.global_batch_size=1024",
        "--json",
    ]
    result = subprocess.run([FMTRAIN, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["params_per_rank"] == 4_088_328
    refused = subprocess.run(
        [FMTRAIN, "plan", "model=8b", "strategy=tp", "world_size=3"], capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2
    assert "strategy.tp=3 is invalid: must divide model.n_heads = 32" in refused.stderr
