"""Samplers: DDPM ancestral and DDIM (full or respaced), flow Euler / Heun ODE and Euler-Maruyama SDE.

Conventions (see formulation.py for the two formulations, their tables and default samplers):
- `shape` is the shape of ONE sample ((2,) points, (C, H, W) images); the batch is `len(labels)`.
- Every random draw of sample i (initial noise, step noise, label subsets) comes from its own
  `torch.Generator().manual_seed(seeds[i])` on the CPU, so a sample does not depend on the batch
  it is drawn in, the device, or the number of GPUs.
- Guidance: `none` = the conditional model; `cfg` = cond + s * (cond - uncond) from one batched
  forward (2 NFE per step, 1 + N without an empty class); `mg` = one forward of an MG model (w fed
  to w-input models); `mg+cfg` = CFG on top of an MG model (w for the cond branch, 0 for uncond).
  w-input models get w = 1 under `none` and `cfg`; models without a w input ignore `w`
  (a plain callable without a `w_input` attribute is fed `w` whenever it is given).
- NFE counts network evaluations per sample (a batched cond/uncond forward counts 2); `steps` in the
  result counts the sampler steps taken (a respaced DDPM chain may merge repeated steps).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor, nn

from mgbench.trainer.formulation import (
    DDPM,
    FORMULATIONS,
    Flow,
    formulation_named,
    respaced_timesteps,
    split_output,
)
from mgbench.trainer.guidance import cfg_combine, cond_and_uncond, num_uncond_labels

if TYPE_CHECKING:
    from mgbench.config import TrainConfig
    from mgbench.trainer.data import Dataset

__all__ = ["SampleResult", "sample", "respaced_timesteps", "SAMPLER_NAMES", "GUIDANCE"]

SAMPLER_NAMES = ("auto", *(name for f in FORMULATIONS.values() for name in f.samplers))  # auto = the formulation's default
GUIDANCE = ("none", "cfg", "mg", "mg+cfg")

Predictor = Callable[[Tensor, Tensor], Tensor]  # (x, t_net) -> guided prediction (2C channels with learn_sigma)


@dataclass
class SampleResult:
    """Samples and what they cost."""

    x: Tensor                              # samples in model space (B, ...)
    nfe: int                               # network forwards per sample over the whole trajectory (CFG counts 2 per step)
    steps: int                             # sampler steps taken
    trajectory: list[Tensor] | None = None  # x after each step (CPU), starting with the noise, if asked for


def sample(model, *, formulation: str, shape: tuple[int, ...], labels: Tensor, seeds: Sequence[int],
           sampler: str = "auto", steps: int = 50, guidance: str = "none", cfg_scale: float = 0.0,
           w: float | None = None, num_classes: int, empty_class: bool = True, uncond_labels: int = 0,
           learn_sigma: bool = False, diffusion_steps: int = 1000, spacing: str = "linear", device=None,
           return_trajectory: bool = False) -> SampleResult:
    """Draw one sample per label with per-sample seeds; `model(x, t_net, y, w=None)` may be any callable."""
    form = formulation_named(formulation, diffusion_steps)
    sampler = resolve_sampler(sampler, form)
    if len(seeds) != len(labels):
        raise ValueError(f"need one seed per label: {len(seeds)} seeds for {len(labels)} labels")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = torch.device(device) if device is not None else _model_device(model, labels)
    labels = labels.to(device).long()
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    nfe = [0]
    predict = _predictor(model, labels, gens, nfe, guidance=guidance, cfg_scale=cfg_scale, w=w,
                         num_classes=num_classes, empty_class=empty_class, uncond_labels=uncond_labels,
                         learn_sigma=learn_sigma, device=device)
    x = _noise(gens, shape, device)
    traj = [x.cpu()] if return_trajectory else None
    run = Run(predict, gens, learn_sigma, traj)
    with torch.no_grad():
        x, taken = SAMPLER_LOOPS[sampler](form, run, x, steps, spacing)
    return SampleResult(x=x, nfe=nfe[0], steps=taken, trajectory=traj)


def resolve_sampler(sampler: str, form: DDPM | Flow) -> str:
    """auto -> the formulation's default sampler; reject unknown samplers and those of the other formulation."""
    if sampler not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {sampler!r} (choose from {', '.join(SAMPLER_NAMES)})")
    if sampler == "auto":
        return form.default_sampler
    if sampler not in form.samplers:
        fits = "; ".join(f"{', '.join(f.samplers)} for {f.name}" for f in FORMULATIONS.values())
        raise ValueError(f"sampler {sampler!r} does not fit formulation {form.name!r} ({fits})")
    return sampler


