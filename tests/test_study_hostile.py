"""Hostile and careless input: nothing reaches a shell unchecked, validate is the whole truth, no password leaks.

- Executor option names and values from the spec, a site profile, the search space, --set and --out-dir:
  names match [A-Za-z0-9_-]+, no value holds a control character (refused at `study validate`, one line
  naming file:field, nothing created). Submitit's own renderer shows why: a newline in a key or value ends
  the `#SBATCH` line and the rest runs as shell code.
- Duplicate YAML keys, duplicate grid points, a SLURM time limit not longer than the USR2 delay, and a
  changed spec under a study name that already ran are errors naming the field.
- URIs with a password are shown as `user:***@host` in dry runs, errors, trial.json and MLflow artifacts.
- SLURM trials take their torch threads from the job's CPUs.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import file_tree, write_spec_file

from mgbench.cli import main as mgbench_main
from mgbench.config import ConfigError, load_yaml
from mgbench.redact import mask_uri, redact
from mgbench.study.spec import load_spec

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)

SPEC = "study.yaml"
SLURM = {"type": "slurm", "partition": "gpu"}
PASSWORD = "s3cr3t-Pw"
PG = f"postgresql://alice:{PASSWORD}@db.example:5432/optuna"
NEEDS_SRUN = pytest.mark.skipif(shutil.which("srun") is None, reason="submitit checks a profile with a SLURM "
                                "executor, which needs srun (bash slurm/cluster.sh install)")


def write_spec(good: dict, tmp: Path, **changes) -> Path:
    """The good spec (`good_study`, tests/conftest.py) named hostile, top-level keys replaced, in tmp/study.yaml."""
    return write_spec_file({**copy.deepcopy(good), "name": "hostile", **changes}, tmp, SPEC)


def refused(tmp: Path, path: Path, capsys, *extra: str, commands=("validate", "run")) -> str:
    """Run the commands in process: each exits 2 with one stderr line and leaves the folder as it was."""
    before = file_tree(tmp)
    msgs = []
    for command in commands:
        rc = mgbench_main(["study", command, str(path), *extra])
        out = capsys.readouterr()
        assert rc == 2 and out.out == "" and len(out.err.splitlines()) == 1, (command, rc, out)
        assert file_tree(tmp) == before, file_tree(tmp) - before
        msgs.append(out.err.strip())
    assert msgs[0].split(": error: ", 1)[1] == msgs[-1].split(": error: ", 1)[1]
    return msgs[0].split(": error: ", 1)[1]


@pytest.fixture
def refuse_spec(tmp_path, good_study, monkeypatch, capsys):
    """refuse_spec(*extra args, **top-level keys): write that spec in tmp_path (the working folder), run `refused`
    on it; (its path, the message)."""
    monkeypatch.chdir(tmp_path)

    def refuse(*extra: str, **changes) -> tuple[Path, str]:
        path = write_spec(good_study, tmp_path, **changes)
        return path, refused(tmp_path, path, capsys, *extra)
    return refuse


# ----------------------------------------------------------------------------- the premise


def test_submitit_renders_a_newline_in_a_key_or_value_as_a_shell_line(tmp_path):
    """Why the checks exist: unchecked, submitit turns a newline into a shell line before the later #SBATCH lines."""
    from submitit.slurm.slurm import _make_sbatch_string

    text = _make_sbatch_string(command="true", folder=tmp_path, partition="gpu\ntouch pwned-by-value",
                               additional_parameters={"a\ntouch pwned-by-key": 1}, gpus_per_node=1)
    lines = text.splitlines()
    assert "touch pwned-by-key=1" in lines and "touch pwned-by-value'" in lines
    first_shell = min(lines.index("touch pwned-by-key=1"), lines.index("touch pwned-by-value'"))
    assert any(ln.startswith("#SBATCH --gpus-per-node") for ln in lines[first_shell:])  # sbatch ignores those


# ----------------------------------------------------------------------------- executor keys and values


