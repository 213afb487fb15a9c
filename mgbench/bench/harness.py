"""Harness overhead: MLflow logging per step, a local-executor study against its trials, report rendering.

- MLflow: the time spent inside `MlflowTracker.log_metrics` (batched; flushes every `flush_every` s)
  and its final flush, per training step, against the step time of a tiny model. Worst case: the
  trainer's five step metrics logged every step (`train.log_every: 1`); the loop's default logs every 50.
- Study: wall time of `run_study` on the local executor (one subprocess per trial, parallelism 1)
  against the sum of its trials' own time (trainer + evaluation, from each `result.json`). The
  difference is a fixed cost per trial (process start, imports, Optuna, MLflow run, polling), so
  the share falls with trial length; the table gives the trial length at which it reaches the goal.
- Report: `mgbench.report.bench.bench_report`: load a synthetic store of many runs, render Tables 1-8.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import yaml

from mgbench.bench.timing import Check, Section
from mgbench.bench.training import TrainingCase, Variant, make_step
from mgbench.config import LoopConfig

MLFLOW_GOAL = 0.01      # logging cost per step / tiny step time
STUDY_GOAL = 0.03       # (study wall - sum of trial times) / sum of trial times
REPORT_GOAL_S = 10.0    # load + render Tables 1-8 from a store of 10,000 runs (mgbench.report.bench)
STUDY_STEPS = 150        # training steps per benchmark-study trial
DEFAULT_LOG_EVERY = LoopConfig().log_every  # the trainer's default logging cadence
TINY = TrainingCase("DiT-XS/2", (1, 8, 8), 32, 1)  # the cheapest image model step


def tiny_step() -> Callable[[], float]:
    """One vanilla training step of DiT-XS/2 on 8x8 digits-shaped inputs, batch 32 (the cheapest image step)."""
    import torch

    return make_step(TINY, Variant("vanilla", False), torch.device("cpu"))


def mlflow_cost(steps: int = 600, log_every: tuple[int, ...] = (1, DEFAULT_LOG_EVERY), flush_every: float = 5.0,
                folder: str | Path | None = None) -> dict[int, dict[str, float]]:
    """Time inside MlflowTracker calls per step, in a loop of real tiny training steps; one run per cadence."""
    from mgbench import tracking as T
    from mgbench.tracking import mlflow_client

    folder = Path(folder or tempfile.mkdtemp(prefix="mgbench-bench-mlflow-"))
    uri = f"sqlite:///{(folder / 'mlflow.db').resolve()}"
    client = mlflow_client(uri)
    exp = client.create_experiment("bench-logging", artifact_location=str(folder / "artifacts"))
    trackers = {k: T.MlflowTracker(client.create_run(exp).info.run_id, uri, flush_every=flush_every)
                for k in log_every}
    spent = {k: 0.0 for k in log_every}
    step_fn = tiny_step()
    step_fn()  # warm-up
    t_loop = time.perf_counter()
    for step in range(1, steps + 1):
        step_fn()
        for k, tracker in trackers.items():
            if step % k == 0:
                metrics = {T.M_LOSS: 1.0 / step, T.M_LOSS_MG: 0.9, T.M_W: 1.5, T.M_STEP_TIME: 0.01,
                           T.M_IMPLIED_CFG: 1.0}
                t0 = time.perf_counter()
                tracker.log_metrics(metrics, step)
                spent[k] += time.perf_counter() - t0
    for k, tracker in trackers.items():
        t0 = time.perf_counter()
        tracker.flush()
        spent[k] += time.perf_counter() - t0
    loop_s = time.perf_counter() - t_loop
    step_s = (loop_s - sum(spent.values())) / steps
    return {k: {"s_per_step": spent[k] / steps, "step_s": step_s, "share": spent[k] / steps / step_s,
                "logged": float(len(client.get_metric_history(trackers[k].run_id, T.M_LOSS)))} for k in log_every}


def study_overhead(steps: int = 300, trials: int = 2, folder: str | Path | None = None) -> dict[str, float]:
    """Run a local-executor grid2d study; its wall time against the sum of its trials' own times."""
    from mgbench.study.runner import run_study
    from mgbench.study.spec import load_spec
    from mgbench.study.trial import RESULT_FILE, read_json, trial_dir

    folder = Path(folder or tempfile.mkdtemp(prefix="mgbench-bench-study-"))
    spec_path = folder / "bench_study.yaml"
    spec_path.write_text(yaml.safe_dump(_study_spec(steps, trials, folder / "study")))
    spec = load_spec(spec_path)
    t0 = time.perf_counter()
    summary = run_study(spec, echo=lambda s: None)
    wall = time.perf_counter() - t0
    results = [read_json(trial_dir(spec, n) / RESULT_FILE) or {} for n in range(trials)]
    trial_s = sum(r.get("finished_at", 0.0) - r.get("started_at", 0.0) for r in results)
    if summary.n_complete != trials or trial_s <= 0:
        raise RuntimeError(f"benchmark study did not finish: {summary}; see {folder}")
    return {"wall_s": wall, "trials_s": trial_s, "trials": float(trials),
            "per_trial_overhead_s": (wall - trial_s) / trials, "overhead": wall / trial_s - 1}


