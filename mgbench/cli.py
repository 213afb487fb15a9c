"""The `mgbench` command: train, eval, study, report, frontier, ui, dashboard, bench.

Only the chosen command's module is imported (torch, pandas and MLflow load where a command needs them),
so `mgbench --help`, `mgbench CMD --help` and one-line config errors return at once. Every error reads
`mgbench CMD: error: ...` (argparse's own form, used for usage errors too; `mgbench: error:` before a
command is known) and exits with status 2.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import re
import sys
from typing import Any, Iterable

import yaml

from mgbench import __version__
from mgbench.config import ConfigError, print_error  # noqa: F401  (print_error: re-exported for the sub-commands)

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # exponent forms PyYAML (YAML 1.1) reads as text

# name -> (module, parser factory, the line `mgbench --help` shows)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("mgbench.cli", "add_train_parser", "train (or resume) one run from a trainer config YAML"),
    "eval": ("mgbench.evaluation.cli", "add_eval_parser",
             "evaluate a run folder or checkpoint (FID, IS, ... / grid2d metrics)"),
    "study": ("mgbench.study.cli", "add_study_parser", "run Optuna studies from a YAML spec (submitit + MLflow)"),
    "report": ("mgbench.report.cli", "add_report_parser",
               "render the paper's tables and figures from a study's MLflow runs"),
    "frontier": ("mgbench.analysis.cli", "add_frontier_parser",
                 "effective CFG scale of MG models and the quality gap at matched diversity"),
    "ui": ("mgbench.ui", "add_ui_parser", "serve the MLflow UI and tracking API for a study's runs"),
    "dashboard": ("mgbench.ui", "add_dashboard_parser", "serve optuna-dashboard for a study (needs optuna-dashboard)"),
    "bench": ("mgbench.bench.cli", "add_bench_parser",
              "measure MG vs CFG sampling, MG training cost and harness overhead"),
}


class Parser(argparse.ArgumentParser):
    """argparse that suggests the closest choice for a mistyped command or value ("did you mean ...")."""

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as e:
            raise argparse.ArgumentError(action, e.message + did_you_mean(str(value), action.choices or [])) from None


def did_you_mean(word: str, options: Iterable[Any]) -> str:
    """` (did you mean 'x'?)` for the option closest to `word`, or '' when none is close."""
    close = difflib.get_close_matches(word, [str(o) for o in options], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_set(items: list[str]) -> dict[str, Any]:
    """`--set objective.w=1.5` pairs -> {dotted key: YAML-parsed value} (`1e-3` is a number, as in YAML 1.2)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected KEY=VALUE (e.g. objective.w=1.5)")
        key, value = item.split("=", 1)
        out[key.strip()] = float(value) if _NUMBER.fullmatch(value.strip()) else yaml.safe_load(value)
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
    store, run_id = None, None
    if args.tracking_uri:
        store = T.RunStore(args.tracking_uri)
        run_id = store.start_run(store.experiment(args.experiment or cfg.name), cfg.name,
                                 {T.TAG_ROLE: "train", T.TAG_OUT_DIR: cfg.out_dir})
        tracker = T.MlflowTracker(run_id, args.tracking_uri)
    from mgbench.trainer.progress import ConsoleProgress

    print(f"train {cfg.name}: {cfg.train.steps} steps, out_dir {cfg.out_dir}", flush=True)
    display = ConsoleProgress(every=args.print_every)   # a tqdm bar on a terminal, plain lines in a log
    try:
        result = train(cfg, tracker, hook, progress=display)
    except OSError as e:  # a full disk, a file-size limit, an unwritable folder: one line, exit 1 (rerun resumes)
        display.close()
        print_error(args._parser.prog, e)
        if store is not None:
            store.end(run_id, "FAILED")
        return 1
    except BaseException as e:  # a diverged run, Ctrl-C: the run ends FAILED or KILLED, not left RUNNING
        if store is not None:
            store.end(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        display.close()
    if store is not None:
        store.end(run_id)
    metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(result.metrics.items()))
    print(f"{result.status} at step {result.step}: {result.out_dir} (w={result.w:.3f}) {metrics}")
    return 0


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `train` sub-command to an argparse subparsers object."""
    t = subparsers.add_parser("train", help=COMMANDS["train"][2], description=COMMANDS["train"][2])
    t.add_argument("config", help="trainer config YAML (e.g. studies/base/grid2d.yaml; see studies/base/)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set objective.w=1.5 (repeatable)")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    t.add_argument("--tracking-uri", help="log to MLflow at this URI (e.g. sqlite:///mlflow.db)")
    t.add_argument("--experiment", help="MLflow experiment (default: the config's name)")
    t.add_argument("--no-eval", action="store_true", help="skip the evaluation hook")
    t.add_argument("--print-every", type=int, default=1,
                   help="without a terminal: print a progress line every n-th logged window (train.log_every)")
    t.set_defaults(func=cmd_train)
    return t


def build_parser(only: str | None = None) -> Parser:
    """The `mgbench` parser: every command in full (only=None), or `only` in full and the others as names."""
    p = Parser(prog="mgbench", description="Model-guidance experiments: train, study, report.")
    p.add_argument("--version", action="version", version=f"mgbench {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, factory, text) in COMMANDS.items():
        if only is None or name == only:
            getattr(importlib.import_module(module), factory)(sub)
        else:
            sub.add_parser(name, help=text)   # listed by --help; its module is not imported
    _remember_parsers(p)
    return p


def _remember_parsers(parser: argparse.ArgumentParser) -> None:
    """Each (sub-)parser records itself as `_parser`, so errors after parsing name the deepest command."""
    parser.set_defaults(_parser=parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _remember_parsers(child)


def _command_in(argv: list[str]) -> str:
    """The command named in argv (the first word that is not an option), or ''."""
    return next((a for a in argv if not a.startswith("-")), "")


def _unknown_options(parser: argparse.ArgumentParser, extras: list[str]) -> None:
    """Fail with the sub-command's own usage, suggesting the closest option to the first unknown one."""
    options = [s for action in parser._actions for s in action.option_strings]
    hint = did_you_mean(extras[0].split("=", 1)[0], options) if extras[0].startswith("-") else ""
    parser.error(f"unrecognized arguments: {' '.join(extras)}{hint}")


def main(argv: list[str] | None = None) -> int:
    # Progress lines reach log files (SLURM's --output, `> train.log`) as they happen, not at exit.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extras = build_parser(_command_in(argv)).parse_known_args(argv)
    if extras:
        _unknown_options(args._parser, extras)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        return print_error(args._parser.prog, e)


if __name__ == "__main__":
    sys.exit(main())
