"""Tidy runs -> the paper's Tables 1-8: measured rows (mean +- SE over runs) beside the published rows.

A measured row's value is the mean over its finished runs of each run's mean over its sample seeds, with
the standard error of report.stats.estimate (report.values); every row's runs come out as a per-run frame
(`Table.runs`, written as `table<N>_runs.csv`). Tables 3 and 5 add like-for-like rows (report.matched).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
import pandas as pd

from mgbench import tracking as T
from mgbench.report import load as L
from mgbench.report.matched import matched_rows
from mgbench.report.specs import METRIC_COLUMN, METRICS, IGNORED_PARAMS, SPEC_COLUMNS, SPECS, VARIANT_RANK, \
    TableSpec, model_family, model_label, param_text
from mgbench.report.values import SEED, K, columns_of, per_run_frame, run_values, summarise

DIRECTION = {m: higher for m, _, _, higher in METRICS}
KEY = ["family", "model", "scale", "variant", "setting"]   # one table row per key (plus `extra` for split rows)


ROW = "row"                    # the text key of a table row: source | model | scale | variant | setting | extra
NOMINAL = "nominal"            # row_kind of the paper's layout; matched rows are `matched` or `best w`


@dataclass
class Table:
    """A rendered table's content: tidy rows (numbers, SE, best flags), their runs, and what the columns mean."""

    spec: TableSpec
    rows: pd.DataFrame        # one row per table line; metric m in m, its SE in m_se, its runs in m_n, best in m_best
    study: str = ""
    runs: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per run of every measured row (RUN_COLUMNS)


def row_key(source: str, model: str, scale: str, variant: str, setting: str, extra: str) -> str:
    """The text key of a table row (the `row` column of the rows and of the per-run frame)."""
    return " | ".join(str(x) for x in (source, model, scale, variant, setting, extra))


def paper_rows(number: int) -> pd.DataFrame:
    """The paper's published rows of one table (mgbench/data/paper_tables.csv)."""
    with resources.files("mgbench.data").joinpath("paper_tables.csv").open() as f:
        paper = pd.read_csv(f, dtype={"setting": str, "model": str, "variant": str})
    paper = paper[paper["table"] == number].reset_index(drop=True)
    spec = SPECS[number]
    out = pd.DataFrame({
        "source": "paper", "model": paper["model"], "variant": paper["variant"], "setting": paper["setting"],
        "scale": spec.paper_scale, "extra": "", "n_runs": 0, "n_finished": 0, "status": "published",
        "order": np.arange(len(paper)), "row_kind": NOMINAL, "sample_seeds": "", "train_seeds": "",
    })
    out["family"] = [("baseline" if v == "baseline" else model_family(m)) for m, v in zip(out["model"], out["variant"])]
    for metric, *_ in METRICS:
        out[metric] = paper[metric].astype(float)
        out[f"{metric}_se"] = np.nan
        out[f"{metric}_n"] = 0
    return out


@dataclass
class PreparedRuns:
    """Runs with what every table needs computed once: labels, spec columns as dicts, param codes."""

    runs: pd.DataFrame                 # the tidy runs (load_runs) plus model, family and scale columns
    records: list[dict[str, Any]]      # per run, the columns the table specs read (None for missing)
    codes: pd.DataFrame                # per run, an integer code per param value (to find rows that differ)
    text: pd.DataFrame                 # per run, each param value as `name=value` text
    values: pd.DataFrame               # per run, each metric's value over its sample seeds (values.run_values)


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
    # Params are dotted config names; tracked metrics all have a `/` (eval/fid, sweep/..., wsweep/...).
    params = [c for c in runs.columns if "." in c and "/" not in c and not c.startswith(("mgbench.", "mlflow."))
              and c not in IGNORED_PARAMS]
    codes, text = {}, {}
    for p in params:
        codes[p], uniques = pd.factorize(runs[p].astype(object), use_na_sentinel=False)
        text[p] = np.array([param_text(p, _plain(u)) for u in uniques], dtype=object)[codes[p]]   # human words
    values = run_values(runs, {m: METRIC_COLUMN[m] for m, *_ in METRICS})
    return PreparedRuns(df, records, pd.DataFrame(codes, index=runs.index), pd.DataFrame(text, index=runs.index),
                        values)


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


