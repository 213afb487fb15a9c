"""Training speed: an MG step against a vanilla step at the same batch, next to the FLOP bound.

A vanilla step is forward + backward, ~3F per sample. MG adds one no-grad teacher forward on
[cond; uncond], ~2F: bound 5/3. With the empty class removed the teacher runs on [cond; N labels],
(1 + N)F: bound (3 + 1 + N)/3. A w-input model's teacher is the same [cond; uncond] forward: 5/3.
Both steps include what the loop does besides (noise draw, AdamW, EMA update), which pulls the
measured ratio below the bound at small sizes.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch

from mgbench.bench.timing import Check, Section, autocast, interleaved, median, spread
from mgbench.config import ObjectiveConfig
from mgbench.trainer.loop import update_ema
from mgbench.trainer.models import build_model
from mgbench.trainer.objective import Objective

NUM_CLASSES = 10        # digits-like label set
BOUND_TOL = 0.05        # goal: MG/vanilla at most 5% above the FLOP bound (no cost beyond the teacher FLOPs)


@dataclass
class TrainingCase:
    """One model/input/batch at which the variants are compared."""

    arch: str                       # registry name
    shape: tuple[int, int, int]     # model-space input (C, H, W)
    batch: int                      # global batch
    steps_per_repeat: int = 2       # optimisation steps timed together (median over repeats of their mean)
    variants: tuple[str, ...] | None = None  # names of the variants to run here (None = all given)


@dataclass
class Variant:
    """One kind of training step."""

    name: str                       # table label
    mg: bool                        # MG target on (on every sample: label dropout off, t_high = 1)
    empty_class: bool = True        # False: unconditional = mean over `uncond_labels` labels
    uncond_labels: int = 0          # N (0 = all classes)
    w_input: bool = False           # w is a network input

    @property
    def bound(self) -> float:
        """The FLOP ratio to a vanilla step: (3 + teacher forwards) / 3."""
        if not self.mg:
            return 1.0
        n = 1 if self.empty_class else (self.uncond_labels or NUM_CLASSES)
        return (3 + 1 + n) / 3


VARIANTS = [Variant("vanilla", False), Variant("MG", True), Variant("MG, w-input", True, w_input=True),
            Variant("MG, no empty class, N=4", True, empty_class=False, uncond_labels=4),
            Variant("MG, no empty class, N=10", True, empty_class=False, uncond_labels=10)]
CPU_CASES = [TrainingCase("DiT-T/2", (1, 8, 8), 64, 2), TrainingCase("DiT-S/2", (4, 8, 8), 16, 1)]
QUICK_CASES = [TrainingCase("DiT-T/2", (1, 8, 8), 32, 1)]


def make_step(case: TrainingCase, v: Variant, device: torch.device, *, bf16: bool = False,
              compile: bool = False, seed: int = 0) -> Callable[[], float]:
    """A closure doing `steps_per_repeat` training steps of variant v (loss, backward, AdamW, EMA)."""
    torch.manual_seed(seed)
    model = build_model(case.arch, input_shape=case.shape, num_classes=NUM_CLASSES, empty_class=v.empty_class,
                        w_input=v.w_input).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    oc = ObjectiveConfig(formulation="flow", label_drop=0.1 if v.empty_class else 0.0, w=1.5 if v.mg else 1.0,
                         t_high=1.0, empty_class=v.empty_class, uncond_labels=v.uncond_labels)
    objective = Objective(oc, NUM_CLASSES, w_input=v.w_input)
    net = torch.compile(model) if compile else model
    teacher = torch.compile(ema) if compile else ema
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(case.batch, *case.shape, device=device)
    y = torch.arange(case.batch, device=device) % NUM_CLASSES
    count = [0]

    def run() -> float:
        for _ in range(case.steps_per_repeat):
            nz = objective.draw(case.batch, case.shape, gen, oc.w)
            nz.drop.zero_()  # MG on every sample: the setting of the FLOP bound
            with autocast(device, bf16):
                loss, _ = objective.loss(net, teacher, x0, y, nz, mg_on=v.mg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            update_ema(ema, model, 0.9999, count[0], warmup=False)
            count[0] += 1
        return float(loss.detach())

    return run


def bench_case(case: TrainingCase, variants: list[Variant], *, repeats: int, device: torch.device,
               bf16: bool = False, compile: bool = False) -> tuple[list[dict], list[Check]]:
    """Time every variant's step at one case, interleaved; rows and checks against each bound."""
    fns = {v.name: make_step(case, v, device, bf16=bf16, compile=compile) for v in variants}
    times = interleaved(fns, repeats=repeats, warmup=1, device=device)
    step_s = {n: median(t) / case.steps_per_repeat for n, t in times.items()}
    base = step_s[variants[0].name]
    rows, checks = [], []
    where = f"{case.arch} {'x'.join(map(str, case.shape))} batch {case.batch}"
    for v in variants:
        ratio = step_s[v.name] / base
        rows.append({"model": case.arch, "input": "x".join(map(str, case.shape)), "batch": case.batch,
                     "variant": v.name, "step ms": round(1000 * step_s[v.name], 1), "ratio": round(ratio, 3),
                     "FLOP bound": round(v.bound, 3), "ratio/bound": round(ratio / v.bound, 3),
                     "spread": f"{spread(times[v.name]):.0%}"})
        if v.mg:
            checks.append(Check(f"training {v.name}/vanilla step time, {where}", ratio,
                                f"<= {1 + BOUND_TOL:.2f} x FLOP bound {v.bound:.3f}",
                                ratio <= v.bound * (1 + BOUND_TOL)))
    return rows, checks


def bench_training(cases: list[TrainingCase] | None = None, variants: list[Variant] | None = None, *,
                   quick: bool = False, repeats: int | None = None, device: torch.device | str = "cpu",
                   bf16: bool = False, compile: bool = False) -> Section:
    """The training section: step-time ratios of the MG variants to vanilla, per case."""
    device = torch.device(device)
    cases = cases or (QUICK_CASES if quick else CPU_CASES)
    variants = variants or (VARIANTS[:3] if quick else VARIANTS)
    repeats = repeats or (3 if quick else 4)
    sec = Section("training", "Training: MG step time vs vanilla, against the FLOP bound")
    for case in cases:
        chosen = [v for v in variants if case.variants is None or v.name in case.variants]
        rows, checks = bench_case(case, chosen, repeats=repeats, device=device, bf16=bf16, compile=compile)
        sec.rows += rows
        sec.checks += checks
    sec.notes += [
        "One step = noise draw + `Objective.loss` + backward + AdamW + EMA update (what `loop.train` does per "
        "step, without data loading and logging); flow formulation, teacher = EMA model.",
        "MG on every sample (label dropout switched off in the drawn batch, t_high = 1), the setting of the "
        "bounds; with the defaults (t < 0.75, 10% dropped) about 2/3 of a batch gets the teacher forward.",
        "FLOP bound = (3 + teacher forwards) / 3: 5/3 with the empty class and for w-input; "
        "(3 + 1 + N)/3 with the empty class removed and N labels averaged.",
        f"Median over {repeats} interleaved repeats (after one warm-up) of the mean step time.",
    ]
    return sec
