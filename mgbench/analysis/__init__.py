"""Analyses across runs: MG against CFG along the guidance frontier (effective CFG scale, gap at matched diversity)."""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Curve", "cfg_curve", "curve_summary", "default_axes", "effective_scale", "frontier_table",
           "match_diversity"]


def __getattr__(name: str) -> Any:
    """The names of `__all__`, from mgbench.analysis.frontier on first use (pandas loads only when needed)."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module("mgbench.analysis.frontier"), name)
