"""torch.distributed from the environment (torchrun, or submitit's exported variables); a no-op alone."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def setup(device: str = "auto") -> DistEnv:
    """Join the process group named by RANK/WORLD_SIZE/MASTER_ADDR (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    dev = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return DistEnv(rank, world, local, dev)


def wrap(model: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    if env.world_size == 1:
        return model
    ids = [env.device.index] if env.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def mean(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean of a scalar over ranks."""
    if env.world_size == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / env.world_size


def barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        dist.barrier()
