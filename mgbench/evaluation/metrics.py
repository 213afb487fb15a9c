"""Image metrics through torch-fidelity: FID, sFID, IS, KID, precision/recall against cached reference statistics.

Generated images go through the feature extractor once (all layers the requested metrics need, by
torch-fidelity's own extractor and data loader); each metric is torch-fidelity's function on those
features (`fid_statistics_to_metric`, `isc_features_to_metric`, `kid_features_to_metric`,
`prc_features_to_metric`). sFID is FID on the `spatial` layer of `mgbench-inception`. References
are either statistics of the dataset's training split, computed once and cached under
`eval.cache_dir` (keyed by dataset, split, extractor, N), or an ADM reference batch `.npz`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from mgbench.config import ConfigError, DataConfig, EvalConfig
from mgbench.evaluation import extractors as X
from mgbench.metric_registry import family_metrics

IMAGE_METRICS = tuple(family_metrics("image"))   # fid, sfid, is, kid, precision, recall (mgbench.metric_registry)
REFERENCE_COMPUTES = {"n": 0}  # how often reference statistics were computed (not loaded from the cache)


@dataclass
class Extractor:
    """A registered torch-fidelity extractor and how to build it."""

    name: str                        # torch-fidelity registry name
    weights: str | None = None       # feature_extractor_weights_path
    info: dict[str, Any] = field(default_factory=dict)  # e.g. the classifier's held-out accuracy

    def layer(self, metric: str) -> str:
        """The feature layer a metric uses (sfid: the `spatial` layer)."""
        if metric == "sfid":
            if "spatial" not in FEATURE_EXTRACTORS_REGISTRY[self.name].get_provided_features_list():
                raise ConfigError(f"eval.metrics: sfid needs the Inception extractor, not {self.name!r}")
            return "spatial"
        key = {"fid": "fid", "is": "isc", "kid": "kid", "precision": "prc", "recall": "prc"}[metric]
        return FEATURE_EXTRACTORS_REGISTRY[self.name].get_default_feature_layer_for_metric(key)

    def identity(self) -> str:
        """What distinguishes this extractor's features (name + weights file name) for cache keys."""
        return f"{self.name}:{Path(self.weights).name if self.weights else '-'}"


def check_extractor_weights(ev: EvalConfig, data: DataConfig) -> None:
    """Fail fast (a one-line ConfigError) when the extractor's weights file is missing: at the start of a
    run, not at its first evaluation hours later. Cheap: checks files only (the digits/MNIST classifier is
    trained on first use and needs no file)."""
    if data.name == "grid2d" or not normalise_metrics(ev.metrics):
        return
    choice = ev.extractor
    if choice == "auto":
        choice = "classifier" if data.name in X.CLASSIFIER_RECIPES else "inception"
    if choice == "classifier":
        return
    if choice == "inception":
        X.check_inception_weights(ev.inception_weights)
        return
    if choice in FEATURE_EXTRACTORS_REGISTRY and FEATURE_EXTRACTORS_REGISTRY[choice].__module__.startswith("torch_fidelity."):
        resolve_extractor(ev, data)   # raises for a missing file; builds nothing


def resolve_extractor(ev: EvalConfig, data: DataConfig) -> Extractor:
    """The extractor a config asks for: auto = classifier for digits/mnist, Inception otherwise."""
    choice = ev.extractor
    if choice == "auto":
        choice = "classifier" if data.name in X.CLASSIFIER_RECIPES else "inception"
    if choice == "classifier":
        path = X.ensure_classifier(data, ev.cache_dir)
        _, meta = X.load_classifier(path)
        return Extractor(X.CLASSIFIER, str(path), {"classifier_test_accuracy": meta["test_accuracy"]})
    if choice == "inception":
        return Extractor(X.INCEPTION, X.check_inception_weights(ev.inception_weights))
    if choice not in FEATURE_EXTRACTORS_REGISTRY:
        raise ConfigError(f"eval.extractor: {choice!r} is not auto, classifier, inception or a registered "
                          f"torch-fidelity extractor ({', '.join(FEATURE_EXTRACTORS_REGISTRY)})")
    weights = ev.inception_weights
    if FEATURE_EXTRACTORS_REGISTRY[choice].__module__.startswith("torch_fidelity.") and \
            not (weights and Path(weights).expanduser().is_file()):  # without a file they download their weights
        got = "not set" if not weights else f"{weights!r} does not exist"
        raise ConfigError(f"eval.inception_weights: {got}; torch-fidelity's extractor {choice!r} needs its weights "
                          "as a local file here; mgbench never downloads weights")
    return Extractor(choice, str(Path(weights).expanduser()) if weights else None)


