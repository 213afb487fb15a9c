"""Evaluation, the remaining checks: FID closed forms, determinism over batch size and over 1 vs 2 processes,
the Inception path (FID, sFID, IS) from a weights file, and FID telling a trained digits model from an
untrained one. Everything runs the project's real path: the trainer, `mgbench eval`, the hook, torch-fidelity.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.multiprocessing as mp
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from mgbench.config import ConfigError, DataConfig, EvalConfig, train_config_from_dict
from mgbench.evaluation import extractors as X
from mgbench.evaluation import metrics as M
from mgbench.evaluation.cli import add_eval_parser, find_checkpoint, load_run_config, run_eval
from mgbench.evaluation.generate import generate
from mgbench.evaluation.hook import make_eval_hook
from mgbench.trainer.checkpoint import load_checkpoint
from mgbench.trainer.data import load_dataset
from mgbench.trainer.hooks import EvalContext
from mgbench.trainer.loop import train
from mgbench.trainer.models import build_model

torch.set_num_threads(1)
DIGITS = DataConfig(name="digits")
FID = "frechet_inception_distance"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The session's evaluation cache (the digits classifier is trained once, shared with test_evaluation*)."""
    return tmp_path_factory.getbasetemp() / "mgbench-eval-cache"


# ----------------------------------------------------------------------------- 1. FID closed forms


def project_fid(mu1, s1, mu2, s2) -> float:
    """FID from two statistics exactly as metrics.image_metrics computes it (float64, torch-fidelity)."""
    return M.fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)[FID]


def sqrtm_fid(mu1, s1, mu2, s2) -> float:
    """Independent reference: ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) with scipy's sqrtm."""
    r1 = scipy.linalg.sqrtm(s1).real
    cross = scipy.linalg.sqrtm(r1 @ s2 @ r1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(cross).real)


def test_fid_closed_form_diagonal_and_commuting_covariances():
    rng = np.random.default_rng(0)
    d = 64
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 4.0, d), rng.uniform(0.1, 4.0, d)
    exact = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert project_fid(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(exact, rel=1e-6)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # same eigenvectors, not diagonal: S1 S2 = S2 S1
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert np.abs(s1 - np.diag(np.diag(s1))).max() > 0.1
    assert project_fid(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-6)
    # Isotropic: d (sqrt(s) - sqrt(t))^2; equal Gaussians: 0; FID is symmetric.
    assert project_fid(mu1, 4.0 * np.eye(d), mu1, np.eye(d)) == pytest.approx(d * 1.0, rel=1e-6)
    assert abs(project_fid(mu1, s1, mu1, s1)) < 1e-9 * np.trace(s1)
    assert project_fid(mu2, s2, mu1, s1) == pytest.approx(exact, rel=1e-6)


def test_fid_closed_form_2x2_non_commuting():
    # For 2x2 SPD S1, S2: tr (S1 S2)^1/2 = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)) (the eigenvalues of S1 S2 are > 0).
    s1, s2 = np.array([[2.0, 0.7], [0.7, 1.0]]), np.array([[0.5, -0.3], [-0.3, 3.0]])
    assert np.abs(s1 @ s2 - s2 @ s1).max() > 0.5
    mu1, mu2 = np.array([1.0, -2.0]), np.array([0.5, 0.5])
    tr_sqrt = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    exact = 0.25 + 6.25 + 3.0 + 3.5 - 2 * tr_sqrt
    assert project_fid(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("n", [2000, 100])  # full-rank covariances, and rank-deficient ones (n < d, as at small N)
def test_fid_matches_scipy_sqrtm_formula_non_diagonal(n):
    rng = np.random.default_rng(n)
    d = 256
    f1 = rng.normal(size=(n, d))
    f2 = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d) + 0.1
    mu1, s1, mu2, s2 = f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False)
    got, ref = project_fid(mu1, s1, mu2, s2), sqrtm_fid(mu1, s1, mu2, s2)
    print(f"d={d} n={n}: project {got:.10g} scipy {ref:.10g}")
    assert got == pytest.approx(ref, rel=1e-6)


