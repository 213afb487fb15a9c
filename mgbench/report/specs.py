"""What each of the paper's Tables 1-8 compares: which runs, which knob labels a row, how rows sort."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

from mgbench import tracking as T
from mgbench.report import load as L

# The metric columns of the paper's tables: (metric name, header, decimals, higher is better).
METRICS: list[tuple[str, str, int, bool]] = [
    ("fid", "FID", 2, False),
    ("sfid", "sFID", 2, False),
    ("is", "IS", 1, True),
    ("precision", "Prec.", 2, True),
    ("recall", "Rec.", 2, True),
    ("img_per_s", "IMG/S", 2, True),
]
METRIC_COLUMN = {m: T.M_IMG_PER_S if m == "img_per_s" else T.metric_eval(m) for m, *_ in METRICS}
SIZES = ["T", "S", "B", "L", "XL", "XXL"]      # model sizes in the DiT registry, small to large
VARIANT_RANK = {"baseline": 0, "vanilla": 1, "mg": 2, "improve": 3}

# The columns the table specs read from a run (settings, inclusion, model names).
SPEC_COLUMNS = [L.P_GUIDANCE, L.P_ARCH, L.P_FORMULATION, L.P_W, L.P_W_RANGE, L.P_AUTO_W, L.P_LABEL_DROP, L.P_W_INPUT,
                L.P_EMPTY, L.P_DATA, L.P_SIZE, L.VARIANT, T.TAG_SCALE]
# Params that never tell two settings apart (names, folders, seeds, bookkeeping of the loop).
# The evaluation's K and its extra sweeps change how precise a run's value is, or add values beside it, not
# the value itself: runs that differ only there share a row (its Runs cell shows the K it really has).
IGNORED_PARAMS = {"name", "out_dir", "data.cache_dir", "data.path", "data.vae", L.P_SEED, "sample.seed",
                  "train.log_every", "train.ckpt_every", "train.keep_ckpts", "train.max_steps_per_run",
                  "train.device", "sample.n_grid", "eval.sample_seeds", "eval.cfg_sweep", "eval.w_sweep",
                  "objective.implied_cfg_scale"}   # implied s follows from w, the MG fraction and w input

# How a param that splits a row is named in a table: the paper's words, not config keys.
PARAM_WORDS = {
    L.P_W: "w", L.P_W_RANGE: "w range", L.P_AUTO_W: "automatic w", L.P_LABEL_DROP: "lambda",
    L.P_EMPTY: "empty class", L.P_W_INPUT: "w as input", L.P_FORMULATION: "formulation", L.P_ARCH: "model",
    L.P_DATA: "data", L.P_SIZE: "image size", L.P_STEPS: "training steps", L.P_GUIDANCE: "guidance",
    L.P_CFG_SCALE: "CFG s", "objective.mg_fraction": "MG share of batch", "objective.t_high": "MG below t",
    "optim.lr": "learning rate", "optim.batch_size": "batch size", "optim.ema_decay": "EMA decay",
    "sample.steps": "sampling steps", "sample.sampler": "sampler", "eval.n_samples": "eval samples",
}


def param_text(name: str, value: Any) -> str:
    """`lambda=0.1`: a param and its value in words (other params: their last name part, `_` as spaces)."""
    word = PARAM_WORDS.get(name, name.rsplit(".", 1)[-1].replace("_", " "))
    if isinstance(value, (bool, np.bool_)):
        value = "yes" if value else "no"
    elif isinstance(value, float):
        value = f"{value:.4g}"
    return f"{word}={value}"


def model_label(arch: Any, formulation: Any) -> str:
    """The paper's model name: a DiT-* network trained as a flow is the paper's SiT-*."""
    arch = str(arch) if arch is not None and not pd.isna(arch) else "?"
    if arch.startswith("DiT-") and formulation == "flow":
        return "SiT-" + arch[4:]
    return arch


def model_family(model: str, formulation: Any = None) -> str:
    """DiT or SiT (the paper's two blocks); other networks by their formulation."""
    if model.startswith(("DiT", "SiT")):
        return model[:3]
    return "SiT" if formulation == "flow" else "DiT"


def uses_cfg(row: dict[str, Any]) -> bool:
    """Whether the run's evaluation sampled with classifier-free guidance."""
    return "cfg" in str(row.get(L.P_GUIDANCE) or "")


def _yes(value: Any) -> str:
    return "yes" if value is True or (value is not None and value is not pd.NA and bool(value)) else "no"


def _size(row: dict[str, Any]) -> str:
    return "size=" + str(row.get(L.P_ARCH) or "?").split("-", 1)[-1]


def _w_setting(row: dict[str, Any]) -> str:
    auto = row.get(L.P_AUTO_W)
    if auto is True or (auto is not None and auto is not pd.NA and bool(auto)):
        return "w=auto"
    if row.get(L.P_W_RANGE) is not None:
        lo, hi = row[L.P_W_RANGE]
        return f"w~U[{float(lo):.2f},{float(hi):.2f}]"
    return f"w={float(row.get(L.P_W) or 1.0):.2f}"


NATIVE_SIZE = {"digits": 8, "mnist": 28}        # image side of datasets whose size is fixed (data.image_size unused)


def _resolution(row: dict[str, Any]) -> str:
    name = str(row.get(L.P_DATA) or "?")
    if name == "grid2d":
        return name
    size = NATIVE_SIZE.get(name, row.get(L.P_SIZE))
    return f"{name}{size if size is not None and not pd.isna(size) else ''}"


def _number_key(setting: str) -> tuple:
    value = setting.split("=", 1)[-1].lstrip("~U[")
    try:
        return (0, float(value.split(",")[0].rstrip("]")), setting)
    except ValueError:
        return (1, 0.0, setting)     # auto and other words after the numbers


def _size_key(setting: str) -> tuple:
    size = setting.split("=", 1)[-1].split("/")[0]
    return (SIZES.index(size) if size in SIZES else len(SIZES), setting)


def _resolution_key(setting: str) -> tuple:
    digits = "".join(c for c in setting if c.isdigit())
    return (int(digits) if digits else 0, setting)


@dataclass(frozen=True)
class TableSpec:
    """One of the paper's tables: its runs, the knob that names a row, the row order and the scale label."""

    number: int
    title: str
    setting: Callable[[dict[str, Any]], str]          # a run's row label (the ablated knob)
    include: Callable[[dict[str, Any]], bool]         # whether a run belongs in this table
    sort_key: Callable[[str], tuple] = _number_key   # order of settings
    paper_scale: str = "paper: ImageNet 256, 400K steps"
    metrics: tuple[str, ...] = ("fid", "sfid", "is", "precision", "recall")
    improve: bool = False                             # add the IMPROVE row (relative change vs vanilla)
    expect_paper_settings: bool = True                # every paper mg setting is expected of each measured model
    variant_first: bool = True                        # order rows by variant then setting (else setting first)
    best_within: tuple[str, ...] = ("family", "source", "model", "scale")
    notes: tuple[str, ...] = field(default_factory=tuple)
    matched: str = ""                                 # like-for-like rows (report.matched): cfg | w_input | "" (none)


_NO_CFG = (lambda r: not uses_cfg(r))
_W_NOTE = "w counts from 1 as in the paper (w = 1 is vanilla); the weight of the MG term in the target is g = w - 1."
_CFG_MATCH_NOTE = ("Equal w is not equal guidance: an MG model trained at w (g = w - 1 on a fraction f of the batch) "
                   "converges to CFG with s = f g / (1 - f g) (w = 1.5, f = 1: s = 1). Rows `vanilla + CFG s=S "
                   "(matched to w=W)` are the study's vanilla runs sampled with CFG at that s (their CFG sweep), "
                   "beside the MG row they match; shown where s was swept (to two decimals).")
_W_INPUT_MATCH_NOTE = ("Equal nominal w is not equal guidance: a fixed-w model at w (g = w - 1 on a fraction f of the "
                       "batch) converges to CFG s = f g / (1 - f g) (s = (w-1)/(2-w) at f = 1), a w-input model fed w "
                       "to s = w - 1. The w_input=yes row is sampled at the w its evaluation was given (sample.w, else "
                       "objective.w); rows `w_input=yes, fed w=X (matched s=S to w=W)` are the same runs fed the w of "
                       "equal strength (from their w sweep, where swept to two decimals); `best fed w` is the swept w "
                       "with the lowest FID, chosen on the same data (optimistic).")

SPECS: dict[int, TableSpec] = {
    1: TableSpec(1, "System-level comparison without CFG", lambda r: "cfg" if uses_cfg(r) else "no-cfg",
                 _NO_CFG, paper_scale="paper: ImageNet 256", improve=True, variant_first=False,
                 metrics=("fid", "sfid", "is", "precision", "recall", "img_per_s"), best_within=("source", "scale"),
                 notes=("IMG/S depends on the hardware; the ratio carries over: MG needs one forward per step, "
                        "CFG two.",)),
    2: TableSpec(2, "System-level comparison with CFG (MG rows without CFG)",
                 lambda r: "cfg" if uses_cfg(r) else "no-cfg",
                 lambda r: uses_cfg(r) == (r[L.VARIANT] == "vanilla"), paper_scale="paper: ImageNet 256",
                 improve=True, variant_first=False, best_within=("source", "scale"),
                 metrics=("fid", "sfid", "is", "precision", "recall", "img_per_s")),
    3: TableSpec(3, "Ablation: guidance scale w", _w_setting, _NO_CFG, notes=(_W_NOTE, _CFG_MATCH_NOTE),
                 matched="cfg"),
    4: TableSpec(4, "Ablation: label drop rate lambda",
                 lambda r: f"lambda={float(r.get(L.P_LABEL_DROP) or 0.0):.2f}", _NO_CFG),
    5: TableSpec(5, "Ablation: w as a model input", lambda r: "w_input=" + _yes(r.get(L.P_W_INPUT)), _NO_CFG,
                 sort_key=lambda s: (s.endswith("yes"), s), notes=(_W_INPUT_MATCH_NOTE,), matched="w_input"),
    6: TableSpec(6, "Ablation: keeping the empty class", lambda r: "empty_class=" + _yes(r.get(L.P_EMPTY)), _NO_CFG,
                 sort_key=lambda s: (s.endswith("yes"), s)),
    7: TableSpec(7, "Ablation: model size", _size, _NO_CFG, sort_key=_size_key, expect_paper_settings=False,
                 variant_first=False, best_within=("family", "source", "scale")),
    8: TableSpec(8, "Higher resolution", _resolution, _NO_CFG,
                 sort_key=_resolution_key, paper_scale="paper: ImageNet 512", expect_paper_settings=False,
                 variant_first=False, best_within=("family", "source", "scale")),
}