def normalise_metrics(names: Iterable[str]) -> list[str]:
    """Image metric names in a fixed order (`prc` = precision and recall)."""
    wanted = set()
    for n in names:
        wanted.update(("precision", "recall") if n in ("prc", "precision", "recall") else (n,))
    return [m for m in IMAGE_METRICS if m in wanted]


class _Images(torch.utils.data.Dataset):
    """uint8 images as a torch Dataset (what torch-fidelity's loader takes)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def extract_features(images: torch.Tensor, ex: Extractor, layers: Iterable[str], *, batch_size: int = 256,
                     device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """uint8 images (N, C, H, W) -> {layer: (N, D) float32 features} through torch-fidelity."""
    if images.dtype != torch.uint8:
        raise ValueError(f"metrics take uint8 images, got {images.dtype}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    fe = create_feature_extractor(ex.name, sorted(set(layers)), cuda=cuda, verbose=False,
                                  feature_extractor_weights_path=ex.weights)
    return get_featuresdict_from_dataset(_Images(images), fe, batch_size, cuda, True, False)


# ----------------------------------------------------------------------------- references


@dataclass
class Reference:
    """Reference statistics: FID mean/covariance per layer (float64) and raw features for KID/PRC."""

    stats: dict[str, dict[str, np.ndarray]]
    features: dict[str, torch.Tensor]
    n: int
    source: str


def fid_stats(features: torch.Tensor) -> dict[str, np.ndarray]:
    """torch-fidelity's mean/covariance of features, cast to float64."""
    s = fid_features_to_statistics(features.float().cpu())
    return {"mu": np.asarray(s["mu"], dtype=np.float64), "sigma": np.asarray(s["sigma"], dtype=np.float64)}


def reference_layers(ex: Extractor, metrics: Iterable[str]) -> tuple[list[str], list[str]]:
    """(layers that need FID statistics, layers that need raw features) for a metric list."""
    metrics = normalise_metrics(metrics)
    stat_layers = sorted({ex.layer(m) for m in metrics if m in ("fid", "sfid")})
    feat_layers = sorted({ex.layer(m) for m in metrics if m in ("kid", "precision", "recall")})
    return stat_layers, feat_layers


def reference_from_images(images: torch.Tensor, ex: Extractor, metrics: Iterable[str], source: str, *,
                          batch_size: int = 256, device: str | torch.device = "cpu") -> Reference:
    """Compute a reference from uint8 images."""
    stat_layers, feat_layers = reference_layers(ex, metrics)
    feats = extract_features(images, ex, stat_layers + feat_layers, batch_size=batch_size, device=device)
    REFERENCE_COMPUTES["n"] += 1
    return Reference({k: fid_stats(feats[k]) for k in stat_layers}, {k: feats[k] for k in feat_layers},
                     len(images), source)


