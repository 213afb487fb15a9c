"""Benchmark: load a study of many trial runs from MLflow and render every table (goal: <= 10 s for 10,000 runs)."""
from __future__ import annotations

import itertools
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from mgbench import tracking as T
from mgbench.report import synthetic

BENCH_STUDY = "bench-report"
CACHE_DIR = Path(os.environ.get("MGBENCH_CACHE", Path.home() / ".cache" / "mgbench"))  # where the store is kept


def _settings() -> list[dict[str, Any]]:
    """The ablation settings of Tables 1-8, one dict of config overrides each."""
    knobs: list[dict[str, Any]] = [{"objective.w": 1.0}, {"objective.w": 1.0, "sample.guidance": "cfg",
                                                          "sample.cfg_scale": 1.0}]
    knobs += [{"objective.w": w} for w in (1.25, 1.5, 1.75, 2.0)]
    knobs += [{"objective.auto_w.enabled": True}]
    knobs += [{"objective.w": 1.5, "objective.label_drop": lam} for lam in (0.05, 0.15, 0.2)]
    knobs += [{"objective.w_range": [1.0, 2.0], "model.w_input": True}]
    knobs += [{"objective.w": 1.5, "objective.empty_class": False, "objective.label_drop": 0.0}]
    models = [{"model.arch": a, "objective.formulation": f, "data.name": d}
              for a, f, d in itertools.product(("DiT-T/2", "DiT-S/2"), ("diffusion", "flow"), ("digits", "mnist"))]
    return [{**m, **k} for m, k in itertools.product(models, knobs)]


def _rows(run_id: str, exp_id: str, parent: str, trial: int, params: dict[str, str], metrics: dict[str, float],
          status: str, scale: str) -> dict[str, list[dict[str, Any]]]:
    """The database rows of one trial run (MLflow's own tables: runs, tags, params, metrics, latest_metrics), with
    the tags and status map of the runs' writer (tracking.RunStore). 10,000 runs through MLflow's client would take
    minutes; a bulk insert takes seconds."""
    ts = 1_700_000_000_000 + trial
    tags = {**T.trial_tags(BENCH_STUDY, trial, parent, status, scale), "mlflow.runName": f"trial {trial}"}
    metric_rows = [{"key": k, "value": v, "timestamp": ts, "step": 2000, "is_nan": False, "run_uuid": run_id}
                   for k, v in metrics.items()]
    return {
        "runs": [{"run_uuid": run_id, "name": f"trial {trial}", "source_type": "LOCAL", "source_name": "",
                  "entry_point_name": "", "user_id": "bench", "status": T.STATUS_TO_MLFLOW[status],
                  "start_time": ts, "end_time": ts + 1, "source_version": "", "lifecycle_stage": "active",
                  "artifact_uri": "", "experiment_id": int(exp_id)}],
        "tags": [{"key": k, "value": v, "run_uuid": run_id} for k, v in tags.items()],
        "params": [{"key": k, "value": v, "run_uuid": run_id} for k, v in params.items()],
        "metrics": metric_rows, "latest_metrics": metric_rows,
    }


def seeded_metrics(per_seed: dict[str, list[float]]) -> dict[str, float]:
    """Tracked metrics of one evaluation at K sample seeds, named as the evaluation hook logs them: per tracked
    name its mean over the seeds, `_se` (K >= 2), `/seed_<k>` values, and `eval/n_sample_seeds` = K."""
    out: dict[str, float] = {}
    for name, values in per_seed.items():
        v = np.asarray(values, dtype=float)
        out[name] = float(v.mean())
        out[T.M_SAMPLE_SEEDS] = float(len(v))
        if len(v) >= 2:
            out[T.metric_se(name)] = float(v.std(ddof=1) / np.sqrt(len(v)))
            out.update({T.metric_seed(name, k): float(x) for k, x in enumerate(v)})
    return out


