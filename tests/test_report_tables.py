"""Golden tests: a real MLflow sqlite store -> tidy runs -> the paper's tables (values, IMPROVE, seeds, states)."""
from __future__ import annotations

import math

import pandas as pd
import pytest
from conftest import sqlite_mlflow_store

from mgbench import tracking as T
from mgbench.report import load as L
from mgbench.report.cli import add_report_parser, run_report
from mgbench.report.render import DASH, to_latex, to_markdown
from mgbench.report.renderers import render
from mgbench.report.synthetic import log_trial, start_study, trial_params
from mgbench.report.tables import build_table, paper_rows, row_key

FID, IS, PREC = T.metric_eval("fid"), T.metric_eval("is"), T.metric_eval("precision")
DIT = {"model.arch": "DiT-T/2", "data.name": "digits", "objective.formulation": "diffusion"}
SIT = {"model.arch": "DiT-T/2", "data.name": "digits", "objective.formulation": "flow"}
CFG = {"sample.guidance": "cfg", "sample.cfg_scale": 1.0}


def _log(writer, study, exp, parent, runs):
    for i, (over, metrics, status) in enumerate(runs):
        log_trial(writer, study, exp, parent, i, trial_params(**over), metrics, status=status)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two studies: `ablate` (w sweep with seeds, a failed and a missing setting) and `system` (Tables 1/2)."""
    root, uri, writer = sqlite_mlflow_store(tmp_path_factory)
    exp, parent = start_study(writer, "ablate", str(root / "art"))
    _log(writer, "ablate", exp, parent, [
        ({**DIT, "objective.w": 1.0}, {FID: 40.0, IS: 50.0, PREC: 0.5}, "finished"),
        ({**DIT, "objective.w": 1.25}, {FID: 10.0, IS: 100.0, PREC: 0.6}, "finished"),
        ({**DIT, "objective.w": 1.5, "train.seed": 0}, {FID: 7.0, IS: 100.0, PREC: 0.7}, "finished"),
        ({**DIT, "objective.w": 1.5, "train.seed": 1}, {FID: 8.0, IS: 110.0, PREC: 0.7}, "finished"),
        ({**DIT, "objective.w": 1.5, "train.seed": 2}, {FID: 9.0, IS: 120.0, PREC: 0.7}, "finished"),
        ({**DIT, "objective.w": 2.0}, {}, "failed"),
        ({**DIT, "objective.auto_w.enabled": True}, {FID: 7.5, IS: 130.0, PREC: 0.8}, "finished"),
        ({**SIT, "objective.w": 1.0}, {FID: 30.0, IS: 60.0}, "finished"),
        ({**SIT, "objective.w": 1.5}, {FID: 6.0, IS: 140.0}, "finished"),
        ({**DIT, "objective.w": 1.5, "objective.label_drop": 0.2}, {FID: 11.0, IS: 90.0}, "finished"),
    ])
    exp, parent = start_study(writer, "system", str(root / "art"))
    _log(writer, "system", exp, parent, [
        ({**DIT, "objective.w": 1.0, "train.seed": 0}, {FID: 20.0, IS: 50.0, T.M_IMG_PER_S: 100.0}, "finished"),
        ({**DIT, "objective.w": 1.0, "train.seed": 1}, {FID: 22.0, IS: 54.0, T.M_IMG_PER_S: 100.0}, "finished"),
        ({**DIT, **CFG, "objective.w": 1.0}, {FID: 10.0, IS: 90.0, T.M_IMG_PER_S: 50.0}, "finished"),
        ({**DIT, "objective.w": 1.5, "train.seed": 0}, {FID: 8.0, IS: 100.0, T.M_IMG_PER_S: 100.0}, "finished"),
        ({**DIT, "objective.w": 1.5, "train.seed": 1}, {FID: 9.0, IS: 104.0, T.M_IMG_PER_S: 100.0}, "finished"),
    ])
    return uri


@pytest.fixture(scope="module")
def ablate(store):
    return L.load_runs(store, "ablate")


def _row(table, **match):
    rows = table.rows
    for k, v in match.items():
        rows = rows[rows[k] == v]
    assert len(rows) == 1, (match, rows)
    return rows.iloc[0]


def test_cast_param():
    assert L.cast_param("True") is True and L.cast_param("False") is False
    assert L.cast_param("None") is None and L.cast_param("3") == 3 and L.cast_param("1.5") == 1.5
    assert L.cast_param("[1.0, 2.0]") == (1.0, 2.0) and L.cast_param("DiT-B/2") == "DiT-B/2"


def test_load_runs_typed(ablate):
    assert len(ablate) == 10 and ablate[T.TAG_TRIAL].tolist() == list(range(10))
    assert ablate[L.P_W].dtype == "float64" and ablate[L.P_AUTO_W].dtype == "boolean"
    assert ablate["train.steps"].dtype == "Int64" and ablate[FID].dtype == "float64"
    assert ablate[L.P_W_RANGE].isna().all()
    assert ablate[L.VARIANT].tolist() == ["vanilla", "mg", "mg", "mg", "mg", "mg", "mg", "vanilla", "mg", "mg"]
    assert ablate[L.STATUS].tolist()[5] == "failed" and ablate[L.MLFLOW_STATUS].tolist()[5] == "FAILED"
    assert ablate[L.STATUS].tolist().count("finished") == 9


def test_sql_reader_equals_mlflow_search(store):
    fast, slow = L.load_runs(store, "ablate", reader="sql"), L.load_runs(store, "ablate", reader="mlflow")
    pd.testing.assert_frame_equal(fast, slow[fast.columns])


def test_unknown_study_is_an_error(store):
    with pytest.raises(LookupError, match="nope"):
        L.load_runs(store, "nope")


def test_table3_values_seeds_failed_missing(ablate):
    t = build_table(ablate, 3, "ablate")
    dit = dict(source="measured", model="DiT-T/2")
    w15 = _row(t, setting="w=1.50", extra="lambda=0.1", **dit)
    # Runs from before sample seeds (K = 1): the SE is the SD of the 3 run values over sqrt(3).
    assert (w15["fid"], w15["n_finished"], w15["fid_n"], w15["sample_seeds"]) == (8.0, 3, 3, "1")
    assert w15["fid_se"] == pytest.approx(1.0 / math.sqrt(3)) and w15["train_seeds"] == "0 1 2"
    assert w15["is"] == pytest.approx(110.0) and w15["is_se"] == pytest.approx(10.0 / math.sqrt(3))
    assert _row(t, setting="w=1.50", extra="lambda=0.2", **dit)["fid"] == 11.0
    assert _row(t, setting="w=auto", **dit)["fid"] == 7.5
    failed = _row(t, setting="w=2.00", **dit)
    assert failed["status"] == "1 failed" and failed["n_runs"] == 1 and math.isnan(failed["fid"])
    assert _row(t, setting="w=1.75", **dit)["status"] == "missing"
    assert _row(t, source="measured", model="SiT-T/2", setting="w=1.00")["fid"] == 30.0
    assert _row(t, source="paper", model="DiT-B/2", setting="w=1.50")["fid"] == 7.24
    # Best per column within the block: lowest FID (auto, 7.5), highest IS (auto, 130).
    block = t.rows[(t.rows["source"] == "measured") & (t.rows["model"] == "DiT-T/2")]
    assert block.loc[block["fid_best"], "setting"].tolist() == ["w=auto"]
    assert _row(t, source="paper", model="DiT-B/2", setting="w=1.50")["fid_best"]


def test_table3_text(ablate):
    md = to_markdown(build_table(ablate, 3, "ablate"))
    assert ("| DiT-T/2 | +MG | w=1.50 [lambda=0.1] | measured: digits, 2000 steps | 3x1 | "
            "8.00 ± 0.58 |") in md
    assert "| DiT-T/2 | +MG | w=2.00 | measured: digits, 2000 steps | 0/1 (1 failed) | failed |" in md
    assert f"| DiT-T/2 | +MG | w=1.75 | measured: digits, 2000 steps | 0 (missing) | {DASH} |" in md
    assert "| **7.50** |" in md and "paper: ImageNet 256, 400K steps" in md
    tex = to_latex(build_table(ablate, 3, "ablate"))
    assert r"8.00 $\pm$ 0.58" in tex and r"\textbf{7.50}" in tex and r"\toprule" in tex
    assert "| Model | Variant | Setting | Source | Runs | FID ↓ | sFID ↓ | IS ↑ | Prec. ↑ | Rec. ↑ |" in md
    assert r"FID $\downarrow$ & sFID $\downarrow$ & IS $\uparrow$" in tex
    assert "± is one standard error of that mean" in md and "training seeds x sample seeds" in md


def test_paper_rows_match_published():
    t4 = paper_rows(4)
    assert len(t4) == 10 and t4.loc[t4["setting"] == "lambda=0.10", "fid"].tolist() == [7.24, 6.49]


def test_tables_1_2_improve(store):
    runs = L.load_runs(store, "system")
    t1 = build_table(runs, 1, "system")
    van = _row(t1, source="measured", variant="vanilla")
    assert (van["fid"], van["n_finished"]) == (21.0, 2)
    imp = _row(t1, source="measured", variant="improve")
    assert imp["fid"] == pytest.approx(100 * (8.5 - 21.0) / 21.0) and imp["is"] == pytest.approx(100 * (102 - 52) / 52)
    paper_imp = _row(t1, source="paper", variant="improve", model="DiT-XL/2")
    assert paper_imp["fid"] == pytest.approx(100 * (2.03 - 9.62) / 9.62)
    assert "| -59.5% |" in to_markdown(t1)
    t2 = build_table(runs, 2, "system")
    assert _row(t2, source="measured", variant="vanilla")["setting"] == "cfg"
    assert _row(t2, source="measured", variant="improve")["fid"] == pytest.approx(-15.0)
    assert _row(t2, source="measured", variant="improve")["img_per_s"] == pytest.approx(100.0)
    assert len(t2.rows[t2.rows["variant"] == "baseline"]) == 10


def test_render_idempotent_and_cli(store, tmp_path):
    first = render("tables", "ablate", store, tmp_path / "a")
    second = render("tables", "ablate", store, tmp_path / "b")
    assert len(first) == 32 and sum(p.name.endswith("_runs.csv") for p in first) == 8
    for p, q in zip(first, second):
        assert p.read_bytes() == q.read_bytes(), p.name
    import argparse

    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", "table4", "--study", "ablate", "--tracking-uri", store,
                              "--out", str(tmp_path / "c")])
    assert run_report(args) == 0
    assert (tmp_path / "c" / "table4.csv").read_bytes() == (tmp_path / "a" / "table4.csv").read_bytes()
    bad = parser.parse_args(["report", "table4", "--study", "nope", "--tracking-uri", store, "--out", str(tmp_path)])
    assert run_report(bad) == 2


def test_bench_report_small(tmp_path):
    from mgbench.report.bench import bench_report

    result = bench_report(n_runs=60, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache")
    assert result["n_runs"] == 60 and (tmp_path / "out" / "table8.md").exists()
    again = bench_report(n_runs=60, out_dir=tmp_path / "out2", cache_dir=tmp_path / "cache")
    assert again["build_s"] < 1.0      # the store is cached
    assert (tmp_path / "out" / "table3.csv").read_bytes() == (tmp_path / "out2" / "table3.csv").read_bytes()


def test_render_several_studies_from_their_own_stores(tmp_path, monkeypatch, capsys):
    """Table 3's w rows and its AUTO row live in two studies, each with its own store: one table from both."""
    from mgbench.tracking import RunStore

    stores = {}
    for name, rows in (("t3_w", [({**DIT, "objective.w": 1.0}, {FID: 40.0}), ({**DIT, "objective.w": 1.5}, {FID: 7.0})]),
                       ("t3_auto", [({**DIT, "objective.auto_w.enabled": True}, {FID: 7.5})])):
        root = tmp_path / name
        root.mkdir()
        stores[name] = f"sqlite:///{root}/mlflow.db"
        writer = RunStore(stores[name])
        exp, parent = start_study(writer, name, str(root / "art"))
        _log(writer, name, exp, parent, [(over, metrics, "finished") for over, metrics in rows])
    paths = render("table3", [("t3_w", stores["t3_w"]), ("t3_auto", stores["t3_auto"])], out=tmp_path / "out")
    table = pd.read_csv(next(p for p in paths if p.suffix == ".csv"))
    measured = table[table["source"] == "measured"].set_index("setting")["fid"]
    assert measured.dropna().to_dict() == {"w=1.00": 40.0, "w=1.50": 7.0, "w=auto": 7.5}
    assert set(measured[measured.isna()].index) == {"w=1.25", "w=1.75", "w=2.00"}   # the paper's other rows: missing
    with pytest.raises(ValueError, match="one study"):
        render("fig2", [("t3_w", stores["t3_w"]), ("t3_auto", stores["t3_auto"])], out=tmp_path / "out")

    import argparse

    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    parser = argparse.ArgumentParser()          # its --tracking-uri default reads the environment when built
    add_report_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", "table3", "--study", "t3_w", "--study", "t3_auto", "--out", str(tmp_path / "cli")])
    assert run_report(args) == 2          # a bare name needs a tracking URI: no stray ./mlflow.db store
    assert "--tracking-uri" in capsys.readouterr().err and not (tmp_path / "mlflow.db").exists()

    for name in stores:   # a spec file names both the study and its store
        (tmp_path / f"{name}.yaml").write_text(
            f"name: {name}\ntracking_uri: {stores[name]}\nbase: {{data: {{name: digits}}, model: {{arch: DiT-XS/2}}}}\n"
            "space: {objective.w: {grid: [1.5]}}\nsampler: grid\n")
    args = parser.parse_args(["report", "table3", "--study", str(tmp_path / "t3_w.yaml"),
                              "--study", str(tmp_path / "t3_auto.yaml"), "--out", str(tmp_path / "cli")])
    assert run_report(args) == 0
    assert (tmp_path / "cli" / "table3.csv").read_bytes() == (tmp_path / "out" / "table3.csv").read_bytes()


