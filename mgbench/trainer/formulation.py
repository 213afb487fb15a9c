"""The two formulations behind one interface: DDPM (DiT, eps-prediction) and the linear flow (SiT, velocity).

A formulation owns what differs between them: how t is drawn, how x0 is noised, the regression target,
the network's time input, where a t sits in flow time (the guided interval `t < t_high`), its samplers
and its default one; DDPM also owns its tables (alpha-bar, the posterior q(x_{t-1} | x_t, x0)) and the
variational bound of a learned variance. The objective and the samplers call it and never branch.

Conventions used everywhere in mgbench:
- flow: x_t = (1 - t) x0 + t eps, t in [0, 1], t = 1 is pure noise; the network predicts the
  velocity v = eps - x0 and takes 1000 t as its time input.
- diffusion: DDPM with T steps and linear betas 1e-4 .. 0.02 (scaled to T as in ADM);
  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with integer t in [0, T); the network predicts eps
  and takes t (as a float) as its time input.
- "Flow time" of a DDPM step (how `t_high` is applied to both): by default (`t_map: snr`) the flow
  time with the same signal-to-noise ratio, ((1 - t) / t)^2 = abar / (1 - abar), i.e.
  t = sqrt(1 - abar) / (sqrt(abar) + sqrt(1 - abar)); with `t_map: linear` it is step / T. With
  linear betas and T = 1000, flow t = 0.75 is step ~475 by SNR (not 750), and step 750 is flow t ~0.946.
- A learned variance (DiT's learn_sigma) doubles the output channels: `split_output` gives the
  eps / velocity half and the variance half (improved DDPM's interpolation fraction in [-1, 1]).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from mgbench.config import ObjectiveConfig

SPACINGS = ("linear", "quadratic")  # how a DDPM sampler respaces its steps


class Formulation(Protocol):
    """What the objective and the samplers ask of a formulation."""

    name: str                      # the config's `objective.formulation`
    samplers: tuple[str, ...]      # the samplers that fit it
    default_sampler: str           # what sampler `auto` means

    def sample_time(self, n: int, generator: torch.Generator | None = None, device="cpu") -> Tensor: ...
    def noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor: ...
    def target(self, x0: Tensor, eps: Tensor) -> Tensor: ...
    def net_time(self, t: Tensor) -> Tensor: ...
    def flow_time(self, t: Tensor) -> Tensor: ...
    def variational_bound(self, x_t: Tensor, t: Tensor, eps_target: Tensor, eps_pred: Tensor,
                          var_out: Tensor) -> Tensor: ...


def split_output(out: Tensor, learn_sigma: bool) -> tuple[Tensor, Tensor | None]:
    """(eps / velocity part, variance part or None): the channel halves (dim 1) of a learn_sigma output."""
    if not learn_sigma:
        return out, None
    mean, var = out.chunk(2, dim=1)
    return mean, var


def per_sample(v: Tensor, like: Tensor) -> Tensor:
    """A per-sample vector (B,) shaped to broadcast against `like` (B, ...), on its device."""
    return v.to(like.device).reshape(-1, *([1] * (like.dim() - 1)))


# ----------------------------------------------------------------------------- flow


class Flow:
    """The linear interpolant of SiT: x_t = (1 - t) x0 + t eps, t ~ U[0, 1), velocity target eps - x0."""

    name = "flow"
    samplers = ("euler", "heun", "euler_maruyama")
    default_sampler = "euler"

    def sample_time(self, n: int, generator: torch.Generator | None = None, device="cpu") -> Tensor:
        return torch.rand(n, generator=generator, device=device)

    def noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        tt = per_sample(t, x0)
        return (1 - tt) * x0 + tt * eps

    def target(self, x0: Tensor, eps: Tensor) -> Tensor:
        return eps - x0

    def net_time(self, t: Tensor) -> Tensor:
        """1000 t: the flow time on the scale of DDPM steps (the DiT/SiT time embedding's range)."""
        return 1000.0 * t.float()

    def flow_time(self, t: Tensor) -> Tensor:
        return t

    def variational_bound(self, *args) -> Tensor:
        raise ValueError("a learned variance (model.learn_sigma) needs formulation 'diffusion'")


# ----------------------------------------------------------------------------- DDPM


@dataclass(frozen=True)
class DDPMChain:
    """A chain of DDPM steps (all T, or a respaced subset) and its posterior q(x_prev | x_t, x0), float64."""

    steps: list[int]    # the steps, increasing; x_prev of steps[i] is at steps[i - 1] (data after steps[0])
    abar: Tensor        # alpha-bar at each step
    betas: Tensor       # the chain's betas: 1 - abar / abar_prev (the schedule's own betas for the full chain)
    log_var: Tensor     # posterior log variance, clipped at the first step (whose variance is 0) to the second's
    coef_x0: Tensor     # posterior mean = coef_x0 * x0 + coef_xt * x_t
    coef_xt: Tensor

    @classmethod
    def of(cls, steps: list[int], betas: Tensor, abar: Tensor) -> "DDPMChain":
        """The posterior tables of a chain with these betas and alpha-bars (the one place they are computed)."""
        abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
        var = betas * (1 - abar_prev) / (1 - abar)
        log_var = torch.log(torch.cat([var[1:2], var[1:]]))
        coef_x0 = betas * abar_prev.sqrt() / (1 - abar)
        coef_xt = (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)
        return cls(list(steps), abar, betas, log_var, coef_x0, coef_xt)


class DDPM:
    """Linear-beta DDPM with T steps, eps-prediction; t is an integer step (float64 tables, cast on use)."""

    name = "diffusion"
    samplers = ("ddpm", "ddim")
    default_sampler = "ddpm"

    def __init__(self, steps: int = 1000, t_map: str = "snr") -> None:
        scale = 1000.0 / steps
        self.T = steps
        self.betas = torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)
        self.abar = torch.cumprod(1.0 - self.betas, dim=0)
        self.posterior = DDPMChain.of(list(range(steps)), self.betas, self.abar)  # the training chain
        self.flow_times = ddpm_flow_times(self.abar, t_map)  # increasing in the step

    def sample_time(self, n: int, generator: torch.Generator | None = None, device="cpu") -> Tensor:
        return torch.randint(0, self.T, (n,), generator=generator, device=device)

    def noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        a = _at(self.abar, t, x0)
        return (a.sqrt() * x0 + (1 - a).sqrt() * eps).to(x0.dtype)

    def target(self, x0: Tensor, eps: Tensor) -> Tensor:
        return eps

    def net_time(self, t: Tensor) -> Tensor:
        """The step index itself, as a float."""
        return t.float()

    def flow_time(self, t: Tensor) -> Tensor:
        """Where DDPM steps t sit on [0, 1] (t = 1 is noise), float64; used to apply `t_high`."""
        return self.flow_times.to(t.device)[t.long()]

    def step_at(self, flow_t: float | Tensor) -> Tensor:
        """The first step whose flow time is >= flow_t (T if none): flow_time(s) < u  <=>  s < step_at(u)."""
        u = torch.as_tensor(flow_t, dtype=torch.float64)
        return torch.searchsorted(self.flow_times.to(u.device), u, right=False)

    def chain(self, steps: int, spacing: str = "linear") -> DDPMChain:
        """The sampler's chain: `steps` respaced steps, betas recomputed from alpha-bar (as improved DDPM does)."""
        use = respaced_timesteps(self.T, steps, spacing)
        abar = self.abar[use]
        abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
        return DDPMChain.of(use, 1 - abar / abar_prev, abar)

    def variational_bound(self, x_t: Tensor, t: Tensor, eps_target: Tensor, eps_pred: Tensor,
                          var_out: Tensor) -> Tensor:
        """The variational-bound term of learned-variance DDPM (mean frozen, as in improved DDPM), in bits/dim.

        The "true" posterior mean is taken at the x0 implied by the (guided) eps target, so only the
        part of the mean error the target does not ask for reaches the variance.
        """
        p = self.posterior
        xtd = x_t.double()
        ab = _at(self.abar, t, x_t)
        min_log, max_log = _at(p.log_var, t, x_t), _at(torch.log(p.betas), t, x_t)
        frac = (var_out.double() + 1) / 2
        model_log = frac * max_log + (1 - frac) * min_log
        x0_target = (xtd - (1 - ab).sqrt() * eps_target.double()) / ab.sqrt()
        x0_pred = (xtd - (1 - ab).sqrt() * eps_pred.double()) / ab.sqrt()
        c0, ct = _at(p.coef_x0, t, x_t), _at(p.coef_xt, t, x_t)
        mean_true, mean_pred = c0 * x0_target + ct * xtd, c0 * x0_pred + ct * xtd
        kl = 0.5 * (-1 + model_log - min_log + torch.exp(min_log - model_log)
                    + (mean_true - mean_pred) ** 2 * torch.exp(-model_log))
        # At t = 0 the bound is the decoder NLL; a Gaussian NLL of x0 stands in for the discretised one.
        nll = 0.5 * (math.log(2 * math.pi) + model_log + (x0_target - mean_pred) ** 2 * torch.exp(-model_log))
        bits = torch.where(per_sample(t == 0, x_t), nll, kl).flatten(1).mean(1) / math.log(2.0)
        return bits.float()


