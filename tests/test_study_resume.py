"""Studies on the debug executor: pruning on intermediate evaluations, and resume after a driver that died."""
from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from conftest import STUDIES, TEST_STUDIES, mgbench_env

from mgbench.study.runner import EVENTS_FILE, Driver, run_study
from mgbench.study.spec import load_spec
from mgbench.study.trial import read_json
from mgbench.tracking import TAG_ROLE, TAG_STATUS, mlflow_client

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)



def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / EVENTS_FILE).read_text().splitlines()]


def test_median_pruning_on_intermediate_evaluations(tmp_path):
    out = tmp_path / "study"
    spec = load_spec(TEST_STUDIES / "_test_grid.yaml", {
        "out_dir": str(out), "parallelism": 1, "eval_hook": "mgbench.evaluation.quick:w_eval_hook",
        "optimize": {"metric": "w", "direction": "minimize"},
        "space": {"objective.w": {"grid": [1.2, 1.0, 1.6, 1.4]}}, "sampler": {"type": "grid", "seed": 3},
        "pruning": {"type": "median", "n_startup_trials": 1},
        "base": {"train": {"steps": 40, "eval_every": 10, "log_every": 10, "ckpt_every": 40, "device": "cpu"},
                 "optim": {"batch_size": 64}, "sample": {"steps": 5, "n_grid": 16}}})
    summary = run_study(spec, echo=lambda s: None)
    study = optuna.load_study(study_name="_test_grid", storage=spec.storage)
    trials = study.get_trials()
    assert len(trials) == 4 and summary.n_complete + summary.n_pruned == 4
    best_so_far = float("inf")
    client = mlflow_client(spec.tracking_uri)
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
    spec = load_spec(TEST_STUDIES / "_test_sleep.yaml", {
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
    client = mlflow_client(spec.tracking_uri)
    exp = client.get_experiment_by_name("_test_sleep")
    runs = client.search_runs([exp.experiment_id], f"tags.`{TAG_ROLE}` = 'trial'")
    assert len(runs) == 4 and {r.data.tags[TAG_STATUS] for r in runs} == {"finished"}


def test_failed_trial_is_told_and_tagged(tmp_path):
    out = tmp_path / "study"
    spec = load_spec(TEST_STUDIES / "_test_sleep.yaml", {
        "out_dir": str(out), "executor": "debug", "optimize": {"metric": "fid"},
        "space": {"train.steps": {"grid": [10]}}})
    summary = run_study(spec, echo=lambda s: None)
    assert (summary.n_complete, summary.n_failed) == (0, 1)
    res = read_json(out / "trials" / "0000" / "result.json")
    assert res["status"] == "failed" and res["error"] == "objective metric 'fid' not in ['loss']"
    (t,) = optuna.load_study(study_name="_test_sleep", storage=spec.storage).get_trials()
    assert t.state == optuna.trial.TrialState.FAIL
    run = mlflow_client(spec.tracking_uri).get_run(read_json(out / "trials" / "0000" / "trial.json")["run_id"])
    assert run.data.tags[TAG_STATUS] == "failed" and run.info.status == "FAILED"


# ----------------------------------------------------------------------------- a real driver, SIGKILLed


def _spec_file(tmp_path: Path, out: Path) -> Path:
    """_test_sleep.yaml as a file the driver process reads: 4 trials, 2 at a time, journal storage."""
    import yaml

    raw = yaml.safe_load((TEST_STUDIES / "_test_sleep.yaml").read_text())
    raw.update({"extends": str(STUDIES / "base" / "grid2d.yaml"), "out_dir": str(out),
                "space": {"train.steps": {"grid": [1000, 1001, 6000, 6001]}},
                "sampler": {"type": "grid", "seed": 4},  # seed 4 asks the two 1 s trials first
                "storage": f"journal:///{out / 'optuna.log'}", "executor": "local", "parallelism": 2,
                "poll_s": 0.1})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _trial(out: Path, n: int, name: str) -> dict | None:
    return read_json(out / "trials" / f"{n:04d}" / name)


def _executions(out: Path, n: int) -> int:
    path = out / "trials" / f"{n:04d}" / "executions.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _wait_until_2_of_4_complete(out: Path, driver, timeout: float = 150) -> None:
    """Wait until Optuna has exactly 2 COMPLETE trials and the 6 s trials 2 and 3 sleep in their jobs."""
    import time

    storage = None
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert driver.poll() is None, "the driver ended before it could be killed"
        trials = []
        if storage is None and (out / "optuna.log").exists():  # the driver creates it (the test must not)
            backend = optuna.storages.journal.JournalFileBackend(str(out / "optuna.log"))
            storage = optuna.storages.JournalStorage(backend)
        if storage is not None:
            try:
                trials = optuna.load_study(study_name="_test_sleep", storage=storage).get_trials(deepcopy=False)
            except KeyError:  # no study yet
                pass
        done = [t.number for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert len(done) <= 2, f"a 6 s trial ended before the kill point: {done}"
        if done == [0, 1] and all((out / "trials" / f"{n:04d}" / "pid").exists() for n in (2, 3)):
            return
        time.sleep(0.05)
    raise AssertionError(f"no kill point within {timeout} s")


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("jobs", ["survive", "die"])
def test_driver_sigkilled_after_2_of_4_trials_rerun_finishes_the_other_2(tmp_path, jobs):
    """The issue's case: the driver is SIGKILLed once 2 of 4 trials are COMPLETE; the same command again
    finishes the other 2 and repeats neither finished trial.

    survive: only the driver dies; the 2 in-flight jobs run on. The rerun re-attaches to them, so every
    trial runs exactly once: 4 executions in all.
    die: the in-flight jobs die with it (their processes are killed too). The rerun resubmits exactly
    those 2 on their own trial, MLflow run and folder: 4 + (executions the killed jobs had started) in all.
    """
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "study"
    spec_path = _spec_file(tmp_path, out)
    env = mgbench_env()
    cmd = [sys.executable, "-m", "mgbench.cli", "study", "run", str(spec_path)]
    with open(tmp_path / "first.log", "w") as log:
        driver = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_until_2_of_4_complete(out, driver)
        finally:
            driver.kill()  # SIGKILL: no cleanup of any kind
            driver.wait()
    if jobs == "die":
        for n in (2, 3):
            os.kill(int((out / "trials" / f"{n:04d}" / "pid").read_text()), signal.SIGKILL)

    # The state the rerun starts from: trials 0 and 1 finished and told, 2 and 3 in flight without a result.
    assert {n: _trial(out, n, "trial.json")["params"]["train.steps"] for n in range(4)} == \
        {0: 1000, 1: 1001, 2: 6001, 3: 6000}
    before = {n: {"trial": _trial(out, n, "trial.json"), "result": _trial(out, n, "result.json"),
                  "timing": _trial(out, n, "timing.json"), "executions": _executions(out, n)} for n in range(4)}
    for n in (0, 1):
        assert before[n]["result"]["status"] == "finished" and before[n]["executions"] == 1
    for n in (2, 3):
        assert before[n]["result"] is None and len(before[n]["trial"]["jobs"]) == 1
    client = mlflow_client(f"sqlite:///{out / 'mlflow.db'}")
    ended = {n: client.get_run(before[n]["trial"]["run_id"]).info.end_time for n in (0, 1)}
    n_events = len(events(out))

    rerun = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=200)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "optuna.log")))
    trials = optuna.load_study(study_name="_test_sleep", storage=storage).get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)

    for n in (0, 1):  # finished before the kill: not rerun, not resubmitted, not touched
        assert _executions(out, n) == 1
        assert _trial(out, n, "trial.json") == before[n]["trial"]
        assert _trial(out, n, "result.json") == before[n]["result"]
        assert _trial(out, n, "timing.json") == before[n]["timing"]
        assert client.get_run(before[n]["trial"]["run_id"]).info.end_time == ended[n]
    new = [(e["event"], e["trial"]) for e in events(out)[n_events:]]
    assert not [e for e in new if e[1] in (0, 1)], new
    for n in (2, 3):  # in flight at the kill: finished by the rerun on the same trial and MLflow run
        rec = _trial(out, n, "trial.json")
        assert rec["run_id"] == before[n]["trial"]["run_id"] and rec["trial_id"] == before[n]["trial"]["trial_id"]
        assert _trial(out, n, "result.json")["status"] == "finished"
        assert ("attach", n) in new and new.count(("end", n)) == 1
        if jobs == "survive":  # the same job, re-attached: it ran once
            assert _executions(out, n) == 1 and rec["jobs"] == before[n]["trial"]["jobs"] and rec["deaths"] == 0
            assert ("submit", n) not in new and ("resubmit", n) not in new
        else:  # its job died without a result: resubmitted exactly once
            assert _executions(out, n) == before[n]["executions"] + 1
            assert len(rec["jobs"]) == 2 and rec["deaths"] == 1
            assert new.count(("resubmit", n)) == 1 and new.count(("submit", n)) == 1
    total = sum(_executions(out, n) for n in range(4))
    killed = 0 if jobs == "survive" else before[2]["executions"] + before[3]["executions"]
    assert total == 4 + killed

    exp = client.get_experiment_by_name("_test_sleep")
    runs = client.search_runs([exp.experiment_id], f"tags.`{TAG_ROLE}` = 'trial'")
    assert len(runs) == 4 and {r.data.tags[TAG_STATUS] for r in runs} == {"finished"}
