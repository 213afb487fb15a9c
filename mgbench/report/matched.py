"""Like-for-like rows beside the paper's nominal layout: guidance strengths matched through implied_cfg_scale.

Equal nominal w is not equal guidance. A fixed-w MG model (target weight g = w - 1 on a fraction f of
the batch) converges to CFG with s = f g / (1 - f g); a w-input model fed w converges to s = w - 1
(mgbench.trainer.objective.implied_cfg_scale). So:
- Table 3: beside each fixed-w MG row, the study's vanilla runs sampled with CFG at that s, read from
  their CFG sweep (`sweep/cfg_scale_S/...`) when S (to its two tracked decimals) was swept;
- Table 5: beside the w-input row, the same w-input runs fed w = 1 + s of each fixed-w row (from their
  w sweep `wsweep/w_X/...`, when that point exists), and the fed w with the lowest FID among the swept
  points ("best w": chosen on the data it is shown with, so optimistic).
"""
from __future__ import annotations

import math
import re
import pandas as pd

from mgbench import tracking as T
from mgbench.report import load as L
from mgbench.report.values import measure

P_MG_FRACTION = "objective.mg_fraction"     # share of the labelled samples on the MG target (config.ObjectiveConfig)
GROUP = ["family", "model", "scale", "variant", "setting", "extra"]   # a table row's key (tables.KEY + extra)
BLOCK = ["family", "model", "scale"]        # the rows a matched row may draw its runs from
Matched = tuple[tuple, dict, pd.DataFrame]  # (key of the row it stands beside, its row, its per-run frame)


def implied_scale(g: float, fraction: float = 1.0, w_input: bool = False) -> float:
    """objective.implied_cfg_scale, imported on use (it lives beside torch code)."""
    from mgbench.trainer.objective import implied_cfg_scale

    return implied_cfg_scale(g, fraction, w_input=w_input)


def _truthy(runs: pd.DataFrame, column: str) -> pd.Series:
    """Whether each run's boolean param is set (False where the param is absent)."""
    if column not in runs:
        return pd.Series(False, index=runs.index)
    return runs[column].astype(object).map(lambda v: v is True or (v is not None and v is not pd.NA and bool(v)))


def fixed_w(runs: pd.DataFrame) -> tuple[float, float] | None:
    """(w, mg_fraction) of runs trained at one fixed w; None under a w range, auto-w, or several w."""
    if runs[L.P_W_RANGE].notna().any() or _truthy(runs, L.P_AUTO_W).any():
        return None
    ws = runs[L.P_W].dropna().unique()
    fractions = runs[P_MG_FRACTION].dropna().unique() if P_MG_FRACTION in runs else []
    if len(ws) != 1 or len(fractions) > 1:
        return None
    return float(ws[0]), float(fractions[0]) if len(fractions) else 1.0


def _swept(runs: pd.DataFrame, bases: dict[str, str]) -> bool:
    cols = [b for b in bases.values() if b in runs]
    done = runs[runs[L.STATUS] == "finished"]
    return bool(cols) and bool(done[cols].notna().to_numpy().any())


def _same_block(key: tuple, other: tuple) -> bool:
    return key[:3] == other[:3]


def matched_rows(labelled: pd.DataFrame, kind: str, metrics: list[str]) -> list[Matched]:
    """The matched rows of one table: kind `cfg` (Table 3), `w_input` (Table 5), or none."""
    swept = {"cfg": T.M_SWEEP.split("{", 1)[0], "w_input": T.M_WSWEEP.split("{", 1)[0]}   # name prefixes
    if kind == "" or labelled.empty or not any(c.startswith(swept[kind]) for c in labelled.columns):
        return []       # no sweep, no matched row (and no torch import for implied_cfg_scale)
    groups = list(labelled.groupby(GROUP, dropna=False, sort=False))
    return {"cfg": _cfg_rows, "w_input": _w_input_rows}[kind](groups, metrics)


def _partner(key: tuple, vanilla: list[tuple[tuple, pd.DataFrame]]) -> tuple[tuple, pd.DataFrame] | None:
    """The vanilla row of the same block with the same split label, else the block's only vanilla row."""
    block = [(k, g) for k, g in vanilla if _same_block(key, k)]
    same = [(k, g) for k, g in block if k[5] == key[5]]
    return same[0] if same else block[0] if len(block) == 1 else None