@dataclass
class Run:
    """What every sampler loop shares: the guided prediction, the per-sample generators, the trajectory."""

    predict: Predictor                     # (x, t_net) -> guided prediction
    gens: Sequence[torch.Generator]        # one per sample (step noise)
    learn_sigma: bool                      # predictions carry a variance half
    traj: list[Tensor] | None              # x after each step is appended when given

    def record(self, x: Tensor) -> None:
        if self.traj is not None:
            self.traj.append(x.cpu())


def _model_device(model, labels: Tensor) -> torch.device:
    """The device of an nn.Module's parameters, else that of the labels."""
    if isinstance(model, nn.Module):
        p = next(model.parameters(), None)
        if p is not None:
            return p.device
    return labels.device


def _noise(gens: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device) -> Tensor:
    """One standard normal draw of `shape` per sample, each from its own CPU generator."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in gens]).to(device)


# ----------------------------------------------------------------------------- guidance


def _predictor(model, labels: Tensor, gens: Sequence[torch.Generator], nfe: list[int], *, guidance: str,
               cfg_scale: float, w: float | None, num_classes: int, empty_class: bool, uncond_labels: int,
               learn_sigma: bool, device: torch.device) -> Predictor:
    """The guided prediction as a function of (x, t_net); adds the NFE of each call to nfe[0]."""
    if guidance not in GUIDANCE:
        raise ValueError(f"unknown guidance {guidance!r} (choose from {', '.join(GUIDANCE)})")
    w_input = getattr(model, "w_input", w is not None)  # plain callables take w when it is given
    if w_input and guidance in ("mg", "mg+cfg") and w is None:
        raise ValueError(f"guidance {guidance!r} with a w-input model needs w (the paper's w, 1 = vanilla)")
    b = labels.shape[0]
    w_cond = None
    if w_input:  # unguided conditional predictions of a w-input model use w = 1
        value = w if guidance in ("mg", "mg+cfg") else 1.0
        w_cond = torch.full((b,), float(value), device=device)
    n_uncond = 1 if empty_class else num_uncond_labels(num_classes, uncond_labels)

    def plain(x: Tensor, t_net: Tensor) -> Tensor:
        nfe[0] += 1
        return model(x, t_net, labels, w=w_cond)

    def guided(x: Tensor, t_net: Tensor) -> Tensor:
        nfe[0] += 1 + n_uncond
        sets = None
        if not empty_class and n_uncond < num_classes:  # fresh label subsets per step, from each sample's generator
            sets = torch.stack([torch.randperm(num_classes, generator=g)[:n_uncond] for g in gens]).to(device)
        cond, uncond = cond_and_uncond(model, x, t_net, labels, num_classes=num_classes, empty_class=empty_class,
                                       uncond_labels=uncond_labels, w_cond=w_cond, uncond_label_sets=sets)
        return cfg_combine(cond, uncond, cfg_scale, learn_sigma)

    return guided if guidance in ("cfg", "mg+cfg") else plain


# ----------------------------------------------------------------------------- DDPM


def _ddpm(form: DDPM, run: Run, x: Tensor, steps: int, spacing: str) -> tuple[Tensor, int]:
    """Ancestral DDPM: x_{t-1} ~ N(posterior mean from the eps prediction, fixed-small or learned variance)."""
    chain = form.chain(steps, spacing)
    abars, log_beta, post_logvar = chain.abar.tolist(), chain.betas.log().tolist(), chain.log_var.tolist()
    coef_x0, coef_xt = chain.coef_x0.tolist(), chain.coef_xt.tolist()
    for i in reversed(range(len(chain.steps))):
        out = run.predict(x, torch.full((x.shape[0],), float(chain.steps[i]), device=x.device))
        eps, var = split_output(out, run.learn_sigma)
        abar = abars[i]
        x0 = x / math.sqrt(abar) - math.sqrt(1 / abar - 1) * eps
        mean = coef_x0[i] * x0 + coef_xt[i] * x
        if i == 0:
            x = mean
        else:
            if var is None:
                logvar = torch.full_like(mean, post_logvar[i])
            else:  # improved DDPM: interpolate between the clipped posterior and beta in log space
                frac = (var + 1) / 2
                logvar = frac * log_beta[i] + (1 - frac) * post_logvar[i]
            x = mean + torch.exp(0.5 * logvar) * _noise(run.gens, tuple(x.shape[1:]), x.device)
        run.record(x)
    return x, len(chain.steps)


def _ddim(form: DDPM, run: Run, x: Tensor, steps: int, spacing: str) -> tuple[Tensor, int]:
    """Deterministic DDIM (eta = 0) on the respaced steps: x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps.

    A learned variance (the second half of 2C channels) is ignored; the last step (abar_prev = 1) returns x0.
    """
    chain = form.chain(steps, spacing)
    abar = chain.abar.tolist()
    for i in reversed(range(len(chain.steps))):
        out = run.predict(x, torch.full((x.shape[0],), float(chain.steps[i]), device=x.device))
        eps = split_output(out, run.learn_sigma)[0]
        a, a_prev = abar[i], (abar[i - 1] if i > 0 else 1.0)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
        run.record(x)
    return x, len(chain.steps)


# ----------------------------------------------------------------------------- flow (t from 1 to 0)


def _flow_loop(step: Callable) -> Callable[..., tuple[Tensor, int]]:
    """A sampler loop that integrates from t = 1 (noise) to t = 0 (data) on a uniform grid with `step`."""

    def loop(form: Flow, run: Run, x: Tensor, steps: int, spacing: str) -> tuple[Tensor, int]:
        ts = [1.0 - i / steps for i in range(steps + 1)]

        def velocity(x_: Tensor, t: float) -> Tensor:
            out = run.predict(x_, form.net_time(torch.full((x_.shape[0],), t, device=x_.device)))
            return split_output(out, run.learn_sigma)[0]

        for i in range(steps):
            x = step(velocity, x, ts[i], ts[i + 1], run.gens, last=i == steps - 1)
            run.record(x)
        return x, steps
    return loop


def _euler_step(velocity, x: Tensor, t: float, t_next: float, gens, last: bool) -> Tensor:
    """One explicit Euler step of dx/dt = v."""
    return x + (t_next - t) * velocity(x, t)


def _heun_step(velocity, x: Tensor, t: float, t_next: float, gens, last: bool) -> Tensor:
    """Heun's second-order step (trapezoid on an Euler predictor); Euler on the last step (t_next = 0)."""
    v = velocity(x, t)
    x_pred = x + (t_next - t) * v
    if last:
        return x_pred
    return x + (t_next - t) * 0.5 * (v + velocity(x_pred, t_next))


