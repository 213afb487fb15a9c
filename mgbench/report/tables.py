"""Tidy runs -> the paper's Tables 1-8: measured rows (mean +- std over seeds) beside the published rows."""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import pandas as pd

from mgbench import tracking as T
from mgbench.report import load as L
from mgbench.report.specs import METRIC_COLUMN, METRICS, IGNORED_PARAMS, SPEC_COLUMNS, SPECS, VARIANT_RANK, \
    TableSpec, model_family, model_label

DIRECTION = {m: higher for m, _, _, higher in METRICS}
KEY = ["family", "model", "scale", "variant", "setting"]   # one table row per key (plus `extra` for split rows)


@dataclass
class Table:
    """A rendered table's content: tidy rows (numbers, std, best flags) and what the columns mean."""

    spec: TableSpec
    rows: pd.DataFrame        # one row per table line; metric m in column m, its std in m_std, best flag in m_best
    study: str = ""


def paper_rows(number: int) -> pd.DataFrame:
    """The paper's published rows of one table (mgbench/data/paper_tables.csv)."""
    with resources.files("mgbench.data").joinpath("paper_tables.csv").open() as f:
        paper = pd.read_csv(f, dtype={"setting": str, "model": str, "variant": str})
    paper = paper[paper["table"] == number].reset_index(drop=True)
    spec = SPECS[number]
    out = pd.DataFrame({
        "source": "paper", "model": paper["model"], "variant": paper["variant"], "setting": paper["setting"],
        "scale": spec.paper_scale, "extra": "", "n_runs": 0, "n_finished": 0, "status": "published",
        "order": np.arange(len(paper)),
    })
    out["family"] = [("baseline" if v == "baseline" else model_family(m)) for m, v in zip(out["model"], out["variant"])]
    for metric, *_ in METRICS:
        out[metric] = paper[metric].astype(float)
        out[f"{metric}_std"] = np.nan
    return out


@dataclass
class PreparedRuns:
    """Runs with what every table needs computed once: labels, spec columns as dicts, param codes."""

    runs: pd.DataFrame                 # the tidy runs (load_runs) plus model, family and scale columns
    records: list[dict[str, Any]]      # per run, the columns the table specs read (None for missing)
    codes: pd.DataFrame                # per run, an integer code per param value (to find rows that differ)
    text: pd.DataFrame                 # per run, each param value as `name=value` text


def prepare_runs(runs: pd.DataFrame | PreparedRuns) -> PreparedRuns:
    """Compute the table-independent columns of the runs once (build many tables from one PreparedRuns)."""
    if isinstance(runs, PreparedRuns):
        return runs
    needed = [c for c in SPEC_COLUMNS if c in runs]
    records = runs[needed].astype(object).where(runs[needed].notna(), None).to_dict("records")
    form = [r.get(L.P_FORMULATION) for r in records]
    df = runs.copy()
    df["model"] = [model_label(r.get(L.P_ARCH), f) for r, f in zip(records, form)]
    df["family"] = [model_family(m, f) for m, f in zip(df["model"], form)]
    df["scale"] = ["measured: " + str(r.get(T.TAG_SCALE) or "unlabelled scale") for r in records]
    params = [c for c in runs.columns if "." in c and not c.startswith(("mgbench.", "mlflow.")) and c not in IGNORED_PARAMS
              and not c.startswith(("eval/", "train/", "model/", "sweep/"))]
    codes, text = {}, {}
    for p in params:
        codes[p], uniques = pd.factorize(runs[p].astype(object), use_na_sentinel=False)
        text[p] = np.array([f"{p}={_plain(u)}" for u in uniques], dtype=object)[codes[p]]
    return PreparedRuns(df, records, pd.DataFrame(codes, index=runs.index), pd.DataFrame(text, index=runs.index))


def _labelled(prepared: PreparedRuns, spec: TableSpec) -> pd.DataFrame:
    """The runs that belong in the table, with model, family, scale, setting and split-label columns."""
    keep = np.array([spec.include(r) for r in prepared.records], dtype=bool)
    df = prepared.runs[keep].copy()
    df["setting"] = [spec.setting(r) for r, k in zip(prepared.records, keep) if k]
    df["variant"] = df[L.VARIANT]
    df["extra"] = _split_labels(df, prepared.codes[keep], prepared.text[keep])
    return df