def _cfg_rows(groups: list, metrics: list[str]) -> list[Matched]:
    """Table 3: vanilla + CFG at the scale each fixed-w MG row converges to."""
    vanilla = [(k, g) for k, g in groups if k[3] == "vanilla"]
    out = []
    for key, runs in groups:
        fixed = fixed_w(runs) if key[3] == "mg" else None
        s = implied_scale(fixed[0] - 1, fixed[1]) if fixed else math.inf
        partner = _partner(key, vanilla) if math.isfinite(s) else None
        bases = {m: T.metric_sweep(s, m) for m in metrics} if partner else {}
        if not partner or not _swept(partner[1], bases):
            continue
        fields = dict(zip(GROUP, key), variant="cfg", extra=partner[0][5], row_kind="matched",
                      setting=f"vanilla + CFG s={s:.2f} (matched to w={fixed[0]:.2f})")
        out.append((key, *measure(partner[1], bases, fields, metrics)))
    return out


def wsweep_points(columns: pd.Index) -> list[float]:
    """The fed w of the tracked w sweep (`wsweep/w_X/fid`), ascending."""
    text = re.escape(T.M_WSWEEP).replace(re.escape("{w:.2f}"), r"(?P<w>[0-9.]+)").replace(re.escape("{metric}"), "fid")
    pattern = re.compile(f"^{text}$")
    return sorted({float(m["w"]) for c in columns if (m := pattern.match(c))})


def _w_input_rows(groups: list, metrics: list[str]) -> list[Matched]:
    """Table 5: each w-input row fed the w whose strength matches a fixed-w row, and its best fed w."""
    fixed = [(k, fixed_w(g)) for k, g in groups if k[3] == "mg" and not _truthy(g, L.P_W_INPUT).any()]
    out = []
    for key, runs in groups:
        if not _truthy(runs, L.P_W_INPUT).all():
            continue
        points = [p for p in wsweep_points(runs.columns) if _swept(runs, {"fid": T.metric_wsweep(p, "fid")})]
        out += _strength_rows(key, runs, points, [f for k, f in fixed if f and _same_block(key, k)], metrics)
        out += _best_row(key, runs, points, metrics)
    return out


def _fed(key: tuple, runs: pd.DataFrame, w: float, setting: str, kind: str, metrics: list[str]) -> Matched:
    fields = dict(zip(GROUP, key), setting=setting, row_kind=kind)
    return (key, *measure(runs, {m: T.metric_wsweep(w, m) for m in metrics}, fields, metrics))


def _strength_rows(key: tuple, runs: pd.DataFrame, points: list[float], fixed: list[tuple[float, float]],
                   metrics: list[str]) -> list[Matched]:
    out, seen = [], set()
    for w, fraction in sorted(set(fixed)):
        s = implied_scale(w - 1, fraction)
        fed = [p for p in points if math.isfinite(s) and abs(p - (1 + s)) < 0.005]   # equal at two decimals
        if fed and fed[0] not in seen:
            seen.add(fed[0])
            setting = f"w_input=yes, fed w={fed[0]:.2f} (matched s={s:.2f} to w={w:.2f})"
            out.append(_fed(key, runs, fed[0], setting, "matched", metrics))
    return out


def _best_row(key: tuple, runs: pd.DataFrame, points: list[float], metrics: list[str]) -> list[Matched]:
    best = None
    for p in points if "fid" in metrics else []:
        row = _fed(key, runs, p, "", "best w", metrics)
        if math.isfinite(row[1]["fid"]) and (best is None or row[1]["fid"] < best[1][1]["fid"]):   # FID: lower
            best = (p, row)
    if best is None:
        return []
    p, (anchor, row, per_run) = best
    s = implied_scale(p - 1, w_input=True)
    setting = f"w_input=yes, best fed w={p:.2f} (s={s:.2f}; lowest FID of {len(points)} fed w)"
    return [(anchor, {**row, "setting": setting}, per_run.assign(setting=setting))]
