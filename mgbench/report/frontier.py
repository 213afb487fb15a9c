"""The frontier report (`mgbench report frontier`, `mgbench frontier`): tracked runs -> frontier points ->
`runs/<study>/report/frontier.{md,csv,png,pdf}` (and s* over steps).

Reads the tidy frame of `mgbench.report.load.load_runs` (one row per trial run, tracked names as
columns): vanilla trials give CFG points from the sweep metrics (`tracking.M_SWEEP`; plus their own
`eval/<metric>` at s = 0), MG trials give one point from `eval/<metric>`; `train.seed` is the seed,
`train.steps` the step. NFE per step = the logged `.../nfe` over `sample.steps` (else 2 for CFG,
1 for MG). `points_from_history` does the same at every step where evaluations were logged.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from mgbench import tracking as T
from mgbench.analysis.frontier import (
    POINT_COLUMNS,
    curve_summary,
    default_axes,
    frontier_table,
    higher_is_better,
)

P_W, P_SEED, P_STEPS, P_SAMPLE_STEPS = "objective.w", "train.seed", "train.steps", "sample.steps"
P_GUIDANCE, P_CFG, P_IMPLIED = "sample.guidance", "sample.cfg_scale", "objective.implied_cfg_scale"


def _num(value: Any, default: float = math.nan) -> float:
    """A finite float, or `default` for None / NaN / NA / text."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return default
    return v if math.isfinite(v) else default


def _truthy(value: Any) -> bool:
    return value is not None and value is not pd.NA and not (isinstance(value, float) and math.isnan(value)) \
        and bool(value)


def run_model(rec: dict[str, Any]) -> tuple[str, float, bool]:
    """(legend name, paper's w, is vanilla) of a trial run from its params."""
    w = _num(rec.get(P_W), 1.0)
    w_range = rec.get("objective.w_range")
    if _truthy(rec.get("objective.auto_w.enabled")):
        return "MG auto-w", w, False
    if isinstance(w_range, (list, tuple)) and len(w_range) == 2:
        return f"MG w~U[{w_range[0]:g}, {w_range[1]:g}]", (w_range[0] + w_range[1]) / 2, False
    return ("vanilla", 1.0, True) if w == 1.0 else (f"MG w={w:.2f}", w, False)


def implied_scale(rec: dict[str, Any], w: float) -> float:
    """The fixed-point CFG scale (f*g/(1-f*g); w-input models g): the trainer's logged param, else computed."""
    logged = _num(rec.get(P_IMPLIED))
    if not math.isnan(logged) or w == 1.0:
        return 0.0 if w == 1.0 else logged
    from mgbench.trainer.objective import implied_cfg_scale

    return implied_cfg_scale(w - 1, _num(rec.get("objective.mg_fraction"), 1.0),
                             _truthy(rec.get("model.w_input")))


def sweep_columns(columns: Any) -> dict[float, dict[str, str]]:
    """{scale: {metric: tracked column}} of the CFG-sweep metrics among `columns`."""
    from mgbench.report.load import sweep_pattern

    out: dict[float, dict[str, str]] = {}
    pattern = sweep_pattern()
    for col in columns:
        m = pattern.match(str(col))
        if m:
            out.setdefault(float(m["scale"]), {})[m["metric"]] = col
    return dict(sorted(out.items()))


