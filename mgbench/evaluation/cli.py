"""`mgbench eval RUN_DIR_OR_CHECKPOINT [--n N] [--metrics ...]`: evaluate a run's EMA weights.

A run folder holds `config.yaml` and `checkpoints/ckpt_XXXXXXXX.pt` (keys model, ema, step, config, ...);
the latest checkpoint is used unless a checkpoint file is given. Prints one `name value` line per
metric (and writes them as JSON with --json). Under `torchrun` every rank samples its share of the
images (the same images as one process) and rank 0 prints and writes the metrics.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from mgbench.config import ConfigError, TrainConfig, load_train_config, train_config_from_dict
from mgbench.trainer.progress import ProgressFn, format_duration


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `eval` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser("eval", help="evaluate a run folder or checkpoint (FID, IS, ... / grid2d metrics)")
    p.add_argument("path", help="run folder (latest checkpoint) or a ckpt_XXXXXXXX.pt file")
    p.add_argument("--n", type=int, default=None, help="generated samples (default: eval.n_samples)")
    p.add_argument("--metrics", nargs="+", default=None, help="e.g. fid sfid is kid prc img_per_s")
    p.add_argument("--batch-size", type=int, default=None, help="sampling batch (default: eval.batch_size)")
    p.add_argument("--cfg-sweep", type=float, nargs="*", default=None, help="also evaluate at these CFG scales")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: sample.steps)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. eval.inception_weights=/data/pt_inception.pth (YAML value)")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.set_defaults(func=run_eval)
    return p


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate; 0 on success, 2 on a config/input error (one line on stderr)."""
    from mgbench.trainer.progress import ConsoleProgress

    display = ConsoleProgress(min_interval_s=10.0)   # a bar on a terminal; in a log, a line every 10 s and the last
    started = time.perf_counter()
    try:
        metrics = evaluate_checkpoint(args, display)
    except (ConfigError, FileNotFoundError) as e:
        from mgbench.config import print_error

        return print_error("mgbench eval", e)
    finally:
        display.close()
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: every rank holds the same metrics; rank 0 reports
        return 0
    print(f"evaluated in {format_duration(time.perf_counter() - started)}:")
    for k, v in metrics.items():
        print(f"{k} {v:.6g}")
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


def find_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(checkpoint file, run folder) for a run folder or a checkpoint file."""
    from mgbench.trainer.checkpoint import latest_checkpoint

    path = Path(path)
    if path.is_file():
        return path, path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run folder or checkpoint")
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"{path}: no checkpoints/ckpt_XXXXXXXX.pt in this run folder")
    return ckpt, path


def load_run_config(state: dict[str, Any], run_dir: Path, overrides: list[str]) -> TrainConfig:
    """The run's config (from the checkpoint, else config.yaml) with KEY=VALUE overrides applied."""
    import yaml

    from mgbench.config import set_dotted

    parsed = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        parsed[k] = yaml.safe_load(v)
    if state.get("config") is None:
        return load_train_config(run_dir / "config.yaml", parsed)
    data = state["config"] if isinstance(state["config"], dict) else state["config"].to_dict()
    data = json.loads(json.dumps(data))  # a deep copy
    for k, v in parsed.items():
        set_dotted(data, k, v)
    return train_config_from_dict(data, f"{run_dir}/checkpoint config")


def evaluate_checkpoint(args: argparse.Namespace, progress: ProgressFn | None = None) -> dict[str, float]:
    """Load the EMA weights of a checkpoint into the run's network (trainer.build) and run the evaluation hook once;
    says what it evaluates before it starts and reports the samples drawn to `progress` (rank 0)."""
    import torch

    from mgbench.evaluation.hook import make_eval_hook
    from mgbench.evaluation.progress import CountingContext, SampleCounter, planned_samples
    from mgbench.trainer.checkpoint import load_checkpoint
    from mgbench.trainer.build import build_run

    ckpt, run_dir = find_checkpoint(args.path)
    state = load_checkpoint(ckpt)
    cfg = load_run_config(state, run_dir, args.set)
    if args.n is not None:
        cfg.eval.n_samples = args.n
    if args.metrics is not None:
        cfg.eval.metrics = list(args.metrics)
    if args.batch_size is not None:
        cfg.eval.batch_size = args.batch_size
    if args.cfg_sweep is not None:
        cfg.eval.cfg_sweep = list(args.cfg_sweep)
    if args.steps is not None:
        cfg.sample.steps = args.steps
    cfg.eval.validate("eval")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    rank, world = 0, 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: join the group; ranks split the samples
        from mgbench.trainer import distributed as D

        env = D.setup("cuda" if device.type == "cuda" else "cpu")
        device, rank, world = env.device, env.rank, env.world_size
    data, model = build_run(cfg, run_dir, device)
    model.load_state_dict(state["ema"])
    model.eval().requires_grad_(False)
    w, step = _trained_w(state, cfg), int(state.get("step", 0))
    total = planned_samples(cfg, step)
    counter = SampleCounter(total, progress if rank == 0 else None)
    if rank == 0:
        print(f"eval {ckpt} (step {step}, w={w:.4g}, {device.type}): {cfg.eval.n_samples} samples x "
              f"{cfg.eval.sample_seeds} sample seed(s), {total} samples to draw in all", flush=True)
    ctx = CountingContext(cfg, model, step, w, device, data, str(run_dir), rank, world, counted=counter.add)
    return make_eval_hook(cfg)(ctx)


def _trained_w(state: dict[str, Any], cfg: TrainConfig) -> float:
    """The w the run ended with (automatic w stores its own), else the configured w."""
    auto = state.get("auto_w")
    if isinstance(auto, dict) and "w" in auto:
        return float(auto["w"])
    return cfg.objective.w
