"""Every job state has an outcome: crash windows of the driver, cancel, lost jobs, sbatch refusals, resubmissions
within the parallelism limit. Local-executor tests run real processes (a driver forked and killed at a named
point, real job processes); SLURM tests run on the local test cluster (slurm/cluster.sh start)."""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import STUDIES, TEST_STUDIES
from mgbench_standins import EXECUTIONS_FILE
from mgbench.tracking import mlflow_client
from optuna.trial import TrialState

from mgbench.study.cli import main as study_main
from mgbench.study.crashpoints import KILL_AT_ENV, KILL_EXIT, POINTS
from mgbench.study.jobstate import pid_alive
from mgbench.study.optuna_io import open_study
from mgbench.study.outcomes import UA_CANCELLED, UA_RETRY_OF, UA_SUBMIT_ERROR, cancel_trials
from mgbench.study.runner import EVENTS_FILE, Driver, run_study
from mgbench.study.spec import load_spec
from mgbench.study.status import status_rows
from mgbench.study.trial import read_json, write_json
from mgbench.tracking import TAG_ROLE, TAG_STATUS

FORK = multiprocessing.get_context("fork")


def spec_file(tmp_path: Path, steps: list[int], executor: object = "local", parallelism: int = 2, **extra) -> Path:
    """_test_sleep.yaml as a file: a grid over train.steps (sleep milliseconds), journal storage in out_dir."""
    raw = yaml.safe_load((TEST_STUDIES / "_test_sleep.yaml").read_text())
    out = tmp_path / "study"
    raw.update({"extends": str(STUDIES / "base" / "grid2d.yaml"), "out_dir": str(out),
                "space": {"train.steps": {"grid": steps}},
                "sampler": {"type": "grid", "seed": 1},  # seed 1: a 2-point grid asks its first point first
                "storage": f"journal:///{out / 'optuna.log'}", "executor": executor, "parallelism": parallelism,
                "poll_s": 0.2, **extra})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def folder(spec, n: int) -> Path:
    return Path(spec.out_dir) / "trials" / f"{n:04d}"


def executions(spec, n: int) -> int:
    path = folder(spec, n) / EXECUTIONS_FILE
    return len(path.read_text().splitlines()) if path.exists() else 0


def events(spec) -> list[dict]:
    return [json.loads(line) for line in (Path(spec.out_dir) / EVENTS_FILE).read_text().splitlines()]


def trial_runs(spec) -> list:
    client = mlflow_client(spec.tracking_uri)
    exp = client.get_experiment_by_name(spec.name)
    return client.search_runs([exp.experiment_id], f"tags.`{TAG_ROLE}` = 'trial'")


def trials(spec) -> list:
    return open_study(spec, create=False).get_trials()


def _drive_and_die(path: str, point: str) -> None:
    """A driver process that exits at the kill point (the child of a fork: no imports to repeat)."""
    os.environ[KILL_AT_ENV] = point
    run_study(load_spec(path), echo=lambda s: None)
    os._exit(0)  # the point was never reached


def wait_for(what, timeout: float = 60.0, every: float = 0.1):
    deadline = time.time() + timeout
    while not (found := what()):
        assert time.time() < deadline, f"timed out after {timeout} s"
        time.sleep(every)
    return found


# ---------------------------------------------------------------------------------------------- crash windows

