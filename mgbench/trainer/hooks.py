"""What the trainer hands to an evaluation hook, and what it gets back.

An evaluation hook is any callable `hook(ctx: EvalContext) -> dict[str, float]` (metric name ->
value, names without the `eval/` prefix). The trainer calls it every `train.eval_every` steps and
at the end, logs the values as `eval/<name>` and hands them to automatic w, whose probes
(`ctx.probes`: the same checkpoint sampled with other guidance) come back as `probe/<name>/<metric>`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from mgbench.config import TrainConfig
from mgbench.trainer.data import Dataset


@dataclass
class EvalContext:
    cfg: TrainConfig
    model: torch.nn.Module          # the EMA model, in eval mode
    step: int
    w: float                        # the current w (moves under automatic w)
    device: torch.device
    dataset: Dataset                # the training data (reference statistics, decoding)
    out_dir: str                    # the run's folder (for files the hook wants to keep)
    rank: int = 0
    world_size: int = 1
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)  # auto-w: name -> sampling overrides to measure too

    def sample(self, labels: torch.Tensor, seeds: Sequence[int], **overrides: Any):
        """Sample with the run's sampling settings (overridable: guidance, cfg_scale, steps, ...).

        Returns a `sampling.SampleResult` whose `x` is in model space (use `dataset.decode`).
        """
        from mgbench.trainer.sampling import sample, sampling_kwargs

        kw = sampling_kwargs(self.cfg, self.w, self.dataset)
        kw.update(overrides)
        return sample(self.model, labels=labels.to(self.device), seeds=seeds, device=self.device, **kw)


EvalHook = Callable[[EvalContext], dict[str, float]]