HOSTILE_SPEC = [  # (id, executor section, the field after `file:`, a part of the message)
    ("key_newline", {**SLURM, "partition\ntouch pwned": "gpu"}, "executor.'partition\\ntouch pwned'",
     "a key with a control character"),
    ("key_semicolon", {**SLURM, "x;touch pwned": 1}, "executor.x;touch pwned",
     "'x;touch pwned' is not an option name (allowed: letters, digits, '_', '-')"),
    ("key_space", {**SLURM, "mail user": "a"}, "executor.mail user", "is not an option name"),
    ("additional_key_newline", {**SLURM, "additional": {"x\ntouch pwned": 1}},
     "executor.additional.'x\\ntouch pwned'", "a key with a control character"),
    ("additional_key_equals", {**SLURM, "additional": {"x=1 --y": 1}}, "executor.additional.x=1 --y",
     "is not an option name"),
    ("value_newline", {**SLURM, "partition": "gpu\ntouch pwned"}, "executor.partition",
     "control character '\\n' at position 3"),
    ("value_cr", {**SLURM, "additional": {"constraint": "a100\rh100"}}, "executor.additional.constraint",
     "control character '\\r' at position 4"),
    ("value_nul", {**SLURM, "comment": "a\x00b"}, "executor.comment", "control character '\\x00' at position 1"),
    ("setup_line_newline", {**SLURM, "setup": ["module load cuda", "source x\ntouch pwned"]}, "executor.setup[1]",
     "give a list for several lines"),
    ("debug_executor_too", {"type": "debug", "x\ty": 1}, "executor.'x\\ty'", "a key with a control character"),
]


@pytest.mark.parametrize("section, field, message", [c[1:] for c in HOSTILE_SPEC], ids=[c[0] for c in HOSTILE_SPEC])
def test_hostile_executor_options_in_the_spec_are_refused(refuse_spec, section, field, message):
    path, msg = refuse_spec(executor=section)
    assert msg.startswith(f"{path}:{field}: ") and message in msg, msg


HOSTILE_PROFILE = [  # (id, profile text, the field inside the profile file, a part of the message)
    ("key_newline", 'slurm_partition: gpu\n"slurm_comment\\ntouch pwned": x\n', "'slurm_comment\\ntouch pwned'",
     "is not an option name (allowed: letters, digits, '_', '-')"),
    ("key_semicolon", "slurm_partition: gpu\n'slurm_qos;touch pwned': x\n", "slurm_qos;touch pwned",
     "is not an option name"),
    ("additional_key", "slurm_additional_parameters: {'a b': 1}\n", "slurm_additional_parameters.a b",
     "is not an option name"),
    ("value_newline", 'slurm_partition: "gpu\\ntouch pwned"\n', "slurm_partition", "control character '\\n'"),
    ("setup_newline", 'slurm_setup: ["module load cuda\\ntouch pwned"]\n', "slurm_setup[0]", "control character"),
    ("duplicate_key", "slurm_partition: gpu\ntimeout_min: 30\nslurm_partition: cpu\n", "3:slurm_partition",
     "duplicate key (first at line 1; keep one)"),
]


@pytest.mark.parametrize("text, field, message", [c[1:] for c in HOSTILE_PROFILE], ids=[c[0] for c in HOSTILE_PROFILE])
def test_hostile_site_profiles_are_refused(tmp_path, refuse_spec, text, field, message):
    (tmp_path / "site.yaml").write_text(text)
    path, msg = refuse_spec(executor={"type": "slurm", "profile": "site.yaml"})
    assert msg.startswith(f"{path}:executor.profile: {tmp_path / 'site.yaml'}:{field}: ") and message in msg, msg


