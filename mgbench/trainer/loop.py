"""The MG training loop: one function that reads top to bottom. To resume, run the same command again.

The EMA is the MG teacher, so its decay sets MG's strength as much as w does. Under `ema_warmup` the
decay of step t is min(ema_decay, (1 + t) / (10 + t)): 0.991 at step 1000 and 0.999 only after ~9k
steps, so in short runs the teacher follows the model closely and MG reaches its fixed point early
(grid2d, 6k steps, w = 1.5: CFG s* ~1.0 instead of ~0.6 with a plain 0.999 EMA). It is logged as
`train/ema_decay`.

A step does not wait for the device (mgbench.trainer.step): the losses of a logging window stay on the
device and are read, and checked for NaN/inf, when the window is logged, evaluated or checkpointed; a
checkpoint never holds weights of a diverged step.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from mgbench import tracking as T
from mgbench.config import ConfigError, TrainConfig, compile_enabled
from mgbench.trainer import distributed as D
from mgbench.trainer.autow import AutoW
from mgbench.trainer.build import run_dataset, run_model
from mgbench.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from mgbench.trainer.data import Dataset
from mgbench.trainer.guidance import to_device
from mgbench.trainer.hooks import EvalContext, EvalHook
from mgbench.trainer.objective import Objective, implied_cfg_scale
from mgbench.trainer.outputs import model_cost, write_samples
from mgbench.trainer.progress import Progress, ProgressFn
from mgbench.trainer.step import StepModules, adamw, ema_decay_at, step_modules, train_step

# Fields that may change between invocations on the same run folder (everything else must match). The speed
# knobs (compile, uncond_chunk) change results only by float rounding, so runs from before them resume too.
RESUMABLE_CHANGES = ("train.steps", "train.max_steps_per_run", "train.eval_every", "train.log_every",
                     "train.ckpt_every", "train.keep_ckpts", "train.device", "train.compile", "objective.uncond_chunk",
                     "eval.", "sample.", "name", "out_dir")
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
    env = setup_device(cfg)
    out = Path(cfg.out_dir)

    # Data, model, EMA teacher (compiled for sampling when asked), optimiser, automatic w.
    data = run_dataset(cfg, out, env.device)
    m = build_step_modules(cfg, data, env)
    sampler = torch.compile(m.ema) if compile_enabled(cfg.sample.compile, env.device) else m.ema
    objective = Objective(oc, data.num_classes, cfg.model.w_input, cfg.model.learn_sigma)
    autow = AutoW.for_run(cfg) if oc.auto_w.enabled else None

    def current_w() -> float:
        return autow.w if autow is not None else oc.w

    def report(kind: str, values: dict[str, float]) -> None:
        if progress is not None and env.rank == 0:
            progress(Progress(step, tc.steps, start_step, time.perf_counter() - started, "step", kind, values))

    step, window, last_eval = open_run(cfg, m, autow, data, env, tracker)  # resumes from the latest checkpoint
    pending: list[tuple[dict[str, float], int]] = []   # step metrics waiting for the checkpoint that covers them
    losses: list[tuple[int, float]] = []
    done_here, start_step, started = 0, step, time.perf_counter()
    m.model.train()
    while step < tc.steps:
        t0 = time.perf_counter()
        x0, y, noise = draw_batch(data, objective, cfg, step, current_w(), env.rank, env.world_size, env.device)
        loss, mg_share = train_step(m, objective, x0, y, noise, mg_on=oc.mg and step >= oc.start_step,
                                    ema_decay=ema_decay_at(cfg.optim.ema_decay, step, cfg.optim.ema_warmup),
                                    grad_clip=cfg.optim.grad_clip, bf16=tc.precision == "bf16")
        step, done_here = step + 1, done_here + 1
        window.add(step, D.mean(loss, env), mg_share, time.perf_counter() - t0)
        log_now = step % tc.log_every == 0 or step == tc.steps
        eval_now = (tc.eval_every and step % tc.eval_every == 0) or step == tc.steps
        capped = tc.max_steps_per_run and done_here >= tc.max_steps_per_run
        save_now = step % tc.ckpt_every == 0 or step == tc.steps or capped
        if log_now or eval_now or save_now:
            losses += window.read(cfg.out_dir)  # the one host sync of a window: raises on NaN/inf, naming the step

        # Log the window's means.
        if log_now:
            pending.append((window_metrics(cfg, window, step, current_w()), step))
            report("train", {"loss": window.loss / window.n} | ({"w": current_w()} if autow is not None else {}))
            window = Window()

        # Evaluate (and move automatic w).
        if eval_now:
            last_eval, decision = evaluate(cfg, sampler, step, current_w(), data, env, eval_hook, autow)
            pending.append((T.tracked_eval(last_eval) | decision, step))
            report("eval", last_eval)
            m.model.train()

        # Save state checkpoint (metrics reach the tracker only with the checkpoint that covers them).
        if save_now:
            save(cfg, out, run_state(cfg, step, m, window, last_eval, autow), pending, tracker, env)
        if capped and step < tc.steps:
            return TrainResult("paused", step, str(out), current_w(), last_eval, losses)

    if env.rank == 0 and done_here > 0:
        log_samples(cfg, sampler, data, current_w(), env.device, step, tracker)
    return TrainResult("finished", step, str(out), current_w(), last_eval, losses)


# ----------------------------------------------------------------------------- the loop's parts


class Window:
    """A logging window: per-step losses stay on the device until `read`; sums of losses, MG shares, seconds."""

    def __init__(self, saved: dict[str, float] | None = None) -> None:
        saved = saved or {"loss": 0.0, "mg": 0.0, "n": 0, "time": 0.0}
        self.loss, self.mg, self.n, self.time = saved["loss"], saved["mg"], saved["n"], saved["time"]
        self.unread: list[tuple[int, torch.Tensor]] = []

    def add(self, step: int, loss: torch.Tensor, mg_share: float, seconds: float) -> None:
        self.unread.append((step, loss))
        self.mg, self.n, self.time = self.mg + mg_share, self.n + 1, self.time + seconds

    def read(self, where: str) -> list[tuple[int, float]]:
        """The unread (step, loss) pairs, added to the sums in step order; TrainingDiverged on the first NaN/inf."""
        if not self.unread:
            return []
        t0 = time.perf_counter()
        values = torch.stack([loss for _, loss in self.unread]).tolist()  # waits for the queued steps
        pairs = [(s, v) for (s, _), v in zip(self.unread, values)]
        self.unread, self.time = [], self.time + time.perf_counter() - t0
        for s, v in pairs:
            if not math.isfinite(v):
                raise TrainingDiverged(f"loss is {v} at step {s} ({where}); "
                                       "lower the learning rate or w, or resume from an earlier checkpoint")
            self.loss += v
        return pairs

    def state(self) -> dict[str, float]:
        """The sums, for a checkpoint (read first)."""
        assert not self.unread, "read the window before saving it"
        return {"loss": self.loss, "mg": self.mg, "n": self.n, "time": self.time}


def open_run(cfg: TrainConfig, m: StepModules, autow: AutoW | None, data: Dataset, env: D.DistEnv,
             tracker: T.Tracker) -> tuple[int, Window, dict[str, float]]:
    """Resume from the run folder's latest checkpoint, or start the folder (its config file; params and model size
    to the tracker); (step, window, last evaluation)."""
    out = Path(cfg.out_dir)
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        step, window, last_eval = restore(cfg, ckpt, m, autow)
        if env.rank == 0 and step < cfg.train.steps:
            tracker.log_metrics({T.M_RESUMED: step}, step=step)
    else:
        step, window, last_eval = 0, Window(), {}
        if env.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / T.A_CONFIG).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if env.rank == 0 and step == 0:
        log_run_params(cfg, m.model, data, env.device, tracker)
    return step, window, last_eval


def evaluate(cfg: TrainConfig, sampler: torch.nn.Module, step: int, w: float, data: Dataset, env: D.DistEnv,
             eval_hook: EvalHook | None, autow: AutoW | None) -> tuple[dict[str, float], dict[str, float]]:
    """Evaluate the EMA teacher after `step` steps (automatic w adds its probes: the same checkpoint sampled at other
    w) and let automatic w move; (metrics, automatic w's decision)."""
    decay = ema_decay_at(cfg.optim.ema_decay, step - 1, cfg.optim.ema_warmup)
    probes = autow.probes(step, decay) if autow is not None else {}
    ctx = EvalContext(cfg, sampler, step, w, env.device, data, str(Path(cfg.out_dir)), env.rank, env.world_size,
                      probes)
    metrics = eval_hook(ctx) if eval_hook is not None else {}
    return metrics, (autow.update(step, metrics, decay) if autow is not None else {})


def log_samples(cfg: TrainConfig, sampler: torch.nn.Module, data: Dataset, w: float, device: torch.device, step: int,
                tracker: T.Tracker) -> None:
    """The final samples (a grid image; for grid2d the points themselves) as artifacts of the run."""
    for path in write_samples(cfg, sampler, data, w, device, Path(cfg.out_dir), step):
        tracker.log_artifact(path, T.A_SAMPLES)
    tracker.flush()


def setup_device(cfg: TrainConfig) -> D.DistEnv:
    """Join the process group, check the batch splits over the ranks, set TF32 on a GPU."""
    env = D.setup(cfg.train.device)
    if cfg.optim.batch_size % env.world_size:
        raise ConfigError(f"optim.batch_size: {cfg.optim.batch_size} is not divisible by {env.world_size} ranks")
    if env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    return env


def build_step_modules(cfg: TrainConfig, data: Dataset, env: D.DistEnv) -> StepModules:
    """The model (initialised from the seed), AdamW (fused when compiled) and the EMA teacher; DDP-wrapped and
    compiled as configured."""
    torch.manual_seed(cfg.train.seed)
    model = run_model(cfg, data).to(env.device)
    compile = compile_enabled(cfg.train.compile, env.device)
    opt = adamw(model, cfg.optim.lr, cfg.optim.weight_decay, tuple(cfg.optim.betas), fused=compile)
    return step_modules(model, opt, teacher=cfg.objective.teacher, compile=compile, wrap=lambda net: D.wrap(net, env))


def draw_batch(data: Dataset, objective: Objective, cfg: TrainConfig, step: int, w: float, rank: int, world: int,
               device: torch.device):
    """This rank's (x0, y, noise) of the global batch of `step`, drawn from a generator keyed by (seed, step),
    so ranks and resumes agree; the noise stays on the host (the objective moves what it needs)."""
    B = cfg.optim.batch_size
    gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)
    idx = torch.randint(0, len(data), (B,), generator=gen)
    noise = objective.draw(B, data.shape, gen, w)
    mine = idx[rank * B // world:(rank + 1) * B // world]
    return to_device(data.x[mine], device), to_device(data.y[mine], device), noise.shard(rank, world)


def window_metrics(cfg: TrainConfig, window: Window, step: int, w: float) -> dict[str, float]:
    """The step metrics of a logging window: mean loss and MG share, w, step time, EMA decay, implied CFG scale."""
    oc, n = cfg.objective, window.n
    g = w - 1 if oc.w_range is None else oc.mean_g
    return {T.M_LOSS: window.loss / n, T.M_LOSS_MG: window.mg / n, T.M_W: w, T.M_STEP_TIME: window.time / n,
            T.M_EMA_DECAY: ema_decay_at(cfg.optim.ema_decay, step - 1, cfg.optim.ema_warmup),
            T.M_IMPLIED_CFG: implied_cfg_scale(g, oc.mg_fraction, cfg.model.w_input)}


def log_run_params(cfg: TrainConfig, model: torch.nn.Module, data: Dataset, device: torch.device,
                   tracker: T.Tracker) -> None:
    """A new run's params, config artifact, parameter count and GFLOPs."""
    oc = cfg.objective
    params = T.flatten(cfg.to_dict())
    params["objective.implied_cfg_scale"] = implied_cfg_scale(oc.mean_g, oc.mg_fraction, cfg.model.w_input)
    tracker.log_params(params)
    tracker.log_artifact(Path(cfg.out_dir) / T.A_CONFIG)
    n_params, gflops = model_cost(model, data, device)
    tracker.log_metrics({T.M_PARAMS: n_params, T.M_GFLOPS: gflops}, step=0)


def run_state(cfg: TrainConfig, step: int, m: StepModules, window: Window, last_eval: dict[str, float],
              autow: AutoW | None) -> dict[str, Any]:
    """Everything a checkpoint holds (read back by `restore`)."""
    return {"step": step, "model": m.model.state_dict(), "ema": m.ema.state_dict(),
            "optimizer": m.opt.state_dict(), "window": window.state(), "config": cfg.to_dict(),
            "last_eval": last_eval, "auto_w": autow.state_dict() if autow is not None else None,
            "rng": {"torch": torch.get_rng_state()}}


def restore(cfg: TrainConfig, ckpt: Path, m: StepModules, autow: AutoW | None
            ) -> tuple[int, Window, dict[str, float]]:
    """Load a checkpoint written by `run_state` (after checking it is this run's); (step, window, last_eval)."""
    state = load_checkpoint(ckpt)
    check_same_run(cfg, state["config"], ckpt)
    m.model.load_state_dict(state["model"])
    m.ema.load_state_dict(state["ema"])
    m.opt.load_state_dict(state["optimizer"])
    if autow is not None:
        autow.load_state_dict(state["auto_w"])
    torch.set_rng_state(state["rng"]["torch"])
    return state["step"], Window(state["window"]), state.get("last_eval", {})


def save(cfg: TrainConfig, out: Path, state: dict[str, Any], pending: list[tuple[dict[str, float], int]],
         tracker: T.Tracker, env: D.DistEnv) -> None:
    """Log the pending step metrics, then write the checkpoint (rank 0); all ranks wait for it."""
    def write() -> None:
        # A resumed run redoes the steps after its checkpoint and logs them once. Metrics go first, so a crash
        # between the two can only repeat a window, which the tracker drops (it keeps the steps it has seen).
        for metrics, at in pending:
            tracker.log_metrics(metrics, step=at)
        tracker.flush()
        save_checkpoint(out, state["step"], state, keep=cfg.train.keep_ckpts)

    D.on_rank0(write, env.rank, env.world_size)  # all ranks wait; a failed write (a full disk) is raised on every rank
    pending.clear()


def check_same_run(cfg: TrainConfig, saved: dict[str, Any], ckpt: Path) -> None:
    """Refuse to resume a run folder that holds a run of another config."""
    now, before = T.flatten(cfg.to_dict()), {**T.flatten(TrainConfig().to_dict()), **LEGACY_VALUES, **T.flatten(saved)}
    for key in sorted(set(now) | set(before)):
        if key.startswith(RESUMABLE_CHANGES):
            continue
        if now.get(key) != before.get(key):
            raise ConfigError(f"{cfg.out_dir}: holds a run whose {key} is {before.get(key)!r}, not "
                              f"{now.get(key)!r} ({ckpt.name}); use another out_dir to start a new run")
