"""Conditional and unconditional predictions in one forward: shared by the MG teacher and the samplers.

Conventions:
- The unconditional prediction uses the empty label (index `num_classes`) when the model has one.
  With the empty class removed it is estimated from labels (`uncond_estimate`): `uniform` is the
  mean of the predictions for N labels, the sample's own label included (law of total probability,
  paper Eq. 23): all classes, or N distinct labels drawn per sample; `other_label` is the prediction
  for ONE random label other than the sample's own (the authors' code; used by the MG teacher only).
- w-input models get w = 0 for the unconditional branch and `w_cond` for the conditional one.
- With `learn_sigma` the outputs carry 2C channels; guidance acts on the eps part only
  (`formulation.split_output(out, True)[0]`), the variance part is taken from the conditional branch.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from mgbench.trainer.formulation import split_output

Model = Callable[..., Tensor]  # model(x, t_net, y, w=None) -> prediction shaped like x (2C channels with learn_sigma)


def num_uncond_labels(num_classes: int, uncond_labels: int = 0) -> int:
    """N, the labels averaged for the unconditional prediction without an empty class (0 = all)."""
    return num_classes if uncond_labels <= 0 or uncond_labels >= num_classes else uncond_labels


def draw_uncond_labels(batch: int, num_classes: int, n: int, generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu", exclude: Tensor | None = None) -> Tensor:
    """(B, N) labels: all classes in order when N == num_classes, else N distinct random ones per sample.

    With `exclude` (B,) the labels are N distinct random ones other than exclude[i] (N <= num_classes - 1).
    The scores come from the generator's device and are ranked on `device` (no copy back to the host).
    """
    if exclude is None and n >= num_classes:
        return torch.arange(num_classes, device=device).expand(batch, num_classes)
    gen_device = generator.device if generator is not None else "cpu"
    scores = to_device(torch.rand(batch, num_classes, generator=generator, device=gen_device), device)
    if exclude is not None:  # the excluded label sorts last, so it is never among the first N <= C - 1
        n = min(n, num_classes - 1)
        scores.scatter_(1, exclude.to(scores.device).long().unsqueeze(1), 2.0)
    return scores.argsort(dim=1)[:, :n]


def to_device(x: Tensor, device: torch.device | str) -> Tensor:
    """x on `device`; a host tensor goes to a GPU through pinned memory without blocking (no host sync)."""
    device = torch.device(device)
    if x.device == device or (device.type == "cuda" and x.device.type == "cuda" and device.index is None):
        return x
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def uncond_label_sets_for(y: Tensor, num_classes: int, uncond_estimate: str = "uniform", uncond_labels: int = 0,
                          generator: torch.Generator | None = None) -> Tensor:
    """(B, N) labels whose predictions estimate the unconditional one without an empty class."""
    if uncond_estimate == "uniform":
        n = num_uncond_labels(num_classes, uncond_labels)
        return draw_uncond_labels(len(y), num_classes, n, generator, y.device)
    if uncond_estimate == "other_label":
        if num_classes < 2:
            raise ValueError("uncond_estimate 'other_label' needs at least 2 classes")
        return draw_uncond_labels(len(y), num_classes, 1, generator, y.device, exclude=y)
    raise ValueError(f"unknown uncond_estimate {uncond_estimate!r} (uniform | other_label)")


def cond_and_uncond(model: Model, x: Tensor, t_net: Tensor, y: Tensor, *, num_classes: int,
                    empty_class: bool = True, uncond_labels: int = 0, w_cond: Tensor | None = None,
                    generator: torch.Generator | None = None,
                    uncond_label_sets: Tensor | None = None, uncond_estimate: str = "uniform",
                    chunk: int = 0) -> tuple[Tensor, Tensor]:
    """Conditional and unconditional predictions from one batched forward (`chunk` > 0: at most that many
    label predictions per forward beside the conditional one, summed; memory (1 + chunk) x B instead of (1 + N) x B)."""
    if empty_class:
        extra = torch.full_like(y, num_classes).unsqueeze(0)                       # (1, B)
    else:
        if uncond_label_sets is None:  # (B, N), per-sample label sets may be given by the caller
            uncond_label_sets = uncond_label_sets_for(y, num_classes, uncond_estimate, uncond_labels, generator)
        extra = uncond_label_sets.to(y.device).T                                   # (N, B)
    n = extra.shape[0]
    size = n if chunk <= 0 else min(chunk, n)
    out = _label_forward(model, x, t_net, torch.cat([y.unsqueeze(0), extra[:size]]), w_cond)
    cond, rest = out[0], out[1:]
    if size == n:  # one forward: the mean over the N predictions
        return cond, rest[0] if n == 1 else rest.mean(dim=0)
    total = rest.sum(dim=0)
    for i in range(size, n, size):  # the other chunks, without the conditional branch
        total = total + _label_forward(model, x, t_net, extra[i:i + size], w_cond, cond_first=False).sum(dim=0)
    return cond, total / n


def _label_forward(model: Model, x: Tensor, t_net: Tensor, labels: Tensor, w_cond: Tensor | None,
                   cond_first: bool = True) -> Tensor:
    """(K, B, ...) predictions for K label rows (K, B) in one forward; w-input: w_cond on a leading cond row, else 0."""
    k, b = labels.shape
    w = None
    if w_cond is not None:
        zeros = torch.zeros((k - cond_first) * b, dtype=w_cond.dtype, device=w_cond.device)
        w = torch.cat([w_cond, zeros]) if cond_first else zeros
    out = model(x.repeat(k, *([1] * (x.dim() - 1))), t_net.repeat(k), labels.reshape(-1), w=w)
    return out.reshape(k, b, *out.shape[1:])


def cfg_combine(cond: Tensor, uncond: Tensor, scale: float, learn_sigma: bool = False) -> Tensor:
    """guided = cond + s * (cond - uncond) on the eps/velocity part; the variance part is the conditional one."""
    c_mean, c_var = split_output(cond, learn_sigma)
    u_mean, _ = split_output(uncond, learn_sigma)
    guided = c_mean + scale * (c_mean - u_mean)
    return guided if c_var is None else torch.cat([guided, c_var], dim=1)
