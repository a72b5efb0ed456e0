"""DeepSpeed internals fmtrain relies on (ZeRO optimizers, the fp16 loss scaler, its communication's start).

Checked by ``tests/test_compat.py`` against the installed DeepSpeed: the attribute names read
here, the ZeRO-3 master-copy comparison that :func:`share_fp32_master` works around, the lazy
link of optimizer state that :func:`link_optimizer_state` redoes, and the op build that
:func:`skip_shared_memory_all_reduce` skips.
"""

from __future__ import annotations

from typing import Any

import torch

# The op DeepSpeed's communication backend builds when it starts on a CPU (``ShareMemCommBuilder.NAME``).
SHM_COMM_OP = "deepspeed_shm_comm"


def skip_shared_memory_all_reduce() -> None:
    """DeepSpeed's communication backend (``deepspeed.comm.torch.TorchBackend``) compiles its shared-memory
    all-reduce when it starts on a CPU: a C++ op, ~50 CPU-s the first time on a machine, used only by
    ``inference_all_reduce``. Training's collectives go through torch.distributed, so fmtrain marks the op
    incompatible and DeepSpeed skips the build (``build_shm_op`` returns None)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


# DeepSpeed's DynamicLossScaler keeps its schedule in these attributes (beside ``cur_scale``).
SCALER_FIELDS = ("cur_iter", "last_overflow_iter", "cur_hysteresis")


def master_partitions(optimizer: Any) -> list[torch.Tensor]:
    """This rank's flat fp32 master partitions, one per parameter group (ZeRO-3: per sub-group).

    ZeRO-3 lists them in the base optimizer's groups only while it steps, so ask the ZeRO optimizer.
    """
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        if hasattr(optimizer, name):
            return list(getattr(optimizer, name))
    raise TypeError(f"{type(optimizer).__name__} is not a DeepSpeed ZeRO optimizer")


def share_fp32_master(optimizer: Any) -> None:
    """ZeRO-3 in fp32: make each fp32 "master" partition the parameter partition itself.

    DeepSpeed means to (stage3.py, ``_create_fp32_partitions``: no second copy when the partition
    already has the master's dtype and device) but compares a ``torch.device`` with the
    accelerator's device *string*, which is never equal, and keeps a clone: 0.5x the model's bytes
    more per rank. The optimizer then updates the partition in place, and DeepSpeed's copy from
    master to partition after the step copies a tensor onto itself.
    """
    low = getattr(optimizer, "fp16_partitioned_groups_flat", None)
    masters = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    if low is None or masters is None or getattr(optimizer, "offload_optimizer", False):
        return
    for partition, master in zip(low, masters, strict=True):
        same = partition.dtype == master.dtype and partition.device == master.device and partition.shape == master.shape
        if same and partition.numel() and master.untyped_storage().data_ptr() != partition.untyped_storage().data_ptr():
            master.data = partition.data


def link_optimizer_state(optimizer: Any) -> None:
    """Point every parameter's fragment mapping at the optimizer state (ZeRO-1/2).

    DeepSpeed links them lazily, after the first group's step only, so the second group (fmtrain's
    no-decay vectors) would have none; clearing its flag and linking again once the state exists
    fixes that.
    """
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def loss_scaler_state(optimizer: Any) -> dict[str, Any] | None:
    """The state of the ZeRO optimizer's fp16 loss scaler (``scale`` and its schedule), or None."""
    scaler = getattr(optimizer, "loss_scaler", None)
    if scaler is None:
        return None
    return {"scale": float(scaler.cur_scale)} | {k: getattr(scaler, k) for k in SCALER_FIELDS if hasattr(scaler, k)}


def load_loss_scaler_state(optimizer: Any, state: dict[str, Any]) -> None:
    scaler: Any = optimizer.loss_scaler
    scaler.cur_scale = state["scale"]
    for key in SCALER_FIELDS:
        if key in state:
            setattr(scaler, key, state[key])
