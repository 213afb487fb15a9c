"""Latent caching as a study's first job: encode an imagefolder dataset with the SD-VAE once, on the study's
executor (a GPU job on SLURM), before any trial starts (`study run` submits it). Trials then read the cached shard.

The shard lives in `data.cache_dir`, which a study defaults to `<out_dir>/latents` (set at spec load),
so every trial of the study, and every rerun, finds the same file. The job is idempotent: a cached
shard is found and returned at once.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from mgbench.config import DataConfig, from_dict
from mgbench.study.spec import needs_latents


def cache_latents(data: dict[str, Any]) -> dict[str, Any]:
    """The job: load (and, the first time, encode) the dataset; returns where the shard is and its size."""
    import torch

    from mgbench.trainer.data import load_dataset

    cfg = from_dict(DataConfig, data, "data")
    t0 = time.time()
    ds = load_dataset(cfg, device="cuda" if torch.cuda.is_available() else "cpu")
    return {"shard": ds.meta["cache"], "images": len(ds), "shape": list(ds.shape), "seconds": time.time() - t0}


def run_latents_job(spec: Any, echo: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Submit the caching job on the study's executor and wait for it (None when there is nothing to do)."""
    if not needs_latents(spec.base):
        return None
    from mgbench.study.executors import make_executor

    executor = make_executor(spec)
    executor.update_parameters(name=f"{spec.name}-latents")
    job = executor.submit(cache_latents, spec.base["data"])
    echo(f"[{spec.name}] latents: job {job.job_id} caches {spec.base['data']['path']} "
         f"into {spec.base['data']['cache_dir']}")
    result = job.result()
    echo(f"[{spec.name}] latents: {result['images']} images -> {result['shard']} ({result['seconds']:.0f} s)")
    return result


def describe(spec: Any) -> list[str]:
    """Dry-run lines for the caching job."""
    if not needs_latents(spec.base):
        return []
    d = spec.base["data"]
    return [f"first job: cache SD-VAE latents of {d['path']} (vae {d['vae']}, scale {d.get('vae_scale', 0.18215)}) "
            f"into {d['cache_dir']}, then the trials"]