def test_loading_through_mlflow_leaves_the_tracking_uri_alone(store, monkeypatch):
    """The mlflow reader sets MLflow's global URI for one search and restores it, not a resolved default."""
    import os

    from mlflow.tracking._tracking_service import utils as tracking_state

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking_state, "_tracking_uri", None)     # as in a fresh process: no URI set
    runs = L.load_runs(store, "ablate", reader="mlflow")
    assert len(runs) == 10
    assert "MLFLOW_TRACKING_URI" not in os.environ


# ----------------------------------------------------------------------------- sample seeds, per-run values, matched rows

OFFSETS = [-0.1, 0.1, 0.0, -0.2, 0.2]      # per-sample-seed deviations: mean 0, SD sqrt(0.1 / 4) = 0.1581
SEED_SE = math.sqrt(0.1 / 4 / 5)           # a run's SE over its 5 sample seeds: 0.0707107
W_INPUT = {"model.w_input": True, "objective.w_range": [1.0, 2.0]}


def _seeded(**run_means):
    """Tracked metrics of one run at 5 sample seeds: {tracked name: run mean} -> mean, SE, per-seed values, K."""
    from mgbench.report.bench import seeded_metrics

    return seeded_metrics({name: [mean + d for d in OFFSETS] for name, mean in run_means.items()})