@pytest.mark.timeout(180)
@pytest.mark.parametrize("point", POINTS)
def test_driver_killed_at_each_window_rerun_trains_once_with_one_run(tmp_path, point):
    """Killed at each side-effect window, the rerun adopts what the dead driver made: one execution of the trial,
    one MLflow run, one job, one Optuna trial, nothing failed."""
    path = spec_file(tmp_path, [1500], parallelism=1)
    spec = load_spec(path)
    child = FORK.Process(target=_drive_and_die, args=(str(path), point))
    child.start()
    child.join(120)
    assert child.exitcode == KILL_EXIT, f"the driver did not stop at {point!r}"
    summary = run_study(spec, echo=lambda s: None)  # the same command again
    assert (summary.n_complete, summary.n_failed, summary.n_running) == (1, 0, 0)
    (t,) = trials(spec)
    assert t.state == TrialState.COMPLETE and t.value == 1.0
    assert executions(spec, 0) == 1  # the job ran once: a submitted job is adopted, not submitted again
    rec = read_json(folder(spec, 0) / "trial.json")
    assert len(rec["jobs"]) == 1 and rec["deaths"] == 0 and "submitting" not in rec
    (run,) = trial_runs(spec)  # one MLflow run: a created run is adopted, not created again
    assert run.info.run_id == rec["run_id"] and run.data.tags[TAG_STATUS] == "finished"
    assert run.data.params == {"train.steps": "1500"}
    kinds = [e["event"] for e in events(spec)]
    assert kinds.count("submit") + kinds.count("adopt") == 1
    assert ("adopt" in kinds) == (point == "submitted")


# ---------------------------------------------------------------------------------------------- cancel (local)

def _drive(path: str) -> None:
    s = run_study(load_spec(path), echo=lambda s: None)
    os._exit(10 * s.n_complete + s.n_cancelled)


@pytest.mark.timeout(240)
def test_study_cancel_kills_the_job_ends_cancelled_and_only_retry_runs_it_again(tmp_path):
    path = spec_file(tmp_path, [12000, 300], parallelism=2)
    spec = load_spec(path)
    driver = FORK.Process(target=_drive, args=(str(path),))
    driver.start()
    pid = int(wait_for(lambda: (folder(spec, 0) / "pid").exists() and (folder(spec, 0) / "pid").read_text()))
    assert read_json(folder(spec, 0) / "trial.json")["params"] == {"train.steps": 12000}
    assert cancel_trials(spec, 0, echo=lambda s: None) == 0
    assert not pid_alive(pid)  # the job's processes are gone, not left training
    driver.join(120)
    assert driver.exitcode == 11  # the running driver: 1 complete, 1 cancelled; it resubmitted nothing

    t0, t1 = trials(spec)
    assert t0.state == TrialState.FAIL and t0.user_attrs[UA_CANCELLED] == "cancelled by mgbench study cancel"
    assert t1.state == TrialState.COMPLETE
    rec = read_json(folder(spec, 0) / "trial.json")
    assert len(rec["jobs"]) == 1 and rec["deaths"] == 0 and rec["cancel"]["by"] == "mgbench study cancel"
    assert read_json(folder(spec, 0) / "result.json")["status"] == "cancelled"
    assert executions(spec, 0) == 1 and not (folder(spec, 0) / "timing.json").exists()  # it never finished
    run = mlflow_client(spec.tracking_uri).get_run(rec["run_id"])
    assert run.info.status == "KILLED" and run.data.tags[TAG_STATUS] == "cancelled"
    assert [e["trial"] for e in events(spec) if e["event"] == "resubmit"] == []
    assert [(r["trial"], r["state"]) for r in status_rows(spec)] == [(0, "CANCELLED"), (1, "COMPLETE")]

    again = run_study(spec, echo=lambda s: None)  # a plain rerun leaves it cancelled
    assert (again.n_complete, again.n_cancelled) == (1, 1) and executions(spec, 0) == 1 and len(trials(spec)) == 2

    retried = run_study(spec, echo=lambda s: None, retry_cancelled=True)
    assert (retried.n_complete, retried.n_cancelled, retried.n_failed) == (2, 1, 0)
    t2 = trials(spec)[2]  # a new trial with its params takes its place; the budget (n_trials 2) is not exceeded
    assert t2.state == TrialState.COMPLETE and t2.params == t0.params and t2.user_attrs[UA_RETRY_OF] == 0
    assert executions(spec, 2) == 1 and len(trials(spec)) == 3
    assert run_study(spec, echo=lambda s: None, retry_cancelled=True).n_complete == 2  # retried once only
    assert len(trials(spec)) == 3


# ---------------------------------------------------------------------------------------------- SLURM

