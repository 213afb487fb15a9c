"""grid2d metrics on constructed point sets; generation that does not depend on batch size or rank count."""
from __future__ import annotations

import math

import pytest
import torch

from mgbench.evaluation import generate as G
from mgbench.evaluation import grid2d as GM
from mgbench.evaluation.speed import measure_throughput
from mgbench.metric_registry import family_metrics
from mgbench.trainer.data import Grid2D

torch.set_num_threads(1)
GRID = Grid2D(4)  # cells of 1x1 on [-2, 2]^2; cell (i, j) has class (i + j) % 2


def centres(c: int) -> torch.Tensor:
    return torch.tensor([GRID.cell_center(i, j) for i, j in GRID.class_cells(c)])


@pytest.mark.parametrize("own, in_class, center_dist", [
    (True, 1.0, 0.0),   # every point on a centre of its class's cells
    (False, 0.0, 1.0),  # every point on a centre of the other class's cells: a neighbouring centre is 1 away
], ids=["all_in_class", "all_in_the_other_class"])
def test_points_on_cell_centres(own, in_class, center_dist):
    pts = torch.cat([centres(0), centres(1)])
    labels = torch.tensor([0] * 8 + [1] * 8) if own else torch.tensor([1] * 8 + [0] * 8)
    assert GM.in_class(pts, labels, GRID) == in_class
    assert GM.off_support(pts, labels, GRID) == 1.0 - in_class
    assert GM.wrong_class(pts, labels, GRID) == 1.0 - in_class and GM.off_board(pts, labels, GRID) == 0.0
    assert GM.center_dist(pts, labels, GRID) == pytest.approx(center_dist, abs=1e-12)
    if not own:
        assert GM.coverage(pts, labels, GRID, k=1) == 0.0


def test_off_board_counts_as_off_support():
    pts = torch.tensor([[2.5, 0.1], [-0.5, -0.5], [0.5, 0.5]])  # outside; cell (1,1) class 0; cell (2,2) class 0
    labels = torch.tensor([0, 0, 0])
    assert GM.off_support(pts, labels, GRID) == pytest.approx(1 / 3)
    assert GM.in_class(pts, labels, GRID) == pytest.approx(2 / 3)


def test_wrong_class_and_off_board_split_what_is_outside_the_own_class():
    # off the board (x > 2; y < -2); cell (1,1) class 0; cell (0,1) class 1; cell (3,0) class 1; cell (2,2) class 0
    pts = torch.tensor([[2.5, 0.1], [0.3, -2.01], [-0.5, -0.5], [-1.5, -0.5], [1.5, -1.5], [0.5, 0.5]])
    labels = torch.tensor([0, 1, 0, 0, 0, 1])
    assert GM.off_board(pts, labels, GRID) == pytest.approx(2 / 6)
    assert GM.wrong_class(pts, labels, GRID) == pytest.approx(3 / 6)   # label 0 on (0,1), (3,0); label 1 on (2,2)
    assert GM.in_class(pts, labels, GRID) == pytest.approx(1 / 6)
    assert GM.off_support(pts, labels, GRID) == pytest.approx(5 / 6)    # = wrong_class + off_board
    assert GM.off_board(pts, labels.flip(0), GRID) == pytest.approx(2 / 6)   # labels do not move a point off the board


def subcell_centres(c: int, split: int = 4) -> torch.Tensor:
    """The centre of every sub-cell (split x split per square) of class c's squares, square by square."""
    step = GRID.cell_size / split
    return torch.tensor([(-2 + i + (a + 0.5) * step, -2 + j + (b + 0.5) * step)
                         for i, j in GRID.class_cells(c) for a in range(split) for b in range(split)])


def test_subcell_coverage_counts_sub_cells_with_k_samples():
    sub0 = subcell_centres(0)                                 # 8 squares x 16 sub-cells of class 0
    assert len(sub0) == 128
    pts = torch.cat([sub0[:100].repeat(4, 1), subcell_centres(1)[:16]])   # 100 sub-cells x4; one class-1 square
    labels = torch.tensor([0] * 400 + [1] * 16)
    assert GM.subcell_coverage(pts, labels, GRID, k=4) == pytest.approx((100 + 0) / 256)
    assert GM.subcell_coverage(pts, labels, GRID, k=1) == pytest.approx((100 + 16) / 256)
    # default k: half the uniform count per sub-cell, at least 1: class 0 int(400 / 128 / 2) = 1; class 1 1
    assert GM.subcell_coverage(pts, labels, GRID) == pytest.approx((100 + 16) / 256)
    assert GM.subcell_coverage(pts, labels, GRID, k=5) == 0.0
    assert GM.subcell_coverage(pts, 1 - labels, GRID, k=1) == 0.0   # samples in the other class's squares count nothing
    assert GM.subcell_coverage(sub0, torch.zeros(128, dtype=torch.long), GRID, split=2, k=4) == pytest.approx(64 / 128)


def test_subcell_coverage_falls_where_squares_coverage_saturates():
    """Points pulled halfway to their square's centre (what guidance does) leave the outer ring of sub-cells
    empty: 4 of 16 per square stay covered, while every square still holds its samples."""
    labels = torch.arange(4000) % 2
    pts, _ = GRID.sample(4000, labels, torch.Generator().manual_seed(2))
    centre = torch.floor(pts + 2) - 2 + 0.5
    shrunk = centre + 0.5 * (pts - centre)
    assert GM.coverage(pts, labels, GRID) == 1.0 and GM.coverage(shrunk, labels, GRID) == 1.0
    assert GM.subcell_coverage(shrunk, labels, GRID) == pytest.approx(0.25)
    assert GM.subcell_coverage(pts, labels, GRID) >= 0.97         # uniform: ~15.6 per sub-cell, k = 7


