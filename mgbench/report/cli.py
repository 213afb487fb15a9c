"""`mgbench report WHAT --study NAME`: render tables and figures of a study's tracked runs into runs/<study>/report/.

The committed reports/ change only when named (`--out reports/<study>`).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from typing import TYPE_CHECKING

from mgbench.config import ConfigError

if TYPE_CHECKING:   # pandas only where tables are built: `mgbench report --help` stays fast
    import pandas as pd

TABLES = [f"table{n}" for n in range(1, 9)]
FIGURES = ["fig2", "fig4", "fig5", "fig6"]
FIGURE_STEMS = {"fig2": "fig2_toy", "fig4": "fig4_cfg_scale", "fig5": "fig5_convergence", "fig6": "fig6_scaling"}
EXTRAS = ["toy", "frontier"]  # the 2D toy table (quickstart); MG against the CFG frontier (effective scale s*)
CLAIMS_OUT = "runs/claims"   # `report claims` without --out (the committed verdicts: --out reports)
ALL = [*TABLES, *FIGURES, "toy"]   # `all`: of these, what the study's runs can fill (the rest: one line each, why)
CHOICES = [*TABLES, *FIGURES, *EXTRAS, "tables", "figures", "all", "claims", "system"]  # claims: verdicts of --claims
# FILE; system: best MG vs best CFG at equal NFE, re-evaluating a table3-style study's checkpoints (report/system.py)


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
    from mgbench.report.system import add_arguments as add_system_arguments

    add_system_arguments(p)   # system: --runs-dir, --n, --sample-seeds
    p.set_defaults(func=run_report)
    return p


def default_out(study: str) -> Path:
    """Where a study's tables and figures go without --out: beside its runs, not the committed reports/."""
    return Path("runs") / study / "report"


def expand(what: str) -> list[str]:
    """`tables`, `figures` and `all` -> the single items they stand for."""
    return {"tables": TABLES, "figures": FIGURES, "all": ALL}.get(what, [what])


def _data_names(runs: pd.DataFrame) -> str:
    from mgbench.report.load import P_DATA

    names = sorted(str(d) for d in runs[P_DATA].dropna().unique()) if P_DATA in runs else []
    return ", ".join(names) or "none"


def table_gap(table, runs: pd.DataFrame) -> str:
    """Why a built table has no measured value ("" when it has one)."""
    from mgbench.report.specs import METRICS

    measured = table.rows[table.rows["source"] == "measured"]
    if measured[list(table.spec.metrics)].notna().to_numpy().any():
        return ""
    headers = ", ".join(h for m, h, *_ in METRICS if m in table.spec.metrics)
    return (f"Table {table.spec.number} ({table.spec.title}) reads {headers}; no run of this study has them "
            f"(its runs' data: {_data_names(runs)})")


def _curves(fig4: pd.DataFrame) -> bool:
    """Whether some training has a metric at two or more CFG scales (a curve, not a point)."""
    keys = ["model", "scale", "training", "metric"]
    return not fig4.empty and bool((fig4.groupby(keys)["cfg_scale"].nunique() >= 2).any())


def figure_gap(item: str, runs: pd.DataFrame) -> str:
    """Why the runs cannot fill a figure or the toy table ("" when they can)."""
    from mgbench import tracking as T
    from mgbench.report import figures
    from mgbench.report import load as L

    done = runs[runs[L.STATUS] == "finished"] if L.STATUS in runs else runs.iloc[:0]
    has_fid = figures.FID in done and done[figures.FID].notna().any()
    if item == "fig2" and figures.one_run_per_method(runs).empty:
        return "Fig. 2 plots the 2D toy's samples; no finished grid2d run"
    if item == "fig4" and not _curves(figures.fig4_data(runs)):
        return ("Fig. 4 plots FID and IS against the CFG scale; no run has them at more than one scale "
                "(eval.cfg_sweep on an image study)")
    if item in ("fig5", "fig6") and not has_fid:
        what = "against training steps" if item == "fig5" else "against model size and sampling compute"
        return f"Fig. {item[3]} plots FID {what}; no finished run has FID (its runs' data: {_data_names(runs)})"
    if item == "fig6" and figures.fig6_data(runs)[["n_params", "sampling_gflops"]].isna().all().all():
        return f"Fig. 6 plots FID against model size and sampling compute; no run with FID has its size ({T.M_PARAMS})"
    if item == "toy" and (L.P_DATA not in runs or not (runs[L.P_DATA] == "grid2d").any()):
        return "the toy table reads the 2D checkerboard's metrics; no grid2d run"
    return ""


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
    import pandas as pd

    return (frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True, sort=False)), uris


def render(what: str, study: str | list[Source], tracking_uri: str | None = None,
           out: str | Path | None = None, skipped: list[tuple[str, str]] | None = None) -> list[Path]:
    """Render tables/figures of one study, or of several as one (a list of (name, tracking URI));
    returns the files written (same runs -> same bytes). `all` renders only what the runs can fill and
    appends (item, why) to `skipped` for the rest."""
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
    only_filled, skipped = what == "all", skipped if skipped is not None else []
    for item in expand(what):
        table = build_table(prepared, int(item[5:]), study) if item in TABLES else None
        gap = only_filled and (table_gap(table, runs) if table is not None else figure_gap(item, runs))
        if gap:
            skipped.append((item, gap))
            continue
        if table is not None:
            paths += write_table(table, out_dir)
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
        from mgbench.cli import print_error

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
