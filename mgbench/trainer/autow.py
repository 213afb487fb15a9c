"""Automatic w: start at vanilla (w = 1) and move w by an EMA from intermediate evaluations.

The rule (ours; the paper describes automatic w without giving its update): keep a direction,
initially "raise". At each evaluation, compare the driving metric (lower is better, e.g. FID) with
the previous evaluation. If quality fell (the metric rose) the last move hurt: reverse the direction.
Otherwise keep it. Then target = w + direction * step (clipped to [1, w_max]) and
w <- decay * w + (1 - decay) * target. The state is a plain dict, saved in every checkpoint.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from mgbench.config import AutoWConfig


@dataclass
class AutoW:
    cfg: AutoWConfig
    w: float = 1.0
    direction: float = 1.0
    last_metric: float | None = None
    history: list[tuple[int, float, float]] = field(default_factory=list)  # (step, metric, w after)

    def update(self, step: int, metric: float) -> float:
        """Take one evaluation result and return the new w."""
        if not math.isfinite(metric):
            return self.w
        if self.last_metric is not None and metric > self.last_metric:
            self.direction = -self.direction
        target = min(max(self.w + self.direction * self.cfg.step, 1.0), self.cfg.w_max)
        self.w = self.cfg.decay * self.w + (1 - self.cfg.decay) * target
        self.last_metric = metric
        self.history.append((step, metric, self.w))
        return self.w

    def state_dict(self) -> dict:
        d = asdict(self)
        d.pop("cfg")
        return d

    def load_state_dict(self, d: dict) -> None:
        self.w, self.direction, self.last_metric = d["w"], d["direction"], d["last_metric"]
        self.history = [tuple(h) for h in d["history"]]
