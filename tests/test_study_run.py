"""Studies end to end on the debug executor: real tiny grid2d trials, real Optuna storages, real MLflow sqlite."""
from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from conftest import STUDIES, TEST_STUDIES
from mgbench.tracking import TAG_PARENT, mlflow_client

from mgbench.study.runner import EVENTS_FILE, run_study
from mgbench.study.spec import load_spec
from mgbench.study.cli import main as study_main
from mgbench.study.status import status_rows
from mgbench.study.trial import read_json
from mgbench.tracking import TAG_OUT_DIR, TAG_ROLE, TAG_SCALE, TAG_STATUS, TAG_STUDY, TAG_TRIAL

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)



def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / EVENTS_FILE).read_text().splitlines()]


def test_grid_study_completes_with_nested_mlflow_runs(tmp_path, capsys):
    out = tmp_path / "study"
    spec = load_spec(TEST_STUDIES / "_test_grid.yaml", {"out_dir": str(out)})
    summary = run_study(spec, echo=lambda s: None)
    assert (summary.n_complete, summary.n_failed, summary.n_running) == (4, 0, 0)

    study = optuna.load_study(study_name="_test_grid", storage=f"sqlite:///{out / 'optuna.db'}")
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
    assert sorted((t.params["objective.w"], t.params["objective.label_drop"]) for t in trials) == \
        [(1.0, 0.1), (1.0, 0.2), (1.5, 0.1), (1.5, 0.2)]
    assert all(0.0 <= t.value <= 1.0 for t in trials)

    client = mlflow_client(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("_test_grid")
    parents = client.search_runs([exp.experiment_id], f"tags.`{TAG_ROLE}` = 'study'")
    assert len(parents) == 1 and parents[0].data.tags[TAG_STUDY] == "_test_grid"
    assert parents[0].data.metrics["study/n_complete"] == 4.0
    children = client.search_runs([exp.experiment_id], f"tags.`{TAG_ROLE}` = 'trial'")
    assert len(children) == 4
    by_trial = {int(r.data.tags[TAG_TRIAL]): r for r in children}
    for t in trials:
        run = by_trial[t.number]
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        assert tags[TAG_PARENT] == parents[0].info.run_id
        assert tags[TAG_STATUS] == "finished" and run.info.status == "FINISHED"
        assert tags[TAG_SCALE] == "grid2d, 60 steps"
        assert run.info.run_name == f"w={t.params['objective.w']:.2f} lambda={t.params['objective.label_drop']:.2f}"
        assert float(params["objective.w"]) == t.params["objective.w"]
        assert params["train.steps"] == "60"  # the trainer's own params land in the same run
        assert metrics["eval/off_class"] == pytest.approx(t.value)
        assert "train/loss" in metrics
        rec = read_json(Path(tags[TAG_OUT_DIR]) / "trial.json")
        assert rec["run_id"] == run.info.run_id and rec["number"] == t.number and rec["trial_id"] == t._trial_id
        assert (Path(rec["out_dir"]) / "checkpoints").is_dir() or any(Path(rec["out_dir"]).glob("*ckpt*"))
        arts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "config.yaml" in arts and "study" in arts

    rows = status_rows(spec)
    assert [r["state"] for r in rows] == ["COMPLETE"] * 4 and {r["mlflow"] for r in rows} == {"finished"}
    assert {r["result"] for r in rows} == {"finished"} and all(r["job"].endswith("(ended)") for r in rows)
    capsys.readouterr()  # the trials' progress lines (debug jobs run, and print, in this process)
    assert study_main(["study", "status", str(TEST_STUDIES / "_test_grid.yaml"), "--out-dir", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()[2:]  # below the objective and best-trial lines (test_progress.py)
    assert table[0].split()[:3] == ["trial", "state", "value"] and len(table) == 5
    assert all(" COMPLETE " in line and by_trial[i].info.run_id in line for i, line in enumerate(table[1:]))

    # Rerunning a finished study runs nothing again.
    n_events = len(events(out))
    again = run_study(spec, echo=lambda s: None)
    assert again.n_complete == 4 and len(study.get_trials()) == 4
    assert [e for e in events(out)[n_events:] if e["event"] == "submit"] == []
    assert len(client.search_runs([exp.experiment_id], f"tags.`{TAG_ROLE}` = 'trial'")) == 4


def test_paused_trials_resume_in_their_folder_with_journal_storage(tmp_path):
    out = tmp_path / "study"
    spec = load_spec(TEST_STUDIES / "_test_grid.yaml", {
        "out_dir": str(out), "storage": f"journal:///{out / 'optuna.log'}", "n_trials": 1, "parallelism": 1,
        "base": {"train": {"steps": 60, "max_steps_per_run": 25, "ckpt_every": 30, "log_every": 20, "device": "cpu"},
                 "optim": {"batch_size": 64}, "sample": {"steps": 5, "n_grid": 16}}})
    summary = run_study(spec, echo=lambda s: None)
    assert summary.n_complete == 1
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "optuna.log")))
    (t,) = optuna.load_study(study_name="_test_grid", storage=storage).get_trials()
    assert t.state == optuna.trial.TrialState.COMPLETE
    folder = out / "trials" / f"{t.number:04d}"
    rec, res = read_json(folder / "trial.json"), read_json(folder / "result.json")
    assert len(rec["jobs"]) == 3 and rec["deaths"] == 0  # 25 + 25 + 10 steps, one job each
    assert res["status"] == "finished" and res["step"] == 60
    kinds = [e["event"] for e in events(out)]
    assert kinds == ["submit", "paused", "submit", "paused", "submit", "end"]
    run = mlflow_client(spec.tracking_uri).get_run(rec["run_id"])
    assert run.data.tags[TAG_STATUS] == "finished"


