"""Trainer stand-ins for tests and test specs (`entry: mgbench_standins:sleep_train`).

`sleep_train` replaces the trainer when only the scheduling is under test: it sleeps `train.steps` milliseconds
and records when it ran (each execution also appends one line to `executions.jsonl` in its folder, so a trial
that ran twice shows). `failing_train` raises. Job processes import this module by name: tests/conftest.py puts
this folder on PYTHONPATH (inherited by local executor subprocesses and SLURM jobs) and on sys.path.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

EXECUTIONS_FILE = "executions.jsonl"  # sleep_train / failing_train: one line per execution of the trial


def sleep_train(cfg: Any, tracker: Any = None, eval_hook: Any = None) -> Any:
    """A trainer stand-in: sleeps train.steps ms, records start/end in out_dir/timing.json, returns loss = w."""
    from mgbench.trainer.loop import TrainResult

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pid").write_text(str(os.getpid()))
    start = time.time()
    _log_execution(out, start)
    time.sleep(cfg.train.steps / 1000)
    end = time.time()
    (out / "timing.json").write_text(json.dumps({"start": start, "end": end, "pid": os.getpid()}))
    metrics = {"loss": float(cfg.objective.w)}
    if tracker is not None:
        tracker.log_metrics({"eval/loss": metrics["loss"]}, step=cfg.train.steps)
        tracker.flush()
    return TrainResult("finished", cfg.train.steps, str(out), cfg.objective.w, metrics)


def failing_train(cfg: Any, tracker: Any = None, eval_hook: Any = None) -> Any:
    """A trainer stand-in that raises (a trial whose training crashes)."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _log_execution(out, time.time())
    raise RuntimeError(f"{cfg.name}: training diverged at step 0 (failing_train)")


def _log_execution(out: Path, start: float) -> None:
    with open(out / EXECUTIONS_FILE, "a") as f:
        f.write(json.dumps({"start": start, "pid": os.getpid()}) + "\n")
