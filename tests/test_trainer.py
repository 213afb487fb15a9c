"""The training loop: resume (bitwise), DDP equivalence, divergence, the run folder (auto-w: test_autow.py)."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml

from mgbench import tracking as T
from mgbench.config import ConfigError, train_config_from_dict
from mgbench.trainer.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from mgbench.trainer.loop import TrainingDiverged, train

torch.set_num_threads(1)


def tiny(out_dir, **over):
    """A tiny MG run on grid2d (a few seconds)."""
    d = {"name": "tiny", "out_dir": str(out_dir),
         "data": {"name": "grid2d"}, "model": {"arch": "MLP-S"},
         "objective": {"w": 1.5, "t_high": 0.75},
         "optim": {"lr": 1e-3, "batch_size": 64, "ema_decay": 0.99},
         "train": {"steps": 40, "log_every": 5, "ckpt_every": 10, "keep_ckpts": 10},
         "sample": {"steps": 4, "n_grid": 16}}
    for key, value in over.items():
        section, name = key.split("__")
        d.setdefault(section, {})[name] = value
    return train_config_from_dict(d, "test")


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_a_pause_equals_an_uninterrupted_run_bitwise(tmp_path):
    full = T.MemoryTracker()
    r_full = train(tiny(tmp_path / "full"), full)
    assert r_full.status == "finished" and r_full.step == 40

    part = T.MemoryTracker()
    r1 = train(tiny(tmp_path / "split", train__max_steps_per_run=20), part)
    assert r1.status == "paused" and r1.step == 20
    r2 = train(tiny(tmp_path / "split", train__max_steps_per_run=20), part)
    assert r2.status == "finished" and r2.step == 40

    a = load_checkpoint(latest_checkpoint(tmp_path / "full"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "split"))
    assert a["step"] == b["step"] == 40
    assert states_equal(a["model"], b["model"]) and states_equal(a["ema"], b["ema"])
    assert [l for _, l in r_full.losses[20:]] == [l for _, l in r2.losses]
    # Step metrics: every window exactly once, same values.
    steps = [s for s, _ in part.metrics[T.M_LOSS]]
    assert steps == list(range(5, 41, 5))
    assert part.series(T.M_LOSS) == full.series(T.M_LOSS)
    # A rerun of a finished run does nothing and reports the same step.
    assert train(tiny(tmp_path / "full")).step == 40


def test_killed_run_resumes_from_its_latest_checkpoint(tmp_path):
    """SIGKILL mid-run (node failure shape), rerun the same command: same result as never killed."""
    out = tmp_path / "killed"
    cfg_file = tmp_path / "killed.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny(out, train__steps=400, train__ckpt_every=50).to_dict()))
    script = ("import sys, torch; torch.set_num_threads(1); from mgbench.config import load_train_config; "
              "from mgbench.trainer.loop import train; train(load_train_config(sys.argv[1]))")
    proc = subprocess.Popen([sys.executable, "-c", script, str(cfg_file)], cwd=tmp_path)
    deadline = time.time() + 120
    while not list_checkpoints(out) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = latest_checkpoint(out)
    assert first is not None, "no checkpoint was written before the kill"
    killed_at = load_checkpoint(first)["step"]
    assert killed_at < 400
    resumed = train(tiny(out, train__steps=400, train__ckpt_every=50))
    assert resumed.losses[0][0] == killed_at + 1  # started right after the checkpoint, not from scratch
    clean = train(tiny(tmp_path / "clean", train__steps=400, train__ckpt_every=50))
    a, b = load_checkpoint(latest_checkpoint(out)), load_checkpoint(latest_checkpoint(tmp_path / "clean"))
    assert states_equal(a["model"], b["model"]) and states_equal(a["ema"], b["ema"])
    assert clean.losses[killed_at:] == resumed.losses


def _ddp_worker(rank, world, port, out_dir, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = train(tiny(out_dir, train__steps=20, objective__mg_fraction=0.5))
    queue.put((rank, result.losses))
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_match_one_process(tmp_path):
    one = train(tiny(tmp_path / "one", train__steps=20, objective__mg_fraction=0.5))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, str(tmp_path / "two"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert results[0] == results[1]  # every rank logs the all-reduced loss
    two = [l for _, l in results[0]]
    ref = [l for _, l in one.losses]
    assert len(two) == len(ref) == 20
    torch.testing.assert_close(torch.tensor(two), torch.tensor(ref), rtol=1e-4, atol=1e-6)
    a = load_checkpoint(latest_checkpoint(tmp_path / "one"))["model"]
    b = load_checkpoint(latest_checkpoint(tmp_path / "two"))["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_nan_loss_stops_the_run_naming_the_step(tmp_path):
    train(tiny(tmp_path / "nan", train__steps=10))
    path = latest_checkpoint(tmp_path / "nan")
    state = load_checkpoint(path)
    name = next(iter(state["model"]))
    state["model"][name].view(-1)[0] = float("nan")  # weights gone bad (e.g. an overflow)
    torch.save(state, path)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 11 "):
        train(tiny(tmp_path / "nan", train__steps=20))  # read at the window's end (step 15), naming the first bad step
    assert latest_checkpoint(tmp_path / "nan") == path  # nothing written after it
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 11 "):  # a checkpoint mid-window reads it too
        train(tiny(tmp_path / "nan", train__steps=20, train__log_every=20, train__ckpt_every=12))
    assert latest_checkpoint(tmp_path / "nan") == path


def test_run_folder_refuses_another_config(tmp_path):
    train(tiny(tmp_path / "r", train__steps=10))
    with pytest.raises(ConfigError, match=r"holds a run whose objective\.w is 1\.5, not 1\.2"):
        train(tiny(tmp_path / "r", train__steps=20, objective__w=1.2))
    assert train(tiny(tmp_path / "r", train__steps=20)).step == 20  # more steps: resumes


def test_trainer_logs_params_implied_scale_samples_and_config(tmp_path):
    tr = T.MemoryTracker()
    train(tiny(tmp_path / "p", objective__mg_fraction=0.5, eval__cfg_sweep=[1.0]), tr)
    assert tr.params["objective.w"] == 1.5 and tr.params["model.arch"] == "MLP-S"
    assert tr.params["objective.implied_cfg_scale"] == pytest.approx(0.25 / 0.75)
    assert tr.series(T.M_IMPLIED_CFG)[-1] == pytest.approx(1 / 3)
    assert 0.2 < tr.series(T.M_LOSS_MG)[-1] < 0.5
    assert tr.series(T.M_PARAMS)[0] > 1000 and tr.series(T.M_GFLOPS)[0] > 0
    names = sorted(Path(p).name for p, _ in tr.artifacts)
    assert names == ["config.yaml", "samples.npz", "samples_cfg_1.00.npz", "step_00000040.png",
                     "step_00000040_cfg_1.00.png"]  # each npz of points has a PNG the MLflow UI shows
    mg, mg_cfg = (np.load(tmp_path / "p" / "samples" / f) for f in ("samples.npz", "samples_cfg_1.00.npz"))
    assert mg["nfe"] == 4 and mg_cfg["nfe"] == 8  # MG: 1 forward per step; CFG on top of MG: 2
    assert mg["traj"].shape == (5, 16, 2) and np.array_equal(mg["y"], mg_cfg["y"])
    assert not np.allclose(mg["x"], mg_cfg["x"])
    assert (tmp_path / "p" / "config.yaml").read_text().startswith("name: tiny")


def test_resume_reads_keys_an_older_run_folder_lacks():
    """A saved config without keys added later resumes (defaults), unless the key changes that run's behaviour."""
    from mgbench.config import train_config_from_dict
    from mgbench.trainer.loop import check_same_run

    cfg = train_config_from_dict({"objective": {"formulation": "diffusion", "t_map": "linear"}})
    old = cfg.to_dict()
    del old["objective"]["t_map"], old["objective"]["uncond_estimate"], old["eval"]["sample_seeds"]
    check_same_run(cfg, old, Path("ckpt"))                 # the old run was linear: same run
    cfg.objective.t_map = "snr"
    with pytest.raises(ConfigError, match="objective.t_map is 'linear', not 'snr'"):
        check_same_run(cfg, old, Path("ckpt"))
    # The speed knobs came later and change results by rounding only: a run from before them resumes with any value.
    cfg.objective.t_map = "linear"
    del old["train"]["compile"], old["sample"]["compile"], old["objective"]["uncond_chunk"]
    cfg.train.compile, cfg.sample.compile, cfg.objective.uncond_chunk = True, False, 8
    check_same_run(cfg, old, Path("ckpt"))


def test_compile_knobs_default_to_cuda_only_and_are_validated():
    from mgbench.config import compile_enabled

    cfg = train_config_from_dict({}, "c.yaml")
    assert cfg.train.compile == cfg.sample.compile == "auto"
    assert compile_enabled("auto", torch.device("cuda")) and not compile_enabled("auto", torch.device("cpu"))
    assert compile_enabled(True, "cpu") and not compile_enabled(False, "cuda")
    assert train_config_from_dict({"train": {"compile": True}, "sample": {"compile": False}}, "c").train.compile is True
    with pytest.raises(ConfigError, match=r"^c\.yaml:train\.compile: 'yes' is not one of auto, true, false$"):
        train_config_from_dict({"train": {"compile": "yes"}}, "c.yaml")
    with pytest.raises(ConfigError, match=r"^c\.yaml:sample\.compile: expected true or false, got 1$"):
        train_config_from_dict({"sample": {"compile": 1}}, "c.yaml")
