"""`mgbench study validate|run|status|resume|cancel FILE`: the command line of studies."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from mgbench.config import ConfigError


def add_study_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `study` with its sub-commands to an argparse subparsers object."""
    p = subparsers.add_parser("study", help="run Optuna studies from a YAML spec (submitit + MLflow)",
                              description="run Optuna studies from a YAML spec (submitit + MLflow)")
    sub = p.add_subparsers(dest="study_cmd", required=True, metavar="COMMAND")
    for name, text in (("validate", "check a spec and every trial config it resolves to"),
                       ("run", "run (or resume) a study to the end"),
                       ("status", "objective, best trial, each trial: state, progress, duration, job, MLflow run"),
                       ("resume", "reconcile a detached or killed study and finish it"),
                       ("cancel", "cancel running trials (scancel / kill their jobs); they end CANCELLED")):
        s = sub.add_parser(name, help=text, description=text)
        s.add_argument("spec", help="the study spec (studies/*.yaml)")
        s.add_argument("--out-dir", default=None, help="override the spec's out_dir")
        s.add_argument("--profile", default=None,
                       help="run on SLURM with this site profile (slurm/profiles/<name>.yaml or a file)")
        s.add_argument("--new-version", action="store_true",
                       help="a spec changed since the study first ran: use it as <name>-v2 in <out_dir>-v2 (the "
                            "first version not run with another spec, so the same command finds it again)")
        if name not in ("status", "cancel"):
            s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="override a base trainer config field, e.g. --set train.steps=100 (repeatable; "
                                "recorded in out_dir/set.yaml: a rerun without --set reuses it)")
        if name in ("run", "resume"):
            s.add_argument("--detach", action="store_true", help="submit what fits and return (resume later)")
            s.add_argument("--parallelism", type=int, default=None, help="override the spec's parallelism")
            s.add_argument("--retry-cancelled", action="store_true",
                           help="run cancelled trials again (each as a new trial with its params, resuming from "
                                "its latest checkpoint); without it a cancelled trial is never resubmitted")
            s.add_argument("--out", default=None, metavar="DIR",
                           help="where the spec's report items render (default: <out_dir>/report; name "
                                "reports/<study> to update the committed tables)")
        if name in ("run", "resume"):  # preflight (mgbench.study.preflight)
            s.add_argument("--min-free-gib", type=float, default=1.0, metavar="GIB",
                           help="refuse to start with less free disk than this under out_dir and local stores "
                                "(default 1 GiB)")
        if name == "cancel":
            s.add_argument("--trial", type=int, default=None, metavar="N", help="cancel only trial N")
        if name == "status":
            s.add_argument("--watch", nargs="?", type=float, const=10.0, default=None, metavar="SECONDS",
                           help="repeat every SECONDS (default 10) until the study has ended; Ctrl-C stops")
        if name == "run":
            s.add_argument("--dry-run", action="store_true",
                           help="print the resolved trials (and the sbatch script for SLURM); submit nothing")
            s.add_argument("--no-reuse", action="store_true",
                           help="train every trial, even one another study of the storage already trained (reuse: false)")
    p.set_defaults(func=run_study_cli)
    return p


def run_study_cli(args: argparse.Namespace) -> int:
    """Dispatch a parsed `study` command; a bad spec prints one line and returns 2."""
    from mgbench.cli import parse_set
    from mgbench.config import print_error
    from mgbench.study.overrides import resolve_sets
    from mgbench.study.spec import load_spec, spec_out_dir

    overrides: dict[str, Any] = {}
    if args.out_dir:
        overrides["out_dir"] = args.out_dir
    if getattr(args, "parallelism", None) is not None:  # --parallelism 0 is an error, not "unset"
        overrides["parallelism"] = args.parallelism
    if getattr(args, "no_reuse", False):
        overrides["reuse"] = False
    try:
        if args.profile:
            overrides["executor"] = _with_profile(args.spec, args.profile)
        sets = resolve_sets(parse_set(getattr(args, "set", [])), spec_out_dir(args.spec, overrides))
        spec = load_spec(args.spec, overrides, sets)
        if getattr(args, "new_version", False):
            from mgbench.study.versions import new_version

            versioned = new_version(spec, lambda extra: load_spec(args.spec, {**overrides, **extra}, sets))
            if versioned is not spec:
                print(f"the spec changed since study {spec.name} first ran: it runs as {versioned.name} "
                      f"in {versioned.out_dir}")
            spec = versioned
        return _COMMANDS[args.study_cmd](spec, args)
    except ConfigError as e:
        return print_error(f"mgbench study {args.study_cmd}", e)