def _se(values):
    """Hand oracle: SD (n - 1) of the run values over sqrt(n)."""
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))


S100, S050 = T.metric_sweep(1.0, "fid"), T.metric_sweep(0.5, "fid")
WS = {w: T.metric_wsweep(w, "fid") for w in (1.33, 1.5, 2.0)}
SEEDED_RUNS = [   # (overrides, {tracked name: run mean}); every run at 5 sample seeds
    *[({**DIT, "objective.w": 1.0, "train.seed": s}, {FID: f, S100: c, S050: h})
      for s, f, c, h in ((0, 40.0, 6.1, 9.0), (1, 42.0, 6.4, 9.3), (2, 41.0, 6.7, 9.6))],
    *[({**DIT, "objective.w": 1.5, "train.seed": s}, {FID: f}) for s, f in ((0, 7.1), (1, 8.0), (2, 7.5))],
    ({**DIT, "objective.w": 1.25, "train.seed": 0}, {FID: 10.1}),
    *[({**DIT, **W_INPUT, "train.seed": s}, {FID: f, WS[1.33]: a, WS[1.5]: b, WS[2.0]: c})
      for s, f, a, b, c in ((0, 12.0, 10.5, 9.0, 7.8), (1, 12.4, 10.9, 9.4, 8.2))],
]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """Study `seeded`: vanilla (3 seeds, CFG sweep at s = 0.5, 1), MG w=1.5 (3 seeds), w=1.25 (1 seed),
    a w-input model (2 seeds, w sweep at 1.33, 1.5, 2); every run evaluated at 5 sample seeds."""
    root, uri, writer = sqlite_mlflow_store(tmp_path_factory, "seeded")
    exp, parent = start_study(writer, "seeded", str(root / "art"))
    ids = [log_trial(writer, "seeded", exp, parent, i, trial_params(**over), _seeded(**means))
           for i, (over, means) in enumerate(SEEDED_RUNS)]
    return uri, L.load_runs(uri, "seeded"), ids


