"""The prepared GPU benchmark: one script, a few minutes on one H100/H200, figures as JSON + markdown.

    python -m mgbench.bench.gpu --out DIR [--no-compile] [--quick]      (or MGBENCH_GPU_OUT=DIR)

bf16 autocast, TF32 matmuls; MFU against the card's dense bf16 peak. Eager and compiled side by side: MFU of
DiT-B/2 and XL/2 forward+backward with and without torch.compile (goal: XL/2 >= 40%), the compiled/eager training
step of vanilla and MG (compiled with the fused AdamW, as `train.compile` trains), MG/CFG sampling (compiled, as
`sample.compile: auto` samples on CUDA) and the MG steps against their FLOP bounds.
Writes DIR/gpu_results.json (merge with `mgbench bench --gpu-results DIR/gpu_results.json`) and
DIR/gpu_results.md. `--quick` runs tiny sizes and also works on a CPU (fp32), so it is tested there.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from mgbench.bench.markdown import render_sections, results_dict
from mgbench.bench.models import bench_models
from mgbench.bench.sampling import SamplingCase, bench_sampling
from mgbench.bench.timing import Section, machine
from mgbench.bench.training import VARIANTS, TrainingCase, bench_training

# Dense bf16 peak TFLOP/s by card name (vendor datasheets, without sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0,
                    "H100 NVL": 835.0, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
LATENT = (4, 32, 32)  # ImageNet 256x256 through the SD-VAE

GPU_SAMPLING = [SamplingCase("DiT-B/2", LATENT, 64, 50), SamplingCase("DiT-XL/2", LATENT, 64, 50)]
GPU_TRAINING = [TrainingCase("DiT-B/2", LATENT, 128, 5),  # every variant: 5 models + EMAs + AdamW states at once
                TrainingCase("DiT-XL/2", LATENT, 32, 3, variants=("vanilla", "MG"))]
GPU_MODELS = ["DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2"]
GPU_COMPILED_MODELS = ("DiT-B/2", "DiT-XL/2")   # also timed under torch.compile (MFU with and without)
COMPILE_ROWS = ("vanilla", "MG")                 # training variants also timed compiled
QUICK_SAMPLING = [SamplingCase("DiT-XS/2", (4, 8, 8), 8, 3)]
QUICK_TRAINING = [TrainingCase("DiT-XS/2", (4, 8, 8), 8, 1)]
QUICK_MODELS = ["DiT-XS/2"]


def peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of a card from its name (longest matching key), None when unknown."""
    hits = [k for k in PEAK_BF16_TFLOPS if k in name]
    return PEAK_BF16_TFLOPS[max(hits, key=len)] if hits else None


def run(out: Path, *, quick: bool = False, compile: bool = True, device: str | None = None,
        only: list[str] | None = None) -> dict:
    """Run every GPU section, write gpu_results.json and gpu_results.md under `out`; returns the results.
    compile: add the compiled rows (models and training steps) beside the eager ones; --quick never compiles."""
    compile = compile and not quick
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bf16 = cuda
    peak = peak_tflops(torch.cuda.get_device_name(dev)) if cuda else None
    settings = {"device": str(dev), "bf16_autocast": bf16, "tf32": cuda, "compile": compile, "quick": quick,
                "peak_bf16_tflops": peak}
    out.mkdir(parents=True, exist_ok=True)
    sections: list[Section] = []
    steps = [
        ("sampling", lambda: bench_sampling(QUICK_SAMPLING if quick else GPU_SAMPLING, repeats=3, device=dev,
                                            bf16=bf16, compile=compile)),   # as sample.compile: auto samples on CUDA
        ("training", lambda: bench_training(QUICK_TRAINING if quick else GPU_TRAINING,
                                            VARIANTS[:3] if quick else VARIANTS, repeats=3 if quick else 5,
                                            device=dev, bf16=bf16, compile_rows=COMPILE_ROWS if compile else ())),
        ("models", lambda: bench_models(QUICK_MODELS if quick else GPU_MODELS, shape=(4, 8, 8) if quick else LATENT,
                                        batch=8 if quick else 64, repeats=3 if quick else 10, device=dev,
                                        bf16=bf16, peak_tflops=peak,
                                        compiled=GPU_COMPILED_MODELS if compile else ())),
    ]
    for name, fn in steps:
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            sections.append(fn())
        except Exception as e:  # noqa: BLE001 - one failing section must not lose the others' figures
            sections.append(Section(name, f"{name}: failed", notes=[f"{type(e).__name__}: {e}"]))
        print(f"[{name}] {time.perf_counter() - t0:.1f} s", flush=True)
        for c in sections[-1].checks:
            print("  " + c.line(), flush=True)
        _write(out, machine(dev), settings, sections)  # after every section: a timeout keeps what was done
        if cuda:
            torch.cuda.empty_cache()
    return results_dict(machine(dev), settings, sections)


def _write(out: Path, info: dict, settings: dict, sections: list[Section]) -> None:
    """gpu_results.json and gpu_results.md."""
    (out / "gpu_results.json").write_text(json.dumps(results_dict(info, settings, sections), indent=1))
    head = "\n".join(f"- {k}: {v}" for k, v in {**info, **settings}.items())
    (out / "gpu_results.md").write_text(f"# mgbench GPU benchmark\n\n{head}\n\n{render_sections(sections)}")


def main(argv: list[str] | None = None) -> int:
    """Command line of the GPU script."""
    p = argparse.ArgumentParser(prog="python -m mgbench.bench.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("MGBENCH_GPU_OUT"),
                   help="folder for gpu_results.json/.md (default: $MGBENCH_GPU_OUT)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (runs on a CPU too)")
    p.add_argument("--no-compile", action="store_true", help="eager rows only (skip the compiled ones)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--only", default=None, help="comma-separated sections: sampling,training,models")
    args = p.parse_args(argv)
    if not args.out:
        print("mgbench.bench.gpu: give --out DIR or set MGBENCH_GPU_OUT", file=sys.stderr)
        return 2
    if not args.quick and not torch.cuda.is_available() and args.device != "cpu":
        print("mgbench.bench.gpu: no CUDA device; use --quick to run the tiny sizes on a CPU", file=sys.stderr)
        return 2
    run(Path(args.out), quick=args.quick, compile=not args.no_compile, device=args.device,
        only=args.only.split(",") if args.only else None)
    print(f"wrote {Path(args.out) / 'gpu_results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