class PixelFeatures(FeatureExtractorBase):
    """A torch-fidelity extractor whose features are the pixel values: FID then has a by-hand reference."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)

    def forward(self, x):
        return (x.flatten(1).float(),)

    @staticmethod
    def get_provided_features_list():
        return ("pixels",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "pixels"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 4, 4, dtype=torch.uint8)


if "test-pixels" not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor("test-pixels", PixelFeatures)


def test_image_metrics_fid_equals_formula_on_its_features():
    """extract -> fid_stats -> FID (the project's whole path) against numpy/scipy on the same images."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(48, 48, generator=g) * 0.3 + torch.eye(48)
    a = (128 + 25 * torch.randn(500, 48, generator=g) @ mix).clamp(0, 255).round().to(torch.uint8).view(500, 3, 4, 4)
    b = (140 + 20 * torch.randn(400, 48, generator=g)).clamp(0, 255).round().to(torch.uint8).view(400, 3, 4, 4)
    ex = M.Extractor("test-pixels")
    ref = M.reference_from_images(b, ex, ["fid"], "b", batch_size=128)
    got = M.image_metrics(a, ref, ex, ["fid"], batch_size=64)["fid"]
    fa, fb = a.flatten(1).double().numpy(), b.flatten(1).double().numpy()
    want = sqrtm_fid(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))
    print(f"pixel FID: project {got:.10g} by hand {want:.10g}")
    assert want > 100 and got == pytest.approx(want, rel=1e-6)
    assert abs(M.image_metrics(b, ref, ex, ["fid"])["fid"]) < 1e-9 * want


# ----------------------------------------------------------------------------- 2. determinism


EVAL_N = 75  # odd: the two ranks draw 38 and 37 samples, in uneven batches


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, cache):
    """A real trainer run: DiT-XS/2 on digits, 30 steps (a few seconds); its run folder holds the checkpoint."""
    out = tmp_path_factory.mktemp("closed") / "short"
    cfg = train_config_from_dict({
        "out_dir": str(out), "data": {"name": "digits"}, "model": {"arch": "DiT-XS/2"},
        "optim": {"lr": 1e-3, "batch_size": 64},
        "train": {"steps": 30, "log_every": 10, "ckpt_every": 30, "device": "cpu"},
        "sample": {"steps": 10, "n_grid": 4},
        "eval": {"n_samples": EVAL_N, "batch_size": 64, "metrics": ["fid", "is", "kid", "prc"], "save": "npz",
                 "cache_dir": str(cache), "n_reference": 300}}, "short")
    train(cfg)
    return out


def _eval_args(run_dir, batch_size: int, json_path) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="cmd"))
    return parser.parse_args(["eval", str(run_dir), "--batch-size", str(batch_size), "--device", "cpu",
                              "--json", str(json_path)])


def _raw_samples(run_dir, batch_size: int, rank: int = 0, world: int = 1) -> torch.Tensor | None:
    """Model-space samples of the run's EMA weights through generate() (gathered on rank 0)."""
    ckpt, run_dir = find_checkpoint(run_dir)
    state = load_checkpoint(ckpt)
    cfg = load_run_config(state, run_dir, [])
    data = load_dataset(cfg.data, "train")
    model = build_model(cfg.model.arch, input_shape=data.shape, num_classes=data.num_classes)
    model.load_state_dict(state["ema"])
    ctx = EvalContext(cfg, model.eval(), state["step"], cfg.objective.w, torch.device("cpu"), data, str(run_dir),
                      rank, world)
    return generate(ctx.sample, cfg.eval.n_samples, data.num_classes, seed=cfg.sample.seed, batch_size=batch_size,
                    rank=rank, world_size=world).x


def _evaluate_copy(short_run, dest, batch_size: int) -> tuple[dict, np.ndarray]:
    """`mgbench eval` on a copy of the run folder: (metrics, saved uint8 samples NHWC)."""
    shutil.copytree(short_run, dest)
    assert run_eval(_eval_args(dest, batch_size, dest / "metrics.json")) == 0
    images = np.load(dest / "eval" / "step_00000030" / "samples.npz")["arr_0"]
    return json.loads((dest / "metrics.json").read_text()), images


def test_eval_same_checkpoint_batch_16_vs_64_identical(short_run, tmp_path):
    m16, img16 = _evaluate_copy(short_run, tmp_path / "b16", 16)
    m64, img64 = _evaluate_copy(short_run, tmp_path / "b64", 64)
    print("metrics (batch 16 = batch 64):", m16)
    assert img16.shape == (EVAL_N, 8, 8, 1) and img16.std() > 10      # real images, not a constant
    assert np.array_equal(img16, img64)
    assert m16 == m64 and {"fid", "is", "kid", "precision", "recall", "nfe"} <= set(m16)
    raw16, raw64 = _raw_samples(short_run, 16), _raw_samples(short_run, 64)
    assert raw16.shape == (EVAL_N, 1, 8, 8)
    torch.testing.assert_close(raw16, raw64, rtol=0, atol=1e-6)


