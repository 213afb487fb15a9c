"""Analyses across runs: MG against CFG along the guidance frontier (effective CFG scale, gap at matched diversity)."""
from mgbench.analysis.frontier import (Curve, cfg_curve, curve_summary, default_axes, effective_scale,
                                       frontier_table, match_diversity)

__all__ = ["Curve", "cfg_curve", "curve_summary", "default_axes", "effective_scale", "frontier_table",
           "match_diversity"]
