"""`mgbench bench`: the paper's speed claims measured as ratios on this machine (and a GPU script)."""
from __future__ import annotations

import importlib
from typing import Any

# Names -> their module, imported on first use (torch loads only when a benchmark runs, not for `bench --help`).
_LAZY = {"bench_harness": "harness", "bench_report_section": "harness", "mlflow_cost": "harness",
         "study_overhead": "harness", "bench_models": "models", "bench_sampling": "sampling", "Check": "timing",
         "Section": "timing", "machine": "timing", "bench_training": "training"}

__all__ = ["Check", "Section", "machine", "bench_sampling", "bench_training", "bench_models", "bench_harness",
           "bench_report_section", "mlflow_cost", "study_overhead"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
