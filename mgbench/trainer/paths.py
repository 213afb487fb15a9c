"""The two formulations: DDPM (DiT, eps-prediction) and the linear flow path (SiT, velocity).

Conventions used everywhere in mgbench:
- flow: x_t = (1 - t) x0 + t eps, t in [0, 1], t = 1 is pure noise; the network predicts the
  velocity v = eps - x0 and takes t itself as its time input.
- diffusion: DDPM with T steps and linear betas 1e-4 .. 0.02 (scaled to T as in ADM);
  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with integer t in [0, T); the network predicts eps
  and takes t (as a float) as its time input. "Flow time" of a DDPM step is t / T, which is how
  `t_high` is applied to both.
"""
from __future__ import annotations

import torch


class DDPMSchedule:
    """Linear-beta DDPM schedule (float64 tables, cast on use)."""

    def __init__(self, steps: int = 1000) -> None:
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
        """Where a DDPM step sits on [0, 1] (t = 1 is noise), used to apply `t_high`."""
        return t.float() / self.T


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


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shape a per-sample vector to broadcast against `like` (B, ...)."""
    return v.to(like.device).reshape(-1, *([1] * (like.dim() - 1)))
