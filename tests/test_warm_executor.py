"""Warm local jobs (mgbench.study.warm): forked from a zygote that imported torch and the trainer once, with the
records of cold jobs, isolated from each other and from the zygote, re-attached after a killed driver."""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import threading
import time
from pathlib import Path

import pytest
from conftest import TEST_STUDIES
from mgbench_standins import EXECUTIONS_FILE, PROBE_FILE, THREAD_AT_IMPORT_ENV
from optuna.trial import TrialState

from mgbench.config import ConfigError
from mgbench.study.executors import check_executor, make_executor
from mgbench.study.jobstate import pid_alive
from mgbench.study.optuna_io import open_study
from mgbench.study.runner import EVENTS_FILE, run_study
from mgbench.study.spec import load_spec
from mgbench.study.trial import read_json
from mgbench.study.warm import WarmAutoExecutor
from mgbench.study.warm_zygote import fork_problem
from mgbench.tracking import TAG_ROLE, TAG_STATUS, mlflow_client

FORK = multiprocessing.get_context("fork")
SPEC = TEST_STUDIES / "_test_warm.yaml"


def study(tmp_path: Path, name: str = "study", **overrides):
    out = tmp_path / name
    return load_spec(SPEC, {"out_dir": str(out), "storage": f"journal:///{out / 'optuna.log'}", **overrides})


def folder(spec, n: int) -> Path:
    return Path(spec.out_dir) / "trials" / f"{n:04d}"


def probe(spec, n: int) -> dict:
    return read_json(folder(spec, n) / PROBE_FILE)


def job_id(spec, n: int) -> int:
    return int(read_json(folder(spec, n) / "trial.json")["jobs"][-1]["job_id"])


def states(spec) -> dict[int, TrialState]:
    return {t.number: t.state for t in open_study(spec, create=False).get_trials()}


def events(spec) -> list[tuple[str, int]]:
    lines = (Path(spec.out_dir) / EVENTS_FILE).read_text().splitlines()
    return [(e["event"], e["trial"]) for e in map(json.loads, lines)]


def trial_runs(spec) -> dict[int, object]:
    client = mlflow_client(spec.tracking_uri)
    exp = client.get_experiment_by_name(spec.name)
    found = client.search_runs([exp.experiment_id], f"tags.`{TAG_ROLE}` = 'trial'")
    by_id = {r.info.run_id: r for r in found}
    return {n: by_id[read_json(folder(spec, n) / "trial.json")["run_id"]] for n in range(len(found))}


def job_files(spec) -> set[str]:
    """The submitit folder's files, each job id written J (warm and cold jobs have different pids)."""
    root = Path(spec.out_dir) / "submitit"
    return {re.sub(r"\d+", "J", str(p.relative_to(root))) for p in root.rglob("*") if p.is_file()}


