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
    model = build_model(cfg.model.arch, input_shape=data.shape, num_classes=data.num_classes).eval()
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
