"""Figure tests: the data each figure plotted (series, axes, values) and byte-identical files on a second render."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from conftest import sqlite_mlflow_store

from mgbench import tracking as T
from mgbench.report import figures as F
from mgbench.report import load as L
from mgbench.report.renderers import render
from mgbench.report.synthetic import log_trial, start_study, trial_params

FID, IS = T.metric_eval("fid"), T.metric_eval("is")
DIT = {"model.arch": "DiT-T/2", "data.name": "digits", "objective.formulation": "flow"}
TOY = {"model.arch": "MLP-S", "data.name": "grid2d", "objective.formulation": "flow"}


def _sweep(points):
    return {T.metric_sweep(s, m): v for s, vals in points.items() for m, v in vals.items()}


TRACKED_SWEEP = T.M_SWEEP   # the name format as tracking.py defines it


def _valid_metric_name(name: str) -> bool:
    from mlflow.utils.validation import validate_param_and_metric_name

    return bool(validate_param_and_metric_name(name))


def test_sweep_metric_name_is_valid_for_mlflow():
    assert _valid_metric_name(TRACKED_SWEEP.format(scale=0.5, metric="fid"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Study `figs`: sweeps (Fig. 4), FID histories (Fig. 5), sizes (Fig. 6), 2D toy samples (Fig. 2)."""
    root, uri, writer = sqlite_mlflow_store(tmp_path_factory)
    exp, parent = start_study(writer, "figs", str(root / "art"))
    size = {T.M_PARAMS: 1e6, T.M_GFLOPS: 0.5, T.M_NFE: 50.0}
    vanilla = {FID: 20.0, IS: 50.0, **size, **_sweep({0.5: {"fid": 12.0, "is": 90.0}, 1.0: {"fid": 10.0, "is": 120.0}})}
    mg = {FID: 8.0, IS: 130.0, **size, **_sweep({0.5: {"fid": 9.0, "is": 150.0}})}
    big = {FID: 5.0, T.M_PARAMS: 4e6, T.M_GFLOPS: 2.0, T.M_NFE: 50.0}
    hist_v = {FID: [(500, 40.0), (1000, 30.0), (1500, 25.0), (2000, 20.0)]}
    hist_m = {FID: [(500, 30.0), (1000, 18.0), (1500, 12.0), (2000, 8.0)]}
    log_trial(writer, "figs", exp, parent, 0, trial_params(**DIT), vanilla, history=hist_v)
    log_trial(writer, "figs", exp, parent, 1, trial_params(**DIT, **{"objective.w": 1.5}), mg, history=hist_m)
    log_trial(writer, "figs", exp, parent, 2, trial_params(**{**DIT, "model.arch": "DiT-S/2", "objective.w": 1.5}), big)
    rng = np.random.default_rng(0)
    for i, over in enumerate([{}, {"objective.w": 1.5}, {"sample.guidance": "cfg", "sample.cfg_scale": 1.0}]):
        rid = log_trial(writer, "figs", exp, parent, 3 + i, trial_params(**TOY, **over), {"eval/in_class": 0.9})
        path = root / f"samples{i}.npz"
        np.savez(path, x=rng.normal(size=(200, 2)), y=rng.integers(0, 2, 200), traj=rng.normal(size=(5, 200, 2)))
        writer.client.log_artifact(rid, str(path), "samples")
        (root / "samples.npz").unlink(missing_ok=True)
        path.rename(root / "samples.npz")
        writer.client.log_artifact(rid, str(root / "samples.npz"), "samples")
    return uri


@pytest.fixture(scope="module")
def runs(store):
    return L.load_runs(store, "figs")


def test_fig4_cfg_sweep(runs, tmp_path):
    data = F.fig4(runs, tmp_path)
    van = data[(data["model"] == "SiT-T/2") & (data["training"] == "vanilla") & (data["metric"] == "fid")]
    assert van["cfg_scale"].tolist() == [0.0, 0.5, 1.0] and van["mean"].tolist() == [20.0, 12.0, 10.0]
    mg_is = data[(data["model"] == "SiT-T/2") & (data["training"] == "MG w=1.50") & (data["metric"] == "is")]
    assert mg_is["cfg_scale"].tolist() == [0.0, 0.5] and mg_is["mean"].tolist() == [130.0, 150.0]
    assert (tmp_path / "fig4_cfg_scale.png").stat().st_size > 0 and (tmp_path / "fig4_cfg_scale.pdf").exists()


def test_fig5_convergence_and_speedup(runs, store, tmp_path):
    data, gains = F.fig5(runs, store, tmp_path)
    mg = data[(data["method"] == "MG w=1.50") & (data["model"] == "SiT-T/2")]
    assert mg["step"].tolist() == [500, 1000, 1500, 2000] and mg["fid"].tolist() == [30.0, 18.0, 12.0, 8.0]
    g = gains[gains["model"] == "SiT-T/2"].iloc[0]
    reach = 500 + 500 * (30 - 20) / (30 - 18)
    assert g["vanilla_final_fid"] == 20.0 and g["mg_steps_to_reach"] == pytest.approx(reach)
    assert g["speedup"] == pytest.approx(2000 / reach)
    assert F.steps_to_reach(np.array([1, 2]), np.array([5.0, 4.0]), 1.0) is None


def test_fig6_params_and_flops(runs, tmp_path):
    data = F.fig6(runs, tmp_path)
    big = data[data["model"] == "SiT-S/2"].iloc[0]
    assert (big["n_params"], big["sampling_gflops"], big["fid"]) == (4e6, 100.0, 5.0)
    small = data[(data["model"] == "SiT-T/2") & (data["variant"] == "vanilla")].iloc[0]
    assert (small["sampling_gflops"], small["fid"]) == (25.0, 20.0)
    assert big["n"] == 1 and np.isnan(big["fid_se"])  # one run that logged no SE: no bar, never a zero-width one


