"""Sampling speed: images/s of MG (one forward per step) against batched CFG (cond + uncond in one forward).

Same model, steps, batch and sampler for both; the ratio's bound is the NFE ratio 2.0 (Table 1 of the
paper shows 1.95). Below the bound when fixed per-step costs (sampler arithmetic, per-sample noise)
weigh; above it on CPUs where the doubled batch falls out of cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mgbench.bench.timing import Check, Section, autocast, judged, measure, median, spread
from mgbench.trainer.models import build_model
from mgbench.trainer.sampling import sample

NUM_CLASSES = 10        # digits-like label set
CFG_SCALE = 1.5         # any s > 0: the cost does not depend on it
RATIO_BOUND = 2.0       # NFE(CFG) / NFE(MG)
RATIO_TOL = 0.10        # goal: MG/CFG >= (1 - tol) * bound (above the bound is fine: cache effects)
PAPER_RATIO = 1.95      # Table 1 of the paper


@dataclass
class SamplingCase:
    """One sampling comparison."""

    arch: str                       # registry name, e.g. DiT-T/2
    shape: tuple[int, int, int]     # model-space input (C, H, W)
    batch: int                      # images per sampling call
    steps: int                      # sampler steps (DDPM respaced)
    formulation: str = "diffusion"  # diffusion (DDPM sampler) | flow (Euler)


CPU_CASES = [SamplingCase("DiT-T/2", (1, 8, 8), 64, 10), SamplingCase("DiT-S/2", (4, 16, 16), 4, 3)]
QUICK_CASES = [SamplingCase("DiT-T/2", (1, 8, 8), 32, 4)]


def _sampler(model, case: SamplingCase, guidance: str, device: torch.device, bf16: bool):
    """A no-argument closure drawing one batch with the given guidance; returns the NFE per sample."""
    labels = torch.arange(case.batch, device=device) % NUM_CLASSES
    seeds = list(range(case.batch))

    def run() -> int:
        with autocast(device, bf16):
            res = sample(model, formulation=case.formulation, shape=case.shape, labels=labels, seeds=seeds,
                         steps=case.steps, guidance=guidance, cfg_scale=CFG_SCALE, num_classes=NUM_CLASSES,
                         device=device)
        return res.nfe

    return run


def bench_case(case: SamplingCase, *, repeats: int, device: torch.device, bf16: bool = False,
               compile: bool = False) -> tuple[dict, Check]:
    """Time MG and CFG sampling of one case, interleaved; a table row and the ratio's check."""
    torch.manual_seed(0)
    model = build_model(case.arch, input_shape=case.shape, num_classes=NUM_CLASSES).to(device).eval()
    net = torch.compile(model) if compile else model
    fns = {g: _sampler(net, case, g, device, bf16) for g in ("mg", "cfg")}
    nfe = {g: fn() for g, fn in fns.items()}  # also the warm-up
    timed = measure(fns, repeats=repeats, warmup=0, device=device)
    ips = {g: case.batch / median(t.basis(device)) for g, t in timed.items()}
    ratio = ips["mg"] / ips["cfg"]
    spreads = [spread(t.basis(device)) for t in timed.values()]
    row = {"model": case.arch, "input": "x".join(map(str, case.shape)), "batch": case.batch, "steps": case.steps,
           "NFE MG": nfe["mg"], "NFE CFG": nfe["cfg"], "MG img/s": round(ips["mg"], 2),
           "CFG img/s": round(ips["cfg"], 2), "MG/CFG": round(ratio, 3),
           "MG wall ms": timed["mg"].columns(device)["wall ms"], "MG cpu ms": timed["mg"].columns(device)["cpu ms"],
           "CFG wall ms": timed["cfg"].columns(device)["wall ms"], "CFG cpu ms": timed["cfg"].columns(device)["cpu ms"],
           "spread": f"{max(spreads):.0%}", "load": timed["mg"].load}
    check = judged(f"sampling MG/CFG img/s, {case.arch} {row['input']} batch {case.batch}", ratio,
                   f">= {(1 - RATIO_TOL) * RATIO_BOUND:.2f} (NFE bound {RATIO_BOUND}; paper {PAPER_RATIO})",
                   ratio >= (1 - RATIO_TOL) * RATIO_BOUND, spreads, RATIO_BOUND)
    return row, check


def bench_sampling(cases: list[SamplingCase] | None = None, *, quick: bool = False, repeats: int | None = None,
                   device: torch.device | str = "cpu", bf16: bool = False, compile: bool = False) -> Section:
    """The sampling section: MG vs CFG images/s per case."""
    device = torch.device(device)
    cases = cases or (QUICK_CASES if quick else CPU_CASES)
    repeats = repeats or 3
    sec = Section("sampling", "Sampling: MG vs CFG images/s")
    for case in cases:
        row, check = bench_case(case, repeats=repeats, device=device, bf16=bf16, compile=compile)
        sec.rows.append(row)
        sec.checks.append(check)
    sec.notes += [
        f"`trainer.sampling.sample`, {cases[0].formulation} sampler, {NUM_CLASSES} classes, untrained weights "
        f"(speed does not depend on them); CFG is one batched forward on [cond; uncond] (s = {CFG_SCALE}).",
        f"Median of {repeats} interleaved repeats after one warm-up, img/s from "
        f"{'wall' if device.type == 'cuda' else 'CPU'} time; `spread` = (max - min) / median of the noisier "
        "variant; `load`: 1-minute load average.",
        "NFE counts network evaluations per sample over the trajectory (a batched CFG forward counts 2).",
    ]
    return sec