def record_points(rec: dict[str, Any], quality: str, diversity: str, sweeps: dict[float, dict[str, str]],
                  step: Any = None) -> list[dict[str, Any]]:
    """The frontier points of one run (one tracked record of metric values)."""
    model, w, vanilla = run_model(rec)
    n_steps = _num(rec.get(P_SAMPLE_STEPS))
    base = {"model": model, "w": w, "seed": rec.get(P_SEED), "step": rec.get(P_STEPS) if step is None else step,
            "implied_scale": implied_scale(rec, w)}

    def point(method: str, scale: float, names: dict[str, str], nfe_default: float) -> dict[str, Any] | None:
        q, d = _num(rec.get(names.get(quality))), _num(rec.get(names.get(diversity)))
        if math.isnan(q) or math.isnan(d):
            return None
        nfe = _num(rec.get(names.get("nfe"))) / n_steps
        return {**base, "method": method, "scale": scale, "quality": q, "diversity": d,
                "nfe_per_step": nfe_default if math.isnan(nfe) else nfe}

    guidance = str(rec.get(P_GUIDANCE) or "auto")
    own = _num(rec.get(P_CFG), 0.0) if guidance in ("cfg", "mg+cfg") else 0.0
    evals = {m: T.metric_eval(m) for m in (quality, diversity, "nfe")}
    pts = [point("cfg" if vanilla else "mg+cfg", s, names, 2.0) for s, names in sweeps.items()]
    found = {p["scale"] for p in pts if p}
    if vanilla and own not in found:
        pts.append(point("cfg", own, evals, 1.0 if own == 0 else 2.0))
    elif not vanilla:
        pts.append(point("mg", own, evals, 1.0 if own == 0 else 2.0))
    return [p for p in pts if p]


def _finished(runs: pd.DataFrame) -> pd.DataFrame:
    if "status" in runs:
        runs = runs[runs["status"].isin(["finished"])]
    return runs


def points_from_runs(runs: pd.DataFrame, quality: str, diversity: str) -> pd.DataFrame:
    """Frontier points (POINT_COLUMNS) from the tidy frame of finished trial runs (final evaluations)."""
    sweeps = sweep_columns(runs.columns)
    rows = [p for rec in _finished(runs).to_dict("records") for p in record_points(rec, quality, diversity, sweeps)]
    return pd.DataFrame(rows, columns=POINT_COLUMNS)


def points_from_history(tracking_uri: str | None, runs: pd.DataFrame, quality: str, diversity: str) -> pd.DataFrame:
    """Frontier points at every step where a run logged its evaluations (MLflow metric histories)."""
    store = T.RunStore(tracking_uri)
    sweeps = sweep_columns(runs.columns)
    names = [T.metric_eval(m) for m in (quality, diversity, "nfe")]
    names += [c for cols in sweeps.values() for c in cols.values()]
    rows = []
    for rec in _finished(runs).to_dict("records"):
        by_step: dict[int, dict[str, float]] = {}
        for name in names:
            if name in rec and not math.isnan(_num(rec[name])):
                for step, value in store.history(rec["run_id"], name):
                    by_step.setdefault(step, {})[name] = value
        for step, values in sorted(by_step.items()):
            rows += record_points({**rec, **{n: math.nan for n in names}, **values}, quality, diversity, sweeps, step)
    return pd.DataFrame(rows, columns=POINT_COLUMNS)


# ----------------------------------------------------------------------------- table


def _fmt(x: Any, nd: int = 3) -> str:
    v = _num(x)
    if math.isnan(v):
        return "inf" if x == math.inf else "-inf" if x == -math.inf else "-"
    return f"{v:.{nd}f}"


def _ci(est: Any, lo: Any, hi: Any, nd: int = 3) -> str:
    if _fmt(lo) == "-" and _fmt(hi) == "-":
        return _fmt(est, nd)
    return f"{_fmt(est, nd)} [{_fmt(lo, nd)}, {_fmt(hi, nd)}]"