HOSTILE_SPACE = [  # (id, space, the field, a part of the message)
    ("grid_value", {"objective.w": [1.0, 1.5], "train.device": {"grid": ["cpu", "cpu\ntouch pwned"]}},
     "space.train.device.grid[1]", "control character '\\n' at position 3"),
    ("space_key", {"objective.w\ntouch pwned": [1.5]}, "space.'objective.w\\ntouch pwned'",
     "a key with a control character"),
    ("named_setting_value", {"variant": {"grid": [{"objective.w": 1.5}, {"data.cache_dir": "/x\r/y"}]}},
     "space.variant.grid[1].data.cache_dir", "control character '\\r'"),
]


@pytest.mark.parametrize("space, field, message", [c[1:] for c in HOSTILE_SPACE], ids=[c[0] for c in HOSTILE_SPACE])
def test_hostile_search_space_is_refused(refuse_spec, space, field, message):
    path, msg = refuse_spec(space=space, executor=SLURM)
    assert msg.startswith(f"{path}:{field}: ") and message in msg, msg


def test_hostile_command_line_values_are_refused(tmp_path, refuse_spec, capsys):
    """--out-dir reaches `#SBATCH --output=...`; --set and a base file reach the job: both are checked too."""
    path, msg = refuse_spec("--out-dir", f"{tmp_path}/o\ntouch pwned", executor=SLURM)
    assert msg.startswith(f"{path}:out_dir: control character '\\n'"), msg
    msg = refused(tmp_path, path, capsys, "--set", r'data.cache_dir="/x\ntouch pwned"')
    assert msg.startswith(f"{path}:--set data.cache_dir: control character '\\n'"), msg
    base = tmp_path / "base.yaml"
    base.write_text(base.read_text().replace("name: grid2d\n", 'name: "a\\x07b"\n', 1))
    msg = refused(tmp_path, path, capsys)
    assert msg.startswith(f"{tmp_path / 'base.yaml'}:name: control character '\\x07'"), msg