def test_mean_and_se_over_training_and_sample_seeds(seeded):
    t = build_table(seeded[1], 3, "seeded")
    w15 = _row(t, source="measured", setting="w=1.50")
    assert w15["fid"] == pytest.approx((7.1 + 8.0 + 7.5) / 3) and w15["fid_se"] == pytest.approx(_se([7.1, 8.0, 7.5]))
    assert w15["fid_se"] == pytest.approx(0.2603417, abs=1e-7)
    assert (w15["n_finished"], w15["sample_seeds"], w15["fid_n"], w15["train_seeds"]) == (3, "5", 3, "0 1 2")
    one = _row(t, source="measured", setting="w=1.25")     # one run: its SE over its 5 sample seeds
    assert one["fid"] == pytest.approx(10.1) and one["fid_se"] == pytest.approx(SEED_SE) and one["fid_n"] == 1
    md = to_markdown(t)
    assert "| DiT-T/2 | +MG | w=1.50 | measured: digits, 2000 steps | 3x5 | **7.53 ± 0.26** |" in md
    assert "| DiT-T/2 | +MG | w=1.25 | measured: digits, 2000 steps | 1x5 | 10.100 ± 0.071† |" in md
    assert "† one training seed: ± is the SE over its sample seeds only" in md
    assert r"10.100 $\pm$ 0.071$^\dagger$" in to_latex(t)


