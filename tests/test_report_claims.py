"""Declared claims -> verdicts: a real MLflow sqlite store, claims files, and hand-computed intervals."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ROOT
from scipy import stats as st
from scipy.special import gammaln

from mgbench import tracking as T
from mgbench.config import ConfigError
from mgbench.report.claims import evaluate_claims, load_claims
from mgbench.report.claims_table import BEGIN, END
from mgbench.report.cli import add_report_parser
from mgbench.report.stats import FAILS, HOLDS, UNRESOLVED, run_value
from mgbench.report.synthetic import log_trial, start_study, trial_params

FID = T.metric_eval("fid")
DIT = {"model.arch": "DiT-T/2", "data.name": "digits", "objective.formulation": "diffusion"}
# Per setting, per training seed, the run's FID (a list: its values at K sample seeds).
W10 = [3.0, 3.2, 2.9]
W10_CFG1 = [1.21, 1.33, 1.08]             # the w = 1 runs' CFG-sweep point at s = 1.0
W10_CFG05 = [2.0, 2.1, 2.05]
W15 = [[1.1, 1.3], [1.2, 1.4], [1.0, 1.2]]  # K = 2: run means 1.2, 1.3, 1.1
W125 = [1.25, 1.12, 1.35]                 # within noise of w = 1.5
W20 = [3.5, 3.9]                          # seeds 0, 1 only: Welch against 3 seeds
W175 = [2.0, 2.2, 2.1, 2.3]               # one run (seed 0), K = 4
LAM02 = [1.0, 1.1, 1.05, 0.95]            # study `extra`: w = 1.5, lambda = 0.2, one run (seed 0), K = 4
WIN_FED2 = [1.4, 1.5, 1.3]                # study `extra`: w-input runs fed w = 2.0


def _metrics(values, name=FID):
    """A run's tracked metrics: the mean, and with K >= 2 the SE, the per-seed values and K."""
    if not isinstance(values, list):
        return {name: values}
    mean, se, k = run_value(values)
    out = {name: mean, T.metric_se(name): se, T.M_SAMPLE_SEEDS: k}
    out.update({T.metric_seed(name, i): v for i, v in enumerate(values)})
    return out


def _spec(folder: Path, name: str, db: Path) -> str:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "tracking_uri": f"sqlite:///{db}", "out_dir": str(db.parent), "sampler": "grid",
        "space": {"objective.w": {"grid": [1.0]}}, "optimize": {"metric": "in_class", "direction": "maximize"}}))
    return str(path)


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    """Spec files of three studies: `toy` and `extra` in one store, `ghost` never run (no store)."""
    from mgbench.tracking import RunStore

    root = tmp_path_factory.mktemp("claims")
    db = root / "mlflow.db"
    writer = RunStore(f"sqlite:///{db}")
    exp, parent = start_study(writer, "toy", str(root / "art"))
    trials = [({"objective.w": 1.0, "train.seed": s}, {**_metrics(v), **_metrics(c1, T.metric_sweep(1.0, "fid")),
                                                       **_metrics(c05, T.metric_sweep(0.5, "fid"))})
              for s, (v, c1, c05) in enumerate(zip(W10, W10_CFG1, W10_CFG05))]
    trials += [({"objective.w": 1.5, "train.seed": s}, _metrics(v)) for s, v in enumerate(W15)]
    trials += [({"objective.w": 1.25, "train.seed": s}, _metrics(v)) for s, v in enumerate(W125)]
    trials += [({"objective.w": 2.0, "train.seed": s}, _metrics(v)) for s, v in enumerate(W20)]
    trials += [({"objective.w": 1.75, "train.seed": 0}, _metrics(W175))]
    for i, (over, metrics) in enumerate(trials):
        log_trial(writer, "toy", exp, parent, i, trial_params(**DIT, **over), metrics)
    # A failed run that would change every w = 1.5 number if it were counted.
    log_trial(writer, "toy", exp, parent, 99, trial_params(**DIT, **{"objective.w": 1.5, "train.seed": 3}),
              {FID: 0.01}, status="failed")
    exp, parent = start_study(writer, "extra", str(root / "art"))
    log_trial(writer, "extra", exp, parent, 0, trial_params(**DIT, **{"objective.w": 1.5, "objective.label_drop": 0.2,
                                                                     "train.seed": 0}), _metrics(LAM02))
    for s, v in enumerate(WIN_FED2):
        over = {"objective.w": 1.5, "model.w_input": True, "objective.w_range": [1.0, 2.0], "train.seed": s}
        log_trial(writer, "extra", exp, parent, 1 + s, trial_params(**DIT, **over),
                  {FID: 9.0, T.metric_wsweep(2.0, "fid"): v})
    return {"toy": _spec(root, "toy", db), "extra": _spec(root, "extra", db),
            "ghost": _spec(root, "ghost", root / "ghost" / "mlflow.db"), "root": root}


