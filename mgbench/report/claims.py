"""Declared claims -> verdicts: each claim compares two rows of tracked runs; its verdict is read from a CI.

A claims file (reports/claims.yaml) lists, per claim, the paper's wording and numbers, the study spec files
it reads, a metric and two sides A and B. A side is a row selector: param equalities (`where`), which
measurement of each run to read (its own evaluation; `cfg_scale`: a point of its CFG sweep; `fed_w`: a
w-input model fed another w), and optionally `best_of` / `worst_of` a list of settings, chosen by the mean on
the same runs (which biases the chosen row in its own favour; the table says so). `kind: better` claims A
is better than B (direction from the metric); `kind: equivalent` claims |A - B| <= margin. The numbers,
intervals and verdicts come from mgbench.report.stats; nothing in the output is typed by hand except the
claim's wording and the paper's numbers.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mgbench import tracking as T
from mgbench.config import ConfigError, TrainConfig, load_yaml
from mgbench.metric_registry import METRICS
from mgbench.report import load as L
from mgbench.report.stats import Difference, Estimate, compare, estimate, verdict

LOWER_IS_BETTER = {m: not info.higher_is_better for m, info in METRICS.items() if info.family != "speed"}  # registry
KINDS = ("better", "equivalent")
MEASURES = ("cfg_scale", "fed_w")          # a side's measurement other than the run's own evaluation
CLAIM_KEYS = {"id", "claim", "paper", "studies", "metric", "kind", "margin", "a", "b"}
SIDE_KEYS = {"where", "study", "cfg_scale", "fed_w", "best_of", "worst_of"}
NOT_MEASURED = "not measured"


@dataclass(frozen=True)
class Side:
    """A row selector: which runs, and which measurement of each run."""

    where: dict[str, Any]                  # param (or mgbench.* tag) equalities a run must meet
    study: str | None = None               # restrict to this one of the claim's studies
    cfg_scale: float | None = None         # read the run's CFG-sweep point at this scale
    fed_w: float | None = None             # read a w-input run's evaluation fed this w
    pick: str | None = None                # best | worst: choose among `choices` by the mean
    choices: tuple[str, tuple] | None = None  # (param, cfg_scale or fed_w; its candidate values)


@dataclass(frozen=True)
class Claim:
    """One declared comparison of two rows."""

    id: str
    claim: str                             # the paper's wording
    paper: str                             # the paper's numbers (text)
    studies: tuple[str, ...]               # study spec files (or names) whose runs it reads
    metric: str                            # fid, is, in_class, ...
    kind: str                              # better | equivalent
    margin: float                          # equivalent: |A - B| <= margin, in the metric's units
    a: Side
    b: Side
    source: str = ""                       # `file:claims[i]`, for errors found when reading the runs


@dataclass
class Row:
    """One side, measured: per training seed the run's value, and the row's estimate."""

    text: str                              # what was read, generated from the selector
    seeds: dict[int, float]                # training seed -> run value (mean over its sample seeds)
    est: Estimate | None                   # None when not measured
    model: str = ""                        # model and scale of the runs (from the runs)
    missing: str = ""                      # why it is not measured


@dataclass
class Result:
    """A claim's two rows, their difference and the verdict."""

    claim: Claim
    a: Row
    b: Row
    diff: Difference | None
    verdict: str


# ----------------------------------------------------------------------------- the claims file


def load_claims(path: str | Path) -> list[Claim]:
    """Read and validate a claims file; errors are one-line `file:claims[i].field: ...` ConfigErrors."""
    raw = load_yaml(path)
    src = str(path)
    if set(raw) != {"claims"} or not isinstance(raw["claims"], list) or not raw["claims"]:
        raise ConfigError(f"{src}:claims: expected one top-level key `claims` with a non-empty list")
    claims = [_claim(c, f"{src}:claims[{i}]", Path(path).parent) for i, c in enumerate(raw["claims"])]
    ids = [c.id for c in claims]
    for i, cid in enumerate(ids):
        if cid in ids[:i]:
            raise ConfigError(f"{src}:claims[{i}].id: {cid!r} is used twice (ids are unique)")
    return claims


