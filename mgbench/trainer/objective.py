"""The training objective: label dropout, the MG target, and the loss for both formulations.

MG (Model-guidance) replaces the plain target of a labelled sample by

    target' = target + g * sg(pred_teacher(x_t, t, c) - pred_teacher(x_t, t, empty)),   g = w - 1

(w counted as in the paper, w = 1 is vanilla). The teacher is the EMA model (or the online model),
queried without gradient in ONE batched forward on [cond; uncond] (without an empty class: [cond; N
labels], in chunks of `uncond_chunk` labels), on the guided samples only. Dropped samples (ratio lambda)
keep the plain target. With a share f of the labelled samples on the MG target, the fixed point of
training is CFG with scale s = f*g / (1 - f*g) (`implied_cfg_scale`).

A w-input model is fed, per sample, the w its target belongs to: its sampled w on the MG share,
w = 1 on the labelled samples off it (plain target), w = 0 on dropped ones. Its teacher terms come
from those plain w = 1 / w = 0 branches, so fed w it learns CFG with s = w - 1 whatever f is.

With a learned variance (DiT) the variational bound's "true" posterior mean is the one implied by
the (guided) target, so the variance is not trained to absorb the guidance offset
(`formulation.DDPM.variational_bound`). What differs between DDPM and flow lives in formulation.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mgbench.config import ObjectiveConfig
from mgbench.trainer.formulation import formulation_for, per_sample, split_output
from mgbench.trainer.guidance import cond_and_uncond, to_device


def drop_labels(y: torch.Tensor, drop: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Replace the labels where `drop` is true by the empty class (index num_classes)."""
    return torch.where(drop, torch.full_like(y, num_classes), y)


