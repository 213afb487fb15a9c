"""Harness overhead: MLflow logging per step, a local-executor study against its trials, report rendering.

- MLflow: the time spent inside `MlflowTracker.log_metrics` (batched; flushes every `flush_every` s)
  and its final flush, per training step, against the step time of a tiny model. Worst case: the
  trainer's five step metrics logged every step (`train.log_every: 1`); the loop's default logs every 50.
- Study: wall time of `run_study` on the local executor (parallelism 1), cold (submitit's LocalExecutor: a new
  Python per job) and warm (jobs forked from a zygote that imported torch and MLflow once: mgbench.study.warm),
  for trials of ~6 s and ~60 s. The time until the first trial starts is the study's one-off start (driver set-up,
  and the zygote's imports when warm); the rest beyond the trials' own time (trainer + evaluation, from each
  `result.json`) is the per-trial overhead (noticing the end, Optuna, the MLflow run, starting the job), measured
  against the trials' time.
- Report: `mgbench.report.bench.bench_report`: load a synthetic store of many runs, render Tables 1-8.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import yaml

from mgbench.bench.timing import Check, Section
from mgbench.bench.training import TrainingCase, Variant, make_step
from mgbench.config import LoopConfig

MLFLOW_GOAL = 0.01      # logging cost per step / tiny step time
REPORT_GOAL_S = 10.0    # load + render Tables 1-8 from a store of 10,000 runs (mgbench.report.bench)
STUDY_CASES = ((6.0, 4, 0.10), (60.0, 2, 0.03))  # (trial seconds, trials, goal for the warm executor's overhead)
STUDY_CHECK = "warm local study overhead"  # the checks' names start so
STUDY_STEPS = 220       # training steps of a ~6 s warm benchmark trial on 2 idle cores; the 60 s case scales it
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

    if folder is None:
        with tempfile.TemporaryDirectory(prefix="mgbench-bench-mlflow-") as tmp:
            return mlflow_cost(steps, log_every, flush_every, tmp)
    folder = Path(folder)
    uri = f"sqlite:///{(folder / 'mlflow.db').resolve()}"
    store = T.RunStore(uri)
    exp = store.experiment("bench-logging", artifact_location=str(folder / "artifacts"))
    trackers = {k: T.MlflowTracker(store.start_run(exp, f"log every {k}", {}), uri, flush_every=flush_every)
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
                "logged": float(len(store.history(trackers[k].run_id, T.M_LOSS)))} for k in log_every}


def study_overhead(steps: int = 300, trials: int = 2, warm: bool = True,
                   folder: str | Path | None = None) -> dict[str, float]:
    """Run a local-executor grid2d study: its one-off start, and the rest of its wall time against its trials' own."""
    from mgbench.study.runner import run_study
    from mgbench.study.spec import load_spec
    from mgbench.study.trial import PROGRESS_FILE, RESULT_FILE, read_json, trial_dir

    keep = folder is not None   # a temporary folder is removed after a study that finished, kept after one that did not
    folder = Path(folder or tempfile.mkdtemp(prefix="mgbench-bench-study-"))
    spec_path = folder / "bench_study.yaml"
    spec_path.write_text(yaml.safe_dump(_study_spec(steps, trials, folder / "study", warm)))
    spec = load_spec(spec_path)
    t0, w0 = time.perf_counter(), time.time()  # result.json times are time.time()
    summary = run_study(spec, echo=lambda s: None)
    wall = time.perf_counter() - t0
    results = [read_json(trial_dir(spec, n) / RESULT_FILE) or {} for n in range(trials)]
    trial_s = sum(r.get("finished_at", 0.0) - r.get("started_at", 0.0) for r in results)
    if summary.n_complete != trials or trial_s <= 0:
        raise RuntimeError(f"benchmark study did not finish: {summary}; see {folder}")
    start = min(r["started_at"] for r in results) - w0
    rest = wall - start - trial_s
    rates = [(read_json(trial_dir(spec, n) / PROGRESS_FILE) or {}).get("steps_per_s") or 0.0 for n in range(trials)]
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return {"wall_s": wall, "trials_s": trial_s, "trials": float(trials), "start_s": start,
            "per_trial_overhead_s": rest / trials, "overhead": rest / trial_s, "overhead_with_start": wall / trial_s - 1,
            "steps_per_s": sum(rates) / trials}


