"""The MG training loop: one function that reads top to bottom. To resume, run the same command again.

The EMA is the MG teacher, so its decay sets MG's strength as much as w does. Under `ema_warmup` the
decay of step t is min(ema_decay, (1 + t) / (10 + t)): 0.991 at step 1000 and 0.999 only after ~9k
steps, so in short runs the teacher follows the model closely and MG reaches its fixed point early
(grid2d, 6k steps, w = 1.5: CFG s* ~1.0 instead of ~0.6 with a plain 0.999 EMA). It is logged as
`train/ema_decay`.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from mgbench import tracking as T
from mgbench.config import ConfigError, TrainConfig
from mgbench.trainer import distributed as D
from mgbench.trainer.autow import AutoW
from mgbench.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from mgbench.trainer.data import load_dataset
from mgbench.trainer.hooks import EvalContext, EvalHook
from mgbench.trainer.models import build_model
from mgbench.trainer.objective import Objective, implied_cfg_scale
from mgbench.trainer.outputs import model_cost, write_samples
from mgbench.trainer.progress import Progress, ProgressFn

# Fields that may change between invocations on the same run folder (everything else must match).
RESUMABLE_CHANGES = ("train.steps", "train.max_steps_per_run", "train.eval_every", "train.log_every",
                     "train.ckpt_every", "train.keep_ckpts", "train.device", "eval.", "sample.", "name", "out_dir")
# Keys a run folder from an older mgbench lacks are read as their defaults, except these, read as the behaviour
# that run had (so a resume that would change it is refused, naming the key, instead of switching mid-run).
LEGACY_VALUES = {"objective.t_map": "linear", "objective.uncond_estimate": "uniform"}


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    status: str                      # finished | paused (stopped at train.max_steps_per_run; rerun resumes)
    step: int                        # steps done in total
    out_dir: str
    w: float                         # the final w (moves under automatic w)
    metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation (names without "eval/")
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) of this invocation, every step


def train(cfg: TrainConfig, tracker: T.Tracker | None = None, eval_hook: EvalHook | None = None,
          progress: ProgressFn | None = None) -> TrainResult:
    """Train (or resume) the run described by `cfg`; logs through `tracker`, evaluates through `eval_hook`,
    reports step/total, rate and values to `progress` (rank 0; every logged window and evaluation)."""
    cfg.validate()
    tracker = tracker or T.NullTracker()
    tc, oc = cfg.train, cfg.objective
    env = D.setup(tc.device)
    device, rank, world = env.device, env.rank, env.world_size
    if cfg.optim.batch_size % world:
        raise ConfigError(f"optim.batch_size: {cfg.optim.batch_size} is not divisible by {world} ranks")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tc.tf32
        torch.backends.cudnn.allow_tf32 = tc.tf32
    out = Path(cfg.out_dir)

    # Data, model, EMA teacher, optimiser.
    data = load_dataset(cfg.data, "train", seed=tc.seed, cache_root=out.parent / "latents", device=device)
    torch.manual_seed(tc.seed)
    model = build_model(cfg.model.arch, input_shape=data.shape, num_classes=data.num_classes,
                        empty_class=oc.empty_class, learn_sigma=cfg.model.learn_sigma,
                        w_input=cfg.model.w_input).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                            betas=tuple(cfg.optim.betas))
    objective = Objective(oc, data.num_classes, cfg.model.w_input, cfg.model.learn_sigma)
    autow = AutoW.for_run(cfg) if oc.auto_w.enabled else None

    # Resume from the latest checkpoint, or start a new run folder.
    step, window, last_eval = 0, {"loss": 0.0, "mg": 0.0, "n": 0, "time": 0.0}, {}
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        state = load_checkpoint(ckpt)
        check_same_run(cfg, state["config"], ckpt)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        step, window, last_eval = state["step"], state["window"], state.get("last_eval", {})
        if autow is not None:
            autow.load_state_dict(state["auto_w"])
        torch.set_rng_state(state["rng"]["torch"])
        if rank == 0 and step < tc.steps:
            tracker.log_metrics({T.M_RESUMED: step}, step=step)
    elif rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / T.A_CONFIG).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if rank == 0 and step == 0:
        params = T.flatten(cfg.to_dict())
        params["objective.implied_cfg_scale"] = implied_cfg_scale(oc.mean_g, oc.mg_fraction, cfg.model.w_input)
        tracker.log_params(params)
        tracker.log_artifact(out / T.A_CONFIG)
        n_params, gflops = model_cost(model, data, device)
        tracker.log_metrics({T.M_PARAMS: n_params, T.M_GFLOPS: gflops}, step=0)
    net = D.wrap(model, env)
    teacher = ema if oc.teacher == "ema" else model

    def current_w() -> float:
        return autow.w if autow is not None else oc.w

    def teacher_decay() -> float:
        return ema_decay_at(cfg.optim.ema_decay, step - 1, cfg.optim.ema_warmup)

    def evaluate() -> dict[str, float]:
        probes = autow.probes(step, teacher_decay()) if autow is not None else {}  # same checkpoint, other w
        ctx = EvalContext(cfg, ema, step, current_w(), device, data, str(out), rank, world, probes)
        return eval_hook(ctx) if eval_hook is not None else {}

    def save() -> None:
        if rank == 0:
            # Metrics reach the tracker only with the checkpoint that covers them: a resumed run redoes
            # the steps after its checkpoint and logs them once. They go first, so a crash between the
            # two can only repeat a window, which the tracker drops (it keeps the steps it has seen).
            for metrics, at in pending:
                tracker.log_metrics(metrics, step=at)
            tracker.flush()
            save_checkpoint(out, step, {
                "step": step, "model": model.state_dict(), "ema": ema.state_dict(),
                "optimizer": opt.state_dict(), "window": window, "config": cfg.to_dict(), "last_eval": last_eval,
                "auto_w": autow.state_dict() if autow is not None else None,
                "rng": {"torch": torch.get_rng_state()}}, keep=tc.keep_ckpts)
        pending.clear()
        D.barrier(env)

    def report(kind: str, values: dict[str, float]) -> None:
        if progress is not None and rank == 0:
            progress(Progress(step, tc.steps, start_step, time.perf_counter() - started, "step", kind, values))

    pending: list[tuple[dict[str, float], int]] = []
    losses: list[tuple[int, float]] = []
    done_here, B = 0, cfg.optim.batch_size
    start_step, started = step, time.perf_counter()
    model.train()
    while step < tc.steps:
        t0 = time.perf_counter()
        # Draw the whole global batch from a generator keyed by (seed, step): ranks and resumes agree.
        gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + step)
        idx = torch.randint(0, len(data), (B,), generator=gen)
        noise = objective.draw(B, data.shape, gen, current_w())
        shard = slice(rank * B // world, (rank + 1) * B // world)
        x0, y = data.x[idx[shard]].to(device), data.y[idx[shard]].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16"):
            loss, stats = objective.loss(net, teacher, x0, y, noise.shard(rank, world), oc.mg and step >= oc.start_step)
        loss_all = D.mean(loss.detach(), env)
        if not torch.isfinite(loss_all):
            raise TrainingDiverged(f"loss is {loss_all.item()} at step {step + 1} ({cfg.out_dir}); "
                                   "lower the learning rate or w, or resume from an earlier checkpoint")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        update_ema(ema, model, cfg.optim.ema_decay, step, cfg.optim.ema_warmup)
        step, done_here = step + 1, done_here + 1
        losses.append((step, loss_all.item()))
        window = {"loss": window["loss"] + loss_all.item(), "mg": window["mg"] + stats["mg_share"],
                  "n": window["n"] + 1, "time": window["time"] + time.perf_counter() - t0}

        # Log the window's means.
        if step % tc.log_every == 0 or step == tc.steps:
            n = window["n"]
            w_now = current_w()
            pending.append(({T.M_LOSS: window["loss"] / n, T.M_LOSS_MG: window["mg"] / n, T.M_W: w_now,
                             T.M_STEP_TIME: window["time"] / n,
                             T.M_EMA_DECAY: ema_decay_at(cfg.optim.ema_decay, step - 1, cfg.optim.ema_warmup),
                             T.M_IMPLIED_CFG: implied_cfg_scale(w_now - 1 if oc.w_range is None else oc.mean_g,
                                                                oc.mg_fraction, cfg.model.w_input)}, step))
            report("train", {"loss": window["loss"] / n} | ({"w": w_now} if autow is not None else {}))
            window = {"loss": 0.0, "mg": 0.0, "n": 0, "time": 0.0}

        # Evaluate (and move automatic w).
        if (tc.eval_every and step % tc.eval_every == 0) or step == tc.steps:
            last_eval = evaluate()
            decision = autow.update(step, last_eval, teacher_decay()) if autow is not None else {}
            pending.append((T.tracked_eval(last_eval) | decision, step))
            report("eval", last_eval)
            model.train()

        # Save state checkpoint.
        capped = tc.max_steps_per_run and done_here >= tc.max_steps_per_run
        if step % tc.ckpt_every == 0 or step == tc.steps or capped:
            save()
        if capped and step < tc.steps:
            return TrainResult("paused", step, str(out), current_w(), last_eval, losses)

    # Final samples (grid image, and the points themselves for grid2d).
    if rank == 0 and done_here > 0:
        for path in write_samples(cfg, ema, data, current_w(), device, out, step):
            tracker.log_artifact(path, T.A_SAMPLES)
        tracker.flush()
    return TrainResult("finished", step, str(out), current_w(), last_eval, losses)


def ema_decay_at(decay: float, step: int, warmup: bool) -> float:
    """The EMA decay used at (0-based) `step`: min(decay, (1 + step) / (10 + step)) under warm-up, else decay."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int, warmup: bool) -> None:
    """ema <- d * ema + (1 - d) * model, with d = ema_decay_at(decay, step, warmup)."""
    d = ema_decay_at(decay, step, warmup)
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - d)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def check_same_run(cfg: TrainConfig, saved: dict[str, Any], ckpt: Path) -> None:
    """Refuse to resume a run folder that holds a run of another config."""
    now, before = T.flatten(cfg.to_dict()), {**T.flatten(TrainConfig().to_dict()), **LEGACY_VALUES, **T.flatten(saved)}
    for key in sorted(set(now) | set(before)):
        if key.startswith(RESUMABLE_CHANGES):
            continue
        if now.get(key) != before.get(key):
            raise ConfigError(f"{cfg.out_dir}: holds a run whose {key} is {before.get(key)!r}, not "
                              f"{now.get(key)!r} ({ckpt.name}); use another out_dir to start a new run")
