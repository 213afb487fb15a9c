"""Feature extractors registered with torch-fidelity: a digits/MNIST classifier and Inception with sFID features.

- `mgbench-classifier`: a small CNN that mgbench trains deterministically on the training split of
  digits or mnist (cached by a hash of dataset, arch, seed, epochs); features `penultimate` (FID,
  KID, precision/recall) and `logits` (IS).
- `mgbench-inception`: torch-fidelity's Inception-v3 port plus `spatial`, the ADM suite's sFID
  features: the first 7 channels of `mixed_6/conv` (= Mixed_6d.branch1x1 after its ReLU, 17x17),
  flattened in NHWC order (2023 values) so that statistics match the ADM reference batches.
  Weights come only from a local file (`eval.inception_weights`); nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from mgbench.config import ConfigError, DataConfig

CLASSIFIER = "mgbench-classifier"
INCEPTION = "mgbench-inception"
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_SOURCES = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILE,
                     "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                     "weights-inception-2015-12-05-6726825d.pth")
RANDOM_INIT = "random-init"  # a weights path that keeps Inception randomly initialised (shape tests only)
SFID_CHANNELS = 7            # ADM: spatial features = mixed_6/conv[..., :7]

# Training recipes of the classifier per dataset (part of the cache key).
CLASSIFIER_RECIPES: dict[str, dict[str, Any]] = {
    "digits": {"arch": "cnn-32", "seed": 0, "epochs": 25, "lr": 2e-3, "batch": 64},
    "mnist": {"arch": "cnn-64", "seed": 0, "epochs": 10, "lr": 2e-3, "batch": 64},
}


# ----------------------------------------------------------------------------- the classifier


class DigitClassifier(nn.Module):
    """A small CNN for 1-channel digit images (8x8 or 28x28): conv features -> 128-d penultimate -> logits."""

    def __init__(self, channels: int = 1, num_classes: int = 10, width: int = 32, feat_dim: int = 128,
                 size: int = 8) -> None:
        super().__init__()
        first_pool = [nn.MaxPool2d(2)] if size >= 16 else []  # 28x28: pool early (cheaper, and 7x7 at the end)
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), *first_pool,
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Linear(2 * width * 16, feat_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feat_dim, num_classes)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in [-1, 1] -> (penultimate, logits)."""
        h = self.body(x)
        return h, self.head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[1]