def _eval_worker(rank, world, port, run_dir, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        from pathlib import Path

        code = run_eval(_eval_args(run_dir, 16, Path(run_dir) / f"metrics-rank{rank}.json"))  # joins the group
        raw = _raw_samples(run_dir, 16, rank, world)
        if rank == 0:
            torch.save(raw, Path(run_dir) / "raw.pt")
        queue.put((rank, code, raw is None, ""))
    except Exception as e:  # report instead of hanging the parent
        queue.put((rank, -1, None, repr(e)))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_eval_one_process_vs_two_processes_identical(short_run, tmp_path):
    """`mgbench eval` as 2 gloo ranks (as under torchrun): each rank samples its share, rank 0 gathers and
    measures; samples and metrics equal one process's."""
    m1, img1 = _evaluate_copy(short_run, tmp_path / "one", 16)
    two = tmp_path / "two"
    shutil.copytree(short_run, two)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_eval_worker, args=(r, 2, port, str(two), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {r: rest for r, *rest in (queue.get(timeout=300) for _ in procs)}
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert results[0] == [0, False, ""] and results[1] == [0, True, ""]  # rank 1 holds no gathered samples
    assert not (two / "metrics-rank1.json").exists()                      # only rank 0 reports
    m2 = json.loads((two / "metrics-rank0.json").read_text())
    img2 = np.load(two / "eval" / "step_00000030" / "samples.npz")["arr_0"]
    print("metrics (1 process = 2 processes):", m2)
    assert img2.shape == img1.shape == (EVAL_N, 8, 8, 1)
    assert np.array_equal(img1, img2)
    assert m1 == m2
    torch.testing.assert_close(torch.load(two / "raw.pt"), _raw_samples(short_run, 16), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- 3. Inception from a weights file


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """torch-fidelity's Inception-v3 architecture, randomly initialised, saved as a state dict under the real
    file name. Convolutions get He-normal weights so that activations keep their scale through the 94 layers
    (PyTorch's default init shrinks the 2048-d features to ~1e-8, which would make every FID ~0)."""

    class Blank(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # the constructor loads {}: keep random
            return None if not state_dict else super().load_state_dict(state_dict, strict=strict, assign=assign)

    empty = tmp_path_factory.mktemp("inception") / "empty.pth"
    torch.save({}, empty)
    torch.manual_seed(0)
    net = Blank("blank", ["2048"], feature_extractor_weights_path=str(empty))
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.nn.init.normal_(net.fc.weight, std=2048 ** -0.5)
    path = empty.parent / X.INCEPTION_FILE
    torch.save(net.state_dict(), path)
    return path


def test_inception_weights_file_fid_sfid_is(inception_file, cache, tmp_path, monkeypatch):
    """The missing-file error is tested in test_evaluation.py::test_missing_inception_weights_is_one_clear_line."""
    def no_download(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args}")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    ev = EvalConfig(extractor="inception", inception_weights=str(inception_file), cache_dir=str(tmp_path),
                    metrics=["fid", "sfid", "is"], n_reference=24)
    ex = M.resolve_extractor(ev, DIGITS)
    assert ex.name == X.INCEPTION and ex.weights == str(inception_file)
    names = ["fid", "sfid", "is"]
    ref = M.dataset_reference(DIGITS, ex, names, tmp_path, n=24, batch_size=24)  # the hook's reference path
    assert set(ref.stats) == {"2048", "spatial"} and ref.stats["spatial"]["mu"].shape == (2023,)
    train_split, test_split = load_dataset(DIGITS, "train"), load_dataset(DIGITS, "test")
    same = M.image_metrics(train_split.to_uint8(train_split.x[:24]), ref, ex, names, batch_size=24)
    other = M.image_metrics(test_split.to_uint8(test_split.x[:24]), ref, ex, names, batch_size=24)
    print("random-init Inception, FID/sFID/IS: same set", same, "held-out set", other)
    assert all(math.isfinite(v) for v in [*same.values(), *other.values()])
    scale = np.trace(ref.stats["2048"]["sigma"]), np.trace(ref.stats["spatial"]["sigma"])
    assert scale[0] > 1 and scale[1] > 1                                  # features are not vanishing
    assert abs(same["fid"]) < 1e-5 * scale[0] and abs(same["sfid"]) < 1e-5 * scale[1]
    assert other["fid"] > 1e-2 * scale[0] and other["sfid"] > 1e-1 * scale[1]
    assert 1.0 - 1e-6 <= same["is"] < 1008 and 1.0 - 1e-6 <= other["is"] < 1008

    # The trainer's hook with the same settings: the cached reference, FID/sFID/IS of an untrained model's samples.
    cfg = train_config_from_dict({
        "out_dir": str(tmp_path / "run"), "data": {"name": "digits"}, "model": {"arch": "DiT-XS/4"},
        "sample": {"steps": 2}, "eval": {**ev.__dict__, "n_samples": 16, "batch_size": 16}}, "inception")
    data = load_dataset(cfg.data, "train")
    torch.manual_seed(0)
    model = build_model("DiT-XS/4", input_shape=data.shape, num_classes=data.num_classes).eval()
    computed = M.REFERENCE_COMPUTES["n"]
    out = make_eval_hook(cfg)(EvalContext(cfg, model, 0, 1.0, torch.device("cpu"), data, cfg.out_dir))
    print("hook (untrained DiT-XS/4, 16 samples):", out)
    assert M.REFERENCE_COMPUTES["n"] == computed                          # loaded from eval.cache_dir
    assert {"fid", "sfid", "is", "nfe"} <= set(out) and all(math.isfinite(v) for v in out.values())
    assert out["fid"] > other["fid"] and out["sfid"] > other["sfid"]      # noise-like samples are further away


def test_torch_fidelity_extractor_without_weights_file_does_not_download(monkeypatch):
    """eval.extractor = one of torch-fidelity's own extractors: a config error, not a download."""
    def no_download(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args}")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", no_download)
    for weights in (None, "/nonexistent/weights.pth"):
        with pytest.raises(ConfigError) as err:
            ex = M.resolve_extractor(EvalConfig(extractor="inception-v3-compat", inception_weights=weights), DIGITS)
            M.extract_features(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ex, ["2048"])
        msg = str(err.value)
        assert msg.startswith("eval.inception_weights:") and "never downloads" in msg and "\n" not in msg


# ----------------------------------------------------------------------------- 4. trained vs untrained


@pytest.mark.slow
def test_digits_fid_separates_trained_from_untrained(tmp_path, cache):
    """DiT-XS/2, flow, 1500 steps of batch 128 (~45 s on one thread): the trainer's own final evaluation
    (classifier features, 500 samples, 20 Euler steps) against the same hook on the initial weights."""
    cfg = train_config_from_dict({
        "out_dir": str(tmp_path / "run"), "data": {"name": "digits"}, "model": {"arch": "DiT-XS/2"},
        "objective": {"formulation": "flow"}, "optim": {"lr": 1e-3, "batch_size": 128, "ema_decay": 0.999},
        "train": {"steps": 1500, "log_every": 100, "ckpt_every": 1500, "device": "cpu"},
        "sample": {"steps": 20, "n_grid": 4},
        "eval": {"n_samples": 500, "batch_size": 250, "metrics": ["fid", "is", "prc"], "cache_dir": str(cache)}},
        "trained")
    hook = make_eval_hook(cfg)
    trained = train(cfg, eval_hook=hook).metrics
    data = load_dataset(cfg.data, "train")
    torch.manual_seed(cfg.train.seed)  # the trainer's initial weights
    init = build_model(cfg.model.arch, input_shape=data.shape, num_classes=data.num_classes).eval()
    untrained = hook(EvalContext(cfg, init, 0, 1.0, torch.device("cpu"), data, cfg.out_dir))
    print(f"digits FID trained {trained['fid']:.3f} vs untrained {untrained['fid']:.3f} "
          f"(IS {trained['is']:.2f} vs {untrained['is']:.2f}, precision {trained['precision']:.3f} vs "
          f"{untrained['precision']:.3f}, recall {trained['recall']:.3f} vs {untrained['recall']:.3f})")
    # recorded: FID 2.53 vs 37.77, IS 7.46 vs 2.68, precision 0.65 vs 0.10, recall 0.79 vs 0.09
    assert trained["fid"] < 0.25 * untrained["fid"]
    assert trained["is"] > 2 * untrained["is"]
    assert trained["recall"] > untrained["recall"] + 0.3