def test_table3_cfg_row_matched_to_mg_strength(seeded):
    t = build_table(seeded[1], 3, "seeded")
    matched = t.rows[t.rows["row_kind"] == "matched"]
    assert matched["setting"].tolist() == ["vanilla + CFG s=1.00 (matched to w=1.50)"]   # w=1.25: s=0.33 not swept
    cfg = matched.iloc[0]
    assert cfg["variant"] == "cfg" and cfg["fid"] == pytest.approx(6.4)
    assert cfg["fid_se"] == pytest.approx(_se([6.1, 6.4, 6.7]))
    assert not cfg["fid_best"]                               # lower than every nominal row, yet not bold
    block = t.rows[t.rows["source"] == "measured"].reset_index(drop=True)
    at = block.index[block["setting"] == "w=1.50"][0]
    assert block.loc[at + 1, "setting"] == cfg["setting"]    # right beside the MG row it matches
    assert block.loc[block["fid_best"], "setting"].tolist() == ["w=1.50"]
    md = to_markdown(t)
    assert ("| DiT-T/2 | CFG | vanilla + CFG s=1.00 (matched to w=1.50) | measured: digits, 2000 steps | 3x5 | "
            "6.40 ± 0.17 |") in md
    paper = t.rows[t.rows["source"] == "paper"]
    assert paper["setting"].tolist() == paper_rows(3)["setting"].tolist()   # the paper's layout is kept


def test_table5_matched_strength_and_best_w(seeded):
    t = build_table(seeded[1], 5, "seeded")
    block = t.rows[(t.rows["source"] == "measured") & (t.rows["model"] == "DiT-T/2")]
    settings = block["setting"].tolist()
    at = settings.index("w_input=yes")
    assert settings[at:] == ["w_input=yes", "w_input=yes, fed w=1.33 (matched s=0.33 to w=1.25)",
                             "w_input=yes, fed w=2.00 (matched s=1.00 to w=1.50)",
                             "w_input=yes, best fed w=2.00 (s=1.00; lowest FID of 3 fed w)"]
    rows = block.set_index("setting")
    assert rows.loc["w_input=yes", "fid"] == pytest.approx(12.2) and rows.loc["w_input=yes", "row_kind"] == "nominal"
    fed2 = rows.loc["w_input=yes, fed w=2.00 (matched s=1.00 to w=1.50)"]
    assert fed2["fid"] == pytest.approx(8.0) and fed2["fid_se"] == pytest.approx(_se([7.8, 8.2]))
    assert fed2["row_kind"] == "matched"
    assert rows.loc["w_input=yes, fed w=1.33 (matched s=0.33 to w=1.25)", "fid"] == pytest.approx(10.7)
    best = rows.loc["w_input=yes, best fed w=2.00 (s=1.00; lowest FID of 3 fed w)"]
    assert best["fid"] == pytest.approx(8.0) and best["row_kind"] == "best w"
    assert not block.loc[block["row_kind"] != "nominal", "fid_best"].any()
    assert block.loc[block["fid_best"], "extra"].tolist() == ["w=1.5"]      # the fixed w=1.5 row, 7.53


