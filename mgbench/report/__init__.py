"""Reports: MLflow trial runs -> tidy DataFrame -> the paper's Tables 1-8 and Figures 2, 4, 5, 6.

The package's names load on first use (pandas and scipy take about a second), so `mgbench report --help` and a
spec naming report items do not pay for them.
"""
from __future__ import annotations

from typing import Any

_LAZY = {"load_runs": "mgbench.report.load", "write_table": "mgbench.report.render",
         "build_table": "mgbench.report.tables", "prepare_runs": "mgbench.report.tables"}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'mgbench.report' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