def _em_step(velocity, x: Tensor, t: float, t_next: float, gens, last: bool) -> Tensor:
    """Euler-Maruyama step of the reverse SDE dx = [v - g^2/2 * score] dt + g dW, deterministic on the last step.

    score = -(x + (1 - t) v) / t on the linear path; g(t)^2 = 2 t (SiT's default diffusion form
    "sigma" with norm 1: g^2 / 2 = sigma_t), so the drift is x + (2 - t) v and the noise vanishes
    at the data end.
    """
    v = velocity(x, t)
    h = t_next - t  # negative
    x_mean = x + h * (x + (2 - t) * v)
    if last:
        return x_mean
    return x_mean + math.sqrt(2 * t * -h) * _noise(gens, tuple(x.shape[1:]), x.device)


SAMPLER_LOOPS = {"ddpm": _ddpm, "ddim": _ddim, "euler": _flow_loop(_euler_step), "heun": _flow_loop(_heun_step),
                 "euler_maruyama": _flow_loop(_em_step)}  # sampler name -> loop(form, run, x, steps, spacing)


def sampling_kwargs(cfg: TrainConfig, w: float, dataset: Dataset) -> dict[str, Any]:
    """The arguments of `sample` implied by a trainer config at guidance weight `w` (guidance/sampler 'auto'
    resolved): what evaluation, outputs and the CLI sample with."""
    o, s = cfg.objective, cfg.sample
    guidance = s.guidance
    if guidance == "auto":
        guidance = "mg" if o.mg else "none"
    sampler = s.sampler
    if sampler == "auto":
        sampler = FORMULATIONS[o.formulation].default_sampler
    w_in = None
    if cfg.model.w_input:
        w_in = s.w if s.w is not None else (w if guidance in ("mg", "mg+cfg") else 1.0)
    return dict(formulation=o.formulation, shape=dataset.shape, num_classes=dataset.num_classes, sampler=sampler,
                steps=s.steps, guidance=guidance,                cfg_scale=s.cfg_scale, w=w_in, empty_class=o.empty_class, uncond_labels=o.uncond_labels,
                learn_sigma=cfg.model.learn_sigma, diffusion_steps=o.diffusion_steps, spacing=s.spacing)
