"""The one table of evaluation metrics: which direction is better, and which kind of evaluation gives it.

Whatever compares metric values (automatic w, reports, searches) reads the direction here instead of
assuming "lower is better". Families: `image` (torch-fidelity on generated images), `grid2d` (the 2D
checkerboard's own measures, `mgbench.evaluation.grid2d`), `speed` (timing of the run's own sampler).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricInfo:
    higher_is_better: bool
    family: str                    # image | grid2d | speed


METRICS: dict[str, MetricInfo] = {
    "fid": MetricInfo(False, "image"),          # Frechet distance to the reference features
    "sfid": MetricInfo(False, "image"),         # FID on spatial features
    "is": MetricInfo(True, "image"),            # Inception score
    "kid": MetricInfo(False, "image"),          # kernel inception distance
    "precision": MetricInfo(True, "image"),     # share of samples inside the reference manifold
    "recall": MetricInfo(True, "image"),        # share of the reference inside the samples' manifold
    "img_per_s": MetricInfo(True, "speed"),     # sampling throughput
    "in_class": MetricInfo(True, "grid2d"),     # share of samples in a square of their own class
    "off_support": MetricInfo(False, "grid2d"),  # share of samples outside their class's squares
    "coverage": MetricInfo(True, "grid2d"),     # share of each class's squares holding >= k samples
    "swd": MetricInfo(False, "grid2d"),         # sliced Wasserstein distance to true samples, per class
    "center_dist": MetricInfo(False, "grid2d"),  # mean distance to the nearest own-class square centre
}
FAMILIES = ("image", "grid2d", "speed")


def metric_info(name: str) -> MetricInfo:
    """The registry entry of a metric; KeyError names the known ones."""
    if name not in METRICS:
        raise KeyError(f"unknown metric {name!r} (known: {', '.join(METRICS)})")
    return METRICS[name]


def higher_is_better(name: str) -> bool:
    """Whether a larger value of the metric means a better model."""
    return metric_info(name).higher_is_better


def better_sign(name: str) -> float:
    """+1 if higher is better, -1 if lower is better: sign * (a - b) > 0 means a is better than b."""
    return 1.0 if higher_is_better(name) else -1.0