def _split_labels(df: pd.DataFrame, codes: pd.DataFrame, text: pd.DataFrame) -> list[str]:
    """For rows whose runs differ in more than the seed, a label naming the params that differ."""
    labels = np.full(len(df), "", dtype=object)
    if df.empty or codes.shape[1] == 0:
        return labels.tolist()
    keys = df[KEY].reset_index(drop=True)
    counts = codes.reset_index(drop=True).assign(**keys).groupby(KEY, dropna=False).nunique()
    counts = counts[(counts > 1).any(axis=1)]
    if counts.empty:
        return labels.tolist()
    positions = keys.groupby(KEY, dropna=False).indices
    for key, row in counts.iterrows():
        cols = [c for c in codes.columns if row[c] > 1]
        rows = positions[key]
        labels[rows] = [" ".join(parts) for parts in text.iloc[rows][cols].itertuples(index=False, name=None)]
    return labels.tolist()


def _plain(value: Any) -> Any:
    return None if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)) else value


def _aggregate(df: pd.DataFrame, spec: TableSpec) -> pd.DataFrame:
    """One row per (model, scale, variant, setting, extra): counts by status, mean and std over finished runs."""
    if df.empty:
        return pd.DataFrame(columns=["source", *KEY, "extra", "n_runs", "n_finished", "status"])
    keys = [*KEY, "extra"]
    df = df.assign(_done=df[L.STATUS] == "finished")
    grouped = df.groupby(keys, dropna=False, sort=False)
    out = grouped.size().rename("n_runs").to_frame()
    out["n_finished"] = grouped["_done"].sum()
    counts = df.groupby(keys, dropna=False, sort=False)[L.STATUS].value_counts().unstack(fill_value=0)
    out["status"] = [_status_text(counts.loc[idx]) for idx in out.index]
    done = df[df["_done"]].groupby(keys, dropna=False, sort=False)
    for metric, *_ in METRICS:
        col = METRIC_COLUMN[metric]
        if col in df:
            out[metric] = done[col].mean()
            out[f"{metric}_std"] = done[col].std(ddof=1)
        else:
            out[metric] = np.nan
            out[f"{metric}_std"] = np.nan
    return out.reset_index().assign(source="measured")


def _status_text(counts: pd.Series) -> str:
    """"finished" when every run finished; else the counts of the other states ("1 failed, 1 running")."""
    others = [f"{int(n)} {s}" for s, n in sorted(counts.items()) if s != "finished" and n > 0]
    return ", ".join(others) if others else "finished"


def _expected(measured: pd.DataFrame, paper: pd.DataFrame, spec: TableSpec) -> pd.DataFrame:
    """Rows for expected settings that no run measured: shown with a dash."""
    missing = []
    groups = measured[["family", "model", "scale"]].drop_duplicates().itertuples(index=False)
    for family, model, scale in groups:
        have = measured[(measured["model"] == model) & (measured["scale"] == scale)]
        present = set(zip(have["variant"], have["setting"]))
        fam_paper = paper[paper["family"] == family]
        want: set[tuple[str, str]] = set()
        if spec.expect_paper_settings:
            want |= {(v, s) for v, s in zip(fam_paper["variant"], fam_paper["setting"]) if v == "mg"}
        else:
            want |= {(v, s) for _, s in present for v in ("vanilla", "mg")}
        if "vanilla" not in {v for v, _ in present} and not any(v == "vanilla" for v, _ in want):
            vanilla_paper = fam_paper[fam_paper["variant"] == "vanilla"]["setting"]
            want.add(("vanilla", vanilla_paper.iloc[0] if len(vanilla_paper) else "vanilla"))
        for variant, setting in sorted(want - present):
            missing.append({"source": "measured", "family": family, "model": model, "scale": scale,
                            "variant": variant, "setting": setting, "extra": "", "n_runs": 0, "n_finished": 0,
                            "status": "missing"})
    return pd.DataFrame(missing)


