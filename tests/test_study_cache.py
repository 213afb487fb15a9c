"""Trial result cache: studies on one Optuna storage and one MLflow store train an equal trial config once."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from conftest import STUDIES
from mgbench.tracking import mlflow_client

from mgbench.config import ConfigError, TrainConfig
from mgbench.report.load import load_runs
from mgbench.study.cli import main as study_main
from mgbench.study.reuse import NON_SEMANTIC_KEYS, UA_METRICS, UA_REUSED_FROM, config_hash
from mgbench.study.runner import EVENTS_FILE, run_study
from mgbench.study.spec import load_spec
from mgbench.study.status import status_rows
from mgbench.study.trial import read_json
from mgbench.tracking import TAG_CONFIG_HASH, TAG_REUSED_FROM, TAG_ROLE, TAG_STATUS, TAG_TRIAL, flatten
from mgbench.trainer.checkpoint import list_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)

ENTRY, HOOK = "mgbench.trainer.loop:train", "mgbench.evaluation.quick:quick_eval_hook"


def write_spec(tmp: Path, name: str, space: dict, train: dict, **top) -> Path:
    """A tiny grid2d grid study on the shared storage and MLflow store in `tmp`."""
    spec = {"name": name, "extends": str(STUDIES / "base" / "grid2d.yaml"),
            "base": {"optim": {"batch_size": 128, "lr": 2.0e-3}, "sample": {"steps": 10, "n_grid": 64},
                     "eval": {"n_samples": 64},
                     "train": {"steps": 60, "eval_every": 20, "device": "cpu", **train}},
            "space": space, "sampler": "grid", "optimize": {"metric": "off_class", "direction": "minimize"},
            "eval_hook": HOOK, "executor": "debug", "parallelism": 1, "poll_s": 0.1,
            "storage": f"sqlite:///{tmp / 'optuna.db'}", "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
            "out_dir": str(tmp / name), **top}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / EVENTS_FILE).read_text().splitlines()]


def trial_runs(client: Any, study: str) -> dict[int, object]:
    exp = client.get_experiment_by_name(study)
    return {int(r.data.tags[TAG_TRIAL]): r for r in client.search_runs([exp.experiment_id], f"tags.`{TAG_ROLE}` = 'trial'")}


def history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def submitted(out: Path) -> set[int]:
    return {e["trial"] for e in events(out) if e["event"] == "submit"}


def test_shared_grid_point_is_trained_once_and_copied_whole(tmp_path):
    said: list[str] = []
    a = load_spec(write_spec(tmp_path, "_cache_a", {"objective.w": [1.0, 1.5]}, {"log_every": 20, "ckpt_every": 30}))
    assert run_study(a, echo=said.append).n_complete == 2
    # B shares w = 1.5 with A (log_every and ckpt_every differ: not part of the config's identity); its two
    # w = 1.25 trials are equal to each other, but trials of one study never reuse each other.
    b = load_spec(write_spec(tmp_path, "_cache_b", {"objective.w": [1.5, 1.25], "train.log_every": [10, 20]},
                             {"ckpt_every": 60}))
    summary = run_study(b, echo=said.append)
    assert (summary.n_complete, summary.n_reused, summary.n_failed) == (4, 2, 0)

    storage = a.storage
    ta = {t.params["objective.w"]: t for t in optuna.load_study(study_name="_cache_a", storage=storage).get_trials()}
    tb = optuna.load_study(study_name="_cache_b", storage=storage).get_trials()
    client = mlflow_client(a.tracking_uri)
    runs_a, runs_b = trial_runs(client, "_cache_a"), trial_runs(client, "_cache_b")
    src, src_run = ta[1.5], runs_a[ta[1.5].number]
    label = f"_cache_a/{src.number}/{src_run.info.run_id}"
    reused = [t for t in tb if t.params["objective.w"] == 1.5]
    trained = [t for t in tb if t.params["objective.w"] == 1.25]
    assert submitted(Path(b.out_dir)) == {t.number for t in trained}  # no job for a reused trial

    for t in reused:
        run = runs_b[t.number]
        folder = Path(b.out_dir) / "trials" / f"{t.number:04d}"
        assert list_checkpoints(folder) == [] and not (folder / "executions.jsonl").exists()
        assert t.state == optuna.trial.TrialState.COMPLETE and t.value == src.value
        assert t.user_attrs[UA_REUSED_FROM] == label and t.user_attrs[UA_METRICS] == src.user_attrs[UA_METRICS]
        assert t.intermediate_values == src.intermediate_values and sorted(t.intermediate_values) == [20, 40, 60]
        assert run.data.tags[TAG_REUSED_FROM] == label and run.data.tags[TAG_STATUS] == "finished"
        assert run.info.status == "FINISHED" and run.data.tags[TAG_CONFIG_HASH] == src_run.data.tags[TAG_CONFIG_HASH]
        assert set(src_run.data.metrics) <= set(run.data.metrics)
        for key in src_run.data.metrics:  # every step of every metric (Fig. 5 convergence reads these)
            assert history(client, run.info.run_id, key) == history(client, src_run.info.run_id, key)
        assert [s for s, _ in history(client, run.info.run_id, "eval/off_class")] == [20, 40, 60]
        assert run.data.params["train.steps"] == "60" and run.data.params["name"] == src_run.data.params["name"]
        assert any(a.path == "samples" for a in client.list_artifacts(run.info.run_id))
        assert read_json(folder / "result.json")["reused_from"] == label
        assert f"[_cache_b] trial {t.number}: reused _cache_a #{src.number}" in said
    first, second = sorted(trained, key=lambda t: t.number)
    assert runs_b[first.number].data.tags[TAG_CONFIG_HASH] == runs_b[second.number].data.tags[TAG_CONFIG_HASH]
    assert runs_b[first.number].data.tags[TAG_CONFIG_HASH] != src_run.data.tags[TAG_CONFIG_HASH]
    for t in trained:
        run = runs_b[t.number]
        assert TAG_REUSED_FROM not in run.data.tags and UA_REUSED_FROM not in t.user_attrs
        assert list_checkpoints(Path(b.out_dir) / "trials" / f"{t.number:04d}")

    df = load_runs(b.tracking_uri, study="_cache_b")
    rows = df[df["objective.w"] == 1.5]
    assert rows["status"].tolist() == ["finished", "finished"]
    assert rows["eval/off_class"].tolist() == [src.value, src.value]
    reused_col = {r["trial"]: r["reused"] for r in status_rows(b)}
    assert reused_col == {t.number: (f"_cache_a #{src.number}" if t.params["objective.w"] == 1.5 else "-") for t in tb}

    # Reuse off (`study run --no-reuse`): the same point trains, and lands on the same value (what the cache assumes).
    c_path = write_spec(tmp_path, "_cache_c", {"objective.w": [1.5]}, {"log_every": 10, "ckpt_every": 60})
    assert study_main(["study", "run", str(c_path), "--no-reuse"]) == 0
    (tc,) = optuna.load_study(study_name="_cache_c", storage=storage).get_trials()
    run_c = trial_runs(client, "_cache_c")[tc.number]
    assert submitted(tmp_path / "_cache_c") == {tc.number} and UA_REUSED_FROM not in tc.user_attrs
    assert TAG_REUSED_FROM not in run_c.data.tags and run_c.data.tags[TAG_CONFIG_HASH] == src_run.data.tags[TAG_CONFIG_HASH]
    assert list_checkpoints(tmp_path / "_cache_c" / "trials" / f"{tc.number:04d}")
    assert tc.value == pytest.approx(src.value, abs=1e-9)


def _changed(value):
    """Another value of the same kind (a changed config field)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, list):
        return value + [1]
    return f"{value}x"


