"""Progress of an evaluation: how many samples it will draw, and a context that counts them as they are drawn."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from mgbench.config import TrainConfig
from mgbench.trainer.hooks import EvalContext
from mgbench.trainer.progress import Progress, ProgressFn

TIMING_BATCHES = 4   # IMG/S draws 1 warm-up + 3 timed batches (evaluation.speed.measure_throughput's defaults)


def planned_samples(cfg: TrainConfig, step: int) -> int:
    """Samples the evaluation hook draws: n_samples per sample seed, per pass (the run's w, each CFG / w
    sweep value), plus the IMG/S timing batches (1 warm-up + 3 repeats)."""
    ev = cfg.eval
    sweeps = not ev.sweep_final_only or step >= cfg.train.steps
    passes = 1 + (len(ev.cfg_sweep) + (len(ev.w_sweep) if cfg.model.w_input else 0) if sweeps else 0)
    timing = TIMING_BATCHES * min(ev.batch_size, ev.n_samples) if "img_per_s" in ev.metrics else 0
    return passes * ev.n_samples * ev.sample_seeds + timing


class SampleCounter:
    """Counts the samples drawn and reports them as `Progress` (unit: sample)."""

    def __init__(self, total: int, progress: ProgressFn | None) -> None:
        self.total, self.progress = total, progress
        self.done = 0
        self.started = time.perf_counter()

    def add(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            elapsed = time.perf_counter() - self.started
            self.progress(Progress(self.done, max(self.total, self.done), 0, elapsed, unit="sample"))


@dataclass
class CountingContext(EvalContext):
    counted: Callable[[int], None] | None = None   # called with the samples of every sampling call (all ranks)

    def sample(self, labels: Any, seeds: Sequence[int], **overrides: Any) -> Any:
        """EvalContext.sample, counted."""
        result = super().sample(labels, seeds, **overrides)
        if self.counted is not None:
            self.counted(len(seeds) * self.world_size)
        return result