def _order(rows: pd.DataFrame, spec: TableSpec) -> pd.DataFrame:
    """Families in turn; in each, paper row then measured rows per setting (vanilla first where it leads)."""
    fam_rank = {"baseline": 0, "DiT": 1, "SiT": 2}
    keys = []
    for r in rows.to_dict("records"):
        setting = spec.sort_key(str(r["setting"]))
        variant = VARIANT_RANK.get(r["variant"], 9)
        inner = (variant, setting) if spec.variant_first else (setting, variant)
        order = r.get("order")
        keys.append((fam_rank.get(r["family"], 3), r["family"], *inner, r["source"] != "paper",
                     0 if order is None or pd.isna(order) else int(order), r["model"], r["scale"], r["extra"]))
    order = sorted(range(len(rows)), key=lambda i: keys[i])
    return rows.iloc[order].reset_index(drop=True)


def _improve(rows: pd.DataFrame, spec: TableSpec) -> pd.DataFrame:
    """Insert after each model's MG row the relative change of MG vs vanilla, in percent (the IMPROVE row)."""
    out = rows.to_dict("records")
    vanilla: dict[tuple, dict] = {}
    for rec in out:
        if rec["variant"] == "vanilla":
            vanilla.setdefault((rec["model"], rec["scale"], rec["source"]), rec)
    for rec in list(out):
        base = vanilla.get((rec["model"], rec["scale"], rec["source"]))
        if rec["variant"] != "mg" or base is None:
            continue
        change = {m: 100.0 * (rec[m] - base[m]) / base[m] if base[m] else np.nan for m in spec.metrics}
        out.append({**{k: rec[k] for k in ("source", "family", "model", "scale", "extra")},
                    "variant": "improve", "setting": rec["setting"], "n_runs": 0, "n_finished": 0,
                    "status": f"relative change vs vanilla {base['setting']}, %", "order": rec.get("order"), **change})
    return _order(pd.DataFrame(out), spec)


def _mark_best(rows: pd.DataFrame, spec: TableSpec) -> pd.DataFrame:
    """Flag the best value per column (lowest FID/sFID, highest IS/precision/recall) within each comparison set."""
    rows = rows.copy()
    real = rows["variant"] != "improve"
    for metric in spec.metrics:
        values = rows[metric].where(real)
        if DIRECTION[metric]:
            best = values.groupby([rows[c] for c in spec.best_within], dropna=False).transform("max")
        else:
            best = values.groupby([rows[c] for c in spec.best_within], dropna=False).transform("min")
        rows[f"{metric}_best"] = (values == best) & values.notna()
    return rows


def build_table(runs: pd.DataFrame | PreparedRuns, number: int, study: str = "") -> Table:
    """One of the paper's tables from tidy runs (`load_runs`): paper rows, measured rows, dashes, IMPROVE, best."""
    spec = SPECS[number]
    paper = paper_rows(number)
    measured = _aggregate(_labelled(prepare_runs(runs), spec), spec)
    missing = _expected(measured, paper, spec)
    parts = [p for p in (paper, measured, missing) if not p.empty]
    rows = pd.concat(parts, ignore_index=True)
    for metric, *_ in METRICS:
        for col in (metric, f"{metric}_std"):
            rows[col] = pd.to_numeric(rows.get(col, np.nan), errors="coerce").astype(float)
    rows["n_runs"] = rows["n_runs"].fillna(0).astype(int)
    rows["n_finished"] = rows["n_finished"].fillna(0).astype(int)
    rows = _order(rows, spec)
    if spec.improve:
        rows = _improve(rows, spec)
    rows = _mark_best(rows, spec)
    columns = ["source", "family", "model", "variant", "setting", "extra", "scale", "n_runs", "n_finished", "status"]
    for metric in spec.metrics:
        columns += [metric, f"{metric}_std", f"{metric}_best"]
    return Table(spec, rows[columns].reset_index(drop=True), study)
