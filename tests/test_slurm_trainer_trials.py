"""Real MG trials (the trainer, grid2d) through the real SLURM test cluster: job array, preemption, kill."""
from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import optuna
import pytest
from conftest import TEST_STUDIES

from mgbench import tracking as T
from mgbench.study.runner import Driver, run_study
from mgbench.study.spec import load_spec
from mgbench.study.trial import read_json
from mgbench.tracking import mlflow_client
from mgbench.trainer.checkpoint import list_checkpoints, load_checkpoint

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600), pytest.mark.usefixtures("slurm_cluster")]


def spec_for(tmp_path: Path, space: dict, steps: int, parallelism: int = 2, extra: dict | None = None):
    return load_spec(TEST_STUDIES / "_test_grid.yaml", {**(extra or {}),
        "out_dir": str(tmp_path / "study"), "executor": {"type": "slurm", "profile": "local"},
        "space": space, "parallelism": parallelism, "poll_s": 0.5,
        "base": {"optim": {"batch_size": 128, "lr": 2.0e-3},
                 "train": {"steps": steps, "log_every": 10, "ckpt_every": 100, "device": "cpu"},
                 "sample": {"steps": 10, "n_grid": 64}, "eval": {"n_samples": 64}}})


def sacct(job: str) -> list[list[str]]:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job, "-o", "JobID,State,AllocTRES"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return [line.split("|") for line in out.strip().splitlines()]


def loss_steps(spec, number: int):
    client = mlflow_client(spec.tracking_uri)
    run_id = read_json(Path(spec.out_dir) / "trials" / f"{number:04d}" / "trial.json")["run_id"]
    return [m.step for m in client.get_metric_history(run_id, T.M_LOSS)], client, run_id


def cluster_mode(overrides: dict) -> dict:
    """Optuna on the PostgreSQL server and MLflow through the tracking server, when .ci/run started them."""
    pg, url = os.environ.get("MGBENCH_PG_URL"), os.environ.get("MGBENCH_MLFLOW_URL")
    if pg and url:
        overrides.update(name=f"slurm_{uuid.uuid4().hex[:8]}", storage=pg, tracking_uri=url)
    return overrides


def test_grid_of_four_real_trials_goes_out_as_one_gpu_job_array(tmp_path):
    spec = spec_for(tmp_path, {"objective.w": {"grid": [1.0, 1.5]}, "objective.label_drop": {"grid": [0.1, 0.2]}},
                    steps=60, extra=cluster_mode({}))
    summary = run_study(spec, echo=lambda s: None)
    assert summary.n_complete == 4 and summary.n_failed == 0
    trials = optuna.load_study(study_name=spec.name, storage=spec.storage).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
    client = mlflow_client(spec.tracking_uri)
    exp = client.get_experiment_by_name(spec.name)
    runs = client.search_runs([exp.experiment_id], f"tags.`{T.TAG_ROLE}` = 'trial'")
    assert len(runs) == 4
    job_ids = sorted(r.data.tags[T.TAG_SLURM_JOB] for r in runs)
    array = {j.split("_")[0] for j in job_ids}
    assert len(array) == 1 and sorted(j.split("_")[1] for j in job_ids) == ["0", "1", "2", "3"]
    assert all(r.data.tags[T.TAG_PARENT] for r in runs)
    assert all(r.data.metrics[T.metric_eval("off_class")] >= 0 for r in runs)
    assert all(len(client.get_metric_history(r.info.run_id, T.M_LOSS)) == 6 for r in runs)
    array_id = job_ids[0].split("_")[0]
    deadline = time.time() + 60  # sacct lags slurmctld by a few seconds
    while True:
        rows = [r for r in sacct(array_id) if "_" in r[0]]
        if (len(rows) == 4 and all(r[1] == "COMPLETED" for r in rows)) or time.time() > deadline:
            break
        time.sleep(2)
    assert sorted(r[0] for r in rows) == job_ids
    assert all(r[1] == "COMPLETED" and "gres/gpu=1" in r[2] for r in rows), rows


def _wait_for_checkpoint(folder: Path, timeout: float = 180) -> int:
    deadline = time.time() + timeout
    while not list_checkpoints(folder):
        assert time.time() < deadline, f"no checkpoint in {folder}"
        time.sleep(0.2)
    return load_checkpoint(list_checkpoints(folder)[-1])["step"]


def _trial_folder(spec) -> Path:
    return Path(spec.out_dir) / "trials" / "0000"


@pytest.mark.slow
def test_preempted_trial_resumes_from_its_checkpoint_without_gaps_or_repeats(tmp_path):
    spec = spec_for(tmp_path, {"objective.w": {"grid": [1.5]}}, steps=1500, parallelism=1)
    Driver(spec, echo=lambda s: None).run(wait=False)  # submit and detach
    folder = _trial_folder(spec)
    first = _wait_for_checkpoint(folder)
    job = read_json(folder / "trial.json")["jobs"][0]["job_id"]
    # What a preemption or the time limit sends: submitit checkpoints and requeues the same job.
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=20)
    summary = run_study(spec, echo=lambda s: None)
    assert summary.n_complete == 1
    rec = read_json(folder / "trial.json")
    assert len(rec["jobs"]) == 1 and rec["deaths"] == 0  # requeued by SLURM, not resubmitted
    steps, client, run_id = loss_steps(spec, 0)
    assert steps == list(range(10, 1501, 10))  # no gap, no repeated step
    resumed = client.get_metric_history(run_id, T.M_RESUMED)
    assert len(resumed) == 1 and first <= resumed[0].value < 1500
    assert load_checkpoint(list_checkpoints(folder)[-1])["step"] == 1500


@pytest.mark.slow
def test_killed_trial_job_is_rerun_from_its_latest_checkpoint(tmp_path):
    spec = spec_for(tmp_path, {"objective.w": {"grid": [1.5]}}, steps=1500, parallelism=1)
    Driver(spec, echo=lambda s: None).run(wait=False)
    folder = _trial_folder(spec)
    _wait_for_checkpoint(folder)
    job = read_json(folder / "trial.json")["jobs"][0]["job_id"]
    # Node-failure shape: the job's processes are killed outright (no signal handler runs, no result file), not
    # through scancel (an scancel, even --signal=KILL, ends the job CANCELLED, which is never resubmitted).
    pattern = f"submitit.core._submit {Path(spec.out_dir).resolve()}"
    subprocess.run(["pkill", "-KILL", "-f", pattern], check=True, timeout=20)
    summary = run_study(spec, echo=lambda s: None)
    assert summary.n_complete == 1, job
    rec = read_json(folder / "trial.json")
    assert rec["deaths"] == 1 and len(rec["jobs"]) == 2  # the driver resubmitted the same trial
    steps, client, run_id = loss_steps(spec, 0)
    assert steps == list(range(10, 1501, 10))
    resumed = client.get_metric_history(run_id, T.M_RESUMED)
    assert len(resumed) == 1 and resumed[0].value >= 100  # from its checkpoint, not from the start
