"""A real SLURM study against the PostgreSQL storage of slurm/services.sh leaks the password nowhere, and its
trials cap torch threads at the job's CPUs.

One small study (2 trials of a sleeping stand-in trainer, as job array tasks on the test cluster) runs as a
separate `mgbench study run` process while every command line on the machine is sampled; then every file it
left (out_dir: trial.json, submitit pickles and logs), its stdout/stderr and every MLflow param, tag and
artifact are searched for the password. Needs `slurm/ci.sh up` (cluster + services).
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import procview as pv
from conftest import STUDIES

pytestmark = [pytest.mark.timeout(400)]
STUDY_TIMEOUT_S = 240  # bound on the whole study run (2 trials of 0.3 s each)

# The trial entry: records the torch threads it runs with and whether the real storage URI is recoverable from
# its environment (the job pickle holds the masked one), then sleeps like sleep_train.
PROBE = '''
import json, os
from pathlib import Path

import torch

from mgbench.redact import mask_uri, unstash_uri
from mgbench_standins import sleep_train


def train(cfg, tracker=None, eval_hook=None):
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen = {"threads": torch.get_num_threads(), "cpus_per_task": os.environ.get("SLURM_CPUS_PER_TASK"),
            "omp": os.environ.get("OMP_NUM_THREADS"), "job": os.environ.get("SLURM_JOB_ID")}
    url = os.environ.get("MGBENCH_PG_URL", "")  # the job can turn the masked URI of its pickle back into this one
    seen["uri_restored"] = bool(url) and mask_uri(url) != url and unstash_uri(mask_uri(url)) == url
    (out / "threads.json").write_text(json.dumps(seen))
    return sleep_train(cfg, tracker, eval_hook)
'''


def spec_text(name: str, probe: str, out_dir: Path) -> str:
    """A 2-trial SLURM study whose URIs come from the environment (`${...}`, expanded when the spec loads)."""
    return f"""name: {name}
extends: {STUDIES / "base" / "grid2d.yaml"}
base:
  train: {{device: cpu}}
space:
  train.steps: {{grid: [300, 301]}}
sampler: {{type: grid, seed: 5}}
optimize: {{metric: loss, direction: minimize}}
entry: {probe}:train
eval_hook: mgbench.evaluation.quick:w_eval_hook
executor: {{type: slurm, profile: local}}
parallelism: 2
poll_s: 0.5
storage: ${{MGBENCH_PG_URL}}
tracking_uri: ${{MGBENCH_MLFLOW_URL}}
out_dir: {out_dir}
"""


class CommandLines:
    """Samples the command line of every process on the machine (what `ps` shows) until stopped."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.seen.update(pv.cmdline(p) for p in pv.all_pids())
            self._stop.wait(0.2)

    def __enter__(self) -> "CommandLines":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def study(tmp_path_factory, slurm_cluster) -> dict:
    """Run the study once; returns its password, folders, outputs and the command lines seen meanwhile."""
    url, mlflow_url = os.environ.get("MGBENCH_PG_URL"), os.environ.get("MGBENCH_MLFLOW_URL")
    if not url or not mlflow_url:
        pytest.skip('MGBENCH_PG_URL / MGBENCH_MLFLOW_URL unset: slurm/ci.sh up && . "$MGBENCH_SLURM_DIR/env.sh"')
    password = urlsplit(url).password
    assert password and len(password) >= 16, "the services' URL should carry a random password"
    tmp = tmp_path_factory.mktemp("secrets")
    probe = f"mgbench_probe_{uuid.uuid4().hex[:8]}"
    (tmp / f"{probe}.py").write_text(PROBE)
    name = f"secrets_{uuid.uuid4().hex[:8]}"
    spec = tmp / "study.yaml"
    spec.write_text(spec_text(name, probe, tmp / "out"))
    # The jobs inherit this environment (sbatch exports it): the probe is importable, torch threads unset.
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp), env.get("PYTHONPATH")]))
    logs = tmp_path_factory.mktemp("driver")
    with CommandLines() as lines, open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
        proc = subprocess.run([sys.executable, "-m", "mgbench", "study", "run", str(spec)], cwd=tmp, env=env,
                              stdout=out, stderr=err, timeout=STUDY_TIMEOUT_S)
    return {"password": password, "spec": spec, "name": name, "out": tmp / "out", "logs": logs,
            "rc": proc.returncode, "cmdlines": lines.seen, "storage": url, "tracking": mlflow_url}


