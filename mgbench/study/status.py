"""What a study looks like now (`mgbench study status`), and what it would run (`--dry-run`)."""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from mgbench.study.executors import check_executor, sbatch_script
from mgbench.study.jobstate import job_states
from mgbench.study.outcomes import is_cancelled
from mgbench.study.reuse import UA_REUSED_FROM
from mgbench.study.space import corner_points, grid_points
from mgbench.study.spec import StudySpec
from mgbench.study.trial import (
    PROGRESS_FILE,
    RESULT_FILE,
    list_trials,
    read_json,
    trial_dir,
)
from mgbench.tracking import trial_run_name


def status_rows(spec: StudySpec) -> list[dict[str, Any]]:
    """One row per trial: state (Optuna's, or CANCELLED), value, params, job state, MLflow run and status."""
    from mgbench.study import runs
    from mgbench.study.optuna_io import open_study

    records = list_trials(spec)
    if spec.storage.startswith("sqlite:///") and not Path(spec.storage[len("sqlite:///"):]).exists():
        return []
    try:
        study = open_study(spec, create=False)
        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    except KeyError:  # no such study yet
        trials = {}
    store = runs.open_store(spec) if records else None
    numbers = sorted(set(trials) | set(records))
    jobs = job_column(numbers, trials, records)
    rows = []
    for number in numbers:
        t, rec = trials.get(number), records.get(number, {})
        state = ("CANCELLED" if is_cancelled(t) else t.state.name) if t is not None else "NONE"
        result = read_json(trial_dir(spec, number) / RESULT_FILE) or {}
        job_state = jobs.get(number, "-")
        progress = read_json(trial_dir(spec, number) / PROGRESS_FILE) or {}
        rows.append({"trial": number, "state": state, "value": t.value if t is not None else None,
                     "params": trial_run_name(spec.settings(rec.get("params") or (t.params if t else {}))),
                     "progress": _steps(progress, result, rec),
                     "latest": latest_metric(progress, spec.optimize.metric),
                     "duration": _duration(t), "job": job_state, "result": result.get("status", "-"),
                     "reused": _reused_label(t.user_attrs.get(UA_REUSED_FROM) if t is not None else None),
                     "run_id": rec.get("run_id", "-"), "mlflow": _run_status(store, rec.get("run_id"))})
    return rows


def job_column(numbers: list[int], trials: dict[int, Any], records: dict[int, dict[str, Any]]) -> dict[int, str]:
    """`<job id> (<state>)` of each trial's latest job: alive, ended, or what SLURM says when it says more
    (UNKNOWN, MISSING, CANCELLED by 0); ended for trials no longer running. One squeue/sacct call for all."""
    from optuna.trial import TrialState

    refs = {n: (records.get(n, {}).get("jobs") or [None])[-1] for n in numbers}
    asked = [n for n in numbers if refs[n] and n in trials and trials[n].state == TrialState.RUNNING]
    states = dict(zip(asked, job_states([refs[n] for n in asked])))
    return {n: f"{refs[n]['job_id']} ({states[n].label() if n in states else 'ended'})" for n in numbers if refs[n]}


def _steps(progress: dict[str, Any], result: dict[str, Any], rec: dict[str, Any]) -> str:
    """`step/total` from the trainer's latest report, else from the result and the trial's config."""
    total = progress.get("total") or (rec.get("config") or {}).get("train", {}).get("steps")
    step = progress.get("step") if progress else result.get("step")
    return "-" if step is None else f"{step}/{total if total is not None else '?'}"


def latest_metric(progress: dict[str, Any], metric: str) -> str:
    """The latest evaluation's objective metric (`off_class=0.12@60`: value at step 60), else the latest loss."""
    ev = progress.get("eval") or {}
    value = (ev.get("metrics") or {}).get(metric)
    if value is not None:
        return f"{metric}={value:.4g}@{ev.get('step')}"
    if progress.get("loss") is not None:
        return f"loss={progress['loss']:.4g}"
    return "-"