def _study_spec(steps: int, trials: int, out: Path, warm: bool = True) -> dict:
    """A grid study of `trials` tiny grid2d runs (w values) on the local executor, one at a time."""
    ws = [1.0 + 0.25 * i for i in range(trials)]
    return {"name": "bench-overhead", "out_dir": str(out), "sampler": "grid",
            "executor": {"type": "local", "warm": warm},
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
    why = "not measured in this run"
    if study:
        try:
            study_rows(sec)
            return sec
        except (ImportError, RuntimeError) as e:
            why = f"not measured ({e})"
    sec.rows.append({"measure": "study overhead (local executor)", "value": why, "against": "", "share": ""})
    measured = sum(c.name.startswith(STUDY_CHECK) for c in sec.checks)
    for seconds, _, goal in STUDY_CASES[measured:]:
        sec.checks.append(Check(_check_name(seconds), None, f"<= {goal:.0%}", None))
    return sec


def study_rows(sec: Section) -> None:
    """Cold and warm local studies of ~6 s and ~60 s trials: one-off start, per-trial overhead, checks for warm."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    steps, last = STUDY_STEPS, None
    for seconds, trials, goal in STUDY_CASES:
        if last is not None:  # the steps that add the missing seconds at the last warm case's training rate
            last_s = last["trials_s"] / last["trials"]
            rate = last["steps_per_s"] or steps / last_s
            steps = max(1, steps + round((seconds - last_s) * rate))
        runs = {}
        for warm in (False, True):
            runs[warm] = st = study_overhead(steps=steps, trials=trials, warm=warm)
            mean_s = st["trials_s"] / st["trials"]
            kind = "warm (forked from a preloaded zygote)" if warm else "cold (a new Python per job)"
            sec.rows.append({"measure": f"{trials} trials of {mean_s:.1f} s, {kind}",
                             "value": f"{st['per_trial_overhead_s']:.2f} s/trial",
                             "against": f"trials {st['trials_s']:.1f} s", "share": f"{st['overhead']:.1%}"})
            sec.rows.append({"measure": f"  one-off study start, {'warm' if warm else 'cold'}",
                             "value": f"{st['start_s']:.1f} s", "against": "with it: study wall / trials - 1",
                             "share": f"{st['overhead_with_start']:.1%}"})
        last = runs[True]
        spent = {w: st["wall_s"] - st["start_s"] for w, st in runs.items()}
        sec.rows.append({"measure": f"  the same {trials} trials, wall from the first trial's start",
                         "value": f"warm {spent[True]:.1f} s", "against": f"cold {spent[False]:.1f} s",
                         "share": f"{spent[True] / spent[False]:.0%}"})
        sec.checks.append(Check(_check_name(seconds, last["trials_s"] / last["trials"]), last["overhead"],
                                f"<= {goal:.0%}", last["overhead"] <= goal))
    sec.notes.append(
        f"Study: grid2d MLP-S trials ({STUDY_STEPS} steps for the ~6 s case; for ~60 s, the steps its training rate "
        "adds) with a quick evaluation, local executor, parallelism 1, poll_s 2 (the default); cold = "
        "`executor: {type: local, warm: false}` (submitit's LocalExecutor), warm = the default. Trial time = "
        "finished_at - started_at of each result.json (trainer + evaluation inside the job); one-off start = from "
        "`run_study` to the first trial's start; overhead = (wall - one-off start - trial times) / trial times. "
        "A cold trial's time includes the imports its job makes after it starts (MLflow's SQL store, the trainer's "
        "lazy imports), which warm trials find done: compare the wall rows for the same work. "
        f"Load average (1 min) before the studies: {load:.2f} on {os.cpu_count()} cores (the goals are for idle cores).")


def _check_name(seconds: float, measured: float | None = None) -> str:
    length = f"{measured:.0f} s" if measured is not None else f"~{seconds:.0f} s"
    return f"{STUDY_CHECK}, trials of {length} (one-off start apart)"


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
