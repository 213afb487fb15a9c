"""The study's MLflow runs: experiment = study name, one parent run, one nested run per trial (written through
`mgbench.tracking.RunStore`, the one writer)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mgbench.config import TrainConfig
from mgbench.study.crashpoints import crash_point
from mgbench.study.spec import StudySpec
from mgbench.tracking import (A_CONFIG, TAG_CONFIG_HASH, TAG_OUT_DIR, TAG_STUDY, RunStore, flatten, study_ui_tags,
                              trial_run_name)

A_SPEC = "study/spec.yaml"          # artifact path of the study spec (as read, overrides applied)


def open_store(spec: StudySpec) -> RunStore:
    """The run store on the study's tracking URI (creating a local sqlite folder if needed)."""
    if spec.tracking_uri.startswith("sqlite:///"):
        Path(spec.tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return RunStore(spec.tracking_uri)


def experiment_id(store: RunStore, spec: StudySpec) -> str:
    """The study's experiment (created on first use; local stores keep artifacts in out_dir/mlartifacts)."""
    location = None
    if spec.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in spec.tracking_uri:
        location = (Path(spec.out_dir) / "mlartifacts").as_uri()
    tags = {TAG_STUDY: spec.name, **study_ui_tags(spec)}  # study_ui_tags: open in MLflow's classic ML view
    return store.experiment(spec.name, location, tags)


def parent_run(store: RunStore, exp_id: str, spec: StudySpec) -> str:
    """The study's parent run: found by its tags, or created (with the spec as an artifact)."""
    found = store.study_run(exp_id, spec.name)
    if found is not None:
        if found.info.status != "RUNNING":
            store.client.update_run(found.info.run_id, status="RUNNING")
        return found.info.run_id
    run_id = store.start_study_run(exp_id, spec.name, {
        "sampler": spec.sampler.type, "n_trials": spec.n_trials,
        "optimize": f"{spec.optimize.direction} {spec.optimize.metric}", "executor": spec.executor.type,
        "parallelism": spec.parallelism, "space": ", ".join(spec.space)})
    store.log_yaml(run_id, spec.raw, A_SPEC)
    return run_id


def trial_run(store: RunStore, exp_id: str, parent_id: str, spec: StudySpec, number: int, params: dict[str, Any],
              cfg: TrainConfig, config_hash: str | None = None, adopt_since: float | None = None) -> str:
    """Create the nested run of one trial: tags, searched params (as the trainer parses them), artifacts.
    adopt_since: a killed driver may have created it since then (trial.json recorded the intent): adopt that run."""
    flat = flatten(cfg.to_dict())
    searched = {k: flat[k] for k in spec.settings(params)}
    run_id = store.find_trial_run(exp_id, spec.name, number, adopt_since) if adopt_since is not None else None
    if run_id is None:
        tags = {TAG_OUT_DIR: cfg.out_dir, TAG_CONFIG_HASH: config_hash}
        run_id = store.start_trial_run(exp_id, parent_id, spec.name, number, trial_run_name(searched),
                                       scale=scale_label(cfg), **tags)
        crash_point("run_created")
    store.log_params(run_id, searched)  # an adopted run: the same values again (MLflow allows that)
    store.log_yaml(run_id, cfg.to_dict(), A_CONFIG)
    store.log_yaml(run_id, spec.raw, A_SPEC)
    return run_id


def scale_label(cfg: TrainConfig) -> str:
    """The scale tag of a run: `digits, 2000 steps`."""
    return f"{cfg.data.name}, {cfg.train.steps} steps"


def finish_parent(store: RunStore, run_id: str, n_complete: int, best: float | None) -> None:
    """Close the study run with its summary metrics."""
    values = {"study/n_complete": float(n_complete), **({} if best is None else {"study/best_value": float(best)})}
    store.log_values(run_id, values, step=0)
    store.end(run_id)
