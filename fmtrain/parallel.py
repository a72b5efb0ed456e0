"""The parallel degrees of a run, and the device mesh they describe.

One object owns them: it derives the degrees from the strategy and the world size, refuses a plan
that cannot run (before launch, without torch.distributed), and builds the mesh inside the job.

    dims = ParallelDims.from_config(cfg.strategy, world_size=8)   # strategy=fsdp_tp strategy.tp=2
    (dims.dp, dims.tp) == (4, 2)
    mesh = dims.build_mesh("cpu")                                 # inside the job: dims ("dp", "tp")

Ranks are laid out row-major over (dp, tp): tensor-parallel peers are neighbours (on one node, on
the fast links), and ``rank = dp_rank * tp + tp_rank``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fmtrain.config import ConfigError, StrategyConfig

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

SHARDED = ("fsdp", "fsdp_tp")  # strategies whose data-parallel ranks each hold a shard of the state
TENSOR_PARALLEL = ("tp", "fsdp_tp")


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    dp: int  # data-parallel degree: ranks that see different data (replicas or shards)
    tp: int  # tensor-parallel degree: ranks that split each layer and see the same data

    @classmethod
    def from_config(cls, cfg: StrategyConfig, world_size: int) -> ParallelDims:
        tp = cfg.tp
        if cfg.name not in TENSOR_PARALLEL:
            if tp not in (None, 1):
                raise ConfigError("strategy.tp", tp, f"tensor parallelism needs strategy=tp or fsdp_tp, not {cfg.name}")
            tp = 1
        elif tp is None:
            if cfg.name == "fsdp_tp":
                raise ConfigError(
                    "strategy.tp",
                    tp,
                    f"strategy=fsdp_tp needs the tensor-parallel degree, e.g. strategy.tp=2 (world size {world_size})",
                )
            tp = world_size
        if tp < 1 or world_size % tp:
            raise ConfigError("strategy.tp", tp, f"must divide the world size {world_size}")
        dims = cls(world_size=world_size, dp=world_size // tp, tp=tp)
        if cfg.name == "tp" and dims.dp != 1:
            raise ConfigError(
                "strategy.tp",
                tp,
                f"strategy=tp splits layers over every rank: tp must equal the world size {world_size} (or use fsdp_tp)",
            )
        if cfg.name == "fsdp_tp" and dims.dp < 2:
            raise ConfigError(
                "strategy.tp",
                tp,
                f"strategy=fsdp_tp needs at least 2 data-parallel shards: tp <= {world_size // 2} for world size {world_size}",
            )
        return dims

    def dp_rank(self, rank: int) -> int:
        return rank // self.tp

    def build_mesh(self, device_type: str) -> DeviceMesh:
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(device_type, (self.dp, self.tp), mesh_dim_names=("dp", "tp"))
