"""Multi-task trials on 2 gloo ranks (CPU processes): what rank 0 decides or fails at reaches the other rank,
and evaluation gathers its samples in rounds with the same result as one gather.

Each test runs the ranks as real processes and waits for them with a bound: a rank left in a collective
fails the test (named) instead of hanging it.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml
from conftest import STUDIES

GRID2D = STUDIES / "base" / "grid2d.yaml"
HANG_S = 300          # a rank still running after this is stuck in a collective (generous: the CPUs are shared)
PRUNE_STEP = 10       # the pruner judges the first evaluation


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(worker: Callable[..., dict], rank: int, port: int, folder: str, args: tuple) -> None:
    """One rank: the torch.distributed environment torchrun would set, then the worker; its outcome as JSON."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        out = {"ok": True, **worker(rank, Path(folder), *args)}
    except BaseException as e:  # noqa: BLE001 - the outcome under test
        out = {"ok": False, "type": type(e).__name__, "error": str(e), "notes": getattr(e, "__notes__", []),
               "traceback": traceback.format_exc()}
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(out))


def run_ranks(worker: Callable[..., dict], folder: Path, *args: Any) -> list[dict]:
    """Run `worker(rank, folder, *args)` on 2 gloo ranks; both outcomes, or a failure naming the hung ranks."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(worker, r, port, str(folder), args)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(HANG_S)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"rank(s) {hung} still running after {HANG_S} s: stuck in a collective"
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]


def tiny_config(folder: Path, **sets: Any):
    """grid2d with an MLP-S on the CPU, a 64-point batch (32 a rank) and a small, quick evaluation."""
    from mgbench.config import load_train_config

    base = {"train.device": "cpu", "optim.batch_size": 64, "train.log_every": 10, "train.ckpt_every": 1000,
            "sample.steps": 4, "sample.n_grid": 16, "eval.n_samples": 64, "eval.batch_size": 16,
            "out_dir": str(folder / "run"), **sets}
    return load_train_config(GRID2D, base)


# ----------------------------------------------------------------------------- prune decision


def _prune_worker(rank: int, folder: Path, spec_path: str, trial_id: int) -> dict:
    from mgbench.study.spec import load_spec
    from mgbench.evaluation.quick import w_eval_hook
    from mgbench.study.trial import PruningHook
    from mgbench.trainer.loop import train

    cfg = tiny_config(folder, **{"objective.w": 1.8, "train.steps": 100_000, "train.eval_every": PRUNE_STEP})
    steps: list[int] = []
    inner = w_eval_hook(cfg)

    def counted(ctx):
        steps.append(ctx.step)
        return inner(ctx)

    try:
        train(cfg, eval_hook=PruningHook(counted, load_spec(spec_path), trial_id))
    finally:
        (folder / f"evals{rank}.json").write_text(json.dumps(steps))
    return {"finished": True}


def test_a_prune_on_rank_0_stops_every_rank_at_that_evaluation(tmp_path):
    import optuna

    from mgbench.study.optuna_io import open_study
    from mgbench.study.spec import load_spec

    # Two finished trials reported w = 1.0 and 1.2 at step 10; this trial reports its own w = 1.8 there, above the
    # median (1.1), so the median pruner prunes it at its first evaluation. Unpruned it would train 100k steps.
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "_ddp_prune", "extends": str(GRID2D), "space": {"objective.w": [1.0, 1.2, 1.8]},
        "sampler": "grid", "optimize": {"metric": "w", "direction": "minimize"},
        "pruning": {"type": "median", "n_startup_trials": 2}, "eval_hook": "mgbench.evaluation.quick:w_eval_hook",
        "executor": "debug", "out_dir": str(tmp_path / "study")}))
    study = open_study(load_spec(spec_path))
    for w in (1.0, 1.2):
        study.add_trial(optuna.trial.create_trial(value=w, intermediate_values={PRUNE_STEP: w}))
    trial_id = study.ask()._trial_id

    outcomes = run_ranks(_prune_worker, tmp_path, str(spec_path), trial_id)
    for rank, out in enumerate(outcomes):
        assert (out["ok"], out.get("type")) == (False, "TrialPruned"), (rank, out)
        assert out["error"] == f"pruned at step {PRUNE_STEP}: w=1.8", (rank, out)
        assert json.loads((tmp_path / f"evals{rank}.json").read_text()) == [PRUNE_STEP]
    assert outcomes[1]["notes"] == ["(raised on rank 0 and sent to every rank)"]
    assert study.trials[2].intermediate_values == {PRUNE_STEP: 1.8}


# ----------------------------------------------------------------------------- a metric error on rank 0


def _metric_error_worker(rank: int, folder: Path) -> dict:
    import mgbench.evaluation.hook as H
    from mgbench.trainer.loop import train

    if rank == 0:  # the fault: rank 0's metric computation fails (e.g. a broken reference or extractor)
        def broken(*args, **kwargs):
            raise ValueError("grid metrics failed on purpose")

        H.grid_metrics = broken
    cfg = tiny_config(folder, **{"train.steps": 40, "train.eval_every": 20})
    train(cfg, eval_hook=H.make_eval_hook(cfg))
    return {"finished": True}


def test_a_metric_error_on_rank_0_ends_every_rank_with_that_error(tmp_path):
    outcomes = run_ranks(_metric_error_worker, tmp_path)
    for rank, out in enumerate(outcomes):
        assert (out["ok"], out.get("type"), out.get("error")) == (False, "ValueError", "grid metrics failed on purpose"), \
            (rank, out)
    assert outcomes[0]["notes"] == [] and outcomes[1]["notes"] == ["(raised on rank 0 and sent to every rank)"]
    assert "broken" in outcomes[0]["traceback"]  # rank 0 keeps its own traceback


# ----------------------------------------------------------------------------- a checkpoint rank 0 cannot write


def _ckpt_error_worker(rank: int, folder: Path) -> dict:
    import resource

    from mgbench.trainer import loop

    save = loop.save_checkpoint

    def limited(*args, **kwargs):  # the fault: a 4 KiB file-size limit (the kernel refuses the write)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        try:
            return save(*args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    loop.save_checkpoint = limited   # only rank 0 writes checkpoints
    cfg = tiny_config(folder, **{"train.steps": 40, "train.ckpt_every": 10})
    loop.train(cfg)
    return {"finished": True}


def test_a_checkpoint_rank_0_cannot_write_ends_every_rank_with_that_error(tmp_path):
    outcomes = run_ranks(_ckpt_error_worker, tmp_path)
    for rank, out in enumerate(outcomes):
        assert (out["ok"], out.get("type")) == (False, "CheckpointWriteError"), (rank, out)
        assert out["error"].startswith(f"cannot write checkpoint {tmp_path}/run/checkpoints/ckpt_00000010.pt")
    assert outcomes[1]["error"] == outcomes[0]["error"]
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


# ----------------------------------------------------------------------------- gathering in rounds


def _gather_worker(rank: int, folder: Path) -> dict:
    from mgbench.evaluation.generate import generate
    from mgbench.evaluation.hook import make_eval_hook
    from mgbench.trainer import distributed as D
    from mgbench.trainer.data import load_dataset
    from mgbench.trainer.hooks import EvalContext
    from mgbench.trainer.models import build_model

    env = D.setup("cpu")

    # Samples whose value is their seed: sample i of seed 7 is [70 + 10 i, 71 + 10 i] wherever it was drawn.
    def by_seed(labels, seeds):
        return torch.tensor([[10.0 * s, 10.0 * s + 1] for s in seeds])

    rounds = {}
    for chunk in (1, 3, 4, 11, 1024):
        gen = generate(by_seed, 11, 3, seed=7, batch_size=2, rank=rank, world_size=2, gather_chunk=chunk)
        rounds[chunk] = None if gen.x is None else gen.x.tolist()

    # The evaluation hook on an untrained MLP: its grid2d metrics with a 7-sample round and with one round.
    metrics = {}
    for chunk in (7, 1024):
        cfg = tiny_config(folder, **{"eval.n_samples": 101, "eval.gather_chunk": chunk})
        data = load_dataset(cfg.data, "train", seed=0)
        torch.manual_seed(0)
        model = build_model(cfg.model.arch, input_shape=data.shape, num_classes=data.num_classes).eval()
        ctx = EvalContext(cfg, model, 1, 1.0, env.device, data, str(folder / "run"), env.rank, env.world_size)
        metrics[chunk] = make_eval_hook(cfg)(ctx)
    return {"rounds": rounds, "metrics": metrics}


def test_gathering_in_small_rounds_gives_the_samples_and_metrics_of_one_gather(tmp_path):
    outcomes = run_ranks(_gather_worker, tmp_path)
    assert all(o["ok"] for o in outcomes), outcomes
    expected = [[10.0 * (7 + i), 10.0 * (7 + i) + 1] for i in range(11)]   # index order, from the seeds alone
    assert outcomes[0]["rounds"] == {str(c): expected for c in (1, 3, 4, 11, 1024)}
    assert outcomes[1]["rounds"] == {str(c): None for c in (1, 3, 4, 11, 1024)}   # only rank 0 holds them
    small, whole = outcomes[0]["metrics"]["7"], outcomes[0]["metrics"]["1024"]
    assert {"in_class", "coverage", "swd"} <= set(whole) and small == whole
    assert outcomes[1]["metrics"] == outcomes[0]["metrics"]   # every rank returns rank 0's metrics


@pytest.mark.parametrize("chunk", [0, -5])
def test_gather_chunk_must_be_positive(chunk):
    from mgbench.config import ConfigError, TrainConfig

    cfg = TrainConfig()
    cfg.eval.gather_chunk = chunk
    with pytest.raises(ConfigError, match=r"eval\.gather_chunk"):
        cfg.validate()
