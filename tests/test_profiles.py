"""Site profiles: shipped ones validate, bad ones fail with `file:key: ...`, local runs on the test cluster."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import require_slurm_conf, wait_for_job

from mgbench.config import ConfigError
from mgbench.study.profiles import PROFILES_DIR, load_profile, profile_path, validate_profile


def write(tmp_path: Path, text: str) -> Path:
    """Write a profile file and return its path."""
    p = tmp_path / "site.yaml"
    p.write_text(text)
    return p


def test_shipped_profiles_load() -> None:
    local = load_profile("local")
    assert local["slurm_partition"] == "gpu" and local["gpus_per_node"] == 1
    assert local["timeout_min"] >= 2  # submitit's USR2 makes timeout_min=1 jobs time out at once
    example = load_profile(PROFILES_DIR / "example-gpu-cluster.yaml")
    assert example["slurm_setup"][0].startswith("module load")
    assert example["slurm_additional_parameters"]["constraint"] == "a100|h100"
    assert {"slurm_account", "slurm_qos", "slurm_cpus_per_gpu", "slurm_mem_per_gpu"} <= set(example)


def test_profile_path_resolves_names_and_paths(tmp_path: Path) -> None:
    assert profile_path("local") == PROFILES_DIR / "local.yaml"
    assert profile_path(tmp_path / "x.yaml") == tmp_path / "x.yaml"


def test_profile_drives_the_sbatch_script(tmp_path: Path) -> None:
    import submitit

    ex = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    ex.update_parameters(**load_profile("example-gpu-cluster"))
    params = ex._executor.parameters  # what submitit writes as #SBATCH lines
    assert params["partition"] == "gpu" and params["account"] == "my-project"
    assert params["time"] == 1440 and params["signal_delay_s"] == 120


@pytest.mark.parametrize("text, match", [
    ("slurm_partition: gpu\nslurm_foo: 1\n", r"site\.yaml:slurm_foo: Unknown argument 'foo'"),
    ("foo: 1\n", r"site\.yaml:foo: Parameter 'foo' need to be prefixed"),
    ("gpus_per_node: two\n", r"site\.yaml:gpus_per_node: .*expected type <class 'int'>"),
    ("timeout_min: 1.5\n", r"site\.yaml:timeout_min: "),
    ("slurm_setup: module load cuda\n", r"site\.yaml:slurm_setup: "),
    ("gpus_per_node: 1\nslurm_cpus_per_gpu: 4\n", r"site\.yaml: \"cpus_per_gpu\" requires to set \"gpus_per_task\""),
    ("- slurm_partition\n", r"site\.yaml: expected a mapping"),
    ("a: [1\n", r"site\.yaml: line 2: invalid YAML"),
    ("slurm_partition: gpu\nslurm_partition: cpu\n", r"site\.yaml:2:slurm_partition: duplicate key \(first at line 1"),
])
def test_bad_profiles_fail_in_one_line(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        load_profile(write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_unknown_profile_name_lists_known() -> None:
    with pytest.raises(ConfigError, match=r"no such profile .*example-gpu-cluster, local"):
        load_profile("no-such-site")


def test_validate_profile_names_the_source() -> None:
    validate_profile({"slurm_partition": "cpu", "mem_gb": 2})
    with pytest.raises(ConfigError, match=r"^spec\.yaml:executor:slurm_qoss: "):
        validate_profile({"slurm_qoss": "x"}, where="spec.yaml:executor")


def _ping() -> str:
    """Runs in the job."""
    return os.environ.get("SLURM_JOB_PARTITION", "") + ":" + os.environ.get("CUDA_VISIBLE_DEVICES", "")


@pytest.mark.slurm
@pytest.mark.timeout(180)
def test_local_profile_runs_on_the_test_cluster(tmp_path: Path) -> None:
    require_slurm_conf()
    import sys

    import cloudpickle
    import submitit

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ex = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    ex.update_parameters(**load_profile("local"))
    job = ex.submit(_ping)
    wait_for_job(job, 90)
    partition, cvd = job.result().split(":")
    assert partition == "gpu" and cvd in {"0", "1"}  # one of the 2 fake GPUs (the other may be finishing a job)
