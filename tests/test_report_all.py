"""`mgbench report all` on a real (tiny) quickstart study: what the runs fill, what it skips and why, human labels."""
from __future__ import annotations

import argparse
import re

import pandas as pd
import pytest
import torch
from conftest import STUDIES

from mgbench.report.cli import add_report_parser, run_report
from mgbench.report.load import load_runs
from mgbench.report.items import ALL
from mgbench.report.renderers import render

QUICKSTART = STUDIES / "quickstart.yaml"
# The quickstart as written (vanilla, MG w=1.25 and 1.5, CFG sweep 0.5/1/2, the real grid2d evaluation), shrunk to
# a few seconds per trial on the debug executor.
TINY = {"optim": {"batch_size": 64}, "train": {"steps": 30, "log_every": 10, "ckpt_every": 30, "device": "cpu"},
        "sample": {"steps": 4, "n_grid": 32}, "eval": {"n_samples": 64, "cfg_sweep": [0.5, 1.0, 2.0]}}


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The tiny quickstart, run once: (spec, tracking URI)."""
    from mgbench.study.runner import run_study
    from mgbench.study.spec import load_spec

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("quickstart")
    spec = load_spec(QUICKSTART, {"out_dir": str(out), "executor": "debug", "parallelism": 1, "poll_s": 0.05,
                                  "base": TINY})
    summary = run_study(spec, echo=lambda s: None)
    assert (summary.n_complete, summary.n_failed) == (3, 0)
    return spec, spec.tracking_uri


def _report(args: list[str], capsys) -> tuple[int, list[str]]:
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command"))
    code = run_report(parser.parse_args(["report", *args]))
    return code, capsys.readouterr().out.splitlines()


def test_report_all_renders_what_the_runs_fill_and_lists_the_rest(quickstart, tmp_path, capsys):
    spec, uri = quickstart
    out = tmp_path / "report"
    code, lines = _report(["all", "--study", str(QUICKSTART), "--tracking-uri", uri, "--out", str(out)], capsys)
    assert code == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(["fig2_toy.csv", "fig2_toy.png", "fig2_toy.pdf", "toy.md", "toy.csv"])
    assert [line for line in lines if not line.startswith("skipped ")] == [str(out / n) for n in (
        "fig2_toy.csv", "fig2_toy.png", "fig2_toy.pdf", "toy.md", "toy.csv")]
    skipped = [line for line in lines if line.startswith("skipped ")]
    # one line per skipped item, naming it and why: Tables 1-8 and Figs. 4-6 read image metrics (FID, IS, ...)
    assert [line.split(":")[0] for line in skipped] == [f"skipped {i}" for i in ALL if i not in ("fig2", "toy")]
    for line in skipped[:8]:
        n = int(line.split(":")[0][-1])
        assert re.fullmatch(rf"skipped table{n}: Table {n} \(.+\) reads FID, sFID, IS, Prec\., Rec\.(, IMG/S)?; "
                            r"no run of this study has them \(its runs' data: grid2d\)", line), line
    assert skipped[8].startswith("skipped fig4: Fig. 4 plots FID and IS against the CFG scale; no run has them")
    assert skipped[10] == ("skipped fig6: Fig. 6 plots FID against model size and sampling compute; no finished run "
                           "has FID (its runs' data: grid2d)")


def test_toy_table_of_the_real_study_uses_its_numbers_and_words(quickstart, tmp_path):
    spec, uri = quickstart
    runs = load_runs(uri, spec.name)
    paths = render("toy", spec.name, uri, tmp_path)
    table = pd.read_csv(paths[1])
    assert table["method"].tolist() == [
        "vanilla (conditional)", "CFG s=0.50", "CFG s=1.00", "CFG s=2.00", "MG w=1.25", "MG w=1.50",
        "CFG s=1.00 (matched to MG w=1.50)", "MG w=1.25 + CFG s=0.50", "MG w=1.25 + CFG s=1.00",
        "MG w=1.25 + CFG s=2.00", "MG w=1.50 + CFG s=0.50", "MG w=1.50 + CFG s=1.00", "MG w=1.50 + CFG s=2.00"]
    vanilla = runs[runs["objective.w"] == 1.0].iloc[0]
    row = table.set_index("method").loc["vanilla (conditional)"]
    for m in ("in_class", "wrong_class", "off_board", "subcell_coverage"):   # one run, one sample seed: its value
        assert row[m] == pytest.approx(vanilla[f"eval/{m}"], abs=1e-6)
    assert row["wrong_class"] + row["off_board"] == pytest.approx(vanilla["eval/off_support"], abs=1e-6)
    matched = table.set_index("method").loc["CFG s=1.00 (matched to MG w=1.50)"]
    assert matched["in_class"] == pytest.approx(vanilla["sweep/cfg_scale_1.00/in_class"], abs=1e-6)
    md = paths[0].read_text()
    assert "| 1x1 |" in md and "mean ± std" not in md
    assert not re.search(r"\b(objective|sample|eval|train|model)\.[a-z_]+=", md)   # no raw config keys as labels
    assert "MG w=1.25 trains towards CFG s=0.33, which the study did not sweep" in md


def test_fig2_of_the_real_study_is_ordered_by_guidance_strength(quickstart, tmp_path):
    spec, uri = quickstart
    data = pd.read_csv(render("fig2", spec.name, uri, tmp_path)[0])
    panels = data.drop_duplicates("method").sort_values("panel")["method"].tolist()
    assert panels == ["vanilla", "CFG s=0.50", "CFG s=1.00", "CFG s=2.00", "MG w=1.25", "MG w=1.50"]


def test_table_labels_are_words_not_config_keys():
    from mgbench.report.specs import param_text

    assert param_text("objective.label_drop", 0.2) == "lambda=0.2"
    assert param_text("objective.w", 1.25) == "w=1.25"
    assert param_text("model.w_input", True) == "w as input=yes"
    assert param_text("optim.ema_decay", 0.9999) == "EMA decay=0.9999"
    assert param_text("objective.some_new_knob", 1 / 3) == "some new knob=0.3333"    # unknown keys: their last part
