"""Shared fixtures."""
from __future__ import annotations

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
