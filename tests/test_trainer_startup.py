"""The trainer's start-up checks (mgbench.trainer.startup) against what the trainer really does, and checkpoint
writes that fail for real (a full tmpfs, a file-size limit): no partial file, a clear error, a resumable run.

Oracles are the real things: datasets loaded, a real diffusers VAE encoding images, models built on the CPU,
torchvision's ImageFolder reading the folder.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import mgbench_env

from mgbench.config import ConfigError, TrainConfig, train_config_from_dict
from mgbench.evaluation.hook import startup_problems
from mgbench.trainer.checkpoint import CheckpointWriteError, list_checkpoints, load_checkpoint, save_checkpoint
from mgbench.trainer.data import load_dataset
from mgbench.trainer.models import build_model
from mgbench.trainer.startup import (BUILTIN_DATA, check_startup, class_folders, clear_caches, model_problem,
                                     require_startup, vae_latent_shape)



def _cfg(tmp: Path, **sections) -> TrainConfig:
    data = {"name": "grid2d", "out_dir": str(tmp / "run"), "model": {"arch": "MLP-S"},
            "optim": {"batch_size": 64, "lr": 1e-3}, "train": {"steps": 4, "ckpt_every": 2, "log_every": 2,
                                                                "device": "cpu"}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return train_config_from_dict(data, "test")


def _images(root: Path, classes: dict[str, int]) -> Path:
    """An ImageFolder tree: class name -> number of 8x8 PNG images."""
    from PIL import Image

    for name, n in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / name / f"{i}.png")
    return root


def _tiny_vae(folder: Path) -> Path:
    """A real diffusers AutoencoderKL with 3 down blocks (2 halvings), saved as a local folder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                        block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3)
    vae.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- data shapes


def test_builtin_shapes_are_those_of_the_loaded_datasets():
    from mgbench.config import DataConfig

    for name, (shape, classes) in BUILTIN_DATA.items():
        ds = load_dataset(DataConfig(name=name), "train")
        assert (ds.shape, ds.num_classes) == (shape, classes), name


def test_vae_latent_shape_is_what_a_real_vae_encodes(tmp_path):
    vae_dir = _tiny_vae(tmp_path / "vae")
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    for size in (32, 30, 27, 16):
        with torch.no_grad():
            real = tuple(vae.encode(torch.zeros(1, 3, size, size)).latent_dist.mean.shape[1:])
        assert vae_latent_shape(str(vae_dir), size) == real, size


def test_a_vae_folder_without_weights_or_config_is_named(tmp_path):
    (tmp_path / "vae").mkdir()
    assert vae_latent_shape(str(tmp_path / "vae"), 32).startswith("data.vae: cannot read")
    (tmp_path / "vae" / "config.json").write_text('{"latent_channels": 4, "block_out_channels": [8, 16]}')
    clear_caches()  # the folder changed: read it again
    problem = vae_latent_shape(str(tmp_path / "vae"), 32)
    assert problem.startswith("data.vae: ") and "no weights file" in problem


def test_class_folders_agree_with_torchvision_imagefolder(tmp_path):
    from torchvision.datasets import ImageFolder

    good = _images(tmp_path / "good", {"cat": 2, "dog": 1, "eel": 1})
    assert class_folders(str(good)) == len(ImageFolder(str(good)).classes) == 3
    bad = _images(tmp_path / "bad", {"cat": 1, "dog": 0})
    with pytest.raises(FileNotFoundError):
        ImageFolder(str(bad))
    assert class_folders(str(bad)).startswith("data.path: class folder 'dog' ")
    (tmp_path / "none").mkdir()
    with pytest.raises(FileNotFoundError):
        ImageFolder(str(tmp_path / "none"))
    assert class_folders(str(tmp_path / "none")).startswith("data.path: Couldn't find any class folder")


# ----------------------------------------------------------------------------- model, ranks, evaluation


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (4, 10, 10), (4, 6, 6)])
def test_meta_build_refuses_exactly_what_a_real_build_refuses(shape):
    for arch in ("DiT-XS/2", "DiT-XS/4", "DiT-T/2", "DiT-T/4"):
        try:
            build_model(arch, input_shape=shape, num_classes=10)
            real = None
        except ValueError as e:
            real = str(e)
        problem = model_problem(arch, shape, 10, True, False, False)
        assert (problem is None) == (real is None), (arch, shape)
        if real:
            assert problem.startswith(f"model.arch: {real}")


def test_an_imagefolder_config_whose_latents_the_patch_does_not_divide(tmp_path):
    images, vae = _images(tmp_path / "img", {"a": 1, "b": 1}), _tiny_vae(tmp_path / "vae")
    data = {"name": "imagefolder", "path": str(images), "vae": str(vae), "image_size": 20}  # latents 5x5
    cfg = _cfg(tmp_path, data=data, model={"arch": "DiT-XS/2"}, eval={"metrics": []})
    assert check_startup(cfg) == [
        "model.arch: DiT-XS/2: input 5x5 is not divisible by the patch size 2 (the VAE latents of data.image_size 20) "
        "(no registry model fits this shape)"]
    cfg.data.image_size = 24  # latents 6x6: patch 2 divides, patch 4 does not
    assert check_startup(cfg) == []
    cfg.model.arch = "DiT-XS/4"
    (problem,) = check_startup(cfg)
    assert problem.startswith("model.arch: DiT-XS/4: input 6x6 ") and problem.endswith(
        "(allowed: DiT-XS/2, DiT-T/2, DiT-S/2, DiT-B/2, DiT-L/2, DiT-XL/2)")


