"""The study's MLflow runs: experiment = study name, one parent run, one nested run per trial."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml

from mgbench.config import TrainConfig
from mgbench.study.crashpoints import crash_point
from mgbench.study.spec import StudySpec
from mgbench.tracking import (A_CONFIG, STATUS_TO_MLFLOW, TAG_CONFIG_HASH, TAG_OUT_DIR, TAG_PARENT, TAG_ROLE, TAG_SCALE,
                              TAG_STATUS, TAG_STUDY, TAG_TRIAL, flatten, trial_run_name)
from mgbench.tracking import study_ui_tags

A_SPEC = "study/spec.yaml"          # artifact path of the study spec (as read, overrides applied)


def client(spec: StudySpec) -> Any:
    """The MLflow client on the study's tracking URI (creating a local sqlite folder if needed)."""
    from mgbench.tracking import mlflow_client

    if spec.tracking_uri.startswith("sqlite:///"):
        Path(spec.tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return mlflow_client(spec.tracking_uri)


def experiment_id(c: Any, spec: StudySpec) -> str:
    """The study's experiment (created on first use; local stores keep artifacts in out_dir/mlartifacts)."""
    exp = c.get_experiment_by_name(spec.name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    if spec.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in spec.tracking_uri:
        location = (Path(spec.out_dir) / "mlartifacts").as_uri()
    tags = {TAG_STUDY: spec.name, **study_ui_tags(spec)}  # study_ui_tags: open in MLflow's classic ML view
    return c.create_experiment(spec.name, artifact_location=location, tags=tags)


def parent_run(c: Any, exp_id: str, spec: StudySpec) -> str:
    """The study's parent run: found by its tags, or created (with the spec as an artifact)."""
    found = c.search_runs([exp_id], filter_string=f"tags.`{TAG_ROLE}` = 'study' and tags.`{TAG_STUDY}` = '{spec.name}'",
                          max_results=1)
    if found:
        run_id = found[0].info.run_id
        if found[0].info.status != "RUNNING":
            c.update_run(run_id, status="RUNNING")
        return run_id
    run = c.create_run(exp_id, run_name=spec.name, tags={TAG_STUDY: spec.name, TAG_ROLE: "study"})
    run_id = run.info.run_id
    c.log_batch(run_id, params=_params({"sampler": spec.sampler.type, "n_trials": spec.n_trials,
                                         "optimize": f"{spec.optimize.direction} {spec.optimize.metric}",
                                         "executor": spec.executor.type, "parallelism": spec.parallelism,
                                         "space": ", ".join(spec.space)}))
    _log_yaml(c, run_id, spec.raw, A_SPEC)
    return run_id


def trial_run(c: Any, exp_id: str, parent_id: str, spec: StudySpec, number: int, params: dict[str, Any],
              cfg: TrainConfig, config_hash: str | None = None, adopt_since: float | None = None) -> str:
    """Create the nested run of one trial: tags, searched params (as the trainer parses them), artifacts.
    adopt_since: a killed driver may have created it since then (trial.json recorded the intent): adopt that run."""
    flat = flatten(cfg.to_dict())
    searched = {k: flat[k] for k in spec.settings(params)}
    run_id = find_trial_run(c, exp_id, spec.name, number, adopt_since) if adopt_since is not None else None
    if run_id is None:
        tags = {TAG_PARENT: parent_id, TAG_STUDY: spec.name, TAG_ROLE: "trial", TAG_TRIAL: str(number),
                TAG_STATUS: "running", TAG_SCALE: scale_label(cfg), TAG_OUT_DIR: cfg.out_dir}
        if config_hash:
            tags[TAG_CONFIG_HASH] = config_hash
        run_id = c.create_run(exp_id, run_name=trial_run_name(searched), tags=tags).info.run_id
        crash_point("run_created")
    c.log_batch(run_id, params=_params(searched))  # an adopted run: the same values again (MLflow allows that)
    _log_yaml(c, run_id, cfg.to_dict(), A_CONFIG)
    _log_yaml(c, run_id, spec.raw, A_SPEC)
    return run_id


def find_trial_run(c: Any, exp_id: str, study: str, number: int, since: float) -> str | None:
    """The run of trial `number` of `study` created at or after `since` (seconds), or None."""
    found = c.search_runs([exp_id], filter_string=f"tags.`{TAG_ROLE}` = 'trial' and tags.`{TAG_STUDY}` = '{study}' "
                          f"and tags.`{TAG_TRIAL}` = '{number}' and attributes.start_time >= {int((since - 1) * 1000)}",
                          order_by=["attributes.start_time ASC"], max_results=1)
    return found[0].info.run_id if found else None


def scale_label(cfg: TrainConfig) -> str:
    """The scale tag of a run: `digits, 2000 steps`."""
    return f"{cfg.data.name}, {cfg.train.steps} steps"


def set_status(c: Any, run_id: str, status: str, error: str | None = None) -> None:
    """Set a trial run's status tag (and a failure's error), ending the run unless it is still running."""
    c.set_tag(run_id, TAG_STATUS, status)
    if error:
        from mgbench.study.trial import record_error

        record_error(c, run_id, error)
    end = STATUS_TO_MLFLOW.get(status)
    if end and end != "RUNNING":
        c.set_terminated(run_id, end)


def finish_parent(c: Any, run_id: str, n_complete: int, best: float | None) -> None:
    """Close the study run with its summary metrics."""
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    metrics = [Metric("study/n_complete", float(n_complete), ts, 0)]
    if best is not None:
        metrics.append(Metric("study/best_value", float(best), ts, 0))
    c.log_batch(run_id, metrics=metrics)
    c.set_terminated(run_id, "FINISHED")


def _params(d: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in d.items()]


def _log_yaml(c: Any, run_id: str, data: dict[str, Any], artifact: str) -> None:
    folder, name = (artifact.rsplit("/", 1) if "/" in artifact else (None, artifact))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        c.log_artifact(run_id, str(path), folder)