def test_per_run_csv(seeded, tmp_path):
    uri, _, ids = seeded
    paths = render("table3", "seeded", uri, tmp_path)
    assert [p.name for p in paths] == ["table3.md", "table3.tex", "table3.csv", "table3_runs.csv"]
    runs = pd.read_csv(tmp_path / "table3_runs.csv")
    table = pd.read_csv(tmp_path / "table3.csv")
    assert set(runs["row"]) <= set(table["row"])
    w15 = runs[runs["setting"] == "w=1.50"]
    assert w15["train_seed"].tolist() == [0, 1, 2] and w15["run_id"].tolist() == ids[3:6]
    assert w15["fid"].tolist() == pytest.approx([7.1, 8.0, 7.5])
    assert w15["fid_se"].tolist() == pytest.approx([SEED_SE] * 3)
    assert w15["fid_k"].tolist() == [5, 5, 5] and w15["n_sample_seeds"].tolist() == [5, 5, 5]
    seeds = w15[[f"fid_seed_{k}" for k in range(5)]].to_numpy().ravel().tolist()
    assert seeds == pytest.approx([m + d for m in (7.1, 8.0, 7.5) for d in OFFSETS])
    assert (w15["model"].unique().tolist(), w15["status"].unique().tolist()) == (["DiT-T/2"], ["finished"])
    cfg = runs[runs["row_kind"] == "matched"]      # the matched row's runs: the vanilla runs' sweep at s = 1
    assert cfg["run_id"].tolist() == ids[:3] and cfg["fid"].tolist() == pytest.approx([6.1, 6.4, 6.7])
    assert cfg["fid_seed_4"].tolist() == pytest.approx([6.3, 6.6, 6.9])
    row = table.set_index("row").loc[cfg["row"].iloc[0]]
    assert row["setting"] == "vanilla + CFG s=1.00 (matched to w=1.50)" and row["fid"] == pytest.approx(6.4)
    assert cfg["row"].iloc[0] == row_key("measured", "DiT-T/2", "measured: digits, 2000 steps", "cfg",
                                         "vanilla + CFG s=1.00 (matched to w=1.50)", "")


def test_run_values_tracked_mean_seed_fallback_and_mixed_k():
    """A run's value: its tracked mean and SE; from its per-seed values where no mean is tracked; K = 1 before seeds."""
    import numpy as np

    from mgbench.report.values import columns_of, run_values, summarise

    second = [5.0, 6.0] + [np.nan] * 3       # a run with 2 per-seed values and no tracked mean
    seeds = {T.metric_seed(FID, k): [7.1 + d, v, np.nan] for k, (d, v) in enumerate(zip(OFFSETS, second))}
    df = pd.DataFrame({FID: [7.1, np.nan, 30.0], T.metric_se(FID): [SEED_SE, np.nan, np.nan], **seeds,
                       T.M_SAMPLE_SEEDS: [5.0, np.nan, np.nan]})
    v = run_values(df, {"fid": FID})
    assert v["fid"].tolist() == pytest.approx([7.1, 5.5, 30.0]) and v["fid_k"].tolist() == [5, 2, 1]
    assert v["fid_se"].tolist()[:2] == pytest.approx([SEED_SE, 0.5]) and math.isnan(v["fid_se"][2])
    assert v["n_sample_seeds"].tolist() == [5, 2, 1] and v["fid_seed_1"].tolist()[:2] == pytest.approx([7.2, 6.0])
    runs = v.assign(**{L.STATUS: ["finished", "finished", "failed"], "train_seed": pd.array([0, 1, 2], dtype="Int64")})
    row = summarise(columns_of(runs), ["fid"])
    assert (row["n_runs"], row["n_finished"], row["status"], row["sample_seeds"]) == (3, 2, "1 failed", "2-5")
    assert row["fid"] == pytest.approx(6.3) and row["fid_se"] == pytest.approx(_se([7.1, 5.5])) and row["fid_n"] == 2


# ----------------------------------------------------------------------------- the 2D toy table

TOY = {"model.arch": "MLP-S", "data.name": "grid2d", "objective.formulation": "flow", "sample.steps": 50}
IMPLIED = "objective.implied_cfg_scale"     # logged by the trainer beside the config (not a config field)


