"""Studies on the debug executor: pruning on intermediate evaluations, and resume after a driver that died."""
from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from mgbench.study.runner import EVENTS_FILE, Driver, run_study
from mgbench.study.spec import load_spec
from mgbench.study.trial import read_json
from mgbench.tracking import TAG_ROLE, TAG_STATUS

STUDIES = Path(__file__).resolve().parents[1] / "studies"


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / EVENTS_FILE).read_text().splitlines()]


def test_median_pruning_on_intermediate_evaluations(tmp_path):
    out = tmp_path / "study"
    spec = load_spec(STUDIES / "_test_grid.yaml", {
        "out_dir": str(out), "parallelism": 1, "eval_hook": "mgbench.study.testing:w_eval_hook",
        "objective": {"metric": "w", "direction": "minimize"},
        "space": {"objective.w": {"grid": [1.2, 1.0, 1.6, 1.4]}}, "sampler": {"type": "grid", "seed": 3},
        "pruning": {"type": "median", "n_startup_trials": 1},
        "base": {"train": {"steps": 40, "eval_every": 10, "log_every": 10, "ckpt_every": 40, "device": "cpu"},
                 "optim": {"batch_size": 64}, "sample": {"steps": 5, "n_grid": 16}}})
    summary = run_study(spec, echo=lambda s: None)
    study = optuna.load_study(study_name="_test_grid", storage=spec.storage)
    trials = study.get_trials()
    assert len(trials) == 4 and summary.n_complete + summary.n_pruned == 4
    best_so_far = float("inf")
    client = MlflowClient(spec.tracking_uri)
    for t in trials:  # run one at a time: a trial is pruned iff it is worse than the median of the earlier ones
        w = t.params["objective.w"]
        run_id = read_json(out / "trials" / f"{t.number:04d}" / "trial.json")["run_id"]
        if t.state == optuna.trial.TrialState.PRUNED:
            assert w > best_so_far and t.last_step == 10
            assert client.get_run(run_id).data.tags[TAG_STATUS] == "pruned"
        else:
            assert t.state == optuna.trial.TrialState.COMPLETE and t.value == pytest.approx(w)
            assert sorted(t.intermediate_values) == [10, 20, 30, 40]
        best_so_far = min(best_so_far, w)
    assert summary.n_pruned >= 1


def test_resume_resubmits_lost_jobs_and_reruns_nothing_finished(tmp_path):
    out = tmp_path / "study"
    spec = load_spec(STUDIES / "_test_sleep.yaml", {
        "out_dir": str(out), "executor": "debug", "space": {"train.steps": {"grid": [10, 20, 30, 40]}}})
    # A driver that submits, finishes two trials, refills both slots and then dies (debug jobs die with it).
    first = Driver(spec, echo=lambda s: None)
    first.reconcile()
    first.fill()
    first.poll()
    first.fill()
    assert sorted(first.inflight) == [2, 3]
    del first
    done = {n: read_json(out / "trials" / f"{n:04d}" / "timing.json") for n in (0, 1)}

    summary = run_study(spec, echo=lambda s: None)  # resume = run again
    assert summary.n_complete == 4 and summary.n_failed == 0
    for n in (0, 1):  # finished trials are not rerun
        rec = read_json(out / "trials" / f"{n:04d}" / "trial.json")
        assert len(rec["jobs"]) == 1 and rec["deaths"] == 0
        assert read_json(out / "trials" / f"{n:04d}" / "timing.json") == done[n]
    for n in (2, 3):  # lost jobs are resubmitted on the same trial, run and folder
        rec = read_json(out / "trials" / f"{n:04d}" / "trial.json")
        assert len(rec["jobs"]) == 2 and rec["deaths"] == 1
        assert read_json(out / "trials" / f"{n:04d}" / "result.json")["status"] == "finished"
    kinds = [(e["event"], e["trial"]) for e in events(out)]
    assert kinds.count(("resubmit", 2)) == 1 and kinds.count(("resubmit", 3)) == 1
    assert ("submit", 0) not in kinds[4:] and ("submit", 1) not in kinds[4:]
    client = MlflowClient(spec.tracking_uri)
    exp = client.get_experiment_by_name("_test_sleep")
    runs = client.search_runs([exp.experiment_id], f"tags.`{TAG_ROLE}` = 'trial'")
    assert len(runs) == 4 and {r.data.tags[TAG_STATUS] for r in runs} == {"finished"}


def test_failed_trial_is_told_and_tagged(tmp_path):
    out = tmp_path / "study"
    spec = load_spec(STUDIES / "_test_sleep.yaml", {
        "out_dir": str(out), "executor": "debug", "objective": {"metric": "fid"},
        "space": {"train.steps": {"grid": [10]}}})
    summary = run_study(spec, echo=lambda s: None)
    assert (summary.n_complete, summary.n_failed) == (0, 1)
    res = read_json(out / "trials" / "0000" / "result.json")
    assert res["status"] == "failed" and res["error"] == "objective metric 'fid' not in ['loss']"
    (t,) = optuna.load_study(study_name="_test_sleep", storage=spec.storage).get_trials()
    assert t.state == optuna.trial.TrialState.FAIL
    run = MlflowClient(spec.tracking_uri).get_run(read_json(out / "trials" / "0000" / "trial.json")["run_id"])
    assert run.data.tags[TAG_STATUS] == "failed" and run.info.status == "FAILED"