def _with_profile(path: str, profile: str) -> dict[str, Any]:
    """The spec's executor section switched to SLURM with `profile` (its per-study overrides kept)."""
    from mgbench.config import load_yaml

    ex = load_yaml(path).get("executor") or {}
    ex = {"type": ex} if isinstance(ex, str) else dict(ex)
    if ex.get("type", "local") != "slurm":
        ex = {"type": "slurm"}  # local/debug options do not carry over to SLURM
    ex["profile"] = profile if Path(profile).is_absolute() or not Path(profile).exists() else str(Path(profile).resolve())
    return ex


def _validate(spec: Any, args: argparse.Namespace) -> int:
    from mgbench.study.executors import check_executor

    check_executor(spec)
    from mgbench.study.preflight import report_trial_problems  # start-up checks on every trial config (preflight)

    if report_trial_problems(spec, f"mgbench study {args.study_cmd}"):
        return 2
    print(f"{spec.path}: ok ({spec.sampler.type}, {spec.n_trials} trials, executor {spec.executor.type})")
    _print_sets(spec)
    return 0


def _print_sets(spec: Any) -> None:
    """One line naming the --set values applied to the base config (given, or recorded by an earlier run)."""
    if spec.sets:
        print("with --set " + " ".join(f"{k}={v}" for k, v in sorted(spec.sets.items())))


def _run(spec: Any, args: argparse.Namespace) -> int:
    from mgbench.redact import mask_uri
    from mgbench.study.runner import run_study
    from mgbench.study.status import dry_run

    if getattr(args, "dry_run", False):
        print(mask_uri(dry_run(spec)))  # URIs as user:***@host
        _print_sets(spec)
        return 0
    from mgbench.config import print_error
    from mgbench.study.executors import check_executor
    from mgbench.study.lifecycle import SubmitRefused
    from mgbench.study.latents import run_latents_job

    check_executor(spec)  # a bad executor option is a one-line error before any job (the latents job too)
    from mgbench.study.preflight import MIN_FREE_GIB, check_environment  # preflight: before anything is created

    check_environment(spec, getattr(args, "min_free_gib", MIN_FREE_GIB))
    run_latents_job(spec)  # imagefolder studies: cache the latents in one job before any trial
    try:
        s = run_study(spec, wait=not args.detach, echo=lambda line: print(mask_uri(line)),
                      retry_cancelled=args.retry_cancelled)
    except SubmitRefused as e:  # sbatch refused every submit: the trial is FAIL with its message
        return print_error(f"mgbench study {args.study_cmd}", mask_uri(str(e)))
    best = f", best {spec.optimize.metric}={s.best_value:.4g} at {s.best_params}" if s.best_value is not None else ""
    reused = f" ({s.n_reused} reused)" if s.n_reused else ""
    cancelled = f", {s.n_cancelled} cancelled" if s.n_cancelled else ""
    print(f"study {spec.name}: {s.n_complete} complete{reused}, {s.n_pruned} pruned, {s.n_failed} failed"
          f"{cancelled}, {s.n_running} running{best}")
    if spec.report and s.n_running == 0 and s.n_complete > 0:
        from mgbench.report.renderers import render

        out = Path(args.out) if args.out else Path(spec.out_dir) / "report"   # committed reports/ only when named
        for item in spec.report:
            for path in render(item, spec.name, spec.tracking_uri, out):
                print(f"report: {path}")
    print(f"MLflow runs: experiment '{spec.name}' in {mask_uri(spec.tracking_uri)} "
          f"(browse: mgbench ui --study {spec.path})")
    return 0 if s.n_failed == 0 else 1


def _status(spec: Any, args: argparse.Namespace) -> int:
    from mgbench.study.status import format_rows, status_header, status_rows

    while True:
        rows = status_rows(spec)
        if args.watch is not None and sys.stdout.isatty():
            print("\033[H\033[J", end="")   # a terminal: redraw in place, as `watch` does
        print("\n".join(status_header(spec, rows)))
        print(format_rows(rows))
        if args.watch is None or _ended(spec, rows):
            return 0
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0
        print()


def _ended(spec: Any, rows: list[dict[str, Any]]) -> bool:
    """Whether the study has nothing left to run: every trial asked and none running or waiting."""
    return len(rows) >= spec.n_trials and not any(r["state"] in ("RUNNING", "WAITING") for r in rows)


def _cancel(spec: Any, args: argparse.Namespace) -> int:
    from mgbench.redact import mask_uri
    from mgbench.study.outcomes import cancel_trials

    try:
        return cancel_trials(spec, args.trial, echo=lambda line: print(mask_uri(line)))
    except KeyError:  # optuna: no such study in the storage
        raise ConfigError(f"{spec.path}: study {spec.name} has not run yet: nothing to cancel") from None


_COMMANDS = {"validate": _validate, "run": _run, "resume": _run, "status": _status, "cancel": _cancel}


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m mgbench.study.cli study run FILE`); `mgbench study` is the same."""
    from mgbench.cli import Parser

    parser = Parser(prog="mgbench")
    add_study_parser(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
