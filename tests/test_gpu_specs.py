"""The cluster-scale ImageNet studies: each validates and renders its sbatch script (nothing submitted)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, STUDIES

SPECS = sorted((STUDIES / "imagenet").glob("*.yaml"))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict[str, str]:
    """A fake site: the folders and files the specs name through environment variables."""
    root = tmp_path_factory.mktemp("site")
    for d in ("imagenet/train/n01440764", "sd-vae-ft-ema", "studies"):
        (root / d).mkdir(parents=True)
    for f in ("pt_inception-2015-12-05-6726825d.pth", "VIRTUAL_imagenet256_labeled.npz", "VIRTUAL_imagenet512.npz"):
        (root / f).write_bytes(b"")
    return {"MGBENCH_IMAGENET": str(root / "imagenet"), "MGBENCH_SD_VAE": str(root / "sd-vae-ft-ema"),
            "MGBENCH_INCEPTION": str(root / "pt_inception-2015-12-05-6726825d.pth"),
            "MGBENCH_ADM_REF": str(root / "VIRTUAL_imagenet256_labeled.npz"),
            "MGBENCH_ADM_REF_512": str(root / "VIRTUAL_imagenet512.npz"),
            "MGBENCH_STUDIES": str(root / "studies"), "MGBENCH_MLFLOW_URL": "http://mlflow.example:5000"}


def dry_run(spec: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mgbench.cli", "study", "run", str(spec), "--dry-run"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


@pytest.mark.skipif(shutil.which("srun") is None, reason="submitit renders SLURM scripts only where srun exists "
                    "(install slurm-client, e.g. bash slurm/cluster.sh install)")
@pytest.mark.parametrize("spec", SPECS, ids=[s.stem for s in SPECS])
def test_gpu_spec_dry_run_prints_its_sbatch_script(spec, site, monkeypatch):
    import os

    env = {**os.environ, **site}
    res = dry_run(spec, env)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "dry run: nothing submitted" in out
    assert "#SBATCH --ntasks-per-node=8" in out and "#SBATCH --gpus-per-task=1" in out
    assert "#SBATCH --time=2880" in out and "#SBATCH --partition=gpu" in out
    n = int(re.search(r"(\d+) (grid points|trials)", out).group(1))
    if n > 1:
        assert re.search(rf"#SBATCH --array=0-{n - 1}%\d+", out), out
    assert "first job: cache SD-VAE latents of " + site["MGBENCH_IMAGENET"] + "/train" in out
    assert not list(Path(site["MGBENCH_STUDIES"]).iterdir())  # nothing written, nothing submitted


def test_a_missing_site_variable_is_a_one_line_error(site):
    import os

    env = {k: v for k, v in {**os.environ, **site}.items() if k != "MGBENCH_IMAGENET"}
    res = dry_run(STUDIES / "imagenet" / "dit_table3_w.yaml", env)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "imagenet256-dit.yaml:data.path: environment variable MGBENCH_IMAGENET is not set" \
        in lines[0], res.stderr


@pytest.mark.parametrize("spec", SPECS, ids=[s.stem for s in SPECS])
def test_mg_starts_after_the_authors_warm_up(spec, site, monkeypatch):
    """MG trials train plainly for 100K steps (the authors' --start-step, EMA 0.9999); auto-w decides only after it."""
    from mgbench.study.spec import grid_points, load_spec, validate_trial

    for key, value in site.items():
        monkeypatch.setenv(key, value)
    s = load_spec(spec)
    cfgs = [validate_trial(s, p, i) for i, p in enumerate(grid_points(s))]
    assert {c.objective.start_step for c in cfgs} == {100000}
    assert {(c.optim.ema_decay, c.optim.ema_warmup) for c in cfgs} == {(0.9999, False)}