def test_coverage_counts_squares_with_k_samples():
    c0 = centres(0)                              # 8 squares of class 0
    pts = torch.cat([c0[:3].repeat(2, 1), c0[3:5], centres(1)[:8].repeat(2, 1)])  # 3 squares x2, 2 squares x1
    labels = torch.tensor([0] * 8 + [1] * 16)
    assert GM.coverage(pts, labels, GRID, k=1) == pytest.approx((5 + 8) / 16)
    assert GM.coverage(pts, labels, GRID, k=2) == pytest.approx((3 + 8) / 16)
    assert GM.coverage(pts, labels, GRID, k=3) == 0.0
    assert GM.coverage_k(800, GRID) == 25 and GM.coverage_k(10, GRID) == 1  # default: a quarter of uniform


def test_sliced_wasserstein():
    pts, _ = GRID.sample(2000, torch.arange(2000) % 2, torch.Generator().manual_seed(0))
    assert GM.sliced_wasserstein(pts, pts) == 0.0
    shifted = pts + torch.tensor([0.3, 0.0])
    # SW-1 of a shift d is d * mean |cos theta| = d * 2 / pi over evenly spaced directions
    assert GM.sliced_wasserstein(pts, shifted, directions=256) == pytest.approx(0.3 * 2 / math.pi, rel=1e-3)
    assert GM.sliced_wasserstein(pts, shifted[:500]) > 0.1  # sizes may differ (quantiles)


def test_grid_metrics_of_true_samples():
    labels = torch.arange(4000) % 2
    pts, _ = GRID.sample(4000, labels, torch.Generator().manual_seed(5))
    m = GM.grid_metrics(pts, labels, GRID, seed=1)
    assert list(m) == family_metrics("grid2d")  # exactly the registry's grid2d metrics, in its order
    assert m["in_class"] == 1.0 and m["off_support"] == 0.0 and m["coverage"] == 1.0
    assert m["wrong_class"] == 0.0 and m["off_board"] == 0.0 and m["subcell_coverage"] >= 0.97
    assert m["swd"] < 0.05 and 0.3 < m["center_dist"] < 0.45  # uniform on a unit square: E|p - c| ~ 0.383
    noise = torch.randn(4000, 2) * 2
    bad = GM.grid_metrics(noise, labels, GRID, seed=1)
    assert 0.3 < bad["off_support"] < 0.8 and bad["swd"] > 5 * m["swd"]
    assert bad["wrong_class"] + bad["off_board"] == pytest.approx(bad["off_support"])
    assert bad["off_board"] == pytest.approx(float((noise.abs() > 2).any(1).float().mean()))


# ----------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def sample_fn():
    from mgbench.trainer.models import build_model
    from mgbench.trainer.sampling import sample

    torch.manual_seed(0)
    model = build_model("MLP-S", input_shape=(2,), num_classes=2).eval()

    def fn(labels, seeds):
        return sample(model, formulation="flow", shape=(2,), labels=labels, seeds=seeds, steps=4, num_classes=2)

    return fn


def test_generation_does_not_depend_on_batch_size(sample_fn):
    a = G.generate(sample_fn, 10, 2, seed=7, batch_size=3)
    b = G.generate(sample_fn, 10, 2, seed=7, batch_size=10)
    assert torch.allclose(a.x, b.x, atol=1e-6) and (a.y == torch.arange(10) % 2).all()
    assert a.nfe == 4
    c = G.generate(sample_fn, 10, 2, seed=8, batch_size=10)
    assert not torch.allclose(a.x, c.x)


def test_generation_does_not_depend_on_rank_count(sample_fn):
    whole = G.generate(sample_fn, 11, 2, seed=3, batch_size=4).x
    parts = [G.draw_share(sample_fn, 11, 2, seed=3, batch_size=2, rank=r, world_size=3)[:2] for r in range(3)]
    assert [p[0] for p in parts] == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert torch.allclose(G.assemble(parts), whole, atol=1e-6)


def test_balanced_labels():
    assert torch.bincount(G.balanced_labels(1000, 10)).tolist() == [100] * 10


def test_save_images(tmp_path):
    import numpy as np
    from PIL import Image

    imgs = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    G.save_images(imgs, tmp_path, torch.tensor([0, 1, 2]), fmt="both")
    npz = np.load(tmp_path / "samples.npz")
    assert npz["arr_0"].shape == (3, 8, 8, 1) and npz["arr_0"].dtype == np.uint8
    assert (npz["arr_0"][..., 0] == imgs[:, 0].numpy()).all() and npz["arr_1"].tolist() == [0, 1, 2]
    assert (np.asarray(Image.open(tmp_path / "png" / "000002.png")) == imgs[2, 0].numpy()).all()


def test_throughput_reports_nfe(sample_fn):
    r = measure_throughput(sample_fn, batch_size=8, num_classes=2, warmup=1, repeats=2)
    assert r["nfe"] == 4 and r["img_per_s"] > 0 and r["img_per_s"] == pytest.approx(8 / r["s_per_batch"])


def test_every_grid2d_metric_is_in_the_registry_with_a_direction_and_a_definition():
    from mgbench.metric_registry import METRICS

    labels = torch.arange(400) % 2
    names = list(GM.grid_metrics(GRID.sample(400, labels, torch.Generator().manual_seed(0))[0], labels, GRID, seed=0))
    assert names == family_metrics("grid2d")
    assert all(METRICS[m].header and METRICS[m].meaning for m in names)
    assert [m for m in names if METRICS[m].higher_is_better] == ["in_class", "coverage", "subcell_coverage"]