def wait_for(what, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (found := what()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s"
        time.sleep(0.05)
    return found


def test_warm_trials_run_in_forks_of_one_zygote_with_the_records_of_cold_ones(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # torch's own default (importing it then starts threads)
    warm = study(tmp_path, "warm")
    cold = study(tmp_path, "cold", executor={"type": "local", "warm": False})
    assert isinstance(make_executor(warm), WarmAutoExecutor) and not isinstance(make_executor(cold), WarmAutoExecutor)
    for spec in (warm, cold):
        summary = run_study(spec, echo=lambda s: None)
        assert (summary.n_complete, summary.n_failed, summary.best_value) == (2, 0, 1.0)

    # Warm: one zygote imported torch and then the trainer module; each trial ran in a fork of it, under its own
    # controller (the job id), so torch was not imported again per trial.
    p = [probe(warm, n) for n in range(2)]
    zygote = p[0]["loaded_by"]
    assert p[1]["loaded_by"] == zygote and zygote not in (os.getpid(), p[0]["pid"], p[1]["pid"])
    assert all(x["torch_loaded_first"] for x in p)
    assert [x["ppid"] for x in p] == [job_id(warm, n) for n in range(2)]
    assert p[0]["pid"] != p[1]["pid"]
    # Cold: each trial's own Python imported the trainer module. Both: torch on the same threads.
    assert all(probe(cold, n)["loaded_by"] == probe(cold, n)["pid"] for n in range(2))
    assert [probe(warm, n)["threads"] for n in range(2)] == [probe(cold, n)["threads"] for n in range(2)]

    # The same records: result.json, trial.json's job entries, MLflow runs, events, submitit's files.
    for n in range(2):
        rw, rc = (read_json(folder(s, n) / "result.json") for s in (warm, cold))
        assert set(rw) == set(rc)
        assert {k: rw[k] for k in ("status", "value", "metrics", "step", "error")} == \
            {k: rc[k] for k in ("status", "value", "metrics", "step", "error")}
        jw, jc = (read_json(folder(s, n) / "trial.json")["jobs"] for s in (warm, cold))
        assert [set(j) for j in jw] == [set(j) for j in jc] and jw[0]["executor"] == jc[0]["executor"] == "local"
    mw, mc = trial_runs(warm), trial_runs(cold)
    for n in range(2):
        assert mw[n].info.status == mc[n].info.status == "FINISHED"
        assert mw[n].data.tags[TAG_STATUS] == mc[n].data.tags[TAG_STATUS] == "finished"
        assert (mw[n].data.params, mw[n].data.metrics) == (mc[n].data.params, mc[n].data.metrics)
    assert events(warm) == events(cold)
    assert job_files(warm) == job_files(cold)
    assert not pid_alive(zygote)  # let go when the study ended


def test_a_trial_whose_process_crashes_fails_and_the_next_runs_in_the_same_zygote(tmp_path):
    spec = study(tmp_path, entry="mgbench_standins:crashing_train", space={"train.steps": {"grid": [301, 300]}})
    summary = run_study(spec, echo=lambda s: None)
    assert read_json(folder(spec, 0) / "trial.json")["params"] == {"train.steps": 301}  # odd: SIGSEGV
    assert (summary.n_complete, summary.n_failed) == (1, 1)
    assert states(spec) == {0: TrialState.FAIL, 1: TrialState.COMPLETE}
    rec = read_json(folder(spec, 0) / "trial.json")
    assert read_json(folder(spec, 0) / "result.json") is None and (len(rec["jobs"]), rec["deaths"]) == (1, 1)
    assert probe(spec, 1)["loaded_by"] == probe(spec, 0)["loaded_by"] != probe(spec, 1)["pid"]  # still warm
    assert trial_runs(spec)[0].data.tags[TAG_STATUS] == "failed"


def test_a_killed_zygote_leaves_its_job_running_and_the_next_trial_gets_a_new_one(tmp_path, capfd):
    spec = study(tmp_path, entry="mgbench_standins:zygote_killing_train")
    summary = run_study(spec, echo=lambda s: None)
    assert (summary.n_complete, summary.n_failed) == (2, 0)
    p = [probe(spec, n) for n in range(2)]
    assert p[0]["loaded_by"] != p[1]["loaded_by"]  # trial 0 killed the first zygote, yet finished
    assert all(x["loaded_by"] != x["pid"] for x in p)  # both warm
    assert "starts cold" not in capfd.readouterr().err


def _drive(path: str, out_dir: str) -> None:
    spec = load_spec(path, {"out_dir": out_dir, "space": {"train.steps": {"grid": [4000]}}})
    run_study(spec, echo=lambda s: None)
    os._exit(0)


def test_driver_killed_its_zygote_exits_its_job_runs_on_and_the_rerun_reattaches(tmp_path):
    out = tmp_path / "study"
    driver = FORK.Process(target=_drive, args=(str(SPEC), str(out)))
    driver.start()
    spec = load_spec(SPEC, {"out_dir": str(out), "space": {"train.steps": {"grid": [4000]}}})
    first = wait_for(lambda: (folder(spec, 0) / PROBE_FILE).exists() and probe(spec, 0))
    driver.kill()
    driver.join()
    wait_for(lambda: not pid_alive(first["loaded_by"]), timeout=30)  # the zygote ends with its driver
    assert pid_alive(job_id(spec, 0))  # its job does not
    summary = run_study(spec, echo=lambda s: None)  # the same command again
    assert (summary.n_complete, summary.n_failed) == (1, 0)
    assert len((folder(spec, 0) / EXECUTIONS_FILE).read_text().splitlines()) == 1  # re-attached, not run again
    assert ("attach", 0) in events(spec) and events(spec).count(("submit", 0)) == 1


def test_imports_that_make_forking_unsafe_leave_jobs_cold(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv(THREAD_AT_IMPORT_ENV, "1")  # the zygote's import of the stand-ins starts a thread
    spec = study(tmp_path, space={"train.steps": {"grid": [300]}})
    assert run_study(spec, echo=lambda s: None).n_complete == 1
    assert probe(spec, 0)["loaded_by"] == probe(spec, 0)["pid"]  # a fresh Python imported the trainer
    assert "threads running after the imports" in capfd.readouterr().err


def _fork_problem_before_and_with_a_thread(conn) -> None:
    before = fork_problem()
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    conn.send((before, fork_problem()))
    stop.set()
    t.join()
    os._exit(0)


def test_fork_problem_is_none_alone_and_names_a_running_thread():
    """In a fork of the test process (one thread): no problem; with one more thread running, that thread is named."""
    ours, theirs = FORK.Pipe()
    child = FORK.Process(target=_fork_problem_before_and_with_a_thread, args=(theirs,))
    child.start()
    before, with_thread = ours.recv()
    child.join()
    assert before is None
    assert with_thread is not None and with_thread.startswith("threads running after the imports (")


@pytest.mark.parametrize("executor, message", [
    ({"type": "local", "warm": "yes"}, "executor.warm: expected true or false, got 'yes'"),
    ({"type": "debug", "warm": True}, "executor.warm: only for type local (warm jobs are local processes), not debug"),
])
def test_warm_option_is_checked_with_a_one_line_error(tmp_path, executor, message):
    spec = study(tmp_path, executor=executor)
    with pytest.raises(ConfigError) as e:
        check_executor(spec)
    assert str(e.value) == f"{SPEC}:{message}"
