"""What a study looks like now (`mgbench study status`), and what it would run (`--dry-run`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mgbench.study.executors import check_executor, job_alive, sbatch_script
from mgbench.study.reuse import UA_REUSED_FROM
from mgbench.study.spec import StudySpec, corner_points, grid_points
from mgbench.study.trial import RESULT_FILE, list_trials, read_json, trial_dir
from mgbench.tracking import TAG_STATUS, trial_run_name


def status_rows(spec: StudySpec) -> list[dict[str, Any]]:
    """One row per trial: Optuna state, value, params, job state, MLflow run and status."""
    from optuna.trial import TrialState

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
    client = runs.client(spec) if records else None
    rows = []
    for number in sorted(set(trials) | set(records)):
        t, rec = trials.get(number), records.get(number, {})
        jobs = rec.get("jobs") or []
        ref = jobs[-1] if jobs else None
        state = t.state.name if t is not None else "NONE"
        result = read_json(trial_dir(spec, number) / RESULT_FILE) or {}
        job_state = "-"
        if ref is not None:
            alive = t is not None and t.state == TrialState.RUNNING and job_alive(ref)
            job_state = f"{ref['job_id']} ({'alive' if alive else 'ended'})"
        rows.append({"trial": number, "state": state, "value": t.value if t is not None else None,
                     "params": trial_run_name(spec.settings(rec.get("params") or (t.params if t else {}))),
                     "job": job_state, "result": result.get("status", "-"), "step": result.get("step"),
                     "reused": _reused_label(t.user_attrs.get(UA_REUSED_FROM) if t is not None else None),
                     "run_id": rec.get("run_id", "-"), "mlflow": _run_status(client, rec.get("run_id"))})
    return rows


def _reused_label(source: str | None) -> str:
    """`<study>/<number>/<run id>` -> `<study> #<number>` (the trial was copied from there, not trained)."""
    if not source:
        return "-"
    study, number, _ = source.rsplit("/", 2)
    return f"{study} #{number}"


def _run_status(client: Any, run_id: str | None) -> str:
    if client is None or not run_id:
        return "-"
    try:
        return client.get_run(run_id).data.tags.get(TAG_STATUS, "-")
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
             f"{spec.objective.direction} {spec.objective.metric}, executor {spec.executor.type}, "
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
    from mgbench.study.prepare import describe

    lines += describe(spec)
    if spec.executor.type == "slurm":
        array = spec.n_trials if spec.sampler.type == "grid" else None
        lines += ["", f"# sbatch script ({'job array of ' + str(array) if array and array > 1 else 'one per trial'};"
                      " nothing submitted):", sbatch_script(spec, params, array)]
    lines.append("dry run: nothing submitted")
    return "\n".join(lines)
