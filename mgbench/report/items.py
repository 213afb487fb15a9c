"""The report items a study spec or `mgbench report` may name, and where their files go. No imports: a study
spec validates its `report:` list against these names without loading the renderers (pandas, seaborn)."""
from __future__ import annotations

from pathlib import Path

TABLES = [f"table{n}" for n in range(1, 9)]
FIGURES = ["fig2", "fig4", "fig5", "fig6"]
FIGURE_STEMS = {"fig2": "fig2_toy", "fig4": "fig4_cfg_scale", "fig5": "fig5_convergence", "fig6": "fig6_scaling"}
EXTRAS = ["toy", "frontier"]  # the 2D toy table (quickstart); MG against the CFG frontier (effective scale s*)
CLAIMS_OUT = "runs/claims"   # `report claims` without --out (the committed verdicts: --out reports)
ALL = [*TABLES, *FIGURES, "toy"]   # `all`: of these, what the study's runs can fill (the rest: one line each, why)
CHOICES = [*TABLES, *FIGURES, *EXTRAS, "tables", "figures", "all", "claims", "system"]  # claims: verdicts of --claims
# FILE; system: best MG vs best CFG at equal NFE, re-evaluating a table3-style study's checkpoints (report/system.py)


def default_out(study: str) -> Path:
    """Where a study's tables and figures go without --out: beside its runs, not the committed reports/."""
    return Path("runs") / study / "report"


def expand(what: str) -> list[str]:
    """`tables`, `figures` and `all` -> the single items they stand for."""
    return {"tables": TABLES, "figures": FIGURES, "all": ALL}.get(what, [what])
