"""Study specs: parsing, validation errors that name file:field, dry runs (SLURM sbatch preview), the CLI."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from conftest import STUDIES, TEST_STUDIES

from mgbench.config import ConfigError
from mgbench.study.cli import main as study_main
from mgbench.study.executors import check_executor, executor_params
from mgbench.study.spec import grid_points, load_spec
from mgbench.study.status import dry_run



def write_spec(tmp_path: Path, body: str, name: str = "spec.yaml") -> Path:
    """A spec file in tmp_path that extends the repo's grid2d base config."""
    base = (STUDIES / "base" / "grid2d.yaml").read_text()
    (tmp_path / "base.yaml").write_text(base)
    path = tmp_path / name
    path.write_text(body)
    return path


GOOD = textwrap.dedent("""
    name: s1
    extends: base.yaml
    space:
      objective.w: {grid: [1.0, 1.5]}
    sampler: grid
    optimize: {metric: off_support}
""")


def test_grid_spec_resolves(tmp_path):
    spec = load_spec(write_spec(tmp_path, GOOD), {"out_dir": str(tmp_path / "out")})
    assert spec.n_trials == 2
    assert grid_points(spec) == [{"objective.w": 1.0}, {"objective.w": 1.5}]
    cfg = spec.trial_config({"objective.w": 1.5}, 7, "/x")
    assert cfg["objective"]["w"] == 1.5 and cfg["data"]["name"] == "grid2d" and cfg["name"] == "s1-0007"
    assert spec.storage == f"sqlite:///{tmp_path / 'out' / 'optuna.db'}"
    assert spec.tracking_uri == f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"


def test_extends_with_inline_overrides(tmp_path):
    path = write_spec(tmp_path, GOOD + "base:\n  optim: {lr: 0.005}\n  train: {steps: 7}\n")
    spec = load_spec(path, {"out_dir": str(tmp_path / "o")})
    assert spec.base["optim"] == {"lr": 0.005, "batch_size": 512, "ema_decay": 0.999}
    assert spec.base["train"]["steps"] == 7 and spec.base["train"]["log_every"] == 100


@pytest.mark.parametrize("extra, expected", [
    ("bogus: 1\n", "spec.yaml:bogus: unknown key"),
    ("parallelism: two\n", "spec.yaml:parallelism: expected an integer"),
    ("space:\n  objective.ww: {grid: [1.0]}\n", "spec.yaml:space.objective.ww: unknown trainer key"),
    ("space:\n  objective.w: {grid: []}\n", "spec.yaml:space.objective.w.grid: empty list"),
    ("space:\n  objective.label_drop: {grid: [0.1, 1.0]}\n",
     "spec.yaml:space.objective.label_drop: 1.0 is outside [0.0, 1.0)"),
    ("space:\n  objective.w: {grid: [0.5, 1.5]}\n", "spec.yaml:space.objective.w: 0.5 is outside [1.0, 100.0]"),
    ("base:\n  data: {name: imagefolder, path: /no/such/folder, vae: /v}\n",
     "spec.yaml:base.data.path: folder '/no/such/folder' does not exist"),
    ("base:\n  optim: {lrr: 1}\n", "spec.yaml:base.optim.lrr: unknown key"),
    ("base:\n  train: {steps: many}\n", "spec.yaml:base.train.steps: expected an integer"),
    ("sampler: bayes\n", "spec.yaml:sampler: 'bayes' is not one of grid, tpe, random"),
    ("optimize: {metric: fid, direction: up}\n", "spec.yaml:optimize.direction: 'up' is not one of"),
    ("optimize: {metrc: fid}\n", "spec.yaml:optimize.metrc: unknown key"),
    ("objective: {metric: fid}\n", "spec.yaml:objective: renamed `optimize` in study specs"),
    ("n_trials: 3\n", "spec.yaml:n_trials: 3 is more than the grid size 2"),
    ("executor: cloud\n", "spec.yaml:executor.type: 'cloud' is not one of local, debug, slurm"),
    ("storage: optuna.db\n", "spec.yaml:storage: expected a URI"),
    ("lost_after_s: 0\n", "spec.yaml:lost_after_s: expected a number > 0, got 0"),
    ("lost_after_s: -5.5\n", "spec.yaml:lost_after_s: expected a number > 0, got -5.5"),
    ("lost_after_s: soon\n", "spec.yaml:lost_after_s: expected a number > 0, got 'soon'"),
])
def test_validation_errors_name_file_and_field(tmp_path, extra, expected):
    body = GOOD
    if extra.startswith(("space:", "base:", "optimize:", "sampler:")):  # replace the key, keep the rest
        key = extra.split(":", 1)[0]
        lines, skip = [], False
        for line in body.splitlines():
            if line.startswith(f"{key}:"):
                skip = True
                continue
            if skip and line.startswith("  "):
                continue
            skip = False
            lines.append(line)
        body = "\n".join(lines) + "\n"
        if key == "sampler":
            body += "n_trials: 2\n"
    path = write_spec(tmp_path, body + extra)
    with pytest.raises(ConfigError) as e:
        load_spec(path, {"out_dir": str(tmp_path / "o")})
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(str(path.parent)) and expected in msg, msg


