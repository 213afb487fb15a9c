"""The 2D toy table (the quickstart's): vanilla, CFG at each swept scale, MG at each w, MG + CFG, with NFE per step.

Rows come from each grid2d trial's final evaluation (`eval/<metric>`) and from its evaluations at other CFG
scales (`sweep/cfg_scale_<s>/<metric>`: CFG on a vanilla model, CFG on top of MG for an MG model). A row's
value is the mean over its finished runs of each run's mean over its sample seeds, with the standard error
of report.stats (report.values.measure, as in Tables 1-8). Beside each fixed-w MG row stands the vanilla
model sampled with CFG at the scale that MG trains towards (report.matched.implied_scale), where swept.
A metric a run never tracked (runs from before it existed) is absent: a dash, never an error.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from mgbench import tracking as T
from mgbench.metric_registry import METRICS as REGISTRY, arrow, family_metrics, higher_is_better
from mgbench.report import load as L
from mgbench.report.matched import fixed_w, implied_scale
from mgbench.report.render import DASH, ONE_RUN, PM, decimals
from mgbench.report.values import measure

# The grid2d metrics of mgbench.evaluation.grid2d, in registry order; off_support (= wrong-class + off-board)
# is shown split into its two parts.
METRICS = [m for m in family_metrics("grid2d") if m != "off_support"]
IMPLIED = "objective.implied_cfg_scale"
NOMINAL, MATCHED = "nominal", "matched"      # row kinds: a method as sampled, or a copy placed beside MG
VANILLA = "vanilla (conditional)"


def w_label(r: dict) -> str:
    """`MG w=1.50`, `MG w~U[1.00, 2.00]` or `MG AUTO`: how an MG run's training is named in the table."""
    if r.get(L.P_AUTO_W):
        return "MG AUTO"
    if r.get(L.P_W_RANGE):
        lo, hi = r[L.P_W_RANGE]
        return f"MG w~U[{lo:.2f}, {hi:.2f}]"
    return f"MG w={float(r[L.P_W]):.2f}"


def _entries(r: dict, sweeps: list[float]) -> list[tuple[str, tuple, str]]:
    """(method, order key, tracked-name format) of a run's own evaluation (always: a failed run shows there)
    and of each CFG-sweep point the run has a value for."""
    mg = r[L.VARIANT] == "mg"
    base = w_label(r) if mg else VANILLA
    w_key = float(r.get(L.P_W) or 1.0) + (10.0 if r.get(L.P_AUTO_W) else 0.0)
    out = [(base, (1 if mg else 0, w_key, 0.0), T.M_EVAL)]
    for s in sweeps:
        fmt = T.metric_sweep(s, "{}")
        if any(r.get(fmt.format(m)) is not None for m in METRICS):
            out.append((f"{base} + CFG s={s:.2f}" if mg else f"CFG s={s:.2f}", (2 if mg else 0, w_key, s), fmt))
    return out


def _grid_runs(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs[L.P_DATA] == "grid2d"] if L.P_DATA in runs else runs.iloc[:0]


def _method_row(label: str, order: tuple, fmt: str, group: pd.DataFrame) -> dict:
    """One method's numbers over its runs: metrics (mean, SE, n), seeds, NFE per step and implied s."""
    metrics = [m for m in METRICS if fmt.format(m) in group]
    row, _ = measure(group, {m: fmt.format(m) for m in metrics}, {"method": label, "kind": NOMINAL}, metrics)
    row["order"] = order
    done = group[group[L.STATUS] == "finished"]
    nfe = fmt.format("nfe")
    steps = done["sample.steps"].astype(float) if "sample.steps" in done else pd.Series(1.0, index=done.index)
    row["nfe_per_step"] = float((done[nfe] / steps).mean()) if nfe in done and len(done) else math.nan
    own_mg = order[0] == 1 and IMPLIED in done
    row["implied_s"] = float(pd.to_numeric(done[IMPLIED], errors="coerce").mean()) if own_mg and len(done) else math.nan
    return row


