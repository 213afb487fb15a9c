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
    header: str = ""               # short column header in reports (default: the metric's name)
    meaning: str = ""              # one-line definition written under report tables
    axis: str = ""                 # quality | diversity: an axis the guidance frontier may plot (mgbench frontier)


METRICS: dict[str, MetricInfo] = {
    "fid": MetricInfo(False, "image", "FID", "Frechet distance to the reference features", "quality"),
    "sfid": MetricInfo(False, "image", "sFID", "FID on spatial features"),
    "is": MetricInfo(True, "image", "IS", "Inception score", "quality"),
    "kid": MetricInfo(False, "image", "KID", "kernel inception distance"),
    "precision": MetricInfo(True, "image", "Prec.", "share of samples inside the reference manifold", "quality"),
    "recall": MetricInfo(True, "image", "Rec.", "share of the reference inside the samples' manifold", "diversity"),
    "img_per_s": MetricInfo(True, "speed", "IMG/S", "sampling throughput, images per second"),
    "in_class": MetricInfo(True, "grid2d", "in-class", "share of samples on a square of their own class", "quality"),
    "wrong_class": MetricInfo(False, "grid2d", "wrong-class", "share of samples on a square of the other class"),
    "off_board": MetricInfo(False, "grid2d", "off-board", "share of samples outside the 4x4 board"),
    "off_support": MetricInfo(False, "grid2d", "outside own class",
                              "wrong-class + off-board = 1 - in-class (the studies' name `off_support`)", "quality"),
    "coverage": MetricInfo(True, "grid2d", "coverage",
                           "share of the class squares holding >= k samples of their class (k: a quarter of the "
                           "uniform count per square)", "diversity"),
    "subcell_coverage": MetricInfo(True, "grid2d", "sub-cell coverage",
                                   "the same on 4x4 sub-cells per square, k: half the uniform count per sub-cell "
                                   "(falls as guidance empties the squares' edges)"),
    # swd: grows monotonically with guidance strength (samples pile into the squares' far corners), while coverage
    # saturates at 1.0 with 2,000 samples (measured on frontier_grid2d_small): the grid2d frontier's diversity axis.
    "swd": MetricInfo(False, "grid2d", "SWD", "sliced Wasserstein-1 distance to true samples of the same class",
                      "diversity"),
    "center_dist": MetricInfo(False, "grid2d", "dist. to centre",
                              "mean distance from a sample to the centre of the nearest square of its class"),
}
FAMILIES = ("image", "grid2d", "speed")


def metric_info(name: str) -> MetricInfo:
    """The registry entry of a metric; KeyError names the known ones."""
    if name not in METRICS:
        raise KeyError(f"unknown metric {name!r} (known: {', '.join(METRICS)})")
    return METRICS[name]


def arrow(name: str) -> str:
    """The better direction as an arrow for a column header: ↑ higher is better, ↓ lower is better."""
    return "↑" if higher_is_better(name) else "↓"


def family_metrics(family: str) -> list[str]:
    """The metrics of one family, in registry order."""
    return [m for m, info in METRICS.items() if info.family == family]


def axis_metrics(axis: str) -> list[str]:
    """The metrics that may serve as the frontier's `quality` or `diversity` axis, in registry order."""
    return [m for m, info in METRICS.items() if info.axis == axis]


def higher_is_better(name: str) -> bool:
    """Whether a larger value of the metric means a better model."""
    return metric_info(name).higher_is_better


def better_sign(name: str) -> float:
    """+1 if higher is better, -1 if lower is better: sign * (a - b) > 0 means a is better than b."""
    return 1.0 if higher_is_better(name) else -1.0
