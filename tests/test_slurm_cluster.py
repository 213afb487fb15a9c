"""Tests against the real single-node SLURM test cluster (start it with slurm/cluster.sh start)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import slurm_conf, wait_for_job

submitit = pytest.importorskip("submitit")
import cloudpickle  # noqa: E402  (a submitit dependency)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]

# Jobs unpickle this module's functions; pickle them by value so the job need not import tests/.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

JOB_TIMEOUT_S = 90  # bound on every result() wait


def _cluster_reason() -> str | None:
    """Say why the cluster is unusable, or None when sinfo answers."""
    if slurm_conf() is None:
        return "SLURM_CONF unset or missing: run slurm/cluster.sh start && eval \"$(slurm/cluster.sh env)\""
    if shutil.which("sinfo") is None:
        return "sinfo not found: run slurm/cluster.sh install"
    res = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=20)
    return None if res.returncode == 0 else f"sinfo failed: {res.stderr.strip()}"


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    """Skip the module unless the test cluster answers."""
    reason = _cluster_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def executor(tmp_path: Path) -> "submitit.AutoExecutor":
    """A SLURM executor on partition gpu with a fresh folder (job ids restart on a fresh cluster)."""
    ex = submitit.AutoExecutor(folder=tmp_path / "jobs" / "%j", cluster="slurm")
    ex.update_parameters(slurm_partition="gpu", gpus_per_node=1, cpus_per_task=1, mem_gb=0.5,
                         timeout_min=5, slurm_signal_delay_s=30, name="mgbench-test")
    return ex


def wait_result(job: "submitit.Job", timeout: float = JOB_TIMEOUT_S):
    """Return job.result(), cancelling the job and failing the test after `timeout` seconds."""
    wait_for_job(job, timeout)
    return job.result()


def sacct_rows(job_id: str, count: int = 1, want: str = "COMPLETED", timeout: float = 30) -> list[dict[str, str]]:
    """Poll sacct (it lags slurmctld) until job_id has `count` allocation rows, all in state `want`."""
    deadline, rows = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        out = subprocess.run(["sacct", "-X", "-P", "-n", "-j", job_id, "-o", "JobID,State,AllocTRES"],
                             capture_output=True, text=True, timeout=20).stdout
        rows = [dict(zip(("id", "state", "tres"), line.split("|"))) for line in out.splitlines() if line]
        if len(rows) == count and all(r["state"] == want for r in rows):
            return rows
        time.sleep(0.5)
    pytest.fail(f"sacct never showed {count} rows for {job_id}, all {want}: {rows}")


def gpu_env(x: int) -> dict:
    """Runs in the job: report what SLURM gave it and compute something."""
    keys = ("CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE", "SLURM_JOB_PARTITION")
    return {"answer": x * 7, "python": sys.executable, **{k: os.environ.get(k) for k in keys}}


def square(x: int) -> int:
    """Runs in an array task."""
    return x * x


def fail(msg: str) -> None:
    """Runs in the job and raises."""
    raise ValueError(msg)


def test_gpu_job_runs_and_is_accounted(executor) -> None:
    job = executor.submit(gpu_env, 6)
    out = wait_result(job)
    assert out["answer"] == 42
    assert out["CUDA_VISIBLE_DEVICES"] in {"0", "1"}  # one fake GPU from gres.conf File= (of 2)
    assert out["SLURM_GPUS_ON_NODE"] == "1"
    assert out["SLURM_JOB_PARTITION"] == "gpu"
    assert Path(out["python"]).resolve() == Path(sys.executable).resolve()  # the project's Python
    [row] = sacct_rows(job.job_id)
    assert "gres/gpu=1" in row["tres"]


def test_job_array_via_batch(executor) -> None:
    with executor.batch():
        jobs = [executor.submit(square, i) for i in range(4)]
    assert [wait_result(j) for j in jobs] == [0, 1, 4, 9]
    array_ids = {j.job_id.split("_")[0] for j in jobs}
    assert len(array_ids) == 1 and sorted(j.job_id.split("_")[1] for j in jobs) == ["0", "1", "2", "3"]
    rows = sacct_rows(array_ids.pop(), count=4)
    assert len(rows) == 4 and all("gres/gpu=1" in r["tres"] for r in rows)


def test_exception_comes_back(executor) -> None:
    job = executor.submit(fail, "boom-123")
    with pytest.raises(submitit.core.utils.FailedJobError, match="boom-123"):
        wait_result(job)
    sacct_rows(job.job_id, want="FAILED")


class Attempts(submitit.helpers.Checkpointable):
    """Counts its runs in a file; the first run waits (to be requeued), later runs return."""

    def __init__(self) -> None:
        self.state = "fresh"  # set before a checkpoint, read after the requeue

    def __call__(self, marker: str) -> dict:
        with open(marker, "a") as f:
            f.write(f"{os.environ.get('SLURM_RESTART_COUNT', '0')}\n")
        runs = Path(marker).read_text().split()
        if len(runs) == 1:
            self.state = "checkpointed-in-run-1"
            time.sleep(120)  # requeued (or signalled) while here
        return {"runs": runs, "state": self.state}


def wait_for_file_lines(path: Path, n: int, timeout: float = 60) -> None:
    """Wait until `path` has at least n lines (the job has started)."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and len(path.read_text().split()) >= n):
        if time.monotonic() > deadline:
            pytest.fail(f"{path} never reached {n} lines")
        time.sleep(0.3)


def interrupted_attempts(executor, tmp_path: Path, command: list[str]) -> dict:
    """Submit Attempts, run `command` + [its job id] once its first run has started, and return its result."""
    marker = tmp_path / "runs.txt"
    job = executor.submit(Attempts(), str(marker))
    wait_for_file_lines(marker, 1)
    subprocess.run([*command, job.job_id], check=True, timeout=20)
    return wait_result(job, timeout=120)  # a requeued job waits cred_expire (10 s) before it restarts


@pytest.mark.slow
def test_scontrol_requeue_comes_back_and_finishes(executor, tmp_path: Path) -> None:
    out = interrupted_attempts(executor, tmp_path, ["scontrol", "requeue"])
    assert out["runs"] == ["0", "1"]  # run again from the submitted state, SLURM_RESTART_COUNT=1
    assert out["state"] == "fresh"  # requeue without signal: no checkpoint was taken


@pytest.mark.slow
def test_preemption_signal_checkpoints_and_resumes(executor, tmp_path: Path) -> None:
    # What a preemption or time limit sends: submitit checkpoints the callable and requeues the job.
    out = interrupted_attempts(executor, tmp_path, ["scancel", "--signal=USR2"])
    assert out["runs"] == ["0", "1"]
    assert out["state"] == "checkpointed-in-run-1"  # state pickled at the checkpoint survived


def test_more_gpus_than_the_node_has_is_refused(executor) -> None:
    executor.update_parameters(gpus_per_node=3)  # the node has 2 fake GPUs
    with pytest.raises(Exception, match="Requested node configuration is not available"):
        executor.submit(square, 1)
