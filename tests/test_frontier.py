"""The guidance frontier: s* and the gap at matched diversity on synthetic curves, CIs, the report from runs."""
from __future__ import annotations

import argparse
import math

import numpy as np
import pandas as pd
import pytest

from mgbench import tracking as T
from mgbench.analysis.cli import add_frontier_parser
from mgbench.analysis.frontier import (Curve, cfg_curve, effective_scale, expanded_alpha, frontier_table,
                                       interpolation_error_bound, match_diversity, verdict)
from mgbench.report.frontier import points_from_runs, render_frontier, to_markdown, write_frontier

SCALES = np.array([0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0])
DV = 1 - 0.2 * SCALES                  # diversity falls with the CFG scale
QV = 0.3 * np.exp(-SCALES)             # off_support-like quality: lower is better, falls with the scale


def _lin(values: np.ndarray, s: float) -> float:
    return float(np.interp(s, SCALES, values))


def _curve(q: np.ndarray, d: np.ndarray, k: int = 3) -> Curve:
    return Curve(SCALES, np.tile(q, (k, 1)), np.tile(d, (k, 1)), list(range(k)))


def test_point_on_piecewise_linear_curve_is_exact():
    res = effective_scale(_curve(QV, DV), np.full(3, _lin(QV, 1.2)), np.full(3, _lin(DV, 1.2)))
    assert res["s_star"] == pytest.approx(1.2, abs=1e-12)
    assert res["gap"] == pytest.approx(0.0, abs=1e-12)
    assert res["out_of_range"] == "" and res["n_cross"] == 1 and res["reason"] == ""
    assert res["s_lo"] == pytest.approx(1.2, abs=1e-12) and res["s_hi"] == pytest.approx(1.2, abs=1e-12)


def test_point_on_smooth_curve_within_interpolation_bound():
    # D(s) = exp(-0.4 s), Q(s) = 0.3 exp(-s), true s = 1.2 lies in the segment [1.0, 1.5] (h = 0.5).
    d_fn, q_fn, s_true = (lambda s: np.exp(-0.4 * s)), (lambda s: 0.3 * np.exp(-s)), 1.2
    res = effective_scale(_curve(q_fn(SCALES), d_fn(SCALES)), np.full(3, q_fn(s_true)), np.full(3, d_fn(s_true)))
    a, b = 1.0, 1.5
    s_bound, gap_bound = interpolation_error_bound(b - a, d1_min=0.4 * math.exp(-0.4 * b),
                                                   d2_max=0.16 * math.exp(-0.4 * a), q1_max=0.3 * math.exp(-a),
                                                   q2_max=0.3 * math.exp(-a))
    assert 0 < abs(res["s_star"] - s_true) <= s_bound
    assert abs(res["gap"]) <= gap_bound
    assert s_bound < 0.02 and gap_bound < 0.01   # the bound itself is tight enough to be useful


def test_shifted_point_gives_known_gap_and_verdict():
    res = effective_scale(_curve(QV, DV), np.full(3, _lin(QV, 0.6) + 0.03), np.full(3, _lin(DV, 0.6)))
    assert res["s_star"] == pytest.approx(0.6, abs=1e-12)
    assert res["gap"] == pytest.approx(0.03, abs=1e-12)
    assert verdict(0.03, 0.02, 0.04, "off_support") == "cfg"     # MG has more outliers: CFG is better
    assert verdict(0.03, 0.02, 0.04, "in_class") == "mg"
    assert verdict(0.03, -0.01, 0.04, "off_support") == "tie"
    assert verdict(0.03, math.nan, math.nan, "off_support") == ""


def _coverage(k: int, j: int, reps: int, expand: bool, sd: float = 0.02) -> tuple[float, float]:
    rng = np.random.default_rng(1)
    s_true, gap, hit_s, hit_g = 1.2, 0.01, 0, 0
    for r in range(reps):
        curve = Curve(SCALES, QV + sd * rng.standard_normal((k, len(SCALES))),
                      DV + sd * rng.standard_normal((k, len(SCALES))), list(range(k)))
        mq = _lin(QV, s_true) + gap + sd * rng.standard_normal(j)
        md = _lin(DV, s_true) + sd * rng.standard_normal(j)
        res = effective_scale(curve, mq, md, level=0.9, n_boot=1000, seed=r, expand=expand)
        hit_s += res["s_lo"] <= s_true <= res["s_hi"]
        hit_g += res["gap_lo"] <= gap <= res["gap_hi"]
    return hit_s / reps, hit_g / reps


