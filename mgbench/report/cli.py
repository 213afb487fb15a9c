"""`mgbench report WHAT --study NAME`: render tables and figures of a study's tracked runs into runs/<study>/report/.

The argument parser and its entry point only; the rendering is `mgbench.report.renderers`.

The committed reports/ change only when named (`--out reports/<study>`).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mgbench.config import ConfigError
from mgbench.report.items import CHOICES, CLAIMS_OUT, default_out
from mgbench.report.renderers import render, resolve_studies


def add_report_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `report` sub-command to the `mgbench` parser."""
    p = subparsers.add_parser("report", help="render the paper's tables and figures from a study's MLflow runs",
                              description=__doc__)
    p.add_argument("what", choices=CHOICES, help="one table or figure, or tables | figures | all (all: what the "
                                                 "study's runs can fill, Tables 1-8, Figs. 2-6 and the toy table; "
                                                 "prints what it skipped and why)")
    p.add_argument("--study", action="append",   # required, except for `claims` (its file names its studies)
                   help="a study: its spec file (studies/X.yaml: name and tracking URI from the spec) or its name "
                        "(the MLflow experiment at --tracking-uri); repeat to render several studies as one "
                        "(e.g. Table 3's w rows and its AUTO row)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<study>/report; claims: runs/claims; "
                                               "name reports/... to update the committed ones)")
    p.add_argument("--into", default=None, metavar="FILE",
                   help="claims: also put the table into FILE between its '<!-- mgbench report claims: begin/end -->' "
                        "lines (e.g. reports/README.md)")
    p.add_argument("--claims", default="reports/claims.yaml",
                   help="claims: the file of declared comparisons (default: reports/claims.yaml)")
    p.add_argument("--only", nargs="+", metavar="ID", default=None,
                   help="claims: re-evaluate only the claims with these ids (shell-style patterns, e.g. "
                        "'*table7*') and keep every other row as --out's claims.md and claims.csv have it")
    from mgbench.report.system import add_arguments as add_system_arguments

    add_system_arguments(p)   # system: --runs-dir, --n, --sample-seeds
    p.set_defaults(func=run_report)
    return p


def run_report(args: argparse.Namespace) -> int:
    """Entry point of `mgbench report`; prints the files written, returns the exit code."""
    try:
        if args.what == "claims":
            from mgbench.report.claims_table import write_claims

            paths = write_claims(args.claims, args.out or CLAIMS_OUT, args.tracking_uri, into=args.into,
                                 only=args.only)
            print("\n".join(map(str, paths)))
            return 0
        if args.what == "system":
            return _system(args)
        if not args.study:
            raise ValueError(f"{args.what}: needs --study (a spec file or a study name)")
        sources = resolve_studies(args.study, args.tracking_uri)
        from mgbench.stores import require_runs

        require_runs(sources, args.study)   # no runs: one line naming `mgbench study run SPEC`; creates no store or folder
        skipped: list[tuple[str, str]] = []
        paths = render(args.what, sources, out=args.out, skipped=skipped)
    except (ConfigError, LookupError, ValueError) as e:
        from mgbench.config import print_error

        return print_error("mgbench report", e)
    for path in paths:
        print(path)
    for item, why in skipped:
        print(f"skipped {item}: {why}")
    return 0


def _system(args: argparse.Namespace) -> int:
    """`report system --study SPEC`: evaluate what is not cached, write system_<dit|sit>.md/.csv, print them."""
    from mgbench.report.system import build

    if not args.study or len(args.study) != 1 or not str(args.study[0]).endswith((".yaml", ".yml")):
        raise ValueError("system: needs one --study spec file (a table3-style study: MG w grid + vanilla CFG sweep)")
    spec = args.study[0]
    out = Path(args.out) if args.out else default_out(Path(spec).stem)
    try:
        md = build(spec, out, Path(args.runs_dir) if args.runs_dir else None, args.n, args.sample_seeds)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    print("\n".join(str(md.with_name(md.stem + ext)) for ext in (".md", ".csv", "_runs.csv")))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run `report` alone (`python -m mgbench.report.cli table3 --study NAME`)."""
    parser = argparse.ArgumentParser(prog="mgbench")
    sub = parser.add_subparsers(dest="command", required=True)
    add_report_parser(sub)
    args = parser.parse_args(["report", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