def _grid(prefix: str, in_class: float, wrong: float, sub: float, coverage: float = 1.0) -> dict:
    """Tracked grid2d metrics under `prefix` (eval/ or a sweep's name format), NFE of 50 steps x 1."""
    values = {"in_class": in_class, "wrong_class": wrong, "off_board": round(1 - in_class - wrong, 6),
              "off_support": round(1 - in_class, 6), "coverage": coverage, "subcell_coverage": sub, "swd": 0.1,
              "center_dist": 0.3}
    return {prefix.format(m): v for m, v in values.items()}


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    """Study `toy`: vanilla at 2 training seeds x 3 sample seeds with a CFG sweep (0.5, 1.0); MG w=1.5 (implied
    s = 1) at 2 seeds; MG w=1.25 from before wrong_class/off_board/subcell_coverage existed; MG w=1.75 failed."""
    root, uri, writer = sqlite_mlflow_store(tmp_path_factory, "toy")
    exp, parent = start_study(writer, "toy", str(root / "art"))
    ev, sw = "eval/{}", lambda s: T.metric_sweep(s, "{}")
    runs = []
    for seed, (a, b) in enumerate([(0.78, 0.86), (0.80, 0.84)]):
        metrics = {**_grid(ev, a, 0.19, b), **_grid(sw(0.5), a + 0.09, 0.10, b - 0.08),
                   **_grid(sw(1.0), a + 0.14, 0.06, b - 0.22), T.M_NFE: 50.0, T.metric_sweep(0.5, "nfe"): 100.0,
                   T.metric_sweep(1.0, "nfe"): 100.0, T.M_SAMPLE_SEEDS: 3.0, T.metric_se("eval/in_class"): 0.01}
        runs.append(({**TOY, "objective.w": 1.0, "train.seed": seed}, metrics, "finished"))
    for seed, a in enumerate([0.92, 0.93]):
        metrics = {**_grid(ev, a, 0.06, 0.70), T.M_NFE: 50.0}
        runs.append(({**TOY, "objective.w": 1.5, "train.seed": seed, IMPLIED: 1.0}, metrics, "finished"))
    old = {"eval/in_class": 0.85, "eval/off_support": 0.15, "eval/coverage": 1.0, "eval/swd": 0.06,
           "eval/center_dist": 0.36, T.M_NFE: 50.0}
    runs.append(({**TOY, "objective.w": 1.25, IMPLIED: 1 / 3}, old, "finished"))
    runs.append(({**TOY, "objective.w": 1.75, IMPLIED: 3.0}, {}, "failed"))
    for i, (over, metrics, status) in enumerate(runs):
        params = {**trial_params(**{k: v for k, v in over.items() if k != IMPLIED}), IMPLIED: str(over.get(IMPLIED))}
        log_trial(writer, "toy", exp, parent, i, params, metrics, status=status, scale="grid2d, 3000 steps")
    return L.load_runs(uri, "toy")


def test_toy_table_values_seeds_and_matched_row(toy_runs):
    from mgbench.report.toy import toy_table

    table, notes = toy_table(toy_runs)
    assert table["method"].tolist() == ["vanilla (conditional)", "CFG s=0.50", "CFG s=1.00", "MG w=1.25", "MG w=1.50",
                                        "CFG s=1.00 (matched to MG w=1.50)", "MG w=1.75"]
    rows = table.set_index("method")
    van = rows.loc["vanilla (conditional)"]
    assert van["in_class"] == pytest.approx(0.79) and van["in_class_se"] == pytest.approx(0.01)  # |a - b| / 2
    assert (van["in_class_n"], van["n_finished"], van["sample_seeds"]) == (2, 2, "3")
    assert van["nfe_per_step"] == 1.0 and rows.loc["CFG s=0.50", "nfe_per_step"] == 2.0
    assert rows.loc["CFG s=1.00", "subcell_coverage"] == pytest.approx(0.85 - 0.22)
    mg = rows.loc["MG w=1.50"]
    assert mg["in_class"] == pytest.approx(0.925) and mg["implied_s"] == 1.0 and mg["kind"] == "nominal"
    matched = rows.loc["CFG s=1.00 (matched to MG w=1.50)"]
    assert matched["kind"] == "matched" and matched["in_class"] == rows.loc["CFG s=1.00", "in_class"]
    old = rows.loc["MG w=1.25"]        # a run from before the split: what it has, the rest absent
    assert old["in_class"] == 0.85 and math.isnan(old["wrong_class"]) and math.isnan(old["subcell_coverage"])
    assert rows.loc["MG w=1.75", "status"] == "1 failed" and rows.loc["MG w=1.75", "n_finished"] == 0
    assert notes == ["MG w=1.25 trains towards CFG s=0.33, which the study did not sweep "
                     "(add 0.33 to eval.cfg_sweep to place it beside)."]
    # best: in-class highest among rows as sampled (the matched copy never), none where every row ties
    assert table.loc[table["in_class_best"], "method"].tolist() == ["CFG s=1.00"]   # 0.93, not its matched copy
    assert table.loc[table["wrong_class_best"], "method"].tolist() == ["CFG s=1.00", "MG w=1.50"]   # a tie: both
    assert not table["coverage_best"].any()


