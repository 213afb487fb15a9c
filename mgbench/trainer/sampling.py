"""Samplers: DDPM ancestral and DDIM (full or respaced), flow Euler / Heun ODE and Euler-Maruyama SDE.

Conventions (see paths.py for the two formulations):
- `shape` is the shape of ONE sample ((2,) points, (C, H, W) images); the batch is `len(labels)`.
- Every random draw of sample i (initial noise, step noise, label subsets) comes from its own
  `torch.Generator().manual_seed(seeds[i])` on the CPU, so a sample does not depend on the batch
  it is drawn in, the device, or the number of GPUs.
- Guidance: `none` = the conditional model; `cfg` = cond + s * (cond - uncond) from one batched
  forward (2 NFE per step, 1 + N without an empty class); `mg` = one forward of an MG model (w fed
  to w-input models); `mg+cfg` = CFG on top of an MG model (w for the cond branch, 0 for uncond).
  w-input models get w = 1 under `none` and `cfg`; models without a w input ignore `w`
  (a plain callable without a `w_input` attribute is fed `w` whenever it is given).
- NFE counts network evaluations per sample (a batched cond/uncond forward counts 2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from mgbench.trainer.guidance import (cfg_combine, cond_and_uncond, net_time, num_uncond_labels,
                                      split_sigma)
from mgbench.trainer.paths import DDPMSchedule

__all__ = ["SampleResult", "sample", "net_time", "respaced_timesteps", "SAMPLERS", "DIFFUSION_SAMPLERS", "GUIDANCE"]

SAMPLERS = ("auto", "ddpm", "ddim", "euler", "heun", "euler_maruyama")
DIFFUSION_SAMPLERS = ("ddpm", "ddim")
GUIDANCE = ("none", "cfg", "mg", "mg+cfg")

Predictor = Callable[[Tensor, Tensor], Tensor]  # (x, t_net) -> guided prediction (2C channels with learn_sigma)


@dataclass
class SampleResult:
    """Samples and what they cost."""

    x: Tensor                              # samples in model space (B, ...)
    nfe: int                               # network forwards per sample over the whole trajectory (CFG counts 2 per step)
    steps: int                             # sampler steps
    trajectory: list[Tensor] | None = None  # x after each step (CPU), starting with the noise, if asked for


def sample(model, *, formulation: str, shape: tuple[int, ...], labels: Tensor, seeds: Sequence[int],
           sampler: str = "auto", steps: int = 50, guidance: str = "none", cfg_scale: float = 0.0,
           w: float | None = None, num_classes: int, empty_class: bool = True, uncond_labels: int = 0,
           learn_sigma: bool = False, diffusion_steps: int = 1000, spacing: str = "linear", device=None,
           return_trajectory: bool = False) -> SampleResult:
    """Draw one sample per label with per-sample seeds; `model(x, t_net, y, w=None)` may be any callable."""
    sampler = _resolve_sampler(sampler, formulation)
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
    with torch.no_grad():
        if sampler == "ddpm":
            x = _ddpm(predict, x, gens, steps, diffusion_steps, learn_sigma, traj, spacing)
        elif sampler == "ddim":
            x = _ddim(predict, x, steps, diffusion_steps, learn_sigma, traj, spacing)
        else:
            step = {"euler": _euler_step, "heun": _heun_step, "euler_maruyama": _em_step}[sampler]
            x = _flow(step, predict, x, gens, steps, learn_sigma, traj)
    n_steps = min(steps, diffusion_steps) if sampler in DIFFUSION_SAMPLERS else steps
    return SampleResult(x=x, nfe=nfe[0], steps=n_steps, trajectory=traj)


def _resolve_sampler(sampler: str, formulation: str) -> str:
    """auto -> ddpm (diffusion) / euler (flow); reject samplers of the other formulation."""
    if formulation not in ("flow", "diffusion"):
        raise ValueError(f"unknown formulation {formulation!r} (flow | diffusion)")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")
    if sampler == "auto":
        return "ddpm" if formulation == "diffusion" else "euler"
    if (sampler in DIFFUSION_SAMPLERS) != (formulation == "diffusion"):
        raise ValueError(f"sampler {sampler!r} does not fit formulation {formulation!r} "
                         "(ddpm, ddim for diffusion; euler, heun, euler_maruyama for flow)")
    return sampler


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


SPACINGS = ("linear", "quadratic")


def respaced_timesteps(T: int, steps: int, spacing: str = "linear") -> list[int]:
    """`steps` steps of 0..T-1, both ends included: evenly spaced (improved DDPM's space_timesteps), or
    quadratic (step ~ (i / (steps-1))^2 T, DDIM's finer low-noise steps; repeats merged, so a few fewer)."""
    if steps >= T:
        return list(range(T))
    if steps < 2:
        raise ValueError(f"DDPM respacing needs at least 2 steps, got {steps}")
    if spacing == "quadratic":
        return sorted({round((i / (steps - 1)) ** 2 * (T - 1)) for i in range(steps)})
    if spacing != "linear":
        raise ValueError(f"unknown spacing {spacing!r} (choose from {', '.join(SPACINGS)})")
    stride = (T - 1) / (steps - 1)
    return [round(i * stride) for i in range(steps)]


def _ddpm_tables(T: int, steps: int, spacing: str = "linear") -> dict[str, list[float]]:
    """Respaced betas and posterior coefficients (recomputed from alphas_cumprod, float64)."""
    use = respaced_timesteps(T, steps, spacing)
    abar = DDPMSchedule(T).alphas_cumprod[use]
    abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    betas = 1 - abar / abar_prev
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))  # clipped: step 0 has variance 0
    return {"t": [float(t) for t in use], "abar": abar.tolist(), "log_beta": betas.log().tolist(),
            "post_logvar": post_logvar.tolist(),
            "coef_x0": (betas * abar_prev.sqrt() / (1 - abar)).tolist(),
            "coef_xt": ((1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)).tolist()}