def _claim(specs, a, b, kind="better", margin=None, studies=("toy",), **more):
    c = {"id": "c1", "claim": "A is better", "paper": "7.24 vs 9.66", "studies": [specs[s] for s in studies],
         "metric": "fid", "a": a, "b": b, "kind": kind, **more}
    return {**c, "margin": margin} if margin is not None else c


def _run(specs, tmp_path, *claims):
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump({"claims": [{**c, "id": f"c{i}"} for i, c in enumerate(claims)]}))
    return evaluate_claims(load_claims(path))


def _w(w, **more):
    return {"where": {"objective.w": w}, **more}


def test_clear_difference_holds_and_reverse_does_not(specs, tmp_path):
    good, bad = _run(specs, tmp_path, _claim(specs, _w(1.5), _w(1.0)), _claim(specs, _w(1.0), _w(1.5)))
    assert good.verdict == HOLDS and bad.verdict == FAILS
    assert good.a.est.n_text == "3x2" and good.b.est.n_text == "3x1" and not good.a.est.sampling_only
    assert good.a.seeds == pytest.approx({0: 1.2, 1: 1.3, 2: 1.1})   # the failed seed-3 run is not counted


def test_difference_within_noise_is_not_resolved(specs, tmp_path):
    (r,) = _run(specs, tmp_path, _claim(specs, _w(1.5), _w(1.25)))
    assert r.diff.paired and r.diff.low < 0 < r.diff.high and r.verdict == UNRESOLVED


def test_paired_interval_equals_hand_computation(specs, tmp_path):
    (r,) = _run(specs, tmp_path, _claim(specs, _w(1.5), _w(1.0)))
    a, b = np.array([1.2, 1.3, 1.1]), np.array(W10)
    d = a - b
    half = st.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
    assert r.diff.paired and r.diff.df == 2
    assert (r.diff.diff, r.diff.low, r.diff.high) == pytest.approx((d.mean(), d.mean() - half, d.mean() + half), abs=1e-12)
    ci = st.ttest_rel(a, b).confidence_interval()
    assert (r.diff.low, r.diff.high) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_unequal_seeds_use_welch(specs, tmp_path):
    (r,) = _run(specs, tmp_path, _claim(specs, _w(2.0), _w(1.0)))
    res = st.ttest_ind(W20, W10, equal_var=False)
    ci = res.confidence_interval()
    assert not r.diff.paired and r.diff.df == pytest.approx(res.df, rel=1e-12)
    assert (r.diff.low, r.diff.high) == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert r.verdict == UNRESOLVED                     # 0.6 apart, but 2 and 3 seeds: a wide interval


def test_single_runs_use_their_sample_seeds(specs, tmp_path):
    a = _w(1.75)
    b = {"where": {"objective.w": 1.5, "objective.label_drop": 0.2}, "study": specs["extra"]}
    (r,) = _run(specs, tmp_path, _claim(specs, a, b, studies=("toy", "extra")))
    assert r.a.est.n_text == "1x4" and r.a.est.sampling_only
    assert r.a.est.se == pytest.approx(np.std(W175, ddof=1) / 2, abs=1e-12)
    ci = st.ttest_ind(W175, LAM02, equal_var=False).confidence_interval()   # Welch over the sample seeds
    assert not r.diff.paired and (r.diff.low, r.diff.high) == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert r.verdict == FAILS                           # 2.15 against 1.025: B is clearly better