def test_ci_covers_truth_with_noisy_seeds():
    cov_s, cov_g = _coverage(5, 5, reps=300, expand=True)
    assert cov_s >= 0.85 and cov_g >= 0.85
    assert cov_s <= 0.99 and cov_g <= 0.99      # not vacuously wide
    plain_s, plain_g = _coverage(5, 5, reps=300, expand=False)
    assert plain_s < cov_s and plain_g < cov_g  # the plain percentile interval is too narrow with 5 seeds


def test_expanded_alpha():
    assert expanded_alpha(0.1, 5) == pytest.approx(0.0172, abs=5e-4)
    assert expanded_alpha(0.1, 10_000) == pytest.approx(0.1, abs=1e-3)
    assert math.isnan(expanded_alpha(0.1, 1))


def test_non_monotone_curve_takes_the_bracketing_segment_nearest_in_quality():
    scales = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    d = np.array([[1.0, 0.8, 0.9, 0.7, 0.5]])   # a dip at s = 1: 0.85 is crossed on three segments
    q = np.array([[0.30, 0.20, 0.10, 0.05, 0.02]])
    m = match_diversity(scales, d, q, np.array([0.85]), np.array([0.12]))
    assert m["n_cross"][0] == 3
    assert m["s"][0] == pytest.approx(1.5) and m["q"][0] == pytest.approx(0.15)   # nearest to q = 0.12
    m = match_diversity(scales, d, q, np.array([0.85]), np.array([0.06]))
    assert m["s"][0] == pytest.approx(2.25) and m["q"][0] == pytest.approx(0.0875)
    m = match_diversity(scales, d, q, np.array([0.85]))          # no quality: the first crossing
    assert m["s"][0] == pytest.approx(0.75)
    # A flat stretch (a coverage plateau): the left end of the flat segment, the crossing count flags it.
    m = match_diversity(scales, np.array([[1.0, 1.0, 1.0, 0.8, 0.6]]), q, np.array([1.0]))
    assert m["s"][0] == 0.0 and m["n_cross"][0] == 3


def test_out_of_range_is_nan_with_reason_and_clamped_end():
    more = effective_scale(_curve(QV, DV), np.full(3, 0.3), np.full(3, 1.1))
    assert math.isnan(more["s_star"]) and math.isnan(more["gap"])
    assert more["out_of_range"] == "below_min_scale" and more["s_clamped"] == 0.0
    assert "outside" in more["reason"] and more["s_lo"] == -math.inf and more["boot_out_share"] == 1.0
    less = effective_scale(_curve(QV, DV), np.full(3, 0.01), np.full(3, 0.2))
    assert less["out_of_range"] == "above_max_scale" and less["s_clamped"] == 3.0 and less["s_hi"] == math.inf


def _points(seeds=(0, 1, 2), steps=(1000,), mg_steps=None, sd=0.0, s_true=0.6, gap=0.0) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for step in steps:
        for seed in seeds:
            for s in SCALES:
                rows.append({"model": "vanilla", "method": "cfg", "w": 1.0, "seed": seed, "step": step, "scale": s,
                             "quality": _lin(QV, s) + sd * rng.standard_normal(),
                             "diversity": _lin(DV, s) + sd * rng.standard_normal(),
                             "nfe_per_step": 1.0 if s == 0 else 2.0, "implied_scale": 0.0})
    for step in mg_steps or steps:
        for seed in seeds:
            rows.append({"model": "MG w=1.50", "method": "mg", "w": 1.5, "seed": seed, "step": step, "scale": 0.0,
                         "quality": _lin(QV, s_true) + gap, "diversity": _lin(DV, s_true), "nfe_per_step": 1.0,
                         "implied_scale": 1.0})
    return pd.DataFrame(rows)