def _study_spec(steps: int, trials: int, out: Path) -> dict:
    """A grid study of `trials` tiny grid2d runs (w values) on the local executor, one at a time."""
    ws = [1.0 + 0.25 * i for i in range(trials)]
    return {"name": "bench-overhead", "out_dir": str(out), "sampler": "grid", "executor": "local",
            "parallelism": 1, "space": {"objective.w": {"grid": ws}},
            "optimize": {"metric": "off_class", "direction": "minimize"},
            "eval_hook": "mgbench.evaluation.quick:quick_eval_hook",
            "base": {"data": {"name": "grid2d"}, "model": {"arch": "MLP-S"},
                     "objective": {"formulation": "flow", "label_drop": 0.1},
                     "optim": {"batch_size": 256, "lr": 1e-3},
                     "train": {"steps": steps, "log_every": 50, "ckpt_every": steps, "device": "cpu"},
                     "sample": {"steps": 10, "n_grid": 64}, "eval": {"n_samples": 64}}}


def bench_harness(*, quick: bool = False, study: bool = True) -> Section:
    """The harness section: MLflow cost per step and the local study's overhead."""
    sec = Section("harness", "Harness overhead: MLflow logging and the study pipeline")
    flush_every = 1.0 if quick else 5.0
    ml = mlflow_cost(steps=60 if quick else 600, flush_every=flush_every)
    for k, m in ml.items():
        sec.rows.append({"measure": f"MLflow log_metrics, 5 metrics every {k} step(s)",
                         "value": f"{1e6 * m['s_per_step']:.0f} us/step",
                         "against": f"tiny step {1000 * m['step_s']:.1f} ms", "share": f"{m['share']:.2%}"})
    share = ml[DEFAULT_LOG_EVERY]["share"]
    sec.checks.append(Check(f"MLflow logging / tiny training step (log_every {DEFAULT_LOG_EVERY}, the default)",
                            share, f"<= {MLFLOW_GOAL:.0%}", share <= MLFLOW_GOAL))
    sec.notes.append(f"MLflow: sqlite store, `MlflowTracker` (flush_every {flush_every:g} s), time spent inside "
                     "its calls (final flush included) during a loop of real tiny training steps (DiT-XS/2, "
                     f"1x8x8, batch 32, vanilla; torch threads {torch_threads()}). Every step is the worst case; "
                     f"the trainer's default is train.log_every = {DEFAULT_LOG_EVERY}.")
    if not study:
        sec.rows.append({"measure": "study overhead (local executor)", "value": "not measured in this run",
                         "against": "", "share": ""})
        sec.checks.append(Check("local study wall / sum of trial times - 1", None, f"<= {STUDY_GOAL:.0%}", None))
        return sec
    try:
        st = study_overhead(steps=STUDY_STEPS, trials=2)
    except (ImportError, RuntimeError) as e:
        sec.rows.append({"measure": "study overhead", "value": f"not measured yet ({e})", "against": "", "share": ""})
        sec.checks.append(Check("local study wall / sum of trial times - 1", None, f"<= {STUDY_GOAL:.0%}", None))
        return sec
    need = st["per_trial_overhead_s"] / STUDY_GOAL
    sec.rows.append({"measure": f"study overhead, {int(st['trials'])} trials (local executor)",
                     "value": f"wall {st['wall_s']:.1f} s", "against": f"trials {st['trials_s']:.1f} s",
                     "share": f"{st['overhead']:.1%}"})
    sec.rows.append({"measure": "fixed cost per trial", "value": f"{st['per_trial_overhead_s']:.1f} s",
                     "against": f"trial length for <= {STUDY_GOAL:.0%}", "share": f">= {need / 60:.1f} min"})
    mean_s = st["trials_s"] / st["trials"]
    sec.checks.append(Check(f"local study wall / sum of trial times - 1 (trials of {mean_s:.0f} s)",
                            st["overhead"], f"<= {STUDY_GOAL:.0%}", st["overhead"] <= STUDY_GOAL))
    sec.notes.append(f"Study: grid2d MLP-S trials of {STUDY_STEPS} steps with a quick evaluation, submitit local "
                     "executor, parallelism 1, poll_s 2 (the default); trial time = finished_at - started_at of each "
                     "result.json (trainer + evaluation inside the job).")
    return sec


def bench_report_section(n_runs: int = 10_000) -> Section:
    """The report section: load and render every table from a store of n_runs runs."""
    sec = Section("report", f"Report: Tables 1-8 from a store of {n_runs:,} runs")
    try:
        from mgbench.report.bench import bench_report
    except ImportError as e:
        sec.rows.append({"measure": "bench_report", "value": f"not measured yet ({e})"})
        return sec
    r = bench_report(n_runs)
    sec.rows.append({"runs": int(r["n_runs"]), "store build s (once, cached)": round(r["build_s"], 1),
                     "load s": round(r["load_s"], 2), "render s": round(r["tables_s"], 2),
                     "total s": round(r["total_s"], 2)})
    full = n_runs >= 10_000  # the goal is set for 10,000 runs; smaller stores get no verdict
    sec.checks.append(Check(f"load + render Tables 1-8, {n_runs:,} runs (s)", r["total_s"],
                            f"<= {REPORT_GOAL_S:g} s at 10,000 runs", r["total_s"] <= REPORT_GOAL_S if full else None))
    sec.notes.append("`mgbench.report.bench.bench_report`: a synthetic sqlite MLflow store (built once, kept in "
                     "the cache folder), loaded with `report.load.load_runs`, Tables 1-8 built and written.")
    return sec


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()