def _claim(raw: Any, where: str, folder: Path) -> Claim:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(sorted(CLAIM_KEYS))}")
    _no_unknown(raw, CLAIM_KEYS, where)
    texts = {k: _text(raw, k, where) for k in ("id", "claim", "paper")}
    studies = raw.get("studies")
    if not isinstance(studies, list) or not studies or not all(isinstance(s, str) for s in studies):
        raise ConfigError(f"{where}.studies: expected a non-empty list of study spec files (or study names)")
    studies = [_spec_path(s, folder, f"{where}.studies[{j}]") for j, s in enumerate(studies)]
    metric = raw.get("metric")
    if metric not in LOWER_IS_BETTER:
        raise ConfigError(f"{where}.metric: {metric!r} has no known direction (allowed: {', '.join(LOWER_IS_BETTER)})")
    kind = raw.get("kind", "better")
    if kind not in KINDS:
        raise ConfigError(f"{where}.kind: {kind!r} is not a comparison kind (allowed: {', '.join(KINDS)})")
    margin = raw.get("margin")
    if kind == "equivalent" and not (_is_number(margin) and margin > 0):
        raise ConfigError(f"{where}.margin: kind equivalent needs a margin > 0 in the metric's units, got {margin!r}")
    if kind == "better" and margin is not None:
        raise ConfigError(f"{where}.margin: only a kind: equivalent claim has a margin")
    sides = [_side(raw.get(k), f"{where}.{k}", studies) for k in ("a", "b")]
    return Claim(texts["id"], texts["claim"], texts["paper"], tuple(studies), metric, kind,
                 float(margin or 0.0), *sides, source=where)


def _side(raw: Any, where: str, studies: list[str]) -> Side:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(sorted(SIDE_KEYS))}")
    _no_unknown(raw, SIDE_KEYS, where)
    params = raw.get("where", {})
    if not isinstance(params, dict):
        raise ConfigError(f"{where}.where: expected a mapping of param: value, e.g. {{objective.w: 1.5}}")
    for key, value in params.items():
        _check_param(key, value, f"{where}.where.{key}")
    study = raw.get("study")
    if study is not None and study not in studies:
        raise ConfigError(f"{where}.study: {study!r} is not one of the claim's studies ({', '.join(studies)})")
    measures = {k: raw[k] for k in MEASURES if raw.get(k) is not None}
    for key, value in measures.items():
        if not _is_number(value):
            raise ConfigError(f"{where}.{key}: expected a number, got {value!r}")
    if len(measures) > 1:
        raise ConfigError(f"{where}.fed_w: give cfg_scale or fed_w, not both")
    pick, choices = _choices(raw, where, params, measures)
    return Side(dict(params), study, measures.get("cfg_scale"), measures.get("fed_w"), pick, choices)


def _choices(raw: dict, where: str, params: dict, measures: dict) -> tuple[str | None, tuple | None]:
    """`best_of` / `worst_of`: {one param, cfg_scale or fed_w: [values]}."""
    given = [k for k in ("best_of", "worst_of") if raw.get(k) is not None]
    if not given:
        return None, None
    field = f"{where}.{given[0]}"
    if len(given) > 1:
        raise ConfigError(f"{where}.worst_of: give best_of or worst_of, not both")
    of = raw[given[0]]
    if not isinstance(of, dict) or len(of) != 1 or not isinstance(next(iter(of.values())), list) \
            or len(next(iter(of.values()))) < 2:
        raise ConfigError(f"{field}: expected one setting with a list of >= 2 values, e.g. {{objective.w: [1.25, 1.5]}}")
    key, values = next(iter(of.items()))
    if key in MEASURES:
        if measures:
            raise ConfigError(f"{field}.{key}: the side already reads {next(iter(measures))}; choose over one of them")
        if not all(_is_number(v) for v in values):
            raise ConfigError(f"{field}.{key}: expected numbers, got {values!r}")
    else:
        if key in params:
            raise ConfigError(f"{field}.{key}: also fixed in `where`; choose over it or fix it, not both")
        for v in values:
            _check_param(key, v, f"{field}.{key}")
    return given[0][:-3], (key, tuple(values))


def _known_params() -> set[str]:
    return set(T.flatten(TrainConfig().to_dict()))


def _check_param(key: Any, value: Any, where: str) -> None:
    if not isinstance(key, str) or not (key in _known_params() or key.startswith("mgbench.")):
        raise ConfigError(f"{where}: not a trainer config field (a dotted name such as objective.w) "
                          "nor an mgbench.* tag")
    if not (value is None or isinstance(value, (bool, int, float, str)) or
            (isinstance(value, list) and all(isinstance(v, (int, float)) for v in value))):
        raise ConfigError(f"{where}: expected a number, bool, text, null or a list of numbers, got {value!r}")


def _spec_path(value: str, folder: Path, where: str) -> str:
    """A spec file as given (relative to the current folder), else relative to the claims file; a name stays."""
    if not value.endswith((".yaml", ".yml")) or Path(value).is_file():
        return value
    if (folder / value).is_file():
        return str(folder / value)
    raise ConfigError(f"{where}: no spec file {value!r} (relative to the current folder or to the claims file)")


