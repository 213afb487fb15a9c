"""torch.distributed from the environment (torchrun, or submitit's exported variables); a no-op alone.

What rank 0 alone decides or computes (metrics, a prune decision, a checkpoint) goes through `on_rank0`:
its value, or its exception, reaches every rank, so no rank is left waiting in a collective that rank 0
has left.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


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


class RankZeroError(RuntimeError):
    """Rank 0 raised an exception that cannot be sent to the other ranks; they raise this, with its text."""


def on_rank0(fn: Callable[[], T], rank: int, world_size: int) -> T:
    """Run `fn` on rank 0 only and return its value on every rank; an exception there is raised on every rank
    (the others raise a copy of it, noted as rank 0's) instead of leaving them in the next collective."""
    if world_size == 1 or not dist.is_initialized():
        return fn()
    box: list[Any] = [None]
    if rank == 0:
        try:
            box = [_sendable((True, fn()))]
        except Exception as e:
            dist.broadcast_object_list([_sendable((False, e))], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if ok:
        return value
    if rank != 0:
        value.add_note("(raised on rank 0 and sent to every rank)")
    raise value


def _sendable(outcome: tuple[bool, Any]) -> tuple[bool, Any]:
    """The outcome itself when it survives pickling, else a RankZeroError with its text."""
    try:
        pickle.loads(pickle.dumps(outcome))
        return outcome
    except Exception:  # noqa: BLE001 - any object pickle refuses
        ok, value = outcome
        what = f"{type(value).__name__}: {value}" if not ok else f"a result of type {type(value).__name__}"
        return False, RankZeroError(f"rank 0 produced {what} (cannot be sent to the other ranks)")
