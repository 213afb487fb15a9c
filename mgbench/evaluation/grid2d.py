"""Metrics of the two-class checkerboard (Fig. 2): where the samples land relative to their class's squares.

- in_class: share of samples inside a square of their own class.
- off_support: share outside every square of their class, i.e. outside the board or in a square of
  the other class (so off_support = 1 - in_class; the "outlier rate" of the notes).
- coverage: share of the class squares (both classes together) that hold at least k samples of
  their class; k defaults to a quarter of the count a uniform sampler would put in each square
  (n_c / squares_c / 4, at least 1), so coverage means the same at every N.
- swd: sliced Wasserstein-1 distance to true samples of the same labels, per class and averaged
  over classes, on `directions` evenly spaced directions (deterministic).
- center_dist: mean distance to the centre of the nearest square of the sample's class.
"""
from __future__ import annotations

import math

import torch

from mgbench.trainer.data import Grid2D

GRID_METRICS = ("in_class", "off_support", "coverage", "swd", "center_dist")


def in_class(points: torch.Tensor, labels: torch.Tensor, grid: Grid2D) -> float:
    """Share of points inside a square of their own class."""
    return float((grid.class_of(points) == labels).float().mean())


def off_support(points: torch.Tensor, labels: torch.Tensor, grid: Grid2D) -> float:
    """Share of points outside the board or in a square of the other class."""
    return 1.0 - in_class(points, labels, grid)


def coverage_k(n_class: int, grid: Grid2D) -> int:
    """The default k of coverage: a quarter of the uniform count per square (at least 1)."""
    squares = len(grid.class_cells(0))
    return max(1, int(n_class / squares / 4))


def coverage(points: torch.Tensor, labels: torch.Tensor, grid: Grid2D, k: int = 0) -> float:
    """Share of class squares holding >= k samples of that class (k = 0: coverage_k per class)."""
    ij = grid.cell_index(points)
    covered, total = 0, 0
    for c in (0, 1):
        mine = labels == c
        kc = k if k > 0 else coverage_k(int(mine.sum()), grid)
        in_sq = mine & (grid.class_of(points) == c)
        counts = torch.zeros(grid.cells, grid.cells, dtype=torch.long)
        counts.index_put_((ij[in_sq, 0], ij[in_sq, 1]), torch.ones(int(in_sq.sum()), dtype=torch.long),
                          accumulate=True)
        cells = grid.class_cells(c)
        covered += sum(int(counts[i, j] >= kc) for i, j in cells)
        total += len(cells)
    return covered / total


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: int = 64) -> float:
    """SW-1 between two 2D point sets on evenly spaced directions (quantiles matched when sizes differ)."""
    angles = torch.arange(directions, dtype=torch.float64) * math.pi / directions
    dirs = torch.stack([angles.cos(), angles.sin()], dim=1)           # (L, 2)
    pa, pb = (a.double() @ dirs.T).sort(0).values, (b.double() @ dirs.T).sort(0).values
    if len(pa) != len(pb):
        q = torch.linspace(0, 1, max(len(pa), len(pb)), dtype=torch.float64)
        pa, pb = _quantiles(pa, q), _quantiles(pb, q)
    return float((pa - pb).abs().mean())


def _quantiles(sorted_x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Linear-interpolated quantiles of each column of a sorted (N, L) tensor."""
    pos = q * (len(sorted_x) - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=len(sorted_x) - 1)
    frac = (pos - lo).unsqueeze(1)
    return sorted_x[lo] * (1 - frac) + sorted_x[hi] * frac


def class_swd(points: torch.Tensor, labels: torch.Tensor, true_points: torch.Tensor, true_labels: torch.Tensor,
              directions: int = 64) -> float:
    """SW-1 per class between samples and true points of that class, averaged over the classes present."""
    vals = [sliced_wasserstein(points[labels == c], true_points[true_labels == c], directions)
            for c in labels.unique().tolist() if (true_labels == c).any()]
    return sum(vals) / len(vals)


def center_dist(points: torch.Tensor, labels: torch.Tensor, grid: Grid2D) -> float:
    """Mean distance to the centre of the nearest square of each point's class."""
    out = torch.empty(len(points), dtype=torch.float64)
    for c in (0, 1):
        mine = labels == c
        centres = torch.tensor([grid.cell_center(i, j) for i, j in grid.class_cells(c)], dtype=torch.float64)
        out[mine] = torch.cdist(points[mine].double(), centres).min(1).values
    return float(out.mean())


def grid_metrics(points: torch.Tensor, labels: torch.Tensor, grid: Grid2D, *, k: int = 0, seed: int = 0,
                 directions: int = 64) -> dict[str, float]:
    """All grid2d metrics; true samples for swd are drawn with the same labels from `seed`."""
    points, labels = points.detach().cpu().float(), labels.detach().cpu().long()
    true, _ = grid.sample(len(labels), labels, torch.Generator().manual_seed(seed))
    return {"in_class": in_class(points, labels, grid), "off_support": off_support(points, labels, grid),
            "coverage": coverage(points, labels, grid, k), "swd": class_swd(points, labels, true, labels, directions),
            "center_dist": center_dist(points, labels, grid)}
