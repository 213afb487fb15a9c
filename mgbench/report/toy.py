"""The 2D toy table (the quickstart's): vanilla, CFG at each swept scale, MG at each w, with NFE per step.

Rows come from each finished grid2d trial's final evaluation (`eval/<metric>`) and from its
evaluations at other CFG scales (`sweep/cfg_scale_<s>/<metric>`: CFG on a vanilla model, CFG on
top of MG for an MG model). Seeds of one method are averaged (mean +- std); failed trials are
listed as failed, never dropped.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mgbench import tracking as T
from mgbench.report import load as L

# (metric, header, better): the grid2d metrics of mgbench.evaluation.grid2d.
METRICS = [("in_class", "in-class", "max"), ("off_support", "off-support", "min"), ("coverage", "coverage", "max"),
           ("swd", "SWD", "min"), ("center_dist", "dist. to centre", "min")]
IMPLIED = "objective.implied_cfg_scale"


def _w_label(r: dict) -> str:
    if r.get(L.P_AUTO_W):
        return "MG AUTO"
    if r.get(L.P_W_RANGE):
        lo, hi = r[L.P_W_RANGE]
        return f"MG w~U[{lo:.2f}, {hi:.2f}]"
    return f"MG w={float(r[L.P_W]):.2f}"


def toy_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """One tidy row per (method, run): method, order key, NFE per step, implied s, the grid2d metrics."""
    if L.P_DATA not in runs:
        return pd.DataFrame()
    runs = runs[runs[L.P_DATA] == "grid2d"]
    pattern = L.sweep_pattern()
    sweeps = sorted({float(m["scale"]) for c in runs.columns if (m := pattern.match(c))})
    out = []
    for r in runs.astype(object).where(runs.notna(), None).to_dict("records"):
        steps = float(r.get("sample.steps") or 1)
        mg = r[L.VARIANT] == "mg"
        base = _w_label(r) if mg else "vanilla (conditional)"
        w_key = float(r.get(L.P_W) or 1.0) + (10.0 if r.get(L.P_AUTO_W) else 0.0)
        failed = r[L.STATUS] != "finished"
        entries = [(base, (1 if mg else 0, w_key, 0.0), "eval/{}", r.get(T.M_NFE))]
        for s in sweeps:
            label = f"{base} + CFG s={s:.2f}" if mg else f"CFG s={s:.2f}"
            nfe = r.get(T.metric_sweep(s, "nfe"))
            entries.append((label, (2 if mg else 0, w_key, s), T.M_SWEEP.replace("{scale:.2f}", f"{s:.2f}")
                            .replace("{metric}", "{}"), nfe))
        for label, order, fmt, nfe in entries:
            row = {"method": label, "order": order, "status": r[L.STATUS], "run_id": r[L.RUN_ID],
                   "nfe_per_step": (float(nfe) / steps) if nfe is not None and not failed else np.nan,
                   "implied_s": r.get(IMPLIED) if mg and "CFG" not in label else np.nan}
            for m, _, _ in METRICS:
                v = r.get(fmt.format(m))
                row[m] = float(v) if v is not None and not failed else np.nan
            out.append(row)
    return pd.DataFrame(out)


def toy_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Methods in order (vanilla, CFG scales, MG w, MG + CFG) with mean and std over seeds."""
    rows = toy_rows(runs)
    if rows.empty:
        return rows
    agg = []
    for method, g in rows.groupby("method", sort=False):
        ok = g[g["status"] == "finished"]
        item = {"method": method, "order": g["order"].iloc[0], "runs": len(g), "finished": len(ok),
                "nfe_per_step": ok["nfe_per_step"].mean(), "implied_s": ok["implied_s"].mean()}
        for m, _, _ in METRICS:
            item[m] = ok[m].mean()
            item[f"{m}_std"] = ok[m].std(ddof=1) if len(ok) > 1 else np.nan
        agg.append(item)
    table = pd.DataFrame(agg).sort_values("order", kind="stable").drop(columns="order").reset_index(drop=True)
    for m, _, better in METRICS:
        col = table[m]
        best = col.min() if better == "min" else col.max()
        table[f"{m}_best"] = col.notna() & np.isclose(col, best)
    return table


def _cell(row: dict, m: str) -> str:
    v = row[m]
    if pd.isna(v):
        return "failed" if row["finished"] == 0 else "-"
    text = f"{v:.3f}" + (f" ± {row[f'{m}_std']:.3f}" if not pd.isna(row[f"{m}_std"]) else "")
    return f"**{text}**" if row[f"{m}_best"] else text


def to_markdown(table: pd.DataFrame, study: str, scale: str) -> str:
    head = ["Method", "NFE/step", "implied s", *[h for _, h, _ in METRICS], "Runs"]
    lines = [f"# {study}: the 2D toy ({scale})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table.to_dict("records"):
        nfe = "-" if pd.isna(row["nfe_per_step"]) else f"{row['nfe_per_step']:.0f}"
        imp = "-" if pd.isna(row["implied_s"]) else f"{row['implied_s']:.2f}"
        runs = f"{row['finished']}/{row['runs']}" + (" (failed)" if row["finished"] < row["runs"] else "")
        lines.append("| " + " | ".join([row["method"], nfe, imp, *[_cell(row, m) for m, _, _ in METRICS], runs]) + " |")
    lines += ["", "in-class: share of samples on a square of their class; off-support = 1 - in-class; coverage: share "
              "of each class's squares with enough samples; SWD: sliced Wasserstein distance to true samples. "
              "Best per column in bold; mean ± std over seeds. implied s: the CFG scale an MG model trains towards "
              "(f*g / (1 - f*g)); CFG s: pred = cond + s (cond - uncond).", ""]
    return "\n".join(lines)


def write_toy(runs: pd.DataFrame, study: str, out_dir: str | Path) -> list[Path]:
    """Write toy.md and toy.csv; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = toy_table(runs)
    scales = sorted(set(runs.get(T.TAG_SCALE, pd.Series(dtype=object)).dropna()))
    md = out / "toy.md"
    md.write_text(to_markdown(table, study, ", ".join(scales) or "grid2d"), encoding="utf-8")
    csv = out / "toy.csv"
    csv.write_text(table.to_csv(index=False, float_format="%.6g", lineterminator="\n"), encoding="utf-8")
    return [md, csv]