def test_toy_markdown_defines_every_column_with_its_direction(toy_runs, tmp_path):
    from mgbench.metric_registry import METRICS as REG
    from mgbench.report.toy import METRICS, write_toy

    md_path, csv_path = write_toy(toy_runs, "toy", tmp_path)
    md = md_path.read_text()
    lines = md.splitlines()
    header = lines[2]
    assert header.startswith("| Method | NFE/step | implied s | Seeds | in-class ↑ | wrong-class ↓ | off-board ↓ | "
                             "coverage ↑ | sub-cell coverage ↑ |") and "Runs" not in header
    for m in METRICS:                                   # every metric column defined under the table
        arrow = "↑" if REG[m].higher_is_better else "↓"
        assert f"{REG[m].header} {arrow}: {REG[m].meaning}" in md
    for column in ("NFE/step:", "implied s:", "Seeds:", "vanilla (conditional) =", "CFG s=S =", "MG w=W ="):
        assert column in md
    body = {line.split(" | ")[0][2:]: line.split(" | ") for line in lines[4:11]}
    assert body["vanilla (conditional)"][3] == "2x3" and body["MG w=1.50"][3] == "2x1"
    assert body["MG w=1.25"][3] == "1x1" and body["MG w=1.25"][5] == DASH           # old run: wrong-class absent
    assert body["MG w=1.75"][3] == "0/1 (1 failed)" and body["MG w=1.75"][4] == "failed"
    assert body["vanilla (conditional)"][4] == "0.790 ± 0.010"
    assert body["MG w=1.50"][4] == "0.9250 ± 0.0050" and body["CFG s=1.00"][4] == "**0.930 ± 0.010**"
    assert "**" not in " ".join(row[7] for row in body.values())      # coverage ties everywhere: no bold
    assert "mean ± std over seeds" not in md and "(add 0.33 to eval.cfg_sweep" in md
    mg = lines.index("| MG w=1.50 | 1 | 1.00 | 2x1 | 0.9250 ± 0.0050 | **0.060 ± 0.000** | 0.0150 ± 0.0050 | "
                     "1.000 ± 0.000 | 0.700 ± 0.000 | 0.100 ± 0.000 | **0.300 ± 0.000** |")
    assert lines[mg + 1].startswith("| CFG s=1.00 (matched to MG w=1.50) | 2 | – | 2x3 | 0.930 ± 0.010 | "
                                    "0.060 ± 0.000 |")
    again = write_toy(toy_runs, "toy", tmp_path / "again")
    assert [p.read_bytes() for p in again] == [md_path.read_bytes(), csv_path.read_bytes()]


def test_report_all_on_an_image_study_skips_the_toy_and_what_has_no_data(store, tmp_path):
    """`ablate` holds digits runs with final FID/IS/precision (no CFG sweep, no grid2d run, no model size)."""
    skipped: list[tuple[str, str]] = []
    paths = render("all", "ablate", store, tmp_path, skipped=skipped)
    reasons = dict(skipped)
    assert sorted(reasons) == ["fig2", "fig4", "fig6", "toy"]
    assert reasons["toy"] == "the toy table reads the 2D checkerboard's metrics; no grid2d run"
    assert reasons["fig2"] == "Fig. 2 plots the 2D toy's samples; no finished grid2d run"
    assert reasons["fig4"].startswith("Fig. 4 plots FID and IS against the CFG scale; no run has them at more than "
                                      "one scale")                    # each run's own FID alone is a point, no curve
    assert reasons["fig6"].endswith(f"no run with FID has its size ({T.M_PARAMS})")
    assert {p.name for p in paths} >= {f"table{n}.md" for n in range(1, 9)} | {"fig5_convergence.csv"}
    assert not any(p.name.startswith(("toy", "fig2", "fig4", "fig6")) for p in tmp_path.iterdir())
