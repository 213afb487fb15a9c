"""IMG/S: sampling throughput at a given batch and step count, with the NFE per image beside it.

Seconds per image are not comparable across hardware (Table 1); the ratio between methods on the
same machine is what carries over (MG: one forward per step, CFG: two).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import torch


def measure_throughput(sample_fn: Callable[[torch.Tensor, Sequence[int]], Any], *, batch_size: int,
                       num_classes: int, warmup: int = 1, repeats: int = 3,
                       device: str | torch.device | None = None) -> dict[str, float]:
    """Images per second of `sample_fn(labels, seeds)` on one batch: warm-up runs, then the median of repeats."""
    labels = torch.arange(batch_size) % num_classes
    seeds = list(range(batch_size))
    cuda = device is not None and torch.device(device).type == "cuda"
    times, nfe = [], 0
    for i in range(warmup + repeats):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        res = sample_fn(labels, seeds)
        if cuda:
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        nfe = int(getattr(res, "nfe", 0))
    sec = statistics.median(times)
    return {"img_per_s": batch_size / sec, "nfe": float(nfe), "s_per_batch": sec}