def _eval_metrics(rng: Any, sample_seeds: int) -> dict[str, float]:
    """Random final metrics of one finished run, each eval metric at `sample_seeds` sample seeds."""
    centres = {"fid": rng.uniform(5, 40), "sfid": rng.uniform(5, 40), "is": rng.uniform(40, 250),
               "precision": rng.uniform(0.5, 0.9), "recall": rng.uniform(0.3, 0.6)}
    spread = {"fid": 0.1, "sfid": 0.1, "is": 1.0, "precision": 0.005, "recall": 0.005}   # sampling noise per seed
    per_seed = {T.metric_eval(m): [c + rng.gauss(0, spread[m]) for _ in range(sample_seeds)]
                for m, c in centres.items()}
    return {**seeded_metrics(per_seed), T.M_IMG_PER_S: rng.uniform(10, 100), T.M_NFE: 50.0, T.M_PARAMS: 1e6}


def build_store(path: str | Path, n_runs: int = 10_000, seed: int = 0, sample_seeds: int = 3) -> str:
    """Write a study of `n_runs` trial runs (evaluated at `sample_seeds` sample seeds each) into a fresh sqlite
    MLflow store by bulk insert; returns its URI."""
    import random

    from mlflow.store.tracking.dbmodels import models as M
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    uri = f"sqlite:///{Path(path).resolve()}"
    exp_id, parent = synthetic.start_study(T.RunStore(uri), BENCH_STUDY)
    store = SqlAlchemyStore(uri, tempfile.gettempdir())
    rng = random.Random(seed)
    settings = _settings()
    tables = {"runs": M.SqlRun, "tags": M.SqlTag, "params": M.SqlParam, "metrics": M.SqlMetric,
              "latest_metrics": M.SqlLatestMetric}
    batch: dict[str, list] = {k: [] for k in tables}
    for trial in range(n_runs):
        params = synthetic.trial_params(**settings[trial % len(settings)], **{"train.seed": trial // len(settings)})
        status = "failed" if rng.random() < 0.02 else "finished"
        metrics = {} if status == "failed" else _eval_metrics(rng, sample_seeds)
        rows = _rows(uuid.uuid4().hex, exp_id, parent, trial, params, metrics, status, "digits, 2000 steps")
        for k, v in rows.items():
            batch[k] += v
    with store.engine.begin() as conn:
        for name, model in tables.items():
            for i in range(0, len(batch[name]), 20_000):
                conn.execute(model.__table__.insert(), batch[name][i:i + 20_000])
    return uri


def bench_report(n_runs: int = 10_000, out_dir: str | Path | None = None, cache_dir: str | Path | None = None,
                 sample_seeds: int = 3) -> dict[str, float]:
    """Build (once, cached) a store of n_runs trial runs at K sample seeds; time loading them and rendering
    Tables 1-8."""
    from mgbench.report.load import load_runs
    from mgbench.report.render import write_table
    from mgbench.report.tables import build_table, prepare_runs

    cache = Path(cache_dir or CACHE_DIR)
    cache.mkdir(parents=True, exist_ok=True)
    db = cache / f"bench_report_{n_runs}_k{sample_seeds}.db"
    t0 = time.perf_counter()
    if not db.exists():
        tmp = db.with_suffix(".tmp.db")
        tmp.unlink(missing_ok=True)
        build_store(tmp, n_runs, sample_seeds=sample_seeds)
        tmp.rename(db)
    t_build = time.perf_counter() - t0
    uri = f"sqlite:///{db.resolve()}"
    with tempfile.TemporaryDirectory(prefix="mgbench-bench-") as tmp:   # the tables go to out_dir, else are dropped
        out = Path(out_dir or tmp)
        t1 = time.perf_counter()
        runs = load_runs(uri, BENCH_STUDY)
        t2 = time.perf_counter()
        prepared = prepare_runs(runs)
        for number in range(1, 9):
            write_table(build_table(prepared, number, BENCH_STUDY), out)
        t3 = time.perf_counter()
    return {"n_runs": float(len(runs)), "build_s": t_build, "load_s": t2 - t1, "tables_s": t3 - t2,
            "total_s": t3 - t1}


if __name__ == "__main__":
    print(bench_report())