def ddpm_flow_times(abar: Tensor, t_map: str = "snr") -> Tensor:
    """Flow time of each DDPM step: equal SNR (snr) or step / T (linear)."""
    if t_map == "snr":
        signal, noise = abar.sqrt(), (1 - abar).sqrt()
        return noise / (signal + noise)
    if t_map == "linear":
        return torch.arange(len(abar), dtype=torch.float64) / len(abar)
    raise ValueError(f"unknown t_map {t_map!r} (snr | linear)")


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


def _at(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """table[t] shaped to broadcast against `like` (float64)."""
    return per_sample(table.to(t.device)[t.long()], like)


# ----------------------------------------------------------------------------- by name


FORMULATIONS = {"diffusion": DDPM, "flow": Flow}  # the config's name -> class (samplers, default sampler)


def formulation_named(name: str, diffusion_steps: int = 1000, t_map: str = "snr") -> DDPM | Flow:
    """The formulation `name` (diffusion | flow); the DDPM one with T = diffusion_steps and that t_map."""
    if name not in FORMULATIONS:
        raise ValueError(f"unknown formulation {name!r} (flow | diffusion)")
    return DDPM(diffusion_steps, t_map) if name == "diffusion" else Flow()


def formulation_for(cfg: ObjectiveConfig) -> DDPM | Flow:
    """The formulation an objective config trains."""
    return formulation_named(cfg.formulation, cfg.diffusion_steps, cfg.t_map)