def test_range_space_checks_corners_and_needs_n_trials(tmp_path):
    body = GOOD.replace("{grid: [1.0, 1.5]}", "{type: float, low: 1.0, high: 2.5}").replace("sampler: grid", "sampler: tpe")
    with pytest.raises(ConfigError, match=r"spec.yaml:n_trials: required"):
        load_spec(write_spec(tmp_path, body), {"out_dir": str(tmp_path / "o")})
    # w = 2.5 at the top corner: (w - 1) = 1.5 >= 1 has no fixed point.
    with pytest.raises(ConfigError, match=r"spec.yaml:space.objective.w: mg_fraction \* \(w - 1\) = 1.5 >= 1"):
        load_spec(write_spec(tmp_path, body + "n_trials: 4\n"), {"out_dir": str(tmp_path / "o")})
    with pytest.raises(ConfigError, match=r"space.objective.w: the grid sampler needs"):
        load_spec(write_spec(tmp_path, body.replace("sampler: tpe", "sampler: grid")), {"out_dir": str(tmp_path / "o")})


def test_search_spec_from_repo():
    spec = load_spec(TEST_STUDIES / "_test_search.yaml", {"out_dir": "/tmp/never-created"})
    assert spec.n_trials == 8 and spec.sampler.seed == 0 and spec.pruning.type == "median"
    assert spec.space["train.seed"].values == [0, 1]
    text = dry_run(spec)
    assert "objective.w: float [1.0, 1.9]" in text and "dry run: nothing submitted" in text
    assert not Path("/tmp/never-created").exists()


def test_executor_options_checked_by_submitit(tmp_path):
    path = write_spec(tmp_path, GOOD + "executor: {type: slurm, partitoin: gpu}\n")
    spec = load_spec(path, {"out_dir": str(tmp_path / "o")})
    with pytest.raises(ConfigError, match=r"spec.yaml:executor.partitoin: .*Unknown argument 'partitoin'"):
        check_executor(spec)
    path = write_spec(tmp_path, GOOD + "executor: {type: slurm, timeout_min: soon}\n")
    with pytest.raises(ConfigError, match=r"spec.yaml:executor.timeout_min: "):
        check_executor(load_spec(path, {"out_dir": str(tmp_path / "o")}))


