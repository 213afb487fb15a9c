"""The two formulations: DDPM (DiT, eps-prediction) and the linear flow path (SiT, velocity).

Conventions used everywhere in mgbench:
- flow: x_t = (1 - t) x0 + t eps, t in [0, 1], t = 1 is pure noise; the network predicts the
  velocity v = eps - x0 and takes t itself as its time input.
- diffusion: DDPM with T steps and linear betas 1e-4 .. 0.02 (scaled to T as in ADM);
  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with integer t in [0, T); the network predicts eps
  and takes t (as a float) as its time input.
- "Flow time" of a DDPM step (how `t_high` is applied to both): by default (`t_map: snr`) the flow
  time with the same signal-to-noise ratio, ((1 - t) / t)^2 = abar / (1 - abar), i.e.
  t = sqrt(1 - abar) / (sqrt(abar) + sqrt(1 - abar)); with `t_map: linear` it is step / T. With
  linear betas and T = 1000, flow t = 0.75 is step ~475 by SNR (not 750), and step 750 is flow t ~0.946.
"""
from __future__ import annotations

import torch


class DDPMSchedule:
    """Linear-beta DDPM schedule (float64 tables, cast on use)."""

    def __init__(self, steps: int = 1000, t_map: str = "snr") -> None:
        scale = 1000.0 / steps
        self.T = steps
        self.betas = torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        # Posterior q(x_{t-1} | x_t, x0): variance, its log clipped at t = 0, and the mean coefficients.
        self.posterior_var = self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        self.posterior_log_var = torch.log(torch.cat([self.posterior_var[1:2], self.posterior_var[1:]]))
        self.posterior_coef_x0 = self.betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_coef_xt = (1 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1 - self.alphas_cumprod)
        self.flow_times = ddpm_flow_times(self.alphas_cumprod, t_map)  # increasing in the step

    def at(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] shaped to broadcast against `like` (float64)."""
        return _bcast(table.to(t.device)[t.long()], like)

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        """alpha-bar at integer steps t (any shape), float64."""
        return self.alphas_cumprod.to(t.device)[t.long()]

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = _bcast(self.abar(t), x0)
        return (a.sqrt() * x0 + (1 - a).sqrt() * eps).to(x0.dtype)

    def sample_t(self, n: int, generator: torch.Generator | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        return torch.randint(0, self.T, (n,), generator=generator, device=device)

    def flow_time(self, t: torch.Tensor) -> torch.Tensor:
        """Where DDPM steps t sit on [0, 1] (t = 1 is noise), float64; used to apply `t_high`."""
        return self.flow_times.to(t.device)[t.long()]

    def step_at(self, flow_t: float | torch.Tensor) -> torch.Tensor:
        """The first step whose flow time is >= flow_t (T if none): flow_time(s) < u  <=>  s < step_at(u)."""
        u = torch.as_tensor(flow_t, dtype=torch.float64)
        return torch.searchsorted(self.flow_times.to(u.device), u, right=False)


class FlowPath:
    """The linear interpolant of SiT: x_t = (1 - t) x0 + t eps, velocity eps - x0."""

    @staticmethod
    def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = _bcast(t, x0)
        return (1 - tt) * x0 + tt * eps

    @staticmethod
    def target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return eps - x0

    @staticmethod
    def sample_t(n: int, generator: torch.Generator | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        return torch.rand(n, generator=generator, device=device)

    @staticmethod
    def flow_time(t: torch.Tensor) -> torch.Tensor:
        return t


def ddpm_flow_times(alphas_cumprod: torch.Tensor, t_map: str = "snr") -> torch.Tensor:
    """Flow time of each DDPM step: equal SNR (snr) or step / T (linear)."""
    if t_map == "snr":
        signal, noise = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
        return noise / (signal + noise)
    if t_map == "linear":
        return torch.arange(len(alphas_cumprod), dtype=torch.float64) / len(alphas_cumprod)
    raise ValueError(f"unknown t_map {t_map!r} (snr | linear)")


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shape a per-sample vector to broadcast against `like` (B, ...)."""
    return v.to(like.device).reshape(-1, *([1] * (like.dim() - 1)))
