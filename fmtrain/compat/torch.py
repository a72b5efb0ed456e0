"""torch internals fmtrain relies on: the sharded fp16 grad scaler's per-gradient unscale.

Checked by ``tests/test_compat.py``: the signature of ``ShardedGradScaler._unscale_grads_`` and
the per-optimizer state (``found_inf_per_device``) that :func:`local_tensor_grad_scaler` reshapes.
"""

from __future__ import annotations

from typing import Any

import torch


def local_tensor_grad_scaler(device_type: str) -> torch.amp.GradScaler:
    """fp16 loss scaling for gradients that differ between ranks (shards): the overflow flag is
    all-reduced, so every rank skips the same steps. Gradients may be DTensors and plain tensors
    side by side (tensor parallel's split projections beside its replicated embeddings and norms):
    each is unscaled through its local tensor, which torch's one-list unscale kernel accepts."""
    from types import SimpleNamespace

    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
    from torch.distributed.tensor import DTensor

    class LocalTensorGradScaler(ShardedGradScaler):
        def _unscale_grads_(self, optimizer: Any, inv_scale: Any, found_inf: Any, allow_fp16: bool = True) -> Any:
            grads = [
                SimpleNamespace(grad=p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad)
                for group in optimizer.param_groups
                for p in group["params"]
            ]
            local = SimpleNamespace(param_groups=[{"params": grads}])
            return super()._unscale_grads_(local, inv_scale, found_inf, allow_fp16)  # type: ignore[arg-type]

        def unscale_(self, optimizer: Any) -> None:
            super().unscale_(optimizer)
            # ShardedGradScaler's flags have shape [1]; a fused optimizer subtracts them from its
            # 0-d step counters in place, which needs them 0-d, as GradScaler's own are.
            state = self._per_optimizer_states[id(optimizer)]
            state["found_inf_per_device"] = {d: f.reshape(()) for d, f in state["found_inf_per_device"].items()}

    return LocalTensorGradScaler(device_type)