def test_frontier_table_per_step_and_missing_vanilla_step():
    pts = _points(steps=(1000,), mg_steps=(500, 1000), gap=0.02)
    curve = cfg_curve(pts, 1000)
    assert curve.nfe_per_step == 2.0 and curve.quality.shape == (3, len(SCALES))
    table = frontier_table(pts, "off_support", n_boot=200)
    assert list(table["step"]) == [500, 1000]
    early, final = table.iloc[0], table.iloc[1]
    assert "no CFG points at step 500" in early["reason"] and math.isnan(early["s_star"])
    assert final["s_star"] == pytest.approx(0.6) and final["gap"] == pytest.approx(0.02)
    assert final["implied_scale"] == 1.0 and final["nfe_mg"] == 1.0 and final["nfe_cfg"] == 2.0
    assert final["better"] == "cfg"             # no seed noise: a zero-width CI above 0
    md = to_markdown(table, "off_support", "coverage", 0.9)
    assert "| MG w=1.50 | 1000 | 1.00 | 0.60 [0.60, 0.60] |" in md and "1 vs 2" in md


def test_one_seed_gives_no_ci():
    res = effective_scale(_curve(QV, DV, k=1), np.array([_lin(QV, 1.0)]), np.array([_lin(DV, 1.0)]))
    assert res["s_star"] == pytest.approx(1.0) and math.isnan(res["s_lo"]) and "no CI" in res["reason"]


# ----------------------------------------------------------------------------- from tracked runs


def _runs(seeds=(0, 1, 2)) -> pd.DataFrame:
    """A tidy frame shaped like mgbench.report.load.load_runs: vanilla sweeps and MG final evaluations."""
    rows = []
    for seed in seeds:
        van = {"run_id": f"v{seed}", "status": "finished", "objective.w": 1.0, "train.seed": seed,
               "train.steps": 2000, "sample.steps": 50, "sample.guidance": "auto", "data.name": "grid2d",
               "eval/off_support": _lin(QV, 0.0), "eval/coverage": _lin(DV, 0.0), "eval/nfe": 50.0}
        for s in SCALES[1:]:
            van[T.metric_sweep(s, "off_support")] = _lin(QV, s)
            van[T.metric_sweep(s, "coverage")] = _lin(DV, s)
            van[T.metric_sweep(s, "nfe")] = 100.0
        rows.append(van)
        rows.append({"run_id": f"m{seed}", "status": "finished", "objective.w": 1.5, "train.seed": seed,
                     "train.steps": 2000, "sample.steps": 50, "sample.guidance": "auto", "data.name": "grid2d",
                     "objective.implied_cfg_scale": 1.0, "eval/off_support": _lin(QV, 0.9) - 0.01,
                     "eval/coverage": _lin(DV, 0.9), "eval/nfe": 50.0})
    rows.append({**rows[-1], "run_id": "failed", "status": "failed", "eval/coverage": 0.0})
    return pd.DataFrame(rows)


def test_points_from_runs():
    pts = points_from_runs(_runs(), "off_support", "coverage")
    cfg, mg = pts[pts["method"] == "cfg"], pts[pts["method"] == "mg"]
    assert len(cfg) == 3 * len(SCALES) and sorted(cfg["scale"].unique()) == list(SCALES)
    assert set(cfg.loc[cfg["scale"] == 0, "nfe_per_step"]) == {1.0}
    assert set(cfg.loc[cfg["scale"] > 0, "nfe_per_step"]) == {2.0}
    assert len(mg) == 3 and set(mg["nfe_per_step"]) == {1.0} and set(mg["implied_scale"]) == {1.0}
    assert set(mg["model"]) == {"MG w=1.50"} and 0.0 not in set(mg["diversity"])   # the failed run is left out


def test_write_frontier_files_and_deterministic_bytes(tmp_path):
    pts = points_from_runs(_runs(), "off_support", "coverage")
    a = write_frontier(pts, tmp_path / "a", "off_support", "coverage", n_boot=200)
    b = write_frontier(pts, tmp_path / "b", "off_support", "coverage", n_boot=200)
    assert [p.name for p in a] == ["frontier.md", "frontier.csv", "frontier_points.csv", "frontier.png",
                                   "frontier.pdf"]
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes(), pa.name
    table = pd.read_csv(tmp_path / "a" / "frontier.csv")
    assert table.loc[0, "s_star"] == pytest.approx(0.9) and table.loc[0, "gap"] == pytest.approx(-0.01)
    assert table.loc[0, "better"] == "mg"


