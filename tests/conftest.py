"""Shared fixtures and helpers (test modules import them: `from conftest import ROOT, STUDIES, TEST_STUDIES`).

At import, this folder goes on sys.path and at the front of PYTHONPATH, so that job processes (local executor
subprocesses and SLURM jobs inherit the environment) import the trainer stand-ins of test specs
(`entry: mgbench_standins:sleep_train`, tests/mgbench_standins.py).
"""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent                    # the repository
STUDIES = ROOT / "studies"             # the product's study specs and base trainer configs
TEST_STUDIES = TESTS / "studies"       # the test specs (_test_*.yaml)

PYTHONPATH = f"{ROOT}{os.pathsep}{TESTS}"  # for processes a test starts: this checkout's mgbench and tests/ modules

if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
if str(TESTS) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)

# How the SLURM tests say the test cluster is absent (skip reasons).
SLURM_CONF_UNSET = 'SLURM_CONF unset: run slurm/cluster.sh start && eval "$(slurm/cluster.sh env)"'
NO_SLURM_CLUSTER = "no SLURM test cluster: slurm/cluster.sh start && eval \"$(slurm/cluster.sh env)\""


def slurm_conf() -> Path | None:
    """The test cluster's slurm.conf ($SLURM_CONF), or None when it is unset or not a file."""
    conf = os.environ.get("SLURM_CONF")
    return Path(conf) if conf and Path(conf).is_file() else None


def require_slurm_conf() -> None:
    """Skip the calling test unless SLURM_CONF is set (a test that submits to the test cluster)."""
    if not os.environ.get("SLURM_CONF"):
        pytest.skip(SLURM_CONF_UNSET)


def mgbench_env() -> dict[str, str]:
    """The environment of an mgbench process a test starts (a driver, a trainer): this one's, torch on one thread,
    PYTHONPATH = this checkout and tests/."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": PYTHONPATH}


@pytest.fixture
def one_thread() -> None:
    """torch on one thread in this process (the test machines have 2 cores); modules opt in with usefixtures."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    """Skip unless the local SLURM test cluster answers (slurm/cluster.sh start; eval "$(slurm/cluster.sh env)")."""
    if slurm_conf() is None or shutil.which("sinfo") is None:
        pytest.skip(NO_SLURM_CLUSTER)
    if subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode != 0:
        pytest.skip("sinfo fails: the SLURM test cluster is down")


# A cheap good study spec that tests change one key at a time: a sleeping trainer (its metric: loss = w) on the
# in-process executor, extending base.yaml beside it; "{tmp}" stands for the test's folder.
GOOD_STUDY = {
    "name": "good",
    "extends": "base.yaml",
    "out_dir": "{tmp}/out",
    "base": {"train": {"steps": 10, "device": "cpu"}},
    "space": {"objective.w": {"grid": [1.0, 1.5]}},
    "sampler": "grid",
    "optimize": {"metric": "loss", "direction": "minimize"},
    "entry": "mgbench_standins:sleep_train",
    "eval_hook": "mgbench.evaluation.quick:w_eval_hook",
    "executor": "debug",
    "poll_s": 0.1,
}


@pytest.fixture
def good_study(tmp_path: Path) -> dict:
    """A fresh copy of GOOD_STUDY to change, with base.yaml (studies/base/grid2d.yaml) in tmp_path for its `extends`."""
    (tmp_path / "base.yaml").write_text((STUDIES / "base/grid2d.yaml").read_text())
    return copy.deepcopy(GOOD_STUDY)


# ----------------------------------------------------------------------------- helpers shared by test modules


def fill_tmp(value, tmp: Path):
    """`value` (nested dicts / lists / strings) with every "{tmp}" in its strings replaced by the folder tmp."""
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp))
    if isinstance(value, dict):
        return {k: fill_tmp(v, tmp) for k, v in value.items()}
    if isinstance(value, list):
        return [fill_tmp(v, tmp) for v in value]
    return value


def write_spec_file(data: dict, tmp: Path, name: str = "study.yaml") -> Path:
    """A study spec, "{tmp}" filled in, written as YAML (key order kept) to tmp/name; its path."""
    import yaml

    path = tmp / name
    path.write_text(yaml.safe_dump(fill_tmp(data, tmp), sort_keys=False))
    return path


def file_tree(root: Path) -> set[str]:
    """Every file and folder under root, relative to it (to see that a refused command added nothing)."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def wait_for_job(job, timeout: float, poll: float = 0.5) -> None:
    """Wait until a submitit job is done; past `timeout` seconds cancel it and fail the test."""
    import time

    deadline = time.monotonic() + timeout
    while not job.done():
        if time.monotonic() > deadline:
            job.cancel(check=False)
            pytest.fail(f"job {job.job_id} not done after {timeout:g}s (state {job.state})")
        time.sleep(poll)


def sqlite_mlflow_store(tmp_path_factory, name: str = "mlflow") -> tuple[Path, str, object]:
    """A fresh MLflow store (sqlite, in a new folder `name`*) for synthetic runs: (its folder, uri, RunStore)."""
    from mgbench.tracking import RunStore

    root = tmp_path_factory.mktemp(name)
    uri = f"sqlite:///{root}/mlflow.db"
    return root, uri, RunStore(uri)
