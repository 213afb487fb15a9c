"""The `mgbench` command: train, eval, study, report, ui, bench."""
from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from mgbench.config import ConfigError


def parse_set(items: list[str]) -> dict[str, Any]:
    """`--set objective.w=1.5` pairs -> {dotted key: YAML-parsed value}."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected KEY=VALUE (e.g. objective.w=1.5)")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from mgbench import tracking as T
    from mgbench.config import load_train_config

    cfg = load_train_config(args.config, parse_set(args.set))
    if args.dry_run:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from mgbench.trainer.loop import train

    hook = None
    if not args.no_eval:
        from mgbench.evaluation.hook import make_eval_hook

        hook = make_eval_hook(cfg)   # a missing weights file fails here, before a run or a step
    tracker: T.Tracker = T.NullTracker()
    run = None
    if args.tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(args.tracking_uri)
        mlflow.set_experiment(args.experiment or cfg.name)
        run = mlflow.start_run(run_name=cfg.name, tags={T.TAG_ROLE: "train", T.TAG_OUT_DIR: cfg.out_dir})
        tracker = T.MlflowTracker(run.info.run_id, args.tracking_uri)
    result = train(cfg, T.ConsoleTracker(tracker, every=args.print_every), hook)
    if run is not None:
        import mlflow

        mlflow.end_run()
    metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(result.metrics.items()))
    print(f"{result.status} at step {result.step}: {result.out_dir} (w={result.w:.3f}) {metrics}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mgbench", description="Model-guidance experiments: train, study, report.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) one run from a trainer config YAML")
    t.add_argument("config", help="trainer config YAML (see mgbench/configs/)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set objective.w=1.5 (repeatable)")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    t.add_argument("--tracking-uri", help="log to MLflow at this URI (e.g. sqlite:///mlflow.db)")
    t.add_argument("--experiment", help="MLflow experiment (default: the config's name)")
    t.add_argument("--no-eval", action="store_true", help="skip the evaluation hook")
    t.add_argument("--print-every", type=int, default=1, help="print every n-th logged window")
    t.set_defaults(func=cmd_train)

    from mgbench.analysis.cli import add_frontier_parser
    from mgbench.bench.cli import add_bench_parser
    from mgbench.evaluation.cli import add_eval_parser
    from mgbench.report.cli import add_report_parser
    from mgbench.study.cli import add_study_parser
    from mgbench.ui import add_dashboard_parser, add_ui_parser

    add_eval_parser(sub)
    add_study_parser(sub)
    add_report_parser(sub)
    add_frontier_parser(sub)
    add_ui_parser(sub)
    add_dashboard_parser(sub)
    add_bench_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    # Progress lines reach log files (SLURM's --output, `> train.log`) as they happen, not at exit.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"mgbench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
