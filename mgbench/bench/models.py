"""Model cost per size: forward+backward time, FLOPs, achieved FLOP/s (MFU on a GPU) and peak memory.

Peak memory on CPU is the rise of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) during one forward+backward: it counts activations and gradients as the
allocator really held them, not Python objects (tracemalloc does not see torch's buffers). On a GPU
it is torch.cuda.max_memory_allocated above the level before the step.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from mgbench.bench.timing import Check, Section, autocast, measure, median, peak_cuda_mb, peak_rss_mb

NUM_CLASSES = 10                              # label set
CPU_ARCHS = ["DiT-XS/2", "DiT-T/2", "DiT-S/2", "DiT-B/2"]
QUICK_ARCHS = ["DiT-XS/2", "DiT-T/2"]
CPU_SHAPE, CPU_BATCH = (4, 8, 8), 8           # small input: 16 tokens at patch 2


def forward_flops(model: torch.nn.Module, shape: tuple[int, ...], device: torch.device) -> float:
    """Forward FLOPs per sample, counted by torch's FlopCounterMode (matmuls and attention)."""
    x = torch.zeros(1, *shape, device=device)
    t, y = torch.zeros(1, device=device), torch.zeros(1, dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x, t, y)
    return float(counter.get_total_flops())


def _fwd_bwd(model, shape, batch: int, device: torch.device, bf16: bool):
    """A closure: one forward + backward of a batch (gradients accumulate; nothing is stepped)."""
    x = torch.randn(batch, *shape, device=device)
    t = torch.rand(batch, device=device) * 1000
    y = torch.arange(batch, device=device) % NUM_CLASSES

    def run() -> None:
        with autocast(device, bf16):
            out = model(x, t, y)
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    return run


MFU_GOAL = 0.40          # goal on a GPU: DiT-XL/2 forward+backward at >= 40% of the card's dense bf16 peak
COMPILED = " (compiled)"  # suffix of the rows timed under torch.compile


def bench_models(archs: list[str] | None = None, *, quick: bool = False, shape: tuple[int, ...] = CPU_SHAPE,
                 batch: int = CPU_BATCH, repeats: int | None = None, device: torch.device | str = "cpu",
                 bf16: bool = False, peak_tflops: float | None = None, compiled: tuple[str, ...] = ()) -> Section:
    """The model section: one row per size, and one more under torch.compile for the sizes in `compiled`; with a
    peak, a check of DiT-XL/2's best MFU against MFU_GOAL."""
    device = torch.device(device)
    archs = archs or (QUICK_ARCHS if quick else CPU_ARCHS)
    repeats = repeats or 3
    sec = Section("models", f"Model cost per size (input {'x'.join(map(str, shape))}, batch {batch})")
    mfu: dict[str, float] = {}
    for arch, compile in [(a, c) for a in archs for c in (False, True) if not c or a in compiled]:
        torch.manual_seed(0)
        model = _build(arch, shape, device)
        flops = forward_flops(model, shape, device)
        run = _fwd_bwd(torch.compile(model) if compile else model, shape, batch, device, bf16)
        run()  # warm-up (and first-touch allocations)
        mem = peak_cuda_mb(run, device) if device.type == "cuda" else peak_rss_mb(run)
        timed = measure({arch: run}, repeats=repeats, warmup=0, device=device)[arch]
        sec_per = median(timed.wall)  # achieved FLOP/s: per second of wall time (all threads)
        achieved = 3 * flops * batch / sec_per  # backward ~ 2x forward
        n_params = sum(p.numel() for p in model.parameters())
        row = {"model": arch + (COMPILED if compile else ""), "params (M)": round(n_params / 1e6, 2),
               "fwd GFLOP/sample": round(flops / 1e9, 3), "fwd+bwd ms": round(1000 * sec_per, 1),
               "cpu ms": timed.columns(device)["cpu ms"], "spread": timed.columns(device)["spread"],
               "load": timed.load, "achieved TFLOP/s": round(achieved / 1e12, 4),
               "peak mem MB": None if mem is None else round(mem, 1)}
        if peak_tflops:
            row["MFU"] = f"{achieved / (peak_tflops * 1e12):.1%}"
            mfu[row["model"]] = achieved / (peak_tflops * 1e12)
        sec.rows.append(row)
        del model, run
    xl = {k: v for k, v in mfu.items() if k.startswith("DiT-XL/2")}
    if xl:
        best = max(xl, key=xl.get)
        sec.checks.append(Check(f"MFU forward+backward, {best}, batch {batch}", xl[best], f">= {MFU_GOAL:.0%}",
                                xl[best] >= MFU_GOAL))
    memory = ("torch.cuda.max_memory_allocated above the level before the step" if device.type == "cuda" else
              "rise of peak RSS during one forward+backward (freed heap returned by malloc_trim, VmHWM reset via "
              "/proc/self/clear_refs); a lower bound where the allocator reuses memory it kept")
    sec.notes += [
        f"Forward FLOPs from torch.utils.flop_counter; achieved = 3 x forward FLOPs x batch / median time of "
        f"{repeats} forward+backward passes (fp32{' + bf16 autocast' if bf16 else ''}).",
        f"Peak memory: {memory}.",
    ]
    if peak_tflops:
        sec.notes.append(f"MFU against the card's dense peak of {peak_tflops:g} TFLOP/s.")
    if compiled:
        sec.notes.append(f"`{COMPILED.strip()}`: the same model under torch.compile (default mode); its warm-up "
                         "call compiles.")
    return sec


def _build(arch: str, shape: tuple[int, ...], device: torch.device) -> torch.nn.Module:
    """A registry model for this section (untrained, training mode)."""
    from mgbench.trainer.models import build_model

    return build_model(arch, input_shape=shape, num_classes=NUM_CLASSES).to(device).train()
