"""Per-run values over sample seeds and one table row's numbers over its runs (through report.stats).

A run's value of a metric is its mean over its K sample seeds, as the evaluation hook tracks it (`<name>`,
with its SE `<name>_se`); the per-seed values `<name>/seed_<k>` give K and stand in (stats.run_value)
where the mean is missing. Runs from before sample seeds have K = 1. A row's value is the mean over its
finished runs of those run values, with the standard error of stats.estimate.
"""
from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pandas as pd

from mgbench import tracking as T
from mgbench.report import load as L
from mgbench.report.stats import estimate, run_value

K = "n_sample_seeds"            # per-run column: sample seeds of the run's evaluation
SEED = "train_seed"             # per-run column: the run's training seed (`train.seed` param)


def seed_columns(columns: pd.Index, base: str) -> list[tuple[int, str]]:
    """The tracked per-seed columns of one metric as (seed index, column name), by index."""
    prefix = T.metric_seed(base, 0)[:-1]          # `<base>/seed_`
    pattern = re.compile(re.escape(prefix) + r"(\d+)$")
    found = [(int(m.group(1)), c) for c in columns if (m := pattern.match(c))]
    return sorted(found)


def _column(df: pd.DataFrame, name: str) -> np.ndarray:
    return df[name].to_numpy(dtype=float, copy=True) if name in df else np.full(len(df), np.nan)


def run_values(df: pd.DataFrame, bases: dict[str, str]) -> pd.DataFrame:
    """Per run (df's index): for each metric m of `bases` ({m: tracked name}), m, m_se, m_k and m_seed_<i>."""
    tracked_k = _column(df, T.M_SAMPLE_SEEDS)
    out: dict[str, np.ndarray] = {}
    for metric, base in bases.items():
        mean, se = _column(df, base), _column(df, T.metric_se(base))
        seeds = seed_columns(df.columns, base)
        matrix = df[[c for _, c in seeds]].to_numpy(dtype=float) if seeds else np.empty((len(df), 0))
        counted = np.isfinite(matrix).sum(axis=1)
        k = np.where(counted > 0, counted,
                     np.where(np.isfinite(se) & np.isfinite(tracked_k), tracked_k, np.isfinite(mean).astype(float)))
        for i in np.flatnonzero(~np.isfinite(mean) & (counted > 0)):     # per-seed values without a tracked mean
            mean[i], se[i], _ = run_value(matrix[i])
        out[metric], out[f"{metric}_se"], out[f"{metric}_k"] = mean, se, k.astype(int)
        for (i, _), column in zip(seeds, matrix.T):
            out[f"{metric}_seed_{i}"] = column
    frame = pd.DataFrame(out, index=df.index)
    ks = frame[[f"{m}_k" for m in bases]].max(axis=1) if bases else pd.Series(0.0, index=df.index)
    frame[K] = np.where(np.isfinite(tracked_k), tracked_k, ks).astype(int)
    return frame


def per_run_frame(df: pd.DataFrame, values: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The runs with their key columns, training seed, run id, status and run values (run_values of df)."""
    seeds = df[L.P_SEED] if L.P_SEED in df else pd.Series(pd.NA, index=df.index)
    head = df[keys].assign(**{SEED: pd.array(seeds, dtype="Int64"), L.RUN_ID: df[L.RUN_ID], L.STATUS: df[L.STATUS]})
    return pd.concat([head, values.loc[df.index]], axis=1)


def status_text(statuses: list[str]) -> str:
    """"finished" when every run finished; else the counts of the other states ("1 failed, 1 running")."""
    counts = Counter(statuses)
    others = [f"{n} {s}" for s, n in sorted(counts.items()) if s != "finished"]
    return ", ".join(others) if others else "finished"


def columns_of(runs: pd.DataFrame) -> dict[str, np.ndarray]:
    """A per-run frame as arrays (training seeds as floats, nan where unknown), for summarise."""
    cols = {c: runs[c].to_numpy() for c in runs.columns if c != SEED}
    cols[SEED] = runs[SEED].astype("Float64").to_numpy(dtype=float, na_value=np.nan)
    return cols


def summarise(cols: dict[str, np.ndarray], metrics: list[str]) -> dict:
    """One row's numbers from its runs' columns (columns_of): counts, state, K, seeds, and per metric the
    estimate over the finished runs."""
    done = cols[L.STATUS] == "finished"
    ks = sorted(set(cols[K][done].tolist()))
    seeds = sorted({int(s) for s in cols[SEED][done] if np.isfinite(s)})
    row = {"n_runs": len(done), "n_finished": int(done.sum()), "status": status_text(cols[L.STATUS].tolist()),
           "sample_seeds": "" if not ks else str(ks[0]) if len(ks) == 1 else f"{ks[0]}-{ks[-1]}",
           "train_seeds": " ".join(str(s) for s in seeds)}
    for m in metrics:
        means = cols[m][done].astype(float) if m in cols else np.array([])
        ok = np.isfinite(means)
        k = int(cols[f"{m}_k"][done][ok].min()) if ok.any() else 1
        est = estimate(means[ok].tolist(), cols[f"{m}_se"][done][ok].tolist() if ok.any() else [], k)
        row.update({m: est.mean, f"{m}_se": est.se, f"{m}_n": est.n_runs})
    return row


def measure(runs: pd.DataFrame, bases: dict[str, str], fields: dict, metrics: list[str]) -> tuple[dict, pd.DataFrame]:
    """One row from a group of runs measured under `bases`: its numbers and its per-run frame (with `fields`)."""
    per_run = per_run_frame(runs, run_values(runs, bases), []).assign(**fields)
    return {**fields, **summarise(columns_of(per_run), metrics)}, per_run
