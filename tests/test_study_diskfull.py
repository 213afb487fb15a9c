"""A checkpoint that cannot be written (a full disk, a file-size limit) leaves the trial resumable: its job
records it, the driver resubmits it from its latest checkpoint (counted against max_retries) and stays alive;
`mgbench train` says it in one line. The limit is real: RLIMIT_FSIZE, and the kernel refuses the write.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import PYTHONPATH, ROOT, STUDIES

from mgbench import tracking as T
from mgbench.study.runner import EVENTS_FILE, run_study
from mgbench.study.spec import load_spec
from mgbench.study.trial import read_json
from mgbench.tracking import mlflow_client

GRID2D = STUDIES / "base" / "grid2d.yaml"
LIMIT_BYTES = 4096    # far below a grid2d checkpoint (an MLP-S, its EMA and AdamW state)
FIRST_CKPT = 10       # the first attempt writes this checkpoint, then meets the limit at the next one
FIRST_ATTEMPT = "first_attempt"  # in the trial's folder: written by the first execution of fsize_train


def fsize_train(cfg, tracker=None, eval_hook=None, progress=None):
    """The trainer; its first execution writes its checkpoints after step FIRST_CKPT under a file-size limit."""
    from mgbench.trainer import loop

    marker = Path(cfg.out_dir) / FIRST_ATTEMPT
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("")
        loop.save_checkpoint = _under_limit_after(loop.save_checkpoint, FIRST_CKPT)
    return loop.train(cfg, tracker, eval_hook, progress=progress)


def _under_limit_after(save, first_step: int):
    """`save_checkpoint`, run under RLIMIT_FSIZE = LIMIT_BYTES for steps after `first_step`."""

    def limited(out_dir, step, *args, **kwargs):
        if step <= first_step:
            return save(out_dir, step, *args, **kwargs)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT_BYTES, hard))
        try:
            return save(out_dir, step, *args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    return limited


def diskfull_spec(tmp_path: Path, max_retries: int):
    spec = {"name": "_diskfull", "extends": str(GRID2D),
            "base": {"optim": {"batch_size": 64}, "sample": {"steps": 4, "n_grid": 16},
                     "train": {"steps": 30, "log_every": 10, "ckpt_every": 10, "device": "cpu"}},
            "space": {"objective.w": [1.0]}, "sampler": "grid", "max_retries": max_retries,
            "optimize": {"metric": "off_class", "direction": "minimize"},
            "entry": "test_study_diskfull:fsize_train", "eval_hook": "mgbench.evaluation.quick:quick_eval_hook",
            "executor": "local", "parallelism": 1, "poll_s": 0.2, "out_dir": str(tmp_path / "study")}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    return load_spec(tmp_path / "spec.yaml")


@pytest.fixture
def job_path(monkeypatch):
    """The local executor's jobs import this module (the spec's entry) and mgbench."""
    monkeypatch.setenv("PYTHONPATH", PYTHONPATH)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def run_diskfull(tmp_path: Path, max_retries: int, complete: int, failed: int):
    """Run the one-trial diskfull study; check its (complete, failed) count; (spec, printed lines, trial folder)."""
    spec = diskfull_spec(tmp_path, max_retries=max_retries)
    lines: list[str] = []
    summary = run_study(spec, echo=lines.append)
    assert (summary.n_complete, summary.n_failed) == (complete, failed), lines
    return spec, lines, Path(spec.out_dir) / "trials" / "0000"


@pytest.mark.slow
def test_a_checkpoint_write_failure_is_retried_from_the_latest_checkpoint(tmp_path, job_path):
    spec, lines, folder = run_diskfull(tmp_path, max_retries=2, complete=1, failed=0)
    rec = read_json(folder / "trial.json")
    assert rec["deaths"] == 1 and len(rec["jobs"]) == 2
    assert read_json(folder / "result.json")["status"] == "finished"
    said = [line for line in lines if "stopped (cannot write checkpoint" in line]
    assert len(said) == 1 and said[0].endswith("resubmitting from its checkpoint (retry 1 of 2)"), lines
    assert "ckpt_00000020.pt" in said[0] and "file-size limit" in said[0] and "\n" not in said[0]
    events = [json.loads(x) for x in (Path(spec.out_dir) / EVENTS_FILE).read_text().splitlines()]
    assert [e["event"] for e in events if e["trial"] == 0] == ["submit", "resubmit", "submit", "end"]

    # The retry resumed from the first attempt's step-10 checkpoint; no partial file was left behind.
    ckpts = sorted(p.name for p in (folder / "checkpoints").iterdir())
    assert ckpts == ["ckpt_00000020.pt", "ckpt_00000030.pt"]
    client = mlflow_client(spec.tracking_uri)
    resumed = client.get_metric_history(rec["run_id"], T.M_RESUMED)
    assert [(m.step, m.value) for m in resumed] == [(FIRST_CKPT, float(FIRST_CKPT))]
    run = client.get_run(rec["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags[T.TAG_STATUS] == "finished"
    trial = optuna.load_study(study_name="_diskfull", storage=spec.storage).trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE


@pytest.mark.slow
def test_checkpoint_write_failures_count_against_max_retries(tmp_path, job_path):
    spec, lines, folder = run_diskfull(tmp_path, max_retries=0, complete=0, failed=1)
    assert read_json(folder / "trial.json")["deaths"] == 1
    failed = [line for line in lines if "marked failed" in line]
    assert len(failed) == 1 and "stopped (cannot write checkpoint" in failed[0] and "max_retries 0" in failed[0]
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["ckpt_00000010.pt"]
    run = mlflow_client(spec.tracking_uri).get_run(read_json(folder / "trial.json")["run_id"])
    assert run.info.status == "FAILED" and "cannot write checkpoint" in run.data.tags["mgbench.error"]


def test_mgbench_train_reports_a_checkpoint_write_failure_in_one_line(tmp_path):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT_BYTES, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    out = tmp_path / "run"
    sets = ["train.steps=2", "train.ckpt_every=2", "optim.batch_size=16", "train.device=cpu", f"out_dir={out}"]
    res = subprocess.run([sys.executable, "-m", "mgbench", "train", str(GRID2D), "--no-eval",
                          *[a for s in sets for a in ("--set", s)]],
                         capture_output=True, text=True, preexec_fn=limit, cwd=tmp_path, timeout=600,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                              "HOME": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"})
    assert res.returncode == 1, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    assert errors[0].startswith(f"mgbench train: error: cannot write checkpoint {out}/checkpoints/ckpt_00000002.pt")
    assert "file-size limit" in errors[0]
    assert list((out / "checkpoints").iterdir()) == []   # the temporary file was removed