def test_fig6_mean_and_se_over_training_seeds(runs):
    big = runs[runs[L.P_ARCH] == "DiT-S/2"]
    seeds = F.fig6_data(pd.concat([big.assign(**{FID: v}) for v in (5.0, 6.0, 8.0)]))
    row = seeds.iloc[0]
    mean = (5.0 + 6.0 + 8.0) / 3
    se = math.sqrt(((5.0 - mean) ** 2 + (6.0 - mean) ** 2 + (8.0 - mean) ** 2) / 2 / 3)
    assert (row["model"], row["n"]) == ("SiT-S/2", 3)
    assert row["fid"] == pytest.approx(mean) and row["fid_se"] == pytest.approx(se)
    one = F.fig6_data(big.assign(**{T.metric_se(FID): 0.4, T.M_SAMPLE_SEEDS: 3.0})).iloc[0]
    assert (one["fid"], one["fid_se"], one["n"], one["k"]) == (5.0, 0.4, 1, 3)  # one run: its SE over sample seeds


def test_fig2_toy_samples(runs, store, tmp_path):
    data = F.fig2(runs, store, tmp_path)
    assert sorted(data["method"].unique()) == ["CFG s=1.00", "MG w=1.50", "vanilla"]
    per = data.groupby(["method", "kind"]).size()
    assert per[("vanilla", "sample")] == 200 and per[("vanilla", "traj")] == 5 * 64
    assert set(data["label"]) == {0, 1}
    assert data.drop_duplicates("method").sort_values("panel")["method"].tolist() == ["vanilla", "CFG s=1.00",
                                                                                      "MG w=1.50"]


def test_fig2_legend_caption_board_and_guidance_order():
    import pandas as pd

    methods = ["MG w=1.50", "vanilla", "MG w=1.25 + CFG s=0.50", "MG w=1.25", "CFG s=2.00", "MG w=auto", "CFG s=0.50"]
    rng = np.random.default_rng(1)
    data = pd.DataFrame([{"method": m, "run_id": "r", "kind": "sample", "i": i, "step": -1, "x": x, "y": y,
                          "label": i % 2} for m in methods for i, (x, y) in enumerate(rng.uniform(-2, 2, (20, 2)))])
    caption = F.fig2_caption(data, {"MG w=1.50": 1.0, "MG w=1.25": 1 / 3})
    fig = F.draw_fig2(data, cells=4, caption=caption)
    n = len(methods)
    assert [ax.get_title() for ax in fig.axes[:n]] == ["vanilla", "CFG s=0.50", "CFG s=2.00", "MG w=1.25", "MG w=1.50",
                                                       "MG w=auto", "MG w=1.25 + CFG s=0.50"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["class 0", "class 1"]
    assert [t.get_text() for t in fig.texts] == [caption]
    assert "MG w=1.25 trains towards CFG s=0.33; MG w=1.50 trains towards CFG s=1.00" in caption
    assert "20 samples each" in caption and "in order of guidance strength" in caption
    assert len(fig.axes[0].patches) == 16                          # the 4x4 board under the samples
    assert all(ax.get_xlim() == (-2.5, 2.5) for ax in fig.axes[:3 * n])   # every panel on the same scale
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_figures_idempotent(store, tmp_path):
    first = render("figures", "figs", store, tmp_path / "a")
    second = render("figures", "figs", store, tmp_path / "b")
    for stem in ("fig2_toy", "fig4_cfg_scale", "fig5_convergence", "fig6_scaling"):
        for ext in ("png", "pdf"):
            assert (tmp_path / "a" / f"{stem}.{ext}").read_bytes() == (tmp_path / "b" / f"{stem}.{ext}").read_bytes()
    for p, q in zip(first, second):
        assert p.read_bytes() == q.read_bytes()


def test_fig4_mean_and_se_over_runs(tmp_path):
    """Two vanilla runs: mean and SE over runs; one MG run: the SE over its sample seeds (sampling only)."""
    from mgbench.tracking import RunStore

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    writer = RunStore(uri)
    exp, parent = start_study(writer, "se", str(tmp_path / "art"))
    s05 = T.metric_sweep(0.5, "fid")
    for i, (over, fid, swept) in enumerate([({}, 20.0, 12.0), ({"train.seed": 1}, 22.0, 12.6),
                                           ({"objective.w": 1.5}, 8.0, 9.0)]):
        metrics = {FID: fid, s05: swept, T.metric_se(s05): 0.05, T.M_SAMPLE_SEEDS: 5.0}
        log_trial(writer, "se", exp, parent, i, trial_params(**DIT, **over), metrics)
    data = F.fig4(L.load_runs(uri, "se"), tmp_path)
    van = data[(data["training"] == "vanilla") & (data["metric"] == "fid")].set_index("cfg_scale")
    assert van.loc[0.5, "mean"] == pytest.approx(12.3) and van.loc[0.5, "n"] == 2
    assert van.loc[0.5, "se"] == pytest.approx(abs(12.6 - 12.0) / 2)     # SD of two values / sqrt(2) = |a - b| / 2
    mg = data[(data["training"] == "MG w=1.50") & (data["metric"] == "fid")].set_index("cfg_scale")
    assert (mg.loc[0.5, "mean"], mg.loc[0.5, "se"], mg.loc[0.5, "n"]) == (9.0, 0.05, 1)
    assert np.isnan(mg.loc[0.0, "se"])             # one run at its own scale without a tracked SE: none
