"""Studies on the real single-node SLURM test cluster (slurm/cluster.sh start; eval "$(slurm/cluster.sh env)")."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import optuna
import pytest
from conftest import TEST_STUDIES

from mgbench.study.runner import Driver, run_study
from mgbench.study.spec import load_spec
from mgbench.study.trial import read_json
from mgbench.tracking import TAG_ROLE, TAG_SLURM_JOB, TAG_TRIAL, mlflow_client

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300), pytest.mark.usefixtures("slurm_cluster")]


def slurm_spec(tmp_path: Path, steps: list[int], parallelism: int = 2):
    return load_spec(TEST_STUDIES / "_test_sleep.yaml", {
        "out_dir": str(tmp_path / "study"), "executor": {"type": "slurm", "profile": "local"},
        "space": {"train.steps": {"grid": steps}}, "sampler": "grid", "parallelism": parallelism, "poll_s": 0.5})


def test_grid_goes_out_as_one_job_array(tmp_path):
    spec = slurm_spec(tmp_path, [500, 501, 502])
    summary = run_study(spec, echo=lambda s: None)
    assert summary.n_complete == 3
    out = Path(spec.out_dir)
    jobs = {n: read_json(out / "trials" / f"{n:04d}" / "trial.json")["jobs"] for n in range(3)}
    assert all(len(j) == 1 for j in jobs.values())
    array_ids = {j[0]["job_id"].split("_")[0] for j in jobs.values()}
    assert len(array_ids) == 1 and sorted(j[0]["job_id"].split("_")[1] for j in jobs.values()) == ["0", "1", "2"]
    client = mlflow_client(spec.tracking_uri)
    exp = client.get_experiment_by_name("_test_sleep")
    for run in client.search_runs([exp.experiment_id], f"tags.`{TAG_ROLE}` = 'trial'"):
        n = int(run.data.tags[TAG_TRIAL])
        assert run.data.tags[TAG_SLURM_JOB] == jobs[n][0]["job_id"]


@pytest.mark.slow
def test_preempted_trial_requeues_itself_on_the_same_trial(tmp_path):
    spec = slurm_spec(tmp_path, [15000], parallelism=1)
    Driver(spec, echo=lambda s: None).run(wait=False)  # submit, detach
    folder = Path(spec.out_dir) / "trials" / "0000"
    deadline = time.time() + 90
    while not (folder / "pid").exists():
        assert time.time() < deadline, "the trial job never started"
        time.sleep(0.3)
    first_pid = (folder / "pid").read_text()
    job_id = read_json(folder / "trial.json")["jobs"][0]["job_id"]
    # What a preemption or the time limit sends: TrialJob.checkpoint() requeues the same trial.
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=20)
    summary = run_study(spec, echo=lambda s: None)  # resume: re-attach and wait
    assert summary.n_complete == 1
    rec = read_json(folder / "trial.json")
    assert len(rec["jobs"]) == 1 and rec["deaths"] == 0  # SLURM requeued it; the driver resubmitted nothing
    assert (folder / "pid").read_text() != first_pid  # it ran again
    (t,) = optuna.load_study(study_name="_test_sleep", storage=spec.storage).get_trials()
    assert t.state == optuna.trial.TrialState.COMPLETE
