"""Tests against the cluster-mode services (start them with slurm/services.sh start)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from conftest import require_slurm_conf, wait_for_job

from mgbench.tracking import mlflow_client

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(300)]

HINT = 'run slurm/services.sh start && eval "$(slurm/services.sh env)"'


def _service_url(var: str) -> str:
    """A service URL that slurm/services.sh exports in `var`, or skip."""
    url = os.environ.get(var)
    if not url:
        pytest.skip(f"{var} unset: {HINT}")
    return url


@pytest.fixture(scope="module")
def pg_url() -> str:
    """The PostgreSQL URL from slurm/services.sh, or skip."""
    return _service_url("MGBENCH_PG_URL")


@pytest.fixture(scope="module")
def mlflow_url() -> str:
    """The MLflow tracking server URL from slurm/services.sh, or skip."""
    return _service_url("MGBENCH_MLFLOW_URL")


WORKER = textwrap.dedent("""
    import sys, optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url, name, tag = sys.argv[1:4]
    study = optuna.create_study(study_name=name, storage=url, load_if_exists=True, direction="minimize")
    study.optimize(lambda t: (t.suggest_float("x", -2.0, 2.0) - 0.5) ** 2, n_trials=4)
    print(tag, "ok")
""")


def test_optuna_study_shared_by_two_processes(pg_url: str) -> None:
    optuna = pytest.importorskip("optuna")
    optuna.storages.RDBStorage(pg_url)  # create the schema once (fresh databases race on alembic)
    name = f"test-two-procs-{uuid.uuid4().hex[:8]}"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, pg_url, name, f"w{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name=name, storage=pg_url)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 8  # 4 trials from each process, in one study
    assert sorted(t.number for t in done) == list(range(8))  # numbers handed out without clashes
    best = min(done, key=lambda t: t.value)
    assert study.best_value == pytest.approx(best.value) and study.best_value == pytest.approx((best.params["x"] - 0.5) ** 2)
    optuna.delete_study(study_name=name, storage=pg_url)


def test_mlflow_server_accepts_a_run(mlflow_url: str, tmp_path: Path) -> None:
    client = mlflow_client(mlflow_url)
    exp_id = client.create_experiment(f"test-services-{uuid.uuid4().hex[:8]}")
    run = client.create_run(exp_id, run_name="http-run", tags={"mgbench.test": "1"})
    rid = run.info.run_id
    client.log_param(rid, "w", "1.5")
    for step, loss in enumerate([1.0, 0.5, 0.25]):
        client.log_metric(rid, "train/loss", loss, step=step)
    (tmp_path / "note.txt").write_text("hello from a test\n")
    client.log_artifact(rid, str(tmp_path / "note.txt"))  # proxied upload over HTTP
    client.set_terminated(rid)
    got = client.get_run(rid)
    assert got.data.params == {"w": "1.5"} and got.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(rid, "train/loss")] == [1.0, 0.5, 0.25]
    assert [f.path for f in client.list_artifacts(rid)] == ["note.txt"]
    local = client.download_artifacts(rid, "note.txt", str(tmp_path / "dl"))
    assert Path(local).read_text() == "hello from a test\n"


def log_from_job(url: str, exp_name: str) -> str:
    """Runs inside a SLURM job: log a run to the MLflow server over HTTP."""
    import mlflow

    mlflow.set_tracking_uri(url)
    mlflow.set_experiment(exp_name)
    with mlflow.start_run(run_name="from-slurm") as run:
        mlflow.log_metric("job_id", float(os.environ["SLURM_JOB_ID"]))
    return run.info.run_id


@pytest.mark.slurm
def test_slurm_job_reaches_mlflow(mlflow_url: str, tmp_path: Path) -> None:
    submitit = pytest.importorskip("submitit")
    require_slurm_conf()
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ex = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    ex.update_parameters(slurm_partition="gpu", gpus_per_node=1, mem_gb=0.5, timeout_min=5)
    name = f"test-slurm-{uuid.uuid4().hex[:8]}"
    job = ex.submit(log_from_job, mlflow_url, name)
    wait_for_job(job, 120)
    run = mlflow_client(mlflow_url).get_run(job.result())
    assert run.data.metrics["job_id"] == float(job.job_id)
