"""The system-level row (mgbench/report/system.py): choice of w* and s*, the rows, their statistics, the command."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from mgbench.report import system as S


def _trial(tmp_path, i, seed, w, metrics, status="finished"):
    """A trial folder as the study runner leaves it (trial.json + result.json)."""
    folder = tmp_path / "trials" / f"{i:04d}"
    folder.mkdir(parents=True)
    cfg = {"train": {"seed": seed}, "objective": {"w": w, "formulation": "flow"}}
    (folder / "trial.json").write_text(json.dumps({"config": cfg}))
    (folder / "result.json").write_text(json.dumps({"status": status, "metrics": metrics}))
    return folder


def test_load_trials_keeps_finished_only_and_choose_picks_lowest_means(tmp_path):
    _trial(tmp_path, 0, 0, 1.25, {"fid": 0.5})
    _trial(tmp_path, 1, 1, 1.25, {"fid": 0.3})      # w = 1.25: mean 0.4
    _trial(tmp_path, 2, 0, 1.5, {"fid": 0.35})
    _trial(tmp_path, 3, 1, 1.5, {"fid": 0.55})      # w = 1.5: mean 0.45
    _trial(tmp_path, 4, 2, 1.5, {"fid": 0.0}, status="failed")   # not finished: ignored
    sweep = lambda a, b: {"fid": 1.2, "sweep/cfg_scale_0.33/fid": a, "sweep/cfg_scale_1.00/fid": b}  # noqa: E731
    _trial(tmp_path, 5, 0, 1.0, sweep(0.42, 0.30))
    _trial(tmp_path, 6, 1, 1.0, sweep(0.40, 0.60))  # s = 0.33: mean 0.41, s = 1: 0.45
    trials = S.load_trials(tmp_path)
    assert sorted((t.seed, t.w) for t in trials) == [(0, 1.0), (0, 1.25), (0, 1.5), (1, 1.0), (1, 1.25), (1, 1.5)]
    assert S.choose(trials) == (1.25, 0.33)


def test_choose_needs_mg_rows_and_a_sweep(tmp_path):
    _trial(tmp_path, 0, 0, 1.0, {"fid": 1.0})
    with pytest.raises(ValueError, match="no MG trials"):
        S.choose(S.load_trials(tmp_path))
    _trial(tmp_path, 1, 0, 1.5, {"fid": 1.0})
    with pytest.raises(ValueError, match="no CFG sweep"):
        S.choose(S.load_trials(tmp_path))


def test_settings_spend_equal_nfe_in_the_matched_row():
    rows = S.settings(1.25, 0.33, 50)
    assert [(r.group, r.guidance, r.steps, r.nfe) for r in rows] == [
        ("mg", "auto", 50, 50), ("vanilla", "cfg", 50, 100), ("vanilla", "cfg", 25, 50), ("vanilla", "none", 50, 50)]
    assert rows[0].nfe == rows[2].nfe


def test_eval_command_is_a_valid_mgbench_eval_call(tmp_path):
    from mgbench.cli import build_parser

    trial = S.Trial(tmp_path, 0, 1.0, "flow", {})
    cfg_row = S.settings(1.5, 0.5, 50)[2]
    cmd = S.eval_command(trial, cfg_row, n=100, k=3, out=tmp_path / "x.json")
    args = build_parser("eval").parse_args(cmd[3:])
    assert (args.steps, args.n, args.cfg_sweep) == (25, 100, [])
    assert "sample.guidance=cfg" in args.set and "sample.cfg_scale=0.5" in args.set
    assert "eval.sample_seeds=3" in args.set


def test_summary_and_paired_comparison_match_hand_computation():
    rows = S.settings(1.25, 0.33, 50)
    found = {}
    mg = {0: [1.0, 1.2], 1: [2.0, 2.2], 2: [3.0, 3.2]}          # run means 1.1, 2.1, 3.1
    cfg = {0: [1.6, 1.6], 1: [2.4, 2.6], 2: [3.6, 3.6]}         # run means 1.6, 2.5, 3.6
    for key, table, ips in ((rows[0].key, mg, 100.0), (rows[2].key, cfg, 50.0)):
        for seed, (a, b) in table.items():
            found[(key, seed)] = {"n_sample_seeds": 2, "fid/seed_0": a, "fid/seed_1": b, "img_per_s": ips}
    per_run = S.run_table(rows, found)
    assert len(per_run) == 12
    summary = S.summarise(rows, per_run).set_index("key")
    assert summary.loc[rows[0].key, "fid"] == pytest.approx(2.1)
    assert summary.loc[rows[0].key, "fid_se"] == pytest.approx(1.0 / math.sqrt(3))   # SD of 1.1, 2.1, 3.1 is 1
    assert summary.loc[rows[0].key, "n"] == "3x2"
    assert math.isnan(summary.loc[rows[1].key, "fid"])                               # not evaluated: no value
    (comp,) = S.comparisons(rows, per_run)
    d = [-0.5, -0.4, -0.5]                                                           # paired differences
    mean, se = sum(d) / 3, pd.Series(d).std(ddof=1) / math.sqrt(3)
    half = 4.302652729911275 * se                                                    # t_{0.975, 2}
    assert comp["paired"] and comp["diff"] == pytest.approx(mean)
    assert (comp["low"], comp["high"]) == pytest.approx((mean - half, mean + half))
    assert comp["verdict"] == "holds" and comp["img_per_s_ratio"] == pytest.approx(2.0)


def test_markdown_names_the_rows_and_the_choice():
    rows = S.settings(1.25, 0.33, 50)
    table = pd.DataFrame([{"setting": r.label, "key": r.key, "steps": r.steps, "nfe": r.nfe, "n": "3x3",
                           **{m: 1.0 for m in (*S.METRICS, "img_per_s")},
                           **{f"{m}_se": 0.01 for m in (*S.METRICS, "img_per_s")}} for r in rows])
    text = S.markdown("study", table, [], 1.25, 0.33, 1000, "load average 1.0")
    assert "w* = 1.25 and s* = 0.33" in text
    assert "| vanilla + CFG s=0.33, 25 steps (equal NFE) | 25 | 50 | 3x3 | 1.000 ± 0.010 |" in text


def test_timing_load_flags_busy_or_unrecorded_evaluations(monkeypatch):
    monkeypatch.setattr(S.os, "cpu_count", lambda: 2)
    assert S.timing_load({("a", 0): {"load_1m": 0.5}, ("a", 1): {"load_1m": 1.5}}) == \
        "1-minute load average 0.5-1.5 on 2 cores"
    assert S.timing_load({("a", 0): {"load_1m": 0.5}, ("a", 1): {"load_1m": 3.0}}).endswith("unreliable here")
    assert S.timing_load({("a", 0): {}}).startswith("not recorded")