def test_slurm_dry_run_prints_array_sbatch(tmp_path, capsys):
    out = tmp_path / "out"
    spec = load_spec(TEST_STUDIES / "_test_slurm.yaml", {"out_dir": str(out)})
    params = executor_params(spec)
    assert params["gpus_per_node"] == 1 and params["slurm_partition"] == "gpu"
    assert params["slurm_additional_parameters"] == {"requeue": True}
    rc = study_main(["study", "run", str(TEST_STUDIES / "_test_slurm.yaml"), "--dry-run", "--out-dir", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    for line in ("#SBATCH --gpus-per-node=1", "#SBATCH --array=0-3%2", "#SBATCH --time=30",
                 "#SBATCH --partition=gpu", "#SBATCH --account=mylab", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --mem=16GB", "#SBATCH --requeue", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --job-name=mg-_test_slurm", "module load cuda"):
        assert line in text.splitlines(), line
    assert "submitit.core._submit" in text and "w=1.75" in text
    assert not out.exists()  # nothing created, nothing submitted


def test_cli_validate(tmp_path, capsys):
    good = write_spec(tmp_path, GOOD)
    assert study_main(["study", "validate", str(good), "--out-dir", str(tmp_path / "o")]) == 0
    assert "ok (grid, 2 trials, executor local)" in capsys.readouterr().out
    bad = write_spec(tmp_path, GOOD + "parallelism: 0\n", "bad.yaml")
    assert study_main(["study", "validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mgbench study validate: error: {bad}:parallelism: expected an integer >= 1, got 0"


BUNDLES = textwrap.dedent("""
    name: s_bundles
    extends: base.yaml
    space:
      variant:
        grid:
          - {objective.w: 1.5}
          - {objective.w: 1.5, model.w_input: true, objective.w_range: [1.0, 1.9]}
      train.seed: {grid: [0, 1]}
    sampler: grid
    optimize: {metric: off_support}
""")


def test_named_grid_of_settings(tmp_path, capsys):
    """Ablation rows that are not a product of single keys (Table 5: w-input needs a w range too)."""
    spec = load_spec(write_spec(tmp_path, BUNDLES), {"out_dir": str(tmp_path / "out")})
    assert spec.n_trials == 4
    labels = spec.space["variant"].grid
    assert labels == ["objective.w=1.5", 'objective.w=1.5 model.w_input=true objective.w_range=[1.0, 1.9]']
    points = grid_points(spec)
    assert points[1] == {"variant": labels[0], "train.seed": 1}
    cfg = spec.trial_config({"variant": labels[1], "train.seed": 1}, 3, "/x")
    assert cfg["model"]["w_input"] is True and cfg["objective"]["w_range"] == [1.0, 1.9]
    assert cfg["objective"]["w"] == 1.5 and cfg["train"]["seed"] == 1
    assert spec.settings({"variant": labels[0], "train.seed": 0}) == {"objective.w": 1.5, "train.seed": 0}
    spec.trial_config({"variant": labels[1]}, 0, "/y")["objective"]["w_range"].append(9)   # configs never share lists
    assert spec.space["variant"].bundles[labels[1]]["objective.w_range"] == [1.0, 1.9]
    assert study_main(["study", "run", str(tmp_path / "spec.yaml"), "--dry-run", "--out-dir", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "w=1.50 w_input=True w_range=[1.0, 1.9] seed=1" in out and not (tmp_path / "o").exists()


@pytest.mark.parametrize("variant, expected", [
    ("[{objective.ww: 1.5}]", "spec.yaml:space.variant.grid[0].objective.ww: unknown trainer key"),
    ("[{objective.w: 1.5}, {}]", "spec.yaml:space.variant.grid[1]: empty setting"),
    ("[{objective.w: 1.5}, {objective.w: 1.5}]", "spec.yaml:space.variant.grid[1]: repeats setting"),
    ("[{objective.w: 0.5}]", "spec.yaml:space.variant.objective.w: 0.5 is outside [1.0, 100.0]"),
    ("[1.5, 2.0]", "spec.yaml:space.variant: unknown trainer key"),
])
def test_named_grid_errors(tmp_path, variant, expected):
    body = BUNDLES.replace(BUNDLES[BUNDLES.index("  variant:"):BUNDLES.index("  train.seed")],
                           f"  variant: {{grid: {variant}}}\n")
    with pytest.raises(ConfigError) as err:
        load_spec(write_spec(tmp_path, body), {"out_dir": str(tmp_path / "out")})
    msg = str(err.value)
    assert msg.startswith(str(tmp_path)) and expected in msg and "\n" not in msg, msg


def test_local_trials_share_the_cores(tmp_path):
    """Local trials split the machine's cores (2 cores, 2 in flight -> 1 torch thread each) unless the user chose."""
    from mgbench.study.trial import local_threads

    spec = load_spec(write_spec(tmp_path, GOOD + "executor: local\nparallelism: 2\n"), {"out_dir": str(tmp_path / "o")})
    assert local_threads(spec, cpus=2, env={}) == 1
    assert local_threads(spec, cpus=16, env={}) == 8
    assert local_threads(spec, cpus=1, env={}) == 1
    assert local_threads(spec, cpus=2, env={"OMP_NUM_THREADS": "2"}) is None
    spec.executor.type = "slurm"      # a cluster job gets the CPUs its allocation says
    assert local_threads(spec, cpus=2, env={}) is None


def test_lost_after_s_is_a_spec_field_the_driver_uses(tmp_path):
    """How long a job SLURM does not know may stay unknown before it is lost: 600 s unless the spec says."""
    from mgbench.study.runner import Driver

    assert load_spec(write_spec(tmp_path, GOOD), {"out_dir": str(tmp_path / "o")}).lost_after_s == 600.0
    spec = load_spec(write_spec(tmp_path, GOOD + "lost_after_s: 45\n"), {"out_dir": str(tmp_path / "o")})
    assert spec.lost_after_s == 45.0
    assert Driver(spec, echo=lambda line: None).lost_after_s == 45.0
