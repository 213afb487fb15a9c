"""A short real training run on the GPU: the trainer's CUDA path end to end (bf16 autocast, TF32, EMA
teacher, checkpoint, resume, final samples), vanilla against MG, on digits with DiT-T/2.

    python -m mgbench.bench.gpu_train --out DIR [--steps 300]

Prints and writes DIR/gpu_train.json: seconds per step of each variant, their ratio, the final losses and
whether a capped run resumed to the same weights as an uncapped one.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mgbench.config import train_config_from_dict
from mgbench.trainer.checkpoint import latest_checkpoint, load_checkpoint
from mgbench.trainer.loop import train
from mgbench.tracking import MemoryTracker, M_STEP_TIME


def config(out: Path, w: float, steps: int, cap: int = 0, device: str = "cuda", model: dict | None = None,
           objective: dict | None = None):
    return train_config_from_dict({
        "name": f"gpu-w{w}", "out_dir": str(out), "data": {"name": "digits"},
        "model": {"arch": "DiT-T/2", **(model or {})},
        "objective": {"formulation": "diffusion", "w": w, **(objective or {})},
        "optim": {"batch_size": 256, "lr": 3e-4, "ema_decay": 0.999},
        "train": {"steps": steps, "log_every": 50, "ckpt_every": 100, "precision": "bf16", "device": device,
                  "max_steps_per_run": cap},
        "sample": {"steps": 50, "n_grid": 64}}, "gpu_train")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test")
    args = ap.parse_args(argv)
    out = Path(args.out)
    res: dict = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "steps": args.steps}
    for w in (1.0, 1.5):
        tr = MemoryTracker()
        r = train(config(out / f"w{w}", w, args.steps, device=args.device), tr)
        step_s = tr.series(M_STEP_TIME)[1:]  # the first window holds the warm-up
        res[f"w={w}"] = {"status": r.status, "s_per_step": sum(step_s) / len(step_s), "final_loss": r.losses[-1][1]}
    res["mg_over_vanilla_step_time"] = res["w=1.5"]["s_per_step"] / res["w=1.0"]["s_per_step"]
    # Resume on the GPU: 2 capped invocations == 1 uncapped run (same weights, within bf16 nondeterminism).
    half = args.steps // 2
    for _ in range(2):
        train(config(out / "capped", 1.5, args.steps, cap=half, device=args.device))
    a = load_checkpoint(latest_checkpoint(out / "w1.5"))["model"]
    b = load_checkpoint(latest_checkpoint(out / "capped"))["model"]
    res["resume_max_abs_diff"] = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    # The other MG variants on the GPU: w as an input (w sampled per sample), and no empty class.
    variants = {"w_input": ({"w_input": True}, {"w_range": [1.0, 1.8], "formulation": "flow"}),
                "no_empty_class": ({}, {"empty_class": False, "label_drop": 0.0, "uncond_labels": 4})}
    for name, (model, objective) in variants.items():
        r = train(config(out / name, 1.5, 60, device=args.device, model=model, objective=objective))
        res[name] = {"status": r.status, "final_loss": r.losses[-1][1]}
    (out / "gpu_train.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
