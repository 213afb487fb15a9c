"""Samples for evaluation: class-balanced labels, one seed per sample, split over ranks, gathered on rank 0.

Sample i has label i % num_classes and seed `seed + i`; rank r draws the indices r, r + world, ...
in batches, so a sample does not depend on the batch size or the number of ranks. Each rank
post-processes its own samples (e.g. decodes latents to uint8 images) before they are gathered, in rounds
of `gather_chunk` indices: rank 0 holds the result and one round, never every rank's share at once
(50K ImageNet-256 images are 9.8 GB; pickled in one gather they were several times that).
"""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

SampleFn = Callable[[torch.Tensor, Sequence[int]], Any]  # (labels, seeds) -> SampleResult or tensor
GATHER_CHUNK = 1024  # sample indices moved to rank 0 per gather round (eval.gather_chunk)


@dataclass
class Generated:
    x: torch.Tensor | None   # (N, ...) in index order after post-processing (None on ranks > 0)
    y: torch.Tensor | None   # (N,) labels
    nfe: int                 # network forwards per sample (from the sampler)
    seconds: float           # wall time of this rank's sampling


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """Labels 0, 1, ..., C-1, 0, 1, ...: class-balanced for any n."""
    return torch.arange(n) % num_classes


def rank_indices(n: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The sample indices one rank draws (strided)."""
    return list(range(rank, n, world_size))


def generate(sample_fn: SampleFn, n: int, num_classes: int, *, seed: int = 0, batch_size: int = 256,
             rank: int = 0, world_size: int = 1, postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
             gather_chunk: int = GATHER_CHUNK) -> Generated:
    """Draw n samples over all ranks and gather them on rank 0 in index order (`gather_chunk` indices a round)."""
    t0 = time.perf_counter()
    idx, local, nfe = draw_share(sample_fn, n, num_classes, seed=seed, batch_size=batch_size, rank=rank,
                                 world_size=world_size, postprocess=postprocess)
    seconds = time.perf_counter() - t0
    labels = balanced_labels(n, num_classes)
    if world_size == 1:
        return Generated(local, labels, nfe, seconds)
    gathered = gather_in_rounds(idx, local, n, rank, world_size, gather_chunk)
    if rank != 0:
        return Generated(None, None, nfe, seconds)
    return Generated(gathered, labels, nfe, seconds)


def gather_in_rounds(idx: list[int], local: torch.Tensor, n: int, rank: int, world_size: int,
                     chunk: int) -> torch.Tensor | None:
    """Every rank's (ascending indices, samples) -> all n samples in index order on rank 0 (None elsewhere),
    moving the indices [start, start + chunk) per round into one preallocated tensor."""
    out, sent = None, 0
    for start in range(0, n, max(1, chunk)):
        upto = bisect.bisect_left(idx, start + max(1, chunk), lo=sent)  # this rank's indices in the round
        part = (idx[sent:upto], local[sent:upto])
        sent = upto
        parts: list[Any] | None = [None] * world_size if rank == 0 else None
        dist.gather_object(part, parts, dst=0)
        if rank != 0:
            continue
        if out is None:  # rank 0 draws index 0, so its own share gives the shape
            out = torch.empty((n, *local.shape[1:]), dtype=local.dtype)
        for ids, x in parts:
            if ids:
                out[torch.tensor(ids)] = x
    return out


def draw_share(sample_fn: SampleFn, n: int, num_classes: int, *, seed: int = 0, batch_size: int = 256,
               rank: int = 0, world_size: int = 1, postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None
               ) -> tuple[list[int], torch.Tensor, int]:
    """One rank's share: (indices, post-processed samples on the CPU, NFE per sample)."""
    labels = balanced_labels(n, num_classes)
    mine = rank_indices(n, rank, world_size)
    xs, nfe = [], 0
    for start in range(0, len(mine), batch_size):
        idx = mine[start:start + batch_size]
        res = sample_fn(labels[idx], [seed + i for i in idx])
        x = (res.x if hasattr(res, "x") else res).detach()
        nfe = int(getattr(res, "nfe", nfe))
        xs.append((postprocess(x) if postprocess is not None else x).cpu())
    return mine, (torch.cat(xs) if xs else torch.empty(0)), nfe


def assemble(parts: Sequence[tuple[list[int], torch.Tensor]]) -> torch.Tensor:
    """Put the (indices, samples) shares of all ranks back in index order."""
    idx = torch.tensor([i for p in parts for i in p[0]])
    x = torch.cat([p[1] for p in parts if len(p[0])])
    out = torch.empty_like(x)
    out[idx] = x
    return out


def save_images(images: torch.Tensor, out: str | Path, labels: torch.Tensor | None = None,
                fmt: str = "npz") -> list[Path]:
    """Write uint8 (N, C, H, W) images as an ADM-style `samples.npz` (arr_0 NHWC, arr_1 labels) and/or PNGs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    nhwc = images.permute(0, 2, 3, 1).contiguous().numpy()
    written = []
    if fmt in ("npz", "both"):
        arrays = {"arr_0": nhwc}
        if labels is not None:
            arrays["arr_1"] = labels.cpu().numpy()
        np.savez(out / "samples.npz", **arrays)
        written.append(out / "samples.npz")
    if fmt in ("png", "both"):
        from PIL import Image

        folder = out / "png"
        folder.mkdir(exist_ok=True)
        for i, img in enumerate(nhwc):
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / f"{i:06d}.png")
        written.append(folder)
    return written
