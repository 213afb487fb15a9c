"""A pruned trial is reported as pruned (its MLflow run ends KILLED; the mgbench.status tag says why)."""
from __future__ import annotations


import optuna
import pandas as pd
import pytest
import yaml
from conftest import STUDIES

from mgbench.report.load import load_runs, tidy_runs
from mgbench.study.runner import run_study
from mgbench.study.spec import load_spec
from mgbench.tracking import STATUS_TO_MLFLOW, TAG_STATUS, mlflow_client

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)



def test_pruned_trial_loads_as_pruned(tmp_path):
    # The metric is the trial's own w (reported every 10 steps), so w = 1.8 is worse than both earlier trials at
    # step 10; sampler seed 5 runs the grid in the order 1.0, 1.2, 1.8, and with 2 startup trials the median
    # pruner judges only the last one: it is pruned at its first report, the others finish.
    spec = {"name": "_pruned", "extends": str(STUDIES / "base" / "grid2d.yaml"),
            "base": {"optim": {"batch_size": 64}, "sample": {"steps": 5, "n_grid": 16},
                     "train": {"steps": 40, "eval_every": 10, "log_every": 10, "ckpt_every": 40, "device": "cpu"}},
            "space": {"objective.w": [1.0, 1.2, 1.8]}, "sampler": {"type": "grid", "seed": 5},
            "optimize": {"metric": "w", "direction": "minimize"},
            "pruning": {"type": "median", "n_startup_trials": 2},
            "eval_hook": "mgbench.evaluation.quick:w_eval_hook", "executor": "debug", "parallelism": 1, "poll_s": 0.1,
            "out_dir": str(tmp_path / "study")}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    s = load_spec(tmp_path / "spec.yaml")
    summary = run_study(s, echo=lambda line: None)
    assert (summary.n_complete, summary.n_pruned, summary.n_failed) == (2, 1, 0)
    trials = optuna.load_study(study_name="_pruned", storage=s.storage).get_trials()
    assert [t.params["objective.w"] for t in trials] == [1.0, 1.2, 1.8]  # the order the comment relies on
    assert trials[2].state == optuna.trial.TrialState.PRUNED and trials[2].last_step == 10

    df = load_runs(s.tracking_uri, study="_pruned")
    status = dict(zip(df["objective.w"], df["status"]))
    assert status == {1.0: "finished", 1.2: "finished", 1.8: "pruned"}
    pruned = df[df["objective.w"] == 1.8].iloc[0]
    assert pruned["mlflow_status"] == "KILLED" and pruned[TAG_STATUS] == "pruned"
    assert mlflow_client(s.tracking_uri).get_run(pruned["run_id"]).info.status == STATUS_TO_MLFLOW["pruned"]
    assert df.loc[df["objective.w"] == 1.0, "eval/w"].tolist() == [1.0]


@pytest.mark.parametrize("tag, mlflow_status, expected", [
    ("pruned", "KILLED", "pruned"),       # a pruned trial: the tag wins over MLflow's KILLED
    ("finished", "FINISHED", "finished"),
    ("failed", "FAILED", "failed"),
    ("running", "RUNNING", "running"),
    ("running", "KILLED", "failed"),      # still tagged running but ended by MLflow (a killed job): failed
    ("running", "FAILED", "failed"),
    (None, "KILLED", "failed"),           # a run without mgbench's tag that MLflow killed
    (None, "FINISHED", "finished"),
])
def test_status_prefers_the_mgbench_tag(tag, mlflow_status, expected):
    raw = pd.DataFrame({"run_id": ["r"], "experiment_id": ["1"], "status": [mlflow_status], "start_time": [0],
                        f"tags.{TAG_STATUS}": [tag]})
    assert tidy_runs(raw)["status"].tolist() == [expected]