def test_an_accepted_slurm_spec_renders_every_option_as_an_sbatch_line(tmp_path, good_study, monkeypatch, capsys):
    """Unusual but harmless values pass; the dry run's script is valid bash with one #SBATCH line per option."""
    monkeypatch.chdir(tmp_path)
    section = {**SLURM, "comment": "a b; $(touch pwned) `x`", "additional": {"constraint": "a100|h100"},
               "setup": ["export A=1", "echo ready"]}
    path = write_spec(good_study, tmp_path, executor=section)
    assert mgbench_main(["study", "run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    script = out[out.index("#!/bin/bash"):out.index("dry run: nothing submitted")]
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    lines = script.splitlines()
    header = lines[lines.index("# Parameters") + 1:lines.index("# setup") - 1]
    assert all(ln.startswith("#SBATCH --") for ln in header), header
    flags = {ln.split("=", 1)[0] for ln in header}
    assert {"#SBATCH --partition", "#SBATCH --comment", "#SBATCH --constraint", "#SBATCH --time",
            "#SBATCH --signal", "#SBATCH --array"} <= flags
    assert "#SBATCH --comment='a b; $(touch pwned) `x`'" in header  # quoted: a comment, never run
    assert lines[lines.index("# setup") + 1:lines.index("# setup") + 3] == ["export A=1", "echo ready"]
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- validate is the whole truth


def test_duplicate_yaml_keys_are_errors_naming_file_line_and_key(tmp_path, good_study, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = write_spec(good_study, tmp_path)
    text = path.read_text()
    path.write_text(text + "poll_s: 0.5\n")  # poll_s given twice: YAML would keep the last silently
    line = len(text.splitlines()) + 1
    first = next(i for i, ln in enumerate(text.splitlines(), 1) if ln.startswith("poll_s:"))
    assert refused(tmp_path, path, capsys) == f"{path}:{line}:poll_s: duplicate key (first at line {first}; keep one)"

    path.write_text(text)
    base = tmp_path / "base.yaml"
    lines = base.read_text().splitlines()
    first = lines.index("  steps: 3000") + 1
    at = lines.index("  log_every: 100") + 2
    lines.insert(at - 1, "  steps: 4")  # a nested duplicate in the extended trainer config
    base.write_text("\n".join(lines) + "\n")
    msg = refused(tmp_path, path, capsys)
    assert msg == f"{base}:{at}:train.steps: duplicate key (first at line {first}; keep one)", msg


def test_load_yaml_keeps_anchors_and_merges(tmp_path):
    """Merge keys (`<<: *a`) override on purpose and aliases repeat a node: neither is a duplicate."""
    p = tmp_path / "a.yaml"
    p.write_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\nsame: *b\n")
    assert load_yaml(p) == {"base": {"x": 1, "y": 2}, "other": {"x": 3, "y": 2}, "same": {"x": 1, "y": 2}}
    p.write_text("a: {1: x, 1.0: y}\n")  # equal keys written differently
    with pytest.raises(ConfigError, match=r"a\.yaml:1:a\.1\.0: duplicate key \(first at line 1"):
        load_yaml(p)


@pytest.mark.parametrize("space, field, points", [
    ({"objective.w": [1.5, 1.50]}, "space.objective.w", "{objective.w: 1.5} and {objective.w: 1.5}"),
    ({"objective.w": [1, 1.0, 1.5]}, "space.objective.w", "{objective.w: 1} and {objective.w: 1.0}"),
    ({"variant": {"grid": [{"objective.w": 1.5}, {"objective.w": 1.5, "objective.t_high": 0.75}]}},
     "space.variant", "{variant: \"objective.w=1.5\"} and {variant: \"objective.w=1.5 objective.t_high=0.75\"}"),
    ({"objective.w": [1.5], "optim.lr": [0.001, 1.0e-3]}, "space.optim.lr",
     "{objective.w: 1.5, optim.lr: 0.001} and {objective.w: 1.5, optim.lr: 0.001}"),
    ({"objective.w": [1.5], "variant": {"grid": [{"optim.lr": 0.001}, {"train.seed": 0}]}},
     "space.variant", "give the same trial config"),  # both equal the base config's defaults
])
def test_duplicate_grid_points_are_errors_naming_the_field(refuse_spec, space, field, points):
    path, msg = refuse_spec(space=space)
    assert msg.startswith(f"{path}:{field}: grid points ") and points in msg, msg
    assert msg.endswith("give the same trial config (it would train twice; keep one value)")


@pytest.mark.parametrize("section, profile, field, limit, delay", [
    ({"timeout_min": 1}, None, "executor.timeout_min", 60, 90),
    ({"time": "1:30"}, None, "executor.time", 90, 90),            # equal: USR2 at the start
    ({"time": "0-00:00:30", "signal_delay_s": 30}, None, "executor.time", 30, 30),
    ({"timeout_min": 2, "signal_delay_s": 120}, None, "executor.timeout_min", 120, 120),
    pytest.param({}, "timeout_min: 1\nslurm_partition: gpu\n", "executor.profile: timeout_min (from profile "
                 "'site.yaml')", 60, 90, marks=NEEDS_SRUN),
])
def test_time_limit_not_beyond_the_usr2_delay_is_an_error(tmp_path, good_study, monkeypatch, capsys, section, profile,
                                                          field, limit, delay):
    monkeypatch.chdir(tmp_path)
    if profile:
        (tmp_path / "site.yaml").write_text(profile)
        section = {"profile": "site.yaml"}
    path = write_spec(good_study, tmp_path, executor={"type": "slurm", **section})
    msg = refused(tmp_path, path, capsys)
    assert msg == (f"{path}:{field}: a time limit of {limit} s is not longer than the USR2 signal delay of {delay} s "
                   "(slurm_signal_delay_s, submitit's default 90): raise the limit or lower signal_delay_s"), msg


def test_slurm_times_in_every_format_are_read_in_seconds():
    from mgbench.study.guards import slurm_seconds, time_limit_problem

    cases = {5: 300, "5": 300, "2:30": 150, "1:02:03": 3723, "1-0": 86400, "1-02": 93600, "1-02:03": 93780,
             "1-02:03:04": 93784}
    assert {k: slurm_seconds(k) for k in cases} == cases
    assert time_limit_problem({"timeout_min": 2}) is None                       # 120 s > 90 s
    assert time_limit_problem({"timeout_min": 60, "slurm_time": "1:31"}) is None  # slurm_time wins: 91 s
    assert time_limit_problem({"timeout_min": 60, "slurm_time": "1:30"})[0] == "slurm_time"


def test_changed_spec_under_a_study_name_is_refused_until_a_new_version(tmp_path, good_study, monkeypatch, capsys):
    """First run records the spec; a result-changing edit is refused (validate, dry run, run) with the fields
    listed; run-only settings may change; --new-version runs it as <name>-v2 and finds v2 again next time."""
    monkeypatch.chdir(tmp_path)
    path = write_spec(good_study, tmp_path)
    assert mgbench_main(["study", "run", str(path)]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    assert (out / "spec.recorded.yaml").is_file()

    write_spec(good_study, tmp_path, space={"objective.w": [1.0, 1.25]}, base={"train": {"steps": 12, "device": "cpu"}},
               pruning="median")
    msg = refused(tmp_path, path, capsys, commands=("validate", "run"))
    assert msg == (f"{path}:base.train.steps: study hostile in {out} was run with another spec (changed: "
                   "base.train.steps, pruning.type, space.objective.w.grid); restore it, or run the new spec as a "
                   "new study with `mgbench study run --new-version`"), msg
    refused(tmp_path, path, capsys, "--dry-run", commands=("run",))

    write_spec(good_study, tmp_path, parallelism=2, poll_s=0.2, max_retries=1, n_trials=1, reuse=False, executor=SLURM)
    assert mgbench_main(["study", "validate", str(path)]) == 0  # how it runs, not what it computes
    capsys.readouterr()

    write_spec(good_study, tmp_path, space={"objective.w": [1.0, 1.25]})
    assert mgbench_main(["study", "run", str(path), "--new-version"]) == 0
    text = capsys.readouterr().out
    assert f"it runs as hostile-v2 in {out}-v2" in text and "study hostile-v2: 2 complete" in text
    assert len(list((out / "trials").iterdir())) == 2  # the first version untouched
    assert mgbench_main(["study", "run", str(path), "--new-version", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert f"it runs as hostile-v2 in {out}-v2" in text and "-v3" not in text
    assert not Path(f"{out}-v3").exists()


# ----------------------------------------------------------------------------- secrets


def test_mask_uri_hides_exactly_the_password():
    assert mask_uri(PG) == "postgresql://alice:***@db.example:5432/optuna"
    assert mask_uri("postgresql+psycopg2://u:p%40ss@h/db") == "postgresql+psycopg2://u:***@h/db"
    assert mask_uri("mysql://root@h/db") == "mysql://root@h/db"           # no password: unchanged
    assert mask_uri("sqlite:////a/b:c@d.db") == "sqlite:////a/b:c@d.db"   # a path, not user info
    assert mask_uri("x http://a:b@h1:5000 and mysql://c:d@h2/e") == "x http://a:***@h1:5000 and mysql://c:***@h2/e"
    assert redact({"k": [PG, 3], PG: None}) == {"k": [mask_uri(PG), 3], mask_uri(PG): None}


def test_dry_run_and_errors_show_no_password(tmp_path, good_study, monkeypatch, capsys):
    """validate and --dry-run connect to nothing: they run with an unreachable PostgreSQL URI and print it masked."""
    monkeypatch.chdir(tmp_path)
    path = write_spec(good_study, tmp_path, storage=PG, tracking_uri=PG.replace("optuna", "mlflow"), executor=SLURM)
    assert mgbench_main(["study", "validate", str(path)]) == 0
    assert mgbench_main(["study", "run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr()
    assert PASSWORD not in out.out + out.err
    assert "storage postgresql://alice:***@db.example:5432/optuna" in out.out.splitlines()
    assert "tracking postgresql://alice:***@db.example:5432/mlflow" in out.out.splitlines()
    write_spec(good_study, tmp_path, storage=PG.replace("postgresql", "redis"))
    msg = refused(tmp_path, path, capsys)
    assert PASSWORD not in msg and "redis://alice:***@db.example" in msg


def test_trial_record_and_mlflow_spec_artifact_hold_no_password(tmp_path, good_study, monkeypatch):
    """The spec artifact (logged after ${...} expansion) and trial.json: a real local MLflow store, a PostgreSQL
    Optuna URI with a password (never connected to here)."""
    from mgbench.study import runs
    from mgbench.study.spec import validate_trial
    from mgbench.study.trial import read_json, write_json

    monkeypatch.setenv("MGBENCH_TEST_PW", PASSWORD)
    uri = "postgresql://alice:${MGBENCH_TEST_PW}@db.example/optuna"
    spec = load_spec(write_spec(good_study, tmp_path, storage=uri))
    assert spec.storage == PG.replace(":5432", "")  # the real URI stays for connecting
    store = runs.open_store(spec)
    c = store.client
    exp = runs.experiment_id(store, spec)
    parent = runs.parent_run(store, exp, spec)
    cfg = validate_trial(spec, {"objective.w": 1.5})
    run_id = runs.trial_run(store, exp, parent, spec, 0, {"objective.w": 1.5}, cfg)
    for rid in (parent, run_id):
        local = Path(c.download_artifacts(rid, runs.A_SPEC, str(tmp_path / rid)))
        logged = yaml.safe_load(local.read_text())
        assert logged["storage"] == "postgresql://alice:***@db.example/optuna" and PASSWORD not in local.read_text()
        assert PASSWORD not in json.dumps(c.get_run(rid).data.params) + json.dumps(c.get_run(rid).data.tags)
    rec = {"storage": spec.storage, "tracking_uri": spec.tracking_uri, "error": f"cannot connect to {spec.storage}"}
    write_json(tmp_path / "trial.json", rec)
    assert PASSWORD not in (tmp_path / "trial.json").read_text()
    assert read_json(tmp_path / "trial.json")["storage"] == "postgresql://alice:***@db.example/optuna"


# ----------------------------------------------------------------------------- threads


def test_slurm_trials_take_their_threads_from_the_job_cpus(tmp_path, good_study):
    from mgbench.study.trial import slurm_threads, trial_threads

    job = {"SLURM_JOB_ID": "42"}
    assert slurm_threads({**job, "SLURM_CPUS_PER_TASK": "4", "SLURM_JOB_CPUS_PER_NODE": "16"}) == 4
    assert slurm_threads({**job, "SLURM_JOB_CPUS_PER_NODE": "8(x2)", "SLURM_NTASKS_PER_NODE": "2"}) == 4
    assert slurm_threads({**job, "SLURM_JOB_CPUS_PER_NODE": "6,4", "SLURM_TASKS_PER_NODE": "3(x2)"}) == 2
    assert slurm_threads({**job, "SLURM_JOB_CPUS_PER_NODE": "2", "SLURM_NTASKS_PER_NODE": "4"}) == 1
    assert slurm_threads({**job, "SLURM_CPUS_PER_TASK": "4", "OMP_NUM_THREADS": "2"}) is None  # the user chose
    assert slurm_threads({"SLURM_CPUS_PER_TASK": "4"}) is None                                  # not in a job
    assert slurm_threads(job) is None                                                           # nothing to go by
    spec = load_spec(write_spec(good_study, tmp_path, executor=SLURM, parallelism=2))
    assert trial_threads(spec, {**job, "SLURM_CPUS_PER_TASK": "3"}) == 3
    spec.executor.type = "local"  # local trials share the machine instead (affinity of this process)
    assert trial_threads(spec, {**job, "SLURM_CPUS_PER_TASK": "3"}) == max(1, len(os.sched_getaffinity(0)) // 2)
