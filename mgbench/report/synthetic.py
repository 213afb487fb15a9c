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


def start_study(client: Any, study: str, artifact_location: str | None = None) -> tuple[str, str]:
    """Create the study's experiment and its parent run; returns (experiment id, parent run id)."""
    exp = client.get_experiment_by_name(study)
    exp_id = exp.experiment_id if exp else client.create_experiment(study, artifact_location=artifact_location)
    parent = client.create_run(exp_id, tags={T.TAG_STUDY: study, T.TAG_ROLE: "study"}, run_name=study)
    return exp_id, parent.info.run_id


def log_trial(client: Any, study: str, exp_id: str, parent_id: str, trial: int, params: dict[str, str],
              metrics: dict[str, float], status: str = "finished", scale: str = "digits, 2000 steps",
              history: dict[str, list[tuple[int, float]]] | None = None, final_step: int = 2000) -> str:
    """Log one nested trial run (tags, params, final metrics at `final_step`, optional histories); returns its id."""
    from mlflow.entities import Metric, Param

    tags = {T.TAG_STUDY: study, T.TAG_ROLE: "trial", T.TAG_TRIAL: str(trial), T.TAG_STATUS: status,
            T.TAG_SCALE: scale, T.TAG_PARENT: parent_id}
    run = client.create_run(exp_id, tags=tags, run_name=T.trial_run_name({"trial": trial}))
    ts = int(time.time() * 1000)
    metric_list = [Metric(k, float(v), ts, final_step) for k, v in metrics.items()]
    for name, points in (history or {}).items():
        metric_list += [Metric(name, float(v), ts, int(s)) for s, v in points]
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    for i in range(0, len(metric_list), 1000):
        client.log_batch(run.info.run_id, metrics=metric_list[i:i + 1000])
    if status != "running":
        client.set_terminated(run.info.run_id, T.STATUS_TO_MLFLOW[status])
    return run.info.run_id
