"""Training speed: an MG step against a vanilla step at the same batch, next to the FLOP bound.

A vanilla step is forward + backward, ~3F per sample. MG adds one no-grad teacher forward on
[cond; uncond], ~2F: bound 5/3. With the empty class removed the teacher runs on [cond; N labels],
(1 + N)F: bound (3 + 1 + N)/3. A w-input model's teacher is the same [cond; uncond] forward: 5/3.
Both steps include what the loop does besides (noise draw, AdamW, EMA update), which pulls the
measured ratio below the bound at small sizes. Each step is `trainer.step.train_step`, the trainer's own.

Compile rows time the same steps with the model and EMA teacher under torch.compile (`train.compile`),
interleaved with the eager ones; goal: compiled <= COMPILE_GOAL x eager.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from mgbench.bench.timing import Check, Section, Timed, judged, measure, median, spread
from mgbench.config import ObjectiveConfig
from mgbench.trainer.models import build_model
from mgbench.trainer.objective import Objective
from mgbench.trainer.step import adamw, step_modules, train_step

NUM_CLASSES = 10        # digits-like label set
BOUND_TOL = 0.05        # goal: MG/vanilla at most 5% above the FLOP bound (no cost beyond the teacher FLOPs)
COMPILE_GOAL = 0.9      # goal: a compiled step at most 0.9 x the eager step of the same variant
COMPILED = " (compiled)"  # suffix of the compile rows' variant names


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
    """A closure doing `steps_per_repeat` training steps of variant v (`train_step`: loss, backward, AdamW, EMA)."""
    torch.manual_seed(seed)
    model = build_model(case.arch, input_shape=case.shape, num_classes=NUM_CLASSES, empty_class=v.empty_class,
                        w_input=v.w_input).to(device)
    m = step_modules(model, adamw(model, 1e-4, fused=compile), compile=compile)  # as the trainer builds it
    oc = ObjectiveConfig(formulation="flow", label_drop=0.1 if v.empty_class else 0.0, w=1.5 if v.mg else 1.0,
                         t_high=1.0, empty_class=v.empty_class, uncond_labels=v.uncond_labels)
    objective = Objective(oc, NUM_CLASSES, w_input=v.w_input)
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(case.batch, *case.shape, device=device)
    y = torch.arange(case.batch, device=device) % NUM_CLASSES

    def run() -> float:
        for _ in range(case.steps_per_repeat):
            nz = objective.draw(case.batch, case.shape, gen, oc.w)
            nz.drop.zero_()  # MG on every sample: the setting of the FLOP bound
            loss, _ = train_step(m, objective, x0, y, nz, mg_on=v.mg, ema_decay=0.9999, bf16=bf16)
        return float(loss)

    return run


def bench_case(case: TrainingCase, variants: list[Variant], *, repeats: int, device: torch.device,
               bf16: bool = False, compile: bool = False, compile_rows: tuple[str, ...] = ()
               ) -> tuple[list[dict], list[Check]]:
    """Time every variant's step at one case, interleaved (and compiled, for the variants named in
    `compile_rows`); rows, and checks against each FLOP bound and the compile goal."""
    fns = {v.name: make_step(case, v, device, bf16=bf16, compile=compile) for v in variants}
    fns |= {v.name + COMPILED: make_step(case, v, device, bf16=bf16, compile=True)
            for v in variants if v.name in compile_rows}
    timed = measure(fns, repeats=repeats, warmup=1, device=device)
    step_s = {n: median(t.basis(device)) / case.steps_per_repeat for n, t in timed.items()}
    where = f"{case.arch} {'x'.join(map(str, case.shape))} batch {case.batch}"
    rows, checks = [], []
    for name, t in timed.items():
        v = next(v for v in variants if name in (v.name, v.name + COMPILED))
        base = variants[0].name + (COMPILED if name.endswith(COMPILED) else "")
        rows.append(_row(case, name, t, step_s[name] / step_s[base], v.bound, device))
    for v in variants:
        if v.mg:
            ratio = step_s[v.name] / step_s[variants[0].name]
            goal = f"<= {1 + BOUND_TOL:.2f} x FLOP bound {v.bound:.3f}"
            checks.append(judged(f"training {v.name}/vanilla step time, {where}", ratio, goal,
                                 ratio <= v.bound * (1 + BOUND_TOL),
                                 _spreads(timed, device, v.name, variants[0].name), v.bound))
    for v in variants:
        if v.name in compile_rows:
            ratio = step_s[v.name + COMPILED] / step_s[v.name]
            checks.append(judged(f"training compiled/eager step time, {v.name}, {where}", ratio,
                                 f"<= {COMPILE_GOAL:.2f}", ratio <= COMPILE_GOAL,
                                 _spreads(timed, device, v.name, v.name + COMPILED)))
    return rows, checks


def _row(case: TrainingCase, name: str, t: Timed, ratio: float, bound: float, device: torch.device) -> dict:
    """One table row: the case, the variant, its times per step, the ratio to vanilla and the FLOP bound."""
    return {"model": case.arch, "input": "x".join(map(str, case.shape)), "batch": case.batch, "variant": name,
            **t.columns(device, case.steps_per_repeat), "ratio": round(ratio, 3), "FLOP bound": round(bound, 3),
            "ratio/bound": round(ratio / bound, 3)}


def _spreads(timed: dict[str, Timed], device: torch.device, *names: str) -> list[float]:
    """The spreads of the named rows' timing basis."""
    return [spread(timed[n].basis(device)) for n in names]


def bench_training(cases: list[TrainingCase] | None = None, variants: list[Variant] | None = None, *,
                   quick: bool = False, repeats: int | None = None, device: torch.device | str = "cpu",
                   bf16: bool = False, compile: bool = False, compile_rows: tuple[str, ...] = ()) -> Section:
    """The training section: step-time ratios of the MG variants to vanilla (and compiled to eager for the
    variants named in `compile_rows`), per case."""
    device = torch.device(device)
    cases = cases or (QUICK_CASES if quick else CPU_CASES)
    variants = variants or (VARIANTS[:3] if quick else VARIANTS)
    repeats = repeats or (3 if quick else 4)
    sec = Section("training", "Training: MG step time vs vanilla, against the FLOP bound; compiled vs eager")
    for case in cases:
        chosen = [v for v in variants if case.variants is None or v.name in case.variants]
        rows, checks = bench_case(case, chosen, repeats=repeats, device=device, bf16=bf16, compile=compile,
                                  compile_rows=compile_rows)
        sec.rows += rows
        sec.checks += checks
    basis = "wall" if device.type == "cuda" else "CPU"
    sec.notes += [
        "One step = noise draw + `trainer.step.train_step` (objective, backward, AdamW, foreach EMA update): what "
        "`loop.train` does per step, without data loading and logging; flow formulation, teacher = EMA model.",
        "MG on every sample (label dropout switched off in the drawn batch, t_high = 1), the setting of the "
        "bounds; with the defaults (t < 0.75, 10% dropped) about 2/3 of a batch gets the teacher forward.",
        "FLOP bound = (3 + teacher forwards) / 3: 5/3 with the empty class and for w-input; "
        "(3 + 1 + N)/3 with the empty class removed and N labels averaged.",
        f"Ratios from {basis} time: median over {repeats} interleaved repeats (after one warm-up) of "
        "the mean step time; `ratio` is to vanilla of the same compile setting. `load`: 1-minute load average.",
    ]
    if compile_rows:
        sec.notes.append("`(compiled)`: model and EMA teacher under torch.compile (default mode) and the fused "
                         "AdamW, as `train.compile: true` does; its warm-up call compiles.")
    return sec
