"""Several drivers on one study (two `mgbench study run` at once on one storage), and failed trials in MLflow.

Real processes, real Optuna storages (sqlite and journal file), real submitit executors, real MLflow
sqlite stores; the trainer is `sleep_train`, which appends one line per execution to its trial folder.
"""
from __future__ import annotations

import collections
import json
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import STUDIES, TEST_STUDIES, mgbench_env
from mgbench_standins import EXECUTIONS_FILE

from mgbench.study.optuna_io import make_storage
from mgbench.study.runner import EVENTS_FILE, OWNER_ATTR, run_study
from mgbench.study.spec import load_spec
from mgbench.study.trial import read_json
from mgbench.tracking import A_ERROR, TAG_ERROR, TAG_PARENT, TAG_ROLE, TAG_STATUS, TAG_TRIAL, mlflow_client

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)

N = 20


def write_spec(tmp: Path, **overrides) -> Path:
    """_test_sleep.yaml with overrides, as a file the driver processes read (extends made absolute)."""
    raw = yaml.safe_load((TEST_STUDIES / "_test_sleep.yaml").read_text())
    raw["extends"] = str(STUDIES / "base" / "grid2d.yaml")
    raw["out_dir"] = str(tmp / "out")
    raw.update(overrides)
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def executions(out: Path, number: int) -> int:
    path = out / "trials" / f"{number:04d}" / EXECUTIONS_FILE
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("storage, start", [("sqlite", "together"), ("journal", "staggered")])
def test_two_drivers_on_one_storage_run_20_trials_once_each(tmp_path, storage, start):
    """Two `mgbench study run` processes on one spec: 20 trials, none lost, none run twice.

    together: both start at once (they race to create the study, the MLflow store and the parent run).
    staggered: the second starts once the first has trials in flight, so its start-up reconcile finds
    RUNNING trials that belong to a live driver (it must leave them alone, not re-attach or resubmit).

    The debug executor runs each driver's jobs inside that driver (two trials at a time in all): what is
    under test is the drivers sharing the study. (The local executor passes the same test, but its 20 job
    processes take minutes on 2 busy cores.)
    """
    out = tmp_path / "out"
    steps = [400 + i for i in range(N)]  # 20 grid points, 0.4 s each
    uri = f"journal:///{out / 'optuna.log'}" if storage == "journal" else f"sqlite:///{out / 'optuna.db'}"
    path = write_spec(tmp_path, space={"train.steps": {"grid": steps}}, sampler={"type": "grid", "seed": 5},
                      storage=uri, executor="debug", parallelism=2, poll_s=0.1)
    env = mgbench_env()
    cmd = [sys.executable, "-m", "mgbench.cli", "study", "run", str(path)]
    logs = [open(tmp_path / f"driver{i}.log", "w") for i in range(2)]
    drivers = []
    try:
        for log in logs:
            if start == "staggered" and drivers:
                _wait_for_submit(out, drivers[0])
            drivers.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT))
        rcs = [d.wait(timeout=240) for d in drivers]
    finally:
        for d in drivers:
            if d.poll() is None:
                d.kill()
                d.wait()
        for log in logs:
            log.close()
    text = [(tmp_path / f"driver{i}.log").read_text() for i in range(2)]
    assert rcs == [0, 0], text

    # Optuna: exactly 20 trials, all COMPLETE, numbers 0..19 and the 20 grid points each exactly once.
    study = optuna.load_study(study_name="_test_sleep", storage=make_storage(uri))
    trials = study.get_trials()
    assert len(trials) == N, [(t.number, t.params) for t in trials]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == list(range(N))
    assert collections.Counter(t.params["train.steps"] for t in trials) == collections.Counter(steps)
    # Both drivers worked on the study (each trial is owned by the driver that asked it).
    owners = collections.Counter(t.system_attrs[OWNER_ATTR]["pid"] for t in trials)
    assert set(owners) == {d.pid for d in drivers}, owners

    # No trial ran twice: one execution, one job, no deaths, one submit event, no re-attach or resubmit.
    for t in trials:
        rec = read_json(out / "trials" / f"{t.number:04d}" / "trial.json")
        assert executions(out, t.number) == 1, t.number
        assert len(rec["jobs"]) == 1 and rec["deaths"] == 0 and rec["params"] == t.params
        assert rec["trial_id"] == t._trial_id
    events = [json.loads(line) for line in (out / EVENTS_FILE).read_text().splitlines()]
    submits = collections.Counter(e["trial"] for e in events if e["event"] == "submit")
    assert submits == collections.Counter(range(N))
    assert {e["event"] for e in events} == {"submit", "end"}

    # MLflow: one parent run; exactly one nested run per trial, the one trial.json names, finished.
    client = mlflow_client(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("_test_sleep")
    (parent,) = client.search_runs([exp.experiment_id], f"tags.`{TAG_ROLE}` = 'study'")
    assert parent.info.status == "FINISHED" and parent.data.metrics["study/n_complete"] == N
    runs = client.search_runs([exp.experiment_id], f"tags.`{TAG_ROLE}` = 'trial'", max_results=1000)
    assert collections.Counter(int(r.data.tags[TAG_TRIAL]) for r in runs) == collections.Counter(range(N))
    for r in runs:
        n = int(r.data.tags[TAG_TRIAL])
        assert r.info.run_id == read_json(out / "trials" / f"{n:04d}" / "trial.json")["run_id"]
        assert r.data.tags[TAG_PARENT] == parent.info.run_id
        assert r.info.status == "FINISHED" and r.data.tags[TAG_STATUS] == "finished"


def _wait_for_submit(out: Path, driver: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not ((out / EVENTS_FILE).exists() and '"submit"' in (out / EVENTS_FILE).read_text()):
        assert driver.poll() is None and time.time() < deadline, "the first driver submitted nothing"
        time.sleep(0.05)


def test_a_trial_that_raises_has_its_error_in_mlflow(tmp_path):
    out = tmp_path / "out"
    spec = load_spec(TEST_STUDIES / "_test_sleep.yaml", {
        "out_dir": str(out), "executor": "debug", "entry": "mgbench_standins:failing_train",
        "space": {"train.steps": {"grid": [10]}}})
    summary = run_study(spec, echo=lambda s: None)
    assert (summary.n_complete, summary.n_failed) == (0, 1)
    (t,) = optuna.load_study(study_name="_test_sleep", storage=spec.storage).get_trials()
    assert t.state == optuna.trial.TrialState.FAIL
    folder = out / "trials" / "0000"
    assert executions(out, 0) == 1  # it ran once and was not retried (a raise is a result, not a lost job)
    error = "RuntimeError: _test_sleep-0000: training diverged at step 0 (failing_train)"
    assert read_json(folder / "result.json")["error"] == error

    client = mlflow_client(spec.tracking_uri)
    run = client.get_run(read_json(folder / "trial.json")["run_id"])
    assert run.info.status == "FAILED" and run.data.tags[TAG_STATUS] == "failed"
    assert run.data.tags[TAG_ERROR] == error
    local = client.download_artifacts(run.info.run_id, A_ERROR, str(tmp_path))
    text = Path(local).read_text()
    assert text.startswith(error) and "Traceback (most recent call last)" in text and "in failing_train" in text
