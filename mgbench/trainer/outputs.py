"""What a run leaves besides checkpoints: its cost figures and its final samples."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mgbench.config import TrainConfig
from mgbench.trainer.data import Dataset


def model_cost(model: torch.nn.Module, data: Dataset, device: torch.device) -> tuple[int, float]:
    """(trainable parameters, forward GFLOPs per sample) measured with torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    x = torch.zeros(1, *data.shape, device=device)
    t = torch.zeros(1, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device)
    w = torch.ones(1, device=device) if getattr(model, "w_input", False) else None
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x, t, y, w)
    return n_params, counter.get_total_flops() / 1e9


def write_samples(cfg: TrainConfig, ema: torch.nn.Module, data: Dataset, w: float, device: torch.device,
                  out: Path, step: int) -> list[Path]:
    """Sample `sample.n_grid` class-balanced samples with the run's sampler; write a grid image (and npz)."""
    from mgbench.trainer.sampling import sample, sampling_kwargs

    n = cfg.sample.n_grid
    labels = torch.arange(n, device=device) % data.num_classes
    seeds = [cfg.sample.seed + i for i in range(n)]
    kw = sampling_kwargs(cfg, w, data)
    traj = data.kind == "points"
    res = sample(ema, labels=labels, seeds=seeds, device=device, return_trajectory=traj, **kw)
    folder = out / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    png = folder / f"step_{step:08d}.png"
    if data.kind == "points":
        npz = folder / "samples.npz"
        _save_points(npz, res, labels)
        _scatter(res.x.cpu().numpy(), labels.cpu().numpy(), png, f"{cfg.name} (step {step}, NFE {res.nfe})")
        paths = [png, npz]
        # The same seeds under CFG at each sweep scale (CFG on top of MG for MG models): Fig. 2's CFG panels.
        for scale in cfg.eval.cfg_sweep:
            guidance = "mg+cfg" if kw["guidance"] in ("mg", "mg+cfg") else "cfg"
            swept = sample(ema, labels=labels, seeds=seeds, device=device, return_trajectory=True,
                           **{**kw, "guidance": guidance, "cfg_scale": float(scale)})
            paths.append(_save_points(folder / cfg_samples_name(scale), swept, labels))
            # The same points as an image: the MLflow UI shows PNGs, not npz.
            png_cfg = folder / cfg_grid_name(step, scale)
            title = f"{cfg.name} (step {step}, CFG s={scale:.2f}, NFE {swept.nfe})"
            _scatter(swept.x.cpu().numpy(), labels.cpu().numpy(), png_cfg, title)
            paths.append(png_cfg)
        return paths
    from torchvision.utils import save_image

    img = data.decode(res.x.cpu()).clamp(-1, 1)
    save_image((img + 1) / 2, png, nrow=int(np.ceil(np.sqrt(n))))
    return [png]


def cfg_samples_name(scale: float) -> str:
    """File name of the samples drawn with CFG at `scale` (beside samples.npz)."""
    return f"samples_cfg_{scale:.2f}.npz"


def cfg_grid_name(step: int, scale: float) -> str:
    """File name of the scatter image of the samples drawn with CFG at `scale` (beside step_N.png)."""
    return f"step_{step:08d}_cfg_{scale:.2f}.png"


def _save_points(path: Path, res, labels: torch.Tensor) -> Path:
    arrays = {"x": res.x.cpu().numpy(), "y": labels.cpu().numpy(), "nfe": np.array(res.nfe)}
    if res.trajectory is not None:
        arrays["traj"] = torch.stack([t.cpu() for t in res.trajectory]).numpy()
    np.savez(path, **arrays)
    return path


def _scatter(x: np.ndarray, y: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    for c, color in ((0, "tab:blue"), (1, "tab:orange")):
        ax.scatter(x[y == c, 0], x[y == c, 1], s=3, c=color, label=f"class {c}")
    ax.set(xlim=(-2.5, 2.5), ylim=(-2.5, 2.5), title=title, aspect="equal")
    ax.legend(loc="upper right", fontsize=7)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
