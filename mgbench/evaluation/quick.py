"""A cheap grid2d evaluation for quick studies and scheduling benches (`eval_hook: mgbench.evaluation.quick:...`).

`quick_eval_hook` samples the EMA model (a few hundred class-balanced samples, a few sampler steps) and measures
how many points land off their class's squares: seconds instead of the full grid2d metrics. `w_eval_hook`
reports the run's current w (a metric with a known order, for pruning checks).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

QUICK_EVAL_SAMPLES = 256  # samples per quick evaluation (class-balanced)
QUICK_EVAL_STEPS = 10     # sampler steps of a quick evaluation


def quick_eval_hook(cfg: Any) -> Callable[[Any], dict[str, float]]:
    """A grid2d evaluation hook: `off_class` = share of samples outside the squares of their label."""

    def hook(ctx: Any) -> dict[str, float]:
        grid = ctx.dataset.meta["grid"]
        labels = torch.arange(QUICK_EVAL_SAMPLES) % ctx.dataset.num_classes
        seeds = [cfg.sample.seed + i for i in range(QUICK_EVAL_SAMPLES)]
        with torch.no_grad():
            x = ctx.sample(labels, seeds, steps=QUICK_EVAL_STEPS).x.cpu()
        off = (grid.class_of(x) != labels).float().mean().item()
        return {"off_class": off, "outside": (~grid.inside(x)).float().mean().item()}

    return hook


def w_eval_hook(cfg: Any) -> Callable[[Any], dict[str, float]]:
    """An evaluation hook whose metric is the run's current w (a known order for pruning tests)."""

    def hook(ctx: Any) -> dict[str, float]:
        return {"w": float(ctx.w)}

    return hook
