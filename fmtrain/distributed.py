"""The torch distributed environment of one process, read from the variables every launcher sets.

Launchers (local elastic agent, Slurm, Ray) translate their own world into RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT; this module reads only those.

    env = DistEnv.from_environ()
    device = env.init(device="auto")      # gloo on CPU, nccl on CUDA; no-op for one process
    ...
    env.close()
"""

from __future__ import annotations

import ctypes
import datetime
import os
import signal
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0  # which of the job's nodes this rank is on
    owns_group: bool = field(default=False, compare=False)  # init() created the process group (close() ends it)

    @classmethod
    def from_environ(cls) -> DistEnv:
        """The launcher's variables: torchrun's (GROUP_RANK: the node), as every launcher sets them; Ray Train
        names the node NODE_RANK."""
        get = os.environ.get
        return cls(
            rank=int(get("RANK", 0)),
            world_size=int(get("WORLD_SIZE", 1)),
            local_rank=int(get("LOCAL_RANK", 0)),
            local_world_size=int(get("LOCAL_WORLD_SIZE", 1)),
            node_rank=int(get("GROUP_RANK") or get("NODE_RANK") or 0),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def init(self, device: str = "auto", timeout_s: float = 600.0) -> torch.device:
        """Pick this rank's device and, for more than one process, join the process group."""
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(self.local_rank)
            chosen = torch.device("cuda", self.local_rank)
        else:
            chosen = torch.device("cpu")
        # A launcher's rendezvous (MASTER_ADDR) gets a process group even for one process: sharded
        # strategies build a device mesh whatever the world size.
        if (self.distributed or "MASTER_ADDR" in os.environ) and not dist.is_initialized():
            backend = "nccl" if use_cuda else "gloo"
            dist.init_process_group(
                backend, timeout=datetime.timedelta(seconds=timeout_s), device_id=chosen if use_cuda else None
            )
            object.__setattr__(self, "owns_group", True)
        return chosen

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group if this object joined it (Ray Train's own group is Ray's to close)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        object.__setattr__(self, "owns_group", False)


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the launcher that started it dies.

    Without it a launcher killed with SIGKILL (OOM killer, a user's kill -9) leaves its workers
    blocked in a collective until the timeout, holding memory and GPUs.
    """
    if sys.platform != "linux":
        return
    pr_set_pdeathsig = 1
    parent = os.getppid()
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
