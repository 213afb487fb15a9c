"""Trial runs written to MLflow the way the study runner writes them: for tests, examples and the benchmark."""
from __future__ import annotations

import time
from typing import Any

from mgbench import tracking as T
from mgbench.config import TrainConfig


def trial_params(**overrides: Any) -> dict[str, str]:
    """The flattened default trainer config with dotted overrides (`**{"objective.w": 1.5}`), as MLflow strings."""
    params = T.flatten(TrainConfig().to_dict())
    unknown = set(overrides) - set(params)
    if unknown:
        raise KeyError(f"not a trainer config field: {sorted(unknown)[0]}")
    params.update(overrides)
    return {k: str(v) for k, v in params.items()}


def start_study(store: T.RunStore, study: str, artifact_location: str | None = None) -> tuple[str, str]:
    """Create the study's experiment and its parent run; returns (experiment id, parent run id)."""
    exp_id = store.experiment(study, artifact_location)
    return exp_id, store.start_study_run(exp_id, study)


def log_trial(store: T.RunStore, study: str, exp_id: str, parent_id: str, trial: int, params: dict[str, str],
              metrics: dict[str, float], status: str = "finished", scale: str = "digits, 2000 steps",
              history: dict[str, list[tuple[int, float]]] | None = None, final_step: int = 2000) -> str:
    """Log one nested trial run (tags, params, final metrics at `final_step`, optional histories) through the
    runner's writer; returns its id."""
    from mlflow.entities import Metric

    run_id = store.start_trial_run(exp_id, parent_id, study, trial, T.trial_run_name({"trial": trial}), scale=scale)
    ts = int(time.time() * 1000)
    points = [Metric(k, float(v), ts, final_step) for k, v in metrics.items()]
    points += [Metric(name, float(v), ts, int(s)) for name, series in (history or {}).items() for s, v in series]
    store.log_params(run_id, params)
    store.log_metrics(run_id, points)
    store.set_status(run_id, status)
    return run_id
