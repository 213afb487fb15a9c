"""Metrics of the two-class checkerboard (Fig. 2): where the samples land relative to their class's squares.

- in_class: share of samples inside a square of their own class.
- wrong_class: share on the board but in a square of the other class.
- off_board: share outside the board (the 4x4 squares).
- off_support: wrong_class + off_board = 1 - in_class (the "outlier rate" of the notes; the name that
  older studies optimise, kept so they still run: it is not "off the data's support" alone).
- coverage: share of the class squares (both classes together) that hold at least k samples of
  their class; k defaults to a quarter of the count a uniform sampler would put in each square
  (n_c / squares_c / 4, at least 1), so coverage means the same at every N. Saturates at 1.0 for any
  model that puts samples in every square (every w of the quickstart).
- subcell_coverage: the same count on a finer lattice that separates guidance strengths: each square
  split into SUBCELLS x SUBCELLS sub-cells, k = half the uniform count per sub-cell (at least 1).
  Guidance pulls samples towards square centres and away from the other class's edges, so the edge
  sub-cells empty: on the quickstart setting (2000 samples) vanilla 0.85, CFG s=1 0.64, s=2 0.45.
- swd: sliced Wasserstein-1 distance to true samples of the same labels, per class and averaged
  over classes, on `directions` evenly spaced directions (deterministic).
- center_dist: mean distance to the centre of the nearest square of the sample's class.
"""
from __future__ import annotations

import math

import torch

from mgbench.trainer.data import Grid2D

SUBCELLS = 4                 # subcell_coverage: each square split into 4 x 4 sub-cells
SUBCELL_SHARE = 0.5          # subcell_coverage: a sub-cell counts with >= this share of the uniform count


def in_class(points: torch.Tensor, labels: torch.Tensor, grid: Grid2D) -> float:
    """Share of points inside a square of their own class."""
    return float((grid.class_of(points) == labels).float().mean())


def wrong_class(points: torch.Tensor, labels: torch.Tensor, grid: Grid2D) -> float:
    """Share of points on the board in a square of the other class."""
    cls = grid.class_of(points)
    return float(((cls >= 0) & (cls != labels)).float().mean())


def off_board(points: torch.Tensor, labels: torch.Tensor, grid: Grid2D) -> float:
    """Share of points outside the board (labels unused: kept for the common signature)."""
    return float((~grid.inside(points)).float().mean())


def off_support(points: torch.Tensor, labels: torch.Tensor, grid: Grid2D) -> float:
    """Share of points outside the squares of their class: wrong_class + off_board (= 1 - in_class)."""
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


def subcell_coverage(points: torch.Tensor, labels: torch.Tensor, grid: Grid2D, split: int = SUBCELLS,
                     k: int = 0) -> float:
    """Share of the class squares' sub-cells (split x split per square) holding >= k samples of that class
    (k = 0: SUBCELL_SHARE of the uniform count per sub-cell, at least 1)."""
    square = grid.cell_index(points)
    offset = (points + grid.half_width) - square * grid.cell_size          # position inside the square
    ij = square * split + torch.floor(offset / (grid.cell_size / split)).long().clamp(0, split - 1)
    n_fine = grid.cells * split
    covered, total = 0, 0
    for c in (0, 1):
        mine = labels == c
        n_sub = len(grid.class_cells(c)) * split * split
        kc = k if k > 0 else max(1, int(int(mine.sum()) / n_sub * SUBCELL_SHARE))
        in_sq = mine & (grid.class_of(points) == c)
        counts = torch.zeros(n_fine, n_fine, dtype=torch.long)
        counts.index_put_((ij[in_sq, 0], ij[in_sq, 1]), torch.ones(int(in_sq.sum()), dtype=torch.long),
                          accumulate=True)
        subs = [(i * split + a, j * split + b) for i, j in grid.class_cells(c)
                for a in range(split) for b in range(split)]
        covered += sum(int(counts[p, q] >= kc) for p, q in subs)
        total += len(subs)
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
    return {"in_class": in_class(points, labels, grid), "wrong_class": wrong_class(points, labels, grid),
            "off_board": off_board(points, labels, grid), "off_support": off_support(points, labels, grid),
            "coverage": coverage(points, labels, grid, k), "subcell_coverage": subcell_coverage(points, labels, grid),
            "swd": class_swd(points, labels, true, labels, directions),
            "center_dist": center_dist(points, labels, grid)}
