"""The `mgbench` command as a user runs it (a subprocess): entry points, one error style, `study --set`,
read-only commands that create nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, STUDIES

INSTALLED = Path(sys.executable).parent / "mgbench"
MGBENCH = [str(INSTALLED)] if INSTALLED.is_file() else [sys.executable, "-m", "mgbench"]
COMMANDS = ["train", "eval", "study", "report", "frontier", "ui", "dashboard", "bench"]


def mgbench(*args: str, cwd: Path = ROOT, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([*(prefix or MGBENCH), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def tiny_spec(folder: Path, name: str = "_cli_tiny") -> Path:
    """A one-trial grid2d study on the debug executor: a few steps, a quick evaluation, folders under `folder`."""
    spec = {"name": name, "extends": str(STUDIES / "base/grid2d.yaml"),
            "base": {"optim": {"batch_size": 32}, "train": {"steps": 4, "log_every": 2, "ckpt_every": 4,
                                                            "device": "cpu"},
                     "sample": {"steps": 4, "n_grid": 16}, "eval": {"n_samples": 16}},
            "space": {"objective.w": {"grid": [1.0]}}, "sampler": "grid",
            "optimize": {"metric": "off_class", "direction": "minimize"},
            "eval_hook": "mgbench.evaluation.quick:quick_eval_hook", "executor": "debug", "poll_s": 0.05,
            "out_dir": "out"}
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ----------------------------------------------------------------------------- entry points


def test_version_is_the_projects_and_python_m_is_the_command():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for prefix in (MGBENCH, [sys.executable, "-m", "mgbench"]):
        res = mgbench("--version", prefix=prefix)
        assert (res.returncode, res.stdout.strip()) == (0, f"mgbench {version}"), res.stderr
    res = mgbench("--help", prefix=[sys.executable, "-m", "mgbench"])
    assert res.returncode == 0 and res.stdout.startswith("usage: mgbench ")
    listed = [line.split()[0] for line in res.stdout.splitlines() if line.startswith("    ")]
    assert [c for c in listed if c in COMMANDS] == COMMANDS


def test_train_help_names_a_folder_of_trainer_configs_that_exists():
    res = mgbench("train", "--help")
    assert res.returncode == 0 and "studies/base/" in res.stdout and "mgbench/configs" not in res.stdout
    assert sorted(p.name for p in (STUDIES / "base").glob("*.yaml"))   # the folder it names holds configs


HEAVY = ("torch", "pandas", "numpy", "scipy", "mlflow", "optuna", "submitit")
LOADED = ("import sys\nfrom mgbench.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
          f"print(sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)")


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["eval", "--help"], ["study", "run", "--help"],
                                  ["ui", "--help"], ["bench", "--help"], ["study", "validate", "missing.yaml"]])
def test_help_and_spec_errors_load_no_heavy_library(argv):
    """What makes `--help` take seconds is importing torch, pandas or MLflow; these commands import none."""
    res = mgbench(*argv, prefix=[sys.executable, "-c", LOADED])
    assert res.stderr.splitlines()[-1] == "[]", res.stderr


def test_bench_sections_named_without_torch_are_the_reports():
    from mgbench.bench.cli import SECTION_ORDER
    from mgbench.bench.markdown import SECTION_ORDER as REPORT_ORDER

    assert SECTION_ORDER == REPORT_ORDER


# ----------------------------------------------------------------------------- one error style


@pytest.mark.parametrize("argv, usage, error", [
    (["trian"], "usage: mgbench [-h]",
     "mgbench: error: argument COMMAND: invalid choice: 'trian' (choose from 'train', 'eval', 'study', 'report', "
     "'frontier', 'ui', 'dashboard', 'bench') (did you mean 'train'?)"),
    (["study", "vaildate", "x.yaml"], "usage: mgbench study [-h]",
     "mgbench study: error: argument COMMAND: invalid choice: 'vaildate' (choose from 'validate', 'run', 'status', "
     "'resume', 'cancel') (did you mean 'validate'?)"),
    (["study", "run", "x.yaml", "--dryrun"], "usage: mgbench study run [-h]",
     "mgbench study run: error: unrecognized arguments: --dryrun (did you mean '--dry-run'?)"),
    (["frontier", "--study", "x", "--quality", "fdi"], "usage: mgbench frontier [-h]",
     "mgbench frontier: error: argument --quality: invalid choice: 'fdi' (choose from 'fid', 'in_class', 'is', "
     "'off_support', 'precision') (did you mean 'fid'?)"),
    (["xyzzy"], "usage: mgbench [-h]",
     "mgbench: error: argument COMMAND: invalid choice: 'xyzzy' (choose from 'train', 'eval', 'study', 'report', "
     "'frontier', 'ui', 'dashboard', 'bench')"),   # nothing close: no suggestion
])
def test_usage_errors_show_the_commands_usage_and_a_suggestion(argv, usage, error):
    res = mgbench(*argv)
    lines = res.stderr.splitlines()
    assert res.returncode == 2 and res.stdout == ""
    assert lines[0].startswith(usage), res.stderr
    assert lines[-1] == error


@pytest.mark.parametrize("argv, prefix", [
    (["study", "validate", "missing.yaml"], "mgbench study validate: error: missing.yaml"),
    (["study", "status", "missing.yaml"], "mgbench study status: error: missing.yaml"),
    (["train", "missing.yaml"], "mgbench train: error: missing.yaml"),
    (["train", "studies/base/grid2d.yaml", "--set", "objective.w"], "mgbench train: error: --set objective.w: "),
    (["eval", "no/such/run"], "mgbench eval: error: no/such/run"),
    (["frontier", "--study", "quickstart"], "mgbench frontier: error: --study quickstart: a study name needs"),
])
def test_command_errors_are_one_line_named_after_the_command(argv, prefix, tmp_path):
    res = mgbench(*argv)
    assert res.returncode == 2 and res.stdout == ""
    (line,) = res.stderr.splitlines()
    assert line.startswith(prefix), line


# ----------------------------------------------------------------------------- study --set


def test_study_validate_applies_set_to_the_base_config_before_validation(tmp_path):
    spec = tiny_spec(tmp_path)
    res = mgbench("study", "validate", str(spec), "--set", "train.steps=7", "--set", "optim.lr=1e-3", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [f"{spec}: ok (grid, 1 trials, executor debug)",
                                       "with --set optim.lr=0.001 train.steps=7"]   # 1e-3 is a number
    bad = {"train.stepz=7": f"{spec}:--set train.stepz: unknown key (allowed: ",
           "optim.lr=fast": f"{spec}:--set optim.lr: expected a number, got 'fast'",
           "objective.w=2": f"{spec}:space.objective.w: --set objective.w is searched by the study's space"}
    for item, message in bad.items():
        res = mgbench("study", "validate", str(spec), "--set", item, cwd=tmp_path)
        (line,) = res.stderr.splitlines()
        assert res.returncode == 2 and line.startswith(f"mgbench study validate: error: {message}"), line
    dry = mgbench("study", "run", str(spec), "--dry-run", "--set", "train.steps=7", cwd=tmp_path)
    assert dry.returncode == 0 and dry.stdout.splitlines()[-1] == "with --set train.steps=7", dry.stderr
    assert tree(tmp_path) == ["tiny.yaml"]   # validate and dry runs write nothing


def test_study_run_records_set_and_refuses_a_rerun_with_other_values(tmp_path):
    spec = tiny_spec(tmp_path)
    out = tmp_path / "out"
    res = mgbench("study", "run", str(spec), "--set", "train.steps=6", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert yaml.safe_load((out / "set.yaml").read_text()) == {"train.steps": 6}
    trial = json.loads((out / "trials/0000/trial.json").read_text())
    result = json.loads((out / "trials/0000/result.json").read_text())
    assert trial["config"]["train"]["steps"] == 6 and result["step"] == 6   # trained 6 steps, not the spec's 4

    files = tree(out)
    res = mgbench("study", "run", str(spec), "--set", "train.steps=8", "--set", "optim.lr=0.01", cwd=tmp_path)
    (line,) = res.stderr.splitlines()
    assert res.returncode == 2 and line == (
        f"mgbench study run: error: {out / 'set.yaml'}:set: --set differs on optim.lr, train.steps from what this "
        "study was run with (train.steps=6); repeat those values, or give no --set to reuse them")
    assert tree(out) == files

    res = mgbench("study", "validate", str(spec), cwd=tmp_path)   # no --set: the recorded values
    assert res.returncode == 0 and res.stdout.splitlines()[-1] == "with --set train.steps=6", res.stderr
    res = mgbench("study", "run", str(spec), cwd=tmp_path)
    assert res.returncode == 0 and "1 complete" in res.stdout, res.stderr
    assert yaml.safe_load((out / "set.yaml").read_text()) == {"train.steps": 6}

    res = mgbench("frontier", "--study", "_other", "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.splitlines() == [
        f"mgbench frontier: error: study _other has no trial runs at sqlite:///{out / 'mlflow.db'}; "
        "run `mgbench study run SPEC` first"]


# ----------------------------------------------------------------------------- read-only commands


@pytest.mark.parametrize("command", [["frontier"], ["report", "toy"]])
def test_reading_a_study_without_runs_says_what_to_run_and_creates_nothing(command, tmp_path):
    tiny_spec(tmp_path)
    before = tree(tmp_path)
    res = mgbench(*command, "--study", "tiny.yaml", cwd=tmp_path)
    assert res.returncode == 2 and res.stdout == ""
    (line,) = res.stderr.splitlines()
    assert line.startswith(f"mgbench {command[0]}: ") and line.endswith(
        f"study _cli_tiny has no runs yet (no MLflow store at {tmp_path / 'out' / 'mlflow.db'}); "
        "run `mgbench study run tiny.yaml` first"), line
    assert tree(tmp_path) == before


def test_train_with_a_tracking_uri_logs_one_finished_run_through_the_run_store(tmp_path):
    """`mgbench train --tracking-uri`: one run tagged role=train in the named experiment, its config as params,
    the windows' losses as step metrics, ended FINISHED."""
    from mgbench.tracking import M_LOSS, TAG_OUT_DIR, TAG_ROLE, mlflow_client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = mgbench("train", "studies/base/grid2d.yaml", "--tracking-uri", uri, "--experiment", "solo", "--no-eval",
                  "--set", "train.steps=4", "--set", "train.log_every=2", "--set", "train.ckpt_every=4",
                  "--set", "optim.batch_size=32", "--set", "sample.n_grid=16", "--set", "sample.steps=4",
                  "--set", "objective.w=1.5", "--set", f"out_dir={tmp_path / 'run'}")
    assert res.returncode == 0, res.stderr
    client = mlflow_client(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("solo").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags[TAG_ROLE] == "train" and run.data.tags[TAG_OUT_DIR] == str(tmp_path / "run")
    assert run.data.params["train.steps"] == "4" and run.data.params["objective.w"] == "1.5"
    assert [m.step for m in client.get_metric_history(run.info.run_id, M_LOSS)] == [2, 4]


def test_train_with_a_tracking_uri_ends_its_run_failed_when_training_raises(tmp_path, monkeypatch):
    """A diverged or crashing run is not left RUNNING in MLflow: the error propagates and the run ends FAILED."""
    from mgbench.cli import main
    from mgbench.tracking import mlflow_client
    from mgbench.trainer import loop

    def diverges(*args, **kwargs):
        raise loop.TrainingDiverged("loss is nan at step 3")

    monkeypatch.setattr(loop, "train", diverges)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(loop.TrainingDiverged, match="step 3"):
        main(["train", str(STUDIES / "base/grid2d.yaml"), "--tracking-uri", uri, "--experiment", "bad", "--no-eval",
              "--set", f"out_dir={tmp_path / 'run'}"])
    client = mlflow_client(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("bad").experiment_id])
    assert run.info.status == "FAILED"
