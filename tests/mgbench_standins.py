"""Trainer stand-ins for tests and test specs (`entry: mgbench_standins:sleep_train`).

`sleep_train` replaces the trainer when only the scheduling is under test: it sleeps `train.steps` milliseconds
and records when it ran (each execution also appends one line to `executions.jsonl` in its folder, so a trial
that ran twice shows). `failing_train` raises. `probe_train` and `crashing_train` record which process ran them
and which imported this module (a warm local job's zygote, or the job itself). Job processes import this module by
name: tests/conftest.py puts this folder on PYTHONPATH (inherited by local executor subprocesses and SLURM jobs) and
on sys.path.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

EXECUTIONS_FILE = "executions.jsonl"  # sleep_train / failing_train: one line per execution of the trial
PROBE_FILE = "probe.json"             # probe_train / crashing_train: the processes behind the trial
THREAD_AT_IMPORT_ENV = "MGBENCH_STANDINS_THREAD"  # set: importing this module starts a thread (forking is unsafe)
LOADED_BY = os.getpid()                # the process that imported this module
TORCH_LOADED_FIRST = "torch" in sys.modules  # torch was imported before this module, in that process
if os.environ.get(THREAD_AT_IMPORT_ENV):
    threading.Thread(target=threading.Event().wait, daemon=True).start()


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


def probe_train(cfg: Any, tracker: Any = None, eval_hook: Any = None) -> Any:
    """sleep_train that first records its process, its parent and the process that imported this module."""
    _probe(Path(cfg.out_dir))
    return sleep_train(cfg, tracker, eval_hook)


def crashing_train(cfg: Any, tracker: Any = None, eval_hook: Any = None) -> Any:
    """probe_train whose process dies of a SIGSEGV (as in a segfault) when train.steps is odd: no result, no
    traceback."""
    _probe(Path(cfg.out_dir))
    if cfg.train.steps % 2:
        os.kill(os.getpid(), signal.SIGSEGV)
    return sleep_train(cfg, tracker, eval_hook)


def zygote_killing_train(cfg: Any, tracker: Any = None, eval_hook: Any = None) -> Any:
    """probe_train that SIGKILLs the process that imported this module when it is another one (a warm job's zygote)."""
    _probe(Path(cfg.out_dir))
    if LOADED_BY != os.getpid():
        os.kill(LOADED_BY, signal.SIGKILL)
    return sleep_train(cfg, tracker, eval_hook)


def _probe(out: Path) -> None:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    (out / PROBE_FILE).write_text(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "loaded_by": LOADED_BY,
                                              "torch_loaded_first": TORCH_LOADED_FIRST,
                                              "threads": torch.get_num_threads()}))