def progress_text(progress: dict[str, Any], metric: str) -> str:
    """A running trial's progress in one line: `step 1200/3000 (40%)  9.8 steps/s  ETA 3m04s  off_class=0.12@1000`."""
    from mgbench.trainer.progress import format_duration, format_rate

    step, total = progress.get("step", 0), progress.get("total") or 0
    pct = 100.0 * step / total if total else 100.0
    return "  ".join([f"step {step}/{total} ({pct:.0f}%)", format_rate(progress.get("steps_per_s"), "step"),
                      f"ETA {format_duration(progress.get('eta_s'))}", latest_metric(progress, metric)])


def _duration(t: Any, now: float | None = None) -> str:
    """Optuna's start to end of the trial (still running: to now), as `3m04s`."""
    from mgbench.trainer.progress import format_duration

    if t is None or t.datetime_start is None:
        return "-"
    end = t.datetime_complete.timestamp() if t.datetime_complete is not None else (now or time.time())
    return format_duration(end - t.datetime_start.timestamp())


def status_header(spec: StudySpec, rows: list[dict[str, Any]]) -> list[str]:
    """The lines above the table: objective metric and direction, trial counts by state, the best trial so far."""
    o = spec.optimize
    better = "lower" if o.direction == "minimize" else "higher"
    counts = Counter(r["state"] for r in rows)
    states = ", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items())) or "none yet"
    lines = [f"study {spec.name}: objective {o.metric}, {o.direction} ({better} is better); "
             f"{len(rows)} of {spec.n_trials} trials: {states}"]
    done = [r for r in rows if r["state"] == "COMPLETE" and r["value"] is not None]
    if done:
        best = (min if o.direction == "minimize" else max)(done, key=lambda r: r["value"])
        lines.append(f"best so far: trial {best['trial']}  {o.metric}={best['value']:.4g}  {best['params']}"
                     f"  ({best['duration']})")
    else:
        lines.append("best so far: none (no trial has completed)")
    return lines


def _reused_label(source: str | None) -> str:
    """`<study>/<number>/<run id>` -> `<study> #<number>` (the trial was copied from there, not trained)."""
    if not source:
        return "-"
    study, number, _ = source.rsplit("/", 2)
    return f"{study} #{number}"


def _run_status(store: Any, run_id: str | None) -> str:
    if store is None or not run_id:
        return "-"
    try:
        return store.status_tag(run_id) or "-"
    except Exception:  # noqa: BLE001 - a missing run shows as such
        return "missing"


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A plain text table of status rows."""
    if not rows:
        return "(no trials yet)"
    cols = list(rows[0])
    cells = [[_fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def dry_run(spec: StudySpec) -> str:
    """The resolved trials (grid: every point; search: the space and its checked corners), and the sbatch script."""
    params = check_executor(spec)
    lines = [f"study {spec.name}: sampler {spec.sampler.type}, {spec.n_trials} trials, "
             f"{spec.optimize.direction} {spec.optimize.metric}, executor {spec.executor.type}, "
             f"parallelism {spec.parallelism}",
             f"out_dir {spec.out_dir}", f"storage {spec.storage}", f"tracking {spec.tracking_uri}"]
    if spec.sampler.type == "grid":
        points = grid_points(spec)[:spec.n_trials]
        lines.append(f"trials ({len(points)} grid points, every config validated; run in any order, folders {spec.out_dir}/trials/<n>):")
    else:
        points = corner_points(spec)
        lines.append("space (corner configs validated):")
        for key, p in spec.space.items():
            rng = p.values if p.values is not None else f"{p.type} [{p.low}, {p.high}]" + (" log" if p.log else "")
            lines.append(f"  {key}: {rng}")
        lines.append("corners:")
    for i, pt in enumerate(points):
        lines.append(f"  {i:4d}  {trial_run_name(spec.settings(pt))}")
    from mgbench.study.latents import describe

    lines += describe(spec)
    if spec.executor.type == "slurm":
        array = spec.n_trials if spec.sampler.type == "grid" else None
        lines += ["", f"# sbatch script ({'job array of ' + str(array) if array and array > 1 else 'one per trial'};"
                      " nothing submitted):", sbatch_script(spec, params, array)]
    lines.append("dry run: nothing submitted")
    return "\n".join(lines)