def mg_target(target: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """target + g * sg(cond - uncond), with g per sample (0 leaves the target unchanged)."""
    return target + per_sample(g, target).to(target.dtype) * (cond - uncond).detach()


def implied_cfg_scale(g: float, fraction: float = 1.0, w_input: bool = False) -> float:
    """The CFG scale s (pred = cond + s (cond - uncond)) an MG model trains towards; inf without a fixed point.

    A w-input model fed w = 1 + g is trained on target + g (cond - uncond) with cond / uncond from its
    plain w = 1 / w = 0 branches (the rest of the batch trains those), so there is no feedback and
    s = g whatever the fraction f (which only sets how many samples train the guided w).
    """
    if w_input:
        return g
    fg = fraction * g
    return math.inf if fg >= 1 else fg / (1 - fg)


@dataclass
class BatchNoise:
    """All randomness of one global batch, drawn from one generator (so ranks and resumes agree)."""

    t: torch.Tensor        # (B,) DDPM step (long) or flow time (float)
    eps: torch.Tensor      # (B, *shape)
    drop: torch.Tensor     # (B,) bool: label dropped to the empty class
    mg: torch.Tensor       # (B,) bool: eligible for the MG target (before t_high / start_step)
    w: torch.Tensor        # (B,) the paper's w per sample, as drawn (`Objective.fed_w` pins it off the MG share)
    uncond_gen_seed: int   # seeds the labels drawn for the mean over N labels (empty class removed)

    def shard(self, rank: int, world: int) -> "BatchNoise":
        n = len(self.t) // world
        sl = slice(rank * n, (rank + 1) * n)
        return BatchNoise(self.t[sl], self.eps[sl], self.drop[sl], self.mg[sl], self.w[sl],
                          self.uncond_gen_seed * world + rank)


class Objective:
    """Builds noisy inputs and (MG) targets and returns the loss of one batch."""

    def __init__(self, cfg: ObjectiveConfig, num_classes: int, w_input: bool = False, learn_sigma: bool = False):
        self.cfg = cfg
        self.num_classes = num_classes
        self.w_input = w_input
        self.learn_sigma = learn_sigma
        self.formulation = formulation_for(cfg)  # DDPM or Flow: time, noising, target, network time

    # -- randomness

    def draw(self, batch: int, shape: tuple[int, ...], gen: torch.Generator, w_now: float) -> BatchNoise:
        """Draw t, eps, label drop, MG mask and per-sample w for a global batch."""
        c = self.cfg
        t = self.formulation.sample_time(batch, gen)
        eps = torch.randn((batch, *shape), generator=gen)
        drop = torch.rand(batch, generator=gen) < (c.label_drop if c.empty_class else 0.0)  # nothing to drop to
        mg = torch.rand(batch, generator=gen) < c.mg_fraction
        if c.w_range is not None:
            lo, hi = c.w_range
            w = lo + (hi - lo) * torch.rand(batch, generator=gen)
        else:
            w = torch.full((batch,), float(w_now))
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        return BatchNoise(t, eps, drop, mg, w, seed)

    @staticmethod
    def fed_w(nz: BatchNoise) -> torch.Tensor:
        """The w a w-input model is fed: 0 where dropped, 1 off the MG share (plain target), else the drawn w."""
        pinned = torch.where(nz.mg, nz.w, torch.ones_like(nz.w))
        return torch.where(nz.drop, torch.zeros_like(nz.w), pinned)

    # -- loss

    def guided(self, nz: BatchNoise, mg_on: bool) -> torch.Tensor:
        """(B,) bool where the noise lives (the host, in the trainer): the samples whose target gets the MG term."""
        if not mg_on:
            return torch.zeros_like(nz.mg)
        in_interval = self.formulation.flow_time(nz.t) < self.cfg.t_high  # DDPM steps mapped by t_map
        return nz.mg & ~nz.drop & in_interval & (nz.w != 1)

    def loss(self, model, teacher, x0: torch.Tensor, y: torch.Tensor, nz: BatchNoise, mg_on: bool
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean squared error against the (MG) target; `mg_on` is false before start_step.

        No host sync when `nz` is on the host (as the trainer draws it): the guided subset is chosen there.
        """
        c, dev, form = self.cfg, x0.device, self.formulation
        t, eps = to_device(nz.t, dev), to_device(nz.eps, dev).to(x0.dtype)
        x_t, target = form.noise(x0, eps, t), form.target(x0, eps)
        y_in = drop_labels(y, to_device(nz.drop, dev), self.num_classes) if c.empty_class else y
        t_net = form.net_time(t)
        w_in = to_device(self.fed_w(nz), dev).to(x0.dtype) if self.w_input else None

        guided = self.guided(nz, mg_on)
        if guided.any():
            idx = to_device(guided.nonzero().squeeze(1), dev)
            target = target.clone()
            target[idx] = self._guided_target(teacher, x_t[idx], t_net[idx], y[idx], target[idx],
                                              to_device(nz.w[guided], dev), nz.uncond_gen_seed)

        out, var_out = split_output(model(x_t, t_net, y_in, w_in), self.learn_sigma)
        loss = F.mse_loss(out.float(), target.float(), reduction="none").flatten(1).mean(1)
        if var_out is not None:  # learned variance: only DDPM has one (the config rejects it for flow)
            loss = loss + form.variational_bound(x_t, t, target, out.detach(), var_out)
        return loss.mean(), {"mg_share": guided.float().mean().item()}

    @torch.no_grad()
    def _guided_target(self, teacher, x_t, t_net, y, target, w, seed: int) -> torch.Tensor:
        """target + (w - 1) * sg(cond - uncond) from one batched teacher forward (chunked without an empty class)."""
        c = self.cfg
        gen = torch.Generator().manual_seed(seed)
        w_cond = torch.ones_like(w).to(x_t.dtype) if self.w_input else None
        cond, uncond = cond_and_uncond(teacher, x_t, t_net, y, num_classes=self.num_classes,
                                       empty_class=c.empty_class, uncond_labels=c.uncond_labels,
                                       w_cond=w_cond, generator=gen, uncond_estimate=c.uncond_estimate,
                                       chunk=c.uncond_chunk)
        cond, uncond = split_output(cond, self.learn_sigma)[0], split_output(uncond, self.learn_sigma)[0]
        return mg_target(target, cond.to(target.dtype), uncond.to(target.dtype), w - 1)
