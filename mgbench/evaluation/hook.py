"""The trainer's evaluation hook: generate, decode, measure; optional CFG sweep and IMG/S.

Returned names have no `eval/` prefix (fid, sfid, is, kid, precision, recall, in_class, off_support,
coverage, swd, center_dist, img_per_s, nfe); sweep entries are named by `tracking.metric_sweep`
(`sweep/cfg_scale_0.50/fid`), w-input sweeps by `tracking.metric_wsweep`, auto-w probes by
`tracking.metric_probe`; the trainer logs those as they are. Every rank samples its share; rank 0
computes the metrics and broadcasts them, so all ranks return the same dict. What rank 0 computes alone
goes through `distributed.on_rank0`: an error there (a missing reference, a failed extractor) is raised
on every rank at once, not left to the process-group timeout.

Evaluation noise is measured, not assumed: each evaluation draws `eval.sample_seeds` (K) disjoint
sample sets (seed index k: sample i has seed `sample.seed + k * SEED_STRIDE + i`, the same in every
run, so two runs' values at seed k are paired) and returns each metric's mean over the K sets, its
standard error `<metric>_se` and the values `<metric>/seed_k` (names from `tracking`). K = 1 gives
exactly the single evaluation of before.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mgbench import tracking as T
from mgbench.config import ConfigError, TrainConfig
from mgbench.evaluation import metrics as M
from mgbench.evaluation.generate import generate, save_images
from mgbench.evaluation.grid2d import grid_metrics
from mgbench.evaluation.speed import measure_throughput
from mgbench.trainer import distributed as D
from mgbench.trainer.data import Grid2D
from mgbench.trainer.hooks import EvalContext, EvalHook
from mgbench.trainer.sampling import sampling_kwargs

SEED_STRIDE = 1_000_003   # sample-seed index k draws sample i with seed `sample.seed + k * SEED_STRIDE + i`
SHARED = ("nfe", "extractor_acc", "img_per_s")  # the same at every sample seed: logged once, without SE


def startup_problems(cfg: TrainConfig) -> list[str]:
    """The start-up checks of this evaluation hook (extractor weights) and its ADM reference file, as
    `field: what is wrong (what is allowed)` lines (`study validate` adds them to the trainer's)."""
    problems = []
    try:
        M.check_extractor_weights(cfg.eval, cfg.data)
    except ConfigError as e:
        problems.append(str(e))
    ref = cfg.eval.reference
    if ref and not Path(ref).expanduser().is_file():
        problems.append(f"eval.reference: {ref!r} does not exist (allowed: an ADM reference batch .npz file)")
    return problems


def make_eval_hook(cfg: TrainConfig) -> EvalHook:
    """An evaluation hook for a trainer config; the extractor and reference are resolved once, on first use.
    A missing weights file is an error now, before any training step."""
    M.check_extractor_weights(cfg.eval, cfg.data)
    state: dict[str, Any] = {}

    def hook(ctx: EvalContext) -> dict[str, float]:
        out = evaluate(ctx, state)
        if ctx.rank == 0:
            out[T.M_SAMPLE_SEEDS.split("/", 1)[1]] = float(ctx.cfg.eval.sample_seeds)
        base = sampling_kwargs(ctx.cfg, ctx.w, ctx.dataset)["guidance"]
        sweeps = not ctx.cfg.eval.sweep_final_only or ctx.step >= ctx.cfg.train.steps
        for scale in ctx.cfg.eval.cfg_sweep if sweeps else ():
            guidance = "mg+cfg" if base in ("mg", "mg+cfg") else "cfg"
            swept = evaluate(ctx, state, timing=False, guidance=guidance, cfg_scale=float(scale))
            out.update({T.metric_sweep(scale, k): v for k, v in swept.items()})
        if ctx.cfg.model.w_input:
            for w in ctx.cfg.eval.w_sweep if sweeps else ():
                swept = evaluate(ctx, state, timing=False, guidance="mg", w=float(w))
                out.update({T.metric_wsweep(w, k): v for k, v in swept.items()})
        for name, overrides in ctx.probes.items():
            probed = evaluate(ctx, state, timing=False, **overrides)
            out.update({T.metric_probe(name, k): v for k, v in probed.items()})
        return _broadcast(out, ctx)

    return hook


def evaluate(ctx: EvalContext, state: dict[str, Any], *, timing: bool = True, **overrides: Any) -> dict[str, float]:
    """One evaluation at `eval.sample_seeds` sample seeds: each metric's mean, SE and per-seed values (rank 0)."""
    ev = ctx.cfg.eval
    per_seed = [evaluate_once(ctx, state, ctx.cfg.sample.seed + k * SEED_STRIDE, save=k == 0 and not overrides,
                              **overrides) for k in range(ev.sample_seeds)]
    out = D.on_rank0(lambda: _summary(ctx, per_seed, timing, overrides), ctx.rank, ctx.world_size)
    return out if ctx.rank == 0 else {}


def _summary(ctx: EvalContext, per_seed: list[dict[str, float]], timing: bool, overrides: dict[str, Any]
             ) -> dict[str, float]:
    """Rank 0: the per-seed metrics summarised, plus IMG/S when asked."""
    ev = ctx.cfg.eval
    out = summarise(per_seed)
    if timing and "img_per_s" in ev.metrics:
        data = ctx.dataset
        speed = measure_throughput(lambda labels, seeds: ctx.sample(labels, seeds, **overrides),
                                   batch_size=min(ev.batch_size, ev.n_samples),
                                   num_classes=data.num_classes, device=ctx.device)
        out["img_per_s"] = speed["img_per_s"]
    return out


def summarise(per_seed: list[dict[str, float]]) -> dict[str, float]:
    """Per-seed metric dicts -> mean, `_se` (K >= 2) and `/seed_k` values; SHARED entries once."""
    out: dict[str, float] = {}
    k = len(per_seed)
    for name in per_seed[0]:
        values = np.array([d[name] for d in per_seed], dtype=float)
        out[name] = float(values.mean())
        if name in SHARED or k < 2:
            continue
        out[T.metric_se(name)] = float(values.std(ddof=1) / np.sqrt(k))
        out.update({T.metric_seed(name, i): float(v) for i, v in enumerate(values)})
    return out


def evaluate_once(ctx: EvalContext, state: dict[str, Any], seed: int, *, save: bool = False,
                  **overrides: Any) -> dict[str, float]:
    """One sample set drawn from `seed` with the run's sampler (plus overrides); metrics on rank 0, {} elsewhere."""
    ev, data = ctx.cfg.eval, ctx.dataset

    def sample_fn(labels: torch.Tensor, seeds: list[int]):
        return ctx.sample(labels, seeds, **overrides)

    points = data.kind == "points"
    gen = generate(sample_fn, ev.n_samples, data.num_classes, seed=seed, batch_size=ev.batch_size,
                   rank=ctx.rank, world_size=ctx.world_size, postprocess=None if points else data.to_uint8,
                   gather_chunk=ev.gather_chunk)
    out = D.on_rank0(lambda: _measure(ctx, state, gen, seed, save), ctx.rank, ctx.world_size)
    return out if ctx.rank == 0 else {}


def _measure(ctx: EvalContext, state: dict[str, Any], gen: Any, seed: int, save: bool) -> dict[str, float]:
    """Rank 0: the metrics of one gathered sample set (its images saved when asked)."""
    ev, data = ctx.cfg.eval, ctx.dataset
    if data.kind == "points":
        grid = data.meta.get("grid") or Grid2D(ctx.cfg.data.grid_cells)
        out = grid_metrics(gen.x, gen.y, grid, k=ev.coverage_k, seed=seed + 1)
    else:
        out = _image_metrics(ctx, state, gen.x)
        if ev.save != "none" and save:
            save_images(gen.x, Path(ctx.out_dir) / "eval" / f"step_{ctx.step:08d}", gen.y, ev.save)
    out["nfe"] = float(gen.nfe)
    return out


def _image_metrics(ctx: EvalContext, state: dict[str, Any], images: torch.Tensor) -> dict[str, float]:
    """FID & co. of uint8 images against the run's reference (resolved and cached in `state`)."""
    ev = ctx.cfg.eval
    names = M.normalise_metrics(ev.metrics)
    if not names:
        return {}
    if "extractor" not in state:
        state["extractor"] = M.resolve_extractor(ev, ctx.cfg.data)
    ex = state["extractor"]
    if "reference" not in state:
        if ev.reference:
            state["reference"] = M.adm_reference(ev.reference, ex, names, ev.cache_dir,
                                                 batch_size=ev.batch_size, device=ctx.device)
        else:
            state["reference"] = M.dataset_reference(ctx.cfg.data, ex, names, ev.cache_dir, n=ev.n_reference,
                                                     batch_size=ev.batch_size, device=ctx.device,
                                                     dataset=ctx.dataset)  # the training split
    out = M.image_metrics(images, state["reference"], ex, names, batch_size=ev.batch_size, device=ctx.device)
    if "classifier_test_accuracy" in ex.info:
        out["extractor_acc"] = float(ex.info["classifier_test_accuracy"])
    return out


def _broadcast(out: dict[str, float], ctx: EvalContext) -> dict[str, float]:
    """Rank 0's metrics on every rank."""
    return D.on_rank0(lambda: out, ctx.rank, ctx.world_size)