def uint8_to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [-1, 1] (the classifier's input)."""
    return x.float() / 127.5 - 1.0


def classifier_path(data: DataConfig, cache_dir: str | Path) -> Path:
    """Where the classifier of a dataset is cached: keyed by a hash of (dataset, arch, seed, epochs, split)."""
    recipe = CLASSIFIER_RECIPES[data.name]
    key = json.dumps({"dataset": data.name, "train_fraction": data.train_fraction, **recipe}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cache_dir).expanduser() / "extractors" / f"classifier-{data.name}-{recipe['arch']}-{digest}.pt"


def ensure_classifier(data: DataConfig, cache_dir: str | Path) -> Path:
    """The cached classifier file of a digits/mnist dataset, trained (deterministically) if missing."""
    if data.name not in CLASSIFIER_RECIPES:
        raise ConfigError(f"eval.extractor: the mgbench classifier exists for digits and mnist, not {data.name!r}")
    path = classifier_path(data, cache_dir)
    if not path.exists():
        blob = train_classifier(data, **CLASSIFIER_RECIPES[data.name])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{id(blob)}")
        torch.save(blob, tmp)
        tmp.replace(path)
    return path


def train_classifier(data: DataConfig, *, arch: str, seed: int, epochs: int, lr: float, batch: int) -> dict[str, Any]:
    """Train the CNN on the 'train' split (uint8-quantised, small random shifts); report 'test' accuracy."""
    from mgbench.trainer.data import load_dataset

    train, test = load_dataset(data, "train"), load_dataset(data, "test")
    width = int(arch.split("-")[1])
    torch.manual_seed(seed)
    model = DigitClassifier(train.shape[0], train.num_classes, width, size=train.shape[-1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    x, y = uint8_to_float(train.to_uint8(train.x)), train.y
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y), generator=gen).split(batch):
            loss = F.cross_entropy(model(_shift(x[idx], gen)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    acc = classifier_accuracy(model, uint8_to_float(test.to_uint8(test.x)), test.y)
    with torch.no_grad():  # one scale for the penultimate features: unit RMS per dimension on the training set
        scale = float(model.features(x)[0].pow(2).mean().rsqrt())
    meta = {"feature_scale": scale, "dataset": data.name, "arch": arch, "seed": seed, "epochs": epochs, "channels": train.shape[0],
            "size": list(train.shape[1:]), "num_classes": train.num_classes, "test_accuracy": acc,
            "n_train": len(train), "n_test": len(test)}
    return {"state_dict": model.state_dict(), "meta": meta}


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift the whole batch by up to `max_shift` pixels (padding with the background value -1)."""
    dx, dy = torch.randint(-max_shift, max_shift + 1, (2,), generator=gen).tolist()
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    h, w = x.shape[-2:]
    return padded[..., p + dy:p + dy + h, p + dx:p + dx + w]


@torch.no_grad()
def classifier_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of correctly classified images."""
    return float((model(x).argmax(1) == y).float().mean())


def load_classifier(path: str | Path) -> tuple[DigitClassifier, dict[str, Any]]:
    """A cached classifier and its metadata (held-out accuracy among them)."""
    blob = torch.load(path, map_location="cpu", weights_only=False)
    meta = blob["meta"]
    model = DigitClassifier(meta["channels"], meta["num_classes"], int(meta["arch"].split("-")[1]),
                            size=meta["size"][-1])
    model.load_state_dict(blob["state_dict"])
    return model.eval().requires_grad_(False), meta


class ClassifierFeatures(FeatureExtractorBase):
    """torch-fidelity extractor over mgbench's classifier; input uint8 (N, 1 or 3, H, W)."""

    images_seen = 0  # images passed through any instance (tests check that cached statistics skip this)

    def __init__(self, name: str, features_list, feature_extractor_weights_path: str | None = None, **kwargs) -> None:
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None or not Path(feature_extractor_weights_path).is_file():
            raise ConfigError(f"eval.extractor: classifier weights {feature_extractor_weights_path!r} not found "
                              "(mgbench.evaluation.extractors.ensure_classifier trains and caches them)")
        self.net, self.meta = load_classifier(feature_extractor_weights_path)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"expected uint8 images (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
        ClassifierFeatures.images_seen += len(x)
        if x.shape[1] == 3 and self.meta["channels"] == 1:  # PNGs read back as RGB
            x = x.float().mean(1, keepdim=True).round()
        h, logits = self.net.features(uint8_to_float(x))
        feats = {"penultimate": h * self.meta["feature_scale"], "logits": logits}  # unit-RMS features: KID's kernel stays O(1)
        return tuple(feats[f].float() for f in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "penultimate", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "penultimate", "kid": "penultimate", "prc": "penultimate"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 8, 8, dtype=torch.uint8)


# ----------------------------------------------------------------------------- Inception (+ sFID features)


def check_inception_weights(path: str | None) -> str:
    """The local Inception weights file, or a one-line ConfigError saying what to get and where to put it."""
    if path == RANDOM_INIT:
        return path
    if not path or not Path(path).expanduser().is_file():
        got = "not set" if not path else f"{path!r} does not exist"
        raise ConfigError(f"eval.inception_weights: {got}; download {INCEPTION_FILE} (the FID Inception-v3 "
                          f"converted from TF, {INCEPTION_SOURCES[0]}) once and give its local path; "
                          "mgbench never downloads weights")
    return str(Path(path).expanduser())


class InceptionFeatures(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception-v3 with one more feature, `spatial` (sFID); 1-channel input is repeated to RGB."""

    def __init__(self, name: str, features_list, feature_extractor_weights_path: str | None = None, **kwargs) -> None:
        path = check_inception_weights(feature_extractor_weights_path)
        source: Any = path
        if path == RANDOM_INIT:  # an empty state dict: load_state_dict below keeps the random init
            source = io.BytesIO()
            torch.save({}, source)
            source.seek(0)
        super().__init__(name, features_list, feature_extractor_weights_path=source, **kwargs)
        self._spatial: list[torch.Tensor] = []
        self.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: self._spatial.append(out))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if not state_dict:
            return None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dim() == 4 and x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        wanted = list(self.features_list)
        base = [f for f in wanted if f != "spatial"] or ["768"]  # "768" is the first exit after Mixed_6d
        self._spatial.clear()
        self.features_list = base  # the parent's forward reads the requested list from this attribute
        try:
            feats = dict(zip(base, super().forward(x)))
        finally:
            self.features_list = wanted
        if "spatial" in wanted:
            s = self._spatial[-1][:, :SFID_CHANNELS]               # (N, 7, 17, 17)
            feats["spatial"] = s.permute(0, 2, 3, 1).reshape(len(x), -1).float()  # NHWC order, as ADM
        self._spatial.clear()
        return tuple(feats[f] for f in wanted)

    @staticmethod
    def get_provided_features_list():
        return "64", "192", "768", "2048", "logits_unbiased", "logits", "spatial"


def register() -> None:
    """Register mgbench's extractors with torch-fidelity (idempotent)."""
    for name, cls in ((CLASSIFIER, ClassifierFeatures), (INCEPTION, InceptionFeatures)):
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            register_feature_extractor(name, cls)


register()
