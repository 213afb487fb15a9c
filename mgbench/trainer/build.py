"""A run's data and network from its trainer config: the one mapping from config to objects, shared by the training
loop and by evaluating a saved checkpoint (`mgbench eval`), so both read the same dataset split and build the same
architecture for the same config.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mgbench.config import TrainConfig
from mgbench.trainer.data import Dataset, load_dataset
from mgbench.trainer.models import build_model


def run_dataset(cfg: TrainConfig, run_dir: str | Path, device: torch.device | str) -> Dataset:
    """The training split of the run's data; imagefolder latents are cached beside the run folder (`../latents`)."""
    return load_dataset(cfg.data, "train", seed=cfg.train.seed, cache_root=Path(run_dir).parent / "latents",
                        device=device)


def run_model(cfg: TrainConfig, data: Dataset) -> nn.Module:
    """The run's network for `data`'s sample shape and classes (freshly initialised from torch's current RNG)."""
    return build_model(cfg.model.arch, input_shape=data.shape, num_classes=data.num_classes,
                       empty_class=cfg.objective.empty_class, learn_sigma=cfg.model.learn_sigma,
                       w_input=cfg.model.w_input)


def build_run(cfg: TrainConfig, run_dir: str | Path, device: torch.device | str) -> tuple[Dataset, nn.Module]:
    """The run's data and network (on `device`)."""
    data = run_dataset(cfg, run_dir, device)
    return data, run_model(cfg, data).to(device)