def _text(raw: dict, key: str, where: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}.{key}: expected a non-empty text")
    if key == "id" and not re.fullmatch(r"[A-Za-z0-9_.\-]+", value):
        raise ConfigError(f"{where}.id: {value!r}: use letters, digits, '_', '-', '.'")
    return value.strip()


def _no_unknown(raw: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(raw) - allowed, key=str)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------- measuring the rows


@dataclass
class StudyRuns:
    """A study's trial runs, or why there are none."""

    value: str                             # as the claims file names it (spec file or name)
    name: str                              # the study's name
    runs: pd.DataFrame | None              # None: the study has not been run (no store, no experiment)
    missing: str = ""

    def run_hint(self) -> str:
        """The command that produces this study's runs."""
        return f"`mgbench study run {self.value}`" if self.value.endswith((".yaml", ".yml")) else f"study {self.name}"


def load_study(value: str, tracking_uri: str | None = None) -> StudyRuns:
    """A study's runs (spec file or name, resolved as `mgbench report --study` does); never creates a store."""
    from mgbench.report.renderers import resolve_studies

    (name, uri), = resolve_studies([value], tracking_uri)
    if uri and uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).expanduser().is_file():
        return StudyRuns(value, name, None, "no tracking store")
    try:
        return StudyRuns(value, name, L.load_runs(uri, name))
    except LookupError:
        return StudyRuns(value, name, None, "not in its tracking store")


def measured_name(metric: str, cfg_scale: float | None, fed_w: float | None) -> str:
    """The tracked metric a side reads: the run's own evaluation, a CFG-sweep point or a fed-w point."""
    if cfg_scale is not None:
        return T.metric_sweep(cfg_scale, metric)
    if fed_w is not None:
        return T.metric_wsweep(fed_w, metric)
    return T.metric_eval(metric)


def _equal(have: Any, want: Any) -> bool:
    """A run's (typed) param value equals a declared one: numbers to 1e-9, bools as bools, lists elementwise."""
    absent = have is None or have is pd.NA or (isinstance(have, float) and math.isnan(have))
    if want is None or absent:
        return want is None and absent
    if isinstance(want, bool) or isinstance(have, (bool, np.bool_)):
        return isinstance(have, (bool, np.bool_)) and isinstance(want, bool) and bool(have) == want
    if isinstance(want, list):
        return isinstance(have, tuple) and len(have) == len(want) and all(map(_equal, have, want))
    if isinstance(want, (int, float)):
        return isinstance(have, (int, float, np.number)) and math.isclose(float(have), want, rel_tol=1e-9, abs_tol=1e-12)
    return str(have) == want


def _select(runs: pd.DataFrame, where: dict[str, Any]) -> pd.DataFrame:
    keep = np.array(runs[L.STATUS] == "finished", dtype=bool)
    for key, want in where.items():
        column = runs[key].astype(object) if key in runs else pd.Series([None] * len(runs), index=runs.index)
        keep &= np.array([_equal(v, want) for v in column], dtype=bool)
    return runs[keep]


def _run_values(runs: pd.DataFrame, name: str) -> list[tuple[Any, float, float, int]]:
    """Per run with a value: (training seed, mean, SE, K) over its sample seeds (report.values.run_values)."""
    from mgbench.report.values import run_values

    v = run_values(runs, {"v": name})
    seeds = runs[L.P_SEED].tolist() if L.P_SEED in runs else [None] * len(runs)
    return [(s, float(m), float(se), int(k)) for s, m, se, k in zip(seeds, v["v"], v["v_se"], v["v_k"])
            if math.isfinite(m)]


def side_text(where: dict[str, Any], cfg_scale: float | None = None, fed_w: float | None = None) -> str:
    """A side's settings in short names (`w=1.50, CFG s=1.00`), generated from its selector."""
    parts = [T.trial_run_name(where)] if where else []
    parts += [f"CFG s={cfg_scale:.2f}"] if cfg_scale is not None else []
    parts += [f"fed w={fed_w:.2f}"] if fed_w is not None else []
    return ", ".join(parts) or "all runs"


