"""Latent caching as a study's first job (imagefolder studies), on the debug executor with a tiny random VAE."""
from pathlib import Path

import yaml
from conftest import STUDIES
from test_data import _image_folder, _tiny_vae

from mgbench.study.latents import run_latents_job
from mgbench.study.spec import load_spec, validate_trial
from mgbench.trainer.data import load_dataset


def test_prepare_caches_latents_once_where_every_trial_reads_them(tmp_path):
    _tiny_vae(tmp_path / "vae")
    _image_folder(tmp_path / "images")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({
        "name": "latents", "out_dir": str(tmp_path / "study"), "executor": "debug", "sampler": "grid",
        "base": {"data": {"name": "imagefolder", "path": str(tmp_path / "images"), "vae": str(tmp_path / "vae"),
                          "image_size": 16},
                 "model": {"arch": "DiT-XS/2"}, "objective": {"formulation": "diffusion", "w": 1.5}},
        "space": {"objective.w": {"grid": [1.0, 1.5]}}}))
    spec = load_spec(spec_file)
    cache = tmp_path / "study" / "latents"
    assert spec.base["data"]["cache_dir"] == str(cache)
    said = []
    first = run_latents_job(spec, echo=said.append)
    assert first["images"] == 6 and first["shape"] == [4, 8, 8]
    shard = Path(first["shard"])
    assert shard.parent == cache and shard.exists() and "caches" in said[0]
    mtime = shard.stat().st_mtime_ns
    again = run_latents_job(spec, echo=said.append)
    assert again["shard"] == first["shard"] and shard.stat().st_mtime_ns == mtime  # cached: not encoded twice
    cfg = validate_trial(spec, {"objective.w": 1.5}, 1)
    assert cfg.data.cache_dir == str(cache)
    assert load_dataset(cfg.data).meta["cache"] == str(shard)
    assert run_latents_job(load_spec(STUDIES / "quickstart.yaml")) is None
