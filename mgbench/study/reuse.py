"""Trial result cache: a trial whose resolved config another study of the same Optuna storage has already
trained is not trained again.

Every trial records a content hash of its resolved trainer config (Optuna user attr and MLflow tag
`mgbench.config_hash`), its MLflow run and tracking URI, and when it finishes its final metrics. Before a trial
is submitted the driver looks for a COMPLETE trial of another study with the same hash that reports the
objective metric; if there is one, it copies that trial's value, user attrs and intermediate values into
Optuna, and its MLflow params, every step of every metric, tags and artifacts into this trial's run.
Tables 3-6 of the paper share their w = 1.5 row: that row is trained once.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mgbench.tracking import (A_CONFIG, TAG_CONFIG_HASH, TAG_OUT_DIR, TAG_REUSED_FROM, TAG_ROLE, TAG_STATUS,
                              TAG_STUDY, TAG_TRIAL, RunStore)

# Trainer config fields that do not change what a trial measures: its identity and folders, how often it logs
# and checkpoints, how its run is split into jobs, the device, and objective.force (a validation override that
# lets f*g >= 1 through; Table 3 sets it for its w = 2 row). Two trials that differ only here share a hash.
NON_SEMANTIC_KEYS = ("name", "out_dir", "data.cache_dir", "eval.cache_dir", "train.log_every", "train.ckpt_every",
                     "train.keep_ckpts", "train.max_steps_per_run", "train.device", "objective.force",
                     # results equal up to float rounding (and hashes of configs from before these keys unchanged):
                     "train.compile", "sample.compile", "objective.uncond_chunk", "eval.gather_chunk")

# Optuna user attrs of a trial (read by the cache; copied to a trial that reuses it, except OWN_ATTRS).
UA_CONFIG_HASH = TAG_CONFIG_HASH       # the config hash (also an MLflow tag of the trial run)
UA_RUN_ID = "mgbench.run_id"           # the trial's MLflow run id
UA_TRACKING_URI = "mgbench.tracking_uri"  # the MLflow store of that run
UA_METRICS = "mgbench.metrics"         # final metrics of a finished trial (names without "eval/")
UA_STEP = "mgbench.step"               # the trainer step it finished at
UA_REUSED_FROM = TAG_REUSED_FROM       # "<study>/<trial number>/<run id>" of the trial it was copied from
OWN_ATTRS = (UA_RUN_ID, UA_TRACKING_URI, UA_REUSED_FROM)  # identity of a trial: never copied

OWN_TAGS = (TAG_STUDY, TAG_ROLE, TAG_TRIAL, TAG_OUT_DIR, TAG_STATUS, TAG_REUSED_FROM)  # the copy keeps its own
OWN_ARTIFACTS = (A_CONFIG, "study")    # the copy has its own resolved config and study spec


def config_hash(cfg: dict[str, Any], entry: str, eval_hook: str) -> str:
    """Content hash of a resolved trainer config (non-semantic fields left out) with the trainer and hook named."""
    semantic = json.loads(json.dumps(cfg, default=str))
    for dotted in NON_SEMANTIC_KEYS:
        *parents, leaf = dotted.split(".")
        node = semantic
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    text = json.dumps({"config": _canonical(semantic), "entry": entry, "eval_hook": eval_hook}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _canonical(value: Any) -> Any:
    """Numbers as floats (w: 1 and w: 1.0 are one config); containers walked."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


@dataclass
class Source:
    study: str                     # the study that trained it
    number: int                    # its trial number there
    run_id: str                    # its MLflow run
    tracking_uri: str              # the MLflow store of that run
    value: float                   # the objective metric of the reusing study, from its final metrics
    user_attrs: dict[str, Any] = field(default_factory=dict)
    intermediate: dict[int, float] = field(default_factory=dict)  # reported step -> value (pruners read them)

    @property
    def label(self) -> str:
        """`<study>/<trial number>/<run id>` (the reused_from tag)."""
        return f"{self.study}/{self.number}/{self.run_id}"


def find_source(storage: Any, study_name: str, digest: str, metric: str) -> Source | None:
    """A COMPLETE trial of another study in `storage` with config hash `digest` that reports `metric`
    (trained ones before copies; then the oldest study and trial), or None."""
    from optuna.trial import TrialState

    found = []
    for s in storage.get_all_studies():
        if s.study_name == study_name:
            continue  # grid points of one study are distinct; a study never reuses itself
        for t in storage.get_all_trials(s._study_id, deepcopy=False, states=(TrialState.COMPLETE,)):
            ua = t.user_attrs
            metrics = ua.get(UA_METRICS) or {}
            if ua.get(UA_CONFIG_HASH) == digest and metric in metrics and ua.get(UA_RUN_ID):
                found.append((UA_REUSED_FROM in ua, s._study_id, t.number, s.study_name, t))
    if not found:
        return None
    _, _, _, name, t = min(found, key=lambda f: f[:3])
    ua = t.user_attrs
    return Source(name, t.number, ua[UA_RUN_ID], ua.get(UA_TRACKING_URI) or "", float(ua[UA_METRICS][metric]),
                  dict(ua), {int(k): float(v) for k, v in t.intermediate_values.items()})


def tell_reused(study: Any, trial_id: int, number: int, src: Source) -> None:
    """Finish a trial in Optuna with the source's value, user attrs and intermediate values."""
    storage = study._storage
    for key, value in src.user_attrs.items():
        if key not in OWN_ATTRS:
            storage.set_trial_user_attr(trial_id, key, value)
    storage.set_trial_user_attr(trial_id, UA_REUSED_FROM, src.label)
    for step, value in sorted(src.intermediate.items()):
        storage.set_trial_intermediate_value(trial_id, step, value)
    study.tell(number, src.value, skip_if_finished=True)


def copy_run(dst: RunStore, run_id: str, src: Source, default_uri: str) -> None:
    """Copy the source run's params, every metric step, tags and artifacts into run `run_id` (read all first)."""
    uri = src.tracking_uri or default_uri
    reader = dst if uri == default_uri else RunStore(uri)
    run = reader.client.get_run(src.run_id)
    history = [m for key in run.data.metrics for m in reader.client.get_metric_history(src.run_id, key)]
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.") and k not in OWN_TAGS}
    with tempfile.TemporaryDirectory() as tmp:
        files = _download_artifacts(reader, src.run_id, Path(tmp))
        dst.log_params(run_id, run.data.params, skip_logged=True)
        dst.log_metrics(run_id, history)
        dst.log_tags(run_id, tags)
        for local, folder in files:
            dst.client.log_artifact(run_id, str(local), folder)
    dst.client.set_tag(run_id, TAG_REUSED_FROM, src.label)


def _download_artifacts(store: RunStore, run_id: str, into: Path) -> list[tuple[Path, str | None]]:
    """Every artifact file of a run except OWN_ARTIFACTS, downloaded: (local file, artifact folder)."""
    out: list[tuple[Path, str | None]] = []
    for path in store.artifact_files(run_id):
        if path.split("/", 1)[0] in OWN_ARTIFACTS:
            continue
        out.append((store.download(run_id, path, into), path.rsplit("/", 1)[0] if "/" in path else None))
    return out