def test_batch_must_split_over_the_ranks(tmp_path):
    cfg = _cfg(tmp_path, optim={"batch_size": 8})
    assert check_startup(cfg, world_size=4) == []
    assert check_startup(cfg, world_size=3) == [
        "optim.batch_size: 8 is not divisible by 3 ranks (allowed: a multiple of 3)"]
    with pytest.raises(ConfigError, match=r"^optim.batch_size: 8 is not divisible by 3 ranks"):
        require_startup(cfg, 3)


def test_evaluation_weights_and_reference_files(tmp_path):
    cfg = _cfg(tmp_path, data={"name": "digits"}, model={"arch": "DiT-XS/2"},
               eval={"extractor": "inception", "reference": str(tmp_path / "ref.npz")})
    problems = startup_problems(cfg)   # the evaluation hook's own checks, one layer above the trainer's
    assert [p.split(":")[0] for p in problems] == ["eval.inception_weights", "eval.reference"]
    assert check_startup(cfg) == []
    (tmp_path / "w.pth").write_bytes(b"x")
    (tmp_path / "ref.npz").write_bytes(b"x")
    cfg.eval.inception_weights = str(tmp_path / "w.pth")
    assert startup_problems(cfg) == []


def test_a_config_error_is_reported_by_its_field(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.optim.lr = 0.0
    (problem,) = check_startup(cfg)
    assert problem.startswith("optim.lr: ")


# ----------------------------------------------------------------------------- checkpoint writes that fail


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 256 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)]).returncode:
            subprocess.run(["umount", "-l", str(mnt)], check=True)  # detach it at least; the test fails below
            pytest.fail("the tmpfs stayed busy: a file on it is still open")


def test_a_full_disk_leaves_no_partial_checkpoint(tiny_tmpfs):
    small = {"x": torch.arange(100.0)}
    save_checkpoint(tiny_tmpfs, 1, small)
    with pytest.raises(CheckpointWriteError) as err:
        save_checkpoint(tiny_tmpfs, 2, {"x": torch.zeros(200_000)})   # 800 KB on a 256 KiB disk
    msg = str(err.value)
    assert "\n" not in msg and "ckpt_00000002.pt" in msg and "No space left on device" in msg
    assert "resumes from ckpt_00000001.pt" in msg
    assert sorted(os.listdir(tiny_tmpfs / "checkpoints")) == ["ckpt_00000001.pt"]
    fs = os.statvfs(tiny_tmpfs)   # no deleted temp file held open either: its space is free again
    kept = (tiny_tmpfs / "checkpoints" / "ckpt_00000001.pt").stat().st_size
    assert fs.f_bfree * fs.f_frsize >= fs.f_blocks * fs.f_frsize - kept - 2 * 4096
    assert torch.equal(load_checkpoint(list_checkpoints(tiny_tmpfs)[-1])["x"], small["x"])


_LIMITED = textwrap.dedent("""
    import resource, signal, sys
    from mgbench.trainer.checkpoint import CheckpointWriteError
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)            # a write past the limit fails with EFBIG, not a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
    from mgbench.config import load_train_config
    from mgbench.trainer.loop import train
    try:
        train(load_train_config(sys.argv[1]))
    except CheckpointWriteError as e:
        print(f"{type(e).__name__}: {e}")
        sys.exit(3)
""")


def test_a_file_size_limit_mid_run_leaves_a_resumable_run(tmp_path):
    import yaml

    from mgbench.trainer.loop import train

    cfg = _cfg(tmp_path, train={"steps": 2})
    first = train(cfg)                                       # ckpt_00000002.pt, written without a limit
    size = list_checkpoints(cfg.out_dir)[-1].stat().st_size
    assert first.step == 2 and size > 64 * 1024              # the limit below stops the next checkpoint

    cfg.train.steps = 4
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    env = mgbench_env()
    proc = subprocess.run([sys.executable, "-c", _LIMITED, str(tmp_path / "cfg.yaml")], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 3, proc.stderr[-2000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("CheckpointWriteError: cannot write checkpoint ") and "File too large" in line
    assert sorted(os.listdir(Path(cfg.out_dir) / "checkpoints")) == ["ckpt_00000002.pt"]   # no temp file left

    again = train(cfg)                                       # the same command, without the limit: resumes
    assert again.status == "finished" and again.step == 4
    assert [s for s, _ in again.losses] == [3, 4]            # steps 1-2 came from the checkpoint
    assert load_checkpoint(list_checkpoints(cfg.out_dir)[-1])["step"] == 4