def _ddpm(predict: Predictor, x: Tensor, gens, steps: int, T: int, learn_sigma: bool,
          traj: list[Tensor] | None, spacing: str = "linear") -> Tensor:
    """Ancestral DDPM: x_{t-1} ~ N(posterior mean from the eps prediction, fixed-small or learned variance)."""
    tab = _ddpm_tables(T, steps, spacing)
    for i in reversed(range(len(tab["t"]))):
        out = predict(x, torch.full((x.shape[0],), tab["t"][i], device=x.device))
        eps, var = split_sigma(out, learn_sigma)
        abar = tab["abar"][i]
        x0 = x / math.sqrt(abar) - math.sqrt(1 / abar - 1) * eps
        mean = tab["coef_x0"][i] * x0 + tab["coef_xt"][i] * x
        if i == 0:
            x = mean
        else:
            if var is None:
                logvar = torch.full_like(mean, tab["post_logvar"][i])
            else:  # improved DDPM: interpolate between the clipped posterior and beta in log space
                frac = (var + 1) / 2
                logvar = frac * tab["log_beta"][i] + (1 - frac) * tab["post_logvar"][i]
            x = mean + torch.exp(0.5 * logvar) * _noise(gens, tuple(x.shape[1:]), x.device)
        if traj is not None:
            traj.append(x.cpu())
    return x


def _ddim(predict: Predictor, x: Tensor, steps: int, T: int, learn_sigma: bool,
          traj: list[Tensor] | None, spacing: str = "linear") -> Tensor:
    """Deterministic DDIM (eta = 0) on the respaced steps: x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps.

    A learned variance (the second half of 2C channels) is ignored; the last step (abar_prev = 1) returns x0.
    """
    use = respaced_timesteps(T, steps, spacing)
    abar = DDPMSchedule(T).alphas_cumprod[use].tolist()
    for i in reversed(range(len(use))):
        eps = split_sigma(predict(x, torch.full((x.shape[0],), float(use[i]), device=x.device)), learn_sigma)[0]
        a, a_prev = abar[i], (abar[i - 1] if i > 0 else 1.0)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
        if traj is not None:
            traj.append(x.cpu())
    return x


# ----------------------------------------------------------------------------- flow (t from 1 to 0)


def _flow(step: Callable, predict: Predictor, x: Tensor, gens, steps: int, learn_sigma: bool,
          traj: list[Tensor] | None) -> Tensor:
    """Integrate from t = 1 (noise) to t = 0 (data) on a uniform grid."""
    ts = [1.0 - i / steps for i in range(steps + 1)]

    def velocity(x_: Tensor, t: float) -> Tensor:
        out = predict(x_, net_time("flow", torch.full((x_.shape[0],), t, device=x_.device)))
        return split_sigma(out, learn_sigma)[0]

    for i in range(steps):
        x = step(velocity, x, ts[i], ts[i + 1], gens, last=i == steps - 1)
        if traj is not None:
            traj.append(x.cpu())
    return x


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
