"""MG against CFG along the guidance frontier: each MG model's effective CFG scale and its quality gap.

A vanilla model swept over CFG scales s traces a quality-versus-diversity curve (one per seed). An MG
model is one point (q, d) per seed. Comparing MG at one w with CFG at one s can make either look
better; the honest comparison is at matched diversity (notes/method.md):

- s*: the CFG scale at which the mean vanilla curve (same training steps) has the MG model's mean
  diversity, by linear interpolation along s between neighbouring scales.
- gap: MG quality minus CFG quality interpolated at s* (raw metric units; its sign is read with the
  metric's direction, e.g. FID and off_support lower is better).
- CIs: percentile bootstrap over vanilla seeds and MG seeds independently. With few seeds the plain
  percentile interval is too narrow, so by default it is *expanded* (Hesterberg 2015): the tail
  share alpha' is chosen so that z(alpha'/2) = sqrt(n/(n-1)) t(alpha/2, n-1), n = min(#vanilla, #MG
  seeds). One seed on either side gives no CI (NaN and a reason).

Non-monotone curves: every segment [s_i, s_i+1] whose diversities bracket the target is a candidate;
the one whose interpolated quality is nearest the MG quality is taken (ties: the smaller s), and the
count of candidates is reported (`n_cross` > 1 flags an ambiguous match, e.g. a coverage plateau).
Out of range: when no segment brackets the target, s* is NaN and `out_of_range` names the end of
the curve the MG point lies beyond ("below_min_scale": more diverse than the least-guided CFG point,
"above_max_scale": less diverse than the most-guided one), `s_clamped` is that end's scale, the gap
is NaN and `reason` says so. In the bootstrap such replicates count as s = -inf / +inf, so a CI
bound that depends on them reads as open (-inf / inf), and their share is `boot_out_share`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mgbench.metric_registry import axis_metrics, metric_info

DEFAULT_AXES = {"grid2d": ("off_support", "swd"), "images": ("fid", "recall")}

# Columns of the long "points" table every function here reads.
POINT_COLUMNS = ["model", "method", "w", "seed", "step", "scale", "quality", "diversity", "nfe_per_step",
                 "implied_scale"]
# method: "cfg" (a vanilla model at CFG scale `scale`) | "mg" (an MG model at its configured sampling)

RESULT_COLUMNS = ["model", "w", "step", "implied_scale", "s_star", "s_lo", "s_hi", "mg_diversity", "mg_quality",
                  "cfg_quality", "gap", "gap_lo", "gap_hi", "better", "nfe_mg", "nfe_cfg", "n_mg", "n_cfg",
                  "n_cross", "out_of_range", "s_clamped", "boot_out_share", "reason"]


def default_axes(dataset: str) -> tuple[str, str]:
    """(quality, diversity) metric names for a dataset: grid2d -> off_support/swd, images -> fid/recall."""
    return DEFAULT_AXES["grid2d" if dataset == "grid2d" else "images"]


def higher_is_better(metric: str) -> bool:
    """Direction of a quality or diversity metric (mgbench.metric_registry); other metrics are an error naming the
    known ones."""
    axes = axis_metrics("quality") + axis_metrics("diversity")
    if metric not in axes:
        raise ValueError(f"unknown metric {metric!r} (known: {', '.join(axes)})")
    return metric_info(metric).higher_is_better


@dataclass
class Curve:
    """A vanilla model's CFG curve: per seed (rows) and scale (columns), quality and diversity."""

    scales: np.ndarray     # (S,) increasing CFG scales
    quality: np.ndarray    # (K, S)
    diversity: np.ndarray  # (K, S)
    seeds: list[Any]       # the K seeds
    nfe_per_step: float = 2.0  # median network forwards per sampling step over the guided points

    def mean(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean quality and diversity over seeds, per scale."""
        return self.quality.mean(axis=0), self.diversity.mean(axis=0)


def cfg_curve(points: pd.DataFrame, step: Any = None) -> Curve:
    """The CFG curve from `cfg` points (of one step when given); scales missing for some seed are dropped."""
    cfg = points[points["method"] == "cfg"]
    if step is not None:
        cfg = cfg[cfg["step"] == step]
    if cfg.empty:
        raise ValueError(f"no CFG points{'' if step is None else f' at step {step}'}")
    q = cfg.pivot_table(index="seed", columns="scale", values="quality", aggfunc="mean").dropna(axis=1)
    d = cfg.pivot_table(index="seed", columns="scale", values="diversity", aggfunc="mean").dropna(axis=1)
    scales = sorted(set(q.columns) & set(d.columns))
    if len(scales) < 2:
        raise ValueError(f"the CFG curve needs at least 2 scales shared by all seeds, got {scales}")
    guided = cfg[cfg["scale"] > 0]["nfe_per_step"].dropna()
    nfe = float(guided.median()) if len(guided) else 2.0
    return Curve(np.asarray(scales, float), q[scales].to_numpy(float), d[scales].to_numpy(float),
                 list(q.index), nfe)


def match_diversity(scales: np.ndarray, diversity: np.ndarray, quality: np.ndarray, target_d: np.ndarray,
                    target_q: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per row b: the scale where the piecewise-linear curve s -> diversity[b] reaches target_d[b].

    Returns arrays (B,): s, q (curve quality there), n_cross (bracketing segments), side (0 in range,
    -1 beyond the smallest-scale end, +1 beyond the largest-scale end).
    """
    d0, d1 = diversity[:, :-1], diversity[:, 1:]
    t = np.asarray(target_d, float)[:, None]
    bracket = (t >= np.minimum(d0, d1)) & (t <= np.maximum(d0, d1))
    span = d1 - d0
    frac = np.where(span != 0, (t - d0) / np.where(span != 0, span, 1.0), 0.0)  # flat segment: its left end
    s = scales[:-1] + frac * np.diff(scales)
    q = quality[:, :-1] + frac * (quality[:, 1:] - quality[:, :-1])
    cost = np.broadcast_to(s, q.shape) if target_q is None else np.abs(q - np.asarray(target_q, float)[:, None])
    best = np.argmin(np.where(bracket, cost, np.inf), axis=1)  # first minimum = the smaller s on ties
    rows = np.arange(len(t))
    found = bracket.any(axis=1)
    side = np.where(found, 0, np.where(np.abs(t[:, 0] - diversity[:, 0]) <= np.abs(t[:, 0] - diversity[:, -1]), -1, 1))
    return {"s": np.where(found, s[rows, best], np.nan), "q": np.where(found, q[rows, best], np.nan),
            "n_cross": bracket.sum(axis=1), "side": side}


def expanded_alpha(alpha: float, n: int) -> float:
    """Tail share for an expanded percentile interval: z(a'/2) = sqrt(n/(n-1)) * t(alpha/2, n-1)."""
    from scipy import stats

    if n < 2:
        return math.nan
    t = stats.t.ppf(1 - alpha / 2, n - 1) * math.sqrt(n / (n - 1))
    return float(2 * stats.norm.sf(t))


def _interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    """Percentile interval without interpolation (lower/higher order statistics); NaNs are skipped."""
    v = values[~np.isnan(values)]
    if len(v) == 0 or not math.isfinite(alpha):
        return math.nan, math.nan
    return float(np.quantile(v, alpha / 2, method="lower")), float(np.quantile(v, 1 - alpha / 2, method="higher"))


_SIDES = {-1: "below_min_scale", 1: "above_max_scale"}


def effective_scale(curve: Curve, mg_quality: np.ndarray, mg_diversity: np.ndarray, level: float = 0.9,
                    n_boot: int = 2000, seed: int = 0, expand: bool = True) -> dict[str, Any]:
    """s*, the quality gap at matched diversity and their bootstrap CIs for one MG model against one curve."""
    mq, md = np.asarray(mg_quality, float), np.asarray(mg_diversity, float)
    qbar, dbar = curve.mean()
    est = match_diversity(curve.scales, dbar[None], qbar[None], np.array([md.mean()]), np.array([mq.mean()]))
    s_star, side = float(est["s"][0]), int(est["side"][0])
    out: dict[str, Any] = {
        "s_star": s_star, "mg_diversity": float(md.mean()), "mg_quality": float(mq.mean()),
        "cfg_quality": float(est["q"][0]), "gap": float(mq.mean() - est["q"][0]), "n_cross": int(est["n_cross"][0]),
        "out_of_range": _SIDES.get(side, ""), "s_clamped": s_star if side == 0 else
        float(curve.scales[0] if side < 0 else curve.scales[-1]), "n_mg": len(md), "n_cfg": len(curve.seeds)}
    out["reason"] = _reason(out, dbar) if side else ""
    out.update(_bootstrap(curve, mq, md, level, n_boot, seed, expand))
    if out["n_mg"] < 2 or out["n_cfg"] < 2:
        out["reason"] = "; ".join(r for r in (out["reason"], "one seed on a side: no CI") if r)
    return out


def _reason(out: dict[str, Any], dbar: np.ndarray) -> str:
    lo, hi = float(dbar.min()), float(dbar.max())
    where = "less" if out["out_of_range"] == "below_min_scale" else "more"
    return (f"MG diversity {out['mg_diversity']:.4g} outside the CFG curve's [{lo:.4g}, {hi:.4g}]: "
            f"{where} guided than CFG s={out['s_clamped']:.2f}")


def _bootstrap(curve: Curve, mq: np.ndarray, md: np.ndarray, level: float, n_boot: int, seed: int,
               expand: bool) -> dict[str, float]:
    """Percentile (expanded) bootstrap CIs of s* and the gap, resampling vanilla and MG seeds."""
    rng = np.random.default_rng(seed)
    k, j = len(curve.seeds), len(md)
    iv, im = rng.integers(0, k, (n_boot, k)), rng.integers(0, j, (n_boot, j))
    dq, dd = curve.quality[iv].mean(axis=1), curve.diversity[iv].mean(axis=1)
    bq, bd = mq[im].mean(axis=1), md[im].mean(axis=1)
    m = match_diversity(curve.scales, dd, dq, bd, bq)
    s = np.where(m["side"] == 0, m["s"], np.where(m["side"] < 0, -np.inf, np.inf))
    alpha = 1 - level
    if expand:
        alpha = expanded_alpha(alpha, min(k, j))
    elif min(k, j) < 2:
        alpha = math.nan
    s_lo, s_hi = _interval(s, alpha)
    gap_lo, gap_hi = _interval(bq - m["q"], alpha)
    return {"s_lo": s_lo, "s_hi": s_hi, "gap_lo": gap_lo, "gap_hi": gap_hi,
            "boot_out_share": float((m["side"] != 0).mean())}


def verdict(gap: float, lo: float, hi: float, metric: str) -> str:
    """mg | cfg | tie (the CI covers 0) | "" (no CI): which side is better at matched diversity."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return ""
    if lo <= 0 <= hi:
        return "tie"
    return "mg" if (gap > 0) == higher_is_better(metric) else "cfg"


def frontier_table(points: pd.DataFrame, quality_metric: str, level: float = 0.9, n_boot: int = 2000,
                   seed: int = 0, expand: bool = True) -> pd.DataFrame:
    """One row per MG model and training step: s* beside the fixed-point prediction, the gap, their CIs."""
    rows = []
    mg = points[points["method"] == "mg"]
    for (model, step), grp in mg.groupby(["model", "step"], sort=True):
        row: dict[str, Any] = {"model": model, "w": float(grp["w"].iloc[0]), "step": step,
                               "implied_scale": float(grp["implied_scale"].iloc[0]),
                               "nfe_mg": float(grp["nfe_per_step"].median())}
        try:
            curve = cfg_curve(points, step)
        except ValueError as e:
            rows.append({**row, "n_mg": len(grp), "reason": f"{e} (compare at equal steps)"})
            continue
        res = effective_scale(curve, grp["quality"].to_numpy(), grp["diversity"].to_numpy(), level, n_boot,
                              seed, expand)
        res["better"] = verdict(res["gap"], res["gap_lo"], res["gap_hi"], quality_metric)
        rows.append({**row, **res, "nfe_cfg": curve.nfe_per_step})
    return pd.DataFrame(rows, columns=RESULT_COLUMNS).sort_values(["w", "model", "step"], kind="stable",
                                                                  ignore_index=True)


def curve_summary(points: pd.DataFrame) -> pd.DataFrame:
    """Per step and CFG scale: mean and SD over seeds of quality and diversity (what the figure draws)."""
    cfg = points[points["method"] == "cfg"]
    g = cfg.groupby(["step", "scale"], sort=True)
    out = g.agg(quality=("quality", "mean"), quality_sd=("quality", "std"), diversity=("diversity", "mean"),
                diversity_sd=("diversity", "std"), n=("seed", "nunique"),
                nfe_per_step=("nfe_per_step", "median")).reset_index()
    return out.fillna({"quality_sd": 0.0, "diversity_sd": 0.0})


def interpolation_error_bound(h: float, d1_min: float, d2_max: float, q1_max: float,
                              q2_max: float) -> tuple[float, float]:
    """Worst-case error of s* and of the gap from linear interpolation on a scale grid of spacing h.

    For smooth curves D(s), Q(s) with |D'| >= d1_min, |D''| <= d2_max, |Q'| <= q1_max, |Q''| <= q2_max on the
    bracketing segment: |s* - s| <= h^2 d2_max / (8 d1_min) and |gap| <= q1_max |s* - s| + h^2 q2_max / 8
    for a point exactly on the curve (the linear-interpolation remainder h^2/8 max|f''|).
    """
    s_err = h * h * d2_max / (8 * d1_min)
    return s_err, q1_max * s_err + h * h * q2_max / 8