def test_equivalence_margin(specs, tmp_path):
    inside, tight, outside = _run(specs, tmp_path, _claim(specs, _w(1.5), _w(1.25), "equivalent", 1.0),
                                  _claim(specs, _w(1.5), _w(1.25), "equivalent", 0.05),
                                  _claim(specs, _w(1.5), _w(1.0), "equivalent", 0.1))
    assert -1.0 < inside.diff.low and inside.diff.high < 1.0 and inside.verdict == HOLDS
    assert tight.verdict == UNRESOLVED and outside.verdict == FAILS


def test_sweep_points_and_best_of(specs, tmp_path):
    best_w = {"best_of": {"objective.w": [1.25, 1.5, 1.75]}}
    best_cfg = {"where": {"objective.w": 1.0}, "best_of": {"cfg_scale": [0.5, 1.0]}}
    worst_w = {"worst_of": {"objective.w": [1.25, 1.5, 1.75]}}
    r, worst = _run(specs, tmp_path, _claim(specs, best_w, best_cfg, "equivalent", 0.5),
                    _claim(specs, worst_w, _w(1.0, cfg_scale=0.5)))
    assert r.a.text.endswith("w=1.5") and "best of w in {1.25, 1.5, 1.75} by mean (3 of 3 measured)" in r.a.text
    assert r.a.est.mean == pytest.approx(1.2) and r.b.text.endswith("CFG s=1")
    assert r.b.est.mean == pytest.approx(np.mean(W10_CFG1)) and r.diff.paired
    assert worst.a.text.endswith("w=1.75") and worst.b.est.mean == pytest.approx(np.mean(W10_CFG05))
    assert worst.verdict == UNRESOLVED                 # one run against three: Welch on 2.15 vs 2.05


def test_fed_w_reads_the_w_sweep(specs, tmp_path):
    a = {"where": {"model.w_input": True}, "fed_w": 2.0, "study": specs["extra"]}
    (r,) = _run(specs, tmp_path, _claim(specs, a, _w(1.0), studies=("toy", "extra")))
    assert r.a.est.mean == pytest.approx(np.mean(WIN_FED2)) and r.a.text == "w_input=True, fed w=2.00"
    assert r.diff.paired and r.verdict == HOLDS


def test_missing_study_or_runs_are_not_measured(specs, tmp_path):
    ghost, none = _run(specs, tmp_path, _claim(specs, _w(1.5), _w(1.0), studies=("ghost",)),
                       _claim(specs, _w(3.0), _w(1.0)))
    assert ghost.diff is None and ghost.verdict.startswith("not measured: ghost not run")
    assert f"`mgbench study run {specs['ghost']}`" in ghost.verdict
    assert not (specs["root"] / "ghost").exists()      # reading made no store
    assert none.verdict.startswith("not measured: no finished run of `w=3.00` logs `eval/fid` in toy")


def test_ambiguous_selector_is_a_config_error(specs, tmp_path):
    with pytest.raises(ConfigError, match=r"claims\[0\]\.a\.where: 4 runs for 3 training seeds.*\(model.w_input, objective.label_drop\)$"):
        _run(specs, tmp_path, _claim(specs, _w(1.5, study=specs["extra"]), _w(1.0), studies=("toy", "extra")))


BAD = [  # (change to a valid claim, the field the one-line error names)
    ({"metric": "colour"}, "metric"),
    ({"kind": "similar"}, "kind"),
    ({"kind": "equivalent"}, "margin"),
    ({"margin": 0.5}, "margin"),
    ({"a": {"where": {"objective.ww": 1.5}}}, "a.where.objective.ww"),
    ({"b": {"where": {}, "cfg_scale": 1.0, "fed_w": 2.0}}, "b.fed_w"),
    ({"a": {"where": {}, "colour": "red"}}, "a.colour"),
    ({"a": {"best_of": {"objective.w": [1.5]}}}, "a.best_of"),
    ({"b": {"where": {}, "study": "elsewhere.yaml"}}, "b.study"),
    ({"studies": []}, "studies"),
    ({"studies": ["no/such/spec.yaml"]}, "studies[0]"),
    ({"id": ""}, "id"),
    ({"paper": None}, "paper"),
]


@pytest.mark.parametrize("change, field", BAD, ids=[f for _, f in BAD])
def test_bad_claims_file_gives_one_line_error(specs, tmp_path, change, field):
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump({"claims": [{**_claim(specs, _w(1.5), _w(1.0)), **change}]}))
    with pytest.raises(ConfigError) as e:
        load_claims(path)
    assert str(e.value).startswith(f"{path}:claims[0].{field}:") and "\n" not in str(e.value)


