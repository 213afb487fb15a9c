"""Datasets: grid2d geometry, digits/mnist splits, imagefolder -> cached VAE latents with a tiny random VAE."""
from pathlib import Path

import numpy as np
import pytest
import torch

from mgbench.config import ConfigError, DataConfig, train_config_from_dict
from mgbench.trainer.data import Grid2D, load_dataset
from mgbench.trainer.loop import train

torch.set_num_threads(1)


def test_grid2d_points_lie_on_their_class_squares():
    ds = load_dataset(DataConfig(name="grid2d"), seed=3)
    grid = ds.meta["grid"]
    x, y = ds.x[:20000], ds.y[:20000]
    assert ds.num_classes == 2 and ds.shape == (2,)
    assert torch.equal(grid.class_of(x), y)
    assert abs(y.float().mean().item() - 0.5) < 0.02
    # Every square of each class is used, about equally.
    ij = grid.cell_index(x)
    counts = torch.bincount(ij[:, 0] * 4 + ij[:, 1], minlength=16).float()
    assert counts.min() > 0.8 * counts.mean()
    assert Grid2D(4).class_of(torch.tensor([[3.0, 0.0], [-0.1, -0.1], [0.1, -0.1]])).tolist() == [-1, 0, 1]


@pytest.mark.parametrize("name,shape,n", [("digits", (1, 8, 8), 1797), ("mnist", (1, 28, 28), 5000)])
def test_image_datasets_split_disjointly_in_minus_one_one(name, shape, n):
    cfg = DataConfig(name=name)
    train_ds, test_ds = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    assert train_ds.shape == shape and train_ds.num_classes == 10
    assert len(train_ds) + len(test_ds) == n and len(train_ds) == int(0.9 * n)
    assert train_ds.x.min() == -1.0 and train_ds.x.max() == 1.0
    assert set(train_ds.y.unique().tolist()) == set(range(10))
    rows = {tuple(r) for r in train_ds.x.flatten(1)[:300].numpy().round(3).tolist()}
    assert not any(tuple(r) in rows for r in test_ds.x.flatten(1).numpy().round(3).tolist())
    u8 = train_ds.to_uint8(train_ds.x[:4])
    assert u8.dtype == torch.uint8 and u8.shape == (4, *shape)


def _tiny_vae(path: Path) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(path)


def _image_folder(root: Path) -> None:
    from PIL import Image

    rng = np.random.RandomState(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            arr = rng.randint(0, 255, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")


def test_imagefolder_latents_are_cached_and_train(tmp_path):
    _tiny_vae(tmp_path / "vae")
    _image_folder(tmp_path / "images")
    d = {"name": "imagefolder", "path": str(tmp_path / "images"), "vae": str(tmp_path / "vae"), "image_size": 16,
         "cache_dir": str(tmp_path / "latents")}
    ds = load_dataset(DataConfig(**d))
    assert ds.kind == "latents" and ds.shape == (4, 8, 8) and ds.num_classes == 2
    assert ds.y.tolist() == [0, 0, 0, 1, 1, 1]
    shards = list((tmp_path / "latents").glob("latents-*.pt"))
    assert len(shards) == 1
    blob = torch.load(shards[0])
    assert blob["meta"]["vae"].endswith("vae") and blob["meta"]["scale"] == 0.18215
    mtime = shards[0].stat().st_mtime_ns
    again = load_dataset(DataConfig(**d))
    assert torch.equal(again.x, ds.x) and shards[0].stat().st_mtime_ns == mtime  # read back, not re-encoded
    img = ds.to_uint8(ds.x[:2])
    assert img.shape == (2, 3, 16, 16) and img.dtype == torch.uint8
    cfg = train_config_from_dict({
        "out_dir": str(tmp_path / "run"), "data": d, "model": {"arch": "DiT-XS/2"},
        "objective": {"formulation": "diffusion", "w": 1.5},
        "optim": {"batch_size": 4}, "train": {"steps": 3, "log_every": 1}, "sample": {"steps": 2, "n_grid": 4}}, "t")
    assert train(cfg).step == 3
    assert (tmp_path / "run" / "samples" / "step_00000003.png").exists()


def test_missing_vae_folder_is_a_one_line_error(tmp_path):
    _image_folder(tmp_path / "images")
    cfg = DataConfig(name="imagefolder", path=str(tmp_path / "images"), vae=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"data\.vae: '.*nope' is not a folder; download a diffusers AutoencoderKL"):
        load_dataset(cfg)
