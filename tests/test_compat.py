"""What fmtrain's workarounds rely on in its dependencies' internals (``fmtrain/compat/``).

Each test names the workaround it guards: when an upgrade changes the private name or the
behaviour, it fails here, not deep inside a training run. Where upstream fixes what a workaround
works around, the test fails too, so the workaround is removed rather than kept for nothing.
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest
import torch

from fmtrain.compat import deepspeed as ds_compat
from fmtrain.compat import submitit as submitit_compat
from fmtrain.compat import torch as torch_compat
from fmtrain.config import LauncherConfig


@pytest.fixture(scope="module")
def zero() -> tuple[type, type]:
    """DeepSpeed's ZeRO-1/2 and ZeRO-3 optimizer classes."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3


def test_deepspeed_keeps_the_master_partitions_under_the_names_fmtrain_reads(zero: tuple[type, type]) -> None:
    """master_partitions and share_fp32_master read these attributes of the ZeRO optimizers."""
    stage12, stage3 = (inspect.getsource(cls) for cls in zero)
    assert "self.single_partition_of_fp32_groups" in stage12
    for name in ("self.fp32_partitioned_groups_flat", "self.fp16_partitioned_groups_flat", "self.offload_optimizer"):
        assert name in stage3, name


def test_deepspeed_zero3_still_compares_a_device_with_a_string_so_share_fp32_master_is_needed(zero: tuple[type, type]) -> None:
    """share_fp32_master works around ZeRO-3 keeping an fp32 clone of fp32 partitions: its check
    compares ``tensor.device`` (a torch.device) with ``self.device`` (the accelerator's name, a str)."""
    source = inspect.getsource(zero[1])
    assert "self.device = get_accelerator().current_device_name()" in source
    assert ".device == self.device" in inspect.getsource(zero[1]._create_fp32_partitions)
    assert torch.device("cpu") != "cpu", "torch now equates a device with its name: drop share_fp32_master"


def test_deepspeed_links_optimizer_state_lazily_behind_the_flag_fmtrain_clears(zero: tuple[type, type]) -> None:
    """link_optimizer_state clears ``_hp_optimizer_states_linked`` and calls the lazy linker again."""
    linker = inspect.getsource(zero[0]._lazy_init_hp_params_optimizer_state)
    assert "if not self._hp_optimizer_states_linked" in linker
    assert "self._hp_optimizer_states_linked = True" in linker

    class Optimizer:
        _hp_optimizer_states_linked = True
        calls = 0

        def _lazy_init_hp_params_optimizer_state(self) -> None:
            self.calls += int(not self._hp_optimizer_states_linked)

    optimizer = Optimizer()
    ds_compat.link_optimizer_state(optimizer)
    assert optimizer.calls == 1


def test_deepspeed_loss_scaler_state_round_trips_through_its_attributes() -> None:
    from types import SimpleNamespace

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    scaler = DynamicLossScaler(2.0**16, 1000, 1.0, 2, False)
    for name in ("cur_scale", *ds_compat.SCALER_FIELDS):
        assert hasattr(scaler, name), name
    scaler.cur_scale, scaler.cur_iter, scaler.last_overflow_iter, scaler.cur_hysteresis = 512.0, 17, 12, 1
    saved = ds_compat.loss_scaler_state(SimpleNamespace(loss_scaler=scaler))
    assert saved == {"scale": 512.0, "cur_iter": 17, "last_overflow_iter": 12, "cur_hysteresis": 1}
    fresh = DynamicLossScaler(2.0**16, 1000, 1.0, 2, False)
    ds_compat.load_loss_scaler_state(SimpleNamespace(loss_scaler=fresh), saved)
    assert ds_compat.loss_scaler_state(SimpleNamespace(loss_scaler=fresh)) == saved


def test_torch_sharded_grad_scaler_unscales_through_the_hook_fmtrain_overrides() -> None:
    from torch.amp.grad_scaler import GradScaler
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    params = list(inspect.signature(ShardedGradScaler._unscale_grads_).parameters)
    assert params == ["self", "optimizer", "inv_scale", "found_inf", "allow_fp16"]
    assert "self._unscale_grads_(" in inspect.getsource(ShardedGradScaler.unscale_)
    assert "found_inf_per_device" in inspect.getsource(GradScaler.unscale_)
    assert "_per_optimizer_states" in inspect.getsource(GradScaler)
    assert isinstance(torch_compat.local_tensor_grad_scaler("cpu"), ShardedGradScaler)


def test_submitit_renders_every_parameter_fmtrain_passes() -> None:
    from submitit.slurm.slurm import _make_sbatch_string

    from launch.slurm import sbatch_parameters, setup_lines

    full = LauncherConfig(
        name="slurm",
        partition="p",
        account="a",
        qos="q",
        constraint="c",
        exclude="n1",
        cpus_per_task=2,
        gpus_per_node=1,
        mem_gb=2.5,
    )
    params = sbatch_parameters(full)
    accepted = set(inspect.signature(_make_sbatch_string).parameters)
    assert set(params) | {"command", "folder", "setup", "map_count"} <= accepted
    script = submitit_compat.make_sbatch_string("python -u job.py", Path("/tmp/x/%j"), setup_lines(full, None), None, **params)
    for line in ("#SBATCH --partition=p", "#SBATCH --mem=2560MB", "#SBATCH --requeue", "--kill-on-bad-exit=1"):
        assert line in script, line
    assert submitit_compat.convert_mem(16) == "16GB" and submitit_compat.convert_mem(0.5) == "512MB"
    assert importlib.util.find_spec(submitit_compat.SUBMIT_MODULE) is not None


def test_deepspeed_builds_its_shared_memory_all_reduce_only_for_an_op_marked_compatible() -> None:
    """skip_shared_memory_all_reduce marks the op incompatible: DeepSpeed's backend checks that mark
    before it builds the op, and uses the op for inference_all_reduce alone (training's all_reduce,
    reduce_scatter and all_gather go to torch.distributed)."""
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    ds_comm = importlib.import_module("deepspeed.comm.torch")  # the attribute deepspeed.comm.torch is torch itself

    assert ShareMemCommBuilder.NAME == ds_compat.SHM_COMM_OP
    build = inspect.getsource(ds_comm.build_shm_op)
    assert "if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):" in build
    uses = inspect.getsource(ds_comm.TorchBackend).count("shm_comm_op")
    assert uses == inspect.getsource(ds_comm.TorchBackend.__init__).count("shm_comm_op"), "used beyond its start: by what?"
    assert "torch.ops.deepspeed.inference_all_reduce_" in inspect.getsource(ds_comm.TorchBackend.inference_all_reduce)
    ds_compat.skip_shared_memory_all_reduce()
    assert ds_comm.build_shm_op() is None