def dataset_reference(data: DataConfig, ex: Extractor, metrics: Iterable[str], cache_dir: str | Path, *,
                      split: str = "train", n: int = 0, batch_size: int = 256, device: str | torch.device = "cpu",
                      dataset: Any = None) -> Reference:
    """Statistics of the first N images of a split (0 = all, at most 50,000), cached under cache_dir by
    (dataset, split, extractor, N); `dataset` = that split already loaded (else it is loaded here)."""
    from mgbench.trainer.data import load_dataset

    stat_layers, feat_layers = reference_layers(ex, metrics)
    key = {"dataset": data.name, "path": data.path, "size": data.image_size, "fraction": data.train_fraction,
           "cells": data.grid_cells, "split": split, "extractor": ex.identity(), "n": n}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir).expanduser() / "refstats" / f"{data.name}-{split}-{ex.name}-n{n}-{digest}.pt"
    cached = torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None
    if cached is not None and set(stat_layers) <= set(cached.stats) and set(feat_layers) <= set(cached.features):
        return cached
    ds = dataset if dataset is not None else load_dataset(data, split, device=device)
    x = ds.x[:n if n > 0 else 50_000]
    images = torch.cat([ds.to_uint8(b) for b in x.split(batch_size)])
    ref = reference_from_images(images, ex, list(metrics) + _metrics_of(cached), f"{data.name}:{split}",
                                batch_size=batch_size, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(ref, tmp)
    tmp.replace(path)
    return ref


def _metrics_of(ref: Reference | None) -> list[str]:
    """Metrics a cached reference already served (kept when the cache entry is extended)."""
    if ref is None:
        return []
    return (["fid"] if ref.stats else []) + (["sfid"] if "spatial" in ref.stats else []) + \
        (["kid"] if ref.features else [])


def adm_reference(path: str | Path, ex: Extractor, metrics: Iterable[str], cache_dir: str | Path, *,
                  batch_size: int = 256, device: str | torch.device = "cpu") -> Reference:
    """An ADM reference batch: mu/sigma (pool_3) and mu_s/sigma_s (sFID) as float64; arr_0 images for KID/PRC."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"eval.reference: {str(path)!r} does not exist (an ADM reference batch .npz, "
                          "e.g. VIRTUAL_imagenet256_labeled.npz)")
    if ex.name != X.INCEPTION:
        raise ConfigError(f"eval.reference: ADM statistics are Inception features; eval.extractor is {ex.name!r}")
    stat_layers, feat_layers = reference_layers(ex, metrics)
    npz = np.load(path)
    stats = {}
    for layer, (mu, sigma) in {"2048": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}.items():
        if layer in stat_layers:
            stats[layer] = {"mu": npz[mu].astype(np.float64), "sigma": npz[sigma].astype(np.float64)}
    features: dict[str, torch.Tensor] = {}
    n = int(npz["arr_0"].shape[0]) if "arr_0" in npz.files else 0
    if feat_layers:
        key = f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}:{ex.identity()}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        cache = Path(cache_dir).expanduser() / "refstats" / f"adm-{path.stem}-{digest}.pt"
        if cache.exists():
            features = torch.load(cache, map_location="cpu", weights_only=False)
        if not set(feat_layers) <= set(features):
            images = torch.from_numpy(npz["arr_0"]).permute(0, 3, 1, 2).contiguous()
            features = extract_features(images, ex, feat_layers, batch_size=batch_size, device=device)
            REFERENCE_COMPUTES["n"] += 1
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(features, cache)
    return Reference(stats, features, n, f"adm:{path.name}")


# ----------------------------------------------------------------------------- metrics


def image_metrics(images: torch.Tensor, ref: Reference, ex: Extractor, metrics: Iterable[str], *,
                  batch_size: int = 256, device: str | torch.device = "cpu",
                  kid_subsets: int = 100, seed: int = 2020) -> dict[str, float]:
    """FID/sFID/IS/KID/precision/recall of uint8 images against a reference (keys as in IMAGE_METRICS)."""
    metrics = normalise_metrics(metrics)
    if not metrics:
        return {}
    layers = {m: ex.layer(m) for m in metrics}
    feats = extract_features(images, ex, layers.values(), batch_size=batch_size, device=device)
    out: dict[str, float] = {}
    for m in ("fid", "sfid"):
        if m in metrics:
            out[m] = fid_statistics_to_metric(fid_stats(feats[layers[m]]), ref.stats[layers[m]], False)[KEY_METRIC_FID]
    if "is" in metrics:
        f = feats[layers["is"]]
        out["is"] = isc_features_to_metric(f, splits=max(1, min(10, len(f) // 2)), rng_seed=seed)[KEY_METRIC_ISC_MEAN]
    if "kid" in metrics:
        f1, f2 = feats[layers["kid"]], ref.features[layers["kid"]]
        out["kid"] = kid_features_to_metric(f1, f2, kid_subsets=kid_subsets, kid_subset_size=min(1000, len(f1), len(f2)),
                                            rng_seed=seed, verbose=False)[KEY_METRIC_KID_MEAN]
    if "precision" in metrics:
        f1, f2 = feats[layers["precision"]], ref.features[layers["precision"]]
        prc = prc_features_to_metric(f1, f2, prc_neighborhood=3, verbose=False,
                                     save_cpu_ram=max(len(f1), len(f2)) > 10000)  # blockwise distances
        out["precision"], out["recall"] = float(prc[KEY_METRIC_PRECISION]), float(prc[KEY_METRIC_RECALL])
    return out