def _matched_scale(group: pd.DataFrame) -> tuple[float, float] | None:
    """(w, s): a fixed-w MG row's w and the CFG scale it trains towards (w-input models: s = w - 1)."""
    fixed = fixed_w(group)
    if fixed is None:
        return None
    w_input = bool(group[L.P_W_INPUT].astype(object).fillna(False).any()) if L.P_W_INPUT in group else False
    s = implied_scale(fixed[0] - 1, fixed[1], w_input=w_input)
    return (fixed[0], s) if math.isfinite(s) else None


def _with_matched(rows: list[dict], groups: dict[str, pd.DataFrame]) -> tuple[list[dict], list[str]]:
    """Each fixed-w MG row followed by a copy of `CFG s=<its implied s>`; notes for scales not swept."""
    by_method = {r["method"]: r for r in rows}
    out, notes = [], []
    for r in rows:
        out.append(r)
        match = _matched_scale(groups[r["method"]]) if r["order"][0] == 1 and r["n_finished"] else None
        if match is None:
            continue
        w, s = match
        cfg = by_method.get(f"CFG s={s:.2f}")
        if cfg is None:
            notes.append(f"{r['method']} trains towards CFG s={s:.2f}, which the study did not sweep "
                         f"(add {s:.2f} to eval.cfg_sweep to place it beside).")
            continue
        out.append({**cfg, "method": f"CFG s={s:.2f} (matched to MG w={w:.2f})", "kind": MATCHED})
    return out, notes