def test_named_grid_of_settings_runs_and_logs_its_keys(tmp_path):
    """A named grid (Table 5's rows: fixed w vs w-input with a w range) runs as 2 trials whose MLflow params
    are the real trainer keys, so reports label the rows by them."""
    spec_text = (TEST_STUDIES / "_test_grid.yaml").read_text().replace("extends: ../../studies/base/grid2d.yaml",
                                                                      f"extends: {STUDIES / 'base' / 'grid2d.yaml'}")
    spec_text = spec_text.split("space:")[0] + (
        "space:\n  variant:\n    grid:\n      - {objective.w: 1.5}\n"
        "      - {objective.w: 1.5, model.w_input: true, objective.w_range: [1.0, 1.9]}\n"
        "sampler: grid\noptimize: {metric: off_class, direction: minimize}\n"
        "eval_hook: mgbench.evaluation.quick:quick_eval_hook\nexecutor: debug\nparallelism: 2\npoll_s: 0.2\n")
    (tmp_path / "spec.yaml").write_text(spec_text.replace("name: _test_grid", "name: _test_bundles"))
    out = tmp_path / "study"
    spec = load_spec(tmp_path / "spec.yaml", {"out_dir": str(out)})
    summary = run_study(spec, echo=lambda s: None)
    assert (summary.n_complete, summary.n_failed) == (2, 0)
    client = mlflow_client(spec.tracking_uri)
    exp = client.get_experiment_by_name("_test_bundles")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id], f"tags.`{TAG_ROLE}` = 'trial'")}
    assert set(runs) == {"w=1.50", "w=1.50 w_input=True w_range=[1.0, 1.9]"}
    fixed, scaled = runs["w=1.50"].data.params, runs["w=1.50 w_input=True w_range=[1.0, 1.9]"].data.params
    assert (fixed["model.w_input"], fixed["objective.w_range"]) == ("False", "None")
    assert (scaled["model.w_input"], scaled["objective.w_range"]) == ("True", "[1.0, 1.9]")
    rows = status_rows(spec)
    assert sorted(r["params"] for r in rows) == sorted(runs)
