"""Process group and device: torchrun (NCCL on CUDA, gloo on CPU) or a single process.

Every os.environ read about ranks lives here. At world size 1 the reduction helpers are no-ops,
so callers never branch on distribution.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def process_group_args(device: torch.device) -> dict:
    """NCCL bound to its GPU on CUDA, gloo on CPU."""
    return {"backend": "nccl", "device_id": device} if device.type == "cuda" else {"backend": "gloo"}


def setup_dist() -> Dist:
    """Read torchrun's env; initialise the process group when launched with more than one rank."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if 8 % world_size:
        raise RuntimeError(f"WORLD_SIZE={world_size} must divide 8 (gradient accumulation is 8 // world_size)")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(**process_group_args(device))
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def teardown_dist(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()