def toy_table(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Methods in order (vanilla, CFG scales, MG w each beside its matched CFG, MG + CFG), best flags, and
    notes on matched scales that were not swept."""
    runs = _grid_runs(runs)
    if runs.empty:
        return pd.DataFrame(), []
    pattern = L.sweep_pattern()
    sweeps = sorted({float(m["scale"]) for c in runs.columns if (m := pattern.match(c))})
    records = runs.astype(object).where(runs.notna(), None).to_dict("records")
    members: dict[str, tuple[tuple, str, list]] = {}
    for index, r in zip(runs.index, records):
        for label, order, fmt in _entries(r, sweeps):
            members.setdefault(label, (order, fmt, []))[2].append(index)
    groups = {label: runs.loc[idx] for label, (_, _, idx) in members.items()}
    rows = sorted((_method_row(label, order, fmt, groups[label]) for label, (order, fmt, _) in members.items()),
                  key=lambda r: r["order"])
    rows, notes = _with_matched(rows, groups)
    table = pd.DataFrame(rows).drop(columns="order")
    for m in METRICS:       # a metric no run of a row tracked: nan (shown as a dash)
        for col in (m, f"{m}_se"):
            table[col] = pd.to_numeric(table[col], errors="coerce").astype(float) if col in table else np.nan
        table[f"{m}_n"] = table[f"{m}_n"].fillna(0).astype(int) if f"{m}_n" in table else 0
        table[f"{m}_best"] = _best(table, m)
    return table, notes


def _best(table: pd.DataFrame, m: str) -> pd.Series:
    """Best value of the nominal rows (matched rows are copies); none when every nominal row ties."""
    values = table[m].where(table["kind"] == NOMINAL)
    finite = values.dropna()
    if finite.empty or np.isclose(finite.min(), finite.max()):
        return pd.Series(False, index=table.index)
    best = finite.max() if higher_is_better(m) else finite.min()
    return values.notna() & np.isclose(values, best)


def _cell(row: dict, m: str) -> str:
    """`mean ± SE` (two significant digits of the SE; † one training seed), the state of a failed row, or a dash."""
    v, se = row[m], row[f"{m}_se"]
    if pd.isna(v):
        return row["status"].split(" ", 1)[-1].split(",")[0] if row["n_finished"] == 0 else DASH
    if pd.isna(se):
        text = f"{v:.3f}"
    else:
        d = decimals(se, 3)
        text = f"{v:.{d}f} {PM} {se:.{d}f}" + (ONE_RUN if row[f"{m}_n"] == 1 else "")
    return f"**{text}**" if row[f"{m}_best"] else text


def seeds_cell(row: dict) -> str:
    """Training seeds x sample seeds of the finished runs (`3x5`); runs that did not finish counted apart."""
    if row["n_finished"] == 0:
        return f"0/{row['n_runs']} ({row['status']})"
    text = f"{row['n_finished']}x{row['sample_seeds'] or 1}"
    return text if row["status"] == "finished" else f"{text} of {row['n_runs']} ({row['status']})"


def _notes(table: pd.DataFrame, notes: list[str], n_samples: float | None) -> list[str]:
    """What every column, the ± and the bold mean, and what the matched rows are."""
    lines = ["Method: vanilla (conditional) = the conditional model without guidance (w = 1); CFG s=S = that model "
             "sampled with classifier-free guidance, pred = cond + s (cond - uncond); MG w=W = a model trained with "
             "model guidance at the paper's w (target weight g = w - 1), sampled without CFG; MG w=W + CFG s=S = CFG "
             "on top of the MG model. NFE/step: network forwards per sampling step (CFG needs two, MG one). implied "
             "s: the CFG scale an MG model trains towards at its fixed point, f g / (1 - f g) for a target weight g "
             "on a fraction f of the batch (w = 1.5, f = 1: s = 1). Seeds: training seeds x sample seeds per run "
             "(e.g. 1x1); runs that did not finish are counted apart.",
             "Metrics (↑ higher is better, ↓ lower is better): " + "; ".join(
                 f"{REGISTRY[m].header} {arrow(m)}: {REGISTRY[m].meaning}" for m in METRICS) + ".",
             f"Values: the mean over training seeds of each run's mean over its sample seeds; {PM} one standard error "
             f"of that mean (training-seed and sampling noise); {ONE_RUN} one training seed: the SE over its sample "
             f"seeds only. No {PM}: one run at one sample seed, no estimate of the noise"
             + (f" (a share p from {n_samples:.0f} samples has a binomial SE of sqrt(p (1 - p) / {n_samples:.0f}), "
                f"at most {0.5 / math.sqrt(n_samples):.3f})." if n_samples else "."),
             "Bold: the best value per column among the rows as sampled (not the matched copies), left out where "
             "every row ties; it marks the best mean, not a resolved difference. " + DASH + ": not measured (e.g. "
             "metrics added after the run was evaluated)."]
    if (table["kind"] == MATCHED).any():
        lines.append("Matched rows: equal w is not equal guidance. Each `CFG s=S (matched to MG w=W)` row repeats the "
                     "CFG row at the scale that MG row trains towards (to two decimals), right beside it; compare "
                     "along the quality-diversity trade-off (in-class against sub-cell coverage), not one column.")
    return lines + notes


def to_markdown(table: pd.DataFrame, study: str, scale: str, notes: list[str] = (),
                n_samples: float | None = None) -> str:
    """The toy table as GitHub Markdown with its column definitions underneath."""
    head = ["Method", "NFE/step", "implied s", "Seeds", *[f"{REGISTRY[m].header} {arrow(m)}" for m in METRICS]]
    if table.empty:
        return f"# {study}: the 2D toy ({scale})\n\nNo grid2d runs in this study.\n"
    lines = [f"# {study}: the 2D toy ({scale})", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * 4 + "---:|" * len(METRICS)]
    for row in table.to_dict("records"):
        nfe = DASH if pd.isna(row["nfe_per_step"]) else f"{row['nfe_per_step']:.0f}"
        imp = DASH if pd.isna(row["implied_s"]) else f"{row['implied_s']:.2f}"
        cells = [row["method"], nfe, imp, seeds_cell(row), *[_cell(row, m) for m in METRICS]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"- {n}" for n in _notes(table, list(notes), n_samples)] + [""]
    return "\n".join(lines)


def write_toy(runs: pd.DataFrame, study: str, out_dir: str | Path) -> list[Path]:
    """Write toy.md and toy.csv; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table, notes = toy_table(runs)
    grid = _grid_runs(runs)
    scales = sorted(set(grid.get(T.TAG_SCALE, pd.Series(dtype=object)).dropna()))
    n = pd.to_numeric(grid.get("eval.n_samples", pd.Series(dtype=float)), errors="coerce").dropna().unique()
    md = out / "toy.md"
    md.write_text(to_markdown(table, study, ", ".join(scales) or "grid2d", notes, n[0] if len(n) == 1 else None),
                  encoding="utf-8")
    csv = out / "toy.csv"
    csv.write_text(table.to_csv(index=False, float_format="%.6g", lineterminator="\n"), encoding="utf-8")
    return [md, csv]
