"""Bad study specs: each is refused with one line naming `file:field` and what is allowed, and nothing is submitted.

Every case is a small change to a good spec. It goes through the real command line twice, in process
(`mgbench study validate FILE` and `mgbench study run FILE`): both exit 2 with exactly one line on stderr,
and `run` leaves the folder as it found it: no out_dir, no Optuna storage (so no study), no MLflow store
(so no runs), no submitit job folders, no latents job. A few cases also run as real `mgbench` processes.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import file_tree, write_spec_file

from mgbench.cli import main as mgbench_main
from mgbench.study.spec import load_spec
from mgbench.study.spec_checks import GRID2D_METRICS, IMAGE_METRICS, evaluation_metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)

SPEC = "study.yaml"

DELETE = object()
# What this file changes in the shared good spec (`good_study`, tests/conftest.py): its name, and the default
# evaluation hook, which keeps the objective metric checked. The sleeping trainer keeps an accidental run short
# (it would show up as files in the folder and exit 0, and the case fails).
GOOD = {"name": "badspec", "eval_hook": DELETE, "optimize": {"metric": "off_support"}}


def _merge(dst: dict, patch: dict) -> None:
    for k, v in patch.items():
        if v is DELETE:
            dst.pop(k, None)
        elif isinstance(v, dict) and isinstance(dst.get(k), dict) and not v.pop("_replace", False):
            _merge(dst[k], v)
        else:
            dst[k] = v


def _setup_images(tmp: Path) -> None:
    (tmp / "images" / "class0").mkdir(parents=True)


def _setup_vae(tmp: Path) -> None:
    _setup_images(tmp)
    (tmp / "vae").mkdir()


def _setup_cycle(tmp: Path) -> None:  # other.yaml is a spec that extends study.yaml back
    (tmp / "other.yaml").write_text(yaml.safe_dump({"name": "other", "extends": SPEC,
                                                    "space": {"objective.w": [1.0]}}))


def _setup_bad_profile(tmp: Path) -> None:
    (tmp / "site.yaml").write_text("slurm_partition: gpu\nslurm_foo: 1\n")


IMAGES = {"data": {"name": "imagefolder", "path": "{tmp}/images", "vae": "{tmp}/vae", "image_size": 16},
          "model": {"arch": "DiT-XS/2"}}

# (id, patch of the good spec, the field named after `file:`, what is allowed (a part of the message), setup)
CASES = [
    ("unknown_top_level_key", {"bogus": 1}, "bogus", "unknown key (allowed: base, entry, eval_hook", None),
    ("bad_study_name", {"name": "my study!"}, "name", "letters, digits, '_', '-', '.'", None),
    ("unknown_trainer_key_nested", {"base": {"optim": {"lrr": 0.1}}}, "base.optim.lrr",
     "unknown key (allowed: batch_size, betas, ema_decay", None),
    ("unknown_trainer_section", {"base": {"optimizer": {"lr": 0.1}}}, "base.optimizer",
     "unknown key (allowed: data, eval, model, name, objective, optim", None),
    ("unknown_space_key", {"space": {"objective.ww": [1.0]}}, "space.objective.ww",
     "unknown trainer key (e.g. objective.w, objective.label_drop, train.seed)", None),
    ("trainer_int_wrong_type", {"base": {"train": {"steps": "many"}}}, "base.train.steps",
     "expected an integer, got 'many'", None),
    ("trainer_bool_wrong_type", {"base": {"objective": {"force": "yes"}}}, "base.objective.force",
     "expected true or false, got 'yes'", None),
    ("base_not_a_mapping", {"base": [1, 2]}, "base", "expected a mapping of trainer config", None),
    ("parallelism_not_an_int", {"parallelism": "two"}, "parallelism", "expected an integer >= 1, got 'two'", None),
    ("parallelism_zero", {"parallelism": 0}, "parallelism", "expected an integer >= 1, got 0", None),
    ("max_retries_negative", {"max_retries": -1}, "max_retries", "expected an integer >= 0, got -1", None),
    ("poll_s_zero", {"poll_s": 0}, "poll_s", "expected a number > 0, got 0", None),
    ("lambda_outside_0_1", {"space": {"objective.label_drop": [0.1, 1.0]}}, "space.objective.label_drop",
     "1.0 is outside [0.0, 1.0)", None),
    ("w_below_1", {"space": {"objective.w": {"grid": [0.5, 1.5]}}}, "space.objective.w",
     "0.5 is outside [1.0, 100.0]", None),
    ("w_without_fixed_point", {"space": {"objective.w": {"grid": [1.0, 2.5]}}}, "space.objective.w",
     "mg_fraction * (w - 1) = 1.5 >= 1 has no fixed point and diverges; lower w or mg_fraction, or set force: true",
     None),
    ("w_range_reversed", {"base": {"objective": {"w_range": [1.8, 1.2]}}}, "base.objective.w_range",
     "expected [lo, hi] with 1 <= lo <= hi, got [1.8, 1.2]", None),
    ("mg_with_label_drop_0", {"base": {"objective": {"label_drop": 0.0}}}, "base.objective.label_drop",
     "MG with an empty class needs label_drop > 0", None),
    ("empty_grid", {"space": {"objective.w": {"grid": []}}}, "space.objective.w.grid",
     "empty list (give at least one value)", None),
    ("grid_not_a_list", {"space": {"objective.w": {"grid": 1.5}}}, "space.objective.w.grid",
     "expected a list, got 1.5", None),
    ("grid_values_wrong_type", {"space": {"objective.w": {"grid": ["low", "high"]}}}, "space.objective.w",
     "expected a number, got 'low'", None),
    ("space_entry_a_scalar", {"space": {"objective.w": 1.5}}, "space.objective.w",
     "expected a list of grid values or a mapping (grid: [...], choices: [...], or type/low/high)", None),
    ("grid_sampler_with_a_range", {"space": {"objective.w": {"_replace": True, "type": "float", "low": 1.0,
                                                             "high": 1.5}}},
     "space.objective.w", "the grid sampler needs `grid: [...]` or choices, not a range", None),
    ("unknown_sampler", {"sampler": "bayes"}, "sampler", "'bayes' is not one of grid, tpe, random", None),
    ("sampler_seed_not_an_int", {"sampler": {"type": "grid", "seed": "abc"}}, "sampler.seed",
     "expected an integer, got 'abc'", None),
    ("n_trials_zero", {"sampler": "tpe", "n_trials": 0}, "n_trials", "expected an integer >= 1, got 0", None),
    ("n_trials_missing_for_tpe", {"sampler": "tpe"}, "n_trials", "required (> 0) for sampler tpe", None),
    ("n_trials_above_grid_size", {"n_trials": 3}, "n_trials", "3 is more than the grid size 2", None),
    ("float_range_low_above_high", {"sampler": "tpe", "n_trials": 4,
                                    "space": {"objective.w": {"_replace": True, "type": "float", "low": 1.5,
                                                              "high": 1.2}}},
     "space.objective.w.low", "1.5 is above high 1.2", None),
    ("log_range_low_not_positive", {"sampler": "tpe", "n_trials": 4,
                                    "space": {"optim.lr": {"type": "float", "low": 0.0, "high": 0.01, "log": True}}},
     "space.optim.lr.low", "must be > 0 with log: true, got 0.0", None),
    ("int_step_zero", {"sampler": "tpe", "n_trials": 4,
                       "space": {"train.seed": {"type": "int", "low": 0, "high": 10, "step": 0}}},
     "space.train.seed.step", "must be > 0, got 0", None),
    ("int_range_not_integers", {"sampler": "tpe", "n_trials": 4,
                                "space": {"train.seed": {"type": "int", "low": 0.5, "high": 3}}},
     "space.train.seed", "int ranges need integer low/high/step", None),
    ("param_type_unknown", {"sampler": "tpe", "n_trials": 4,
                            "space": {"train.seed": {"type": "bool", "low": 0, "high": 1}}},
     "space.train.seed.type", "'bool' is not one of float, int, categorical", None),
    ("categorical_without_choices", {"sampler": "tpe", "n_trials": 4,
                                     "space": {"train.seed": {"type": "categorical"}}},
     "space.train.seed.choices", "required for type categorical", None),
    ("bad_direction", {"optimize": {"direction": "up"}}, "optimize.direction",
     "'up' is not one of minimize, maximize", None),
    ("direction_against_the_registry", {"optimize": {"metric": "in_class", "direction": "minimize"}},
     "optimize.direction", "in_class is better higher (the metric registry), so minimize would search", None),
    ("unregistered_metric_without_direction", {"optimize": {"_replace": True, "metric": "loss"}}, "optimize.direction",
     "required for 'loss', which is not in the metric registry (allowed: minimize, maximize)", None),
    ("old_objective_key", {"objective": {"metric": "fid"}}, "objective",
     "renamed `optimize` in study specs", None),
    ("unknown_optimize_key", {"optimize": {"metrc": "fid"}}, "optimize.metrc",
     "unknown key (allowed: direction, metric)", None),
    ("unknown_optimize_metric", {"optimize": {"metric": "fid"}}, "optimize.metric",
     "'fid' is not reported by the evaluation of this study (allowed: in_class, wrong_class, off_board, "
     "off_support, coverage, subcell_coverage, swd, center_dist, nfe)", None),
    ("unknown_pruner", {"pruning": {"type": "aggressive"}}, "pruning.type",
     "'aggressive' is not one of none, median, percentile, successive_halving, hyperband", None),
    ("unknown_pruning_key", {"pruning": {"type": "median", "n_startup": 1}}, "pruning.n_startup",
     "unknown key (allowed: interval_steps, n_startup_trials, n_warmup_steps, percentile, type)", None),
    ("pruning_percentile_above_100", {"pruning": {"type": "percentile", "percentile": 150.0}}, "pruning.percentile",
     "150.0 is outside (0, 100)", None),
    ("pruning_interval_zero", {"pruning": {"type": "median", "interval_steps": 0}}, "pruning.interval_steps",
     "expected an integer >= 1, got 0", None),
    ("storage_not_a_uri", {"storage": "optuna.db"}, "storage",
     "expected a URI (sqlite:///..., journal:///path, postgresql://...)", None),
    ("storage_unknown_scheme", {"storage": "redis://localhost:6379/0"}, "storage",
     "scheme 'redis' is not one of sqlite:///, journal:///, postgresql://, mysql://", None),
    ("storage_journal_relative", {"storage": "journal://optuna.log"}, "storage",
     "journal needs an absolute path (journal:///abs/path.log)", None),
    ("storage_journal_in_missing_dir", {"storage": "journal:///{tmp}/no/such/dir/optuna.log"}, "storage",
     "folder '{tmp}/no/such/dir' does not exist (create it, or keep the file under out_dir", None),
    ("storage_sqlite_in_memory", {"storage": "sqlite:///:memory:"}, "storage",
     "expected sqlite:///<file> (a file shared by the driver and every job)", None),
    ("tracking_unknown_scheme", {"tracking_uri": "mlflw://tracking.example:5000"}, "tracking_uri",
     "scheme 'mlflw' is not one of sqlite, file, http, https", None),
    ("tracking_sqlite_in_missing_dir", {"tracking_uri": "sqlite:///{tmp}/nope/mlflow.db"}, "tracking_uri",
     "folder '{tmp}/nope' does not exist (create it, or keep the file under out_dir", None),
    ("unknown_executor", {"executor": "cloud"}, "executor.type", "'cloud' is not one of local, debug, slurm", None),
    ("slurm_profile_missing", {"executor": {"type": "slurm", "profile": "no-such-site"}}, "executor.profile",
     "no such profile (known in", None),
    ("slurm_profile_with_unknown_key", {"executor": {"type": "slurm", "profile": "site.yaml"}}, "executor.profile",
     "site.yaml:slurm_foo: Unknown argument 'foo' for executor 'slurm' in parameter 'slurm_foo'. Valid arguments:",
     _setup_bad_profile),
    ("slurm_unknown_sbatch_key", {"executor": {"type": "slurm", "partitoin": "gpu"}}, "executor.partitoin",
     "Unknown argument 'partitoin' for executor 'slurm' in parameter 'slurm_partitoin'. Valid arguments: ",
     None),
    ("slurm_negative_gpus", {"executor": {"type": "slurm", "gpus_per_node": -1}}, "executor.gpus_per_node",
     "expected a number of GPUs per node >= 0, got -1", None),
    ("slurm_bad_time_format", {"executor": {"type": "slurm", "time": "1 day"}}, "executor.time",
     "'1 day' is not a SLURM time (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)", None),
    ("slurm_timeout_wrong_type", {"executor": {"type": "slurm", "timeout_min": "soon"}}, "executor.timeout_min",
     "expected type <class 'int'>", None),
    ("extends_missing_file", {"extends": "nope.yaml"}, "extends",
     "no such file '{tmp}/nope.yaml' (a trainer config, relative to the spec)", None),
    ("extends_itself", {"extends": SPEC}, "extends",
     "the spec extends itself; extends takes a trainer config (e.g. base/grid2d.yaml)", None),
    ("extends_cycle", {"extends": "other.yaml"}, "extends",
     "'{tmp}/other.yaml' is a study spec (it has `extends`), not a trainer config; extends does not chain",
     _setup_cycle),
    ("imagefolder_path_missing", {"base": IMAGES}, "base.data.path",
     "folder '{tmp}/images' does not exist", None),
    ("imagefolder_vae_not_given", {"base": {**IMAGES, "data": {**IMAGES["data"], "vae": None}}}, "base.data.vae",
     "required for imagefolder (a local diffusers AutoencoderKL folder)", _setup_images),
    ("imagefolder_vae_folder_missing", {"base": IMAGES}, "base.data.vae",
     "folder '{tmp}/vae' does not exist (a local diffusers AutoencoderKL folder)", _setup_images),
    ("imagefolder_metric_not_evaluated", {"base": {**IMAGES, "eval": {"metrics": ["fid"]}},
                                          "optimize": {"metric": "is", "direction": "maximize"}}, "optimize.metric",
     "'is' is not reported by the evaluation of this study (allowed: fid, nfe)", _setup_vae),
    ("entry_not_module_function", {"entry": "train"}, "entry", "expected module:function, got 'train'", None),
    ("entry_module_missing", {"entry": "mgbench.nosuch:train"}, "entry",
     "cannot import 'mgbench.nosuch' (ModuleNotFoundError: No module named 'mgbench.nosuch'); "
     "expected an importable module:function", None),
    ("eval_hook_function_missing", {"eval_hook": "mgbench.evaluation.quick:nope"}, "eval_hook",
     "module 'mgbench.evaluation.quick' has no function 'nope' (expected module:function)", None),
    ("unknown_report_item", {"report": ["fig99"]}, "report", "'fig99' is not one of", None),
]
IDS = [c[0] for c in CASES]
assert len(set(IDS)) == len(IDS) >= 30


def write_case(good: dict, tmp: Path, patch: dict, setup) -> Path:
    """The good spec with GOOD and `patch` applied, in tmp/study.yaml (next to the grid2d base config)."""
    if setup is not None:
        setup(tmp)
    data = copy.deepcopy(good)
    _merge(data, GOOD)   # not a copy: DELETE stays itself, and _merge changes only its first argument here
    _merge(data, copy.deepcopy(patch))
    return write_spec_file(data, tmp, SPEC)


def test_the_good_spec_validates(tmp_path, good_study, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = write_case(good_study, tmp_path, {}, None)
    assert mgbench_main(["study", "validate", str(path)]) == 0
    assert capsys.readouterr().out.strip() == f"{path}: ok (grid, 2 trials, executor debug)"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, patch, field, allowed, setup", CASES, ids=IDS)
def test_bad_spec_is_one_line_and_submits_nothing(tmp_path, good_study, monkeypatch, capsys, case, patch, field,
                                                  allowed, setup):
    monkeypatch.chdir(tmp_path)  # anything relative would land here, and show in the tree
    path = write_case(good_study, tmp_path, patch, setup)
    allowed = allowed.replace("{tmp}", str(tmp_path))
    before = file_tree(tmp_path)
    for command in ("validate", "run"):
        rc = mgbench_main(["study", command, str(path)])
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert rc == 2, (command, captured.out, captured.err)
        assert len(lines) == 1, (command, captured.err)
        msg = lines[0]
        assert msg.startswith(f"mgbench study {command}: error: {path}:{field}: "), (command, msg)  # the file, then the field
        assert allowed in msg, (command, msg)  # what is allowed
        assert captured.out == ""
        # Nothing submitted: no out_dir (trials, submitit job folders, events), no Optuna storage
        # (so no study), no MLflow store (so no runs), nothing anywhere else in the folder.
        assert file_tree(tmp_path) == before, (command, file_tree(tmp_path) - before)


def test_parallelism_flag_zero_is_refused(tmp_path, good_study, monkeypatch, capsys):
    """`--parallelism 0` was silently ignored (0 read as "not given"); it names the field like the spec would."""
    monkeypatch.chdir(tmp_path)
    path = write_case(good_study, tmp_path, {}, None)
    before = file_tree(tmp_path)
    assert mgbench_main(["study", "run", str(path), "--parallelism", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"mgbench study run: error: {path}:parallelism: expected an integer >= 1, got 0"]
    assert file_tree(tmp_path) == before


@pytest.mark.parametrize("case", ["unknown_optimize_metric", "storage_journal_in_missing_dir"])
def test_real_mgbench_process_exits_2_with_one_line(tmp_path, good_study, case):
    """The installed `mgbench` command, as a user runs it: exit status 2, one line on stderr, nothing written."""
    _, patch, field, allowed, setup = next(c for c in CASES if c[0] == case)
    path = write_case(good_study, tmp_path, patch, setup)
    allowed = allowed.replace("{tmp}", str(tmp_path))
    before = file_tree(tmp_path)
    mgbench = Path(sys.executable).with_name("mgbench")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for command in ("validate", "run"):
        res = subprocess.run([str(mgbench), "study", command, str(path)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, (command, res.stdout, res.stderr)
        (line,) = res.stderr.splitlines()
        assert line.startswith(f"mgbench study {command}: error: {path}:{field}: ") and allowed in line, line
        assert res.stdout == ""
        assert file_tree(tmp_path) == before


def test_metric_names_match_the_evaluation():
    """The names the spec check allows are the ones mgbench's evaluation reports (no drift)."""
    from mgbench.config import train_config_from_dict
    from mgbench.evaluation import metrics as M
    from mgbench.evaluation.grid2d import Grid2D, grid_metrics

    assert tuple(M.IMAGE_METRICS) == IMAGE_METRICS
    grid = Grid2D(4)
    x = torch.rand(64, 2) * 2 - 1
    y = torch.arange(64) % 2
    assert tuple(grid_metrics(x, y, grid, k=0, seed=0)) == GRID2D_METRICS
    cfg = train_config_from_dict({"data": {"name": "grid2d"}, "eval": {"cfg_sweep": [0.5], "metrics": ["img_per_s"]}})
    assert evaluation_metrics(cfg) == [*GRID2D_METRICS, "nfe", "img_per_s",
                                       *(f"sweep/cfg_scale_0.50/{m}" for m in (*GRID2D_METRICS, "nfe"))]


def test_custom_eval_hook_metric_is_not_second_guessed(tmp_path, good_study):
    """With a custom evaluation hook the study cannot know its metric names: any name is accepted."""
    path = write_case(good_study, tmp_path, {"eval_hook": "mgbench.evaluation.quick:quick_eval_hook",
                                             "optimize": {"metric": "off_class"}}, None)
    assert load_spec(path).optimize.metric == "off_class"
