"""`mgbench report WHAT --study NAME`: render tables and figures of a study's tracked runs into runs/<study>/report/.

The committed reports/ change only when named (`--out reports/<study>`).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd

from mgbench.config import ConfigError

TABLES = [f"table{n}" for n in range(1, 9)]
FIGURES = ["fig2", "fig4", "fig5", "fig6"]
FIGURE_STEMS = {"fig2": "fig2_toy", "fig4": "fig4_cfg_scale", "fig5": "fig5_convergence", "fig6": "fig6_scaling"}
EXTRAS = ["toy", "frontier"]  # the 2D toy table (quickstart); MG against the CFG frontier (effective scale s*)
CLAIMS_OUT = "runs/claims"   # `report claims` without --out (the committed verdicts: --out reports)
CHOICES = [*TABLES, *FIGURES, *EXTRAS, "tables", "figures", "all", "claims"]  # claims: verdicts of --claims FILE


def add_report_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `report` sub-command to the `mgbench` parser."""
    p = subparsers.add_parser("report", help="render the paper's tables and figures from a study's MLflow runs",
                              description=__doc__)
    p.add_argument("what", choices=CHOICES, help="one table or figure, or tables | figures | all")
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
    p.set_defaults(func=run_report)
    return p


def default_out(study: str) -> Path:
    """Where a study's tables and figures go without --out: beside its runs, not the committed reports/."""
    return Path("runs") / study / "report"


def expand(what: str) -> list[str]:
    """`tables`, `figures` and `all` -> the single items they stand for."""
    return {"tables": TABLES, "figures": FIGURES, "all": TABLES + FIGURES}.get(what, [what])


def _write_csv(data: pd.DataFrame, path: Path) -> Path:
    path.write_text(data.to_csv(index=False, float_format="%.6g", lineterminator="\n"), encoding="utf-8")
    return path


Source = tuple[str, "str | None"]   # (study name, its MLflow tracking URI)


def resolve_studies(values: list[str], tracking_uri: str | None) -> list[Source]:
    """`--study` values -> (name, tracking URI): a spec file gives both; a bare name uses `tracking_uri`."""
    sources = []
    for value in values:
        if value.endswith((".yaml", ".yml")) or Path(value).is_file():
            from mgbench.study.spec import load_spec

            spec = load_spec(value)   # a bad spec is a one-line ConfigError naming file:field
            sources.append((spec.name, tracking_uri or spec.tracking_uri))
        elif tracking_uri:
            sources.append((value, tracking_uri))
        else:   # never fall back to MLflow's default store (it would create ./mlflow.db)
            raise ValueError(f"--study {value}: a study name needs --tracking-uri (or $MLFLOW_TRACKING_URI); "
                             "or pass the study's spec file, e.g. --study studies/quickstart.yaml")
    return sources


def load_sources(sources: list[Source]) -> tuple[pd.DataFrame, dict[str, str | None]]:
    """The trial runs of several studies as one frame, and each run's tracking URI (by run id)."""
    from mgbench.report.load import RUN_ID, load_runs

    frames, uris = [], {}
    for name, uri in sources:
        runs = load_runs(uri, name)
        uris.update({rid: uri for rid in runs[RUN_ID]})
        frames.append(runs)
    frames = [f for f in frames if not f.empty] or frames[:1]
    return (frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True, sort=False)), uris


def render(what: str, study: str | list[Source], tracking_uri: str | None = None,
           out: str | Path | None = None) -> list[Path]:
    """Render tables/figures of one study, or of several as one (a list of (name, tracking URI));
    returns the files written (same runs -> same bytes)."""
    from mgbench.report import figures
    from mgbench.report.render import write_table
    from mgbench.report.tables import build_table, prepare_runs

    sources = [(study, tracking_uri)] if isinstance(study, str) else list(study)
    if not sources:
        raise ValueError("no study given")
    study = sources[0][0] if len(sources) == 1 else " + ".join(name for name, _ in sources)
    several = len(sources) > 1
    if several and any(i in ("fig2", "toy", "frontier") for i in expand(what)):
        raise ValueError(f"{what}: the 2D-toy reports read one study; pass a single --study")
    out_dir = Path(out) if out else default_out(sources[0][0])
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, run_uris = load_sources(sources)
    tracking_uri = run_uris if several else sources[0][1]
    prepared = prepare_runs(runs) if any(i in TABLES for i in expand(what)) else None
    paths: list[Path] = []
    for item in expand(what):
        if item in TABLES:
            paths += write_table(build_table(prepared, int(item[5:]), study), out_dir)
        elif item == "fig2":
            paths.append(_write_csv(figures.fig2(runs, tracking_uri, out_dir), out_dir / "fig2_toy.csv"))
        elif item == "fig4":
            paths.append(_write_csv(figures.fig4(runs, out_dir), out_dir / "fig4_cfg_scale.csv"))
        elif item == "fig5":
            data, gains = figures.fig5(runs, tracking_uri, out_dir)
            paths += [_write_csv(data, out_dir / "fig5_convergence.csv"), _write_csv(gains, out_dir / "fig5_speedup.csv")]
        elif item == "fig6":
            paths.append(_write_csv(figures.fig6(runs, out_dir), out_dir / "fig6_scaling.csv"))
        if item in FIGURES:  # the figure files themselves, beside the data they plot
            stem = FIGURE_STEMS[item]
            paths += [out_dir / f"{stem}.{ext}" for ext in ("png", "pdf") if (out_dir / f"{stem}.{ext}").exists()]
        if item == "toy":
            from mgbench.report.toy import write_toy

            paths += write_toy(runs, study, out_dir)
        elif item == "frontier":
            from mgbench.analysis.frontier_report import render_frontier

            paths += render_frontier(study, tracking_uri, out_dir, runs=runs)
    return paths


def run_report(args: argparse.Namespace) -> int:
    """Entry point of `mgbench report`; prints the files written, returns the exit code."""
    try:
        if args.what == "claims":
            from mgbench.report.claims_table import write_claims

            paths = write_claims(args.claims, args.out or CLAIMS_OUT, args.tracking_uri, into=args.into)
            print("\n".join(map(str, paths)))
            return 0
        if not args.study:
            raise ValueError(f"{args.what}: needs --study (a spec file or a study name)")
        sources = resolve_studies(args.study, args.tracking_uri)
        from mgbench.stores import require_runs

        require_runs(sources, args.study)   # no runs: one line naming `mgbench study run SPEC`; creates no store or folder
        paths = render(args.what, sources, out=args.out)
    except (ConfigError, LookupError, ValueError) as e:
        from mgbench.cli import print_error

        return print_error("mgbench report", e)
    for path in paths:
        print(path)
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