def _aggregate(df: pd.DataFrame, values: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per (model, scale, variant, setting, extra): counts by status and the estimate over finished runs;
    and the per-run frame of those rows."""
    keys = [*KEY, "extra"]
    if df.empty:
        return pd.DataFrame(columns=["source", *keys, "n_runs", "n_finished", "status"]), pd.DataFrame()
    per_run = per_run_frame(df, values, keys).assign(row_kind=NOMINAL)
    cols = columns_of(per_run.reset_index(drop=True))
    groups = per_run.reset_index(drop=True).groupby(keys, dropna=False, sort=False).indices
    metrics = [m for m, *_ in METRICS]
    rows = [{**dict(zip(keys, key)), **summarise({c: a[at] for c, a in cols.items()}, metrics)}
            for key, at in groups.items()]
    return pd.DataFrame(rows).assign(source="measured", row_kind=NOMINAL), per_run


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
                            "status": "missing", "row_kind": NOMINAL, "sample_seeds": "", "train_seeds": ""})
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
        out.append({**{k: rec[k] for k in ("source", "family", "model", "scale", "extra", "row_kind")},
                    "sample_seeds": "", "train_seeds": "", "variant": "improve", "setting": rec["setting"],
                    "n_runs": 0, "n_finished": 0,
                    "status": f"relative change vs vanilla {base['setting']}, %", "order": rec.get("order"), **change})
    return _order(pd.DataFrame(out), spec)


def _mark_best(rows: pd.DataFrame, spec: TableSpec) -> pd.DataFrame:
    """Flag the best value per column (lowest FID/sFID, highest IS/precision/recall) within each comparison set.

    Only the nominal rows compete: a matched or best-w row samples at another strength than the paper's
    layout (and the best-w row is chosen on its own data), so it is never flagged and never beats one.
    """
    rows = rows.copy()
    real = (rows["variant"] != "improve") & (rows["row_kind"] == NOMINAL)
    for metric in spec.metrics:
        values = rows[metric].where(real)
        if DIRECTION[metric]:
            best = values.groupby([rows[c] for c in spec.best_within], dropna=False).transform("max")
        else:
            best = values.groupby([rows[c] for c in spec.best_within], dropna=False).transform("min")
        rows[f"{metric}_best"] = (values == best) & values.notna()
    return rows


def _insert_matched(rows: pd.DataFrame, matched: list) -> pd.DataFrame:
    """Put each matched row right after the measured row it stands beside, in the order they were made."""
    after: dict[tuple, list[dict]] = {}
    for anchor, row, _ in matched:
        after.setdefault(anchor, []).append({**row, "source": "measured"})
    out = []
    for rec in rows.to_dict("records"):
        out.append(rec)
        if rec["source"] == "measured" and rec["variant"] != "improve":
            out += after.pop(tuple(rec[c] for c in [*KEY, "extra"]), [])
    return pd.DataFrame(out)


def _with_row_key(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with its `row` column (row_key of each line, built column-wise: fast for 10,000 runs)."""
    key = frame["source"].astype(str)
    for col in ("model", "scale", "variant", "setting", "extra"):
        key = key + " | " + frame[col].astype(str)
    return frame.assign(**{ROW: key})


def _runs_frame(parts: list[pd.DataFrame], rows: pd.DataFrame, metrics: tuple[str, ...]) -> pd.DataFrame:
    """The per-run frame of a table: one line per run of each measured row, in the table's row order."""
    head = [ROW, "family", "model", "variant", "setting", "extra", "scale", "row_kind", SEED, L.RUN_ID, L.STATUS, K]
    parts = [p for p in parts if not p.empty]
    if not parts:
        return pd.DataFrame(columns=head + [c for m in metrics for c in (m, f"{m}_se", f"{m}_k")])
    runs = _with_row_key(pd.concat(parts, ignore_index=True).assign(source="measured"))
    columns = list(head)
    for m in metrics:
        seeds = sorted((int(c.rsplit("_", 1)[1]), c) for c in runs.columns if c.startswith(f"{m}_seed_"))
        columns += [m, f"{m}_se", f"{m}_k", *(c for _, c in seeds)]
    position = {key: i for i, key in enumerate(rows[ROW])}
    runs = runs.assign(_pos=runs[ROW].map(position)).sort_values(["_pos", SEED, L.RUN_ID], na_position="last")
    return runs[columns].reset_index(drop=True)


def build_table(runs: pd.DataFrame | PreparedRuns, number: int, study: str = "") -> Table:
    """One of the paper's tables from tidy runs (`load_runs`): paper rows, measured rows, dashes, IMPROVE,
    matched rows, best flags; and the per-run frame of its measured rows."""
    spec = SPECS[number]
    paper = paper_rows(number)
    prepared = prepare_runs(runs)
    labelled = _labelled(prepared, spec)
    measured, per_run = _aggregate(labelled, prepared.values)
    missing = _expected(measured, paper, spec)
    rows = pd.concat([p for p in (paper, measured, missing) if not p.empty], ignore_index=True)
    rows = _order(rows, spec)
    if spec.improve:
        rows = _improve(rows, spec)
    matched = matched_rows(labelled, spec.matched, [m for m, *_ in METRICS])
    rows = _insert_matched(rows, matched)
    for metric, *_ in METRICS:
        for col in (metric, f"{metric}_se"):
            rows[col] = pd.to_numeric(rows.get(col, np.nan), errors="coerce").astype(float)
        rows[f"{metric}_n"] = pd.to_numeric(rows.get(f"{metric}_n", 0), errors="coerce").fillna(0).astype(int)
    for col in ("n_runs", "n_finished"):
        rows[col] = rows[col].fillna(0).astype(int)
    rows = _with_row_key(_mark_best(rows, spec))
    columns = [ROW, "source", "family", "model", "variant", "setting", "extra", "row_kind", "scale", "n_runs",
               "n_finished", "status", "sample_seeds", "train_seeds"]
    for metric in spec.metrics:
        columns += [metric, f"{metric}_se", f"{metric}_n", f"{metric}_best"]
    rows = rows[columns].reset_index(drop=True)
    return Table(spec, rows, study, _runs_frame([per_run, *(r for _, _, r in matched)], rows, spec.metrics))
