"""Shared fixtures."""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    """Skip unless the local SLURM test cluster answers (slurm/cluster.sh start; eval "$(slurm/cluster.sh env)")."""
    conf = os.environ.get("SLURM_CONF")
    if not conf or not Path(conf).is_file() or shutil.which("sinfo") is None:
        pytest.skip("no SLURM test cluster: slurm/cluster.sh start && eval \"$(slurm/cluster.sh env)\"")
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
    "objective": {"metric": "loss", "direction": "minimize"},
    "entry": "mgbench.study.testing:sleep_train",
    "eval_hook": "mgbench.study.testing:w_eval_hook",
    "executor": "debug",
    "poll_s": 0.1,
}


@pytest.fixture
def good_study(tmp_path: Path) -> dict:
    """A fresh copy of GOOD_STUDY to change, with base.yaml (studies/base/grid2d.yaml) in tmp_path for its `extends`."""
    (tmp_path / "base.yaml").write_text((Path(__file__).resolve().parents[1] / "studies/base/grid2d.yaml").read_text())
    return copy.deepcopy(GOOD_STUDY)
