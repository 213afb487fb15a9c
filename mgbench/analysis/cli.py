"""`mgbench frontier --study SPEC|NAME`: MG against CFG at matched diversity, into runs/<study>/report/frontier.* (or --out)."""
from __future__ import annotations

import argparse
import os

from mgbench.metric_registry import axis_metrics


def add_frontier_parser(subparsers: argparse._SubParsersAction, name: str = "frontier") -> argparse.ArgumentParser:
    """Add the `frontier` sub-command (sets `func`) to an argparse sub-command group."""
    p = subparsers.add_parser(name, help="effective CFG scale of MG models and the quality gap at matched diversity",
                              description=__doc__)
    p.add_argument("--study", required=True,
                   help="the study: its spec file (studies/X.yaml: name and tracking URI from the spec) or its name "
                        "(the MLflow experiment at --tracking-uri)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<study>/report; the committed ones: --out reports/...)")
    p.add_argument("--quality", choices=sorted(axis_metrics("quality")), default=None,
                   help="quality axis (default: off_support for grid2d, fid for images)")
    p.add_argument("--diversity", choices=sorted(axis_metrics("diversity")), default=None,
                   help="diversity axis (default: swd for grid2d, recall for images)")
    p.add_argument("--level", type=float, default=0.9, help="confidence level of the bootstrap CIs")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--history", action="store_true",
                   help="use every logged evaluation step (s* over training), not only the final one")
    p.set_defaults(func=run_frontier)
    return p


def run_frontier(args: argparse.Namespace) -> int:
    """Render the frontier report of one study and print the files written (a study without runs: one line, 2)."""
    from mgbench.config import ConfigError, print_error
    from mgbench.report.renderers import resolve_studies
    from mgbench.stores import require_runs

    try:
        sources = resolve_studies([args.study], args.tracking_uri)
        require_runs(sources, [args.study])   # before anything that would create a store or a folder
        (study, uri), = sources
        from mgbench.report.frontier import render_frontier

        paths = render_frontier(study, uri, args.out, args.quality, args.diversity,
                                level=args.level, n_boot=args.n_boot, history=args.history)
    except (ConfigError, LookupError, ValueError) as e:
        return print_error("mgbench frontier", e)
    for path in paths:
        print(path)
    return 0