def slurm_spec(tmp_path: Path, steps: list[int], parallelism: int = 2, options: dict | None = None, **extra):
    executor = {"type": "slurm", "profile": "local", **(options or {})}
    return load_spec(spec_file(tmp_path, steps, executor=executor, parallelism=parallelism, **extra))


@pytest.mark.slurm
@pytest.mark.timeout(180)
@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_job_unknown_to_squeue_and_sacct_is_lost_and_resubmitted(tmp_path):
    spec = slurm_spec(tmp_path, [300], parallelism=1)
    Driver(spec, echo=lambda s: None).run(wait=False)
    wait_for(lambda: (folder(spec, 0) / "result.json").exists(), timeout=90)
    # What a restarted cluster or purged accounting leaves: the trial's job id is known to neither squeue nor sacct.
    rec = read_json(folder(spec, 0) / "trial.json")
    rec["jobs"][-1]["job_id"] = "987654321"
    write_json(folder(spec, 0) / "trial.json", rec)
    (folder(spec, 0) / "result.json").unlink()
    assert status_rows(spec)[0]["job"] == "987654321 (MISSING)"  # not "(alive)"

    lines: list[str] = []
    driver = Driver(spec, echo=lines.append)
    driver.lost_after_s = 2.0
    summary = driver.run()
    assert (summary.n_complete, summary.n_failed) == (1, 0)
    rec = read_json(folder(spec, 0) / "trial.json")
    assert rec["deaths"] == 1 and len(rec["jobs"]) == 2 and executions(spec, 0) == 2
    (lost,) = [e for e in events(spec) if e["event"] == "resubmit"]
    assert lost["lost"].startswith("job 987654321: MISSING for ") and lost["deaths"] == 1
    assert [line for line in lines if "lost" in line] == [
        f"[_test_sleep] trial 0: job lost ({lost['lost']}): resubmitting from its checkpoint (retry 1 of 3)"]


@pytest.mark.slurm
@pytest.mark.timeout(120)
@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_every_submit_refused_fails_the_trial_with_sbatchs_message_exit_2(tmp_path, capsys):
    path = spec_file(tmp_path, [300], executor={"type": "slurm", "profile": "local", "gpus_per_node": 9},
                     parallelism=1)  # the node has 2 (fake) GPUs: sbatch refuses at submit
    assert study_main(["study", "run", str(path)]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if " INFO mlflow." not in line]  # MLflow's own note as it creates its sqlite tables
    assert len(err) == 1 and "Requested node configuration is not available" in err[0], err
    spec = load_spec(path)
    (t,) = trials(spec)
    assert t.state == TrialState.FAIL
    assert "Batch job submission failed: Requested node configuration is not available" in t.user_attrs[UA_SUBMIT_ERROR]
    (run,) = trial_runs(spec)
    assert run.info.status == "FAILED" and run.data.tags[TAG_STATUS] == "failed"
    assert run.data.tags["mgbench.error"] == "sbatch refused the job: " + t.user_attrs[UA_SUBMIT_ERROR]
    rec = read_json(folder(spec, 0) / "trial.json")
    assert rec["jobs"] == [] and "submitting" not in rec and rec["submit_error"] == t.user_attrs[UA_SUBMIT_ERROR]


def scontrol_partition(state: str) -> None:
    subprocess.run(["scontrol", "update", "PartitionName=gpu", f"State={state}"], check=True, timeout=30)


