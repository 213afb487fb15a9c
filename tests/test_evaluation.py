"""Image metrics through torch-fidelity on real digits: classifier accuracy, FID sanity, caching, sFID, errors."""
from __future__ import annotations

import pytest
import torch

from mgbench.config import ConfigError, DataConfig, EvalConfig
from mgbench.evaluation import extractors as X
from mgbench.evaluation import metrics as M
from mgbench.trainer.data import load_dataset

torch.set_num_threads(1)
DIGITS = DataConfig(name="digits")
ALL = ["fid", "is", "kid", "prc"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache per test session (the classifier is trained once, shared with test_evaluation_hook)."""
    return tmp_path_factory.getbasetemp() / "mgbench-eval-cache"


@pytest.fixture(scope="module")
def extractor(cache):
    return M.resolve_extractor(EvalConfig(cache_dir=str(cache)), DIGITS)


@pytest.fixture(scope="module")
def splits():
    train, test = load_dataset(DIGITS, "train"), load_dataset(DIGITS, "test")
    return train.to_uint8(train.x), test.to_uint8(test.x)


def test_classifier_reaches_97_percent_held_out(extractor):
    acc = extractor.info["classifier_test_accuracy"]
    print(f"digits classifier held-out accuracy: {acc:.4f}")  # recorded: 0.9944 (180 held-out images)
    assert acc >= 0.97


def test_classifier_is_cached_and_deterministic(cache, extractor):
    path = X.classifier_path(DIGITS, cache)
    assert str(path) == extractor.weights and path.exists()
    mtime = path.stat().st_mtime_ns
    again = M.resolve_extractor(EvalConfig(cache_dir=str(cache)), DIGITS)
    assert again.weights == extractor.weights and path.stat().st_mtime_ns == mtime  # loaded, not retrained
    assert X.classifier_path(DataConfig(name="digits", train_fraction=0.8), cache) != path


def test_fid_held_out_small_noise_large_self_zero(cache, extractor, splits):
    train, test = splits
    ref = M.dataset_reference(DIGITS, extractor, ALL, cache)
    assert ref.n == len(train) == 1617
    held = M.image_metrics(test, ref, extractor, ALL)
    same = M.image_metrics(train, ref, extractor, ["fid", "is", "prc"])  # KID on 1617 would only add time
    noise = torch.randint(0, 256, test.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    bad = M.image_metrics(noise, ref, extractor, ALL)
    assert abs(same["fid"]) < 1e-6                        # FID(x, x) ~ 0
    assert held["fid"] < 2.0 and bad["fid"] > 20 * held["fid"]
    assert held["kid"] < 0.05 and bad["kid"] > 0.5
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    assert held["precision"] > 0.8 and bad["precision"] < 0.3 and bad["recall"] < 0.3
    assert 9.0 < same["is"] <= 10.0 and bad["is"] < 4.0   # 10 balanced, confidently classified classes
    assert set(held) == {"fid", "is", "kid", "precision", "recall"}


def test_reference_statistics_cached(tmp_path, extractor):
    before_images = X.ClassifierFeatures.images_seen
    n0 = M.REFERENCE_COMPUTES["n"]
    ref1 = M.dataset_reference(DIGITS, extractor, ["fid"], tmp_path, n=500)
    assert M.REFERENCE_COMPUTES["n"] == n0 + 1
    assert X.ClassifierFeatures.images_seen - before_images == 500
    ref2 = M.dataset_reference(DIGITS, extractor, ["fid"], tmp_path, n=500)
    assert M.REFERENCE_COMPUTES["n"] == n0 + 1                              # loaded from the cache
    assert X.ClassifierFeatures.images_seen - before_images == 500          # no image went through again
    layer = extractor.layer("fid")
    assert (ref1.stats[layer]["sigma"] == ref2.stats[layer]["sigma"]).all()
    assert ref1.stats[layer]["mu"].dtype.name == "float64"
    M.dataset_reference(DIGITS, extractor, ["fid"], tmp_path, n=400)       # another N is another entry
    assert M.REFERENCE_COMPUTES["n"] == n0 + 2
    assert len(list((tmp_path / "refstats").glob("*.pt"))) == 2


def test_normalise_metrics():
    assert M.normalise_metrics(["prc", "fid", "img_per_s", "swd"]) == ["fid", "precision", "recall"]


def test_sfid_extractor_shapes_random_inception():
    ex = M.Extractor(X.INCEPTION, X.RANDOM_INIT)
    images = torch.randint(0, 256, (2, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    feats = M.extract_features(images, ex, ["spatial", "2048"], batch_size=2)
    assert feats["spatial"].shape == (2, 7 * 17 * 17)
    assert feats["2048"].shape == (2, 2048)
    assert ex.layer("sfid") == "spatial" and ex.layer("fid") == "2048" and ex.layer("is") == "logits_unbiased"
    gray = M.extract_features(images[:, :1], ex, ["spatial"], batch_size=2)  # 1-channel input is repeated to RGB
    assert gray["spatial"].shape == (2, 2023)


def test_sfid_needs_inception(extractor):
    with pytest.raises(ConfigError, match="sfid needs the Inception"):
        extractor.layer("sfid")


@pytest.mark.parametrize("path", [None, "/nonexistent/pt_inception.pth"])
def test_missing_inception_weights_is_one_clear_line(path):
    with pytest.raises(ConfigError) as err:
        M.resolve_extractor(EvalConfig(extractor="inception", inception_weights=path), DataConfig(name="digits"))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("eval.inception_weights:")
    assert "pt_inception-2015-12-05-6726825d.pth" in msg and "https://" in msg and "never downloads" in msg


def test_adm_reference_npz(tmp_path, extractor):
    import numpy as np

    rng = np.random.RandomState(0)
    mu, a = rng.randn(2048).astype(np.float32), rng.randn(2048, 8).astype(np.float32)
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=a @ a.T, mu_s=mu[:2023], sigma_s=(a @ a.T)[:2023, :2023])
    ex = M.Extractor(X.INCEPTION, X.RANDOM_INIT)
    ref = M.adm_reference(tmp_path / "ref.npz", ex, ["fid", "sfid"], tmp_path)
    assert ref.stats["2048"]["mu"].dtype == np.float64 and ref.stats["spatial"]["sigma"].shape == (2023, 2023)
    with pytest.raises(ConfigError, match="eval.reference"):
        M.adm_reference(tmp_path / "ref.npz", extractor, ["fid"], tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        M.adm_reference(tmp_path / "missing.npz", ex, ["fid"], tmp_path)


def test_eval_config_rejects_unknown_metric():
    with pytest.raises(ConfigError, match=r"metrics\[1\]"):
        EvalConfig(metrics=["fid", "fdi"]).validate("cfg:eval")


@pytest.mark.slow
def test_mnist_classifier_reaches_97_percent_held_out(tmp_path_factory):
    ex = M.resolve_extractor(EvalConfig(cache_dir=str(tmp_path_factory.getbasetemp() / "mgbench-eval-cache")),
                             DataConfig(name="mnist"))
    acc = ex.info["classifier_test_accuracy"]
    print(f"mnist classifier held-out accuracy: {acc:.4f}")  # recorded: 0.976 (500 held-out images)
    assert acc >= 0.97


def test_missing_weights_fail_before_any_training_step(tmp_path, capsys):
    """A run that would evaluate with Inception stops at once when the weights file is missing, not hours later."""
    import yaml

    from mgbench.cli import main

    missing = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    cfg = {"out_dir": str(tmp_path / "run"), "data": {"name": "digits"}, "model": {"arch": "DiT-XS/4"},
           "train": {"steps": 5, "log_every": 1}, "optim": {"batch_size": 8},
           "eval": {"extractor": "inception", "inception_weights": str(missing), "metrics": ["fid"]}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mgbench train: error: eval.inception_weights:") and "\n" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()
    cfg["eval"]["extractor"] = "classifier"      # digits' own classifier needs no file: no error up front
    from mgbench.config import train_config_from_dict
    from mgbench.evaluation.hook import make_eval_hook

    assert callable(make_eval_hook(train_config_from_dict(cfg)))


def test_fid_one_repeated_class_is_far_from_the_data(cache, extractor, splits):
    """Held-out digits are far closer to the training split than the same number of images of one class."""
    train, test = splits
    labels = load_dataset(DIGITS, "train").y
    ref = M.dataset_reference(DIGITS, extractor, ["fid", "prc"], cache)
    held = M.image_metrics(test, ref, extractor, ["fid", "prc"])
    zeros = train[labels == 0]
    one_class = zeros[torch.arange(len(test)) % len(zeros)]
    collapsed = M.image_metrics(one_class, ref, extractor, ["fid", "prc"])
    print(f"FID held-out {held['fid']:.3f}, one class {collapsed['fid']:.3f}")
    assert collapsed["fid"] > 20 * held["fid"]
    assert collapsed["recall"] < 0.25 < held["recall"]      # mode collapse shows as lost recall