def test_steps_figure_when_several_steps(tmp_path):
    pts = _points(steps=(500, 1000), s_true=0.6)
    pts.loc[(pts["method"] == "mg") & (pts["step"] == 1000), "diversity"] = _lin(DV, 1.0)  # stronger later
    paths = write_frontier(pts, tmp_path, "off_support", "coverage", n_boot=200)
    assert (tmp_path / "frontier_steps.png") in paths
    table = pd.read_csv(tmp_path / "frontier.csv")
    assert list(table["s_star"].round(6)) == [0.6, 1.0]


def test_render_frontier_from_a_frame(tmp_path):
    paths = render_frontier("toy", out=tmp_path, diversity="coverage", n_boot=100, runs=_runs())
    assert "| MG w=1.50 | 2000 | 1.00 | 0.90" in (tmp_path / "frontier.md").read_text()
    assert len(paths) == 5


def _log_study(uri: str, study: str) -> None:
    """Trial runs in a real MLflow store: vanilla sweeps and MG evaluations at steps 1000 and 2000."""
    from mlflow.entities import Metric, Param, RunTag
    from mgbench.tracking import mlflow_client

    client = mlflow_client(uri)
    exp = client.create_experiment(study)
    for i, rec in enumerate(_runs(seeds=(0, 1)).to_dict("records")):
        if rec["status"] != "finished":
            continue
        run = client.create_run(exp, tags={T.TAG_ROLE: "trial", T.TAG_STUDY: study, T.TAG_TRIAL: str(i),
                                           T.TAG_STATUS: "finished"})
        params = [Param(k, str(v)) for k, v in rec.items() if "." in k and "/" not in k]
        metrics = []
        for step, shift in ((1000, 0.05), (2000, 0.0)):   # the MG model is weaker (more diverse) early on
            for k, v in rec.items():
                if "/" in k:
                    up = shift if rec["objective.w"] != 1.0 and k.endswith("coverage") else 0.0
                    metrics.append(Metric(k, float(v) + up, 0, step))
        client.log_batch(run.info.run_id, metrics=metrics, params=params, tags=[RunTag("x", "y")])
        client.set_terminated(run.info.run_id)


def test_render_frontier_from_mlflow(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _log_study(uri, "toy")
    final = render_frontier("toy", uri, tmp_path / "final", diversity="coverage", n_boot=100)
    table = pd.read_csv(tmp_path / "final" / "frontier.csv")
    assert len(final) == 5 and list(table["step"]) == [2000]
    assert table.loc[0, "s_star"] == pytest.approx(0.9) and table.loc[0, "n_cfg"] == 2
    render_frontier("toy", uri, tmp_path / "hist", diversity="coverage", n_boot=100, history=True)
    table = pd.read_csv(tmp_path / "hist" / "frontier.csv")
    assert list(table["step"]) == [1000, 2000]
    assert table.loc[0, "s_star"] == pytest.approx(0.65) and table.loc[1, "s_star"] == pytest.approx(0.9)
    assert (tmp_path / "hist" / "frontier_steps.png").is_file()
    parser = argparse.ArgumentParser(prog="mgbench")
    add_frontier_parser(parser.add_subparsers(dest="command"))
    argv = ["frontier", "--study", "toy", "--tracking-uri", uri, "--out", str(tmp_path / "cli"), "--n-boot", "50",
            "--diversity", "coverage"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    assert "off_support: lower is better" in (tmp_path / "cli" / "frontier.md").read_text()
    args = parser.parse_args(argv + ["--quality", "in_class"])   # not logged in this study: one line, exit 2
    capsys.readouterr()
    assert args.func(args) == 2
    assert capsys.readouterr().err.splitlines() == [
        "mgbench frontier: error: no frontier points with both in_class and coverage among the finished trial runs"]
