"""The training-step seams in one process: the loss over dict batches, and the one optimizer step
every strategy implements (here the shared one; DeepSpeed's engine and the sharded ones run in
test_strategies)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fmtrain.config import StrategyConfig, TrainerConfig
from fmtrain.distributed import DistEnv
from fmtrain.losses import IGNORE, cross_entropy, cross_entropy_sum
from fmtrain.strategies import make_strategy


def test_the_loss_counts_only_unmasked_tokens() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=generator)
    labels = torch.randint(0, 11, (2, 5), generator=generator)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 1]])
    per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    kept = per_token[mask.flatten() == 1]
    masked = {"input_ids": labels, "labels": labels, "loss_mask": mask}
    assert torch.allclose(cross_entropy(logits, masked), kept.mean())
    total, tokens = cross_entropy_sum(logits, masked)
    assert tokens == 6 and torch.allclose(total, kept.sum())
    plain = {"input_ids": labels, "labels": labels}
    assert torch.allclose(cross_entropy(logits, plain), per_token.mean())
    assert cross_entropy_sum(logits, plain)[1] == 10
    ignored = {"input_ids": labels, "labels": labels.masked_fill(mask == 0, IGNORE)}
    assert torch.equal(cross_entropy(logits, ignored), cross_entropy(logits, masked))


def _stepped(precision: str, *, loss_finite: bool, poison: float | None) -> tuple:
    strategy = make_strategy(StrategyConfig(name="ddp"), precision, TrainerConfig(), DistEnv(), torch.device("cpu"))
    model = torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in model.parameters()]
    model, optimizer = strategy.attach_optimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), micro=1, accum=1, grad_clip=1.0
    )
    scale = strategy.loss_scale(optimizer)
    loss = model(torch.ones(2, 4)).square().mean()
    strategy.backward(model, loss, boundary=True)
    if poison is not None:
        model.weight.grad[0, 0] = poison
    stats = strategy.optimizer_step(model, optimizer, 1.0, loss_finite=loss_finite)
    changed = any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    grads_cleared = all(p.grad is None for p in model.parameters())
    return stats, changed, grads_cleared, scale, strategy.loss_scale(optimizer)


@pytest.mark.parametrize(
    ("precision", "loss_finite", "poison", "applied", "overflow"),
    [
        ("fp32", True, None, True, False),  # an ordinary step
        ("fp32", False, None, False, False),  # some rank's loss was inf/nan: no update, the trainer reports it
        ("fp32", True, float("inf"), False, False),  # a non-finite gradient: no update either
        ("fp32", True, float("nan"), False, False),
        ("fp16", True, None, True, False),  # loss scaling, nothing overflowed
        ("fp16", True, float("inf"), False, True),  # an fp16 overflow: the scaler skips and lowers its scale
        ("fp16", False, None, False, False),  # a non-finite loss is no overflow
    ],
)
def test_one_optimizer_step_updates_or_skips_and_says_which(
    precision: str, loss_finite: bool, poison: float | None, applied: bool, overflow: bool
) -> None:
    stats, changed, grads_cleared, scale_before, scale_after = _stepped(precision, loss_finite=loss_finite, poison=poison)
    assert (stats.applied, stats.overflow, changed) == (applied, overflow, applied)
    assert grads_cleared, "gradients are zeroed whatever happened"
    assert stats.state_bytes > 0 and stats.optim_state_bytes >= 0
    if precision == "fp32":
        assert scale_before is None and scale_after is None
    elif overflow:
        assert scale_after == scale_before / 2
    else:
        assert scale_after == scale_before
    if applied:
        assert 0 < stats.grad_norm < float("inf")


def test_a_stop_signal_during_start_up_reaches_the_run() -> None:
    """A Slurm task catches stop signals from its start (catch_early): one that lands before the run's
    StopFlag exists (a time-limit warning while torch imports) stops the run instead of being lost."""
    import os
    import signal

    from fmtrain import signals

    previous = {sig: signal.getsignal(sig) for sig in signals.STOP_SIGNALS}
    try:
        assert signals.StopFlag().signum == 0
        signals.catch_early()
        os.kill(os.getpid(), signal.SIGUSR2)  # handled before os.kill returns (the main thread)
        assert signals.StopFlag().signum == signal.SIGUSR2
    finally:
        signals._early.clear()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
