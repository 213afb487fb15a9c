"""Uncertainty of measured rows and verdicts from declared comparisons (the statistics behind every report).

A row rests on n training seeds (runs), each evaluated at K sample seeds. A run's value is the mean over
its K sample seeds; the row's value is the mean over its runs. Its standard error is the spread of the
run values over sqrt(n), which holds both the training-seed and the sampling noise; with one run it
falls back to the run's own SE over its K sample seeds (sampling noise only, said as such).

Two rows are compared through the difference of their values with a t confidence interval: paired by
training seed when both rows have the same seeds (>= 2 of them), else Welch's interval. A verdict is
read from that interval and nothing else:
- `better`: the claim "A is better than B" holds when the whole interval favours A, does not hold when
  the whole interval favours B, and is not resolved at this n when it contains 0;
- `equivalent`: the claim "A is within +-margin of B" holds when the whole interval lies inside
  [-margin, margin], does not hold when it lies wholly outside, and is not resolved otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import stats as _st

HOLDS, FAILS, UNRESOLVED = "holds", "does not hold", "not resolved at this n"


@dataclass(frozen=True)
class Estimate:
    """A row's value with its uncertainty and what it rests on."""

    mean: float
    se: float              # standard error (nan when it cannot be estimated)
    df: float              # degrees of freedom of the t interval (0: none)
    n_runs: int            # training seeds
    n_sample_seeds: int    # sample seeds per run (K)
    sampling_only: bool    # the SE holds only the sampling noise (one run)

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        """The two-sided t confidence interval of the mean."""
        return t_interval(self.mean, self.se, self.df, level)

    @property
    def n_text(self) -> str:
        """`3x5`: training seeds x sample seeds."""
        return f"{self.n_runs}x{self.n_sample_seeds}"


@dataclass(frozen=True)
class Difference:
    """A - B with its confidence interval."""

    diff: float
    low: float
    high: float
    se: float
    df: float
    paired: bool
    level: float


def t_interval(mean: float, se: float, df: float, level: float = 0.95) -> tuple[float, float]:
    """mean -+ t_{df} * se; (nan, nan) without a standard error."""
    if not (math.isfinite(se) and df > 0):
        return (math.nan, math.nan)
    half = float(_st.t.ppf(0.5 + level / 2, df)) * se
    return (mean - half, mean + half)


def run_value(seed_values: Sequence[float]) -> tuple[float, float, int]:
    """One run's (mean, SE, K) over its sample seeds; SE is nan with K < 2."""
    v = np.asarray([x for x in seed_values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return (math.nan, math.nan, 0)
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan
    return (float(v.mean()), se, len(v))


def estimate(run_means: Sequence[float], run_ses: Sequence[float] | None = None, k: int = 1) -> Estimate:
    """A row's estimate from its runs' values (and, for a single run, that run's SE over its k sample seeds)."""
    m = np.asarray([x for x in run_means if x is not None and math.isfinite(x)], dtype=float)
    if len(m) == 0:
        return Estimate(math.nan, math.nan, 0, 0, k, False)
    if len(m) >= 2:
        return Estimate(float(m.mean()), float(m.std(ddof=1) / math.sqrt(len(m))), len(m) - 1, len(m), k, False)
    se = float(run_ses[0]) if run_ses is not None and len(run_ses) and run_ses[0] is not None else math.nan
    return Estimate(float(m[0]), se, (k - 1) if math.isfinite(se) else 0, 1, k, True)


def compare(a: Mapping[int, float], b: Mapping[int, float], a_est: Estimate | None = None,
            b_est: Estimate | None = None, level: float = 0.95) -> Difference:
    """A - B from per-training-seed values {seed: value}; paired when both have the same >= 2 seeds."""
    shared = sorted(set(a) & set(b))
    if len(shared) >= 2 and set(a) == set(b):
        d = np.array([a[s] - b[s] for s in shared], dtype=float)
        se, df = float(d.std(ddof=1) / math.sqrt(len(d))), len(d) - 1
        lo, hi = t_interval(float(d.mean()), se, df, level)
        return Difference(float(d.mean()), lo, hi, se, df, True, level)
    ea = a_est or estimate(list(a.values()))
    eb = b_est or estimate(list(b.values()))
    se = math.sqrt(ea.se ** 2 + eb.se ** 2)
    df = welch_df(ea, eb)
    diff = ea.mean - eb.mean
    lo, hi = t_interval(diff, se, df, level)
    return Difference(diff, lo, hi, se, df, False, level)


def welch_df(a: Estimate, b: Estimate) -> float:
    """Welch-Satterthwaite degrees of freedom of a difference of two estimates."""
    va, vb = a.se ** 2, b.se ** 2
    if not (math.isfinite(va) and math.isfinite(vb)) or a.df <= 0 or b.df <= 0 or va + vb == 0:
        return 0.0
    return (va + vb) ** 2 / (va ** 2 / a.df + vb ** 2 / b.df)


def verdict(d: Difference, kind: str = "better", lower_is_better: bool = True, margin: float = 0.0) -> str:
    """holds | does not hold | not resolved at this n, read from the interval of A - B alone."""
    if not (math.isfinite(d.low) and math.isfinite(d.high)):
        return UNRESOLVED
    if kind == "better":
        favours_a = d.high < 0 if lower_is_better else d.low > 0
        favours_b = d.low > 0 if lower_is_better else d.high < 0
        return HOLDS if favours_a else FAILS if favours_b else UNRESOLVED
    if kind == "equivalent":
        if -margin <= d.low and d.high <= margin:
            return HOLDS
        if d.low > margin or d.high < -margin:
            return FAILS
        return UNRESOLVED
    raise ValueError(f"unknown comparison kind {kind!r} (better | equivalent)")
