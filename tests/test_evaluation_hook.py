"""The trainer's evaluation hook and `mgbench eval` on tiny untrained models (grid2d and digits)."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from mgbench import tracking as T
from mgbench.config import TrainConfig, train_config_from_dict
from mgbench.evaluation.cli import add_eval_parser, run_eval
from mgbench.evaluation.hook import make_eval_hook
from mgbench.trainer.checkpoint import save_checkpoint
from mgbench.trainer.data import load_dataset
from mgbench.trainer.hooks import EvalContext
from mgbench.trainer.models import build_model

torch.set_num_threads(1)
GRID_KEYS = {"in_class", "off_support", "coverage", "swd", "center_dist", "nfe"}


def grid_cfg(tmp_path, **eval_kw) -> TrainConfig:
    ev = {"n_samples": 64, "batch_size": 32, "cache_dir": str(tmp_path / "cache"), **eval_kw}
    return train_config_from_dict({"out_dir": str(tmp_path / "run"), "data": {"name": "grid2d"},
                                   "model": {"arch": "MLP-S"}, "sample": {"steps": 3}, "eval": ev})


def context(cfg: TrainConfig, step: int = 0) -> EvalContext:
    data = load_dataset(cfg.data, "train")
    torch.manual_seed(0)
    model = build_model(cfg.model.arch, input_shape=data.shape, num_classes=data.num_classes,
                        w_input=cfg.model.w_input).eval()
    return EvalContext(cfg, model, step, cfg.objective.w, torch.device("cpu"), data, cfg.out_dir)


def test_grid2d_hook_metrics_sweep_and_speed(tmp_path):
    cfg = grid_cfg(tmp_path, metrics=["img_per_s"], cfg_sweep=[0.5, 2.0])
    out = make_eval_hook(cfg)(context(cfg))
    assert GRID_KEYS | {"img_per_s"} <= set(out)
    assert out["nfe"] == 3 and out["img_per_s"] > 0
    assert 0 <= out["in_class"] <= 1 and out["off_support"] == pytest.approx(1 - out["in_class"])
    sweep = T.metric_sweep(0.5, "in_class")
    assert sweep.startswith("sweep/") and sweep.endswith("/in_class") and sweep in out  # named by tracking
    assert out[T.metric_sweep(2.0, "nfe")] == 6                  # CFG: two forwards per step
    assert T.metric_sweep(0.5, "img_per_s") not in out          # speed only at the run's own setting
    assert all(isinstance(v, float) for v in out.values())


def test_hook_is_deterministic(tmp_path):
    cfg = grid_cfg(tmp_path)
    hook = make_eval_hook(cfg)
    assert hook(context(cfg)) == hook(context(cfg))


def test_digits_hook_image_metrics(tmp_path, tmp_path_factory):
    cfg = train_config_from_dict({
        "out_dir": str(tmp_path / "run"), "data": {"name": "digits"}, "model": {"arch": "DiT-XS/4"},
        "sample": {"steps": 2},
        "eval": {"n_samples": 40, "batch_size": 40, "metrics": ["fid", "kid", "prc", "is"], "save": "npz",
                 "cache_dir": str(tmp_path_factory.getbasetemp() / "mgbench-eval-cache"), "n_reference": 300}})
    out = make_eval_hook(cfg)(context(cfg, step=5))
    assert {"fid", "kid", "precision", "recall", "is", "nfe", "extractor_acc"} <= set(out)
    assert out["fid"] > 1.0 and out["extractor_acc"] >= 0.97   # an untrained model is far from the data
    npz = tmp_path / "run" / "eval" / "step_00000005" / "samples.npz"
    import numpy as np
    assert np.load(npz)["arr_0"].shape == (40, 8, 8, 1)


def test_cli_eval_run_folder(tmp_path, capsys):
    cfg = grid_cfg(tmp_path)
    ctx = context(cfg)
    save_checkpoint(cfg.out_dir, 7, {"step": 7, "model": ctx.model.state_dict(), "ema": ctx.model.state_dict(),
                                     "config": cfg.to_dict()})
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["eval", cfg.out_dir, "--n", "64", "--json", str(tmp_path / "m.json"),
                              "--device", "cpu"])
    assert args.func is run_eval and run_eval(args) == 0
    got = json.loads((tmp_path / "m.json").read_text())
    assert GRID_KEYS <= set(got)
    assert got == pytest.approx(make_eval_hook(cfg)(ctx))        # same weights, same seeds, same numbers
    assert "in_class" in capsys.readouterr().out


def test_cli_eval_errors_are_one_line(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="cmd"))
    assert run_eval(parser.parse_args(["eval", str(tmp_path / "nothing")])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mgbench eval:") and "\n" not in err


def test_sample_seeds_mean_se_and_paired_values(tmp_path):
    """K sample seeds: mean and SE of the per-seed values; seed 0 is the single evaluation of K = 1."""
    one = make_eval_hook(grid_cfg(tmp_path))(context(grid_cfg(tmp_path)))
    cfg = grid_cfg(tmp_path, sample_seeds=3)
    out = make_eval_hook(cfg)(context(cfg))
    values = [out[T.metric_seed("in_class", k)] for k in range(3)]
    assert values[0] == one["in_class"] and "in_class_se" not in one
    assert len(set(values)) == 3                                   # disjoint sample sets
    mean = sum(values) / 3
    sd = (sum((v - mean) ** 2 for v in values) / 2) ** 0.5
    assert out["in_class"] == pytest.approx(mean, abs=1e-12)
    assert out[T.metric_se("in_class")] == pytest.approx(sd / 3 ** 0.5, abs=1e-12)
    assert out["n_sample_seeds"] == 3 and out["nfe"] == 3 and T.metric_se("nfe") not in out
    tracked = T.tracked_eval(out)
    assert tracked["eval/in_class/seed_2"] == values[2] and tracked["eval/in_class_se"] == out["in_class_se"]


def test_sample_seed_se_shrinks_as_one_over_sqrt_k(tmp_path):
    """The SE over K sample seeds falls about as 1/sqrt(K): K = 4 against K = 64 gives about 4 (3.7 with the
    small-K bias of the sample SD, c4(4) = 0.92)."""
    def mean_se(k: int, reps: int) -> float:
        ses = []
        for r in range(reps):
            cfg = grid_cfg(tmp_path, sample_seeds=k, n_samples=32)
            cfg.sample.seed = 10_000 * r
            ses.append(make_eval_hook(cfg)(context(cfg))[T.metric_se("in_class")])
        return sum(ses) / reps

    ratio = mean_se(4, 24) / mean_se(64, 3)
    assert 3.0 < ratio < 4.6, ratio


def test_w_sweep_and_probes_are_named_by_tracking(tmp_path):
    cfg = grid_cfg(tmp_path, w_sweep=[1.5, 2.0])
    cfg.model.w_input = True
    cfg.objective.w = 1.5
    ctx = context(cfg)
    with torch.no_grad():   # the w embedding starts at zero: give w an effect
        for p in ctx.model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    ctx.probes = {"cfg+0.25": {"guidance": "mg+cfg", "cfg_scale": 0.25}}
    out = make_eval_hook(cfg)(ctx)
    assert {T.metric_wsweep(1.5, "in_class"), T.metric_wsweep(2.0, "in_class")} <= set(out)
    assert out[T.metric_wsweep(2.0, "nfe")] == 3                  # MG: one forward per step
    assert out[T.metric_probe("cfg+0.25", "nfe")] == 6             # MG + CFG: two
    assert out[T.metric_wsweep(1.5, "in_class")] == out["in_class"]  # the run's own w, same seeds
    assert out[T.metric_wsweep(2.0, "swd")] != out["swd"]             # another fed w, another model output


def test_sweeps_only_at_the_final_evaluation_when_asked(tmp_path):
    cfg = grid_cfg(tmp_path, cfg_sweep=[0.5], sweep_final_only=True)
    hook = make_eval_hook(cfg)
    assert T.metric_sweep(0.5, "in_class") not in hook(context(cfg, step=cfg.train.steps - 1))
    assert T.metric_sweep(0.5, "in_class") in hook(context(cfg, step=cfg.train.steps))
