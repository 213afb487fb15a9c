"""Studies on the local executor (one subprocess per trial): no idle slots, and resume after a killed driver."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import PYTHONPATH, STUDIES, TEST_STUDIES

from mgbench.study.runner import EVENTS_FILE, run_study
from mgbench.study.spec import load_spec
from mgbench.study.trial import read_json
from mgbench.tracking import TAG_ROLE, TAG_STATUS, mlflow_client



def events(out: Path) -> list[dict]:
    path = out / EVENTS_FILE
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def trial_folder(out: Path, number: int) -> Path:
    return out / "trials" / f"{number:04d}"


def test_no_idle_slots_with_trials_of_different_lengths(tmp_path):
    out = tmp_path / "study"
    spec = load_spec(TEST_STUDIES / "_test_sleep.yaml", {"out_dir": str(out)})
    summary = run_study(spec, echo=lambda s: None)
    assert summary.n_complete == 3
    steps = {n: read_json(trial_folder(out, n) / "trial.json")["params"]["train.steps"] for n in range(3)}
    assert steps == {0: 6000, 1: 300, 2: 301}  # the sampler seed asks the long trial first

    # Trial 0 holds one slot for 6 s; the other slot is refilled as soon as trial 1 ends, while
    # trial 0 is still in flight (a batch-blocking driver would wait for trial 0).
    ev = [(e["event"], e["trial"]) for e in events(out)]
    assert ev[:2] == [("submit", 0), ("submit", 1)]
    assert ev.index(("end", 1)) < ev.index(("submit", 2)) < ev.index(("end", 0))
    timing = {n: read_json(trial_folder(out, n) / "timing.json") for n in range(3)}
    full = events(out)
    end1 = next(e["t"] for e in full if (e["event"], e["trial"]) == ("end", 1))
    submit2 = next(e["t"] for e in full if (e["event"], e["trial"]) == ("submit", 2))
    assert 0 <= submit2 - end1 < spec.poll_s + 2.0  # within a poll or so
    # Never more than `parallelism` trials running (counted from the jobs' own clocks).
    for n in range(3):
        t = timing[n]["start"] + 1e-3
        assert sum(timing[m]["start"] <= t < timing[m]["end"] for m in range(3)) <= spec.parallelism


@pytest.mark.slow
def test_resume_after_killed_driver(tmp_path):
    out = tmp_path / "study"
    overrides = {"space": {"train.steps": {"grid": [2500, 2501, 2502]}}, "sampler": "grid",
                 "storage": f"journal:///{out / 'optuna.log'}"}
    spec_path = tmp_path / "spec.yaml"
    text = (TEST_STUDIES / "_test_sleep.yaml").read_text().replace("extends: ../../studies/base/grid2d.yaml",
                                                                    f"extends: {STUDIES / 'base' / 'grid2d.yaml'}")
    spec_path.write_text(text)
    spec = load_spec(spec_path, {"out_dir": str(out), **overrides})
    # The driver reads the spec file: write the overrides into it.
    import yaml
    raw = yaml.safe_load(text)
    raw.update(overrides)
    raw["out_dir"] = str(out)
    spec_path.write_text(yaml.safe_dump(raw))

    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    driver = subprocess.Popen([sys.executable, "-m", "mgbench.study.cli", "study", "run", str(spec_path)],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        victim = _wait_for_kill_point(out, driver)
    finally:
        driver.kill()
        driver.wait()
    finished_before = {n for n in range(3) if (trial_folder(out, n) / "result.json").exists()}
    timing_before = {n: read_json(trial_folder(out, n) / "timing.json") for n in finished_before}
    os.kill(victim["pid"], signal.SIGKILL)  # the job of a running trial dies too (no result)

    summary = run_study(spec, echo=lambda s: None)  # resume = run again
    assert summary.n_complete == 3 and summary.n_failed == 0
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "optuna.log")))
    trials = optuna.load_study(study_name="_test_sleep", storage=storage).get_trials()
    assert len(trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert finished_before  # the kill came after at least one trial ended
    for n in finished_before:  # finished trials were not rerun
        assert read_json(trial_folder(out, n) / "timing.json") == timing_before[n]
        assert len(read_json(trial_folder(out, n) / "trial.json")["jobs"]) == 1
    rec = read_json(trial_folder(out, victim["trial"]) / "trial.json")
    assert rec["deaths"] == 1 and len(rec["jobs"]) == 2 and rec["run_id"] == victim["run_id"]
    assert read_json(trial_folder(out, victim["trial"]) / "timing.json")["pid"] != victim["pid"]

    client = mlflow_client(spec.tracking_uri)
    exp = client.get_experiment_by_name("_test_sleep")
    runs = client.search_runs([exp.experiment_id], f"tags.`{TAG_ROLE}` = 'trial'")
    assert len(runs) == 3 and {r.data.tags[TAG_STATUS] for r in runs} == {"finished"}


def _wait_for_kill_point(out: Path, driver: subprocess.Popen, timeout: float = 90) -> dict:
    """Wait until one trial has ended, its slot was refilled, and another trial's job is mid-run."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert driver.poll() is None, "the driver ended before it could be killed"
        ev = events(out)
        n_end = sum(e["event"] == "end" for e in ev)
        n_submit = sum(e["event"] == "submit" for e in ev)
        if n_end >= 1 and n_submit >= 3:
            # The running trial with the most time left (at least 1 s, so the kill cannot come after it ends).
            best = None
            for n in range(3):
                folder = trial_folder(out, n)
                if (folder / "pid").exists() and not (folder / "result.json").exists():
                    rec = read_json(folder / "trial.json")
                    left = (folder / "pid").stat().st_mtime + rec["params"]["train.steps"] / 1000 - time.time()
                    if left > 1.0 and (best is None or left > best[0]):
                        best = (left, {"trial": n, "pid": int((folder / "pid").read_text()), "run_id": rec["run_id"]})
            if best is not None:
                return best[1]
        time.sleep(0.1)
    raise AssertionError(f"no kill point within {timeout} s: {events(out)}")