def holders(root: Path, secret: str) -> list[str]:
    """Files under root whose bytes contain the secret."""
    needle = secret.encode()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes())


@pytest.mark.slurm
@pytest.mark.postgres
def test_the_study_ran_its_trials_as_slurm_jobs(study) -> None:
    import optuna

    assert study["rc"] == 0, (study["logs"] / "stderr").read_text()[-3000:]
    trials = optuna.load_study(study_name=study["name"], storage=study["storage"]).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    records = sorted(study["out"].rglob("trial.json"))
    assert len(records) == 2 and all(json.loads(r.read_text())["jobs"] for r in records)
    assert list(study["out"].rglob("*.pkl")), "submitit left no pickles to search"
    seen = [json.loads(p.read_text()) for p in sorted(study["out"].rglob("threads.json"))]
    assert len(seen) == 2 and all(s["uri_restored"] for s in seen)


@pytest.mark.slurm
@pytest.mark.postgres
def test_no_password_in_files_logs_or_command_lines(study) -> None:
    secret = study["password"]
    assert secret not in study["spec"].read_text()  # the spec names ${MGBENCH_PG_URL}, never the password
    leaks = holders(study["out"], secret) + [f"driver {f}" for f in holders(study["logs"], secret)]
    leaks += [f"command line: {c}" for c in study["cmdlines"] if secret in c]
    assert not leaks, f"the PostgreSQL password leaked into: {leaks}"
    assert any("mgbench study run" in c or "-m mgbench study run" in c for c in study["cmdlines"])


@pytest.mark.slurm
@pytest.mark.postgres
def test_no_password_in_mlflow_params_tags_or_artifacts(study, tmp_path: Path) -> None:
    from mgbench.tracking import mlflow_client

    secret = study["password"]
    client = mlflow_client(study["tracking"])
    exp = client.get_experiment_by_name(study["name"])
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) >= 3  # the study's parent run and one run per trial
    for run in runs:
        data = json.dumps({"params": run.data.params, "tags": run.data.tags})
        assert secret not in data, f"run {run.info.run_id}: password in params or tags"
        folder = tmp_path / run.info.run_id
        folder.mkdir()
        if client.list_artifacts(run.info.run_id):
            client.download_artifacts(run.info.run_id, "", str(folder))
        assert not holders(folder, secret), f"run {run.info.run_id}: password in artifacts {holders(folder, secret)}"
    assert any(list(p.rglob("*")) for p in tmp_path.iterdir()), "no run had artifacts to search"


@pytest.mark.slurm
@pytest.mark.postgres
def test_slurm_trials_cap_torch_threads_at_the_job_cpus(study) -> None:
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: torch's default is 1 thread too, a cap at 1 would not show")
    seen = [json.loads(p.read_text()) for p in sorted(study["out"].rglob("threads.json"))]
    assert len(seen) == 2 and all(s["job"] for s in seen)  # both ran as SLURM jobs
    assert all(s["omp"] is None for s in seen)  # nothing else set the thread count
    assert all(s["cpus_per_task"] == "1" and s["threads"] == 1 for s in seen), seen  # profile local: cpus_per_task 1


def test_a_pickled_spec_holds_masked_uris_and_the_environment_the_real_ones(monkeypatch) -> None:
    """What submitit pickles for a job: no password; unpickled where the environment came along, the real URI."""
    import cloudpickle

    from mgbench.redact import STASH_PREFIX
    from mgbench.study.spec import StudySpec

    secret = "pw-" + uuid.uuid4().hex
    real = f"postgresql+psycopg2://alice:{secret}@db.example:5432/optuna"
    spec = StudySpec(name="s", path="s.yaml", base={}, space={}, storage=real, tracking_uri="http://127.0.0.1:5000")
    before = {k for k in os.environ if k.startswith(STASH_PREFIX)}
    blob = cloudpickle.dumps(spec)  # submitit pickles with cloudpickle
    assert secret.encode() not in blob and b"alice:***@db.example" in blob
    back = pickle.loads(blob)
    assert back.storage == real and back.tracking_uri == "http://127.0.0.1:5000" and back.name == "s"
    (stash,) = {k for k in os.environ if k.startswith(STASH_PREFIX)} - before
    monkeypatch.delenv(stash)  # a job whose environment was not exported sees the masked URI, not a wrong one
    assert pickle.loads(blob).storage == "postgresql+psycopg2://alice:***@db.example:5432/optuna"