def to_markdown(table: pd.DataFrame, quality: str, diversity: str, level: float) -> str:
    """The frontier table as markdown: s* beside f*g/(1-f*g), the gap at matched diversity, NFE per step."""
    arrow = "lower" if not higher_is_better(quality) else "higher"
    pct = f"{level:.0%}"
    head = ["model", "step", "fixed-point s", f"s* [{pct} CI]", f"MG {diversity}", f"MG {quality}",
            f"CFG {quality} at MG {diversity}", f"gap MG-CFG [{pct} CI]", "better", "NFE/step MG vs CFG",
            "seeds MG/CFG", "note"]
    lines = [f"MG against CFG at matched {diversity} ({quality}: {arrow} is better; gap = MG - CFG).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.to_dict("records"):
        note = "; ".join(x for x in (r["reason"] if isinstance(r["reason"], str) else "",
                                     f"{int(r['n_cross'])} crossings" if _num(r["n_cross"], 0) > 1 else "") if x)
        cells = [r["model"], str(r["step"]), _fmt(r["implied_scale"], 2), _ci(r["s_star"], r["s_lo"], r["s_hi"], 2),
                 _fmt(r["mg_diversity"]), _fmt(r["mg_quality"], 4), _fmt(r["cfg_quality"], 4),
                 _ci(r["gap"], r["gap_lo"], r["gap_hi"], 4), r["better"] if isinstance(r["better"], str) else "",
                 f"{_fmt(r['nfe_mg'], 0)} vs {_fmt(r['nfe_cfg'], 0)}",
                 f"{_fmt(r['n_mg'], 0)}/{_fmt(r['n_cfg'], 0)}", note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- figures


def _nfe(x: float) -> str:
    return f"{x:g} NFE/step"


def frontier_figure(points: pd.DataFrame, quality: str, diversity: str, out_dir: str | Path,
                    stem: str = "frontier", step: Any = None) -> pd.DataFrame:
    """CFG curve (mean over seeds, band = +-1 SD of quality) with the MG points on it; returns the plotted data."""
    from mgbench.report.figures import _plt, save_figure

    if step is None:
        step = points["step"].max()
    pts = points[points["step"] == step]
    curve = curve_summary(pts)
    mg = pts[pts["method"] == "mg"].groupby("model", sort=True).agg(
        w=("w", "first"), quality=("quality", "mean"), quality_sd=("quality", "std"),
        diversity=("diversity", "mean"), diversity_sd=("diversity", "std"), n=("seed", "nunique"),
        nfe_per_step=("nfe_per_step", "median")).reset_index().sort_values(["w", "model"], ignore_index=True)
    mg = mg.fillna({"quality_sd": 0.0, "diversity_sd": 0.0})
    cfg_nfe = curve.loc[curve["scale"] > 0, "nfe_per_step"].median() if (curve["scale"] > 0).any() else 2.0
    curve["label"] = f"CFG, {_nfe(cfg_nfe)}"
    mg["label"] = [f"{m}, {_nfe(n)}" for m, n in zip(mg["model"], mg["nfe_per_step"])]
    plt, sns = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    order = curve.sort_values("diversity")
    ax.fill_between(order["diversity"], order["quality"] - order["quality_sd"],
                    order["quality"] + order["quality_sd"], color="0.6", alpha=0.3, linewidth=0)
    ax.plot(curve["diversity"], curve["quality"], "o-", color="0.25", label=curve["label"].iloc[0] if len(curve) else "CFG")
    for s, d, q in zip(curve["scale"], curve["diversity"], curve["quality"]):
        ax.annotate(f"s={s:g}", (d, q), textcoords="offset points", xytext=(4, 4), fontsize=7, color="0.3")
    colors = sns.color_palette("deep", max(len(mg), 1))
    for (_, r), c in zip(mg.iterrows(), colors):
        ax.errorbar(r["diversity"], r["quality"], xerr=r["diversity_sd"], yerr=r["quality_sd"], fmt="*",
                    markersize=11, color=c, label=r["label"], capsize=2)
    better = "lower" if not higher_is_better(quality) else "higher"
    spread = "lower: closer to the data" if not higher_is_better(diversity) else "higher is more diverse"
    ax.set(xlabel=f"{diversity} (diversity; {spread})", ylabel=f"{quality} (quality, {better} is better)",
           title=f"Guidance frontier at step {step}")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_figure(fig, out_dir, stem)
    curve.insert(0, "kind", "cfg")
    mg.insert(0, "kind", "mg")
    return pd.concat([curve.assign(model="vanilla", step=step), mg.assign(step=step)], ignore_index=True)


def steps_figure(table: pd.DataFrame, out_dir: str | Path, stem: str = "frontier_steps") -> pd.DataFrame:
    """s* (with its CI) against training steps per MG model, beside the fixed-point prediction (dashed)."""
    from mgbench.report.figures import _plt, save_figure

    data = table[["model", "w", "step", "s_star", "s_lo", "s_hi", "implied_scale"]].copy()
    data["step"] = pd.to_numeric(data["step"])
    plt, sns = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for (model, part), c in zip(data.groupby("model", sort=True), sns.color_palette("deep", data["model"].nunique())):
        part = part.sort_values("step")
        # Whiskers: the CI; an open bound (+-inf: out of the curve's range in some resamples) is drawn 10 long.
        lo = (part["s_star"] - part["s_lo"]).clip(lower=0, upper=10).fillna(0)
        hi = (part["s_hi"] - part["s_star"]).clip(lower=0, upper=10).fillna(0)
        ax.errorbar(part["step"], part["s_star"], yerr=[lo, hi], fmt="o-", color=c, capsize=2,
                    label=f"{model}: measured s*")
        ax.axhline(float(part["implied_scale"].iloc[0]), color=c, linestyle="--", linewidth=1,
                   label=f"{model}: fixed point f*g/(1-f*g)")
    ax.set(xlabel="training step", ylabel="effective CFG scale s*", title="Effective CFG scale over training")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out_dir, stem)
    return data


# ----------------------------------------------------------------------------- the whole report


def write_frontier(points: pd.DataFrame, out_dir: str | Path, quality: str, diversity: str, level: float = 0.9,
                   n_boot: int = 2000, seed: int = 0) -> list[Path]:
    """Table (markdown + CSV), points CSV and figures of the frontier under `out_dir`; returns the files."""
    if points.empty:
        raise ValueError(f"no frontier points with both {quality} and {diversity} among the finished trial runs")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = frontier_table(points, quality, level=level, n_boot=n_boot, seed=seed)
    paths = [out / "frontier.md", out / "frontier.csv", out / "frontier_points.csv"]
    paths[0].write_text(to_markdown(table, quality, diversity, level), encoding="utf-8")
    for data, path in ((table, paths[1]), (points, paths[2])):
        path.write_text(data.to_csv(index=False, float_format="%.6g", lineterminator="\n"), encoding="utf-8")
    if (points["method"] == "cfg").any():
        frontier_figure(points, quality, diversity, out)
        paths += [out / "frontier.png", out / "frontier.pdf"]
    if table["step"].nunique() > 1 and table["s_star"].notna().any():
        steps_figure(table, out)
        paths += [out / "frontier_steps.png", out / "frontier_steps.pdf"]
    return paths


def render_frontier(study: str, tracking_uri: str | None = None, out: str | Path | None = None,
                    quality: str | None = None, diversity: str | None = None, level: float = 0.9,
                    n_boot: int = 2000, history: bool = False, runs: pd.DataFrame | None = None) -> list[Path]:
    """Load a study's trial runs from MLflow and write `<out>/frontier.*` (default runs/<study>/report)."""
    if runs is None:
        from mgbench.report.load import load_runs

        runs = load_runs(tracking_uri, study)
    data = runs["data.name"].dropna() if "data.name" in runs else pd.Series(dtype=object)
    dq, dd = default_axes(str(data.iloc[0]) if len(data) else "grid2d")
    quality, diversity = quality or dq, diversity or dd
    points = points_from_history(tracking_uri, runs, quality, diversity) if history \
        else points_from_runs(runs, quality, diversity)
    return write_frontier(points, Path(out) if out else Path("runs") / study / "report", quality, diversity, level, n_boot)

