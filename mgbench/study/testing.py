"""Small stand-ins for studies on a laptop and in tests: a quick grid2d evaluation and a sleeping trainer.

`quick_eval_hook` is a real (cheap) evaluation: it samples the EMA model and measures how many points
land off their class's squares. `sleep_train` replaces the trainer when only the scheduling is under
test: it sleeps `train.steps` milliseconds and records when it ran (each execution also appends one
line to `executions.jsonl` in its folder, so a trial that ran twice shows). `failing_train` raises.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

QUICK_EVAL_SAMPLES = 256  # samples per quick evaluation (class-balanced)
QUICK_EVAL_STEPS = 10     # sampler steps of a quick evaluation
EXECUTIONS_FILE = "executions.jsonl"  # sleep_train / failing_train: one line per execution of the trial


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


def sleep_train(cfg: Any, tracker: Any = None, eval_hook: Any = None) -> Any:
    """A trainer stand-in: sleeps train.steps ms, records start/end in out_dir/timing.json, returns loss = w."""
    from mgbench.trainer.loop import TrainResult

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pid").write_text(str(os.getpid()))
    start = time.time()
    _log_execution(out, start)
    time.sleep(cfg.train.steps / 1000)
    end = time.time()
    (out / "timing.json").write_text(json.dumps({"start": start, "end": end, "pid": os.getpid()}))
    metrics = {"loss": float(cfg.objective.w)}
    if tracker is not None:
        tracker.log_metrics({"eval/loss": metrics["loss"]}, step=cfg.train.steps)
        tracker.flush()
    return TrainResult("finished", cfg.train.steps, str(out), cfg.objective.w, metrics)


def failing_train(cfg: Any, tracker: Any = None, eval_hook: Any = None) -> Any:
    """A trainer stand-in that raises (a trial whose training crashes)."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _log_execution(out, time.time())
    raise RuntimeError(f"{cfg.name}: training diverged at step 0 (failing_train)")


def _log_execution(out: Path, start: float) -> None:
    with open(out / EXECUTIONS_FILE, "a") as f:
        f.write(json.dumps({"start": start, "pid": os.getpid()}) + "\n")


def w_eval_hook(cfg: Any) -> Callable[[Any], dict[str, float]]:
    """An evaluation hook whose metric is the run's current w (a known order for pruning tests)."""

    def hook(ctx: Any) -> dict[str, float]:
        return {"w": float(ctx.w)}

    return hook