def test_cli_writes_table_and_csv(specs, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump({"claims": [_claim(specs, _w(1.5), _w(1.0)),
                                               {**_claim(specs, _w(1.5), _w(1.0), studies=("ghost",)), "id": "c2"}]}))
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", "claims", "--claims", str(path), "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    md = (tmp_path / "out" / "claims.md").read_text()
    assert "| `c1`: A is better | DiT-T/2, digits, 2000 steps | fid (lower is better); A better than B | " \
           "w=1.50: 1.200 ± 0.058 (3x2) | w=1.00: 3.033 ± 0.088 (3x1) |" in md
    assert "| **holds** | 7.24 vs 9.66 |" in md and "not measured: ghost not run" in md
    csv = pd.read_csv(tmp_path / "out" / "claims.csv")
    d = np.array([1.2, 1.3, 1.1]) - np.array(W10)
    assert csv.loc[0, "diff"] == pytest.approx(d.mean(), rel=1e-5) and csv.loc[0, "test"] == "paired"
    assert csv["verdict"].tolist()[0] == HOLDS and csv.loc[1, "verdict"].startswith("not measured")
    first = md
    assert args.func(args) == 0 and (tmp_path / "out" / "claims.md").read_text() == first   # same runs, same bytes


def test_cli_puts_the_table_into_a_document_between_its_markers(specs, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump({"claims": [_claim(specs, _w(1.5), _w(1.0))]}))
    doc = tmp_path / "README.md"
    doc.write_text(f"# Reports\n\nintro\n{BEGIN}\nold table\n{END}\n\nafter\n")
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", "claims", "--claims", str(path), "--out", str(tmp_path / "out"),
                              "--into", str(doc)])
    assert args.func(args) == 0
    text = doc.read_text()
    table = (tmp_path / "out" / "claims.md").read_text()
    assert text.startswith("# Reports\n\nintro\n") and text.endswith(f"{END}\n\nafter\n")
    assert "old table" not in text and "| **holds** | 7.24 vs 9.66 |" in text
    assert table.split("\n", 2)[2].strip() in text and table.splitlines()[0] not in text   # body, not its title
    assert args.func(args) == 0 and doc.read_text() == text                                   # idempotent
    doc.write_text("no markers\n")
    (tmp_path / "out" / "claims.md").unlink()
    assert args.func(args) == 2 and doc.read_text() == "no markers\n"
    assert not (tmp_path / "out" / "claims.md").exists()                                     # nothing written
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mgbench report: error: ") and str(doc) in err[0]


def test_repo_claims_file_is_valid(monkeypatch):
    root = ROOT
    monkeypatch.chdir(root)
    claims = load_claims("reports/claims.yaml")
    ids = [c.id for c in claims]
    assert all(i.replace(".dit", ".sit") in ids for i in ids if i.endswith(".dit"))   # DiT and SiT twins
    assert all(Path(s).is_file() for c in claims for s in c.studies)


def _c4(k: int) -> float:
    """E[sample SD] / sigma for k normal draws (an exact constant)."""
    return math.sqrt(2 / (k - 1)) * math.exp(gammaln(k / 2) - gammaln((k - 1) / 2))


def test_se_shrinks_as_one_over_sqrt_k():
    """Mean SE over 4000 evaluations at K = 4 and K = 64 sample seeds (normal per-seed values, seeded).

    E[SE^2] = sigma^2 / K exactly, so the RMS-SE ratio is sqrt(64 / 4) = 4; the mean-SE ratio is
    4 c4(4) / c4(64) = 3.700 (a sample SD is biased low at small K). Monte-Carlo relative SD of each ratio at
    4000 draws is below 0.8%; the 3% tolerance is about 4 of those.
    """
    rng = np.random.default_rng(0)
    se = {k: np.array([run_value(rng.normal(5.0, 0.3, k).tolist())[1] for _ in range(4000)]) for k in (4, 64)}
    rms = math.sqrt(np.mean(se[4] ** 2) / np.mean(se[64] ** 2))
    assert rms == pytest.approx(4.0, rel=0.03)
    assert se[4].mean() / se[64].mean() == pytest.approx(4 * _c4(4) / _c4(64), rel=0.03)