def _measure_one(claim: Claim, where: dict[str, Any], cfg_scale: float | None, fed_w: float | None,
                 studies: list[StudyRuns], field: str) -> Row:
    """One setting: its finished runs in the side's studies -> per-seed values and the row's estimate."""
    text = side_text(where, cfg_scale, fed_w)
    name = measured_name(claim.metric, cfg_scale, fed_w)
    present = [s.runs for s in studies if s.runs is not None and not s.runs.empty]
    runs = _select(pd.concat(present, ignore_index=True, sort=False), where) if present else pd.DataFrame()
    values = _run_values(runs, name) if not runs.empty else []
    if not values:
        absent = [s for s in studies if s.runs is None]
        why = "; ".join(f"{s.name} not run ({s.missing}): run {s.run_hint()}" for s in absent) if absent else \
            f"no finished run of `{text}` logs `{name}` in {', '.join(s.name for s in studies)}: " \
            f"run (or extend) {' / '.join(s.run_hint() for s in studies)}"
        return Row(text, {}, None, missing=why)
    # Runs without a training seed get their own key (-1, -2, ...): they are never paired.
    seeds = [int(v[0]) if v[0] is not None and v[0] is not pd.NA else -1 - i for i, v in enumerate(values)]
    if len(set(seeds)) < len(seeds):
        raise ConfigError(f"{claim.source}.{field}.where: {len(seeds)} runs for {len(set(seeds))} training seeds; "
                          f"add the params that tell them apart ({', '.join(_differing(runs)) or 'none differ'})")
    by_seed = {s: v[1] for s, v in zip(seeds, values)}
    est = estimate([v[1] for v in values], [v[2] for v in values], k=min(v[3] for v in values))
    first = runs.iloc[0]
    from mgbench.report.specs import model_label

    model = f"{model_label(first.get(L.P_ARCH), first.get(L.P_FORMULATION))}, {first.get(T.TAG_SCALE) or '?'}"
    return Row(text, by_seed, est, model=model)


def _differing(runs: pd.DataFrame) -> list[str]:
    """Params (and the study tag) whose values differ among some runs."""
    cols = [c for c in runs.columns if (c in _known_params() or c == T.TAG_STUDY) and c != L.P_SEED]
    return [c for c in cols if runs[c].astype(str).nunique() > 1]


def measure(claim: Claim, side: Side, field: str, data: dict[str, StudyRuns]) -> Row:
    """A side's row; for best_of / worst_of, the candidate with the best (worst) mean, said in its text."""
    studies = [data[side.study]] if side.study else [data[s] for s in claim.studies]
    if side.choices is None:
        return _measure_one(claim, side.where, side.cfg_scale, side.fed_w, studies, field)
    key, values = side.choices
    rows = []
    for v in values:
        where = side.where if key in MEASURES else {**side.where, key: v}
        cfg = v if key == "cfg_scale" else side.cfg_scale
        fed = v if key == "fed_w" else side.fed_w
        rows.append((v, _measure_one(claim, where, cfg, fed, studies, field)))
    short = {"cfg_scale": "CFG s", "fed_w": "fed w"}.get(key) or side_text({key: 0}).split("=")[0]
    fixed = side_text(side.where, side.cfg_scale, side.fed_w) if side.where or side.cfg_scale or side.fed_w else ""
    among = f"{fixed + ', ' if fixed else ''}{side.pick} of {short} in {{{', '.join(map(_plain, values))}}}"
    found = [(v, r) for v, r in rows if r.est is not None]
    if not found:
        return Row(among, {}, None, missing=rows[0][1].missing)
    better_low = LOWER_IS_BETTER[claim.metric] == (side.pick == "best")
    v, chosen = min(found, key=lambda vr: vr[1].est.mean if better_low else -vr[1].est.mean)
    chosen.text = f"{among} by mean ({len(found)} of {len(rows)} measured): {short}={_plain(v)}"
    return chosen


def _plain(value: Any) -> str:
    return f"{value:g}" if _is_number(value) else str(value)


def evaluate(claim: Claim, data: dict[str, StudyRuns]) -> Result:
    """Measure both sides, compare them and read the verdict from the interval."""
    a, b = measure(claim, claim.a, "a", data), measure(claim, claim.b, "b", data)
    if a.est is None or b.est is None:
        return Result(claim, a, b, None, f"{NOT_MEASURED}: {a.missing or b.missing}")
    d = compare(a.seeds, b.seeds, a.est, b.est)
    return Result(claim, a, b, d, verdict(d, claim.kind, LOWER_IS_BETTER[claim.metric], claim.margin))


def evaluate_claims(claims: list[Claim], tracking_uri: str | None = None) -> list[Result]:
    """Every claim's result; each study is loaded once."""
    data: dict[str, StudyRuns] = {}
    for claim in claims:
        for value in claim.studies:
            if value not in data:
                data[value] = load_study(value, tracking_uri)
    return [evaluate(c, data) for c in claims]