@pytest.mark.slurm
@pytest.mark.timeout(180)
@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_refusal_mid_study_fails_that_trial_and_the_study_goes_on(tmp_path):
    """The partition is drained right after trial 0 is submitted (sbatch refuses trial 1) and opened again once the
    refusal is told: trial 1 FAILs with sbatch's message, trials 0 and 2 run."""
    spec = slurm_spec(tmp_path, [300, 301, 302], parallelism=1, sampler={"type": "random", "seed": 0},
                      space={"train.steps": {"type": "int", "low": 300, "high": 302}}, n_trials=3)
    warned: list[str] = []

    def echo(line: str) -> None:
        if "trial 0: submit" in line:
            scontrol_partition("DRAIN")

    def warn(line: str) -> None:
        warned.append(line)
        scontrol_partition("UP")

    try:
        summary = Driver(spec, echo=echo, warn=warn).run()
    finally:
        scontrol_partition("UP")
    assert (summary.n_complete, summary.n_failed) == (2, 1)
    t0, t1, t2 = trials(spec)
    assert (t0.state, t1.state, t2.state) == (TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE)
    assert "Required partition not available (inactive or drain)" in t1.user_attrs[UA_SUBMIT_ERROR]
    assert warned == [f"[_test_sleep] trial 1: sbatch refused the job, trial failed: {t1.user_attrs[UA_SUBMIT_ERROR]}"]


def after_trial_starts(spec, n: int, action) -> threading.Thread:
    """Run action(pid) in a thread once trial n's job has started training (its pid file is written)."""
    def wait_and_act() -> None:
        pid_file = folder(spec, n) / "pid"
        action(int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), timeout=150, every=0.05)))
    thread = threading.Thread(target=wait_and_act, daemon=True)
    thread.start()
    return thread


@pytest.mark.slurm
@pytest.mark.timeout(240)
@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_outside_scancel_ends_the_trial_cancelled_not_resubmitted(tmp_path):
    """A user scancels trial 0's running job (a task of the study's array): the trial ends CANCELLED, once."""
    spec = slurm_spec(tmp_path, [20000, 300], parallelism=2)

    def scancel(pid: int) -> None:
        job = read_json(folder(spec, 0) / "trial.json")["jobs"][-1]["job_id"]
        subprocess.run(["scancel", job], check=True, timeout=30)

    canceller = after_trial_starts(spec, 0, scancel)
    summary = Driver(spec, echo=lambda s: None).run()
    canceller.join()
    assert (summary.n_complete, summary.n_cancelled, summary.n_failed) == (1, 1, 0)
    t0, t1 = trials(spec)
    said = t0.user_attrs[UA_CANCELLED]
    assert t0.state == TrialState.FAIL and said.startswith("cancelled outside mgbench: job ") and "CANCELLED" in said
    rec = read_json(folder(spec, 0) / "trial.json")
    assert len(rec["jobs"]) == 1 and rec["deaths"] == 0 and executions(spec, 0) == 1
    run = mlflow_client(spec.tracking_uri).get_run(rec["run_id"])
    assert run.info.status == "KILLED" and run.data.tags[TAG_STATUS] == "cancelled"
    assert status_rows(spec)[0]["state"] == "CANCELLED"


@pytest.mark.slurm
@pytest.mark.timeout(240)
@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_resubmission_waits_for_the_arrays_parallelism(tmp_path):
    """A grid of 2 goes out as one array throttled to 1 task at a time; trial 0's process is killed, so it is
    resubmitted: only once trial 1 has trained (never beside it, outside the array)."""
    spec = slurm_spec(tmp_path, [6000, 6001], parallelism=1)
    killed_at: list[float] = []

    def kill(pid: int) -> None:
        os.kill(pid, 9)
        killed_at.append(time.time())

    killer = after_trial_starts(spec, 0, kill)
    summary = Driver(spec, echo=lambda s: None).run()
    killer.join()
    assert (summary.n_complete, summary.n_failed) == (2, 0) and len(killed_at) == 1
    rec = read_json(folder(spec, 0) / "trial.json")
    assert len(rec["jobs"]) == 2 and rec["deaths"] == 1 and executions(spec, 0) == 2
    starts = [json.loads(line)["start"] for line in (folder(spec, 0) / EXECUTIONS_FILE).read_text().splitlines()]
    trial1 = read_json(folder(spec, 1) / "timing.json")
    spans = [(starts[0], killed_at[0]), (trial1["start"], trial1["end"]), (starts[1], time.time())]
    overlaps = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1:] if a[0] < b[1] and b[0] < a[1]]
    assert overlaps == [], f"two trials trained at once under parallelism 1: {spans}"
