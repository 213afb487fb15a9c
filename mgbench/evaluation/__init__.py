"""Evaluation: samples for evaluation, torch-fidelity metrics (FID, sFID, IS, KID, precision/recall), grid2d metrics, IMG/S.

Entry points: `make_eval_hook(cfg)` (the trainer's hook), `cli.add_eval_parser` / `cli.run_eval`
(`mgbench eval`). Importing `mgbench.evaluation.extractors` registers mgbench's extractors with
torch-fidelity.
"""
from __future__ import annotations


def make_eval_hook(cfg):
    """The trainer's evaluation hook for `cfg` (see evaluation.hook)."""
    from mgbench.evaluation.hook import make_eval_hook as make

    return make(cfg)
