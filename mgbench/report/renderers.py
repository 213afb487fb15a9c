"""Rendering report items from tracked runs: which study runs to read, and one writer per table or figure.

`render(what, sources)` is the library entry (`mgbench report` and `study run`'s `report:` list call it);
`WRITERS` maps each figure and extra item to the function that writes it, tables go through `report.render`.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mgbench.report.items import FIGURE_STEMS, FIGURES, TABLES, default_out, expand
from mgbench.stores import Source

if TYPE_CHECKING:   # pandas only where tables are built
    import pandas as pd


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
        else:
            paths += WRITERS[item](runs, study, tracking_uri, out_dir)
        if item in FIGURES:  # the figure files themselves, beside the data they plot
            stem = FIGURE_STEMS[item]
            paths += [out_dir / f"{stem}.{ext}" for ext in ("png", "pdf") if (out_dir / f"{stem}.{ext}").exists()]
    return paths


# ----------------------------------------------------------------------------- one writer per figure and extra item
# Each takes (runs, study name, tracking URI or {run id: URI}, out folder) and returns the files it wrote.


def _fig2(runs, study, tracking_uri, out_dir: Path) -> list[Path]:
    from mgbench.report import figures

    return [_write_csv(figures.fig2(runs, tracking_uri, out_dir), out_dir / "fig2_toy.csv")]


def _fig4(runs, study, tracking_uri, out_dir: Path) -> list[Path]:
    from mgbench.report import figures

    return [_write_csv(figures.fig4(runs, out_dir), out_dir / "fig4_cfg_scale.csv")]


def _fig5(runs, study, tracking_uri, out_dir: Path) -> list[Path]:
    from mgbench.report import figures

    data, gains = figures.fig5(runs, tracking_uri, out_dir)
    return [_write_csv(data, out_dir / "fig5_convergence.csv"), _write_csv(gains, out_dir / "fig5_speedup.csv")]


def _fig6(runs, study, tracking_uri, out_dir: Path) -> list[Path]:
    from mgbench.report import figures

    return [_write_csv(figures.fig6(runs, out_dir), out_dir / "fig6_scaling.csv")]


def _toy(runs, study, tracking_uri, out_dir: Path) -> list[Path]:
    from mgbench.report.toy import write_toy

    return write_toy(runs, study, out_dir)


def _frontier(runs, study, tracking_uri, out_dir: Path) -> list[Path]:
    from mgbench.report.frontier import render_frontier

    return render_frontier(study, tracking_uri, out_dir, runs=runs)


WRITERS = {"fig2": _fig2, "fig4": _fig4, "fig5": _fig5, "fig6": _fig6, "toy": _toy, "frontier": _frontier}