def test_config_hash_ignores_exactly_the_non_semantic_keys():
    cfg = TrainConfig().to_dict()
    base = config_hash(cfg, ENTRY, HOOK)
    keys = flatten(cfg)
    assert set(NON_SEMANTIC_KEYS) <= set(keys)
    for dotted, value in keys.items():
        changed = json.loads(json.dumps(cfg))
        *parents, leaf = dotted.split(".")
        node = changed
        for p in parents:
            node = node[p]
        node[leaf] = _changed(value)
        assert (config_hash(changed, ENTRY, HOOK) == base) == (dotted in NON_SEMANTIC_KEYS), dotted
    as_int = json.loads(json.dumps(cfg))
    as_int["objective"]["w"] = 1  # w: 1 and w: 1.0 are one config
    assert cfg["objective"]["w"] == 1.0 and config_hash(as_int, ENTRY, HOOK) == base
    assert config_hash(cfg, ENTRY, "mgbench.evaluation.quick:w_eval_hook") != base
    assert config_hash(cfg, "mgbench_standins:sleep_train", HOOK) != base


def test_reuse_must_be_a_boolean(tmp_path):
    path = write_spec(tmp_path, "_cache_bad", {"objective.w": [1.5]}, {}, reuse="no")
    with pytest.raises(ConfigError, match=r"_cache_bad\.yaml:reuse: expected true or false, got 'no'"):
        load_spec(path)
    assert load_spec(write_spec(tmp_path, "_cache_off", {"objective.w": [1.5]}, {}, reuse=False)).reuse is False
    assert load_spec(write_spec(tmp_path, "_cache_on", {"objective.w": [1.5]}, {})).reuse is True
